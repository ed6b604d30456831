"""Pipelined layers: the reads of layers l+1 .. l+depth are in flight while layer l computes.

``FlashConfig.pipeline`` (opt-in; off by default: the staging buffers are outside the budget, and the gain
is not proven on this machine), ``FlashConfig.pipeline_depth`` (``d``, default 1). At layer l the sparse FFN
(``sparse_ffn``) applies layer l+d's chooser (at the first layer: those of layers 1..d) to a *lookahead*
input, the hidden state it already has: layer l's FFN input, moved to layer l+d's input norm
(:func:`lookahead_map`: for an RMSNorm ``x * w[l+d] / w[l]`` is the same residual stream normalised with
layer l+d's weights; it misses the FFN outputs and attention in between). A predictor's lookahead is started
(``mx.async_eval``) before the layer's own choice, so one evaluation serves both. The neurons of that choice
that layer l+d's cache does not hold, and the non-resident ones lying in their read's coalesced gaps
(``FlashReader.covered``: read anyway; staged, a miss among them is not read again), are submitted by
:class:`Prefetcher` to the engine's own :class:`~mlx_flash.storage.reader.FlashReader` (``submit``: one
queue, one pool of read threads for the synchronous loads and the prefetch; nothing waits for a prefetch
until its layer takes it, so the disk sees the requests of ``d + 1`` layers at once, and a synchronous read
that is waited for is served first). A layer whose lookahead wants nearly all of its absent neurons
(``DENSE_LOOKAHEAD_SHARE``) stages all of them for its next ``DENSE_PASSES`` prefetches without computing a
lookahead (the predictor's product per layer is the prefetch's largest CPU cost).

The prefetch lands in a **staging buffer** (``NeuronCache.staging``: ``d + 1`` role-major ``RowStore`` s
of ``n_neurons - capacity`` rows with the cache's layout, layer j's in buffer ``j % (d + 1)``): the
reader scatters each bundle into the role matrices while copying it out of its aligned buffer, as it does
for cache rows. Like the reader's aligned buffers they are I/O buffers outside the cache budget (counted in
``Engine.resident_bytes``): the caches keep the same rows with and without the pipeline.

At layer l+d the engine runs exactly as without the pipeline: the same choice, the same ``cache.step`` on a
cache of the same capacity, the same rows in the same order and chunks, the same arithmetic. Only where a
missing neuron's bytes come from changes: a bundle found in the staging buffer is copied from there into its
cache row; an overflow chunk (streamed, not cached) staged whole is multiplied where it lies in the staging
buffer (no copy into the scratch, no read); the rest is read synchronously as before. So pipelined outputs
equal serial ones bit for bit, whatever the lookahead gets wrong; a wrong lookahead costs disk bytes
(``Stats.bytes_read`` counts every prefetched byte, ``bytes_useful`` only the ones used), a missed one a
synchronous read.

MLX arrays point into a staging buffer only while its layer computes (the layer evaluates its output before
it returns), and a buffer is written again only by a prefetch issued after that: layer l issues layer l+d's
into buffer ``(l - 1) % (d + 1)``, whose layer is done; a prefetch left in flight by an interrupted pass is
waited for before its buffer is reused.

Counted in ``FFNCounters``: ``prefetch_s`` (prefetches in flight: submit to their last request, the time
two layers' prefetches overlap counted once), ``overlap_s`` (the part of it during which the engine's thread
was not waiting for the disk, i.e. computing: disk and compute busy at once), the waits themselves in
``io_s``, ``neurons_prefetched`` / ``neurons_prefetch_used``. Per layer, the lookahead's recall against the
layer's own choice (where one was computed) and the share of the layer's missing neurons it served are in
:meth:`Prefetcher.info`. A lookahead is one more choice per layer: for the oracle (a measuring tool) a
second full gate and up product.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .neuron_cache import RowStore
from .stats import FFNCounters
from .storage.reader import FlashReader, ReadHandle, SplitRows, set_rows


@dataclass
class Staged:
    """Bundles a prefetch put into a staging buffer: ``rows[k]`` holds neuron ``ids[k]``
    (``ids`` sorted) of ``layer``; ``lookahead``: every id the lookahead chose (resident ones too), None
    when no lookahead was computed (a dense layer's every absent neuron, :meth:`Prefetcher.dense`).
    ``rows`` is the read destination (a uint8 array or a role-major ``SplitRows``); ``store`` the
    staging ``RowStore`` it belongs to (None for plain uint8 buffers): the FFN multiplies
    staged rows from there without copying them."""

    layer: int
    ids: np.ndarray
    rows: Any
    lookahead: Optional[np.ndarray]
    store: Optional[RowStore] = None

    def find(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(have, pos)``: which of ``ids`` are staged, and their staging rows (where ``have``)."""
        if not len(self.ids) or not len(ids):
            return np.zeros(len(ids), dtype=bool), np.zeros(len(ids), dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return self.ids[pos] == ids, pos

    def copy_to(self, dest, rows, pos: np.ndarray) -> None:
        """``dest[rows] = staged rows pos`` (``dest``: a read destination shaped like :attr:`rows`,
        e.g. cache rows; a run of consecutive ``pos`` is copied from a view, no gathered copy)."""
        k = len(pos)
        src: Any = pos
        if k and int(pos[-1]) - int(pos[0]) == k - 1:
            src = slice(int(pos[0]), int(pos[0]) + k)
        if isinstance(dest, SplitRows) and isinstance(self.rows, SplitRows):
            for (lo, hi, a), (lo2, hi2, b) in zip(dest.parts, self.rows.parts):
                assert (lo, hi) == (lo2, hi2), "staging rows and destination differ in layout"
                a[rows] = b[src]
        else:
            set_rows(dest, rows, self.rows[src])


#: A layer whose lookahead wants at least this share of its non-resident neurons is "dense": its next
#: ``DENSE_PASSES`` prefetches stage every non-resident neuron without computing a lookahead (a
#: predictor product per layer: on the default model at 50% the predictor's lookahead wants 98% of
#: them, and the reads' coalesced gaps hold the rest, so the same bytes are read), then the
#: lookahead is computed again. Extra bytes, where there are any, count in ``bytes_read``.
DENSE_LOOKAHEAD_SHARE = 0.9
DENSE_PASSES = 7


def lookahead_map(norm_now, norm_next) -> Optional[Tuple[mx.array, mx.array]]:
    """``(scale, shift)`` so that ``x * scale + shift`` turns the output of FFN input norm
    ``norm_now`` into what ``norm_next`` gives for the same input (RMSNorm: weights only;
    LayerNorm: weights and biases); None when the norms have no affine parameters (the
    input is used as it is). Weights near zero map to zero."""
    if norm_now is None or norm_next is None or "weight" not in norm_now or "weight" not in norm_next:
        return None
    w0 = norm_now.weight.astype(mx.float32)
    w1 = norm_next.weight.astype(mx.float32)
    ok = mx.abs(w0) > 1e-6
    scale = mx.where(ok, w1 / mx.where(ok, w0, 1.0), 0.0)
    shift = mx.zeros_like(scale)
    if "bias" in norm_now and "bias" in norm_next:
        shift = norm_next.bias.astype(mx.float32) - norm_now.bias.astype(mx.float32) * scale
    mx.eval(scale, shift)
    return scale, shift


class Prefetcher:
    """Reads the lookahead bundles of the next ``depth`` layers ahead (``FlashReader.submit``: in
    flight while the engine computes).

    reader: the engine's :class:`FlashReader` (shared: the prefetch's requests join its queue;
            the engine closes it).
    buffers: the staging buffers, ``depth + 1`` of them (layer ``j`` stages into ``buffers[j %
            len(buffers)]``): role-major ``RowStore`` s (the dense FFN: staged rows are multiplied
            where they are) or ``(rows, bundle_bytes)`` uint8 arrays (MoE experts, copied out).
    """

    def __init__(self, reader: FlashReader, buffers: Sequence[Union[RowStore, np.ndarray]], n_layers: int):
        if len(buffers) < 2:
            raise ValueError(f"a Prefetcher needs at least two staging buffers, got {len(buffers)}")
        self.reader = reader
        self.buffers = list(buffers)
        self.depth = len(self.buffers) - 1
        b0 = self.buffers[0]
        self.rows = int(b0.rows if isinstance(b0, RowStore) else b0.shape[0])
        # prefetches in flight by layer: (ids, destination, lookahead, handle)
        self._pending: Dict[int, Tuple[np.ndarray, Any, Optional[np.ndarray], ReadHandle]] = {}
        self._main_io: List[Tuple[float, float]] = []
        self._counted_to = 0.0  # prefetch wall time is counted up to here (prefetches of two layers overlap)
        n = int(n_layers)
        self.chosen = np.zeros(n, dtype=np.int64)       # ids the layer's own chooser picked (after a lookahead)
        self.foreseen = np.zeros(n, dtype=np.int64)     # ... that the lookahead had picked too
        self.needed = np.zeros(n, dtype=np.int64)       # missing ids (loaded or streamed)
        self.served = np.zeros(n, dtype=np.int64)       # ... taken from the staging buffer
        self.prefetched = np.zeros(n, dtype=np.int64)
        self.dense_left = np.zeros(n, dtype=np.int64)   # prefetches left that stage every absent neuron
        self.dense_staged = np.zeros(n, dtype=np.int64)  # prefetches that did so (no lookahead computed)

    # ----------------------------------------------------------------- engine side
    def pending(self, layer: int) -> bool:
        """A prefetch of ``layer`` is in flight (issued and not taken)."""
        return layer in self._pending

    def dense(self, layer: int) -> bool:
        """True when this prefetch of ``layer`` should stage every absent neuron without computing a
        lookahead (its recent lookahead wanted nearly all of them, :meth:`saw`); counts down the passes."""
        if self.dense_left[layer] > 0:
            self.dense_left[layer] -= 1
            return True
        return False

    def saw(self, layer: int, wanted: int, absent: int) -> None:
        """A lookahead of ``layer`` wanted ``wanted`` of its ``absent`` (non-resident) neurons: when that
        is at least ``DENSE_LOOKAHEAD_SHARE``, the next ``DENSE_PASSES`` prefetches of the layer stage
        every absent neuron without a lookahead (:meth:`dense`)."""
        if absent and wanted >= DENSE_LOOKAHEAD_SHARE * absent:
            self.dense_left[layer] = DENSE_PASSES

    def issue(self, layer: int, lookahead: Optional[np.ndarray], ids: np.ndarray) -> None:
        """Start reading neurons ``ids`` (sorted; the first ``rows`` of them) of ``layer``."""
        slot = layer % len(self.buffers)
        for lay in [k for k in self._pending if k % len(self.buffers) == slot]:  # left by an interrupted pass
            self._drop(lay)
        ids = np.asarray(ids, dtype=np.int64)[: self.rows]
        buf = self.buffers[slot]
        out = buf.dest(0, len(ids)) if isinstance(buf, RowStore) else buf[: len(ids)]
        handle = self.reader.submit(layer, ids, out)
        self._pending[layer] = (ids, out, None if lookahead is None else np.asarray(lookahead, dtype=np.int64),
                                handle)

    def take(self, layer: int, counters: FFNCounters) -> Optional[Staged]:
        """Wait for the prefetch of ``layer`` and count it; None when there is none (prefetches of
        earlier layers, left by an interrupted pass, are waited for and dropped)."""
        for lay in [k for k in self._pending if k < layer]:
            self._drop(lay)
        if layer not in self._pending:
            return None
        ids, out, look, handle = self._pending.pop(layer)
        tw = time.perf_counter()
        rs = handle.wait()
        te = time.perf_counter()
        t1 = handle.finished or te
        t0 = max(handle.started, self._counted_to)  # what an earlier layer's prefetch counted already
        counters.io_s += te - tw
        counters.bytes_read += rs.bytes_read
        counters.read_requests += rs.requests
        counters.neurons_prefetched += len(ids)
        if t1 > t0:
            counters.prefetch_s += t1 - t0
            busy_main = sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in self._main_io + [(tw, te)])
            counters.overlap_s += max(0.0, (t1 - t0) - busy_main)
            self._counted_to = t1
        first = min((h.started for _, _, _, h in self._pending.values()), default=te)
        self._main_io = [(a, b) for a, b in self._main_io if b > first]
        self.prefetched[layer] += len(ids)
        buf = self.buffers[layer % len(self.buffers)]
        return Staged(layer, ids, out, look, buf if isinstance(buf, RowStore) else None)

    def main_io(self, a: float, b: float) -> None:
        """The engine's thread read from disk during ``[a, b)`` (not compute: left out of the overlap)."""
        if self._pending:
            self._main_io.append((a, b))

    def record(self, layer: int, staged: Optional[Staged], chosen: np.ndarray, missing: int, served: int) -> None:
        """Layer ``layer`` chose ``chosen``; ``missing`` of them were not resident, ``served`` of
        those came from the staging buffer."""
        if staged is not None and staged.lookahead is not None:  # the recall, where there was a lookahead
            self.chosen[layer] += len(chosen)
            look = staged.lookahead  # sorted, unique
            if len(look) and len(chosen):
                pos = np.minimum(np.searchsorted(look, chosen), len(look) - 1)
                self.foreseen[layer] += int(np.count_nonzero(look[pos] == chosen))
        self.needed[layer] += missing
        self.served[layer] += served

    def _drop(self, layer: int) -> None:
        handle = self._pending.pop(layer)[-1]
        handle.wait()

    def drop(self) -> None:
        """Wait for the prefetches nobody took (their bytes are not counted)."""
        for lay in list(self._pending):
            self._drop(lay)

    def reset_stats(self) -> None:
        for a in (self.chosen, self.foreseen, self.needed, self.served, self.prefetched, self.dense_staged):
            a[:] = 0

    def info(self) -> dict:
        """Per layer (the first has no lookahead): the lookahead's recall against the layer's own
        choice, and the share of the layer's missing neurons the prefetch served."""
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(self.chosen > 0, self.foreseen / np.maximum(self.chosen, 1), np.nan)
            served = np.where(self.needed > 0, self.served / np.maximum(self.needed, 1), np.nan)
        ok = self.chosen > 0
        return {
            "staging_rows": self.rows,
            "depth": self.depth,
            "dense_prefetches": int(self.dense_staged.sum()),
            "lookahead_recall": [None if np.isnan(v) else round(float(v), 4) for v in recall],
            "served": [None if np.isnan(v) else round(float(v), 4) for v in served],
            "mean_lookahead_recall": (round(float(self.foreseen.sum() / self.chosen.sum()), 4)
                                      if ok.any() else None),
            "mean_served": (round(float(self.served.sum() / self.needed.sum()), 4)
                            if self.needed.sum() else None),
        }

    def close(self) -> None:
        """Wait for a prefetch in flight (the reader is the engine's: it closes it)."""
        self.drop()


def attach_pipeline(ffns, cache, reader: FlashReader, norms: Optional[Sequence[Any]] = None) -> Optional[Prefetcher]:
    """Pipelined layers for the ``SparseFFN`` layers ``ffns`` (in order) over ``cache`` (a
    ``NeuronCache`` built with ``pipeline=True``; its ``len(staging) - 1`` staging buffers set the depth
    ``d``): a Prefetcher on ``reader`` (the engine's), and each layer ``i`` told the caches of layers
    ``i+1 .. i+d`` and the lookahead maps to their input norms (``norms[i]``: layer i's FFN input norm,
    :func:`lookahead_map`; None: the input as it is). None when the cache has no staging rows
    (everything fits)."""
    if cache.staging_neurons == 0:
        return None
    pf = Prefetcher(reader, cache.staging, len(ffns))
    n = len(ffns)
    for i, f in enumerate(ffns):
        st = f._state
        st.prefetcher = pf
        st.ahead = [(j, cache.layers[j], lookahead_map(norms[i], norms[j]) if norms is not None else None)
                    for j in range(i + 1, min(n, i + 1 + pf.depth))]
    return pf


__all__ = ["Prefetcher", "Staged", "attach_pipeline", "lookahead_map"]
