"""The window's Qt-free state (chat_state.py): what is sent to the engine, what is kept with an answer."""

from __future__ import annotations

from mlx_flash.stats import Stats
from mlx_flash_app.chat_state import Generation, export_file_name, history_messages
from mlx_flash_app.history import COMPLETE, ERROR, History


def test_history_messages_leave_out_failed_and_empty_turns(tmp_path):
    with History(tmp_path / "h.sqlite3") as h:
        c = h.new_conversation("t")
        h.add_message(c, "system", "be brief")
        h.add_message(c, "user", "hello")
        h.add_message(c, "assistant", "partial answer", status=ERROR)
        h.add_message(c, "assistant", "   ")
        h.add_message(c, "user", "again")
        h.add_message(c, "assistant", "hi", status=COMPLETE)
        assert history_messages(h, c) == [{"role": "user", "content": "hello"},
                                          {"role": "user", "content": "again"},
                                          {"role": "assistant", "content": "hi"}]


def test_export_file_name():
    assert export_file_name("Paris: a/b?") == "Paris_ a_b_.md"
    assert export_file_name("///") == "___.md"
    assert export_file_name("  ") == "chat.md"


def test_generation_meta_takes_the_engines_figures():
    g = Generation(1, 2, None, worker=None)
    meta = g.meta("Tiny")
    assert meta["model"] == "Tiny" and meta["tokens"] == 0 and "first_token_s" not in meta
    g.stats = Stats(ms_first_token=1500.0, tokens_per_s=12.345, mode="flash-predictor", prompt_tokens=7,
                    prompt_tps=99.96, peak_memory=10, cum_hit_rate=0.91234, bytes_read=4096)
    g.tokens = 5
    g.t_first = g.t_start + 0.2  # the window's own clock loses to the engine's time to first token
    meta = g.meta(None)
    assert meta["first_token_s"] == 1.5 and meta["tokens_per_s"] == 12.35 and meta["tokens"] == 5
    assert meta["hit_rate"] == 0.9123 and meta["bytes_per_token"] == 4096 and meta["prompt_tps"] == 100.0
    g.stats.mode = "dense"
    assert "hit_rate" not in g.meta(None)
