"""Look and feel: the dark palette, the stylesheet in resources/styles, tinted SVG icons,
and the app's settings file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pyqtgraph as pg
from PySide6.QtCore import QByteArray, QRectF, QSettings, QSize, Qt
from PySide6.QtGui import QColor, QFont, QIcon, QPainter, QPalette, QPixmap
from PySide6.QtSvg import QSvgRenderer
from PySide6.QtWidgets import QApplication

from mlx_flash import paths
from mlx_flash.units import fmt_bytes

# The palette (kept in sync with resources/styles/dark.qss).
BG = "#0f1115"
SIDEBAR = "#14171c"
PANEL = "#181b21"
CARD = "#1d2128"
BORDER = "#2a2f38"
TEXT = "#e6e8eb"
MUTED = "#8b929c"
ACCENT = "#8b5cf6"
ACCENT_2 = "#a78bfa"
DANGER = "#f85149"
WARN = "#e3b341"
OK = "#3fb950"
CODE_BG = "#11141a"

# Plot series colours.
C_TPS = "#a78bfa"
C_PRED = "#f59e0b"
C_IO = "#38bdf8"
C_COMPUTE = "#34d399"
C_BUDGET = "#f85149"
C_RSS = "#f59e0b"
C_PEAK = "#e879f9"


def icons_dir() -> Path:
    return paths.resources_dir() / "icons"


def styles_dir() -> Path:
    return paths.resources_dir() / "styles"


@lru_cache(maxsize=256)
def icon(name: str, color: str = TEXT, size: int = 48) -> QIcon:
    """resources/icons/<name>.svg drawn in ``color`` (the SVGs use ``currentColor``)."""
    path = icons_dir() / f"{name}.svg"
    if not path.is_file():
        return QIcon()
    data = path.read_text().replace("currentColor", color)
    renderer = QSvgRenderer(QByteArray(data.encode()))
    ico = QIcon()
    for s in (size // 2, size):
        pm = QPixmap(QSize(s, s))
        pm.fill(Qt.transparent)
        p = QPainter(pm)
        p.setRenderHint(QPainter.Antialiasing)
        renderer.render(p, QRectF(0, 0, s, s))
        p.end()
        ico.addPixmap(pm)
    return ico


def app_icon() -> QIcon:
    path = icons_dir() / "app.svg"
    return QIcon(str(path)) if path.is_file() else QIcon()


def apply(app: QApplication) -> None:
    """The Fusion style, the dark palette and resources/styles/dark.qss."""
    app.setStyle("Fusion")
    pal = QPalette()
    for role, col in (
        (QPalette.Window, BG), (QPalette.WindowText, TEXT), (QPalette.Base, PANEL),
        (QPalette.AlternateBase, CARD), (QPalette.Text, TEXT), (QPalette.Button, CARD),
        (QPalette.ButtonText, TEXT), (QPalette.Highlight, ACCENT), (QPalette.HighlightedText, "#ffffff"),
        (QPalette.ToolTipBase, CARD), (QPalette.ToolTipText, TEXT), (QPalette.PlaceholderText, MUTED),
        (QPalette.Link, ACCENT_2), (QPalette.BrightText, "#ffffff"),
    ):
        pal.setColor(role, QColor(col))
    for role in (QPalette.WindowText, QPalette.Text, QPalette.ButtonText):
        pal.setColor(QPalette.Disabled, role, QColor(MUTED))
    app.setPalette(pal)
    font = app.font()
    if font.pointSizeF() < 10:
        font.setPointSizeF(10)
    app.setFont(font)
    qss = styles_dir() / "dark.qss"
    if qss.is_file():
        app.setStyleSheet(qss.read_text())
    app.setWindowIcon(app_icon())
    pg.setConfigOptions(antialias=True, background=PANEL, foreground=MUTED)


def mono_font(size: float = 0) -> QFont:
    f = QFont("DejaVu Sans Mono")
    f.setStyleHint(QFont.Monospace)
    f.setFixedPitch(True)
    if size:
        f.setPointSizeF(size)
    return f


def settings() -> QSettings:
    """The app's settings (window geometry, chat settings, per-model settings): an INI file
    in the user data folder, so ``MLX_FLASH_HOME`` isolates tests and CI as it does models."""
    path = paths.data_dir() / "settings.ini"
    path.parent.mkdir(parents=True, exist_ok=True)
    return QSettings(str(path), QSettings.IniFormat)


def human_bytes(n: float) -> str:
    """Bytes as every screen shows them: :func:`mlx_flash.units.fmt_bytes` (None/0 → "0 B")."""
    return fmt_bytes(n or 0)


def human_count(n: float) -> str:
    n = float(n or 0)
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            v = n / div
            return f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{n:.0f}"
