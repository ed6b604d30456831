"""The conversation view: message cards (Markdown rendered), footers with speed and time,
copy/regenerate actions, and an empty state with suggestions."""

from __future__ import annotations

import math
from typing import List, Optional

from PySide6.QtCore import QSize, Qt, QTimer, Signal
from PySide6.QtGui import (
    QColor,
    QGuiApplication,
    QTextBlockFormat,
    QTextCharFormat,
    QTextCursor,
    QTextDocument,
    QTextFormat,
)
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QTextBrowser,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from .. import theme
from ..history import COMPLETE, ERROR, INTERRUPTED, STOPPED, STREAMING

MAX_COLUMN_WIDTH = 860


class MarkdownView(QTextBrowser):
    """Read-only rich text that grows to fit its content (no inner scroll bar)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setOpenExternalLinks(True)
        self.setFrameShape(QFrame.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setTextInteractionFlags(Qt.TextSelectableByMouse | Qt.TextSelectableByKeyboard | Qt.LinksAccessibleByMouse)
        self.viewport().setAutoFillBackground(False)
        self.setStyleSheet("QTextBrowser { background: transparent; border: none; padding: 0; }")
        self.document().setDocumentMargin(2)
        self.document().documentLayout().documentSizeChanged.connect(self._fit)
        self._source = ""
        self._fit()

    def source_text(self) -> str:
        return self._source

    def set_markdown(self, text: str) -> None:
        self._source = text
        doc = self.document()
        doc.setMarkdown(text, QTextDocument.MarkdownDialectGitHub)
        _style_code(doc)
        self._fit()

    def set_plain(self, text: str) -> None:
        self._source = text
        self.setPlainText(text)
        self._fit()

    def _fit(self, *_):
        doc = self.document()
        doc.setTextWidth(self.viewport().width() if self.viewport().width() > 0 else doc.textWidth())
        h = math.ceil(doc.size().height()) + 2 * self.frameWidth() + 2
        if h != self.height():
            self.setFixedHeight(max(h, 20))

    def resizeEvent(self, e) -> None:
        super().resizeEvent(e)
        self._fit()

    def sizeHint(self) -> QSize:
        return QSize(400, self.height())


def _style_code(doc: QTextDocument) -> None:
    """Give fenced code blocks a background and a monospace font; tint inline code."""
    mono = theme.mono_font()
    cur = QTextCursor(doc)
    block = doc.begin()
    code_bg = QColor(theme.CODE_BG)
    while block.isValid():
        bf = block.blockFormat()
        is_code = (bf.hasProperty(QTextFormat.BlockCodeFence) or bf.hasProperty(QTextFormat.BlockCodeLanguage)
                   or bf.nonBreakableLines())
        if is_code:
            cur.setPosition(block.position())
            nb = QTextBlockFormat()
            nb.setBackground(code_bg)
            nb.setLeftMargin(4)
            nb.setRightMargin(4)
            cur.mergeBlockFormat(nb)
            cur.setPosition(block.position())
            cur.setPosition(block.position() + max(0, block.length() - 1), QTextCursor.KeepAnchor)
            cf = QTextCharFormat()
            cf.setFont(mono)
            cf.setForeground(QColor("#d6dae0"))
            cur.mergeCharFormat(cf)
        else:
            it = block.begin()
            while not it.atEnd():
                frag = it.fragment()
                if frag.isValid() and frag.charFormat().fontFixedPitch():
                    cur.setPosition(frag.position())
                    cur.setPosition(frag.position() + frag.length(), QTextCursor.KeepAnchor)
                    cf = QTextCharFormat()
                    cf.setBackground(QColor("#252a33"))
                    cf.setForeground(QColor("#f0abfc"))
                    cf.setFont(mono)
                    cur.mergeCharFormat(cf)
                it += 1
        block = block.next()


def format_footer(meta: dict) -> str:
    """'18.4 tok/s · 57 tokens · 3.1 s' from a message's meta."""
    parts = []
    if meta.get("tokens_per_s"):
        parts.append(f"{meta['tokens_per_s']:.1f} tok/s")
    if meta.get("tokens"):
        parts.append(f"{meta['tokens']} tokens")
    if meta.get("seconds") is not None and meta.get("tokens"):
        parts.append(f"{meta['seconds']:.1f} s")
    if meta.get("first_token_s") is not None and meta.get("tokens"):
        parts.append(f"first token {meta['first_token_s']:.2f} s")
    return "  ·  ".join(parts)


def footer_tooltip(meta: dict) -> str:
    rows = []
    for key, label, fmt in (
        ("model", "model", "{}"), ("mode", "engine", "{}"), ("prompt_tokens", "prompt tokens", "{}"),
        ("prompt_tps", "prompt speed", "{:.1f} tok/s"), ("hit_rate", "cache hit rate", "{:.0%}"),
        ("bytes_per_token", "read per token", None), ("peak_memory", "peak MLX memory", None),
        ("finish_reason", "finish", "{}"),
    ):
        v = meta.get(key)
        if v in (None, ""):
            continue
        rows.append(f"{label}: " + (theme.human_bytes(v) if fmt is None else fmt.format(v)))
    return "\n".join(rows)


