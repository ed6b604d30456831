"""Gate-first (two-phase) active-neuron choice for gated FFNs (SwiGLU; after CATS and PowerInfer-2).

Every layer's gate rows stay in memory (as stored: float rows, or packed words + scales +
biases in a quantized flash folder) and count against the FFN budget. For a token ``x``
the chooser computes the gate product ``g = gate x (+ gate bias)`` exactly, and a neuron
is active when ``|act(g)|`` passes the layer's calibrated threshold (CATS: the quantile
of the calibration tokens' ``|act(g)|`` for a target sparsity; ReLU-family activations:
``act(g) != 0``, exact). Only the up/down parts of the active neurons are then read from
disk and computed; the sparse FFN reuses ``g`` (:meth:`GateFirst.gate`) instead of
multiplying gate rows again, so the neuron cache keeps no gate rows
(``neuron_cache.RowStore(drop=GATE_SEGMENTS)``).

The rule looks at the gate alone: ``|silu(g)|`` small does not always mean
``|silu(g) * u|`` small, so at equal sparsity it costs more quality than the oracle's
exact ``|h|`` rule (which would need the up rows resident too: two thirds of the FFN).
Calibration measures, per sparsity, the held-out active fraction and FFN output error
(``manifest.predictors["gate_first"]``) and names the sparsity whose error stays within
the oracle's; ``FlashConfig.active = "auto"`` compares it with the predictor by bytes
per token (``engine._make_chooser``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .active import activation, is_exact
from .predictor import CALIBRATE_HINT, PredictorError, load_gate_scales
from .sparse_ffn import ffn_rows
from .storage.format import read_layer_segments, role_quantization

GATE_SEGMENTS = ("gate", "gate.scales", "gate.biases", "gate_bias")
"""Bundle segments (``storage.format.bundle_segments``) that hold a neuron's gate part."""

GATE_SPARSITIES = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
"""Sparsities whose gate thresholds calibration stores (``predictors.gate_first``)."""


class GateFirst:
    """The gate-first chooser (``mlx_flash.active.Chooser``).

    gates: per layer ``{segment: array}``, the gate segments of
        ``storage.format.read_layer_segments`` (``gate`` [+ ``gate.scales``,
        ``gate.biases``] [+ ``gate_bias`` (n, 1)]).
    thresholds: per layer threshold on ``|act(g)|``; None: the exact rule
        ``act(g) != 0`` (ReLU-family activations only).
    quant: ``storage.format.role_quantization(manifest)``; compute_dtype: of quantized rows.
    scales: per layer (n,) per-neuron multipliers of ``|act(g)|`` (one ``(layers, n)`` array or a
        vector per layer; None: 1, plain CATS): the calibrated ``rms(up x) * ||down column||``
        estimate of each neuron's output size, so the rule reads ``|act(g)| * scale > threshold``
        (resident, counted in the budget).
    """

    name = "gate"
    computes_gate = True

    def __init__(self, gates: Sequence[Dict[str, mx.array]], thresholds: Optional[Sequence[float]], *,
                 act: str = "silu", act_param: Optional[float] = None, quant: Optional[dict] = None,
                 compute_dtype: Optional[mx.Dtype] = None, sparsity: Optional[float] = None,
                 density: Optional[float] = None,
                 scales: Optional[Union[np.ndarray, Sequence[np.ndarray]]] = None):
        self.gates = [dict(g) for g in gates]
        if thresholds is None and not is_exact(act):
            raise ValueError(f"gate-first choice for {act!r} needs calibrated thresholds on |{act}(gate x)|")
        if thresholds is not None and len(thresholds) != len(self.gates):
            raise ValueError(f"{len(thresholds)} gate thresholds for {len(self.gates)} layers")
        self.thresholds = None if thresholds is None else [float(t) for t in thresholds]
        self._thr = None if self.thresholds is None else [mx.array(t, dtype=mx.float32) for t in self.thresholds]
        self.act = activation(act, act_param)
        self.quant = {k: v for k, v in (quant or {}).items() if k == "gate"}
        self.cdtype = compute_dtype
        self.sparsity = sparsity
        self.density = density  # calibrated held-out share of neurons chosen (None: unknown)
        if scales is not None and len(scales) != len(self.gates):
            raise ValueError(f"{len(scales)} gate scale vectors for {len(self.gates)} layers")
        self.scales = None if scales is None else [mx.array(np.asarray(v, dtype=np.float32)) for v in scales]
        self.resident_bytes = (sum(a.nbytes for g in self.gates for a in g.values())
                               + sum(v.nbytes for v in self.scales or ()))
        self._last: Dict[int, mx.array] = {}

    def gate_product(self, layer: int, x: mx.array) -> mx.array:
        """``g = x gate^T (+ gate bias)`` (L × n) for the layer input ``x`` (L × hidden), kept
        for :meth:`gate` (the FFN's next call for this layer)."""
        w = self.gates[layer]
        g = ffn_rows(x, w, "gate", True, self.quant, self.cdtype)
        if "gate_bias" in w:
            g = g + w["gate_bias"][:, 0]
        self._last[layer] = g
        return g

    def gate(self, layer: int) -> mx.array:
        """The gate product of the layer's latest :meth:`choose` / :meth:`gate_product`."""
        return self._last[layer]

    def active_mask(self, layer: int, g: mx.array) -> mx.array:
        """(L, n) bool: ``|act(g)| * scale > threshold`` (``act(g) != 0`` for the exact rule)."""
        a = self.act(g)
        if self._thr is None:
            return a != 0
        s = mx.abs(a).astype(mx.float32)
        if self.scales is not None:
            s = s * self.scales[layer]
        return s > self._thr[layer]

    def choose(self, layer: int, x: mx.array) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        m = np.array(self.active_mask(layer, self.gate_product(layer, x.reshape(-1, x.shape[-1]))))
        if m.shape[0] == 1:
            return np.flatnonzero(m[0]).astype(np.int64), None
        ids = np.flatnonzero(m.any(axis=0)).astype(np.int64)
        return ids, m[:, ids]


