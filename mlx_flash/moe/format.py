"""The MoE flash layout: the one module that knows where expert bytes live.

A MoE flash model is a folder (the library names it ``<name>.flash`` like a dense one)::

    model.flash/
      moe_manifest.json  format ("mlx-flash-moe"), format_version, architecture, model_args (config.json),
                         dtype, num_experts, top_k, hidden_size, expert_intermediate_size,
                         modules (the SwitchGLU paths, one per MoE layer), segments (the expert bundle),
                         expert_bytes, alignment, experts_file, experts_size,
                         layers [{offset, size, checksum}], quantization {gate, up, down},
                         dense_file, checksums {dense.safetensors}, expert_frequencies (calibration), ...
      experts.bin        per MoE layer l, per expert e, one bundle of ``expert_bytes`` (a multiple of
                         ``alignment``, 4096): [gate_proj | up_proj | down_proj] of expert e exactly as
                         the source stores them (float, or MLX affine: packed uint32 words, scales,
                         biases of each projection), zero padding to the alignment. Layer l's region
                         starts at ``layers[l].offset`` (aligned) and holds ``num_experts`` bundles.
      dense.safetensors  everything else, mlx-lm key names: router (``gate``), shared experts, dense
                         MLP layers, attention, embeddings, norms, lm_head; quantized modules stay
                         quantized (``model_args["quantization"]``)
      config.json, tokenizer.json, ...   copied from the source

``segments`` lists each piece of a bundle: ``{name, start, stop, dtype, shape}`` (bytes
``[start, stop)``, the per-expert array's dtype and shape, e.g. ``gate`` uint32 ``(768, 256)``,
``gate.scales`` float16 ``(768, 32)``, ``down`` ...; a trailing ``pad`` of uint8 when needed).
Nobody else computes an offset into ``experts.bin``: the flash reader reads bundles through
:meth:`MoeFiles.storage_view` (experts as the reader's "bundles"), the checksums and the
background verifier hash layer regions through the same view.

Writes are atomic (``atomic.FolderBuild``: temp folder, renamed into place when complete);
every layer region and ``dense.safetensors`` carry blake2b checksums (read back after writing,
hashed again in the background at every load).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import mlx.core as mx
import numpy as np

from ..atomic import FolderBuild, atomic_write_text, fsync_dir
from ..families import BY_MOE_MODEL_TYPE, MOE_FAMILIES
from ..progress import ProgressCallback, report, scaled
from ..storage.format import (
    ALIGNMENT,
    MANIFEST_CHECKSUM,
    ChecksumError,
    FlashFiles,
    FlashFormatError,
    LayerEntry,
    LayerHasher,
    check_signed,
    file_checksum,
    load_weight_shards,
    read_model_config,
    signed,
    source_files,
    typed_fields,
    verify_file,
)
from ..storage.platform_io import drop_page_cache, set_nocache

FORMAT = "mlx-flash-moe"
FORMAT_VERSION = 1
MANIFEST_FILE = "moe_manifest.json"
EXPERTS_FILE = "experts.bin"
DENSE_FILE = "dense.safetensors"
ROLES = ("gate", "up", "down")
"""The projections of one expert, in bundle order (``<switch_mlp>.<role>_proj``)."""

_FLOATS = ("float16", "bfloat16", "float32")
_OWN = {MANIFEST_FILE, EXPERTS_FILE, DENSE_FILE}


def is_moe_flash_dir(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a MoE flash folder (has ``moe_manifest.json``)."""
    return (Path(path) / MANIFEST_FILE).is_file()


def is_moe_config(config: Mapping[str, Any]) -> bool:
    """Whether a config.json is one of the MoE families (``families.MOE_FAMILIES``)."""
    return config.get("model_type") in BY_MOE_MODEL_TYPE


@dataclass(frozen=True)
class Segment:
    """One piece of an expert bundle: bytes ``[start, stop)``, the per-expert array's dtype and shape."""

    name: str
    start: int
    stop: int
    dtype: str
    shape: Tuple[int, ...]

    @property
    def role(self) -> str:
        return self.name.split(".")[0]


