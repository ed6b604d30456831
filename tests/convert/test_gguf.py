"""GGUF -> mlx-lm conversion on tiny GGUF files written with gguf-py's GGUFWriter.

The files are llama-architecture (2 layers, hidden 64, ffn 128, 4 heads, 2 kv heads) with a
toy byte-level BPE vocabulary, merges and a ChatML template. q/k are written in llama.cpp's
permuted order (what convert_hf_to_gguf.py does), so getting the original weights back
checks the un-permutation; weights are also checked against an independent dequantizer
(MLX's own GGUF loader, or a transcription of ggml's C code for Q4_K).
"""

from __future__ import annotations

import functools
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlx_lm.models.llama import Model, ModelArgs
from mlx_lm.utils import load_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mlx_flash.convert.gguf import (
    KEEP_BITS,
    REQUANTIZED,
    GGUFError,
    GGUFFile,
    HParams,
    _llama3_factors,
    _plan_tensors,
    build_tokenizer,
    convert_gguf,
    permute_qk,
    read_gguf_info,
    requantize,
    unpermute_qk,
)
from mlx_flash.progress import Cancelled
from tests.tiny import _bytes_to_unicode

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------
# Building tiny GGUF files
# ---------------------------------------------------------------------------------------

def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    table = _bytes_to_unicode()
    return [table[b] for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "hello world, the capital of France is Paris 123!",
    "What is the capital of France? It's Paris; 2024 was 12 months long.\n\tTabs  and  spaces.",
    "Ünïcödé tëxt — and emoji 🙂 too",
]


@functools.cache
def reference_tokenizer_json() -> str:
    """A byte-level BPE trained on TEXTS, pre-tokenized like SmolLM2 (digits split, then
    GPT-2 byte-level): the tokenizer a GGUF's vocabulary + merges must reproduce."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer)
    return tok.to_str()


def toy_bpe_vocab():
    """(tokens, token_types, merges) of the reference tokenizer, in GGUF form."""
    model = json.loads(reference_tokenizer_json())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return tokens, types, merges


def random_weights(vocab: int, seed: int = 0, output: bool = False, hidden: int = HIDDEN,
                   ffn: int = FFN) -> dict[str, np.ndarray]:
    """Float32 weights in Hugging Face names and order."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // HEADS

    def w(*shape, scale=0.08):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out = {"model.embed_tokens.weight": w(vocab, hidden, scale=0.5),
           "model.norm.weight": 1 + w(hidden, scale=0.1)}
    if output:
        out["lm_head.weight"] = w(vocab, hidden)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": 1 + w(hidden, scale=0.1),
            p + "post_attention_layernorm.weight": 1 + w(hidden, scale=0.1),
            p + "self_attn.q_proj.weight": w(HEADS * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(KV_HEADS * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(KV_HEADS * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, HEADS * head_dim),
            p + "mlp.gate_proj.weight": w(ffn, hidden),
            p + "mlp.up_proj.weight": w(ffn, hidden),
            p + "mlp.down_proj.weight": w(hidden, ffn),
        })
    return out


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}


def gguf_name(hf: str) -> str:
    if hf in _TO_GGUF:
        return _TO_GGUF[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[rest]}"


