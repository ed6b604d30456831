"""The sidebar: New chat and the conversation list (rename, export, delete from its menu)."""

from __future__ import annotations

import time
from typing import Iterable, Optional

from PySide6.QtCore import QPoint, QSize, Qt, Signal
from PySide6.QtWidgets import (
    QFrame,
    QInputDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QPushButton,
    QVBoxLayout,
)

from .. import theme


def _when(ts: float) -> str:
    d = time.time() - ts
    if d < 60:
        return "just now"
    if d < 3600:
        return f"{int(d // 60)} min ago"
    if d < 86400:
        return f"{int(d // 3600)} h ago"
    return time.strftime("%d %b", time.localtime(ts))


class ConversationList(QFrame):
    new_requested = Signal()
    selected = Signal(int)
    rename_requested = Signal(int, str)
    delete_requested = Signal(int)
    export_requested = Signal(int)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("Sidebar")
        self.setMinimumWidth(170)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(10, 12, 10, 10)
        lay.setSpacing(8)
        self.new_btn = QPushButton("  New chat")
        self.new_btn.setIcon(theme.icon("plus", theme.TEXT))
        self.new_btn.setToolTip("New chat (Ctrl+N)")
        self.new_btn.setCursor(Qt.PointingHandCursor)
        self.new_btn.clicked.connect(self.new_requested)
        lay.addWidget(self.new_btn)
        title = QLabel("CHATS")
        title.setObjectName("SectionTitle")
        lay.addWidget(title)
        self.list = QListWidget()
        self.list.setContextMenuPolicy(Qt.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._menu)
        self.list.currentRowChanged.connect(self._changed)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.list.setVerticalScrollMode(QListWidget.ScrollPerPixel)
        self.list.setTextElideMode(Qt.ElideRight)
        lay.addWidget(self.list, 1)
        self._silent = False

    def set_conversations(self, convs: Iterable, current: Optional[int] = None) -> None:
        self._silent = True
        try:
            self.list.clear()
            for c in convs:
                item = QListWidgetItem(c.title)
                item.setData(Qt.UserRole, c.id)
                item.setSizeHint(QSize(10, 34))  # narrow: the view's width decides, long titles elide
                item.setToolTip(f"{c.title}\n{_when(c.updated)}" + (f" · {c.model}" if c.model else ""))
                self.list.addItem(item)
                if c.id == current:
                    self.list.setCurrentItem(item)
        finally:
            self._silent = False

    def current_id(self) -> Optional[int]:
        item = self.list.currentItem()
        return item.data(Qt.UserRole) if item else None

    def select(self, conv_id: Optional[int]) -> None:
        self._silent = True
        try:
            if conv_id is None:
                self.list.setCurrentItem(None)
                self.list.clearSelection()
                return
            for i in range(self.list.count()):
                if self.list.item(i).data(Qt.UserRole) == conv_id:
                    self.list.setCurrentRow(i)
                    return
        finally:
            self._silent = False

    def ids(self) -> list:
        return [self.list.item(i).data(Qt.UserRole) for i in range(self.list.count())]

    def _changed(self, row: int) -> None:
        item = self.list.item(row) if row >= 0 else None
        if item is not None and not self._silent:
            self.selected.emit(item.data(Qt.UserRole))

    def _menu(self, pos: QPoint) -> None:
        item = self.list.itemAt(pos)
        if item is None:
            return
        cid = item.data(Qt.UserRole)
        m = QMenu(self)
        a_rename = m.addAction(theme.icon("rename"), "Rename…")
        a_export = m.addAction(theme.icon("export"), "Export as Markdown…")
        m.addSeparator()
        a_delete = m.addAction(theme.icon("trash", theme.DANGER), "Delete")
        act = m.exec(self.list.mapToGlobal(pos))
        if act is a_rename:
            title, ok = QInputDialog.getText(self, "Rename chat", "Title:", text=item.text())
            if ok and title.strip():
                self.rename_requested.emit(cid, title.strip())
        elif act is a_export:
            self.export_requested.emit(cid)
        elif act is a_delete:
            self.delete_requested.emit(cid)
