"""A progress card: title, percentage, thin bar, message line, optional Cancel button."""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout


class ProgressCard(QFrame):
    """Used for preparing/loading the model (above the chat) and for imports (with Cancel)."""

    cancel_requested = Signal()

    def __init__(self, parent=None, *, title: str = "", percent: str = "", cancellable: bool = False):
        super().__init__(parent)
        self.setObjectName("ProgressCard")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(14, 10, 14, 10)
        row = self.title_row = QHBoxLayout()  # title, percentage, buttons
        self.title = QLabel(title)
        self.title.setStyleSheet("font-weight: 600;")
        row.addWidget(self.title, 1)
        self.percent = QLabel(percent)
        self.percent.setObjectName("Muted")
        row.addWidget(self.percent)
        if cancellable:
            self.cancel_btn = QPushButton("Cancel")
            self.cancel_btn.setProperty("kind", "danger")
            self.cancel_btn.clicked.connect(self.cancel_requested)
            row.addWidget(self.cancel_btn)
        lay.addLayout(row)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(False)
        self.bar.setFixedHeight(8)
        lay.addWidget(self.bar)
        self.message = QLabel("")
        self.message.setObjectName("Muted")
        lay.addWidget(self.message)

    def set_progress(self, fraction: float, message: str) -> None:
        if self.bar.maximum() == 0:  # leave the busy (indeterminate) state on the first real figure
            self.bar.setRange(0, 1000)
        self.bar.setValue(int(fraction * 1000))
        self.percent.setText(f"{fraction * 100:.0f}%")
        self.message.setText(message)
