"""OPT (Meta's Open Pre-trained Transformers): the models of the "LLM in a Flash" paper.

Hugging Face's ``OPTForCausalLM`` in MLX, with mlx-lm's KV cache:

- learned positional embeddings with OPT's offset of 2 (position p reads row p + 2),
- multi-head attention with biases (``q_proj`` scaled by ``head_dim ** -0.5``),
- pre-LayerNorm (``do_layer_norm_before``, every OPT but 350m) or post-LayerNorm (350m),
- ``word_embed_proj_dim`` != ``hidden_size`` (350m): ``project_in`` / ``project_out``,
- FFN ``fc2(relu(fc1 x + b1)) + b2``: ReLU, so the flash engine's active set is exact
  (a neuron is active when ``fc1 x + b1 > 0``),
- ``lm_head`` tied to ``embed_tokens`` (a stored ``lm_head.weight`` is used when untied).

Key names are Hugging Face's (``model.decoder.layers.N.self_attn.q_proj.weight``,
``...fc1.weight``, ``model.decoder.final_layer_norm``); checkpoints saved from
``OPTModel`` (keys starting ``decoder.``) are accepted too. Internally each layer's
``fc1``/``fc2`` live in ``layer.mlp`` so the flash engine can swap it for a
``SparseFFN`` (bundle: fc1 row i | fc1 bias i | fc2 column i; fc2's bias is dense).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask, scaled_dot_product_attention

from ..active import config_activation, gated_activation

FFN_KEYS = ("mlp.fc1", "mlp.fc2")
ACTIVATION = "relu"
OUTPUT_BIAS = "fc2"
POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding: positions are shifted by 2 (fairseq's padding idx + 1)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    ffn_dim: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    word_embed_proj_dim: Optional[int] = None
    do_layer_norm_before: bool = True
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    _remove_final_layer_norm: bool = False
    tie_word_embeddings: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"OPT: hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.head_dim = dim // self.n_heads
        self.scale = self.head_dim**-0.5
        b = args.enable_bias
        self.q_proj = nn.Linear(dim, dim, bias=b)
        self.k_proj = nn.Linear(dim, dim, bias=b)
        self.v_proj = nn.Linear(dim, dim, bias=b)
        self.out_proj = nn.Linear(dim, dim, bias=b)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """``fc2(act(fc1 x))``: OPT's FFN (ReLU unless config.json says otherwise)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.hidden_size, args.ffn_dim, bias=args.enable_bias)
        self.fc2 = nn.Linear(args.ffn_dim, args.hidden_size, bias=args.enable_bias)
        name, param = config_activation({"activation_function": args.activation_function}, ACTIVATION)
        object.__setattr__(self, "_gated", gated_activation(name, param))

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self._gated(self.fc1(x), None))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.pre_ln = args.do_layer_norm_before
        affine = args.layer_norm_elementwise_affine
        self.self_attn = Attention(args)
        self.self_attn_layer_norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps, affine=affine)
        self.mlp = MLP(args)
        self.final_layer_norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps, affine=affine)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        if self.pre_ln:
            h = x + self.self_attn(self.self_attn_layer_norm(x), mask, cache)
            return h + self.mlp(self.final_layer_norm(h))
        h = self.self_attn_layer_norm(x + self.self_attn(x, mask, cache))
        return self.final_layer_norm(h + self.mlp(h))


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(args.max_position_embeddings + POSITION_OFFSET, args.hidden_size)
        if args.word_embed_proj_dim != args.hidden_size:
            self.project_in = nn.Linear(args.word_embed_proj_dim, args.hidden_size, bias=False)
            self.project_out = nn.Linear(args.hidden_size, args.word_embed_proj_dim, bias=False)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        if args.do_layer_norm_before and not args._remove_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps,
                                                 affine=args.layer_norm_elementwise_affine)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None) -> mx.array:
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        if "project_in" in self:
            h = self.project_in(h)
        L = h.shape[1]
        offset = 0
        if cache is not None and cache[0] is not None:
            offset = cache[0].offset
        else:
            cache = [None] * len(self.layers)
        n_pos = self.embed_positions.weight.shape[0] - POSITION_OFFSET
        if isinstance(offset, mx.array):  # BatchKVCache: per-row offsets, negative over left padding
            pos = mx.maximum(offset[:, None] + mx.arange(L)[None], 0)
            last = int(mx.max(offset).item()) + L
        else:
            pos, last = mx.arange(offset, offset + L), offset + L
        if last > n_pos:
            raise ValueError(f"OPT: {last} positions exceed max_position_embeddings {n_pos}")
        h = h + self.embed_positions(pos + POSITION_OFFSET).astype(h.dtype)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        if "final_layer_norm" in self:
            h = self.final_layer_norm(h)
        if "project_out" in self:
            h = self.project_out(h)
        return h


class OPTModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = Decoder(args)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None) -> mx.array:
        return self.decoder(inputs, cache, input_embeddings)


class Model(nn.Module):
    """``OPTForCausalLM``: ``model(tokens, cache=...)`` → logits; ``.layers`` for mlx-lm's caches."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = OPTModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.word_embed_proj_dim, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None) -> mx.array:
        h = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.model.decoder.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.decoder.layers

    _FFN_KEY = re.compile(r"^(model\.decoder\.layers\.\d+)\.(fc1|fc2)\.")

    def sanitize(self, weights: Dict[str, Any]) -> Dict[str, Any]:
        """Hugging Face names → this module's: ``decoder.`` → ``model.decoder.``,
        ``layers.N.fc1/fc2`` → ``layers.N.mlp.fc1/fc2``; a tied ``lm_head`` is dropped."""
        out = {}
        for k, v in weights.items():
            if k.startswith("decoder."):
                k = "model." + k
            k = self._FFN_KEY.sub(r"\1.mlp.\2.", k)
            if k == "lm_head.weight" and self.args.tie_word_embeddings:
                continue
            out[k] = v
        return out


def activation_of(config: dict):
    """``(name, param)`` of OPT's FFN activation (``activation_function``, default relu)."""
    return config_activation(config, ACTIVATION)


def get_classes(config: dict):
    return Model, ModelArgs


def ffn_input_norm(layer: nn.Module) -> Optional[nn.Module]:
    """The norm whose output is the FFN's input: pre-LN layers' ``final_layer_norm``; None
    for post-LN (OPT-350m: the FFN reads the normalised attention output as it is)."""
    return layer.final_layer_norm if layer.pre_ln else None


def final_norm(model: nn.Module) -> Optional[Tuple[nn.Module, str]]:
    """``(owner, attribute)`` of the decoder's last per-position module before the head
    (``project_out`` when the model has one, else ``final_layer_norm``; None for a model
    with neither): the engine wraps it so that only the last prompt position reaches the head."""
    dec = model.model.decoder
    for name in ("project_out", "final_layer_norm"):
        if name in dec:
            return dec, name
    return None


def build(config: dict, ffn_factory: Optional[Callable[[int], nn.Module]] = None) -> nn.Module:
    """The OPT model for ``config``; each layer's FFN swapped for ``ffn_factory(i)`` when given."""
    args = ModelArgs.from_dict(config)
    model = Model(args)
    if ffn_factory is not None:
        for i, layer in enumerate(model.layers):
            ffn = ffn_factory(i)
            if args.enable_bias and hasattr(ffn, "add_output_bias"):
                ffn.add_output_bias(OUTPUT_BIAS)
            layer.mlp = ffn
    return model
