"""The model library page: the models in the data folder (size on disk, architecture,
parameters), load / rename / remove, per-model engine settings, and import of GGUF
files and mlx-lm / Hugging Face folders (drop or file dialog) in a worker with a
progress bar and Cancel."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from PySide6.QtCore import QSettings, Qt, QUrl, Signal
from PySide6.QtGui import QColor, QDesktopServices
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLabel,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from mlx_flash import library, paths
from mlx_flash.config import FlashConfig, parse_budget

from .. import theme, workers
from .progress_card import ProgressCard

# ----------------------------------------------------------------- per-model settings
_ENGINE_DEFAULTS = FlashConfig()
MODEL_DEFAULTS = {  # FlashConfig's defaults; its budget is a fraction of the FFN, shown here as a percentage
    "budget_pct": round(_ENGINE_DEFAULTS.budget * 100), "window": _ENGINE_DEFAULTS.window,
    "threads": _ENGINE_DEFAULTS.threads, "active": _ENGINE_DEFAULTS.active, "policy": _ENGINE_DEFAULTS.policy,
}
POLICY_LABELS = {
    "auto": "Automatic (measured best for this model)",
    "lru": "Window, lazy (LRU)",
    "window": "Window (the paper's, eager)",
    "hot": "Hot neurons pinned",
    "hot+window": "Hot neurons + window",
}
ACTIVE_LABELS = {
    "auto": "Automatic (measured per model: all, predictor or gate-first)",
    "predictor": "Predictor (low-rank, the product mode)",
    "oracle": "Oracle (true activations; upper bound)",
    "all": "All neurons (naive flash baseline)",
}


def _key(name: str) -> str:
    return "models/" + name.replace("/", "_")


def model_settings(settings: QSettings, name: str) -> dict:
    """The memory budget (% of the FFN), window, threads, neuron choice and cache policy stored for ``name``."""
    out = {}
    for k, d in MODEL_DEFAULTS.items():
        v = settings.value(f"{_key(name)}/{k}", d)
        try:
            out[k] = type(d)(v)
        except (TypeError, ValueError, OverflowError):
            out[k] = d
        # a damaged or hand-edited settings.ini: values the widgets could not show are the defaults
        if k in _SETTING_RANGES and not _SETTING_RANGES[k][0] <= out[k] <= _SETTING_RANGES[k][1]:
            out[k] = d
        if k in _SETTING_CHOICES and out[k] not in _SETTING_CHOICES[k]:
            out[k] = d
    return out


_SETTING_RANGES = {"budget_pct": (1, 100), "window": (1, 128), "threads": (0, 64)}
"""The spin boxes' ranges of the per-model settings (ModelSettingsDialog)."""
_SETTING_CHOICES = {"active": FlashConfig.ACTIVE_CHOICES, "policy": FlashConfig.POLICY_CHOICES}


def save_model_settings(settings: QSettings, name: str, values: dict) -> None:
    for k in MODEL_DEFAULTS:
        if k in values:
            settings.setValue(f"{_key(name)}/{k}", values[k])
    settings.sync()


def move_model_settings(settings: QSettings, old: str, new: str) -> None:
    vals = model_settings(settings, old)
    settings.remove(_key(old))
    save_model_settings(settings, new, vals)


def flash_config_for(path: Path, settings: QSettings, base=None):
    """The FlashConfig to load ``path`` with: ``base`` (or the defaults) with this model's
    budget, window, threads, neuron choice and cache policy applied."""
    base = base or FlashConfig()
    ms = model_settings(settings, Path(path).name)
    d: dict = {
        "budget": parse_budget(f"{max(1, min(100, int(ms['budget_pct'])))}%"),  # the CLI's syntax; the spin box: 1..100
        "window": max(1, ms["window"]),
        "active": ms["active"],  # "auto": the engine measures per model (Engine.active_info says what and why)
    }
    if ms["threads"]:
        d["threads"] = ms["threads"]
    if ms["policy"] in FlashConfig.POLICY_CHOICES:
        d["policy"] = ms["policy"]
        d["hot_fraction"] = None
    return replace(base, **d)


