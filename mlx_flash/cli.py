"""`mlx-flash` command line: convert, generate, chat, models, probe (and more as they land)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from .config import BUDGET_SYNTAX, FlashConfig, format_budget, parse_budget
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


def _add_model_args(p: argparse.ArgumentParser, flash_default: bool = False) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="model folder (mlx-lm/HF folder or .flash folder) or a name in the library; "
                        "default: the embedded SmolLM2-135M-Instruct, prepared on first use")
    p.add_argument("--flash", action="store_true", default=flash_default,
                   help="run through the flash engine (FFN weights read from disk)")
    p.add_argument("--budget", default="50%", type=_budget_arg,
                   help="FFN memory budget (flash): " + BUDGET_SYNTAX.replace("%", "%%") + "; default 50%%")
    p.add_argument("--window", type=int, default=5, help="sliding window k in tokens (flash)")
    p.add_argument("--policy", choices=FlashConfig.POLICY_CHOICES, default="auto",
                   help="neuron cache policy (flash): auto (the default: on a calibrated model the measured best "
                        "share of pinned hot neurons, else lru), window (the paper's eager deletion), lru "
                        "(deferred deletion), hot (rows pinned with the most frequently active neurons, the "
                        "rest streamed), hot+window (--hot-fraction of the rows pinned, the rest lru)")
    p.add_argument("--hot-fraction", type=float, default=None, metavar="F",
                   help="share of each layer's cache rows pinned with hot neurons, 0..1 (hot+window, auto; "
                        "default: hot+window 0.5, auto measured)")
    p.add_argument("--threads", type=int, default=0, help="parallel reads (0: from the disk probe)")
    p.add_argument("--active", choices=FlashConfig.ACTIVE_CHOICES, default=None,
                   help="active-neuron choice: auto (the default: on a calibrated model gate, predictor or "
                        "all, whichever reads the fewest bytes per token at oracle quality; else oracle), "
                        "all (naive flash), oracle, predictor, gate (gate-first: resident gate rows)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="oracle / gate: target fraction of inactive FFN neurons (default: the calibrated "
                        "thresholds, else 0.5 for the oracle)")
    p.add_argument("--recall", type=float, default=None,
                   help="predictor: a calibrated recall target (0.9/0.95/0.99/0.995/0.999; default: calibration's)")
    p.add_argument("--no-direct-io", action="store_true", help="allow the page cache (figures not real)")
    p.add_argument("--engine", choices=FlashConfig.ENGINE_CHOICES, default="auto",
                   help="auto: dense when the whole FFN fits the budget, else flash (flash folders)")
    p.add_argument("--pipeline", action="store_true",
                   help="pipelined layers: read the next layer's likely neurons while this one computes "
                        "(flash; two staging buffers held outside the budget)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=_positive_int, default=256, help="most tokens to generate (>= 1)")
    p.add_argument("--temp", type=_float_in(0.0, MAX_TEMPERATURE), default=0.0,
                   help=f"sampling temperature, 0..{MAX_TEMPERATURE:g} (0: greedy)")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, lo_open=True), default=1.0, help="nucleus sampling, (0, 1]")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt for chat templates")


def flash_config_from_args(args) -> FlashConfig:
    active = args.active
    if active is None:
        active = "auto"
    recall = getattr(args, "recall", None)
    return FlashConfig(
        budget=parse_budget(args.budget),
        window=args.window,
        policy=getattr(args, "policy", "auto"),
        hot_fraction=getattr(args, "hot_fraction", None),
        threads=args.threads,
        active=active,
        sparsity=args.sparsity,
        direct_io=not args.no_direct_io,
        pipeline=args.pipeline,
        engine=args.engine,
        extra={"recall": recall} if recall is not None else {},
    )


def resolve_model(name: Optional[str], flash: bool, calibrate: bool = True) -> Path:
    """A path, a library name, or the default model (prepared with a progress bar;
    ``calibrate``: its flash form with predictors)."""
    from . import default_model, paths
    from .progress import tqdm_callback

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
    from . import paths

    if os.sep in dst or (os.altsep and os.altsep in dst) or dst.startswith((".", "~")):
        return Path(dst).expanduser()
    name = dst if dst.endswith(".flash") else f"{dst}.flash"
    return paths.models_dir() / name


def load_engine(args):
    from .engine import load

    path = resolve_model(args.model, args.flash)
    from .engine import is_flash_dir

    if is_flash_dir(path) and not args.flash:
        # A flash folder without --flash: still the flash engine (it is what the folder is for).
        pass
    engine = load(path, flash_config_from_args(args))
    for note in engine.notes:
        print(f"[mlx-flash] warning: {note}", file=sys.stderr)
    if engine.engine_info is not None:
        info = engine.engine_info
        print(f"[mlx-flash] engine: {info['engine']} ({info['reason']})", file=sys.stderr)
    return engine


def print_new_notes(stats, engine, shown: set) -> None:
    """Stats notes beyond the engine's (printed at load), once each, to stderr."""
    for note in stats.notes:
        if note not in engine.notes and note not in shown:
            shown.add(note)
            print(f"[mlx-flash] warning: {note}", file=sys.stderr)