def write_gguf(path: Path, *, qtype=Q.F32, arch="llama", output=False, seed=0, weights=None,
               tensor_types: dict | None = None, extra_tensors: dict | None = None,
               metadata: dict | None = None, tokenizer_model="gpt2", pre="smollm",
               add_bos=False, hidden=HIDDEN, ffn=FFN) -> dict[str, np.ndarray]:
    """Write a tiny llama GGUF; 2-D weights in ``qtype``, norms in F32. Returns the
    original (Hugging Face order, float32) weights; for the types gguf-py cannot quantize
    (K-quants) the file holds random valid blocks instead (:func:`random_blocks`)."""
    tokens, types, merges = toy_bpe_vocab()
    weights = weights if weights is not None else random_weights(len(tokens), seed, output, hidden, ffn)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // HEADS)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHATML)
    for k, v in (metadata or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    for hf, t in weights.items():
        name = gguf_name(hf)
        if "q_proj" in hf:
            t = permute_qk(t, HEADS)
        elif "k_proj" in hf:
            t = permute_qk(t, KV_HEADS)
        tt = (tensor_types or {}).get(name, qtype if t.ndim == 2 else Q.F32)
        if tt == Q.F32:
            w.add_tensor(name, t)
        elif tt == Q.F16:
            w.add_tensor(name, t.astype(np.float16))
        else:
            try:
                data = gguf.quants.quantize(t, tt)
            except NotImplementedError:  # types gguf-py cannot make: random valid blocks
                data = random_blocks(tt, *t.shape, np.random.default_rng(seed))
            w.add_tensor(name, data, raw_dtype=tt)
    for name, (data, tt) in (extra_tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=tt)
    finish(w)
    return weights


def finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def leftovers(parent: Path) -> list[str]:
    """Hidden temp folders a failed conversion might have left."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def load_arrays(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------

# max |error| allowed, as a fraction of the tensor's largest |value|: one quantization step
# (symmetric types clip the block's extreme value by one step: amax/8 for Q4_0, amax/16 Q5_0)
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 0.005, Q.Q5_0: 1 / 16 + 1e-3,
             Q.Q5_1: 0.035, Q.Q4_0: 1 / 8 + 1e-3, Q.Q4_1: 0.07}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_roundtrip_weights(tmp_path, qtype):
    src = tmp_path / "tiny.gguf"
    orig = write_gguf(src, qtype=qtype)
    dst = convert_gguf(src, tmp_path / "out", dtype="float32")
    got = load_arrays(dst)
    assert set(got) == set(orig)
    for name, want in orig.items():
        g = np.array(got[name])
        assert g.shape == want.shape, name
        err = np.abs(g - want).max()
        assert err <= TOLERANCE[qtype if want.ndim == 2 else Q.F32] * np.abs(want).max() + 1e-7, (name, err)
    assert leftovers(tmp_path) == []


def _dequantize_out(got: dict, module: str, bits: int, absolute: bool = False) -> np.ndarray:
    """A written quantized tensor dequantized with float32 scales and biases (|scales|,
    |biases| with ``absolute``: the bound on the float16 rounding)."""
    s, b = (got[f"{module}.{k}"].astype(mx.float32) for k in ("scales", "biases"))
    if absolute:
        s, b = mx.abs(s), mx.abs(b)
    return np.array(mx.dequantize(got[f"{module}.weight"], s, b, group_size=32, bits=bits))


def _gguf_reference(g: GGUFFile, name: str, qtype) -> np.ndarray:
    """gguf-py's dequantization of a file tensor, q/k rows in Hugging Face order."""
    info = g.tensors[name]
    rows = info.shape[0]
    ref = gguf.quants.dequantize(g.raw_bytes(name).reshape(rows, -1), qtype).reshape(info.shape)
    heads = HEADS if "attn_q." in name else KV_HEADS if "attn_k." in name else 0
    return unpermute_qk(ref, heads) if heads else ref


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K,
                                   Q.Q6_K, Q.Q3_K, Q.Q2_K], ids=lambda q: q.name)
