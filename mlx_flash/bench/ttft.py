"""Time to first token per prompt length and configuration (:func:`run_ttft`, :func:`format_ttft`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..config import FlashConfig
from ..progress import ProgressCallback
from ..progress import report as _report
from ..stats import Stats
from .records import (
    _ACTIVE,
    _NEEDS_CALIBRATION,
    AUTO,
    DENSE,
    NAIVE,
    PREDICTOR,
    PathLike,
    canonical_config,
)
from .runners import (
    _free_mlx,
    machine_info,
    reference_text,
)

TTFT_LENGTHS: Tuple[int, ...] = (16, 128, 1024)


"""Prompt lengths (tokens) of the time-to-first-token section (:func:`run_ttft`)."""


TTFT_CONFIGS: Tuple[str, ...] = (DENSE, NAIVE, PREDICTOR, AUTO)


"""Its configurations (the others may be asked for: ``configs``)."""


def ttft_prompt(tokenizer, n: int, text: Optional[str] = None) -> List[int]:
    """A prompt of exactly ``n`` tokens: the first ``n`` tokens of the reference text (repeated
    when it is shorter)."""
    text = text if text is not None else reference_text()
    ids: List[int] = []
    while len(ids) < n:
        ids += list(tokenizer.encode(text, add_special_tokens=False))
    return [int(t) for t in ids[:n]]


def run_ttft(model_path: PathLike, *, lengths: Sequence[int] = TTFT_LENGTHS, configs: Optional[Sequence[str]] = None,
             budget: float = FlashConfig.budget, repeats: int = 3, flash_config: Optional[FlashConfig] = None,
             progress: Optional[ProgressCallback] = None) -> Dict[str, Any]:
    """Time to first token per prompt length and configuration (the speed test's TTFT section).

    Every configuration's engine is loaded once and the runs go round-robin (length by length,
    ``repeats`` rounds, each configuration in turn), so a busy machine slows them alike: compare
    ratios. Each run reads a fresh prompt of the reference text (:func:`ttft_prompt`) into a new
    KV cache and stops at the first token (``Engine.generate_step``); ``Stats.ms_first_token``
    is recorded. One untimed short run per engine first (one-time costs such as the background
    checksum pass). Returns ``{"lengths", "repeats", "budget", "machine", "rows": [{config,
    prompt_tokens, ms_first_token (median), ms_runs, first_token, bytes_read (the whole prompt),
    mode}], "ratios": {"<config> / dense @ n": x}, "skipped": [{name, reason}]}``."""
    from ..engine import load  # noqa: PLC0415 - the engine imports mlx-lm (seconds): not at CLI start

    path = Path(model_path).expanduser()
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"prompt lengths must be at least 1 token, got {lengths}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = [canonical_config(c) for c in (configs or TTFT_CONFIGS)]
    base = flash_config or FlashConfig()
    engines: Dict[str, Any] = {}
    skipped: List[Dict[str, str]] = []
    out: Dict[str, Any] = {"lengths": lengths, "repeats": repeats, "budget": float(budget),
                           "machine": machine_info(), "rows": [], "ratios": {}, "skipped": skipped}
    try:
        for k, name in enumerate(names):
            _report(progress, 0.1 * k / len(names), f"TTFT: loading {name}")
            cfg = replace(base, budget=float(budget), engine="flash", active=_ACTIVE.get(name, "auto"))
            try:
                engines[name] = load(path, cfg, dense=(name == DENSE))
            except Exception as e:
                if name not in _NEEDS_CALIBRATION:
                    raise
                skipped.append({"name": name, "reason": f"{type(e).__name__}: {e}"})
        tok = next(iter(engines.values())).tokenizer
        prompts = {n: ttft_prompt(tok, n) for n in lengths}
        for eng in engines.values():
            next(eng.generate_step(prompts[lengths[0]][:4], 1))  # untimed: one-time costs
        runs: Dict[Tuple[str, int], List[Stats]] = {(name, n): [] for name in engines for n in lengths}
        read: Dict[Tuple[str, int], int] = {}
        first: Dict[Tuple[str, int], int] = {}
        total, done = len(lengths) * repeats * len(engines), 0
        for n in lengths:
            for _ in range(repeats):
                for name, eng in engines.items():
                    before = eng.counters.bytes_read
                    step = next(eng.generate_step(prompts[n], 1))
                    st = step.stats
                    runs[(name, n)].append(st)
                    first[(name, n)] = step.token
                    read[(name, n)] = eng.counters.bytes_read - before
                    done += 1
                    _report(progress, 0.1 + 0.9 * done / total,
                            f"TTFT: {name}, {n} tokens: {st.ms_first_token / 1e3:.2f} s")
        for name, eng in engines.items():
            for n in lengths:
                sts = runs[(name, n)]
                ms = [s.ms_first_token for s in sts]
                out["rows"].append({"config": name, "prompt_tokens": n, "ms_first_token": float(np.median(ms)),
                                    "ms_runs": ms, "first_token": first[(name, n)],
                                    "bytes_read": int(read[(name, n)]), "mode": eng.mode})
    finally:
        for eng in engines.values():
            eng.close()
        engines.clear()
        _free_mlx()
    dense = {r["prompt_tokens"]: r["ms_first_token"] for r in out["rows"] if r["config"] == DENSE}
    for r in out["rows"]:
        d = dense.get(r["prompt_tokens"])
        if r["config"] != DENSE and d:
            out["ratios"][f"{r['config']} / {DENSE} @ {r['prompt_tokens']}"] = r["ms_first_token"] / d
    return out


def format_ttft(res: Dict[str, Any]) -> List[str]:
    """The TTFT section as Markdown lines: one row per configuration, one column per prompt
    length (median seconds, and the ratio to dense)."""
    lengths = res.get("lengths") or []
    rows = res.get("rows") or []
    if not rows:
        return []
    dense = {r["prompt_tokens"]: r["ms_first_token"] for r in rows if r["config"] == DENSE}
    lines = ["", f"### Time to first token (median of {res.get('repeats', 1)} runs, round-robin; budget "
                 f"{res.get('budget', 0):.0%}; prompts: reference text)", "",
             "| configuration | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for name in dict.fromkeys(r["config"] for r in rows):
        cells = []
        for n in lengths:
            r = next((x for x in rows if x["config"] == name and x["prompt_tokens"] == n), None)
            if r is None:
                cells.append("-")
                continue
            cell = f"{r['ms_first_token'] / 1e3:.2f} s"
            if name != DENSE and dense.get(n):
                cell += f" ({r['ms_first_token'] / dense[n]:.2f}x)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for sk in res.get("skipped") or []:
        lines.append(f"- {sk['name']} skipped: {sk['reason']}")
    load = (res.get("machine") or {}).get("load_average")
    if load:
        lines.append(f"- load average at the start: {', '.join(f'{x:.1f}' for x in load)}")
    return lines
