"""The report's PNG plots (:func:`save_plots`).
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np

from ..units import fmt_bytes as _fb  # the one byte formatter, short for the tables below
from .records import (
    DENSE,
    BenchReport,
    PathLike,
)

_COLORS = {"predictor": "#8e6bbf", "I/O": "#d9822b", "compute": "#3a7dc9"}


def save_plots(report: BenchReport, out_dir: PathLike) -> List[Path]:
    """Write the report's PNG plots into ``out_dir``; return their paths.

    ``bench_ms_per_token.png``: stacked ms/token bars (predictor / I/O / compute)
    per configuration, one panel per source; ``bench_budget_sweep.png``: tokens/s
    vs memory budget (when the report has a sweep); ``bench_probe.png``: the disk
    probe's throughput vs chunk size per thread count, with each flash row's
    effective throughput (when it has a probe). Uses the Agg canvas directly (no
    global backend switch; safe from a worker thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - matplotlib (a second to import): only when plots are drawn
    from matplotlib.figure import Figure  # noqa: PLC0415 - matplotlib (a second to import): only when plots are drawn
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415 - matplotlib (a second to import): only when plots are drawn

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths: List[Path] = []

    def save(fig, name: str) -> None:
        FigureCanvasAgg(fig)
        p = out / name
        fig.savefig(p, dpi=120, bbox_inches="tight")
        paths.append(p)

    # ---- stacked ms/token bars
    groups = list(dict.fromkeys(r.group for r in report.rows))
    if groups:
        fig = Figure(figsize=(4.2 + 1.6 * len(report.rows), 4.6))
        axes = fig.subplots(1, len(groups), squeeze=False)[0]
        for ax, g in zip(axes, groups):
            rows = [r for r in report.rows if r.group == g]
            x = np.arange(len(rows))
            bottom = np.zeros(len(rows))
            for label, attr in (("predictor", "ms_predictor"), ("I/O", "ms_io"), ("compute", "ms_compute")):
                v = np.array([getattr(r, attr) for r in rows])
                ax.bar(x, v, 0.6, bottom=bottom, label=label, color=_COLORS[label])
                bottom += v
            for xi, r, top in zip(x, rows, bottom):
                ax.text(xi, top, f"{r.tokens_per_s:.2f} tok/s", ha="center", va="bottom", fontsize=8)
            ax.set_xticks(x)
            ax.set_xticklabels([r.name.replace(" (", "\n(") for r in rows], fontsize=8)
            ax.set_ylabel("ms per token")
            ax.set_title(rows[0].source if g == "real" else f"{g}: {rows[0].source}, FFN only", fontsize=9)
            ax.set_ylim(0, max(bottom.max(), 1e-3) * 1.15)
        axes[0].legend(fontsize=8, loc="upper left")
        budget = f"{report.budget:.0%}" if report.budget <= 1 else _fb(report.budget)
        fig.suptitle(f"{report.model_name}: ms per token at FFN budget {budget}", fontsize=10)
        save(fig, "bench_ms_per_token.png")

    # ---- tokens/s vs budget
    pts = [p for p in report.sweep if p.error is None]
    if pts:
        fig = Figure(figsize=(6, 4.2))
        ax = fig.subplots()
        for c in dict.fromkeys(p.config for p in pts):
            ps = sorted((p for p in pts if p.config == c), key=lambda p: p.budget)
            ax.plot([100 * p.budget for p in ps], [p.tokens_per_s for p in ps], marker="o", label=c)
        dense = report.row(DENSE)
        if dense is not None:
            ax.axhline(dense.tokens_per_s, color="gray", ls="--", lw=1, label="dense (whole model in memory)")
        ax.set_xlabel("FFN memory budget (% of the FFN weights)")
        ax.set_ylabel("tokens / s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{report.model_name}: speed vs memory budget", fontsize=10)
        save(fig, "bench_budget_sweep.png")

    # ---- cache policies: hit rate and bytes per token vs budget
    pps = [p for p in report.policies if p.error is None]
    if pps:
        fig = Figure(figsize=(11, 4.0))
        axes = fig.subplots(1, 3)
        for pol in dict.fromkeys(p.policy for p in pps):
            qs = sorted((p for p in pps if p.policy == pol), key=lambda p: p.budget)
            xs = [100 * p.budget for p in qs]
            style = dict(marker="o", label=pol, ls="--" if pol == "auto" else "-")
            axes[0].plot(xs, [100 * (p.hit_rate or 0) for p in qs], **style)
            axes[1].plot(xs, [p.bytes_read_per_token / 1e6 for p in qs], **style)
            axes[2].plot(xs, [p.tokens_per_s for p in qs], **style)
        for ax, yl in zip(axes, ("hit rate (%)", "MB read per token", "tokens / s")):
            ax.set_xlabel("FFN memory budget (%)")
            ax.set_ylabel(yl)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{report.model_name}: neuron cache policies ({report.policy_active or 'auto'} neuron choice)",
                     fontsize=10)
        save(fig, "bench_policies.png")

    # ---- the disk probe
    pr = report.probe
    if pr is not None and pr.table:
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.subplots()
        chunks = pr.chunk_sizes
        for t in pr.thread_counts:
            xs = [c for c in chunks if t in pr.table[c]]
            ax.plot([c / 1024 for c in xs], [pr.table[c][t] for c in xs], marker="o", ms=3,
                    label=f"{t} thread{'s' if t > 1 else ''}")
        for r in report.rows:
            if r.io_gbps and r.mean_request_bytes:
                ax.scatter([r.mean_request_bytes / 1024], [r.io_gbps], marker="*", s=90, zorder=5,
                           label=f"{r.name} (reached)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("chunk size (KiB); stars: a configuration's mean request size")
        ax.set_ylabel("GB/s (random reads)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"disk read throughput ({pr.mode or '?'})", fontsize=10)
        save(fig, "bench_probe.png")
    return paths
