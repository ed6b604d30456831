"""Linux only: which system libraries Qt's X11 (xcb) platform plugin needs, and which are missing.

PySide6's wheel (and the PyInstaller bundle) carries Qt's own libraries but not the X11/xcb ones
(``libxcb-icccm.so.4``, ``libxcb-keysyms.so.1``, ...). When one is missing, Qt aborts with "Could not load
the Qt platform plugin xcb" and a hint naming ``libxcb-cursor0`` even when that one is installed. This
module finds the real list before ``QApplication`` exists: it reads the ``DT_NEEDED`` entries of
``libqxcb.so`` and, transitively, of every Qt library shipped next to it, and tries to load each
library that is not shipped (``ctypes``, i.e. the system's dynamic loader). A library that loads but
lacks a dependency of its own is reported too (the loader's message names it).

``python -m mlx_flash_app.platform_qt`` prints the result (exit 1 when something is missing);
``--packages`` prints only the Debian packages to install (``make app`` uses it). On macOS and
Windows everything here is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import PySide6  # the package only: no Qt library is loaded by this import

#: Debian/Ubuntu package of each system library the xcb plugin (and Qt's GUI libraries) load.
DEBIAN_PACKAGES: Dict[str, str] = {
    "libxcb.so.1": "libxcb1",
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libX11.so.6": "libx11-6",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libGL.so.1": "libgl1",
    "libEGL.so.1": "libegl1",
    "libOpenGL.so.0": "libopengl0",
    "libglib-2.0.so.0": "libglib2.0-0",
    "libgthread-2.0.so.0": "libglib2.0-0",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libdbus-1.so.3": "libdbus-1-3",
}

PLUGIN = Path("plugins") / "platforms" / "libqxcb.so"

_DT_NEEDED = 1
_SHT_DYNAMIC = 6


def needed_sonames(path: os.PathLike) -> List[str]:
    """The ``DT_NEEDED`` entries of an ELF shared object (what ``readelf -d`` lists as NEEDED)."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF":
        raise ValueError(f"{path}: not an ELF file")
    is64, end = data[4] == 2, "<" if data[5] == 1 else ">"
    if is64:
        shoff, = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
        sec_fmt = end + "IIQQQQIIQQ"
        dyn, dsize = end + "qQ", 16
    else:
        shoff, = struct.unpack_from(end + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x2E)
        sec_fmt = end + "IIIIIIIIII"
        dyn, dsize = end + "iI", 8
    sections = [struct.unpack_from(sec_fmt, data, shoff + i * shentsize) for i in range(shnum)]
    out: List[str] = []
    for s in sections:
        if s[1] != _SHT_DYNAMIC:
            continue
        str_off = sections[s[6]][4]  # sh_link: the string table; its sh_offset
        for o in range(s[4], s[4] + s[5], dsize):
            tag, val = struct.unpack_from(dyn, data, o)
            if tag == 0:
                break
            if tag == _DT_NEEDED:
                name_end = data.index(b"\0", str_off + val)
                out.append(data[str_off + val : name_end].decode())
    return out


def qt_dir() -> Optional[Path]:
    """PySide6's ``Qt`` folder (in the venv or inside a PyInstaller bundle), or None."""
    d = Path(PySide6.__file__).resolve().parent / "Qt"
    return d if d.is_dir() else None


def _shipped(soname: str, dirs: Sequence[Path]) -> Optional[Path]:
    for d in dirs:
        if (d / soname).is_file():
            return d / soname
    return None


def system_libraries(start: os.PathLike, dirs: Sequence[Path]) -> List[str]:
    """Sonames ``start`` needs from the system: its ``DT_NEEDED`` entries, and those of every library
    it needs that lies in ``dirs`` (shipped with Qt), transitively, minus the shipped ones."""
    seen, todo, out = set(), [Path(start)], []
    while todo:
        lib = todo.pop()
        for name in needed_sonames(lib):
            if name in seen:
                continue
            seen.add(name)
            shipped = _shipped(name, dirs)
            if shipped is not None:
                todo.append(shipped)
            else:
                out.append(name)
    return out


def missing_libraries(sonames: Iterable[str]) -> List[Tuple[str, str]]:
    """``(soname, why)`` for each library the dynamic loader cannot load (or whose own dependencies
    it cannot)."""
    out = []
    for name in sonames:
        try:
            ctypes.CDLL(name)
        except OSError as e:
            out.append((name, str(e)))
    return out


def xcb_missing() -> Tuple[List[str], List[Tuple[str, str]]]:
    """(the system libraries the xcb plugin needs, the missing ones with why). Empty off Linux or
    when PySide6 ships no xcb plugin."""
    if not sys.platform.startswith("linux"):
        return [], []
    q = qt_dir()
    if q is None or not (q / PLUGIN).is_file():
        return [], []
    dirs = [q / "lib", (q / PLUGIN).parent]
    if getattr(sys, "_MEIPASS", None):  # a PyInstaller bundle: libraries it collected sit at the top
        dirs.append(Path(sys._MEIPASS))
    needed = system_libraries(q / PLUGIN, dirs)
    return needed, missing_libraries(needed)


def packages_for(sonames: Iterable[str]) -> List[str]:
    """Debian packages providing ``sonames`` (sorted, unique; unknown ones left out)."""
    return sorted({DEBIAN_PACKAGES[s] for s in sonames if s in DEBIAN_PACKAGES})


def describe(missing: Sequence[Tuple[str, str]]) -> str:
    """A message naming the missing libraries and the apt command that installs them."""
    names = [m[0] for m in missing]
    lines = [f"Qt's X11 (xcb) platform plugin cannot load: missing system libraries {', '.join(names)}"]
    lines += [f"  {why}" for _, why in missing]
    pkgs = packages_for(names)
    if pkgs:
        lines.append(f"  Debian/Ubuntu: sudo apt-get install {' '.join(pkgs)}")
    unknown = [n for n in names if n not in DEBIAN_PACKAGES]
    if unknown:
        lines.append(f"  (find the package of {', '.join(unknown)} with your distribution's tools, "
                     f"e.g. apt-file search)")
    return "\n".join(lines)


def wants_xcb() -> bool:
    """Whether Qt will try the xcb platform: Linux, and ``QT_QPA_PLATFORM`` unset or naming xcb."""
    platform = os.environ.get("QT_QPA_PLATFORM", "").strip()
    return sys.platform.startswith("linux") and (not platform or platform.split(";")[0].startswith("xcb"))


def check_before_qapplication() -> Optional[str]:
    """Before ``QApplication``: the message to print when the xcb plugin will not load, else None.
    A no-op (None) off Linux and on other Qt platforms (offscreen, wayland)."""
    if not wants_xcb():
        return None
    _, missing = xcb_missing()
    return describe(missing) if missing else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    needed, missing = xcb_missing()
    if "--packages" in args:
        print(" ".join(packages_for(m[0] for m in missing)))
        return 0
    if not needed:
        print("Qt xcb plugin: nothing to check here (not Linux, or no xcb plugin in PySide6)")
        return 0
    if missing:
        print(describe(missing))
        return 1
    print(f"Qt xcb plugin: all {len(needed)} system libraries it needs load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
