"""Low-rank activation predictors ("LLM in a Flash" §3.1, after Deja Vu).

For each layer a small network guesses which FFN neurons a token activates from
the layer's FFN input ``x`` (the output of ``post_attention_layernorm``)::

    p(active) = sigmoid(B · (A · x) + b)      A: hidden × r, B: r × n, b: n

A neuron counts as *active* (the label, see :mod:`mlx_flash.calibrate`) when its
gated activation ``|act(gate x) * (up x)|`` passes the layer's threshold (the
calibration data's quantile for the target sparsity; ``h != 0`` for ReLU-family
models). The logit is fitted to ``log(|h| / threshold)`` (reduced-rank ridge
regression; optionally refined by Adam on a weighted BCE), so it is positive where
the neuron is predicted active and the largest activations rank first. At
inference a neuron is chosen when its probability passes the layer's *cutoff*,
picked on held-out calibration tokens so that a target fraction of the truly
active neurons is found (the recall: 0.9 … 0.999). Since ``sigmoid`` is monotone
the chooser compares logits: ``(x A) B > logit(c) - b``.

On disk: ``predictors.safetensors`` in the flash folder —
``layers.{i}.A`` (hidden, r), ``layers.{i}.B`` (r, n), ``layers.{i}.b`` (n,) in the
stored dtype (float16 by default), ``frequencies`` (num_layers, n) float32 (how
often each neuron is active on the calibration text: the hot-neuron cache policy
uses it), ``gate_scales`` (num_layers, n) float32 (gate-first's per-neuron scales,
``gate_first.py``; absent in older files), and safetensors metadata ``format``/``version``/``id``. The manifest's
``predictors`` field describes them (rank, sparsity, thresholds, cutoffs per
recall target, training loss, held-out recall/precision, bytes, calibration
source, created, and the same ``id``: a predictor file that does not belong to
the manifest is refused).

In memory (``load_predictor_chooser``) A and B are quantized at load (``mx.quantize``,
``FlashConfig.predictor_bits`` bits, groups of ``PREDICTOR_GROUP_SIZE`` or 32 along the input side: hidden for A,
the rank for B, so each neuron has its own groups; B of a rank below 32 stays float;
scales and biases in :func:`mlx_flash.quantized.compute_dtype`, float32 on the CPU;
``FlashConfig.predictor_bits``: 0 keeps the stored floats). The file keeps the
stored floats (calibration, its cutoffs and held-out figures use those); the chooser's
``resident_bytes`` are the quantized arrays' bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .atomic import atomic_path
from .config import FlashConfig
from .quantized import compute_dtype, qmatmul

PREDICTOR_FILE = "predictors.safetensors"
FILE_FORMAT = "mlx-flash-predictors"
FILE_VERSION = 1
DEFAULT_RANK = 32
DEFAULT_RECALL = 0.99
PREDICTOR_GROUP_SIZE = 64
RECALL_TARGETS = (0.9, 0.95, 0.99, 0.995, 0.999)
"""Recall targets whose cutoffs calibration stores; the chooser picks one (``FlashConfig.extra["recall"]``)."""

CALIBRATE_HINT = "run `mlx-flash calibrate MODEL.flash` to train them"


class PredictorError(ValueError):
    """Predictors are missing, or do not fit the model (the message says which layer and shapes)."""


# --------------------------------------------------------------------------- weights
def quantized_group(K: int, group_size: int = PREDICTOR_GROUP_SIZE) -> Optional[int]:
    """The group along an input side of ``K``: ``group_size``, else 32 when it divides ``K``; None: stays float."""
    return next((g for g in (group_size, 32) if K % g == 0), None)


@dataclass
class QuantizedMatrix:
    """A matrix ``W`` (K × N) quantized for ``x @ W`` as ``nn.QuantizedLinear`` stores one: ``W.T``
    (N × K) in groups along the input side K, so every output column (for B: every neuron) has its
    own groups and a permutation of the neurons (``neuron_order``) permutes the quantized
    predictor exactly."""

    w: mx.array
    scales: mx.array
    biases: mx.array
    shape: Tuple[int, int]
    bits: int
    group_size: int

    @classmethod
    def of(cls, W: mx.array, bits: int, group_size: int, dtype: mx.Dtype) -> Optional["QuantizedMatrix"]:
        """``W`` quantized with scales in ``dtype``, or None when K divides into no group."""
        K, N = (int(d) for d in W.shape)
        g = quantized_group(K, group_size)
        if g is None:
            return None
        w, scales, biases = mx.quantize(W.T.astype(dtype), group_size=g, bits=bits)
        mx.eval(w, scales, biases)
        return cls(w, scales, biases, (K, N), bits, g)

    @property
    def dtype(self) -> mx.Dtype:
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.scales.nbytes + self.biases.nbytes

    def matmul(self, x: mx.array) -> mx.array:
        """``x @ W`` in the scales' dtype (``mx.quantized_matmul``; on the CPU batches dequantize first)."""
        return qmatmul(x.astype(self.scales.dtype), self.w, self.scales, self.biases, transpose=True,
                       group_size=self.group_size, bits=self.bits)


