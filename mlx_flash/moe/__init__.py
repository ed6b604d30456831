"""Mixture-of-experts from flash (issue #19).

The experts of every MoE layer (mlx-lm's ``SwitchGLU`` stacks: Qwen3 MoE, Qwen2 MoE, Mixtral,
OLMoE; :data:`mlx_flash.families.MOE_FAMILIES`) stay on disk, one aligned bundle
``[gate | up | down]`` per expert in the source's quantization (``moe.format``); the router,
shared experts, attention, embeddings and norms stay in memory. The router's top-k is the
exact active set: each MoE layer's ``switch_mlp`` is swapped for :class:`moe.switch.FlashSwitchGLU`,
which makes the routed experts resident in an expert cache under the memory budget (the neuron
cache's preallocated rows and swap-delete, one row per expert) and computes with mlx-lm's own
``SwitchGLU`` math (``gather_mm`` / ``gather_qmm``) on the cache rows, so the logits are those of
mlx-lm's dense model. ``moe.engine.load`` builds an :class:`mlx_flash.engine.Engine`;
``moe.bench`` is the MoE-shape replay (``mlx-flash bench --shape moe``).
"""
