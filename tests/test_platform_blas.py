"""The Linux BLAS shim: loaded before MLX, switchable off, and too late after MLX."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_flash import platform_blas

LINUX = sys.platform.startswith("linux")
HAVE_OPENBLAS = any(Path(p).is_file() for p in platform_blas.CANDIDATES)


def _status(code: str, **env) -> str:
    e = dict(os.environ)
    e.pop(platform_blas.ENV, None)
    e.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not (LINUX and HAVE_OPENBLAS), reason="needs Linux with an OpenBLAS installed")
def test_openblas_is_loaded_and_mlx_uses_it():
    code = ("import time, mlx_flash, mlx.core as mx\n"
            "from mlx_flash import platform_blas as p\n"
            "a = mx.random.normal((512, 576)); b = mx.random.normal((576, 1536)); mx.eval(a, b)\n"
            "mx.eval(a @ b); t = time.perf_counter()\n"
            "for _ in range(5): mx.eval(a @ b)\n"
            "print(p.status(), '|', 5 * 2 * 512 * 576 * 1536 / (time.perf_counter() - t) / 1e9)\n")
    line = _status(code)
    assert line.startswith("fast BLAS: /"), line
    # and the map of the process shows MLX bound to it (not only that it was loaded)
    maps = _status("import mlx_flash, mlx.core as mx, os; mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)));"
                   "print(open(f'/proc/{os.getpid()}/maps').read().count('openblas') > 0)")
    assert maps == "True"
    print("float32 matmul GFLOP/s with the shim:", line.split("|")[1])


@pytest.mark.skipif(not LINUX, reason="the shim only acts on Linux")
def test_switched_off_by_environment():
    assert _status("import mlx_flash; from mlx_flash import platform_blas as p; print(p.status())",
                   MLX_FLASH_BLAS="off") == f"fast BLAS: none (disabled by {platform_blas.ENV})"


@pytest.mark.skipif(not LINUX, reason="the shim only acts on Linux")
def test_too_late_when_mlx_was_imported_first():
    line = _status("import mlx.core, mlx_flash; from mlx_flash import platform_blas as p; print(p.status())")
    assert "imported before mlx_flash" in line


@pytest.mark.skipif(not LINUX, reason="the shim only acts on Linux")
def test_a_missing_explicit_library_falls_back_to_the_next():
    line = _status("import mlx_flash; from mlx_flash import platform_blas as p; print(p.status())",
                   MLX_FLASH_BLAS="/nonexistent/libfoo.so")
    if HAVE_OPENBLAS:
        assert line.startswith("fast BLAS: /usr"), line
    else:
        assert line.startswith("fast BLAS: none"), line
