"""Qt-free state of the window's jobs: the answer being generated and what is recorded with it, the
messages sent to the engine, the one-line description of how a model runs. No widgets here (napari /
superqt style): the window parts (chat_part, library_part, ...) hold the Qt side and call these."""

from __future__ import annotations

import time
from typing import Any, List, Optional

from .history import ERROR, History


class Generation:
    """What the window knows about the answer being generated."""

    def __init__(self, conv_id: int, msg_id: int, widget: Optional[Any], worker):
        self.conv_id = conv_id
        self.msg_id = msg_id
        self.widget = widget
        self.worker = worker
        self.text = ""
        self.saved_text = ""
        self.rendered_text = None
        self.stats = None
        self.finish_reason: Optional[str] = None
        self.tokens = 0
        self.t_start = time.perf_counter()
        self.t_first: Optional[float] = None
        self.stop_requested = False


    def meta(self, model: Optional[str]) -> dict:
        """What the history keeps with the answer (and the message footer shows)."""
        s = self.stats
        meta = {"model": model, "tokens": self.tokens, "finish_reason": self.finish_reason}
        if self.t_first is not None:
            meta["first_token_s"] = round(self.t_first - self.t_start, 3)
        meta["seconds"] = round(time.perf_counter() - self.t_start, 3)
        if s is not None:  # the engine's own time to first token: the figure the panel and the CLI show
            meta["first_token_s"] = round(s.ms_first_token / 1e3, 3)
            meta.update(tokens_per_s=round(s.tokens_per_s, 2), mode=s.mode, prompt_tokens=s.prompt_tokens,
                        prompt_tps=round(s.prompt_tps, 1), peak_memory=s.peak_memory)
            if str(s.mode).startswith("flash"):
                meta.update(hit_rate=round(s.cum_hit_rate, 4), bytes_per_token=s.bytes_read)
        return meta


def history_messages(history: History, conv_id: int) -> List[dict]:
    """The conversation as the engine's chat template takes it: user and assistant turns with text,
    failed answers left out."""
    out = []
    for m in history.messages(conv_id):
        if m.role in ("user", "assistant") and m.content.strip() and m.status != ERROR:
            out.append({"role": m.role, "content": m.content})
    return out


def export_file_name(title: str) -> str:
    """A file name (without folder) for a chat exported as Markdown."""
    safe = "".join(c if c.isalnum() or c in " -_" else "_" for c in title).strip() or "chat"
    return f"{safe}.md"


def engine_detail(engine) -> str:
    """How a loaded model runs, in one line (the chip above the chat, the empty chat's subtitle)."""
    if not engine.is_flash:
        info = engine.engine_info  # a flash folder run dense: FlashConfig.engine says why
        return "dense · all weights in memory" + (f" ({info.reason})" if info else "")
    cfg = engine.config
    pct = f" ({cfg.budget * 100:.0f}% of the FFN)" if cfg and cfg.budget <= 1 else ""
    info = engine.policy_info
    policy = info.name if info is not None else (cfg.policy if cfg else "?")
    if info is not None and info.hot_fraction and policy == "hot+window":
        policy += f" {info.hot_fraction:.0%} hot"
    chooser = engine.mode.split('-', 1)[-1]
    if engine.active_info is not None and engine.active_info.asked == "auto":
        chooser = f"auto → {chooser}"  # measured per model; the reason is in Engine.active_info
    return (f"flash · budget {engine.budget_text}{pct} · {chooser} · "
            f"window {cfg.window if cfg else '?'} · cache {policy}"
            + (" · pipelined" if engine.prefetcher is not None else ""))