_BADGES = {
    STREAMING: ("generating…", "#2a2140", "#c4b5fd"),
    STOPPED: ("stopped", "#2b2412", theme.WARN),
    INTERRUPTED: ("interrupted", "#2b2412", theme.WARN),
    ERROR: ("error", "#2d1214", theme.DANGER),
}


class MessageWidget(QFrame):
    """One message: who, the text, and (for answers) speed, time and actions."""

    copy_requested = Signal(object)
    regenerate_requested = Signal(object)

    def __init__(self, role: str, text: str = "", *, name: str = "", status: str = COMPLETE,
                 meta: Optional[dict] = None, msg_id: Optional[int] = None, parent=None):
        super().__init__(parent)
        self.role = role
        self.msg_id = msg_id
        self.status = status
        self.meta = dict(meta or {})
        self.setObjectName("MessageUser" if role == "user" else "MessageAssistant")
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Minimum)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(14, 10, 14, 8) if role == "user" else lay.setContentsMargins(4, 6, 4, 4)
        lay.setSpacing(4)

        head = QHBoxLayout()
        head.setSpacing(8)
        self.role_label = QLabel(name or ("You" if role == "user" else "Assistant"))
        self.role_label.setObjectName("RoleLabel" if role == "user" else "RoleLabelAssistant")
        head.addWidget(self.role_label)
        self.badge = QLabel()
        self.badge.setObjectName("StatusBadge")
        self.badge.hide()
        head.addWidget(self.badge)
        head.addStretch(1)
        lay.addLayout(head)

        self.body = MarkdownView()
        lay.addWidget(self.body)

        self.footer_row = QWidget()
        foot = QHBoxLayout(self.footer_row)
        foot.setContentsMargins(0, 0, 0, 0)
        foot.setSpacing(2)
        self.footer = QLabel()
        self.footer.setObjectName("MessageFooter")
        foot.addWidget(self.footer)
        foot.addStretch(1)
        self.copy_btn = QToolButton()
        self.copy_btn.setIcon(theme.icon("copy", theme.MUTED))
        self.copy_btn.setToolTip("Copy")
        self.copy_btn.clicked.connect(self._copy)
        foot.addWidget(self.copy_btn)
        self.regen_btn = QToolButton()
        self.regen_btn.setIcon(theme.icon("regenerate", theme.MUTED))
        self.regen_btn.setToolTip("Regenerate")
        self.regen_btn.clicked.connect(lambda: self.regenerate_requested.emit(self))
        foot.addWidget(self.regen_btn)
        lay.addWidget(self.footer_row)
        self.regen_btn.setVisible(role == "assistant")
        self.footer_row.setVisible(role == "assistant")

        self.set_text(text)
        self.set_status(status)
        self.set_meta(self.meta)

    def text(self) -> str:
        return self.body.source_text()

    def set_text(self, text: str) -> None:
        if self.role == "assistant":
            self.body.set_markdown(text if text else ("…" if self.status == STREAMING else ""))
            self.body._source = text
        else:
            self.body.set_plain(text)

    def set_status(self, status: str) -> None:
        self.status = status
        badge = _BADGES.get(status)
        if badge:
            label, bg, fg = badge
            self.badge.setText(label)
            self.badge.setStyleSheet(f"background: {bg}; color: {fg};")
            self.badge.show()
        else:
            self.badge.hide()
        busy = status == STREAMING
        self.copy_btn.setEnabled(not busy)
        self.regen_btn.setEnabled(not busy)

    def set_meta(self, meta: dict) -> None:
        self.meta = dict(meta or {})
        self.footer.setText(format_footer(self.meta))
        self.footer.setToolTip(footer_tooltip(self.meta))
        if self.meta.get("error"):
            self.footer.setText(self.meta["error"])

    def set_regenerate_visible(self, visible: bool) -> None:
        self.regen_btn.setVisible(visible and self.role == "assistant")

    def _copy(self) -> None:
        QGuiApplication.clipboard().setText(self.text())
        self.copy_requested.emit(self)


