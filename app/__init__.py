"""mlx-flash desktop app (PySide6)."""

# mlx_flash first: its BLAS shim (mlx_flash.platform_blas) must run before anything imports mlx.core.
import mlx_flash  # noqa: F401
