"""Running one configuration: a real model through the engine (:func:`_run_real`), a large random-weight
shape driven by replayed active sets (:func:`_run_replay`, :func:`ensure_shape_model`), the per-token
summary, the reader's figures against the disk probe, and the machine's description.
"""

from __future__ import annotations

import gc
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .. import default_model
from ..active import AllNeurons
from ..config import FlashConfig
from ..neuron_cache import CachePolicy, NeuronCache, PolicyInfo, ReadModel, resolve_auto_policy, scratch_rows
from ..paths import data_dir, resources_dir
from ..pipeline import attach_pipeline
from ..progress import Cancelled, ProgressCallback
from ..progress import report as _report
from ..quantized import compute_dtype
from ..sparse_ffn import SparseFFN
from ..stats import FFNCounters, Stats, process_rss
from ..storage.format import (
    FlashFormatError,
    bundle_layout,
    bundle_segments,
    ffn_groups,
    group_quant_bytes,
    open_flash,
    role_quantization,
    write_flash,
)
from ..storage.platform_io import drop_page_cache
from ..storage.probe import ProbeResult, cached_probe, load_cached_choice, probe_file
from ..storage.reader import FlashReader
from ..traces import ReplayChooser, recording
from .records import (
    _DENSE_ROWS,
    _NEEDS_CALIBRATION,
    DENSE_BF16,
    ORACLE,
    REAL,
    REFERENCE_FILE,
    REPLAYED,
    SHAPES,
    BenchRow,
    PathLike,
    Shape,
    _jsonable,
)


def summarize(stats: Sequence[Stats], warmup: int) -> Dict[str, Any]:
    """Per-token means over ``stats[warmup:]`` (the figures of a :class:`BenchRow`)."""
    steady = list(stats[warmup:])
    if not steady:
        raise ValueError(f"no measured tokens: {len(stats)} generated, {warmup} warm-up")
    n = len(steady)

    def mean(attr: str) -> float:
        return float(sum(getattr(s, attr) for s in steady) / n)

    ms_total = mean("ms_total")
    active = sum(s.neurons_active for s in steady)
    hits = sum(s.hit_rate * s.neurons_active for s in steady)
    flash = steady[-1].mode.startswith("flash")
    return {
        "tokens": n,
        "warmup_tokens": min(warmup, len(stats)),
        "tokens_per_s": 1e3 / ms_total if ms_total > 0 else 0.0,
        "ms_total": ms_total,
        "ms_predictor": mean("ms_predictor"),
        "ms_io": mean("ms_io"),
        "ms_compute": mean("ms_compute"),
        "ms_prefetch": mean("ms_prefetch"),
        "ms_overlap": mean("ms_overlap"),
        "bytes_read_per_token": mean("bytes_read"),
        "bytes_useful_per_token": mean("bytes_useful"),
        "hit_rate": (hits / active if active else 1.0) if flash else None,
        "neurons_active_per_token": mean("neurons_active"),
        "neurons_loaded_per_token": mean("neurons_loaded"),
        "neurons_streamed_per_token": mean("neurons_streamed"),
        "resident_bytes": int(max(s.resident_bytes for s in steady)),
        "cache_bytes": int(steady[-1].cache_bytes),
        "budget_bytes": int(steady[-1].budget_bytes),
        "predictor_bytes": int(steady[-1].predictor_bytes),
        "peak_memory": int(max(s.peak_memory for s in stats)),
        "process_rss": int(max(s.process_rss for s in steady)),
        "mode": steady[-1].mode,
        "prompt_tokens": int(steady[-1].prompt_tokens),
        "ms_first_token": float(stats[0].ms_first_token),
    }


