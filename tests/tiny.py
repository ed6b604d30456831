"""Tiny random llama models in mlx-lm folder layout, for tests.

``make_tiny_llama(dir)`` writes ``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
so that ``mlx_lm.load(dir)`` works and ``mlx_flash.storage.format.convert_to_flash``
can convert it. The weights are random but scaled so activations are neither
zero nor exploding (a few layers of a tiny model give varied logits: ``mlx_flash.tiny.random_weights``).

Tokenizer: byte-level BPE without merges (one token per byte). The two ChatML
special tokens ``<|im_start|>`` and ``<|im_end|>`` (the eos) take the last two
ids; when ``vocab`` is smaller than 258 the highest byte values (0xFE, 0xFF,
which never occur in UTF-8) are left out to make room. Ids beyond the byte
alphabet are filled with ``<|reserved_N|>`` tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Union

import mlx.core as mx
from mlx_lm.utils import load_model, quantize_model, save_config, save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

from mlx_flash.storage.format import convert_to_flash
from mlx_flash.tiny import random_model

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


def _write_tokenizer(dst: Path, vocab: int) -> None:
    specials = [IM_START, IM_END]
    n_bytes = min(256, vocab - len(specials))
    if n_bytes < 128:
        raise ValueError(f"vocab must be >= {128 + len(specials)} for a byte-level tokenizer, got {vocab}")
    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    # ByteLevel.alphabet() is unordered; order by the byte each char stands for.
    byte_to_char = _bytes_to_unicode()
    chars = [byte_to_char[b] for b in range(n_bytes)]
    assert set(chars) <= set(alphabet)
    vocab_map = {c: i for i, c in enumerate(chars)}
    n_reserved = vocab - len(specials) - n_bytes
    for k in range(n_reserved):
        vocab_map[f"<|reserved_{k}|>"] = n_bytes + k
    tok = Tokenizer(models.BPE(vocab=vocab_map, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)  # ids n_bytes + n_reserved, +1
    assert tok.token_to_id(IM_END) == vocab - 1, tok.token_to_id(IM_END)
    tok.save(str(dst / "tokenizer.json"))

    (dst / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": IM_END,
                "pad_token": IM_END,
                "unk_token": None,
                "add_bos_token": False,
                "model_max_length": 2048,
                "chat_template": CHATML_TEMPLATE,
                "additional_special_tokens": specials,
            },
            indent=2,
        )
    )
    (dst / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": IM_END, "pad_token": IM_END, "additional_special_tokens": specials}, indent=2)
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode char table (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def make_tiny_llama(
    dir: Union[str, Path],
    *,
    layers: int = 2,
    hidden: int = 64,
    ffn: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 256,
    dtype: str = "float16",
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a tiny random llama model folder (mlx-lm layout) to ``dir``; return it.

    dtype is "float16", "bfloat16" or "float32". ``seed`` makes the weights
    reproducible. The tokenizer's eos is ``<|im_end|>`` (id ``vocab - 1``).
    """
    dst = Path(dir)
    dst.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": ffn,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "eos_token_id": vocab - 1,
    }
    _, weights = random_model(config, seed, dtype)  # RMSNorm scales near 1 so activations keep their size
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(dst, vocab)
    return dst


