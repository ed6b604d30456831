"""`mlx-flash` command line: convert, generate, chat, models, probe (and more as they land)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import default_model, paths, platform_blas
from .atomic import atomic_write_text, clean_stale, destination_lock
from .bench import (
    DEFAULT_POLICY_BUDGETS,
    DEFAULT_PPL_TOKENS,
    POLICIES,
    SHAPES,
    TTFT_CONFIGS,
    TTFT_LENGTHS,
    default_flash_model,
    format_order,
    format_table,
    format_ttft,
    run_bench,
    run_order_bench,
    run_ttft,
    save_plots,
)
from .calibrate import DEFAULT_SPARSITY, DEFAULT_TOKENS, auto_tokens, calibrate
from .config import BUDGET_SYNTAX, FlashConfig, budget_as_text, parse_budget
from .library import convert_any, scan_library
from .moe.format import is_moe_flash_dir, open_moe_flash, verify_moe_checksums
from .neuron_order import order_flash
from .predictor import DEFAULT_RANK, DEFAULT_RECALL, RECALL_TARGETS
from .progress import Cancelled, tqdm_callback
from .relufy import RelufySettings, default_work_dir, relufy
from .stats import print_summary
from .storage.format import open_flash, verify_checksums
from .storage.probe import cached_probe
from .units import fmt_bytes


def _budget_arg(text: str) -> float:
    """argparse type of ``--budget``: :func:`mlx_flash.config.parse_budget`'s one syntax."""
    try:
        return parse_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _float_in(lo: float, hi: float, lo_open: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (lo < v if lo_open else lo <= v) or not v <= hi:
            raise argparse.ArgumentTypeError(f"must be {'more than' if lo_open else 'at least'} {lo:g} and at "
                                             f"most {hi:g}, got {text}")
        return v
    return parse


MAX_TEMPERATURE = 5.0  # the app's slider goes to 2; beyond ~5 sampling is noise

_DEFAULTS = FlashConfig()  # the engine's defaults, which the CLI's flags default to
_BUDGET_DEFAULT = budget_as_text(_DEFAULTS.budget)


def _add_model_args(p: argparse.ArgumentParser, flash_default: bool = False) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="model folder (mlx-lm/HF folder or .flash folder) or a name in the library; "
                        "default: the embedded SmolLM2-135M-Instruct, prepared on first use")
    p.add_argument("--flash", action="store_true", default=flash_default,
                   help="run through the flash engine (FFN weights read from disk)")
    p.add_argument("--budget", default=_BUDGET_DEFAULT, type=_budget_arg,
                   help="FFN memory budget (flash): " + BUDGET_SYNTAX.replace("%", "%%") + "; default "
                        + _BUDGET_DEFAULT.replace("%", "%%"))
    p.add_argument("--window", type=int, default=_DEFAULTS.window,
                   help="sliding window k in tokens (flash; default %(default)s)")
    p.add_argument("--policy", choices=FlashConfig.POLICY_CHOICES, default=_DEFAULTS.policy,
                   help="neuron cache policy (flash): auto (the default: on a calibrated model the measured best "
                        "share of pinned hot neurons, else lru), window (the paper's eager deletion), lru "
                        "(deferred deletion), hot (rows pinned with the most frequently active neurons, the "
                        "rest streamed), hot+window (--hot-fraction of the rows pinned, the rest lru)")
    p.add_argument("--hot-fraction", type=float, default=_DEFAULTS.hot_fraction, metavar="F",
                   help="share of each layer's cache rows pinned with hot neurons, 0..1 (hot+window, auto; "
                        "default: hot+window 0.5, auto measured)")
    p.add_argument("--threads", type=int, default=_DEFAULTS.threads,
                   help="parallel reads (0: from the disk probe; default %(default)s)")
    p.add_argument("--active", choices=FlashConfig.ACTIVE_CHOICES, default=_DEFAULTS.active,
                   help="active-neuron choice: auto (the default: on a calibrated model gate, predictor or "
                        "all, whichever reads the fewest bytes per token at oracle quality; else oracle), "
                        "all (naive flash), oracle, predictor, gate (gate-first: resident gate rows)")
    p.add_argument("--sparsity", type=float, default=_DEFAULTS.sparsity,
                   help="oracle / gate: target fraction of inactive FFN neurons (default: the calibrated "
                        "thresholds, else 0.5 for the oracle)")
    p.add_argument("--recall", type=float, default=None,
                   help="predictor: a calibrated recall target (0.9/0.95/0.99/0.995/0.999; default: calibration's)")
    p.add_argument("--no-direct-io", action="store_true", help="allow the page cache (figures not real)")
    p.add_argument("--engine", choices=FlashConfig.ENGINE_CHOICES, default=_DEFAULTS.engine,
                   help="auto: dense when the whole FFN fits the budget, else flash (flash folders)")
    p.add_argument("--pipeline", action="store_true",
                   help="pipelined layers: read the next layers' likely neurons while this one computes "
                        "(flash; depth + 1 staging buffers held outside the budget)")
    p.add_argument("--pipeline-depth", type=_positive_int, default=_DEFAULTS.pipeline_depth,
                   help="pipelined layers: how many layers ahead to read (default %(default)s)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=_positive_int, default=256, help="most tokens to generate (>= 1)")
    p.add_argument("--temp", type=_float_in(0.0, MAX_TEMPERATURE), default=0.0,
                   help=f"sampling temperature, 0..{MAX_TEMPERATURE:g} (0: greedy)")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, lo_open=True), default=1.0, help="nucleus sampling, (0, 1]")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt for chat templates")