# --------------------------------------------------------------------------- widgets
class DropZone(QFrame):
    """A dashed box that says what can be dropped (the whole window accepts drops)."""

    clicked = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("DropZone")
        self.setMinimumHeight(92)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(16, 12, 16, 12)
        icon = QLabel()
        icon.setPixmap(theme.icon("import", theme.ACCENT_2).pixmap(28, 28))
        icon.setAlignment(Qt.AlignHCenter)
        lay.addWidget(icon)
        t = QLabel("Drop a <b>.gguf</b> file or a model folder (mlx-lm / Hugging Face) anywhere on the window")
        t.setAlignment(Qt.AlignHCenter)
        t.setWordWrap(True)
        lay.addWidget(t)
        sub = QLabel("It is converted to the flash format: feed-forward weights stay on disk and are read on demand.")
        sub.setObjectName("Muted")
        sub.setAlignment(Qt.AlignHCenter)
        sub.setWordWrap(True)
        lay.addWidget(sub)

    def set_hover(self, on: bool) -> None:
        self.setProperty("hover", "true" if on else "false")
        self.style().unpolish(self)
        self.style().polish(self)


class ImportProgress(ProgressCard):
    def __init__(self, parent=None):
        super().__init__(parent, title="Importing", percent="0%", cancellable=True)


