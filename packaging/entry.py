"""PyInstaller entry point of the bundle: the same `main()` as `python -m mlx_flash_app` / `mlx-flash-app`
(so `mlx-flash --selftest` works in the bundle too). Not used from source."""

import multiprocessing
import sys

from mlx_flash_app.__main__ import main

if __name__ == "__main__":
    multiprocessing.freeze_support()
    sys.exit(main())
