#!/usr/bin/env bash
# Linux only: installs Debian's threaded OpenBLAS (libopenblas0-pthread), which mlx_flash/platform_blas.py
# loads before MLX so that MLX's float32 matmuls (relufy, float32 models) run much faster than with the
# reference BLAS bundled in the mlx[cpu] wheel. Optional: calibration does its float32 matmuls in numpy and is the
# same (same tokens, same quality, about the same time) with or without it.
set -u
[ "$(uname -s)" = "Linux" ] || exit 0
for f in /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 /usr/lib/*-linux-gnu/openblas-openmp/libopenblas.so.0 \
         /usr/lib64/libopenblas.so.0 /usr/lib/libopenblas.so.0; do
  [ -f "$f" ] && exit 0
done
exec bash "$(dirname "$0")/apt_install.sh" libopenblas0-pthread "fast float32 matmuls in MLX (relufy)" \
  "relufy and float32 models run slower"
