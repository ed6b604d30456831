"""The user's model library: list, import (convert with progress and cancel), remove.

Models live in ``paths.models_dir()``: mlx-lm folders (dense) and ``.flash``
folders (the flash format). Import accepts a GGUF file or an mlx-lm/Hugging
Face folder with safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from . import calibrate as _cal
from . import paths
from .atomic import (
    FolderBuild,
    check_space,
    clean_stale,
    destination_lock,
    fmt_bytes,
    publish_dir,
    scratch_dir,
    temp_name,
    translate_write_errors,
)
from .convert.gguf import convert_gguf, is_gguf, output_bytes, read_gguf_info
from .families import BY_MODEL_TYPE, BY_MOE_MODEL_TYPE, BY_WRAPPER, family_label, supported_text
from .moe.format import convert_to_moe_flash, is_moe_config, is_moe_flash_dir, open_moe_flash, verify_moe_checksums
from .progress import Cancelled, ProgressCallback, report, scaled  # noqa: F401 (Cancelled: re-exported for callers)
from .quantized import describe as describe_quant
from .storage.format import (
    DTYPE_SIZES,
    ChecksumError,
    FlashFormatError,
    Manifest,
    convert_to_flash,
    open_flash,
    role_quantization,
    verify_checksums,
)


@dataclass
class ModelEntry:
    name: str
    path: Path
    kind: str            # "flash" or "mlx"
    architecture: str    # config.json model_type
    size_bytes: int
    parameters: int
    family: str = ""     # the family's display name (families.py), e.g. "Qwen2 / Qwen2.5"


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _param_count(cfg: dict) -> int:
    """Parameters of a llama-family or OPT model from its config (no weights needed)."""
    if cfg.get("model_type") == "opt":
        return _opt_param_count(cfg)
    try:
        h, n = cfg["hidden_size"], cfg["num_hidden_layers"]
        ffn, v = cfg["intermediate_size"], cfg["vocab_size"]
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        hd = cfg.get("head_dim") or h // heads
        attn = h * hd * heads * 2 + h * hd * kv * 2
        per_layer = attn + 3 * h * ffn + 2 * h
        head = 0 if cfg.get("tie_word_embeddings", True) else v * h
        return n * per_layer + v * h + h + head
    except (KeyError, TypeError, ZeroDivisionError):
        return 0


def _opt_param_count(cfg: dict) -> int:
    """OPT: biased q/k/v/out and fc1/fc2, two LayerNorms per layer, learned positions
    (offset 2), optional project_in/out when ``word_embed_proj_dim`` != hidden, tied head."""
    try:
        h, n, ffn, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["ffn_dim"], cfg["vocab_size"]
        wd = cfg.get("word_embed_proj_dim") or h
        per_layer = 4 * h * h + 4 * h + 2 * h * ffn + ffn + h + 4 * h
        emb = v * wd + (cfg.get("max_position_embeddings", 2048) + 2) * h
        proj = 2 * h * wd if wd != h else 0
        final_norm = 2 * h if cfg.get("do_layer_norm_before", True) else 0
        return n * per_layer + emb + proj + final_norm
    except (KeyError, TypeError):
        return 0


class BrokenModel(ValueError):
    """A folder in the library that cannot be used as a model (the message says why)."""


@dataclass
class BrokenEntry:
    """A library folder that is not a usable model: listed with the reason, never loaded."""
    name: str
    path: Path
    reason: str


def inspect(path: Path) -> ModelEntry:
    """The library entry for the model folder ``path``, or :class:`BrokenModel` saying what is
    wrong (no manifest/config, bad JSON, wrong types, missing or truncated files, a folder that
    cannot be read)."""
    path = Path(path)
    try:
        return _inspect(path)
    except OSError as e:  # e.g. a folder without read permission: even asking whether a file exists fails
        raise BrokenModel(f"{path.name}: cannot read the folder ({e.strerror or e})") from None


def _inspect(path: Path) -> ModelEntry:
    if not path.is_dir():
        raise BrokenModel(f"{path.name}: not a folder")
    if is_moe_flash_dir(path):  # mixture-of-experts flash folder (mlx_flash.moe)
        kind = "flash"
        try:
            cfg = open_moe_flash(path).manifest.model_args
        except (OSError, FlashFormatError) as e:
            raise BrokenModel(f"{path.name}: damaged flash model: {str(e).replace(str(path) + os.sep, '')}") from None
    elif (path / "manifest.json").exists():
        kind = "flash"
        try:
            cfg = open_flash(path).manifest.model_args
        except (OSError, FlashFormatError) as e:
            raise BrokenModel(f"{path.name}: damaged flash model: {str(e).replace(str(path) + os.sep, '')}") from None
    elif path.suffix == ".flash":
        raise BrokenModel(f"{path.name}: damaged flash model: manifest.json is missing")
    elif (path / "config.json").exists():
        kind = "mlx"
        try:
            cfg = json.loads((path / "config.json").read_bytes())
        except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
            raise BrokenModel(f"{path.name}: config.json is unreadable ({e})") from None
        if not isinstance(cfg, dict):
            raise BrokenModel(f"{path.name}: config.json holds a {type(cfg).__name__}, not a JSON object")
        if not any(path.glob("*.safetensors")):
            raise BrokenModel(f"{path.name}: no .safetensors weights")
    else:
        raise BrokenModel(f"{path.name}: not a model folder (no manifest.json or config.json)")
    try:
        size = _dir_size(path)
    except OSError as e:  # a file vanished or is unreadable while we count
        raise BrokenModel(f"{path.name}: cannot read the folder ({e})") from None
    mt = str(cfg.get("model_type", "?"))
    return ModelEntry(path.name, path, kind, mt, size, _param_count(cfg), family_label(mt))


def describe(path: Path) -> Optional[ModelEntry]:
    """:func:`inspect`, or None for a folder that is not a usable model."""
    try:
        return inspect(path)
    except BrokenModel:
        return None


def scan_library(root: Optional[Path] = None) -> Tuple[List[ModelEntry], List[BrokenEntry]]:
    """The library's models and its broken folders (each with the reason), by name. Also removes
    temporaries left by killed conversions (:func:`mlx_flash.atomic.clean_stale`)."""
    root = Path(root) if root else paths.models_dir()
    if not root.is_dir():
        return [], []
    clean_stale(root)
    out: List[ModelEntry] = []
    broken: List[BrokenEntry] = []
    try:
        children = sorted(root.iterdir())
    except OSError:
        return [], []
    for p in children:
        if p.name.startswith(".") or not p.is_dir():
            continue
        try:
            out.append(inspect(p))
        except BrokenModel as e:
            broken.append(BrokenEntry(p.name, p, str(e)))
    return out, broken


def list_models(root: Optional[Path] = None) -> List[ModelEntry]:
    """The usable models in the library (see :func:`scan_library` for the broken ones)."""
    return scan_library(root)[0]


def convert_any(src: Path, dst: Path, *, dtype: Optional[str] = None,
                progress: Optional[ProgressCallback] = None, overwrite: bool = False,
                calibrate: bool = False, down_bits: Optional[int] = None) -> Path:
    """GGUF file or mlx-lm/HF folder -> mlx-lm folder, or -> flash folder when ``dst`` ends in .flash.

    ``down_bits`` (quantized sources to .flash): re-quantize the down projection along hidden at
    these bits instead of keeping the source's codes (``storage.format.convert_to_flash``).

    ``calibrate`` (flash destinations only): also fit the activation predictors
    (:func:`mlx_flash.calibrate.calibrate`). Conversion and calibration then run in a
    hidden folder next to ``dst`` that is renamed into place only when both are done,
    so a cancel or a failure leaves ``dst`` as it was.
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"no such file or folder: {src}")
    if (src / "manifest.json").is_file():
        raise ValueError(f"{src} is already in the flash format: nothing to convert (load it as it is, "
                         "or import it into the library)")
    with destination_lock(dst):
        if not (calibrate and dst.suffix == ".flash"):
            return _convert(src, dst, dtype=dtype, progress=progress, overwrite=overwrite, down_bits=down_bits)
        if dst.exists() and not overwrite:
            raise FileExistsError(f"{dst} exists (use overwrite)")

        clean_stale(dst.parent, depth=1)
        check_space(dst.parent, *_convert_need(src, dst, dtype))
        with scratch_dir(dst) as work:
            tmp = _convert(src, work / dst.name, dtype=dtype, progress=scaled(progress, 0.0, 0.3), overwrite=False,
                           check=False, down_bits=down_bits)
            if _is_moe_folder(src):  # MoE: expert frequencies (mlx_flash.moe), not neuron predictors
                from .moe.engine import calibrate_reference  # noqa: PLC0415 - imports the engine (mlx-lm, seconds)

                calibrate_reference(tmp, progress=scaled(progress, 0.3, 1.0))
            else:
                _cal.calibrate(tmp, tokens=_cal.auto_tokens(), progress=scaled(progress, 0.3, 1.0))
            with translate_write_errors(dst):
                publish_dir(tmp, dst, overwrite)
    return dst


