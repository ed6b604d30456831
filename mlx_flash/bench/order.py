"""Neuron order on disk, before/after (:func:`run_order_bench`, :func:`format_order`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ..config import FlashConfig
from ..neuron_cache import ReadModel, resolve_auto_policy
from ..neuron_order import compute_order, hot_order, inverse, replay_reads, source_perms
from ..predictor import has_predictors, load_frequencies
from ..progress import ProgressCallback
from ..progress import report as _report
from ..storage.format import open_flash
from ..traces import Trace, record
from ..units import fmt_bytes as _fb  # the one byte formatter, short for the tables below
from .records import (
    DEFAULT_PROMPT,
    SHAPES,
    PathLike,
    Shape,
    _Record,
)
from .runners import (
    _prompt_for,
)


@dataclass
class OrderRow(_Record):
    """One chooser's reads with the neurons in one order on disk (replayed active sets)."""

    chooser: str
    order: str                      # "source" (as converted) or "hot" (most frequently active first)
    policy: str                     # the cache policy "auto" picks for this order
    model: str                      # "default model" or the shape's name
    tokens: int = 0
    bytes_per_token: float = 0.0
    useful_per_token: float = 0.0
    amplification: float = 0.0
    requests_per_token: float = 0.0
    mean_request_bytes: float = 0.0
    hit_rate: float = 0.0


def _order_rows(chooser: str, model: str, trace, freqs, capacity: int, rm, density, recall) -> List[OrderRow]:
    """Source order vs hot order of one trace (source numbering), each under the policy
    ``neuron_cache.resolve_auto_policy`` picks for that order (as the engine would)."""
    rows = []
    hot = compute_order("hot", n_layers=trace.n_layers, n_neurons=trace.n_neurons, frequencies=freqs)
    for order, perms in (("source", None), ("hot", hot)):
        f_order = freqs if perms is None else np.take_along_axis(freqs, perms, axis=1)
        pol, _ = resolve_auto_policy(f_order, capacity, read_model=rm, density=density, recall=recall)
        fig = replay_reads(trace, capacity, rm, perms=perms, policy=pol, frequencies=freqs)
        name = pol.name + (f" {pol.hot_fraction:.0%}" if pol.name == "hot+window" else "")
        rows.append(OrderRow(chooser=chooser, order=order, policy=name, model=model, tokens=fig.tokens,
                             bytes_per_token=fig.bytes_per_token,
                             useful_per_token=fig.bytes_useful / max(1, fig.tokens),
                             amplification=fig.amplification, requests_per_token=fig.requests_per_token,
                             mean_request_bytes=fig.mean_request_bytes, hit_rate=fig.hit_rate))
    return rows


def _scaled_frequencies(freqs: np.ndarray, trace, scaled) -> np.ndarray:
    """Per-layer frequencies of a ``Trace.scaled`` target: each target neuron has its source neuron's."""
    n, L = trace.n_neurons, scaled.n_layers
    probe = Trace(trace.n_layers, n, [[np.array([j])] * trace.n_layers for j in range(n)])
    m = probe.scaled(scaled.n_neurons, L, seed=scaled.meta.get("scale_seed", 0))
    src = m.meta["source_layers"]
    out = np.zeros((L, scaled.n_neurons))
    for j, tok in enumerate(m.tokens):
        for li in range(L):
            out[li, tok[li]] = freqs[src[li], j]
    return out


def scaled_sources(trace, scaled) -> Tuple[np.ndarray, np.ndarray]:
    """For each target neuron of ``scaled`` (a ``Trace.scaled`` of ``trace``): ``(source, copy)``,
    both ``(layers, n_neurons)``: the source neuron (of layer ``scaled.meta["source_layers"][l]``)
    it stands for, and which of that source neuron's targets it is (0, 1, ... in id order)."""
    n, L = trace.n_neurons, scaled.n_layers
    probe = Trace(trace.n_layers, n, [[np.array([j])] * trace.n_layers for j in range(n)])
    m = probe.scaled(scaled.n_neurons, L, seed=scaled.meta.get("scale_seed", 0))
    src = np.zeros((L, scaled.n_neurons), dtype=np.int64)
    copy = np.zeros((L, scaled.n_neurons), dtype=np.int64)
    for j, tok in enumerate(m.tokens):
        for li in range(L):
            src[li, tok[li]] = j
            copy[li, tok[li]] = np.arange(len(tok[li]))
    return src, copy


