"""The flash ``SwitchGLU``: routed experts from an expert cache, mlx-lm's math on the cache rows.

Each MoE layer's ``switch_mlp`` (mlx-lm's ``SwitchGLU``, called by the family's own MoE block as
``switch_mlp(x, indices)`` with the router's top-k) is swapped for :class:`FlashSwitchGLU`. Per call:

1. the router's indices are evaluated (the exact active set: no predictor);
2. the layer's expert cache (``neuron_cache.LayerCache`` with one row per expert: preallocated
   role-major rows, swap-delete, LRU / pinned hot experts) plans the distinct experts: hits,
   experts to load (contiguous new rows) and overflow (no free row);
3. missing experts are read from ``experts.bin`` straight into their rows
   (``storage.reader.FlashReader`` on the folder's ``storage_view``);
4. the indices are mapped to cache rows and mlx-lm's own ``SwitchGLU`` runs on ``(rows, out, in)``
   views of the cache (``gather_mm``; ``gather_qmm`` for quantized experts): per (token, k) pair
   the same matmuls as the dense model, so the output is the same.

When a prompt chunk routes to more distinct experts than the free rows (overflow), the layer
runs in passes: each pass makes a group of experts resident, computes the (token, k) pairs
routed to them and is evaluated before the next pass reuses the rows.
"""

from __future__ import annotations

import re
import time
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear

from ..stats import FFNCounters
from ..storage.reader import set_rows


def switch_modules(model: nn.Module) -> List[Tuple[str, SwitchGLU]]:
    """``[(path, SwitchGLU)]`` of ``model``'s expert stacks, in layer order."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, SwitchGLU)]
    return sorted(found, key=lambda nm: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", nm[0])])


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Set the submodule at dotted ``path`` (list items by index) to ``new``."""
    *parents, last = path.split(".")
    obj = model
    for p in parents:
        obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
    setattr(obj, last, new)


def _compute_glu(glu: SwitchGLU, segments, quant: dict) -> SwitchGLU:
    """A ``SwitchGLU`` with one-expert placeholders of the right kind per projection
    (``SwitchLinear`` or ``QuantizedSwitchLinear``); its weights are set to cache views per call."""
    inner = SwitchGLU.__new__(SwitchGLU)
    nn.Module.__init__(inner)
    inner.activation = glu.activation
    for role in ("gate", "up", "down"):
        out_dims, in_dims = (int(d) for d in getattr(glu, f"{role}_proj").weight.shape[1:])
        q = quant.get(role)
        if isinstance(q, dict):
            lin = QuantizedSwitchLinear.__new__(QuantizedSwitchLinear)
            nn.Module.__init__(lin)
            lin.group_size, lin.bits, lin.mode = int(q["group_size"]), int(q["bits"]), q.get("mode", "affine")
            lin.global_scale = None
        else:
            lin = SwitchLinear.__new__(SwitchLinear)
            nn.Module.__init__(lin)
        setattr(inner, f"{role}_proj", lin)
    return inner


class FlashSwitchGLU(nn.Module):
    """Drop-in for mlx-lm's ``SwitchGLU`` (same call) over an expert cache.

    layer:    MoE layer index (into the flash folder's ``layers``).
    glu:      the model's own ``SwitchGLU`` (its activation and shapes; its weights are never used).
    cache:    this layer's ``LayerCache`` (one row per expert, the bundle's segments role-major).
    reader:   a ``FlashReader`` on the folder's ``storage_view``.
    segments: the manifest's ``Segment`` list; quant: the manifest's ``quantization``.
    counters: the engine's ``FFNCounters`` ("neurons" are experts here).
    verifier: the background checksum verifier: no output from an unverified layer.
    compute_dtype: quantized experts: the activations' dtype in the expert matmuls
        (``quantized.compute_dtype``: float32 on the CPU, whose half-precision quantized kernels are
        ~10x slower here; mixed with the stored scales, promoted); the output returns in the input's
        dtype. None: the input's dtype (mlx-lm's choice; float32 models are unaffected either way).
    """

    def __init__(self, layer: int, glu: SwitchGLU, cache, reader, segments: Sequence, quant: dict,
                 counters: FFNCounters, verifier=None, compute_dtype: Optional[mx.Dtype] = None):
        super().__init__()
        # plain attributes (not parameters: load_weights must not see them)
        object.__setattr__(self, "_st", _State(layer, _compute_glu(glu, segments, quant), cache, reader,
                                               [s for s in segments if s.name != "pad"], counters, verifier,
                                               compute_dtype))

    @property
    def state(self) -> "_State":
        return self._st

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return self._st.forward(x, indices)


