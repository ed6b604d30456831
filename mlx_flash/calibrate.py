"""Calibration: activation thresholds and low-rank predictors for a flash model.

``calibrate(flash_dir, sparsity=..., rank=...)`` (and ``mlx-flash calibrate``):

1. **Text.** The project's own prompts (``resources/calibration/prompts.txt``) go
   through the model's chat template and the dense model answers them (batched,
   temperature 0.7 with min-p 0.05, a fixed seed), optionally plus a user text file. Every token the model
   reads — prompt and answer — is calibration data (the system prompt the chat
   template repeats is counted once).
2. **Collection.** While that text runs through the dense model (float32 compute:
   much faster than bfloat16 on CPUs, same weights), each layer's FFN input ``x``
   (after ``post_attention_layernorm``) is recorded (float16). The gated activation
   ``h = act(gate x) * (up x)`` is recomputed per layer from the same layer's
   weights when fitting (memory: tokens × layers × hidden × 2 bytes, not × ffn).
3. **Sparsity rule.** A neuron is active for a token when ``|h|`` passes its layer's
   threshold: the calibration data's ``sparsity`` quantile of ``|h|`` in that layer
   (CATS/TEAL style). ReLU-family models (relu, relu2, drelu, fatrelu; OPT) use the
   exact rule ``h != 0`` (threshold 0). Per-neuron activation frequencies are
   kept for the hot-neuron cache policy.
4. **Predictors.** Per layer ``sigmoid(B (A x) + b)`` of rank ``r``, fitted in
   closed form on about 80% of the sequences: reduced-rank ridge regression of the
   clipped log-magnitude ``log(|h| / threshold)`` (so the logit is positive where the
   neuron is active and large activations rank first). Optional Adam epochs on the
   weighted BCE (a missed active neuron costs ``pos_weight`` times a needless one)
   refine it; measured on SmolLM2-135M they do not help on unseen text (default 0).
5. **Cutoffs.** On 10% held-out sequences, each layer's probability cutoff for the
   recall targets 0.9 … 0.999; recall, precision and the predicted active fraction
   are reported on the last 10% (sequences used neither for fitting nor cutoffs).
6. **Saving.** ``predictors.safetensors`` and ``manifest.json`` (field
   ``predictors``) are written only at the very end, each atomically; a cancel
   (progress callback returning False) before that leaves the folder untouched.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from .active import activation, gated_activation, is_exact
from .dense_model import (
    HookedMLP,
    float32_gates,
    hidden_states,
    install_hooks,
    last_logits,
    layer_ffn_parts,
    load_dense_model,
    model_activation,
)
from .gate_first import GATE_SEGMENTS, GATE_SPARSITIES
from .neuron_order import order_flash
from .paths import resources_dir
from .platform_blas import numpy_blas_single_thread
from .predictor import (
    DEFAULT_RANK,
    DEFAULT_RECALL,
    PREDICTOR_FILE,
    RECALL_TARGETS,
    PredictorChooser,
    PredictorWeights,
    logit_to_prob,
    prob_to_logit,
    save_predictors,
)
from .progress import Cancelled, ProgressCallback, report, scaled
from .storage.format import Manifest, file_checksum, open_flash, write_updown

DEFAULT_SPARSITY = 0.35
DEFAULT_TOKENS = 6144
DEFAULT_EPOCHS = 0
DEFAULT_POS_WEIGHT = 4.0
DEFAULT_RIDGE = 0.1
# fit_predictors' progress: the layer fits up to FIT_SHARE, gate-first's held-out perplexity up to GATE_PPL_END,
# the predictors' after it (default model, 2 cores: layer fits ~80 s, the perplexity passes ~115 s after them)
FIT_SHARE = 0.4
GATE_PPL_END = 0.8
DEFAULT_MAX_NEW = 96
GEN_TEMPERATURE = 0.7
GEN_MIN_P = 0.05  # min-p truncation: as cheap as plain sampling (top-p sorts the vocabulary every step)
LOG_CLIP = 6.0
PROMPTS_FILE = "calibration/prompts.txt"


EXACT_RULE_RECALL = 0.999

#: Stored in the manifest's ``predictors`` info. 2: the same token count with or without a fast BLAS,
#: float32 matmuls in numpy, the quality gate. 4: gate-first's scaled criterion (per-neuron scales in the
#: predictor file) and sparsity chosen by held-out perplexity. A prepared default model with an older (or
#: no) version is re-calibrated (:func:`calibration_problem`).
CALIBRATION_VERSION = 4
#: The quality gate: held-out recall of the shipped cutoff at least the target minus this slack ...
GATE_RECALL_SLACK = 0.01
#: ... and a predicted-active fraction below this (a predictor that keeps every neuron saves nothing).
GATE_MAX_PREDICTED = 0.995


def quality_gate(info: Dict[str, Any]) -> Dict[str, Any]:
    """The verdict on a ``predictors`` info: ``{"passed", "reason", "recall", "predicted_fraction", ...}``.
    Measured on the held-out sequences (used neither for fitting nor for the cutoffs), at the
    shipped recall target ``info["recall"]``."""
    target = float(info.get("recall", DEFAULT_RECALL))
    held = dict(info.get("held_out", {})).get(str(target))
    verdict: Dict[str, Any] = {"min_recall": round(target - GATE_RECALL_SLACK, 6),
                                  "max_predicted_fraction": GATE_MAX_PREDICTED}
    if not held:
        return {**verdict, "passed": False, "reason": f"no held-out figures for recall target {target}"}
    rec, frac = float(held["recall"]), float(held["predicted_fraction"])
    verdict.update(recall=rec, predicted_fraction=frac)
    if not rec >= target - GATE_RECALL_SLACK:
        return {**verdict, "passed": False,
                "reason": f"held-out recall {rec:.3f} is below {target - GATE_RECALL_SLACK:.3f} (target {target})"}
    if not 0.0 < frac < GATE_MAX_PREDICTED:
        return {**verdict, "passed": False,
                "reason": f"predicted active fraction {frac:.1%} is not in (0, {GATE_MAX_PREDICTED:.1%})"}
    return {**verdict, "passed": True, "reason": "ok"}


def calibration_problem(info: Optional[Dict[str, Any]]) -> Optional[str]:
    """Why a stored calibration should be redone (None: it is current and passed its gate)."""
    if not info:
        return "not calibrated"
    version = info.get("calibration_version")
    if version != CALIBRATION_VERSION:
        return (f"made by calibration version {version if version is not None else 1}, "
                f"current is {CALIBRATION_VERSION}")
    gate = info.get("gate") or {}
    if not gate.get("passed") and not gate.get("kept_after_retry"):
        return f"failed its quality gate: {gate.get('reason', 'no verdict stored')}"
    return None


def default_recall(act: str) -> float:
    """The predictors' default recall target: :data:`DEFAULT_RECALL` for thresholded
    (SwiGLU) models; :data:`EXACT_RULE_RECALL` for ReLU-family ones, where a missed
    neuron drops a real non-zero activation. Measured on the ReLU-fied default model
    (KJV Genesis, 2,048 tokens, dense 12.45): recall 0.99 → perplexity +205% at 79%
    active, 0.995 → +42% at 86%, 0.999 → +0.4% at 95%."""
    return EXACT_RULE_RECALL if is_exact(act) else DEFAULT_RECALL


def auto_tokens() -> int:
    """Calibration tokens when the user does not say: :data:`DEFAULT_TOKENS`, on every
    platform. The quality of the predictors must not depend on which BLAS happens to be
    installed (a third of the tokens, once used without OpenBLAS, cost +20% perplexity on
    KJV Genesis); the float32 matmuls of calibration go through numpy on CPUs instead
    (:class:`NumpyLinear`), which is fast with or without the system's OpenBLAS."""
    return DEFAULT_TOKENS


