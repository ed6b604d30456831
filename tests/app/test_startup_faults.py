"""The window starts with a damaged chat history and a damaged library entry, and says so (issue #17)."""

from __future__ import annotations

import shutil

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
