"""run_reporting: a worker process's entry point (progress over a queue), run in-process on a tiny model."""

from __future__ import annotations

import os
import queue

from mlx_flash.library import convert_any
from mlx_flash.progress import run_reporting, tqdm_callback
from tests.tiny import make_tiny_llama


def _drain(q):
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def test_reports_progress_then_the_result(tmp_path):
    src = make_tiny_llama(tmp_path / "src", layers=2, hidden=64, ffn=128)
    q = queue.Queue()
    run_reporting(q, convert_any, {"src": src, "dst": tmp_path / "t.flash"}, os.getppid(), interval=0.0)
    msgs = _drain(q)
    assert msgs[-1] == ("done", tmp_path / "t.flash") and (tmp_path / "t.flash" / "manifest.json").is_file()
    fractions = [m[1] for m in msgs if m[0] == "progress"]
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0


def test_an_orphaned_worker_cancels_and_cleans_up(tmp_path):
    """Its parent is gone (here: a pid that is not its parent): the first report cancels the work."""
    src = make_tiny_llama(tmp_path / "src", layers=2, hidden=64, ffn=128)
    q = queue.Queue()
    run_reporting(q, convert_any, {"src": src, "dst": tmp_path / "t.flash"}, os.getppid() + 1)
    assert _drain(q) == [("done", None)]
    assert not (tmp_path / "t.flash").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary left


def test_errors_arrive_as_text(tmp_path):
    q = queue.Queue()
    run_reporting(q, convert_any, {"src": tmp_path / "missing", "dst": tmp_path / "t.flash"}, os.getppid())
    (kind, text), = _drain(q)
    assert kind == "error" and "no such file or folder" in text


def test_cli_bar_shows_a_new_message_at_the_same_fraction(capsys):
    """Long steps that report only messages (calibration's held-out perplexity chunks) must still be
    drawn: tqdm's update(0) draws nothing, so a new message at an unchanged fraction refreshes the bar."""
    cb = tqdm_callback("work")
    cb(0.5, "first step")
    cb(0.5, "scoring chunk 3/7")
    assert "scoring chunk 3/7" in capsys.readouterr().err
    cb(1.0, "done")
