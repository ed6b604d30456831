"""Calibration end to end on tiny models: collection, thresholds, cancel, ReLU rule, evaluation, CLI;
plus one slow test on the default model (held-out recall above a floor)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer

from mlx_flash import corpus, default_model
from mlx_flash.calibrate import (
    Collector,
    calibrate,
    generate_and_collect,
    install_hooks,
    load_dense_model,
    read_prompts,
    split_by_sequence,
)
from mlx_flash.cli import main
from mlx_flash.config import FlashConfig
from mlx_flash.engine import load
from mlx_flash.evaluate import evaluate
from mlx_flash.paths import HOME_ENV
from mlx_flash.predictor import PREDICTOR_FILE, load_predictor_chooser
from mlx_flash.progress import Cancelled
from mlx_flash.storage.format import UPDOWN_FILE, Manifest, convert_to_flash, open_flash
from tests.test_relu_family import make_relu_llama
from tests.tiny import make_tiny_flash

PROMPTS = ["hi", "what is the time?", "tell me about cats", "please help me", "a story", "the end"]
TEXT = ("In the quiet valley the river ran slowly past the mill, and the miller's children watched the "
        "boats go by. Every morning the baker opened his shop and the smell of bread filled the street. ") * 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    return make_tiny_flash(root, layers=2, hidden=64, ffn=128, dtype="float32", seed=11)


def _snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_prompts_file():
    prompts = read_prompts()
    assert 40 <= len(prompts) <= 80
    assert len(set(prompts)) == len(prompts)
    assert all(len(p) > 10 for p in prompts)


def test_batched_generation_collects_valid_positions_only(tiny):
    files = open_flash(tiny)
    tok = load_tokenizer(tiny)
    model = load_dense_model(files, "float32")
    col = Collector(2)
    install_hooks(model, "silu", col.hook)
    n, answers = generate_and_collect(model, tok, PROMPTS[:3], col, max_new=5, budget=10_000, temperature=0.0)
    X, seq = col.finish()
    assert X.shape == (2, n, 64) and len(seq) == n and X.dtype == np.float16
    assert len(answers) == 3
    # greedy batched == greedy one at a time (left padding is masked out)
    col2 = Collector(2)
    install_hooks(model, "silu", col2.hook)
    _, single = generate_and_collect(model, tok, PROMPTS[1:2], col2, max_new=5, budget=10_000, temperature=0.0)
    assert single[0] == answers[1]
    # the budget caps what is kept
    col3 = Collector(2)
    install_hooks(model, "silu", col3.hook)
    n3, _ = generate_and_collect(model, tok, PROMPTS, col3, max_new=5, budget=50, temperature=0.0)
    assert n3 == 50 and col3.finish()[0].shape[1] == 50


def test_split_keeps_sequences_together():
    seq = np.repeat(np.arange(20), 30)
    tr, va, te = split_by_sequence(seq)
    assert len(tr) + len(va) + len(te) == len(seq)
    assert not (set(seq[tr]) & set(seq[va])) and not (set(seq[tr]) & set(seq[te])) and not (set(seq[va]) & set(seq[te]))
    assert len(va) >= 0.1 * len(seq) - 30 and len(te) >= 0.1 * len(seq) - 30


def test_cancel_leaves_nothing_behind(tiny, tmp_path):
    flash = shutil.copytree(tiny, tmp_path / "c.flash")
    before = _snapshot(flash)
    for stop_at in (0.1, 0.7, 0.99):
        def progress(fraction, message, stop_at=stop_at):
            return fraction < stop_at

        with pytest.raises(Cancelled):
            calibrate(flash, sparsity=0.5, rank=8, tokens=200, max_new_tokens=8, prompts=PROMPTS,
                      progress=progress)
        assert _snapshot(flash) == before, stop_at  # no predictors, manifest untouched, no temp files
    # a finished run writes exactly the predictor file and the manifest, and (neuron order on disk,
    # most frequently active first: the default) ffn.bin
    seen = []
    calibrate(flash, sparsity=0.5, rank=8, tokens=200, max_new_tokens=8, prompts=PROMPTS,
              progress=lambda f, m: seen.append(f))
    after = _snapshot(flash)
    passed = open_flash(flash).manifest.predictors["gate_first"]["perplexity"]["passed"]
    # plus gate-first's up/down side file when gate-first kept quality (storage.format.write_updown)
    assert set(after) - set(before) == ({PREDICTOR_FILE, UPDOWN_FILE} if passed else {PREDICTOR_FILE})
    assert sorted(k for k in before if before[k] != after[k]) == ["ffn.bin", "manifest.json"]
    assert seen[-1] == 1.0 and seen == sorted(seen)


def test_recalibration_replaces_predictors(tiny, tmp_path):
    flash = shutil.copytree(tiny, tmp_path / "r.flash")
    calibrate(flash, sparsity=0.5, rank=8, tokens=150, max_new_tokens=8, prompts=PROMPTS)
    first = open_flash(flash).manifest.predictors["id"]
    calibrate(flash, sparsity=0.3, rank=4, tokens=150, max_new_tokens=8, prompts=PROMPTS)
    info = open_flash(flash).manifest.predictors
    assert info["id"] != first and info["rank"] == 4 and info["sparsity"] == 0.3
    assert load_predictor_chooser(open_flash(flash)).weights.rank == 4
    assert not [p for p in flash.iterdir() if p.name.startswith(".")]


def test_user_text_is_mixed_in(tiny, tmp_path):
    flash = shutil.copytree(tiny, tmp_path / "t.flash")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    rep = calibrate(flash, sparsity=0.5, rank=8, tokens=400, max_new_tokens=8, prompts=PROMPTS, text=text)
    assert rep.sources["text_tokens"] > 0 and rep.sources["chat_tokens"] > 0
    assert rep.sources["text"] == str(text.resolve())


def test_relu_models_use_the_exact_rule(tmp_path):
    src = make_relu_llama(tmp_path / "src", "relu")
    flash = convert_to_flash(src, tmp_path / "relu.flash")
    rep = calibrate(flash, sparsity=0.9, rank=8, tokens=200, max_new_tokens=8, prompts=PROMPTS)
    info = open_flash(flash).manifest.predictors
    assert rep.thresholds == [0.0] * 3 and info["rule"].startswith("exact")
    assert info["recall"] == rep.recall == 0.999  # the exact rule's default recall target
    freq = load_predictor_chooser(open_flash(flash)).frequencies
    assert 0.3 < float(freq.mean()) < 0.7  # random ReLU: about half, whatever the sparsity asked for
    # auto: gate-first is a candidate without gate thresholds here (relu(gate x) != 0 is exact)

    eng = load(flash, FlashConfig(budget=0.6, threads=1))
    try:
        gate = eng.active_info.candidates["gate"]
        assert gate.quality.startswith("exact") and gate.density == pytest.approx(
            info["held_out"]["0.999"]["true_fraction"])
    finally:
        eng.close()


def test_evaluate_reports_every_mode(tiny, tmp_path):
    flash = shutil.copytree(tiny, tmp_path / "e.flash")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    # without calibration: dense only, with a note
    rep = evaluate(flash, text=text, tokens=200, chunk=64)
    assert list(rep.modes) == ["dense"] and rep.notes
    calibrate(flash, sparsity=0.5, rank=8, tokens=300, max_new_tokens=16, prompts=PROMPTS)
    rep = evaluate(flash, text=text, tokens=300, chunk=100)
    assert list(rep.modes) == ["dense", "oracle", "predictor", "gate"]
    d, o, p, g = rep.modes["dense"], rep.modes["oracle"], rep.modes["predictor"], rep.modes["gate"]
    # gate-first: its calibrated sparsity, recall against the oracle, and only up/down bytes per neuron
    assert g.sparsity is not None and 0 < g.recall <= 1 and g.active_fraction < 1
    m = open_flash(flash).manifest
    assert g.bytes_per_token == pytest.approx(g.active_fraction * m.num_layers * m.intermediate_size
                                              * m.bundle_bytes * 2 / 3)
    assert p.bytes_per_token == pytest.approx(p.active_fraction * m.num_layers * m.intermediate_size * m.bundle_bytes)
    assert rep.tokens == 300
    assert d.active_fraction == 1.0 and not d.reuse
    assert 0.3 < o.active_fraction < 0.7
    assert 0 < p.recall <= 1 and 0 < p.precision <= 1 and p.oracle_fraction is not None
    for r in (o, p):
        assert len(r.reuse) == len(r.new) == len(r.window) == 8
        assert all(0 <= v <= 1 for v in r.reuse + r.new + r.window)
        assert r.reuse == sorted(r.reuse) and r.window == sorted(r.window)
        assert r.new == sorted(r.new, reverse=True)
    # dense perplexity equals the engine's own (chunks of the same size, float32 model)

    eng = load(flash, dense=True)
    ids = list(eng.tokenizer.encode(TEXT, add_special_tokens=False))[:301]
    assert abs(eng.perplexity(ids, chunk=100) - d.perplexity) / d.perplexity < 1e-3
    data = json.loads(rep.to_json())
    assert data["modes"]["predictor"]["perplexity_vs_dense"] == pytest.approx(p.perplexity / d.perplexity - 1)
    table = rep.format_table()
    assert "predictor" in table and "reuse" in table
    # per layer against the oracle (predictor and gate-first): the pooled figures are their sums
    for r in (p, g):
        assert len(r.per_layer_recall) == len(r.per_layer_precision) == len(r.per_layer_active) == m.num_layers
        assert all(0 <= v <= 1 for v in r.per_layer_recall + r.per_layer_precision)
        assert min(r.per_layer_precision) <= r.precision <= max(r.per_layer_precision)
    assert not o.per_layer_recall and "per layer, vs the oracle" in table and "layer  1:" in table


def test_cli_calibrate_and_eval(tiny, tmp_path, capsys, monkeypatch):
    flash = shutil.copytree(tiny, tmp_path / "cli.flash")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "cal.json"
    assert main(["calibrate", str(flash), "--sparsity", "0.4", "--rank", "8", "--tokens", "200", "--quiet",
                 "--json", str(out)]) == 0
    assert "recall target 0.99" in capsys.readouterr().out
    assert json.loads(out.read_text())["rank"] == 8
    ev = tmp_path / "eval.json"
    assert main(["eval", str(flash), "--text", str(text), "--tokens", "150", "--quiet", "--json", str(ev)]) == 0
    printed = capsys.readouterr().out
    assert "oracle" in printed and "predictor" in printed
    assert set(json.loads(ev.read_text())["modes"]) == {"dense", "oracle", "predictor", "gate"}
    assert main(["generate", "--model", str(flash), "--flash", "-p", "hi", "--max-tokens", "4", "-q"]) == 0


@pytest.mark.slow
def test_default_model_predictor_recall(tmp_path):
    """The default model: calibrate (reduced token budget) and check the held-out recall
    and the predictor's recall on Genesis against the oracle."""
    src = default_model.ensure_default_flash()
    flash = tmp_path / "smol.flash"
    flash.mkdir()
    for p in src.iterdir():  # hard links: the big files are shared, the manifest is replaced atomically
        if p.is_file() and p.name != PREDICTOR_FILE:
            os.link(p, flash / p.name)
    rep = calibrate(flash, sparsity=0.35, rank=32, tokens=2048, max_new_tokens=48)
    held = rep.held_out["0.99"]
    assert held["recall"] > 0.97
    assert held["predicted_fraction"] < 0.995
    if corpus.available():
        text = tmp_path / "genesis.txt"
        text.write_text(corpus.kjv_text())
        ev = evaluate(flash, text=text, tokens=1024, modes=("oracle", "predictor"))
        assert ev.modes["predictor"].recall > 0.95
        assert ev.modes["predictor"].perplexity < 1.2 * ev.modes["oracle"].perplexity


