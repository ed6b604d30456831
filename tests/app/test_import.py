"""Model import by drag and drop (progress, cancel, invalid drops), library actions,
per-model settings."""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication

from mlx_flash import library
from mlx_flash.families import family_label
from mlx_flash_app import theme
from mlx_flash_app.widgets.model_library import model_settings, save_model_settings
from tests.tiny import make_tiny_llama, make_tiny_model

from .conftest import WAIT, tiny_config


def _mime(*paths) -> QMimeData:
    m = QMimeData()
    m.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    return m


def drop(w, *paths) -> QDropEvent:
    mime = _mime(*paths)
    pos = QPointF(w.width() / 2, w.height() / 2)
    enter = QDragEnterEvent(pos.toPoint(), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(w, enter)
    ev = QDropEvent(pos, Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(w, ev)
    return ev


def _library_files(home: Path):
    d = home / "models"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_drop_folder_imports_with_progress(make_window, qtbot, tiny_source, data_home):
    w = make_window(load=False)
    assert w.acceptDrops()
    values = []
    with qtbot.waitSignal(w.library.import_finished, timeout=3 * WAIT) as blocker:
        ev = drop(w, tiny_source)
        assert ev.isAccepted()
        assert w.pages.currentIndex() == 1  # the library page shows the import
        assert w.library.importing and w.library.progress.isVisible()
        w.library.progress.bar.valueChanged.connect(values.append)
    path = Path(blocker.args[0])
    assert path == data_home / "models" / "Tiny-Llama.flash"
    assert values and max(values) > 0 and values == sorted(values)
    assert not w.library.progress.isVisible()
    assert _library_files(data_home) == ["Tiny-Llama.flash"]  # no temp folders left
    names = [library.display_name(e) for e in w.library.entries()]
    assert names == ["Tiny-Llama"]
    assert w.library.table.item(0, 2).text() == family_label("llama")  # the family, by name
    assert "Imported Tiny-Llama" in w.library_notice.text()
    if w.library.calibrate_box.isChecked():
        details = library.flash_details(path)
        assert details is not None and details.has_predictors
    # the imported model loads in the chat (oracle: a tiny model's predictors do not fit half its tiny FFN)

    save_model_settings(w.settings, path.name, {"active": "oracle"})
    with qtbot.waitSignal(w.engine_ready, timeout=WAIT):
        w.library.load_requested.emit(str(path))
    assert w.engine_path == path and w.pages.currentIndex() == 0


def test_drop_then_cancel_leaves_nothing(make_window, qtbot, tmp_path, data_home):
    big = make_tiny_llama(tmp_path / "Bigger-mlx", layers=8, hidden=128, ffn=512)
    w = make_window(load=False)
    w.library.calibrate_box.setChecked(True)
    with qtbot.waitSignal(w.library.import_finished, timeout=3 * WAIT) as blocker:
        drop(w, big)
        qtbot.waitUntil(lambda: w.library.progress.bar.value() > 0, timeout=WAIT)
        assert w.library.importing, "the import finished before it could be cancelled"
        qtbot.mouseClick(w.library.progress.cancel_btn, Qt.LeftButton)
    assert blocker.args[0] == ""
    assert "cancelled" in w.library_notice.text()
    assert _library_files(data_home) == []
    assert w.library.entries() == []
    assert not w.library.progress.isVisible()


def test_invalid_drops_show_a_message_and_leave_nothing(make_window, qtbot, tmp_path, data_home):
    w = make_window(load=False)
    note = tmp_path / "notes.txt"
    note.write_text("not a model")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"GGUF but not really")
    for bad, words in ((note, "not a model"), (empty, "config.json is missing"), (fake, "not a readable GGUF")):
        w.library_notice.hide()
        drop(w, bad)
        assert not w.library.importing
        assert w.library_notice.level == "error"
        assert words in w.library_notice.text(), w.library_notice.text()
        assert words in w.notice.text() or w.pages.currentIndex() == 1
    assert _library_files(data_home) == []
    assert w.library.entries() == []


def test_other_families_import_and_unknown_ones_are_named(make_window, qtbot, tmp_path, data_home):
    """A Qwen3 folder imports and the library shows its family; a family mlx-flash does not
    run is refused with a message naming the ones it does."""
    w = make_window(load=False)
    src = make_tiny_model(tmp_path / "Tiny-Qwen3", "qwen3", vocab=256)
    with qtbot.waitSignal(w.library.import_finished, timeout=3 * WAIT):
        drop(w, src)
    rows = {w.library.table.item(r, 0).text(): w.library.table.item(r, 2).text()
            for r in range(w.library.table.rowCount())}
    assert rows == {"Tiny-Qwen3": "Qwen3"}

    other = make_tiny_model(tmp_path / "Tiny-NeoX", "llama", vocab=256)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    w.library_notice.hide()
    drop(w, other)
    assert not w.library.importing and w.library_notice.level == "error"
    text = w.library_notice.text()
    assert "unsupported architecture 'gpt_neox'" in text
    for label in ("Qwen2 / Qwen2.5", "Qwen3", "Gemma 2", "Gemma 3", "Phi-3", "Mistral", "Llama"):
        assert label in text, label
    assert _library_files(data_home) == ["Tiny-Qwen3.flash"]


def test_non_file_drop_is_refused(make_window, qtbot):
    w = make_window(load=False)
    mime = QMimeData()
    mime.setText("just text")
    enter = QDragEnterEvent(w.rect().center(), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(w, enter)
    assert not enter.isAccepted()
    assert not w.drop_overlay.isVisible()


def test_rename_and_remove(make_window, qtbot, tiny_source, data_home):
    path = library.import_model(tiny_source, calibrate=False)
    w = make_window(load=False)
    page = w.library
    page.refresh()
    page.select_path(path)
    page.budget.setValue(30)
    page.window.setValue(3)
    page._apply_settings()
    new = page.rename(path, "My model")
    assert new == data_home / "models" / "My model.flash" and new.is_dir() and not path.exists()
    assert [library.display_name(e) for e in page.entries()] == ["My model"]

    assert model_settings(w.settings, new.name)["budget_pct"] == 30  # settings follow the rename
    with qtbot.waitSignal(page.notice) as bad:
        assert page.rename(new, "bad/name") is None
    assert bad.args[0] == "error" and "cannot be a model name" in bad.args[1]
    assert page.remove(new)
    assert page.entries() == [] and _library_files(data_home) == []


def test_per_model_settings_apply_on_load(make_window, qtbot, tiny_models):
    path = library.import_model(tiny_models["flash"], name="Tiny", calibrate=False)  # a flash folder: copied
    save_model_settings(theme.settings(), path.name, {"budget_pct": 80, "window": 3, "threads": 1, "active": "all"})
    w = make_window(path)
    cfg = w.engine.config
    assert (cfg.budget, cfg.window, cfg.threads, cfg.active) == (0.8, 3, 1, "all")
    assert cfg.scratch_neurons == tiny_config().scratch_neurons
    assert w.engine.mode == "flash-all"
    assert "window 3" in w.mode_chip.text()
    # changing them and "Save and reload" reloads the running model
    page = w.library
    page.select_path(path)
    assert page.selected_path() == path and page.window.value() == 3
    assert page.table.item(0, 5).text() == "● loaded"
    page.window.setValue(4)
    assert page.policy.currentData() == "auto" and w.engine.policy_info.name == "lru"  # uncalibrated: lru
    page.policy.setCurrentIndex(page.policy.findData("window"))
    with qtbot.waitSignal(w.engine_ready, timeout=WAIT):
        page.apply_btn.click()
    assert w.engine.config.window == 4
    assert w.engine.config.policy == "window" and w.engine.policy_info.name == "window"
