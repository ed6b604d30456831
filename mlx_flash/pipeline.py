"""Pipelined layers: the reads of layer l+1 are in flight while layer l computes.

``FlashConfig.pipeline`` (opt-in; off by default: the staging buffers are outside the budget). At layer l the
sparse FFN (``sparse_ffn``) applies layer l+1's chooser to a *lookahead* input, the hidden state it already
has: layer l's FFN input, moved to layer l+1's input norm
(:func:`lookahead_map`: for an RMSNorm ``x * w[l+1] / w[l]`` is the same residual
stream normalised with layer l+1's weights; it misses layer l's FFN output and layer
l+1's attention). The neurons of that choice that layer l+1's cache does not hold, and
the non-resident ones lying in their read's coalesced gaps (``FlashReader.covered``: read
anyway; staged, a miss among them is not read again), are submitted by :class:`Prefetcher` to
the engine's own
:class:`~mlx_flash.storage.reader.FlashReader` (``submit``: one queue, one pool of read
threads for the synchronous loads and the prefetch; nothing waits for the prefetch until
layer l+1 takes it, so the disk sees the requests of two layers at once, and a synchronous
read that is waited for is served first) into a **staging buffer**, plain host memory
(``NeuronCache.staging``; two buffers of ``n_neurons - capacity`` rows of the reader's bundles
(gate-first with its side file: up/down rows), by layer parity:
layer l's staged bundles are still being copied while layer l+1's are read). Like the
reader's aligned buffers they are I/O buffers outside the cache budget (counted in
``Engine.resident_bytes``): the caches keep the same rows with and without the pipeline.

At layer l+1 the engine runs exactly as without the pipeline: the same choice, the
same ``cache.step`` on a cache of the same capacity, the same rows, the same arithmetic. Only where a missing
neuron's bytes come from changes: a bundle found in the staging buffer is copied
from there into its cache row (or scratch row), the rest is read synchronously as
before. So pipelined outputs equal serial ones bit for bit, whatever the lookahead
gets wrong; a wrong lookahead costs disk bytes (``Stats.bytes_read`` counts every
prefetched byte, ``bytes_useful`` only the ones used), a missed one a synchronous read.

No MLX array ever points into a staging buffer (bundles are copied out on the host
at once), and the prefetch never writes cache rows, so MLX's lazy evaluation needs
no extra synchronisation: a buffer is reused two layers later, after its bundles
were copied, and the next prefetch into it is issued only after the previous one
into it was taken.

Counted in ``FFNCounters``: ``prefetch_s`` (the prefetch in flight: submit to its last request), ``overlap_s``
(the part of it during which the engine's thread was not waiting for the disk,
i.e. computing: disk and compute busy at once), the waits themselves in ``io_s``,
``neurons_prefetched`` / ``neurons_prefetch_used``. Per layer, the lookahead's recall
against the layer's own choice and the share of the layer's missing neurons it
served are in :meth:`Prefetcher.info`. A lookahead is one more choice per layer: for
the oracle (a measuring tool) a second full gate and up product.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .stats import FFNCounters
from .storage.reader import FlashReader, ReadHandle


@dataclass
class Staged:
    """Bundles a prefetch put into a staging buffer: ``rows[k]`` holds neuron ``ids[k]``
    (``ids`` sorted) of ``layer``; ``lookahead``: every id the lookahead chose (resident ones too)."""

    layer: int
    ids: np.ndarray
    rows: np.ndarray
    lookahead: np.ndarray

    def find(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(have, pos)``: which of ``ids`` are staged, and their staging rows (where ``have``)."""
        if not len(self.ids) or not len(ids):
            return np.zeros(len(ids), dtype=bool), np.zeros(len(ids), dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return self.ids[pos] == ids, pos


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
    """Reads one layer's lookahead bundles ahead (``FlashReader.submit``: in flight while the
    engine computes).

    reader: the engine's :class:`FlashReader` (shared: the prefetch's requests join its queue;
            the engine closes it).
    buffers: the two staging buffers (``(rows, bundle_bytes)`` uint8 each).
    """

    def __init__(self, reader: FlashReader, buffers: List[np.ndarray], n_layers: int):
        self.reader = reader
        self.buffers = buffers
        self.rows = int(buffers[0].shape[0])
        self._pending: Optional[Tuple[int, np.ndarray, np.ndarray, np.ndarray, ReadHandle]] = None
        self._main_io: List[Tuple[float, float]] = []
        n = int(n_layers)
        self.chosen = np.zeros(n, dtype=np.int64)       # ids the layer's own chooser picked (after a lookahead)
        self.foreseen = np.zeros(n, dtype=np.int64)     # ... that the lookahead had picked too
        self.needed = np.zeros(n, dtype=np.int64)       # missing ids (loaded or streamed)
        self.served = np.zeros(n, dtype=np.int64)       # ... taken from the staging buffer
        self.prefetched = np.zeros(n, dtype=np.int64)

    # ----------------------------------------------------------------- engine side
    def issue(self, layer: int, lookahead: np.ndarray, ids: np.ndarray) -> None:
        """Start reading neurons ``ids`` (sorted; the first ``rows`` of them) of ``layer``."""
        self.drop()
        ids = np.asarray(ids, dtype=np.int64)[: self.rows]
        out = self.buffers[layer % 2][: len(ids)]
        handle = self.reader.submit(layer, ids, out)
        self._main_io = []
        self._pending = (layer, ids, out, np.asarray(lookahead, dtype=np.int64), handle)

    def take(self, layer: int, counters: FFNCounters) -> Optional[Staged]:
        """Wait for the prefetch of ``layer`` and count it; None when there is none (a
        prefetch for another layer, left by an interrupted pass, is waited for and dropped)."""
        if self._pending is None:
            return None
        lay, ids, out, look, handle = self._pending
        self._pending = None
        tw = time.perf_counter()
        rs = handle.wait()
        te = time.perf_counter()
        t0, t1 = handle.started, handle.finished or te
        counters.io_s += te - tw
        counters.prefetch_s += t1 - t0
        counters.bytes_read += rs.bytes_read
        counters.read_requests += rs.requests
        counters.neurons_prefetched += len(ids)
        busy_main = sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in self._main_io + [(tw, te)])
        counters.overlap_s += max(0.0, (t1 - t0) - busy_main)
        self._main_io = []
        if lay != layer:
            return None
        self.prefetched[layer] += len(ids)
        return Staged(lay, ids, out, look)

    def main_io(self, a: float, b: float) -> None:
        """The engine's thread read from disk during ``[a, b)`` (not compute: left out of the overlap)."""
        if self._pending is not None:
            self._main_io.append((a, b))

    def record(self, layer: int, staged: Optional[Staged], chosen: np.ndarray, missing: int, served: int) -> None:
        """Layer ``layer`` chose ``chosen``; ``missing`` of them were not resident, ``served`` of
        those came from the staging buffer."""
        if staged is not None:  # the lookahead's recall is measured where there was a lookahead
            self.chosen[layer] += len(chosen)
            self.foreseen[layer] += int(np.count_nonzero(np.isin(chosen, staged.lookahead, assume_unique=True)))
        self.needed[layer] += missing
        self.served[layer] += served

    def drop(self) -> None:
        """Wait for a prefetch nobody took (its bytes are not counted)."""
        if self._pending is not None:
            handle = self._pending[-1]
            self._pending = None
            handle.wait()

    def reset_stats(self) -> None:
        for a in (self.chosen, self.foreseen, self.needed, self.served, self.prefetched):
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


def attach_pipeline(ffns, cache, reader: FlashReader,
                    maps: Optional[List[Optional[Tuple[mx.array, mx.array]]]] = None) -> Optional[Prefetcher]:
    """Pipelined layers for the ``SparseFFN`` layers ``ffns`` (in order) over ``cache`` (a
    ``NeuronCache`` built with ``pipeline=True``): a Prefetcher on ``reader`` (the engine's), and each
    layer told the next layer's cache and its lookahead map (``maps[i]``:
    layer i's input to layer i+1's, :func:`lookahead_map`; None: as it is). None when the cache
    has no staging rows (everything fits)."""
    if cache.staging_neurons == 0:
        return None
    pf = Prefetcher(reader, cache.staging, len(ffns))
    for i, f in enumerate(ffns):
        st = f._state
        st.prefetcher = pf
        if i + 1 < len(ffns):
            st.next_cache = cache.layers[i + 1]
            st.lookahead_map = maps[i] if maps is not None else None
    return pf


__all__ = ["Prefetcher", "Staged", "attach_pipeline", "lookahead_map"]
