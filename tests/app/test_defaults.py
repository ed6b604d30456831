"""The engine's defaults are declared once, in FlashConfig: the CLI's flags and the app's
per-model settings start from them."""

from __future__ import annotations

import pytest

from mlx_flash import library
from mlx_flash.bench import DEFAULT_POLICY_BUDGETS, DEFAULT_PPL_TOKENS
from mlx_flash.cli import _parse_sweep, build_parser, flash_config_from_args
from mlx_flash.config import FlashConfig, budget_as_text, parse_budget
from mlx_flash_app import theme
from mlx_flash_app.widgets.model_library import flash_config_for, model_settings


def test_budget_as_text_inverts_parse_budget():
    for b in (0.5, 0.25, 0.1, 1.0, 0.333, 300000.0, 512e6):
        assert parse_budget(budget_as_text(b)) == pytest.approx(b, rel=1e-12)
    assert budget_as_text(0.5) == "50%" and budget_as_text(300000.0) == "300000B"


def test_cli_defaults_are_flash_config_defaults(capsys):
    d = FlashConfig()
    for argv in (["generate", "-p", "x"], ["chat"]):
        args = build_parser().parse_args(argv)
        assert (args.budget, args.window, args.threads, args.policy, args.active, args.engine, args.sparsity,
                args.hot_fraction) == (d.budget, d.window, d.threads, d.policy, d.active, d.engine, d.sparsity,
                                       d.hot_fraction)
        assert flash_config_from_args(args) == d
    b = build_parser().parse_args(["bench"])
    assert (b.budget, b.window, b.threads, b.sparsity, b.policy_active) == (d.budget, d.window, d.threads,
                                                                             d.sparsity, d.active)
    assert _parse_sweep(b.policy_budgets) == list(DEFAULT_POLICY_BUDGETS) and b.ppl_tokens == DEFAULT_PPL_TOKENS
    for sub in ("generate", "bench"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([sub, "--help"])
        helptext = " ".join(capsys.readouterr().out.split())
        assert f"default {budget_as_text(d.budget)}" in helptext and f"default {d.window})" in helptext


def test_app_model_settings_default_to_flash_config(tiny_models):
    d = FlashConfig()
    ms = model_settings(theme.settings(), "never-saved")
    assert parse_budget(f"{ms['budget_pct']}%") == d.budget
    assert (ms["window"], ms["threads"], ms["active"], ms["policy"]) == (d.window, d.threads, d.active, d.policy)
    path = library.import_model(tiny_models["flash"], name="Tiny", calibrate=False)
    assert flash_config_for(path, theme.settings()) == d  # nothing saved: the engine's defaults
    base = FlashConfig(scratch_neurons=8, extra={"recall": 0.9})
    assert flash_config_for(path, theme.settings(), base) == base