Matrix = Union[mx.array, QuantizedMatrix]


def _matmul(x: mx.array, W: Matrix) -> mx.array:
    return W.matmul(x) if isinstance(W, QuantizedMatrix) else x.astype(W.dtype) @ W


@dataclass
class PredictorWeights:
    """Per-layer low-rank predictor weights (mx arrays in the stored dtype, or A and B
    quantized: :meth:`quantize`)."""

    A: List[Matrix]  # (hidden, r)
    B: List[Matrix]  # (r, n)
    b: List[mx.array]  # (n,)
    frequencies: Optional[np.ndarray] = None  # (num_layers, n) float32
    gate_scales: Optional[np.ndarray] = None  # (num_layers, n) float32: gate-first's per-neuron scales

    @property
    def num_layers(self) -> int:
        return len(self.A)

    @property
    def rank(self) -> int:
        return int(self.A[0].shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.A[0].shape[0])

    @property
    def n_neurons(self) -> int:
        return int(self.B[0].shape[1])

    @property
    def dtype(self) -> mx.Dtype:
        return self.A[0].dtype

    @property
    def nbytes(self) -> int:
        """Bytes the predictors occupy in memory (A, B, b; quantized: packed weights, scales and
        biases; frequencies excluded)."""
        return sum(a.nbytes + b_.nbytes + c.nbytes for a, b_, c in zip(self.A, self.B, self.b))

    @property
    def quantized(self) -> bool:
        return any(isinstance(m, QuantizedMatrix) for m in self.A + self.B)

    def project(self, layer: int, x: mx.array) -> mx.array:
        """``(x A) B`` (L × n, float32) for the layer input ``x`` (L × hidden): the logits without ``b``."""
        return _matmul(_matmul(x, self.A[layer]), self.B[layer]).astype(mx.float32)

    def logits(self, layer: int, x: mx.array) -> mx.array:
        """Logits ``(x A) B + b`` (L × n, float32) for the layer input ``x`` (L × hidden).

        This is the one function calibration (choosing cutoffs) and inference both use."""
        return self.project(layer, x) + self.b[layer].astype(mx.float32)

    def quantize(self, bits: int, group_size: int = PREDICTOR_GROUP_SIZE,
                 dtype: Optional[mx.Dtype] = None) -> "PredictorWeights":
        """A and B quantized (``bits``, groups of ``group_size`` or 32 along their input side; scales in
        ``dtype``, default :func:`~mlx_flash.quantized.compute_dtype` of the stored dtype); a matrix
        whose input side divides into no group (B of a rank below 32) stays as it is; ``b`` and the
        frequencies are shared."""
        if self.quantized:
            raise PredictorError("the predictors are already quantized")
        dt = dtype or compute_dtype(self.dtype)

        def q(W: Matrix) -> Matrix:
            assert isinstance(W, mx.array)
            return QuantizedMatrix.of(W, bits, group_size, dt) or W

        return PredictorWeights([q(a) for a in self.A], [q(b_) for b_ in self.B], list(self.b), self.frequencies,
                                self.gate_scales)

    @classmethod
    def from_stacked(cls, A: mx.array, B: mx.array, b: mx.array, dtype: mx.Dtype = mx.float16,
                     frequencies: Optional[np.ndarray] = None) -> "PredictorWeights":
        """From training's stacked arrays (L, hidden, r), (L, r, n), (L, n)."""
        As = [A[i].astype(dtype) for i in range(A.shape[0])]
        Bs = [B[i].astype(dtype) for i in range(B.shape[0])]
        bs = [b[i].astype(dtype) for i in range(b.shape[0])]
        mx.eval(As, Bs, bs)
        return cls(As, Bs, bs, frequencies)


