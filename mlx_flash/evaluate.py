"""Quality of the active-neuron choice on real text: dense vs oracle vs predictor.

``evaluate(flash_dir)`` (and ``mlx-flash eval``) runs a text that is not the
calibration text (KJV Genesis from :mod:`mlx_flash.corpus` by default) through
the model in independent chunks (teacher forcing) three ways:

- **dense**: every neuron;
- **oracle**: a neuron is used when ``|act(gate x) * (up x)|`` passes its layer's
  calibrated threshold (the sparsity rule itself; needs the full weights);
- **predictor**: the neurons the low-rank predictors choose (what the flash
  engine loads), computed exactly.

and reports for each: perplexity, mean fraction of FFN neurons used per token,
the predictor's recall and precision against the oracle (on the same layer
inputs), and the sliding-window reuse for k = 1…8: the fraction of a token's
active neurons already active in one of the previous k tokens (``reuse``), the
fraction of the FFN a token must newly load with a k-token window (``new``), and
the window's size (``window``: neurons active in the token or the k before it).

The FFN is computed with masks on the dense weights (float32 by default): the
same arithmetic as the flash engine's ``SparseFFN`` for the same choice, without
the I/O, so it is fast and deterministic.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np
from mlx_lm.utils import load_tokenizer

from .active import activation
from .calibrate import install_hooks, load_dense_model, model_activation
from .config import FlashConfig
from .corpus import kjv_text
from .dense_model import float32_gates
from .gate_first import GATE_SEGMENTS, gate_info, pick_thresholds
from .predictor import PredictorError, load_gate_scales, load_predictor_chooser, predictor_info
from .progress import ProgressCallback, report, scaled
from .storage.format import bundle_segments, open_flash

DEFAULT_TOKENS = 4096
DEFAULT_CHUNK = 512
DEFAULT_TEXT = "Genesis 1:1-50:26"
MAX_WINDOW = 8

Selector = Callable[[int, mx.array, mx.array], mx.array]
"""``select(layer, x, h) -> mask``: the (…, n) bool mask of neurons used (x: FFN input, h: gated activation)."""


@dataclass
class ModeResult:
    name: str
    perplexity: float
    active_fraction: float                      # mean fraction of FFN neurons used per token
    recall: Optional[float] = None              # vs the oracle on the same inputs (predictor only)
    precision: Optional[float] = None
    oracle_fraction: Optional[float] = None     # the oracle's active fraction on the same inputs
    reuse: List[float] = field(default_factory=list)   # k = 1..8
    new: List[float] = field(default_factory=list)
    window: List[float] = field(default_factory=list)
    per_layer_active: List[float] = field(default_factory=list)
    per_layer_recall: List[float] = field(default_factory=list)
    per_layer_precision: List[float] = field(default_factory=list)  # vs the oracle (modes with recall)
    seconds: float = 0.0
    bytes_per_token: Optional[float] = None     # FFN bytes the chosen neurons need per token (no cache)
    tokens_per_s: Optional[float] = None        # of this evaluation pass (dense weights, masks: not flash speed)
    sparsity: Optional[float] = None            # gate-first: the calibrated sparsity used


@dataclass
class EvalReport:
    model: str
    text: str
    tokens: int
    chunk: int
    dtype: str
    sparsity: Optional[float]
    recall_target: Optional[float]
    rank: Optional[int]
    modes: Dict[str, ModeResult]
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        dense = self.modes.get("dense")
        if dense is not None:
            for mres in d["modes"].values():
                mres["perplexity_vs_dense"] = mres["perplexity"] / dense.perplexity - 1.0
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self) -> str:
        dense = self.modes.get("dense")
        lines = [f"{self.model}: {self.tokens} tokens of {self.text} (chunks of {self.chunk}, {self.dtype})"]
        bits = []
        if self.sparsity is not None:
            bits.append(f"calibrated sparsity {self.sparsity:.0%}")
        if self.rank is not None:
            bits.append(f"predictor rank {self.rank}")
        if self.recall_target is not None:
            bits.append(f"recall target {self.recall_target}")
        if bits:
            lines.append(", ".join(bits))
        lines.append("")
        lines.append(f"{'mode':10s} {'perplexity':>10s} {'vs dense':>9s} {'active':>7s} {'recall':>7s}"
                     f" {'precision':>9s} {'MB/token':>9s} {'tok/s':>6s}")
        for name, r in self.modes.items():
            rel = f"{r.perplexity / dense.perplexity - 1:+.1%}" if dense is not None else "-"
            rec = f"{r.recall:.3f}" if r.recall is not None else "-"
            pre = f"{r.precision:.3f}" if r.precision is not None else "-"
            mb = f"{r.bytes_per_token / 1e6:.1f}" if r.bytes_per_token is not None else "-"
            tps = f"{r.tokens_per_s:.0f}" if r.tokens_per_s is not None else "-"
            lines.append(f"{name:10s} {r.perplexity:10.3f} {rel:>9s} {r.active_fraction:7.1%} {rec:>7s} {pre:>9s}"
                         f" {mb:>9s} {tps:>6s}")
        lines.append("MB/token: FFN bytes the chosen neurons need per token without a cache (gate-first: up/down "
                     "only, its gate rows are resident); tok/s: this teacher-forced pass, not flash speed")
        sparse = [(n, r) for n, r in self.modes.items() if r.reuse]
        if sparse:
            ks = len(sparse[0][1].reuse)
            lines.append("")
            lines.append("sliding window k:      " + " ".join(f"{k:>6d}" for k in range(1, ks + 1)))
            for name, r in sparse:
                lines.append(f"{name:10s} reuse      " + " ".join(f"{v:6.1%}" for v in r.reuse))
                lines.append(f"{'':10s} new/token  " + " ".join(f"{v:6.1%}" for v in r.new))
                lines.append(f"{'':10s} window     " + " ".join(f"{v:6.1%}" for v in r.window))
        lines.extend(self.per_layer_lines())
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def per_layer_lines(self) -> List[str]:
        """Per layer, for each mode measured against the oracle: recall / precision / active share."""
        ranked = [(n, r) for n, r in self.modes.items() if r.per_layer_recall]
        if not ranked:
            return []
        out = ["", "per layer, vs the oracle: recall / precision / active (" + ", ".join(n for n, _ in ranked) + ")"]
        for i in range(len(ranked[0][1].per_layer_recall)):
            cells = [f"{r.per_layer_recall[i]:.3f} / {r.per_layer_precision[i]:.3f} / {r.per_layer_active[i]:6.1%}"
                     for _, r in ranked]
            out.append(f"  layer {i:2d}: " + "   ".join(cells))
        return out


class _Accumulator:
    """Sums of one mode's per-layer masks over all chunks."""

    def __init__(self, n_layers: int, n: int, windows: int):
        self.n_layers, self.n, self.K = n_layers, n, windows
        self.active = np.zeros(n_layers)
        self.tokens = 0
        self.tp = np.zeros(n_layers)
        self.fp = np.zeros(n_layers)
        self.fn = np.zeros(n_layers)
        self.oracle = np.zeros(n_layers)
        self.reuse_hit = np.zeros(windows)
        self.reuse_tot = 0.0
        self.window_tot = np.zeros(windows)
        self.win_tokens = 0

    def add(self, layer: int, m: np.ndarray, oracle: Optional[np.ndarray]) -> None:
        # m: (T, n) bool of this chunk
        self.active[layer] += m.sum()
        if layer == 0:
            self.tokens += m.shape[0]
        if oracle is not None:
            self.tp[layer] += (m & oracle).sum()
            self.fp[layer] += (m & ~oracle).sum()
            self.fn[layer] += (~m & oracle).sum()
            self.oracle[layer] += oracle.sum()
        T, K = m.shape[0], self.K
        if T <= K:
            return
        cur = m[K:]
        union = np.zeros_like(cur)
        self.reuse_tot += cur.sum()
        if layer == 0:
            self.win_tokens += cur.shape[0]
        for k in range(1, K + 1):
            union |= m[K - k : T - k]
            self.reuse_hit[k - 1] += (cur & union).sum()
            self.window_tot[k - 1] += (cur | union).sum()

    def result(self, name: str, ppl: float, seconds: float, with_recall: bool) -> ModeResult:
        cells = max(1, self.tokens * self.n)
        r = ModeResult(name=name, perplexity=ppl, active_fraction=float(self.active.sum() / (cells * self.n_layers)),
                       per_layer_active=[float(a / cells) for a in self.active], seconds=seconds)
        if with_recall:
            tp, fp, fn = self.tp.sum(), self.fp.sum(), self.fn.sum()
            r.recall = float(tp / max(1, tp + fn))
            r.precision = float(tp / max(1, tp + fp))
            r.oracle_fraction = float(self.oracle.sum() / (cells * self.n_layers))
            r.per_layer_recall = [float(a / max(1, a + c)) for a, c in zip(self.tp, self.fn)]
            r.per_layer_precision = [float(a / max(1, a + c)) for a, c in zip(self.tp, self.fp)]
        if self.reuse_tot > 0:
            hit = self.reuse_hit / self.reuse_tot
            wcells = max(1, self.win_tokens * self.n * self.n_layers)
            r.reuse = [float(v) for v in hit]
            r.new = [float((self.reuse_tot - h) / wcells) for h in self.reuse_hit]
            r.window = [float(v / wcells) for v in self.window_tot]
        return r