def gate_info(manifest) -> Optional[dict]:
    """The calibrated gate-first record (``manifest.predictors["gate_first"]``) or None."""
    info = manifest.predictors if isinstance(manifest.predictors, dict) else {}
    rec = info.get("gate_first")
    return rec if isinstance(rec, dict) and rec.get("thresholds") else None


def gate_scale_bytes(rec: Optional[dict], manifest) -> int:
    """Memory of the per-neuron scales a gate-first record asks for (float32, every layer)."""
    if not rec or rec.get("criterion") != "scaled":
        return 0
    return 4 * manifest.num_layers * manifest.intermediate_size


def pick_thresholds(rec: dict, sparsity: Optional[float]) -> Tuple[List[float], float]:
    """The calibrated thresholds for ``sparsity`` (None: the calibrated choice ``rec["sparsity"]``)."""
    want = float(rec["sparsity"] if sparsity is None else sparsity)
    table = {float(k): v for k, v in rec["thresholds"].items()}
    for k, v in table.items():
        if abs(k - want) < 1e-9:
            return [float(t) for t in v], k
    raise ValueError(f"no calibrated gate thresholds for sparsity {want:g}; calibrated: "
                     f"{', '.join(f'{k:g}' for k in sorted(table))}")


def load_gate_chooser(files, config, act: str, act_param: Optional[float],
                      compute_dtype: Optional[mx.Dtype] = None) -> GateFirst:
    """The gate-first chooser of an opened flash folder: each layer's gate segments read
    through ``storage.format.read_layer_segments`` (as stored, quantized or not) and the
    calibrated thresholds (``config.sparsity`` picks a calibrated sparsity)."""
    m = files.manifest
    rec = gate_info(m)
    if rec is None and not is_exact(act):
        raise ValueError(f"{files.root}: gate-first choice needs thresholds on |{act}(gate x)| from a "
                         f"calibration that measured them: {CALIBRATE_HINT}")
    thresholds, sparsity = (None, None) if rec is None else pick_thresholds(rec, config.sparsity)
    held = ((rec or {}).get("held_out") or {}).get(str(float(sparsity))) if sparsity is not None else None
    scales = None
    if rec is not None and rec.get("criterion") == "scaled":
        scales = load_gate_scales(files)
        if scales is None:
            raise PredictorError(f"{files.root}: the gate-first record asks for per-neuron scales but the "
                                 f"predictor file has none: {CALIBRATE_HINT} again")
    gates = []
    for i in range(m.num_layers):
        seg = read_layer_segments(files, i)
        gates.append({k: v for k, v in seg.items() if k in GATE_SEGMENTS})
        del seg
    mx.eval([a for g in gates for a in g.values()])
    return GateFirst(gates, thresholds, act=act, act_param=act_param, quant=role_quantization(m),
                     compute_dtype=compute_dtype, sparsity=sparsity,
                     density=float(held["active_fraction"]) if held else None, scales=scales)


__all__ = ["GATE_SEGMENTS", "GATE_SPARSITIES", "GateFirst", "gate_info", "gate_scale_bytes", "load_gate_chooser",
           "pick_thresholds"]
