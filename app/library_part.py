"""The window's library job (a part of MainWindow): the Models page, loading a model (in a worker), the
model picker above the chat, importing (menu, drag and drop onto the window)."""

from __future__ import annotations

from pathlib import Path
from typing import List

from PySide6.QtWidgets import QScrollArea, QVBoxLayout, QWidget

from mlx_flash import library

from . import theme, workers
from .chat_state import engine_detail
from .widgets.model_library import ModelLibraryPage, flash_config_for
from .widgets.notice import Notice


class LibraryPart:
    """Models: the library page, loading, the picker, import; mixed into MainWindow."""

    def _build_library_page(self) -> QWidget:
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
        return lib_scroll

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
            # deferred: importing the engine (mlx-lm, transformers) takes seconds; the window opens first
            from mlx_flash.engine import load  # noqa: PLC0415

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
        detail = engine_detail(engine)
        # how the model runs, with the engine's warnings (a fallback, a clamped budget) on the chip
        self.mode_chip.setText(detail + (f" · ⚠ {len(engine.notes)} note{'s' if len(engine.notes) > 1 else ''}"
                                         if engine.notes else ""))
        self.mode_chip.setToolTip("\n".join([detail, *engine.notes]))
        self.mode_chip.show()
        self.status_model.setText(f"{name} · {engine.mode}")
        self.status_mem.setText(f"weights in memory {theme.human_bytes(engine.resident_bytes())}")
        self.stats_panel.set_engine(name, engine.mode, budget_bytes=engine.budget_bytes,
                                    ffn_bytes=engine.ffn_bytes, resident_bytes=engine.resident_bytes(),
                                    budget_text=engine.budget_text)
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
        current = self.engine_path or self._loading_path
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