def run_mode(model, chunks: Sequence[np.ndarray], n_layers: int, n: int, *, name: str,
             select: Optional[Selector] = None, oracle: Optional[Selector] = None, act="silu",
             windows: int = MAX_WINDOW, progress: Optional[ProgressCallback] = None) -> ModeResult:
    """Perplexity and mask statistics of ``model`` on token ``chunks`` with the FFN
    restricted to ``select``'s neurons (None: dense). ``oracle`` (with ``select``)
    gives recall/precision."""
    acc = _Accumulator(n_layers, n, windows)
    pending: Dict[int, tuple] = {}

    def hook(layer: int, x: mx.array, h: mx.array) -> mx.array:
        if select is None:
            return h
        m = select(layer, x, h)
        o = oracle(layer, x, h) if oracle is not None else None
        pending[layer] = (m, o)
        return h * m.astype(h.dtype)

    install_hooks(model, act, hook)
    t0 = time.perf_counter()
    nll, count = 0.0, 0
    for ci, seg in enumerate(chunks):
        x = mx.array(seg[:-1])[None]
        logits = model(x).astype(mx.float32)[0]
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        loss = -mx.take_along_axis(lp, mx.array(seg[1:])[:, None], axis=-1).sum()
        mx.eval(loss, [a for pair in pending.values() for a in pair if a is not None])
        nll += float(loss.item())
        count += len(seg) - 1
        for layer, (m, o) in sorted(pending.items()):
            acc.add(layer, np.array(m).reshape(-1, n), None if o is None else np.array(o).reshape(-1, n))
        pending.clear()
        report(progress, (ci + 1) / len(chunks), f"{name}: chunk {ci + 1}/{len(chunks)}")
    ppl = float(math.exp(nll / max(1, count)))
    res = acc.result(name, ppl, time.perf_counter() - t0, oracle is not None)
    if select is None:  # dense: every neuron
        res.active_fraction, res.per_layer_active = 1.0, [1.0] * n_layers
    return res


