"""The speed test's orchestration: :func:`run_bench` and its stages.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..config import FlashConfig
from ..neuron_order import permute_trace
from ..predictor import PredictorError, load_frequencies
from ..progress import Cancelled, ProgressCallback, scaled
from ..progress import report as _report
from ..storage.format import group_quant_bytes, open_flash
from ..traces import Trace, record
from .order import shape_hot_order
from .quant import (
    replay_reads,
    run_agreement,
)
from .records import (
    _ACTIVE,
    _DENSE_ROWS,
    CONFIGS,
    DEFAULT_POLICY_BUDGETS,
    DEFAULT_PPL_TOKENS,
    DEFAULT_PROMPT,
    DENSE,
    DENSE_BF16,
    NAIVE,
    ORACLE,
    PREDICTOR,
    SHAPES,
    BenchReport,
    PathLike,
    PolicyPoint,
    Shape,
    SweepPoint,
    _policy_point,
    _sweep_point,
    canonical_config,
    compute_ratios,
    shape_io_ratios,
)
from .report import (
    _standard_notes,
)
from .runners import (
    _free_mlx,
    _load_probe,
    _physical_memory,
    _prompt_for,
    _run_real,
    _run_replay,
    _Skip,
    _trace_path,
    _twin_name,
    ensure_shape_model,
    machine_info,
    reference_text,
)


def _parse_configs(configs: Optional[Iterable[str]]) -> List[str]:
    if configs is None:
        return list(CONFIGS)
    chosen = {canonical_config(c) for c in configs}
    return [c for c in CONFIGS if c in chosen]


def run_bench(
    model_path: PathLike,
    *,
    budget: float = FlashConfig.budget,
    tokens: int = 64,
    configs: Optional[Sequence[str]] = None,
    progress: Optional[ProgressCallback] = None,
    prompt: Any = None,
    warmup: int = 1,
    flash_config: Optional[FlashConfig] = None,
    sweep: Optional[Sequence[float]] = None,
    sweep_configs: Optional[Sequence[str]] = None,
    shape: Optional[Union[str, Shape]] = None,
    shape_gib: float = 2.0,
    shape_tokens: Optional[int] = None,
    shape_root: Optional[PathLike] = None,
    trace: Any = None,
    probe: Any = True,
    probe_kwargs: Optional[Dict[str, Any]] = None,
    ppl_tokens: int = DEFAULT_PPL_TOKENS,
    reference: Optional[str] = None,
    seed: int = 0,
    policies: Optional[Sequence[str]] = None,
    policy_budgets: Sequence[float] = DEFAULT_POLICY_BUDGETS,
    policy_active: str = FlashConfig.active,
    pipeline_twins: bool = True,
    agreement_prompts: int = 0,
    agreement_tokens: int = 16,
) -> BenchReport:
    """Run the speed test on the flash folder ``model_path``; return a :class:`BenchReport`.

    budget:    FFN memory budget of the flash rows (fraction of the FFN bytes when
               <= 1, else bytes), as ``FlashConfig.budget``.
    tokens:    generated tokens per configuration (greedy; end-of-sequence ignored);
               the first ``warmup`` (>= 1) are left out of the per-token figures.
    configs:   names or aliases among dense / naive / oracle / predictor / gate / auto (default
               all; predictor and gate-first are skipped with a note when the model's
               calibration lacks them; auto is what ``FlashConfig.active = "auto"`` picks).
    progress:  ``callback(fraction, message)``; returning False cancels (``Cancelled``).
    prompt:    a string, token ids or chat messages (default :data:`DEFAULT_PROMPT`).
    flash_config: window, sparsity, threads, chunk_bytes, ... for the flash rows
               (``budget`` and ``active`` are set per row).
    sweep:     budgets (fractions) for the tokens/s-vs-budget sweep (none: no sweep);
               ``sweep_configs`` (default naive + oracle + predictor where measured).
    shape:     ``"7b"`` (or a :class:`Shape`): add naive/oracle rows replayed on a
               random model of that FFN shape with ``shape_gib`` GiB of FFN, driven by
               the active sets the flash-oracle run recorded (or ``trace``: a Trace
               or a path); ``shape_tokens`` tokens (default: ``tokens``, at most the
               trace's length: one per generated token after the first, which the
               prompt's last chunk computes).
    probe:     True: the disk's cached probe (measured once per machine,
               ``probe_kwargs`` go to ``cached_probe``); a ProbeResult; False: none.
    ppl_tokens: tokens of the reference text for perplexity (0: no perplexity);
               ``reference`` replaces ``resources/reference.txt``.
    policies:  cache policies to compare (e.g. :data:`POLICIES`; "auto" is added) at each
               of ``policy_budgets``, with the ``policy_active`` neuron choice (default
               the engine's: predictor when calibrated): hit rate, bytes per token,
               tokens/s, and which one "auto" picks and why.
    pipeline_twins: each flash row is run a second time with pipelined layers the other
               way (``FlashConfig.pipeline``): ``"<name> (pipelined)"`` or ``"<name> (serial)"``,
               no perplexity (the outputs are the same), side by side.
    agreement_prompts: greedy agreement with dense over the first N prompts of
               :func:`agreement_prompt_set` (0: none), ``agreement_tokens`` tokens each: per
               row, the tokens generated before the first divergence, averaged.
    """
    t_start = time.perf_counter()
    path = _checked_path(model_path, tokens, warmup)
    names = _parse_configs(configs)
    files = open_flash(path)
    m = files.manifest
    base = flash_config or FlashConfig()
    # flash rows run the flash engine whatever the budget ("auto" would run a 100% budget dense)
    cfg_main = replace(base, budget=float(budget), engine="flash")
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    sweep = [float(b) for b in (sweep or [])]
    shape_obj = (SHAPES[shape] if isinstance(shape, str) else shape) if shape else None
    if isinstance(shape, str) and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")

    rep = BenchReport(
        model=str(path), model_name=path.name, budget=float(budget),
        budget_bytes=cfg_main.budget_bytes(m.ffn_bytes_total),
        ffn_bytes=m.ffn_bytes_total, group_quant_bytes=group_quant_bytes(m), tokens=tokens, warmup=warmup,
        prompt=prompt, prompt_tokens=0,
        config=cfg_main.to_dict(), machine=machine_info(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    pol_list = list(dict.fromkeys([*policies, "auto"])) if policies else []
    bounds = _stage_bounds(probe, names, pipeline_twins, agreement_prompts, agreement_tokens, tokens, sweep,
                           pol_list, policy_budgets, shape_obj is not None)

    def stage(s_name: str) -> Optional[ProgressCallback]:
        lo, hi = bounds[s_name]
        return scaled(progress, lo, hi)

    # ---- disk probe (once per machine; the engine's threads/chunk come from it)
    probe_res = None
    if "probe" in bounds:
        probe_res = _load_probe(probe, path.parent, probe_kwargs, stage("probe"), rep.notes)
    rep.probe = probe_res
    run = _Run(path, files, cfg_main, prompt, tokens, warmup, probe_res, stage)

    ref_ids = _reference_ids(path, ppl_tokens, reference)
    rep.perplexity_tokens = len(ref_ids) - 1 if ref_ids else 0
    recorded = _run_configs(run, rep, names, ref_ids, pipeline_twins, explicit=configs is not None)
    rep.prompt_tokens = max((r.prompt_tokens for r in rep.rows), default=0)
    if agreement_prompts > 0:
        run_agreement(rep, path, cfg_main, agreement_prompts, agreement_tokens, stage("agreement"))
    if recorded is not None:
        rep.trace = {**recorded.summary(), "model": path.name}
    if sweep:
        _run_sweep(run, rep, sweep, sweep_configs, budget)
    if pol_list:
        _run_policies(run, rep, pol_list, policy_budgets, policy_active)
    if shape_obj is not None:
        tr_obj = _shape_trace(run, rep, trace, recorded)
        _run_shape(run, rep, shape_obj, tr_obj, shape_gib, shape_tokens, shape_root, seed, pipeline_twins)
    _finish(rep, files, t_start)
    _report(progress, 1.0, "bench done")
    return rep


@dataclass(frozen=True)
class _Run:
    """What every stage of one :func:`run_bench` shares: the folder, the main configuration,
    the prompt and token counts, the probe, and the progress bar's stage slices."""

    path: Path
    files: Any
    cfg_main: FlashConfig
    prompt: Any
    tokens: int
    warmup: int
    probe: Any
    stage: Callable[[str], Optional[ProgressCallback]]


def _checked_path(model_path: PathLike, tokens: int, warmup: int) -> Path:
    """The flash folder, after checking it and the token counts."""
    from ..engine import is_flash_dir  # noqa: PLC0415 - the engine imports mlx-lm (seconds): not at CLI start

    path = Path(model_path).expanduser()
    if not is_flash_dir(path):
        raise ValueError(f"{path} is not a flash model folder (no manifest.json); convert it first: "
                         f"mlx-flash convert {path} {path.name}.flash")
    if tokens < 2:
        raise ValueError(f"tokens must be >= 2, got {tokens}")
    if not 1 <= warmup < tokens:
        raise ValueError(f"warmup must be in [1, tokens), got {warmup}")
    return path


def _stage_bounds(probe: Any, names: List[str], pipeline_twins: bool, agreement_prompts: int,
                  agreement_tokens: int, tokens: int, sweep: List[float], pol_list: List[str],
                  policy_budgets: Sequence[float], shape: bool) -> Dict[str, Tuple[float, float]]:
    """The stages and their share of the progress bar: ``{stage: (start, end)}`` fractions."""
    stages: List[Tuple[str, float]] = []
    if probe is not None and probe is not False:
        stages.append(("probe", 1.0))
    stages += [(n, 1.0 if n in _DENSE_ROWS or not pipeline_twins else 1.7) for n in names]
    if agreement_prompts > 0:
        stages.append(("agreement", 0.3 * len(names) * agreement_prompts * agreement_tokens / max(1, tokens)))
    stages += [("sweep", 0.6 * len(sweep) * 2)] if sweep else []
    for pname in pol_list:
        if pname not in FlashConfig.POLICY_CHOICES:
            raise ValueError(f"unknown cache policy {pname!r}; known: {', '.join(FlashConfig.POLICY_CHOICES)}")
    stages += [("policies", 0.6 * len(pol_list) * len(policy_budgets))] if pol_list else []
    if shape:
        stages += [("shape-build", 1.0), ("shape-naive", 1.5), ("shape-oracle", 1.0)]
    total = sum(w for _, w in stages)
    acc, bounds = 0.0, {}
    for s_name, w in stages:
        bounds[s_name] = (acc / total, (acc + w) / total)
        acc += w
    return bounds


def _reference_ids(path: Path, ppl_tokens: int, reference: Optional[str]) -> Optional[List[int]]:
    """The reference text's first ``ppl_tokens + 1`` token ids (None: no perplexity)."""
    ref_ids: Optional[List[int]] = None
    if ppl_tokens and ppl_tokens > 0:
        from mlx_lm.utils import load_tokenizer  # noqa: PLC0415 - mlx-lm (seconds to import): not at CLI start

        tok = load_tokenizer(path)
        text = reference if reference is not None else reference_text()
        ids: List[int] = []
        for cut in (ppl_tokens * 12, len(text)):  # encode a prefix: long enough, no over-length warnings
            ids = list(tok.encode(text[:cut], add_special_tokens=False))
            if len(ids) > ppl_tokens + 1 or cut >= len(text):
                break
        ref_ids = ids[: ppl_tokens + 1]
        if len(ref_ids) < 2:
            ref_ids = None
    return ref_ids


def _run_configs(run: _Run, rep: BenchReport, names: List[str], ref_ids: Optional[List[int]],
                 pipeline_twins: bool, explicit: bool) -> Any:
    """The real-model configurations (and their pipelined twins), appended to ``rep.rows``;
    returns the flash oracle's recorded trace (or None). ``explicit``: the caller named the
    configurations (a skipped dense bfloat16 row is then reported)."""
    path, m, cfg_main = run.path, run.files.manifest, run.cfg_main
    prompt, tokens, warmup, probe_res = run.prompt, run.tokens, run.warmup, run.probe
    fits = True
    dense_estimate = m.ffn_bytes_total + run.files.dense_path.stat().st_size
    phys = _physical_memory()
    if phys and dense_estimate > 0.75 * phys:
        fits = False
    dense_tokens: Optional[List[int]] = None
    recorded = None
    for n in names:
        cb = run.stage(n)
        if n == DENSE and not fits:
            rep.skipped.append({"name": n, "reason": f"the whole model ({dense_estimate / 1e9:.1f} GB) does not fit "
                                                     f"in memory ({phys / 1e9:.1f} GB)"})
            _report(cb, 1.0, "dense skipped")
            continue
        if n == DENSE_BF16 and not m.quantized:  # dense is the float model already; said only when asked for
            if explicit:
                rep.skipped.append({"name": n, "reason": "the folder stores float bundles: dense is the float model"})
            _report(cb, 1.0, f"{n} skipped")
            continue
        cfg = replace(cfg_main, active=_ACTIVE.get(n, "oracle"))
        two = pipeline_twins and n not in _DENSE_ROWS  # a twin with the pipeline the other way follows
        try:
            row, toks, tr = _run_real(n, path, cfg, prompt, tokens, warmup, ref_ids, probe_res,
                                      scaled(cb, 0.0, 0.6) if two else cb,
                                      record=n not in _DENSE_ROWS, dense_tokens=dense_tokens)
        except _Skip as e:
            rep.skipped.append({"name": n, "reason": str(e)})
            _report(cb, 1.0, f"{n} skipped")
            continue
        if n == DENSE:
            dense_tokens = toks
        if tr is not None and n == ORACLE:
            recorded = tr
        if tr is not None and m.quantized:
            replay_reads(row, tr, run.files, cfg)
        rep.rows.append(row)
        if two:
            cfg_t = replace(cfg, pipeline=not cfg.pipeline)
            trow, ttoks, _ = _run_real(_twin_name(n, cfg_t.pipeline), path, cfg_t, prompt, tokens, warmup, None,
                                       probe_res, scaled(cb, 0.6, 1.0), dense_tokens=dense_tokens)
            trow.perplexity = row.perplexity  # same outputs, by construction (checked here)
            (row if row.pipeline else trow).same_as_serial = ttoks == toks
            rep.rows.append(trow)
    return recorded


def _run_sweep(run: _Run, rep: BenchReport, sweep: List[float], sweep_configs: Optional[Sequence[str]],
               budget: float) -> None:
    """The budget sweep: tokens/s etc. per (configuration, budget), into ``rep.sweep``."""
    m = run.files.manifest
    measured = {r.name for r in rep.rows}
    sc = _parse_configs(sweep_configs) if sweep_configs is not None else [NAIVE, ORACLE, PREDICTOR]
    sc = [c for c in sc if c != DENSE and (c in measured or sweep_configs is not None)]
    sc = [c for c in sc if c not in {s["name"] for s in rep.skipped}]
    cb = run.stage("sweep")
    pts = [(c, b) for b in sweep for c in sc]
    for k, (c, b) in enumerate(pts):
        sub = scaled(cb, k / len(pts), (k + 1) / len(pts))
        existing = rep.row(c)
        if existing is not None and abs(b - budget) < 1e-9:
            rep.sweep.append(_sweep_point(c, b, existing))
            continue
        cfg = replace(run.cfg_main, budget=b, active=_ACTIVE[c])
        try:
            row, _, _ = _run_real(c, run.path, cfg, run.prompt, run.tokens, run.warmup, None, run.probe, sub)
            rep.sweep.append(_sweep_point(c, b, row))
        except Cancelled:
            raise
        except (ValueError, _Skip) as e:  # e.g. a budget too small for the scratch buffer
            rep.sweep.append(SweepPoint(config=c, budget=b, budget_bytes=cfg.budget_bytes(m.ffn_bytes_total),
                                        error=str(e)))
    _report(cb, 1.0, "sweep done")


def _run_policies(run: _Run, rep: BenchReport, pol_list: List[str], policy_budgets: Sequence[float],
                  policy_active: str) -> None:
    """The cache policies, side by side at a few budgets, into ``rep.policies``."""
    m = run.files.manifest
    cb = run.stage("policies")
    rep.policy_active = policy_active
    pts = [(pname, float(b)) for b in policy_budgets for pname in pol_list]
    for k, (pname, b) in enumerate(pts):
        sub = scaled(cb, k / len(pts), (k + 1) / len(pts))
        cfg = replace(run.cfg_main, budget=b, policy=pname, active=policy_active)
        try:
            row, _, _ = _run_real(f"policy {pname}", run.path, cfg, run.prompt, run.tokens, run.warmup, None,
                                  run.probe, sub)
            rep.policies.append(_policy_point(pname, b, row))
        except Cancelled:
            raise
        except (ValueError, _Skip) as e:  # e.g. hot policies on a model without frequencies
            rep.policies.append(PolicyPoint(policy=pname, budget=b,
                                            budget_bytes=cfg.budget_bytes(m.ffn_bytes_total), error=str(e)))
    _report(cb, 1.0, "policies done")


def _shape_trace(run: _Run, rep: BenchReport, trace: Any, recorded: Any) -> Trace:
    """The active sets the large-shape rows replay: ``trace`` (a Trace or a path), else this run's
    flash-oracle recording (saved for later runs), else an earlier run's, else a fresh recording."""
    path = run.path
    if trace is not None:
        tr_obj = trace if isinstance(trace, Trace) else Trace.load(trace)
    elif recorded is not None and len(recorded):
        tr_obj = recorded
    elif _trace_path(path.name).is_file():
        tr_obj = Trace.load(_trace_path(path.name))
        rep.notes.append(f"replayed trace loaded from {_trace_path(path.name)} (recorded by an earlier run)")
    else:
        from ..engine import load  # noqa: PLC0415 - the engine imports mlx-lm (seconds): not at CLI start

        cfg = replace(run.cfg_main, active="oracle")
        eng = load(path, cfg)
        try:
            eng.tokenizer.eos_token_ids = []
            tr_obj = record(eng, _prompt_for(eng, run.prompt), run.tokens)
        finally:
            eng.close()
            del eng
            _free_mlx()
    if recorded is not None and tr_obj is recorded:
        try:
            tr_obj.save(_trace_path(path.name))
        except OSError as e:  # pragma: no cover
            rep.notes.append(f"could not save the trace: {e}")
    rep.trace = {**tr_obj.summary(), "model": tr_obj.meta.get("model", path.name)}
    return tr_obj


def _shape_order(run: _Run, rep: BenchReport, tr_obj: Trace, strace: Trace) -> Tuple[Trace, Optional[np.ndarray], str]:
    """The scaled trace renumbered for the shape model's neurons in hot order on disk, as calibration
    orders a real model (``order.shape_hot_order``: the real model's calibrated frequencies), and
    the frequencies in that order (the cache policy's hot neurons). A real model without calibrated
    frequencies: the trace as scaled (random placement) and None."""
    try:
        freqs = load_frequencies(run.files)
    except PredictorError as e:
        freqs, why = None, str(e)
    else:
        why = "the real model has no calibrated frequencies"
    if freqs is None or freqs.shape != (tr_obj.n_layers, tr_obj.n_neurons):
        rep.notes.append(f"{why}: the shape's neurons stay at random places on disk and the cache policy has no "
                         "hot neurons")
        return strace, None, "random"
    perms, disk_freqs = shape_hot_order(tr_obj, strace, freqs)
    return permute_trace(strace, perms), disk_freqs, "hot"


def _run_shape(run: _Run, rep: BenchReport, shape_obj: Shape, tr_obj: Trace, shape_gib: float,
               shape_tokens: Optional[int], shape_root: Optional[PathLike], seed: int, pipeline_twins: bool) -> None:
    """The large-shape rows (replayed traces on a random model of ``shape_obj``'s FFN shape, its
    neurons in hot order on disk, under the cache policy the engine would pick)."""
    cfg_main, warmup, probe_res = run.cfg_main, run.warmup, run.probe
    spath = ensure_shape_model(shape_obj, shape_gib, root=shape_root, seed=seed, progress=run.stage("shape-build"))
    sfiles = open_flash(spath)
    sm = sfiles.manifest
    scaled_tr = tr_obj.scaled(sm.intermediate_size, sm.num_layers, seed=seed)
    strace, freqs, order = _shape_order(run, rep, tr_obj, scaled_tr)
    n_tok = min(shape_tokens or run.tokens, len(strace))
    if n_tok <= warmup:
        raise ValueError(f"the trace has {len(strace)} tokens: too few for {warmup} warm-up token(s)")
    label = f" ({shape_obj.name} shape)"
    for n, st in ((NAIVE, "shape-naive"), (ORACLE, "shape-oracle")):
        cb = run.stage(st)
        row = _run_replay(n + label, sfiles, strace, cfg_main, n_tok, warmup, probe_res,
                          scaled(cb, 0.0, 0.5) if pipeline_twins else cb, seed=seed, frequencies=freqs)
        row.group = f"{shape_obj.name} shape"
        rep.rows.append(row)
        if pipeline_twins:  # outputs are random-input FFN sums: not compared
            cfg_t = replace(cfg_main, pipeline=not cfg_main.pipeline)
            trow = _run_replay(_twin_name(n + label, cfg_t.pipeline), sfiles, strace, cfg_t, n_tok, warmup,
                               probe_res, scaled(cb, 0.5, 1.0), seed=seed, frequencies=freqs)
            trow.group = row.group
            rep.rows.append(trow)
    rep.shape = {
        "name": shape_obj.name, "hidden": sm.hidden_size, "ffn": sm.intermediate_size, "dtype": sm.dtype,
        "quantization": shape_obj.label, "format_version": sm.format_version,
        "layers": sm.num_layers, "ffn_bytes": sm.ffn_bytes_total, "bundle_bytes": sm.bundle_bytes,
        "group_quant_bytes": group_quant_bytes(sm), "order": order,
        "gib": shape_gib, "path": str(spath), "tokens": n_tok, "trace_scaling": strace.meta.get("scale_mode"),
        "source_layers": strace.meta.get("source_layers"), "scaled_sparsity": strace.sparsity,
        "scaled_reuse_last_token": strace.reuse(1), "io_ratios": shape_io_ratios(rep.rows),
    }


def _finish(rep: BenchReport, files: Any, t_start: float) -> None:
    """Ratios, the standard notes (first), the run's duration and the load average at the end."""
    rep.ratios = compute_ratios(rep.rows)
    rep.notes[:0] = _standard_notes(rep, files)
    rep.seconds = time.perf_counter() - t_start
    try:
        rep.machine["load_average_end"] = list(os.getloadavg())
    except (OSError, AttributeError):
        pass
