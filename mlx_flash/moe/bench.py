"""The MoE-shape replay (``mlx-flash bench --shape moe``): expert streaming at a large model's shape.

A random-weight MoE flash folder with the experts of a large model (default the Qwen3-30B-A3B
shape: 128 experts of FFN 768 over hidden 2048, top-8, 4-bit group 64 with bfloat16 scales; 48
layers in the real model) is written once, with as many layers as fit ``gib`` GiB of
``experts.bin`` (the 7B-shape replay's size knob). Each replayed token drives every layer's real
:class:`~mlx_flash.moe.switch.FlashSwitchGLU` (expert cache + ``FlashReader`` with direct I/O +
``gather_qmm`` on the cache rows) with a random hidden state and the routing of a trace:

* ``tiny-real``: the routing of mlx-lm's own Qwen3-MoE class at tiny width (hidden 64) but with the
  shape's 128 experts and top-8, random weights (routers drawn 3x wider than 1/sqrt(fan-in), so
  routing is not near-uniform), reading ``resources/reference.txt`` (byte tokens).
  Real class and real text, but random weights: its skew and reuse are not a trained model's.
* ``synthetic``: per layer a Zipf popularity over experts (exponent ``zipf``; 0 = uniform) under a
  random permutation, and per token each of the previous token's experts kept with probability
  ``repeat``, the rest drawn by popularity without replacement.

Per trace the first ``calib`` tokens only give the expert frequencies (what ``hot`` pins), the
next ``warmup`` tokens warm the cache unmeasured, then ``tokens`` are measured. Rows:

* ``dense``: all experts in memory. Not run (the full shape's experts do not fit this machine):
  computed: no reads; time = the flash rows' measured compute time per layer.
* ``naive``: every routed expert read every token (the cache is emptied before each token).
* ``flash lru`` / ``flash hot``: the expert cache at budgets holding a share of the experts
  (``hot``: pins each layer's most frequent experts, leaving top-k rows free; the rest LRU).

Figures per token are for the replayed layers and scaled to the shape's full depth (x
``shape.layers / replayed layers``): bytes read per token, ms per token, tokens/s of the experts
alone (attention, router and the rest of the model are not in the replay).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlx_lm.models.switch_layers import SwitchGLU

from ..atomic import atomic_write_text
from ..config import FlashConfig
from ..engine import reader_max_gap
from ..neuron_cache import CachePolicy, LayerCache, hot_ids
from ..paths import data_dir, resources_dir
from ..progress import ProgressCallback, report
from ..stats import FFNCounters
from ..storage.format import FlashFormatError
from ..storage.platform_io import drop_page_cache
from ..storage.probe import load_cached_choice
from ..storage.reader import FlashReader
from .engine import expert_compute_dtype
from .format import MoeFiles, open_moe_flash, write_moe_flash
from .switch import FlashSwitchGLU, replace_module, switch_modules
from .tiny import random_moe_model, tiny_moe_config


@dataclass(frozen=True)
class MoeShape:
    """The experts of a large MoE model (random weights)."""

    name: str = "qwen3-30b-a3b"
    layers: int = 48
    experts: int = 128
    top_k: int = 8
    hidden: int = 2048
    expert_ffn: int = 768
    bits: int = 4
    group_size: int = 64

    @property
    def expert_bytes(self) -> int:
        """One expert's bytes: 3 projections of ``hidden x expert_ffn`` packed, bfloat16 scales and biases."""
        n = self.hidden * self.expert_ffn
        return 3 * (n * self.bits // 8 + 2 * 2 * n // self.group_size)

    @property
    def layer_bytes(self) -> int:
        return self.experts * -(-self.expert_bytes // 4096) * 4096

    def layers_for(self, gib: float) -> int:
        return max(1, min(self.layers, int(gib * 2**30 // self.layer_bytes)))


MOE_SHAPES = {"moe": MoeShape()}
DEFAULT_BUDGETS = (0.10, 0.25, 0.50)
DEFAULT_SYNTHETIC = ((1.0, 0.3), (0.0, 0.0))
"""(Zipf exponent, per-token repeat probability) of the synthetic traces."""


def _config(sp: MoeShape, layers: int) -> Dict[str, Any]:
    return {"model_type": "qwen3_moe", "hidden_size": sp.hidden, "num_hidden_layers": layers,
            "intermediate_size": 4 * sp.expert_ffn, "num_attention_heads": max(1, sp.hidden // 128),
            "num_key_value_heads": max(1, sp.hidden // 512), "head_dim": 128, "num_experts": sp.experts,
            "num_experts_per_tok": sp.top_k, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "moe_intermediate_size": sp.expert_ffn, "rms_norm_eps": 1e-6, "vocab_size": 32, "rope_theta": 1e6,
            "tie_word_embeddings": True, "max_position_embeddings": 4096, "norm_topk_prob": True,
            "quantization": {"group_size": sp.group_size, "bits": sp.bits, "mode": "affine"},
            "mlx_flash_bench_shape": sp.name}


def ensure_moe_shape_model(shape: MoeShape = MoeShape(), gib: float = 1.0, *, root: Optional[Path] = None,
                           seed: int = 0, progress: Optional[ProgressCallback] = None) -> Path:
    """The shape's random MoE flash folder with as many layers as fit ``gib`` GiB (written once,
    layer by layer, under ``root``, default ``data_dir()/bench``; reused when it matches)."""
    layers = shape.layers_for(gib)
    base = Path(root).expanduser() if root is not None else data_dir() / "bench"
    path = base / (f"{shape.name}-e{shape.experts}-h{shape.hidden}-f{shape.expert_ffn}-{shape.bits}b-{layers}L"
                   f"-s{seed}.flash")
    try:
        m = open_moe_flash(path).manifest
        if (m.num_layers, m.num_experts, m.hidden_size, m.expert_intermediate_size) == \
                (layers, shape.experts, shape.hidden, shape.expert_ffn):
            return path
    except FlashFormatError:
        pass
    cfg = _config(shape, layers)
    E, f, h, gs = shape.experts, shape.expert_ffn, shape.hidden, shape.group_size
    weights: Dict[str, mx.array] = {}
    for i in range(layers):  # lazy: written and freed one layer at a time
        k = mx.random.split(mx.random.key(seed * 100003 + i), 3)
        for j, (role, out_d, in_d) in enumerate((("gate", f, h), ("up", f, h), ("down", h, f))):
            pre = f"model.layers.{i}.mlp.switch_mlp.{role}_proj"
            packed = mx.random.randint(0, 256, (E, out_d, in_d * shape.bits // 8), dtype=mx.uint8, key=k[j])
            weights[f"{pre}.weight"] = packed.view(mx.uint32)  # random nibbles: valid packed 4-bit values
            scale = (in_d ** -0.5) / (2 ** shape.bits - 1) * 3.4  # values ~ uniform with std 1/sqrt(in)
            weights[f"{pre}.scales"] = mx.full((E, out_d, in_d // gs), scale, dtype=mx.bfloat16)
            weights[f"{pre}.biases"] = mx.full((E, out_d, in_d // gs), -scale * (2 ** shape.bits - 1) / 2,
                                               dtype=mx.bfloat16)
    return write_moe_flash(path, config=cfg, weights=weights, progress=progress, overwrite=path.exists(),
                           source=f"random weights, {shape.name} expert shape (mlx-flash bench --shape moe)")


# ----------------------------------------------------------------------------- traces
def synthetic_trace(tokens: int, layers: int, experts: int, top_k: int, *, zipf: float, repeat: float,
                    seed: int = 0) -> np.ndarray:
    """``(tokens, layers, top_k)`` expert ids: per layer a Zipf(``zipf``) popularity over a random
    permutation of the experts; each token keeps each previous expert with probability ``repeat``
    and draws the rest by popularity without replacement."""
    rng = np.random.default_rng(seed)
    out = np.zeros((tokens, layers, top_k), dtype=np.int64)
    for layer in range(layers):
        p = 1.0 / np.arange(1, experts + 1) ** zipf
        pop = np.empty(experts)
        pop[rng.permutation(experts)] = p / p.sum()
        prev: np.ndarray = np.empty(0, dtype=np.int64)
        for t in range(tokens):
            keep = prev[rng.random(len(prev)) < repeat]
            w = pop.copy()
            w[keep] = 0
            new = rng.choice(experts, size=top_k - len(keep), replace=False, p=w / w.sum())
            cur = np.concatenate([keep, new])
            out[t, layer] = cur
            prev = cur
    return out


def tiny_real_trace(tokens: Union[Sequence[int], np.ndarray], layers: int, experts: int, top_k: int,
                    seed: int = 0) -> np.ndarray:
    """``(len(tokens), layers, top_k)``: the routing of mlx-lm's Qwen3-MoE class (tiny width, random
    weights, ``experts`` experts, top-``top_k``) reading ``tokens``."""
    cfg = tiny_moe_config("qwen3_moe", layers=layers, num_experts=experts, num_experts_per_tok=top_k,
                          moe_intermediate_size=16)
    model, _ = random_moe_model(cfg, seed=seed)
    recs: List[List[np.ndarray]] = []
    for path, glu in switch_modules(model):
        recs.append([])
        replace_module(model, path, _Recorder(glu, recs[-1]))
    mx.eval(model(mx.array(np.asarray(tokens, dtype=np.int64))[None]))
    return np.stack([np.concatenate([r.reshape(-1, top_k) for r in rec]) for rec in recs], axis=1)


class _Recorder(nn.Module):
    """A ``SwitchGLU`` that records the router's indices of each call, then runs the original."""

    def __init__(self, glu, rec: list):
        super().__init__()
        self.glu = glu
        object.__setattr__(self, "_rec", rec)

    def __call__(self, x, indices):
        self._rec.append(np.array(indices))
        return self.glu(x, indices)


def text_tokens(n: int) -> np.ndarray:
    """``n`` byte tokens of ``resources/reference.txt`` (repeated if short)."""
    data = np.frombuffer((resources_dir() / "reference.txt").read_bytes(), dtype=np.uint8).astype(np.int64)
    return np.resize(data, n) % 250


# ----------------------------------------------------------------------------- replay
@dataclass
class MoeRow:
    trace: str
    name: str
    budget: Optional[float]          # share of the experts the cache holds (None: dense / naive)
    experts_per_layer: int
    hit_rate: float
    mb_per_token: float              # disk bytes per token, scaled to the shape's depth
    ms_io: float                     # per token, scaled to the shape's depth
    ms_compute: float
    tok_s: float
    resident_gb: float               # expert memory (cache capacity; dense: all experts), full depth
    computed: bool = False


@dataclass
class MoeReplayReport:
    shape: Dict[str, Any]
    params: Dict[str, Any]
    rows: List[MoeRow] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps({**asdict(self)}, indent=1)

    def save_json(self, path) -> Path:
        return atomic_write_text(Path(path).expanduser(), self.to_json())


def _replay(files: MoeFiles, trace: np.ndarray, capacity: int, policy: str, freqs: Optional[np.ndarray],
            warmup: int, naive: bool, cfg: FlashConfig, seed: int) -> Dict[str, float]:
    m = files.manifest
    segs = m.segment_list()
    layout = [(s.name, s.start, s.stop, s.dtype) for s in segs]
    drop = ["pad"] if segs[-1].name == "pad" else []
    threads, chunk = cfg.threads, cfg.chunk_bytes
    if not threads or not chunk:
        probe_threads, probe_chunk = load_cached_choice(files.root)
        threads, chunk = threads or probe_threads, chunk or probe_chunk
    reader = FlashReader(files.storage_view(), threads=threads, chunk_bytes=max(chunk, m.expert_bytes),
                         max_gap_bytes=reader_max_gap(files.root, cfg, threads), direct=cfg.direct_io)
    counters = FFNCounters()
    glu = SwitchGLU(m.hidden_size, m.expert_intermediate_size, m.num_experts, bias=False)  # shapes only (lazy)
    caches = [LayerCache(m.num_experts, capacity, m.expert_bytes, mx.uint8, cfg.window, True,
                         layout, drop)
              for _ in range(m.num_layers)]
    try:
        if policy == "hot" and freqs is not None:
            f = max(0, capacity - m.top_k) / capacity
            pol = CachePolicy.from_fraction(f) if f < 1 else CachePolicy("hot+window", f)
            for i, c in enumerate(caches):
                k = pol.pinned_rows(capacity)
                if k:
                    plan = c.pin(hot_ids(freqs[i % len(freqs)], k))
                    reader.read(i, plan.load_ids, plan.load_dest)
        cd = expert_compute_dtype(files)
        sw = [FlashSwitchGLU(i, glu, caches[i], reader, segs, m.quantization, counters, None, cd)
              for i in range(m.num_layers)]
        drop_page_cache(files.experts_path)
        key = mx.random.key(seed)
        ms, io, comp, hits, active, nbytes = [], [], [], 0, 0, 0
        for t in range(len(trace)):
            key, sub = mx.random.split(key)
            xs = (mx.random.normal((m.num_layers, 1, 1, m.hidden_size), key=sub) * 0.5).astype(mx.bfloat16)
            mx.eval(xs)
            if naive:
                for c in caches:
                    c.clear()
            before = FFNCounters(**counters.__dict__)
            t0 = time.perf_counter()
            for i, s in enumerate(sw):
                y = s(xs[i], mx.array(trace[t, i][None, None].astype(np.uint32)))
                mx.eval(y)
            dt = time.perf_counter() - t0
            if t >= warmup:
                d = {k: getattr(counters, k) - getattr(before, k) for k in counters.__dict__}
                ms.append(dt * 1e3)
                io.append(d["io_s"] * 1e3)
                comp.append(dt * 1e3 - d["io_s"] * 1e3)
                hits += d["neurons_hit"]
                active += d["neurons_active"]
                nbytes += d["bytes_read"]
        n = max(len(ms), 1)
        return {"hit_rate": hits / active if active else 1.0, "bytes": nbytes / n, "ms": float(np.mean(ms)),
                "io": float(np.mean(io)), "compute": float(np.mean(comp))}
    finally:
        reader.close()


def run_moe_replay(shape: Union[str, MoeShape] = "moe", *, gib: float = 1.0, tokens: int = 32, warmup: int = 8,
                   calib: int = 64, budgets: Sequence[float] = DEFAULT_BUDGETS,
                   synthetic: Sequence[Sequence[float]] = DEFAULT_SYNTHETIC, real_trace: bool = True,
                   policies: Sequence[str] = ("lru", "hot"), config: Optional[FlashConfig] = None,
                   root: Optional[Path] = None, seed: int = 0,
                   progress: Optional[ProgressCallback] = None) -> MoeReplayReport:
    """Run the MoE-shape replay (module docstring); returns its report."""
    t_start = time.perf_counter()
    sp = MOE_SHAPES[shape] if isinstance(shape, str) else shape
    cfg = config or FlashConfig()
    report(progress, 0.0, "MoE shape model")
    path = ensure_moe_shape_model(sp, gib, root=root, seed=seed)
    files = open_moe_flash(path)
    m = files.manifest
    L = m.num_layers
    scale = sp.layers / L
    total = calib + warmup + tokens
    traces: Dict[str, np.ndarray] = {}
    if real_trace:
        traces["tiny-real (Qwen3-MoE class, random weights, reference.txt)"] = tiny_real_trace(
            text_tokens(total), L, sp.experts, sp.top_k, seed=seed)
    for zipf, repeat in synthetic:
        traces[f"synthetic (zipf {zipf:g}, repeat {repeat:g})"] = synthetic_trace(
            total, L, sp.experts, sp.top_k, zipf=zipf, repeat=repeat, seed=seed)
    rep = MoeReplayReport(
        shape={**asdict(sp), "replayed_layers": L, "expert_bytes": m.expert_data_bytes,
               "experts_gb_full_depth": sp.layers * sp.experts * m.expert_data_bytes / 1e9, "path": str(path)},
        params={"tokens": tokens, "warmup": warmup, "calib": calib, "budgets": list(budgets),
                "synthetic": [list(s) for s in synthetic], "policies": list(policies), "gib": gib,
                "direct_io": cfg.direct_io})
    runs = [(tn, "naive", None) for tn in traces] + [(tn, p, b) for tn in traces for b in budgets for p in policies]
    full_gb = sp.layers * sp.experts * m.expert_data_bytes / 1e9
    for k, (tn, pol, b) in enumerate(runs):
        report(progress, k / len(runs), f"{tn.split(' ')[0]}: {pol} {'' if b is None else f'{b:.0%}'}")
        tr = traces[tn]
        freqs = np.stack([np.bincount(tr[:calib, li].reshape(-1), minlength=sp.experts) / calib for li in range(L)])
        cap = sp.top_k if b is None else max(1, int(b * sp.experts))
        r = _replay(files, tr[calib:], cap, pol, freqs, warmup, b is None, cfg, seed)
        rep.rows.append(MoeRow(tn, "naive" if b is None else f"flash {pol}", b, cap, r["hit_rate"],
                               r["bytes"] * scale / 1e6, r["io"] * scale, r["compute"] * scale,
                               1e3 / (r["ms"] * scale), cap * sp.layers * m.expert_data_bytes / 1e9))
    for tn in traces:
        comp = [x.ms_compute for x in rep.rows if x.trace == tn and x.budget is not None]
        c = float(np.median(comp)) if comp else 0.0
        rep.rows.insert(0, MoeRow(tn, "dense (computed)", 1.0, sp.experts, 1.0, 0.0, 0.0, c,
                                  1e3 / c if c else 0.0, full_gb, computed=True))
    rep.notes += [
        f"{L} of the shape's {sp.layers} layers replayed (experts.bin {L * m.num_experts * m.expert_bytes / 2**30:.2f} "
        f"GiB); per-token figures are scaled by {scale:.1f} to the full depth; experts only (no attention, "
        "router or embeddings).",
        "dense is computed, not run: all experts in memory "
        f"({full_gb:.1f} GB), no reads, time = the median compute time of the flash rows.",
        f"hot pins each layer's most frequent experts over the first {calib} trace tokens (leaving top-k rows "
        "free); the cache is then warmed for "
        f"{warmup} tokens and {tokens} tokens are measured. naive empties the cache before every token.",
        "tiny-real: routing of mlx-lm's Qwen3-MoE class with random weights (routers 3x wider than "
        "1/sqrt(fan-in)) at hidden 64 reading byte tokens: "
        "a real router's mechanics, not a trained model's skew. synthetic: stated Zipf exponent and repeat "
        "probability.",
    ]
    rep.seconds = time.perf_counter() - t_start
    report(progress, 1.0, "MoE replay done")
    return rep


def format_moe_table(rep: MoeReplayReport) -> str:
    """The replay as Markdown: one table per trace."""
    s = rep.shape
    out = [f"## MoE-shape replay: {s['name']} ({s['layers']} layers, {s['experts']} experts, top-{s['top_k']}, "
           f"hidden {s['hidden']}, expert FFN {s['expert_ffn']}, {s['bits']}-bit; expert "
           f"{s['expert_bytes'] / 1e6:.2f} MB, all experts {s['experts_gb_full_depth']:.1f} GB)", ""]
    for tn in dict.fromkeys(r.trace for r in rep.rows):
        out += [f"**{tn}**", "",
                "| row | budget | experts/layer | hit rate | MB read/token | ms I/O | ms compute | tok/s "
                "| expert memory |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in rep.rows:
            if r.trace != tn:
                continue
            b = "all" if r.computed else ("-" if r.budget is None else f"{r.budget:.0%}")
            out.append(f"| {r.name} | {b} | {r.experts_per_layer} | {r.hit_rate:.1%} | {r.mb_per_token:,.0f} | "
                       f"{r.ms_io:,.0f} | {r.ms_compute:,.0f} | {r.tok_s:.2f} | {r.resident_gb:.1f} GB |")
        out.append("")
    out += [f"- {n}" for n in rep.notes]
    return "\n".join(out)


def save_moe_plots(rep: MoeReplayReport, out_dir) -> List[Path]:
    """Hit rate and MB read per token against the budget, one line per trace and policy (PNG)."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    a1, a2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for tn in dict.fromkeys(r.trace for r in rep.rows):
        short = tn.split(" (")[0] + (" " + tn.split(" (")[1].split(")")[0] if tn.startswith("synthetic") else "")
        flash_rows = [r for r in rep.rows if r.trace == tn and r.budget is not None and not r.computed]
        for name in dict.fromkeys(r.name for r in flash_rows):
            pts = sorted((r.budget, r.hit_rate, r.mb_per_token) for r in rep.rows
                         if r.trace == tn and r.name == name and r.budget is not None)
            a1.plot([p[0] * 100 for p in pts], [p[1] * 100 for p in pts], marker="o", label=f"{short}: {name}")
            a2.plot([p[0] * 100 for p in pts], [p[2] for p in pts], marker="o", label=f"{short}: {name}")
        naive = [r for r in rep.rows if r.trace == tn and r.name == "naive"]
        if naive:
            a2.axhline(naive[0].mb_per_token, linestyle=":", color="grey")
    a1.set(xlabel="budget (% of experts)", ylabel="expert hit rate (%)", title="hit rate")
    a2.set(xlabel="budget (% of experts)", ylabel="MB read per token (full depth)",
           title="reads per token (dotted: naive)")
    a1.legend(fontsize=6)
    fig.tight_layout()
    p = out / "moe_replay.png"
    fig.savefig(p, dpi=110)
    return [p]
