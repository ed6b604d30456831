"""The window's banners and chips: Notice (dismissable message), Chip (elided one-line label), Banner
(progress of preparing / loading the model, with Cancel and "Prepare again")."""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QPainter, QPalette
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPushButton, QSizePolicy, QStyle, QStyleOption, QToolButton

from .. import theme
from .progress_card import ProgressCard


class Notice(QFrame):
    """A dismissable banner: errors stay until closed, other notices fade after a while."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("Notice")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(12, 8, 8, 8)
        self.icon = QLabel()
        lay.addWidget(self.icon, 0, Qt.AlignTop)
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        lay.addWidget(self.label, 1)
        close = QToolButton()
        close.setIcon(theme.icon("close", theme.MUTED))
        close.clicked.connect(self.hide)
        lay.addWidget(close, 0, Qt.AlignTop)
        self.level = ""
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.hide)
        self.hide()

    def show_message(self, level: str, text: str) -> None:
        self.level = level
        self.setProperty("level", level)
        self.style().unpolish(self)
        self.style().polish(self)
        color = {"error": theme.DANGER, "ok": theme.OK}.get(level, theme.ACCENT_2)
        self.icon.setPixmap(theme.icon("alert" if level == "error" else "bolt", color).pixmap(18, 18))
        self.label.setText(text)
        self.show()
        if level == "error":
            self._timer.stop()
        else:
            self._timer.start(8000)

    def text(self) -> str:
        return self.label.text() if self.isVisible() else ""


class Chip(QLabel):
    """A one-line label that draws its text elided ("…") when narrower than it: its width
    never depends on its text, so a long text does not widen the layout (``text()`` stays whole)."""

    def __init__(self, text: str = "", parent=None):
        super().__init__(text, parent)
        self.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Fixed)

    def setText(self, text: str) -> None:
        super().setText(text)
        self.setMaximumWidth(super().sizeHint().width())  # as wide as its text when there is room

    def paintEvent(self, e) -> None:
        p = QPainter(self)
        opt = QStyleOption()
        opt.initFrom(self)
        self.style().drawPrimitive(QStyle.PE_Widget, opt, p, self)  # the style sheet's pill
        r = self.contentsRect()
        p.setPen(self.palette().color(QPalette.WindowText))
        text = self.fontMetrics().elidedText(self.text(), Qt.ElideRight, r.width())
        p.drawText(r, Qt.AlignVCenter | Qt.AlignLeft, text)


class Banner(ProgressCard):
    """Progress of preparing / loading the model, shown above the chat. While the built-in
    model is prepared it has Cancel; after a cancel, "Prepare again"."""

    retry_requested = Signal()

    def __init__(self, parent=None):
        super().__init__(parent, cancellable=True)
        self.retry_btn = QPushButton("Prepare again")
        self.retry_btn.clicked.connect(self.retry_requested)
        self.title_row.addWidget(self.retry_btn)
        self.retry_btn.hide()
        self.hide()

    def start(self, title: str, busy: bool = False, cancellable: bool = False) -> None:
        self.title.setText(title)
        self.message.setText("")
        self.percent.setText("")
        if busy:
            self.bar.setRange(0, 0)
        else:
            self.bar.setRange(0, 1000)
            self.bar.setValue(0)
        self.bar.show()
        self.cancel_btn.setVisible(cancellable)
        self.cancel_btn.setEnabled(True)
        self.retry_btn.hide()
        self.show()

    def finish(self) -> None:
        """Hide, keeping the space: the chat below does not jump up when the model is ready
        (the space goes with :meth:`release`, when the user sends or opens a chat)."""
        self._retain(True)
        self.hide()

    def release(self) -> None:
        """Give the space of a finished banner back to the chat."""
        if not self.isVisible():
            self._retain(False)

    def _retain(self, on: bool) -> None:
        sp = self.sizePolicy()
        if sp.retainSizeWhenHidden() != on:
            sp.setRetainSizeWhenHidden(on)
            self.setSizePolicy(sp)

    def show_cancelled(self, title: str, message: str) -> None:
        self.title.setText(title)
        self.message.setText(message)
        self.percent.setText("")
        self.bar.hide()
        self.cancel_btn.hide()
        self.retry_btn.show()
        self.show()