def threshold_selector(thresholds: Sequence[float]) -> Selector:
    thr = [mx.array(float(t), dtype=mx.float32) for t in thresholds]

    def select(layer: int, x: mx.array, h: mx.array) -> mx.array:
        return mx.abs(h).astype(mx.float32) > thr[layer]

    return select


def gate_selector(gates: Sequence[tuple], thresholds: Sequence[float], act, scales=None) -> Selector:
    """The gate-first rule (``gate_first.GateFirst``): ``|act(x gate^T + gate_bias)| * scale > threshold``;
    ``gates`` per layer ``(gate (n, hidden), gate_bias (n,) or None)`` float32; ``scales``
    (layers, n) per-neuron scales or None (1)."""
    name, param = (act, None) if isinstance(act, str) else act
    f = activation(name, param)
    thr = [mx.array(float(t), dtype=mx.float32) for t in thresholds]
    sc = None if scales is None else [mx.array(np.asarray(v, dtype=np.float32)) for v in scales]

    def select(layer: int, x: mx.array, h: mx.array) -> mx.array:
        w, b = gates[layer]
        g = x.astype(mx.float32) @ w.T
        if b is not None:
            g = g + b
        s = mx.abs(f(g))
        return (s if sc is None else s * sc[layer]) > thr[layer]

    return select


def predictor_selector(chooser) -> Selector:
    def select(layer: int, x: mx.array, h: mx.array) -> mx.array:
        return chooser.predict(layer, x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)

    return select


def text_chunks(tokenizer, text: str, tokens: int, chunk: int) -> List[np.ndarray]:
    """The first ``tokens + 1`` tokens of ``text`` as teacher-forcing chunks of ``chunk`` (+1) tokens."""
    ids: List[int] = []
    size = max(4096, 8 * (tokens + 1))  # encode a prefix (a whole book is slow and makes tokenizers warn)
    while True:
        ids = list(tokenizer.encode(text[:size], add_special_tokens=False))
        if len(ids) > tokens + 16 or size >= len(text):  # the last word of a prefix may split differently
            break
        size *= 2
    arr = np.asarray(ids, dtype=np.int64)[: tokens + 1]
    out = []
    for s in range(0, len(arr) - 1, chunk):
        seg = arr[s : s + chunk + 1]
        if len(seg) >= 2:
            out.append(seg)
    return out


