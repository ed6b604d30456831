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
  None (the pipelined layers' lookahead, ``mlx_flash.pipeline.lookahead_map``),
- ``final_norm(model)``: ``(owner, attribute)`` of the last per-position module before the
  output head, or None (the engine puts only the last prompt position through the head).

Which families exist is :mod:`mlx_flash.families`'s table (``FAMILIES``); the flash layout of each
architecture's FFN (bundle parts, biases) lives in ``storage.format.ARCHITECTURES``, built
from it.
"""

from __future__ import annotations

from types import ModuleType

from ..families import BY_MODEL_TYPE, BY_WRAPPER, supported_text
from . import llama, opt

_ENGINES: dict[str, ModuleType] = {"llama": llama, "opt": opt}

#: config.json ``model_type`` -> architecture module (from the registry)
#: (multimodal wrappers such as Gemma 3's run dense through mlx-lm's own class)
ARCHITECTURES: dict[str, ModuleType] = {mt: _ENGINES[f.engine] for mt, f in {**BY_MODEL_TYPE, **BY_WRAPPER}.items()}


class UnsupportedArchitecture(ValueError):
    """The model's architecture is not one the flash engine can run."""


def get_architecture(config: dict) -> ModuleType:
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        raise UnsupportedArchitecture(f"unsupported architecture {model_type!r}: mlx-flash runs {supported_text()}")
    return arch


def sanitize(model, weights: dict) -> dict:
    """``model.sanitize(weights)`` where the model class has one (as mlx-lm's ``load_model``
    does: some of its classes, e.g. Gemma 2 and Phi-3, take checkpoint names as they are)."""
    return model.sanitize(weights) if hasattr(type(model), "sanitize") else weights
