"""Every supported family end to end on tiny random models (hidden 64, ffn 128).

Per family a model is written with mlx-lm's own class as an mlx-lm folder
(``tests.tiny.make_tiny_model``) and, from the same weights, as a GGUF file with gguf-py's
writer the way llama.cpp's ``convert_hf_to_gguf.py`` writes it (tensor names from gguf-py's
``TensorNameMap``, q/k permuted for the llama architecture, Gemma norms stored as ``w + 1``,
per-family metadata) with a real BPE vocabulary. Then:

- GGUF → mlx-lm folder: same config where it matters, logits equal mlx-lm's on the original folder;
- mlx-lm folder → flash: every neuron active (``active="all"``) gives mlx-lm's logits;
- calibration fits predictors and the predictor engine generates.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlx.utils import tree_flatten
from mlx_lm.models.gemma3 import Model, ModelArgs
from mlx_lm.utils import load_tokenizer

from mlx_flash import library
from mlx_flash.calibrate import calibrate
from mlx_flash.config import FlashConfig
from mlx_flash.convert.gguf import GGUFError, _llama3_factors, convert_gguf, gguf_tensor_names, permute_qk
from mlx_flash.engine import load
from mlx_flash.families import BY_MODEL_TYPE, FAMILIES
from mlx_flash.storage.format import FlashFormatError, convert_to_flash, open_flash
from tests.convert.test_gguf import CHATML, finish, toy_bpe_vocab
from tests.tiny import _write_tokenizer, make_tiny_model

KINDS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "phi3_longrope"]
TOKENS = mx.array([[5, 17, 99, 3, 42, 7, 8, 120, 33, 250, 1, 64]])  # > gemma3's sliding window of 4


def _layers(kind: str) -> int:
    return 6 if kind == "gemma3_text" else 2  # mlx-lm's gemma3_text needs a global layer (every 6th)


def _folder_weights(folder: Path) -> dict:
    return {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(folder / "model.safetensors")).items()}


def write_family_gguf(path: Path, folder: Path, *, qtype=Q.F32, tokenizer: dict | None = None,
                      extra_tensors: dict | None = None) -> None:
    """The mlx-lm folder's model as llama.cpp's converter would write it."""
    config = json.loads((folder / "config.json").read_text())
    fam = BY_MODEL_TYPE[config["model_type"]]
    weights = _folder_weights(folder)
    n_layers, heads, kv = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    names = gguf_tensor_names(fam, n_layers, weights)
    assert set(names) == set(weights), set(weights) - set(names)
    w = gguf.GGUFWriter(str(path), fam.gguf_arch)
    w.add_block_count(n_layers)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if "sliding_window" in config:
        w.add_sliding_window(config["sliding_window"])
    if config["model_type"] == "gemma2":
        w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
    rs = config.get("rope_scaling")
    if config["model_type"] == "phi3":
        w.add_rope_scaling_orig_ctx_len(config["original_max_position_embeddings"])
    if rs and rs.get("type") == "longrope":  # llama.cpp: factors as tensors, the default attention factor
        w.add_tensor("rope_factors_long.weight", np.array(rs["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rs["short_factor"], np.float32))
        ctx, orig = config["max_position_embeddings"], config["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(ctx / orig) / np.log(orig))))
    elif rs and rs.get("type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs["factor"])
    elif rs:  # llama.cpp stores Llama 3 RoPE scaling as per-frequency factors (rope_freqs)
        f = _llama3_factors(head_dim, config["rope_theta"], rs["factor"], rs["low_freq_factor"],
                            rs["high_freq_factor"], rs["original_max_position_embeddings"])
        w.add_tensor("rope_freqs.weight", f.astype(np.float32))
        w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
    tok = tokenizer or {}
    tokens, types, merges = tok.get("vocab") or toy_bpe_vocab()
    assert len(tokens) == config["vocab_size"]
    w.add_tokenizer_model(tok.get("model", "gpt2"))
    if tok.get("model", "gpt2") == "gpt2":
        w.add_tokenizer_pre("qwen2")
        w.add_token_merges(merges)
    else:
        w.add_token_scores(tok["scores"])
        w.add_add_space_prefix(tok.get("add_space_prefix", True))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(tok.get("bos", 1))
    w.add_eos_token_id(tok.get("eos", 2))
    if "unk" in tok:
        w.add_unk_token_id(tok["unk"])
    w.add_add_bos_token(tok.get("add_bos", False))
    w.add_chat_template(CHATML)
    for hf, t in weights.items():
        if fam.gguf_permute_qk and "q_proj" in hf:
            t = permute_qk(t, heads)
        elif fam.gguf_permute_qk and "k_proj" in hf:
            t = permute_qk(t, kv)
        if hf.endswith("norm.weight"):
            t = t + np.float32(fam.gguf_norm_shift)
        if t.ndim == 2 and qtype != Q.F32:
            w.add_tensor(names[hf], gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(names[hf], t)
    for name, t in (extra_tensors or {}).items():
        w.add_tensor(name, t)
    finish(w)


@pytest.fixture(scope="module", params=KINDS)
def family(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    folder = make_tiny_model(root / "mlx", kind, layers=_layers(kind), vocab=len(toy_bpe_vocab()[0]), seed=7)
    write_family_gguf(root / "model.gguf", folder)
    return kind, root, folder


def _rounded(v):
    """Config values compared up to float32 rounding (GGUF stores float32)."""
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return round(v, 5) if isinstance(v, float) else v


def _logits(model) -> np.ndarray:
    return np.array(model(TOKENS).astype(mx.float32))


def test_gguf_converts_to_mlx_lms_model(family):
    kind, root, folder = family
    out = convert_gguf(root / "model.gguf", root / "from-gguf", dtype="float32")
    want_cfg = json.loads((folder / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    same_type = "llama" if kind == "mistral" else want_cfg["model_type"]  # GGUF's "llama" arch covers Mistral
    assert cfg["model_type"] == same_type
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rope_theta", "sliding_window", "query_pre_attn_scalar",
                "attn_logit_softcapping", "final_logit_softcapping", "rope_scaling", "head_dim"):
        if key in want_cfg:
            assert _rounded(cfg[key]) == _rounded(want_cfg[key]), key
    if "tie_word_embeddings" in want_cfg:
        assert cfg["tie_word_embeddings"] == want_cfg["tie_word_embeddings"]
    ref, _ = mlx_lm.load(str(folder))
    got, tok = mlx_lm.load(str(out))
    np.testing.assert_allclose(_logits(got), _logits(ref), atol=2e-4, rtol=2e-4)
    assert tok.chat_template == CHATML


def test_flash_every_neuron_equals_mlx_lm(family):
    kind, root, folder = family
    dst = convert_to_flash(folder, root / "model.flash")
    m = open_flash(dst).manifest
    assert m.architecture == json.loads((folder / "config.json").read_text())["model_type"]
    assert m.bundle_parts == ["gate", "up", "down"]
    ref, _ = mlx_lm.load(str(folder))
    want = _logits(ref)
    eng = load(dst, FlashConfig(active="all", budget=1.0, scratch_neurons=32, threads=2))
    np.testing.assert_allclose(_logits(eng.model), want, atol=2e-4, rtol=2e-4)
    eng.close()
    dense = load(dst, dense=True)  # the whole FFN read back from ffn.bin
    np.testing.assert_allclose(_logits(dense.model), want, atol=2e-4, rtol=2e-4)


def test_last_position_through_the_head_equals_full_logits(family):
    """The engine's prefill puts only the last prompt position through the output head
    (``final_norm``): its logits equal the last row of the full forward pass."""
    _, _, folder = family
    eng = load(folder)
    want = _logits(eng.model)[:, -1:]
    with eng._last_position_only():
        got = _logits(eng.model)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    step = next(eng.generate_step(TOKENS[0].tolist(), 1))
    assert step.token == int(np.argmax(want[0, -1]))


def test_calibrates_and_generates_with_predictors(family):
    kind, root, folder = family
    dst = root / "model.flash"
    if not dst.exists():
        convert_to_flash(folder, dst)
    rep = calibrate(dst, sparsity=0.5, rank=4, tokens=96, max_new_tokens=4, prompts=["hi", "a story"])
    assert len(rep.thresholds) == _layers(kind)
    eng = load(dst, FlashConfig(active="predictor", budget=0.6, scratch_neurons=32, threads=2))
    assert eng.mode == "flash-predictor"
    responses = list(eng.stream_generate("hello", max_tokens=4))
    assert responses and responses[-1].stats.neurons_active > 0
    eng.close()


@pytest.mark.parametrize("kind", ["qwen2", "gemma3_text", "phi3"])
def test_quantized_gguf_stays_quantized_through_flash(tmp_path, kind):
    """Q8_0 GGUF → 8-bit mlx-lm folder (the bits kept) → quantized flash bundles (Phi-3's fused
    gate_up split row-wise, scales and biases with it): every neuron active gives mlx-lm's
    logits on the converted folder."""
    folder = make_tiny_model(tmp_path / "mlx", kind, layers=_layers(kind), vocab=len(toy_bpe_vocab()[0]), seed=5)
    write_family_gguf(tmp_path / "q8.gguf", folder, qtype=Q.Q8_0)
    out = convert_gguf(tmp_path / "q8.gguf", tmp_path / "q8")
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    dst = convert_to_flash(out, tmp_path / "q8.flash")
    m = open_flash(dst).manifest
    assert m.quantization["gate"]["bits"] == 8 and m.bundle_parts == ["gate", "up", "down"]
    ref = load(out)  # mlx-lm's own quantized model (run in the CPU's fast dtype)
    eng = load(dst, FlashConfig(active="all", budget=1.0, scratch_neurons=32, threads=2))
    a, b = _logits(eng.model), _logits(ref.model)
    # down columns are re-quantized along hidden (8 bits): close, not bit-equal
    assert np.abs(a - b).max() < 0.02 * np.abs(b).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
    eng.close()


def test_gemma_sentencepiece_tokenizer_round_trip(tmp_path):
    """A Gemma-style SentencePiece vocabulary (``tokenizer.ggml.model`` = llama, no space
    prefix, byte pieces, scores) becomes a tokenizer.json that splits, falls back to bytes
    and decodes back, with the bos added and the chat template kept."""
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello",
              "▁w", "▁wo", "▁wor", "▁worl", "▁world"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [3, 3, 3, 2] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 260 + [-float(len(pieces) - i) for i in range(len(pieces))]  # longer pieces first
    folder = make_tiny_model(tmp_path / "mlx", "gemma3_text", layers=6, vocab=len(tokens), seed=2)
    write_family_gguf(tmp_path / "spm.gguf", folder, tokenizer={
        "model": "llama", "vocab": (tokens, types, None), "scores": scores, "add_space_prefix": False,
        "bos": 2, "eos": 1, "unk": 3, "add_bos": True})
    out = convert_gguf(tmp_path / "spm.gguf", tmp_path / "out", dtype="float32")
    tok = load_tokenizer(out)
    ids = tok.encode("hello world")
    assert [tokens[i] for i in ids] == ["<bos>", "hello", "▁world"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"
    ids = tok.encode("hé world")  # é is not in the vocabulary: its UTF-8 bytes
    assert [tokens[i] for i in ids] == ["<bos>", "h", "<0xC3>", "<0xA9>", "▁world"]
    assert tok.decode(ids, skip_special_tokens=True) == "hé world"
    assert tok.chat_template == CHATML


def test_refusals_name_what_is_supported(tmp_path):
    """A folder of a family mlx-flash does not run is refused with a message naming the
    supported ones; a Phi-3 GGUF with half of its LongRoPE factors says what is missing."""
    folder = make_tiny_model(tmp_path / "mlx", "llama", vocab=len(toy_bpe_vocab()[0]))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(FlashFormatError, match=r"unsupported architecture.*'gpt_neox'") as e:
        convert_to_flash(folder, tmp_path / "x.flash")
    for f in FAMILIES:
        assert f"{f.label} [{'/'.join(f.model_types + f.wrappers)}]" in str(e.value)
    assert not (tmp_path / "x.flash").exists()

    phi = make_tiny_model(tmp_path / "phi", "phi3", vocab=len(toy_bpe_vocab()[0]))
    write_family_gguf(tmp_path / "phi.gguf", phi, extra_tensors={"rope_factors_long.weight": np.ones(8, np.float32)})
    with pytest.raises(GGUFError, match="LongRoPE needs both rope_factors_long and rope_factors_short"):
        convert_gguf(tmp_path / "phi.gguf", tmp_path / "phi-out")
    assert not (tmp_path / "phi-out").exists()


def test_multimodal_gemma3_folder_imports_its_text_model(tmp_path):
    """A Gemma 3 4B+ style mlx-lm folder (model_type gemma3: ``text_config``, weights under
    ``language_model.``, a vision tower) becomes a gemma3_text flash folder whose logits with
    every neuron active equal mlx-lm's on the multimodal folder; the vision tower is dropped."""
    text = make_tiny_model(tmp_path / "text", "gemma3_text", layers=6, vocab=256, seed=4)
    tcfg = json.loads((text / "config.json").read_text())
    src = tmp_path / "gemma-3-mm"
    src.mkdir()
    cfg = {"model_type": "gemma3", "vocab_size": 256, "eos_token_id": 255,
           "text_config": {k: v for k, v in tcfg.items() if k not in ("vocab_size", "eos_token_id", "torch_dtype")},
           "vision_config": {"hidden_size": 8}}
    model = Model(ModelArgs.from_dict(cfg))
    weights = {f"language_model.{k}": v for k, v in mx.load(str(text / "model.safetensors")).items()}
    assert set(weights) == {k for k, _ in tree_flatten(model.parameters())}  # mlx-lm's own names
    weights["vision_tower.patch.weight"] = mx.ones((8, 8))
    mx.save_safetensors(str(src / "model.safetensors"), weights, metadata={"format": "mlx"})
    (src / "config.json").write_text(json.dumps(cfg))
    _write_tokenizer(src, 256)

    dst = convert_to_flash(src, tmp_path / "mm.flash")
    files = open_flash(dst)
    assert files.manifest.architecture == "gemma3_text"
    assert json.loads((dst / "config.json").read_text())["model_type"] == "gemma3_text"
    assert not any("vision" in k for k in mx.load(str(files.dense_path)))
    ref, _ = mlx_lm.load(str(src))
    eng = load(dst, FlashConfig(active="all", budget=1.0, scratch_neurons=32, threads=2))
    np.testing.assert_allclose(_logits(eng.model), _logits(ref), atol=2e-4, rtol=2e-4)
    eng.close()
    np.testing.assert_allclose(_logits(load(src).model), _logits(ref), atol=1e-5)  # and dense as it is


@pytest.mark.parametrize("kind", ["gemma2", "qwen3"])
def test_library_imports_a_gguf_of_the_family(tmp_path, kind):
    """The app's import path: GGUF → mlx-lm folder → flash in the library, without calibration;
    the family is named in the library and the flash model gives mlx-lm's logits."""
    folder = make_tiny_model(tmp_path / "mlx", kind, vocab=len(toy_bpe_vocab()[0]), seed=9)
    write_family_gguf(tmp_path / f"Tiny-{kind}.gguf", folder)
    assert library.check_importable(tmp_path / f"Tiny-{kind}.gguf") == "gguf"
    dst = library.import_model(tmp_path / f"Tiny-{kind}.gguf", root=tmp_path / "models", dtype="float32",
                               calibrate=False)
    entries, broken = library.scan_library(tmp_path / "models")
    assert not broken and [(e.path, e.family) for e in entries] == [(dst, BY_MODEL_TYPE[kind].label)]
    ref, _ = mlx_lm.load(str(folder))
    eng = load(dst, FlashConfig(active="all", budget=1.0, scratch_neurons=32, threads=2))
    np.testing.assert_allclose(_logits(eng.model), _logits(ref), atol=2e-4, rtol=2e-4)
    eng.close()