# --------------------------------------------------------------------------- calibration text
def read_prompts(path: Optional[Union[str, Path]] = None) -> List[str]:
    """The calibration prompts: one per line, ``#`` comments and blank lines skipped,
    a literal ``\\n`` becomes a line break."""

    p = Path(path) if path is not None else resources_dir() / PROMPTS_FILE
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line.replace("\\n", "\n"))
    if not out:
        raise ValueError(f"{p}: no prompts")
    return out


def chat_tokens(tokenizer, prompt: str) -> List[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs):
            return i
    return n


class Collector:
    """Per-layer FFN inputs (float16) of every valid token position, plus a
    sequence id per token (for held-out splits). The gated activations are
    recomputed per layer when fitting (less memory than keeping them)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.x: List[List[np.ndarray]] = [[] for _ in range(num_layers)]
        self.seq: List[np.ndarray] = []
        self.tokens = 0
        self._pending: Dict[int, mx.array] = {}

    def hook(self, layer: int, x: mx.array, h: mx.array) -> mx.array:
        self._pending[layer] = x.astype(mx.float16)
        return h

    def pending_arrays(self) -> List[mx.array]:
        return list(self._pending.values())

    def take(self, valid: np.ndarray, seq_ids: np.ndarray, limit: Optional[int] = None) -> int:
        """Keep the positions where ``valid`` (B, L) is True (at most ``limit``); returns how many."""
        valid = np.asarray(valid, dtype=bool)
        if limit is not None and valid.sum() > limit:
            flat = valid.reshape(-1).copy()
            keep = np.flatnonzero(flat)[:max(0, limit)]
            flat[:] = False
            flat[keep] = True
            valid = flat.reshape(valid.shape)
        n = int(valid.sum())
        if n:
            for layer, x in self._pending.items():
                self.x[layer].append(np.array(x)[valid])
            self.seq.append(np.broadcast_to(np.asarray(seq_ids)[:, None], valid.shape)[valid])
            self.tokens += n
        self._pending.clear()
        return n

    def reset(self) -> None:
        self.x = [[] for _ in range(self.num_layers)]
        self.seq = []
        self.tokens = 0
        self._pending.clear()

    def finish(self) -> Tuple[np.ndarray, np.ndarray]:
        """(x (num_layers, T, hidden) float16, sequence id (T,)); frees the chunks."""
        X = np.stack([np.concatenate(c) for c in self.x])
        seq = np.concatenate(self.seq)
        self.x = []
        return X, seq


def generate_and_collect(model, tokenizer, prompts: Sequence[str], collector: Collector, *, max_new: int,
                         budget: int, temperature: float = GEN_TEMPERATURE, min_p: float = GEN_MIN_P, seed: int = 0,
                         batch_size: int = 64, seq_offset: int = 0, prefill_step: int = 16,
                         progress: Optional[ProgressCallback] = None) -> Tuple[int, List[str]]:
    """Answer ``prompts`` with the dense model (batched, chat template) and collect the
    activations of every token read (prompt and answer) until ``budget`` tokens.
    Returns (tokens collected, the answers)."""
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache  # noqa: PLC0415 - mlx-lm (seconds): the CLI imports this module
    from mlx_lm.sample_utils import make_sampler  # noqa: PLC0415 - mlx-lm (seconds): the CLI imports this module

    mx.random.seed(seed)
    sampler = make_sampler(temp=temperature, min_p=min_p)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    encoded = [chat_tokens(tokenizer, p) for p in prompts]
    prefix = _common_prefix(encoded) if len(encoded) > 1 else 0
    answers: List[List[int]] = [[] for _ in prompts]
    collected = 0
    total_steps = max(1, len(range(0, len(encoded), batch_size)) * (max_new + 1))
    done_steps = 0
    for b0 in range(0, len(encoded), batch_size):
        if collected >= budget:
            break
        rows = encoded[b0 : b0 + batch_size]
        B = len(rows)
        lmax = max(len(r) for r in rows)
        pad = [lmax - len(r) for r in rows]
        toks = mx.array([[0] * p + r for p, r in zip(pad, rows)])
        # one sequence needs no padding: the model's own cache (works for every architecture)
        cache = [BatchKVCache(pad) for _ in model.layers] if B > 1 else make_prompt_cache(model)
        seq_ids = np.arange(b0, b0 + B) + seq_offset
        # the shared chat prefix (system prompt) counts once: only in the first sequence
        skip = np.array([pad[i] + (0 if b0 + i == 0 else prefix) for i in range(B)])
        valid = np.arange(lmax)[None, :] >= skip[:, None]
        # the prompts in chunks of positions (the cache carries them over): progress moves in between
        for c0 in range(0, lmax, prefill_step):
            c1 = min(lmax, c0 + prefill_step)
            report(progress, (done_steps + c0 / lmax) / total_steps, f"reading {B} prompts: {c0}/{lmax} positions")
            if c1 < lmax:
                out = hidden_states(model, toks[:, c0:c1], cache)
            else:
                out = logits = last_logits(model, toks[:, c0:c1], cache)
            mx.eval(out, collector.pending_arrays())
            collected += collector.take(valid[:, c0:c1], seq_ids, budget - collected)
        alive = np.ones(B, dtype=bool)
        for step in range(max_new):
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            y = sampler(logprobs)
            y_np = np.array(y).reshape(-1)
            for i in range(B):
                if alive[i]:
                    t = int(y_np[i])
                    if t in eos:
                        alive[i] = False
                    else:
                        answers[b0 + i].append(t)
            done_steps += 1
            report(progress, done_steps / total_steps, f"generating: {collected} tokens")
            if not alive.any() or collected >= budget or step == max_new - 1:
                break
            logits = last_logits(model, y.reshape(B, 1), cache)
            mx.eval(logits, collector.pending_arrays())
            collected += collector.take(alive[:, None], seq_ids, budget - collected)
        done_steps = (b0 // batch_size + 1) * (max_new + 1)
        report(progress, done_steps / total_steps, f"generating: {collected} tokens")
    texts = [tokenizer.decode(a) for a in answers]
    return collected, texts


def collect_text(model, tokenizer, text: str, collector: Collector, *, budget: int, seq_len: int = 256,
                 batch_size: int = 8, seq_offset: int = 0, progress: Optional[ProgressCallback] = None) -> int:
    """Collect activations on plain ``text`` (independent chunks of ``seq_len`` tokens)."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))[:budget]
    chunks = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    chunks = [c for c in chunks if len(c) >= 2]
    collected = 0
    for b0 in range(0, len(chunks), batch_size):
        rows = chunks[b0 : b0 + batch_size]
        lmax = max(len(r) for r in rows)
        toks = mx.array([r + [0] * (lmax - len(r)) for r in rows])  # right padding: causal, never attended
        valid = np.arange(lmax)[None, :] < np.array([len(r) for r in rows])[:, None]
        out = hidden_states(model, toks)
        mx.eval(out, collector.pending_arrays())
        collected += collector.take(valid, np.arange(b0, b0 + len(rows)) + seq_offset)
        report(progress, (b0 + len(rows)) / len(chunks), f"reading text: {collected} tokens")
    return collected


