"""The tests import the app as ``mlx_flash_app``, the name it installs under (pyproject: package-dir maps it
to the source folder ``app/``). Run from a checkout with ``PYTHONPATH=$PWD``, that name is not on the path
(the folder is ``app/``), and an editable install may map it to another checkout: so the name is bound here,
before any test module imports it, to *this* checkout's ``app/``. Every process that imports anything
under ``tests`` (pytest, and the spawned workers of the first-run tests) gets the same binding."""

import importlib.util
import sys
from pathlib import Path

_APP = Path(__file__).resolve().parents[1] / "app"


def _bind_app_package() -> None:
    if "mlx_flash_app" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("mlx_flash_app", _APP / "__init__.py",
                                                  submodule_search_locations=[str(_APP)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mlx_flash_app"] = module
    spec.loader.exec_module(module)


_bind_app_package()
