"""Live performance plots from the engine's per-token Stats (pyqtgraph).

Six small plots: tokens/s; ms per token split into predictor / I/O / compute
(stacked), with the disk time hidden behind compute by pipelined layers (dashed);
bytes read from flash per token; neuron-cache hit rate; weights in
memory against the budget; process memory. Each has its current value beside
its title. Data comes only from ``Stats`` records (``add_stats``); drawing is
throttled to ~10 Hz so fast models do not flood the GUI thread.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, List, Optional

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QColor, QFont
from PySide6.QtWidgets import QFrame, QGridLayout, QHBoxLayout, QLabel, QScrollArea, QSizePolicy, QVBoxLayout, QWidget

from .. import theme

MAX_POINTS = 2048
MB = 1e6

_FIELDS = ("tokens_per_s", "inst_tps", "ms_total", "ms_predictor", "ms_io", "ms_compute", "ms_overlap", "bytes_read",
           "bytes_useful", "hit_rate", "cum_hit_rate", "resident_bytes", "cache_bytes", "budget_bytes",
           "process_rss", "peak_memory")


def _legend(items) -> str:
    return "&nbsp;&nbsp;".join(f'<span style="color:{c}">●</span> {t}' for c, t in items)


class StatCard(QFrame):
    """A title, the current value and a small plot."""

    def __init__(self, title: str, legend_items=(), unit: str = "", parent=None):
        super().__init__(parent)
        self.setObjectName("StatCard")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(10, 6, 10, 4)
        lay.setSpacing(1)
        head = QHBoxLayout()
        self.title = QLabel(title)
        self.title.setObjectName("StatTitle")
        head.addWidget(self.title)
        head.addStretch(1)
        self.value = QLabel("–")
        self.value.setObjectName("StatValue")
        self.value.setTextFormat(Qt.RichText)
        head.addWidget(self.value)
        lay.addLayout(head)
        self.legend = QLabel(_legend(legend_items))
        self.legend.setObjectName("StatLegend")
        self.legend.setTextFormat(Qt.RichText)
        self.legend.setVisible(bool(legend_items))
        lay.addWidget(self.legend)
        self.plot = pg.PlotWidget()
        self.plot.setBackground(theme.CARD)
        self.plot.setFixedHeight(64)
        self.plot.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        pi = self.plot.getPlotItem()
        pi.setMenuEnabled(False)
        pi.hideButtons()
        pi.setMouseEnabled(x=False, y=False)
        pi.showGrid(x=False, y=True, alpha=0.12)
        pi.getViewBox().setDefaultPadding(0.02)
        small = QFont()
        small.setPointSizeF(7.5)
        for ax in ("left", "bottom"):
            a = pi.getAxis(ax)
            a.setStyle(tickFont=small, tickLength=-4)
            a.setTextPen(pg.mkPen(theme.MUTED))
            a.setPen(pg.mkPen(theme.BORDER))
        pi.getAxis("left").setWidth(38)
        pi.hideAxis("bottom")  # x is the token index: the panel's header says how many
        if unit:
            pi.getAxis("left").setLabel(unit, **{"font-size": "7pt", "color": theme.MUTED})
        lay.addWidget(self.plot, 1)

    def curve(self, color: str, width: float = 1.6, dash: bool = False, fill: Optional[str] = None):
        pen = pg.mkPen(color, width=width, style=Qt.DashLine if dash else Qt.SolidLine)
        c = self.plot.plot([], [], pen=pen)
        if fill:
            c.setFillLevel(0)
            c.setBrush(pg.mkBrush(fill))
        return c


def _alpha(color: str, a: int) -> QColor:
    c = QColor(color)
    c.setAlpha(a)
    return c


class StatsPanel(QScrollArea):
    """The live performance panel. Feed it ``add_stats(stats)`` per token; ``begin()`` at the
    start of each answer clears the plots (the previous answer stays until then)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        body = QWidget()
        body.setObjectName("RightPanel")
        lay = QVBoxLayout(body)
        lay.setContentsMargins(12, 8, 12, 8)
        lay.setSpacing(6)

        self.engine_label = QLabel("No model loaded")
        self.engine_label.setObjectName("Muted")
        self.engine_label.setWordWrap(True)
        self.engine_label.setStyleSheet("font-size: 9pt;")
        lay.addWidget(self.engine_label)

        # Summary numbers (text) above the plots.
        grid = QGridLayout()
        grid.setHorizontalSpacing(14)
        grid.setVerticalSpacing(0)
        self.summary: Dict[str, QLabel] = {}
        self._summary_titles: Dict[str, QLabel] = {}
        for i, (key, label) in enumerate((("tokens", "tokens"), ("first", "first token"), ("hit", "cache hits"),
                                           ("active", "active neurons"), ("overlap", "I/O behind compute"))):
            v = QLabel("–")
            v.setObjectName("StatValue")
            t = QLabel(label)
            t.setObjectName("StatTitle")
            grid.addWidget(v, 0, i)
            grid.addWidget(t, 1, i)
            self.summary[key] = v
            self._summary_titles[key] = t
        lay.addLayout(grid)
        self._show_overlap(False)  # only pipelined layers have I/O behind compute (keeps the panel narrow)

        self.card_tps = StatCard("Speed", [(theme.C_TPS, "tokens/s (average)"), ("#5b5f78", "per token")])
        self.c_inst = self.card_tps.curve("#5b5f78", 1.0)
        self.c_tps = self.card_tps.curve(theme.C_TPS, 2.0)

        self.card_ms = StatCard("Time per token (ms)", [(theme.C_PRED, "predictor"), (theme.C_IO, "I/O"),
                                                         (theme.C_COMPUTE, "compute")])
        self.c_ms0 = self.card_ms.curve(theme.C_PRED, 0)
        self.c_ms0.setPen(None)
        self.c_ms1 = self.card_ms.curve(theme.C_PRED, 1.2)
        self.c_ms2 = self.card_ms.curve(theme.C_IO, 1.2)
        self.c_ms3 = self.card_ms.curve(theme.C_COMPUTE, 1.2)
        for a, b, col in ((self.c_ms0, self.c_ms1, theme.C_PRED), (self.c_ms1, self.c_ms2, theme.C_IO),
                          (self.c_ms2, self.c_ms3, theme.C_COMPUTE)):
            self.card_ms.plot.addItem(pg.FillBetweenItem(a, b, brush=pg.mkBrush(_alpha(col, 110))))
        # pipelined layers: disk reads of the next layer while this one computed (not in the stack)
        self.c_overlap = self.card_ms.curve(theme.C_IO, 1.4, dash=True)

        self.card_read = StatCard("Read from flash per token", [(theme.C_IO, "read"), (theme.C_COMPUTE, "useful")])
        self._read_unit = ""
        self.c_read = self.card_read.curve(theme.C_IO, 1.6, fill=_alpha(theme.C_IO, 40))
        self.c_useful = self.card_read.curve(theme.C_COMPUTE, 1.2)

        self.card_hit = StatCard("Neuron cache hit rate (%)", [(theme.C_COMPUTE, "this token"),
                                                                (theme.C_TPS, "since start")])
        self.c_hit = self.card_hit.curve(theme.C_COMPUTE, 1.0)
        self.c_cum = self.card_hit.curve(theme.C_TPS, 2.0)
        self.card_hit.plot.setYRange(0, 100)
        self.card_hit.plot.getPlotItem().enableAutoRange(axis="y", enable=False)

        self.card_mem = StatCard("Memory vs budget (MB)", [(theme.C_TPS, "weights resident"),
                                                           (theme.C_IO, "neuron cache"),
                                                           (theme.C_BUDGET, "cache budget")])
        self.c_res = self.card_mem.curve(theme.C_TPS, 2.0)
        self.c_cache = self.card_mem.curve(theme.C_IO, 1.6, fill=_alpha(theme.C_IO, 35))
        self.c_budget = self.card_mem.curve(theme.C_BUDGET, 1.4, dash=True)

        self.card_rss = StatCard("Process memory (MB)", [(theme.C_RSS, "process RSS"), (theme.C_PEAK, "MLX peak")])
        self.c_rss = self.card_rss.curve(theme.C_RSS, 2.0)
        self.c_peak = self.card_rss.curve(theme.C_PEAK, 1.4)

        self.cards = [self.card_tps, self.card_ms, self.card_read, self.card_hit, self.card_mem, self.card_rss]
        for c in self.cards:
            lay.addWidget(c)
        lay.addStretch(1)
        self.setWidget(body)

        self._data: Dict[str, Deque[float]] = {k: deque(maxlen=MAX_POINTS) for k in _FIELDS}
        self._x: Deque[int] = deque(maxlen=MAX_POINTS)
        self.count = 0            # tokens received since begin()
        self.total = 0            # tokens received since the panel was made
        self.last = None          # the latest Stats
        self._dirty = False
        self._timer = QTimer(self)
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._redraw)
        self._timer.start()
        self._dirty = True
        self._redraw()

    # ------------------------------------------------------------------ input
    def _show_overlap(self, on: bool) -> None:
        self.summary["overlap"].setVisible(on)
        self._summary_titles["overlap"].setVisible(on)

    def set_engine(self, name: str, mode: str, *, budget_bytes: int = 0, ffn_bytes: int = 0,
                   resident_bytes: int = 0, detail: str = "", budget_text: str = "") -> None:
        """``budget_text``: the budget with what it holds (``Engine.budget_text``), else ``budget_bytes``."""
        first = f'<b style="color:{theme.TEXT}">{name}</b> · {mode}'
        parts = []
        if mode.startswith("flash") and ffn_bytes:
            parts.append(f"FFN {theme.human_bytes(ffn_bytes)} on disk · "
                         f"budget {budget_text or theme.human_bytes(budget_bytes)}")
        elif mode == "dense":
            parts.append("all weights in memory")
        if resident_bytes:
            parts.append(f"{theme.human_bytes(resident_bytes)} in RAM")
        if detail:
            parts.append(detail)
        self.engine_label.setText(first + "<br>" + " · ".join(parts))
        self.engine_label.setTextFormat(Qt.RichText)

    def begin(self) -> None:
        """A new answer starts: clear the plots."""
        for d in self._data.values():
            d.clear()
        self._x.clear()
        self.count = 0
        self._dirty = True

    def add_stats(self, s) -> None:
        """One token's :class:`mlx_flash.stats.Stats`."""
        self.last = s
        self.count += 1
        self.total += 1
        self._x.append(int(getattr(s, "token_index", self.count - 1)))
        d = self._data
        d["tokens_per_s"].append(float(s.tokens_per_s))
        d["inst_tps"].append(1e3 / s.ms_total if s.ms_total > 0 else 0.0)
        for k in ("ms_total", "ms_predictor", "ms_io", "ms_compute", "ms_overlap"):
            d[k].append(float(getattr(s, k)))
        for k in ("bytes_read", "bytes_useful", "resident_bytes", "cache_bytes", "budget_bytes", "process_rss",
                  "peak_memory"):
            d[k].append(float(getattr(s, k)))
        d["hit_rate"].append(100.0 * float(s.hit_rate))
        d["cum_hit_rate"].append(100.0 * float(s.cum_hit_rate))
        self._dirty = True

    def series(self, key: str) -> List[float]:
        """The plotted values of one field (for tests and the screenshot script)."""
        return list(self._data[key])

    def flush(self) -> None:
        """Draw now (the timer draws at ~10 Hz)."""
        self._dirty = True
        self._redraw()

    # ---------------------------------------------------------------- drawing
    def _redraw(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        x = np.fromiter(self._x, dtype=float, count=len(self._x))
        a = {k: np.fromiter(v, dtype=float, count=len(v)) for k, v in self._data.items()}
        if len(x) > 1 and x[0] == 0:  # the first token's figures are the prompt's (its last chunk is read with
            x = x[1:]                 # that token): shown as "first token", left out of the per-token plots
            a = {k: v[1:] for k, v in a.items()}
        n = len(x)
        if n == 0:
            for c in (self.c_inst, self.c_tps, self.c_ms0, self.c_ms1, self.c_ms2, self.c_ms3, self.c_overlap,
                      self.c_read, self.c_useful, self.c_hit, self.c_cum, self.c_res, self.c_cache, self.c_budget,
                      self.c_rss, self.c_peak):
                c.setData([], [])
            for card in self.cards:
                card.value.setText("–")
                card.plot.getPlotItem().getAxis("left").setStyle(showValues=False)
            for v in self.summary.values():
                v.setText("–")
            return
        self.c_inst.setData(x, a["inst_tps"])
        self.c_tps.setData(x, a["tokens_per_s"])
        p = a["ms_predictor"]
        pi = p + a["ms_io"]
        pic = pi + a["ms_compute"]
        self.c_ms0.setData(x, np.zeros(n))
        self.c_ms1.setData(x, p)
        self.c_ms2.setData(x, pi)
        self.c_ms3.setData(x, pic)
        self.c_overlap.setData(x, a["ms_overlap"])
        unit, div = ("MB", 1e6) if a["bytes_read"].max(initial=0) >= 2e6 else ("KB", 1e3)
        if unit != self._read_unit:
            self._read_unit = unit
            self.card_read.legend.setText(_legend([(theme.C_IO, f"read ({unit})"),
                                                   (theme.C_COMPUTE, f"useful ({unit})")]))
        self.c_read.setData(x, a["bytes_read"] / div)
        self.c_useful.setData(x, a["bytes_useful"] / div)
        self.c_hit.setData(x, a["hit_rate"])
        self.c_cum.setData(x, a["cum_hit_rate"])
        self.c_res.setData(x, a["resident_bytes"] / MB)
        self.c_cache.setData(x, a["cache_bytes"] / MB)
        self.c_budget.setData(x, a["budget_bytes"] / MB)
        self.c_rss.setData(x, a["process_rss"] / MB)
        self.c_peak.setData(x, a["peak_memory"] / MB)
        for card in self.cards:
            card.plot.getPlotItem().getAxis("left").setStyle(showValues=True)
        if n == 1:  # a single point draws nothing: widen the x range a little
            for card in self.cards:
                card.plot.setXRange(x[0] - 1, x[0] + 1)
        else:
            for card in self.cards:
                card.plot.enableAutoRange(axis="x")

        s = self.last
        flash = str(s.mode).startswith("flash")
        self.card_tps.value.setText(f"{s.tokens_per_s:.1f} <small>tok/s</small>")
        self.card_ms.value.setText(f"{s.ms_total:.1f} <small>ms</small>")
        legend = [(theme.C_PRED, f"predictor {s.ms_predictor:.1f}"), (theme.C_IO, f"I/O {s.ms_io:.1f}"),
                  (theme.C_COMPUTE, f"compute {s.ms_compute:.1f}")]
        if s.ms_prefetch > 0:
            legend.append((theme.C_IO, f"behind compute {s.ms_overlap:.1f} (dashed)"))
        self.card_ms.legend.setText(_legend(legend))
        self.card_read.value.setText(theme.human_bytes(s.bytes_read) if flash else "<small>dense: none</small>")
        self.card_hit.value.setText(f"{100 * s.cum_hit_rate:.0f}<small>%</small>")
        if s.budget_bytes:
            self.card_mem.value.setText(f"{s.cache_bytes / MB:.1f} / {s.budget_bytes / MB:.1f} <small>MB</small>")
        else:
            self.card_mem.value.setText(f"{s.resident_bytes / MB:.0f} <small>MB</small>")
        self.card_rss.value.setText(f"{s.process_rss / MB:.0f} <small>MB</small>")

        self.summary["hit"].setText(f"{100 * s.cum_hit_rate:.0f}%" if flash else "–")
        self.summary["active"].setText(theme.human_count(s.neurons_active) if flash else "all")
        # a mixture-of-experts model from flash (mode flash-router): the counts and hits are experts
        self._summary_titles["active"].setText("active experts" if s.mode == "flash-router" else "active neurons")
        self.summary["tokens"].setText(str(self.count))
        # time to first token (reading the prompt + the first forward pass); the prompt's speed in the tooltip
        self.summary["first"].setText(f"{s.ms_first_token / 1e3:.2f} s" if s.ms_first_token else "–")
        self.summary["first"].setToolTip(f"{s.prompt_tokens} prompt tokens read at {s.prompt_tps:.0f} tokens/s"
                                         if s.prompt_tps else "")
        self._show_overlap(s.ms_prefetch > 0)
        self.summary["overlap"].setText(f"{s.ms_overlap:.0f} ms" if s.ms_prefetch > 0 else "–")