@dataclass
class MoeManifest:
    """Contents of ``moe_manifest.json`` (see the module docstring)."""

    architecture: str
    model_args: Dict[str, Any]
    dtype: str
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    modules: List[str]
    segments: List[Dict[str, Any]]
    expert_bytes: int
    layers: List[LayerEntry]
    experts_size: int
    quantization: Dict[str, Any]
    alignment: int = ALIGNMENT
    experts_file: str = EXPERTS_FILE
    dense_file: str = DENSE_FILE
    checksums: Dict[str, str] = field(default_factory=dict)
    expert_frequencies: Optional[List[List[float]]] = None
    calibration: Optional[Dict[str, Any]] = None
    source: str = ""
    created: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # ---- derived
    @property
    def num_layers(self) -> int:
        """MoE layers (layers with experts; dense MLP layers are in ``dense.safetensors``)."""
        return len(self.layers)

    @property
    def expert_data_bytes(self) -> int:
        """Bytes of one expert without the alignment padding (what a cache row holds)."""
        return sum(s.stop - s.start for s in self.segment_list() if s.name != "pad")

    @property
    def ffn_bytes_total(self) -> int:
        """All experts' bytes, padding excluded: what the budget's fraction refers to."""
        return self.num_layers * self.num_experts * self.expert_data_bytes

    def segment_list(self) -> List[Segment]:
        return [Segment(d["name"], int(d["start"]), int(d["stop"]), d["dtype"], tuple(d["shape"]))
                for d in self.segments]

    def expert_offset(self, layer: int, expert: int) -> int:
        """Byte offset in ``experts.bin`` of ``expert``'s bundle in MoE layer ``layer``."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"MoE layer {layer} out of range: the model has {self.num_layers}")
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} out of range: layers have {self.num_experts}")
        return self.layers[layer].offset + expert * self.expert_bytes

    def to_json(self) -> str:
        return json.dumps(signed(asdict(self)), indent=1)

    @classmethod
    def from_json(cls, text: Union[str, bytes], where: str) -> "MoeManifest":
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FlashFormatError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise FlashFormatError(f"{where}: expected a JSON object")
        check_signed(d, where)
        d.pop(MANIFEST_CHECKSUM, None)
        types: Dict[str, Union[type, Tuple[type, ...]]] = {
            "architecture": str, "model_args": dict, "dtype": str, "num_experts": int, "top_k": int,
            "hidden_size": int, "expert_intermediate_size": int, "modules": list, "segments": list,
            "expert_bytes": int, "layers": list, "experts_size": int, "quantization": dict,
            "alignment": int, "experts_file": str, "dense_file": str, "checksums": dict,
            "expert_frequencies": (list, type(None)), "calibration": (dict, type(None)), "source": str,
            "created": str, "format": str, "format_version": int}
        optional = {"alignment", "experts_file", "dense_file", "checksums", "expert_frequencies", "calibration",
                    "source", "created"}
        if d.get("format") != FORMAT:
            raise FlashFormatError(f"{where}: field 'format' is {d.get('format')!r}, expected {FORMAT!r}")
        kw = typed_fields(d, {k: t for k, t in types.items() if k not in optional},
                          {k: t for k, t in types.items() if k in optional}, where)
        layers = []
        for i, entry in enumerate(kw["layers"]):
            try:
                off, size, ck = int(entry["offset"]), int(entry["size"]), str(entry["checksum"])
            except (KeyError, TypeError, ValueError):
                raise FlashFormatError(f"{where}: field 'layers[{i}]' needs offset, size and checksum") from None
            layers.append(LayerEntry(off, size, ck))
        kw["layers"] = layers
        return cls(**kw)

    def save(self, folder: Union[str, Path]) -> Path:
        """Write ``folder/moe_manifest.json`` atomically (temp file + rename)."""
        return atomic_write_text(Path(folder) / MANIFEST_FILE, self.to_json())


def validate(m: MoeManifest, where: str) -> None:
    """The manifest's own consistency (no file access); FlashFormatError naming the field."""
    if m.format_version != FORMAT_VERSION:
        raise FlashFormatError(f"{where}: field 'format_version' is {m.format_version}; this mlx-flash reads "
                               f"MoE version {FORMAT_VERSION} (convert the model again)")
    if m.architecture not in BY_MOE_MODEL_TYPE:
        raise FlashFormatError(f"{where}: field 'architecture' is {m.architecture!r}: not a supported MoE family "
                               f"({', '.join(f.label for f in MOE_FAMILIES)})")
    if m.dtype not in _FLOATS:
        raise FlashFormatError(f"{where}: field 'dtype' is {m.dtype!r}, expected one of {_FLOATS}")
    for name in ("num_experts", "top_k", "hidden_size", "expert_intermediate_size", "expert_bytes", "alignment"):
        if getattr(m, name) <= 0:
            raise FlashFormatError(f"{where}: field '{name}' must be > 0")
    if m.top_k > m.num_experts:
        raise FlashFormatError(f"{where}: field 'top_k' ({m.top_k}) exceeds num_experts ({m.num_experts})")
    if m.expert_bytes % m.alignment:
        raise FlashFormatError(f"{where}: field 'expert_bytes' ({m.expert_bytes}) is not a multiple of "
                               f"alignment {m.alignment}")
    edge = 0
    try:
        segs = m.segment_list()
    except (KeyError, TypeError, ValueError):
        raise FlashFormatError(f"{where}: field 'segments' entries need name, start, stop, dtype, shape") from None
    for s in segs:
        item = np.dtype(s.dtype if s.dtype != "bfloat16" else "uint16").itemsize
        if s.start != edge or s.stop <= s.start or int(np.prod(s.shape)) * item != s.stop - s.start:
            raise FlashFormatError(f"{where}: field 'segments' ({s.name}) does not tile the expert bundle")
        edge = s.stop
    if edge != m.expert_bytes:
        raise FlashFormatError(f"{where}: field 'segments' covers {edge} bytes, expert_bytes is {m.expert_bytes}")
    if {s.role for s in segs} - {"pad"} != set(ROLES):
        raise FlashFormatError(f"{where}: field 'segments' must hold gate, up and down")
    if len(m.modules) != len(m.layers):
        raise FlashFormatError(f"{where}: field 'modules' has {len(m.modules)} entries, 'layers' {len(m.layers)}")
    size = m.num_experts * m.expert_bytes
    prev = 0
    for i, e in enumerate(m.layers):
        if e.size != size:
            raise FlashFormatError(f"{where}: field 'layers[{i}].size' is {e.size}, expected num_experts * "
                                   f"expert_bytes = {size}")
        if e.offset % m.alignment or e.offset < prev or e.offset + e.size > m.experts_size:
            raise FlashFormatError(f"{where}: field 'layers[{i}].offset' ({e.offset}) is misaligned, overlaps "
                                   f"or runs past experts_size {m.experts_size}")
        prev = e.offset + e.size
    if m.expert_frequencies is not None:
        f = m.expert_frequencies
        if len(f) != m.num_layers or any(len(r) != m.num_experts for r in f):
            raise FlashFormatError(f"{where}: field 'expert_frequencies' must be num_layers x num_experts")
    for name in (m.experts_file, m.dense_file):
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise FlashFormatError(f"{where}: file names must be plain names, got {name!r}")


