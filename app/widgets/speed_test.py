"""The speed-test dialog: dense vs naive flash vs flash on one model, in a worker with
progress and Cancel; a side-by-side table, bar charts, Save JSON and Save plots.

It runs ``mlx_flash.bench.run_bench`` (``report.to_dict()`` with ``rows``) and saves plots with
``bench.save_plots``. The window imports this module when the dialog first opens (the engine's import
takes seconds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QSettings, Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDialog,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from mlx_flash import bench, library
from mlx_flash.atomic import atomic_write_text
from mlx_flash.bench import budget_text
from mlx_flash.config import FlashConfig

from .. import theme, workers
from .model_library import flash_config_for

COLUMNS = (
    ("name", "Configuration", None),
    ("tokens_per_s", "tok/s", "{:.2f}"),
    ("ms_first_token", "first token", "ms→s"),  # time to first token (Stats.ms_first_token), as in the chat
    ("ms_total", "ms/token", "{:.1f}"),
    ("ms_predictor", "predictor", "{:.1f}"),
    ("ms_io", "I/O", "{:.1f}"),
    ("ms_compute", "compute", "{:.1f}"),
    ("bytes_read_per_token", "read/token", "bytes"),
    ("hit_rate", "hit rate", "{:.0%}"),
    ("peak_memory", "peak memory", "bytes"),
    ("perplexity", "perplexity", "{:.2f}"),
)

ROW_COLORS = ("#8b929c", "#f59e0b", "#a78bfa", "#34d399", "#38bdf8", "#e879f9")


def report_rows(d: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The per-configuration rows of a report dict (``BenchReport.to_dict()``)."""
    return list(d.get("rows") or [])


def policy_table_html(d: Dict[str, Any]) -> str:
    """The report's cache-policy comparison as a small HTML table ("" when it has none)."""
    pts = d.get("policies") or []
    if not pts:
        return ""
    budgets = sorted({p["budget"] for p in pts})
    pols = list(dict.fromkeys(p["policy"] for p in pts))
    head = "".join(f"<th>&nbsp;{p}&nbsp;</th>" for p in pols)
    rows = []
    for b in budgets:
        cells = []
        for pol in pols:
            p = next((p for p in pts if p["policy"] == pol and p["budget"] == b), None)
            if p is None:
                cells.append("<td></td>")
            elif p.get("error"):
                cells.append(f"<td title='{p['error']}'>error</td>")
            else:
                extra = f" → {p.get('resolved')}" if pol == "auto" else ""
                hr = p.get("hit_rate")
                cells.append(f"<td>&nbsp;{(hr or 0):.0%} · {theme.human_bytes(p['bytes_read_per_token'])} · "
                             f"{p['tokens_per_s']:.2f} tok/s{extra}&nbsp;</td>")
        rows.append(f"<tr><td><b>{b:.0%}</b></td>{''.join(cells)}</tr>")
    return ("<b>Cache policies</b> (hit rate · read per token · tokens/s):"
            f"<table><tr><th>budget</th>{head}</tr>{''.join(rows)}</table>")


def _cell(value, fmt) -> str:
    if value is None:
        return "–"
    if fmt is None:
        return str(value)
    if fmt == "bytes":
        return theme.human_bytes(value)
    if fmt == "ms→s":  # 0: not measured (replayed rows, reports from before the figure existed)
        return f"{value / 1e3:.2f} s" if value else "–"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)



SHORT_NAMES = {"dense bfloat16": "bf16", "naive flash": "naive", "flash oracle": "oracle",
               "flash predictor": "pred.", "flash gate-first": "gate", "flash auto": "auto"}


def bar_label(name: str) -> str:
    """The short label under a configuration's bars (twelve bars share a plot's width):
    ``"flash predictor (pipelined)"`` -> ``"pred.\npipe"``; the table beside it has the full names."""
    base, piped = (name[: -len(" (pipelined)")], True) if name.endswith(" (pipelined)") else (name, False)
    short = SHORT_NAMES.get(base, base.replace("flash ", ""))
    return short + "\npipe" if piped else short


