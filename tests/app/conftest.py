"""Fixtures for the desktop app's tests (pytest-qt, offscreen).

Every test gets its own data folder (``MLX_FLASH_HOME``: models, history, settings)
and must leave no worker thread running.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before any QApplication exists

import time
from pathlib import Path

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

import mlx.core as mx
from PySide6.QtCore import QCoreApplication, QEvent

from mlx_flash.config import FlashConfig
from mlx_flash.storage.format import convert_to_flash
from mlx_flash_app import theme, workers
from mlx_flash_app.main_window import MainWindow
from tests.tiny import make_tiny_flash, make_tiny_llama

WAIT = 60_000  # ms: generous, the machine is shared


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A tiny llama source folder and its flash conversion (built once)."""
    root = tmp_path_factory.mktemp("tiny-app")
    flash = make_tiny_flash(root, layers=2, hidden=64, ffn=128, seed=1)
    return {"src": root / "src", "flash": flash}


@pytest.fixture(scope="session")
def chatty_flash(tmp_path_factory):
    """A tiny flash model that never ends its answer by itself: the end-of-sequence row
    of its output layer is zero, so greedy decoding never picks it (for Stop tests)."""
    root = tmp_path_factory.mktemp("chatty")
    src = make_tiny_llama(root / "src", layers=2, hidden=64, ffn=128, seed=2)
    weights = mx.load(str(src / "model.safetensors"))
    head = weights["lm_head.weight"]
    weights["lm_head.weight"] = mx.concatenate([head[:-1], mx.zeros_like(head[-1:])], axis=0)
    mx.save_safetensors(str(src / "model.safetensors"), weights, metadata={"format": "mlx"})
    return convert_to_flash(src, root / "Chatty.flash")


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    """An mlx-lm folder to import (named like a real model folder)."""
    return make_tiny_llama(tmp_path_factory.mktemp("import-src") / "Tiny-Llama-mlx", layers=2, hidden=64, ffn=128)


@pytest.fixture(autouse=True)
def data_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("MLX_FLASH_HOME", str(home))
    return home


@pytest.fixture(scope="session", autouse=True)
def _theme(qapp):
    qapp.setApplicationName("mlx-flash-tests")
    theme.apply(qapp)
    yield

    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)


@pytest.fixture(autouse=True)
def no_thread_left(qtbot):
    """No worker thread may outlive its test (widgets are closed before this runs)."""
    yield

    deadline = time.monotonic() + 10
    while workers.running_threads() and time.monotonic() < deadline:
        qtbot.wait(20)
    left = workers.running_threads()
    assert not left, f"{len(left)} QThread(s) still running after the test"


def tiny_config():
    return FlashConfig(scratch_neurons=32, threads=2)


@pytest.fixture
def make_window(qtbot, tiny_models, data_home):
    """``make_window(**kw)`` → a shown MainWindow on the tiny flash model, loaded."""
    made = []

    def make(model=None, load=True, **kw):
        kw.setdefault("config", tiny_config())
        w = MainWindow(model_path=str(model or tiny_models["flash"]), **kw)
        qtbot.addWidget(w)
        made.append(w)
        w.resize(1300, 820)
        w.show()
        if load:
            with qtbot.waitSignal(w.engine_ready, timeout=WAIT):
                w.start()
        return w

    yield make
    for w in made:
        try:
            w.close()
        except RuntimeError:  # already deleted
            pass
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)


def set_sampling(w, *, max_tokens=64, temperature=0.0, top_p=1.0, system=""):
    w.chat_settings.set_values({"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                                "system_prompt": system})


def models_dir(home: Path) -> Path:
    return home / "models"
