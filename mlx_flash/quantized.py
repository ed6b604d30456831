"""Quantized weights in memory: the compute dtype rule and the dense part's quantized modules.

MLX's quantized kernels are fast with different activation/scale dtypes per backend
(measured, docs/ARCHITECTURE.md "Quantized flash"): on the CPU the 4-bit group-32
``quantized_matmul`` runs ~5x faster with float32 activations and scales than with
bfloat16 ones (1536x576 matvec 5.2 vs 28 ms; the 49152x576 tied lm_head 82 vs 689 ms),
while on Metal the half-precision kernels are the fast ones. :func:`compute_dtype` is
the one place that decides; the engine runs a quantized model's activations (dense
part and sparse FFN) in that dtype. The neuron cache keeps the stored (disk) dtype of
the scales, so its bytes stay the real quantized bytes; the FFN casts the few scale
and bias values it multiplies with.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

#: CPU: inputs with at most this many rows use ``mx.quantized_matmul``; more rows dequantize first.
QMM_MAX_ROWS_CPU = 2
#: Rows of a weight dequantized at once for a batched matmul on the CPU (8192 x 576 float32: 19 MB).
DEQUANT_BLOCK = 8192


def compute_dtype(stored: mx.Dtype) -> mx.Dtype:
    """Activation and scale dtype for quantized matmuls on the default device: the stored
    float dtype on a GPU (Metal's half-precision kernels are its fast ones), float32 on
    the CPU (MLX's CPU quantized kernels are ~5x slower in bfloat16/float16)."""
    if mx.default_device().type == mx.gpu:
        return stored
    return mx.float32


def use_quantized_matmul(x: mx.array) -> bool:
    """Whether ``x`` (any leading shape) should go through ``mx.quantized_matmul`` on the
    default device: always on a GPU, for at most ``QMM_MAX_ROWS_CPU`` rows on the CPU."""
    return mx.default_device().type == mx.gpu or x.size // max(1, x.shape[-1]) <= QMM_MAX_ROWS_CPU


def dequantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: Optional[mx.array], *,
                       transpose: bool, group_size: int, bits: int, mode: str = "affine") -> mx.array:
    """What ``mx.quantized_matmul`` computes, by dequantizing ``w`` (in blocks of ``DEQUANT_BLOCK``
    rows) and a plain matmul in the scales' dtype: the CPU's fast path for batches."""
    def deq(a, b):
        return mx.dequantize(w[a:b], scales[a:b], None if biases is None else biases[a:b],
                             group_size=group_size, bits=bits, mode=mode)

    n = w.shape[0]
    x = x.astype(scales.dtype)
    if not transpose:  # x @ W, W rows = x's columns: accumulate over row blocks
        y = None
        for a in range(0, n, DEQUANT_BLOCK):
            part = x[..., a : a + DEQUANT_BLOCK] @ deq(a, a + DEQUANT_BLOCK)
            y = part if y is None else y + part
        return y
    return mx.concatenate([x @ deq(a, a + DEQUANT_BLOCK).T for a in range(0, n, DEQUANT_BLOCK)], axis=-1)


def qmatmul(x: mx.array, w: mx.array, scales: mx.array, biases: Optional[mx.array], *,
            transpose: bool, group_size: int, bits: int, mode: str = "affine") -> mx.array:
    """``mx.quantized_matmul`` where it is the fast path (:func:`use_quantized_matmul`), else
    :func:`dequantized_matmul`: the one place that picks between them."""
    if use_quantized_matmul(x):
        return mx.quantized_matmul(x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits,
                                   mode=mode)
    return dequantized_matmul(x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits, mode=mode)


class _CPUQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` that dequantizes for batched inputs on the CPU."""

    def __call__(self, x: mx.array) -> mx.array:
        y = qmatmul(x, self["weight"], self["scales"], self.get("biases"), transpose=True,
                    group_size=self.group_size, bits=self.bits, mode=self.mode)
        return y + self["bias"] if "bias" in self else y


class _CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose tied output projection dequantizes for batched inputs on the CPU."""

    def as_linear(self, x: mx.array) -> mx.array:
        return qmatmul(x, self["weight"], self["scales"], self.get("biases"), transpose=True,
                       group_size=self.group_size, bits=self.bits, mode=self.mode)


def fast_cpu_modules(model: nn.Module) -> int:
    """Give ``model``'s quantized linear and embedding modules the batched-input CPU path above
    (a no-op on a GPU, where ``quantized_matmul`` is fast for any shape). Returns how many."""
    if mx.default_device().type == mx.gpu:
        return 0
    n = 0
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear:
            m.__class__ = _CPUQuantizedLinear
            n += 1
        elif type(m) is nn.QuantizedEmbedding:
            m.__class__ = _CPUQuantizedEmbedding
            n += 1
    return n


def quantize_like(model: nn.Module, weights: Mapping[str, mx.array], config: Mapping[str, Any]) -> bool:
    """Turn the modules of ``model`` whose weights come quantized (``<path>.scales`` in
    ``weights``, mlx-lm key names after ``sanitize``) into MLX's quantized modules, with
    bits and group size from ``config["quantization"]`` (per-module entries first), as
    ``mlx_lm.utils.load_model`` does. Modules without scales (the flash FFN, float
    layers) are left alone. Returns whether anything was quantized."""
    if not any(k.endswith(".scales") for k in weights):
        return False
    q = dict(config.get("quantization") or {})
    base = {"group_size": q.get("group_size", 64), "bits": q.get("bits", 4), "mode": q.get("mode", "affine")}

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        over = q.get(path)
        if isinstance(over, Mapping):
            return {**base, **{k: v for k, v in over.items() if k in base}}
        w, s = weights[f"{path}.weight"], weights[f"{path}.scales"]
        in_dims = module.weight.shape[-1]
        return {**base, "group_size": in_dims // s.shape[-1], "bits": w.shape[-1] * 32 // in_dims}

    nn.quantize(model, group_size=base["group_size"], bits=base["bits"], mode=base["mode"],
                class_predicate=predicate)
    return True


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast every floating parameter of ``model`` (norms, scales, biases, float weights) to
    ``dtype``; packed integer weights stay as they are."""
    params = tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
                      model.parameters())
    model.update(params)
    mx.eval(model.parameters())


def describe(quant: Dict[str, Dict[str, Any]]) -> str:
    """``"gate 4b/g32, up 4b/g32, down 4b/g32 exact"`` (empty for float bundles; ``exact``: the
    source's own codes with resident group scales, ``storage.format.GROUPS_ALONG_FFN``)."""
    return ", ".join(f"{r} {q['bits']}b/g{q['group_size']}" + (" exact" if q.get("axis") == "ffn" else "")
                     for r, q in quant.items())