class _State:
    record: Optional[list]  # routing trace: each call's indices (np) when a list
    next: Optional[tuple]

    def __init__(self, layer, inner, cache, reader, segments, counters, verifier, compute_dtype):
        self.layer, self.inner, self.cache, self.reader = layer, inner, cache, reader
        self.compute_dtype = compute_dtype
        self.segments, self.counters, self.verifier = segments, counters, verifier
        self.record = None
        # lookahead prefetch (FlashConfig.pipeline; moe.engine wires it): the shared Prefetcher, and for
        # the next MoE layer (layer, router, lookahead map of this layer's input to its, its cache)
        self.prefetcher = None
        self.next = None
        self.counts = np.zeros(cache.n_neurons, dtype=np.int64)  # routed (token, k) pairs per expert
        self.tokens = 0

    def _weights(self) -> None:
        """Point the inner SwitchGLU's projections at ``(capacity, out, in)`` views of the cache rows."""
        rows, cap = self.cache.rows, self.cache.capacity
        for s in self.segments:
            role, _, kind = s.name.partition(".")
            setattr(getattr(self.inner, f"{role}_proj"), kind or "weight", rows[s.name].reshape((cap,) + s.shape))

    def forward(self, x: mx.array, indices: mx.array) -> mx.array:
        c, cache = self.counters, self.cache
        idx = np.array(indices)  # evaluates the router: the exact active set
        if self.record is not None:
            self.record.append(idx.reshape(-1, idx.shape[-1]).copy())
        np.add.at(self.counts, idx.reshape(-1), 1)
        self.tokens += idx.size // idx.shape[-1]
        remaining = np.unique(idx)
        c.neurons_active += len(remaining)
        out = None
        self._weights()
        in_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.astype(self.compute_dtype)
        pf = self.prefetcher
        staged = pf.take(self.layer, c) if pf is not None else None
        chosen = remaining
        while len(remaining):
            plan = cache.step(remaining)
            c.neurons_hit += len(plan.hit_ids)
            if len(plan.load_ids):
                try:
                    self._load(plan, staged, chosen)
                except BaseException:  # rows given to experts whose read failed: not theirs
                    cache.forget(plan.load_ids)
                    raise
                staged = None  # a later pass of the same call reads from disk
            elif pf is not None and staged is not None:
                pf.record(self.layer, staged, chosen, 0, 0)
                staged = None
            served = np.zeros(cache.n_neurons, dtype=bool)
            served[plan.hit_ids] = True
            served[plan.load_ids] = True
            if len(plan.hit_ids) + len(plan.load_ids) == 0:
                raise RuntimeError(f"MoE layer {self.layer}: the expert cache has no free row "
                                   f"(capacity {cache.capacity}, {cache.n_pinned} pinned)")
            slots = np.maximum(cache.slot_of[idx], 0).astype(np.uint32)
            t0 = time.perf_counter()
            y = self.inner(x, mx.array(slots))
            done = served[idx]
            if len(plan.overflow_ids) or out is not None:  # a pass of several: keep this pass's pairs
                m = mx.array(done)[..., None]
                y = mx.where(m, y, out) if out is not None else mx.where(m, y, mx.zeros_like(y))
                mx.eval(y)  # before the next pass reuses the rows
            out = y
            c.ffn_compute_s += time.perf_counter() - t0
            remaining = plan.overflow_ids
        if pf is not None and self.next is not None and idx.size == idx.shape[-1]:  # decoding: one token
            self._issue_next(x, self.next)
        if self.verifier is not None:
            self.verifier.check(self.layer)  # never hand on an output computed from corrupt weights
        assert out is not None  # the router chose at least one expert: the loop ran
        return out.astype(in_dtype)

    def _load(self, plan, staged, chosen: np.ndarray) -> None:
        """Fill the rows of the missing experts: from the prefetch's staging buffer where it read them
        already, the rest from disk."""
        c, ids, pf = self.counters, plan.load_ids, self.prefetcher
        have = np.zeros(len(ids), dtype=bool)
        if staged is not None:
            have, pos = staged.find(ids)
            if have.any():
                set_rows(plan.load_dest, np.flatnonzero(have), staged.rows[pos[have]])
                c.neurons_prefetch_used += int(have.sum())
            pf.record(self.layer, staged, chosen, len(ids), int(have.sum()))
        rest = np.flatnonzero(~have)
        if len(rest):
            t0 = time.perf_counter()
            rs = self.reader.read(self.layer, ids[rest], plan.load_dest, rows=rest)
            t1 = time.perf_counter()
            if pf is not None:
                pf.main_io(t0, t1)
            c.io_s += t1 - t0
            c.bytes_read += rs.bytes_read
            c.read_requests += rs.requests
        c.bytes_useful += len(ids) * self.cache.bundle_bytes
        c.neurons_loaded += len(ids)

    def _issue_next(self, x: mx.array, nxt: tuple) -> None:
        """Start reading the experts the next MoE layer's router picks from this layer's input
        (mapped to the next layer's norm), those not resident there, while this layer computes."""
        layer, router, lmap, next_cache = nxt
        t0 = time.perf_counter()
        xs = x.reshape(-1, x.shape[-1])
        if lmap is not None:
            xs = (xs.astype(mx.float32) * lmap[0] + lmap[1]).astype(x.dtype)
        logits = np.array(router(xs).astype(mx.float32)).reshape(-1)
        k = int(self.prefetcher.rows)  # the staging rows: top-k
        pred = np.sort(np.argpartition(-logits, k - 1)[:k]).astype(np.int64)
        missing = pred[next_cache.slot_of[pred] < 0]
        self.counters.predictor_s += time.perf_counter() - t0
        self.prefetcher.issue(layer, pred, missing)
