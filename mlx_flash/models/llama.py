"""Llama-family models (Llama, SmolLM, Mistral, Qwen2): mlx-lm's modules with a pluggable FFN.

Attention, embeddings and norms are mlx-lm's own, kept dense in memory. Each
layer's ``mlp`` (``down(silu(gate x) * up x)``) is swapped for the flash
engine's ``SparseFFN`` so FFN weights come from disk neuron by neuron.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.nn as nn
from mlx_lm.models.llama import ModelArgs  # noqa: F401  (re-exported)
from mlx_lm.utils import _get_classes

#: per-layer FFN weight names, in bundle order: gate row i | up row i | down column i
FFN_KEYS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ACTIVATION = "silu"


def build(config: dict, ffn_factory: Optional[Callable[[int], nn.Module]] = None) -> nn.Module:
    """Instantiate the mlx-lm model for ``config``; swap each layer's FFN when asked."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if ffn_factory is not None:
        for i, layer in enumerate(model.layers):
            layer.mlp = ffn_factory(i)
    return model