def quantized_bytes(num_layers: int, hidden_size: int, n_neurons: int, rank: int, stored: mx.Dtype,
                    bits: int, group_size: int = PREDICTOR_GROUP_SIZE) -> int:
    """What :meth:`PredictorWeights.quantize` plus the chooser's per-layer limits occupy (bytes), from
    the shapes alone (``engine.choose_active`` weighs the predictors' memory before loading them)."""
    scale = compute_dtype(stored).size

    def mat(K: int, N: int) -> int:
        g = quantized_group(K, group_size)
        if bits <= 0 or g is None:
            return K * N * stored.size
        return K * N * bits // 8 + 2 * K * N // g * scale

    return num_layers * (mat(hidden_size, rank) + mat(rank, n_neurons) + n_neurons * (stored.size + 4))


def save_predictors(path: Union[str, Path], weights: PredictorWeights, *, file_id: str,
                    extra_metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``weights`` to ``path`` atomically (temp file in the same folder + rename)."""
    if weights.quantized:
        raise PredictorError("quantized predictors are an in-memory form: save the stored floats")
    path = Path(path)
    arrays: Dict[str, mx.array] = {}
    for i in range(weights.num_layers):
        arrays[f"layers.{i}.A"] = weights.A[i]
        arrays[f"layers.{i}.B"] = weights.B[i]
        arrays[f"layers.{i}.b"] = weights.b[i]
    if weights.frequencies is not None:
        arrays["frequencies"] = mx.array(np.asarray(weights.frequencies, dtype=np.float32))
    if weights.gate_scales is not None:
        arrays["gate_scales"] = mx.array(np.asarray(weights.gate_scales, dtype=np.float32))
    meta = {"format": FILE_FORMAT, "version": str(FILE_VERSION), "id": file_id,
            "num_layers": str(weights.num_layers), "rank": str(weights.rank)}
    meta.update(extra_metadata or {})

    with atomic_path(path, suffix=".tmp.safetensors") as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata=meta)
    return path


def load_predictors(path: Union[str, Path], *, num_layers: int, hidden_size: int, n_neurons: int,
                    file_id: Optional[str] = None, rank: Optional[int] = None) -> PredictorWeights:
    """Read and check ``predictors.safetensors`` against the model's shapes.

    Raises :class:`PredictorError` when the file is missing, unreadable, from another
    calibration (``file_id``), or any layer's arrays have the wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise PredictorError(f"{path}: {PREDICTOR_FILE} is missing: this model has no activation predictors; "
                             f"{CALIBRATE_HINT}")
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError on bad files
        raise PredictorError(f"{path}: cannot read {PREDICTOR_FILE} ({e}); {CALIBRATE_HINT} again") from None
    if meta.get("format") != FILE_FORMAT:
        raise PredictorError(f"{path}: not an mlx-flash predictor file (metadata format={meta.get('format')!r}); "
                             f"{CALIBRATE_HINT}")
    if file_id is not None and meta.get("id") != file_id:
        raise PredictorError(f"{path}: {PREDICTOR_FILE} (id {meta.get('id')}) does not belong to manifest.json's "
                             f"predictors (id {file_id}): an interrupted or foreign calibration; "
                             f"{CALIBRATE_HINT} again")
    found = sorted({int(k.split(".")[1]) for k in arrays if k.startswith("layers.")})
    if len(found) != num_layers or found != list(range(len(found))):
        raise PredictorError(f"{path}: predictors for {len(found)} layers, the model has {num_layers} layers; "
                             f"{CALIBRATE_HINT} again")
    A, B, b = [], [], []
    r = rank
    for i in range(num_layers):
        try:
            a_, b2, c_ = arrays[f"layers.{i}.A"], arrays[f"layers.{i}.B"], arrays[f"layers.{i}.b"]
        except KeyError as k:
            raise PredictorError(f"{path}: layer {i}: array {k.args[0]} is missing; {CALIBRATE_HINT} again") from None
        if r is None:
            r = int(a_.shape[1]) if a_.ndim == 2 else -1
        want = {"A": (hidden_size, r), "B": (r, n_neurons), "b": (n_neurons,)}
        for name, arr in (("A", a_), ("B", b2), ("b", c_)):
            if tuple(arr.shape) != want[name]:
                raise PredictorError(
                    f"{path}: layer {i}: predictor {name} has shape {tuple(arr.shape)}, expected {want[name]} "
                    f"(hidden_size {hidden_size}, intermediate_size {n_neurons}, rank {r}); {CALIBRATE_HINT} again")
            if not mx.issubdtype(arr.dtype, mx.floating):
                raise PredictorError(f"{path}: layer {i}: predictor {name} has dtype {arr.dtype}, expected floats")
        A.append(a_)
        B.append(b2)
        b.append(c_)
    def per_neuron(name: str) -> Optional[np.ndarray]:
        """An optional (layers, neurons) array of the file (frequencies, gate scales), as float32."""
        arr = arrays.get(name)
        if arr is None:
            return None
        if tuple(arr.shape) != (num_layers, n_neurons):
            raise PredictorError(f"{path}: {name} has shape {tuple(arr.shape)}, expected {(num_layers, n_neurons)}")
        out = np.array(arr.astype(mx.float32))
        if not np.isfinite(out).all() or (out < 0).any():  # frequencies and gate scales are never negative
            raise PredictorError(f"{path}: {name} holds negative or non-finite values; {CALIBRATE_HINT} again")
        return out

    freq, scales = per_neuron("frequencies"), per_neuron("gate_scales")
    mx.eval(A, B, b)
    for i, arrs in enumerate(zip(A, B, b)):  # a NaN would choose no neuron (or every one) without a word
        if not all(mx.all(mx.isfinite(a)).item() for a in arrs):
            raise PredictorError(f"{path}: layer {i}: the predictor holds non-finite values; {CALIBRATE_HINT} again")
    return PredictorWeights(A, B, b, freq, scales)


