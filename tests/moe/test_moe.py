"""Mixture-of-experts from flash: tiny random MoE models of each family (mlx-lm's own classes),
converted to MoE flash folders; flash logits must be the very same arrays as mlx-lm's dense
model's (the expert cache feeds mlx-lm's SwitchGLU math with the same weights), greedy outputs
identical, the budget never exceeded, damaged folders refused with a clear error."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model

from mlx_flash import engine as flash_engine
from mlx_flash.config import FlashConfig
from mlx_flash.moe import engine as moe_engine
from mlx_flash.moe.format import (
    EXPERTS_FILE,
    MANIFEST_FILE,
    convert_to_moe_flash,
    open_moe_flash,
    read_expert_arrays,
    verify_moe_checksums,
)
from mlx_flash.storage.format import ChecksumError, FlashFormatError, signed
from tests.tiny import make_tiny_llama
from tests.tiny_moe import MOE_FAMILIES, make_tiny_moe, make_tiny_moe_q4

TOKENS = mx.array([[1, 5, 9, 33, 70, 100, 2, 8, 200, 14, 77, 3]])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (mlx-lm source folder, MoE flash folder); float32 for every family, 4-bit for two."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for fam in MOE_FAMILIES:
        src = make_tiny_moe(root / fam, fam)
        out[fam] = (src, convert_to_moe_flash(src, root / f"{fam}.flash"))
    for fam in ("qwen3_moe", "mixtral"):
        src = make_tiny_moe_q4(root / f"{fam}-q4", fam)
        out[f"{fam}:q4"] = (src, convert_to_moe_flash(src, root / f"{fam}-q4.flash"))
    return out


def _flash(path, **kw):
    return moe_engine.load(path, FlashConfig(**{"engine": "flash", "budget": 0.3, **kw}))


@pytest.mark.parametrize("fam", list(MOE_FAMILIES) + ["qwen3_moe:q4", "mixtral:q4"])
def test_flash_logits_equal_mlx_lm(models, fam):
    src, fl = models[fam]
    ref, _ = load_model(src)
    want = ref(TOKENS)
    eng = _flash(fl)
    try:
        assert eng.policy_info.experts_per_layer < eng.policy_info.num_experts  # really from flash
        got = eng.model(TOKENS)  # a 12-token prompt: more distinct experts than rows -> passes
        assert mx.array_equal(got, want), float(mx.abs(got - want).max())
        assert eng.cache.resident_bytes <= eng.cache.budget_bytes
        assert eng.counters.bytes_read > 0 and eng.counters.neurons_loaded > 0
    finally:
        eng.close()


def test_fewer_rows_than_top_k_still_exact(models):
    src, fl = models["qwen3_moe"]
    m = open_moe_flash(fl).manifest
    ref, _ = load_model(src)
    eng = _flash(fl, budget=float(m.num_layers * m.expert_data_bytes))  # one expert per layer
    try:
        assert eng.policy_info.experts_per_layer == 1 and any("fewer than" in n for n in eng.notes)
        assert mx.array_equal(eng.model(TOKENS), ref(TOKENS))
    finally:
        eng.close()


@pytest.mark.parametrize("fam", ["qwen3_moe", "mixtral:q4"])
def test_greedy_identical_to_dense(models, fam):
    src, fl = models[fam]
    dense = flash_engine.load(src)  # the mlx-lm folder, dense (mlx-lm's class)
    flash = flash_engine.load(fl, FlashConfig(engine="flash", budget=0.3))
    try:
        assert flash.mode == "flash-router" and dense.mode == "dense"
        dense.tokenizer.eos_token_ids = flash.tokenizer.eos_token_ids = []

        def run(e):
            return [r.token for r in e.stream_generate("hello there", max_tokens=24)]

        assert run(flash) == run(dense)
        stats = list(flash.stream_generate("hi", max_tokens=3))[-1].stats
        assert 0.0 <= stats.hit_rate <= 1.0 and stats.budget_bytes == flash.cache.budget_bytes
        assert stats.cache_bytes <= stats.budget_bytes
    finally:
        dense.close()
        flash.close()


def test_auto_runs_dense_when_all_experts_fit(models):
    src, fl = models["olmoe"]
    ref, _ = load_model(src)
    eng = flash_engine.load(fl, FlashConfig(budget=1.0))
    try:
        assert eng.engine_info.engine == "dense" and "experts" in eng.engine_info.reason
        assert mx.array_equal(eng.model(TOKENS), ref(TOKENS))
    finally:
        eng.close()


def test_budget_never_exceeded_over_2000_tokens(models):
    """2,000 tokens through every MoE block (router + flash experts) one token at a time, random
    hidden states: the cache stays within its budget and its bookkeeping consistent."""
    _, fl = models["qwen2_moe"]
    eng = _flash(fl, budget=0.4)
    try:
        blocks = [layer.mlp for layer in eng.model.layers]
        caches = eng.cache.layers
        key = mx.random.key(1)
        xs = mx.random.normal((2000, len(blocks), 1, 1, 64), key=key)
        mx.eval(xs)
        for t in range(2000):
            for i, b in enumerate(blocks):
                mx.eval(b(xs[t, i]))
            assert eng.cache.resident_bytes <= eng.cache.budget_bytes
            if t % 250 == 0:
                for c in caches:
                    c.check_invariants()
        st = eng.cache.stats
        assert st.steps >= 2000 * len(blocks) and 0.0 < st.hit_rate < 1.0
        assert eng.counters.neurons_active == eng.counters.neurons_hit + eng.counters.neurons_loaded
    finally:
        eng.close()


def test_hot_experts_from_calibration(models, tmp_path):
    src, fl0 = models["qwen3_moe"]
    fl = tmp_path / "q.flash"
    shutil.copytree(fl0, fl)
    toks = np.random.default_rng(0).integers(0, 250, 400)
    freqs = moe_engine.calibrate_experts(fl, toks, source="random tokens")
    m = open_moe_flash(fl).manifest
    assert freqs.shape == (m.num_layers, m.num_experts)
    assert np.allclose(freqs.sum(axis=1), m.top_k)  # each token routes to top_k experts
    assert m.calibration["tokens"] == 400
    ref, _ = load_model(src)
    for policy in ("hot", "auto"):
        eng = _flash(fl, budget=0.75, policy=policy)
        try:
            info = eng.policy_info
            cap = info.experts_per_layer
            assert 0 < info.pinned <= m.num_layers * (cap - m.top_k) or policy == "auto"
            if policy == "auto":
                assert info.hit_rates and info.source == "simulation"
            assert mx.array_equal(eng.model(TOKENS), ref(TOKENS))
        finally:
            eng.close()
    with pytest.raises(ValueError, match="expert frequencies"):
        _flash(fl0, policy="hot")


def test_format_layout_and_checksums(models):
    _, fl = models["mixtral:q4"]
    files = open_moe_flash(fl)
    m = files.manifest
    assert m.expert_bytes % m.alignment == 0 and m.layers[1].offset % m.alignment == 0
    assert m.quantization["down"] == {"bits": 4, "group_size": 32, "mode": "affine"}
    assert [s.name for s in m.segment_list()][:3] == ["gate", "gate.scales", "gate.biases"]
    assert "ffn.bin" not in {p.name for p in fl.iterdir()}
    arrays = read_expert_arrays(files, 0)
    assert arrays["gate_proj.weight"].shape[0] == m.num_experts
    assert any(n.startswith("experts.bin") for n in verify_moe_checksums(files))


def test_corrupt_and_truncated_files_fail_clearly(models, tmp_path):
    _, fl0 = models["qwen3_moe"]
    bad = tmp_path / "bad.flash"
    shutil.copytree(fl0, bad)
    m = open_moe_flash(bad).manifest
    p = bad / EXPERTS_FILE
    data = bytearray(p.read_bytes())
    data[m.layers[1].offset + 100] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="layer 1"):
        verify_moe_checksums(open_moe_flash(bad))
    with pytest.raises(ChecksumError, match="layer 1"):
        moe_engine.load(bad, FlashConfig(engine="flash", budget=0.3, verify="load"))
    with pytest.raises(ChecksumError, match="layer 1"):
        moe_engine.load(bad, FlashConfig(engine="dense"))

    with open(p, "r+b") as f:
        f.truncate(m.experts_size - 4096)
    with pytest.raises(FlashFormatError, match="truncated"):
        flash_engine.load(bad, FlashConfig(engine="flash"))

    mpath = bad / MANIFEST_FILE
    d = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**d, "top_k": d["top_k"] + 1}))  # edited after writing: refused
    with pytest.raises(FlashFormatError, match="does not match its own checksum"):
        open_moe_flash(bad)
    del d["expert_bytes"]
    mpath.write_text(json.dumps(signed(d)))
    with pytest.raises(FlashFormatError, match="expert_bytes"):
        open_moe_flash(bad)
    mpath.write_text("{not json")
    with pytest.raises(FlashFormatError, match="not valid JSON"):
        open_moe_flash(bad)


def test_conversion_refuses_dense_family_and_leaves_nothing(tmp_path):
    src = make_tiny_llama(tmp_path / "llama")
    with pytest.raises(FlashFormatError, match="not a supported MoE family"):
        convert_to_moe_flash(src, tmp_path / "x.flash")
    assert not (tmp_path / "x.flash").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["llama"]


HF_NAMES = {"qwen2_moe": {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
            "mixtral": {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}}


@pytest.mark.parametrize("fam", sorted(HF_NAMES))
def test_hugging_face_per_expert_names_convert(models, tmp_path, fam):
    """A checkpoint with one tensor per expert (Hugging Face names; Mixtral's w1/w2/w3) is stacked by
    mlx-lm's own ``sanitize`` at conversion: the same flash folder, the same logits."""
    src, fl = models[fam]
    hf = tmp_path / "hf"
    shutil.copytree(src, hf)
    w = dict(mx.load(str(hf / "model.safetensors")))
    for key in [k for k in w if ".switch_mlp." in k]:
        stacked = w.pop(key)
        pre, rest = key.split(".switch_mlp.")
        proj, kind = rest.split(".")
        for e in range(stacked.shape[0]):
            w[f"{pre}.experts.{e}.{HF_NAMES[fam][proj]}.{kind}"] = stacked[e]
    mx.save_safetensors(str(hf / "model.safetensors"), w, metadata={"format": "pt"})
    out = convert_to_moe_flash(hf, tmp_path / "hf.flash")
    assert (out / EXPERTS_FILE).read_bytes() == (fl / EXPERTS_FILE).read_bytes()
    ref, _ = load_model(src)
    eng = _flash(out)
    try:
        assert mx.array_equal(eng.model(TOKENS), ref(TOKENS))
    finally:
        eng.close()


def test_lookahead_recall_of_next_layer_router(tmp_path):
    """Layer l+1's router on layer l's output (what a lookahead prefetch would read ahead) finds most
    of l+1's experts on a tiny random model: well above chance (top_k / num_experts)."""
    src = make_tiny_moe(tmp_path / "m", "qwen3_moe", layers=3)
    eng = _flash(convert_to_moe_flash(src, tmp_path / "m.flash"), budget=0.5)
    try:
        rec = moe_engine.lookahead_recall(eng, np.arange(40) % 250)
        assert sorted(rec) == [1, 2]  # from the second decoder layer on
        assert all(2 * 4 / 16 < r <= 1.0 for r in rec.values()), rec
        assert all(s.state.record is None for s in moe_engine.flash_switches(eng))
        assert mx.array_equal(eng.model(TOKENS), load_model(src)[0](TOKENS))  # the taps are gone
    finally:
        eng.close()


def test_lookahead_prefetch_same_answers_and_serves_misses(tmp_path):
    """FlashConfig.pipeline: layer l+1's likely experts are read on a second thread while layer l
    computes; the greedy answer is the same token for token, and the prefetch serves misses."""
    src = make_tiny_moe(tmp_path / "m", "qwen3_moe", layers=3)
    fl = convert_to_moe_flash(src, tmp_path / "m.flash")
    runs = []
    for pipe in (False, True):
        eng = flash_engine.load(fl, FlashConfig(engine="flash", budget=0.3, pipeline=pipe))
        try:
            eng.tokenizer.eos_token_ids = []
            runs.append([r.token for r in eng.stream_generate("hello there", max_tokens=20)])
            info = eng.pipeline_info()
            if pipe:
                assert info["lookahead_recall"][0] is None and 0 < info["mean_lookahead_recall"] <= 1
                assert 0 < info["mean_served"] <= 1
                assert 0 < eng.counters.neurons_prefetch_used <= eng.counters.neurons_prefetched
            else:
                assert info is None and eng.counters.neurons_prefetched == 0
        finally:
            eng.close()
    assert runs[0] == runs[1]


def test_an_expert_read_that_fails_leaves_no_untrusted_rows(models, tmp_path):
    """experts.bin cut short under a running engine: the pass fails with the reader's clear error, and
    the rows the failed pass had given to experts it could not read are dropped, so once the file is
    whole again the logits are exactly a fresh engine's (before the fix those rows stayed as the
    experts' and the logits differed)."""
    _, fl0 = models["qwen3_moe"]
    folder = shutil.copytree(fl0, tmp_path / "copy.flash")
    fresh = _flash(folder, verify="load")
    want = np.array(fresh.model(TOKENS))
    fresh.close()
    eng = _flash(folder, verify="load")
    m = open_moe_flash(folder).manifest
    p = folder / EXPERTS_FILE
    whole = p.read_bytes()
    with open(p, "r+b") as f:
        f.truncate(m.layers[-1].offset + 64)  # the last MoE layer cut short
    with pytest.raises(FlashFormatError, match="unexpected end of file"):
        mx.eval(eng.model(TOKENS))
    for lc in eng.cache.layers:
        lc.check_invariants()
    p.write_bytes(whole)
    assert np.array_equal(np.array(eng.model(TOKENS)), want)
    eng.close()
