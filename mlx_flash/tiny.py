"""Random weights for tiny models built with mlx-lm's own classes (the tests' tiny models in
``tests/tiny.py``, the MoE models of ``moe.tiny`` and the MoE replay's routing traces).

:func:`random_weights` is the one loop that gives every parameter of a model random values
scaled so activations keep their size; its per-name rules are parameters: norms near
``norm_center`` (1, or 0 for Gemma's ``(1 + w)`` norms), embeddings N(0, 1), biases
``bias_scale`` * N(0, 1), an MoE router (``*.gate.weight``) a wider spread (``router_scale``)
so routing is skewed, every other weight N(0, 1/fan_in). The same seed gives the same weights.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes


def random_weights(model: nn.Module, seed: int = 0, dtype: str = "float32", *, norm_center: float = 1.0,
                   bias_scale: Optional[float] = 0.1, router_scale: Optional[float] = None) -> Dict[str, mx.array]:
    """Random values for every parameter of ``model`` (by name, in sorted order, one key split
    each), cast to ``dtype`` and evaluated; the model itself is left as it is.
    ``bias_scale`` None: biases are scaled as weights; ``router_scale`` None: no router rule."""
    key = mx.random.key(seed)
    weights = {}
    for name, w in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        key, sub = mx.random.split(key)
        if "norm" in name:
            w = norm_center + 0.1 * mx.random.normal(w.shape, key=sub)
        elif "embed_tokens" in name:
            w = mx.random.normal(w.shape, key=sub)
        elif bias_scale is not None and name.endswith(".bias"):
            w = bias_scale * mx.random.normal(w.shape, key=sub)
        elif router_scale is not None and name.endswith(".gate.weight"):  # wider than 1/sqrt(fan_in): skewed routing
            w = mx.random.normal(w.shape, key=sub) * (router_scale / w.shape[-1] ** 0.5)
        else:
            w = mx.random.normal(w.shape, key=sub) * (1.0 / w.shape[-1] ** 0.5)
        weights[name] = w.astype(getattr(mx, dtype))
    mx.eval(weights)
    return weights


def random_model(config: Dict[str, Any], seed: int = 0, dtype: str = "float32",
                 **rules: Any) -> Tuple[nn.Module, Dict[str, mx.array]]:
    """mlx-lm's model for ``config`` (its ``model_type``) with :func:`random_weights` loaded
    (``rules``: its keyword rules); returns ``(model, weights)``."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = random_weights(model, seed, dtype, **rules)
    model.load_weights(list(weights.items()))
    return model, weights