def test_keeps_the_bits(tmp_path, qtype):
    """Every block type becomes MLX affine group-32 tensors: equal to gguf-py's
    dequantization up to the float16 rounding of K-quant scales (exact types), or within
    half a step of the new grid (re-quantized types); mlx-lm loads the folder and its
    logits match the float32 (dequantized) conversion's."""
    k_quant = qtype.name.endswith("_K")
    hidden, ffn = (256, 512) if k_quant else (HIDDEN, FFN)  # K-quant rows are multiples of 256
    src = tmp_path / "tiny.gguf"
    write_gguf(src, qtype=qtype, hidden=hidden, ffn=ffn)
    dst = convert_gguf(src, tmp_path / "q")
    bits = KEEP_BITS[qtype.name]
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"] == cfg["quantization_config"] == {"group_size": 32, "bits": bits, "mode": "affine"}
    got = load_arrays(dst)
    n = sum(a.nbytes for a in got.values())
    assert abs((dst / "model.safetensors").stat().st_size - n) < 20_000  # just the header on top
    requantized = qtype.name in REQUANTIZED
    with GGUFFile.open(src) as g:
        for name, info in g.tensors.items():
            hf = next(h for h in random_weights(1) if gguf_name(h) == name) if "embd" not in name else \
                "model.embed_tokens.weight"
            if len(info.shape) == 1:
                assert got[hf].dtype == mx.float16 and hf[:-7] + ".scales" not in got
                continue
            module = hf[:-len(".weight")]
            assert got[hf].dtype == mx.uint32 and got[hf].shape == (info.shape[0], info.shape[1] * bits // 32)
            assert got[module + ".scales"].dtype == got[module + ".biases"].dtype == mx.float16
            ref = _gguf_reference(g, name, qtype)
            out = _dequantize_out(got, module, bits)
            err = np.abs(out - ref)
            if requantized:  # half a step of the group's new grid (a float16 scale)
                bound = _half_step(ref, bits)
            else:  # float16 scales and biases: 2**-11 relative each
                bound = 2 ** -11 * _dequantize_out(got, module, bits, absolute=True) + 1e-7
            assert (err <= bound.reshape(err.shape)).all(), (name, err.max())

    model, _ = mlx_lm.load(str(dst))
    ref_model, _ = mlx_lm.load(str(convert_gguf(src, tmp_path / "f32", dtype="float32")))
    model.set_dtype(mx.float32)
    x = mx.array([[5, 70, 90, 100, 3, 250, 17, 42]])
    a, b = model(x), ref_model(x)
    assert a.shape == b.shape == (1, 8, len(toy_bpe_vocab()[0]))
    # re-quantized: measured 0.7% (Q6_K), 5.3% (Q3_K), 3.8% (Q2_K) on these random-block models
    assert mx.abs(a - b).max().item() <= (0.1 if requantized else 2e-3) * mx.abs(b).max().item()


def test_mixed_types_get_per_module_entries(tmp_path):
    """A Q4_K_M-like mix: the most common bits are the default, other modules get their
    own entry, a float 2-D weight is listed as false; mlx-lm loads it and generates."""
    src = tmp_path / "mix.gguf"
    write_gguf(src, qtype=Q.Q4_1, output=True, tensor_types={
        "token_embd.weight": Q.Q8_0, "output.weight": Q.F16, "blk.0.ffn_down.weight": Q.Q5_1,
        "blk.1.attn_v.weight": Q.BF16})
    dst = convert_gguf(src, tmp_path / "q")
    q = json.loads((dst / "config.json").read_text())["quantization"]
    assert q == {"group_size": 32, "bits": 4, "mode": "affine",
                 "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"},
                 "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 5, "mode": "affine"},
                 "lm_head": False, "model.layers.1.self_attn.v_proj": False}
    got = load_arrays(dst)
    assert got["lm_head.weight"].dtype == mx.float16 and "lm_head.scales" not in got
    # sizes (shards, index, disk estimate) are the written bytes
    sharded = convert_gguf(src, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in got.values())
    assert len(list(sharded.glob("model-*.safetensors"))) > 3 and set(index["weight_map"]) == set(got)
    assert got["model.layers.1.self_attn.v_proj.weight"].dtype == mx.bfloat16
    model, tok = mlx_lm.load(str(dst))
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert model.model.layers[0].mlp.down_proj.bits == 5
    model.set_dtype(mx.float32)
    ref, _ = mlx_lm.load(str(convert_gguf(src, tmp_path / "f32", dtype="float32")))
    x = mx.array([[5, 70, 90, 100, 3]])
    a, b = model(x), ref(x)
    assert mx.abs(a - b).max().item() <= 2e-3 * mx.abs(b).max().item()


def _half_step(w: np.ndarray, bits: int) -> np.ndarray:
    """Per weight: half the float16 step of its group's min/max grid (requantize's bound)."""
    g = w.reshape(w.shape[0], -1, 32)
    step = (g.max(-1) - g.min(-1)) / (2 ** bits - 1) * (1 + 2 ** -10) + 2 ** -24
    return np.repeat(0.5 * step, 32, axis=-1).reshape(w.shape) * (1 + 1e-6)