# --------------------------------------------------------------------------- thresholds
def quantile_threshold(abs_h: np.ndarray, sparsity: float) -> float:
    """The ``sparsity`` quantile of a layer's |h| values (0 for sparsity 0)."""
    if sparsity <= 0:
        return 0.0
    flat = np.asarray(abs_h, dtype=np.float32).reshape(-1)
    k = min(len(flat) - 1, max(0, int(round(sparsity * (len(flat) - 1)))))
    return float(np.partition(flat, k)[k])


def thresholds_for(abs_h: Sequence[np.ndarray], sparsities: Sequence[float],
                   act: str = "silu") -> Dict[float, List[float]]:
    """Per-layer thresholds for several sparsities at once (0 for ReLU models)."""
    if is_exact(act):
        return {s: [0.0] * len(abs_h) for s in sparsities}
    out: Dict[float, List[float]] = {s: [] for s in sparsities}
    for h in abs_h:
        qs = np.quantile(np.asarray(h, dtype=np.float32).reshape(-1), list(sparsities))
        for s, q in zip(sparsities, qs):
            out[s].append(float(q) if s > 0 else 0.0)
    return out


# --------------------------------------------------------------------------- fitting one layer
def hidden_activation(x, parts: Dict[str, mx.array], act: str = "silu",
                      act_param: Optional[float] = None) -> mx.array:
    """The FFN's hidden activation ``f(x gate^T + gate_bias, x up^T + up_bias)`` (tokens × neurons,
    float32) from a layer's tensors by role (``up`` absent for ungated FFNs such as OPT's). The two
    matmuls run in numpy (see :class:`NumpyLinear`); the activation in MLX."""
    xn = np.asarray(x, dtype=np.float32)

    def proj(role: str) -> mx.array:
        y = xn @ np.array(parts[role].astype(mx.float32)).T
        if f"{role}_bias" in parts:
            y += np.array(parts[f"{role}_bias"].astype(mx.float32))
        return mx.array(y)

    return gated_activation(act, act_param)(proj("gate"), proj("up") if "up" in parts else None)


def fit_low_rank(x, t, rank: int, ridge: float = DEFAULT_RIDGE) -> Tuple[mx.array, mx.array, mx.array]:
    """Reduced-rank ridge regression ``t ≈ (x A) B + b`` (closed form).

    ``W`` = the ridge solution of ``t`` on centred ``x`` (ridge ``ridge * trace(C) / hidden``);
    ``B`` = the top-``rank`` right singular vectors of the fitted values ``x W`` (found
    from a hidden × hidden eigenproblem), ``A = W B^T``. ``x``, ``t``: MLX or numpy arrays.
    The products over tokens run in numpy float32 (fast with or without a system BLAS), the
    hidden × hidden algebra in float64. Returns float32 MLX (A, B, b).
    """
    x = np.asarray(x, dtype=np.float32)
    t = np.asarray(t, dtype=np.float32)
    h = x.shape[1]
    mu = x.mean(axis=0)
    tm = t.mean(axis=0)
    xc = x - mu
    C = (xc.T @ xc).astype(np.float64)
    C += (ridge * np.trace(C) / h + 1e-8) * np.eye(h)
    W = np.linalg.solve(C, (xc.T @ (t - tm)).astype(np.float64))   # hidden × n
    L = np.linalg.cholesky(C)                                       # C = L L^T
    M = L.T @ W                                                     # |x W|^2 = |M|^2 (rows of x W span)
    evals, U = np.linalg.eigh(M @ M.T)                              # ascending
    r = min(rank, h)
    U = U[:, ::-1][:, :r]
    ev = np.maximum(evals[::-1][:r], 1e-12)
    V = (M.T @ U) / np.sqrt(ev)                                     # n × r, orthonormal columns
    A = W @ V
    B = V.T
    b = tm - (mu @ A) @ B
    if r < rank:  # more rank than inputs: pad with zeros (same predictions)
        A = np.concatenate([A, np.zeros((h, rank - r))], axis=1)
        B = np.concatenate([B, np.zeros((rank - r, B.shape[1]))], axis=0)
    return mx.array(A.astype(np.float32)), mx.array(B.astype(np.float32)), mx.array(b.astype(np.float32))


def weighted_bce(z: mx.array, y: mx.array, pos_weight: float) -> mx.array:
    """Mean of ``pos_weight * y * softplus(-z) + (1 - y) * softplus(z)``: a missed active
    neuron costs ``pos_weight`` times a needless one."""
    return mx.mean(pos_weight * y * nn.softplus(-z) + (1.0 - y) * nn.softplus(z))


