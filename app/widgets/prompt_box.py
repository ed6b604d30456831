"""The prompt box: Enter sends, Shift+Enter starts a new line; it grows with its text.
The composer frames it with the Send / Stop button."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QVBoxLayout

from .. import theme


class PromptBox(QPlainTextEdit):
    """Enter sends (``submitted``), Shift+Enter inserts a new line. URL drops (files,
    folders) are left to the window, which imports them."""

    submitted = Signal(str)
    MIN_LINES, MAX_LINES = 1, 8

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setPlaceholderText("Message the model…  (Enter to send, Shift+Enter for a new line)")
        self.setTabChangesFocus(True)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.document().contentsChanged.connect(self._grow)
        self._grow()

    def keyPressEvent(self, e: QKeyEvent) -> None:
        if e.key() in (Qt.Key_Return, Qt.Key_Enter) and not (e.modifiers() & (Qt.ShiftModifier | Qt.AltModifier)):
            self.submit()
            return
        super().keyPressEvent(e)

    def submit(self) -> None:
        text = self.toPlainText().strip()
        if text and not self.isReadOnly():
            self.submitted.emit(text)

    def _grow(self) -> None:
        # QPlainTextEdit's document height is in lines (wrapped lines included)
        n = int(self.document().size().height())
        lines = max(self.MIN_LINES, min(self.MAX_LINES, n))
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAsNeeded if n > self.MAX_LINES else Qt.ScrollBarAlwaysOff)
        m = self.contentsMargins()
        h = (lines * self.fontMetrics().lineSpacing() + 2 * int(self.document().documentMargin())
             + m.top() + m.bottom() + 2 * self.frameWidth() + 4)
        if h != self.height():
            self.setFixedHeight(h)

    def resizeEvent(self, e) -> None:
        super().resizeEvent(e)
        self._grow()

    # URL drags go to the main window (model import), not into the text.
    def canInsertFromMimeData(self, source) -> bool:
        return False if source.hasUrls() else super().canInsertFromMimeData(source)

    def dragEnterEvent(self, e) -> None:
        if e.mimeData().hasUrls():
            e.ignore()
            return
        super().dragEnterEvent(e)

    def dropEvent(self, e) -> None:
        if e.mimeData().hasUrls():
            e.ignore()
            return
        super().dropEvent(e)


class Composer(QFrame):
    """The prompt box with its Send/Stop button and a hint line."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("Composer")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(12, 8, 8, 8)
        lay.setSpacing(4)
        row = QHBoxLayout()
        row.setSpacing(8)
        self.prompt = PromptBox()
        row.addWidget(self.prompt, 1)
        self.send_btn = QPushButton()
        self.send_btn.setObjectName("SendButton")
        self.send_btn.setProperty("kind", "primary")
        self.send_btn.setIcon(theme.icon("send", "#ffffff"))
        self.send_btn.setToolTip("Send (Enter)")
        self.send_btn.setCursor(Qt.PointingHandCursor)
        self.send_btn.clicked.connect(self.prompt.submit)
        self.stop_btn = QPushButton()
        self.stop_btn.setObjectName("StopButton")
        self.stop_btn.setIcon(theme.icon("stop", "#0f1115"))
        self.stop_btn.setToolTip("Stop generating (Esc)")
        self.stop_btn.setCursor(Qt.PointingHandCursor)
        self.stop_btn.hide()
        row.addWidget(self.send_btn, 0, Qt.AlignBottom)
        row.addWidget(self.stop_btn, 0, Qt.AlignBottom)
        lay.addLayout(row)
        self.hint = QLabel("")
        self.hint.setObjectName("Muted")
        self.hint.setStyleSheet("font-size: 8pt;")
        lay.addWidget(self.hint)

    def set_generating(self, generating: bool) -> None:
        self.send_btn.setVisible(not generating)
        self.stop_btn.setVisible(generating)
        self.stop_btn.setEnabled(generating)
