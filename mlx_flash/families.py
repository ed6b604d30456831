"""The model families mlx-flash runs: one table, data only.

Everything that needs to know which families exist reads :data:`FAMILIES`: the models
package (which module builds a family, its FFN activation), ``storage.format`` (the FFN
layout of a flash folder, through ``ArchSpec``), the GGUF converter (``general.architecture``
names, q/k permutation, norm convention) and the library (names shown, refusal messages).

Per family:

- ``model_types``: config.json ``model_type`` values (mlx-lm's module names; ``mistral`` is
  mlx-lm's llama).
- ``gguf_arch``: the GGUF ``general.architecture`` (gguf-py's ``MODEL_ARCH_NAMES``), or None
  when there is no GGUF import for it. Tensor names come from gguf-py's ``TensorNameMap``.
- ``engine``: the module of :mod:`mlx_flash.models` that builds it: ``llama`` (mlx-lm's own
  class for the model_type with each layer's ``mlp`` swapped for the flash FFN) or ``opt``.
- ``activation``: the FFN activation mlx-lm's class applies (``silu`` = SwiGLU,
  ``gelu_approx`` = GeGLU with the tanh GELU). ``activation_from_config``: config.json's
  ``hidden_act`` may change it (llama: the ReLU variants of sparse checkpoints).
- ``ffn``: layout name in ``storage.format`` (``gated``: gate/up/down rows and columns;
  ``opt``: fc1/fc2).
- ``fused_gate_up``: the module holding ``[gate; up]`` rows in one matrix (Phi-3's
  ``mlp.gate_up_proj``); split into per-neuron gate and up rows when written as flash.
- ``gguf_permute_qk``: llama.cpp's converter permuted q/k rows for its RoPE (llama arch only).
- ``hf_class``: Hugging Face's class name (config.json ``architectures`` of a GGUF import).
- ``wrappers``: model_types of multimodal checkpoints whose text model is this family
  (config.json ``text_config``, weights under ``language_model.``; the vision tower is
  dropped when converted to flash).
- ``gguf_norm_shift``: llama.cpp stores this family's RMSNorm weights as ``w + shift``
  (Gemma: mlx-lm's and Hugging Face's Gemma norms compute ``(1 + w)``; convert_hf_to_gguf.py
  adds 1 to every ``*norm.weight``); the GGUF import subtracts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Family:
    key: str
    label: str
    model_types: Tuple[str, ...]
    gguf_arch: Optional[str] = None
    engine: str = "llama"
    activation: str = "silu"
    activation_from_config: bool = False
    ffn: str = "gated"
    fused_gate_up: Optional[str] = None
    gguf_permute_qk: bool = False
    gguf_norm_shift: float = 0.0
    wrappers: Tuple[str, ...] = ()
    hf_class: str = ""


FAMILIES: Tuple[Family, ...] = (
    Family("llama", "Llama (1/2/3, SmolLM, Mistral)", ("llama", "mistral"), gguf_arch="llama",
           activation_from_config=True, gguf_permute_qk=True, hf_class="LlamaForCausalLM"),
    Family("qwen2", "Qwen2 / Qwen2.5", ("qwen2",), gguf_arch="qwen2", hf_class="Qwen2ForCausalLM"),
    Family("qwen3", "Qwen3", ("qwen3",), gguf_arch="qwen3", hf_class="Qwen3ForCausalLM"),
    Family("gemma2", "Gemma 2", ("gemma2",), gguf_arch="gemma2", activation="gelu_approx", gguf_norm_shift=1.0,
           hf_class="Gemma2ForCausalLM"),
    Family("gemma3", "Gemma 3", ("gemma3_text",), gguf_arch="gemma3", activation="gelu_approx",
           gguf_norm_shift=1.0, wrappers=("gemma3",), hf_class="Gemma3ForCausalLM"),
    Family("phi3", "Phi-3", ("phi3",), gguf_arch="phi3", fused_gate_up="mlp.gate_up_proj",
           hf_class="Phi3ForCausalLM"),
    Family("opt", "OPT", ("opt",), engine="opt", activation="relu", activation_from_config=True, ffn="opt",
           hf_class="OPTForCausalLM"),
)

BY_MODEL_TYPE: Dict[str, Family] = {mt: f for f in FAMILIES for mt in f.model_types}
"""config.json ``model_type`` -> family."""

BY_WRAPPER: Dict[str, Family] = {w: f for f in FAMILIES for w in f.wrappers}
"""Multimodal checkpoint ``model_type`` -> the family of its text model."""

#: the key prefix of a wrapped text model's weights and its config.json section
WRAPPED_PREFIX, WRAPPED_CONFIG = "language_model.", "text_config"

BY_GGUF_ARCH: Dict[str, Family] = {f.gguf_arch: f for f in FAMILIES if f.gguf_arch}
"""GGUF ``general.architecture`` -> family."""


#: Mixture-of-experts families (mlx_flash.moe): mlx-lm classes whose experts are ``SwitchGLU``
#: stacks (``switch_mlp``). Their experts live in a MoE flash folder (``moe.format``), not in the
#: dense FFN layout above, so they are a table of their own (``storage.format.ARCHITECTURES``
#: does not list them). ``ffn`` = "moe", ``engine`` = "moe".
MOE_FAMILIES: Tuple[Family, ...] = (
    Family("qwen3_moe", "Qwen3 MoE", ("qwen3_moe",), engine="moe", ffn="moe", hf_class="Qwen3MoeForCausalLM"),
    Family("qwen2_moe", "Qwen2 MoE (shared expert)", ("qwen2_moe",), engine="moe", ffn="moe",
           hf_class="Qwen2MoeForCausalLM"),
    Family("mixtral", "Mixtral", ("mixtral",), engine="moe", ffn="moe", hf_class="MixtralForCausalLM"),
    Family("olmoe", "OLMoE", ("olmoe",), engine="moe", ffn="moe", hf_class="OlmoeForCausalLM"),
)

BY_MOE_MODEL_TYPE: Dict[str, Family] = {mt: f for f in MOE_FAMILIES for mt in f.model_types}
"""config.json ``model_type`` -> MoE family."""


def supported_text() -> str:
    """The supported families in words, for messages: ``"Llama (...), Qwen2 / Qwen2.5, ..."``."""
    return ", ".join(f"{f.label} [{'/'.join(f.model_types + f.wrappers)}]" for f in FAMILIES)


def family_of(model_type) -> Optional[Family]:
    return BY_MODEL_TYPE.get(model_type) or BY_WRAPPER.get(model_type)


def family_label(model_type) -> str:
    """A family's display name for a config.json ``model_type`` (the type itself when unknown)."""
    f = family_of(model_type) or BY_MOE_MODEL_TYPE.get(model_type)
    return f.label if f else str(model_type)
