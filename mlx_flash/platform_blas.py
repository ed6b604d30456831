"""Platform shim: a fast BLAS for MLX's CPU backend on Linux.

The Linux ``mlx[cpu]`` wheel links a bundled reference (netlib) BLAS
(``mlx_cpu.libs/libblas-*.so``): a float32 512x576 @ 576x1536 matmul runs at
~6 GFLOP/s on this project's 2-core VM. MLX resolves ``cblas_sgemm`` and friends
dynamically, so an optimised BLAS loaded into the process's global symbol scope
*before* ``mlx.core`` is imported takes their place: with Debian's
``libopenblas0-pthread`` the same matmul runs at ~30-200 GFLOP/s. Calibration and evaluation no
longer depend on it: their float32 matmuls run in numpy (``dense_model.NumpyLinear``; numpy's wheel
has its own OpenBLAS), so the predictors are the same with or without this library.

:func:`preload` is called by ``mlx_flash/__init__.py``, i.e. before anything in
this package imports MLX. It does nothing on macOS (MLX uses Accelerate/Metal
there), on Windows, when MLX was imported first (too late: reported by
:func:`status`), or when ``MLX_FLASH_BLAS=off``. ``MLX_FLASH_BLAS=/path/lib.so``
picks a library explicitly. float16/bfloat16 matmuls do not go through BLAS, so
this only speeds MLX's own float32 work (relufy, float32 models).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

ENV = "MLX_FLASH_BLAS"

#: Where Debian/Ubuntu (and most distributions) put a threaded OpenBLAS.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

#: The Debian package that provides the first candidate (``make install`` installs it when it can).
DEBIAN_PACKAGE = "libopenblas0-pthread"

_loaded: Optional[str] = None
_reason: str = "not attempted"


def candidates() -> List[str]:
    """Libraries to try, in order (``$MLX_FLASH_BLAS`` first when it names a file)."""
    env = os.environ.get(ENV, "").strip()
    out = [env] if env and env.lower() not in ("off", "0", "no", "auto") else []
    out += [p for p in CANDIDATES if p not in out]
    found = ctypes.util.find_library("openblas")
    if found and found not in out:
        out.append(found)
    return out


def preload() -> Optional[str]:
    """Load an optimised BLAS with ``RTLD_GLOBAL`` so that MLX binds to it; return its
    path, or None (see :func:`status` for why). Safe to call more than once."""
    global _loaded, _reason
    if _loaded is not None:
        return _loaded
    if not sys.platform.startswith("linux"):
        _reason = f"not needed on {sys.platform} (MLX uses the system's BLAS there)"
        return None
    if os.environ.get(ENV, "").strip().lower() in ("off", "0", "no"):
        _reason = f"disabled by {ENV}"
        return None
    if "mlx.core" in sys.modules:
        _reason = "mlx.core was imported before mlx_flash: too late to swap its BLAS"
        return None
    for path in candidates():
        if "/" in path and not Path(path).is_file():
            continue
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
        except OSError as e:  # wrong architecture, missing dependency: try the next
            _reason = f"{path}: {e}"
            continue
        _loaded = path
        _reason = "loaded"
        return path
    _reason = f"no OpenBLAS found (Debian/Ubuntu: apt-get install {DEBIAN_PACKAGE})"
    return None


def status() -> str:
    """One line for logs and ``mlx-flash --version``-style reports."""
    if _loaded:
        return f"fast BLAS: {_loaded}"
    return f"fast BLAS: none ({_reason})"


def fast_blas() -> bool:
    """Whether float32 matmuls get an optimised BLAS (always true off Linux)."""
    return _loaded is not None or not sys.platform.startswith("linux")


#: Thread-count setters of the OpenBLAS that numpy's wheels bundle (numpy 2: scipy-openblas, 64-bit ints).
_NUMPY_BLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                       "openblas_set_num_threads64_", "openblas_set_num_threads")


def _numpy_openblas():
    """(set, get) of numpy's bundled OpenBLAS thread count, or None where it has another BLAS."""
    import numpy  # noqa: PLC0415 - numpy (with its own OpenBLAS) only after the shim has run

    libs = Path(numpy.__file__).resolve().parent.parent / "numpy.libs"
    for path in sorted(libs.glob("*openblas*")) if libs.is_dir() else []:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        for name in _NUMPY_BLAS_SETTERS:
            if hasattr(lib, name):
                get = getattr(lib, name.replace("set_num_threads", "get_num_threads"), None)
                return getattr(lib, name), get
    return None


@contextmanager
def numpy_blas_single_thread() -> Iterator[None]:
    """Run numpy's matmuls on one thread inside the block (then restore the count).

    Measured on the shared 2-core VM under load (load average 12-16): one generation step of the
    default model through calibration's numpy matmuls (211 small matmuls, 55 x 576 x 1536) took
    27-36 s with OpenBLAS's 2 threads (they spin waiting for each other when the cores are busy)
    and 0.3 s with 1; on an idle machine one thread still runs these shapes at ~100+ GFLOP/s.
    A no-op where numpy's BLAS is not a bundled OpenBLAS (macOS Accelerate, conda MKL)."""
    fns = _numpy_openblas()
    if fns is None:
        yield
        return
    set_threads, get_threads = fns
    before = int(get_threads()) if get_threads is not None else None
    set_threads(1)
    try:
        yield
    finally:
        if before:
            set_threads(before)