# --------------------------------------------------------------------------- the calibrated default model
@pytest.fixture(scope="module")
def calibrated_default(tmp_path_factory):
    """The default model as `make model` / `mlx-flash prepare` leaves it: flash format with
    predictors. `make test` prepares it before the tests run, so the user's copy is reused
    (read only); without it (a bare `pytest`) it is prepared here in a temporary home
    (~3.5 min on a busy 2-core machine, with or without OpenBLAS)."""
    folder = default_model.default_flash_dir()
    problem = default_model.calibration_problem(folder)
    if problem is None or problem.startswith("failed its quality gate"):  # current calibration: judged below
        yield folder
        return
    home = tmp_path_factory.mktemp("default_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HOME_ENV, str(home))
        yield default_model.ensure_default_flash()


def test_default_model_is_calibrated_and_chats_with_predictors(calibrated_default):
    info = Manifest.load(calibrated_default).predictors
    held = info["held_out"]["0.99"]  # sequences used neither for fitting nor for the cutoffs
    assert held["recall"] > 0.97
    assert held["predicted_fraction"] < 0.995
    m = Manifest.load(calibrated_default)
    eng = load(calibrated_default, FlashConfig(active="predictor"))
    try:
        assert eng.chooser.name == "predictor"
        per_token = m.num_layers * m.intermediate_size
        qa = {"What is the capital of France?": "Paris", "What is the capital of Japan?": "Tokyo",
              "How many days are in a week?": "7", "What is 2 + 2?": "4"}
        right = 0
        for q, a in qa.items():
            steps = list(eng.stream_generate([{"role": "user", "content": q}], max_tokens=16))
            right += a in "".join(r.text for r in steps)
            # the predictor skipped neurons (the first token's figures are the prompt's chunk: every neuron)
            assert steps[0].stats.neurons_active == per_token
            assert all(0 < r.stats.neurons_active < per_token for r in steps[1:])
        # measured: 4/4, as dense (the answers are short greedy ones; a flip of a close first token is
        # possible on another BLAS, hence 3)
        assert right >= 3
    finally:
        eng.close()


def test_default_model_predictor_on_unseen_text(calibrated_default, tmp_path):
    if not corpus.available():
        pytest.skip(f"no KJV text ({corpus.INSTALL_HINT})")
    text = tmp_path / "genesis.txt"
    text.write_text(corpus.kjv_text("Genesis 1:1-50:26"))
    ev = evaluate(calibrated_default, text=text, tokens=256, modes=("dense", "oracle", "predictor"))
    pred, dense = ev.modes["predictor"], ev.modes["dense"]
    assert pred.recall > 0.95
    assert pred.perplexity < 1.05 * dense.perplexity
    assert pred.active_fraction < 1.0
