#!/usr/bin/env bash
# Linux only: installs Debian's threaded OpenBLAS (libopenblas0-pthread), which mlx_flash/platform_blas.py
# loads before MLX so that float32 matmuls (predictor calibration, relufy) run ~30x faster than with the
# reference BLAS bundled in the mlx[cpu] wheel. Optional: without it everything works, calibration is slower.
set -u
[ "$(uname -s)" = "Linux" ] || exit 0
for f in /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 /usr/lib/*-linux-gnu/openblas-openmp/libopenblas.so.0 \
         /usr/lib64/libopenblas.so.0 /usr/lib/libopenblas.so.0; do
  [ -f "$f" ] && exit 0
done
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  echo "installing Debian's libopenblas0-pthread (fast float32 matmuls for calibration)..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null) \
    || echo "warning: could not install libopenblas0-pthread; calibration will use fewer tokens and be slower"
else
  echo "note: 'sudo apt-get install libopenblas0-pthread' (or your distribution's OpenBLAS) makes calibration ~10x faster"
fi
exit 0