def _source_bytes(src: Path, dtype: Optional[str]) -> int:
    """About the bytes of a flash folder made from the model folder ``src`` (its weights, scaled
    to ``dtype``)."""
    total = 0
    for f in src.glob("*.safetensors"):
        total += f.stat().st_size
    if dtype in DTYPE_SIZES:
        try:
            cfg = json.loads((src / "config.json").read_text())
            have = {"float32": 4}.get(str(cfg.get("torch_dtype")), 2)
        except (OSError, ValueError, AttributeError):
            have = 2
        total = total * DTYPE_SIZES[dtype] // have
    return total + (8 << 20)


def _convert_need(src: Path, dst: Path, dtype: Optional[str]) -> Tuple[int, str]:
    """Bytes a conversion of ``src`` to ``dst`` writes in all (every stage, temporaries included)
    and a description of the stages, for the space check's message."""
    if src.is_file():
        mid = output_bytes(src, dtype)
        if dst.suffix != ".flash":
            return mid, f"{dst} (from {src.name})"
        return 2 * mid, (f"{dst} from {src.name} (a temporary mlx folder of {fmt_bytes(mid)}, then the flash "
                         f"folder of about {fmt_bytes(mid)})")
    return _source_bytes(src, dtype), f"{dst} (from {src.name})"


