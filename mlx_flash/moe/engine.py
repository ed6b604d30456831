"""Loading a MoE flash folder into an :class:`mlx_flash.engine.Engine`.

The model is mlx-lm's own class for the family (``families.MOE_FAMILIES``); its dense part
(router, shared experts, dense MLP layers, attention, embeddings, norms) is loaded from
``dense.safetensors`` (quantized modules as mlx-lm quantizes them), and every ``switch_mlp``
becomes a :class:`~mlx_flash.moe.switch.FlashSwitchGLU` over its layer's expert cache.

The budget (``FlashConfig.budget``) means what it means for neurons, with experts as the unit:
a fraction of all experts' bytes (padding excluded), or bytes. It is split equally over the MoE
layers: ``capacity = budget // (layers * expert bytes)`` experts per layer (at least one; fewer
than top-k works, in passes, but reads every token). ``FlashConfig.engine = "auto"`` runs a folder
whose experts all fit the budget dense (every expert read once at load).

Cache policies (``FlashConfig.policy``), on the neuron cache's machinery (``neuron_cache``):
``lru`` and ``window`` as for neurons; ``hot`` / ``hot+window`` pin each layer's most frequently
routed experts (``moe_manifest.json``'s ``expert_frequencies``, from :func:`calibrate_experts`),
leaving at least top-k rows unpinned so a token's experts always have rows; ``auto`` simulates
the pinned shares 0 / 0.25 / 0.5 / 0.75 / the most on tokens sampled from the calibrated
frequencies (``neuron_cache.simulate``, the real cache code) and keeps the best hit rate (an
expert is one aligned bundle, so bytes read are misses x expert bytes: the same order);
without calibration ``lru``.

Compute dtypes: the dense part runs as mlx-lm runs it. Quantized experts multiply float32
activations on the CPU (``quantized.compute_dtype``; MLX's CPU half-precision ``gather_qmm`` is ~10x
slower), so a bfloat16/float16 model's expert outputs differ from mlx-lm's by rounding; a float32
model's flash logits are mlx-lm's very arrays, float or quantized experts (tests/moe/test_moe.py).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes

from ..active import ActiveChoice
from ..config import FlashConfig
from ..engine import Engine, EngineChoice, ModelLoadError, _load_tokenizer, dense_mismatch, reader_max_gap
from ..neuron_cache import (
    HOT_FRACTIONS,
    CachePolicy,
    LayerCache,
    NeuronCache,
    PolicyInfo,
    sample_active_sets,
    simulate,
)
from ..paths import resources_dir
from ..pipeline import Prefetcher, lookahead_map
from ..progress import ProgressCallback, report
from ..quantized import compute_dtype, quantize_like
from ..stats import FFNCounters
from ..storage.format import verify_file
from ..storage.probe import load_cached_choice
from ..storage.reader import FlashReader
from ..storage.verify import BackgroundVerifier
from .format import DENSE_FILE, MoeFiles, open_moe_flash, read_expert_arrays, save_frequencies
from .switch import FlashSwitchGLU, replace_module, switch_modules


class RouterChooser:
    """The active-set chooser of a MoE engine: the model's own router (nothing resident, no
    predictor). ``Engine.mode`` shows ``flash-router``."""

    name = "router"
    resident_bytes = 0
    computes_gate = False


def _skeleton(files: MoeFiles):
    cfg = dict(files.manifest.model_args)
    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    mods = switch_modules(model)
    if [p for p, _ in mods] != list(files.manifest.modules):
        raise ModelLoadError(f"{files.root}: the manifest's expert layers {files.manifest.modules[:3]}... do not "
                             f"match the model class's ({[p for p, _ in mods][:3]}...): convert the model again")
    return model, mods, cfg


def _load_dense_part(model, files: MoeFiles, cfg: dict, extra: Optional[Dict[str, mx.array]] = None) -> None:
    try:
        weights = dict(mx.load(str(files.dense_path)))
    except Exception as e:
        raise ModelLoadError(f"{files.dense_path}: cannot read {DENSE_FILE} ({e})") from None
    weights.update(extra or {})
    try:
        quantize_like(model, weights, cfg)
        model.load_weights(list(weights.items()))
    except (KeyError, ValueError, TypeError) as e:
        dense_mismatch(files.storage_view(), e)
    mx.eval(model.parameters())


def load(path, config: Optional[FlashConfig] = None, *, dense: bool = False) -> Engine:
    """Load a MoE flash folder: flash (expert cache) or dense (``dense``, or
    ``config.engine`` says so; "auto": all experts fit the budget)."""
    config = config or FlashConfig()
    path = Path(path).expanduser()
    files = open_moe_flash(path)
    m = files.manifest
    engine, reason = ("dense", "asked for") if dense else config.choose_engine(m.ffn_bytes_total)
    reason = reason.replace("FFN", "experts").replace("neurons read", "experts read")
    if engine == "dense":
        eng = _load_dense(files)
    else:
        eng = _load_flash(files, config)
    eng.engine_info = EngineChoice(engine, "dense" if dense else config.engine, reason)
    return eng


def _load_dense(files: MoeFiles) -> Engine:
    """Every expert in memory (read once, checksums checked per layer): mlx-lm's model as it is."""
    verify_file(files.storage_view(), DENSE_FILE)
    model, mods, cfg = _skeleton(files)
    experts = {}
    for i, (p, _) in enumerate(mods):
        experts.update({f"{p}.{k}": v for k, v in read_expert_arrays(files, i).items()})
    _load_dense_part(model, files, cfg, experts)
    tok = _load_tokenizer(files.root, cfg.get("eos_token_id"))
    return Engine(model, tok, files.root, None, context_length=cfg.get("max_position_embeddings"))


