"""Gated-FFN families through mlx-lm's own model classes, with a pluggable FFN.

Llama (1/2/3, SmolLM, Mistral), Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3 (see
:mod:`mlx_flash.families`): attention, embeddings, norms (Gemma's ``(1 + w)`` RMSNorm, embedding
scaling, soft-capping, sliding windows, q/k norms, RoPE scaling) are mlx-lm's own classes for
the config's ``model_type``, kept dense in memory. Each layer's ``mlp``
(``down(act(gate x) * up x)``: SwiGLU, or GeGLU with the tanh GELU for Gemma) is swapped for
the flash engine's ``SparseFFN`` so FFN weights come from disk neuron by neuron.

Phi-3 keeps gate and up in one ``gate_up_proj`` matrix; flash folders store them split
(``storage.format``), so a Phi-3 model built here without a flash FFN gets a split MLP
(:class:`ActMLP`) with the same function.

mlx-lm's llama always uses SwiGLU. Sparse llama checkpoints (ProSparse, TurboSparse,
``mlx-flash relufy`` output) say otherwise in config.json's ``hidden_act``:
``relu``, ``relu2`` (squared ReLU), ``drelu`` (ReLU on gate and up:
``relu(gate x) * relu(up x)``) or ``fatrelu`` (ProSparse: ``g`` where
``g > hidden_act_param``). For those the dense model's MLP is swapped for
:class:`ActMLP`, which honours ``hidden_act``, so dense and flash runs compute
the same function. ``mlp_bias`` (biases on gate, up and down) is supported.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.llama import ModelArgs  # noqa: F401  (re-exported)
from mlx_lm.utils import _get_classes  # private: pyproject bounds mlx-lm to the versions tested

from ..active import config_activation, gated_activation
from ..families import Family, family_of

#: per-layer FFN weight names, in bundle order: gate row i | up row i | down column i
FFN_KEYS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ACTIVATION = "silu"
#: the module whose bias is the FFN's dense output bias (with ``mlp_bias``)
OUTPUT_BIAS = "down_proj"


class ActMLP(nn.Module):
    """``down(act(gate x) * up x)`` with the activation named in config.json
    (``drelu``: ``down(relu(gate x) * relu(up x))``). Same parameter names as mlx-lm's MLP."""

    def __init__(self, dim: int, hidden_dim: int, act: str, act_param: Optional[float] = None, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        object.__setattr__(self, "_gated", gated_activation(act, act_param))

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self._gated(self.gate_proj(x), self.up_proj(x)))


def family(config: dict) -> Family:
    fam = family_of(config.get("model_type"))
    if fam is None:
        raise ValueError(f"no model family for model_type {config.get('model_type')!r}")
    return fam


def activation_of(config: dict):
    """``(name, param)`` of the FFN activation: the family's (what mlx-lm's class computes),
    or config.json's ``hidden_act`` for families that honour it (llama)."""
    fam = family(config)
    if not fam.activation_from_config:
        return fam.activation, None
    return config_activation(config, fam.activation)


def _swap_mlps(model: nn.Module, config: dict) -> None:
    act, param = activation_of(config)
    for layer in model.layers:
        layer.mlp = ActMLP(config["hidden_size"], config["intermediate_size"], act, param,
                           bias=bool(config.get("mlp_bias", False)))


def _needs_act_mlp(config: dict) -> bool:
    return activation_of(config)[0] != family(config).activation


def get_classes(config: dict):
    """``(model_class, args_class)`` for mlx-lm's ``load_model(get_model_classes=...)``:
    mlx-lm's classes, with an MLP honouring ``hidden_act`` when it is not the family's own."""
    model_class, args_class = _get_classes(config)
    if not _needs_act_mlp(config):
        return model_class, args_class

    class ActModel(model_class):  # type: ignore[misc, valid-type]
        def __init__(self, args):
            super().__init__(args)
            _swap_mlps(self, config)

    ActModel.__name__ = ActModel.__qualname__ = f"{model_class.__name__}With{activation_of(config)[0].title()}"
    return ActModel, args_class


def ffn_input_norm(layer: nn.Module) -> Optional[nn.Module]:
    """The norm whose output is the FFN's input (the pipeline's lookahead maps between them)."""
    return layer.post_attention_layernorm


def final_norm(model: nn.Module) -> Optional[Tuple[nn.Module, str]]:
    """``(owner, attribute)`` of the norm mlx-lm's inner model applies last (``return
    self.norm(h)``; everything after it works per position): the engine wraps it so that only
    the last prompt position goes through the output head. Multimodal wrappers (Gemma 3) hold
    the text model in ``language_model``."""
    text = model.language_model if "language_model" in model else model
    inner = text.model
    return (inner, "norm") if isinstance(inner, nn.Module) and "norm" in inner else None


def mistyped_fields(args_class, config: dict) -> List[str]:
    """The fields of ``config`` whose JSON type cannot be what mlx-lm's ``args_class`` (a dataclass) declares
    (numbers, strings, booleans, objects, lists, each possibly optional): what a damaged config got wrong."""
    try:
        hints = typing.get_type_hints(args_class)
    except Exception:  # unresolvable annotations (NameError, TypeError): nothing to say
        return []
    json_types = {int: (int,), float: (int, float), str: (str,), bool: (bool,), dict: (dict,), list: (list,)}
    out = []
    for f in dataclasses.fields(args_class):
        if f.name not in config or config[f.name] is None:
            continue
        hint = hints.get(f.name)
        options = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
        known = [json_types.get(typing.get_origin(o) or o) for o in options if o is not type(None)]
        if not known or any(k is None for k in known):
            continue  # a type JSON does not spell (Any, a class): not judged
        allowed = tuple(t for k in known for t in k or ())
        v = config[f.name]
        if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
            out.append(f.name)
    return out


def build(config: dict, ffn_factory: Optional[Callable[[int], nn.Module]] = None) -> nn.Module:
    """Instantiate the mlx-lm model for ``config``; swap each layer's FFN when asked
    (without ``ffn_factory``, a fused gate_up MLP becomes a split one: flash key names)."""
    model_class, args_class = get_classes(config)
    try:
        model = model_class(args_class.from_dict(config))
    except (TypeError, AttributeError, KeyError, ValueError) as e:  # a damaged config: wrong types, odd values
        bad = mistyped_fields(args_class, config)
        which = f" (mistyped: {', '.join(bad)})" if bad else ""
        raise ValueError(f"the model's configuration (config.json / the flash manifest's model_args) does not build "
                         f"a {config.get('model_type')} model{which}: {type(e).__name__}: {e}") from None
    if ffn_factory is None:
        if family(config).fused_gate_up:
            _swap_mlps(model, config)
        return model
    for i, layer in enumerate(model.layers):
        ffn = ffn_factory(i)
        if config.get("mlp_bias") and hasattr(ffn, "add_output_bias"):
            ffn.add_output_bias(OUTPUT_BIAS)
        layer.mlp = ffn
    return model
