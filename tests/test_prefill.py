"""Exact prefill with large reads, the token-level generator, time to first token (tiny real models)."""

from __future__ import annotations

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash.bench import run_ttft
from mlx_flash.cli import main
from mlx_flash.config import FlashConfig
from mlx_flash.engine import load
from mlx_flash.storage.format import FlashFormatError, convert_to_flash, open_flash
from tests.tiny import make_tiny_flash, make_tiny_llama, quantize_tiny

PROMPT = [5, 17, 99, 3, 42, 7, 8, 120, 11, 12, 200, 31, 64, 9, 77, 150]


@pytest.fixture(scope="module", params=["float32", "q4"])
def tiny(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"prefill-{request.param}")
    src = make_tiny_llama(root / "mlx", layers=3, hidden=64, ffn=256, dtype="float32", seed=5)
    if request.param == "q4":
        src = quantize_tiny(src, root / "q4")
    return src, convert_to_flash(src, root / "tiny.flash")


def _engine(dst, **kw):
    cfg = dict(active="all", budget=0.4, scratch_neurons=32, threads=2, engine="flash")
    cfg.update(kw)
    return load(dst, FlashConfig(**cfg))


def _prompt_logits(eng, tokens):
    """The last prompt position's logits through the engine's prefill (every neuron)."""
    step = next(eng.generate_step(tokens, 1))
    return np.array(step.logprobs.astype(mx.float32)), step


def test_large_read_prefill_equals_streamed_prefill_and_dense(tiny):
    """The staging-rows path (one read, one batched product per layer) gives the logits and the
    greedy tokens of the old path (non-resident rows streamed through the scratch buffer in
    chunks) and of the dense model."""
    src, dst = tiny
    dense = load(src)
    want_lp, _ = _prompt_logits(dense, PROMPT)
    want = [s.token for s in dense.generate_step(PROMPT, 12)]
    new = _engine(dst)
    old = _engine(dst)
    old.cache.prefill_rows = lambda: None  # the old path: overflow through the scratch in chunks
    for eng in (new, old):
        lp, step = _prompt_logits(eng, PROMPT)
        np.testing.assert_allclose(lp, want_lp, atol=2e-3, rtol=2e-3)
        assert step.stats.neurons_streamed > eng.cache.scratch_neurons  # more than one scratch chunk
    got_new = [s.token for s in new.generate_step(PROMPT, 12)]
    got_old = [s.token for s in old.generate_step(PROMPT, 12)]
    assert got_new == got_old == want
    # the same rows were read, the large-read path in fewer calls
    assert new.counters.bytes_useful == old.counters.bytes_useful
    assert new.counters.read_requests <= old.counters.read_requests
    for eng in (new, old):
        for lc in eng.cache.layers:
            lc.check_invariants()
        eng.close()


def test_budget_holds_during_prefill_and_staging_is_transient(tiny):
    """While the prompt is read the cache stays within its budget; the staging rows (one layer's
    non-resident neurons, outside the budget like the pipeline's buffers) are counted in the
    engine's resident bytes and freed afterwards."""
    _, dst = tiny
    eng = _engine(dst, budget=0.3)
    cache, budget = eng.cache, eng.budget_bytes
    base = eng.resident_bytes()
    seen = []
    read = eng.reader.submit  # every read, synchronous or not, is submitted

    def observed(layer, ids, out, rows=None):  # the real reader, observed at every read
        st = eng._sparse_ffns()[layer]._state
        seen.append((cache.resident_bytes, cache.capacity_bytes, eng.resident_bytes(), st.all_neurons,
                     st.prefill_rows.nbytes if st.prefill_rows is not None else 0))
        return read(layer, ids, out, rows)

    eng.reader.submit = observed
    steps = list(eng.generate_step(PROMPT * 3, 4, prefill_step=16))  # three prompt chunks
    prefill = [s for s in seen if s[3]]
    assert prefill and len(seen) > len(prefill)  # reads while prefilling and while decoding
    m = eng.files.manifest
    staging = (m.intermediate_size - cache.layers[0].capacity) * cache.bundle_bytes
    for resident, capacity, total, _, rows_bytes in prefill:
        assert resident <= capacity <= budget
        assert rows_bytes == staging > 0
        assert total <= base + cache.capacity_bytes + staging
    assert all(s.stats.cache_bytes <= budget for s in steps)
    assert eng.resident_bytes() <= base + cache.capacity_bytes  # the staging rows are gone
    assert all(f._state.prefill_rows is None and not f._state.all_neurons for f in eng._sparse_ffns())
    eng.close()


