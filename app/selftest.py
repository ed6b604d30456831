"""`mlx-flash-app --selftest`: a headless check that an install or an app bundle works.

No window is shown. In order it checks:

1. the bundled/installed resources (icons, stylesheet, calibration prompts) are found;
2. Qt starts (on the ``offscreen`` platform unless ``QT_QPA_PLATFORM`` says otherwise), the app
   icon renders through QtSvg and the GUI modules import (so a bundle missing a Qt plugin or a
   module fails here, not in the user's hands);
3. the model loads through the **flash** engine: ``--model PATH`` (a ``.flash`` folder), else the
   embedded default model, prepared once into the data folder with
   :func:`mlx_flash.default_model.ensure_default_flash`, the function the app runs in its worker
   process (conversion and predictor calibration: a few minutes on 2 cores, with or without OpenBLAS);
4. a few tokens are generated; the text and the Stats summary are printed.

Exit status 0 when everything worked; 1 with the error (and its traceback on stderr) otherwise.
Works the same from source (``python -m mlx_flash_app --selftest``) and from a PyInstaller bundle
(``dist/mlx-flash/mlx-flash --selftest``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx

from mlx_flash import default_model, paths, platform_blas
from mlx_flash.config import FlashConfig
from mlx_flash.engine import is_flash_dir, load
from mlx_flash.stats import print_summary

from . import platform_qt

PROMPT = "What is the capital of France?"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-flash-app --selftest",
                                description="headless check: Qt, resources, flash engine, a few tokens")
    p.add_argument("--selftest", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None,
                   help="a .flash model folder (default: the embedded model, prepared into the data folder)")
    p.add_argument("--tokens", type=int, default=8, help="tokens to generate (default 8)")
    p.add_argument("--prompt", default=PROMPT, help="the user message")
    p.add_argument("--active", default="auto", choices=("auto", "all", "oracle", "predictor", "gate"),
                   help="active-neuron choice; auto: measured per model (gate-first, predictor or all) when "
                        "calibrated, else oracle")
    p.add_argument("--no-qt", action="store_true", help="skip the Qt checks (engine only)")
    return p


def _say(msg: str) -> None:
    print(f"[selftest] {msg}", flush=True)


def check_resources() -> Path:
    res = paths.resources_dir()
    needed = [res / "icons" / "app.svg", res / "styles" / "dark.qss", res / "calibration" / "prompts.txt"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise RuntimeError(f"resources missing: {', '.join(missing)}")
    _say(f"resources: {res}")
    return res


def check_qt():
    """Start a QApplication without a window; render the app icon; import the GUI modules."""
    if sys.platform.startswith("linux"):  # the check the app makes before Qt starts on X11
        needed, missing = platform_qt.xcb_missing()
        _say(platform_qt.describe(missing) if missing
             else f"Qt xcb plugin: all {len(needed)} system libraries it needs load")
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    # Qt only here: `--no-qt` checks the engine alone
    import PySide6  # noqa: PLC0415
    from PySide6.QtWidgets import QApplication  # noqa: PLC0415

    from . import theme  # noqa: PLC0415

    app = QApplication.instance() or QApplication([sys.argv[0]])

    theme.apply(app)
    pm = theme.app_icon().pixmap(64, 64)
    if pm.isNull():
        raise RuntimeError("the app icon did not render (QtSvg or resources/icons/app.svg missing)")
    from . import main_window  # noqa: F401, PLC0415 - the whole GUI module tree imports

    _say(f"Qt: PySide6 {PySide6.__version__}, platform '{app.platformName()}', app icon rendered, "
         "GUI modules imported")
    return app


def _flash_config(path: Path, active: str):
    """The engine's configuration: ``active`` as asked ("auto": the engine measures per model)."""
    return FlashConfig(active=active)


def run_engine(model: Optional[str], tokens: int, prompt: str, active: str) -> List:
    _say(f"MLX {mx.__version__}, device {mx.default_device()}")
    _say(f"data folder: {paths.data_dir()}")
    _say(platform_blas.status())
    t = time.perf_counter()
    if model:
        path = Path(model).expanduser()
    else:
        _say(f"default model GGUF: {default_model.gguf_path()}")
        last = [-1]

        def progress(fraction: float, message: str = "") -> bool:
            step = int(fraction * 4)  # a line per quarter, not a bar: the output is a log
            if step > last[0]:
                last[0] = step
                _say(f"  preparing {fraction:4.0%} {message}")
            return True

        path = default_model.ensure_default_flash(progress=progress)
    if not is_flash_dir(path):
        raise RuntimeError(f"{path} is not a flash model folder (no manifest.json)")
    _say(f"model: {path} (ready in {time.perf_counter() - t:.1f} s)")

    t = time.perf_counter()
    engine = load(path, _flash_config(path, active))
    try:
        if not engine.is_flash:
            raise RuntimeError(f"{path} loaded as {engine.mode}, not through the flash engine")
        _say(f"loaded {engine.name} ({engine.mode}) in {time.perf_counter() - t:.1f} s")
        _say(f"prompt: {prompt!r}")
        stats, pieces = [], []
        for r in engine.stream_generate([{"role": "user", "content": prompt}], tokens, temperature=0.0):
            pieces.append(r.text)
            stats.append(r.stats)
        if not stats:
            raise RuntimeError("the engine generated no tokens")
        _say(f"generated {len(stats)} tokens: {''.join(pieces)!r}")
        print_summary(stats, file=sys.stdout)
        sys.stdout.flush()
        return stats
    finally:
        engine.close()


def run(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    t0 = time.perf_counter()
    frozen = getattr(sys, "frozen", False)
    _say(f"mlx-flash selftest: Python {platform.python_version()} on {platform.system()} {platform.machine()}"
         f"{', frozen bundle ' + str(getattr(sys, '_MEIPASS', '')) if frozen else ', from source'}")
    app = None
    try:
        check_resources()
        if not args.no_qt:
            app = check_qt()
        run_engine(args.model, max(1, args.tokens), args.prompt, args.active)
    except BaseException as e:
        if isinstance(e, SystemExit) and not e.code:
            e = RuntimeError(f"exited early ({e!r})")
        traceback.print_exc(file=sys.stderr)
        print(f"[selftest] FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        del app
    _say(f"OK in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run())
