"""The main window: navigation rail, chat page (conversations, chat, performance and settings panels) and
the model library page. It holds no inference logic: it drives ``mlx_flash`` (load, Engine.stream_generate,
library, bench) through workers on QThreads.

This module is the window's frame (layout, actions, persistence, close); each job is a part of its own,
mixed into the window: chat_part.py (conversations, answers), library_part.py (models page, loading,
import), speed_test_part.py, first_run_part.py (start-up model, preparing the default model). Their
Qt-free state is in chat_state.py; the banners are widgets/notice.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from PySide6.QtCore import QByteArray, QEvent, QSettings, QSize, Qt, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QSizePolicy,
    QSplitter,
    QStackedWidget,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from . import theme, workers
from .chat_part import ChatPart
from .chat_state import Generation
from .first_run_part import FirstRunPart
from .history import STOPPED, History
from .library_part import LibraryPart
from .speed_test_part import SpeedTestPart
from .widgets.chat_view import ChatView
from .widgets.conversation_list import ConversationList
from .widgets.notice import Banner, Chip, Notice
from .widgets.prompt_box import Composer
from .widgets.settings_panel import ChatSettingsPanel
from .widgets.stats_panel import StatsPanel


class MainWindow(ChatPart, LibraryPart, SpeedTestPart, FirstRunPart, QMainWindow):
    engine_ready = Signal(object)          # the Engine, once loaded
    answer_finished = Signal(object)       # dict: conv_id, msg_id, status, text, meta
    model_prepared = Signal(str)           # first run: the default model's path

    def __init__(self, model_path: Optional[str] = None, flash: bool = True, config=None, *,
                 history_path=None, settings: Optional[QSettings] = None):
        super().__init__()
        self.setWindowTitle("mlx-flash")
        self.setWindowIcon(theme.app_icon())
        self.setAcceptDrops(True)
        self.model_path = model_path
        self.flash = flash
        self.config = config
        self.settings = settings or theme.settings()
        self.history = History(history_path)
        self.history.on_problem = lambda text: self.notice.show_message("error", text)  # e.g. the disk filled up
        self.recovered = self.history.recover()
        self.engine = None
        self.engine_path: Optional[Path] = None
        self.conv_id: Optional[int] = None
        self._gen: Optional[Generation] = None
        self._loader: Optional[workers.Worker] = None
        self._preparer: Optional[workers.ProcessWorker] = None  # first-run preparation (a worker process)
        self._prepare_job = None
        self._prepare_t0 = 0.0
        self._pending_load: Optional[Path] = None
        self._loading_path: Optional[Path] = None
        self._speed_dialog = None
        self._closing = False

        self._build()
        self._build_actions()
        self._restore()
        self.reload_conversations()
        self._set_ready(False)
        self.statusBar().showMessage("Starting…")
        self._init_chat()
        if self.recovered:
            self.notice.show_message(
                "info", f"{self.recovered} answer{'s were' if self.recovered > 1 else ' was'} interrupted when the "
                        "app last closed; the partial text is kept and marked “interrupted”.")
        startup_problems = [p for p in (self.history.problem, self.library.broken_text()) if p]
        if startup_problems:  # a damaged history or library entry: said, never fatal
            self.notice.show_message("error", "\n\n".join(startup_problems))


    # =================================================================== layout
    def _build(self) -> None:
        root = QWidget()
        rl = QHBoxLayout(root)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.setSpacing(0)

        # navigation rail
        rail = QFrame()
        rail.setObjectName("NavRail")
        rail.setFixedWidth(60)
        nl = QVBoxLayout(rail)
        nl.setContentsMargins(0, 12, 0, 12)
        nl.setSpacing(6)
        logo = QLabel()
        logo.setPixmap(theme.app_icon().pixmap(32, 32))
        logo.setAlignment(Qt.AlignHCenter)
        nl.addWidget(logo)
        nl.addSpacing(10)
        self.nav = QButtonGroup(self)
        self.nav_chat = self._rail_button("chat", "Chat")
        self.nav_models = self._rail_button("models", "Models")
        for i, b in enumerate((self.nav_chat, self.nav_models)):
            b.setCheckable(True)
            self.nav.addButton(b, i)
            nl.addWidget(b, 0, Qt.AlignHCenter)
        self.nav_speed = self._rail_button("gauge", "Speed test")
        self.nav_speed.clicked.connect(lambda: self.open_speed_test())
        nl.addWidget(self.nav_speed, 0, Qt.AlignHCenter)
        nl.addStretch(1)
        self.nav_panel = self._rail_button("panel", "Show / hide the performance panel")
        self.nav_panel.setCheckable(True)
        self.nav_panel.setChecked(True)
        self.nav_panel.toggled.connect(self._toggle_right)
        nl.addWidget(self.nav_panel, 0, Qt.AlignHCenter)
        rl.addWidget(rail)

        self.pages = QStackedWidget()
        rl.addWidget(self.pages, 1)
        self.nav.idClicked.connect(self.pages.setCurrentIndex)

        # ---- chat page
        self.chat_page = QSplitter(Qt.Horizontal)
        self.chat_page.setChildrenCollapsible(False)
        self.chat_page.setHandleWidth(1)
        self.conversations = ConversationList()
        self.conversations.new_requested.connect(self.new_chat)
        self.conversations.selected.connect(self.open_conversation)
        self.conversations.rename_requested.connect(self.rename_conversation)
        self.conversations.delete_requested.connect(self._confirm_delete)
        self.conversations.export_requested.connect(self._export_dialog)
        self.chat_page.addWidget(self.conversations)

        col = QWidget()
        col.setObjectName("ChatColumn")
        cl = QVBoxLayout(col)
        cl.setContentsMargins(0, 0, 0, 12)
        cl.setSpacing(8)
        top = QHBoxLayout()
        top.setContentsMargins(16, 10, 16, 0)
        top.setSpacing(10)
        self.model_combo = QComboBox()
        self.model_combo.setMinimumWidth(240)
        self.model_combo.setSizeAdjustPolicy(QComboBox.AdjustToContents)
        self.model_combo.setToolTip("The model to chat with (its engine settings are on the Models page)")
        self.model_combo.activated.connect(self._combo_activated)
        top.addWidget(self.model_combo, 0)
        self.mode_chip = Chip("")  # its text arrives with the model: it must not widen the column then (a jump)
        self.mode_chip.setObjectName("ModelChip")
        self.mode_chip.hide()
        top.addWidget(self.mode_chip, 100)  # up to its text's width (setMaximumWidth), the stretch takes the rest
        top.addStretch(1)
        self.export_btn = QToolButton()
        self.export_btn.setIcon(theme.icon("export", theme.MUTED))
        self.export_btn.setToolTip("Export this chat as Markdown")
        self.export_btn.clicked.connect(lambda: self._export_dialog(self.conv_id))
        self.export_btn.setEnabled(False)
        top.addWidget(self.export_btn)
        cl.addLayout(top)
        holder = QVBoxLayout()
        holder.setContentsMargins(16, 0, 16, 0)
        holder.setSpacing(8)
        self.notice = Notice()
        holder.addWidget(self.notice)
        self.banner = Banner()
        self.banner.cancel_requested.connect(self.cancel_prepare)
        self.banner.retry_requested.connect(lambda: self.prepare_default(self._prepare_job))
        holder.addWidget(self.banner)
        cl.addLayout(holder)
        self.chat = ChatView()
        self.chat.regenerate_requested.connect(self.regenerate)
        self.chat.copy_requested.connect(lambda *_: self.statusBar().showMessage("Copied to the clipboard", 2500))
        self.chat.suggestion_clicked.connect(self.send)
        cl.addWidget(self.chat, 1)
        comp_row = QHBoxLayout()
        comp_row.setContentsMargins(16, 0, 16, 0)
        comp_row.addStretch(1)
        self.composer = Composer()
        self.composer.setMaximumWidth(880)
        self.composer.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        comp_row.addWidget(self.composer, 100)
        comp_row.addStretch(1)
        cl.addLayout(comp_row)
        self.prompt = self.composer.prompt
        self.send_btn = self.composer.send_btn
        self.stop_btn = self.composer.stop_btn
        self.prompt.submitted.connect(self.send)
        self.stop_btn.clicked.connect(self.stop)
        self.chat_page.addWidget(col)

        self.right = QTabWidget()
        self.right.setObjectName("RightPanel")
        self.right.setMinimumWidth(270)
        self.stats_panel = StatsPanel()
        self.chat_settings = ChatSettingsPanel(self.settings)
        self.right.addTab(self.stats_panel, theme.icon("activity", theme.MUTED), "Performance")
        self.right.addTab(self.chat_settings, theme.icon("settings", theme.MUTED), "Chat settings")
        self.chat_page.addWidget(self.right)
        self.chat_page.setStretchFactor(0, 0)
        self.chat_page.setStretchFactor(1, 1)
        self.chat_page.setStretchFactor(2, 0)
        self.chat_page.setSizes([240, 760, 380])
        self.pages.addWidget(self.chat_page)

        # ---- library page
        self.pages.addWidget(self._build_library_page())

        self.setCentralWidget(root)
        self.nav_chat.setChecked(True)

        # drop overlay
        self.drop_overlay = QLabel("Drop to import into the model library\n.gguf file or mlx-lm / Hugging Face folder",
                                   root)
        self.drop_overlay.setObjectName("DropOverlay")
        self.drop_overlay.setAlignment(Qt.AlignCenter)
        self.drop_overlay.setStyleSheet("font-size: 16pt; font-weight: 600; color: #e9e3ff;")
        self.drop_overlay.setAttribute(Qt.WA_TransparentForMouseEvents)
        self.drop_overlay.hide()

        # status bar
        self.status_model = QLabel("")
        self.status_mem = QLabel("")
        self.statusBar().addPermanentWidget(self.status_model)
        self.statusBar().addPermanentWidget(self.status_mem)
        self._refresh_model_combo()

    def _toggle_right(self, on: bool) -> None:
        self.right.setVisible(on)
        # let the window shrink again: the layout only ever raised its minimum size
        self.setMinimumSize(0, 0)
        self.chat_page.updateGeometry()

    def _rail_button(self, icon: str, tip: str) -> QToolButton:
        b = QToolButton()
        b.setIcon(theme.icon(icon, theme.TEXT))
        b.setIconSize(QSize(22, 22))
        b.setToolTip(tip)
        b.setFixedSize(44, 44)
        b.setCursor(Qt.PointingHandCursor)
        return b

    def _build_actions(self) -> None:
        def act(text, slot, shortcut=None, icon=None) -> QAction:
            a = QAction(text, self)
            if icon:
                a.setIcon(theme.icon(icon))
            if shortcut is not None:
                a.setShortcut(QKeySequence(shortcut))
                a.setShortcutContext(Qt.WindowShortcut)
            a.triggered.connect(slot)
            self.addAction(a)
            return a

        self.act_new = act("New chat", self.new_chat, QKeySequence.New, "plus")
        self.act_stop = act("Stop generating", self.stop, Qt.Key_Escape, "stop")
        self.act_import = act("Import model file…", self._import_file, QKeySequence.Open, "file")
        self.act_import_dir = act("Import model folder…", self.library.choose_folder, None, "folder")
        self.act_export = act("Export chat as Markdown…", lambda: self._export_dialog(self.conv_id),
                              QKeySequence.Save, "export")
        self.act_models = act("Models", lambda: self.show_page(1), "Ctrl+2", "models")
        self.act_chat = act("Chat", lambda: self.show_page(0), "Ctrl+1", "chat")
        self.act_speed = act("Speed test…", lambda: self.open_speed_test(), "Ctrl+T", "gauge")
        self.act_quit = act("Quit", self.close, QKeySequence.Quit)
        if sys.platform == "darwin":  # the global menu bar; elsewhere the window stays clean
            mb = self.menuBar()
            m = mb.addMenu("File")
            for a in (self.act_new, self.act_import, self.act_import_dir, self.act_export):
                m.addAction(a)
            m.addSeparator()
            m.addAction(self.act_quit)
            m = mb.addMenu("View")
            for a in (self.act_chat, self.act_models):
                m.addAction(a)
            m = mb.addMenu("Tools")
            m.addAction(self.act_speed)

    def show_page(self, i: int) -> None:
        self.pages.setCurrentIndex(i)
        (self.nav_chat if i == 0 else self.nav_models).setChecked(True)


    # ============================================================== persistence
    def _restore(self) -> None:
        s = self.settings
        geo = s.value("window/geometry")
        if isinstance(geo, (QByteArray, bytes)) and not self.restoreGeometry(QByteArray(geo)):
            geo = None
        if not geo:
            self.resize(1360, 860)
        split = s.value("window/chat_splitter")
        if isinstance(split, (QByteArray, bytes)):
            self.chat_page.restoreState(QByteArray(split))
        panel = s.value("window/right_panel", True)
        visible = panel not in (False, "false", "0", 0)
        self.nav_panel.setChecked(visible)
        self.right.setVisible(visible)
        tab = s.value("window/right_tab", 0)
        try:
            self.right.setCurrentIndex(int(tab))
        except (TypeError, ValueError):
            pass

    def _save_window(self) -> None:
        s = self.settings
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/chat_splitter", self.chat_page.saveState())
        s.setValue("window/right_panel", self.right.isVisible() if self.isVisible() else self.nav_panel.isChecked())
        s.setValue("window/right_tab", self.right.currentIndex())
        if self.engine_path is not None:
            s.setValue("last_model", str(self.engine_path))
        s.sync()


    # ================================================================== close
    def closeEvent(self, e) -> None:
        self._closing = True
        self._save_window()
        if self._gen is not None:
            g = self._gen
            self.stop()
            workers.wait(g.worker)
            # the finished signal cannot be delivered any more: record the stop here
            if self._gen is g:
                self._finish(STOPPED)
        self.library.shutdown()
        self._shutdown_speed_test()
        if self._preparer is not None:  # the first-run preparation: killed, its temporaries removed
            self._preparer.cancel()
            self._preparer = None
        workers.wait(self._loader, 120000)
        self._loader = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self.history.close()
        super().closeEvent(e)

    def resizeEvent(self, e) -> None:
        super().resizeEvent(e)
        if self.drop_overlay.isVisible():
            self.drop_overlay.setGeometry(self.centralWidget().rect().adjusted(24, 24, -24, -24))

    def event(self, e) -> bool:
        if e.type() == QEvent.WindowActivate and self.pages.currentIndex() == 1:
            self.library.refresh()
        return super().event(e)