def flash_config_from_args(args) -> FlashConfig:
    recall = args.recall
    return FlashConfig(
        budget=parse_budget(args.budget),
        window=args.window,
        policy=args.policy,
        hot_fraction=args.hot_fraction,
        threads=args.threads,
        active=args.active,
        sparsity=args.sparsity,
        direct_io=not args.no_direct_io,
        pipeline=args.pipeline,
        pipeline_depth=args.pipeline_depth,
        engine=args.engine,
        extra={"recall": recall} if recall is not None else {},
    )


def resolve_model(name: Optional[str], flash: bool, calibrate: bool = True) -> Path:
    """A path, a library name, or the default model (prepared with a progress bar;
    ``calibrate``: its flash form with predictors)."""
    if name:
        p = Path(name).expanduser()
        if p.exists():
            return p
        for cand in (paths.models_dir() / name, paths.models_dir() / f"{name}.flash"):
            if cand.exists():
                return cand
        raise FileNotFoundError(f"model not found: {name}")
    if flash:
        return default_model.ensure_default_flash(progress=tqdm_callback("Preparing default model"),
                                                  calibrate=calibrate)
    return default_model.ensure_default_mlx(progress=tqdm_callback("Preparing default model"))


def library_destination(dst: str) -> Path:
    """A bare name (no folder part) means a new model in the library: ``<models>/<name>.flash``;
    anything else is a path."""
    if os.sep in dst or (os.altsep and os.altsep in dst) or dst.startswith((".", "~")):
        return Path(dst).expanduser()
    name = dst if dst.endswith(".flash") else f"{dst}.flash"
    return paths.models_dir() / name


def load_engine(args):
    from .engine import load  # noqa: PLC0415 - the engine imports mlx-lm (seconds): only commands that load a model

    path = resolve_model(args.model, args.flash)
    from .engine import is_flash_dir  # noqa: PLC0415 - the engine imports mlx-lm (seconds): only commands that load a model

    if is_flash_dir(path) and not args.flash:
        # A flash folder without --flash: still the flash engine (it is what the folder is for).
        pass
    engine = load(path, flash_config_from_args(args))
    for note in engine.notes:
        print(f"[mlx-flash] warning: {note}", file=sys.stderr)
    if engine.engine_info is not None:
        info = engine.engine_info
        print(f"[mlx-flash] engine: {info.engine} ({info.reason})", file=sys.stderr)
    return engine


def print_new_notes(stats, engine, shown: set) -> None:
    """Stats notes beyond the engine's (printed at load), once each, to stderr."""
    for note in stats.notes:
        if note not in engine.notes and note not in shown:
            shown.add(note)
            print(f"[mlx-flash] warning: {note}", file=sys.stderr)


def cmd_generate(args) -> int:
    engine = load_engine(args)
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    if not args.raw:
        prompt = [{"role": "user", "content": prompt}]
    stats: list = []
    try:
        stream_printed(engine, prompt, args, stats)
        print()
        if args.verbose:
            print_summary(stats, engine=engine)
    finally:
        engine.close()
    return 0


def stream_printed(engine, prompt, args, stats: list, texts: Optional[list] = None) -> None:
    """Generate with the sampling flags in ``args``, printing the text as it streams (and the
    engine's notes, once, before it); ``stats`` (and ``texts``) fill up as tokens come, so a
    Ctrl-C keeps what was generated."""
    shown: set = set()
    for r in engine.stream_generate(prompt, args.max_tokens, temperature=args.temp, top_p=args.top_p,
                                    system=args.system, seed=args.seed):
        if not stats:
            print_new_notes(r.stats, engine, shown)
        print(r.text, end="", flush=True)
        if texts is not None:
            texts.append(r.text)
        stats.append(r.stats)


