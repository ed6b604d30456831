"""The speed-test dialog: real bench on a tiny model; a clear message without bench."""

from __future__ import annotations

import json

from mlx_flash.bench import CONFIGS
from mlx_flash_app.widgets import speed_test
from mlx_flash_app.widgets.speed_test import SpeedTestDialog, bar_label

from .conftest import WAIT


def _bench_dialog(make_window, tiny_models, tokens: int):
    """The speed-test dialog on the tiny flash model, no disk probe, ``tokens`` per configuration."""
    w = make_window(load=False)
    dlg = w.open_speed_test(tiny_models["flash"])
    dlg.probe.setChecked(False)
    dlg.tokens.setValue(tokens)
    return dlg


def test_speed_test_runs_and_saves_json(make_window, qtbot, tiny_models, tmp_path):
    dlg = _bench_dialog(make_window, tiny_models, 6)
    assert dlg.isVisible() and dlg.run_btn.isEnabled()
    assert dlg.run()
    assert dlg.running and dlg.cancel_btn.isVisible()
    qtbot.waitUntil(lambda: not dlg.running, timeout=3 * WAIT)
    assert dlg.report_dict is not None, dlg.summary.text()
    rows = speed_test.report_rows(dlg.report_dict)
    names = [r["name"] for r in rows]
    assert dlg.table.rowCount() == len(rows) >= 2
    assert "dense" in names and any("flash" in n for n in names)
    assert all(dlg.table.item(i, 1).text() not in ("", "–") for i in range(len(rows)))
    assert all(dlg.table.item(i, 2).text().endswith(" s") for i in range(len(rows)))  # time to first token
    assert " cache" in dlg.summary.text()  # the budget with what it holds (config.format_budget)
    out = dlg.save_json(tmp_path / "bench.json")
    saved = json.loads(out.read_text())
    assert [r["name"] for r in saved["rows"]] == names
    assert dlg.save_json_btn.isEnabled()
    dlg.close()


def test_speed_test_cancel(make_window, qtbot, tiny_models):
    dlg = _bench_dialog(make_window, tiny_models, 200)
    dlg.run()
    dlg.cancel()
    qtbot.waitUntil(lambda: not dlg.running, timeout=3 * WAIT)
    assert dlg.report_dict is None and "Cancelled" in dlg.summary.text()


def test_report_view_from_a_dict(qtbot):
    dlg = SpeedTestDialog()
    qtbot.addWidget(dlg)
    dlg.show_report({"model_name": "m", "budget": 0.5, "tokens": 8, "rows": [
        {"name": "dense", "tokens_per_s": 20.0, "ms_total": 50, "ms_predictor": 0, "ms_io": 0, "ms_compute": 50,
         "bytes_read_per_token": 0, "hit_rate": None, "peak_memory": 1e8, "perplexity": 7.1},
        {"name": "flash", "tokens_per_s": 10.0, "ms_total": 100, "ms_predictor": 5, "ms_io": 40,
         "ms_compute": 55, "bytes_read_per_token": 2e6, "hit_rate": 0.9, "peak_memory": 5e7, "perplexity": None},
    ], "skipped": [{"name": "naive", "reason": "test"}]})
    assert dlg.table.rowCount() == 2
    assert dlg.table.item(1, 8).text() == "90%" and dlg.table.item(1, 10).text() == "–"
    assert dlg.table.item(0, 2).text() == "–"  # no time to first token in this report
    assert "naive" in dlg.notes.toPlainText()
    assert dlg.save_json_btn.isEnabled() and not dlg.save_plots_btn.isEnabled()


def test_speed_test_compares_cache_policies(make_window, qtbot, tiny_models):
    dlg = _bench_dialog(make_window, tiny_models, 4)
    dlg.policies.setChecked(True)
    assert dlg.run()
    qtbot.waitUntil(lambda: not dlg.running, timeout=6 * WAIT)
    assert dlg.report_dict is not None, dlg.summary.text()
    pts = dlg.report_dict["policies"]
    assert {p["policy"] for p in pts} == {"window", "lru", "hot", "hot+window", "auto"}
    assert sorted({p["budget"] for p in pts}) == [0.25, 0.5, 0.75]
    text = dlg.notes.toPlainText()
    assert "Cache policies" in text and "hot+window" in text
    dlg.close()


def test_bar_labels_are_short_and_distinct():
    """Twelve bars share a plot: every configuration the bench knows, serial and pipelined, gets a
    distinct label of at most six characters a line (the table beside the plots has the full names)."""
    names = list(CONFIGS) + [f"{c} (pipelined)" for c in CONFIGS if c.startswith(("naive", "flash"))]
    labels = [bar_label(n) for n in names]
    assert len(set(labels)) == len(labels)
    assert all(len(line) <= 6 for lab in labels for line in lab.split("\n"))
    assert bar_label("flash predictor (pipelined)") == "pred.\npipe"
