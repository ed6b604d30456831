"""Tiny random MoE models as mlx-lm folders (mlx-lm's own classes; ``mlx_flash.moe.tiny``), for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import mlx.core as mx

from mlx_flash.moe.tiny import random_moe_model, tiny_moe_config
from tests.tiny import _write_tokenizer, quantize_tiny

MOE_FAMILIES = ("qwen3_moe", "qwen3_moe_mixed", "qwen2_moe", "mixtral", "olmoe")


def make_tiny_moe(dir: Union[str, Path], family: str, *, layers: int = 2, vocab: int = 256, dtype: str = "float32",
                  seed: int = 0, **overrides) -> Path:
    """Write a tiny random MoE model of ``family`` (a key of ``TINY_MOE_CONFIGS``) as an mlx-lm folder."""
    dst = Path(dir)
    dst.mkdir(parents=True, exist_ok=True)
    config = tiny_moe_config(family, layers=layers, vocab=vocab, dtype=dtype, **overrides)
    _, weights = random_moe_model(config, seed=seed, dtype=dtype)
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(dst, vocab)
    return dst


def make_tiny_moe_q4(dir: Union[str, Path], family: str, **kw) -> Path:
    """The same model quantized to 4 bits (group 32) by mlx-lm's ``quantize_model`` (experts included)."""
    d = Path(dir)
    src = make_tiny_moe(d / "float", family, **kw)
    return quantize_tiny(src, d / "q4", bits=4, group_size=32)