def finetune_bce(A: mx.array, B: mx.array, b: mx.array, x: mx.array, y: mx.array, *, epochs: int,
                 pos_weight: float = DEFAULT_POS_WEIGHT, lr: float = 1e-3, batch_size: int = 256, seed: int = 0,
                 cancel: Optional[Callable[[], None]] = None) -> Tuple[mx.array, mx.array, mx.array, List[float]]:
    """Adam on the weighted BCE of ``sigmoid((x A) B + b)`` against labels ``y`` (bool).

    Gradients are written out (``dz = w (sigmoid(z) - y)``): one transcendental per
    element, which matters on CPUs. Returns (A, B, b, mean loss per epoch)."""

    T, n = y.shape
    steps_per_epoch = max(1, T // batch_size)
    total = steps_per_epoch * epochs
    opt = optim.Adam(learning_rate=optim.cosine_decay(lr, total, lr * 0.05))
    params = {"A": A, "B": B, "b": b}
    rng = np.random.default_rng(seed)
    yf = y.astype(mx.float32)
    losses: List[float] = []
    for _ in range(epochs):
        perm = rng.permutation(T)
        acc = []
        for s in range(steps_per_epoch):
            idx = mx.array(perm[s * batch_size : (s + 1) * batch_size])
            xb, yb = x[idx], yf[idx]
            a = xb @ params["A"]
            z = a @ params["B"] + params["b"]
            w = 1.0 + (pos_weight - 1.0) * yb
            dz = w * (mx.sigmoid(z) - yb) / (xb.shape[0] * n)
            grads = {"A": xb.T @ (dz @ params["B"].T), "B": a.T @ dz, "b": mx.sum(dz, axis=0)}
            params = opt.apply_gradients(grads, params)
            if s % 8 == 0:
                acc.append(weighted_bce(z, yb, pos_weight))
            mx.eval(params, opt.state)
            if cancel is not None:
                cancel()
        losses.append(float(mx.mean(mx.stack(acc)).item()))
    return params["A"], params["B"], params["b"], losses


@dataclass
class LayerFit:
    """One layer's calibration result."""

    weights: PredictorWeights          # one layer, stored dtype
    threshold: float
    frequency: np.ndarray              # (n,) fraction of calibration tokens each neuron is active on
    cutoffs: Dict[float, float]        # recall target → probability cutoff
    counts: Dict[float, Dict[str, int]]  # recall target → test tp/fp/fn/predicted/true/cells
    train_loss: float
    val_loss: float
    finetune_losses: List[float]
    gate: Optional[Dict[str, Any]] = None  # gate-first figures (gate_first_layer)


def gate_scales(x: mx.array, parts: Dict[str, mx.array], down: mx.array, train: np.ndarray) -> np.ndarray:
    """Gate-first's per-neuron scales (n,) float32: ``rms(up x)`` over the train tokens times the
    neuron's down-projection column norm, so ``|act(g)| * scale`` estimates ``|h| * ||down_i||``,
    the size of the neuron's contribution to the FFN output, from the gate alone. ``1`` for
    ungated FFNs (no up part)."""
    d32 = np.array(down.astype(mx.float32))
    col = np.sqrt(np.square(d32).sum(axis=0))
    if "up" not in parts:
        return col.astype(np.float32)
    xt = np.asarray(x, dtype=np.float32)[train]
    u = xt @ np.array(parts["up"].astype(mx.float32)).T
    if "up_bias" in parts:
        u += np.array(parts["up_bias"].astype(mx.float32))
    return (np.sqrt(np.square(u).mean(axis=0)) * col).astype(np.float32)


def gate_first_layer(x: mx.array, a: mx.array, h_thr: float, parts: Dict[str, mx.array], down: mx.array, *,
                     act: str, act_param: Optional[float], train: np.ndarray, test: np.ndarray,
                     predicted: Dict[float, mx.array], sparsities: Sequence[float]) -> Dict[str, Any]:
    """One layer's gate-first calibration (``gate_first.GateFirst``): per-neuron scales
    (:func:`gate_scales`) and thresholds on ``|act(gate x)| * scale`` for each of
    ``sparsities`` (quantiles over the train tokens) and, on the held-out test tokens, the
    share of neurons each keeps and the FFN output error ``||down((1 - mask) h)||^2``
    against ``||down h||^2``; the same error for the oracle's ``|h| > h_thr`` rule and for
    the predictor's masks ``predicted`` (recall -> (test, n) bool).
    ``a`` = ``|h|`` of every token, ``down`` the layer's down projection (hidden, n)."""

    f32 = parts["gate"].astype(mx.float32)
    g = x @ f32.T
    if "gate_bias" in parts:
        g = g + parts["gate_bias"].astype(mx.float32)
    scales = gate_scales(x, parts, down, train)
    ga = mx.abs(activation(act, act_param)(g)) * mx.array(scales)
    tr, te = mx.array(train), mx.array(test)
    ga_tr = np.array(ga[tr])
    qs = np.quantile(ga_tr.reshape(-1), list(sparsities))
    ga_te, a_te = ga[te], a[te]
    d32 = down.astype(mx.float32)
    h_te = hidden_activation(x[te], parts, act, act_param)
    ref = float(mx.sum(mx.square(h_te @ d32.T)).item())

    def err(keep: mx.array) -> float:
        return float(mx.sum(mx.square((h_te * (~keep).astype(mx.float32)) @ d32.T)).item())

    out: Dict[str, Any] = {"thresholds": {}, "active": {}, "err": {}, "ref": ref, "cells": int(a_te.size),
                              "scales": scales}
    for sp, q in zip(sparsities, qs):
        keep = ga_te > float(q)
        out["thresholds"][float(sp)] = float(q)
        out["active"][float(sp)] = int(mx.sum(keep).item())
        out["err"][float(sp)] = err(keep)
    out["oracle_err"] = err(a_te > h_thr)
    out["oracle_active"] = int(mx.sum(a_te > h_thr).item())
    out["predictor_err"] = {float(r): err(p) for r, p in predicted.items()}
    return out


def gate_first_record(fits: Sequence["LayerFit"], recall: float) -> Optional[Dict[str, Any]]:
    """The manifest's ``predictors["gate_first"]`` from the layers' :func:`gate_first_layer`
    figures: per sparsity the thresholds, the held-out active fraction and relative FFN error
    (mean over layers of ``sqrt(err / ref)``), the oracle's and the predictor's error on the
    same tokens, and the chosen ``sparsity``: the largest whose error stays within the
    oracle's (the calibrated ``|h|`` rule is the accepted quality)."""
    if not fits or any(f.gate is None for f in fits):
        return None
    gs = [f.gate for f in fits if f.gate is not None]  # (every one: checked above)

    def rel(errs: Sequence[float]) -> float:
        return float(np.mean([math.sqrt(e / g["ref"]) if g["ref"] > 0 else 0.0 for e, g in zip(errs, gs)]))

    sps = sorted(gs[0]["thresholds"])
    held: Dict[str, Dict[str, Any]] = {}
    for sp in sps:
        held[str(sp)] = {
            "active_fraction": float(sum(g["active"][sp] for g in gs) / sum(g["cells"] for g in gs)),
            "rel_error": rel([g["err"][sp] for g in gs]),
            "per_layer_active": [round(g["active"][sp] / g["cells"], 4) for g in gs],
        }
    oracle = rel([g["oracle_err"] for g in gs])
    ok = [sp for sp in sps if held[str(sp)]["rel_error"] <= oracle]
    chosen = max(ok) if ok else min(sps)
    pred = {str(r): rel([g["predictor_err"][r] for g in gs]) for r in gs[0]["predictor_err"]}
    return {
        "rule": "|act(gate x)| * scale > per-layer threshold (CATS with per-neuron scales rms(up x) * "
                "||down column||; gate rows resident, up/down read)",
        "criterion": "scaled",
        "thresholds": {str(sp): [float(g["thresholds"][sp]) for g in gs] for sp in sps},
        "held_out": held,
        "oracle_rel_error": oracle,
        "oracle_active_fraction": float(sum(g["oracle_active"] for g in gs) / sum(g["cells"] for g in gs)),
        "predictor_rel_error": pred,
        "sparsity": float(chosen),
        "why": (f"largest calibrated sparsity whose held-out FFN error ({held[str(chosen)]['rel_error']:.3f}) "
                f"is within the oracle's ({oracle:.3f})" if ok else
                f"no sparsity keeps the oracle's FFN error ({oracle:.3f}): the smallest"),
    }


#: Gate-first's quality bar at calibration: held-out perplexity at most this much above dense's
#: (the chosen sparsity is the largest calibrated one that keeps it; ``engine.choose_active``
#: admits gate-first only when it is kept).
GATE_PPL_TOLERANCE = 0.005
#: Held-out tokens of the calibration's own answers scored for that perplexity (at most).
GATE_PPL_TOKENS = 1024


def held_out_answers(files, data: "CalibrationData", held: np.ndarray) -> Tuple[List[np.ndarray], int]:
    """The answers of the held-out sequences (token indices ``held``; the model's own answers, never
    fitted on) as teacher-forcing chunks, at most ``GATE_PPL_TOKENS`` scored tokens; and that count."""
    from mlx_lm.utils import load_tokenizer  # noqa: PLC0415 - mlx-lm (seconds): the CLI imports this module

    sids = sorted({int(v) for v in np.unique(data.seq[held])} & set(range(len(data.answers))))
    tokenizer = load_tokenizer(files.root, eos_token_ids=files.manifest.model_args.get("eos_token_id"))
    chunks: List[np.ndarray] = []
    total = 0
    for sid in sids:
        ids = np.asarray(tokenizer.encode(data.answers[sid], add_special_tokens=False), dtype=np.int64)
        if len(ids) >= 8 and total < GATE_PPL_TOKENS:
            chunks.append(ids[: GATE_PPL_TOKENS - total + 1])
            total += len(chunks[-1]) - 1
    return chunks, total


def _held_out_scoring(files, data: "CalibrationData", held: np.ndarray, dtype: Optional[str]):
    """What a held-out perplexity pass scores with: ``(chunks, tokens, activation, dense model)``, the
    answers of :func:`held_out_answers`; None when they are under 32 tokens (nothing to score)."""
    chunks, total = held_out_answers(files, data, held)
    if total < 32:
        return None
    return chunks, total, model_activation(files.manifest.model_args), load_dense_model(files, dtype)


def predictor_perplexity(files, data: "CalibrationData", held: np.ndarray, weights: PredictorWeights,
                         info: Dict[str, Any], dense: Optional[float] = None, dtype: Optional[str] = "float32",
                         progress: Optional[ProgressCallback] = None) -> Optional[Dict[str, Any]]:
    """The predictors' held-out perplexity at the shipped recall target ``info["recall"]``: the
    answers of :func:`held_out_answers` scored teacher-forced by the dense model with each layer's
    hidden activation masked to the predicted neurons (the chooser's own rule,
    ``predictor.PredictorChooser``), against dense (``dense``: already measured, e.g. by
    :func:`gate_first_perplexity`). ``engine.choose_active`` admits the predictor only when it is
    within ``GATE_PPL_TOLERANCE`` of dense. None when there are no answers to score."""
    from .evaluate import predictor_selector, run_mode  # noqa: PLC0415 - import cycle (evaluate builds on this module)

    scoring = _held_out_scoring(files, data, held, dtype)
    if scoring is None:
        return None
    chunks, total, act, model = scoring
    n, L = files.manifest.intermediate_size, files.manifest.num_layers
    if dense is None:
        dense = run_mode(model, chunks, L, n, name="predictor perplexity, dense", act=act, windows=1,
                         progress=scaled(progress, 0.0, 0.5)).perplexity
    recall = float(info["recall"])
    chooser = PredictorChooser(weights, info["cutoffs"][str(recall)], recall=recall)
    ppl = run_mode(model, chunks, L, n, name=f"predictor perplexity at recall {recall:g}", act=act,
                   select=predictor_selector(chooser), windows=1, progress=scaled(progress, 0.5, 1.0)).perplexity
    return {"dense": float(dense), "tokens": int(total), "tolerance": GATE_PPL_TOLERANCE,
            "predictor": {str(recall): float(ppl)}, "passed": bool(ppl <= dense * (1 + GATE_PPL_TOLERANCE))}


def gate_first_perplexity(files, data: "CalibrationData", held: np.ndarray, rec: Dict[str, Any],
                          scales: Optional[np.ndarray], dtype: Optional[str] = "float32",
                          progress: Optional[ProgressCallback] = None) -> Optional[Dict[str, Any]]:
    """``rec`` (:func:`gate_first_record`) with the sparsity chosen by held-out perplexity:
    the answers of the held-out sequences ``held`` (token indices; the model's own answers,
    never fitted on) are scored teacher-forced by the dense model with every FFN and with
    each layer's hidden activation masked by the gate-first rule; a binary search over the
    calibrated sparsities (perplexity grows with sparsity) finds the largest whose
    perplexity is within ``GATE_PPL_TOLERANCE`` of dense. None when the held-out sequences
    have no answers to score (plain text only: the FFN-error choice stays). ``progress`` hears of
    every scored chunk (a pass over ~1,000 tokens takes seconds on a slow CPU)."""
    from .evaluate import gate_selector, run_mode  # noqa: PLC0415 - import cycle (evaluate builds on this module)

    m = files.manifest
    scoring = _held_out_scoring(files, data, held, dtype)
    if scoring is None:
        return None
    chunks, total, act, model = scoring
    gates = float32_gates(files)
    n, L = m.intermediate_size, m.num_layers
    sps = sorted(float(k) for k in rec["thresholds"])
    runs = 2 + len(sps).bit_length()  # dense, the binary search's steps, perhaps one more: at most
    done = [0]

    def sub() -> Optional[ProgressCallback]:
        k = min(done[0], runs - 1)
        done[0] += 1
        return scaled(progress, k / runs, (k + 1) / runs)

    dense = run_mode(model, chunks, L, n, name="gate-first perplexity, dense", act=act, windows=1,
                     progress=sub()).perplexity
    ppl: Dict[str, float] = {}

    def ok(j: int) -> bool:
        sp = sps[j]
        sel = gate_selector(gates, rec["thresholds"][str(sp)], act, scales)
        ppl[str(sp)] = run_mode(model, chunks, L, n, name=f"gate-first perplexity at {sp:g}", act=act, select=sel,
                                windows=1, progress=sub()).perplexity
        return ppl[str(sp)] <= dense * (1 + GATE_PPL_TOLERANCE)

    lo, hi, best = 0, len(sps) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    chosen = sps[best] if best is not None else sps[0]
    if best is None and str(chosen) not in ppl:
        ok(0)
    out = dict(rec)
    out["sparsity"] = float(chosen)
    out["perplexity"] = {"dense": dense, "tokens": int(total), "tolerance": GATE_PPL_TOLERANCE,
                         "gate": {k: ppl[k] for k in sorted(ppl, key=float)}, "passed": best is not None}
    rel = ppl[str(chosen)] / dense - 1
    out["why"] = (f"largest calibrated sparsity whose held-out perplexity ({ppl[str(chosen)]:.3f}, {rel:+.1%}) is "
                  f"within {GATE_PPL_TOLERANCE:.1%} of dense ({dense:.3f}) on {total} tokens of held-out answers"
                  if best is not None else
                  f"no calibrated sparsity keeps held-out perplexity within {GATE_PPL_TOLERANCE:.1%} of dense "
                  f"({dense:.3f}): the smallest ({ppl[str(chosen)]:.3f}, {rel:+.1%})")
    return out


def fit_layer(x_np: np.ndarray, parts: Dict[str, mx.array], *, act: str, sparsity: float, rank: int,
              train: np.ndarray, val: np.ndarray, test: np.ndarray, ridge: float = DEFAULT_RIDGE,
              epochs: int = 0, pos_weight: float = DEFAULT_POS_WEIGHT, predictor_dtype: mx.Dtype = mx.float16,
              recalls: Sequence[float] = RECALL_TARGETS, seed: int = 0, act_param: Optional[float] = None,
              cancel: Optional[Callable[[], None]] = None, progress: Optional[ProgressCallback] = None,
              name: str = "layer", down: Optional[mx.array] = None, recall: float = DEFAULT_RECALL) -> LayerFit:
    """Threshold, labels, predictor, cutoffs and test counts of one layer (``progress`` sees each step).

    x_np: (T, hidden) float16 FFN inputs; parts: the layer's FFN tensors by role.
    The predictor regresses the clipped log-magnitude ``log(|h| / threshold)`` (so its
    logit is positive where the neuron is predicted active and large activations rank
    first), optionally refined with Adam on the weighted BCE (``epochs``)."""
    report(progress, 0.0, f"{name}: activations")
    x = mx.array(x_np).astype(mx.float32)
    a = mx.abs(hidden_activation(x, parts, act, act_param))
    a_np = np.array(a)
    if is_exact(act):  # ReLU family: active exactly where h != 0
        thr = 0.0
        pos = a_np[a_np > 0]
        scale = float(np.median(pos)) if pos.size else 1.0
    else:
        thr = quantile_threshold(a_np, sparsity)
        scale = thr if thr > 0 else float(np.median(a_np)) + 1e-12
    y = a > thr
    freq = np.array(mx.mean(y.astype(mx.float32), axis=0))
    target = mx.clip(mx.log(a / scale + 1e-12), -LOG_CLIP, LOG_CLIP)
    report(progress, 0.3, f"{name}: ridge fit")
    tr = mx.array(train)
    A, B, b = fit_low_rank(x[tr], target[tr], rank, ridge)
    ft_losses: List[float] = []
    if epochs > 0:
        A, B, b, ft_losses = finetune_bce(A, B, b, x[tr], y[tr], epochs=epochs, pos_weight=pos_weight, seed=seed,
                                          cancel=cancel)
    w = PredictorWeights([A.astype(predictor_dtype)], [B.astype(predictor_dtype)], [b.astype(predictor_dtype)])
    mx.eval(w.A, w.B, w.b)

    # the losses are reported figures only: numpy float32 on the stored (rounded) weights; MLX's float16
    # matmuls are slow on CPUs. Cutoffs and test counts below use the inference code (w.logits).
    A32, B32, b32 = (np.array(v.astype(predictor_dtype).astype(mx.float32)) for v in (A, B, b))
    x32, y_np = np.asarray(x), np.array(y)

    def loss_on(idx: np.ndarray) -> float:
        if len(idx) == 0:
            return float("nan")
        sub = idx[:2048]
        z = (x32[sub] @ A32) @ B32 + b32
        sp = np.logaddexp(0.0, z)  # softplus(z); softplus(-z) = softplus(z) - z
        return float(np.mean(np.where(y_np[sub], pos_weight * (sp - z), sp)))

    # cutoffs on val: the largest logit keeping ``recall`` of the true-active pairs
    report(progress, 0.7, f"{name}: cutoffs")
    cut: Dict[float, float] = {}
    vi = mx.array(val)
    zv = np.array(w.logits(0, x[vi]))
    posv = np.sort(zv[np.array(y[vi])])
    for r in recalls:
        if len(posv) == 0:
            cut[r] = 0.5
            continue
        k = int(math.floor((1.0 - r) * len(posv)))
        c = float(np.nextafter(posv[k], -np.inf)) if k < len(posv) else float(posv[-1])
        cut[r] = logit_to_prob(c)
    # test counts with the chooser's own comparison
    ti = mx.array(test)
    zt = w.logits(0, x[ti])
    yt = y[ti]
    counts: Dict[float, Dict[str, int]] = {}
    for r in recalls:
        p = zt > prob_to_logit(cut[r])
        tp = int(mx.sum(p & yt).item())
        npred = int(mx.sum(p).item())
        ntrue = int(mx.sum(yt).item())
        counts[r] = {"tp": tp, "fp": npred - tp, "fn": ntrue - tp, "predicted": npred, "true": ntrue,
                     "cells": int(len(test) * y.shape[1])}
    gate = None
    if down is not None and not is_exact(act) and len(test):

        gate = gate_first_layer(x, a, thr, parts, down, act=act, act_param=act_param, train=train, test=test,
                                predicted={recall: zt > prob_to_logit(cut[recall])} if recall in cut else {},
                                sparsities=GATE_SPARSITIES)
    return LayerFit(w, thr, freq, cut, counts, loss_on(train), loss_on(val), ft_losses, gate)


def split_by_sequence(seq: np.ndarray, fractions=(0.1, 0.1),
                      seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) token indices; whole sequences go to one side (no neighbour leaks)."""
    ids, counts = np.unique(seq, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(ids))
    total = len(seq)
    groups: List[List[int]] = [[], [], []]
    filled = [0, 0]
    for j in order:
        for g in (0, 1):
            if filled[g] < fractions[g] * total and (len(ids) - sum(map(len, groups)) > 1):
                groups[g + 1].append(ids[j])
                filled[g] += counts[j]
                break
        else:
            groups[0].append(ids[j])
    out = []
    for grp in groups:
        out.append(np.flatnonzero(np.isin(seq, grp)) if grp else np.zeros(0, dtype=np.int64))
    train, val, test = out
    if len(val) == 0 or len(test) == 0 or len(train) < 0.5 * total:  # few sequences: token splits
        perm = np.random.default_rng(seed).permutation(total)
        nv = max(1, int(total * fractions[0]))
        nt = max(1, int(total * fractions[1]))
        val, test, train = np.sort(perm[:nv]), np.sort(perm[nv : nv + nt]), np.sort(perm[nv + nt :])
    return train, val, test


# --------------------------------------------------------------------------- the whole run
@dataclass
class CalibrationReport:
    flash_dir: str
    sparsity: float
    rank: int
    recall: float
    tokens: int
    tokens_train: int
    tokens_val: int
    tokens_test: int
    thresholds: List[float]
    cutoffs: Dict[str, List[float]]
    train_loss: float
    val_loss: float
    finetune_loss: List[float]
    held_out: Dict[str, Dict[str, float]]  # recall target → {recall, precision, predicted_fraction, ...}
    predictor_bytes: int
    seconds: Dict[str, float]
    sources: Dict[str, Any]
    samples: List[str] = field(default_factory=list)
    per_layer: Dict[str, List[float]] = field(default_factory=dict)  # predictor at the default recall, held out
    gate_first: Optional[Dict[str, Any]] = None  # gate-first thresholds and held-out figures
    perplexity: Optional[Dict[str, Any]] = None  # the predictors' held-out perplexity (predictor_perplexity)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"calibrated {self.flash_dir}",
                 f"  sparsity {self.sparsity:.0%}, rank {self.rank}, {self.tokens} tokens "
                 f"({self.tokens_train} train / {self.tokens_val} cutoffs / {self.tokens_test} test)",
                 f"  weighted BCE: train {self.train_loss:.4f}, held-out {self.val_loss:.4f}"
                 + (f" (Adam epochs: {', '.join(f'{v:.4f}' for v in self.finetune_loss)})"
                    if self.finetune_loss else ""),
                 f"  predictors: {self.predictor_bytes / 1e6:.1f} MB stored (quantized at load)"]
        for r, m in self.held_out.items():
            mark = " (default)" if abs(float(r) - self.recall) < 1e-9 else ""
            lines.append(f"  recall target {r}: test recall {m['recall']:.3f}, precision {m['precision']:.3f}, "
                         f"predicted active {m['predicted_fraction']:.1%} (true {m['true_fraction']:.1%}){mark}")
        pl = self.per_layer
        if pl:
            lines.append(f"  per layer at recall {self.recall}: recall / precision / predicted active")
            for i, (rc, p, f) in enumerate(zip(pl["recall"], pl["precision"], pl["predicted_fraction"])):
                lines.append(f"    layer {i:2d}: {rc:.3f} / {p:.3f} / {f:.1%}")
        pp = self.perplexity
        if pp:
            for r, v in pp["predictor"].items():
                lines.append(f"  predictors at recall {r}: held-out perplexity {v:.3f} ({v / pp['dense'] - 1:+.1%} vs "
                             f"dense {pp['dense']:.3f}, {pp['tokens']} tokens of held-out answers)")
        g = self.gate_first
        if g:
            lines.append("  gate-first (|act(gate x)| > threshold), held out: sparsity: active, FFN error "
                         f"(oracle {g['oracle_rel_error']:.3f}, predictor "
                         + ", ".join(f"{v:.3f}" for v in g["predictor_rel_error"].values()) + ")")
            for sp, h in g["held_out"].items():
                mark = " (chosen)" if abs(float(sp) - g["sparsity"]) < 1e-9 else ""
                lines.append(f"    {float(sp):.0%}: {h['active_fraction']:.1%}, {h['rel_error']:.3f}{mark}")
        s = self.seconds
        lines.append("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in s.items()))
        return "\n".join(lines)


@dataclass
class CalibrationData:
    """What collection gathered: per-layer FFN inputs and where they came from."""

    X: np.ndarray                  # (num_layers, T, hidden) float16
    seq: np.ndarray                # (T,) sequence id of each token
    sources: Dict[str, Any]
    answers: List[str]
    seconds: Dict[str, float]

    def save(self, path: Union[str, Path]) -> None:
        """For experiments: an ``.npz`` with X, seq and the sources as JSON."""

        np.savez(path, X=self.X, seq=self.seq, sources=json.dumps(self.sources),
                 answers=json.dumps(self.answers))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "CalibrationData":

        z = np.load(path)
        return cls(z["X"], z["seq"], json.loads(str(z["sources"])), json.loads(str(z["answers"])), {})


def collect_calibration(
    files,
    *,
    text: Optional[Union[str, Path]] = None,
    tokens: int = DEFAULT_TOKENS,
    max_new_tokens: int = DEFAULT_MAX_NEW,
    prompts: Optional[Sequence[str]] = None,
    seed: int = 0,
    dtype: Optional[str] = "float32",
    progress: Optional[ProgressCallback] = None,
) -> CalibrationData:
    """Run the calibration text through the dense model and keep each layer's FFN inputs."""
    from mlx_lm.utils import load_tokenizer  # noqa: PLC0415 - mlx-lm (seconds): the CLI imports this module

    t_start = time.perf_counter()
    seconds: Dict[str, float] = {}
    m = files.manifest
    act, act_param = model_activation(m.model_args)
    report(progress, 0.0, "loading the model")
    tokenizer = load_tokenizer(files.root, eos_token_ids=m.model_args.get("eos_token_id"))
    model = load_dense_model(files, dtype)
    collector = Collector(m.num_layers)
    install_hooks(model, (act, act_param), collector.hook)
    seconds["load"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    user_text = Path(text).expanduser().read_text(encoding="utf-8") if text is not None else None
    text_budget = tokens // 2 if user_text else 0
    prompt_list = list(prompts) if prompts is not None else read_prompts()
    gen_progress = scaled(progress, 0.05, 0.85 if user_text else 1.0)
    try:
        got_chat, answers = generate_and_collect(model, tokenizer, prompt_list, collector, max_new=max_new_tokens,
                                                 budget=tokens - text_budget, seed=seed, progress=gen_progress)
    except Cancelled:
        raise
    except Exception:  # an architecture without batched (left-padded) caches: one prompt at a time
        collector.reset()
        got_chat, answers = generate_and_collect(model, tokenizer, prompt_list, collector, max_new=max_new_tokens,
                                                 budget=tokens - text_budget, seed=seed, batch_size=1,
                                                 progress=gen_progress)
    got_text = 0
    if user_text:
        got_text = collect_text(model, tokenizer, user_text, collector, budget=tokens - got_chat,
                                seq_offset=len(prompt_list), progress=scaled(progress, 0.85, 1.0))
    seconds["collect"] = time.perf_counter() - t0
    X, seq = collector.finish()
    sources = {
        "prompts": f"resources/{PROMPTS_FILE}" if prompts is None else "custom",
        "prompt_count": len(prompt_list),
        "generated": {"max_new_tokens": max_new_tokens, "temperature": GEN_TEMPERATURE, "min_p": GEN_MIN_P,
                      "seed": seed},
        "chat_tokens": int(got_chat),
        "text": str(Path(text).expanduser().resolve()) if text is not None else None,
        "text_tokens": int(got_text),
        "compute_dtype": dtype or m.dtype,
    }
    return CalibrationData(X, seq, sources, answers, seconds)


def fit_predictors(
    files,
    data: CalibrationData,
    *,
    sparsity: float = DEFAULT_SPARSITY,
    rank: int = DEFAULT_RANK,
    recall: float = DEFAULT_RECALL,
    epochs: int = DEFAULT_EPOCHS,
    pos_weight: float = DEFAULT_POS_WEIGHT,
    ridge: float = DEFAULT_RIDGE,
    seed: int = 0,
    predictor_dtype: str = "float16",
    progress: Optional[ProgressCallback] = None,
) -> Tuple[PredictorWeights, Dict[str, Any]]:
    """Thresholds, predictors, cutoffs and held-out metrics for every layer.
    Returns the weights and the manifest's ``predictors`` record (not yet saved)."""
    t0 = time.perf_counter()
    m = files.manifest
    act, act_param = model_activation(m.model_args)
    X, seq = data.X, data.seq
    T = len(seq)
    if T < 32:
        raise ValueError(f"only {T} calibration tokens collected; need at least 32")
    train_idx, val_idx, test_idx = split_by_sequence(seq, seed=seed)
    pdt = getattr(mx, predictor_dtype)
    fits: List[LayerFit] = []
    # the layer fits take the first part of this step, the held-out perplexity passes the rest (minutes on
    # a slow CPU: the bar keeps moving through them)
    whole, progress = progress, scaled(progress, 0.0, FIT_SHARE)

    def cancel() -> None:
        report(progress, len(fits) / m.num_layers, f"fitting layer {len(fits) + 1}/{m.num_layers}")

    for i in range(m.num_layers):
        report(progress, i / m.num_layers, f"fitting layer {i + 1}/{m.num_layers}")
        parts = layer_ffn_parts(files, i)
        down = parts.pop("down", None)
        fits.append(fit_layer(X[i], parts, act=act, act_param=act_param, sparsity=sparsity, rank=rank, down=down,
                              recall=recall,
                              train=train_idx, val=val_idx, test=test_idx, ridge=ridge, epochs=epochs,
                              pos_weight=pos_weight, predictor_dtype=pdt, seed=seed + i,
                              cancel=cancel if epochs else None, name=f"layer {i + 1}/{m.num_layers}",
                              progress=scaled(progress, i / m.num_layers, (i + 1) / m.num_layers)))
        del parts
    report(progress, 1.0, "fitted")
    gates = [f.gate for f in fits if f.gate]
    weights = PredictorWeights([f.weights.A[0] for f in fits], [f.weights.B[0] for f in fits],
                               [f.weights.b[0] for f in fits], np.stack([f.frequency for f in fits]),
                               np.stack([g["scales"] for g in gates]) if len(gates) == len(fits) else None)
    held_out: Dict[str, Dict[str, float]] = {}
    for r in RECALL_TARGETS:
        tot = {k: sum(f.counts[r][k] for f in fits) for k in ("tp", "fp", "fn", "predicted", "true", "cells")}
        held_out[str(r)] = {
            "recall": tot["tp"] / max(1, tot["tp"] + tot["fn"]),
            "precision": tot["tp"] / max(1, tot["predicted"]),
            "predicted_fraction": tot["predicted"] / max(1, tot["cells"]),
            "true_fraction": tot["true"] / max(1, tot["cells"]),
        }
    info: Dict[str, Any] = {
        "file": PREDICTOR_FILE,
        "id": uuid.uuid4().hex,
        "version": 1,
        "kind": "low-rank",
        "fit": "reduced-rank ridge regression of log(|h|/threshold)"
               + (f" + {epochs} Adam epochs of weighted BCE" if epochs else ""),
        "rank": int(rank),
        "dtype": predictor_dtype,
        "rule": "exact (h != 0)" if is_exact(act) else "abs-gated-quantile",
        "activation": act,
        "sparsity": float(sparsity),
        "thresholds": [float(f.threshold) for f in fits],
        "recall": float(recall),
        "cutoffs": {str(r): [float(f.cutoffs[r]) for f in fits] for r in RECALL_TARGETS},
        "train_loss": float(np.mean([f.train_loss for f in fits])),
        "val_loss": float(np.nanmean([f.val_loss for f in fits])),
        "finetune_loss": ([float(np.mean([f.finetune_losses[e] for f in fits])) for e in range(epochs)]
                          if epochs else []),
        "pos_weight": float(pos_weight),
        "ridge": float(ridge),
        "epochs": int(epochs),
        "held_out": held_out,
        "calibration_version": CALIBRATION_VERSION,
        "per_layer": {"recall": [round(f.counts[recall]["tp"] / max(1, f.counts[recall]["true"]), 4) for f in fits],
                      "precision": [round(f.counts[recall]["tp"] / max(1, f.counts[recall]["predicted"]), 4)
                                    for f in fits],
                      "predicted_fraction": [round(f.counts[recall]["predicted"] / max(1, f.counts[recall]["cells"]), 4)
                                             for f in fits]} if recall in RECALL_TARGETS else {},
        "bytes": int(weights.nbytes),
        "calibration": {**data.sources, "tokens": int(T), "train_tokens": int(len(train_idx)),
                        "cutoff_tokens": int(len(val_idx)), "test_tokens": int(len(test_idx))},
        "seconds": {**{k: round(v, 2) for k, v in data.seconds.items()},
                    "fit": round(time.perf_counter() - t0, 2)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    gate = gate_first_record(fits, recall)
    if gate is not None:
        report(whole, FIT_SHARE, "gate-first: held-out perplexity")
        with_ppl = gate_first_perplexity(files, data, np.concatenate([val_idx, test_idx]), gate, weights.gate_scales,
                                         progress=scaled(whole, FIT_SHARE, GATE_PPL_END))  # each scored chunk
        if with_ppl is not None:
            gate = with_ppl
        info["gate_first"] = gate
    if not is_exact(act) and info["recall"] in RECALL_TARGETS:
        report(whole, GATE_PPL_END, "predictors: held-out perplexity")
        ppl = predictor_perplexity(files, data, np.concatenate([val_idx, test_idx]), weights, info,
                                   dense=((gate or {}).get("perplexity") or {}).get("dense"),
                                   progress=scaled(whole, GATE_PPL_END, 1.0))
        if ppl is not None:
            info["perplexity"] = ppl
    info["gate"] = quality_gate(info)
    return weights, info


def save_calibration(flash_dir: Union[str, Path], weights: PredictorWeights, info: Dict[str, Any]) -> None:
    """Write ``predictors.safetensors`` then the manifest's ``predictors`` field, each atomically.
    The two share ``info["id"]``; a predictor file whose id the manifest does not name is refused
    at load, so a crash between the two writes cannot pair old cutoffs with new weights."""

    root = Path(flash_dir).expanduser()
    fresh = Manifest.load(root)  # the manifest as it is now (keeps every other field)
    fresh.predictors = dict(info)
    save_predictors(root / PREDICTOR_FILE, weights, file_id=str(info["id"]))
    fresh.checksums[PREDICTOR_FILE] = file_checksum(root / PREDICTOR_FILE)
    fresh.save(root)


def calibrate(
    flash_dir: Union[str, Path],
    *,
    sparsity: float = DEFAULT_SPARSITY,
    rank: int = DEFAULT_RANK,
    text: Optional[Union[str, Path]] = None,
    tokens: int = DEFAULT_TOKENS,
    recall: Optional[float] = None,
    epochs: int = DEFAULT_EPOCHS,
    pos_weight: float = DEFAULT_POS_WEIGHT,
    ridge: float = DEFAULT_RIDGE,
    max_new_tokens: int = DEFAULT_MAX_NEW,
    prompts: Optional[Sequence[str]] = None,
    seed: int = 0,
    dtype: Optional[str] = "float32",
    predictor_dtype: str = "float16",
    order: Optional[str] = "hot",
    split: bool = True,
    progress: Optional[ProgressCallback] = None,
) -> CalibrationReport:
    """Fit thresholds and predictors for the flash model at ``flash_dir`` and store them
    (``predictors.safetensors`` + the manifest's ``predictors`` field), then put each layer's
    neurons on disk in ``order`` (:func:`mlx_flash.neuron_order.order_flash`: ``"hot"``, the
    default, most frequently active first; ``"source"``; None keeps the folder's order).

    sparsity: target fraction of inactive FFN neurons (ignored for ReLU-family models,
        whose rule is exact: ``h != 0``).
    rank: predictor rank r.  text: optional user text file (it gets half the tokens).
    tokens: calibration tokens in all.  recall: the default recall target (cutoffs for
    every target in ``RECALL_TARGETS`` are stored; ``FlashConfig.extra["recall"]`` picks
    another at load; None: :func:`default_recall` for the model's activation).  epochs: Adam
    epochs of weighted-BCE refinement after the closed-form fit (0: none).  dtype: compute
    dtype of the dense model (float32 is much faster than bfloat16 on CPUs).  split: when
    gate-first keeps quality (held-out perplexity, :func:`gate_first_perplexity`), write the up/down side file
    (``storage.format.write_updown``: ~3/4 of ``ffn.bin`` more on disk) so that its misses
    read up/down bytes only.
    progress: ``callback(fraction, message)``; returning False cancels (``Cancelled``)
    and nothing is written.
    """

    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if recall is not None and float(recall) not in RECALL_TARGETS:
        raise ValueError(f"recall must be one of {RECALL_TARGETS}, got {recall}")
    if tokens < 64:
        raise ValueError(f"tokens must be >= 64, got {tokens}")
    t_start = time.perf_counter()
    root = Path(flash_dir).expanduser()
    files = open_flash(root)
    if recall is None:
        recall = default_recall(model_activation(files.manifest.model_args)[0])
    with numpy_blas_single_thread():  # many small matmuls: OpenBLAS's threads spin on a busy machine
        data = collect_calibration(files, text=text, tokens=tokens, max_new_tokens=max_new_tokens, prompts=prompts,
                                   seed=seed, dtype=dtype, progress=scaled(progress, 0.0, 0.6))
        weights, info = fit_predictors(files, data, sparsity=sparsity, rank=rank, recall=recall, epochs=epochs,
                                       pos_weight=pos_weight, ridge=ridge, seed=seed,
                                       predictor_dtype=predictor_dtype, progress=scaled(progress, 0.6, 0.96))
    report(progress, 0.97, "saving")  # nothing is written before this (the ordering's publish can still cancel)
    info["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    # calibration and neuron order published together (one folder build), else the calibration alone
    if order is None or order_flash(root, order, calibration=(weights, info),
                                    progress=scaled(progress, 0.97, 1.0)) is None:
        save_calibration(root, weights, info)
    if split and ((info.get("gate_first") or {}).get("perplexity") or {}).get("passed"):
        # gate-first keeps quality: its misses read up/down only (written after the order: it follows ffn.bin)
        write_updown(open_flash(root), GATE_SEGMENTS)
    report(progress, 1.0, "done")
    cal = info["calibration"]
    return CalibrationReport(
        flash_dir=str(root), sparsity=float(sparsity), rank=int(rank), recall=float(recall), tokens=int(cal["tokens"]),
        tokens_train=int(cal["train_tokens"]), tokens_val=int(cal["cutoff_tokens"]),
        tokens_test=int(cal["test_tokens"]), thresholds=info["thresholds"], cutoffs=info["cutoffs"],
        train_loss=info["train_loss"], val_loss=info["val_loss"], finetune_loss=info["finetune_loss"],
        held_out=info["held_out"], predictor_bytes=int(weights.nbytes), seconds=dict(info["seconds"]),
        sources=data.sources, samples=data.answers[:3], per_layer=dict(info.get("per_layer") or {}),
        gate_first=info.get("gate_first"), perplexity=info.get("perplexity"))


__all__ = [
    "CalibrationData",
    "CalibrationReport",
    "Collector",
    "collect_calibration",
    "fit_predictors",
    "save_calibration",
    "DEFAULT_SPARSITY",
    "DEFAULT_TOKENS",
    "CALIBRATION_VERSION",
    "calibration_problem",
    "quality_gate",
    "HookedMLP",
    "LayerFit",
    "calibrate",
    "finetune_bce",
    "fit_layer",
    "fit_low_rank",
    "install_hooks",
    "load_dense_model",
    "read_prompts",
    "thresholds_for",
    "weighted_bce",
]