def _convert(src: Path, dst: Path, *, dtype: Optional[str], progress: Optional[ProgressCallback],
             overwrite: bool, check: bool = True, down_bits: Optional[int] = None) -> Path:
    to_flash = dst.suffix == ".flash"
    if src.is_file():
        if not is_gguf(src):  # the GGUF magic, whatever the file is called
            raise ValueError(f"{src.name}: not a GGUF file (it does not start with b'GGUF') or a model folder")

        if not to_flash:
            return convert_gguf(src, dst, dtype=dtype, progress=progress, overwrite=overwrite)  # None: keep the bits
        dst.parent.mkdir(parents=True, exist_ok=True)
        if check:  # both stages: the temporary mlx folder and the flash folder
            check_space(dst.parent, *_convert_need(src, dst, dtype))
        with destination_lock(dst):
            if dst.exists() and not overwrite:
                raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
            with scratch_dir(dst) as tmp:
                # None keeps the GGUF's bits: quantized mlx folder, then quantized flash bundles
                mid = convert_gguf(src, tmp / "mlx", dtype=dtype, progress=scaled(progress, 0.0, 0.5))
                return convert_to_flash(mid, dst, progress=scaled(progress, 0.5, 1.0), overwrite=overwrite,
                                        down_bits=down_bits)
    if to_flash and _is_moe_folder(src):  # experts as bundles (mlx_flash.moe), in the source's own dtype
        if dtype is not None:
            raise ValueError(f"{src.name}: a mixture-of-experts model keeps its own dtype and quantization "
                             f"(no --dtype)")
        return convert_to_moe_flash(src, dst, progress=progress, overwrite=overwrite)
    if to_flash:
        return convert_to_flash(src, dst, dtype=dtype, progress=progress, overwrite=overwrite, down_bits=down_bits)
    raise ValueError(f"{src} is already a model folder: convert it to a .flash folder (destination ending in .flash)")


