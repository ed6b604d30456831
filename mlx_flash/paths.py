"""Where mlx-flash keeps its files.

``data_dir()`` is the per-user data folder (``platformdirs.user_data_path("mlx-flash")``),
or ``$MLX_FLASH_HOME`` when that is set: tests and CI point it at a temporary folder so
they never touch the user's real library. This module is the one place that reads
the variable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import platformdirs

APP_NAME = "mlx-flash"
HOME_ENV = "MLX_FLASH_HOME"


def data_dir() -> Path:
    """The folder holding converted models, caches and the corpus (not created)."""
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser()

    return Path(platformdirs.user_data_path(APP_NAME))


def models_dir() -> Path:
    """The user's model library: one sub-folder per model."""
    return data_dir() / "models"


def resources_dir() -> Path:
    """The repository's ``resources/`` folder (icons, stylesheets, calibration prompts); in a
    PyInstaller bundle (``sys.frozen``), the copy bundled next to the code (``sys._MEIPASS``)."""
    if getattr(sys, "frozen", False) and hasattr(sys, "_MEIPASS"):
        return Path(sys._MEIPASS) / "resources"
    return Path(__file__).resolve().parents[1] / "resources"
