"""Import a GGUF file (llama.cpp's format) of a supported family as an mlx-lm model folder.

Families (``general.architecture``): see :mod:`mlx_flash.families` (llama, qwen2, qwen3,
gemma2, gemma3, phi3). Tensor names come from gguf-py's ``TensorNameMap`` applied to the
parameter names of mlx-lm's own model class for the config the metadata gives
(:func:`model_tensors`, :func:`gguf_tensor_names`); Gemma norms, stored by llama.cpp as
``w + 1``, get 1 subtracted (the family's ``gguf_norm_shift``).

The result is what ``mlx_lm.load`` reads: ``config.json`` (Hugging Face names),
``model.safetensors`` (Hugging Face tensor names; quantized blocks repacked as MLX affine
quantization with group size 32, see :data:`KEEP_BITS`, or everything dequantized to a
float ``dtype``),
``tokenizer.json`` (built with the ``tokenizers`` library from the GGUF's vocabulary),
``tokenizer_config.json`` (chat template, special tokens) and ``special_tokens_map.json``.

How it reads the file (the way llama.cpp's loader does): the header, the metadata and
the tensor index are parsed first with every read bounds-checked against the file size,
then every tensor's data range is checked to lie inside the file, and only then is any
data touched (through a read-only memory map, one tensor at a time, so memory stays
near the size of the largest tensor plus one output shard). A short or damaged file is a
:class:`GGUFError` naming the file and what is missing. The ``gguf`` package (llama.cpp's
``gguf-py``) supplies the type tables and the numpy dequantizers.

For the llama architecture only, llama.cpp stores the rows of the q and k projections permuted for its interleaved RoPE
(``convert_hf_to_gguf.py``: ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)``);
:func:`unpermute_qk` applies the inverse to give the Hugging Face order that mlx-lm's
RoPE expects.

Writing is atomic: everything goes into a hidden temporary folder next to ``dst`` that
is renamed to ``dst`` at the end; on any error (or a cancel from the progress callback)
the temporary folder is removed and ``dst`` is left as it was (:mod:`mlx_flash.atomic`: the
destination is locked while it is written).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES, Keys
from gguf.quants import Q4_K
from gguf.tensor_mapping import get_tensor_name_map
from mlx.utils import tree_flatten
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tokenizers import pre_tokenizers as pt

from ..atomic import DISK_FULL, FolderBuild, WriteError, free_bytes, write_error
from ..families import BY_GGUF_ARCH, Family, supported_text
from ..progress import ProgressCallback, report, scaled
from ..units import fmt_bytes

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
SUPPORTED_ARCHITECTURES = tuple(BY_GGUF_ARCH)
GGML_MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32

#: Float dtypes ``convert_gguf`` can dequantize to (``dtype=None`` keeps the quantization).
DTYPES = ("bfloat16", "float16", "float32")
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

#: Group size of every quantized tensor written (MLX's affine modes take 32, 64 or 128).
GROUP_SIZE = 32

#: With ``dtype=None``: the MLX affine bits (group 32) each GGML block type is written with.
#: The "exact" types are repacked as they are (scale and bias per 32 weights; only the
#: float16 rounding of the K-quants' products d*scale and dmin*min differs); the others
#: have 16-weight sub-blocks (MLX's group sizes are 32, 64, 128) and are dequantized and
#: quantized again (:func:`requantize`: min/max affine, error at most half a new step).
KEEP_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5,
             "Q6_K": 8, "Q3_K": 5, "Q2_K": 3}
REQUANTIZED = ("Q6_K", "Q3_K", "Q2_K")

#: Float tensor types with ``dtype=None``: F16/BF16 keep their type; F32 (norms, biases)
#: becomes float16 like the quantized tensors' scales (what mlx-lm's quantized folders hold).
_KEEP_FLOAT = {"F32": "float16", "F16": "float16", "BF16": "bfloat16"}

#: Largest single ``model*.safetensors`` file written (mlx-lm's own limit is 5 GB).
DEFAULT_MAX_SHARD_BYTES = 4 << 30


class GGUFError(ValueError):
    """A GGUF file that cannot be read or converted; the message says why."""


# ---------------------------------------------------------------------------------------
# Tensor types
# ---------------------------------------------------------------------------------------

def _ggml_types():
    return GGMLQuantizationType, GGML_QUANT_SIZES


def supported_tensor_types() -> Tuple[str, ...]:
    """Names of the GGML tensor types :func:`convert_gguf` can dequantize.

    Plain floats, the legacy block quants (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the K-quants
    (Q2_K .. Q6_K) that most published llama GGUFs use. I-quants and ternary types are
    not included.
    """
    return ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
            "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


# ---------------------------------------------------------------------------------------
# The index: header, metadata, tensor infos (bounds-checked)
# ---------------------------------------------------------------------------------------

# GGUF metadata value types (gguf.GGUFValueType): id -> (struct format, size)
_SCALAR_FORMATS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NUMPY_FORMATS = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Bounds-checked little-endian reads from a byte buffer."""

    def __init__(self, buf, path: Path):
        self.buf = buf
        self.path = path
        self.size = len(buf)
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(
                f"{self.path}: file is truncated or corrupt: {what} needs bytes "
                f"{self.pos}..{self.pos + n} but the file has only {self.size} bytes"
            )

    def scalar(self, fmt: str, n: int, what: str):
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        if fmt == "<f":  # shortest decimal that round-trips float32: 1e-05, not 9.99999974e-06
            v = float(str(np.float32(v)))
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALAR_FORMATS:
            fmt, n = _SCALAR_FORMATS[vtype]
            return self.scalar(fmt, n, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth > 2:
                raise GGUFError(f"{self.path}: {what}: arrays nested too deeply")
            itype = self.u32(f"item type of {what}")
            count = self.u64(f"length of {what}")
            if itype in _NUMPY_FORMATS:
                n = _SCALAR_FORMATS[itype][1] * count
                self.need(n, f"{what} ({count} items)")
                arr: Any = np.frombuffer(self.buf, dtype=_NUMPY_FORMATS[itype], count=count, offset=self.pos)
                self.pos += n
                return arr.tolist()
            if itype not in (_STRING, _ARRAY):
                raise GGUFError(f"{self.path}: {what}: unknown array item type {itype}")
            # every item takes at least 8 bytes: reject impossible counts before looping
            self.need(8 * count, f"{what} ({count} items)")
            return [self.value(itype, f"{what}[{i}]", depth + 1) for i in range(count)]
        raise GGUFError(f"{self.path}: {what}: unknown metadata value type {vtype}")


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of the index. ``dims`` are GGML's (fastest first); ``shape`` is numpy's."""

    name: str
    dims: Tuple[int, ...]
    type_id: int
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        return int(math.prod(self.dims))

    @property
    def type_name(self) -> str:
        qtype, _ = _ggml_types()
        try:
            return qtype(self.type_id).name
        except ValueError:
            return f"type#{self.type_id}"


@dataclass
class GGUFFile:
    """A parsed, validated GGUF index. Tensor data is read on demand via ``mmap``."""

    path: Path
    version: int
    alignment: int
    data_offset: int
    file_size: int
    metadata: Dict[str, Any]
    tensors: Dict[str, GGUFTensorInfo]
    _map: Optional[mmap.mmap] = field(default=None, repr=False)

    @classmethod
    def open(cls, path) -> "GGUFFile":
        """Parse and validate ``path``; raises :class:`GGUFError` on any problem."""
        path = Path(path)
        try:
            size = path.stat().st_size
            f = open(path, "rb")
        except FileNotFoundError:
            raise
        except OSError as e:
            raise GGUFError(f"{path}: cannot open: {e.strerror or e}") from e
        with f:
            if size < 24:
                head = f.read(4)
                if head != GGUF_MAGIC:
                    raise GGUFError(f"{path}: not a GGUF file (starts with {head!r}, expected b'GGUF')")
                raise GGUFError(f"{path}: file is truncated: {size} bytes, shorter than a GGUF header (24 bytes)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return cls._parse(path, mm)
        except BaseException:
            mm.close()
            raise

    @classmethod
    def _parse(cls, path: Path, mm: mmap.mmap) -> "GGUFFile":
        cur = _Cursor(mm, path)
        magic = bytes(mm[:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        cur.pos = 4
        version = cur.u32("version")
        if version & 0xFFFF == 0 and version != 0:
            raise GGUFError(f"{path}: big-endian GGUF files are not supported")
        if version not in SUPPORTED_VERSIONS:
            raise GGUFError(f"{path}: GGUF version {version} is not supported (supported: 2, 3)")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # each metadata entry takes >= 8+4 bytes, each tensor info >= 8+4+8+4+8
        cur.need(12 * n_kv + 32 * n_tensors, f"index of {n_kv} metadata entries and {n_tensors} tensors")

        metadata: Dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.u32(f"type of metadata '{key}'")
            if key in metadata:
                raise GGUFError(f"{path}: duplicate metadata key '{key}'")
            metadata[key] = cur.value(vtype, f"metadata '{key}'")

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{path}: invalid general.alignment {alignment!r} (must be a power of two)")

        qtype, quant_sizes = _ggml_types()
        raw: List[Tuple[str, Tuple[int, ...], int, int]] = []
        for i in range(n_tensors):
            name = cur.string(f"name of tensor #{i}")
            n_dims = cur.u32(f"rank of tensor '{name}'")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise GGUFError(f"{path}: tensor '{name}' has {n_dims} dimensions (1..{GGML_MAX_DIMS} allowed)")
            dims = tuple(cur.u64(f"shape of tensor '{name}'") for _ in range(n_dims))
            type_id = cur.u32(f"type of tensor '{name}'")
            offset = cur.u64(f"offset of tensor '{name}'")
            raw.append((name, dims, type_id, offset))

        data_offset = -(-cur.pos // alignment) * alignment
        tensors: Dict[str, GGUFTensorInfo] = {}
        for name, dims, type_id, offset in raw:
            if name in tensors:
                raise GGUFError(f"{path}: duplicate tensor '{name}'")
            if any(d <= 0 for d in dims) or math.prod(dims) >= 1 << 62:
                raise GGUFError(f"{path}: tensor '{name}' has an invalid shape {list(dims)}")
            try:
                ttype = qtype(type_id)
                block, type_size = quant_sizes[ttype]
            except (ValueError, KeyError):
                raise GGUFError(f"{path}: tensor '{name}' has an unknown type id {type_id}") from None
            if dims[0] % block:
                raise GGUFError(
                    f"{path}: tensor '{name}': row length {dims[0]} is not a multiple of "
                    f"the {ttype.name} block size {block}"
                )
            if offset % alignment:
                raise GGUFError(f"{path}: tensor '{name}': data offset {offset} is not {alignment}-byte aligned")
            n_bytes = math.prod(dims) // block * type_size
            start = data_offset + offset
            if start + n_bytes > len(mm):
                raise GGUFError(
                    f"{path}: file is truncated: tensor '{name}' ({ttype.name} {list(dims)}) needs bytes "
                    f"{start}..{start + n_bytes} but the file has only {len(mm)} bytes "
                    f"({start + n_bytes - len(mm)} bytes short)"
                )
            tensors[name] = GGUFTensorInfo(name, dims, type_id, start, n_bytes)
        return cls(path, version, alignment, data_offset, len(mm), metadata, tensors, mm)

    # -- data ----------------------------------------------------------------------

    def raw_bytes(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the memory map."""
        info = self.tensors[name]
        if self._map is None:
            raise GGUFError(f"{self.path}: the file is closed")
        return np.frombuffer(self._map, dtype=np.uint8, count=info.n_bytes, offset=info.offset)

    def read_float32(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32 in numpy order (``info.shape``)."""
        info = self.tensors[name]
        qtype, quant_sizes = _ggml_types()
        ttype = qtype(info.type_id)
        if ttype.name not in supported_tensor_types():
            raise GGUFError(
                f"{self.path}: tensor '{name}' has type {ttype.name}, which is not supported "
                f"(supported: {', '.join(supported_tensor_types())})"
            )
        data = self.raw_bytes(name)
        if ttype.name == "F32":
            out = data.view(np.float32).astype(np.float32)
        elif ttype.name == "F16":
            out = data.view(np.float16).astype(np.float32)
        elif ttype.name == "BF16":
            out = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            block, type_size = quant_sizes[ttype]
            rows = info.n_elements // info.dims[0]
            out = quants.dequantize(data.reshape(rows, info.dims[0] // block * type_size), ttype)
            out = np.asarray(out, dtype=np.float32)
        return out.reshape(info.shape)

    def read_quantized(self, name: str, bits: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The 2-D quantized tensor ``name`` in MLX's affine layout with group size 32:
        ``(weight, scales, biases)``, ``weight`` packed into uint32 (``cols * bits / 32``
        per row), scales and biases float32 (``cols / 32`` per row), so that
        ``w = scales * q + biases`` per group of 32.

        Exact types (:data:`KEEP_BITS` minus :data:`REQUANTIZED`) are repacked from their
        blocks, ``bits`` being theirs; the others are dequantized and quantized again
        (:func:`requantize`) at ``bits``.
        """
        info = self.tensors[name]
        kind = info.type_name
        if len(info.dims) != 2 or kind not in KEEP_BITS:
            raise GGUFError(f"{self.path}: tensor '{name}' ({kind} {list(info.shape)}) cannot be kept quantized")
        rows, cols = info.shape
        if kind in REQUANTIZED:
            return requantize(self.read_float32(name), bits)
        if bits != KEEP_BITS[kind]:
            raise GGUFError(f"{self.path}: tensor '{name}' is {kind}, which maps to {KEEP_BITS[kind]} bits, not {bits}")
        _, quant_sizes = _ggml_types()
        block, type_size = quant_sizes[info.type_id]
        blocks = self.raw_bytes(name).reshape(rows, cols // block, type_size)
        out_w = np.empty((rows, cols * bits // 32), np.uint32)
        out_s = np.empty((rows, cols // GROUP_SIZE), np.float32)
        out_b = np.empty_like(out_s)
        step = max(1, (1 << 22) // cols)  # rows per chunk: the temporaries stay ~100 MB
        for r in range(0, rows, step):
            chunk = blocks[r:r + step].reshape(-1, type_size)
            q, sc, bi = _DECODERS[kind](chunk)
            n = chunk.shape[0] // (cols // block)
            out_w[r:r + n] = pack_bits(q.reshape(n, cols), bits)
            out_s[r:r + n] = sc.reshape(n, -1)
            out_b[r:r + n] = bi.reshape(n, -1)
        return out_w, out_s, out_b

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view from raw_bytes(); GC closes it
                pass
            self._map = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_gguf(path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic (b"GGUF"), whatever its
    name ends in: what the library and the CLI go by, not the extension."""
    try:
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except (IsADirectoryError, FileNotFoundError, PermissionError):
        return False


# ---------------------------------------------------------------------------------------
# Block types -> MLX affine quantization (group 32): q (uint8), scale, bias per 32 weights
# ---------------------------------------------------------------------------------------
# Block layouts as in ggml-common.h (and gguf-py's gguf.quants dequantizers). Each decoder
# takes (n_blocks, type_size) uint8 and returns q (n_blocks, block) uint8 with
# w = scale * q + bias, scale and bias (n_blocks, block // 32) float32.

def _f16(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32): low nibbles are weights 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray, n: int) -> np.ndarray:
    """(k, 4) bytes holding n=32 bits little-endian -> (k, 32) of 0/1."""
    return np.unpackbits(qh, axis=-1, bitorder="little")[:, :n]


def _q4_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 2:18]), d, -8 * d


def _q4_1(b):
    return _nibbles(b[:, 4:20]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q5_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 6:22]) | (_high_bits(b[:, 2:6], 32) << 4), d, -16 * d


def _q5_1(b):
    return _nibbles(b[:, 8:24]) | (_high_bits(b[:, 4:8], 32) << 4), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q8_0(b):
    d = _f16(b[:, 0:2])
    return (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, -128 * d


def _k_scales(b):
    """Q4_K/Q5_K super-block header: per 32-weight sub-block scale d*sc and bias -dmin*m."""
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    return d * sc.astype(np.float32), -dmin * m.astype(np.float32)


def _k_low_nibbles(qs):
    """(n, 128) bytes -> (n, 8, 32): 32-byte chunk j holds sub-block 2j (low) and 2j+1 (high)."""
    qs = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (qs & 0xF).reshape(-1, 8, 32)


def _q4_k(b):
    scale, bias = _k_scales(b)
    return _k_low_nibbles(b[:, 16:144]).reshape(-1, 256), scale, bias


def _q5_k(b):
    scale, bias = _k_scales(b)
    hi = (b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    return (_k_low_nibbles(b[:, 48:176]) | (hi << 4)).reshape(-1, 256), scale, bias


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
             "Q4_K": _q4_k, "Q5_K": _q5_k}


def requantize(w: np.ndarray, bits: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min/max affine quantization of float rows ``w`` (rows, cols) with group size 32:
    ``(packed uint32, scales, biases)``. Scales and biases are float16 values (the bias
    rounded down, the scale up, so the grid still spans the group), and every weight is
    within half a step of the grid, scale / 2 with scale <= (max - min) / (2**bits - 1)
    * (1 + 2**-10) + 2**-24 (the float16 spacing of tiny scales)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE).astype(np.float32)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    top = (1 << bits) - 1
    bias = lo.astype(np.float16)
    bias = np.where(bias > lo, np.nextafter(bias, np.float16(-np.inf)), bias).astype(np.float32)
    scale = (hi - bias) / top
    scale16 = scale.astype(np.float16)
    scale = np.where(scale16 < scale, np.nextafter(scale16, np.float16(np.inf)), scale16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale[..., None] > 0, np.rint((g - bias[..., None]) / scale[..., None]), 0)
    q = np.clip(q, 0, top).astype(np.uint8).reshape(rows, cols)
    return pack_bits(q, bits), scale, bias


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack (rows, n) integers below ``2**bits`` as MLX packs affine quantized weights:
    a little-endian bit stream, ``bits`` per value, read as uint32 words."""
    rows, n = q.shape
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    v = (q.reshape(rows, n // 8, 8).astype(np.uint64) << shifts).sum(axis=-1, dtype=np.uint64)
    by = v.astype("<u8").view(np.uint8).reshape(rows, n // 8, 8)[..., :bits]
    return np.ascontiguousarray(by).reshape(rows, n * bits // 8).view("<u4").astype(np.uint32)


def read_gguf_info(path) -> Dict[str, Any]:
    """Cheap inspection of a GGUF file for the model library (no tensor data is read).

    Returns a dict with ``path``, ``file_size``, ``version``, ``architecture``, ``name``,
    ``hyperparameters`` (the ``<arch>.*`` metadata as plain values), ``tensor_count``,
    ``parameter_count``, ``tensor_types`` (type name -> tensor count), ``vocab_size``,
    ``tokenizer_model``, ``chat_template`` (bool), ``supported`` and ``problems``
    (why :func:`convert_gguf` would refuse it, empty when it would not).
    Raises :class:`GGUFError` for files that are not valid GGUF.
    """
    with GGUFFile.open(path) as g:
        md = g.metadata
        arch = md.get("general.architecture", "")
        types: Dict[str, int] = {}
        for t in g.tensors.values():
            types[t.type_name] = types.get(t.type_name, 0) + 1
        problems = _problems(g)
        return {
            "path": str(g.path),
            "file_size": g.file_size,
            "version": g.version,
            "architecture": arch,
            "name": md.get("general.name", Path(path).stem),
            "hyperparameters": {
                k[len(arch) + 1:]: v for k, v in md.items() if arch and k.startswith(arch + ".")
            },
            "tensor_count": len(g.tensors),
            "parameter_count": sum(t.n_elements for t in g.tensors.values()),
            "tensor_types": types,
            "vocab_size": len(md.get("tokenizer.ggml.tokens", ())),
            "tokenizer_model": md.get("tokenizer.ggml.model"),
            "chat_template": bool(md.get("tokenizer.chat_template")),
            "supported": not problems,
            "problems": problems,
        }


def _problems(g: GGUFFile) -> List[str]:
    """Reasons a file cannot be converted (first of each kind)."""
    out = []
    arch = g.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        out.append(_arch_message(g.path, arch))
    bad = [t for t in g.tensors.values() if t.type_name not in supported_tensor_types()]
    if bad:
        out.append(_type_message(g.path, bad[0], len(bad)))
    tok = g.metadata.get("tokenizer.ggml.model")
    if tok not in _TOKENIZER_MODELS:
        out.append(f"{g.path}: tokenizer model {tok!r} is not supported (supported: {', '.join(_TOKENIZER_MODELS)})")
    return out


def _arch_message(path, arch) -> str:
    return (f"{path}: unsupported architecture {arch!r} (general.architecture); "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (families: {supported_text()})")


def _type_message(path, t: GGUFTensorInfo, n_bad: int) -> str:
    more = f" (and {n_bad - 1} more tensors)" if n_bad > 1 else ""
    return (f"{path}: tensor '{t.name}' has type {t.type_name}, which is not supported{more}; "
            f"supported: {', '.join(supported_tensor_types())}")


# ---------------------------------------------------------------------------------------
# Hyperparameters -> config.json (per family, see mlx_flash.families)
# ---------------------------------------------------------------------------------------

def _family(g: "GGUFFile") -> Family:
    arch = g.metadata.get("general.architecture")
    fam = BY_GGUF_ARCH.get(arch) if isinstance(arch, str) else None
    if fam is None:
        raise GGUFError(_arch_message(g.path, arch))
    return fam


#: llama.cpp's attention scale for Gemma 2/3 27B is 1/sqrt(hidden/heads), not 1/sqrt(head_dim)
#: (llama-model.cpp: ``LLM_TYPE_27B``); block counts of the 27B models.
_GEMMA_27B_BLOCKS = {"gemma2": 46, "gemma3": 62}
#: llama.cpp's Gemma 3: every 6th layer global, local layers' RoPE base 10000 (llama-model.cpp).
_GEMMA3_SWA_PATTERN = 6
_GEMMA3_LOCAL_ROPE_BASE = 10000.0


@dataclass
class HParams:
    """The hyperparameters a GGUF file states, in Hugging Face / mlx-lm terms."""

    family: Family
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_gguf(cls, g: GGUFFile) -> "HParams":
        md = g.metadata
        fam = _family(g)
        arch = fam.gguf_arch or ""  # _family found the family by its GGUF architecture

        def get(key, default: Any = KeyError, kind=int):
            full = key.format(arch=arch) if "{arch}" in key else f"{arch}.{key}"
            if full not in md:
                if default is KeyError:
                    raise GGUFError(f"{g.path}: missing metadata '{full}'")
                return default
            v = md[full]
            if isinstance(v, list):
                raise GGUFError(f"{g.path}: per-layer values for '{full}' are not supported")
            return kind(v)

        if get("expert_count", 0) > 0:
            raise GGUFError(f"{g.path}: mixture-of-experts {arch} models are not supported")
        hidden = get("embedding_length")
        heads = get("attention.head_count")
        kv_heads = get("attention.head_count_kv", heads)
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
            raise GGUFError(f"{g.path}: invalid head counts: {heads} heads, {kv_heads} kv heads")
        head_dim = get("attention.key_length", 0) or get("rope.dimension_count", 0) or hidden // heads
        if get("attention.value_length", head_dim) != head_dim:
            raise GGUFError(f"{g.path}: different key and value head sizes are not supported")
        rope_dims = get("rope.dimension_count", head_dim)
        if rope_dims != head_dim:
            raise GGUFError(f"{g.path}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported")

        embd = g.tensors.get("token_embd.weight")
        if embd is None:
            raise GGUFError(f"{g.path}: missing tensor 'token_embd.weight'")
        rope_theta = get("rope.freq_base", 10000.0, float)
        layers = get("block_count")
        extra: Dict[str, Any] = {}
        if fam.key in ("gemma2", "gemma3"):
            scale = get(Keys.Attention.SCALE, 0.0, float)
            if scale:
                qpas = 1.0 / scale ** 2
            elif layers == _GEMMA_27B_BLOCKS[fam.key]:
                qpas = hidden / heads
            else:
                qpas = head_dim
            extra.update(head_dim=head_dim, query_pre_attn_scalar=qpas,
                         sliding_window=get(Keys.Attention.SLIDING_WINDOW, 4096))
            if fam.key == "gemma2":
                extra.update(attn_logit_softcapping=get(Keys.LLM.ATTN_LOGIT_SOFTCAPPING, 50.0, float),
                             final_logit_softcapping=get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, 30.0, float))
            else:
                extra.update(sliding_window_pattern=_GEMMA3_SWA_PATTERN,
                             rope_local_base_freq=_GEMMA3_LOCAL_ROPE_BASE)
        rope_scaling = _rope_scaling(g, arch, head_dim, rope_theta)
        ctx = get("context_length", 2048)
        if fam.key == "phi3":
            orig = get(Keys.Rope.SCALING_ORIG_CTX_LEN, 4096)
            extra["original_max_position_embeddings"] = orig
            if "rope_factors_long.weight" in g.tensors or "rope_factors_short.weight" in g.tensors:
                rope_scaling = _longrope(g, head_dim, ctx, orig)
        return cls(
            family=fam,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, float),
            rope_theta=rope_theta,
            vocab_size=embd.shape[0],
            max_position_embeddings=ctx,
            tie_word_embeddings="output.weight" not in g.tensors,
            attention_bias=fam.key == "llama" and "blk.0.attn_q.bias" in g.tensors,
            rope_scaling=rope_scaling,
            extra=extra,
        )

    @property
    def model_type(self) -> str:
        return self.family.model_types[0]

    def config(self, md: Dict[str, Any], dtype: str) -> Dict[str, Any]:
        """config.json in mlx-lm / Hugging Face form."""
        cfg: Dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": [self.family.hf_class],
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "gelu_pytorch_tanh" if self.family.activation == "gelu_approx" else "silu",
            "torch_dtype": dtype,
        }
        if self.family.key == "llama":
            cfg.update(attention_bias=self.attention_bias, mlp_bias=False)
        if self.head_dim != self.hidden_size // self.num_attention_heads or self.family.key in ("qwen3",):
            cfg["head_dim"] = self.head_dim
        if self.rope_scaling:
            cfg["rope_scaling"] = self.rope_scaling
        cfg.update(self.extra)
        for key in ("bos", "eos"):
            v = md.get(f"tokenizer.ggml.{key}_token_id")
            if v is not None:
                cfg[f"{key}_token_id"] = int(v)
        eot = md.get("tokenizer.ggml.eot_token_id")
        if eot is not None and "eos_token_id" in cfg and int(eot) != cfg["eos_token_id"]:
            cfg["eos_token_id"] = [cfg["eos_token_id"], int(eot)]
        return cfg



def _llama3_factors(head_dim: int, base: float, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for Llama 3.x RoPE scaling (convert_hf_to_gguf.py)."""
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))


def _longrope(g: GGUFFile, head_dim: int, ctx: int, orig: int) -> Dict[str, Any]:
    """Phi-3 LongRoPE (the 128k-context models, Phi-3.5 mini): llama.cpp keeps the per-frequency
    factors as ``rope_factors_long``/``rope_factors_short`` tensors; mlx-lm's ``SuScaledRoPE``
    takes them as config.json's ``rope_scaling`` lists with its default attention factor
    sqrt(1 + ln(ctx / orig) / ln(orig)), which must be the file's."""
    out: Dict[str, Any] = {"type": "longrope"}
    for kind in ("long", "short"):
        name = f"rope_factors_{kind}.weight"
        if name not in g.tensors:
            raise GGUFError(f"{g.path}: LongRoPE needs both rope_factors_long and rope_factors_short; "
                            f"'{name}' is missing")
        f = g.read_float32(name).ravel()
        if f.shape[0] != head_dim // 2:
            raise GGUFError(f"{g.path}: {name} has {f.shape[0]} entries, expected {head_dim // 2}")
        out[f"{kind}_factor"] = [float(v) for v in f]
    attn = g.metadata.get(Keys.Rope.SCALING_ATTN_FACTOR.format(arch="phi3"))
    want = math.sqrt(1 + math.log(ctx / orig) / math.log(orig)) if ctx > orig else 1.0
    if attn is not None and not math.isclose(float(attn), want, rel_tol=1e-3):
        raise GGUFError(f"{g.path}: LongRoPE attention factor {float(attn):.4f} is not the default {want:.4f} "
                        f"mlx-lm uses; not supported")
    return out


def _rope_scaling(g: GGUFFile, arch: str, head_dim: int, base: float) -> Optional[Dict[str, Any]]:
    md = g.metadata
    kind = md.get(f"{arch}.rope.scaling.type", "none")
    factor = float(md.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if kind == "linear" and factor != 1.0:
        return {"type": "linear", "factor": factor}
    if kind not in ("none", "linear"):
        raise GGUFError(f"{g.path}: RoPE scaling type {kind!r} is not supported (supported: linear, llama3)")
    if "rope_freqs.weight" not in g.tensors:
        return None
    # Llama 3.1+ stores its RoPE scaling only as per-frequency factors: recognise the
    # published parameters, refuse anything else rather than guess.
    got = g.read_float32("rope_freqs.weight").astype(np.float64).ravel()
    if got.shape[0] != head_dim // 2:
        raise GGUFError(f"{g.path}: rope_freqs.weight has {got.shape[0]} entries, expected {head_dim // 2}")
    if np.allclose(got, 1.0):
        return None
    top = float(got.max())
    orig = int(md.get(f"{arch}.rope.scaling.original_context_length", 8192) or 8192)
    for low, high in ((1.0, 4.0),):
        want = _llama3_factors(head_dim, base, top, low, high, orig)
        if np.allclose(got, want, rtol=1e-3, atol=1e-4):
            return {"rope_type": "llama3", "factor": top, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": orig}
    raise GGUFError(f"{g.path}: rope_freqs.weight does not match Llama 3 RoPE scaling; not supported")


# ---------------------------------------------------------------------------------------
# Tensors: names, shapes, q/k order
# ---------------------------------------------------------------------------------------

#: folded into config.json's rope_scaling (Llama 3.x factors, Phi-3 LongRoPE factors)
_IGNORED = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (Hugging Face order -> GGUF order) of q/k rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`permute_qk` (GGUF order -> Hugging Face order)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class _TensorPlan:
    src: Optional[str]  # None: zeros (an output-projection bias the file leaves out)
    dst: str
    shape: Tuple[int, ...]
    unpermute_heads: int = 0  # >0: undo llama.cpp's q/k permutation with this many heads
    shift: float = 0.0  # subtracted from the values (Gemma's norms, stored as w + 1)


def model_tensors(config: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """mlx-lm's parameter names and shapes for ``config`` (the model class instantiated
    lazily: MLX computes no weights until evaluated)."""
    from ..models import get_architecture  # noqa: PLC0415 - mlx-lm where a model is built (dense_model.MLX_LM)

    model_class, args_class = get_architecture(config).get_classes(config)
    model = model_class(args_class.from_dict(config))
    names = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    if config.get("tie_word_embeddings", True) and config["model_type"] == "gemma3_text":
        names.pop("lm_head.weight", None)  # its sanitize drops lm_head when the file has none
    return names


def gguf_tensor_names(family: Family, n_layers: int, hf_names) -> Dict[str, str]:
    """Hugging Face / mlx-lm tensor name -> GGUF tensor name, from gguf-py's ``TensorNameMap``
    (llama.cpp's own table) for the family's architecture. Names it does not know are left out."""
    arch = next(a for a in MODEL_ARCH if MODEL_ARCH_NAMES[a] == family.gguf_arch)
    tmap = get_tensor_name_map(arch, n_layers)
    out = {}
    for name in hf_names:
        g = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is not None:
            out[name] = g
    return out


def _plan_tensors(g: GGUFFile, hp: HParams) -> List[_TensorPlan]:
    """Map every GGUF tensor to its mlx-lm name (gguf-py's table applied to the names and
    shapes of mlx-lm's own model class for this config) and check names, types and shapes."""
    fam = hp.family
    bad = [t for t in g.tensors.values() if t.type_name not in supported_tensor_types()]
    if bad:
        raise GGUFError(_type_message(g.path, bad[0], len(bad)))
    config = hp.config(g.metadata, "float32")
    try:
        wanted = model_tensors(config)
    except (ValueError, TypeError, KeyError, ArithmeticError, RuntimeError) as e:  # metadata mlx-lm rejects
        raise GGUFError(f"{g.path}: mlx-lm cannot build a {fam.label} model from this file's metadata ({e})") from None
    to_gguf = gguf_tensor_names(fam, hp.num_hidden_layers, wanted)
    from_gguf = {v: k for k, v in to_gguf.items()}
    heads = {"self_attn.q_proj": hp.num_attention_heads, "self_attn.k_proj": hp.num_key_value_heads}

    plans: List[_TensorPlan] = []
    seen = set()
    for name, info in g.tensors.items():
        if name in _IGNORED:
            continue
        dst = from_gguf.get(name)
        if dst is None:
            raise GGUFError(f"{g.path}: unexpected tensor '{name}' (not part of a "
                            f"{hp.num_hidden_layers}-layer {fam.label} model)")
        want = wanted[dst]
        if info.shape != want:
            raise GGUFError(f"{g.path}: tensor '{name}' has shape {list(info.shape)}, expected {list(want)} "
                            f"from the metadata")
        n_heads = 0
        if fam.gguf_permute_qk:
            m = _LAYER_RE.match(dst)
            n_heads = heads.get(m.group(2).rsplit(".", 1)[0], 0) if m else 0
        shift = fam.gguf_norm_shift if dst.endswith("norm.weight") else 0.0
        plans.append(_TensorPlan(name, dst, want, n_heads, shift))
        seen.add(dst)

    synthesized = set()
    if fam.key == "llama" and hp.attention_bias:
        # mlx-lm's llama gives o_proj a bias whenever q/k/v have one (Qwen-style files omit it)
        synthesized = {k for k in wanted if k.endswith("self_attn.o_proj.bias")}
    elif fam.key == "llama" and any(d.endswith(".bias") for d in seen):
        raise GGUFError(f"{g.path}: attention biases without 'blk.0.attn_q.bias' are not supported")
    plans += [_TensorPlan(None, k, wanted[k]) for k in sorted(synthesized - seen)]
    missing = [to_gguf.get(k, k) for k in wanted if k not in seen and k not in synthesized]
    if missing:
        raise GGUFError(f"{g.path}: missing tensor '{missing[0]}'" + (
            f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return plans


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------
# Tokenizer: tokenizer.json, tokenizer_config.json, special_tokens_map.json
# ---------------------------------------------------------------------------------------

_TOKENIZER_MODELS = ("gpt2", "llama")
_CONTROL, _USER_DEFINED = 3, 4

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by tokenizer.ggml.pre
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_PRE_GPT2 = {"gpt-2", "gpt2", "mpt", "olmo", "jais", "default"}
_PRE_LLAMA3 = {"llama-bpe", "llama3", "dbrx", "smaug-bpe"}
_PRE_QWEN2 = {"qwen2", "deepseek-r1-qwen", "stablelm2"}  # deepseek-r1-qwen: the R1 distills of Qwen2.5


def _bpe_pre_tokenizer(pre: Optional[str]):
    if pre in _PRE_DIGITS_THEN_GPT2:
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _PRE_LLAMA3 or pre in _PRE_QWEN2:
        regex = _LLAMA3_REGEX if pre in _PRE_LLAMA3 else _QWEN2_REGEX
        return pt.Sequence([pt.Split(Regex(regex), behavior="isolated", invert=False),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in _PRE_GPT2:
        logger.warning("GGUF pre-tokenizer %r is not known; using GPT-2 byte-level splitting", pre)
    return pt.ByteLevel(add_prefix_space=False, use_regex=True)


def _token_str(tokens: List[str], idx) -> Optional[str]:
    if idx is None or not 0 <= int(idx) < len(tokens):
        return None
    return tokens[int(idx)]


def _spm_merges(vocab: Dict[str, int], scores: List[float], tokens: List[str]) -> List[Tuple[str, str]]:
    """BPE merges for a SentencePiece vocabulary, ranked by the merged piece's score
    (as transformers' SentencePieceExtractor derives them)."""
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2], reverse=True)
    return [(a, b) for a, b, _ in merges]


def build_tokenizer(g: GGUFFile):
    """A ``tokenizers.Tokenizer`` equivalent to llama.cpp's for this file."""
    try:
        return _build_tokenizer(g)
    except GGUFError:
        raise
    except Exception as e:  # the tokenizers library rejects inconsistent vocabularies/merges
        raise GGUFError(f"{g.path}: cannot build the tokenizer from the file's vocabulary: {e}") from e


def _build_tokenizer(g: GGUFFile):
    md = g.metadata
    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if kind not in _TOKENIZER_MODELS:
        raise GGUFError(f"{g.path}: tokenizer model {kind!r} is not supported "
                        f"(supported: {', '.join(_TOKENIZER_MODELS)})")
    if not tokens:
        raise GGUFError(f"{g.path}: missing metadata 'tokenizer.ggml.tokens'")
    types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{g.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab: Dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) != len(tokens):
        logger.warning("%s: %d duplicate tokens in the vocabulary", g.path, len(tokens) - len(vocab))
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
    bos_id, eos_id = md.get("tokenizer.ggml.bos_token_id"), md.get("tokenizer.ggml.eos_token_id")
    bos, eos = _token_str(tokens, bos_id), _token_str(tokens, eos_id)

    if kind == "gpt2":
        raw_merges = md.get("tokenizer.ggml.merges")
        if not raw_merges:
            raise GGUFError(f"{g.path}: missing metadata 'tokenizer.ggml.merges' for a BPE tokenizer")
        merges = []
        for m in raw_merges:
            a, sep, b = m.partition(" ")
            if not sep:
                raise GGUFError(f"{g.path}: malformed merge {m!r} in tokenizer.ggml.merges")
            merges.append((a, b))
        pre = md.get("tokenizer.ggml.pre")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                   ignore_merges=pre in _PRE_LLAMA3))
        tok.pre_tokenizer = _bpe_pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
        post: List[Any] = [processors.ByteLevel(trim_offsets=False)]
    else:  # SentencePiece-style vocabulary (Llama 2, Mistral, TinyLlama ...)
        scores = md.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = _token_str(tokens, md.get("tokenizer.ggml.unknown_token_id", 0))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(vocab, scores, tokens), unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
        prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
        norms = [normalizers.Prepend("▁")] if prefix else []
        tok.normalizer = normalizers.Sequence(norms + [normalizers.Replace(" ", "▁")])
        decs = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            decs.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(decs)
        post = []

    template: Dict[str, Any] = {"single": "$A", "pair": "$A $B", "special": []}
    if add_bos and bos is not None and bos_id is not None:
        template = {"single": f"{bos} " + template["single"], "pair": f"{bos} $A {bos} $B",
                    "special": [(bos, int(bos_id))]}
    if add_eos and eos is not None and eos_id is not None:
        template["single"] += f" {eos}"
        template["pair"] += f" {eos}"
        template["special"] = list(dict(template["special"] + [(eos, int(eos_id))]).items())
    if template["special"]:
        post.append(processors.TemplateProcessing(single=template["single"], pair=template["pair"],
                                                  special_tokens=template["special"]))
    if post:
        tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)

    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def _tokenizer_files(g: GGUFFile, hp: HParams) -> Dict[str, Any]:
    """tokenizer_config.json and special_tokens_map.json contents."""
    md = g.metadata
    tokens = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type") or []
    kind = md.get("tokenizer.ggml.model")
    named = {
        "bos_token": _token_str(tokens, md.get("tokenizer.ggml.bos_token_id")),
        "eos_token": _token_str(tokens, md.get("tokenizer.ggml.eos_token_id")),
        "unk_token": _token_str(tokens, md.get("tokenizer.ggml.unknown_token_id")),
        "pad_token": _token_str(tokens, md.get("tokenizer.ggml.padding_token_id")),
    }
    named = {k: v for k, v in named.items() if v is not None}
    extra = [t for t, ty in zip(tokens, types) if ty == _CONTROL and t not in named.values()]
    config: Dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False)),
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp.max_position_embeddings,
    }
    if md.get("tokenizer.chat_template"):
        config["chat_template"] = md["tokenizer.chat_template"]
    special_map = {**named, "additional_special_tokens": extra}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}


# ---------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------

def _disk_error(e: BaseException, file: Path, dst: Path, need: int) -> BaseException:
    """Turn a failed write into a one-line error that names the file and the free space
    (:func:`mlx_flash.atomic.write_error` for a full disk or a permission problem)."""
    t = write_error(e, dst, need=need, what=f"{file.name} for {dst}")
    if t is not e:
        return t
    free = free_bytes(dst.parent)
    free_s = fmt_bytes(free) if free >= 0 else "unknown"
    return WriteError(getattr(e, "errno", None) or errno.EIO,
                      f"could not write {file.name} for {dst} ({e}); the conversion needs about "
                      f"{fmt_bytes(need)} and {free_s} is free on that disk: free up space or pick "
                      f"another folder")


@dataclass(frozen=True)
class _Output:
    """How one tensor is written: ``bits`` > 0 packed (group 32, float16 scales/biases),
    else as a float array of ``dtype``."""

    bits: int
    dtype: str
    n_bytes: int


def _outputs(g: GGUFFile, plans: List[_TensorPlan], dtype: Optional[str]) -> Dict[str, _Output]:
    """Per destination name: the written form and its exact size in bytes."""
    out = {}
    for p in plans:
        n = math.prod(p.shape)
        kind = g.tensors[p.src].type_name if p.src else "F32"
        if dtype is None and kind in KEEP_BITS and len(p.shape) == 2:
            bits = KEEP_BITS[kind]
            out[p.dst] = _Output(bits, "float16", n * bits // 8 + 2 * 2 * n // GROUP_SIZE)
        else:
            fdtype = dtype or _KEEP_FLOAT.get(kind, "float16")
            out[p.dst] = _Output(0, fdtype, n * _DTYPE_BYTES[fdtype])
    return out


def _quantization_config(plans: List[_TensorPlan], outputs: Dict[str, _Output]) -> Optional[Dict[str, Any]]:
    """config.json's ``quantization`` as mlx-lm reads it: the bits of most bytes as the
    default, per-module entries (mlx-lm's ``class_predicate`` returns them as they are)
    for modules with other bits, ``false`` for 2-D weights kept in float."""
    counts: Dict[int, int] = {}
    for o in outputs.values():
        if o.bits:
            counts[o.bits] = counts.get(o.bits, 0) + o.n_bytes
    if not counts:
        return None
    default = max(counts, key=lambda b: (counts[b], b))
    q: Dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
    for p in plans:
        bits = outputs[p.dst].bits
        if len(p.shape) != 2 or bits == default:
            continue
        module = p.dst[:-len(".weight")]
        q[module] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"} if bits else False
    return q


def _shards(plans: List[_TensorPlan], outputs: Dict[str, _Output], max_shard_bytes: int) -> List[List[_TensorPlan]]:
    out: List[List[_TensorPlan]] = [[]]
    size = 0
    for p in plans:
        b = outputs[p.dst].n_bytes
        if out[-1] and size + b > max_shard_bytes:
            out.append([])
            size = 0
        out[-1].append(p)
        size += b
    return out


def _float16(a: np.ndarray, what: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    if not np.isfinite(h).all() and np.isfinite(a).all():
        raise GGUFError(f"{what}: quantization scales overflow float16; convert with a float dtype instead")
    return h


def _tensor_arrays(g: GGUFFile, p: _TensorPlan, o: _Output) -> Dict[str, Any]:
    """The arrays written for one planned tensor (one, or weight + scales + biases)."""
    if o.bits:
        assert p.src is not None  # quantized outputs come from a tensor in the file
        w, sc, bi = g.read_quantized(p.src, o.bits)
        if p.unpermute_heads:  # a row permutation: packed rows, scales and biases move together
            w, sc, bi = (unpermute_qk(a, p.unpermute_heads) for a in (w, sc, bi))
        base = p.dst[:-len(".weight")]
        what = f"{g.path}: tensor '{p.src}'"
        return {p.dst: mx.array(w), f"{base}.scales": mx.array(_float16(sc, what)),
                f"{base}.biases": mx.array(_float16(bi, what))}
    w = g.read_float32(p.src) if p.src else np.zeros(p.shape, np.float32)
    if p.unpermute_heads:
        w = unpermute_qk(w, p.unpermute_heads)
    if p.shift:
        w = w - np.float32(p.shift)
    return {p.dst: mx.array(w).astype(getattr(mx, o.dtype))}


def _save_safetensors(path: Path, arrays: Dict[str, Any], dst: Path, need: int) -> None:
    try:
        mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
        _check_safetensors_size(path)
    except (RuntimeError, OSError) as e:  # MLX reports failed writes as RuntimeError
        raise _disk_error(e, path, dst, need) from e


def _check_safetensors_size(path: Path) -> None:
    """A short safetensors file (a write that silently failed) is an error."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise OSError(errno.EIO, f"{path}: written file is truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        raise OSError(errno.EIO, f"{path}: written file has {size} bytes, expected {8 + n + end}")


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def convert_gguf(
    src,
    dst,
    *,
    dtype: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Convert the GGUF file ``src`` (a family of :mod:`mlx_flash.families`) into the mlx-lm model folder ``dst``.

    dtype:     None (default) keeps the quantization: every quantized 2-D weight becomes an
               MLX affine quantized one, group size 32, with :data:`KEEP_BITS` bits
               (``.weight`` packed uint32, ``.scales``/``.biases`` float16; config.json gets
               mlx-lm's ``quantization`` with per-module entries where bits differ); float
               tensors keep their type (F32 becomes float16). "bfloat16", "float16" or
               "float32" dequantize every tensor to that dtype instead.
    progress:  ``callback(fraction, message)``; returning ``False`` cancels
               (:class:`~mlx_flash.progress.Cancelled` is raised, nothing is left behind).
    overwrite: replace an existing ``dst`` (only once the new folder is complete).
    max_shard_bytes: split ``model.safetensors`` into ``model-0000i-of-0000n.safetensors``
               (with ``model.safetensors.index.json``) above this size.

    Raises :class:`GGUFError` for files it cannot read or convert, ``FileExistsError`` if
    ``dst`` exists and ``overwrite`` is false, ``OSError`` (ENOSPC) when the disk fills.
    Returns ``dst``.
    """
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be None (keep the quantization) or one of {DTYPES}, got {dtype!r}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
    report(progress, 0.0, f"reading {src.name}")

    with GGUFFile.open(src) as g:
        hp = HParams.from_gguf(g)
        plans = _plan_tensors(g, hp)
        tokenizer = build_tokenizer(g)
        tok_files = _tokenizer_files(g, hp)
        outputs = _outputs(g, plans, dtype)
        config = hp.config(g.metadata, dtype or "float16")
        quantization = _quantization_config(plans, outputs)
        if quantization:
            config["quantization"] = quantization
            config["quantization_config"] = quantization  # mlx-lm writes both (Hugging Face reads the second)
        report(progress, 0.02, "validated")

        shards = _shards(plans, outputs, max_shard_bytes)
        total_bytes = sum(o.n_bytes for o in outputs.values())
        need = _output_bytes(outputs, tok_files)
        # locks dst, removes stale temporaries, checks the space, makes the temp folder
        build = FolderBuild(dst, overwrite=overwrite, need=need, what=f"{dst} (from {src.name})")
        tmp = build.tmp
        try:
            try:
                _write_json(tmp / "config.json", config)
                (tmp / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
                for name, obj in tok_files.items():
                    _write_json(tmp / name, obj)
                report(progress, 0.05, "tokenizer written")

                total = sum(g.tensors[p.src].n_bytes for p in plans if p.src) or 1
                done = 0
                weight_map: Dict[str, str] = {}
                tensor_cb = scaled(progress, 0.05, 0.99)
                for si, shard in enumerate(shards):
                    fname = ("model.safetensors" if len(shards) == 1
                             else f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors")
                    arrays: Dict[str, Any] = {}
                    for p in shard:
                        written = _tensor_arrays(g, p, outputs[p.dst])
                        mx.eval(list(written.values()))
                        arrays.update(written)
                        weight_map.update(dict.fromkeys(written, fname))
                        done += g.tensors[p.src].n_bytes if p.src else 0
                        report(tensor_cb, done / total, p.dst)
                    _save_safetensors(tmp / fname, arrays, dst, need)
                    del arrays
                if len(shards) > 1:
                    _write_json(tmp / "model.safetensors.index.json", {
                        "metadata": {"total_size": total_bytes},
                        "weight_map": weight_map,
                    })
            except OSError as e:
                if e.errno in DISK_FULL and not isinstance(e, WriteError):
                    raise _disk_error(e, Path(e.filename or "the model"), dst, need) from e
                raise
        except BaseException as e:
            if (t := build.fail(e)) is e:
                raise
            raise t from e
        build.publish()
    report(progress, 1.0, "done")
    return dst


def _output_bytes(outputs: Dict[str, _Output], tok_files: Dict[str, Any]) -> int:
    """About how many bytes :func:`convert_gguf` writes (weights as written, tokenizer, slack)."""
    return sum(o.n_bytes for o in outputs.values()) + 4 * len(json.dumps(tok_files)) + (32 << 20)


def output_bytes(src, dtype: Optional[str] = None) -> int:
    """About how many bytes converting the GGUF file ``src`` to an mlx-lm folder writes
    (``dtype`` as :func:`convert_gguf` takes it; reads only the header; raises
    :class:`GGUFError` like :func:`convert_gguf`)."""
    with GGUFFile.open(src) as g:
        hp = HParams.from_gguf(g)
        plans = _plan_tensors(g, hp)
        return _output_bytes(_outputs(g, plans, dtype), _tokenizer_files(g, hp))

