"""A flash model's whole network in memory, for the tools that measure it: calibration, evaluation and
relufy. Loading from a flash folder (FFN read fully from ``ffn.bin``), numpy matmuls for float32 on CPUs
(:class:`NumpyLinear`), FFN hooks that show each layer's input and hidden activation
(:class:`HookedMLP`, :func:`install_hooks`) and last-position logits. The engine's own loading (flash or
dense, quantized modules kept) is ``engine.load``."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .active import gated_activation
from .storage.format import bundle_parts, ffn_state_dict, load_dense_weights, read_layer_weights

# MLX_LM: ``.models`` imports mlx-lm (and through it transformers: seconds). It is imported where a model
# is built, so that calibrate's and relufy's settings stay cheap to import (the CLI's parser reads them).


def model_activation(model_args: dict) -> Tuple[str, Optional[float]]:
    """``(name, param)`` of a model config's FFN activation (the architecture's rule)."""
    from .models import get_architecture  # noqa: PLC0415 - see MLX_LM below

    return get_architecture(dict(model_args)).activation_of(dict(model_args))


class NumpyLinear(nn.Module):
    """``y = x W^T + bias`` computed by numpy in float32: a drop-in for an ``nn.Linear`` (or a tied
    embedding used as the output head) in calibration's and evaluation's dense model on CPUs.

    Why: the Linux ``mlx[cpu]`` wheel's bundled reference BLAS runs a float32 576x1536 matmul at
    ~7 GFLOP/s (bfloat16 is no faster: ~6-7), MLX with Debian's OpenBLAS at 30-105, while numpy's
    wheel (its own OpenBLAS, always present) runs it at 180-230 on the same 2-core machine. The
    result is the same float32 product, so the calibration data do not depend on the BLAS.
    Each call evaluates its input (a sync per matmul: ~60 µs, negligible next to the matmul)."""

    def __init__(self, weight: mx.array, bias: Optional[mx.array] = None):
        super().__init__()
        object.__setattr__(self, "_wt", np.ascontiguousarray(np.array(weight.astype(mx.float32)).T))
        object.__setattr__(self, "_bias", None if bias is None else np.array(bias.astype(mx.float32)))

    def __call__(self, x: mx.array) -> mx.array:
        lead = x.shape[:-1]
        y = np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1]) @ self._wt
        if self._bias is not None:
            y += self._bias
        return mx.array(y.reshape(*lead, y.shape[-1]))


def numpy_matmuls(module: nn.Module) -> int:
    """Replace every float32 ``nn.Linear`` inside ``module`` by a :class:`NumpyLinear`, and give a
    model with tied embeddings an ``lm_head`` computed the same way (:func:`last_logits` uses it);
    returns how many were replaced."""
    n = 0

    def swap(value):
        nonlocal n
        if isinstance(value, nn.Linear) and value.weight.dtype == mx.float32:
            n += 1
            return NumpyLinear(value.weight, value.get("bias"))
        if isinstance(value, nn.Module):
            for k in list(value.keys()):
                value[k] = swap(value[k])
        elif isinstance(value, list):
            for i in range(len(value)):
                value[i] = swap(value[i])
        elif isinstance(value, dict):
            for k in list(value.keys()):
                value[k] = swap(value[k])
        return value

    swap(module)
    if "lm_head" not in module:
        inner = module.get("model")
        emb = getattr(inner, "embed_tokens", None) if inner is not None else None
        if isinstance(emb, nn.Embedding) and emb.weight.dtype == mx.float32:
            module["lm_head"] = NumpyLinear(emb.weight)
            n += 1
    return n


def use_numpy_matmuls(dtype: Optional[str]) -> bool:
    """Whether the dense model's matmuls go through numpy: float32 on the CPU device (Linux's
    MLX CPU build; on Apple silicon MLX's default device is the GPU and MLX does them)."""
    return dtype == "float32" and mx.default_device() == mx.cpu