def _io_figures(row: BenchRow, reads, probe) -> None:
    """Fill the effective-throughput fields of a flash row from the reader's totals."""
    if reads is None or reads.seconds <= 0 or reads.bytes_read <= 0:
        return
    row.io_gbps = reads.bytes_read / reads.seconds / 1e9
    row.mean_request_bytes = reads.bytes_read / max(1, reads.requests)
    if probe is not None and probe.table:
        chunk = _nearest_chunk(probe, row.mean_request_bytes)
        t, best = probe.best(chunk)
        row.disk_best_gbps = best
        row.disk_gbps_same_threads = probe.table[chunk].get(row.threads)
        row.io_efficiency = row.io_gbps / best if best > 0 else None


def _reader_figures(row: BenchRow, reader, reads, probe, measured_tokens: int) -> None:
    """The reader's settings, requests per token, and its throughput against the probe at its
    own mean request size and thread count (interpolated, ``ProbeResult.at``)."""
    row.read_alignment, row.max_gap_bytes = reader.alignment, reader.max_gap_bytes
    if reads is None or reads.requests <= 0 or row.mean_request_bytes is None:
        return
    row.requests_per_token = reads.requests / max(1, measured_tokens)
    row.serving_gbps = reads.service_gbps or None
    row.reader_split = reads.split() or None
    if probe is not None and probe.table and row.io_gbps:
        at = probe.at(row.mean_request_bytes, row.threads)
        row.disk_gbps_at_request = at
        row.reader_of_probe = row.io_gbps / at if at else None


def _live_probe_figures(row: BenchRow, ffn_path: Path) -> None:
    """The disk as the row found it: one probe cell (``probe.probe_file``, 0.3 s) on the model's own
    ``ffn.bin`` at the row's mean request size and threads, right after the row, so the reader is
    compared with the disk under the same load and the same other traffic (the stored probe was
    measured at another moment; on a shared machine the two differ by up to 2x)."""
    if not row.io_gbps or not row.mean_request_bytes or row.read_mode == "buffered":
        return
    row.live_probe_gbps = probe_file(ffn_path, int(row.mean_request_bytes), max(1, row.threads), 0.3)
    row.reader_of_live_probe = row.io_gbps / row.live_probe_gbps if row.live_probe_gbps > 0 else None


def _nearest_chunk(probe, nbytes: float) -> int:
    return min(probe.table, key=lambda c: abs(np.log2(c) - np.log2(max(1.0, nbytes))))


def reference_text() -> str:
    """The project's own reference prose (``resources/reference.txt``)."""
    return (resources_dir() / REFERENCE_FILE).read_text(encoding="utf-8")


def _free_mlx() -> None:
    gc.collect()
    clear = getattr(mx, "clear_cache", None)
    if clear is not None:
        clear()


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 0


def machine_info() -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "mlx": getattr(mx, "__version__", "?"),
        "device": str(mx.default_device()),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _physical_memory(),
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except (OSError, AttributeError):
        pass
    return info


def _prompt_for(engine, prompt) -> Any:
    """Chat messages go through the chat template when the tokenizer has one."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        if not getattr(engine.tokenizer, "has_chat_template", True):
            return "\n".join(m.get("content", "") for m in prompt)
    return prompt


class _Skip(Exception):
    """A configuration cannot run on this model (the message says why)."""


def _twin_name(name: str, pipeline: bool) -> str:
    """The name of a row's twin run with pipelined layers on (``pipeline``) or off."""
    return f"{name} (pipelined)" if pipeline else f"{name} (serial)"


def _reader_totals(engine):
    """The engine's read totals since the last call (reset): its reader serves the synchronous
    reads and, with pipelined layers, the prefetch (seconds: wall time with reads in flight)."""
    return engine.reader.reset_totals()


