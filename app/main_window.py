"""The main window: navigation rail, chat page (conversations, chat, performance and
settings panels) and the model library page. It holds no inference logic: it drives
``mlx_flash`` (load, Engine.stream_generate, library, bench) through workers on QThreads."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

from PySide6.QtCore import QByteArray, QEvent, QSettings, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence, QPainter, QPalette
from PySide6.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSplitter,
    QStackedWidget,
    QStyle,
    QStyleOption,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from mlx_flash import default_model, library, paths
from mlx_flash.units import eta_text

from . import theme, workers
from .history import COMPLETE, ERROR, STOPPED, STREAMING, History, title_from
from .widgets.chat_view import ChatView, MessageWidget
from .widgets.conversation_list import ConversationList
from .widgets.model_library import ModelLibraryPage, flash_config_for
from .widgets.progress_card import ProgressCard
from .widgets.prompt_box import Composer
from .widgets.settings_panel import ChatSettingsPanel
from .widgets.stats_panel import StatsPanel

RENDER_MS = 60         # re-render the streaming answer at most this often
SAVE_MS = 500          # write the partial answer to the history this often


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
        p.drawText(r, Qt.AlignVCenter | Qt.AlignLeft, self.fontMetrics().elidedText(self.text(), Qt.ElideRight, r.width()))


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


class _Generation:
    """What the window knows about the answer being generated."""

    def __init__(self, conv_id: int, msg_id: int, widget: Optional[MessageWidget], worker):
        self.conv_id = conv_id
        self.msg_id = msg_id
        self.widget = widget
        self.worker = worker
        self.text = ""
        self.saved_text = ""
        self.rendered_text = None
        self.stats = None
        self.finish_reason: Optional[str] = None
        self.tokens = 0
        self.t_start = time.perf_counter()
        self.t_first: Optional[float] = None
        self.stop_requested = False


class MainWindow(QMainWindow):
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
        self._gen: Optional[_Generation] = None
        self._loader: Optional[workers.Worker] = None
        self._preparer: Optional[workers.ProcessWorker] = None  # first-run preparation (a worker process)
        self._prepare_job = None
        self._prepare_t0 = 0.0
        self._pending_load: Optional[Path] = None
        self._speed_dialog = None
        self._closing = False

        self._build()
        self._build_actions()
        self._restore()
        self.reload_conversations()
        self._set_ready(False)
        self.statusBar().showMessage("Starting…")
        self._render_timer = QTimer(self)
        self._render_timer.setInterval(RENDER_MS)
        self._render_timer.timeout.connect(self._render_stream)
        self._save_timer = QTimer(self)
        self._save_timer.setInterval(SAVE_MS)
        self._save_timer.timeout.connect(self._save_partial)
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
        self.library = ModelLibraryPage(self.settings)
        self.library.load_requested.connect(lambda p: (self.show_page(0), self.load_model(Path(p))))
        self.library.notice.connect(self._library_notice)
        self.library.models_changed.connect(self._refresh_model_combo)
        self.library.speed_test_requested.connect(lambda p: self.open_speed_test(Path(p)))
        self.library.settings_applied.connect(self._settings_applied)
        self.library_notice = Notice()
        lib_wrap = QWidget()
        lw = QVBoxLayout(lib_wrap)
        lw.setContentsMargins(28, 12, 28, 0)
        lw.setSpacing(0)
        lw.addWidget(self.library_notice)
        lib_page = QWidget()
        lp = QVBoxLayout(lib_page)
        lp.setContentsMargins(0, 0, 0, 0)
        lp.setSpacing(0)
        lp.addWidget(lib_wrap)
        lp.addWidget(self.library, 1)
        lib_scroll = QScrollArea()  # the page keeps its layout; a narrow window scrolls it
        lib_scroll.setWidgetResizable(True)
        lib_scroll.setWidget(lib_page)
        lib_page.setMinimumWidth(860)
        self.pages.addWidget(lib_scroll)

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

    # ================================================================== models
    def start(self) -> None:
        """Load the model: ``model_path``, else the last one used, else the embedded default
        (prepared on first run with progress in the window)."""
        if self.model_path is not None:
            self.load_model(Path(self.model_path))
            return
        last = self.settings.value("last_model")
        if last and Path(str(last)).is_dir() and library.describe(Path(str(last))) is not None:
            self.load_model(Path(str(last)))
            return
        ready = default_model.prepared_flash() if self.flash else default_model.prepared_mlx()
        if ready is not None:  # prepared before: no worker process needed
            self.load_model(ready)
            return
        self.prepare_default()

    def prepare_default(self, job=None) -> None:
        """First run: prepare the built-in model (GGUF → mlx → flash → predictors) in a worker
        process, with progress, the time left (from the rate measured so far) and Cancel in the
        banner; then load it. ``job``: ``(fn, kwargs)`` to run instead of the default model's
        preparation (``fn(progress=..., **kwargs)`` returns the folder to load; tests use a tiny model)."""
        if self._preparer is not None and self._preparer.running:
            return
        if job is None:
            job = (default_model.ensure_default_flash if self.flash else default_model.ensure_default_mlx, {})
        self._prepare_job = job
        self.notice.hide()
        self.banner.start("Preparing the built-in model (first run only)…", cancellable=True)
        self.banner.message.setText("starting the preparation process…")
        self.chat.empty.set_model(default_model.DEFAULT_MODEL_NAME, "converting the embedded model into the flash "
                                  "format and training its activation predictors: progress and time left above")
        self.statusBar().showMessage("Preparing the built-in model…")
        self._set_ready(False)
        self._prepare_t0 = time.monotonic()
        fn, kwargs = job
        w = workers.ProcessWorker(fn, kwargs, clean=paths.models_dir(), parent=self)
        w.progress.connect(self._on_prepare_progress)
        w.finished.connect(self._on_prepared)
        w.errored.connect(self._on_prepare_error)
        self._preparer = w.start()

    def cancel_prepare(self) -> None:
        """Stop the first-run preparation: its process is killed and its temporaries removed;
        finished steps (the mlx folder, an uncalibrated flash folder) are kept for next time."""
        w = self._preparer
        if w is None or not w.running:
            return
        w.cancel()

    def _on_prepare_progress(self, fraction: float, message: str) -> None:
        eta = eta_text(fraction, time.monotonic() - self._prepare_t0)  # measured, not a constant
        self.banner.set_progress(fraction, f"{message} · {eta}" if eta else message)
        self.statusBar().showMessage(f"Preparing the built-in model: {message}")

    def _on_prepare_error(self, message: str) -> None:
        self._preparer = None
        if self._closing:
            return
        self.banner.show_cancelled("Preparing the built-in model failed", message)
        self.notice.show_message("error", f"Could not prepare the built-in model: {message}")
        self.chat.empty.set_model("", "No model yet: prepare the built-in one above, or import one on the "
                                      "Models page.")
        self.statusBar().showMessage("No model loaded")
        self._set_ready(False)

    def _on_prepared(self, path) -> None:
        self._preparer = None
        if self._closing:
            return
        if path is None:  # cancelled
            self.banner.show_cancelled("Preparing the built-in model was cancelled",
                                       "Steps already finished are kept; preparing again continues from there.")
            self.chat.empty.set_model("", "No model yet: prepare the built-in one above, or import one on the "
                                          "Models page.")
            self.statusBar().showMessage("Preparation cancelled", 5000)
            return
        self.library.refresh()
        self._refresh_model_combo()
        self.model_prepared.emit(str(path))
        if self.engine is None and self._loader is None:  # unless another model was opened meanwhile
            self.load_model(Path(path))
        else:
            self.banner.hide()

    def load_model(self, path: Path) -> None:
        """(Re)load ``path`` with its per-model settings, in a worker."""
        path = Path(path)
        if self._gen is not None:      # finish (stop) the answer first, then load
            self._pending_load = path
            self.stop()
            return
        if self._loader is not None and self._loader.running:
            self._pending_load = path
            return
        old, self.engine = self.engine, None
        if old is not None:
            old.close()
            del old
        self._set_ready(False)
        name = library.display_name(path)
        self.banner.start(f"Loading {name}…", busy=True)
        self.statusBar().showMessage(f"Loading {name}…")
        self.chat.empty.set_model(name, "loading…")
        cfg = flash_config_for(path, self.settings, self.config) if (path / "manifest.json").is_file() else None

        def job(w: workers.Worker):
            from mlx_flash.engine import load

            return load(path, cfg)

        w = workers.Worker(job)
        w.finished.connect(self._on_loaded)
        w.errored.connect(self._on_load_error)
        self._loader = workers.start(w, self)
        self._loading_path = path

    def _on_loaded(self, engine) -> None:
        self._loader = None
        self.banner.finish()
        if engine is None:
            return
        if self._closing:
            engine.close()
            return
        self.engine = engine
        self.engine_path = Path(engine.path)
        self.settings.setValue("last_model", str(self.engine_path))
        name = library.display_name(self.engine_path)
        self.setWindowTitle(f"{name} — mlx-flash")
        detail = self._engine_detail(engine)
        # how the model runs, with the engine's warnings (a fallback, a clamped budget) on the chip
        self.mode_chip.setText(detail + (f" · ⚠ {len(engine.notes)} note{'s' if len(engine.notes) > 1 else ''}"
                                         if engine.notes else ""))
        self.mode_chip.setToolTip("\n".join([detail, *engine.notes]))
        self.mode_chip.show()
        self.status_model.setText(f"{name} · {engine.mode}")
        self.status_mem.setText(f"weights in memory {theme.human_bytes(engine.resident_bytes())}")
        self.stats_panel.set_engine(name, engine.mode, budget_bytes=engine.budget_bytes, ffn_bytes=engine.ffn_bytes,
                                    resident_bytes=engine.resident_bytes(), budget_text=engine.budget_text)
        self.chat.empty.set_model(name, detail, ready=True)
        self.library.set_current(self.engine_path)
        self._refresh_model_combo()
        self.statusBar().showMessage("Ready", 3000)
        self._set_ready(True)
        self.engine_ready.emit(engine)
        if self._pending_load is not None:
            p, self._pending_load = self._pending_load, None
            if p != self.engine_path:
                self.load_model(p)

    def _engine_detail(self, engine) -> str:
        if not engine.is_flash:
            info = engine.engine_info  # a flash folder run dense: FlashConfig.engine says why
            return "dense · all weights in memory" + (f" ({info['reason']})" if info else "")
        cfg = engine.config
        pct = f" ({cfg.budget * 100:.0f}% of the FFN)" if cfg and cfg.budget <= 1 else ""
        info = engine.policy_info or {}
        policy = info.get("name", cfg.policy if cfg else "?")
        if info.get("hot_fraction") and policy == "hot+window":
            policy += f" {info['hot_fraction']:.0%} hot"
        chooser = engine.mode.split('-', 1)[-1]
        if (engine.active_info or {}).get("asked") == "auto":
            chooser = f"auto → {chooser}"  # measured per model; the reason is in Engine.active_info
        return (f"flash · budget {engine.budget_text}{pct} · {chooser} · "
                f"window {cfg.window if cfg else '?'} · cache {policy}"
                + (" · pipelined" if engine.prefetcher is not None else ""))

    def _on_load_error(self, message: str) -> None:
        self._loader = None
        self.banner.hide()
        hint = " Raise its memory budget on the Models page (engine settings)." if "budget" in message else ""
        self.notice.show_message("error", f"Could not load the model: {message}{hint}")
        self.statusBar().showMessage("No model loaded")
        self.chat.empty.set_model("", "No model loaded: pick one above or import one on the Models page.")
        self._set_ready(False)
        if self._pending_load is not None:
            p, self._pending_load = self._pending_load, None
            self.load_model(p)

    def _refresh_model_combo(self) -> None:
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        current = self.engine_path or getattr(self, "_loading_path", None)
        for e in library.list_models():
            label = library.display_name(e) + ("" if e.kind == "flash" else "  (dense)")
            self.model_combo.addItem(theme.icon("bolt" if e.kind == "flash" else "cpu",
                                                theme.ACCENT_2 if e.kind == "flash" else theme.MUTED),
                                     label, str(e.path))
            if current is not None and Path(e.path) == Path(current):
                self.model_combo.setCurrentIndex(self.model_combo.count() - 1)
        if self.model_combo.count() == 0:
            self.model_combo.addItem("No models yet", None)
        self.model_combo.blockSignals(False)

    def _combo_activated(self, index: int) -> None:
        p = self.model_combo.itemData(index)
        if p and (self.engine_path is None or Path(p) != self.engine_path):
            self.load_model(Path(p))

    def _settings_applied(self, path: str) -> None:
        if self.engine_path is not None and Path(path) == self.engine_path:
            self.show_page(0)
            self.load_model(Path(path))

    # ============================================================ conversations
    def reload_conversations(self) -> None:
        self.conversations.set_conversations(self.history.conversations(), self.conv_id)

    def new_chat(self) -> None:
        if self._gen is not None:
            self.stop()
            self._detach_generation()
        self.conv_id = None
        self.chat.clear()
        self.conversations.select(None)
        self.show_page(0)
        self.export_btn.setEnabled(False)
        self.prompt.setFocus()

    def open_conversation(self, conv_id: int) -> None:
        if conv_id == self.conv_id:
            return
        if self._gen is not None:
            self.stop()
            self._detach_generation()
        conv = self.history.conversation(conv_id)
        if conv is None:
            return
        self.conv_id = conv_id
        self.banner.release()
        self.chat.clear()
        for m in self.history.messages(conv_id):
            self.chat.add_message(m.role, m.content, name=self._role_name(m.role, m.meta.get("model")),
                                  status=m.status, meta=m.meta, msg_id=m.id)
        self.conversations.select(conv_id)
        self.export_btn.setEnabled(True)

    def rename_conversation(self, conv_id: int, title: str) -> None:
        self.history.rename_conversation(conv_id, title)
        self.reload_conversations()

    def _confirm_delete(self, conv_id: int) -> None:
        conv = self.history.conversation(conv_id)
        if conv is None:
            return
        r = QMessageBox.question(self, "Delete chat", f"Delete “{conv.title}”? This cannot be undone.",
                                 QMessageBox.Yes | QMessageBox.Cancel, QMessageBox.Cancel)
        if r == QMessageBox.Yes:
            self.delete_conversation(conv_id)

    def delete_conversation(self, conv_id: int) -> None:
        if self._gen is not None and self._gen.conv_id == conv_id:
            self.stop()
            self._detach_generation()
        self.history.delete_conversation(conv_id)
        if self.conv_id == conv_id:
            self.conv_id = None
            self.chat.clear()
        self.reload_conversations()

    def export_conversation(self, conv_id: int, path: Path) -> Path:
        path = Path(path)
        path.write_text(self.history.export_markdown(conv_id), encoding="utf-8")
        return path

    def _export_dialog(self, conv_id: Optional[int]) -> None:
        if conv_id is None:
            self.statusBar().showMessage("Nothing to export yet", 3000)
            return
        conv = self.history.conversation(conv_id)
        safe = "".join(c if c.isalnum() or c in " -_" else "_" for c in conv.title).strip() or "chat"
        f, _ = QFileDialog.getSaveFileName(self, "Export chat as Markdown", str(Path.home() / f"{safe}.md"),
                                           "Markdown (*.md)")
        if f:
            self.export_conversation(conv_id, Path(f))
            self.statusBar().showMessage(f"Exported to {f}", 5000)

    def _role_name(self, role: str, model: Optional[str] = None) -> str:
        if role == "user":
            return "You"
        if model:
            return model
        return library.display_name(self.engine_path) if self.engine_path else "Assistant"

    # ==================================================================== chat
    @property
    def generating(self) -> bool:
        return self._gen is not None

    def _set_ready(self, ready: bool) -> None:
        """Input enabled when a model is loaded and nothing is generating."""
        idle = self._gen is None
        can_send = ready and idle and self.engine is not None
        self.send_btn.setEnabled(can_send)
        self.prompt.setReadOnly(not (self.engine is not None and idle))
        self.composer.set_generating(not idle)
        self.model_combo.setEnabled(idle and self._loader is None and self._preparer is None)
        if self.engine is None:
            self.composer.hint.setText("Waiting for the model…")
        elif not idle:
            self.composer.hint.setText("Generating… Esc or the ■ button stops.")
        else:
            new = QKeySequence(QKeySequence.New).toString(QKeySequence.NativeText)
            self.composer.hint.setText(f"{library.display_name(self.engine_path)} · Enter to send · "
                                       f"Shift+Enter new line · {new} new chat")

    def _history_messages(self, conv_id: int) -> List[dict]:
        out = []
        for m in self.history.messages(conv_id):
            if m.role in ("user", "assistant") and m.content.strip() and m.status != ERROR:
                out.append({"role": m.role, "content": m.content})
        return out

    def send(self, text: str) -> bool:
        """Send ``text`` as the user's message and stream the answer. False when not possible now."""
        text = (text or "").strip()
        if not text or self.engine is None or self._gen is not None:
            return False
        vals = self.chat_settings.values()
        name = library.display_name(self.engine_path)
        if self.conv_id is None:
            self.conv_id = self.history.new_conversation(title_from(text), model=name,
                                                         system_prompt=vals["system_prompt"] or None,
                                                         settings={k: vals[k] for k in ("temperature", "top_p", "max_tokens")})
            self.reload_conversations()
            self.export_btn.setEnabled(True)
        mid = self.history.add_message(self.conv_id, "user", text)
        self.banner.release()
        self.chat.add_message("user", text, name="You", msg_id=mid)
        self.prompt.clear()
        self._start_generation()
        return True

    def regenerate(self, widget: Optional[MessageWidget] = None) -> bool:
        """Answer the last user message again (replacing the last answer)."""
        if self._gen is not None or self.engine is None or self.conv_id is None:
            return False
        widget = widget or self.chat.last_assistant()
        msgs = self.chat.messages
        if widget is None or not msgs or msgs[-1] is not widget or widget.role != "assistant":
            return False
        if widget.msg_id is not None:
            self.history.delete_messages_from(self.conv_id, widget.msg_id)
        self.chat.remove_message(widget)
        self._start_generation()
        return True

    def _start_generation(self) -> None:
        conv_id = self.conv_id
        messages = self._history_messages(conv_id)
        vals = self.chat_settings.values()
        name = library.display_name(self.engine_path)
        mid = self.history.add_message(conv_id, "assistant", "", status=STREAMING,
                                       meta={"model": name, "mode": self.engine.mode})
        widget = self.chat.add_message("assistant", "", name=name, status=STREAMING, msg_id=mid,
                                       meta={"model": name})
        engine = self.engine
        system = vals["system_prompt"] or None
        max_tokens, temperature, top_p = vals["max_tokens"], vals["temperature"], vals["top_p"]

        def job(w: workers.Worker):
            return engine.stream_generate(messages, max_tokens, temperature=temperature, top_p=top_p,
                                          system=system, should_stop=lambda: w.stop_requested)

        w = workers.Worker(job)
        gen = _Generation(conv_id, mid, widget, w)
        self._gen = gen
        w.yielded.connect(self._on_token)
        w.finished.connect(self._on_generation_done)
        w.errored.connect(self._on_generation_error)
        self.stats_panel.begin()
        self._set_ready(True)
        self.statusBar().showMessage("Generating…")
        self._render_timer.start()
        self._save_timer.start()
        workers.start(w, self)

    def _on_token(self, r) -> None:
        g = self._gen
        if g is None or self.sender() is not g.worker:
            return
        if g.t_first is None:
            g.t_first = time.perf_counter()
            new = [n for n in r.stats.notes if self.engine is None or n not in self.engine.notes]
            if new:  # this prompt's own warnings (e.g. longer than the model's context)
                self.notice.show_message("warning", "Note: " + " · ".join(new))
        g.text += r.text
        g.stats = r.stats
        g.tokens += 1
        if r.finish_reason:
            g.finish_reason = r.finish_reason
        self.stats_panel.add_stats(r.stats)
        s = r.stats
        self.status_mem.setText(f"resident {theme.human_bytes(s.resident_bytes)} · RSS {theme.human_bytes(s.process_rss)}")

    def _render_stream(self) -> None:
        g = self._gen
        if g is None or g.widget is None:
            return
        if g.rendered_text != g.text:
            g.rendered_text = g.text
            g.widget.set_text(g.text)
            if g.stats is not None:
                g.widget.footer.setText(f"{g.stats.tokens_per_s:.1f} tok/s  ·  {g.tokens} tokens")

    def _save_partial(self) -> None:
        g = self._gen
        if g is not None and g.text != g.saved_text:
            self.history.update_message(g.msg_id, g.text)
            g.saved_text = g.text

    def _meta(self, g: _Generation) -> dict:
        s = g.stats
        meta = {"model": library.display_name(self.engine_path) if self.engine_path else None,
                "tokens": g.tokens, "finish_reason": g.finish_reason}
        if g.t_first is not None:
            meta["first_token_s"] = round(g.t_first - g.t_start, 3)
        meta["seconds"] = round(time.perf_counter() - g.t_start, 3)
        if s is not None:  # the engine's own time to first token: the figure the panel and the CLI show
            meta["first_token_s"] = round(s.ms_first_token / 1e3, 3)
            meta.update(tokens_per_s=round(s.tokens_per_s, 2), mode=s.mode, prompt_tokens=s.prompt_tokens,
                        prompt_tps=round(s.prompt_tps, 1), peak_memory=s.peak_memory)
            if str(s.mode).startswith("flash"):
                meta.update(hit_rate=round(s.cum_hit_rate, 4), bytes_per_token=s.bytes_read)
        return meta

    def _finish(self, status: str, error: Optional[str] = None) -> None:
        g = self._gen
        self._gen = None
        self._render_timer.stop()
        self._save_timer.stop()
        if g is None:
            return
        meta = self._meta(g)
        if error:
            meta["error"] = error
        self.history.update_message(g.msg_id, g.text, status=status, meta=meta)
        self.history.update_conversation(g.conv_id)
        if g.widget is not None:
            g.widget.set_status(status)
            g.widget.set_text(g.text)
            g.widget.set_meta(meta)
        self.stats_panel.flush()
        self.reload_conversations()
        self._set_ready(self.engine is not None)
        if status == COMPLETE:
            self.statusBar().showMessage(f"{g.tokens} tokens · {meta.get('tokens_per_s', 0):.1f} tok/s", 8000)
        elif status == STOPPED:
            self.statusBar().showMessage("Stopped", 5000)
        self.answer_finished.emit({"conv_id": g.conv_id, "msg_id": g.msg_id, "status": status, "text": g.text,
                                   "meta": meta})
        if self._pending_load is not None and not self._closing:
            p, self._pending_load = self._pending_load, None
            self.load_model(p)

    def _on_generation_done(self, _result) -> None:
        g = self._gen
        if g is None or self.sender() is not g.worker:
            return
        stopped = g.stop_requested or g.finish_reason == "cancelled"
        self._finish(STOPPED if stopped else COMPLETE)

    def _on_generation_error(self, message: str) -> None:
        g = self._gen
        if g is None or self.sender() is not g.worker:
            return
        self.notice.show_message("error", f"Generation failed: {message}")
        self._finish(ERROR, error=message)

    def stop(self) -> None:
        """Stop the answer being generated (it ends within one token)."""
        g = self._gen
        if g is None:
            return
        g.stop_requested = True
        g.worker.request_stop()
        self.stop_btn.setEnabled(False)
        self.statusBar().showMessage("Stopping…")

    def _detach_generation(self) -> None:
        """The view is about to change: the running answer keeps saving to the history
        but no longer draws into a widget."""
        if self._gen is not None:
            self._gen.widget = None

    # ================================================================== import
    def _library_notice(self, level: str, text: str) -> None:
        self.library_notice.show_message(level, text)
        if level == "error" or self.pages.currentIndex() == 0:
            self.notice.show_message(level, text)

    def _import_file(self) -> None:
        self.show_page(1)
        self.library.choose_file()

    def import_paths(self, items) -> int:
        self.show_page(1)
        return self.library.import_paths(items)

    def _local_paths(self, mime) -> List[str]:
        if not mime.hasUrls():
            return []
        return [u.toLocalFile() for u in mime.urls() if u.isLocalFile()]

    def dragEnterEvent(self, e) -> None:
        if self._local_paths(e.mimeData()):
            e.acceptProposedAction()
            self.drop_overlay.setGeometry(self.centralWidget().rect().adjusted(24, 24, -24, -24))
            self.drop_overlay.raise_()
            self.drop_overlay.show()
            self.library.drop_zone.set_hover(True)
        else:
            e.ignore()

    def dragMoveEvent(self, e) -> None:
        if self._local_paths(e.mimeData()):
            e.acceptProposedAction()
        else:
            e.ignore()

    def dragLeaveEvent(self, e) -> None:
        self.drop_overlay.hide()
        self.library.drop_zone.set_hover(False)

    def dropEvent(self, e) -> None:
        self.drop_overlay.hide()
        self.library.drop_zone.set_hover(False)
        items = self._local_paths(e.mimeData())
        if not items:
            e.ignore()
            self._library_notice("error", "Cannot import: drop a .gguf file or a model folder from your disk.")
            return
        e.acceptProposedAction()
        self.import_paths(items)

    # ============================================================== speed test
    def open_speed_test(self, path: Optional[Path] = None):
        from .widgets.speed_test import SpeedTestDialog

        path = Path(path) if path else (self.engine_path or self.library.selected_path())
        if self._speed_dialog is None:
            self._speed_dialog = SpeedTestDialog(self.settings, self, base_config=self.config)
        dlg = self._speed_dialog
        dlg.set_model(path)
        dlg.show()
        dlg.raise_()
        dlg.activateWindow()
        return dlg

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
        if self._speed_dialog is not None:
            self._speed_dialog.shutdown()
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
