"""Model architectures the flash engine runs.

One module per architecture family (mlx-lm style). Each module exposes:

- ``ModelArgs``: the mlx-lm dataclass of hyperparameters,
- ``FFN_KEYS``: the weight names of one layer's FFN (without biases),
- ``ACTIVATION``: the FFN activation when config.json names none,
- ``activation_of(config)``: ``(name, param)`` of the model's FFN activation,
- ``get_classes(config)``: ``(model_class, args_class)`` for mlx-lm's
  ``load_model(get_model_classes=...)`` (dense loading, quantized folders included),
- ``build(config, ffn_factory)``: the model with every layer's FFN replaced by
  ``ffn_factory(layer_index)`` (a flash ``SparseFFN``) or left dense when
  ``ffn_factory`` is None,
- ``ffn_input_norm(layer)``: the norm module whose output is that layer's FFN input, or
  None (the pipelined layers' lookahead, ``mlx_flash.pipeline.lookahead_map``).

The flash layout of each architecture's FFN (bundle parts, biases) lives in
``storage.format.ARCHITECTURES``.
"""

from __future__ import annotations

from types import ModuleType

from . import llama, opt

#: config.json ``model_type`` -> architecture module
ARCHITECTURES: dict[str, ModuleType] = {
    "llama": llama,
    "mistral": llama,
    "qwen2": llama,
    "opt": opt,
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
