"""Active-set choice: which FFN neurons a token needs (pluggable).

A chooser maps a layer's input ``x`` (L tokens × hidden) to the union of
active neuron ids and, when L > 1, a per-token mask over that union.

- :class:`AllNeurons`: every neuron (naive flash, the paper's baseline).
- :class:`Oracle`: the true gated activation ``|act(gate x) * up x|`` computed
  from the full gate/up weights held in memory — an upper bound for tests and
  the speed test, not a product mode (its weights are outside the budget).
- ``predictor.PredictorChooser``: the low-rank predictors (the product mode).
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, Tuple

import mlx.core as mx
import numpy as np

Choice = Tuple[np.ndarray, Optional[np.ndarray]]


class Chooser(Protocol):
    name: str
    resident_bytes: int

    def choose(self, layer: int, x: mx.array) -> Choice:
        """ids (sorted, unique int64) and a (L, len(ids)) bool mask or None (= all active)."""


def activation(name: str):
    """The FFN activation applied to the gate projection."""
    import mlx.nn as nn

    table = {
        "silu": nn.silu,
        "swish": nn.silu,
        "gelu": nn.gelu,
        "gelu_pytorch_tanh": nn.gelu_approx,
        "relu": nn.relu,
        "relu2": lambda g: mx.square(nn.relu(g)),
    }
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unsupported FFN activation {name!r}; supported: {', '.join(table)}") from None


class AllNeurons:
    """Every neuron is active: the naive flash baseline."""

    name = "all"
    resident_bytes = 0

    def __init__(self, n_neurons: int):
        self._ids = np.arange(n_neurons, dtype=np.int64)

    def choose(self, layer: int, x: mx.array) -> Choice:
        return self._ids, None


class Oracle:
    """True activations from the full weights; a neuron is active when its
    gated activation's magnitude passes the layer's threshold, or (without
    thresholds) when it is among the top ``(1 - sparsity)`` of the token.
    """

    name = "oracle"

    def __init__(
        self,
        gate_up: Sequence[Tuple[mx.array, mx.array]],
        sparsity: float,
        act: str = "silu",
        thresholds: Optional[Sequence[float]] = None,
    ):
        self.gate_up = list(gate_up)
        self.sparsity = sparsity
        self.act = activation(act)
        self.thresholds = None if thresholds is None else list(thresholds)
        self.resident_bytes = sum(g.nbytes + u.nbytes for g, u in self.gate_up)

    def scores(self, layer: int, x: mx.array) -> mx.array:
        g, u = self.gate_up[layer]
        return mx.abs(self.act(x @ g.T) * (x @ u.T))

    def choose(self, layer: int, x: mx.array) -> Choice:
        s = np.array(self.scores(layer, x).astype(mx.float32))  # (L, N)
        n = s.shape[1]
        if self.thresholds is not None:
            mask = s > self.thresholds[layer]
        else:
            k = max(1, int(round((1.0 - self.sparsity) * n)))
            if k >= n:
                mask = np.ones_like(s, dtype=bool)
            else:
                kth = np.partition(s, n - k, axis=1)[:, n - k : n - k + 1]
                mask = s >= kth
        any_active = mask.any(axis=0)
        ids = np.flatnonzero(any_active).astype(np.int64)
        if mask.shape[0] == 1:
            return ids, None
        return ids, mask[:, ids]
