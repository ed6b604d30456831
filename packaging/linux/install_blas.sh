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
exec bash "$(dirname "$0")/apt_install.sh" libopenblas0-pthread "fast float32 matmuls in calibration" \
  "calibration uses a third of the tokens and is ~7x slower"