def load_dense_model(files, dtype: Optional[str] = "float32", *, numpy_cpu: bool = True) -> nn.Module:
    """The whole model (FFN read fully from ``ffn.bin``) in memory, floating weights
    cast to ``dtype`` (None keeps the stored dtype). For calibration, evaluation and relufy.
    In float32 on a CPU device its matmuls run in numpy (:class:`NumpyLinear`) unless ``numpy_cpu``
    is False (relufy trains through the model: numpy products have no gradients)."""
    from .models import get_architecture, sanitize  # noqa: PLC0415 - see MLX_LM below

    m = files.manifest
    arch_cfg = dict(m.model_args)
    arch = get_architecture(arch_cfg)
    model = arch.build(arch_cfg)
    weights = load_dense_weights(files, dequantize=True)  # quantized models: float, the same values
    for i in range(m.num_layers):
        weights.update(ffn_state_dict(files, i))
    if dtype is not None:
        dt = getattr(mx, dtype)
        weights = {k: (v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
    model.load_weights(list(sanitize(model, weights).items()))
    mx.eval(model.parameters())
    if numpy_cpu and use_numpy_matmuls(dtype):
        numpy_matmuls(model)
    return model


def layer_ffn_parts(files, layer: int) -> Dict[str, mx.array]:
    """One layer's FFN tensors by role (``gate``, ``up``, ``down``, ``gate_bias``, ``up_bias``)."""
    return dict(zip((p.role for p in bundle_parts(files.manifest)), read_layer_weights(files, layer)))


def float32_gates(files) -> List[Tuple[mx.array, Optional[mx.array]]]:
    """Every layer's ``(gate (n, hidden), gate_bias (n,) or None)`` in float32, evaluated: what the
    gate-first rule needs to score a model (``evaluate.gate_selector``)."""
    gates = []
    for i in range(files.manifest.num_layers):
        parts = layer_ffn_parts(files, i)
        b = parts.get("gate_bias")
        gates.append((parts["gate"].astype(mx.float32), None if b is None else b.astype(mx.float32)))
    mx.eval(gates)
    return gates


Hook = Callable[[int, mx.array, mx.array], mx.array]
"""``hook(layer, x, h) -> h'``: sees a layer's FFN input and hidden activation, returns
the activation to project down (``h`` itself, or ``h`` masked)."""


def _ffn_modules(mlp: nn.Module):
    """(gate, up or None, down) Linear modules of an mlx-lm / mlx-flash FFN."""
    if hasattr(mlp, "gate_proj"):
        return mlp.gate_proj, mlp.up_proj, mlp.down_proj
    if hasattr(mlp, "fc1"):
        return mlp.fc1, None, mlp.fc2
    raise ValueError(f"cannot hook FFN {type(mlp).__name__}: expected gate_proj/up_proj/down_proj or fc1/fc2")


class HookedMLP(nn.Module):
    """An FFN ``down(f(gate x, up x))`` that shows ``x`` and ``h = f(...)`` to a hook."""

    def __init__(self, mlp: nn.Module, layer: int, act: str, hook: Hook, act_param: Optional[float] = None):
        super().__init__()
        self.inner = mlp
        _ffn_modules(mlp)  # fail early
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_gated", gated_activation(act, act_param))
        object.__setattr__(self, "_hook", hook)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up, down = _ffn_modules(self.inner)
        h = self._gated(gate(x), up(x) if up is not None else None)
        return down(self._hook(self._layer, x, h))


def install_hooks(model: nn.Module, act, hook: Hook) -> None:
    """Wrap every layer's ``mlp`` of the model in a :class:`HookedMLP`.
    ``act``: an activation name or ``(name, param)``."""
    name, param = (act, None) if isinstance(act, str) else act
    for i, layer in enumerate(model.layers):
        mlp = layer.mlp.inner if isinstance(layer.mlp, HookedMLP) else layer.mlp
        layer.mlp = HookedMLP(mlp, i, name, hook, param)


def hidden_states(model: nn.Module, tokens: mx.array, cache=None) -> mx.array:
    """The final hidden states (before ``lm_head``): collection needs no logits."""
    return model.model(tokens, cache=cache)


def _head(model: nn.Module):
    head = getattr(model, "lm_head", None)
    if head is not None:
        return head
    inner = model.model
    emb = getattr(inner, "embed_tokens", None) or getattr(getattr(inner, "decoder", None), "embed_tokens", None)
    return emb.as_linear if emb is not None else None


def last_logits(model: nn.Module, tokens: mx.array, cache=None) -> mx.array:
    """Logits of the last position only (B, vocab): the head on one row per sequence."""
    head = _head(model)
    if head is None:
        return model(tokens, cache=cache)[:, -1, :].astype(mx.float32)
    out = head(hidden_states(model, tokens, cache)[:, -1, :]).astype(mx.float32)
    cap = getattr(model, "final_logit_softcapping", None)  # Gemma 2's, applied by its own __call__
    return cap * mx.tanh(out / cap) if cap else out