def shape_hot_order(trace, scaled, freqs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(perms, frequencies)``: the hot order (:func:`mlx_flash.neuron_order.hot_order`, what
    calibration writes) of a shape replay's target neurons, from the source model's calibrated
    ``freqs`` ((source layers, n), ``trace``'s numbering), and the targets' frequencies in that
    disk order. A target has its source neuron's frequency, so the copies of one source neuron
    tie; ordered by frequency alone they would sit side by side and, always active together, be
    read as one long run, which no real model gives. So the targets are laid out in bands: band
    ``c`` holds every source neuron's ``c``-th copy, each band in the source's hot order (position
    ``p`` of a band: the source neuron of hot rank ``p``): neighbours on disk are different source
    neurons of about the same frequency, as in a real model's hot order."""
    src, copy = scaled_sources(trace, scaled)
    layers = scaled.meta["source_layers"]
    L, N = src.shape
    perms = np.zeros((L, N), dtype=np.int64)
    out = np.zeros((L, N))
    for li in range(L):
        f = np.asarray(freqs[layers[li]], dtype=np.float64)
        rank = inverse(hot_order(f)[None, :])[0]  # source neuron -> its hot rank
        perms[li] = np.lexsort((rank[src[li]], copy[li]))  # by band, then by hot rank inside the band
        out[li] = f[src[li]][perms[li]]
    return perms, out


def run_order_bench(model_path: PathLike, *, budget: float = FlashConfig.budget, tokens: int = 32, prompt: Any = None,
                    flash_config: Optional[FlashConfig] = None, shape: Optional[Union[str, Shape]] = "7b",
                    shape_layers: int = 8, progress: Optional[ProgressCallback] = None) -> Dict[str, Any]:
    """Neuron order on disk, before/after: the oracle's and the predictor's active sets of
    ``tokens`` generated tokens (recorded on the real model, :mod:`mlx_flash.traces`) replayed
    through a real ``LayerCache`` per layer at the engine's capacity for ``budget``, with the
    reader's coalescing (:func:`mlx_flash.neuron_order.replay_reads`), once with the neurons
    in the source's order and once most frequently active first (the calibrated frequencies),
    each under the cache policy "auto" picks for that order. With ``shape``: the oracle's
    trace scaled to that FFN shape (``shape_layers`` layers; random placement = the source
    order), the same two orders. Returns ``{"rows": [...], "notes": [...], ...}``."""
    from ..engine import _chooser_density, load  # noqa: PLC0415 - the engine imports mlx-lm (seconds): not at CLI start

    path = Path(model_path).expanduser()
    files = open_flash(path)
    m = files.manifest
    if not has_predictors(files) or load_frequencies(files) is None:
        raise ValueError(f"{path}: the neuron-order bench needs calibrated frequencies: run `mlx-flash calibrate`")
    P = source_perms(m)  # position -> source id
    inv = inverse(P)
    freqs = np.take_along_axis(load_frequencies(files), inv, axis=1)  # in the source's numbering
    base = flash_config or FlashConfig()
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    rows: List[OrderRow] = []
    notes = [f"neurons on disk now: {(m.neuron_order or {}).get('method', 'source')} order"]
    oracle_trace = None
    for k, chooser in enumerate(("oracle", "predictor")):
        _report(progress, k / 3, f"neuron order: recording the {chooser}'s active sets")
        cfg = FlashConfig(**{**asdict(base), "engine": "flash", "active": chooser, "budget": budget})
        eng = load(path, cfg)
        try:
            tr = record(eng, _prompt_for(eng, prompt), tokens)
            capacity = eng.cache.layers[0].capacity
            rm = ReadModel.of_reader(eng.reader, eng.cache.scratch_neurons)
            density, recall = _chooser_density(eng.chooser)
        finally:
            eng.close()
        src = Trace(tr.n_layers, tr.n_neurons,
                    [[np.sort(P[li][ids]) for li, ids in enumerate(tok)] for tok in tr.tokens], dict(tr.meta))
        if chooser == "oracle":
            oracle_trace = (src, rm)
        rows += _order_rows(chooser, "default model", src, freqs, capacity, rm, density, recall)
    if shape and oracle_trace is not None:
        _report(progress, 2 / 3, f"neuron order: the {shape} shape")
        sp = SHAPES[shape] if isinstance(shape, str) else shape
        src, rm = oracle_trace
        big = src.scaled(sp.ffn, shape_layers)
        bb = sp.bundle_bytes
        cap = int((budget * shape_layers * sp.ffn * bb - rm.scratch_neurons * bb) // shape_layers // bb)
        srm = ReadModel(bb, rm.alignment, rm.max_gap_bytes, rm.chunk_bytes, rm.scratch_neurons)
        rows += _order_rows("oracle", f"{sp.name} shape", big, _scaled_frequencies(freqs, src, big), cap, srm,
                            None, 1.0)
        notes.append(f"{sp.name} shape: the oracle's sets scaled to {sp.ffn} neurons x {shape_layers} layers "
                     f"(each source neuron = {sp.ffn / src.n_neurons:.1f} neurons at random places: the 'source' "
                     "order); simulated reads, no disk")
    _report(progress, 1.0, "neuron order: done")
    return {"model": str(path), "budget": budget, "tokens": tokens, "rows": [r.to_dict() for r in rows],
            "notes": notes}


def format_order(rep: Dict[str, Any]) -> List[str]:
    """The neuron-order comparison as Markdown lines."""
    lines = [f"Neuron order: before/after ({rep['budget']:.0%} budget, {rep['tokens']} tokens replayed per chooser; "
             "per token):",
             "| model | chooser | order | cache policy (auto) | read | useful | read / useful | requests | "
             "mean request | hit rate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d in rep["rows"]:
        r = OrderRow.from_dict(d)
        lines.append(f"| {r.model} | {r.chooser} | {r.order} | {r.policy} | {_fb(r.bytes_per_token)} | "
                     f"{_fb(r.useful_per_token)} | {r.amplification:.2f} | {r.requests_per_token:.0f} | "
                     f"{_fb(r.mean_request_bytes)} | {r.hit_rate:.0%} |")
    lines += [f"- {n}" for n in rep["notes"]]
    return lines
