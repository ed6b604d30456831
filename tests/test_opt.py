"""OPT (the paper's models) on tiny random OPT-shaped checkpoints in Hugging Face form.

``make_tiny_opt`` writes config.json (model_type "opt"), model.safetensors with HF key
names and the tiny byte-level tokenizer. The tests check ``mlx_flash.models.opt``
against an independent numpy forward of the same weights, then import / convert /
run it through the flash engine: every neuron == dense, and the exact ReLU rule
(active = fc1 x + b > 0) gives the dense model's output with most neurons skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from mlx_flash.config import FlashConfig
from mlx_flash.engine import load
from mlx_flash.library import describe
from mlx_flash.storage.format import (
    ARCHITECTURES,
    FlashFormatError,
    convert_to_flash,
    ffn_state_dict,
    load_dense_weights,
    open_flash,
    read_layer_weights,
)
from tests.tiny import _write_tokenizer


def make_tiny_opt(dir: Union[str, Path], *, layers: int = 2, hidden: int = 64, ffn: int = 256, heads: int = 4,
                  vocab: int = 256, max_pos: int = 256, dtype: str = "float32", seed: int = 0,
                  pre_ln: bool = True, proj_dim: Optional[int] = None, key_prefix: str = "model.",
                  fc1_bias_mean: float = -1.0, with_lm_head: bool = False) -> Path:
    """A tiny random OPT in Hugging Face layout. ``fc1_bias_mean`` < 0 makes it sparse
    like a trained OPT (about 84% of fc1 pre-activations negative at -1). ``proj_dim``
    != hidden gives OPT-350m's project_in/out; ``pre_ln=False`` its post-LayerNorm."""
    dst = Path(dir)
    dst.mkdir(parents=True, exist_ok=True)
    proj = proj_dim or hidden
    rng = np.random.default_rng(seed)

    def lin(out_d, in_d):
        return rng.normal(size=(out_d, in_d)) / np.sqrt(in_d)

    p = f"{key_prefix}decoder."
    w = {
        f"{p}embed_tokens.weight": rng.normal(size=(vocab, proj)),
        f"{p}embed_positions.weight": 0.5 * rng.normal(size=(max_pos + 2, hidden)),
    }
    if proj != hidden:
        w[f"{p}project_in.weight"] = lin(hidden, proj)
        w[f"{p}project_out.weight"] = lin(proj, hidden)
    if pre_ln:
        w[f"{p}final_layer_norm.weight"] = 1 + 0.1 * rng.normal(size=hidden)
        w[f"{p}final_layer_norm.bias"] = 0.1 * rng.normal(size=hidden)
    for i in range(layers):
        q = f"{p}layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w[f"{q}self_attn.{m}.weight"] = lin(hidden, hidden)
            w[f"{q}self_attn.{m}.bias"] = 0.1 * rng.normal(size=hidden)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            w[f"{q}{ln}.weight"] = 1 + 0.1 * rng.normal(size=hidden)
            w[f"{q}{ln}.bias"] = 0.1 * rng.normal(size=hidden)
        w[f"{q}fc1.weight"] = lin(ffn, hidden)
        w[f"{q}fc1.bias"] = fc1_bias_mean + 0.3 * rng.normal(size=ffn)
        w[f"{q}fc2.weight"] = lin(hidden, ffn) * 2.0
        w[f"{q}fc2.bias"] = 0.1 * rng.normal(size=hidden)
    if with_lm_head:
        w["lm_head.weight"] = w[f"{p}embed_tokens.weight"]
    arrays = {k: mx.array(v.astype(np.float32)).astype(getattr(mx, dtype)) for k, v in w.items()}
    mx.save_safetensors(str(dst / "model.safetensors"), arrays, metadata={"format": "pt"})
    config = {
        "model_type": "opt",
        "architectures": ["OPTForCausalLM"],
        "hidden_size": hidden,
        "ffn_dim": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "word_embed_proj_dim": proj,
        "do_layer_norm_before": pre_ln,
        "activation_function": "relu",
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "torch_dtype": dtype,
        "eos_token_id": vocab - 1,
        "bos_token_id": vocab - 1,
        "pad_token_id": vocab - 1,
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(dst, vocab)
    return dst


# --------------------------------------------------------------------------- an independent reference
def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def reference_logits(src: Path, tokens) -> np.ndarray:
    """OPTForCausalLM's forward in plain numpy (float64), written from the HF modeling code."""
    cfg = json.loads((src / "config.json").read_text())
    raw = {k: np.array(v.astype(mx.float32)).astype(np.float64)
           for k, v in mx.load(str(src / "model.safetensors")).items()}
    w = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in raw.items()}
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = H // nh
    pre = cfg["do_layer_norm_before"]
    t = np.asarray(tokens)
    L = len(t)
    x = w["decoder.embed_tokens.weight"][t]
    if "decoder.project_in.weight" in w:
        x = x @ w["decoder.project_in.weight"].T
    x = x + w["decoder.embed_positions.weight"][np.arange(L) + 2]
    causal = np.tril(np.ones((L, L), dtype=bool))

    def lin(v, name):
        return v @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    for i in range(cfg["num_hidden_layers"]):
        p = f"decoder.layers.{i}."
        r = x
        h = _ln(x, w[p + "self_attn_layer_norm.weight"], w[p + "self_attn_layer_norm.bias"]) if pre else x
        q = lin(h, p + "self_attn.q_proj") * hd**-0.5
        k = lin(h, p + "self_attn.k_proj")
        v = lin(h, p + "self_attn.v_proj")
        q, k, v = (a.reshape(L, nh, hd).transpose(1, 0, 2) for a in (q, k, v))
        s = q @ k.transpose(0, 2, 1)
        s = np.where(causal, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(L, H)
        x = r + lin(a, p + "self_attn.out_proj")
        if not pre:
            x = _ln(x, w[p + "self_attn_layer_norm.weight"], w[p + "self_attn_layer_norm.bias"])
        r = x
        h = _ln(x, w[p + "final_layer_norm.weight"], w[p + "final_layer_norm.bias"]) if pre else x
        h = lin(np.maximum(lin(h, p + "fc1"), 0.0), p + "fc2")
        x = r + h
        if not pre:
            x = _ln(x, w[p + "final_layer_norm.weight"], w[p + "final_layer_norm.bias"])
    if "decoder.final_layer_norm.weight" in w:
        x = _ln(x, w["decoder.final_layer_norm.weight"], w["decoder.final_layer_norm.bias"])
    if "decoder.project_out.weight" in w:
        x = x @ w["decoder.project_out.weight"].T
    return x @ w["decoder.embed_tokens.weight"].T


TOKENS = [5, 17, 99, 3, 42, 7, 8, 120, 64, 33, 2, 200]


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    root = tmp_path_factory.mktemp("opt")
    src = make_tiny_opt(root / "hf", layers=3, hidden=64, ffn=256, seed=1, with_lm_head=True)
    dst = convert_to_flash(src, root / "opt.flash")
    return src, dst


# --------------------------------------------------------------------------- the model itself
@pytest.mark.parametrize("variant", [
    dict(),                                    # OPT-125m … 66B: pre-LN, proj dim = hidden
    dict(key_prefix=""),                       # keys saved from OPTModel ("decoder.…")
    dict(pre_ln=False, proj_dim=48),           # OPT-350m: post-LN, project_in / project_out
])
def test_dense_matches_reference(tmp_path, variant):
    src = make_tiny_opt(tmp_path / "hf", seed=2, **variant)
    eng = load(src)  # the dense engine: mlx_flash.models.opt through mlx-lm's load_model
    got = np.array(eng.model(mx.array([TOKENS])).astype(mx.float32))[0]
    want = reference_logits(src, TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with eng._last_position_only():  # the engine's prefill: only the last position through the head
        last = np.array(eng.model(mx.array([TOKENS])).astype(mx.float32))[0]
    np.testing.assert_allclose(last, want[-1:], rtol=1e-4, atol=1e-4)


def test_kv_cache_decoding_matches_full_forward(opt):
    src, _ = opt
    model = load(src).model
    full = np.array(model(mx.array([TOKENS])))[0]
    cache = make_prompt_cache(model)
    out = [np.array(model(mx.array([TOKENS[:5]]), cache=cache))[0]]
    for t in TOKENS[5:]:
        out.append(np.array(model(mx.array([[t]]), cache=cache))[0])
    np.testing.assert_allclose(np.concatenate(out), full, rtol=1e-4, atol=1e-4)


def test_positions_beyond_the_table_are_an_error(tmp_path):
    src = make_tiny_opt(tmp_path / "hf", max_pos=8)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        load(src).model(mx.array([list(range(9))]))


# --------------------------------------------------------------------------- conversion
def test_convert_layout(opt):
    src, dst = opt
    files = open_flash(dst)
    m = files.manifest
    h, n = 64, 256
    assert m.architecture == "opt"
    assert m.bundle_parts == ["fc1", "fc1_bias", "fc2"]
    assert (m.hidden_size, m.intermediate_size, m.bundle_elems) == (h, n, 2 * h + 1)
    assert m.bundle_bytes == (2 * h + 1) * 4
    w = {k[len("model."):]: v for k, v in mx.load(str(src / "model.safetensors")).items() if k.startswith("model.")}
    for i in range(m.num_layers):
        fc1, b1, fc2 = read_layer_weights(files, i)
        p = f"decoder.layers.{i}."
        assert mx.array_equal(fc1, w[p + "fc1.weight"]).item()
        assert mx.array_equal(b1, w[p + "fc1.bias"]).item()
        assert mx.array_equal(fc2, w[p + "fc2.weight"]).item()
        assert set(ffn_state_dict(files, i)) == {f"model.{p}fc1.weight", f"model.{p}fc1.bias", f"model.{p}fc2.weight"}
        # neuron j's bundle on disk: fc1 row j | fc1 bias j | fc2 column j
        raw = np.fromfile(files.ffn_path, dtype=np.float32, count=m.bundle_elems,
                          offset=m.neuron_offset(i, 7))
        want = np.concatenate([np.array(w[p + "fc1.weight"][7]), [np.array(w[p + "fc1.bias"][7])],
                               np.array(w[p + "fc2.weight"][:, 7])])
        np.testing.assert_array_equal(raw, want)
    dense = load_dense_weights(files)
    assert "model.decoder.layers.0.fc2.bias" in dense  # one vector per layer: dense
    assert not [k for k in dense if ".fc1." in k or k.endswith("fc2.weight")]
    assert ARCHITECTURES["opt"].layer_prefix == "model.decoder.layers"


def test_opt_flash_dense_mode_equals_source(opt):
    src, dst = opt
    a = np.array(load(src).model(mx.array([TOKENS])))
    b = np.array(load(dst, dense=True).model(mx.array([TOKENS])))
    np.testing.assert_array_equal(a, b)


def test_bias_without_flag_is_rejected(tmp_path):
    src = make_tiny_opt(tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["enable_bias"] = False
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlashFormatError, match="enable_bias"):
        convert_to_flash(src, tmp_path / "x.flash")


# --------------------------------------------------------------------------- the flash engine
def test_flash_all_neurons_equals_dense(opt):
    src, dst = opt
    dense = load(src)
    want = np.array(dense.model(mx.array([TOKENS])))
    for budget in (1.0, 0.3):
        eng = load(dst, FlashConfig(active="all", budget=budget, scratch_neurons=32, threads=2))
        got = np.array(eng.model(mx.array([TOKENS])))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        eng.close()


def test_relu_oracle_is_exact_and_sparse(opt):
    """The exact ReLU rule skips ~84% of the neurons and changes nothing: same logits
    (to float32 rounding of a different summation order), same greedy tokens."""
    src, dst = opt
    dense = load(src)
    want = np.array(dense.model(mx.array([TOKENS])))
    eng = load(dst, FlashConfig(active="oracle", sparsity=0.0, budget=0.5, window=3, scratch_neurons=32, threads=2))
    assert eng.chooser.exact
    got = np.array(eng.model(mx.array([TOKENS])))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # the sparsity asked for is irrelevant for a ReLU model: the rule is the model's own
    eng2 = load(dst, FlashConfig(active="oracle", sparsity=0.9, budget=0.5, scratch_neurons=32, threads=2))
    np.testing.assert_allclose(np.array(eng2.model(mx.array([TOKENS]))), want, rtol=2e-5, atol=2e-5)
    eng2.close()

    prompt = [{"role": "user", "content": "hello there"}]
    ref = [r.token for r in dense.stream_generate(prompt, 20)]
    eng.reset_stats()
    out = list(eng.stream_generate(prompt, 20))
    assert [r.token for r in out] == ref
    n = eng.files.manifest.intermediate_size * eng.files.manifest.num_layers
    active = np.array([r.stats.neurons_active for r in out[1:]]) / n
    assert 0.05 < active.mean() < 0.3, active.mean()  # measured: about 16% active (84% sparse)
    assert all(r.stats.neurons_loaded <= r.stats.neurons_active for r in out)
    eng.close()


def test_exact_rule_matches_fc1_sign(opt):
    """Oracle's active set is exactly {i : fc1_i x + b_i > 0}."""
    _, dst = opt
    eng = load(dst, FlashConfig(active="oracle", budget=1.0, threads=1, engine="flash"))
    files = open_flash(dst)
    fc1, b1, _ = read_layer_weights(files, 1)
    x = mx.random.normal((6, 64), key=mx.random.key(0))
    ids, mask = eng.chooser.choose(1, x)
    pre = np.array(x @ fc1.T + b1)
    want = pre > 0
    assert np.array_equal(ids, np.flatnonzero(want.any(axis=0)))
    assert np.array_equal(mask, want[:, ids])
    eng.close()


def test_left_padded_batch_matches_single_rows(opt):
    """mlx-lm's BatchKVCache (left padding, per-row offsets): positions count from each row's first token."""
    src, _ = opt
    model = load(src).model
    rows = [TOKENS[:7], TOKENS[:4]]
    pad = [0, 3]
    cache = [BatchKVCache(pad) for _ in model.layers]
    batch = mx.array([[0] * p + r for p, r in zip(pad, rows)])
    got = np.array(model(batch, cache=cache)[:, -1, :])
    nxt = np.array(model(mx.array([[9], [9]]), cache=cache)[:, -1, :])
    for i, r in enumerate(rows):
        np.testing.assert_allclose(got[i], np.array(model(mx.array([r])))[0, -1], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(nxt[i], np.array(model(mx.array([r + [9]])))[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw", [{}, {"proj_dim": 32, "pre_ln": False}])
def test_library_counts_opt_parameters(tmp_path, kw):
    """The library's parameter count from config.json equals the elements stored."""
    src = make_tiny_opt(tmp_path / "opt", max_pos=64, **kw)
    stored = sum(v.size for v in mx.load(str(src / "model.safetensors")).values())
    assert describe(src).parameters == stored