def evaluate(
    flash_dir: Union[str, Path],
    *,
    text: Optional[Union[str, Path]] = None,
    tokens: int = DEFAULT_TOKENS,
    chunk: int = DEFAULT_CHUNK,
    dtype: Optional[str] = "float32",
    recall: Optional[float] = None,
    modes: Sequence[str] = ("dense", "oracle", "predictor", "gate"),
    windows: int = MAX_WINDOW,
    progress: Optional[ProgressCallback] = None,
) -> EvalReport:
    """Evaluate dense / oracle / predictor / gate on ``text`` (a file; default KJV Genesis).

    The oracle, predictor and gate-first modes need calibration (``mlx-flash calibrate``);
    without it only dense is run and a note says so. ``recall`` picks a calibrated recall
    target; ``gate`` is gate-first at the calibrated sparsity, ``gate:0.3`` at another
    calibrated one. Each mode's ``bytes_per_token`` is what its active neurons need from
    the FFN per token (no cache): whole bundles, or up/down only for gate-first.
    """

    root = Path(flash_dir).expanduser()
    files = open_flash(root)
    m = files.manifest
    act = model_activation(m.model_args)  # (name, param)
    if text is None:
        body, source = kjv_text(DEFAULT_TEXT), f"KJV {DEFAULT_TEXT}"
    else:
        body, source = Path(text).expanduser().read_text(encoding="utf-8"), str(text)
    tokenizer = load_tokenizer(root, eos_token_ids=m.model_args.get("eos_token_id"))
    chunks = text_chunks(tokenizer, body, tokens, chunk)
    if not chunks:
        raise ValueError(f"{source}: no tokens to evaluate")
    n_tok = int(sum(len(c) - 1 for c in chunks))
    info = predictor_info(m)
    notes: List[str] = []
    chooser = None
    wanted = list(modes)
    if info is None or "thresholds" not in info:
        notes.append("no calibration in this model (run `mlx-flash calibrate`): oracle and predictor skipped")
        wanted = [w for w in wanted if w == "dense"]
    elif "predictor" in wanted:
        try:
            chooser = load_predictor_chooser(files, FlashConfig(extra={"recall": recall} if recall else {}))
        except PredictorError as e:
            notes.append(f"predictor skipped: {e}")
            wanted.remove("predictor")
    report(progress, 0.0, "loading the model")
    model = load_dense_model(files, dtype)
    results: Dict[str, ModeResult] = {}
    thr_sel = threshold_selector(info["thresholds"]) if info else None

    grec = gate_info(m)
    gate_modes = [w for w in wanted if w.split(":")[0] == "gate"]
    if gate_modes and grec is None:
        notes.append("gate-first skipped: this calibration measured no gate thresholds (calibrate again)")
        wanted = [w for w in wanted if w not in gate_modes]
        gate_modes = []
    gates: List[Tuple[mx.array, Optional[mx.array]]] = []
    scales = None
    if gate_modes and grec is not None:  # (gate modes are dropped above without a gate record)
        if grec.get("criterion") == "scaled":
            scales = load_gate_scales(files)
        gates = float32_gates(files)
    ud_bytes = m.bundle_bytes - sum(b - a for n_, a, b, _ in bundle_segments(m) if n_ in GATE_SEGMENTS)
    for i, mode in enumerate(wanted):
        sub = scaled(progress, i / len(wanted), (i + 1) / len(wanted))
        if mode == "dense":
            results[mode] = run_mode(model, chunks, m.num_layers, m.intermediate_size, name=mode, act=act,
                                     windows=windows, progress=sub)
        elif mode == "oracle":
            results[mode] = run_mode(model, chunks, m.num_layers, m.intermediate_size, name=mode, act=act,
                                     select=thr_sel, windows=windows, progress=sub)
        elif mode == "predictor":
            results[mode] = run_mode(model, chunks, m.num_layers, m.intermediate_size, name=mode, act=act,
                                     select=predictor_selector(chooser), oracle=thr_sel, windows=windows,
                                     progress=sub)
        elif mode.split(":")[0] == "gate":
            sp = float(mode.split(":")[1]) if ":" in mode else None
            assert grec is not None  # gate modes are dropped above without a gate record
            thr, sp = pick_thresholds(grec, sp)
            results[mode] = run_mode(model, chunks, m.num_layers, m.intermediate_size, name=mode, act=act,
                                     select=gate_selector(gates, thr, act, scales), oracle=thr_sel, windows=windows,
                                     progress=sub)
            results[mode].sparsity = sp
        else:
            raise ValueError(f"unknown mode {mode!r}; choose from dense, oracle, predictor, gate, gate:SPARSITY")
        r = results[mode]
        per = ud_bytes if mode.split(":")[0] == "gate" else m.bundle_bytes
        r.bytes_per_token = r.active_fraction * m.intermediate_size * m.num_layers * per
        r.tokens_per_s = n_tok / r.seconds if r.seconds > 0 else None
    report(progress, 1.0, "done")
    return EvalReport(
        model=root.name, text=source, tokens=n_tok, chunk=chunk, dtype=dtype or m.dtype,
        sparsity=info.get("sparsity") if info else None,
        recall_target=chooser.recall if chooser is not None else None,
        rank=info.get("rank") if info else None, modes=results, notes=notes)


__all__ = ["EvalReport", "ModeResult", "evaluate", "gate_selector", "predictor_selector", "run_mode", "text_chunks",
           "threshold_selector"]