def test_generate_step_yields_stream_generate_tokens(tiny):
    src, dst = tiny
    for eng in (load(src), _engine(dst), _engine(dst, prefill="sparse", active="oracle", sparsity=0.5)):
        eng.tokenizer.eos_token_ids = []
        text_steps = list(eng.stream_generate(PROMPT, 10))
        steps = list(eng.generate_step(PROMPT, 10))
        assert [r.token for r in text_steps] == [s.token for s in steps]
        assert len(steps) == 10 and text_steps[-1].finish_reason == "length"
        for s in steps:
            assert s.logprobs.shape == (eng.model.args.vocab_size,)
            assert int(mx.argmax(s.logprobs).item()) == s.token  # greedy by default
        assert steps[0].stats.ms_first_token > 0
        assert all(s.stats.ms_first_token == steps[0].stats.ms_first_token for s in steps)
        eng.close()


def test_prompt_chunks_and_stop(tiny):
    """Any chunking reads the same prompt; should_stop before a chunk stops without a token."""
    _, dst = tiny
    eng = _engine(dst)
    ref = [s.token for s in eng.generate_step(PROMPT, 6)]
    for step in (1, 5, 15, 16):
        assert [s.token for s in eng.generate_step(PROMPT, 6, prefill_step=step)] == ref, step
    calls = []

    def stop_at_third_chunk() -> bool:
        calls.append(1)
        return len(calls) > 2

    assert list(eng.generate_step(PROMPT, 6, prefill_step=4, should_stop=stop_at_third_chunk)) == []
    assert len(calls) == 3
    with pytest.raises(ValueError, match="empty prompt"):
        list(eng.generate_step([], 3))
    eng.close()


def test_ttft_section_records_each_prompt_length(tiny):
    _, dst = tiny
    res = run_ttft(dst, lengths=[4, 24], configs=["dense", "naive"], budget=0.4, repeats=1)
    assert [r["prompt_tokens"] for r in res["rows"]] == [4, 24, 4, 24]
    for r in res["rows"]:
        assert r["config"] in ("dense", "naive flash") and r["ms_first_token"] > 0
        assert r["first_token"] >= 0
    # dense and naive flash read the same prompt exactly: the same first token
    by = {(r["config"], r["prompt_tokens"]): r["first_token"] for r in res["rows"]}
    assert by[("dense", 4)] == by[("naive flash", 4)] and by[("dense", 24)] == by[("naive flash", 24)]


def test_cli_bench_ttft_only(tmp_path, monkeypatch, capsys):

    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path / "home"))
    flash = make_tiny_flash(tmp_path / "f", dtype="float32")
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(flash), "--ttft-only", "--ttft", "3,9", "--configs", "dense,naive",
                 "--ttft-repeats", "1", "--json", str(out / "ttft.json"), "--text", str(out / "ttft.md"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "Time to first token" in printed and "| naive flash |" in printed
    data = json.loads((out / "ttft.json").read_text())["ttft"]
    assert data["lengths"] == [3, 9] and len(data["rows"]) == 4
    assert "| 3 tokens | 9 tokens |" in (out / "ttft.md").read_text()


@pytest.mark.parametrize("large_read", [True, False], ids=["one-read", "streamed"])
def test_a_read_that_fails_mid_pass_leaves_no_untrusted_rows(tiny, tmp_path, large_read):
    """ffn.bin damaged under a running engine: the pass fails with the reader's clear error, no read
    stays in flight, and the cache rows the failed pass had given to neurons it could not read are
    dropped, so once the file is whole again the engine answers exactly as a fresh one (before the
    fix it kept those rows as the neurons' and generated other tokens)."""
    _, dst = tiny
    folder = shutil.copytree(dst, tmp_path / "copy.flash")
    fresh = _engine(folder, verify="load")
    want = [s.token for s in fresh.generate_step(PROMPT, 8)]
    fresh.close()
    eng = _engine(folder, verify="load")
    if not large_read:
        eng.cache.prefill_rows = lambda: None  # the overflow through the scratch in chunks
    files = open_flash(folder)
    whole = files.ffn_path.read_bytes()
    os.truncate(files.ffn_path, files.manifest.layers[2].offset + 4096)  # the last layer cut short
    with pytest.raises(FlashFormatError, match="unexpected end of file"):
        list(eng.generate_step(PROMPT, 8))
    assert all(not f._state.inflight and f._state.unfilled is None for f in eng._sparse_ffns())
    for lc in eng.cache.layers:
        lc.check_invariants()
    files.ffn_path.write_bytes(whole)
    assert [s.token for s in eng.generate_step(PROMPT, 8)] == want
    eng.close()
