"""The one byte formatter and the budget's one text (mlx_flash/units.py, config.format_budget)."""

from __future__ import annotations

from mlx_flash.config import FlashConfig, format_budget
from mlx_flash.units import fmt_bytes


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
