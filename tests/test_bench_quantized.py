"""The speed test on a quantized flash folder (issue #14): the dense bfloat16 row beside the
dense quantized one, bytes per token replayed on the bfloat16 layout, greedy agreement with
dense over the project's prompt set; the down-projection's group size option. Tiny real
models (tests/tiny.py), quantized by mlx-lm itself."""

from __future__ import annotations

import pytest

from mlx_flash.bench import (
    DENSE,
    DENSE_BF16,
    NAIVE,
    PREDICTOR,
    BenchReport,
    agreement_prompt_set,
    format_table,
    run_bench,
)
from mlx_flash.calibrate import calibrate, read_prompts
from mlx_flash.cli import main
from mlx_flash.config import FlashConfig
from mlx_flash.neuron_cache import cache_rows
from mlx_flash.storage.format import convert_to_flash, float_bundle_bytes, group_quant_bytes, open_flash
from tests.tiny import make_tiny_llama, quantize_tiny

HIDDEN, FFN, LAYERS = 64, 256, 2
TOKENS, AGREE_PROMPTS, AGREE_TOKENS = 4, 20, 3


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MLX_FLASH_HOME", str(tmp_path_factory.mktemp("home")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def q4(home, tmp_path_factory):
    root = tmp_path_factory.mktemp("q4bench")
    src = make_tiny_llama(root / "bf16", layers=LAYERS, hidden=HIDDEN, ffn=FFN, dtype="bfloat16", seed=5)
    flash = convert_to_flash(quantize_tiny(src, root / "q", bits=4, group_size=32), root / "q.flash")
    calibrate(flash, sparsity=0.5, rank=8, tokens=150, max_new_tokens=8, prompts=["Hello there", "A short story"])
    return flash


@pytest.fixture(scope="module")
def run(q4):
    return run_bench(q4, budget=0.5, tokens=TOKENS, configs=["dense", "bf16", "naive", "predictor"], probe=False,
                     ppl_tokens=20, pipeline_twins=False, agreement_prompts=AGREE_PROMPTS,
                     agreement_tokens=AGREE_TOKENS,
                     flash_config=FlashConfig(threads=2))


def test_dense_bfloat16_row_beside_dense_quantized(run, q4):
    names = [r.name for r in run.rows]
    assert names[:2] == [DENSE, DENSE_BF16]
    d, b = run.row(DENSE), run.row(DENSE_BF16)
    assert d.mode == b.mode == "dense" and b.peak_memory > 0 and b.perplexity > 0
    # bfloat16 weights: more bytes in memory than the 4-bit ones
    assert b.peak_memory > d.peak_memory
    assert b.agree_with_dense is not None  # its tokens against the dense quantized row's
    table = format_table(run)
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {DENSE_BF16} |"))
    assert f"{b.peak_memory / d.peak_memory:.2f}x" in line  # the peak/dense column


def test_dense_bfloat16_is_skipped_for_a_float_folder(home, tmp_path):
    src = make_tiny_llama(tmp_path / "src", layers=1, hidden=32, ffn=64, dtype="bfloat16")
    flash = convert_to_flash(src, tmp_path / "f.flash")
    rep = run_bench(flash, tokens=2, configs=["bf16", "naive"], probe=False, ppl_tokens=0, pipeline_twins=False,
                    flash_config=FlashConfig(threads=2))
    assert [s["name"] for s in rep.skipped] == [DENSE_BF16]
    assert rep.row(NAIVE).bf16_bytes_read_per_token is None  # a float folder: nothing to compare


def test_bf16_bytes_replayed_from_the_rows_own_choice(run, q4):
    m = open_flash(q4).manifest
    bf = float_bundle_bytes(m)
    assert bf == 3 * HIDDEN * 2 and m.bundle_bytes < bf
    for name in (NAIVE, PREDICTOR):
        row = run.row(name)
        # the replay sizes the cache as the engine did
        # (the FFN and the resident part include the exact down layout's group scales)
        assert cache_rows(FlashConfig(budget=0.5).budget_bytes(m.ffn_bytes_total),
                          row.predictor_bytes + group_quant_bytes(m), m.bundle_bytes, LAYERS, FFN,
                          256)[0] == row.policy["capacity"]
        assert 0 < row.sim_bytes_read_per_token <= row.bf16_bytes_read_per_token
    # naive flash reads every non-resident neuron: the replay gives the measured bytes
    naive = run.row(NAIVE)
    assert naive.sim_bytes_read_per_token == pytest.approx(naive.bytes_read_per_token, rel=0.02)
    assert naive.sim_bytes_read_per_token < naive.bf16_bytes_read_per_token
    assert "this / bfloat16" in format_table(run)


def test_greedy_agreement_over_the_prompt_set(run):
    d = run.row(DENSE)
    assert run.agreement_prompts == AGREE_PROMPTS and run.agreement_tokens == AGREE_TOKENS
    assert d.agreement["per_prompt"] == [AGREE_TOKENS] * AGREE_PROMPTS  # dense against itself
    for name in (DENSE_BF16, NAIVE, PREDICTOR):
        a = run.row(name).agreement
        assert len(a["per_prompt"]) == AGREE_PROMPTS and all(0 <= v <= AGREE_TOKENS for v in a["per_prompt"])
        assert a["mean"] == pytest.approx(sum(a["per_prompt"]) / AGREE_PROMPTS)
    table = format_table(run)
    assert f"Greedy agreement with dense over {AGREE_PROMPTS} prompts" in table
    back = BenchReport.from_json(run.to_json())
    assert back.row(NAIVE).agreement == run.row(NAIVE).agreement
    assert back.row(NAIVE).bf16_bytes_read_per_token == run.row(NAIVE).bf16_bytes_read_per_token


def test_agreement_prompt_set_is_held_out():
    prompts = agreement_prompt_set()
    assert len(prompts) >= 20 and len(set(prompts)) == len(prompts)
    assert not {p.lower() for p in prompts} & {p.lower() for p in read_prompts()}  # no calibration prompt
    assert prompts[0] == "What is the capital of France?"


def test_agreement_asks_for_more_prompts_than_the_set_has(q4):
    with pytest.raises(ValueError, match="prompt set has"):
        run_bench(q4, tokens=2, configs=["dense"], probe=False, ppl_tokens=0, agreement_prompts=1000)


def test_down_group_size_option(tmp_path):
    src = make_tiny_llama(tmp_path / "src", layers=1, hidden=HIDDEN, ffn=128, dtype="bfloat16")
    q = quantize_tiny(src, tmp_path / "q", bits=4, group_size=32)
    m = open_flash(convert_to_flash(q, tmp_path / "d.flash", down_bits=4, down_group_size=64)).manifest
    assert m.quantization["down"] == {"bits": 4, "group_size": 64, "mode": "affine"}
    assert m.quantization["gate"]["group_size"] == 32  # rows keep the source's group size
    gate_up = 2 * (HIDDEN // 2 + 2 * (HIDDEN // 32) * 2)
    assert m.bundle_bytes == gate_up + HIDDEN // 2 + 2 * (HIDDEN // 64) * 2


def test_cli_bench_agreement_flags(q4, capsys):
    rc = main(["bench", "--model", str(q4), "--tokens", "2", "--configs", "dense,bf16,naive", "--no-probe",
               "--ppl-tokens", "0", "--no-twins", "--quiet", "--threads", "1",
               "--agreement-prompts", "2", "--agreement-tokens", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"| {DENSE_BF16} |" in out and "Greedy agreement with dense over 2 prompts" in out
    assert "| naive flash | " in out.split("Greedy agreement")[1]
