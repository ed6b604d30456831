"""The on-disk flash model layout: the one module that knows where bytes live.

A flash model is a folder::

    model.flash/
      manifest.json      format_version, architecture, model_args (the config.json dict), dtype,
                         num_layers, hidden_size, intermediate_size, bundle_parts, bundle_elems,
                         bundle_bytes, alignment, ffn_file, ffn_size, layers [{offset, size, checksum}],
                         dense_file, source, predictors, created, dense_quantization, neuron_order
                         (each layer's permutation of neurons on disk, see ``neuron_perms``; absent:
                         the source model's order), manifest_checksum (blake2b of the rest, see
                         ``MANIFEST_CHECKSUM``; absent in older folders)
      dense.safetensors  every non-FFN weight (attention, embeddings, norms, lm_head), mlx-lm key names
      ffn.bin            per layer, per neuron i:
                         [gate_proj.weight[i, :] | up_proj.weight[i, :] | down_proj.weight[:, i]]
                         contiguous ("row-column bundling": one read fetches one neuron). Models with FFN
                         biases add each neuron's own bias elements to its bundle (``bundle_parts``: llama
                         with mlp_bias ["gate", "gate_bias", "up", "up_bias", "down"], OPT ["fc1",
                         "fc1_bias", "fc2"]); the output projection's bias is one vector per layer and
                         stays in dense.safetensors (see ``ARCHITECTURES``, ``bundle_layout``). Each layer region
                         starts at a multiple of ``alignment`` (4096); padding is zeros; the file is padded
                         to a multiple of ``alignment`` too, so aligned direct reads never run past its end.
      config.json, tokenizer.json, tokenizer_config.json, ...   copied unchanged from the source

Nobody else computes an offset into ``ffn.bin``: use :meth:`Manifest.neuron_offset`,
:meth:`Manifest.layer_range`, :func:`read_layer_weights` or :class:`mlx_flash.storage.reader.FlashReader`.

Quantized sources (mlx-lm folders whose weights have ``.scales``): FFN weights are
dequantized with ``mx.dequantize`` (bits and group size are inferred from the
tensor shapes, ``mode`` comes from ``config["quantization"]``) into the scales'
dtype or the requested ``dtype``; the dense part stays quantized (its
``.scales``/``.biases`` are kept, ``model_args["quantization"]`` stays, and
``Manifest.dense_quantization`` repeats it) unless ``dequantize_dense=True``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, MutableMapping, Optional, Set, Tuple, Union

import mlx.core as mx
import numpy as np

from ..atomic import FolderBuild, atomic_path, atomic_write_text, fsync_dir
from ..families import BY_MODEL_TYPE, BY_WRAPPER, WRAPPED_CONFIG, WRAPPED_PREFIX, supported_text
from ..progress import ProgressCallback, report, scaled
from .platform_io import aligned_buffer, drop_page_cache, open_uncached, pread_exact, set_nocache

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
"""Version 2 adds ``quantization`` (quantized bundles); version 1 folders (float bundles) read unchanged.
Version 3 adds the exact down layout (``quantization.down.axis == "ffn"``, see :data:`GROUPS_ALONG_FFN`);
only folders that use it are written as version 3 (:func:`format_version_for`), the others stay 2."""
ALIGNMENT = 4096
MANIFEST_FILE = "manifest.json"
FFN_FILE = "ffn.bin"
DENSE_FILE = "dense.safetensors"

DTYPE_SIZES: Dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}
"""Stored dtypes of FFN bundles and their element sizes in bytes."""

_NP_STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


@dataclass(frozen=True)
class BundlePart:
    """One piece of a neuron's bundle.

    name:   as listed in the manifest's ``bundle_parts``.
    tensor: the source tensor, relative to ``<layers>.N.`` (e.g. ``mlp.gate_proj.weight``).
    kind:   ``"row"`` (row i of an (intermediate, hidden) weight: hidden elements),
            ``"col"`` (column i of a (hidden, intermediate) weight: hidden elements) or
            ``"bias"`` (element i of an (intermediate,) bias: one element).
    role:   what the FFN does with it: ``gate`` (the activation's input; OPT's fc1),
            ``gate_bias``, ``up``, ``up_bias`` or ``down`` (the output projection; OPT's fc2).
    """

    name: str
    tensor: str
    kind: str
    role: str

    def elems(self, hidden: int) -> int:
        return 1 if self.kind == "bias" else hidden


BUNDLE_PARTS: Dict[str, BundlePart] = {p.name: p for p in (
    BundlePart("gate", "mlp.gate_proj.weight", "row", "gate"),
    BundlePart("gate_bias", "mlp.gate_proj.bias", "bias", "gate_bias"),
    BundlePart("up", "mlp.up_proj.weight", "row", "up"),
    BundlePart("up_bias", "mlp.up_proj.bias", "bias", "up_bias"),
    BundlePart("down", "mlp.down_proj.weight", "col", "down"),
    BundlePart("fc1", "fc1.weight", "row", "gate"),
    BundlePart("fc1_bias", "fc1.bias", "bias", "gate_bias"),
    BundlePart("fc2", "fc2.weight", "col", "down"),
)}
"""Every bundle part any architecture uses, by manifest name."""


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture lays out its FFN.

    ffn_modules:  FFN module paths relative to ``<layers>.N.``: their tensors are FFN tensors.
    bundle_parts: the bundle, in order, for a model without FFN biases.
    biased_parts: the bundle when ``bias_flag`` (a config.json key, default ``bias_default``)
                  turns FFN biases on; the output projection's bias (``dense_biases``) is one
                  vector per layer, not per neuron, and stays in ``dense.safetensors``.
    layer_prefix: where layers live in the model's (canonical) key names.
    intermediate_key: config.json's name for the number of FFN neurons.
    """

    ffn_modules: Tuple[str, ...]
    bundle_parts: Tuple[str, ...] = ("gate", "up", "down")
    biased_parts: Tuple[str, ...] = ("gate", "gate_bias", "up", "up_bias", "down")
    bias_flag: str = "mlp_bias"
    bias_default: bool = False
    dense_biases: Tuple[str, ...] = ("mlp.down_proj.bias",)
    layer_prefix: str = "model.layers"
    intermediate_key: str = "intermediate_size"

    def has_biases(self, config: Mapping[str, Any]) -> bool:
        v = config.get(self.bias_flag)
        return self.bias_default if v is None else bool(v)

    def parts(self, config: Mapping[str, Any]) -> Tuple[BundlePart, ...]:
        """The bundle parts, in order, of a model with this ``config``."""
        names = self.biased_parts if self.has_biases(config) else self.bundle_parts
        return tuple(BUNDLE_PARTS[n] for n in names)


_FFN_LAYOUTS: Dict[str, ArchSpec] = {
    "gated": ArchSpec(("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    # bundle: fc1 row i | fc1 bias i | fc2 column i; fc2's bias is dense
    "opt": ArchSpec(("fc1", "fc2"), bundle_parts=("fc1", "fc2"), biased_parts=("fc1", "fc1_bias", "fc2"),
                    bias_flag="enable_bias", bias_default=True, dense_biases=("fc2.bias",),
                    layer_prefix="model.decoder.layers", intermediate_key="ffn_dim"),
}
ARCHITECTURES: Dict[str, ArchSpec] = {mt: _FFN_LAYOUTS[f.ffn] for mt, f in BY_MODEL_TYPE.items()}
"""config.json ``model_type`` -> FFN layout. The keys are the supported architectures."""

# Files of a source folder never copied into a flash folder (weights, indexes, our own names).
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz", ".h5", ".msgpack", ".ckpt", ".onnx"}
_OWN_FILES = {MANIFEST_FILE, FFN_FILE, DENSE_FILE}

_LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<layer>\d+)\.(?P<rest>.+)$")


class FlashFormatError(ValueError):
    """A flash folder (or a conversion source) does not match the format.

    The message names the file and the field or tensor that is wrong."""


class ChecksumError(FlashFormatError):
    """A file of a flash folder does not match the blake2b checksum its manifest records:
    the file is corrupt or was modified. The message names the file (and the layer of
    ``ffn.bin``). Never compute with such weights."""


# --------------------------------------------------------------------------- manifest
@dataclass
class LayerEntry:
    """Where one layer's FFN bundles live in ``ffn.bin``.

    offset:   byte offset of neuron 0's bundle (a multiple of the alignment).
    size:     bytes of the layer region, ``intermediate_size * bundle_bytes`` (no padding).
    checksum: ``hashlib.blake2b`` (default 64-byte digest) of those ``size`` bytes, hex.
    """

    offset: int
    size: int
    checksum: str


@dataclass
class Manifest:
    """Contents of ``manifest.json``. See the module docstring for the layout."""

    architecture: str
    model_args: Dict[str, Any]
    dtype: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    bundle_parts: List[str]
    bundle_elems: int
    bundle_bytes: int
    layers: List[LayerEntry]
    ffn_size: int
    alignment: int = ALIGNMENT
    ffn_file: str = FFN_FILE
    dense_file: str = DENSE_FILE
    source: str = ""
    predictors: Optional[Dict[str, Any]] = None
    created: str = ""
    dense_quantization: Optional[Dict[str, Any]] = None
    checksums: Dict[str, str] = field(default_factory=dict)
    """blake2b (hex) of whole side files by name: ``dense.safetensors`` (written by
    :func:`write_flash`), ``predictors.safetensors`` (written by calibration). Older
    manifests have none: those files are then not checked."""
    quantization: Optional[Dict[str, Any]] = None
    """Version 2: per weight part of the bundle (``gate``, ``up``, ``down``, ``fc1``, ``fc2``)
    ``{"bits", "group_size", "mode": "affine"}`` or ``"none"`` (float); None: float bundles."""
    format_version: int = FORMAT_VERSION
    neuron_order: Optional[Dict[str, Any]] = None
    """The permutation of each layer's neurons on disk (``mlx_flash.neuron_order``): None when
    they are in the source model's order; else ``{"version", "method", "dtype", "layers"}``,
    ``layers[l]`` the base64 of ``perm`` (``dtype``, little endian): ``ffn.bin`` position ``p``
    of layer ``l`` holds source neuron ``perm[p]`` (:func:`neuron_perms`). Everything indexed
    by neuron in the folder (bundles, predictors' outputs, frequencies) is in this order."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Unknown manifest fields, kept so that load → save round-trips them."""

    # ---- derived quantities
    @property
    def ffn_bytes_total(self) -> int:
        """FFN bytes of all layers, padding excluded (what "the model's FFN" weighs): the bundles,
        plus the exact down layout's resident group scales (:func:`group_quant_bytes`)."""
        return sum(e.size for e in self.layers) + group_quant_bytes(self)

    @property
    def itemsize(self) -> int:
        """Bytes per element of the stored dtype."""
        return DTYPE_SIZES[self.dtype]

    @property
    def quantized(self) -> bool:
        """Whether any bundle part is stored quantized (format version 2)."""
        return any(isinstance(v, Mapping) for v in (self.quantization or {}).values())

    def layer_range(self, layer: int) -> Tuple[int, int]:
        """``(offset, size)`` of ``layer``'s region in ``ffn.bin``."""
        self._check_layer(layer)
        e = self.layers[layer]
        return e.offset, e.size

    def neuron_offset(self, layer: int, neuron: int) -> int:
        """Byte offset in ``ffn.bin`` of neuron ``neuron``'s bundle in ``layer``."""
        self._check_layer(layer)
        if not 0 <= neuron < self.intermediate_size:
            raise IndexError(f"neuron {neuron} out of range: layers have {self.intermediate_size} neurons")
        return self.layers[layer].offset + neuron * self.bundle_bytes

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < len(self.layers):
            raise IndexError(f"layer {layer} out of range: the model has {len(self.layers)} layers")

    # ---- (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d.update({k: v for k, v in extra.items() if k not in d and k != MANIFEST_CHECKSUM})
        return d

    def to_json(self) -> str:
        """The manifest as JSON text (what ``manifest.json`` holds), signed (:data:`MANIFEST_CHECKSUM`)."""
        return json.dumps(signed(self.to_dict()), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = MANIFEST_FILE) -> "Manifest":
        """Build from a parsed manifest; missing or mistyped fields raise
        :class:`FlashFormatError` naming ``where`` and the field."""
        if not isinstance(d, Mapping):
            raise FlashFormatError(f"{where}: expected a JSON object, got {type(d).__name__}")
        check_signed(d, where)
        known = {f.name for f in fields(cls)} - {"extra"}
        required: Dict[str, Union[type, Tuple[type, ...]]] = {
            "format_version": int, "architecture": str, "model_args": dict, "dtype": str,
            "num_layers": int, "hidden_size": int, "intermediate_size": int, "bundle_parts": list,
            "bundle_elems": int, "bundle_bytes": int, "layers": list, "ffn_size": int,
        }
        optional: Dict[str, Union[type, Tuple[type, ...]]] = {
            "alignment": int, "ffn_file": str, "dense_file": str, "source": str, "created": str,
            "predictors": (dict, type(None)), "dense_quantization": (dict, type(None)),
            "checksums": dict, "quantization": (dict, type(None)),
            "neuron_order": (dict, type(None)),
        }
        kw = typed_fields(d, required, optional, where)
        layers = []
        for i, e in enumerate(kw["layers"]):
            if not isinstance(e, Mapping):
                raise FlashFormatError(f"{where}: field 'layers[{i}]' is not an object")
            try:
                off, size, ck = e["offset"], e["size"], e["checksum"]
            except KeyError as k:
                raise FlashFormatError(f"{where}: field 'layers[{i}].{k.args[0]}' is missing") from None
            for nm, v, typ in (("offset", off, int), ("size", size, int), ("checksum", ck, str)):
                if isinstance(v, bool) or not isinstance(v, typ):
                    raise FlashFormatError(f"{where}: field 'layers[{i}].{nm}' has type {type(v).__name__}, "
                                           f"expected {typ.__name__}")
            layers.append(LayerEntry(off, size, ck))
        kw["layers"] = layers
        for name, ck in kw.get("checksums", {}).items():
            if not isinstance(ck, str):
                raise FlashFormatError(f"{where}: field 'checksums.{name}' has type {type(ck).__name__}, expected str")
        kw["extra"] = {k: v for k, v in d.items() if k not in known and k != MANIFEST_CHECKSUM}
        return cls(**kw)

    @classmethod
    def from_json(cls, text: Union[str, bytes, Mapping[str, Any]], *, where: str = MANIFEST_FILE) -> "Manifest":
        """Parse manifest JSON text (or an already parsed dict)."""
        if isinstance(text, Mapping):
            return cls.from_dict(text, where=where)
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FlashFormatError(f"{where}: not valid JSON ({e})") from None
        return cls.from_dict(d, where=where)

    def save(self, path: Union[str, Path]) -> Path:
        """Write atomically (temp file + ``os.replace``) to ``path`` (a file, or a
        folder meaning ``folder/manifest.json``). Returns the file written."""
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_FILE
        return atomic_write_text(p, self.to_json())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Manifest":
        """Read ``path`` (a manifest file or a flash folder). Only parses; use
        :func:`open_flash` to also check the manifest against the files."""
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_FILE
        if not p.is_file():
            raise FlashFormatError(f"{p}: manifest.json is missing (not a flash model folder?)")
        return cls.from_json(p.read_bytes(), where=str(p))


def _tname(typ) -> str:
    if isinstance(typ, tuple):
        return " or ".join("null" if t is type(None) else t.__name__ for t in typ)
    return typ.__name__


MANIFEST_CHECKSUM = "manifest_checksum"
"""The manifest's own checksum field: blake2b (hex) of the rest of the manifest, canonical JSON (keys
sorted, no spaces). The files' checksums cover the weights; this covers what says how to read them (the
neuron order, the calibration's thresholds, the layer table): a damaged or hand-edited manifest is
refused instead of read wrongly. Manifests written before it have no such field and load as before."""


def manifest_digest(d: Mapping[str, Any]) -> str:
    """blake2b (hex) of a parsed manifest without its :data:`MANIFEST_CHECKSUM` field."""
    body = {k: v for k, v in d.items() if k != MANIFEST_CHECKSUM}
    return hashlib.blake2b(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def signed(d: Dict[str, Any]) -> Dict[str, Any]:
    """``d`` with its :data:`MANIFEST_CHECKSUM` set (what a manifest's ``save`` writes)."""
    out = {k: v for k, v in d.items() if k != MANIFEST_CHECKSUM}
    out[MANIFEST_CHECKSUM] = manifest_digest(out)
    return out


def check_signed(d: Mapping[str, Any], where: str) -> None:
    """A :class:`FlashFormatError` when ``d`` carries a :data:`MANIFEST_CHECKSUM` that its other fields do
    not match (a manifest damaged or edited after it was written); nothing for older, unsigned ones."""
    if MANIFEST_CHECKSUM not in d:
        return
    recorded = d[MANIFEST_CHECKSUM]
    if not isinstance(recorded, str) or recorded != manifest_digest(d):
        raise FlashFormatError(f"{where}: the manifest does not match its own checksum ('{MANIFEST_CHECKSUM}'): "
                               "it was damaged or edited after it was written; convert or import the model again")


FieldTypes = Dict[str, Union[type, Tuple[type, ...]]]


def typed_fields(d: Mapping[str, Any], required: FieldTypes, optional: FieldTypes, where: str) -> Dict[str, Any]:
    """The fields of a parsed JSON record ``d`` named in ``required`` (missing: an error) and
    ``optional`` (missing: left out), each checked against its type (``bool`` is never an int);
    :class:`FlashFormatError` naming ``where`` and the field otherwise. The manifests of the
    dense and the MoE flash folders are read through it."""
    kw: Dict[str, Any] = {}
    for name, typ in list(required.items()) + list(optional.items()):
        if name not in d:
            if name in required:
                raise FlashFormatError(f"{where}: field '{name}' is missing")
            continue
        v = d[name]
        if isinstance(v, bool) or not isinstance(v, typ):
            raise FlashFormatError(f"{where}: field '{name}' has type {type(v).__name__}, expected {_tname(typ)}")
        kw[name] = v
    return kw


# --------------------------------------------------------------------------- quantized bundles
QUANT_BITS = (2, 3, 4, 5, 6, 8)
DOWN_BITS = 8
"""Default bits of the re-quantized down rows of a quantized source (at least the source's bits), when
they are re-quantized: ``down_bits=`` asks for it, or the exact layout (:data:`GROUPS_ALONG_FFN`, the
default) cannot keep the source's down.
Measured on the default model (Q4_1 GGUF → 4-bit g32 folder; 1,024 tokens each of KJV Genesis and
resources/reference.txt; docs/ARCHITECTURE.md "Quantized flash"): against the source's dense 4-bit
model the flash predictor costs +10.5% / +7.6% with 4-bit g32 down rows, +13.8% / +9.6% at 4-bit g64,
+5.3% / +2.3% at 5 bits, -0.2% / +3.0% at 6 bits and +0.4% / +1.4% at 8 bits (the predictor alone on
the source's own down: +0.4% / +1.3%). Only 8 bits keeps the issue's 2% bar on both texts."""


GROUPS_ALONG_FFN = "ffn"
"""``quantization[part]["axis"]`` of a column part (down) kept exactly as the quantized source
stores it (format version 3): quantized along the FFN dimension, the ``group_size`` neurons of a
group share each hidden element's scale and bias. The bundle holds only the neuron's codes
(``hidden`` values of ``bits``, packed along hidden into uint32 words as MLX packs them, see
:func:`pack_codes`); each layer's per-group scales and biases, ``(intermediate / group_size, hidden)``
in the stored dtype, live in ``dense.safetensors`` under :func:`group_quant_key` and stay resident
in memory. A neuron's group is its source index // group_size (:func:`ffn_groups`, which follows
the folder's ``neuron_order``). Absent ``axis``: ``"hidden"`` (rows quantized along hidden)."""
EXACT_BITS = (2, 4, 8)
"""Bits the exact down layout keeps (whole codes per byte: plain little-endian bit fields)."""
EXACT_GROUP_SIZES = (32, 64, 128)
"""Source group sizes along the FFN dimension that the exact down layout keeps (MLX's)."""
GROUP_QUANT_PREFIX = "flash_ffn_groups."
"""Key prefix of the exact layout's per-group scales and biases in ``dense.safetensors``:
:func:`load_dense_weights` leaves them out; :func:`read_group_quant` reads them."""


def group_quant_key(layer: int, role: str, what: str) -> str:
    """``dense.safetensors`` key of ``layer``'s per-group ``what`` (``scales`` / ``biases``) of ``role``."""
    return f"{GROUP_QUANT_PREFIX}{layer}.{role}.{what}"


def along_ffn(spec: Optional[Mapping[str, Any]]) -> bool:
    """Whether a part's quantization is the exact layout (groups along the FFN dimension)."""
    return isinstance(spec, Mapping) and spec.get("axis", "hidden") == GROUPS_ALONG_FFN


def format_version_for(quantization: Optional[Mapping[str, Any]]) -> int:
    """The format version a folder with this ``quantization`` is written with: 3 for the exact down
    layout (older mlx-flash cannot read it), else 2 (readable by every version-2 reader)."""
    return FORMAT_VERSION if any(along_ffn(v) for v in (quantization or {}).values()) else 2


def _check_quantization(m: "Manifest", parts: Tuple[BundlePart, ...], where: str) -> None:
    q = m.quantization
    if q is None:
        return
    weight_parts = {p.name: p for p in parts if p.kind != "bias"}
    if set(q) != set(weight_parts):
        raise FlashFormatError(f"{where}: field 'quantization' names parts {sorted(q)}, "
                               f"expected {sorted(weight_parts)}")
    for name, spec in q.items():
        if spec == "none":
            continue
        if not isinstance(spec, Mapping):
            raise FlashFormatError(f"{where}: field 'quantization.{name}' must be an object or \"none\"")
        bits, gs, mode = spec.get("bits"), spec.get("group_size"), spec.get("mode", "affine")
        axis = spec.get("axis", "hidden")
        if axis == GROUPS_ALONG_FFN:
            if m.format_version < 3:
                raise FlashFormatError(f"{where}: field 'quantization.{name}.axis' needs format_version 3, "
                                       f"got {m.format_version}")
            if weight_parts[name].kind != "col" or bits not in EXACT_BITS or gs not in EXACT_GROUP_SIZES \
                    or m.intermediate_size % gs or m.hidden_size % 32 or mode != "affine":
                raise FlashFormatError(f"{where}: field 'quantization.{name}' is {dict(spec)}: groups along the "
                                       f"FFN dimension need a column part, affine bits in {EXACT_BITS} and a "
                                       f"group_size in {EXACT_GROUP_SIZES} dividing intermediate_size "
                                       f"{m.intermediate_size} (hidden_size a multiple of 32)")
            continue
        if axis != "hidden" or bits not in QUANT_BITS or not isinstance(gs, int) or isinstance(gs, bool) \
                or gs <= 0 or m.hidden_size % gs or mode != "affine":
            raise FlashFormatError(f"{where}: field 'quantization.{name}' is {dict(spec)}: expected affine "
                                   f"bits in {QUANT_BITS} and a group_size dividing hidden_size {m.hidden_size}")


def _part_quant(q: Optional[Mapping[str, Any]], part: BundlePart) -> Optional[Mapping[str, Any]]:
    spec = (q or {}).get(part.name)
    return spec if isinstance(spec, Mapping) and part.kind != "bias" else None


def _bundle_pieces(parts, hidden: int, dtype: str, q) -> List[Tuple[str, int, str]]:
    """``[(name, bytes, dtype)]`` of a bundle in order. A float part is one piece named
    after its role; a quantized one three: ``role`` (packed uint32 words), ``role.scales``
    and ``role.biases`` (``hidden / group_size`` each, in ``dtype``); one kept exactly with its
    groups along the FFN dimension (:data:`GROUPS_ALONG_FFN`) only ``role`` (the codes)."""
    item = DTYPE_SIZES[dtype]
    out: List[Tuple[str, int, str]] = []
    for part in parts:
        spec = _part_quant(q, part)
        if spec is None:
            out.append((part.role, part.elems(hidden) * item, dtype))
        elif along_ffn(spec):  # the exact layout: codes only, the group scales are resident
            out.append((part.role, hidden * spec["bits"] // 8, "uint32"))
        else:
            groups = hidden // spec["group_size"]
            out += [(part.role, hidden * spec["bits"] // 8, "uint32"),
                    (f"{part.role}.scales", groups * item, dtype), (f"{part.role}.biases", groups * item, dtype)]
    return out


def bundle_segments(manifest: "Manifest") -> List[Tuple[str, int, int, str]]:
    """Byte layout of one bundle: ``[(name, start, stop, dtype)]`` tiling ``[0, bundle_bytes)``.
    Float bundles: one segment per role (``gate``, ``up``, ``down``, ``gate_bias`` ...);
    quantized parts (format version 2): ``role`` (packed ``uint32`` words, MLX affine
    packing), ``role.scales`` and ``role.biases``. What the neuron cache's role-major rows
    (``neuron_cache.RowStore``) are made of."""
    out, pos = [], 0
    for name, nb, dt in _bundle_pieces(bundle_parts(manifest), manifest.hidden_size, manifest.dtype,
                                       manifest.quantization):
        out.append((name, pos, pos + nb, dt))
        pos += nb
    return out


def role_quantization(manifest: "Manifest") -> Dict[str, Dict[str, Any]]:
    """``{role: {"bits", "group_size", "mode"}}`` of the quantized roles (empty for float bundles).
    Gate/up rows keep the source's quantization along hidden; ``down`` holds either
    ``down_proj.weight.T`` re-quantized along hidden or, with ``"axis": "ffn"`` in its entry, the
    source's own codes with resident group scales (:data:`GROUPS_ALONG_FFN`; see docs/ARCHITECTURE.md)."""
    out = {}
    for part in bundle_parts(manifest):
        spec = _part_quant(manifest.quantization, part)
        if spec is not None:
            out[part.role] = {"bits": int(spec["bits"]), "group_size": int(spec["group_size"]),
                              "mode": spec.get("mode", "affine")}
            if along_ffn(spec):
                out[part.role]["axis"] = GROUPS_ALONG_FFN
    return out


def ffn_groups(manifest: "Manifest") -> Optional[np.ndarray]:
    """``(num_layers, intermediate_size)`` int32: the group (source index // group_size) of the neuron
    at each position of ``ffn.bin`` for a folder with the exact down layout (its ``neuron_order``
    applied), or None when no role keeps its groups along the FFN dimension."""
    gs = [q["group_size"] for q in role_quantization(manifest).values() if q.get("axis") == GROUPS_ALONG_FFN]
    if not gs:
        return None
    perms = neuron_perms(manifest)
    src = np.arange(manifest.intermediate_size)[None, :] if perms is None else perms
    return np.ascontiguousarray(np.broadcast_to(src // gs[0], (manifest.num_layers, manifest.intermediate_size)),
                                dtype=np.int32)


def group_quant_bytes(manifest: "Manifest") -> int:
    """Bytes of the exact layout's resident per-group scales and biases (all layers, stored dtype;
    0 without that layout): FFN weights held in memory, not read per neuron."""
    n = 0
    for q in role_quantization(manifest).values():
        if q.get("axis") == GROUPS_ALONG_FFN:
            n += 2 * (manifest.intermediate_size // q["group_size"]) * manifest.hidden_size * manifest.itemsize
    return n * manifest.num_layers


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """Integer codes ``(..., n)`` (values below ``2**bits``, ``bits`` in :data:`EXACT_BITS`) packed
    along the last axis into uint32 words the way MLX's affine quantization packs them (code ``j``
    in bits ``bits * (j % per_word)`` of word ``j // per_word``)."""
    per = 32 // bits
    c = codes.astype(mx.uint32).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = mx.arange(per, dtype=mx.uint32) * bits
    return mx.sum(c << shifts, axis=-1).astype(mx.uint32)  # disjoint bit fields: the sum is the OR


def unit_dequantize(words: mx.array, bits: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Packed words ``(rows, n * bits / 32)`` → their integer codes as ``dtype`` ``(rows, n)``
    (``mx.dequantize`` with unit scales and zero biases: exact)."""
    rows, n = words.shape[0], words.shape[-1] * 32 // bits
    ones = mx.ones((rows, n // 32), dtype=dtype)  # any group size: every group's scale is 1
    return mx.dequantize(words, ones, mx.zeros_like(ones), group_size=32, bits=bits)


# --------------------------------------------------------------------------- opening
@dataclass
class FlashFiles:
    """A validated flash folder: its manifest and the paths of its data files."""

    root: Path
    manifest: Manifest
    ffn_path: Path
    dense_path: Path


def _plain_name(name: str, field_name: str, where: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise FlashFormatError(f"{where}: field '{field_name}' must be a plain file name, got {name!r}")
    return name


def validate_manifest(m: Manifest, where: str = MANIFEST_FILE) -> None:
    """Check the manifest's own consistency (no file access). Raises
    :class:`FlashFormatError` naming ``where`` and the field."""
    if m.format_version not in READABLE_VERSIONS:
        raise FlashFormatError(
            f"{where}: field 'format_version' is {m.format_version}; this mlx-flash reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (re-import the model with this version)"
        )
    if m.quantization is not None and m.format_version < 2:
        raise FlashFormatError(f"{where}: field 'quantization' needs format_version 2, got {m.format_version}")
    if m.architecture not in ARCHITECTURES:
        raise FlashFormatError(
            f"{where}: field 'architecture' is {m.architecture!r}: unsupported architecture "
            f"(supported: {supported_text()})"
        )
    spec = ARCHITECTURES[m.architecture]
    if m.dtype not in DTYPE_SIZES:
        raise FlashFormatError(f"{where}: field 'dtype' is {m.dtype!r}, expected one of {sorted(DTYPE_SIZES)}")
    for name in ("num_layers", "hidden_size", "intermediate_size", "bundle_elems", "bundle_bytes", "alignment"):
        if getattr(m, name) <= 0:
            raise FlashFormatError(f"{where}: field '{name}' must be > 0, got {getattr(m, name)}")
    if m.alignment & (m.alignment - 1):
        raise FlashFormatError(f"{where}: field 'alignment' must be a power of two, got {m.alignment}")
    parts = spec.parts(m.model_args)
    expect_parts = [p.name for p in parts]
    if list(m.bundle_parts) != expect_parts:
        raise FlashFormatError(f"{where}: field 'bundle_parts' is {m.bundle_parts}, expected {expect_parts}")
    elems = sum(p.elems(m.hidden_size) for p in parts)
    if m.bundle_elems != elems:
        raise FlashFormatError(
            f"{where}: field 'bundle_elems' is {m.bundle_elems}, expected {elems} for parts {expect_parts} "
            f"(hidden_size {m.hidden_size})"
        )
    _check_quantization(m, parts, where)
    want_bytes = sum(nb for _, nb, _ in _bundle_pieces(parts, m.hidden_size, m.dtype, m.quantization))
    if m.bundle_bytes != want_bytes:
        raise FlashFormatError(
            f"{where}: field 'bundle_bytes' is {m.bundle_bytes}, expected {want_bytes} for parts {expect_parts} "
            f"in {m.dtype}" + (" with the manifest's quantization" if m.quantization else "")
        )
    for name, arg in (("hidden_size", "hidden_size"), ("intermediate_size", spec.intermediate_key),
                      ("num_layers", "num_hidden_layers")):
        v = m.model_args.get(arg)
        if v is not None and v != getattr(m, name):
            raise FlashFormatError(f"{where}: field '{name}' is {getattr(m, name)} but model_args.{arg} is {v}")
    if len(m.layers) != m.num_layers:
        raise FlashFormatError(f"{where}: field 'layers' has {len(m.layers)} entries, num_layers is {m.num_layers}")
    if m.ffn_size % m.alignment:
        raise FlashFormatError(f"{where}: field 'ffn_size' ({m.ffn_size}) is not a multiple of alignment {m.alignment}")
    layer_size = m.intermediate_size * m.bundle_bytes
    prev_end = 0
    for i, e in enumerate(m.layers):
        if e.size != layer_size:
            raise FlashFormatError(
                f"{where}: field 'layers[{i}].size' is {e.size}, "
                f"expected intermediate_size * bundle_bytes = {layer_size}"
            )
        if e.offset < 0 or e.offset % m.alignment:
            raise FlashFormatError(f"{where}: field 'layers[{i}].offset' ({e.offset}) is not a multiple of "
                                   f"alignment {m.alignment}")
        if e.offset < prev_end:
            raise FlashFormatError(f"{where}: field 'layers[{i}].offset' ({e.offset}) overlaps the previous layer "
                                   f"(ends at {prev_end})")
        if e.offset + e.size > m.ffn_size:
            raise FlashFormatError(
                f"{where}: field 'layers[{i}]' ends at {e.offset + e.size}, beyond ffn_size {m.ffn_size}"
            )
        prev_end = e.offset + e.size
    _plain_name(m.ffn_file, "ffn_file", where)
    _plain_name(m.dense_file, "dense_file", where)
    if isinstance(m.predictors, Mapping) and "file" in m.predictors:  # a file of this folder, never another's
        _plain_name(str(m.predictors["file"]), "predictors.file", where)
    if m.neuron_order is not None:
        neuron_perms(m, where)


# --------------------------------------------------------------------------- neuron order
NEURON_ORDER_VERSION = 1


def encode_neuron_order(perms: np.ndarray, method: str, **info: Any) -> Dict[str, Any]:
    """The manifest's ``neuron_order`` for per-layer permutations ``perms`` (n_layers, n) from
    the source model's numbering (``perm[p]`` = source neuron at position ``p``)."""
    p = np.asarray(perms, dtype=np.int64)
    dt = "<u2" if p.shape[1] <= 1 << 16 else "<u4"
    return {"version": NEURON_ORDER_VERSION, "method": str(method), "dtype": dt, **info,
            "layers": [base64.b64encode(row.astype(dt).tobytes()).decode("ascii") for row in p]}


def neuron_perms(m: Manifest, where: str = MANIFEST_FILE) -> Optional[np.ndarray]:
    """The folder's neuron permutation (n_layers, intermediate_size) int64 from the source's
    numbering (``perm[p]`` = source id at position ``p``), or None (the source's order).
    A malformed ``neuron_order`` raises :class:`FlashFormatError`."""
    o = m.neuron_order
    if o is None:
        return None
    if o.get("version") != NEURON_ORDER_VERSION:
        raise FlashFormatError(f"{where}: field 'neuron_order.version' is {o.get('version')!r}; this mlx-flash "
                               f"reads version {NEURON_ORDER_VERSION}")
    dt, layers, n = o.get("dtype"), o.get("layers"), m.intermediate_size
    if dt not in ("<u2", "<u4") or not isinstance(layers, list) or len(layers) != m.num_layers:
        raise FlashFormatError(f"{where}: field 'neuron_order' must hold one permutation per layer "
                               f"({m.num_layers}) in dtype <u2 or <u4")
    out = np.empty((m.num_layers, n), dtype=np.int64)
    for i, text in enumerate(layers):
        try:
            row = np.frombuffer(base64.b64decode(str(text), validate=True), dtype=dt)
        except (ValueError, TypeError):
            row = np.empty(0)
        if row.shape != (n,) or not np.array_equal(np.sort(row), np.arange(n)):
            raise FlashFormatError(f"{where}: field 'neuron_order.layers[{i}]' is not a permutation of the "
                                   f"layer's {n} neurons")
        out[i] = row
    return out


def write_permuted_ffn(files: FlashFiles, perms: np.ndarray, dst: Union[str, Path],
                       progress: Optional[ProgressCallback] = None) -> List[LayerEntry]:
    """Write ``files``' ``ffn.bin`` to ``dst`` with each layer's bundles permuted: position ``p``
    of layer ``l`` gets the bundle now at ``perms[l][p]``. Same layout (offsets, padding, size);
    each source layer is verified against its checksum as it is read. Returns the new layer
    entries (offsets, sizes, checksums of the permuted regions)."""
    m = files.manifest
    entries: List[LayerEntry] = []
    with open(dst, "wb") as f:
        pos = 0
        for i, e in enumerate(m.layers):
            report(progress, i / m.num_layers, f"layer {i + 1}/{m.num_layers}")
            raw = np.ascontiguousarray(_read_layer_raw(files, i)[np.asarray(perms[i], dtype=np.int64)])
            if e.offset > pos:
                f.write(bytes(e.offset - pos))
            f.write(raw.data.cast("B"))
            entries.append(LayerEntry(e.offset, e.size, hashlib.blake2b(raw.data.cast("B")).hexdigest()))
            pos = e.offset + e.size
        if m.ffn_size > pos:
            f.write(bytes(m.ffn_size - pos))
        f.flush()
        os.fsync(f.fileno())
    report(progress, 1.0, "written")
    return entries


def open_flash(path: Union[str, Path]) -> FlashFiles:
    """Open and validate a flash folder before any data read.

    Checks: manifest exists and parses, ``format_version``, architecture, dtype,
    bundle sizes, each layer's size/alignment/overlap/bounds, ``ffn.bin``'s
    actual size equals ``ffn_size`` and ``dense.safetensors`` exists. Any
    mismatch raises :class:`FlashFormatError` naming the file and field.
    Checksums are not read here (see :func:`verify_checksums`).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FlashFormatError(f"{root}: not a flash model folder (no such directory)")
    mpath = root / MANIFEST_FILE
    if not mpath.is_file():
        raise FlashFormatError(f"{mpath}: manifest.json is missing (not a flash model folder?)")
    m = Manifest.from_json(mpath.read_bytes(), where=str(mpath))
    validate_manifest(m, str(mpath))
    ffn_path = root / m.ffn_file
    dense_path = root / m.dense_file
    if not ffn_path.is_file():
        raise FlashFormatError(f"{ffn_path}: {m.ffn_file} is missing (manifest field 'ffn_file')")
    actual = ffn_path.stat().st_size
    if actual < m.ffn_size:
        raise FlashFormatError(f"{ffn_path}: {m.ffn_file} is truncated: {actual} bytes, manifest says {m.ffn_size} "
                               f"(field 'ffn_size')")
    if actual > m.ffn_size:
        raise FlashFormatError(f"{ffn_path}: {m.ffn_file} has {actual} bytes, manifest says {m.ffn_size} "
                               f"(field 'ffn_size')")
    if not dense_path.is_file():
        raise FlashFormatError(f"{dense_path}: {m.dense_file} is missing (manifest field 'dense_file')")
    return FlashFiles(root=root, manifest=m, ffn_path=ffn_path, dense_path=dense_path)


CHECKSUM_BLOCK = 8 << 20
"""Bytes per read when hashing (one large sequential read at a time)."""


def file_checksum(path: Union[str, Path]) -> str:
    """blake2b (hex, default 64-byte digest) of a whole file: what ``Manifest.checksums`` records."""
    h = hashlib.blake2b()
    buf = bytearray(CHECKSUM_BLOCK)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(mv)
            if not n:
                break
            h.update(mv[:n])
    return h.hexdigest()


def _layer_mismatch(files: FlashFiles, layer: int) -> ChecksumError:
    return ChecksumError(
        f"{files.ffn_path}: layer {layer} checksum mismatch (manifest field 'layers[{layer}].checksum'): "
        f"the file is corrupt or was modified; the model cannot be used (convert or import it again)"
    )


class LayerHasher:
    """Hashes layer regions of ``ffn.bin`` with large sequential reads that bypass the
    page cache (``open_uncached``; buffered where the filesystem refuses, silently):
    verifying a model does not fill the page cache with its FFN. One per thread."""

    def __init__(self, files: FlashFiles, *, direct: bool = True):
        self.files = files
        self._f = open_uncached(files.ffn_path, direct=direct, warn=False)
        self._buf = aligned_buffer(CHECKSUM_BLOCK)

    def checksum(self, layer: int) -> str:
        off, size = self.files.manifest.layer_range(layer)
        h = hashlib.blake2b()
        pos, end = off, off + size
        with memoryview(self._buf) as mv:
            while pos < end:
                # aligned lengths (the file is padded to the alignment); hash only the region
                want = min(CHECKSUM_BLOCK, -(-(end - pos) // ALIGNMENT) * ALIGNMENT)
                got = pread_exact(self._f.fd, self._buf, pos, want)
                use = min(got, end - pos)
                if use <= 0:
                    raise FlashFormatError(f"{self.files.ffn_path}: unexpected end of file in layer {layer}")
                h.update(mv[:use])
                pos += use
        return h.hexdigest()

    def verify(self, layer: int) -> None:
        """Raise :class:`ChecksumError` naming the layer when its region does not match."""
        if self.checksum(layer) != self.files.manifest.layers[layer].checksum:
            raise _layer_mismatch(self.files, layer)

    def close(self) -> None:
        self._f.close()
        self._buf.close()

    def __enter__(self) -> "LayerHasher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def verify_file(files: FlashFiles, name: str) -> bool:
    """Check the side file ``name`` (``dense.safetensors``, ``predictors.safetensors``)
    against ``Manifest.checksums``. Returns False when the manifest records no checksum
    for it (older folders); raises :class:`ChecksumError` when it does not match or is
    missing."""
    want = files.manifest.checksums.get(name)
    if want is None:
        return False
    path = files.root / _plain_name(name, "checksums", str(files.root / MANIFEST_FILE))
    if not path.is_file():
        raise ChecksumError(f"{path}: {name} is missing (manifest field 'checksums.{name}' records it)")
    if file_checksum(path) != want:
        raise ChecksumError(f"{path}: {name} checksum mismatch (manifest field 'checksums.{name}'): "
                            "the file is corrupt or was modified")
    return True


def verify_checksums(files: FlashFiles, progress: Optional[ProgressCallback] = None) -> List[str]:
    """Hash every layer region of ``ffn.bin`` and every side file the manifest has a
    checksum for (slow: reads the whole model). Returns what was checked (file names,
    ``ffn.bin`` as ``"ffn.bin (N layers)"``). A mismatch raises :class:`ChecksumError`
    naming the file and the layer; ``progress`` returning False cancels."""
    m = files.manifest
    side = sorted(m.checksums)
    total = sum(e.size for e in m.layers) + sum(
        (files.root / n).stat().st_size for n in side if (files.root / n).is_file()) or 1
    done = 0
    checked: List[str] = []
    for name in side:
        report(progress, done / total, f"checking {name}")
        verify_file(files, name)
        done += (files.root / name).stat().st_size
        checked.append(name)
    with LayerHasher(files) as hasher:
        for i, e in enumerate(m.layers):
            report(progress, done / total, f"checking {m.ffn_file} layer {i + 1}/{m.num_layers}")
            hasher.verify(i)
            done += e.size
    checked.append(f"{m.ffn_file} ({m.num_layers} layers)")
    split = updown_files(files)  # gate-first's up/down side file, when the folder has one
    if split is not None:
        with LayerHasher(split) as hasher:
            for i in range(m.num_layers):
                report(progress, 1.0, f"checking {split.manifest.ffn_file} layer {i + 1}/{m.num_layers}")
                hasher.verify(i)
        checked.append(f"{split.manifest.ffn_file} ({m.num_layers} layers)")
    report(progress, 1.0, "checksums ok")
    return checked


# --------------------------------------------------------------------------- reading
def numpy_storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype that holds ``dtype``'s bits (bfloat16 → uint16)."""
    try:
        return np.dtype(_NP_STORAGE[dtype])
    except KeyError:
        raise FlashFormatError(f"unsupported dtype {dtype!r}, expected one of {sorted(DTYPE_SIZES)}") from None


def _np_to_mx(a: np.ndarray, dtype: str) -> mx.array:
    arr = mx.array(a)
    return arr.view(mx.bfloat16) if dtype == "bfloat16" else arr


def bundle_parts(manifest: Manifest) -> Tuple[BundlePart, ...]:
    """The manifest's bundle parts, in bundle order."""
    try:
        return tuple(BUNDLE_PARTS[n] for n in manifest.bundle_parts)
    except KeyError as e:
        raise FlashFormatError(f"{MANIFEST_FILE}: field 'bundle_parts' names an unknown part {e.args[0]!r}") from None


def bundle_layout(manifest: Manifest) -> Dict[str, Union[Tuple[int, int], int]]:
    """Where each role lives inside a bundle row of ``bundle_elems`` elements:
    ``{"gate": (start, stop), "down": (start, stop), "up": (start, stop)?,
    "gate_bias": index?, "up_bias": index?}`` (roles the model lacks are absent)."""
    out: Dict[str, Union[Tuple[int, int], int]] = {}
    pos = 0
    for part in bundle_parts(manifest):
        n = part.elems(manifest.hidden_size)
        out[part.role] = pos if part.kind == "bias" else (pos, pos + n)
        pos += n
    return out


def float_bundle_bytes(manifest: Manifest, dtype: str = "bfloat16") -> int:
    """Bytes of one neuron's bundle were the same model stored as float rows of ``dtype``
    (what ``convert --dtype bfloat16`` writes): the speed test compares a quantized folder's
    reads with that layout's."""
    return sum(p.elems(manifest.hidden_size) for p in bundle_parts(manifest)) * DTYPE_SIZES[dtype]


def bundle_view(buf_u8: np.ndarray, manifest: Manifest) -> mx.array:
    """Raw bundle bytes (uint8, shape ``(n, bundle_bytes)`` or flat, a multiple of
    ``bundle_bytes`` long) → an ``mx.array`` of shape ``(n, bundle_elems)`` in the
    model dtype. Columns follow :func:`bundle_layout` (llama without biases:
    ``[0:h]`` gate, ``[h:2h]`` up, ``[2h:3h]`` down, h = hidden_size).
    Copies (``mx.array`` owns its memory)."""
    b = np.ascontiguousarray(buf_u8)
    if b.dtype != np.uint8:
        raise TypeError(f"bundle_view expects uint8 bytes, got {b.dtype}")
    if manifest.quantization is not None:
        raise ValueError("bundle_view reads float bundles; split quantized ones with bundle_segments")
    if b.size % manifest.bundle_bytes:
        raise ValueError(f"{b.size} bytes is not a whole number of {manifest.bundle_bytes}-byte bundles")
    typed = b.reshape(-1).view(numpy_storage_dtype(manifest.dtype)).reshape(-1, manifest.bundle_elems)
    return _np_to_mx(typed, manifest.dtype)


def _read_layer_raw(files: FlashFiles, layer: int, verify: bool = True) -> np.ndarray:
    """One layer's bundles as ``(intermediate_size, bundle_bytes)`` uint8 (plain buffered read).
    ``verify`` (the default) checks the bytes read against the layer's checksum (a
    :class:`ChecksumError` naming the layer; hashing costs ~1 ms per MB)."""
    m = files.manifest
    off, size = m.layer_range(layer)
    raw = np.empty(size, dtype=np.uint8)
    with open(files.ffn_path, "rb", buffering=0) as f:
        f.seek(off)
        mv = raw.data
        got = 0
        while got < size:
            n = f.readinto(mv[got:])
            if not n:
                raise FlashFormatError(f"{files.ffn_path}: unexpected end of file in layer {layer}")
            got += n
    if verify and hashlib.blake2b(raw.data).hexdigest() != m.layers[layer].checksum:
        raise _layer_mismatch(files, layer)
    return raw.reshape(m.intermediate_size, m.bundle_bytes)


def _segment_array(block_u8: np.ndarray, dtype: str) -> mx.array:
    """``(n, bytes)`` uint8 → an ``mx.array`` ``(n, bytes / itemsize)`` of ``dtype`` (a copy)."""
    b = np.ascontiguousarray(block_u8)
    if dtype == "uint32":
        return mx.array(b.view(np.uint32))
    return _np_to_mx(b.view(numpy_storage_dtype(dtype)), dtype)


def read_layer_segments(files: FlashFiles, layer: int, *, verify: bool = True) -> Dict[str, mx.array]:
    """One layer's bundles split by :func:`bundle_segments`: ``{name: (intermediate_size, width)}``
    as stored (quantized roles: packed ``uint32`` words, ``.scales``, ``.biases``)."""
    raw = _read_layer_raw(files, layer, verify)
    return {name: _segment_array(raw[:, a:b], dt) for name, a, b, dt in bundle_segments(files.manifest)}


def read_layer_weights(files: FlashFiles, layer: int, *, verify: bool = True) -> Tuple[mx.array, ...]:
    """Read one layer's whole FFN with a plain buffered read (for the oracle, dense
    loading and tests; the engine's sparse path uses ``FlashReader``). ``verify`` (the
    default) checks the layer's checksum (:class:`ChecksumError`).

    Returns one array per bundle part, in bundle order, in the stored float dtype and
    exactly as in the source model: row parts ``[inter, hidden]``, column parts
    ``[hidden, inter]``, biases ``[inter]``. For llama without biases that is
    ``(gate_proj.weight, up_proj.weight, down_proj.weight)``; see
    :func:`ffn_state_dict` for the key names. Quantized bundles (format version 2) are
    dequantized here (``mx.dequantize``; ``down`` from its re-quantized rows, or from its
    exact codes and the resident group scales, :data:`GROUPS_ALONG_FFN`): this is the one
    function that turns a quantized layer back into floats.
    """
    m = files.manifest
    seg = read_layer_segments(files, layer, verify=verify)
    quant = role_quantization(m)
    groups = ffn_groups(m)
    out = []
    for part in bundle_parts(m):
        q = quant.get(part.role)
        if q is not None and groups is not None and q.get("axis") == GROUPS_ALONG_FFN:  # codes x group rows
            scales, biases = read_group_quant(files, layer)[part.role]
            gid = mx.array(groups[layer])
            # in the stored dtype, as mx.dequantize computes: the source's dequantized weights bit for bit
            block = (unit_dequantize(seg[part.role], q["bits"], scales.dtype) * mx.take(scales, gid, axis=0)
                     + mx.take(biases, gid, axis=0))
        elif q is not None:
            block = mx.dequantize(seg[part.role], seg[f"{part.role}.scales"], seg[f"{part.role}.biases"],
                                  group_size=q["group_size"], bits=q["bits"], mode=q["mode"])
        else:
            block = seg[part.role]
        if part.kind == "col":
            block = block.T
        elif part.kind == "bias":
            block = block[:, 0]
        out.append(mx.contiguous(block) if part.kind != "bias" else block)
    return tuple(out)


def ffn_state_dict(files: FlashFiles, layer: int) -> Dict[str, mx.array]:
    """One layer's FFN tensors from ``ffn.bin`` under the architecture's key names
    (``model.layers.N.mlp.gate_proj.weight``, ``model.decoder.layers.N.fc1.bias``, ...):
    with :func:`load_dense_weights` and the model's ``sanitize``, the whole model."""
    m = files.manifest
    prefix = ARCHITECTURES[m.architecture].layer_prefix
    return {f"{prefix}.{layer}.{part.tensor}": w
            for part, w in zip(bundle_parts(m), read_layer_weights(files, layer))}


def _load_dense_file(files: FlashFiles) -> Dict[str, mx.array]:
    try:
        return dict(mx.load(str(files.dense_path)))  # lazy: a tensor is read when evaluated
    except Exception as e:  # mlx raises RuntimeError/ValueError on bad files
        raise FlashFormatError(f"{files.dense_path}: cannot read {files.manifest.dense_file} ({e})") from None


def read_group_quant(files: FlashFiles, layer: int) -> Dict[str, Tuple[mx.array, mx.array]]:
    """``{role: (scales, biases)}`` of ``layer``'s roles kept with their groups along the FFN
    dimension (:data:`GROUPS_ALONG_FFN`): ``(intermediate / group_size, hidden)`` each, in the
    stored dtype, from ``dense.safetensors`` (empty for other folders). A missing or misshapen
    tensor is a :class:`FlashFormatError`."""
    m = files.manifest
    out: Dict[str, Tuple[mx.array, mx.array]] = {}
    dense = None
    for role, q in role_quantization(m).items():
        if q.get("axis") != GROUPS_ALONG_FFN:
            continue
        dense = dense if dense is not None else _load_dense_file(files)
        pair = []
        for what in ("scales", "biases"):
            key = group_quant_key(layer, role, what)
            a = dense.get(key)
            want = (m.intermediate_size // q["group_size"], m.hidden_size)
            if a is None or tuple(a.shape) != want or _dtype_name(a.dtype) != m.dtype:
                raise FlashFormatError(f"{files.dense_path}: tensor {key} is missing or not {m.dtype} {want} "
                                       f"(manifest field 'quantization.{role}' keeps its groups along the FFN)")
            pair.append(a)
        out[role] = (pair[0], pair[1])
    return out


def load_dense_weights(files: FlashFiles, *, dequantize: bool = False) -> Dict[str, mx.array]:
    """All non-FFN weights (mlx-lm key names) from ``dense.safetensors``. Quantized modules
    (``.weight`` + ``.scales`` + ``.biases``) come as stored, or as float ``.weight``
    (the scales' dtype) with ``dequantize``. The exact down layout's group scales
    (:data:`GROUP_QUANT_PREFIX`) are FFN weights: :func:`read_group_quant` reads them."""
    w = {k: v for k, v in _load_dense_file(files).items() if not k.startswith(GROUP_QUANT_PREFIX)}
    if dequantize:
        qcfg = files.manifest.model_args.get("quantization") or files.manifest.model_args.get("quantization_config")
        for key in [k for k in w if k.endswith(".scales")]:
            mod = key[: -len(".scales")]
            if f"{mod}.weight" in w:
                w[f"{mod}.weight"] = _dequantize(w, mod, None, qcfg, str(files.dense_path))
    return w


# --------------------------------------------------------------------------- writing
def _np_bytes(a: mx.array) -> np.ndarray:
    """An evaluated mx array's bytes as a C-contiguous uint8 numpy array."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.asarray(a)).reshape(-1).view(np.uint8)


def _dtype_name(d: mx.Dtype) -> str:
    return str(d).rsplit(".", 1)[-1]


def _quant_entry(qcfg: Optional[Mapping[str, Any]], module: str) -> Dict[str, Any]:
    """mlx-lm quantization config for ``module``: the per-module override or the default."""
    if not qcfg:
        return {}
    over = qcfg.get(module)
    base = {k: v for k, v in qcfg.items() if k in ("group_size", "bits", "mode")}
    if isinstance(over, Mapping):
        base.update({k: v for k, v in over.items() if k in ("group_size", "bits", "mode")})
    return base


def _dequantize(weights: MutableMapping[str, mx.array], module: str, in_dim: Optional[int],
                qcfg: Optional[Mapping[str, Any]], what: str) -> mx.array:
    """Pop ``module.weight`` (+ ``.scales``/``.biases``) and return float weights."""
    w = weights.pop(f"{module}.weight")
    scales = weights.pop(f"{module}.scales", None)
    if scales is None:
        return w
    biases = weights.pop(f"{module}.biases", None)
    q = _quant_entry(qcfg, module)
    mode = q.get("mode", "affine")
    if in_dim is None:
        bits = q.get("bits")
        if not bits:
            raise FlashFormatError(f"{what}: {module} is quantized but config.json has no quantization.bits")
        in_dim = w.shape[-1] * 32 // bits
    if w.dtype != mx.uint32 or (w.shape[-1] * 32) % in_dim:
        raise FlashFormatError(f"{what}: {module}.weight has shape {w.shape} / dtype {w.dtype}, "
                               f"not a packed quantization of {in_dim} inputs")
    bits = w.shape[-1] * 32 // in_dim
    group_size = in_dim // scales.shape[-1]
    for k, v in (("bits", bits), ("group_size", group_size)):
        if q.get(k) not in (None, v):
            raise FlashFormatError(f"{what}: {module} looks {k}={v} from its shapes, config.json says {q[k]}")
    try:
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)
    except Exception as e:
        raise FlashFormatError(f"{what}: cannot dequantize {module} (bits={bits}, group_size={group_size}, "
                               f"mode={mode}): {e}") from None


def source_files(src: Path, own=_OWN_FILES) -> Dict[str, Path]:
    """Top-level files of ``src`` to copy unchanged: everything but weights, indexes and the
    names the folder being written owns (``own``: the dense flash folder's, or the MoE one's)."""
    out = {}
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix in _WEIGHT_SUFFIXES or p.name.endswith(".index.json") or p.name in own:
            continue
        out[p.name] = p
    return out


def load_weight_shards(src: Path) -> Iterator[Dict[str, mx.array]]:
    """The tensors of each ``*.safetensors`` shard of the model folder ``src`` in name order, loaded
    lazily; :class:`FlashFormatError` when there is none, one cannot be read or a
    tensor name appears in two shards."""
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise FlashFormatError(f"{src}: no *.safetensors weights")
    seen: Set[str] = set()
    for s in shards:
        try:
            part = mx.load(str(s))  # lazy: data is read when a tensor is evaluated
        except Exception as e:
            raise FlashFormatError(f"{s}: cannot read safetensors ({e})") from None
        dup = seen & part.keys()
        if dup:
            raise FlashFormatError(f"{s}: tensor {sorted(dup)[0]!r} also appears in another shard")
        seen.update(part.keys())
        yield part


def read_model_config(src: Path) -> Dict[str, Any]:
    """A model folder's ``config.json``, or :class:`FlashFormatError` saying what is wrong."""
    cfg_path = Path(src) / "config.json"
    if not cfg_path.is_file():
        raise FlashFormatError(f"{cfg_path}: config.json is missing (not a model folder?)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FlashFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise FlashFormatError(f"{cfg_path}: not a JSON object")
    return config


def convert_to_flash(
    src: Union[str, Path],
    dst: Union[str, Path],
    *,
    dtype: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
    overwrite: bool = False,
    dequantize_dense: bool = False,
    source: Optional[str] = None,
    down_bits: Optional[int] = None,
    down_group_size: Optional[int] = None,
) -> Path:
    """Convert an mlx-lm / Hugging Face model folder (``config.json`` + ``*.safetensors``,
    possibly sharded) into a flash folder at ``dst``; return ``dst``.

    dtype: "float16", "bfloat16" or "float32" for the stored weights (FFN and the
        dense floating weights); ``None`` keeps the source dtype.
    progress: called per layer; returning False cancels (raises ``Cancelled``; no
        trace is left: neither ``dst`` nor the temp folder).
    overwrite: replace an existing ``dst`` (only after the new one is complete).
    dequantize_dense: for quantized sources, also dequantize the dense weights.
    source: recorded in the manifest (default: ``src``'s absolute path).
    down_bits: quantized sources: re-quantize the down columns along hidden at these bits
        (format version 2). None (the default): keep the source's codes exactly with resident
        group scales where possible (:data:`GROUPS_ALONG_FFN`), else ``DOWN_BITS`` (8).
    down_group_size: the re-quantized columns' group size along hidden (None: the source's).
    Raises FlashFormatError for unsupported architectures or inconsistent
    weights, FileExistsError if ``dst`` exists, OSError(ENOSPC) with a clear
    message when the disk is full.
    """
    src = Path(src).expanduser()
    if (src / MANIFEST_FILE).is_file():
        raise FlashFormatError(f"{src} is already in the flash format: nothing to convert "
                               "(load it as it is, or import it into the library)")
    cfg_path = src / "config.json"
    config = read_model_config(src)
    wrapped = BY_WRAPPER.get(str(config.get("model_type", "")))
    if wrapped is not None:
        config = _text_config(config, wrapped, str(cfg_path))
    _arch_spec(config, str(cfg_path))  # fail before loading weights
    weights: Dict[str, mx.array] = {}
    for part in load_weight_shards(src):
        if wrapped is not None:  # the text model only: its keys without the prefix, no vision tower
            part = {k[len(WRAPPED_PREFIX):]: v for k, v in part.items() if k.startswith(WRAPPED_PREFIX)}
        weights.update(part)
        del part  # write_flash frees each FFN tensor once written: keep no other reference
    extra = source_files(src)
    if wrapped is not None:
        del extra["config.json"]  # write_flash writes the text model's
    return write_flash(
        dst,
        config=config,
        weights=weights,
        extra_files=extra,
        source=source or str(src.resolve()),
        dtype=dtype,
        progress=progress,
        overwrite=overwrite,
        dequantize_dense=dequantize_dense,
        down_bits=down_bits,
        down_group_size=down_group_size,
    )


def _text_config(config: Mapping[str, Any], family, where: str) -> Dict[str, Any]:
    """config.json of the text model inside a multimodal checkpoint (Gemma 3 4B+): its
    ``text_config`` with the family's model_type and the defaults mlx-lm's wrapper fills in
    (vocab_size from the top level, 262208 when absent; 8 heads, 4 kv heads); the
    quantization's per-module entries lose the ``language_model.`` prefix (others are dropped)."""
    text = config.get(WRAPPED_CONFIG)
    if not isinstance(text, Mapping):
        raise FlashFormatError(f"{where}: a {config.get('model_type')!r} checkpoint without '{WRAPPED_CONFIG}'")
    out: Dict[str, Any] = {"num_attention_heads": 8, "num_key_value_heads": 4, **text,
                           "model_type": family.model_types[0], "vocab_size": config.get("vocab_size", 262208)}
    for key in ("quantization", "quantization_config"):
        q = config.get(key)
        if isinstance(q, Mapping):
            out[key] = {(k[len(WRAPPED_PREFIX):] if k.startswith(WRAPPED_PREFIX) else k): v for k, v in q.items()
                        if not isinstance(v, (Mapping, bool)) or k.startswith(WRAPPED_PREFIX)}
    for key in ("eos_token_id", "bos_token_id"):
        if key in config and key not in out:
            out[key] = config[key]
    return out


def _arch_spec(config: Mapping[str, Any], where: str) -> ArchSpec:
    mt = config.get("model_type")
    if mt not in ARCHITECTURES:
        raise FlashFormatError(
            f"{where}: unsupported architecture: model_type {mt!r} (supported: {supported_text()})"
        )
    return ARCHITECTURES[mt]


def _cfg_int(config: Mapping[str, Any], key: str, where: str) -> int:
    v = config.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise FlashFormatError(f"{where}: field '{key}' must be a positive integer, got {v!r}")
    return v


def write_flash(
    dst: Union[str, Path],
    *,
    config: Mapping[str, Any],
    weights: MutableMapping[str, mx.array],
    extra_files: Optional[Mapping[str, Union[Path, str, bytes]]] = None,
    source: str = "",
    dtype: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
    overwrite: bool = False,
    dequantize_dense: bool = False,
    down_bits: Optional[int] = None,
    down_group_size: Optional[int] = None,
) -> Path:
    """Write a flash folder from in-memory (preferably lazy) mlx-lm weights.

    The lower-level half of :func:`convert_to_flash`, for importers (GGUF, ...)
    that build weights themselves. ``config`` is the mlx-lm config dict
    (``model_type`` must be supported); ``weights`` maps mlx-lm key names to
    arrays. FFN entries are *popped* from ``weights`` as each layer is written
    so memory stays at about one layer; do not keep other references to them.
    ``extra_files`` maps a file name in ``dst`` to a source path (copied) or
    contents (``str``/``bytes``); ``config.json`` is written from ``config``
    unless given here. Other arguments as in :func:`convert_to_flash`.

    Quantized sources (MLX affine ``.weight``/``.scales``/``.biases``) keep their
    quantization unless ``dtype`` is given (format version 2): gate/up rows are copied
    as they are (quantized along hidden, each row self-contained); down is quantized
    along the FFN dimension: by default each neuron's codes are kept exactly and the group
    scales go to ``dense.safetensors`` (format version 3, :data:`GROUPS_ALONG_FFN`); with
    ``down_bits`` (or a source the exact layout cannot keep) its columns are dequantized and
    ``down_proj.weight.T`` is re-quantized along hidden at ``down_bits`` (default ``DOWN_BITS`` = 8,
    at least the source's bits) with the source's group size (see :func:`_plan_ffn_quantization`).
    """
    dst = Path(dst).expanduser()
    what = source or "source model"
    spec = _arch_spec(config, f"{what} config.json")
    fused = BY_MODEL_TYPE[config["model_type"]].fused_gate_up
    if fused:
        _split_gate_up(weights, fused, what)
    if dtype is not None and dtype not in DTYPE_SIZES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_SIZES)}, got {dtype!r}")
    n_layers = _cfg_int(config, "num_hidden_layers", f"{what} config.json")
    hidden = _cfg_int(config, "hidden_size", f"{what} config.json")
    inter = _cfg_int(config, spec.intermediate_key, f"{what} config.json")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
    qcfg = config.get("quantization") or config.get("quantization_config")
    parts = spec.parts(config)
    biased = spec.has_biases(config)
    bias_tensors = {p.tensor for p in parts if p.kind == "bias"}

    # ---- find and check the FFN tensors of every layer before writing anything
    prefixes: Dict[int, str] = {}
    for key in weights:
        mt = _LAYER_KEY.match(key)
        if not mt:
            continue
        rest = mt["rest"]
        for mod in spec.ffn_modules:
            if rest.startswith(mod + "."):
                i = int(mt["layer"])
                if i >= n_layers:
                    raise FlashFormatError(f"{what}: tensor {key!r} is for layer {i}, config says {n_layers} layers")
                if rest == mod + ".bias" and not (biased and (rest in bias_tensors or rest in spec.dense_biases)):
                    raise FlashFormatError(f"{what}: tensor {key!r}: an FFN bias, but config.json says "
                                           f"{spec.bias_flag} = {str(biased).lower()}")
                prefixes.setdefault(i, mt["prefix"])
    ffn_prefix: List[str] = []
    for i in range(n_layers):
        pre = prefixes.get(i)
        if pre is None:
            raise FlashFormatError(f"{what}: layer {i} has no FFN weights ({spec.ffn_modules[0]}.weight missing)")
        for t in [part.tensor for part in parts] + (list(spec.dense_biases) if biased else []):
            if f"{pre}.{i}.{t}" not in weights:
                raise FlashFormatError(f"{what}: tensor {pre}.{i}.{t} is missing")
        ffn_prefix.append(f"{pre}.{i}")

    first_mod = f"{ffn_prefix[0]}.{parts[0].tensor[: -len('.weight')]}"
    first = weights[f"{first_mod}.weight"]
    scales0 = weights.get(f"{first_mod}.scales")
    src_dtype = (first if scales0 is None else scales0).dtype
    del first
    out_dtype = dtype or _dtype_name(src_dtype)
    if out_dtype not in DTYPE_SIZES:
        raise FlashFormatError(f"{what}: FFN weights are {out_dtype}; pass dtype= one of {sorted(DTYPE_SIZES)}")
    mx_out = getattr(mx, out_dtype)
    keep_q = dtype is None and scales0 is not None and _quant_entry(qcfg, first_mod).get("mode", "affine") == "affine"
    del scales0
    fquant = _plan_ffn_quantization(weights, ffn_prefix, parts, hidden, inter, qcfg, down_bits, what,
                                    down_group_size) if keep_q else None
    if fquant is not None and all(v == "none" for v in fquant.values()):
        fquant = None
    bundle_elems = sum(p.elems(hidden) for p in parts)
    pieces_spec = _bundle_pieces(parts, hidden, out_dtype, fquant)
    bundle_bytes = sum(nb for _, nb, _ in pieces_spec)
    layer_size = inter * bundle_bytes
    offsets = [i * _align(layer_size) for i in range(n_layers)]
    ffn_size = _align(offsets[-1] + layer_size)

    # ---- disk space check up front
    ffn_keys = set()
    for pre in ffn_prefix:
        for part in parts:
            if part.kind == "bias":
                ffn_keys.add(f"{pre}.{part.tensor}")
            else:
                mod = f"{pre}.{part.tensor[: -len('.weight')]}"
                ffn_keys.update(f"{mod}.{s}" for s in ("weight", "scales", "biases"))
    dense_estimate = sum(v.nbytes for k, v in weights.items() if k not in ffn_keys)
    if dtype is not None:
        dense_estimate = dense_estimate * 2  # worst case float16 → float32
    extra_bytes = sum(len(c) if isinstance(c, (str, bytes)) else Path(c).stat().st_size
                      for c in (extra_files or {}).values())  # tokenizer files: megabytes
    need = ffn_size + dense_estimate + extra_bytes + (1 << 20)
    # locks dst, removes stale temporaries, checks the space, makes the temp folder (atomic.py)
    build = FolderBuild(dst, overwrite=overwrite, need=need)
    tmp = build.tmp
    try:
        report(progress, 0.0, f"converting {n_layers} layers")
        entries: List[LayerEntry] = []
        group_quant: Dict[str, mx.array] = {}  # the exact down layout's resident group scales
        with open(tmp / FFN_FILE, "wb") as f:
            set_nocache(f.fileno())  # macOS: keep ffn.bin out of the cache the reader bypasses
            pos = 0
            for i, pre in enumerate(ffn_prefix):
                pieces = []
                for part in parts:
                    name = f"{pre}.{part.tensor}"
                    pq = _part_quant(fquant, part)
                    if pq is not None and along_ffn(pq):  # the source's codes per neuron; group scales: dense
                        codes, sc, bi = _exact_down(weights, name[: -len(".weight")], hidden, inter, pq, what)
                        pieces.append(codes)
                        group_quant[group_quant_key(i, part.role, "scales")] = sc.astype(mx_out)
                        group_quant[group_quant_key(i, part.role, "biases")] = bi.astype(mx_out)
                        continue
                    if part.kind == "bias":
                        arr = weights.pop(name)
                        shape: Tuple[int, ...] = (inter,)
                    else:
                        mod = name[: -len(".weight")]
                        in_dim = hidden if part.kind == "row" else inter
                        if pq is not None and part.kind == "row" and _source_quant(weights, mod, in_dim) == \
                                (pq["bits"], pq["group_size"]):  # copied as stored: exact
                            _check_shape(weights[f"{mod}.weight"], (inter, hidden * pq["bits"] // 32), mod, what)
                            pieces += [weights.pop(f"{mod}.weight"), weights.pop(f"{mod}.scales").astype(mx_out),
                                       weights.pop(f"{mod}.biases").astype(mx_out)]
                            continue
                        arr = _dequantize(weights, mod, in_dim, qcfg, what)
                        shape = (inter, hidden) if part.kind == "row" else (hidden, inter)
                    _check_shape(arr, shape, name, what)
                    if not mx.issubdtype(arr.dtype, mx.floating):
                        raise FlashFormatError(f"{what}: tensor {name} has dtype {arr.dtype}, expected floats")
                    if part.kind == "col":
                        arr = arr.T
                    elif part.kind == "bias":
                        arr = arr[:, None]
                    if pq is not None:  # re-quantized along hidden (down columns; mixed-bit sources)
                        wq, sq, bq = mx.quantize(arr.astype(mx.float32), group_size=pq["group_size"],
                                                 bits=pq["bits"])
                        pieces += [wq, sq.astype(mx_out), bq.astype(mx_out)]
                    else:
                        pieces.append(arr.astype(mx_out))
                    del arr
                mx.eval(pieces)
                raw = np.concatenate([_np_bytes(a).reshape(inter, -1) for a in pieces], axis=1).reshape(-1)
                del pieces
                assert raw.nbytes == layer_size
                if offsets[i] > pos:
                    f.write(bytes(offsets[i] - pos))
                    pos = offsets[i]
                f.write(raw.data)
                entries.append(LayerEntry(pos, layer_size, hashlib.blake2b(raw.data).hexdigest()))
                pos += layer_size
                del raw
                _clear_mlx_cache()  # freed layers go back to the OS, not MLX's buffer cache
                report(progress, (i + 1) / (n_layers + 1), f"layer {i + 1}/{n_layers}")
            if ffn_size > pos:
                f.write(bytes(ffn_size - pos))
            f.flush()
            os.fsync(f.fileno())
        drop_page_cache(tmp / FFN_FILE)  # Linux: start cold, like a model that was not just written

        # ---- dense part
        model_args = dict(config)
        if dequantize_dense:
            for key in [k for k in weights if k.endswith(".scales")]:
                mod = key[: -len(".scales")]
                if f"{mod}.weight" in weights:
                    weights[f"{mod}.weight"] = _dequantize(weights, mod, None, qcfg, what)
        dense: Dict[str, mx.array] = {}
        for k, v in weights.items():
            if k in ffn_keys:
                continue
            if dtype is not None and mx.issubdtype(v.dtype, mx.floating):
                v = v.astype(mx_out)
            dense[k] = v
        still_quantized = any(k.endswith(".scales") for k in dense)
        if not still_quantized:
            model_args.pop("quantization", None)
            model_args.pop("quantization_config", None)
        mx.eval(list(group_quant.values()))
        dense.update(group_quant)
        mx.save_safetensors(str(tmp / DENSE_FILE), dense, metadata={"format": "mlx"})
        del dense
        checksums = {DENSE_FILE: file_checksum(tmp / DENSE_FILE)}

        # ---- side files
        for name, content in (extra_files or {}).items():
            _plain_name(name, "extra_files", what)
            if isinstance(content, (str, bytes)) and not isinstance(content, Path):
                (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
            else:
                shutil.copyfile(content, tmp / name)
        if not (tmp / "config.json").exists():
            (tmp / "config.json").write_text(json.dumps(dict(config), indent=2))

        manifest = Manifest(
            architecture=str(config["model_type"]),
            model_args=model_args,
            dtype=out_dtype,
            num_layers=n_layers,
            hidden_size=hidden,
            intermediate_size=inter,
            bundle_parts=[p.name for p in parts],
            bundle_elems=bundle_elems,
            bundle_bytes=bundle_bytes,
            quantization=fquant,
            layers=entries,
            ffn_size=ffn_size,
            source=source,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            dense_quantization=dict(qcfg) if (qcfg and still_quantized) else None,
            checksums=checksums,
            format_version=format_version_for(fquant),
        )
        validate_manifest(manifest, f"{dst / MANIFEST_FILE}")
        manifest.save(tmp / MANIFEST_FILE)
        fsync_dir(tmp)
        # read what reached the disk back against the checksums of what was written
        verify_checksums(open_flash(tmp), progress=scaled(progress, n_layers / (n_layers + 1), 0.999))

        report(progress, 1.0, "publishing")  # last chance to cancel
    except BaseException as e:
        # temp folder removed; a full disk / no permission: a one-line message
        if (err := build.fail(e)) is e:
            raise
        raise err from e
    return build.publish()


def _split_gate_up(weights: MutableMapping[str, mx.array], fused: str, what: str) -> None:
    """Replace every ``<layer>.<fused>.weight`` (``[gate; up]`` rows, Phi-3's ``gate_up_proj``;
    quantized ones with their ``.scales``/``.biases``, whose rows split the same way) by
    ``mlp.gate_proj`` and ``mlp.up_proj`` tensors (lazy slices)."""
    suffix = f".{fused}."
    for key in [k for k in weights if suffix in k]:
        base, kind = key.rsplit(".", 1)
        arr = weights.pop(key)
        if arr.shape[0] % 2:
            raise FlashFormatError(f"{what}: tensor {key} has {arr.shape[0]} rows; expected gate and up "
                                   f"halves of equal size")
        half = arr.shape[0] // 2
        layer = base[: -len(fused) - 1]
        weights[f"{layer}.mlp.gate_proj.{kind}"] = arr[:half]
        weights[f"{layer}.mlp.up_proj.{kind}"] = arr[half:]


def _check_shape(arr: mx.array, shape: Tuple[int, ...], name: str, what: str) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise FlashFormatError(f"{what}: tensor {name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")


def _source_quant(weights: Mapping[str, mx.array], module: str, in_dim: int) -> Optional[Tuple[int, int]]:
    """``(bits, group_size)`` of a quantized source module from its shapes, None if float."""
    s = weights.get(f"{module}.scales")
    w = weights[f"{module}.weight"]
    if s is None or w.dtype != mx.uint32 or (w.shape[-1] * 32) % in_dim or in_dim % s.shape[-1]:
        return None
    return w.shape[-1] * 32 // in_dim, in_dim // s.shape[-1]


def _plan_ffn_quantization(weights, ffn_prefix, parts, hidden: int, inter: int, qcfg, down_bits: Optional[int],
                           what: str, down_group_size: Optional[int] = None) -> Dict[str, Any]:
    """The bundle's quantization per weight part (the manifest's ``quantization``) for a
    quantized source. Row parts (gate/up: quantized along hidden) keep the source's bits
    and group size; layers quantized otherwise (mixed-bit recipes) are re-quantized to the
    part's highest bits. Column parts (down: quantized along the FFN dimension in the
    source, so one neuron's column is spread over groups of other neurons) keep the source's
    codes exactly with resident group scales (:data:`GROUPS_ALONG_FFN`) when neither ``down_bits``
    nor ``down_group_size`` is given and every layer has the same bits in :data:`EXACT_BITS` and
    group size in :data:`EXACT_GROUP_SIZES`; otherwise they are re-quantized along hidden at
    ``down_bits`` (default: ``DOWN_BITS``, at least the source's highest bits) with
    ``down_group_size`` or the source's group size when it divides hidden (else 64 or 32)."""
    plan: Dict[str, Any] = {}
    for part in parts:
        if part.kind == "bias":
            continue
        in_dim = hidden if part.kind == "row" else inter
        found = [_source_quant(weights, f"{pre}.{part.tensor[: -len('.weight')]}", in_dim) for pre in ffn_prefix]
        qs = [q for q in found if q is not None]
        if not qs:
            plan[part.name] = "none"
            continue
        bits, gs = max(qs)
        if part.kind == "col":
            if down_bits is None and down_group_size is None and len(qs) == len(found) and len(set(qs)) == 1 \
                    and bits in EXACT_BITS and gs in EXACT_GROUP_SIZES and inter % gs == 0 and hidden % 32 == 0:
                # the source's own codes, its group scales resident: exact (GROUPS_ALONG_FFN)
                plan[part.name] = {"bits": int(bits), "group_size": int(gs), "mode": "affine",
                                   "axis": GROUPS_ALONG_FFN}
                continue
            bits = down_bits or max(DOWN_BITS, bits)
            gs = down_group_size or gs
            if hidden % gs:
                gs = next((g for g in (64, 32) if hidden % g == 0), 0)
        if bits not in QUANT_BITS or not gs or hidden % gs:
            raise FlashFormatError(f"{what}: {part.tensor} cannot be stored quantized with bits={bits}, "
                                   f"group_size={gs} (hidden_size {hidden}); convert with dtype='bfloat16'")
        plan[part.name] = {"bits": int(bits), "group_size": int(gs), "mode": "affine"}
    return plan


def _exact_down(weights: MutableMapping[str, mx.array], module: str, hidden: int, inter: int,
                spec: Mapping[str, Any], what: str) -> Tuple[mx.array, mx.array, mx.array]:
    """Pop a source down projection quantized along the FFN dimension (``weight`` (hidden,
    inter * bits / 32), ``scales``/``biases`` (hidden, inter / group_size)) and return each
    neuron's codes packed along hidden ``(inter, hidden * bits / 32)`` (the same codes, bit for
    bit) and the group scales and biases transposed to ``(inter / group_size, hidden)``."""
    bits, gs = spec["bits"], spec["group_size"]
    w = weights.pop(f"{module}.weight")
    sc, bi = weights.pop(f"{module}.scales"), weights.pop(f"{module}.biases", None)
    _check_shape(w, (hidden, inter * bits // 32), f"{module}.weight", what)
    _check_shape(sc, (hidden, inter // gs), f"{module}.scales", what)
    if bi is None:
        raise FlashFormatError(f"{what}: tensor {module}.biases is missing (affine quantization has biases)")
    _check_shape(bi, (hidden, inter // gs), f"{module}.biases", what)
    codes = pack_codes(unit_dequantize(w, bits).T, bits)
    return codes, sc.T, bi.T


def _clear_mlx_cache() -> None:
    clear = getattr(mx, "clear_cache", None)
    if clear is not None:
        clear()


# --------------------------------------------------------------------------- up/down side file
UPDOWN_FILE = "ffn_updown.bin"
UPDOWN_FIELD = "updown"
"""Manifest field (kept by older code as an unknown field) of the optional up/down side file:
``{"file", "drop", "bundle_bytes", "size", "layers": [{offset, size, checksum}],
"source_checksums"}``. The side file holds, per layer and neuron, the bundle's segments
without the ``drop`` ones (a gate-first chooser's gate part, resident in memory), in bundle
order, each layer region aligned like ``ffn.bin``: a gate-first miss then reads up/down
bytes only (the bundles' gate bytes are neither read nor in the coalesced gaps)."""


def updown_segments(manifest: Manifest, drop) -> List[Tuple[str, int, int, str]]:
    """:func:`bundle_segments` without the ``drop`` names, re-based: the row layout of the
    up/down side file (what the neuron cache's rows are made of when it is read)."""
    out, pos = [], 0
    for name, a, b, dt in bundle_segments(manifest):
        if name not in drop:
            out.append((name, pos, pos + (b - a), dt))
            pos += b - a
    return out


def write_updown(files: FlashFiles, drop, progress: Optional[ProgressCallback] = None) -> Path:
    """Write the up/down side file of an opened flash folder (every layer read once from
    ``ffn.bin`` and verified) atomically, then record it in the manifest (:data:`UPDOWN_FIELD`).
    ``drop``: the segment names left out (``gate_first.GATE_SEGMENTS``). Returns its path."""
    m = files.manifest
    segs = updown_segments(m, drop)
    if not segs or len(segs) == len(bundle_segments(m)):
        raise ValueError(f"dropping {sorted(drop)} from {[n for n, *_ in bundle_segments(m)]} leaves no split")
    keep = [(a, b) for name, a, b, _ in bundle_segments(m) if name not in drop]
    row = segs[-1][2]
    layers, pos = [], 0
    path = files.root / UPDOWN_FILE
    with atomic_path(path, suffix=".tmp.bin") as tmp:
        with open(tmp, "wb") as f:
            for i in range(m.num_layers):
                report(progress, i / m.num_layers, f"writing {UPDOWN_FILE}: layer {i + 1}/{m.num_layers}")
                raw = _read_layer_raw(files, i)
                block = np.ascontiguousarray(np.concatenate([raw[:, a:b] for a, b in keep], axis=1))
                f.write(b"\0" * (_align(pos) - pos))
                pos = _align(pos)
                f.write(block.tobytes())
                layers.append({"offset": pos, "size": int(block.nbytes),
                               "checksum": hashlib.blake2b(block.data.cast("B")).hexdigest()})
                pos += block.nbytes
            f.write(b"\0" * (_align(pos) - pos))
            pos = _align(pos)
    fresh = Manifest.load(files.root)
    fresh.extra[UPDOWN_FIELD] = {"file": UPDOWN_FILE, "drop": sorted(drop), "bundle_bytes": int(row),
                                 "size": int(pos), "layers": layers,
                                 "source_checksums": [e.checksum for e in m.layers]}
    fresh.save(files.root)
    report(progress, 1.0, f"{UPDOWN_FILE} written")
    return path


def updown_files(files: FlashFiles) -> Optional[FlashFiles]:
    """The up/down side file as a :class:`FlashFiles` for ``FlashReader`` and ``LayerHasher``
    (its manifest's ``bundle_bytes``, ``layers``, ``ffn_size`` and ``ffn_file`` are the side
    file's; nothing else reads it), or None when the folder has none or it was written from
    other ``ffn.bin`` contents (stale: its ``source_checksums`` differ from the layers').
    A recorded file that is missing or has the wrong size is a :class:`FlashFormatError`."""
    m = files.manifest
    info = m.extra.get(UPDOWN_FIELD)
    if not isinstance(info, Mapping):
        return None
    where = str(files.root / MANIFEST_FILE)
    try:
        drop, row, size, entries = list(info["drop"]), int(info["bundle_bytes"]), int(info["size"]), info["layers"]
        src = list(info["source_checksums"])
        layers = [LayerEntry(int(e["offset"]), int(e["size"]), str(e["checksum"])) for e in entries]
        name = _plain_name(str(info["file"]), f"{UPDOWN_FIELD}.file", where)
    except (KeyError, TypeError, ValueError) as e:
        raise FlashFormatError(f"{where}: field '{UPDOWN_FIELD}' is malformed ({e!r})") from None
    if src != [e.checksum for e in m.layers]:
        return None
    segs = updown_segments(m, drop)
    if not segs or segs[-1][2] != row or len(layers) != m.num_layers or any(
            e.size != row * m.intermediate_size or e.offset % m.alignment for e in layers):
        raise FlashFormatError(f"{where}: field '{UPDOWN_FIELD}' does not match the bundle layout")
    path = files.root / name
    if not path.is_file() or path.stat().st_size != size:
        raise FlashFormatError(f"{path}: {name} is missing or has the wrong size (manifest field "
                               f"'{UPDOWN_FIELD}.size' says {size})")
    view = replace(m, bundle_bytes=row, layers=layers, ffn_size=size, ffn_file=name)
    return FlashFiles(root=files.root, manifest=view, ffn_path=path, dense_path=files.dense_path)


def _align(n: int, a: int = ALIGNMENT) -> int:
    return -(-n // a) * a


__all__ = [
    "load_weight_shards",
    "source_files",
    "typed_fields",
    "read_model_config",
    "ALIGNMENT",
    "ARCHITECTURES",
    "ArchSpec",
    "DENSE_FILE",
    "DTYPE_SIZES",
    "FFN_FILE",
    "FORMAT_VERSION",
    "FlashFiles",
    "FlashFormatError",
    "LayerEntry",
    "MANIFEST_CHECKSUM",
    "check_signed",
    "manifest_digest",
    "signed",
    "MANIFEST_FILE",
    "Manifest",
    "BUNDLE_PARTS",
    "BundlePart",
    "CHECKSUM_BLOCK",
    "ChecksumError",
    "LayerHasher",
    "file_checksum",
    "verify_file",
    "bundle_layout",
    "bundle_parts",
    "bundle_segments",
    "read_layer_segments",
    "role_quantization",
    "READABLE_VERSIONS",
    "DOWN_BITS",
    "EXACT_BITS",
    "EXACT_GROUP_SIZES",
    "GROUPS_ALONG_FFN",
    "GROUP_QUANT_PREFIX",
    "along_ffn",
    "ffn_groups",
    "format_version_for",
    "group_quant_bytes",
    "group_quant_key",
    "pack_codes",
    "read_group_quant",
    "unit_dequantize",
    "bundle_view",
    "ffn_state_dict",
    "float_bundle_bytes",
    "convert_to_flash",
    "load_dense_weights",
    "numpy_storage_dtype",
    "open_flash",
    "read_layer_weights",
    "validate_manifest",
    "verify_checksums",
    "write_flash",
    "UPDOWN_FILE",
    "updown_files",
    "updown_segments",
    "write_updown",
]