# --------------------------------------------------------------------------- opening
@dataclass
class _BundleIndex:
    """The storage layer's view of a MoE folder: each MoE layer's experts as bundles
    (what ``storage.reader.FlashReader``, ``storage.format.LayerHasher`` and
    ``storage.verify.BackgroundVerifier`` read through ``FlashFiles.manifest``)."""

    num_layers: int
    intermediate_size: int  # bundles per layer: the experts
    bundle_bytes: int
    alignment: int
    layers: List[LayerEntry]
    checksums: Dict[str, str]
    dense_file: str
    ffn_file: str

    def layer_range(self, layer: int) -> Tuple[int, int]:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"MoE layer {layer} out of range: the model has {self.num_layers}")
        e = self.layers[layer]
        return e.offset, e.size


@dataclass
class MoeFiles:
    """A validated MoE flash folder: manifest and file paths."""

    root: Path
    manifest: MoeManifest
    experts_path: Path
    dense_path: Path

    def storage_view(self) -> FlashFiles:
        """``experts.bin`` as a flash folder whose bundles are experts (for the reader and the hashers)."""
        m = self.manifest
        index = _BundleIndex(m.num_layers, m.num_experts, m.expert_bytes, m.alignment, m.layers, m.checksums,
                             m.dense_file, m.experts_file)
        return FlashFiles(root=self.root, manifest=index, ffn_path=self.experts_path,  # type: ignore[arg-type]
                          dense_path=self.dense_path)