# --------------------------------------------------------------------------- chooser
def prob_to_logit(p: float) -> float:
    """log(p / (1 - p)), exact for tiny probabilities (cutoffs for high recall can be ~1e-10)."""
    p = float(p)
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


def logit_to_prob(z: float) -> float:
    z = float(z)
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class PredictorChooser:
    """The active-set chooser of the flash engine (``mlx_flash.active.Chooser``).

    A neuron is chosen for a token when ``sigmoid((x A) B + b)`` passes the layer's
    cutoff. ``resident_bytes`` is the predictors' memory (the engine takes it out
    of the FFN cache budget).
    """

    name = "predictor"
    computes_gate = False

    def __init__(self, weights: PredictorWeights, cutoffs: Sequence[float], *, recall: Optional[float] = None,
                 info: Optional[Dict[str, Any]] = None):
        if len(cutoffs) != weights.num_layers:
            raise PredictorError(f"{len(cutoffs)} cutoffs for {weights.num_layers} predictor layers")
        self.weights = weights
        self.cutoffs = [float(c) for c in cutoffs]  # probabilities
        self.recall = recall
        self.info = dict(info or {})
        self.sparsity = self.info.get("sparsity")
        # compare (x A) B against logit(cutoff) - b: one matmul pair and one comparison per layer
        self._limits = [(mx.array(prob_to_logit(c), dtype=mx.float32) - b.astype(mx.float32))
                        for c, b in zip(self.cutoffs, weights.b)]
        mx.eval(self._limits)
        self.resident_bytes = weights.nbytes + sum(v.nbytes for v in self._limits)

    @property
    def frequencies(self) -> Optional[np.ndarray]:
        return self.weights.frequencies

    def predict(self, layer: int, x: mx.array) -> mx.array:
        """(L, n) bool mx array: the neurons each token of ``x`` (L × hidden) is predicted to use."""
        return self.weights.project(layer, x) > self._limits[layer]

    def choose(self, layer: int, x: mx.array) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        return self.choice(self.predict(layer, x.reshape(-1, x.shape[-1])))

    @staticmethod
    def choice(predicted: mx.array) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """:meth:`choose`'s ids and mask from a :meth:`predict` mask (evaluated here; pipelined layers
        start a lookahead's prediction early, ``mx.async_eval``, and take its choice later)."""
        m = np.array(predicted)
        if m.shape[0] == 1:
            return np.flatnonzero(m[0]).astype(np.int64), None
        ids = np.flatnonzero(m.any(axis=0)).astype(np.int64)
        return ids, m[:, ids]


def predictor_info(manifest) -> Optional[Dict[str, Any]]:
    """The manifest's ``predictors`` field, or None."""
    info = manifest.predictors
    return info if isinstance(info, dict) and info else None


def has_predictors(files) -> bool:
    """True when the flash folder's manifest records predictors and their file exists."""
    info = predictor_info(files.manifest)
    return info is not None and (Path(files.root) / info.get("file", PREDICTOR_FILE)).is_file()


def _pick_cutoffs(info: Dict[str, Any], recall: Optional[float], where: str) -> Tuple[List[float], float]:
    cutoffs = info.get("cutoffs")
    if not isinstance(cutoffs, dict) or not cutoffs:
        raise PredictorError(f"{where}: manifest field 'predictors.cutoffs' is missing; {CALIBRATE_HINT} again")
    want = float(recall if recall is not None else info.get("recall", DEFAULT_RECALL))
    keys = {float(k): k for k in cutoffs}
    if want not in keys:
        raise PredictorError(f"{where}: no cutoffs for recall {want}; calibrated recall targets: "
                             f"{', '.join(sorted(cutoffs, key=float))}")
    return [float(c) for c in cutoffs[keys[want]]], want


