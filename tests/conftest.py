"""Import mlx_flash before any test module imports mlx.core, so that its BLAS shim
(mlx_flash.platform_blas) runs first, as it does in the CLI and the app."""

import mlx_flash  # noqa: F401