def test_requantize_error_is_half_a_step():
    w = np.random.default_rng(3).standard_normal((8, 256)).astype(np.float32)
    w[0, :32] = 0.25  # a constant group comes back exactly
    for bits in (4, 8):
        packed, s, b = requantize(w, bits)
        back = np.array(mx.dequantize(mx.array(packed), mx.array(s), mx.array(b), group_size=32, bits=bits))
        assert (np.abs(back - w) <= _half_step(w, bits)).all()
        assert np.array_equal(back[0, :32], w[0, :32])


def test_unpermute_is_exact_inverse_of_llama_cpp_permute():
    rng = np.random.default_rng(1)
    for heads, rows in ((4, 64), (2, 32), (9, 576), (3, 192)):
        w = rng.standard_normal((rows, 7)).astype(np.float32)
        assert np.array_equal(unpermute_qk(permute_qk(w, heads), heads), w)
        assert not np.array_equal(permute_qk(w, heads), w)
        b = rng.standard_normal(rows)  # biases permute the same way
        assert np.array_equal(unpermute_qk(permute_qk(b, heads), heads), b)


def test_qk_come_back_in_original_order_exactly(tmp_path):
    src = tmp_path / "tiny.gguf"
    orig = write_gguf(src, qtype=Q.F32)
    with GGUFFile.open(src) as g:  # the file really holds the permuted rows
        q0 = g.read_float32("blk.0.attn_q.weight")
    assert not np.array_equal(q0, orig["model.layers.0.self_attn.q_proj.weight"])
    got = load_arrays(convert_gguf(src, tmp_path / "out", dtype="float32"))
    for i in range(LAYERS):
        for p in ("q_proj", "k_proj"):
            name = f"model.layers.{i}.self_attn.{p}.weight"
            assert np.array_equal(np.array(got[name]), orig[name]), name


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_dequantization_matches_mlx_gguf_loader(tmp_path, qtype):
    """An independent dequantizer: MLX's own GGUF reader (quantized arrays + mx.dequantize)."""
    src = tmp_path / "tiny.gguf"
    write_gguf(src, qtype=qtype)
    ref = mx.load(str(src))
    with GGUFFile.open(src) as g:
        for name in ("blk.0.ffn_up.weight", "blk.1.attn_q.weight", "token_embd.weight"):
            bits = {Q.Q8_0: 8}.get(qtype, 4)
            want = mx.dequantize(ref[name], ref[name[:-6] + "scales"], ref[name[:-6] + "biases"],
                                 group_size=32, bits=bits).astype(mx.float32)
            got = g.read_float32(name)
            assert np.allclose(got, np.array(want), atol=2e-3 * np.abs(got).max()), name


#: Byte offset of the float16 super-block scale d (and dmin, 2 bytes on) in each K-quant
#: block, and a d that gives weights of about +-0.1 (ggml-common.h layouts).
_K_HEADER = {Q.Q2_K: (80, 0.002), Q.Q3_K: (108, 0.0005), Q.Q4_K: (0, 0.0001), Q.Q5_K: (0, 0.00005),
             Q.Q6_K: (208, 0.00002)}


def random_blocks(qtype, n_rows, row_len, rng):
    """Random but valid K-quant blocks (finite float16 scales of a sane size); other types
    (I-quants, which the converter refuses) get plain random bytes."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (n_rows * row_len // block, size), dtype=np.uint8)

    def f16(v):
        return np.full(len(b), v, np.float16).view(np.uint8).reshape(-1, 2)

    if qtype in _K_HEADER:
        at, d = _K_HEADER[qtype]
        b[:, at:at + 2] = f16(d)
        if qtype in (Q.Q2_K, Q.Q4_K, Q.Q5_K):  # dmin
            b[:, at + 2:at + 4] = f16(d / 2)
    return b.reshape(n_rows, -1)


def _scale_min_k4(j, sc):
    """ggml's get_scale_min_k4: the 6-bit scale and min of sub-block ``j``."""
    if j < 4:
        return sc[j] & 63, sc[j + 4] & 63
    return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)