def load_predictor_chooser(files, config=None) -> PredictorChooser:
    """The predictor chooser of an opened flash folder (``storage.format.FlashFiles``).

    ``config.extra["recall"]`` picks a calibrated recall target (default: the one
    calibration chose), ``config.predictor_bits`` the in-memory bits of A and B
    (default 4; 0 keeps the stored floats). Raises :class:`PredictorError`
    when predictors are missing or do not match the model.
    """
    m = files.manifest
    root = Path(files.root)
    where = str(root / "manifest.json")
    info = predictor_info(m)
    if info is None:
        raise PredictorError(f"{root}: this model has no activation predictors (manifest field 'predictors' is "
                             f"empty); {CALIBRATE_HINT}")
    path = root / str(info.get("file", PREDICTOR_FILE))
    weights = load_predictors(path, num_layers=m.num_layers, hidden_size=m.hidden_size,
                              n_neurons=m.intermediate_size, file_id=info.get("id"), rank=info.get("rank"))
    recall = None
    if config is not None:
        recall = (config.extra or {}).get("recall")
    bits = predictor_bits(config)
    if bits:
        weights = weights.quantize(bits)
    cutoffs, recall = _pick_cutoffs(info, recall, where)
    if len(cutoffs) != m.num_layers:
        raise PredictorError(f"{where}: 'predictors.cutoffs' has {len(cutoffs)} entries, the model has "
                             f"{m.num_layers} layers; {CALIBRATE_HINT} again")
    return PredictorChooser(weights, cutoffs, recall=recall, info=info)


def predictor_bits(config=None) -> int:
    """The in-memory bits of the predictors' A and B (``FlashConfig.predictor_bits``; 0: stored floats)."""
    return (config if config is not None else FlashConfig()).predictor_bits


def predictor_resident_bytes(manifest, config=None) -> int:
    """The loaded predictor chooser's ``resident_bytes`` from the manifest alone (0 without predictors)."""
    info = predictor_info(manifest)
    if info is None:
        return 0
    return quantized_bytes(manifest.num_layers, manifest.hidden_size, manifest.intermediate_size,
                           int(info.get("rank", DEFAULT_RANK)), getattr(mx, str(info.get("dtype", "float16"))),
                           predictor_bits(config))


def load_frequencies(files) -> Optional[np.ndarray]:
    """The calibrated per-neuron activation frequencies ``(num_layers, n)`` float32 of an
    opened flash folder (what the hot-neuron cache policies pin by), or None when the
    model has no predictors or its calibration kept no frequencies. Raises
    :class:`PredictorError` when the predictor file is there but broken."""
    if not has_predictors(files):
        return None
    m = files.manifest
    info = predictor_info(m) or {}
    path = Path(files.root) / str(info.get("file", PREDICTOR_FILE))
    weights = load_predictors(path, num_layers=m.num_layers, hidden_size=m.hidden_size,
                              n_neurons=m.intermediate_size, file_id=info.get("id"), rank=info.get("rank"))
    return weights.frequencies


def load_gate_scales(files) -> Optional[np.ndarray]:
    """Gate-first's calibrated per-neuron scales ``(num_layers, n)`` float32 (``gate_first.py``),
    or None when the model has no predictors or an older calibration stored none."""
    m = files.manifest
    info = predictor_info(m)
    if info is None or not has_predictors(files):
        return None
    path = Path(files.root) / str(info.get("file", PREDICTOR_FILE))
    weights = load_predictors(path, num_layers=m.num_layers, hidden_size=m.hidden_size,
                              n_neurons=m.intermediate_size, file_id=info.get("id"), rank=info.get("rank"))
    return weights.gate_scales


__all__ = [
    "CALIBRATE_HINT",
    "DEFAULT_RANK",
    "DEFAULT_RECALL",
    "PREDICTOR_FILE",
    "PREDICTOR_GROUP_SIZE",
    "PredictorChooser",
    "PredictorError",
    "PredictorWeights",
    "QuantizedMatrix",
    "quantized_group",
    "RECALL_TARGETS",
    "has_predictors",
    "load_frequencies",
    "load_gate_scales",
    "load_predictor_chooser",
    "load_predictors",
    "predictor_bits",
    "predictor_info",
    "predictor_resident_bytes",
    "quantized_bytes",
    "save_predictors",
]
