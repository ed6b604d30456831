"""Chat history (Qt-free): SQLite in WAL mode, partial answers survive a kill."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from mlx_flash_app.history import COMPLETE, INTERRUPTED, STOPPED, STREAMING, History, title_from


def test_roundtrip_and_order(tmp_path):
    with History(tmp_path / "h.sqlite3") as h:
        a = h.new_conversation("First", model="m", system_prompt="Be brief.")
        b = h.new_conversation("Second")
        h.add_message(a, "user", "hello")
        mid = h.add_message(a, "assistant", "", status=STREAMING)
        h.update_message(mid, "partial")
        h.update_message(mid, "partial answer", status=COMPLETE, meta={"tokens": 3, "tokens_per_s": 12.5})
        assert [c.id for c in h.conversations()] == [a, b]  # a was updated last
        msgs = h.messages(a)
        assert [(m.role, m.content, m.status) for m in msgs] == [("user", "hello", COMPLETE),
                                                                 ("assistant", "partial answer", COMPLETE)]
        assert msgs[1].meta["tokens"] == 3
        h.rename_conversation(b, "Renamed")
        assert h.conversation(b).title == "Renamed"
        h.delete_messages_from(a, mid)
        assert len(h.messages(a)) == 1
        h.delete_conversation(a)
        assert h.conversation(a) is None and h.messages(a) == []
        mode = h._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode.lower() == "wal"


def test_export_markdown(tmp_path):
    with History(tmp_path / "h.sqlite3") as h:
        c = h.new_conversation("Capitals", model="SmolLM2", system_prompt="Answer briefly.")
        h.add_message(c, "user", "What is the capital of France?")
        h.add_message(c, "assistant", "**Paris**.", meta={"tokens": 4, "tokens_per_s": 20.0, "seconds": 0.2})
        h.add_message(c, "assistant", "Half an ans", status=STOPPED)
        md = h.export_markdown(c)
    assert md.startswith("# Capitals\n")
    assert "> **System:** Answer briefly." in md
    assert "## You\n\nWhat is the capital of France?" in md
    assert "## Assistant\n\n**Paris**." in md
    assert "20.0 tok/s" in md and "*stopped*" in md


def test_title_from():
    assert title_from("  hello\n  world ") == "hello world"
    assert len(title_from("x" * 100)) == 48


def test_partial_answer_survives_kill(tmp_path):
    """A process killed while it streams leaves its last partial write, marked interrupted on reopen."""
    db = tmp_path / "h.sqlite3"
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        import tests  # binds mlx_flash_app to this checkout's app/
        from mlx_flash_app.history import History, STREAMING
        h = History({str(db)!r})
        c = h.new_conversation("Killed")
        h.add_message(c, "user", "tell me a story")
        m = h.add_message(c, "assistant", "", status=STREAMING)
        h.update_message(m, "Once upon")
        h.update_message(m, "Once upon a time")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    with History(db) as h:
        assert h.recover() == 1
        (conv,) = h.conversations()
        msgs = h.messages(conv.id)
        assert msgs[-1].content == "Once upon a time"
        assert msgs[-1].status == INTERRUPTED
        assert h.recover() == 0
