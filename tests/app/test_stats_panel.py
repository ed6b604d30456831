"""The live stats panel: fed only by the engine's per-token Stats."""

from __future__ import annotations

from PySide6.QtCore import QSettings

from mlx_flash.stats import Stats
from mlx_flash_app.widgets.model_library import flash_config_for
from mlx_flash_app.widgets.stats_panel import StatsPanel

from .conftest import WAIT, set_sampling


def _stats(i: int, **kw) -> Stats:
    base = dict(token_index=i, ms_total=10.0 + i, ms_predictor=1.0, ms_io=3.0, ms_compute=6.0 + i,
                bytes_read=40_000, bytes_useful=30_000, neurons_active=100, hit_rate=0.8, cum_hit_rate=0.75,
                resident_bytes=50_000_000, cache_bytes=10_000_000, budget_bytes=20_000_000, peak_memory=90_000_000,
                process_rss=300_000_000, tokens_per_s=50.0, prompt_tps=200.0, mode="flash-oracle")
    base.update(kw)
    return Stats(**base)


def test_panel_plots_and_numbers(qtbot):
    p = StatsPanel()
    qtbot.addWidget(p)
    p.resize(380, 900)
    p.show()
    for i in range(5):
        p.add_stats(_stats(i))
    p.flush()
    assert p.count == 5
    assert p.series("ms_total") == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert p.series("hit_rate") == [80.0] * 5
    x, y = p.c_ms3.getData()
    # stacked: predictor + I/O + compute = total; token 0 (the prompt's chunk) is the "first token" figure,
    # not plotted per token
    assert list(y) == [11.0, 12.0, 13.0, 14.0] and list(x) == [1, 2, 3, 4]
    x, y = p.c_budget.getData()
    assert list(y) == [20.0] * 4
    assert "50.0" in p.card_tps.value.text()
    assert "10.0 / 20.0" in p.card_mem.value.text()
    assert p.summary["hit"].text() == "75%" and p.summary["active"].text() == "100"
    assert "I/O 3.0" in p.card_ms.legend.text()
    assert p.summary["overlap"].text() == "–" and "behind compute" not in p.card_ms.legend.text()
    assert not p.summary["overlap"].isVisible()  # serial layers: no cell for it (the panel stays narrow)
    p.add_stats(_stats(5, ms_prefetch=4.0, ms_overlap=2.5))  # pipelined layers
    p.flush()
    assert p.summary["overlap"].text() == "2 ms" and "behind compute 2.5" in p.card_ms.legend.text()
    assert p.summary["overlap"].isVisible()
    assert list(p.c_overlap.getData()[1]) == [0.0] * 4 + [2.5]
    p.begin()
    p.flush()
    assert p.count == 0 and p.series("ms_total") == []
    assert p.card_tps.value.text() == "–"


def test_panel_receives_updates_during_generation(make_window, qtbot):
    w = make_window()
    set_sampling(w, max_tokens=16)
    with qtbot.waitSignal(w.answer_finished, timeout=WAIT) as blocker:
        w.send("Show me the numbers")
        qtbot.waitUntil(lambda: w.stats_panel.count >= 1, timeout=WAIT)
    n = blocker.args[0]["meta"]["tokens"]
    p = w.stats_panel
    assert p.count == n and len(p.series("tokens_per_s")) == n
    assert p.last.mode.startswith("flash")
    assert all(b > 0 for b in p.series("budget_bytes"))
    assert any(b > 0 for b in p.series("bytes_read"))
    assert all(r > 0 for r in p.series("process_rss"))
    x, y = p.c_tps.getData()
    assert len(y) == n - 1 and list(x) == list(range(1, n))  # token 0: the prompt's pass ("first token")
    assert p.summary["tokens"].text() == str(n)


def test_auto_neuron_choice_is_left_to_the_engine(tmp_path):
    """The app passes "auto" through: the engine measures per model (Engine.active_info),
    the app does not resolve it to the predictor itself."""
    settings = QSettings(str(tmp_path / "s.ini"), QSettings.IniFormat)
    assert flash_config_for(tmp_path / "m.flash", settings).active == "auto"
