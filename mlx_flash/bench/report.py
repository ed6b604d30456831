"""The report as text: :func:`format_table` and its sections (reader vs disk, pipelined vs serial,
choosers, cache policies), the observations and the standard notes.
"""

from __future__ import annotations

from typing import List, Optional

import mlx.core as mx

from ..quantized import compute_dtype, describe
from ..storage.format import role_quantization
from ..units import fmt_bytes as _fb  # the one byte formatter, short for the tables below
from .quant import (
    format_quantized,
)
from .records import (
    _ACTIVE,
    AUTO,
    CONFIGS,
    DENSE,
    DENSE_BF16,
    NAIVE,
    ORACLE,
    REPLAYED,
    BenchReport,
    best_policy,
)
from .runners import (
    _twin_name,
)


def format_reader(r: BenchReport) -> List[str]:
    """Reader against the disk: read amplification (read / useful bytes), requests per token,
    and GB/s against the probe at the same mean request size and threads (reader GB/s: over the
    wall time with reads in flight; 'while reading': over the time a read thread was at work)."""
    rows = [row for row in r.rows if row.io_gbps is not None]
    if not rows:
        return []
    lines = ["", "Reader vs disk (probe interpolated at the reader's mean request size and thread count):",
             "| configuration | alignment | max gap | requests/tok | mean request | read/useful | reader GB/s "
             "| probe there | reader / probe | GB/s while reading | while reading / probe |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        amp = row.bytes_read_per_token / row.bytes_useful_per_token if row.bytes_useful_per_token else None
        lines.append(f"| {row.name} | {row.read_alignment or '?'} B | {_fb(row.max_gap_bytes or 0)} | "
                     f"{_f(row.requests_per_token, '{:.0f}')} | {_fb(row.mean_request_bytes)} | {_f(amp, '{:.2f}x')} | "
                     f"{row.io_gbps:.2f} | {_f(row.disk_gbps_at_request, '{:.2f}')} | "
                     f"{_f(row.reader_of_probe, '{:.0%}')} | {_f(row.serving_gbps, '{:.2f}')} | "
                     f"{_f(_ratio(row.serving_gbps, row.disk_gbps_at_request), '{:.0%}')} |")
    return lines


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _standard_notes(rep: BenchReport, files) -> List[str]:
    n_meas = rep.tokens - rep.warmup
    out = [
        f"Every configuration generates exactly {rep.tokens} tokens greedily from the same prompt "
        f"({rep.prompt_tokens} prompt tokens; end-of-sequence ignored), one after another in one process.",
        f"Per-token figures leave out the first {rep.warmup} generated token(s) of each run (warm-up: cold neuron "
        f"cache, first-call overheads) and average the other {n_meas}; tokens/s = 1000 / mean ms per token.",
        "ms/token split: predictor = choosing the active neurons; I/O = neuron-cache bookkeeping + reads from "
        "ffn.bin; compute = the rest (attention, FFN arithmetic, sampling).",
        "The page cache of ffn.bin is dropped before each configuration, and flash reads bypass it.",
        "dense = the same flash folder loaded whole into memory (load(path, dense=True)); naive flash = every "
        "FFN neuron every token, the non-resident ones read from disk (the paper's baseline).",
        "flash oracle = the true active neurons from the full gate/up weights, which it holds in memory (counted in "
        "its resident bytes): an upper bound for a predictor, not a product mode.",
    ]
    if files.manifest.quantized:

        cd = str(compute_dtype(getattr(mx, files.manifest.dtype))).rsplit(".", 1)[-1]
        out.append(f"Quantized flash folder ({describe(role_quantization(files.manifest))}): dense = the dense "
                   "quantized model (every bundle in memory as stored, what mlx-lm runs with these bits); peak/dense "
                   f"compares each row's peak memory with it. Quantized matmuls run in {cd} here.")
        if rep.row(DENSE_BF16) is not None:
            out.append("dense bfloat16 = the same model with every weight dequantized to bfloat16, all in memory "
                       "(what mlx-lm runs with a bfloat16 conversion, `convert --dtype bfloat16`).")
    if any(r.perplexity is not None for r in rep.rows):
        out.append(f"Perplexity: {rep.perplexity_tokens} predicted tokens of resources/reference.txt (the project's "
                   "own prose) in one teacher-forced pass, after the generation.")
    if any(r.io_gbps for r in rep.rows):
        out.append("I/O GB/s = bytes read / wall time with reads in flight (submitted, not finished) over the "
                   "measured tokens; 'of disk' divides it "
                   "by the probe's best throughput (any thread count) at the chunk size nearest the mean request.")
    if rep.shape:
        s = rep.shape
        order = ("in hot order on disk as calibration writes it (banded: band c holds every source neuron's c-th "
                 "copy in the real model's calibrated hot order, so disk neighbours are different neurons of about "
                 "the same frequency)" if s.get("order") == "hot" else "at random places on disk")
        out.append(
            f"Rows marked '{REPLAYED}' are not a real model: a random-weight flash model with {s['name']} FFN "
            f"dimensions (hidden {s['hidden']}, FFN {s['ffn']}, {s.get('quantization', s['dtype'])}"
            f"{', format v' + str(s['format_version']) if s.get('format_version') else ''}, bundle "
            f"{_fb(s['bundle_bytes'])}, {s['layers']} layers = {s['ffn_bytes'] / 2**30:.2f} GiB of FFN) written by "
            f"the converters' writer, whose SparseFFNs (real NeuronCache under the policy the engine picks, "
            f"FlashReader, sparse quantized arithmetic in the engine's compute dtype) are driven with random inputs "
            f"and the per-token active sets the flash-oracle run recorded on the real model, each source neuron "
            f"standing for a group of ~{s['ffn'] / max(1, (rep.trace or {}).get('neurons', 1)):.1f} target neurons "
            f"(same sparsity and reuse), {order}. Pipelined rows: a perfect lookahead (the replayed set). "
            "FFN only: no attention, embeddings or sampling; predictor cost not modelled; no perplexity.")
    return out


def observations(report: BenchReport) -> List[str]:
    """Plain-language flags computed from the rows: streaming because the budget
    cannot hold the active set, read amplification, machine load."""
    out: List[str] = []
    gap = report.config.get("max_gap_bytes")
    for row in report.rows:
        if (row.neurons_streamed_per_token > 0 and row.neurons_active_per_token > 0
                and not row.name.startswith(NAIVE)):  # naive flash streams what does not fit by design
            frac = row.neurons_streamed_per_token / row.neurons_active_per_token
            out.append(f"{row.name}: {frac:.0%} of the active neurons of each token did not fit the neuron cache and "
                       "were streamed through the scratch buffer (read every token, never cached): the budget holds "
                       "less than the active set (raise the budget or the sparsity).")
        if row.bytes_useful_per_token > 0 and row.bytes_read_per_token > 1.5 * row.bytes_useful_per_token:
            out.append(f"{row.name}: reads {row.bytes_read_per_token / row.bytes_useful_per_token:.1f}x the useful "
                       f"bytes ({row.read_alignment or 4096}-byte alignment and coalescing gaps up to "
                       f"max_gap_bytes={row.max_gap_bytes if row.max_gap_bytes is not None else gap}).")
    la0 = (report.machine.get("load_average") or [None])[0]
    la1 = (report.machine.get("load_average_end") or [None])[0]
    cpus = report.machine.get("cpu_count") or 0
    if cpus and max(la0 or 0, la1 or 0) > 0.5 * cpus:
        seen = ", ".join(f"{v:.1f} at the {w}" for v, w in ((la0, "start"), (la1, "end")) if v is not None)
        out.append(f"The machine was busy (load average {seen}; {cpus} CPUs): timings are noisy.")
    return out


def _f(x: Optional[float], fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def format_pipeline(r: BenchReport) -> List[str]:
    """Serial vs pipelined rows side by side: the pipelined ms/token against the bound
    max(I/O, predictor + compute) of its own serial run, the overlap, the lookahead's recall."""
    by_name = {row.name: row for row in r.rows}
    pairs = []
    for row in r.rows:  # a row and its twin (the one whose name adds " (serial)" / " (pipelined)")
        for twin, piped_first in ((by_name.get(_twin_name(row.name, False)), True),
                                  (by_name.get(_twin_name(row.name, True)), False)):
            if twin is not None:
                p, s = (row, twin) if piped_first else (twin, row)
                if p.pipeline and not s.pipeline:
                    pairs.append((p, s))
    if not pairs:
        return []
    lines = ["", "Pipelined layers vs serial (ms/token; bound = max(I/O, predictor + compute) of the serial run):",
             "| configuration | serial ms | pipelined ms | bound | pipelined / bound | I/O behind compute | "
             "prefetch busy | speed-up | same tokens | lookahead recall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p, s in pairs:
        bound = max(s.ms_io, s.ms_predictor + s.ms_compute)
        rec = (p.lookahead or {}).get("mean_lookahead_recall")
        lines.append(f"| {s.name} | {s.ms_total:.1f} | {p.ms_total:.1f} | {bound:.1f} | "
                     f"{_f(p.ms_total / bound if bound else None, '{:.2f}x')} | {p.ms_overlap:.1f} | "
                     f"{p.ms_prefetch:.1f} | {_f(s.ms_total / p.ms_total if p.ms_total else None, '{:.2f}x')} | "
                     f"{ {True: 'yes', False: 'NO', None: '– (replayed)'}[p.same_as_serial]} | "
                     f"{_f(rec, '{:.1%}')} |")
    for p, _ in pairs:
        per = (p.lookahead or {}).get("lookahead_recall") or []
        if any(v is not None for v in per):
            lines.append(f"- {p.name}: lookahead recall per layer (1..{len(per) - 1}): " +
                         " ".join("–" if v is None else f"{v:.2f}" for v in per[1:]))
    return lines


def format_table(report: BenchReport) -> str:
    """The report as Markdown-ish text (tables of rows, ratios, sweep and probe, and the notes)."""
    r = report
    lines: List[str] = []
    budget = f"{r.budget:.0%}" if r.budget <= 1 else _fb(r.budget)
    lines.append(f"# mlx-flash bench: {r.model_name}")
    lines.append("")
    lines.append(f"FFN {_fb(r.ffn_bytes)}, budget {budget} ({r.budget_text()}); window {r.config.get('window')}, "
                 f"oracle sparsity {r.config.get('sparsity')}; {r.tokens} tokens per configuration, first "
                 f"{r.warmup} left out of the averages.")
    mi = r.machine
    la = mi.get("load_average")
    lines.append(f"Machine: {mi.get('platform')}, {mi.get('cpu_count')} CPUs, MLX {mi.get('mlx')} on {mi.get('device')}"
                 + (f", load average {la[0]:.2f} at the start" if la else "") + f"; run took {r.seconds:.0f} s.")
    lines.append("")
    head = ("| configuration | source | tok/s | ms/tok | predictor | I/O | compute | active | read/tok | useful/tok | "
            "hit rate | resident | peak | peak/dense | perplexity | I/O GB/s | of disk |")
    # each row's peak against the dense row's (a quantized flash folder's dense row is the dense
    # quantized model: what mlx-lm runs with the 4-bit weights)
    dense_peak = next((row.peak_memory for row in r.rows if row.name == DENSE and row.peak_memory), None)
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    skipped = [f"| {s['name']} | skipped: {s['reason']} |" for s in r.skipped]
    for row in r.rows:
        if row.group != "real" and skipped:
            lines += skipped
            skipped = []
        lines.append(
            f"| {row.name} | {row.source} | {row.tokens_per_s:.2f} | {row.ms_total:.1f} | {row.ms_predictor:.1f} | "
            f"{row.ms_io:.1f} | {row.ms_compute:.1f} | {_f(row.active_fraction, '{:.1%}')} | "
            f"{_fb(row.bytes_read_per_token)} | "
            f"{_fb(row.bytes_useful_per_token)} | {_f(row.hit_rate, '{:.1%}')} | {_fb(row.resident_bytes)} | "
            f"{_fb(row.peak_memory)} | {_f(row.peak_memory / dense_peak if dense_peak else None, '{:.2f}x')} | "
            f"{_f(row.perplexity, '{:.2f}')} | {_f(row.io_gbps, '{:.2f}')} | "
            f"{_f(row.io_efficiency, '{:.0%}')} |")
    lines += skipped
    if r.ratios:
        lines.append("")
        lines.append("Speed ratios (tokens/s):")
        for k, v in r.ratios.items():
            lines.append(f"- {k}: {v:.2f}x")
    chooser_lines = [f"- {row.name}: {row.active.get('name')}"
                     + (f" at sparsity {row.active['sparsity']:g}" if row.active.get("sparsity") is not None else "")
                     + f" ({row.active.get('reason')})"
                     for row in r.rows if row.active and row.active.get("asked") == "auto"]
    if chooser_lines:
        lines.append("")
        lines.append("Active-neuron choice of the auto rows:")
        lines += chooser_lines
    agree = [row for row in r.rows if row.agree_with_dense is not None and row.name != DENSE]
    if agree:
        lines.append("")
        lines.append("Same output as dense for the first N generated tokens: " +
                     ", ".join(f"{row.name} {row.agree_with_dense}/{r.tokens}" for row in agree))
    if any(row.io_gbps for row in r.rows):
        lines.append("")
        lines.append("| configuration | threads | chunk | mean request | I/O GB/s | disk best there | "
                     "disk at these threads | of disk best |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for row in r.rows:
            if row.io_gbps is None:
                continue
            lines.append(f"| {row.name} | {row.threads} | {row.chunk_bytes // 1024} KiB | "
                         f"{_fb(row.mean_request_bytes)} | {row.io_gbps:.2f} | {_f(row.disk_best_gbps, '{:.2f}')} | "
                         f"{_f(row.disk_gbps_same_threads, '{:.2f}')} | {_f(row.io_efficiency, '{:.0%}')} |")
    lines += format_reader(r)
    lines += format_pipeline(r)
    lines += format_quantized(r)
    lines += format_choosers(r)
    if r.sweep:
        lines.append("")
        lines.append("Budget sweep (tokens/s; hit rate; read per token):")
        budgets = sorted({p.budget for p in r.sweep})
        cfgs = list(dict.fromkeys(p.config for p in r.sweep))
        lines.append("| budget | " + " | ".join(cfgs) + " |")
        lines.append("|---|" + "---|" * len(cfgs))
        for b in budgets:
            cells = []
            for c in cfgs:
                p = next((p for p in r.sweep if p.config == c and p.budget == b), None)
                if p is None:
                    cells.append("")
                elif p.error:
                    cells.append("error")
                else:
                    cells.append(f"{p.tokens_per_s:.2f} tok/s; {_f(p.hit_rate, '{:.0%}')}; "
                                 f"{_fb(p.bytes_read_per_token)}")
            label = f"{b:.0%}" if b <= 1 else _fb(b)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for p in r.sweep:
            if p.error:
                lines.append(f"- {p.config} at {p.budget:.0%}: {p.error}" if p.budget <= 1 else
                             f"- {p.config} at {_fb(p.budget)}: {p.error}")
    if r.policies:
        lines += [""] + format_policies(r)
    if r.trace:
        t = r.trace
        lines.append("")
        lines.append(f"Trace recorded on {t.get('model')}: {t['tokens']} tokens x {t['layers']} layers x "
                     f"{t['neurons']} neurons; sparsity {t['sparsity']:.0%}, reuse from the last token "
                     f"{t['reuse_last_token']:.0%}, newly needed per token with a 5-token window "
                     f"{t['new_per_token_window5']:.1%} of the FFN.")
    lines += format_shape(r)
    if r.probe is not None:
        lines.append("")
        lines.append(f"Disk probe ({r.probe.directory}, measured {r.probe.created}):")
        lines.append(r.probe.format_table())
    obs = observations(r)
    if obs:
        lines.append("")
        lines.append("Observations (derived from the rows above):")
        lines += [f"- {o}" for o in obs]
    if r.notes:
        lines.append("")
        lines.append("Notes:")
        lines += [f"- {n}" for n in r.notes]
    return "\n".join(lines)


def format_shape(r: BenchReport) -> List[str]:
    """The shape replay's speed-up and what bounds it (``records.shape_io_ratios``): tokens/s, the
    I/O-only ratio (time with reads in flight: the speed-up if compute were free), bytes read,
    the reader's GB/s and compute."""
    ratios = (r.shape or {}).get("io_ratios") or {}
    if not ratios:
        return []
    lines = ["", "Shape replay, flash oracle vs naive flash (same pipelining): what bounds the speed-up "
                 "(ratios naive / oracle; read time = bytes read / reader GB/s, the speed-up if compute were free):",
             "| rows | tokens/s | read time (I/O only) | bytes read | reader GB/s (oracle / naive) | compute |",
             "|---|---|---|---|---|---|"]
    for k, d in ratios.items():
        g = d.get("gbps")
        lines.append(f"| {k} | {_f(d.get('total'), '{:.2f}x')} | {_f(d.get('read_time'), '{:.2f}x')} | "
                     f"{_f(d.get('bytes'), '{:.2f}x')} | {_f(1 / g if g else None, '{:.2f}x')} | "
                     f"{_f(d.get('compute'), '{:.2f}x')} |")
    return lines


#: Issue #20's bars for the auto chooser: bytes read per token against the oracle's useful bytes,
#: perplexity against dense.
AUTO_BYTES_BAR = 1.15


AUTO_PPL_BAR = 0.02


def format_choosers(report: BenchReport) -> List[str]:
    """The active-neuron choosers side by side (serial real-model rows): which chooser ran,
    active share, bytes read and useful per token, perplexity and tok/s against dense and
    naive flash; then the auto row against issue #20's bars (reads at most
    ``AUTO_BYTES_BAR`` x the oracle's useful bytes, perplexity within ``AUTO_PPL_BAR`` of
    dense, tok/s above naive flash)."""
    rows = {row.name: row for row in report.rows if row.group == "real" and not row.pipeline}
    order = [n for n in CONFIGS if n in rows]
    if len(order) < 2:
        return []
    dense, naive, oracle, auto = (rows.get(n) for n in (DENSE, NAIVE, ORACLE, AUTO))
    lines = ["", "Active-neuron choosers side by side (serial rows; x: against dense / naive flash):",
             "| configuration | chooser | active | read/tok | useful/tok | perplexity | vs dense | tok/s | vs naive |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in order:
        row = rows[n]
        ch = (row.active or {}).get("name") or ("dense" if n == DENSE else _ACTIVE.get(n, ""))
        if (row.active or {}).get("sparsity") is not None:
            ch += f" (sparsity {(row.active or {})['sparsity']:g})"
        ppl_rel = (row.perplexity / dense.perplexity - 1 if dense and dense.perplexity and row.perplexity
                   else None)
        speed = row.tokens_per_s / naive.tokens_per_s if naive and naive.tokens_per_s else None
        lines.append(f"| {n} | {ch} | {_f(row.active_fraction, '{:.1%}')} | {_fb(row.bytes_read_per_token)} | "
                     f"{_fb(row.bytes_useful_per_token)} | {_f(row.perplexity, '{:.2f}')} | "
                     f"{_f(ppl_rel, '{:+.1%}')} | {row.tokens_per_s:.2f} | {_f(speed, '{:.2f}x')} |")
    if auto and oracle and oracle.bytes_useful_per_token:
        ratio = auto.bytes_read_per_token / oracle.bytes_useful_per_token
        lines.append(f"- auto reads {ratio:.2f}x the oracle's useful bytes per token (bar: at most "
                     f"{AUTO_BYTES_BAR:.2f}x): {'met' if ratio <= AUTO_BYTES_BAR else 'not met'}")
    if auto and dense and dense.perplexity and auto.perplexity:
        rel = auto.perplexity / dense.perplexity - 1
        lines.append(f"- auto perplexity {rel:+.1%} vs dense (bar: within {AUTO_PPL_BAR:.0%}): "
                     f"{'met' if abs(rel) <= AUTO_PPL_BAR else 'not met'}")
    if auto and naive and naive.tokens_per_s:
        sp = auto.tokens_per_s / naive.tokens_per_s
        lines.append(f"- auto runs {sp:.2f}x naive flash's tok/s (bar: above 1): {'met' if sp > 1 else 'not met'}")
    return lines


def format_policies(report: BenchReport) -> List[str]:
    """The cache-policy comparison as Markdown lines."""
    r = report
    pts = r.policies
    lines = [f"Cache policies (neuron choice: {r.policy_active or 'auto'}; per generated token: hit rate; "
             "read; tok/s):"]
    budgets = sorted({p.budget for p in pts})
    pols = list(dict.fromkeys(p.policy for p in pts))
    lines.append("| budget | " + " | ".join(pols) + " | best measured |")
    lines.append("|---|" + "---|" * (len(pols) + 1))
    for b in budgets:
        cells = []
        for pol in pols:
            p = next((p for p in pts if p.policy == pol and p.budget == b), None)
            if p is None:
                cells.append("")
            elif p.error:
                cells.append("error")
            else:
                tag = f" → {p.resolved}" + (f" ({p.hot_fraction:.0%} hot)" if p.hot_fraction else "") \
                    if pol == "auto" else ""
                cells.append(f"{_f(p.hit_rate, '{:.0%}')}; {_fb(p.bytes_read_per_token)}; "
                             f"{p.tokens_per_s:.2f}{tag}")
        best = best_policy(pts, b)
        label = f"{b:.0%}" if b <= 1 else _fb(b)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {best.policy if best else ''} |")
    for p in pts:
        if p.error:
            lines.append(f"- {p.policy} at {p.budget:.0%}: {p.error}")
    autos = [p for p in pts if p.policy == "auto" and p.error is None]
    for p in autos:
        best = best_policy(pts, p.budget)
        verdict = ""
        if best is not None:
            same = best.policy == p.resolved
            verdict = (" — the same as the measured best" if same else
                       f" — measured best here: {best.policy} ({_fb(best.bytes_read_per_token)}/token vs "
                       f"{_fb(p.bytes_read_per_token)})")
        lines.append(f"- auto at {p.budget:.0%} ran {p.resolved}"
                     + (f" with {p.hot_fraction:.0%} of the cache pinned" if p.hot_fraction else "")
                     + (f": {p.reason}" if p.reason else "") + verdict)
    pre = [p for p in pts if p.preload_bytes and p.error is None]
    if pre:
        lines.append("- pinned hot neurons are read once at load (not counted per token): " +
                     ", ".join(f"{p.policy} at {p.budget:.0%} {_fb(p.preload_bytes)}" for p in pre))
    return lines