class SpeedTestDialog(QDialog):
    def __init__(self, settings: Optional[QSettings] = None, parent=None, *, base_config=None):
        super().__init__(parent)
        self.base_config = base_config          # FlashConfig the per-model settings apply to
        self.setWindowTitle("Speed test — mlx-flash")
        self.setWindowIcon(theme.app_icon())
        self.resize(1180, 780)
        self.settings = settings
        self.model_path: Optional[Path] = None
        self.report = None                    # the BenchReport object
        self.report_dict: Optional[Dict[str, Any]] = None
        self._worker: Optional[workers.Worker] = None

        lay = QVBoxLayout(self)
        lay.setContentsMargins(20, 16, 20, 16)
        lay.setSpacing(10)
        title = QLabel("Speed test")
        title.setObjectName("PageTitle")
        lay.addWidget(title)
        self.subtitle = QLabel("Dense (all in memory) vs naive flash (read every neuron) vs flash "
                               "(predicted neurons + cache), same model, same prompt, same budget.")
        self.subtitle.setObjectName("Muted")
        self.subtitle.setWordWrap(True)
        lay.addWidget(self.subtitle)

        opts = QHBoxLayout()
        opts.setSpacing(12)
        self.model_label = QLabel("No model")
        self.model_label.setStyleSheet("font-weight: 600;")
        opts.addWidget(self.model_label)
        opts.addSpacing(12)
        opts.addWidget(QLabel("Budget"))
        self.budget = QSpinBox()
        self.budget.setRange(5, 100)
        self.budget.setValue(round(FlashConfig.budget * 100))  # the engine's default budget (a fraction)
        self.budget.setSuffix(" % of FFN")
        opts.addWidget(self.budget)
        opts.addWidget(QLabel("Tokens"))
        self.tokens = QSpinBox()
        self.tokens.setRange(4, 1024)
        self.tokens.setValue(32)
        opts.addWidget(self.tokens)
        self.probe = QCheckBox("Measure the disk (once per machine)")
        self.probe.setChecked(True)
        opts.addWidget(self.probe)
        self.policies = QCheckBox("Compare cache policies (25/50/75%)")
        self.policies.setToolTip("Also run window, LRU, hot and hot+window neuron caches, plus the engine's "
                                 "automatic choice, at 25, 50 and 75% of the FFN (about 15 more runs)")
        opts.addWidget(self.policies)
        opts.addStretch(1)
        self.run_btn = QPushButton("  Run")
        self.run_btn.setIcon(theme.icon("play", "#ffffff"))
        self.run_btn.setProperty("kind", "primary")
        self.run_btn.clicked.connect(self.run)
        opts.addWidget(self.run_btn)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setProperty("kind", "danger")
        self.cancel_btn.clicked.connect(self.cancel)
        self.cancel_btn.hide()
        opts.addWidget(self.cancel_btn)
        lay.addLayout(opts)


        prog = QFrame()
        prog.setObjectName("ProgressCard")
        pl = QVBoxLayout(prog)
        pl.setContentsMargins(14, 8, 14, 8)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(False)
        self.bar.setFixedHeight(8)
        pl.addWidget(self.bar)
        self.message = QLabel("")
        self.message.setObjectName("Muted")
        pl.addWidget(self.message)
        self.progress_card = prog
        prog.hide()
        lay.addWidget(prog)

        split = QSplitter(Qt.Vertical)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([c[1] for c in COLUMNS])
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionMode(QAbstractItemView.NoSelection)
        self.table.setAlternatingRowColors(True)
        self.table.setShowGrid(False)
        self.table.verticalHeader().setDefaultSectionSize(32)
        hh = self.table.horizontalHeader()
        hh.setSectionResizeMode(0, QHeaderView.Stretch)
        for i in range(1, len(COLUMNS)):
            hh.setSectionResizeMode(i, QHeaderView.ResizeToContents)
        hh.setDefaultAlignment(Qt.AlignRight | Qt.AlignVCenter)
        self.table.horizontalHeaderItem(0).setTextAlignment(Qt.AlignLeft | Qt.AlignVCenter)
        split.addWidget(self.table)

        plots = QWidget()
        pl2 = QHBoxLayout(plots)
        pl2.setContentsMargins(0, 0, 0, 0)
        self.plot_tps = self._plot("Tokens per second (higher is better)")

        def sq(c, t):
            return f'<span style="color:{c}">■</span> {t}'

        self.plot_ms = self._plot("ms per token: " + " ".join((sq(theme.C_PRED, "predictor"), sq(theme.C_IO, "I/O"),
                                                                sq(theme.C_COMPUTE, "compute"))))
        self.plot_read = self._plot("Read from flash per token")
        for p in (self.plot_tps, self.plot_ms, self.plot_read):
            pl2.addWidget(p)
        split.addWidget(plots)
        self.notes = QTextBrowser()
        self.notes.setMaximumHeight(130)
        self.notes.setObjectName("Muted")
        self.notes.setStyleSheet("QTextBrowser { background: #14171c; border: 1px solid #2a2f38; border-radius: 8px; }")
        split.addWidget(self.notes)
        split.setSizes([160, 420, 110])
        self.split = split
        lay.addWidget(split, 1)

        row = QHBoxLayout()
        self.summary = QLabel("")
        self.summary.setObjectName("Muted")
        self.summary.setWordWrap(True)
        row.addWidget(self.summary, 1)
        self.save_json_btn = QPushButton("  Save JSON…")
        self.save_json_btn.setIcon(theme.icon("save"))
        self.save_json_btn.clicked.connect(self._save_json_dialog)
        self.save_plots_btn = QPushButton("  Save plots…")
        self.save_plots_btn.setIcon(theme.icon("export"))
        self.save_plots_btn.clicked.connect(self._save_plots_dialog)
        self.close_btn = QPushButton("Close")
        self.close_btn.clicked.connect(self.close)
        for b in (self.save_json_btn, self.save_plots_btn, self.close_btn):
            row.addWidget(b)
        lay.addLayout(row)
        self._update_buttons()

    def _plot(self, title: str) -> pg.PlotWidget:
        w = pg.PlotWidget()
        w.setBackground(theme.PANEL)
        pi = w.getPlotItem()
        pi.setTitle(f'<span style="color:{theme.MUTED}; font-size:9pt">{title}</span>')
        pi.setMenuEnabled(False)
        pi.hideButtons()
        pi.setMouseEnabled(x=False, y=False)
        pi.showGrid(x=False, y=True, alpha=0.15)
        return w

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        """From Run until the result (or the cancellation) has been shown."""
        return self._worker is not None

    def set_model(self, path: Optional[Path]) -> None:
        self.model_path = Path(path) if path else None
        if self.model_path is None:
            self.model_label.setText("No model selected")
        else:
            e = library.describe(self.model_path)
            kind = "" if e is None or e.kind == "flash" else "  (not a flash model: import it first)"
            self.model_label.setText(library.display_name(self.model_path) + kind)
        self._update_buttons()

    def _update_buttons(self) -> None:
        is_flash = self.model_path is not None and (self.model_path / "manifest.json").is_file()
        self.run_btn.setEnabled(is_flash and not self.running)
        has = self.report_dict is not None
        self.save_json_btn.setEnabled(has)
        self.save_plots_btn.setEnabled(has and self.report is not None)

    # -------------------------------------------------------------------- run
    def run(self) -> bool:
        if self.running or self.model_path is None:
            return False
        path, budget, tokens, probe = self.model_path, self.budget.value() / 100.0, self.tokens.value(), \
            self.probe.isChecked()
        policies = self.policies.isChecked()
        flash_config = None
        if self.settings is not None:
            flash_config = flash_config_for(path, self.settings, self.base_config)
        elif self.base_config is not None:
            flash_config = self.base_config

        def job(w: workers.Worker):
            kw: Dict[str, Any] = {"budget": budget, "tokens": tokens, "progress": w.progress_callback}
            kw["probe"] = probe
            if flash_config is not None:
                kw["flash_config"] = flash_config
            if policies:
                kw["policies"] = list(bench.POLICIES)
            return bench.run_bench(path, **kw)

        w = workers.Worker(job)
        w.progress.connect(self._on_progress)
        w.finished.connect(self._on_done)
        w.errored.connect(self._on_error)
        self.progress_card.show()
        self.bar.setValue(0)
        self.message.setText("starting…")
        self.run_btn.hide()
        self.cancel_btn.show()
        self.cancel_btn.setEnabled(True)
        self._worker = workers.start(w, self)
        self._update_buttons()
        return True

    def cancel(self) -> None:
        if self._worker is not None:
            self._worker.request_stop()
            self.cancel_btn.setEnabled(False)
            self.message.setText("cancelling…")

    def _on_progress(self, fraction: float, message: str) -> None:
        self.bar.setValue(int(fraction * 1000))
        self.message.setText(f"{fraction * 100:.0f}%  ·  {message}")

    def _ended(self) -> None:
        self._worker = None
        self.cancel_btn.hide()
        self.run_btn.show()
        self.progress_card.hide()
        self._update_buttons()

    def _on_done(self, report) -> None:
        self._ended()
        if report is None:
            self.summary.setText("Cancelled.")
            return
        self.show_report(report)

    def _on_error(self, message: str) -> None:
        self._ended()
        self.summary.setText(f'<span style="color:{theme.DANGER}">Speed test failed: {message}</span>')

    # ----------------------------------------------------------------- report
    def show_report(self, report) -> None:
        """Show a BenchReport (or its dict)."""
        self.report = None if isinstance(report, dict) else report
        d = report if isinstance(report, dict) else report.to_dict()
        self.report_dict = d
        rows = report_rows(d)
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, (key, _label, fmt) in enumerate(COLUMNS):
                it = QTableWidgetItem(_cell(row.get(key), fmt))
                if c == 0:
                    it.setForeground(pg.mkColor(ROW_COLORS[r % len(ROW_COLORS)]))
                    src = row.get("source")
                    if src and src != "real model":
                        it.setToolTip(src)
                else:
                    it.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                self.table.setItem(r, c, it)
        self._draw(rows)
        hh = self.table.horizontalHeader().height() or 32
        self.table.setFixedHeight(hh + 32 * max(len(rows), 1) + 6)
        notes = []
        for s in d.get("skipped") or []:
            notes.append(f"<b>{s.get('name')}</b> skipped: {s.get('reason')}")
        ratios = d.get("ratios") or {}
        if ratios:
            notes.append("Speed ratios: " + ", ".join(f"{k} {v:.2f}×" for k, v in ratios.items()))
        pol = policy_table_html(d)
        if pol:
            notes.insert(0, pol)
        self.notes.setMaximumHeight(260 if pol else 130)
        if pol:  # room for the policy table under the plots
            self.split.setSizes([160, 330, 200])
        notes += [str(n) for n in (d.get("notes") or [])]
        self.notes.setHtml("<br>".join(notes) if notes else "")
        budget = d.get("budget")
        bits = [f"{d.get('model_name', '')}"]
        if budget is not None:
            bits.append(f"budget {budget:.0%}" if budget <= 1 else f"budget {theme.human_bytes(budget)}")
        if d.get("budget_bytes"):
            bits.append(f"{budget_text(d)} of an FFN of {theme.human_bytes(d.get('ffn_bytes', 0))}")
        if d.get("tokens"):
            bits.append(f"{d['tokens']} tokens per configuration")
        if d.get("seconds"):
            bits.append(f"took {d['seconds']:.0f} s")
        self.summary.setText(" · ".join(b for b in bits if b))
        self._update_buttons()

    def _draw(self, rows: List[Dict[str, Any]]) -> None:
        for p in (self.plot_tps, self.plot_ms, self.plot_read):
            p.clear()
        if not rows:
            return
        names = [str(r.get("name", "?")) for r in rows]
        x = np.arange(len(rows), dtype=float)
        ticks = [list(zip(x, [bar_label(n) for n in names]))]
        tps = np.array([float(r.get("tokens_per_s") or 0) for r in rows])
        brushes = [pg.mkBrush(ROW_COLORS[i % len(ROW_COLORS)]) for i in range(len(rows))]
        self.plot_tps.addItem(pg.BarGraphItem(x=x, height=tps, width=0.6, brushes=brushes, pen=None))
        for i, v in enumerate(tps):
            t = pg.TextItem(f"{v:.1f}", color=theme.TEXT, anchor=(0.5, 1.1))
            t.setPos(x[i], v)
            self.plot_tps.addItem(t)
        pred = np.array([float(r.get("ms_predictor") or 0) for r in rows])
        io = np.array([float(r.get("ms_io") or 0) for r in rows])
        comp = np.array([float(r.get("ms_compute") or 0) for r in rows])
        for y0, h, col in ((0, pred, theme.C_PRED), (pred, io, theme.C_IO), (pred + io, comp, theme.C_COMPUTE)):
            self.plot_ms.addItem(pg.BarGraphItem(x=x, y0=y0, height=h, width=0.6, brush=pg.mkBrush(col), pen=None))
        raw = np.array([float(r.get("bytes_read_per_token") or 0) for r in rows])
        unit, div = ("MB", 1e6) if raw.max(initial=0) >= 2e6 else ("KB", 1e3)
        read = raw / div
        self.plot_read.addItem(pg.BarGraphItem(x=x, height=read, width=0.6, brush=pg.mkBrush(theme.C_IO), pen=None))
        self.plot_read.getPlotItem().setTitle(
            f'<span style="color:{theme.MUTED}; font-size:9pt">Read from flash per token ({unit})</span>')
        for i, v in enumerate(read):
            t = pg.TextItem(f"{v:.0f}" if v >= 10 else f"{v:.1f}", color=theme.TEXT, anchor=(0.5, 1.1))
            t.setPos(x[i], v)
            self.plot_read.addItem(t)
        for p in (self.plot_tps, self.plot_ms, self.plot_read):
            ax = p.getPlotItem().getAxis("bottom")
            ax.setTicks(ticks)
            ax.setHeight(40 if any("\n" in t for _, t in ticks[0]) else 24)  # room for two-line labels
            ax.setTextPen(pg.mkPen(theme.MUTED))
            p.getPlotItem().getAxis("left").setTextPen(pg.mkPen(theme.MUTED))
            p.setXRange(-0.6, len(rows) - 0.4)
        top = max(tps.max() if len(tps) else 0, 1e-6)
        headroom = 1.45  # the value labels sit above the bars: the tallest one's must fit in a short plot
        self.plot_tps.setYRange(0, top * headroom)
        self.plot_read.setYRange(0, max(read.max(initial=0), 1e-6) * headroom)
        ms_top = float((pred + io + comp).max(initial=0))
        self.plot_ms.setYRange(0, max(ms_top, 1e-6) * 1.08)

    def save_json(self, path: Path) -> Path:
        path = Path(path)
        if self.report is not None:
            return Path(self.report.save_json(path))
        return atomic_write_text(path, json.dumps(self.report_dict, indent=2) + "\n")

    def _save_json_dialog(self) -> None:
        if self.report_dict is None:
            return
        name = f"bench-{self.report_dict.get('model_name', 'model')}.json"
        f, _ = QFileDialog.getSaveFileName(self, "Save the speed test", str(Path.home() / name), "JSON (*.json)")
        if f:
            self.save_json(Path(f))
            self.summary.setText(f"Saved {f}")

    def _save_plots_dialog(self) -> None:
        if self.report is None:
            return
        d = QFileDialog.getExistingDirectory(self, "Save the plots into", str(Path.home()))
        if d:
            paths = bench.save_plots(self.report, Path(d))
            self.summary.setText(f"Saved {len(paths)} plot{'s' if len(paths) != 1 else ''} into {d}")

    # ------------------------------------------------------------------ close
    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.request_stop()
            workers.wait(self._worker, 120000)

    def closeEvent(self, e) -> None:
        if self.running:
            self.cancel()
        super().closeEvent(e)
