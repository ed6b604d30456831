"""mlx-flash: LLM in a Flash (arXiv 2312.11514) on MLX."""

from . import platform_blas as _platform_blas

# Before anything imports mlx.core: give MLX's CPU backend an optimised BLAS on Linux.
_platform_blas.preload()

__version__ = "0.1.0"