def _run_real(name: str, path: Path, cfg: FlashConfig, prompt, tokens: int, warmup: int,
              ref_ids: Optional[List[int]], probe, progress: Optional[ProgressCallback], *,
              record: bool = False, dense_tokens: Optional[List[int]] = None):
    """One configuration on the real model. Returns (row, generated token ids, trace or None)."""
    from ..engine import load  # noqa: PLC0415 - the engine imports mlx-lm (seconds): not at CLI start

    _report(progress, 0.0, f"{name}: loading")
    try:
        engine = load(path, cfg, dense=name in _DENSE_ROWS, dense_dtype="bfloat16" if name == DENSE_BF16 else None)
    except Exception as e:
        if name not in _NEEDS_CALIBRATION:
            raise
        if isinstance(e, ImportError):
            raise _Skip(f"predictors are not available in this build ({e})") from e
        raise _Skip(f"{type(e).__name__}: {str(e).strip() or 'cannot load the predictors'}") from e
    trace = None
    try:
        engine.tokenizer.eos_token_ids = []  # every configuration generates exactly `tokens` tokens
        if engine.files is not None:
            drop_page_cache(engine.files.ffn_path)
        else:
            drop_page_cache(path / "ffn.bin")
        _free_mlx()
        p = _prompt_for(engine, prompt)
        stats: List[Stats] = []
        toks: List[int] = []
        text: List[str] = []
        gen_share = 0.8 if ref_ids else 1.0
        with (recording(engine) if record and engine.is_flash else nullcontext()) as tr:
            for i, r in enumerate(engine.stream_generate(p, tokens, temperature=0.0)):
                stats.append(r.stats)
                toks.append(r.token)
                text.append(r.text)
                if i + 1 == warmup and engine.reader is not None:
                    _reader_totals(engine)  # effective throughput over measured tokens only
                _report(progress, gen_share * (i + 1) / tokens, f"{name}: token {i + 1}/{tokens}")
        trace = tr
        reads = _reader_totals(engine) if engine.reader is not None else None
        s = summarize(stats, warmup)
        row = BenchRow(name=name, source=REAL, group="real", text="".join(text), **s)
        row.policy = _jsonable(engine.policy_info.to_dict()) if engine.policy_info is not None else None
        if engine.files is not None:
            mf = engine.files.manifest
            row.active = _jsonable(engine.active_info.to_dict()) if engine.active_info is not None else None
            row.active_fraction = row.neurons_active_per_token / (mf.num_layers * mf.intermediate_size)
        if engine.cache is not None:
            row.preload_bytes = int(engine.cache.stats.preload_bytes)
        row.pipeline = engine.prefetcher is not None
        row.lookahead = _jsonable(engine.pipeline_info())
        if engine.reader is not None:
            row.threads = engine.reader.threads
            row.chunk_bytes = engine.reader.chunk_bytes
            row.read_mode = engine.reader.mode
            _io_figures(row, reads, probe)
            _reader_figures(row, engine.reader, reads, probe, len(stats) - warmup)
            if probe is not None:
                _live_probe_figures(row, engine.files.ffn_path if engine.files is not None else path / "ffn.bin")
        if dense_tokens is not None:
            k = 0
            while k < min(len(toks), len(dense_tokens)) and toks[k] == dense_tokens[k]:
                k += 1
            row.agree_with_dense = k
        if ref_ids:
            _report(progress, gen_share, f"{name}: perplexity")
            t0 = time.perf_counter()
            row.perplexity = engine.perplexity(ref_ids, chunk=len(ref_ids) - 1)
            row.ms_perplexity = (time.perf_counter() - t0) * 1e3
        _report(progress, 1.0, f"{name}: done")
        return row, toks, trace
    finally:
        engine.close()
        del engine
        _free_mlx()


def default_flash_model(progress: Optional[ProgressCallback] = None) -> Path:
    """The default model's flash folder, prepared (converted, calibrated) when it is not yet."""
    return default_model.ensure_default_flash(progress=progress)


def _load_probe(probe, directory: Path, probe_kwargs: Optional[Dict[str, Any]],
                progress: Optional[ProgressCallback], notes: List[str]):
    if probe is None or probe is False:
        return None
    if isinstance(probe, ProbeResult):
        return probe
    try:
        return cached_probe(directory, progress=progress, **(probe_kwargs or {}))
    except Cancelled:
        raise
    except (OSError, ValueError) as e:
        notes.append(f"disk probe unavailable: {e}")
        return None