def print_summary(stats_list, file=None, engine=None) -> None:
    """mlx-lm style closing lines, plus the flash engine's breakdown (and, given the
    ``engine``, which active-neuron chooser ran and why)."""
    file = file or sys.stderr
    if not stats_list:
        return
    last = stats_list[-1]
    n = len(stats_list)
    print("=" * 10, file=file)
    print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec; first token after "
          f"{last.ms_first_token / 1e3:.2f} s", file=file)
    print(f"Generation: {n} tokens, {last.tokens_per_s:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {last.peak_memory / 1e9:.3f} GB", file=file)
    if last.mode.startswith("flash"):
        steady = stats_list[1:] or stats_list
        k = len(steady)
        pred = sum(s.ms_predictor for s in steady) / k
        io = sum(s.ms_io for s in steady) / k
        comp = sum(s.ms_compute for s in steady) / k
        read = sum(s.bytes_read for s in steady) / k
        print(f"Flash ({last.mode}): {pred + io + comp:.1f} ms/token = predictor {pred:.1f} + I/O {io:.1f} "
              f"+ compute {comp:.1f}; read {fmt_bytes(read)}/token; hit rate {last.cum_hit_rate:.1%}; "
              f"cache {fmt_bytes(last.cache_bytes)} in use; budget "
              f"{format_budget(last.budget_bytes, last.predictor_bytes)}", file=file)
        prefetch = sum(s.ms_prefetch for s in steady) / k
        if prefetch > 0:
            overlap = sum(s.ms_overlap for s in steady) / k
            used = sum(s.neurons_prefetch_used for s in steady) / k
            fetched = sum(s.neurons_prefetched for s in steady) / k
            print(f"Pipeline: prefetch {prefetch:.1f} ms/token, {overlap:.1f} ms of it behind compute "
                  f"(disk and compute busy at once); {used:.0f} of {fetched:.0f} prefetched neurons/token used",
                  file=file)
    info = engine.active_info if engine is not None else None
    if info:
        print(f"Active neurons: {info['name']} ({info.get('reason')})", file=file)


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
        reply, stats = [], []
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
    from .progress import tqdm_callback

    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()
    from .library import convert_any

    calibrate = dst.suffix == ".flash" and not args.no_calibrate
    out = convert_any(src, dst, dtype=args.dtype, progress=tqdm_callback(f"Converting {src.name}"),
                      overwrite=args.overwrite, calibrate=calibrate)
    print(f"wrote {out}" + (" (with activation predictors)" if calibrate else ""))
    return 0


def cmd_verify(args) -> int:
    from .engine import is_flash_dir
    from .progress import tqdm_callback
    from .storage.format import open_flash, verify_checksums

    path = resolve_model(args.model_path, True, calibrate=False)
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
    from .library import scan_library

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
    from . import paths
    from .progress import tqdm_callback
    from .storage.probe import cached_probe

    directory = Path(args.dir).expanduser() if args.dir else paths.models_dir()
    directory.mkdir(parents=True, exist_ok=True)
    result = cached_probe(directory, refresh=True, progress=tqdm_callback("Probing disk"))
    print(result.format_table())
    t, c = result.choose()
    print(f"engine default: {t} threads, {c // 1024} KiB chunks")
    return 0


