"""The user's model library: list, import (convert with progress and cancel), remove.

Models live in ``paths.models_dir()``: mlx-lm folders (dense) and ``.flash``
folders (the flash format). Import accepts a GGUF file or an mlx-lm/Hugging
Face folder with safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from . import paths
from .progress import Cancelled, ProgressCallback, scaled  # noqa: F401 (Cancelled: re-exported for callers)


@dataclass
class ModelEntry:
    name: str
    path: Path
    kind: str            # "flash" or "mlx"
    architecture: str
    size_bytes: int
    parameters: int


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


def describe(path: Path) -> Optional[ModelEntry]:
    path = Path(path)
    if (path / "manifest.json").is_file():
        kind = "flash"
        try:
            cfg = json.loads((path / "manifest.json").read_text()).get("model_args", {})
        except (OSError, json.JSONDecodeError):
            return None
    elif (path / "config.json").is_file():
        kind = "mlx"
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
    else:
        return None
    return ModelEntry(path.name, path, kind, str(cfg.get("model_type", "?")), _dir_size(path), _param_count(cfg))


def list_models(root: Optional[Path] = None) -> List[ModelEntry]:
    root = Path(root) if root else paths.models_dir()
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not p.is_dir():
            continue
        e = describe(p)
        if e is not None:
            out.append(e)
    return out


def convert_any(src: Path, dst: Path, *, dtype: Optional[str] = None,
                progress: Optional[ProgressCallback] = None, overwrite: bool = False,
                calibrate: bool = False) -> Path:
    """GGUF file or mlx-lm/HF folder -> mlx-lm folder, or -> flash folder when ``dst`` ends in .flash.

    ``calibrate`` (flash destinations only): also fit the activation predictors
    (:func:`mlx_flash.calibrate.calibrate`). Conversion and calibration then run in a
    hidden folder next to ``dst`` that is renamed into place only when both are done,
    so a cancel or a failure leaves ``dst`` as it was.
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"no such file or folder: {src}")
    if not (calibrate and dst.suffix == ".flash"):
        return _convert(src, dst, dtype=dtype, progress=progress, overwrite=overwrite)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (use overwrite)")
    from . import calibrate as _cal

    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=dst.parent))
    try:
        tmp = _convert(src, work / dst.name, dtype=dtype, progress=scaled(progress, 0.0, 0.3), overwrite=False)
        _cal.calibrate(tmp, tokens=_cal.auto_tokens(), progress=scaled(progress, 0.3, 1.0))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dst


def _convert(src: Path, dst: Path, *, dtype: Optional[str], progress: Optional[ProgressCallback],
             overwrite: bool) -> Path:
    from .storage.format import convert_to_flash

    to_flash = dst.suffix == ".flash"
    if src.is_file():
        if src.suffix.lower() != ".gguf":
            raise ValueError(f"{src.name}: not a GGUF file or a model folder")
        from .convert.gguf import convert_gguf

        if not to_flash:
            return convert_gguf(src, dst, dtype=dtype, progress=progress, overwrite=overwrite)  # None: keep the bits
        dst.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=dst.parent) as tmp:
            # flash bundles are float until quantized bundles exist (issue #14): dequantize here
            mid = convert_gguf(src, Path(tmp) / "mlx", dtype=dtype or "bfloat16", progress=scaled(progress, 0.0, 0.5))
            return convert_to_flash(mid, dst, progress=scaled(progress, 0.5, 1.0), overwrite=overwrite)
    if to_flash:
        return convert_to_flash(src, dst, dtype=dtype, progress=progress, overwrite=overwrite)
    raise ValueError(f"{src} is already a model folder: convert it to a .flash folder (destination ending in .flash)")


def remove_model(path: Path) -> None:
    path = Path(path)
    if describe(path) is None:
        raise ValueError(f"{path} is not a model folder")
    shutil.rmtree(path)


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
        if src.suffix.lower() != ".gguf":
            raise ImportRejected(
                f"{src.name} is not a model: drop a .gguf file or a model folder "
                "(mlx-lm / Hugging Face, with config.json and .safetensors weights)")
        from .convert.gguf import read_gguf_info

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
    if (src / "manifest.json").is_file():
        if describe(src) is None:
            raise ImportRejected(f"{src.name}: manifest.json is unreadable")
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
    from .models import ARCHITECTURES

    mt = cfg.get("model_type") if isinstance(cfg, dict) else None
    if mt not in ARCHITECTURES:
        raise ImportRejected(f"{src.name}: unsupported architecture {mt!r}; mlx-flash runs "
                             f"{', '.join(sorted(ARCHITECTURES))}")
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


def calibration_available() -> bool:
    """Whether ``mlx_flash.calibrate`` (predictor training) is installed in this build."""
    import importlib.util

    try:
        return importlib.util.find_spec("mlx_flash.calibrate") is not None
    except (ImportError, ValueError):
        return False


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
    from .progress import report

    src = Path(src).expanduser()
    kind = check_importable(src)
    root = Path(root) if root else paths.models_dir()
    if name is None:
        name = unique_name(suggested_name(src), root)
    name = validate_name(name)
    dst = root / f"{name}.flash"
    if dst.exists():
        raise FileExistsError(f"a model named {name!r} is already in the library")
    root.mkdir(parents=True, exist_ok=True)
    do_cal = calibrate and calibration_available()
    conv_end = 0.7 if do_cal else 1.0
    report(progress, 0.0, f"importing {src.name}")
    work = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
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
                report(scaled(progress, 0.0, conv_end), done / total, f"copying {f.name}")
        else:
            convert_any(src, tmp, dtype=dtype, progress=scaled(progress, 0.0, conv_end))
        if do_cal:
            from . import calibrate as _cal

            _cal.calibrate(tmp, tokens=_cal.auto_tokens(), progress=scaled(progress, conv_end, 0.99))
        report(progress, 0.995, "finishing")  # last chance to cancel
        if dst.exists():
            raise FileExistsError(f"a model named {name!r} appeared in the library during the import")
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
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
    if dst.exists():
        raise FileExistsError(f"a model named {new_name!r} is already in the library")
    os.replace(path, dst)
    return dst


def display_name(entry_or_path) -> str:
    """The name a user sees: the folder name without ``.flash``."""
    p = Path(getattr(entry_or_path, "path", entry_or_path))
    return p.name[: -len(".flash")] if p.name.endswith(".flash") else p.name


def flash_details(path: Path) -> dict:
    """What the library view shows about a flash folder beyond :func:`describe`:
    ``ffn_bytes`` (the FFN on disk), ``dtype``, ``layers``, ``has_predictors``, ``source``.
    Empty for folders that are not flash models (or whose manifest is unreadable)."""
    from .storage.format import FlashFormatError, Manifest

    try:
        m = Manifest.load(Path(path))
    except (OSError, FlashFormatError):
        return {}
    return {"ffn_bytes": m.ffn_bytes_total, "dtype": m.dtype, "layers": m.num_layers,
            "has_predictors": bool(m.predictors), "source": m.source}
