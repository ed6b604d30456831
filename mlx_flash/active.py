"""Active-set choice: which FFN neurons a token needs (pluggable).

A chooser maps a layer's input ``x`` (L tokens × hidden) to the union of
active neuron ids and, when L > 1, a per-token mask over that union.

- :class:`AllNeurons`: every neuron (naive flash, the paper's baseline).
- :class:`Oracle`: the true gated activation ``|act(gate x) * up x|`` computed
  from the full gate/up weights held in memory — an upper bound for tests and
  the speed test, not a product mode (its weights are outside the budget). For
  ReLU-family models (relu, relu2, drelu, fatrelu; OPT) it is the exact rule
  ``h != 0``: no threshold, output identical to the dense model's.
- ``predictor.PredictorChooser``: the low-rank predictors.
- ``gate_first.GateFirst``: resident gate rows, ``|act(gate x)|`` above calibrated
  thresholds; the FFN reuses its gate product.

Which chooser runs and why is recorded as an :class:`ActiveChoice` (``Engine.active_info``;
``engine.choose_active`` measures the :class:`ActiveCandidate` s of "auto").
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional, Protocol, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .neuron_cache import CachePolicy

Choice = Tuple[np.ndarray, Optional[np.ndarray]]


class Chooser(Protocol):
    name: str
    resident_bytes: int
    computes_gate: bool  # True: ``gate(layer)`` returns the gate product of the last choice (gate_first.py)

    def choose(self, layer: int, x: mx.array) -> Choice:
        """ids (sorted, unique int64) and a (L, len(ids)) bool mask or None (= all active)."""


RELU_FAMILY = ("relu", "relu2", "drelu", "fatrelu")
"""Activations that are exactly zero outside an active set: for them the active rule
``h != 0`` is exact (no threshold) and skipping inactive neurons changes nothing."""


def is_exact(name: str) -> bool:
    """True for ReLU-family activations (see :data:`RELU_FAMILY`)."""
    return name in RELU_FAMILY


def config_activation(config: dict, default: str = "silu") -> Tuple[str, Optional[float]]:
    """``(name, param)`` of a model config's FFN activation: ``hidden_act`` (llama family),
    ``activation_function`` (OPT) or ``hidden_activation``; ``swish`` → ``silu``;
    ``param`` is ``hidden_act_param`` (FATReLU's threshold) or None."""
    name = config.get("hidden_act") or config.get("activation_function") or config.get("hidden_activation") or default
    if name == "swish":
        name = "silu"
    param = config.get("hidden_act_param")
    return name, (None if param is None else float(param))


def activation(name: str, param: Optional[float] = None):
    """The FFN activation applied to the gate projection (OPT: to fc1).

    ``relu2`` is squared ReLU; ``drelu`` (TurboSparse's dReLU) applies ReLU to the
    gate here and to the up projection too (see :func:`up_activation`);
    ``fatrelu`` (ProSparse) keeps ``g`` where ``g > param`` and zeroes the rest."""
    t = 0.0 if param is None else float(param)
    table = {
        "silu": nn.silu,
        "swish": nn.silu,
        "gelu": nn.gelu,
        "gelu_pytorch_tanh": nn.gelu_approx,
        "gelu_approx": nn.gelu_approx,
        "relu": nn.relu,
        "relu2": lambda g: mx.square(nn.relu(g)),
        "drelu": nn.relu,
        "fatrelu": lambda g: mx.where(g > t, g, mx.zeros_like(g)),
    }
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unsupported FFN activation {name!r}; supported: {', '.join(table)}") from None


def up_activation(name: str):
    """The activation on the up projection: ReLU for ``drelu``, None (identity) otherwise."""
    return nn.relu if name == "drelu" else None


def gated_activation(name: str, param: Optional[float] = None):
    """``f(g, u) -> h``: the FFN's hidden activation from the gate and up projections
    (``u`` None for ungated FFNs such as OPT's): ``act(g) * up_act(u)``."""
    act, up = activation(name, param), up_activation(name)

    def f(g: mx.array, u: Optional[mx.array]) -> mx.array:
        h = act(g)
        if u is not None:
            h = h * (up(u) if up is not None else u)
        return h

    return f


class AllNeurons:
    """Every neuron is active: the naive flash baseline."""

    name = "all"
    resident_bytes = 0
    computes_gate = False

    def __init__(self, n_neurons: int):
        self._ids = np.arange(n_neurons, dtype=np.int64)

    def choose(self, layer: int, x: mx.array) -> Choice:
        return self._ids, None


class Oracle:
    """True activations from the full weights; a neuron is active when its
    gated activation's magnitude passes the layer's threshold, or (without
    thresholds) when it is among the top ``(1 - sparsity)`` of the token.

    ReLU-family activations (:data:`RELU_FAMILY`) use the exact rule ``h != 0``
    unless thresholds are given: ``sparsity`` is ignored, the active set is what
    the model itself activates, and the output equals the dense model's.

    gate_up: per layer ``(gate [n, hidden], up [n, hidden] or None)`` (None: an
        ungated FFN such as OPT's fc1).
    biases: per layer ``(gate_bias [n] or None, up_bias [n] or None)``, optional.
    """

    name = "oracle"
    computes_gate = False

    def __init__(
        self,
        gate_up: Sequence[Tuple[mx.array, Optional[mx.array]]],
        sparsity: float,
        act: str = "silu",
        thresholds: Optional[Sequence[float]] = None,
        *,
        biases: Optional[Sequence[Tuple[Optional[mx.array], Optional[mx.array]]]] = None,
        act_param: Optional[float] = None,
    ):
        self.gate_up = list(gate_up)
        self.biases = list(biases) if biases is not None else [(None, None)] * len(self.gate_up)
        self.sparsity = sparsity
        self.act = activation(act, act_param)
        self.gated = gated_activation(act, act_param)
        self.exact = is_exact(act) and thresholds is None
        if self.exact:
            thresholds = [0.0] * len(self.gate_up)
        self.thresholds = None if thresholds is None else list(thresholds)
        self.resident_bytes = sum(a.nbytes for pair in self.gate_up + self.biases for a in pair if a is not None)

    def scores(self, layer: int, x: mx.array) -> mx.array:
        g, u = self.gate_up[layer]
        bg, bu = self.biases[layer]
        pg = x @ g.T
        if bg is not None:
            pg = pg + bg
        pu = None
        if u is not None:
            pu = x @ u.T
            if bu is not None:
                pu = pu + bu
        return mx.abs(self.gated(pg, pu))

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


@dataclass(frozen=True, kw_only=True)
class ActiveCandidate:
    """One chooser ``engine.choose_active`` measured for "auto": the fraction of neurons it
    reads per token (``density``), its ``recall`` of the oracle's neurons, the ``resident_bytes``
    it holds in memory (predictor weights, gate rows), the bytes of one cached row
    (``row_bytes``; ``read_row_bytes`` when misses read a different file), the calibrated
    ``sparsity`` (gate-first) and the ``quality`` that admitted it, in words; then the per-layer
    cache ``capacity`` left to it, the simulated ``bytes_per_token`` (None: its resident bytes
    alone fill the budget) and the cache ``policy`` it was simulated with."""

    density: float
    recall: float
    resident_bytes: int
    row_bytes: int
    sparsity: Optional[float] = None
    quality: str
    read_row_bytes: Optional[int] = None
    capacity: int = 0
    bytes_per_token: Optional[float] = None
    policy: Optional[CachePolicy] = None

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict (the speed test's JSON records): the unset optional fields left out,
        ``bytes_per_token`` always there (None: it does not fit), ``policy`` as
        ``CachePolicy.to_dict()``."""
        out: Dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None or f.name == "bytes_per_token":
                out[f.name] = v.to_dict() if isinstance(v, CachePolicy) else v
        return out


@dataclass(frozen=True)
class ActiveChoice:
    """The active-neuron chooser a flash engine runs (``name``), what was ``asked``
    (``FlashConfig.active``) and the ``reason`` (``Engine.active_info``); gate-first adds its
    ``sparsity``, "auto" on a calibrated model the measured ``candidates`` by name
    (``engine.choose_active``). ``to_dict`` leaves unset fields out (JSON records)."""

    name: str
    asked: str
    reason: str
    candidates: Optional[Mapping[str, ActiveCandidate]] = None
    sparsity: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        """The set fields as a plain dict, the candidates as :meth:`ActiveCandidate.to_dict`."""
        out: Dict[str, Any] = {"asked": self.asked, "name": self.name, "reason": self.reason}
        if self.candidates is not None:
            out["candidates"] = {k: c.to_dict() for k, c in self.candidates.items()}
        if self.sparsity is not None:
            out["sparsity"] = self.sparsity
        return out