def cmd_chat(args) -> int:
    engine = load_engine(args)
    print(f"[mlx-flash] chatting with {engine.name} ({engine.mode}). /reset clears, /exit or Ctrl-D quits.",
          file=sys.stderr)
    messages: List[dict] = []
    while True:
        try:
            line = input(">> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = []
            print("[history cleared]", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        reply: List[str] = []
        stats: list = []
        try:
            stream_printed(engine, messages, args, stats, reply)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print()
        if stats:
            s = stats[-1]
            print(f"[{len(stats)} tokens, {s.tokens_per_s:.1f} tok/s, peak {s.peak_memory / 1e9:.3f} GB]",
                  file=sys.stderr)
            if args.verbose:
                print_summary(stats, engine=engine)
        messages.append({"role": "assistant", "content": "".join(reply)})
    engine.close()
    return 0


def cmd_convert(args) -> int:
    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()

    calibrate = dst.suffix == ".flash" and not args.no_calibrate
    out = convert_any(src, dst, dtype=args.dtype, progress=tqdm_callback(f"Converting {src.name}"),
                      overwrite=args.overwrite, calibrate=calibrate, down_bits=args.down_bits)
    print(f"wrote {out}" + (" (with activation predictors)" if calibrate else ""))
    return 0


def cmd_verify(args) -> int:
    from .engine import is_flash_dir  # noqa: PLC0415 - the engine imports mlx-lm (seconds): only commands that load a model

    path = resolve_model(args.model_path, True, calibrate=False)
    if is_moe_flash_dir(path):  # mixture-of-experts flash folder: experts.bin + dense.safetensors
        t0 = time.perf_counter()
        checked = verify_moe_checksums(open_moe_flash(path))
        print(f"ok: {path}: {', '.join(checked)} match the manifest's checksums ({time.perf_counter() - t0:.1f} s)")
        return 0
    if not is_flash_dir(path):
        print(f"error: {path} is not a flash folder (no manifest.json): only flash folders carry checksums",
              file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    checked = verify_checksums(open_flash(path), progress=tqdm_callback(f"Verifying {path.name}",
                                                                         disable=args.quiet))
    print(f"ok: {path}: {', '.join(checked)} match the manifest's checksums "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_models(args) -> int:
    models, broken = scan_library()
    if not models and not broken:
        print("no models yet (the default model is prepared on first use)")
    if models:
        print(f"{'NAME':40s} {'KIND':6s} {'ARCH':8s} {'SIZE':>12s}  PATH")
    for m in models:
        print(f"{m.name:40s} {m.kind:6s} {m.architecture:8s} {fmt_bytes(m.size_bytes):>12s}  {m.path}")
    for b in broken:  # listed, not fatal: the others stay usable
        print(f"warning: {b.reason} (not listed: {b.path})", file=sys.stderr)
    return 0


def cmd_probe(args) -> int:
    directory = Path(args.dir).expanduser() if args.dir else paths.models_dir()
    directory.mkdir(parents=True, exist_ok=True)
    result = cached_probe(directory, refresh=True, progress=tqdm_callback("Probing disk"))
    print(result.format_table())
    t, c = result.choose()
    print(f"engine default: {t} threads, {c // 1024} KiB chunks")
    return 0


def cmd_prepare(args) -> int:
    mlx_dir = default_model.ensure_default_mlx(progress=tqdm_callback("Converting GGUF"))
    calibrate = not args.no_calibrate
    if calibrate and default_model.calibration_problem(default_model.default_flash_dir()) is not None:
        print(f"{platform_blas.status()} (calibration's float32 matmuls run in numpy either way; "
              "the bar shows the time left, measured as it runs)")
    flash_dir = default_model.ensure_default_flash(progress=tqdm_callback("Preparing flash model"),
                                                   calibrate=calibrate, verify=True)
    cal = "with activation predictors" if default_model.is_calibrated(flash_dir) else "not calibrated"
    print(f"default model ready:\n  dense: {mlx_dir}\n  flash: {flash_dir} ({cal})")
    return 0


def cmd_calibrate(args) -> int:
    path = resolve_model(args.model_path, True, calibrate=False)
    if is_moe_flash_dir(path):  # MoE: expert frequencies (hot experts), routed on resources/reference.txt
        from .moe.engine import calibrate_reference  # noqa: PLC0415 - imports the engine (mlx-lm, seconds)

        with destination_lock(path):
            freqs = calibrate_reference(path, tokens=args.tokens or 512,
                                        progress=tqdm_callback(f"Calibrating {path.name}", disable=args.quiet))
        print(f"ok: {path}: expert frequencies of {freqs.shape[0]} MoE layers recorded "
              f"(most routed expert: {freqs.max():.0%} of tokens)")
        return 0
    with destination_lock(path):  # not while another process converts or calibrates it
        clean_stale(path.parent)  # what a killed calibration left in the folder (and next to it)
        rep = calibrate(path, sparsity=args.sparsity, rank=args.rank, text=args.text,
                        tokens=args.tokens or auto_tokens(),
                        recall=args.recall, epochs=args.epochs,
                        order=None if args.order == "keep" else args.order, split=not args.no_split,
                        progress=tqdm_callback(f"Calibrating {path.name}", disable=args.quiet))
    print(rep.summary())
    if args.json:
        atomic_write_text(args.json, json.dumps(rep.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_reorder(args) -> int:
    path = resolve_model(args.model_path, True, calibrate=False)
    t0 = time.perf_counter()
    done = order_flash(path, args.order, progress=tqdm_callback(f"Reordering {path.name}", disable=args.quiet))
    if done is None:
        print(f"{path}: already in the {args.order} order; nothing written")
        return 0
    o = open_flash(path).manifest.neuron_order
    how = (f"neurons ordered '{o['method']}' ({o.get('basis', '')})" if o else "neurons back in the source's order")
    print(f"ok: {path}: {how}; checksums verified ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate  # noqa: PLC0415 - the engine imports mlx-lm (seconds): only commands that load a model

    path = resolve_model(args.model_path, True)
    rep = evaluate(path, text=args.text, tokens=args.tokens, recall=args.recall, modes=args.modes.split(","),
                   progress=tqdm_callback(f"Evaluating {path.name}", disable=args.quiet))
    print(rep.format_table())
    if args.json:
        atomic_write_text(args.json, rep.to_json())
        print(f"wrote {args.json}")
    return 0


def _parse_sweep(text: str) -> List[float]:
    """"10,25,50,75,100" (percent), "10%,0.5" (fractions <= 1 stay fractions)."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if part.endswith("%"):
            out.append(float(part[:-1]) / 100.0)
        else:
            v = float(part)
            out.append(v / 100.0 if v > 1 else v)
    if not out or any(v <= 0 for v in out):
        raise ValueError(f"--sweep needs positive budgets, got {text!r}")
    return out


def _parse_policies(text: Optional[str]) -> Optional[List[str]]:
    """``--policies``: "all" (every named policy) or a comma-separated list; None: no comparison."""
    if not text:
        return None

    if text.strip() == "all":
        return list(POLICIES)
    return [t.strip() for t in text.split(",") if t.strip()]


def _cmd_bench_moe(args) -> int:
    """``bench --shape moe``: the MoE-shape replay (mlx_flash.moe.bench), its own report."""
    from .moe.bench import format_moe_table, run_moe_replay, save_moe_plots  # noqa: PLC0415 - imports the engine (mlx-lm)

    synthetic = [tuple(float(v) for v in p.split(":")) for p in args.moe_synthetic.split(",") if p.strip()]
    rep = run_moe_replay(
        gib=args.shape_gib, tokens=args.shape_tokens or 32, warmup=max(args.warmup, 8),
        budgets=_parse_sweep(args.moe_budgets), synthetic=synthetic,
        config=FlashConfig(window=args.window, threads=args.threads, direct_io=not args.no_direct_io),
        progress=tqdm_callback("MoE replay", disable=args.quiet))
    text = format_moe_table(rep)
    print(text)
    if args.json:
        print(f"wrote {rep.save_json(args.json)}", file=sys.stderr)
    if args.text:
        out = atomic_write_text(Path(args.text).expanduser(), text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    if args.plots:
        for p in save_moe_plots(rep, args.plots):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    if args.shape == "moe":
        return _cmd_bench_moe(args)

    if args.model:
        path = resolve_model(args.model, True)
    else:
        path = default_flash_model(progress=tqdm_callback("Preparing default model"))
    base = FlashConfig(window=args.window, threads=args.threads, sparsity=args.sparsity,
                       direct_io=not args.no_direct_io, pipeline=args.pipeline,
                       pipeline_depth=args.pipeline_depth)
    if args.order:
        return _bench_order(args, path, base)
    configs = [c for c in args.configs.split(",") if c.strip()] if args.configs else None
    if args.ttft_only:
        return _bench_ttft(args, path, base, configs, None)
    report = run_bench(
        path,
        budget=parse_budget(args.budget),
        tokens=args.tokens,
        configs=configs,
        progress=tqdm_callback("bench", disable=args.quiet),
        prompt=args.prompt,
        warmup=args.warmup,
        flash_config=base,
        sweep=_parse_sweep(args.sweep) if args.sweep else None,
        shape=args.shape,
        shape_gib=args.shape_gib,
        shape_tokens=args.shape_tokens,
        probe=not args.no_probe,
        ppl_tokens=args.ppl_tokens,
        policies=_parse_policies(args.policies),
        policy_budgets=_parse_sweep(args.policy_budgets),
        policy_active=args.policy_active,
        pipeline_twins=not args.no_twins,
        agreement_prompts=args.agreement_prompts,
        agreement_tokens=args.agreement_tokens,
    )
    text = format_table(report)
    print(text)
    if args.ttft:
        return _bench_ttft(args, path, base, configs, (report, text))
    if args.json:
        print(f"wrote {report.save_json(args.json)}", file=sys.stderr)
    if args.text:
        out = Path(args.text).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    if args.plots:
        for p in save_plots(report, args.plots):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def _bench_order(args, path: Path, base: FlashConfig) -> int:
    """``mlx-flash bench --order``: the neuron-order section alone (before/after)."""
    rep = run_order_bench(path, budget=parse_budget(args.budget), tokens=args.tokens, prompt=args.prompt,
                          flash_config=base, shape=args.shape or "7b",
                          progress=tqdm_callback("bench --order", disable=args.quiet))
    text = "\n".join(format_order(rep))
    print(text)
    if args.json:
        atomic_write_text(Path(args.json).expanduser(), json.dumps(rep, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.text:
        atomic_write_text(Path(args.text).expanduser(), text + "\n")
        print(f"wrote {args.text}", file=sys.stderr)
    return 0


def _bench_ttft(args, path, base: FlashConfig, configs, done) -> int:
    """The speed test's time-to-first-token section (``bench --ttft``), alone (``--ttft-only``)
    or after the main report (``done``: the report and its text): printed, and added to the
    --json / --text outputs (JSON: the report's fields plus ``ttft``)."""
    lengths = [int(x) for x in args.ttft.split(",") if x.strip()] if args.ttft else list(TTFT_LENGTHS)
    if configs is None or done is not None:
        configs = list(TTFT_CONFIGS)
    res = run_ttft(path, lengths=lengths, configs=configs, budget=parse_budget(args.budget),
                   repeats=args.ttft_repeats, flash_config=base,
                   progress=tqdm_callback("time to first token", disable=args.quiet))
    lines = format_ttft(res)
    print("\n".join(lines))
    data = done[0].to_dict() if done is not None else {}
    data["ttft"] = res
    text = (done[1] + "\n" if done is not None else "") + "\n".join(lines)
    if args.json:
        out = atomic_write_text(Path(args.json).expanduser(), json.dumps(data, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    if args.text:
        out = atomic_write_text(Path(args.text).expanduser(), text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    if args.plots and done is not None:
        for p in save_plots(done[0], args.plots):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def cmd_relufy(args) -> int:
    src = resolve_model(args.src, True)
    args.dst = str(library_destination(args.dst))
    settings = RelufySettings(sparsity=args.sparsity, act=args.act, tokens=args.tokens, text=args.text,
                              steps=args.steps, batch=args.batch, lr=args.lr, schedule=args.schedule,
                              compensate=args.compensate, e2e_steps=args.e2e_steps, seed=args.seed)
    try:
        rep = relufy(src, args.dst, settings=settings, work_dir=args.work_dir, overwrite=args.overwrite,
                     keep_work=args.keep_work, progress=tqdm_callback(f"ReLU-fying {src.name}", disable=args.quiet))
    except (KeyboardInterrupt, Cancelled):
        work = args.work_dir or default_work_dir(args.dst)
        print(f"stopped: finished layers are kept in {work}; run the same command again to continue",
              file=sys.stderr)
        raise
    print(rep.summary())
    if args.json:
        atomic_write_text(args.json, json.dumps(rep.to_dict(), indent=2))
        print(f"wrote {args.json}")
    print(f"wrote {args.dst}")
    if not args.no_calibrate:
        cal = calibrate(args.dst, tokens=auto_tokens(),
                        progress=tqdm_callback(f"Calibrating {Path(args.dst).name}", disable=args.quiet))
        print(cal.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-flash", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a completion for one prompt")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--prompt", "-p", required=True, help="the prompt ('-' reads stdin)")
    g.add_argument("--raw", action="store_true", help="no chat template")
    g.add_argument("--verbose", "-v", action="store_true", default=True)
    g.add_argument("--quiet", "-q", dest="verbose", action="store_false")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="multi-turn chat in the terminal")
    _add_model_args(c)
    _add_sampling_args(c)
    c.add_argument("--verbose", "-v", action="store_true")
    c.set_defaults(func=cmd_chat)

    cv = sub.add_parser("convert", help="convert a GGUF file or mlx-lm/HF folder (to mlx-lm or .flash)")
    cv.add_argument("src")
    cv.add_argument("dst", help="a folder ending in .flash gives the flash format, else an mlx-lm folder")
    cv.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                    help="dequantize every weight to this float dtype; by default quantized weights stay "
                         "quantized: a GGUF's in MLX affine, group 32 (Q4_x/Q4_K 4-bit, Q5_x/Q5_K/Q3_K 5-bit, "
                         "Q8_0/Q6_K 8-bit, Q2_K 3-bit), and a quantized folder's in the .flash bundles")
    cv.add_argument("--down-bits", type=int, default=None, choices=[4, 5, 6, 8],
                    help="quantized sources to .flash: re-quantize the down projection along hidden at these "
                         "bits (format version 2, e.g. 8) instead of keeping the source's own codes with "
                         "resident group scales (the default where the source allows it: exact, smaller)")
    cv.add_argument("--overwrite", action="store_true")
    cv.add_argument("--no-calibrate", action="store_true",
                    help="skip fitting the activation predictors (.flash destinations; "
                         "run `mlx-flash calibrate` later)")
    cv.set_defaults(func=cmd_convert)

    vf = sub.add_parser("verify", help="check a .flash model's files against its manifest's checksums "
                                       "(exit 0: intact, 1: corrupt; names the file and layer)")
    vf.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                    help="a .flash folder or library name (default: the embedded model)")
    vf.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    vf.set_defaults(func=cmd_verify)

    ms = sub.add_parser("models", help="list the models in the library")
    ms.set_defaults(func=cmd_models)

    pr = sub.add_parser("probe", help="measure this disk's read throughput (chunk size x threads)")
    pr.add_argument("--dir", default=None, help="a folder on the disk to probe (default: the model library)")
    pr.set_defaults(func=cmd_probe)
    b = sub.add_parser("bench", help="speed test: dense vs naive flash vs flash, one run (JSON, plots)")
    b.add_argument("--model", "-m", default=None,
                   help="a .flash folder or a library name (default: the embedded SmolLM2-135M-Instruct)")
    b.add_argument("--budget", default=_BUDGET_DEFAULT, type=_budget_arg,
                   help="FFN memory budget of the flash rows: " + BUDGET_SYNTAX.replace("%", "%%") + "; default "
                        + _BUDGET_DEFAULT.replace("%", "%%"))
    b.add_argument("--tokens", type=int, default=64, help="generated tokens per configuration (greedy)")
    b.add_argument("--warmup", type=int, default=1, help="first tokens left out of the per-token figures")
    b.add_argument("--configs", default=None,
                   help="comma-separated subset of dense,naive,oracle,predictor,gate,auto (default: all)")
    b.add_argument("--prompt", default=None, help="a raw prompt (default: a fixed chat question)")
    b.add_argument("--window", type=int, default=_DEFAULTS.window,
                   help="sliding window k in tokens (default %(default)s)")
    b.add_argument("--sparsity", type=float, default=_DEFAULTS.sparsity,
                   help="oracle / gate-first: fraction of inactive FFN neurons (default: the calibrated ones)")
    b.add_argument("--threads", type=int, default=_DEFAULTS.threads,
                   help="parallel reads (0: from the disk probe; default %(default)s)")
    b.add_argument("--no-direct-io", action="store_true", help="allow the page cache (figures not real)")
    b.add_argument("--sweep", default=None, help="budgets for the tokens/s-vs-budget sweep, e.g. 10,25,50,75,100")
    b.add_argument("--shape", default=None, choices=[*SHAPES, "moe"],
                   help="add naive/flash rows on a random model of this FFN shape, replaying the real model's traces; "
                        "moe: the MoE-shape replay alone (Qwen3-30B-A3B experts; --shape-gib, --shape-tokens, "
                        "--moe-budgets, --moe-synthetic)")
    b.add_argument("--moe-budgets", default="10,25,50", help="--shape moe: expert-cache budgets (%% of the experts)")
    b.add_argument("--moe-synthetic", default="1.0:0.3,0:0",
                   help="--shape moe: synthetic traces as zipf:repeat pairs (Zipf exponent of expert popularity, "
                        "probability a token keeps each previous expert)")
    b.add_argument("--shape-gib", type=float, default=2.0, help="size of the --shape model's FFN on disk (GiB)")
    b.add_argument("--shape-tokens", type=int, default=None, help="tokens replayed on the --shape model")
    b.add_argument("--policies", default=None,
                   help="compare neuron-cache policies: 'all' (window, lru, hot, hot+window, plus auto) "
                        "or a comma-separated list")
    b.add_argument("--policy-budgets", default=",".join(f"{x * 100:g}" for x in DEFAULT_POLICY_BUDGETS),
                   help="budgets (%%) of the policy comparison (default %(default)s)")
    b.add_argument("--policy-active", default=_DEFAULTS.active, choices=["auto", "all", "oracle", "predictor"],
                   help="neuron choice of the policy comparison (default %(default)s; auto: the predictor when "
                        "calibrated)")
    b.add_argument("--ppl-tokens", type=int, default=DEFAULT_PPL_TOKENS,
                   help="reference-text tokens for perplexity (0: none; default %(default)s)")
    b.add_argument("--no-probe", action="store_true", help="leave the disk probe out of the report")
    b.add_argument("--no-twins", action="store_true",
                   help="no second run of each flash row with pipelined layers the other way")
    b.add_argument("--pipeline", action="store_true",
                   help="the main flash rows with pipelined layers (their twins serial)")
    b.add_argument("--pipeline-depth", type=_positive_int, default=_DEFAULTS.pipeline_depth,
                   help="pipelined rows: how many layers ahead to read (default %(default)s)")
    b.add_argument("--agreement-prompts", type=int, default=0,
                   help="greedy agreement with dense over the first N prompts of resources/evaluation/prompts.txt "
                        "(24; 0: none): tokens until the first divergence, per row")
    b.add_argument("--agreement-tokens", type=_positive_int, default=16, help="greedy tokens per agreement prompt")
    b.add_argument("--order", action="store_true",
                   help="only the neuron-order section: reads per token with the neurons in the source's order "
                        "vs most frequently active first (oracle and predictor traces replayed; --shape too)")
    b.add_argument("--ttft", default=None, metavar="LENGTHS",
                   help="add the time-to-first-token section: prompt lengths in tokens, e.g. 16,128,1024 "
                        "(dense, naive, predictor, auto)")
    b.add_argument("--ttft-only", action="store_true",
                   help="only the time-to-first-token section (--ttft lengths, default 16,128,1024; "
                        "--configs chooses the configurations)")
    b.add_argument("--ttft-repeats", type=int, default=3, help="runs per prompt length and configuration (median)")
    b.add_argument("--json", default=None, help="write the report as JSON here")
    b.add_argument("--text", default=None, help="write the printed report (Markdown) here")
    b.add_argument("--plots", default=None, help="write PNG plots into this folder")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)

    pp = sub.add_parser("prepare", help="prepare the embedded default model (once; later runs reuse it): "
                                        "GGUF -> mlx-lm folder -> .flash with activation predictors")
    pp.add_argument("--no-calibrate", action="store_true", help="skip fitting the activation predictors")
    pp.set_defaults(func=cmd_prepare)


    ca = sub.add_parser("calibrate", help="fit activation thresholds and low-rank predictors for a .flash model")
    ca.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                    help="a .flash folder or library name (default: the embedded model)")
    ca.add_argument("--sparsity", type=float, default=DEFAULT_SPARSITY,
                    help=f"target fraction of inactive FFN neurons (default {DEFAULT_SPARSITY})")
    ca.add_argument("--rank", type=int, default=DEFAULT_RANK, help=f"predictor rank (default {DEFAULT_RANK})")
    ca.add_argument("--recall", type=float, default=None, choices=RECALL_TARGETS,
                    help=f"default recall target of the predictors (default {DEFAULT_RECALL}; "
                         "0.999 for ReLU-family models)")
    ca.add_argument("--text", default=None, help="a text file to calibrate on too (gets half the tokens)")
    ca.add_argument("--tokens", type=int, default=None,
                    help=f"calibration tokens in all (default {DEFAULT_TOKENS})")
    ca.add_argument("--epochs", type=int, default=0, help="Adam epochs of weighted-BCE refinement (default 0)")
    ca.add_argument("--no-split", action="store_true",
                    help="do not write gate-first's up/down side file ffn_updown.bin (~3/4 of ffn.bin more on "
                         "disk; written when gate-first keeps quality)")
    ca.add_argument("--json", default=None, help="write the calibration report as JSON here")
    ca.add_argument("--order", default="hot", choices=("hot", "source", "keep"),
                    help="then put each layer's neurons on disk most frequently active first (hot, the default: "
                         "fewer, longer reads), in the source model's order (source), or leave them (keep)")
    ca.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    ca.set_defaults(func=cmd_calibrate)

    ro = sub.add_parser("reorder", help="rewrite a calibrated .flash model with each layer's neurons in another "
                                        "order on disk (the same model; predictors and checksums follow)")
    ro.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                    help="a .flash folder or library name (default: the embedded model)")
    ro.add_argument("--order", default="hot", choices=("hot", "source"),
                    help="hot: most frequently active first (calibrated frequencies; the default); "
                         "source: the source model's order")
    ro.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    ro.set_defaults(func=cmd_reorder)

    ev = sub.add_parser("eval", help="perplexity, recall/precision, active fraction, bytes per token and window "
                                     "reuse: dense vs oracle vs predictor vs gate-first on real text")
    ev.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                    help="a .flash folder or library name (default: the embedded model)")
    ev.add_argument("--text", default=None, help="a text file (default: KJV Genesis, not calibration text)")
    ev.add_argument("--tokens", type=int, default=4096, help="tokens to evaluate (default 4096)")
    ev.add_argument("--recall", type=float, default=None, help="the predictors' recall target (default: calibration's)")
    ev.add_argument("--modes", default="dense,oracle,predictor,gate",
                    help="comma-separated: dense, oracle, predictor, gate (gate-first at the calibrated sparsity), "
                         "gate:0.3 (at another calibrated sparsity)")
    ev.add_argument("--json", default=None, help="write the report as JSON here")
    ev.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)


    rd = RelufySettings()
    rf = sub.add_parser("relufy", help="turn a SwiGLU .flash model into an exactly sparse ReLU one (CPU, "
                                       "layer-wise distillation; resumable)")
    rf.add_argument("src", metavar="MODEL.flash", help="the SwiGLU flash model (a folder or library name)")
    rf.add_argument("dst", metavar="DST.flash",
                    help="the ReLU flash model to write: a path, or a bare name for a new model in the library")
    rf.add_argument("--sparsity", type=float, default=rd.sparsity,
                    help=f"exact zeros per layer (default {rd.sparsity})")
    rf.add_argument("--act", choices=("relu", "relu2"), default=rd.act, help="relu or squared relu (default relu)")
    rf.add_argument("--tokens", type=int, default=rd.tokens, help=f"calibration tokens (default {rd.tokens})")
    rf.add_argument("--text", default="", help="a text file to add to the calibration text")
    rf.add_argument("--steps", type=int, default=rd.steps, help=f"Adam steps per layer (default {rd.steps})")
    rf.add_argument("--batch", type=int, default=rd.batch, help=f"tokens per step (default {rd.batch})")
    rf.add_argument("--lr", type=float, default=rd.lr, help=f"learning rate (default {rd.lr})")
    rf.add_argument("--schedule", choices=("staged", "constant"), default=rd.schedule,
                    help="sparsity schedule within a layer (default staged)")
    rf.add_argument("--compensate", type=float, default=rd.compensate,
                    help=f"weight of the residual-stream correction in the target, 0..1 (default {rd.compensate})")
    rf.add_argument("--e2e-steps", type=int, default=rd.e2e_steps,
                    help=f"end-to-end fine-tune steps of the biases after the layers (default {rd.e2e_steps}; 0: none)")
    rf.add_argument("--seed", type=int, default=rd.seed)
    rf.add_argument("--work-dir", default=None, help="checkpoint folder (default: .DST.relufy next to DST)")
    rf.add_argument("--keep-work", action="store_true", help="keep the checkpoint folder after success")
    rf.add_argument("--no-calibrate", action="store_true",
                    help="do not fit activation predictors for the result (mlx-flash calibrate later)")
    rf.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    rf.add_argument("--json", default=None, help="write the report as JSON here")
    rf.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    rf.set_defaults(func=cmd_relufy)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: usage error (2, message already printed) or --help (0)
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except (KeyboardInterrupt, Cancelled):
        print("cancelled", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