def open_moe_flash(path: Union[str, Path]) -> MoeFiles:
    """Open and validate a MoE flash folder (manifest, ``experts.bin``'s size, the dense file);
    checksums are not read here (:func:`verify_moe_checksums`, or the engine's background verifier)."""
    root = Path(path).expanduser()
    mpath = root / MANIFEST_FILE
    if not mpath.is_file():
        raise FlashFormatError(f"{mpath}: {MANIFEST_FILE} is missing (not a MoE flash folder?)")
    m = MoeManifest.from_json(mpath.read_bytes(), str(mpath))
    validate(m, str(mpath))
    ep, dp = root / m.experts_file, root / m.dense_file
    if not ep.is_file():
        raise FlashFormatError(f"{ep}: {m.experts_file} is missing")
    actual = ep.stat().st_size
    if actual != m.experts_size:
        what = "truncated" if actual < m.experts_size else "larger than the manifest says"
        raise FlashFormatError(f"{ep}: {m.experts_file} is {what}: {actual} bytes, manifest field "
                               f"'experts_size' says {m.experts_size}")
    if not dp.is_file():
        raise FlashFormatError(f"{dp}: {m.dense_file} is missing")
    return MoeFiles(root, m, ep, dp)


def verify_moe_checksums(files: MoeFiles, progress: Optional[ProgressCallback] = None) -> List[str]:
    """Hash every expert layer region and ``dense.safetensors`` against the manifest; a
    mismatch raises :class:`ChecksumError` naming the file (and the layer)."""
    view = files.storage_view()
    checked = []
    for name in sorted(files.manifest.checksums):
        verify_file(view, name)
        checked.append(name)
    n = files.manifest.num_layers
    with LayerHasher(view) as hasher:
        for i in range(n):
            report(progress, i / max(n, 1), f"checking {files.manifest.experts_file} layer {i + 1}/{n}")
            hasher.verify(i)
    checked.append(f"{files.manifest.experts_file} ({n} layers)")
    report(progress, 1.0, "checksums ok")
    return checked


def read_expert_arrays(files: MoeFiles, layer: int) -> Dict[str, mx.array]:
    """Every expert of ``layer`` as mlx-lm's ``SwitchGLU`` tensors (``gate_proj.weight``
    ``(E, ...)``, ``gate_proj.scales`` ...), checked against the layer's checksum (a
    :class:`ChecksumError` naming the layer): the dense engine's and the tests' way in."""
    m = files.manifest
    off, size = m.layers[layer].offset, m.layers[layer].size
    with open(files.experts_path, "rb") as f:
        f.seek(off)
        raw = f.read(size)
    if len(raw) != size:
        raise FlashFormatError(f"{files.experts_path}: unexpected end of file in layer {layer}")
    if hashlib.blake2b(raw).hexdigest() != m.layers[layer].checksum:
        raise ChecksumError(f"{files.experts_path}: layer {layer} checksum mismatch (manifest field "
                            f"'layers[{layer}].checksum'): the file is corrupt or was modified")
    block = np.frombuffer(raw, dtype=np.uint8).reshape(m.num_experts, m.expert_bytes)
    out = {}
    for s in m.segment_list():
        if s.name == "pad":
            continue
        a = mx.array(np.ascontiguousarray(block[:, s.start : s.stop])).view(segment_dtype(s.dtype))
        out[tensor_key(s.name)] = a.reshape((m.num_experts,) + s.shape)
    return out


