"""`python -m mlx_flash_app` / `mlx-flash-app`: the desktop chat window."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import PySide6  # the package only: no Qt library is loaded by this import

from mlx_flash import paths

from . import platform_qt


def main(argv=None) -> int:
    if "--selftest" in (sys.argv[1:] if argv is None else argv):  # headless check (app/selftest.py)
        from . import selftest  # noqa: PLC0415 - `--selftest --no-qt` must run without the GUI modules

        return selftest.run(argv)
    parser = argparse.ArgumentParser(prog="mlx-flash-app", description="mlx-flash: chat with models bigger than memory")
    parser.add_argument("--model", default=None,
                        help="model folder to open, or a name in the library (default: the last one used, "
                             "else the embedded model)")
    parser.add_argument("--dense", action="store_true", help="run the built-in model dense instead of through flash")
    args, qt_args = parser.parse_known_args(argv)

    _check_pyside()
    problem = platform_qt.check_before_qapplication()  # Linux: name the xcb libraries Qt will miss
    if problem:
        print(problem, file=sys.stderr)
    # Qt and the window only now, after the check of the libraries Qt's platform plugin needs
    import shiboken6  # noqa: PLC0415
    from PySide6.QtWidgets import QApplication  # noqa: PLC0415

    from . import theme  # noqa: PLC0415
    from .main_window import MainWindow  # noqa: PLC0415

    app = QApplication.instance() or QApplication([sys.argv[0], *qt_args])
    app.setApplicationName("mlx-flash")
    app.setOrganizationName("mlx-flash")
    app.setApplicationDisplayName("mlx-flash")
    theme.apply(app)
    win = MainWindow(model_path=_resolve(args.model), flash=not args.dense)
    win.show()
    win.start()
    rc = app.exec()
    # Delete the window while Qt is still fully alive rather than leaving it to the
    # garbage collector at interpreter shutdown (order of destruction is then arbitrary).
    shiboken6.delete(win)
    del win
    return rc


def _check_pyside() -> None:
    """PySide6 6.12.0 corrupts the reference counts of None/True/False under CPython < 3.12,
    and the app aborts after a while: say so up front (pyproject pins < 6.12 there)."""
    ver = tuple(int(x) for x in PySide6.__version__.split(".")[:2])
    if sys.version_info < (3, 12) and ver >= (6, 12):
        print(f"warning: PySide6 {PySide6.__version__} on Python {sys.version.split()[0]} has a reference-count "
              "bug that crashes the app after a while; install PySide6-Essentials<6.12 "
              "(pip install 'PySide6-Essentials<6.12') or use Python 3.12+.", file=sys.stderr)


def _resolve(name):
    """A path, or a model name in the library (with or without ``.flash``)."""
    if name is None:
        return None
    p = Path(name).expanduser()
    if p.exists():
        return str(p)
    for cand in (paths.models_dir() / name, paths.models_dir() / f"{name}.flash"):
        if cand.is_dir():
            return str(cand)
    return str(p)  # load() reports the missing folder in the window


if __name__ == "__main__":
    sys.exit(main())
