"""Tiny random-weight MoE models built with mlx-lm's own classes (tests, the MoE replay's routing traces).

:data:`TINY_MOE_CONFIGS` holds one config.json per family (hidden 64, 4 heads of 16, 2 kv heads);
:func:`random_moe_model` instantiates mlx-lm's class for it and gives every weight random values
(``mlx_flash.tiny.random_weights``: scaled so activations keep their size, norms near 1, routers with
a wider spread so routing is not uniform). ``tests/tiny_moe.py`` writes them as mlx-lm folders with a tokenizer.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..tiny import random_model

_COMMON = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False}

TINY_MOE_CONFIGS: Dict[str, Dict[str, Any]] = {
    # Qwen3-30B-A3B's structure: experts only, normalised top-k, q/k norms, head_dim != hidden/heads
    "qwen3_moe": {"model_type": "qwen3_moe", "num_experts": 16, "num_experts_per_tok": 4,
                  "moe_intermediate_size": 32, "intermediate_size": 128, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "norm_topk_prob": True, "head_dim": 32},
    # a dense MLP layer among MoE layers (mlp_only_layers): it stays in dense.safetensors
    "qwen3_moe_mixed": {"model_type": "qwen3_moe", "num_experts": 16, "num_experts_per_tok": 4,
                        "moe_intermediate_size": 32, "intermediate_size": 128, "decoder_sparse_step": 1,
                        "mlp_only_layers": [0], "norm_topk_prob": False, "head_dim": 16},
    # a shared expert (gated by sigmoid) beside the routed ones
    "qwen2_moe": {"model_type": "qwen2_moe", "num_experts": 16, "num_experts_per_tok": 4,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "intermediate_size": 128},
    "mixtral": {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64},
    "olmoe": {"model_type": "olmoe", "num_experts": 16, "num_experts_per_tok": 4, "intermediate_size": 32,
              "norm_topk_prob": False},
}


def tiny_moe_config(family: str, *, layers: int = 2, vocab: int = 256, dtype: str = "float32",
                    **overrides: Any) -> Dict[str, Any]:
    """config.json of a tiny model of ``family`` (a key of :data:`TINY_MOE_CONFIGS`)."""
    return {**_COMMON, **TINY_MOE_CONFIGS[family], "num_hidden_layers": layers, "vocab_size": vocab,
            "torch_dtype": dtype, "eos_token_id": vocab - 1, **overrides}


def random_moe_model(config: Dict[str, Any], seed: int = 0, dtype: str = "float32",
                     router_scale: float = 3.0) -> Tuple[nn.Module, Dict[str, mx.array]]:
    """mlx-lm's model for ``config`` with random weights (evaluated; ``mlx_flash.tiny.random_model``:
    biases scaled as weights, the router ``router_scale`` wider); returns ``(model, weights)``."""
    return random_model(config, seed, dtype, bias_scale=None, router_scale=router_scale)
