"""The one byte formatter and the budget's one text (mlx_flash/units.py, config.format_budget)."""

from __future__ import annotations

from mlx_flash.config import FlashConfig, format_budget
from mlx_flash.units import eta_text, fmt_bytes, fmt_duration


def test_fmt_bytes_decimal_units():
    assert fmt_bytes(12) == "12 B"
    assert fmt_bytes(75_500_000) == "75.5 MB"
    assert fmt_bytes(1.2e9) == "1.2 GB"
    assert fmt_bytes(None) == "–"


def test_budget_names_what_it_holds_and_the_parts_add_up():
    cfg = FlashConfig(budget=0.5)
    total = cfg.budget_bytes(159_200_000)  # 79.6 MB: half of the default model's FFN
    predictors = 4_100_000
    assert format_budget(total - predictors, predictors) == "79.6 MB: 75.5 MB cache + 4.1 MB predictors"
    assert format_budget(total) == "79.6 MB cache"  # no predictors: all of it is cache


def test_time_left_comes_from_the_measured_rate():
    assert fmt_duration(5) == "5 s" and fmt_duration(125) == "2 min 05 s" and fmt_duration(3720) == "1 h 02 min"
    assert eta_text(0.01, 30) == "30 s so far"  # too little done to measure a rate
    assert eta_text(0.25, 60) == "1 min 00 s so far, about 3 min 00 s left"  # 25% a minute: 3 more minutes
    assert eta_text(0.5, 2) == "2 s so far"  # too early
