"""Model architectures the flash engine runs.

One module per architecture family (mlx-lm style). Each module exposes:

- ``ModelArgs``: the mlx-lm dataclass of hyperparameters,
- ``FFN_KEYS``: the weight names of one layer's FFN, in bundle order,
- ``build(config, ffn_factory)``: the model with every layer's FFN replaced by
  ``ffn_factory(layer_index)`` (a flash ``SparseFFN``) or left dense when
  ``ffn_factory`` is None.
"""

from __future__ import annotations

from types import ModuleType

from . import llama

#: config.json ``model_type`` -> architecture module
ARCHITECTURES: dict[str, ModuleType] = {
    "llama": llama,
    "mistral": llama,
    "qwen2": llama,
}


class UnsupportedArchitecture(ValueError):
    """The model's architecture is not one the flash engine can run."""


def get_architecture(config: dict) -> ModuleType:
    model_type = config.get("model_type")
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}: mlx-flash runs "
            f"{', '.join(sorted(ARCHITECTURES))}"
        ) from None