def _q4_k_reference(row_bytes: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_q4_K (ggml-quants.c), transcribed literally."""
    out = []
    for blk in row_bytes.reshape(-1, 144):
        d, dmin = blk[0:2].view(np.float16)[0], blk[2:4].view(np.float16)[0]
        sc, qs = blk[4:16].astype(np.int64), blk[16:]
        for j in range(4):
            (s1, m1), (s2, m2) = _scale_min_k4(2 * j, sc), _scale_min_k4(2 * j + 1, sc)
            q = qs[32 * j:32 * j + 32]
            out += list(np.float32(d) * s1 * (q & 0xF) - np.float32(dmin) * m1)
            out += list(np.float32(d) * s2 * (q >> 4) - np.float32(dmin) * m2)
    return np.array(out, np.float32)


def test_k_quants(tmp_path):
    """Q4_K and Q6_K tensors (the common llama GGUF downloads): checked against ggml's
    reference code (Q4_K) and MLX's GGUF loader (Q6_K; MLX's Q4_K disagrees with ggml)."""
    rng = np.random.default_rng(2)
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    blocks = {"q4k": (random_blocks(Q.Q4_K, 4, 512, rng), Q.Q4_K), "q6k": (random_blocks(Q.Q6_K, 4, 512, rng), Q.Q6_K)}
    for name, (b, t) in blocks.items():
        w.add_tensor(name, b, raw_dtype=t)
    finish(w)
    with GGUFFile.open(path) as g:
        q4k = g.read_float32("q4k")
        assert q4k.shape == (4, 512)
        assert np.allclose(q4k, np.stack([_q4_k_reference(r) for r in blocks["q4k"][0]]), atol=1e-6)
        q6k = g.read_float32("q6k")
        ref = np.array(mx.load(str(path))["q6k"].astype(mx.float32))
        assert q6k.shape == ref.shape == (4, 512)
        assert np.allclose(q6k, ref, atol=1e-3 * np.abs(ref).max())


def test_loads_with_mlx_lm_and_matches_reference_model(tmp_path):
    """The converted folder gives the same logits as mlx-lm's llama built directly from
    the original weights: config.json, names and q/k order are all right."""
    src = tmp_path / "tiny.gguf"
    orig = write_gguf(src, qtype=Q.F32)
    dst = convert_gguf(src, tmp_path / "out", dtype="float32")
    model, _ = mlx_lm.load(str(dst))

    ref = Model(ModelArgs(model_type="llama", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                          intermediate_size=FFN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                          rms_norm_eps=1e-5, vocab_size=len(toy_bpe_vocab()[0]), rope_theta=10000.0,
                          tie_word_embeddings=True))
    ref.load_weights([(k, mx.array(v)) for k, v in orig.items()])
    x = mx.array([[5, 70, 90, 100, 3, 250, 17, 42]])
    a, b = model(x), ref(x)
    assert a.shape == (1, 8, len(toy_bpe_vocab()[0]))
    assert mx.allclose(a, b, atol=1e-4).item()

    # the same model with q/k left in llama.cpp's order gives different logits
    bad = Model(ref.args)
    bad.load_weights([(k, mx.array(permute_qk(v, HEADS if "q_proj" in k else KV_HEADS)
                                   if ("q_proj" in k or "k_proj" in k) else v)) for k, v in orig.items()])
    assert not mx.allclose(bad(x), b, atol=1e-2).item()


def test_config_and_tokenizer_files(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_gguf(src, qtype=Q.Q8_0)
    dst = convert_gguf(src, tmp_path / "out", dtype="bfloat16")
    cfg = json.loads((dst / "config.json").read_text())
    tokens = toy_bpe_vocab()[0]
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (HIDDEN, FFN, LAYERS)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert cfg["vocab_size"] == len(tokens) and cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0
    assert cfg["max_position_embeddings"] == 512 and cfg["hidden_act"] == "silu"
    assert cfg["torch_dtype"] == "bfloat16" and "head_dim" not in cfg
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert all(a.dtype == mx.bfloat16 for a in load_arrays(dst).values())
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == CHATML and tc["add_bos_token"] is False
    assert (tc["bos_token"], tc["eos_token"], tc["unk_token"], tc["pad_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")
    assert json.loads((dst / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"


    tok = load_tokenizer(dst)
    reference = Tokenizer.from_str(reference_tokenizer_json())
    for text in TEXTS + ["unseen words: xylophone 9876543210", "<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text)
        assert ids == reference.encode(text).ids, text
        assert tok.decode(ids) == text
    ids = tok.encode("Paris 123")
    assert [tokens[i] for i in ids[-3:]] == ["1", "2", "3"]  # digits split one by one
    chat = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    chat_ids = tok.encode(chat)
    assert chat_ids[0] == 1 and chat_ids.count(2) == 1  # control tokens are single special tokens
    assert tok.eos_token_id == 2

    model, _ = mlx_lm.load(str(dst))
    out = mlx_lm.generate(model, tok, chat, max_tokens=5)
    assert isinstance(out, str)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2", "default", "something-new"])
def test_other_pre_tokenizers_round_trip(tmp_path, pre):
    """Other llama.cpp pre-tokenizer names build a working byte-level tokenizer."""
    src = tmp_path / "tiny.gguf"
    add_bos = pre == "llama-bpe"  # Llama 3 files ask for a BOS token
    write_gguf(src, pre=pre, add_bos=add_bos)
    dst = convert_gguf(src, tmp_path / "out")
    tok = load_tokenizer(dst)
    for text in TEXTS + ["I'LL say it's 12345 times\r\n  done"]:
        ids = tok.encode(text)
        assert (ids[0] == 1) == add_bos and ids.count(1) == int(add_bos)
        assert tok.decode(ids, skip_special_tokens=True) == text
    pieces = [p for p, _ in Tokenizer.from_file(str(dst / "tokenizer.json")).pre_tokenizer.pre_tokenize_str("x 12345")]
    assert pieces == {"llama-bpe": ["x", "Ġ", "123", "45"], "qwen2": ["x", "Ġ", "1", "2", "3", "4", "5"]}.get(
        pre, ["x", "Ġ12345"])


def test_untied_output_and_sharding(tmp_path):
    src = tmp_path / "tiny.gguf"
    orig = write_gguf(src, qtype=Q.F16, output=True)
    dst = convert_gguf(src, tmp_path / "out", dtype="float32", max_shard_bytes=100_000)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    shards = sorted(p.name for p in dst.glob("model*.safetensors"))
    assert len(shards) > 1 and "model.safetensors" not in shards
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(orig) and set(index["weight_map"].values()) == set(shards)
    model, _ = mlx_lm.load(str(dst))
    assert np.allclose(np.array(model.lm_head.weight), orig["lm_head.weight"], atol=1e-3)


def test_attention_biases(tmp_path):
    """q/k/v biases (q/k permuted like their weights); o_proj gets the zero bias mlx-lm wants."""
    weights = random_weights(len(toy_bpe_vocab()[0]))
    rng = np.random.default_rng(3)
    for i in range(LAYERS):
        for p, rows in (("q", HEADS * HEAD_DIM), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM)):
            weights[f"model.layers.{i}.self_attn.{p}_proj.bias"] = rng.standard_normal(rows).astype(np.float32)
    src = tmp_path / "bias.gguf"
    write_gguf(src, weights=weights)
    dst = convert_gguf(src, tmp_path / "out", dtype="float32")
    assert json.loads((dst / "config.json").read_text())["attention_bias"] is True
    got = load_arrays(dst)
    for name, want in weights.items():
        assert np.array_equal(np.array(got[name]), want), name
    assert not np.any(np.array(got["model.layers.1.self_attn.o_proj.bias"]))
    model, _ = mlx_lm.load(str(dst))
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, len(toy_bpe_vocab()[0]))


def test_llama3_rope_scaling(tmp_path):
    factors = _llama3_factors(HEAD_DIM, 10000.0, 8.0, 1.0, 4.0, 64).astype(np.float32)
    src = tmp_path / "l3.gguf"
    write_gguf(src, extra_tensors={"rope_freqs.weight": (factors, Q.F32)},
               metadata={"llama.rope.scaling.original_context_length": 64})
    assert factors.min() == 1.0 and factors.max() == 8.0  # the test exercises all three bands
    dst = convert_gguf(src, tmp_path / "out", dtype="float32")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

    model, _ = mlx_lm.load(str(dst))
    assert model(mx.array([[1, 2, 3]])).shape[-1] == cfg["vocab_size"]


def test_sentencepiece_tokenizer(tmp_path):
    """tokenizer.ggml.model == "llama": SentencePiece-style BPE with byte fallback."""
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "ll", "▁hell", "▁hello",
              "▁w", "▁wo", "▁wor", "▁worl", "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))][::-1]  # longer pieces score higher
    src = tmp_path / "spm.gguf"
    orig = random_weights(len(tokens))
    w = gguf.GGUFWriter(str(src), "llama")
    for k, v in {"block_count": LAYERS, "context_length": 512, "embedding_length": HIDDEN,
                 "feed_forward_length": FFN, "head_count": HEADS, "head_count_kv": KV_HEADS}.items():
        getattr(w, f"add_{k}")(v)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    for hf, t in orig.items():
        n = gguf_name(hf)
        t = permute_qk(t, HEADS) if "q_proj" in hf else permute_qk(t, KV_HEADS) if "k_proj" in hf else t
        w.add_tensor(n, t)
    finish(w)

    dst = convert_gguf(src, tmp_path / "out", dtype="float32")
    tok = load_tokenizer(dst)
    ids = tok.encode("hello world")
    assert [tokens[i] for i in ids] == ["<s>", "▁hello", "▁world"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"
    ids = tok.encode("hé")  # é is not in the vocabulary: UTF-8 bytes
    assert [tokens[i] for i in ids] == ["<s>", "▁h", "<0xC3>", "<0xA9>"]
    assert tok.decode(ids, skip_special_tokens=True) == "hé"


def test_read_gguf_info(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_gguf(src, qtype=Q.Q4_1)
    info = read_gguf_info(src)
    assert info["architecture"] == "llama" and info["supported"] and info["problems"] == []
    assert info["hyperparameters"]["block_count"] == LAYERS
    assert info["hyperparameters"]["attention.head_count_kv"] == KV_HEADS
    assert info["tensor_count"] == 3 + 9 * LAYERS - 1  # embed, norm, 9 per layer; no output
    assert info["tensor_types"] == {"Q4_1": 1 + 7 * LAYERS, "F32": 1 + 2 * LAYERS}
    assert info["vocab_size"] == len(toy_bpe_vocab()[0]) and info["chat_template"] is True
    assert info["file_size"] == src.stat().st_size


# ---------------------------------------------------------------------------------------
# Bad inputs, cancel, existing destination, full disk
# ---------------------------------------------------------------------------------------

def _fails(tmp_path, src, match):
    dst = tmp_path / "out"
    with pytest.raises(GGUFError, match=match) as e:
        convert_gguf(src, dst)
    assert not dst.exists() and leftovers(tmp_path) == []
    return str(e.value)


def test_truncated_in_tensor_data(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_gguf(src, qtype=Q.Q8_0)
    size = src.stat().st_size
    os.truncate(src, size - 1000)
    msg = _fails(tmp_path, src, "truncated")
    assert str(src) in msg and "bytes short" in msg and "tensor '" in msg
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf_info(src)


def test_truncated_in_metadata(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_gguf(src)
    os.truncate(src, 2000)  # inside the token list
    msg = _fails(tmp_path, src, "truncated")
    assert "tokenizer.ggml" in msg and "2000 bytes" in msg
    os.truncate(src, 10)
    _fails(tmp_path, src, "truncated")


def test_damaged_headers_give_gguf_errors_only(tmp_path):
    """Cut anywhere, or with bytes of its header/index overwritten, a file either passes
    the checks or fails with GGUFError: never another exception, never a hang."""
    src = tmp_path / "tiny.gguf"
    write_gguf(src)
    data = src.read_bytes()
    with GGUFFile.open(src) as g:
        index_end = g.data_offset
        data_end = max(t.offset + t.n_bytes for t in g.tensors.values())  # padding may follow
    rng = np.random.default_rng(4)
    bad = tmp_path / "bad.gguf"
    for i in range(300):
        b = bytearray(data)
        if i % 3 == 0:
            b = b[:int(rng.integers(0, data_end))]
        else:
            for pos in rng.integers(0, index_end, size=int(rng.integers(1, 4))):
                b[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(b))
        try:
            with GGUFFile.open(bad) as g:
                hp = HParams.from_gguf(g)
                _plan_tensors(g, hp)
                build_tokenizer(g)
        except GGUFError:
            pass
        if i % 3 == 0:
            with pytest.raises(GGUFError):
                GGUFFile.open(bad).close()


def test_wrong_magic(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_gguf(src)
    with open(src, "r+b") as f:
        f.write(b"GGML")
    _fails(tmp_path, src, "not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    _fails(tmp_path, tmp_path / "empty.gguf", "not a GGUF file")


def test_bad_version(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_gguf(src)
    with open(src, "r+b") as f:
        f.seek(4)
        f.write((99).to_bytes(4, "little"))
    _fails(tmp_path, src, "version 99")


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_unknown_architecture(tmp_path, arch):
    src = tmp_path / "tiny.gguf"
    write_gguf(src, arch=arch)
    msg = _fails(tmp_path, src, f"unsupported architecture '{arch}'")
    assert "supported: llama, qwen2, qwen3, gemma2, gemma3, phi3" in msg
    assert "Gemma 3" in msg and "Qwen2 / Qwen2.5" in msg and "Phi-3" in msg  # the families, by name
    assert read_gguf_info(src)["supported"] is False


def test_unsupported_tensor_type(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_gguf(src, tensor_types={"blk.1.ffn_up.weight": Q.IQ4_NL})
    msg = _fails(tmp_path, src, "IQ4_NL")
    assert "blk.1.ffn_up.weight" in msg and "Q4_K" in msg  # names the tensor and what works
    info = read_gguf_info(src)
    assert not info["supported"] and "IQ4_NL" in info["problems"][0]


def test_unsupported_tokenizer_model(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_gguf(src, tokenizer_model="t5")
    _fails(tmp_path, src, "tokenizer model 't5' is not supported")


def test_shape_mismatch_and_missing_tensor(tmp_path):
    src = tmp_path / "tiny.gguf"
    weights = random_weights(len(toy_bpe_vocab()[0]))
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:96]
    write_gguf(src, weights=weights)
    _fails(tmp_path, src, r"blk.1.ffn_up.weight' has shape \[96, 64\], expected \[128, 64\]")
    del weights["model.layers.1.mlp.up_proj.weight"]
    write_gguf(src, weights=weights)
    _fails(tmp_path, src, "missing tensor 'blk.1.ffn_up.weight'")


def test_cancel_midway_leaves_nothing(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_gguf(src)
    seen = []

    def cb(fraction, message):
        seen.append(fraction)
        return fraction < 0.5

    with pytest.raises(Cancelled):
        convert_gguf(src, tmp_path / "out", progress=cb)
    assert max(seen) >= 0.5 and 0.05 < seen[-2] < 0.5  # it got into the tensors
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_progress_is_monotonic_and_ends_at_one(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_gguf(src)
    seen = []
    convert_gguf(src, tmp_path / "out", progress=lambda f, m: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) > 10


def test_existing_destination(tmp_path):
    src = tmp_path / "tiny.gguf"
    orig = write_gguf(src)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        convert_gguf(src, dst)
    assert (dst / "keep.txt").exists()
    convert_gguf(src, dst, overwrite=True, dtype="float32")
    assert not (dst / "keep.txt").exists()
    assert np.array_equal(np.array(load_arrays(dst)["model.norm.weight"]), orig["model.norm.weight"])
    assert leftovers(tmp_path) == []


def test_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out", dtype="int8")


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE") or not hasattr(signal, "SIGXFSZ"),
                    reason="needs RLIMIT_FSIZE")
def test_write_failure_reports_free_space_and_cleans_up(tmp_path):
    """A write that fails midway (here: a 100 kB file size limit, EFBIG, the same path as a
    full disk's ENOSPC) gives an OSError naming the free space and leaves nothing behind."""
    src = tmp_path / "tiny.gguf"
    write_gguf(src)
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        from mlx_flash.convert.gguf import convert_gguf
        try:
            convert_gguf({str(src)!r}, {str(tmp_path / 'out')!r}, dtype="float32")
        except OSError as e:
            print("OSError", e.errno, e)
            sys.exit(3)
    """)
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, cwd=repo,
                       env={**os.environ, "PYTHONPATH": str(repo)})
    assert r.returncode == 3, r.stdout + r.stderr
    assert "is free" in r.stdout and "model.safetensors" in r.stdout, r.stdout
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