def segment_dtype(name: str) -> mx.Dtype:
    return getattr(mx, name)


def tensor_key(segment: str) -> str:
    """``gate`` -> ``gate_proj.weight``, ``gate.scales`` -> ``gate_proj.scales`` (under the SwitchGLU)."""
    role, _, kind = segment.partition(".")
    return f"{role}_proj.{kind or 'weight'}"


# --------------------------------------------------------------------------- converting
def _host_bytes(a: mx.array) -> np.ndarray:
    """``(E, ...)`` array -> ``(E, bytes per expert)`` uint8 (a copy on the host)."""
    mx.eval(a)
    return np.array(a.view(mx.uint8)).reshape(a.shape[0], -1)


def _role_segments(weights: Mapping[str, mx.array], module: str, role: str, in_dim: int, where: str):
    """``[(segment name, (E, ...) array)]`` of one projection, as stored in the source, plus its
    quantization entry (``{"bits", "group_size", "mode"}`` or ``"none"``)."""
    mod = f"{module}.{role}_proj"
    w = weights.get(f"{mod}.weight")
    if w is None:
        raise FlashFormatError(f"{where}: tensor {mod}.weight is missing")
    if f"{mod}.bias" in weights:
        raise FlashFormatError(f"{where}: tensor {mod}.bias: experts with biases are not supported")
    s = weights.get(f"{mod}.scales")
    if s is None:
        if w.dtype not in (mx.float16, mx.bfloat16, mx.float32):
            raise FlashFormatError(f"{where}: tensor {mod}.weight has dtype {w.dtype}, expected floats")
        return [(role, w)], "none"
    b = weights.get(f"{mod}.biases")
    if b is None or w.dtype != mx.uint32 or (w.shape[-1] * 32) % in_dim or in_dim % s.shape[-1]:
        raise FlashFormatError(f"{where}: {mod} is quantized in a way mlx-flash cannot store (affine "
                               f"weight/scales/biases expected)")
    q = {"bits": w.shape[-1] * 32 // in_dim, "group_size": in_dim // s.shape[-1], "mode": "affine"}
    return [(role, w), (f"{role}.scales", s), (f"{role}.biases", b)], q


def _model_skeleton(config: Dict[str, Any], where: str):
    from mlx_lm.utils import _get_classes  # noqa: PLC0415 - mlx-lm (seconds to import): only a conversion needs it

    if not is_moe_config(config):
        raise FlashFormatError(f"{where}: model_type {config.get('model_type')!r} is not a supported MoE family "
                               f"({', '.join(f.label for f in MOE_FAMILIES)})")
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def convert_to_moe_flash(src: Union[str, Path], dst: Union[str, Path], *,
                         progress: Optional[ProgressCallback] = None, overwrite: bool = False,
                         source: Optional[str] = None) -> Path:
    """Convert an mlx-lm MoE folder (float or quantized; Hugging Face per-expert names are
    stacked by mlx-lm's own ``sanitize``) into a MoE flash folder at ``dst``; return ``dst``.
    Experts keep the source's dtype and quantization exactly. ``progress`` per layer;
    returning False cancels (no trace left)."""
    src = Path(src).expanduser()
    cfg_path = src / "config.json"
    config = read_model_config(src)
    model = _model_skeleton(config, str(cfg_path))
    weights: Dict[str, mx.array] = {}
    for part in load_weight_shards(src):
        weights.update(part)  # lazy
    from ..models import sanitize  # noqa: PLC0415 - mlx-lm (seconds to import): only a conversion needs it

    weights = sanitize(model, weights)  # Hugging Face per-expert tensors -> mlx-lm's stacked SwitchGLU ones
    extra = source_files(src, own=_OWN)
    return write_moe_flash(dst, config=config, weights=weights, extra_files=extra,
                           source=source or str(src.resolve()), progress=progress, overwrite=overwrite)


def write_moe_flash(dst: Union[str, Path], *, config: Dict[str, Any], weights: Dict[str, mx.array],
                    extra_files: Optional[Mapping[str, Union[Path, str, bytes]]] = None, source: str = "",
                    progress: Optional[ProgressCallback] = None, overwrite: bool = False) -> Path:
    """Write a MoE flash folder from a config and mlx-lm-named (sanitized) weights, which may be
    lazy: each layer's experts are evaluated, written and dropped in turn. ``extra_files``:
    name -> source path or content (tokenizer files, config.json)."""
    from .switch import switch_modules  # noqa: PLC0415 - imports mlx-lm (seconds): only a conversion needs it

    dst = Path(dst).expanduser()
    what = source or "source model"
    mods = switch_modules(_model_skeleton(config, what))
    if not mods:
        raise FlashFormatError(f"{what}: the model has no SwitchGLU expert layers")

    # ---- the bundle layout, from the first layer (every layer must match it)
    first, glu = mods[0]
    n_exp, inter, hidden = (int(d) for d in glu.gate_proj.weight.shape)  # the skeleton is float: (E, inter, hidden)
    segs: List[Dict[str, Any]] = []
    quant: Dict[str, Any] = {}
    pos = 0
    float_dtype = None
    for role in ROLES:
        pieces, q = _role_segments(weights, first, role, inter if role == "down" else hidden, what)
        quant[role] = q
        for name, arr in pieces:
            if arr.shape[0] != n_exp:
                raise FlashFormatError(f"{what}: {first}.{tensor_key(name)} has {arr.shape[0]} experts, "
                                       f"expected {n_exp}")
            nb = arr.nbytes // n_exp
            dt = str(arr.dtype).rsplit(".", 1)[-1]
            if dt in _FLOATS:
                float_dtype = float_dtype or dt
            segs.append({"name": name, "start": pos, "stop": pos + nb, "dtype": dt, "shape": list(arr.shape[1:])})
            pos += nb
    bundle = -(-pos // ALIGNMENT) * ALIGNMENT
    if bundle > pos:
        segs.append({"name": "pad", "start": pos, "stop": bundle, "dtype": "uint8", "shape": [bundle - pos]})
    region = n_exp * bundle
    offsets = [i * region for i in range(len(mods))]
    experts_size = len(mods) * region
    expert_keys = {f"{p}.{role}_proj.{k}" for p, _ in mods for role in ROLES for k in ("weight", "scales", "biases")}
    dense_bytes = sum(v.nbytes for k, v in weights.items() if k not in expert_keys)
    build = FolderBuild(dst, overwrite=overwrite, need=experts_size + dense_bytes + (1 << 20))
    tmp = build.tmp
    try:
        report(progress, 0.0, f"converting {len(mods)} MoE layers")
        entries: List[LayerEntry] = []
        with open(tmp / EXPERTS_FILE, "wb") as f:
            set_nocache(f.fileno())
            for i, (path, _) in enumerate(mods):
                cols = []
                for role in ROLES:
                    pieces, q = _role_segments(weights, path, role, inter if role == "down" else hidden, what)
                    if q != quant[role]:
                        raise FlashFormatError(f"{what}: {path}.{role}_proj is quantized as {q}, layer 0 as "
                                               f"{quant[role]}: mixed expert quantization is not supported")
                    for name, arr in pieces:
                        seg = next(s for s in segs if s["name"] == name)
                        if list(arr.shape[1:]) != seg["shape"] or arr.shape[0] != n_exp:
                            raise FlashFormatError(f"{what}: tensor {path}.{tensor_key(name)} has shape "
                                                   f"{tuple(arr.shape)}, expected {(n_exp, *seg['shape'])}")
                        cols.append(_host_bytes(arr))
                if bundle > pos:
                    cols.append(np.zeros((n_exp, bundle - pos), dtype=np.uint8))
                raw = np.ascontiguousarray(np.concatenate(cols, axis=1)).reshape(-1)
                assert raw.nbytes == region
                f.write(raw.data)
                entries.append(LayerEntry(offsets[i], region, hashlib.blake2b(raw.data).hexdigest()))
                for role in ROLES:
                    for k in ("weight", "scales", "biases"):
                        weights.pop(f"{path}.{role}_proj.{k}", None)
                del raw, cols
                mx.clear_cache()
                report(progress, (i + 1) / (len(mods) + 1), f"MoE layer {i + 1}/{len(mods)}")
            f.flush()
            os.fsync(f.fileno())
        drop_page_cache(tmp / EXPERTS_FILE)
        dense = {k: v for k, v in weights.items() if k not in expert_keys}
        mx.save_safetensors(str(tmp / DENSE_FILE), dense, metadata={"format": "mlx"})
        if float_dtype is None:
            float_dtype = next((str(v.dtype).rsplit(".", 1)[-1] for v in dense.values()
                                if str(v.dtype).rsplit(".", 1)[-1] in _FLOATS), "float16")
        del dense
        for name, content in (extra_files or {}).items():
            if "/" in name or name in _OWN:
                raise FlashFormatError(f"{what}: extra file name {name!r} is not allowed")
            data = content.read_bytes() if isinstance(content, Path) else \
                (content.encode() if isinstance(content, str) else content)
            (tmp / name).write_bytes(data)
        if not (tmp / "config.json").exists():
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        m = MoeManifest(
            architecture=str(config["model_type"]), model_args=config, dtype=float_dtype, num_experts=int(n_exp),
            top_k=int(config.get("num_experts_per_tok", 2)), hidden_size=hidden, expert_intermediate_size=int(inter),
            modules=[p for p, _ in mods], segments=segs, expert_bytes=bundle, layers=entries,
            experts_size=experts_size, quantization=quant, checksums={DENSE_FILE: file_checksum(tmp / DENSE_FILE)},
            source=source, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        validate(m, str(dst / MANIFEST_FILE))
        m.save(tmp)
        fsync_dir(tmp)
        verify_moe_checksums(open_moe_flash(tmp), progress=scaled(progress, len(mods) / (len(mods) + 1), 0.999))
        report(progress, 1.0, "publishing")
    except BaseException as e:
        if (t := build.fail(e)) is e:
            raise
        raise t from e
    return build.publish()


def save_frequencies(files: MoeFiles, frequencies: np.ndarray, info: Mapping[str, Any]) -> MoeManifest:
    """Record calibrated expert frequencies (``(num_layers, num_experts)``, share of tokens routed to
    each expert) and how they were measured in the manifest (rewritten atomically)."""
    m = files.manifest
    f = np.asarray(frequencies, dtype=np.float64)
    if f.shape != (m.num_layers, m.num_experts):
        raise ValueError(f"frequencies must have shape {(m.num_layers, m.num_experts)}, got {f.shape}")
    m.expert_frequencies = [[round(float(v), 6) for v in row] for row in f]
    m.calibration = dict(info)
    validate(m, str(files.root / MANIFEST_FILE))
    m.save(files.root)
    return m


__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST_FILE", "EXPERTS_FILE", "DENSE_FILE", "ROLES", "Segment",
           "MoeManifest", "MoeFiles", "validate", "open_moe_flash", "verify_moe_checksums", "read_expert_arrays",
           "convert_to_moe_flash", "save_frequencies", "is_moe_flash_dir", "is_moe_config", "tensor_key",
           "segment_dtype"]
