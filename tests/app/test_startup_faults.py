"""The window starts with a damaged chat history and a damaged library entry, and says so (issue #17)."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
from PySide6.QtCore import QSettings

from mlx_flash.storage.format import signed
from tests.app.conftest import models_dir


def test_window_starts_with_corrupt_history_and_broken_library_entry(make_window, data_home, tiny_models):
    garbage = bytes(range(256)) * 64
    (data_home / "history.sqlite3").write_bytes(garbage)
    broken = models_dir(data_home) / "Broken.flash"
    shutil.copytree(tiny_models["flash"], broken)
    (broken / "manifest.json").write_text('["not", "a", "manifest"]')
    shutil.copytree(tiny_models["flash"], models_dir(data_home) / "Good.flash")

    w = make_window()

    note = w.notice.text()
    assert "chat history was damaged" in note and "history.sqlite3.corrupt-" in note
    assert "Broken.flash" in note and "expected a JSON object, got list" in note
    aside = w.history.moved_aside
    assert aside.parent == data_home and aside.read_bytes() == garbage      # kept, not deleted
    assert [e.name for e in w.library.entries()] == ["Good.flash"]
    assert w.library.broken_note.isVisibleTo(w.library) and "Broken.flash" in w.library.broken_note.text()
    assert [w.model_combo.itemText(i) for i in range(w.model_combo.count())] == ["Good"]
    conv = w.history.new_conversation("works")                             # the new history is usable
    assert w.history.conversation(conv).title == "works"


def test_window_loads_a_model_whose_saved_settings_are_damaged(make_window, data_home, tiny_models):
    """A hand-edited settings.ini: an unknown neuron choice and a million reader threads. The window built its
    FlashConfig from them in the main thread (a ValueError: "Loading…" for ever); now the defaults are used."""
    s = QSettings(str(data_home / "settings.ini"), QSettings.IniFormat)
    s.setValue(f"models/{tiny_models['flash'].name}/active", "bogus")
    s.setValue(f"models/{tiny_models['flash'].name}/threads", 1000000)
    s.sync()
    w = make_window()
    assert w.engine is not None and w.engine.config.active == "auto"


def test_window_starts_with_library_entries_damaged_in_the_new_fields(make_window, data_home, tiny_models):
    """Entries whose neuron order is not a permutation, or whose format version is newer, are listed as
    broken with the reason; the window starts on the good model."""
    for name, edit in (("Perm.flash", _duplicate_neuron), ("Newer.flash", _newer_version)):
        bad = models_dir(data_home) / name
        shutil.copytree(tiny_models["flash"], bad)
        m = json.loads((bad / "manifest.json").read_text())
        edit(m)
        (bad / "manifest.json").write_text(json.dumps(signed(m)))
    w = make_window()
    note = w.library.broken_note.text()
    assert "Perm.flash" in note and "not a permutation" in note
    assert "Newer.flash" in note and "format_version" in note
    assert w.engine is not None


def _duplicate_neuron(m: dict) -> None:
    n = m["intermediate_size"]
    perm = np.arange(n, dtype="<u2")
    perm[1] = perm[0]
    m["neuron_order"] = {"version": 1, "method": "hot", "dtype": "<u2",
                         "layers": [base64.b64encode(perm.tobytes()).decode()] * m["num_layers"]}


def _newer_version(m: dict) -> None:
    m["format_version"] = 99