def _is_moe_folder(src: Path) -> bool:
    try:
        return is_moe_config(json.loads((Path(src) / "config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return False


def remove_model(path: Path) -> None:
    """Delete a model folder, a broken one included (but not a folder that never was a model).
    It is first renamed to a hidden temporary, so an interrupted removal leaves no half model."""
    path = Path(path)
    try:
        inspect(path)
    except BrokenModel:
        if not (path.is_dir() and (path.suffix == ".flash" or (path / "manifest.json").exists()
                                   or (path / "config.json").exists())):
            raise ValueError(f"{path} is not a model folder") from None
    with destination_lock(path), translate_write_errors(path, what=f"the library folder {path.parent}"):
        gone = path.parent / temp_name(path.name, "trash")  # a killed removal's rest goes at the next scan
        os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


# --------------------------------------------------------------------------- import
class ImportRejected(ValueError):
    """The file or folder cannot be imported (the message says why, for the user)."""


_NAME_BAD = set('/\\:*?"<>|\0')


def check_importable(src: Path) -> str:
    """What ``src`` is — "gguf", "folder" (mlx-lm/HF safetensors) or "flash" — or raise
    :class:`ImportRejected` with a message a user can act on. Reads only metadata."""
    src = Path(src).expanduser()
    if not src.exists():
        raise ImportRejected(f"{src} does not exist")
    if src.is_file():
        if not is_gguf(src):
            raise ImportRejected(
                f"{src.name} is not a model: drop a .gguf file or a model folder "
                "(mlx-lm / Hugging Face, with config.json and .safetensors weights)")

        try:
            info = read_gguf_info(src)
        except Exception as e:  # GGUFError, truncated files, …
            raise ImportRejected(f"{src.name} is not a readable GGUF file: {e}") from None
        if info.get("problems"):
            raise ImportRejected(f"{src.name} cannot be imported: " + "; ".join(
                p.replace(str(src), src.name) for p in info["problems"]))
        return "gguf"
    if not src.is_dir():
        raise ImportRejected(f"{src} is neither a file nor a folder")
    if (src / "manifest.json").is_file() or is_moe_flash_dir(src):
        try:
            inspect(src)
        except BrokenModel as e:
            raise ImportRejected(str(e)) from None
        return "flash"
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        ggufs = sorted(src.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: drop that file instead)" if ggufs else ""
        raise ImportRejected(f"{src.name} is not a model folder: config.json is missing{hint}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ImportRejected(f"{src.name}/config.json is not valid JSON ({e})") from None
    mt = cfg.get("model_type") if isinstance(cfg, dict) else None
    if mt not in BY_MODEL_TYPE and mt not in BY_WRAPPER and mt not in BY_MOE_MODEL_TYPE:
        raise ImportRejected(f"{src.name}: unsupported architecture {mt!r} (config.json model_type); "
                             f"mlx-flash runs {supported_text()}")
    if not list(src.glob("*.safetensors")):
        raise ImportRejected(f"{src.name} has no .safetensors weights")
    return "folder"


def suggested_name(src: Path) -> str:
    """A library name for ``src``: the file's stem or the folder's name, without ``.flash``/``-mlx``."""
    src = Path(src)
    name = src.stem if src.is_file() else src.name
    for suffix in (".flash", "-mlx", "-MLX"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    name = "".join("_" if c in _NAME_BAD else c for c in name).strip(" .") or "model"
    return name


def validate_name(name: str) -> str:
    """``name`` stripped, or ValueError when it cannot name a folder in the library."""
    name = (name or "").strip()
    if name.endswith(".flash"):
        name = name[: -len(".flash")].strip()
    if not name or name.startswith(".") or any(c in _NAME_BAD for c in name) or len(name) > 200:
        raise ValueError(f"{name!r} cannot be a model name: use letters, digits, spaces, '-', '_' or '.' "
                         "(not starting with a dot, no slashes)")
    return name


def unique_name(name: str, root: Optional[Path] = None) -> str:
    """``name``, or ``name-2``, ``name-3``… whichever is free in the library."""
    root = Path(root) if root else paths.models_dir()
    cand, i = name, 2
    while (root / f"{cand}.flash").exists() or (root / cand).exists():
        cand, i = f"{name}-{i}", i + 1
    return cand


def import_model(src: Path, progress: Optional[ProgressCallback] = None, *, name: Optional[str] = None,
                 root: Optional[Path] = None, dtype: Optional[str] = None, calibrate: bool = True) -> Path:
    """Import a GGUF file, an mlx-lm/HF folder or a flash folder into the library as
    ``<root>/<name>.flash`` (root: ``paths.models_dir()``); return that folder.

    Conversion (and predictor calibration, when ``mlx_flash.calibrate`` exists and
    ``calibrate``) happen in a hidden temporary folder next to the library, which is
    renamed into place only when complete: a cancelled (``progress`` returned False →
    :class:`Cancelled`) or failed import leaves nothing behind. Raises
    :class:`ImportRejected` for sources that cannot be imported and ``FileExistsError``
    when ``name`` is taken (without ``name`` a free one is chosen).
    """
    src = Path(src).expanduser()
    kind = check_importable(src)
    root = Path(root) if root else paths.models_dir()
    if name is None:
        name = unique_name(suggested_name(src), root)
    name = validate_name(name)
    dst = root / f"{name}.flash"
    if dst.exists():
        raise FileExistsError(f"a model named {name!r} is already in the library")
    do_cal = calibrate
    conv_end = 0.7 if do_cal else 1.0
    report(progress, 0.0, f"importing {src.name}")
    need, what = (_convert_need(src, dst, dtype) if kind != "flash"
                  else (_dir_size(src), f"{dst} (a copy of {src.name})"))
    try:
        build = FolderBuild(dst, need=need, what=what)
    except FileExistsError:
        raise FileExistsError(f"a model named {name!r} is already in the library") from None
    work = build.tmp
    try:
        tmp = work / f"{name}.flash"
        if kind == "flash":
            report(progress, 0.01, f"copying {src.name}")
            files = [f for f in sorted(src.rglob("*")) if f.is_file()]
            total = sum(f.stat().st_size for f in files) or 1
            done = 0
            for f in files:
                out = tmp / f.relative_to(src)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)
                done += f.stat().st_size
                report(scaled(progress, 0.0, conv_end * 0.5), done / total, f"copying {f.name}")
            # the copy, checked against the manifest's checksums (names the file and the layer)
            try:
                if is_moe_flash_dir(tmp):
                    verify_moe_checksums(open_moe_flash(tmp), progress=scaled(progress, conv_end * 0.5, conv_end))
                else:
                    verify_checksums(open_flash(tmp), progress=scaled(progress, conv_end * 0.5, conv_end))
            except ChecksumError as e:
                raise ImportRejected(f"{src.name} cannot be imported: "
                                     f"{str(e).replace(str(tmp), str(src))}") from None
        else:
            convert_any(src, tmp, dtype=dtype, progress=scaled(progress, 0.0, conv_end))
        if do_cal and is_moe_flash_dir(tmp):  # expert frequencies for the hot-expert cache policy
            from .moe.engine import calibrate_reference  # noqa: PLC0415 - imports the engine (mlx-lm, seconds)

            calibrate_reference(tmp, progress=scaled(progress, conv_end, 0.99))
        elif do_cal:
            _cal.calibrate(tmp, tokens=_cal.auto_tokens(), progress=scaled(progress, conv_end, 0.99))
        report(progress, 0.995, "finishing")  # last chance to cancel
        for f in tmp.iterdir():  # the model's files become the published folder's
            os.replace(f, work / f.name)
        tmp.rmdir()
    except BaseException as e:
        if (t := build.fail(e)) is e:
            raise
        raise t from e
    try:
        build.publish()
    except FileExistsError:
        raise FileExistsError(f"a model named {name!r} appeared in the library during the import") from None
    report(progress, 1.0, f"imported {name}")
    return dst


def rename_model(path: Path, new_name: str) -> Path:
    """Rename a library model folder (keeping its ``.flash`` suffix, if any); return the new path."""
    path = Path(path)
    if describe(path) is None:
        raise ValueError(f"{path} is not a model folder")
    new_name = validate_name(new_name)
    dst = path.parent / (f"{new_name}.flash" if path.suffix == ".flash" else new_name)
    if dst == path:
        return path
    with destination_lock(path), destination_lock(dst), translate_write_errors(dst, what=f"{dst}"):
        if dst.exists():
            raise FileExistsError(f"a model named {new_name!r} is already in the library")
        os.replace(path, dst)
    return dst


def display_name(entry_or_path) -> str:
    """The name a user sees: the folder name without ``.flash``."""
    p = Path(getattr(entry_or_path, "path", entry_or_path))
    return p.name[: -len(".flash")] if p.name.endswith(".flash") else p.name


@dataclass(frozen=True)
class FlashDetails:
    """What the library view shows about a flash folder beyond :func:`describe`
    (:func:`flash_details`): ``ffn_bytes`` (the FFN on disk), ``dtype``, ``layers``,
    ``has_predictors`` (MoE: calibrated expert frequencies), ``source``, ``quantization``
    (e.g. "gate 4b/g32, up 4b/g32, down 4b/g32"; empty for float bundles) and, for MoE
    folders, ``experts`` (e.g. "16 experts, top-4")."""

    ffn_bytes: int
    dtype: str
    layers: int
    has_predictors: bool
    source: str
    quantization: str
    experts: Optional[str] = None


def flash_details(path: Path) -> Optional[FlashDetails]:
    """A flash folder's :class:`FlashDetails`; None for folders that are not flash models
    (or whose manifest is unreadable)."""
    if is_moe_flash_dir(path):
        try:
            mm = open_moe_flash(path).manifest
        except (OSError, FlashFormatError):
            return None
        q = ", ".join(f"{r} {v['bits']}b/g{v['group_size']}" for r, v in mm.quantization.items() if v != "none")
        return FlashDetails(ffn_bytes=mm.ffn_bytes_total, dtype=mm.dtype, layers=mm.num_layers,
                            has_predictors=mm.expert_frequencies is not None, source=mm.source, quantization=q,
                            experts=f"{mm.num_experts} experts, top-{mm.top_k}")
    try:
        m = Manifest.load(Path(path))
        quant = describe_quant(role_quantization(m))
    except (OSError, FlashFormatError):  # FlashFormatError: bad JSON, wrong types, missing fields
        return None
    return FlashDetails(ffn_bytes=m.ffn_bytes_total, dtype=m.dtype, layers=m.num_layers,
                        has_predictors=bool(m.predictors), source=m.source, quantization=quant)