class EmptyState(QWidget):
    """What a new chat shows: the model and a few prompts to start with."""

    suggestion_clicked = Signal(str)

    SUGGESTIONS = (
        "What is the capital of France?",
        "Explain in two sentences why reading less data makes inference faster.",
        "Write a haiku about solid-state drives.",
        "Give me three tips for writing clear Python code.",
    )

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(20, 60, 20, 20)
        lay.setSpacing(10)
        lay.addStretch(1)
        logo = QLabel()
        logo.setPixmap(theme.app_icon().pixmap(64, 64))
        logo.setAlignment(Qt.AlignHCenter)
        lay.addWidget(logo)
        self.title = QLabel("Start a conversation")
        self.title.setAlignment(Qt.AlignHCenter)
        self.title.setStyleSheet("font-size: 18pt; font-weight: 600;")
        lay.addWidget(self.title)
        self.subtitle = QLabel("")
        self.subtitle.setObjectName("Muted")
        self.subtitle.setAlignment(Qt.AlignHCenter)
        self.subtitle.setWordWrap(True)
        lay.addWidget(self.subtitle)
        lay.addSpacing(16)
        grid = QVBoxLayout()
        grid.setSpacing(8)
        row = None
        self.buttons: list = []
        for i, s in enumerate(self.SUGGESTIONS):
            if i % 2 == 0:
                row = QHBoxLayout()
                row.setSpacing(8)
                grid.addLayout(row)
            b = QPushButton()
            b.setObjectName("Suggestion")
            b.setCursor(Qt.PointingHandCursor)
            b.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
            b.setMinimumHeight(58)
            inner_l = QVBoxLayout(b)
            inner_l.setContentsMargins(14, 8, 14, 8)
            text = QLabel(s)  # a label inside, so long suggestions wrap instead of widening the column
            text.setWordWrap(True)
            text.setAttribute(Qt.WA_TransparentForMouseEvents)
            text.setStyleSheet("background: transparent; color: #c9ced6;")
            inner_l.addWidget(text)
            self.buttons.append(b)
            b.clicked.connect(lambda _=False, s=s: self.suggestion_clicked.emit(s))
            row.addWidget(b)
        wrap = QHBoxLayout()
        wrap.addStretch(1)
        inner = QWidget()
        inner.setLayout(grid)
        inner.setMaximumWidth(720)
        inner.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        wrap.addWidget(inner, 10)
        wrap.addStretch(1)
        lay.addLayout(wrap)
        lay.addStretch(2)

    def set_model(self, name: str, detail: str, ready: bool = False) -> None:
        self.subtitle.setText(f"{name}  ·  {detail}" if name else detail)
        for b in self.buttons:
            b.setEnabled(ready)


class ChatView(QScrollArea):
    """A scrolling column of :class:`MessageWidget` (centred, at most MAX_COLUMN_WIDTH wide)."""

    regenerate_requested = Signal(object)
    copy_requested = Signal(object)
    suggestion_clicked = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        canvas = QWidget()
        canvas.setObjectName("ChatCanvas")
        outer = QHBoxLayout(canvas)
        outer.setContentsMargins(16, 12, 16, 12)
        outer.addStretch(1)
        self.column = QWidget()
        self.column.setMaximumWidth(MAX_COLUMN_WIDTH)
        self.column.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        self.col_layout = QVBoxLayout(self.column)
        self.col_layout.setContentsMargins(0, 0, 0, 0)
        self.col_layout.setSpacing(14)
        self.empty = EmptyState()
        self.empty.suggestion_clicked.connect(self.suggestion_clicked)
        self.col_layout.addWidget(self.empty)
        self.col_layout.addStretch(1)
        outer.addWidget(self.column, 100)
        outer.addStretch(1)
        self.setWidget(canvas)
        self._messages: List[MessageWidget] = []
        self._stick = True
        self.verticalScrollBar().rangeChanged.connect(self._on_range)
        self.verticalScrollBar().valueChanged.connect(self._on_scroll)

    # ------------------------------------------------------------------ content
    @property
    def messages(self) -> List[MessageWidget]:
        return list(self._messages)

    def clear(self) -> None:
        for m in self._messages:
            m.setParent(None)
            m.deleteLater()
        self._messages.clear()
        self.empty.show()
        self._stick = True

    def add_message(self, role: str, text: str = "", **kw) -> MessageWidget:
        self.empty.hide()
        w = MessageWidget(role, text, **kw)
        w.regenerate_requested.connect(self.regenerate_requested)
        w.copy_requested.connect(self.copy_requested)
        self.col_layout.insertWidget(self.col_layout.count() - 1, w)
        self._messages.append(w)
        self._update_regen()
        self._stick = True
        QTimer.singleShot(0, self.scroll_to_bottom)
        return w

    def remove_message(self, w: MessageWidget) -> None:
        if w in self._messages:
            self._messages.remove(w)
            w.setParent(None)
            w.deleteLater()
        self.empty.setVisible(not self._messages)
        self._update_regen()

    def last_assistant(self) -> Optional[MessageWidget]:
        for m in reversed(self._messages):
            if m.role == "assistant":
                return m
        return None

    def _update_regen(self) -> None:
        last = self._messages[-1] if self._messages else None
        for m in self._messages:
            m.set_regenerate_visible(m is last)

    # ---------------------------------------------------------------- scrolling
    def scroll_to_bottom(self) -> None:
        sb = self.verticalScrollBar()
        sb.setValue(sb.maximum())

    def _on_scroll(self, value: int) -> None:
        sb = self.verticalScrollBar()
        self._stick = value >= sb.maximum() - 24

    def _on_range(self, _lo: int, hi: int) -> None:
        if self._stick:
            self.verticalScrollBar().setValue(hi)

