"""The quantized folder's sections: bytes per token replayed on the bfloat16 layout of the same neuron
choice (:func:`replay_reads`) and greedy agreement with dense over the prompt set (:func:`run_agreement`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..calibrate import read_prompts
from ..config import FlashConfig
from ..neuron_cache import ReadModel, cache_rows, simulate
from ..paths import resources_dir
from ..predictor import load_frequencies
from ..progress import ProgressCallback
from ..progress import report as _report
from ..storage.format import ALIGNMENT, float_bundle_bytes, group_quant_bytes
from ..storage.probe import DEFAULT_GAP
from ..units import fmt_bytes as _fb  # the one byte formatter, short for the tables below
from .records import (
    _ACTIVE,
    _DENSE_ROWS,
    DENSE,
    DENSE_BF16,
    REAL,
    BenchReport,
    BenchRow,
)
from .runners import (
    _free_mlx,
    _prompt_for,
)

AGREEMENT_PROMPTS_FILE = "evaluation/prompts.txt"


"""The project's prompt set for greedy agreement (resources/; none of them is a calibration prompt)."""


def agreement_prompt_set() -> List[str]:
    """The project's evaluation prompts (``resources/evaluation/prompts.txt``, one per line)."""
    return read_prompts(resources_dir() / AGREEMENT_PROMPTS_FILE)


def replay_reads(row: BenchRow, trace, files, cfg: FlashConfig) -> None:
    """Bytes per token of the row's own neuron choice on this quantized folder and on the
    bfloat16 layout of the same model: the recorded per-token active sets (``traces``) replayed
    through a real ``LayerCache`` with the reader's coalescing (``neuron_cache.simulate``), each
    cache sized from the same budget fraction (bfloat16: of the bfloat16 FFN). Fills
    ``row.sim_bytes_read_per_token`` (to check the replay against the measured figure) and
    ``row.bf16_bytes_read_per_token``. The row's cache policy (pinned hot neurons: the calibrated
    frequencies; read once at load, not per token). Gate-first rows (cache rows without the gate
    part) are left out."""
    m = files.manifest
    pol = str((row.policy or {}).get("name", "lru"))
    hot = float((row.policy or {}).get("hot_fraction") or 0.0)
    if (row.active or {}).get("name") == "gate" or len(trace) < 2:
        return
    freqs = load_frequencies(files) if hot > 0 else None
    if hot > 0 and freqs is None:
        return
    L, n = m.num_layers, m.intermediate_size
    warm = min(len(trace) - 1, max(1, row.warmup_tokens))
    out = []
    # the exact down layout's resident group scales are part of this folder's FFN and of its budget
    for bb, resident in ((m.bundle_bytes, group_quant_bytes(m)), (float_bundle_bytes(m, "bfloat16"), 0)):
        total = L * n * bb + resident
        cap, scratch = cache_rows(cfg.budget_bytes(total), row.predictor_bytes + resident, bb, L, n,
                                  cfg.scratch_neurons)
        gap = row.max_gap_bytes if row.max_gap_bytes is not None else (cfg.max_gap_bytes or DEFAULT_GAP)
        rm = ReadModel(bb, row.read_alignment or ALIGNMENT, gap, row.chunk_bytes or (1 << 20), max(1, scratch))
        per = [simulate([tok[i] for tok in trace.tokens], n, cap, pol, cfg.window,
                        frequencies=None if freqs is None else freqs[i], hot_fraction=hot if hot > 0 else None,
                        warmup=warm, read_model=rm) for i in range(L)]
        out.append(sum(st.bytes_read for st in per) / max(1, per[0].steps))
    row.sim_bytes_read_per_token, row.bf16_bytes_read_per_token = out


def _greedy(engine, prompt: str, tokens: int) -> List[int]:
    p = _prompt_for(engine, [{"role": "user", "content": prompt}])
    return [r.token for r in engine.stream_generate(p, tokens, temperature=0.0)]