def cmd_prepare(args) -> int:
    from . import default_model
    from .progress import tqdm_callback

    from . import platform_blas

    mlx_dir = default_model.ensure_default_mlx(progress=tqdm_callback("Converting GGUF"))
    calibrate = not args.no_calibrate
    if calibrate and default_model.calibration_problem(default_model.default_flash_dir()) is not None:
        print(f"{platform_blas.status()} (calibration's float32 matmuls run in numpy either way; "
              "the bar shows the time left, measured as it runs)")
    flash_dir = default_model.ensure_default_flash(progress=tqdm_callback("Preparing flash model"),
                                                   calibrate=calibrate)
    cal = "with activation predictors" if default_model.is_calibrated(flash_dir) else "not calibrated"
    print(f"default model ready:\n  dense: {mlx_dir}\n  flash: {flash_dir} ({cal})")
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import auto_tokens, calibrate
    from .progress import tqdm_callback

    from .atomic import clean_stale, destination_lock

    path = resolve_model(args.model_path, True, calibrate=False)
    with destination_lock(path):  # not while another process converts or calibrates it
        clean_stale(path.parent)  # what a killed calibration left in the folder (and next to it)
        rep = calibrate(path, sparsity=args.sparsity, rank=args.rank, text=args.text,
                        tokens=args.tokens or auto_tokens(),
                        recall=args.recall, epochs=args.epochs,
                        progress=tqdm_callback(f"Calibrating {path.name}", disable=args.quiet))
    print(rep.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(rep.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate
    from .progress import tqdm_callback

    path = resolve_model(args.model_path, True)
    rep = evaluate(path, text=args.text, tokens=args.tokens, recall=args.recall, modes=args.modes.split(","),
                   progress=tqdm_callback(f"Evaluating {path.name}", disable=args.quiet))
    print(rep.format_table())
    if args.json:
        Path(args.json).write_text(rep.to_json())
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
    from .bench import POLICIES

    if text.strip() == "all":
        return list(POLICIES)
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_bench(args) -> int:
    from .bench import default_flash_model, format_table, run_bench, save_plots
    from .progress import tqdm_callback

    if args.model:
        path = resolve_model(args.model, True)
    else:
        path = default_flash_model(progress=tqdm_callback("Preparing default model"))
    base = FlashConfig(window=args.window, threads=args.threads, sparsity=args.sparsity,
                       direct_io=not args.no_direct_io, pipeline=args.pipeline)
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
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    if args.plots:
        for p in save_plots(report, args.plots):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def _bench_ttft(args, path, base: FlashConfig, configs, done) -> int:
    """The speed test's time-to-first-token section (``bench --ttft``), alone (``--ttft-only``)
    or after the main report (``done``: the report and its text): printed, and added to the
    --json / --text outputs (JSON: the report's fields plus ``ttft``)."""
    import json

    from .bench import TTFT_CONFIGS, TTFT_LENGTHS, format_ttft, run_ttft
    from .progress import tqdm_callback

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
        out = Path(args.json).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    if args.text:
        out = Path(args.text).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    if args.plots and done is not None:
        from .bench import save_plots

        for p in save_plots(done[0], args.plots):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def cmd_relufy(args) -> int:
    from .progress import Cancelled, tqdm_callback
    from .relufy import RelufySettings, default_work_dir, relufy

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
        Path(args.json).write_text(json.dumps(rep.to_dict(), indent=2))
        print(f"wrote {args.json}")
    print(f"wrote {args.dst}")
    if not args.no_calibrate:
        from .calibrate import auto_tokens, calibrate

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
    b.add_argument("--budget", default="50%", type=_budget_arg,
                   help="FFN memory budget of the flash rows: " + BUDGET_SYNTAX.replace("%", "%%"))
    b.add_argument("--tokens", type=int, default=64, help="generated tokens per configuration (greedy)")
    b.add_argument("--warmup", type=int, default=1, help="first tokens left out of the per-token figures")
    b.add_argument("--configs", default=None,
                   help="comma-separated subset of dense,naive,oracle,predictor,gate,auto (default: all)")
    b.add_argument("--prompt", default=None, help="a raw prompt (default: a fixed chat question)")
    b.add_argument("--window", type=int, default=5, help="sliding window k in tokens")
    b.add_argument("--sparsity", type=float, default=None,
                   help="oracle / gate-first: fraction of inactive FFN neurons (default: the calibrated ones)")
    b.add_argument("--threads", type=int, default=0, help="parallel reads (0: from the disk probe)")
    b.add_argument("--no-direct-io", action="store_true", help="allow the page cache (figures not real)")
    b.add_argument("--sweep", default=None, help="budgets for the tokens/s-vs-budget sweep, e.g. 10,25,50,75,100")
    b.add_argument("--shape", default=None, choices=["7b", "13b"],
                   help="add naive/flash rows on a random model of this FFN shape, replaying the real model's traces")
    b.add_argument("--shape-gib", type=float, default=2.0, help="size of the --shape model's FFN on disk (GiB)")
    b.add_argument("--shape-tokens", type=int, default=None, help="tokens replayed on the --shape model")
    b.add_argument("--policies", default=None,
                   help="compare neuron-cache policies: 'all' (window, lru, hot, hot+window, plus auto) "
                        "or a comma-separated list")
    b.add_argument("--policy-budgets", default="25,50,75", help="budgets (%%) of the policy comparison")
    b.add_argument("--policy-active", default="auto", choices=["auto", "all", "oracle", "predictor"],
                   help="neuron choice of the policy comparison (default auto: predictor when calibrated)")
    b.add_argument("--ppl-tokens", type=int, default=300, help="reference-text tokens for perplexity (0: none)")
    b.add_argument("--no-probe", action="store_true", help="leave the disk probe out of the report")
    b.add_argument("--no-twins", action="store_true",
                   help="no second run of each flash row with pipelined layers the other way")
    b.add_argument("--pipeline", action="store_true",
                   help="the main flash rows with pipelined layers (their twins serial)")
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

    from .calibrate import DEFAULT_SPARSITY, DEFAULT_TOKENS
    from .predictor import DEFAULT_RANK, DEFAULT_RECALL, RECALL_TARGETS

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
    ca.add_argument("--json", default=None, help="write the calibration report as JSON here")
    ca.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    ca.set_defaults(func=cmd_calibrate)

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

    from .relufy import RelufySettings

    rd = RelufySettings()
    rf = sub.add_parser("relufy", help="turn a SwiGLU .flash model into an exactly sparse ReLU one (CPU, "
                                       "layer-wise distillation; resumable)")
    rf.add_argument("src", metavar="MODEL.flash", help="the SwiGLU flash model (a folder or library name)")
    rf.add_argument("dst", metavar="DST.flash", help="the ReLU flash model to write: a path, or a bare name for a new model in the library")
    rf.add_argument("--sparsity", type=float, default=rd.sparsity, help=f"exact zeros per layer (default {rd.sparsity})")
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
    from .progress import Cancelled

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