def shape_model_name(sp: Shape, layers: int, seed: int = 0) -> str:
    """The folder name of :func:`ensure_shape_model`'s model of ``sp`` with ``layers`` layers."""
    q = "" if sp.bits is None else f"-q{sp.bits}g{sp.group_size}"
    return f"{sp.name}-h{sp.hidden}-f{sp.ffn}{q}-{sp.dtype}-{layers}L-s{seed}.flash"


def _shape_matches(path: Path, sp: Shape, layers: int) -> bool:
    try:
        m = open_flash(path).manifest
    except FlashFormatError:
        return False
    q = role_quantization(m)
    want = {} if sp.bits is None else {r: (sp.bits, sp.group_size) for r in ("gate", "up", "down")}
    return ((m.hidden_size, m.intermediate_size, m.num_layers, m.dtype) == (sp.hidden, sp.ffn, layers, sp.dtype)
            and {r: (v["bits"], v["group_size"]) for r, v in q.items()} == want
            and (sp.bits is None or ffn_groups(m) is not None))


def ensure_shape_model(shape: Union[str, Shape] = "7b", gib: float = 2.0, *, root: Optional[PathLike] = None,
                       seed: int = 0, progress: Optional[ProgressCallback] = None) -> Path:
    """A flash folder with ``shape``'s FFN dimensions and as many layers as fit
    ``gib`` GiB of ffn.bin, random weights; generated once (layer by layer through
    :func:`~mlx_flash.storage.format.write_flash`, the converters' writer) under ``root``
    (default ``data_dir()/bench``) and reused. Only its FFN is meant to be used.

    A quantized shape (``Shape.bits``) is written as a quantized checkpoint is converted:
    each layer's random float weights quantized by ``mx.quantize`` (affine, ``group_size``
    along each matrix's input dimension, as mlx-lm stores them) and handed to ``write_flash``,
    which keeps gate/up rows as they are and down's codes per neuron with its group scales
    resident (format v3, ``storage.format.GROUPS_ALONG_FFN``)."""

    sp = SHAPES[shape] if isinstance(shape, str) else shape
    layers = sp.layers_for(gib)
    base = Path(root).expanduser() if root is not None else data_dir() / "bench"
    path = base / shape_model_name(sp, layers, seed)
    if (path / "manifest.json").is_file() and _shape_matches(path, sp, layers):
        return path
    dt = getattr(mx, sp.dtype)
    heads = max(1, sp.hidden // 128)
    config: Dict[str, Any] = {
        "model_type": "llama",
        "hidden_size": sp.hidden,
        "num_hidden_layers": layers,
        "intermediate_size": sp.ffn,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": 32,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "mlx_flash_bench_shape": sp.name,
    }
    if sp.bits is not None:
        config["quantization"] = {"group_size": sp.group_size, "bits": sp.bits}
    weights: Dict[str, Any] = {"model.norm.weight": mx.ones((sp.hidden,), dtype=dt)}
    for i in range(layers):  # lazy: write_flash evaluates (and frees) one layer at a time
        k = mx.random.split(mx.random.key(seed * 100003 + i), 3)
        pre = f"model.layers.{i}.mlp"
        mats = {"gate_proj": mx.random.normal((sp.ffn, sp.hidden), dtype=dt, key=k[0]) * sp.hidden**-0.5,
                "up_proj": mx.random.normal((sp.ffn, sp.hidden), dtype=dt, key=k[1]) * sp.hidden**-0.5,
                "down_proj": mx.random.normal((sp.hidden, sp.ffn), dtype=dt, key=k[2]) * sp.ffn**-0.5}
        for mod, w in mats.items():
            if sp.bits is None:
                weights[f"{pre}.{mod}.weight"] = w
            else:
                wq, sc, bi = mx.quantize(w, group_size=sp.group_size, bits=sp.bits)
                weights.update({f"{pre}.{mod}.weight": wq, f"{pre}.{mod}.scales": sc, f"{pre}.{mod}.biases": bi})
    return write_flash(path, config=config, weights=weights,
                       source=f"random weights, {sp.name} FFN shape, {sp.label} (mlx-flash bench)",
                       progress=progress, overwrite=path.exists())


def _trace_path(model_name: str) -> Path:
    return data_dir() / "bench" / "traces" / f"{model_name}.npz"


def _replay_policy(cfg: FlashConfig, cache, reader, chooser, freqs: Optional[np.ndarray]) -> PolicyInfo:
    """The cache policy the engine would run for this chooser (``FlashConfig.policy``; "auto"
    resolved by ``neuron_cache.resolve_auto_policy`` with the engine's inputs: the chooser's
    density, the reader's read model), its hot neurons pinned and read once (not per token)."""
    from ..engine import _chooser_density  # noqa: PLC0415 - the engine imports mlx-lm (seconds): not at CLI start

    if cfg.policy == "auto":
        density, recall = _chooser_density(chooser)
        policy, info = resolve_auto_policy(freqs, cache.layers[0].capacity, cfg.window, hot_fraction=cfg.hot_fraction,
                                           read_model=ReadModel.of_reader(reader, cache.scratch_neurons),
                                           density=density, recall=recall)
    else:
        if cfg.policy in ("hot", "hot+window") and freqs is None:
            raise ValueError(f"cache policy {cfg.policy!r} needs neuron frequencies (a calibrated source model)")
        policy = CachePolicy.make(cfg.policy, cfg.hot_fraction)
        info = PolicyInfo.of(policy, "asked for", "config")

    def fill(layer: int, plan) -> None:
        reader.read(layer, plan.load_ids, plan.load_dest)

    pinned = cache.apply_policy(policy, freqs, fill=fill)
    return replace(info, asked=cfg.policy, window=cfg.window, capacity=cache.layers[0].capacity,
                   pinned=int(sum(len(p) for p in pinned)), preload_bytes=int(cache.stats.preload_bytes))


def _run_replay(name: str, files, trace, cfg: FlashConfig, tokens: int, warmup: int, probe,
                progress: Optional[ProgressCallback], seed: int = 0,
                frequencies: Optional[np.ndarray] = None) -> BenchRow:
    """Drive one SparseFFN per layer of ``files`` with random inputs: every neuron
    (naive) or the trace's active sets (replayed oracle), built as the engine builds a flash
    model's FFNs (quantized rows and resident down group scales of a quantized folder, its
    compute dtype, the budget less the resident group scales, the scratch the engine gives it)
    under the cache policy the engine would pick (``frequencies``: per-layer activation
    frequencies in ``files``' neuron order, for pinning hot neurons; None: no calibration)."""

    from ..engine import _layer_groups, reader_max_gap  # noqa: PLC0415 - the engine imports mlx-lm (seconds)

    m = files.manifest
    threads, chunk = cfg.threads, cfg.chunk_bytes
    if not threads or not chunk:
        t, c = load_cached_choice(files.root)
        threads, chunk = threads or t, chunk or c
    dt = getattr(mx, m.dtype)
    quant = role_quantization(m)
    cdtype = compute_dtype(dt) if quant else None
    replay = name.startswith(ORACLE)
    chooser = ReplayChooser(trace) if replay else AllNeurons(m.intermediate_size)
    counters = FFNCounters()
    budget = max(0, cfg.budget_bytes(m.ffn_bytes_total) - group_quant_bytes(m))  # group scales: resident
    cache = NeuronCache.from_budget(
        n_layers=m.num_layers, n_neurons=m.intermediate_size, bundle_elems=m.bundle_elems,
        bundle_bytes=m.bundle_bytes, dtype=dt, budget_bytes=budget, window=cfg.window,
        scratch_neurons=scratch_rows(budget, m.bundle_bytes, cfg.scratch_neurons), lazy=cfg.policy != "window",
        layout=bundle_segments(m), pipeline=cfg.pipeline, pipeline_depth=cfg.pipeline_depth)
    reader = FlashReader(files, threads=threads, chunk_bytes=chunk,
                         max_gap_bytes=reader_max_gap(files.root, cfg, threads), direct=cfg.direct_io)
    prefetcher = None
    try:
        policy_info = _replay_policy(cfg, cache, reader, chooser, frequencies)
        groups = _layer_groups(files)
        ffns = [SparseFFN(i, m.hidden_size, chooser, cache.layers[i], reader, cache.scratch,
                          counters, act="silu", layout=bundle_layout(m), quant=quant, compute_dtype=cdtype,
                          groups=groups[i]) for i in range(m.num_layers)]
        if cfg.pipeline:  # the replayed sets are what the lookahead picks too: a perfect lookahead
            prefetcher = attach_pipeline(ffns, cache, reader)
        drop_page_cache(files.ffn_path)
        _free_mlx()
        key = mx.random.key(seed)
        mx.reset_peak_memory()
        reader.reset_totals()  # the pinned rows' one-time read is not a token's
        stats: List[Stats] = []
        mode = f"flash-{chooser.name}"
        for t in range(tokens):
            key, sub = mx.random.split(key)
            xs = mx.random.normal((m.num_layers, 1, m.hidden_size), dtype=cdtype or dt, key=sub)
            mx.eval(xs)
            if isinstance(chooser, ReplayChooser):  # replay
                chooser.token = t
            before = FFNCounters(**counters.__dict__)
            t0 = time.perf_counter()
            for i, ffn in enumerate(ffns):
                ffn(xs[i])  # SparseFFN evaluates its output
            ms = (time.perf_counter() - t0) * 1e3
            d = FFNCounters(**{k: getattr(counters, k) - getattr(before, k) for k in counters.__dict__})
            stats.append(Stats(
                token_index=t, ms_total=ms, ms_predictor=d.predictor_s * 1e3, ms_io=d.io_s * 1e3,
                ms_compute=max(0.0, ms - (d.predictor_s + d.io_s) * 1e3), ms_prefetch=d.prefetch_s * 1e3,
                ms_overlap=d.overlap_s * 1e3, bytes_read=d.bytes_read,
                bytes_useful=d.bytes_useful, neurons_active=d.neurons_active, neurons_loaded=d.neurons_loaded,
                neurons_streamed=d.neurons_streamed,
                hit_rate=(d.neurons_hit / d.neurons_active) if d.neurons_active else 1.0,
                resident_bytes=cache.resident_bytes + cache.scratch_bytes, cache_bytes=cache.resident_bytes,
                budget_bytes=cache.budget_bytes, peak_memory=mx.get_peak_memory(),
                process_rss=_rss(), mode=mode))
            if t + 1 == warmup:
                reader.reset_totals()
            _report(progress, (t + 1) / tokens, f"{name}: token {t + 1}/{tokens}")
        reads = reader.reset_totals()
        s = summarize(stats, warmup)
        row = BenchRow(name=name, source=REPLAYED, **s)
        row.policy = _jsonable(replace(policy_info, compute_dtype=str(cdtype or dt).rsplit(".", 1)[-1],
                                       ffn_quantization={r: f"{q['bits']}b/g{q['group_size']}"
                                                         for r, q in quant.items()},
                                       pipeline=prefetcher is not None,
                                       staging_neurons=cache.staging_neurons).to_dict())
        row.preload_bytes = int(cache.stats.preload_bytes)
        row.pipeline = prefetcher is not None
        row.lookahead = _jsonable(prefetcher.info()) if prefetcher is not None else None
        row.threads, row.chunk_bytes, row.read_mode = reader.threads, reader.chunk_bytes, reader.mode
        _io_figures(row, reads, probe)
        _reader_figures(row, reader, reads, probe, tokens - warmup)
        return row
    finally:
        if prefetcher is not None:
            prefetcher.close()
        reader.close()
        del cache
        _free_mlx()


def _rss() -> int:
    return process_rss()