def expert_compute_dtype(files: MoeFiles) -> Optional[mx.Dtype]:
    """Quantized experts: ``quantized.compute_dtype`` of the stored dtype (float32 on the CPU); else None."""
    if not any(isinstance(q, dict) for q in files.manifest.quantization.values()):
        return None
    return compute_dtype(getattr(mx, files.manifest.dtype))


def expert_capacity(files: MoeFiles, budget_bytes: int) -> int:
    """Experts per MoE layer a budget of ``budget_bytes`` holds (the cache's rows)."""
    m = files.manifest
    return int(min(m.num_experts, budget_bytes // (m.num_layers * m.expert_data_bytes)))


def _load_flash(files: MoeFiles, config: FlashConfig) -> Engine:
    m = files.manifest
    view = files.storage_view()
    notes: List[str] = []
    budget = config.budget_bytes(m.ffn_bytes_total)
    if budget > m.ffn_bytes_total:
        notes.append(f"the budget of {budget / 1e6:.1f} MB is more than all experts "
                     f"({m.ffn_bytes_total / 1e6:.1f} MB); using {m.ffn_bytes_total / 1e6:.1f} MB")
        budget = m.ffn_bytes_total
    cap = expert_capacity(files, budget)
    if cap < 1:
        need = m.num_layers * m.expert_data_bytes
        raise ValueError(f"expert memory budget of {budget} bytes is too small: it must hold one expert per MoE "
                         f"layer ({m.num_layers} x {m.expert_data_bytes} bytes); the minimum budget is {need} bytes")
    if cap < m.top_k:
        notes.append(f"the budget holds {cap} experts per layer, fewer than the {m.top_k} each token routes to: "
                     f"every token reads experts")
    threads, chunk = config.threads, config.chunk_bytes
    if not threads or not chunk:
        t, c = load_cached_choice(files.root)
        threads, chunk = threads or t, chunk or c
    verifier = BackgroundVerifier(view, direct=config.direct_io, side_files=(DENSE_FILE,))
    reader = prefetcher = None
    try:
        reader = FlashReader(view, threads=threads, chunk_bytes=max(chunk, m.expert_bytes),
                             max_gap_bytes=reader_max_gap(files.root, config, threads), direct=config.direct_io)
        segs = m.segment_list()
        layout = [(s.name, s.start, s.stop, s.dtype) for s in segs]
        drop = ["pad"] if segs[-1].name == "pad" else []
        lazy = config.policy != "window"
        layers = [LayerCache(m.num_experts, cap, m.expert_bytes, mx.uint8, config.window, lazy,
                             layout, drop)
                  for _ in range(m.num_layers)]
        cache = NeuronCache(layers, 0, budget, layout, drop=drop)
        counters = FFNCounters()
        model, mods, cfg = _skeleton(files)
        cd = expert_compute_dtype(files)
        for i, (p, glu) in enumerate(mods):
            replace_module(model, p, FlashSwitchGLU(i, glu, layers[i], reader, segs, m.quantization, counters,
                                                    verifier, cd))
        _load_dense_part(model, files, cfg)
        policy_info = _apply_policy(files, config, cache, reader)
        if config.pipeline and m.num_layers > 1:
            prefetcher = attach_lookahead(model, mods, reader, m.top_k, m.expert_bytes)
        tok = _load_tokenizer(files.root, cfg.get("eos_token_id"))
        if config.verify == "load":
            verifier.wait()
        verifier.raise_if_failed()
    except BaseException:
        verifier.close()
        if prefetcher is not None:
            prefetcher.close()
        if reader is not None:
            reader.close()
        raise
    policy_info = replace(policy_info, experts_per_layer=cap, top_k=m.top_k, num_experts=m.num_experts,
                          moe_layers=m.num_layers, expert_bytes=m.expert_data_bytes,
                          expert_quantization={r: (q if q == "none" else f"{q['bits']}b/g{q['group_size']}")
                                               for r, q in m.quantization.items()})
    return Engine(model, tok, files.root, config, files=files, cache=cache, reader=reader, chooser=RouterChooser(),
                  counters=counters, policy_info=policy_info, notes=notes,
                  context_length=cfg.get("max_position_embeddings"), verifier=verifier, prefetcher=prefetcher,
                  active_info=ActiveChoice(name="router", asked=config.active,
                                           reason="MoE: the router's top-k is exact"))


def _module(model, path: str):
    obj = model
    for p in path.split("."):
        obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
    return obj


def attach_lookahead(model, mods, reader: FlashReader, top_k: int, expert_bytes: int) -> Prefetcher:
    """Lookahead prefetch for the model's flash expert layers (``FlashConfig.pipeline``): while MoE
    layer l computes a decoded token, ``pipeline.Prefetcher`` submits to the engine's reader (in flight
    while l computes) the experts layer l+1's router picks from layer l's input (mapped to l+1's norm by
    ``pipeline.lookahead_map``) that l+1's cache lacks, into one of two staging buffers of top-k
    experts (I/O buffers outside the budget); layer l+1 copies the ones it routes to from there
    instead of reading them. The outputs are the same bit for bit; ``Engine.pipeline_info`` gives
    the lookahead's recall and the share of missing experts it served."""
    pf = Prefetcher(reader, [np.empty((top_k, expert_bytes), dtype=np.uint8) for _ in range(2)], len(mods))
    flash = [_module(model, p) for p, _ in mods]
    norms = [_module(model, p.split(".layers.")[0] + ".layers." + p.split(".layers.")[1].split(".")[0])
             .post_attention_layernorm for p, _ in mods]
    for i, f in enumerate(flash):
        st = f.state
        st.prefetcher = pf
        if i + 1 < len(flash):
            block = _module(model, mods[i + 1][0].rsplit(".", 1)[0])
            st.next = (i + 1, block.gate, lookahead_map(norms[i], norms[i + 1]), flash[i + 1].state.cache)
    return pf


def _max_hot_fraction(capacity: int, top_k: int) -> float:
    """The largest pinned share that leaves ``top_k`` rows for a token's routed experts."""
    return max(0, capacity - top_k) / capacity if capacity else 0.0


def _apply_policy(files: MoeFiles, config: FlashConfig, cache: NeuronCache, reader) -> PolicyInfo:
    m = files.manifest
    cap = cache.layers[0].capacity
    freqs = np.asarray(m.expert_frequencies, dtype=np.float64) if m.expert_frequencies is not None else None
    most = _max_hot_fraction(cap, m.top_k)
    asked = config.policy
    t0 = time.perf_counter()
    info: Dict[str, Any]
    if asked in ("hot", "hot+window") and freqs is None:
        raise ValueError(f"cache policy {asked!r} pins each layer's most often routed experts, but {files.root} has "
                         f"no expert frequencies: run `mlx-flash calibrate` on it (or use --policy lru / auto)")
    if asked == "auto":
        if freqs is None:
            pol, info = CachePolicy("lru"), {"reason": "auto: no calibrated expert frequencies", "source": "default"}
        else:
            pol, table = choose_expert_policy(freqs, cap, m.top_k, config.window)
            info = {"reason": "auto: best simulated expert hit rate on tokens sampled from the calibrated "
                              "frequencies", "source": "simulation", "hit_rates": table}
    elif asked in ("hot", "hot+window"):
        f = most if asked == "hot" else min(most, config.hot_fraction if config.hot_fraction is not None else 0.5)
        pol = CachePolicy.from_fraction(f) if f < 1 else CachePolicy("hot+window", f)
        info = {"reason": f"asked for (at most {most:.2f} of the rows pinned: top-k rows stay free)",
                "source": "config"}
    else:
        pol, info = CachePolicy.make(asked), {"reason": "asked for", "source": "config"}

    def fill(layer: int, plan) -> None:
        reader.read(layer, plan.load_ids, plan.load_dest)

    pinned = cache.apply_policy(pol, freqs, fill=fill)
    return PolicyInfo.of(pol, **info, asked=asked, capacity=cap, pinned=int(sum(len(p) for p in pinned)),
                         preload_bytes=int(cache.stats.preload_bytes), load_seconds=round(time.perf_counter() - t0, 4))


def choose_expert_policy(freqs: np.ndarray, capacity: int, top_k: int, window: int = 5, tokens: int = 256,
                         seed: int = 0) -> Tuple[CachePolicy, Dict[float, float]]:
    """The pinned share (of ``HOT_FRACTIONS`` up to the most that leaves top-k rows free) with the
    best simulated hit rate over all layers (ties: the smaller share), and the table
    ``{share: hit rate}``. Tokens are sampled per expert from its frequency (share of tokens
    routed to it), independently: a stand-in for the router (expected top-k experts a token)."""
    most = _max_hot_fraction(capacity, top_k)
    fractions = sorted({f for f in HOT_FRACTIONS if f <= most} | {most})
    table: Dict[float, float] = {}
    for f in fractions:
        hits = total = 0
        pol = CachePolicy.from_fraction(f) if f < 1 else CachePolicy("hot+window", f)
        for layer, fr in enumerate(freqs):
            sets = sample_active_sets(np.clip(fr, 0, 1), tokens, seed=seed + layer)
            s = simulate(sets, len(fr), capacity, pol, window, frequencies=fr, warmup=tokens // 4)
            hits += s.hits
            total += s.hits + s.misses + s.overflow
        table[round(f, 4)] = hits / total if total else 1.0
    best = max(table, key=lambda f: (table[f], -f))
    return (CachePolicy.from_fraction(best) if best < 1 else CachePolicy("hot+window", best)), table


def flash_switches(engine: Engine) -> List[FlashSwitchGLU]:
    """The engine's flash expert layers, in order."""
    return [m for _, m in switch_like(engine.model)]


def switch_like(model) -> List[Tuple[str, FlashSwitchGLU]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, FlashSwitchGLU)]
    return sorted(found, key=lambda nm: nm[1].state.layer)


def routing_trace(engine: Engine, tokens: Sequence[int], chunk: int = 1) -> np.ndarray:
    """The router's choices for ``tokens`` fed one chunk at a time (teacher forcing, a KV cache):
    ``(len(tokens), moe layers, top_k)`` expert ids."""
    sw = flash_switches(engine)
    if not sw:
        raise ValueError("routing traces need a flash MoE engine")
    records: List[list] = [[] for _ in sw]
    for s, rec in zip(sw, records):
        s.state.record = rec
    try:
        kv = make_prompt_cache(engine.model)
        toks = mx.array(np.asarray(tokens, dtype=np.int64))
        for a in range(0, len(tokens), chunk):
            mx.eval(engine.model(toks[a : a + chunk][None], cache=kv))
        return np.stack([np.concatenate(rec, axis=0) for rec in records], axis=1)
    finally:
        for s in sw:
            s.state.record = None


def calibrate_experts(path, tokens: Sequence[int], *, config: Optional[FlashConfig] = None,
                      progress: Optional[ProgressCallback] = None, source: str = "") -> np.ndarray:
    """Route ``tokens`` through the MoE flash folder at ``path`` (flash engine, LRU) and record each
    expert's frequency (share of tokens routed to it) in its manifest; returns the
    ``(moe layers, experts)`` frequencies."""
    cfg = replace(config or FlashConfig(), engine="flash", policy="lru")
    eng = load(path, cfg)
    try:
        sw = flash_switches(eng)
        for s in sw:
            s.state.counts[:] = 0
            s.state.tokens = 0
        toks = np.asarray(tokens, dtype=np.int64)
        step = 128
        for a in range(0, len(toks), step):
            mx.eval(eng.model(mx.array(toks[a : a + step])[None]))
            report(progress, min(1.0, (a + step) / max(len(toks), 1)), f"calibrating experts: {a + step} tokens")
        freqs = np.stack([s.state.counts / max(s.state.tokens, 1) for s in sw])
        save_frequencies(eng.files, freqs, {"tokens": int(len(toks)), "source": source or "given tokens"})
        return freqs
    finally:
        eng.close()


CALIBRATION_TOKENS = 512
"""Tokens of ``resources/reference.txt`` routed by :func:`calibrate_reference` (a library import)."""


def calibrate_reference(path, *, tokens: int = CALIBRATION_TOKENS,
                        progress: Optional[ProgressCallback] = None) -> np.ndarray:
    """:func:`calibrate_experts` on the first ``tokens`` tokens of ``resources/reference.txt`` (English
    prose shipped with the app), encoded with the folder's own tokenizer."""
    files = open_moe_flash(path)
    tok = _load_tokenizer(files.root, files.manifest.model_args.get("eos_token_id"))
    ids = list(tok.encode((resources_dir() / "reference.txt").read_text()))[:tokens]
    return calibrate_experts(path, ids, progress=progress, source=f"resources/reference.txt, {len(ids)} tokens")


class _InputTap(nn.Module):
    """A decoder layer's input norm that records its input (the previous layer's output)."""

    def __init__(self, norm, rec: list):
        super().__init__()
        self.norm = norm
        object.__setattr__(self, "_rec", rec)

    def __call__(self, x):
        self._rec.append(x)
        return self.norm(x)


def lookahead_recall(engine: Engine, tokens: Sequence[int]) -> Dict[int, float]:
    """How well layer l+1's router, applied to layer l's output (available a layer early, before
    l+1's attention), predicts the experts l+1 routes to: per MoE layer index (from the second
    decoder layer on), the mean share of its top-k found by the lookahead, over ``tokens`` fed one
    at a time (a KV cache, as in decoding). What a lookahead prefetch would read ahead (not built)."""
    sw = switch_like(engine.model)
    if not sw:
        raise ValueError("lookahead needs a flash MoE engine")
    layers = engine.model.layers
    taps: List[list] = [[] for _ in layers]
    decoder_of = {}
    for path, s in sw:  # "model.layers.<j>.<block>.switch_mlp"
        j = int(path.split("layers.")[1].split(".")[0])
        rec: list = []
        decoder_of[s.state.layer] = (j, path.rsplit(".", 1)[0], s, rec)
        s.state.record = rec
    norms = [layer.input_layernorm for layer in layers]
    for j, layer in enumerate(layers):
        layer.input_layernorm = _InputTap(norms[j], taps[j])
    try:
        kv = make_prompt_cache(engine.model)
        for t in tokens:
            mx.eval(engine.model(mx.array([[int(t)]]), cache=kv))
    finally:
        for j, layer in enumerate(layers):
            layer.input_layernorm = norms[j]
    out: Dict[int, float] = {}
    for moe_i, (j, block_path, s, rec) in decoder_of.items():
        s.state.record = None
        if j == 0:
            continue
        block = engine.model
        for p in block_path.split("."):
            block = block[int(p)] if p.isdigit() else getattr(block, p)
        norm = layers[j].post_attention_layernorm
        k = rec[0].shape[-1]
        hits = 0
        for h, actual in zip(taps[j], rec):  # layer j's input = layer j-1's output
            logits = np.array(block.gate(norm(h)).astype(mx.float32)).reshape(-1)
            pred = np.argpartition(-logits, k - 1)[:k]
            hits += len(set(pred.tolist()) & set(actual.reshape(-1).tolist()))
        out[moe_i] = hits / (k * max(len(rec), 1))
    return out