def run_agreement(rep: BenchReport, path: Path, cfg_main: FlashConfig, n_prompts: int, tokens: int,
                  progress: Optional[ProgressCallback] = None) -> None:
    """Greedy agreement with dense over the project's prompt set: the first ``n_prompts``
    prompts of :func:`agreement_prompt_set` (chat template), ``tokens`` greedy tokens each
    (end-of-sequence ignored), through dense and through each measured row (pipelined twins
    are left out: their tokens equal their serial rows', checked by ``same_as_serial``);
    fills ``row.agreement`` with the tokens generated before the first divergence, per
    prompt and averaged."""
    from ..engine import load  # noqa: PLC0415 - the engine imports mlx-lm (seconds): not at CLI start

    prompts = agreement_prompt_set()
    if n_prompts > len(prompts):
        raise ValueError(f"agreement: {n_prompts} prompts asked, the prompt set has {len(prompts)}")
    prompts = prompts[:n_prompts]
    rep.agreement_prompts, rep.agreement_tokens = len(prompts), int(tokens)
    rows = [r for r in rep.rows if r.source == REAL and " (" not in r.name]
    rows.sort(key=lambda r: r.name != DENSE)  # dense first: the reference
    if not rows or rows[0].name != DENSE:
        rep.notes.append("greedy agreement skipped: no dense row to compare with")
        return
    ref: List[List[int]] = []
    for k, row in enumerate(rows):
        cfg = replace(cfg_main, active=_ACTIVE.get(row.name, "oracle"))
        engine = load(path, cfg, dense=row.name in _DENSE_ROWS,
                      dense_dtype="bfloat16" if row.name == DENSE_BF16 else None)
        try:
            engine.tokenizer.eos_token_ids = []
            per = []
            for j, pr in enumerate(prompts):
                toks = _greedy(engine, pr, tokens)
                if row.name == DENSE:
                    ref.append(toks)
                same = 0
                while same < min(len(toks), len(ref[j])) and toks[same] == ref[j][same]:
                    same += 1
                per.append(same)
                _report(progress, (k + (j + 1) / len(prompts)) / len(rows),
                        f"agreement: {row.name}, prompt {j + 1}/{len(prompts)}")
        finally:
            engine.close()
            del engine
            _free_mlx()
        row.agreement = {"prompts": len(prompts), "tokens": int(tokens), "per_prompt": per,
                         "mean": float(np.mean(per)), "identical": int(sum(v == tokens for v in per))}


def format_quantized(r: BenchReport) -> List[str]:
    """The quantized folder's extra sections: bytes per token against the bfloat16 layout of the
    same neuron choice, and greedy agreement with dense over the prompt set."""
    lines: List[str] = []
    replayed = [row for row in r.rows if row.bf16_bytes_read_per_token]
    if replayed:
        lines += ["", "Bytes read per token, this folder vs the bfloat16 layout of the same model (each row's recorded "
                      "active sets replayed through a real LayerCache with the reader's coalescing, same budget "
                      "fraction; 'measured' is the run itself):",
                  "| configuration | measured | replayed, this folder | replayed, bfloat16 | this / bfloat16 |",
                  "|---|---|---|---|---|"]
        for row in replayed:
            assert row.sim_bytes_read_per_token is not None and row.bf16_bytes_read_per_token  # replay_reads sets both
            lines.append(f"| {row.name} | {_fb(row.bytes_read_per_token)} | {_fb(row.sim_bytes_read_per_token)} | "
                         f"{_fb(row.bf16_bytes_read_per_token)} | "
                         f"{row.sim_bytes_read_per_token / row.bf16_bytes_read_per_token:.2f}x |")
    agreed = [row for row in r.rows if row.agreement]
    if agreed:
        lines += ["", f"Greedy agreement with dense over {r.agreement_prompts} prompts "
                      f"(resources/{AGREEMENT_PROMPTS_FILE}), {r.agreement_tokens} tokens each: tokens generated "
                      "before the first divergence",
                  "| configuration | mean | prompts identical throughout | per prompt |", "|---|---|---|---|"]
        for row in agreed:
            a: Dict[str, Any] = row.agreement or {}  # not empty: `agreed`
            lines.append(f"| {row.name} | {a['mean']:.1f} / {a['tokens']} | {a['identical']} / {a['prompts']} | "
                         + " ".join(str(v) for v in a["per_prompt"]) + " |")
    return lines
