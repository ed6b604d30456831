"""Render the bundle icon from its SVG source: ``resources/icons/mlx-flash.svg`` →

* ``resources/icons/mlx-flash.png``  (512 px: the Linux bundle's icon, next to its .desktop file)
* ``resources/icons/mlx-flash.icns`` (the macOS .app icon: 16…1024 px, written by Pillow)

The outputs are kept in the repository, so a build needs neither step; run this after editing the
SVG: ``.venv/bin/python packaging/make_icons.py`` (QtSvg renders, headless; Pillow writes the ICNS).
On a Mac, ``--iconutil`` builds the .icns with Apple's ``iconutil`` from an .iconset instead.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ICONS = ROOT / "resources" / "icons"
SOURCE = ICONS / "mlx-flash.svg"
PNG = ICONS / "mlx-flash.png"
ICNS = ICONS / "mlx-flash.icns"
ICNS_SIZES = (16, 32, 64, 128, 256, 512, 1024)


def render_png(svg: Path, size: int) -> bytes:
    """The SVG drawn at ``size`` × ``size`` pixels (transparent background), as PNG bytes."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    _app = QGuiApplication.instance() or QGuiApplication([sys.argv[0]])  # noqa: F841 (QPainter needs it)
    renderer = QSvgRenderer(str(svg))
    if not renderer.isValid():
        raise SystemExit(f"error: {svg} is not a valid SVG for QtSvg")
    img = QImage(size, size, QImage.Format.Format_ARGB32)
    img.fill(Qt.GlobalColor.transparent)
    painter = QPainter(img)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter)
    painter.end()
    data = QByteArray()
    buf = QBuffer(data)
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    img.save(buf, "PNG")
    buf.close()
    return bytes(data)


def write_icns_pillow(svg: Path, dst: Path) -> None:
    from PIL import Image

    images = [Image.open(io.BytesIO(render_png(svg, s))).convert("RGBA") for s in ICNS_SIZES]
    # Pillow's ICNS writer takes the largest image and the others through append_images.
    images[-1].save(dst, format="ICNS", append_images=images[:-1])


def write_icns_iconutil(svg: Path, dst: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        iconset = Path(tmp) / "mlx-flash.iconset"
        iconset.mkdir()
        for s in (16, 32, 128, 256, 512):
            (iconset / f"icon_{s}x{s}.png").write_bytes(render_png(svg, s))
            (iconset / f"icon_{s}x{s}@2x.png").write_bytes(render_png(svg, 2 * s))
        subprocess.run(["iconutil", "-c", "icns", str(iconset), "-o", str(dst)], check=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iconutil", action="store_true", help="build the .icns with macOS iconutil")
    args = p.parse_args(argv)
    PNG.write_bytes(render_png(SOURCE, 512))
    print(f"wrote {PNG.relative_to(ROOT)}")
    if args.iconutil:
        if shutil.which("iconutil") is None:
            raise SystemExit("error: iconutil is macOS-only; drop --iconutil to use Pillow")
        write_icns_iconutil(SOURCE, ICNS)
    else:
        write_icns_pillow(SOURCE, ICNS)
    print(f"wrote {ICNS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