class ModelLibraryPage(QWidget):
    """Signals: ``load_requested(path)``, ``notice(level, text)``, ``models_changed()``,
    ``import_finished(path or "")``, ``speed_test_requested(path)``."""

    load_requested = Signal(str)
    notice = Signal(str, str)
    models_changed = Signal()
    import_finished = Signal(str)
    speed_test_requested = Signal(str)
    settings_applied = Signal(str)

    COLS = ("Name", "Format", "Family", "Parameters", "Size on disk", "")

    def __init__(self, settings: QSettings, parent=None):
        super().__init__(parent)
        self.setObjectName("LibraryPage")
        self.settings = settings
        self.current_path: Optional[Path] = None   # the model loaded in the chat
        self._entries: List[library.ModelEntry] = []
        self._broken: List[library.BrokenEntry] = []
        self._import_worker: Optional[workers.Worker] = None
        self._queue: List[Path] = []
        self._importing: Optional[Path] = None
        self._details: Optional[library.FlashDetails] = None  # the selected flash model's (budget in bytes)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(28, 22, 28, 18)
        lay.setSpacing(12)
        head = QHBoxLayout()
        col = QVBoxLayout()
        title = QLabel("Models")
        title.setObjectName("PageTitle")
        col.addWidget(title)
        self.subtitle = QLabel("")
        self.subtitle.setObjectName("Muted")
        self.subtitle.setTextInteractionFlags(Qt.TextSelectableByMouse)
        col.addWidget(self.subtitle)
        self.broken_note = QLabel("")  # damaged folders in the library: named with the reason, not listed
        self.broken_note.setObjectName("Warning")
        self.broken_note.setWordWrap(True)
        self.broken_note.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.broken_note.hide()
        col.addWidget(self.broken_note)
        head.addLayout(col, 1)
        self.import_file_btn = QPushButton("  Import GGUF file…")
        self.import_file_btn.setIcon(theme.icon("file"))
        self.import_file_btn.clicked.connect(self.choose_file)
        self.import_dir_btn = QPushButton("  Import folder…")
        self.import_dir_btn.setIcon(theme.icon("folder"))
        self.import_dir_btn.clicked.connect(self.choose_folder)
        head.addWidget(self.import_file_btn, 0, Qt.AlignTop)
        head.addWidget(self.import_dir_btn, 0, Qt.AlignTop)
        lay.addLayout(head)

        self.drop_zone = DropZone()
        lay.addWidget(self.drop_zone)
        self.calibrate_box = QCheckBox("Train activation predictors after importing (recommended; takes a while)")
        self.calibrate_box.setToolTip("Predictors guess which feed-forward neurons a token needs, so only those "
                                      "are read from disk")
        self.calibrate_box.setChecked(settings.value("import/calibrate", True) not in (False, "false", "0"))
        self.calibrate_box.toggled.connect(lambda on: settings.setValue("import/calibrate", on))
        lay.addWidget(self.calibrate_box)
        self.progress = ImportProgress()
        self.progress.cancel_requested.connect(self.cancel_import)
        self.progress.hide()
        lay.addWidget(self.progress)

        self.table = QTableWidget(0, len(self.COLS))
        self.table.setHorizontalHeaderLabels(self.COLS)
        self.table.verticalHeader().hide()
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setAlternatingRowColors(True)
        self.table.setShowGrid(False)
        self.table.setFocusPolicy(Qt.NoFocus)
        self.table.verticalHeader().setDefaultSectionSize(38)
        hh = self.table.horizontalHeader()
        hh.setSectionResizeMode(0, QHeaderView.Stretch)
        for i in range(1, len(self.COLS)):
            hh.setSectionResizeMode(i, QHeaderView.ResizeToContents)
        hh.setDefaultAlignment(Qt.AlignLeft | Qt.AlignVCenter)
        self.table.itemSelectionChanged.connect(self._selection_changed)
        self.table.itemDoubleClicked.connect(lambda *_: self._load_selected())
        lay.addWidget(self.table, 3)

        actions = QHBoxLayout()
        self.load_btn = QPushButton("  Load in chat")
        self.load_btn.setIcon(theme.icon("play", "#ffffff"))
        self.load_btn.setProperty("kind", "primary")
        self.load_btn.clicked.connect(self._load_selected)
        self.rename_btn = QPushButton("  Rename…")
        self.rename_btn.setIcon(theme.icon("rename"))
        self.rename_btn.clicked.connect(self._rename_selected)
        self.remove_btn = QPushButton("  Remove…")
        self.remove_btn.setIcon(theme.icon("trash", theme.DANGER))
        self.remove_btn.clicked.connect(self._remove_selected)
        self.bench_btn = QPushButton("  Speed test…")
        self.bench_btn.setIcon(theme.icon("gauge"))
        self.bench_btn.clicked.connect(self._bench_selected)
        self.open_btn = QPushButton("  Show folder")
        self.open_btn.setIcon(theme.icon("folder"))
        self.open_btn.clicked.connect(self._open_folder)
        for b in (self.load_btn, self.rename_btn, self.remove_btn, self.bench_btn):
            actions.addWidget(b)
        actions.addStretch(1)
        actions.addWidget(self.open_btn)
        lay.addLayout(actions)

        # per-model settings
        self.settings_card = QFrame()
        self.settings_card.setObjectName("SettingsCard")
        sl = QVBoxLayout(self.settings_card)
        sl.setContentsMargins(14, 10, 14, 12)
        self.settings_title = QLabel("Engine settings")
        self.settings_title.setStyleSheet("font-weight: 600;")
        sl.addWidget(self.settings_title)
        form_row = QHBoxLayout()
        form = QFormLayout()
        form.setHorizontalSpacing(12)
        self.budget = QSpinBox()
        self.budget.setRange(*_SETTING_RANGES["budget_pct"])
        self.budget.setSuffix(" % of FFN")
        self.budget.setToolTip("Memory the neuron cache may use, as a share of the model's feed-forward weights")
        self.budget_bytes = QLabel("")
        self.budget_bytes.setObjectName("Muted")
        brow = QHBoxLayout()
        brow.addWidget(self.budget)
        brow.addWidget(self.budget_bytes)
        brow.addStretch(1)
        form.addRow("Memory budget", brow)
        self.window = QSpinBox()
        self.window.setRange(*_SETTING_RANGES["window"])
        self.window.setSuffix(" tokens")
        self.window.setFixedWidth(150)
        self.budget.setFixedWidth(150)
        self.window.setToolTip("Neurons used in the last k tokens stay in the cache (sliding window)")
        form.addRow("Window", self.window)
        form_row.addLayout(form, 1)
        form2 = QFormLayout()
        form2.setHorizontalSpacing(12)
        self.threads = QSpinBox()
        self.threads.setRange(*_SETTING_RANGES["threads"])
        self.threads.setSpecialValueText("auto (disk probe)")
        self.threads.setToolTip("Parallel reads from flash; auto uses the measured best for this disk")
        form2.addRow("Read threads", self.threads)
        self.active = QComboBox()
        for k, label in ACTIVE_LABELS.items():
            self.active.addItem(label, k)
        form2.addRow("Neuron choice", self.active)
        self.policy = QComboBox()
        for k, label in POLICY_LABELS.items():
            self.policy.addItem(label, k)
        self.policy.setToolTip("Which neurons keep the cache's rows: the last tokens' (window), the most "
                               "frequently active ones (hot; needs calibration), or both. Automatic picks the "
                               "one that reads the fewest bytes, measured by simulation on the calibration")
        form2.addRow("Cache policy", self.policy)
        form_row.addLayout(form2, 1)
        sl.addLayout(form_row)
        srow = QHBoxLayout()
        self.settings_note = QLabel("Applied when the model is (re)loaded.")
        self.settings_note.setObjectName("Muted")
        srow.addWidget(self.settings_note, 1)
        self.apply_btn = QPushButton("Save and reload")
        self.apply_btn.setProperty("kind", "primary")
        self.apply_btn.clicked.connect(self._apply_settings)
        srow.addWidget(self.apply_btn)
        sl.addLayout(srow)
        lay.addWidget(self.settings_card)
        self.budget.valueChanged.connect(self._update_budget_label)

        self.refresh()

    # --------------------------------------------------------------- listing
    def refresh(self, select: Optional[Path] = None) -> None:
        prev = select or self.selected_path()
        self._entries, self._broken = library.scan_library()
        self.broken_note.setText(self.broken_text())
        self.broken_note.setVisible(bool(self._broken))
        self.table.setRowCount(len(self._entries))
        for r, e in enumerate(self._entries):
            name = library.display_name(e)
            cells = [
                name,
                "flash" if e.kind == "flash" else "mlx (dense)",
                e.family or e.architecture,
                theme.human_count(e.parameters) if e.parameters else "?",
                theme.human_bytes(e.size_bytes),
                "● loaded" if self.current_path is not None and Path(e.path) == Path(self.current_path) else "",
            ]
            for c, text in enumerate(cells):
                it = QTableWidgetItem(text)
                it.setData(Qt.UserRole, str(e.path))
                if c == 0:
                    it.setIcon(theme.icon("bolt" if e.kind == "flash" else "cpu",
                                          theme.ACCENT_2 if e.kind == "flash" else theme.MUTED))
                    it.setToolTip(str(e.path))
                if c == 5:
                    it.setForeground(QColor(theme.OK))
                self.table.setItem(r, c, it)
        n = len(self._entries)
        self.subtitle.setText(f"{n} model{'s' if n != 1 else ''} · {paths.models_dir()}")
        if prev is not None:
            for r, e in enumerate(self._entries):
                if Path(e.path) == Path(prev):
                    self.table.selectRow(r)
                    break
        if not self.table.selectionModel().selectedRows() and n:  # the loaded model, else the first flash one
            rows = [r for r, e in enumerate(self._entries)
                    if self.current_path is not None and Path(e.path) == Path(self.current_path)]
            rows += [r for r, e in enumerate(self._entries) if e.kind == "flash"]
            self.table.selectRow(rows[0] if rows else 0)
        self._selection_changed()

    def entries(self) -> List[library.ModelEntry]:
        return list(self._entries)

    def broken(self) -> List[library.BrokenEntry]:
        """Folders in the library that are not usable models (each with the reason)."""
        return list(self._broken)

    def broken_text(self) -> str:
        """What the page says about damaged folders ("" when there are none)."""
        if not self._broken:
            return ""
        n = len(self._broken)
        lines = [f"{n} folder{'s' if n != 1 else ''} in the library {'are' if n != 1 else 'is'} damaged and "
                 f"not listed (remove or re-import {'them' if n != 1 else 'it'}):"]
        lines += [f"• {b.reason}" for b in self._broken]
        return "\n".join(lines)

    def selected_path(self) -> Optional[Path]:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows:
            return None
        it = self.table.item(rows[0].row(), 0)
        return Path(it.data(Qt.UserRole)) if it else None

    def select_path(self, path: Path) -> None:
        for r, e in enumerate(self._entries):
            if Path(e.path) == Path(path):
                self.table.selectRow(r)
                return

    def set_current(self, path: Optional[Path]) -> None:
        """``path`` is the model loaded in the chat: marked, and selected when it changes."""
        new = Path(path) if path else None
        changed = new != self.current_path
        self.current_path = new
        self.refresh(select=new if changed else None)

    def _selection_changed(self) -> None:
        p = self.selected_path()
        has = p is not None
        in_use = has and self.current_path is not None and p == self.current_path
        for b in (self.load_btn, self.bench_btn, self.open_btn):
            b.setEnabled(has)
        for b in (self.rename_btn, self.remove_btn):
            b.setEnabled(has and not in_use)
            b.setToolTip("The model is loaded in the chat" if in_use else "")
        self.settings_card.setEnabled(has)
        if not has:
            self.settings_title.setText("Engine settings")
            return
        flash = library.describe(p)
        is_flash = flash is not None and flash.kind == "flash"
        self.settings_title.setText(f"Engine settings for {library.display_name(p)}"
                                    + ("" if is_flash else "  (dense model: loaded whole, settings unused)"))
        ms = model_settings(self.settings, p.name)
        self.budget.setValue(ms["budget_pct"])
        self.window.setValue(ms["window"])
        self.threads.setValue(ms["threads"])
        i = self.active.findData(ms["active"])
        self.active.setCurrentIndex(max(0, i))
        self.policy.setCurrentIndex(max(0, self.policy.findData(ms["policy"])))
        for w in (self.budget, self.window, self.threads, self.active, self.policy):
            w.setEnabled(is_flash)
        self._details = library.flash_details(p) if is_flash else None
        self._update_budget_label()
        self.apply_btn.setText("Save and reload" if in_use else "Save")

    def _update_budget_label(self) -> None:
        ffn = self._details.ffn_bytes if self._details is not None else 0
        self.budget_bytes.setText(f"= {theme.human_bytes(ffn * self.budget.value() / 100)} of "
                                  f"{theme.human_bytes(ffn)}" if ffn else "")

    # --------------------------------------------------------------- actions
    def _load_selected(self) -> None:
        p = self.selected_path()
        if p is not None:
            self.load_requested.emit(str(p))

    def _bench_selected(self) -> None:
        p = self.selected_path()
        if p is not None:
            self.speed_test_requested.emit(str(p))

    def _open_folder(self) -> None:
        p = self.selected_path()
        if p is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(p)))

    def _apply_settings(self) -> None:
        p = self.selected_path()
        if p is None:
            return
        save_model_settings(self.settings, p.name, {
            "budget_pct": self.budget.value(), "window": self.window.value(),
            "threads": self.threads.value(), "active": self.active.currentData(),
            "policy": self.policy.currentData(),
        })
        self.notice.emit("ok", f"Settings saved for {library.display_name(p)}.")
        self.settings_applied.emit(str(p))

    def _rename_selected(self) -> None:
        p = self.selected_path()
        if p is None:
            return
        new, ok = QInputDialog.getText(self, "Rename model", "New name:", text=library.display_name(p))
        if ok:
            self.rename(p, new)

    def rename(self, path: Path, new_name: str) -> Optional[Path]:
        try:
            dst = library.rename_model(path, new_name)
        except (ValueError, OSError) as e:
            self.notice.emit("error", f"Cannot rename: {e}")
            return None
        move_model_settings(self.settings, Path(path).name, dst.name)
        self.refresh(select=dst)
        self.models_changed.emit()
        return dst

    def _remove_selected(self) -> None:
        p = self.selected_path()
        if p is None:
            return
        e = library.describe(p)
        size = theme.human_bytes(e.size_bytes) if e else ""
        box = QMessageBox(QMessageBox.Warning, "Remove model",
                          f"Remove {library.display_name(p)} ({size}) from the library?\n\n"
                          f"Its folder is deleted from disk:\n{p}", QMessageBox.Cancel, self)
        rm = box.addButton("Remove", QMessageBox.DestructiveRole)
        box.exec()
        if box.clickedButton() is rm:
            self.remove(p)

    def remove(self, path: Path) -> bool:
        try:
            library.remove_model(path)
        except (ValueError, OSError) as e:
            self.notice.emit("error", f"Cannot remove: {e}")
            return False
        self.settings.remove(_key(Path(path).name))
        self.refresh()
        self.models_changed.emit()
        self.notice.emit("ok", f"Removed {library.display_name(path)}.")
        return True

    # ---------------------------------------------------------------- import
    def choose_file(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Import a GGUF model", str(Path.home()),
                                           "GGUF models (*.gguf);;All files (*)")
        if f:
            self.import_paths([f])

    def choose_folder(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Import an mlx-lm / Hugging Face model folder", str(Path.home()))
        if d:
            self.import_paths([d])

    @property
    def importing(self) -> bool:
        """From the start of an import until its outcome has been shown."""
        return self._import_worker is not None

    def import_paths(self, items) -> int:
        """Check each dropped/chosen path and queue the importable ones; say why others
        are refused. Returns how many were queued."""
        ok, bad = [], []
        for raw in items:
            p = Path(raw)
            try:
                library.check_importable(p)
                ok.append(p)
            except library.ImportRejected as e:
                bad.append(str(e))
            except Exception as e:  # anything odd about a dropped path is the user's to see
                bad.append(f"{p.name}: {e}")
        if bad:
            self.notice.emit("error", "Cannot import: " + "\n".join(bad))
        self._queue.extend(ok)
        self._next_import()
        return len(ok)

    def _next_import(self) -> None:
        if self.importing or not self._queue:
            return
        src = self._queue.pop(0)
        self._importing = src
        self.progress.title.setText(f"Importing {src.name}")
        self.progress.set_progress(0.0, "starting…")
        self.progress.cancel_btn.setEnabled(True)
        self.progress.show()
        self.import_file_btn.setEnabled(False)
        self.import_dir_btn.setEnabled(False)

        calibrate = self.calibrate_box.isChecked()

        def job(w: workers.Worker):
            return library.import_model(src, progress=w.progress_callback, calibrate=calibrate)

        w = workers.Worker(job)
        w.progress.connect(self._on_import_progress)
        w.finished.connect(self._on_import_done)
        w.errored.connect(self._on_import_error)
        self._import_worker = workers.start(w, self)

    def cancel_import(self) -> None:
        self._queue.clear()
        if self._import_worker is not None:
            self._import_worker.request_stop()
            self.progress.cancel_btn.setEnabled(False)
            self.progress.message.setText("cancelling…")

    def _on_import_progress(self, fraction: float, message: str) -> None:
        self.progress.set_progress(fraction, message)

    def _import_ended(self) -> None:
        self._import_worker = None
        self._importing = None
        self.progress.hide()
        self.import_file_btn.setEnabled(True)
        self.import_dir_btn.setEnabled(True)

    def _on_import_done(self, result) -> None:
        src = self._importing
        self._import_ended()
        if result is None:
            self.notice.emit("info", f"Import of {src.name if src else 'the model'} cancelled; nothing was kept.")
            self.import_finished.emit("")
        else:
            details = library.flash_details(Path(result))
            has_pred = details is not None and details.has_predictors
            calib = " with activation predictors" if has_pred else " (no activation predictors: the oracle is used)"
            self.notice.emit("ok", f"Imported {library.display_name(result)}{calib}.")
            self.refresh(select=Path(result))
            self.models_changed.emit()
            self.import_finished.emit(str(result))
        self._next_import()

    def _on_import_error(self, message: str) -> None:
        src = self._importing
        self._import_ended()
        self.notice.emit("error", f"Import of {src.name if src else 'the model'} failed: {message}")
        self.import_finished.emit("")
        self._next_import()

    def shutdown(self) -> None:
        self._queue.clear()
        workers.wait(self._import_worker, 60000)