#: config.json of a tiny model per family (hidden 64, 4 heads of 16, 2 kv heads, ffn 128):
#: what :func:`make_tiny_model` writes, with ``num_hidden_layers``/``vocab_size`` filled in.
FAMILY_CONFIGS = {
    "llama": {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False},
    # Llama 3.x: RoPE scaling (mlx-lm's Llama3RoPE)
    "llama3": {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "mistral": {"model_type": "mistral", "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True},
    # head_dim 32 != hidden / heads (as Qwen3-0.6B: 128 vs 64)
    "qwen3": {"model_type": "qwen3", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
              "head_dim": 32},
    "gemma2": {"model_type": "gemma2", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "head_dim": 16,
               "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "hidden_act": "gelu_pytorch_tanh", "sliding_window": 4096},
    "gemma3_text": {"model_type": "gemma3_text", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "head_dim": 16,
                    "query_pre_attn_scalar": 16, "sliding_window": 4, "sliding_window_pattern": 6,
                    "rope_local_base_freq": 10000.0, "hidden_act": "gelu_pytorch_tanh",
                    "rope_scaling": {"type": "linear", "factor": 8.0}},  # global layers (Gemma 3 4B+)
    "phi3": {"model_type": "phi3", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
             "original_max_position_embeddings": 2048},
    # Phi-3.5 mini / Phi-3 128k: LongRoPE (per-frequency factors, mlx-lm's SuScaledRoPE)
    "phi3_longrope": {"model_type": "phi3", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                      "tie_word_embeddings": False, "original_max_position_embeddings": 64,
                      "rope_scaling": {"type": "longrope", "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
                                       "short_factor": [1.0, 1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0]}},
}


def make_tiny_model(dir: Union[str, Path], family: str, *, layers: int = 2, vocab: int = 256,
                    dtype: str = "float32", seed: int = 0, hidden: int = 64, ffn: int = 128) -> Path:
    """A tiny random model of ``family`` (a key of :data:`FAMILY_CONFIGS`) written with mlx-lm's
    own class for its model_type as an mlx-lm folder (byte-level tokenizer as in
    :func:`make_tiny_llama`); returns the folder. Gemma norms (``(1 + w)`` in mlx-lm) get weights
    near 0, other norms near 1."""
    dst = Path(dir)
    dst.mkdir(parents=True, exist_ok=True)
    config = {**FAMILY_CONFIGS[family], "hidden_size": hidden, "num_hidden_layers": layers,
              "intermediate_size": ffn, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": vocab, "max_position_embeddings": 2048, "torch_dtype": dtype,
              "eos_token_id": vocab - 1}
    gemma = config["model_type"].startswith("gemma")
    _, weights = random_model(config, seed, dtype, norm_center=0.0 if gemma else 1.0)
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(dst, vocab)
    return dst


def make_tiny_flash(dir: Union[str, Path], *, dtype: str = "float16", flash_dtype: Union[str, None] = None,
                    **kw) -> Path:
    """A tiny llama (``make_tiny_llama(dir / "src", dtype=dtype, **kw)``) converted to
    a flash folder ``dir / "model.flash"``; returns the flash folder."""
    d = Path(dir)
    src = make_tiny_llama(d / "src", dtype=dtype, **kw)
    return convert_to_flash(src, d / "model.flash", dtype=flash_dtype)


def quantize_tiny(src: Union[str, Path], dst: Union[str, Path], *, bits: int = 4, group_size: int = 32,
                  quant_predicate=None) -> Path:
    """An mlx-lm quantized folder at ``dst`` made from the float folder ``src`` with mlx-lm's
    own ``quantize_model`` (``config.json`` gains ``quantization``; ``quant_predicate`` as in
    mlx-lm, e.g. per-module bits). Tokenizer files are copied."""
    src, dst = Path(src), Path(dst)
    model, config = load_model(src)
    model, config = quantize_model(model, config, group_size, bits, quant_predicate=quant_predicate)
    save_model(dst, model)
    save_config(config, config_path=dst / "config.json")
    for p in src.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(p, dst / p.name)
    return dst


__all__ = ["make_tiny_llama", "make_tiny_model", "FAMILY_CONFIGS", "make_tiny_flash", "IM_START", "IM_END",
           "CHATML_TEMPLATE"]

if __name__ == "__main__":  # pragma: no cover - manual check
    import sys
    import tempfile

    import mlx_lm

    d = make_tiny_llama(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "tiny")
    m, t = mlx_lm.load(str(d))
    prompt = t.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    print(mlx_lm.generate(m, t, prompt, max_tokens=10))
