"""DRAM neuron management: "LLM in a Flash" (arXiv 2312.11514) Section 3.3, Fig. 6.

Each layer owns preallocated rows (:class:`RowStore`, ``LayerCache.rows``) for
``capacity`` neurons. Slot ``s`` holds the neuron in it: with the model's bundle
layout the rows are role-major, one matrix per role (``rows["gate"][s]`` =
``gate_proj.weight[i, :]``, ``rows["up"][s]``, ``rows["down"][s]`` =
``down_proj.weight[:, i]``, per-neuron biases), so the FFN multiplies contiguous
matrices; without a layout one ``(capacity, bundle_elems)`` matrix of whole
bundles (``LayerCache.storage``). The first ``n_used`` slots are live, the rest
free. Zero-copy writable ``uint8`` numpy views of the same memory are what the
flash reader fills (it scatters each bundle's parts into the role matrices as it
copies out of its aligned read buffer), so loading a neuron is one read straight
into the matrices the FFN multiplies with. Nothing is reallocated per token:

* **delete** = copy the last live row into the freed slot (swap-delete), so the
  live rows stay the contiguous prefix ``[0, n_used)``;
* **insert** = append at ``n_used``: a token's new neurons get one contiguous
  range of rows, which the reader fills in one call.

Eviction order, per token (``LayerCache.step``):

1. neurons outside the sliding window (not active in the last ``window`` tokens,
   this one included), least recently used first;
2. if that is not enough room, least-recently-used neurons that are still inside
   the window (counted as ``forced_evictions``: the budget is too small for the
   window);
3. neurons active in this token and pinned neurons are never evicted. If the
   token's missing neurons still do not fit, the highest-priority ones are cached
   and the rest are returned as ``overflow``: the caller streams them through the
   shared scratch buffer (``NeuronCache.scratch``) without caching them.

Ties (same last use) are broken by neuron id, so the cache is deterministic.

Eviction is **lazy** by default: a neuron outside the window is only deleted
when its row is needed. The paper deletes every neuron that leaves the window at
once; keeping them until the memory is wanted costs nothing (the rows are
preallocated anyway) and turns some later misses into hits. Since outside-window
neurons are always the least recently used, lazy eviction is exactly LRU over
the non-pinned, non-active neurons; ``window`` then only decides which evictions
count as forced. ``lazy=False`` gives the paper's eager behaviour (the resident
set is then at most the union of the last ``window`` tokens' active sets plus
the pinned neurons), useful to reproduce the paper's memory numbers.

Policies (``CachePolicy``; ``FlashConfig.policy``). Every policy runs on the
same storage (preallocated rows per layer, swap-delete + append) under the
same budget; they differ in which neurons may occupy the rows:

* ``window``: the paper's eager sliding window (``lazy=False``).
* ``lru``: the lazy window above, i.e. LRU over the non-active neurons.
* ``hot``: per layer, the ``capacity`` neurons most often active on the
  calibration text (``hot_ids`` of the calibrated ``frequencies``) are pinned and
  fill every row; other active neurons are never cached: they stream through the
  scratch buffer each token (``overflow``). No evictions, no moves.
* ``hot+window``: the top ``hot_fraction`` of each layer's rows are pinned hot
  neurons, the other rows run the lazy window (LRU) for everything else.

``NeuronCache.apply_policy`` sets a policy on every layer (eviction mode + pins)
and hands back the rows to fill from disk. ``simulate`` replays per-token active
sets through a real ``LayerCache`` with one-byte bundles (the same code, not a
model of it) and returns its counters (``SimStats``), optionally with the disk bytes
the reads would cost (``ReadModel``: the reader's own request planning);
``choose_hot_fraction`` runs it for several hot fractions (0 = ``lru`` … 1 = ``hot``)
and keeps the best measured hit rate (ties: the smaller fraction).

Under ``FlashConfig.policy = "auto"`` the engine picks the fraction by measurement
(``resolve_auto_policy``): a simulation on sequences sampled
independently per token from the calibrated frequencies (``sample_active_sets``),
adjusted to what the chooser picks (``chosen_frequencies``: the predictor's
held-out recall and predicted fraction; at recall 0.99 the default model's
predictor picks ~96% of the neurons, not the 65% truly active). Independent
sampling is a faithful stand-in because, measured on the default model, shuffling
the token order leaves the window reuse unchanged: reuse comes from the frequency
skew, not from temporal locality.

The engine ranks the simulated fractions by the bytes the reads cost, not by hit
rate. Under independent tokens pinning the most frequent neurons always wins on
hit rate, but the disk pays per 4 KiB block and coalesced gap: on the default model
at a 50% budget every policy hits ~47%, yet ``hot`` reads ~150 MB per token and
``lru`` ~104 MB. ``hot`` streams the neurons scattered between its pinned ones;
``lru`` gives the rows to the missing neurons in id order, so what it streams is
the high-id tail, contiguous ranges. (Checked on the default model at 25/50/75%
budgets: the simulated hit rates and bytes per token order the policies as the
real runs do, and ``auto`` picks the measured best, ``lru``.)

Synchronisation: ``step``/``pin`` move bytes in the rows through the host
views at once, while MLX evaluates lazily. Evaluate every computation that reads
the rows (or the scratch buffer) before the next ``step``/``pin``/scratch
fill on them; the engine evaluates once per token and once per scratch chunk.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .config import FlashConfig
from .storage.reader import SplitRows, coalesced_runs

BundleLayout = Union[Sequence[Tuple[str, int, int, Union[str, mx.Dtype]]], Mapping[str, Union[Tuple[int, int], int]]]
"""A bundle's roles as the cache's rows take them: ``storage.format.bundle_segments``' list of
``(name, byte_start, byte_stop, dtype)``, or ``storage.format.bundle_layout``'s dict of element
ranges (see :func:`_segments`)."""

_NEVER = np.iinfo(np.int64).min // 4  # "last used" of a neuron never active: -inf


@dataclass
class StepPlan:
    """What a token (or a ``pin``) needs from the cache, with row numbers into ``storage``.

    ``hit_ids[k]`` is resident in row ``hit_slots[k]``. ``load_ids[k]`` was given
    row ``load_slots[k]`` (a contiguous range ``load_start .. load_start+n``); the
    caller must fill ``load_dest[k]`` (a writable uint8 view of those rows, or a
    :class:`~mlx_flash.storage.reader.SplitRows` for role-major rows) with that
    neuron's bundle, e.g. ``reader.read(layer, load_ids, load_dest)``.
    ``overflow_ids`` are active but not cached (stream them through scratch).
    Ids are int64, slots int32; ``load_ids`` and ``overflow_ids`` are sorted.
    """

    hit_ids: np.ndarray
    hit_slots: np.ndarray
    load_ids: np.ndarray
    load_slots: np.ndarray
    load_dest: np.ndarray
    overflow_ids: np.ndarray

    @property
    def load_start(self) -> int:
        return int(self.load_slots[0]) if len(self.load_slots) else 0

    @property
    def active_ids(self) -> np.ndarray:
        """Cached active ids, in the order of ``active_slots`` (hits, then loads)."""
        return np.concatenate([self.hit_ids, self.load_ids])

    @property
    def active_slots(self) -> np.ndarray:
        """Rows of ``active_ids`` (for ``mx.take(rows[role], slots, axis=0)``)."""
        return np.concatenate([self.hit_slots, self.load_slots])


@dataclass
class CacheStats:
    """Cumulative counters of one layer's cache (or the sum over layers)."""

    steps: int = 0
    hits: int = 0              # active neurons found resident
    misses: int = 0            # active neurons loaded into the cache
    overflow: int = 0          # active neurons that did not fit (streamed)
    evictions: int = 0
    forced_evictions: int = 0  # evicted while still inside the window
    moves: int = 0             # rows copied by swap-delete
    bytes_loaded: int = 0      # misses * bundle_bytes
    overflow_bytes: int = 0    # overflow * bundle_bytes
    preload_bytes: int = 0     # loaded by ``pin`` (setup, not per token)

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses + overflow); 1.0 before any activity."""
        total = self.hits + self.misses + self.overflow
        return self.hits / total if total else 1.0

    def __add__(self, other: "CacheStats") -> "CacheStats":
        return CacheStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        return d


def _host_view(a: mx.array) -> np.ndarray:
    """A writable uint8 numpy view sharing ``a``'s memory (``a`` must be evaluated)."""
    host = np.array(a.view(mx.uint8), copy=False)
    if not (host.flags.writeable and host.flags.c_contiguous):  # pragma: no cover
        raise RuntimeError("MLX array memory is not a writable contiguous buffer")
    return host


def _segments(bundle_elems: int, dtype: mx.Dtype,
              layout: Optional[BundleLayout]) -> List[Tuple[str, int, int, mx.Dtype]]:
    """``[(name, byte_start, byte_stop, dtype)]`` in bundle order, tiling the bundle's bytes.

    ``layout`` is ``storage.format.bundle_segments``'s list (byte ranges with their own
    dtypes: a quantized role is three matrices, ``role`` uint32 words, ``role.scales``,
    ``role.biases``), or ``storage.format.bundle_layout``'s dict (role -> (start, stop)
    elements of ``dtype``, or an int index for a per-neuron bias); None gives one
    segment, ``"bundle"``, of ``bundle_elems`` elements of ``dtype``."""
    sz = dtype.size
    if layout is None:
        return [("bundle", 0, bundle_elems * sz, dtype)]
    if isinstance(layout, Mapping):
        segs = sorted(((r, v * sz, (v + 1) * sz, dtype) if isinstance(v, int) else
                       (r, int(v[0]) * sz, int(v[1]) * sz, dtype) for r, v in layout.items()), key=lambda t: t[1])
        total = bundle_elems * sz
    else:
        segs = [(str(r), int(a), int(b), getattr(mx, d) if isinstance(d, str) else d) for r, a, b, d in layout]
        total = segs[-1][2] if segs else 0
    edge = 0
    for _r, a, b, d in segs:
        if a != edge or b <= a or (b - a) % d.size:
            raise ValueError(f"bundle layout {layout} does not tile the bundle")
        edge = b
    if edge != total:
        raise ValueError(f"bundle layout covers {edge} of {total} bytes")
    return segs


class RowStore:
    """Preallocated neuron rows, **role-major**: one ``(rows, width)`` MLX matrix per
    bundle role (``gate``, ``up``, ``down``, per-neuron biases), each with a writable
    uint8 numpy view of the same memory. Row ``s`` of every matrix belongs to the
    same neuron. Compared with one ``(rows, bundle_elems)`` bundle matrix, the FFN
    multiplies contiguous matrices instead of strided column slices (measured on the
    2-core CPU, 1,000 of 1,536 neurons, bfloat16: 4.5 ms gathered from a bundle
    matrix, 3.5 ms gathered role-major, 2.2 ms over a role-major resident prefix).

    The flash reader fills rows through :meth:`dest` (a :class:`SplitRows` that
    scatters each bundle's bytes into the role matrices while copying out of its
    aligned buffer); :meth:`move` copies rows (swap-delete). Without a layout there
    is one role, ``"bundle"``, and :meth:`dest` is a plain uint8 row view.

    ``drop``: segment names read from disk but not kept (a gate-first chooser holds
    every gate row already: ``gate``, ``gate.scales``, ``gate.biases``, ``gate_bias``).
    ``bundle_bytes`` stays the on-disk bundle (what a read fills); ``kept_bytes`` is
    what a row weighs in memory.
    """

    def __init__(self, rows: int, bundle_elems: int, dtype: mx.Dtype, layout: Optional[BundleLayout] = None,
                 drop: Sequence[str] = ()):
        self.rows = int(rows)
        self.bundle_elems = int(bundle_elems)
        self.dtype = dtype
        self.segments = _segments(self.bundle_elems, dtype, layout)
        self.bundle_bytes = self.segments[-1][2]
        self.drop = frozenset(drop)
        unknown = self.drop - {r for r, _, _, _ in self.segments}
        if unknown or len(self.drop) >= len(self.segments):
            raise ValueError(f"cannot drop {sorted(self.drop)} from bundle segments "
                             f"{[r for r, _, _, _ in self.segments]}")
        self.kept = [seg for seg in self.segments if seg[0] not in self.drop]
        self.kept_bytes = sum(b - a for _, a, b, _ in self.kept)
        self.mats: Dict[str, mx.array] = {}
        self.hosts: Dict[str, np.ndarray] = {}
        for role, a, b, dt in self.kept:
            m = mx.zeros((self.rows, (b - a) // dt.size), dt)
            mx.eval(m)
            self.mats[role] = m
            self.hosts[role] = _host_view(m)
        self._single = len(self.segments) == 1

    @property
    def nbytes(self) -> int:
        return self.rows * self.kept_bytes

    def __getitem__(self, role: str) -> mx.array:
        return self.mats[role]

    def move(self, dest: np.ndarray, src: np.ndarray) -> None:
        """Copy rows ``src`` to rows ``dest`` in every role matrix."""
        for h in self.hosts.values():
            h[dest] = h[src]

    def dest(self, start: int, k: int):
        """Rows ``start .. start+k`` as a read destination of shape ``(k, bundle_bytes)``."""
        if self._single:
            return self.hosts[self.segments[0][0]][start : start + k]

        return SplitRows([(a, b, self.hosts[r][start : start + k] if r in self.hosts else None)
                          for r, a, b, _ in self.segments], k, self.bundle_bytes)

    def row_bytes(self, rows) -> np.ndarray:
        """The kept bytes of the bundles in ``rows`` as ``(len, kept_bytes)`` uint8 (a copy; for tests)."""
        rows = np.asarray(rows)
        return np.concatenate([self.hosts[r][rows] for r, _, _, _ in self.kept], axis=1)

    def check(self) -> None:
        for role, m in self.mats.items():
            assert self.hosts[role].ctypes.data == _host_view(m).ctypes.data, "storage reallocated"


class LayerCache:
    """One layer's resident neurons: a preallocated bundle matrix plus numpy bookkeeping.

    Args:
        n_neurons: FFN width (intermediate size) of the layer.
        capacity: rows of ``storage`` (most neurons resident at once); may be 0.
        bundle_elems: elements per bundle (``3 * hidden``).
        dtype: MLX dtype of the weights.
        window: sliding window k in tokens (>= 1), this token included.
        lazy: evict outside-window neurons only when their rows are needed.
        layout: the bundle's roles (``storage.format.bundle_segments``, or the element layout
            ``storage.format.bundle_layout`` of float bundles): the rows are then
            kept role-major (:class:`RowStore`); None keeps whole bundles in one matrix.
    """

    def __init__(
        self,
        n_neurons: int,
        capacity: int,
        bundle_elems: int,
        dtype: mx.Dtype,
        window: int = 5,
        lazy: bool = True,
        layout: Optional[BundleLayout] = None,
        drop: Sequence[str] = (),
    ):
        if n_neurons < 1 or bundle_elems < 1:
            raise ValueError("n_neurons and bundle_elems must be >= 1")
        if not 0 <= capacity:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.n_neurons = int(n_neurons)
        self.capacity = int(min(capacity, n_neurons))
        self.bundle_elems = int(bundle_elems)
        self.dtype = dtype
        self.window = int(window)
        self.lazy = bool(lazy)

        self.rows = RowStore(self.capacity, self.bundle_elems, dtype, layout, drop)
        # Bytes a resident neuron weighs (real bytes: quantized bundles weigh what they hold; without
        # the dropped gate rows of a gate-first chooser).
        self.bundle_bytes = self.rows.kept_bytes

        self.slot_ids = np.full(self.capacity, -1, dtype=np.int32)
        self.slot_of = np.full(self.n_neurons, -1, dtype=np.int32)
        self.last_used = np.full(self.n_neurons, _NEVER, dtype=np.int64)
        self.pinned = np.zeros(self.n_neurons, dtype=bool)
        self.n_pinned = 0
        self._pos = np.zeros(self.n_neurons, dtype=np.int64)  # scratch for duplicate checks
        self.n_used = 0
        self.t = 0  # step counter: the current token is step t (first token: 1)
        self.stats = CacheStats()

    # ------------------------------------------------------------------ sizes
    @property
    def storage(self) -> mx.array:
        """The bundle matrix ``(capacity, bundle_elems)`` of a cache without a layout."""
        if "bundle" not in self.rows.mats:
            raise AttributeError("a role-major cache has no bundle matrix: use .rows[role]")
        return self.rows.mats["bundle"]

    @property
    def resident_bytes(self) -> int:
        return self.n_used * self.bundle_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.capacity * self.bundle_bytes

    @property
    def hit_rate(self) -> float:
        return self.stats.hit_rate

    @property
    def resident_ids(self) -> np.ndarray:
        return self.slot_ids[: self.n_used].astype(np.int64)

    def reset_stats(self) -> None:
        self.stats = CacheStats()

    # ------------------------------------------------------------ primitives
    def _ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids):
            if ids.min() < 0 or ids.max() >= self.n_neurons:
                raise IndexError(f"neuron ids must be in [0, {self.n_neurons})")
            ar = np.arange(len(ids))
            self._pos[ids] = ar
            if not np.array_equal(self._pos[ids], ar):
                raise ValueError("neuron ids must be unique")
        return ids

    def _evict(self, victims: np.ndarray) -> None:
        """Swap-delete ``victims`` (resident ids): the last live rows that survive fill the holes."""
        m = len(victims)
        if m == 0:
            return
        n, new_n = self.n_used, self.n_used - m
        holes = self.slot_of[victims]
        self.slot_of[victims] = -1
        tail = self.slot_ids[new_n:n]
        movers = new_n + np.flatnonzero(self.slot_of[tail] >= 0)  # live rows past the new end
        dest = np.sort(holes[holes < new_n])  # as many as movers
        if len(movers):
            self.rows.move(dest, movers)
            moved = self.slot_ids[movers]
            self.slot_ids[dest] = moved
            self.slot_of[moved] = dest
        self.slot_ids[new_n:n] = -1
        self.n_used = new_n
        self.stats.evictions += m
        self.stats.moves += len(movers)
        self.stats.forced_evictions += int(np.count_nonzero(self.last_used[victims] > self.t - self.window))

    def _make_room(self, need: int, keep_current: bool = True) -> None:
        """Evict so that ``need`` rows are free (or as close as possible), plus, when
        eager, every neuron outside the window. Never evicts pinned neurons, nor
        (with ``keep_current``) neurons active at the current step."""
        n = self.n_used
        short = need - (self.capacity - n)
        if short <= 0 and self.lazy:
            return
        res = self.slot_ids[:n].astype(np.int64)
        lu = self.last_used[res]
        ok = ~self.pinned[res]
        if keep_current:
            ok &= lu < self.t
        cand, lu = res[ok], lu[ok]
        m = max(short, 0)
        if not self.lazy:
            m = max(m, int(np.count_nonzero(lu <= self.t - self.window)))
        m = min(m, len(cand))
        if m == 0:
            return
        if m < len(cand):
            key = np.maximum(lu, 0) * self.n_neurons + cand  # LRU, ties by id: unique keys
            cand = cand[np.argpartition(key, m - 1)[:m]]
        self._evict(cand)

    def _append(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        start, k = self.n_used, len(ids)
        slots = np.arange(start, start + k, dtype=np.int32)
        self.slot_ids[start : start + k] = ids
        self.slot_of[ids] = slots
        self.n_used = start + k
        return slots, self.rows.dest(start, k)

    # ------------------------------------------------------------------- API
    def step(self, active_ids: np.ndarray, priority: Optional[np.ndarray] = None) -> StepPlan:
        """Plan one token: advance the window, evict, and give missing neurons rows.

        ``active_ids`` are this token's active neurons (unique, any order);
        ``priority`` (same length, optional) decides which missing neurons get the
        rows when not all fit (highest first; without it: the given order).
        """
        ids = self._ids(active_ids)
        self.t += 1
        self.last_used[ids] = self.t
        hit_mask = self.slot_of[ids] >= 0
        missing = ids[~hit_mask]

        if self.n_pinned < self.capacity:
            self._make_room(len(missing))
        # else every row holds a pinned neuron ("hot" policy): nothing can be evicted,
        # free == 0 and all missing neurons are overflow.
        free = self.capacity - self.n_used
        overflow = missing[:0]
        if len(missing) > free:
            if priority is not None:
                pri = np.asarray(priority, dtype=np.float64).reshape(-1)
                if len(pri) != len(ids):
                    raise ValueError("priority must have one value per active id")
                missing = missing[np.argsort(-pri[~hit_mask], kind="stable")]
            missing, overflow = missing[:free], np.sort(missing[free:])
        load_ids = np.sort(missing)
        load_slots, load_dest = self._append(load_ids)
        hit_ids = ids[hit_mask]
        hit_slots = self.slot_of[hit_ids]  # after eviction: survivors may have moved

        s = self.stats
        s.steps += 1
        s.hits += len(hit_ids)
        s.misses += len(load_ids)
        s.overflow += len(overflow)
        s.bytes_loaded += len(load_ids) * self.bundle_bytes
        s.overflow_bytes += len(overflow) * self.bundle_bytes
        return StepPlan(hit_ids, hit_slots, load_ids, load_slots, load_dest, overflow)

    def pin(self, ids: np.ndarray) -> StepPlan:
        """Make ``ids`` resident and never evictable (a static resident part / hot neurons).

        Returns the plan for the ones not yet resident: fill ``load_dest`` as after
        ``step``. Does not advance the window. Pinning more neurons than
        ``capacity`` in total is an error (ValueError; nothing changes).
        """
        ids = self._ids(ids)
        total = int(np.count_nonzero(self.pinned)) + int(np.count_nonzero(~self.pinned[ids]))
        if total > self.capacity:
            raise ValueError(f"cannot pin {total} neurons in a cache of capacity {self.capacity}")
        hit_mask = self.slot_of[ids] >= 0
        missing = np.sort(ids[~hit_mask])
        self.pinned[ids] = True  # before eviction: protects the resident ones
        self.n_pinned = total
        self._make_room(len(missing), keep_current=False)
        assert self.capacity - self.n_used >= len(missing)
        load_slots, load_dest = self._append(missing)
        hit_ids = ids[hit_mask]
        self.stats.preload_bytes += len(missing) * self.bundle_bytes
        return StepPlan(hit_ids, self.slot_of[hit_ids], missing, load_slots, load_dest, missing[:0])

    def unpin(self, ids: np.ndarray) -> None:
        """Let ``ids`` be evicted again (they stay resident until their rows are needed)."""
        self.pinned[self._ids(ids)] = False
        self.n_pinned = int(np.count_nonzero(self.pinned))

    def forget(self, ids: np.ndarray) -> None:
        """Drop the resident neurons ``ids`` whose rows cannot be trusted (their read failed after
        :meth:`step` gave them rows): swap-delete and unpin them, so a later token reads them again."""
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[self.slot_of[ids] >= 0]
        self.pinned[ids] = False
        self.n_pinned = int(np.count_nonzero(self.pinned))
        self._evict(ids)

    def clear(self) -> None:
        """Empty the cache: no resident or pinned neurons, window restarted. Keeps stats."""
        self.slot_ids[:] = -1
        self.slot_of[:] = -1
        self.last_used[:] = _NEVER
        self.pinned[:] = False
        self.n_pinned = 0
        self.n_used = 0
        self.t = 0

    def check_invariants(self) -> None:
        """Raise AssertionError when the bookkeeping is inconsistent (for tests)."""
        n = self.n_used
        assert 0 <= n <= self.capacity, (n, self.capacity)
        live = self.slot_ids[:n].astype(np.int64)
        assert np.all(self.slot_ids[n:] == -1), "free slots must hold -1"
        assert np.all((live >= 0) & (live < self.n_neurons)), "live slot ids out of range"
        assert len(np.unique(live)) == n, "duplicate neuron in storage"
        assert np.array_equal(self.slot_of[live], np.arange(n, dtype=np.int32)), "slot_of != slot_ids"
        assert np.count_nonzero(self.slot_of >= 0) == n, "slot_of points at a neuron not in storage"
        assert np.all(self.slot_of[self.pinned] >= 0), "a pinned neuron is not resident"
        assert self.n_pinned == np.count_nonzero(self.pinned) <= self.capacity, "n_pinned out of date"
        assert self.resident_bytes <= self.capacity_bytes
        self.rows.check()


class NeuronCache:
    """The LayerCaches of all layers, plus the scratch buffer they share, under one budget.

    ``scratch`` (a :class:`RowStore` of ``scratch_neurons`` rows, with the layers'
    layout) streams the overflow neurons of a token chunk by chunk; layers run one
    after another, so one buffer serves all.
    """

    def __init__(self, layers: List[LayerCache], scratch_neurons: int, budget_bytes: Optional[int] = None,
                 layout: Optional[BundleLayout] = None, staging_neurons: int = 0, drop: Sequence[str] = (),
                 staging_buffers: int = 2):
        if not layers:
            raise ValueError("a NeuronCache needs at least one layer")
        first = layers[0]
        self.layers = layers
        self.bundle_elems = first.bundle_elems
        self.bundle_bytes = first.bundle_bytes
        self.dtype = first.dtype
        self.scratch_neurons = int(scratch_neurons)
        self.scratch = RowStore(self.scratch_neurons, self.bundle_elems, self.dtype, layout, drop)
        self._layout, self._drop = layout, tuple(drop)
        # pipelined layers (mlx_flash.pipeline): ``staging_buffers`` (the depth + 1) RowStores of the cache's
        # layout that the prefetch reads into (the reader scatters its bundles into their role matrices, the
        # rows a gate-first cache drops are dropped there too): the FFN multiplies streamed neurons in place
        self.staging_neurons = int(staging_neurons)
        self.staging = [RowStore(self.staging_neurons, self.bundle_elems, self.dtype, layout, drop)
                        for _ in range(max(2, int(staging_buffers)) if self.staging_neurons else 0)]
        self.budget_bytes = budget_bytes if budget_bytes is not None else self.capacity_bytes
        self.policy = CachePolicy("lru" if first.lazy else "window")

    @classmethod
    def from_budget(
        cls,
        n_layers: int,
        n_neurons: int,
        bundle_elems: int,
        bundle_bytes: int,
        dtype: mx.Dtype,
        budget_bytes: int,
        window: int = 5,
        scratch_neurons: int = FlashConfig.scratch_neurons,
        lazy: bool = True,
        layout: Optional[BundleLayout] = None,
        pipeline: bool = False,
        drop: Sequence[str] = (),
        pipeline_depth: int = 1,
    ) -> "NeuronCache":
        """Split ``budget_bytes`` into the scratch buffer and equal per-layer caches; with
        ``pipeline``, ``pipeline_depth + 1`` staging buffers of ``n_neurons - capacity`` rows (outside
        the budget).

        ``drop``: bundle segments read but not kept (``RowStore``); rows then weigh less
        and more of them fit.

        The scratch holds ``min(scratch_neurons, n_neurons)`` neurons, or none when
        the whole FFN fits in the budget (nothing can overflow then). Raises
        ValueError when the budget cannot hold the scratch plus one neuron per layer.
        """
        want = _segments(bundle_elems, dtype, layout)[-1][2]
        if bundle_bytes != want:
            raise ValueError(f"bundle_bytes {bundle_bytes} != {want}, the bytes of the bundle layout")
        budget_bytes = int(budget_bytes)
        bundle_bytes = RowStore(0, bundle_elems, dtype, layout, drop).kept_bytes  # what a row weighs in memory
        capacity, scratch = split_budget(budget_bytes, bundle_bytes, n_layers, n_neurons, scratch_neurons)
        scratch_bytes = scratch * bundle_bytes
        minimum = scratch_bytes + n_layers * bundle_bytes
        if budget_bytes < minimum:
            raise ValueError(
                f"FFN memory budget of {budget_bytes} bytes is too small: it must hold the scratch buffer "
                f"({scratch} neurons, {scratch_bytes} bytes) plus one neuron per layer "
                f"({n_layers} x {bundle_bytes} bytes); the minimum budget is {minimum} bytes"
            )
        # Pipelined layers: staging rows for what one layer's cache cannot hold. They are I/O buffers
        # (like the reader's aligned buffers), outside the cache budget: the caches keep the same rows
        # with and without the pipeline, so the arithmetic, and the outputs, stay the same bit for bit.
        staging = n_neurons - capacity if pipeline and n_layers > 1 else 0
        layers = [LayerCache(n_neurons, capacity, bundle_elems, dtype, window, lazy, layout, drop)
                  for _ in range(n_layers)]
        return cls(layers, scratch, budget_bytes, layout, staging_neurons=staging, drop=drop,
                   staging_buffers=int(pipeline_depth) + 1)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerCache:
        return self.layers[layer]

    @property
    def scratch_bytes(self) -> int:
        return self.scratch_neurons * self.bundle_bytes

    @property
    def staging_bytes(self) -> int:
        """The staging buffers of pipelined layers (0 without the pipeline; outside the budget)."""
        return sum(s.nbytes for s in self.staging)

    @property
    def prefill_neurons(self) -> int:
        """Rows of :meth:`prefill_rows`: the most neurons of one layer that a token using every
        neuron finds neither resident nor room for (``n_neurons - capacity``)."""
        return max(c.n_neurons - c.capacity for c in self.layers)

    def prefill_rows(self) -> Optional[RowStore]:
        """A new, transient :class:`RowStore` (the cache's layout) for exact prefill: one layer's
        non-resident neurons, read in one large read and multiplied in one batch instead of
        streamed through ``scratch`` in chunks. Like the pipeline's staging buffers it is an
        I/O buffer outside the budget (the cache keeps the same rows, so the outputs stay the
        same); the engine holds it only while a prompt is read. None when every layer holds its
        whole FFN."""
        k = self.prefill_neurons
        return RowStore(k, self.bundle_elems, self.dtype, self._layout, self._drop) if k else None

    @property
    def resident_bytes(self) -> int:
        """Bytes of live cached neurons (the scratch buffer not included)."""
        return sum(c.resident_bytes for c in self.layers)

    @property
    def capacity_bytes(self) -> int:
        """Preallocated bytes: every layer's storage plus the scratch buffer (<= budget)."""
        return sum(c.capacity_bytes for c in self.layers) + self.scratch_bytes

    @property
    def stats(self) -> CacheStats:
        """Counters summed over layers."""
        total = CacheStats()
        for c in self.layers:
            total = total + c.stats
        return total

    @property
    def hit_rate(self) -> float:
        return self.stats.hit_rate

    def reset_stats(self) -> None:
        for c in self.layers:
            c.reset_stats()

    def clear(self) -> None:
        for c in self.layers:
            c.clear()

    def apply_policy(
        self,
        policy: Union["CachePolicy", str],
        frequencies: Optional[np.ndarray] = None,
        fill: Optional[Callable[[int, StepPlan], Any]] = None,
    ) -> List[np.ndarray]:
        """Run every layer under ``policy``: its eviction mode, and its hot neurons pinned.

        ``frequencies`` (num_layers, n): how often each neuron is active (calibration);
        needed when the policy pins (``hot``, ``hot+window``). Earlier pins are released
        first. ``fill(layer, plan)`` must load the pinned rows that are not resident yet
        (``reader.read(layer, plan.load_ids, plan.load_dest)``); their bytes count as
        ``CacheStats.preload_bytes``, not as misses. Returns the pinned ids per layer.
        """
        pol = policy if isinstance(policy, CachePolicy) else CachePolicy.make(policy)
        freqs = None
        if pol.hot_fraction > 0:
            if frequencies is None:
                raise ValueError(f"cache policy {pol.name!r} pins the most frequently active neurons: "
                                 "it needs calibrated neuron frequencies")
            freqs = np.asarray(frequencies, dtype=np.float64)
            want = (len(self.layers), self.layers[0].n_neurons)
            if freqs.shape != want:
                raise ValueError(f"frequencies have shape {freqs.shape}, expected {want}")
        pinned = []
        for i, c in enumerate(self.layers):
            c.lazy = pol.lazy
            if c.n_pinned:
                c.unpin(np.flatnonzero(c.pinned))
            k = pol.pinned_rows(c.capacity)
            ids = hot_ids(freqs[i], k) if k and freqs is not None else np.empty(0, dtype=np.int64)
            plan = c.pin(ids)
            if fill is not None and len(plan.load_ids):
                fill(i, plan)
            pinned.append(ids)
        self.policy = pol
        return pinned


# ----------------------------------------------------------------------------- policies
POLICY_NAMES = ("window", "lru", "hot", "hot+window")
"""The cache policies (``FlashConfig.policy`` adds "auto": chosen at load)."""
DEFAULT_HOT_FRACTION = 0.5
"""``hot+window`` without a fraction: half of each layer's rows pinned."""
HOT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
"""The pinned shares ``choose_hot_fraction`` compares (0 = ``lru``, 1 = ``hot``)."""


@dataclass(frozen=True)
class CachePolicy:
    """Which neurons may occupy a layer's rows.

    name: ``window`` (eager sliding window), ``lru`` (lazy window), ``hot`` (every
        row pinned with the most frequently active neurons; the rest stream),
        ``hot+window`` (``hot_fraction`` of the rows pinned, the rest lazy window).
    hot_fraction: share of each layer's capacity pinned with hot neurons
        (0 for ``window``/``lru``, 1 for ``hot``).
    """

    name: str = "lru"
    hot_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in POLICY_NAMES:
            raise ValueError(f"cache policy must be one of {POLICY_NAMES}, got {self.name!r}")
        f = float(self.hot_fraction)
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"hot_fraction must be in [0, 1], got {self.hot_fraction}")
        if self.name in ("window", "lru") and f != 0.0:
            raise ValueError(f"cache policy {self.name!r} pins nothing (hot_fraction 0), got {f}")
        if self.name == "hot" and f != 1.0:
            raise ValueError(f"cache policy 'hot' pins every row (hot_fraction 1), got {f}; use 'hot+window'")

    @classmethod
    def make(cls, name: str, hot_fraction: Optional[float] = None) -> "CachePolicy":
        """``name`` with its natural fraction when ``hot_fraction`` is None (hot: 1,
        hot+window: ``DEFAULT_HOT_FRACTION``, window/lru: 0)."""
        if hot_fraction is None:
            hot_fraction = {"hot": 1.0, "hot+window": DEFAULT_HOT_FRACTION}.get(name, 0.0)
        return cls(name, float(hot_fraction))

    @classmethod
    def from_fraction(cls, hot_fraction: float) -> "CachePolicy":
        """The policy that pins ``hot_fraction`` of the rows: 0 → lru, 1 → hot, else hot+window."""
        f = float(hot_fraction)
        if f <= 0.0:
            return cls("lru", 0.0)
        if f >= 1.0:
            return cls("hot", 1.0)
        return cls("hot+window", f)

    @property
    def lazy(self) -> bool:
        """Eviction mode of the unpinned rows (only ``window`` is eager)."""
        return self.name != "window"

    def pinned_rows(self, capacity: int) -> int:
        """Rows pinned in a layer of ``capacity`` rows."""
        return int(min(capacity, max(0, np.floor(self.hot_fraction * capacity + 0.5))))

    def to_dict(self) -> dict:
        return {"name": self.name, "hot_fraction": self.hot_fraction}


def hot_ids(frequencies: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most frequently active neurons of one layer (ties: lower id), sorted."""
    f = np.asarray(frequencies, dtype=np.float64).reshape(-1)
    k = int(min(max(k, 0), len(f)))
    if k == 0:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.argsort(-f, kind="stable")[:k]).astype(np.int64)


def sample_active_sets(frequencies: np.ndarray, tokens: int, seed: int = 0) -> np.ndarray:
    """``tokens`` synthetic active sets of one layer, each neuron active independently
    with its frequency (Bernoulli): a (tokens, n) bool matrix for ``simulate``."""
    f = np.asarray(frequencies, dtype=np.float64).reshape(-1)
    return np.random.default_rng(seed).random((int(tokens), len(f))) < f


def chosen_frequencies(frequencies: np.ndarray, density: Optional[float] = None, recall: float = 1.0) -> np.ndarray:
    """How often the engine's chooser picks each neuron, from how often it is truly active.

    A chooser that finds a ``recall`` share of each neuron's activations and pads its
    choice with inactive neurons up to a mean ``density`` (the predictor: its held-out
    recall and predicted fraction, measured at calibration) picks neuron i with
    probability ``recall * f_i + q * (1 - f_i)``, ``q`` set so the mean is ``density``;
    a sparser choice (the oracle's top-k at a higher sparsity) scales ``f`` down.
    ``density`` None: the frequencies as they are (the oracle at the calibrated thresholds).
    """
    f = np.clip(np.asarray(frequencies, dtype=np.float64), 0.0, 1.0)
    if density is None:
        return f
    density = float(np.clip(density, 0.0, 1.0))
    m = float(f.mean())
    base, bm = recall * f, recall * m
    if density >= bm:
        q = (density - bm) / max(1e-12, 1.0 - m)
        return np.clip(base + q * (1.0 - f), 0.0, 1.0)
    return base * (density / max(bm, 1e-12))


def _iter_sets(active_sets):
    if isinstance(active_sets, np.ndarray) and active_sets.dtype == bool:
        if active_sets.ndim != 2:
            raise ValueError(f"a boolean active-set matrix must be (tokens, n), got shape {active_sets.shape}")
        for row in active_sets:
            yield np.flatnonzero(row)
    else:
        for a in active_sets:
            a = np.asarray(a)
            yield np.flatnonzero(a) if a.dtype == bool else a.astype(np.int64, copy=False)


def split_budget(budget_bytes: int, row_bytes: int, n_layers: int, n_neurons: int,
                 scratch_neurons: int) -> Tuple[int, int]:
    """``(rows per layer, scratch rows)`` of a cache of ``budget_bytes`` with rows of ``row_bytes``
    (:meth:`NeuronCache.from_budget`'s split): no scratch when the whole FFN fits, else
    ``min(scratch_neurons, n_neurons)`` scratch rows and the rest in equal per-layer caches
    (at most every neuron; 0 when the scratch alone fills the budget)."""
    scratch = 0 if budget_bytes >= n_layers * n_neurons * row_bytes else max(0, min(int(scratch_neurons), n_neurons))
    capacity = max(0, min((budget_bytes - scratch * row_bytes) // n_layers // row_bytes, n_neurons))
    return int(capacity), int(scratch)


def scratch_rows(room_bytes: int, row_bytes: int, scratch_neurons: int) -> int:
    """The streaming scratch the engine gives a cache of ``room_bytes``: ``scratch_neurons``
    (``FlashConfig.scratch_neurons``), at most an eighth of the room (small models, small budgets),
    at least 8."""
    return min(int(scratch_neurons), max(8, room_bytes // 8 // row_bytes))


def cache_rows(budget_bytes: int, taken: int, row_bytes: int, n_layers: int, n_neurons: int,
               scratch_neurons: int) -> Tuple[int, int]:
    """``(rows per layer, scratch rows)`` of the neuron cache the engine makes from an FFN budget of
    ``budget_bytes`` of which ``taken`` is resident (predictors, gate rows, group scales): the
    room left, its scratch (:func:`scratch_rows`) and :func:`split_budget`. ``engine.choose_active``
    and the bench's replay size their simulated caches with it."""
    room = budget_bytes - taken
    return split_budget(room, row_bytes, n_layers, n_neurons, scratch_rows(room, row_bytes, scratch_neurons))


def stream_chunk_rows(scratch_rows: int) -> int:
    """Neurons per overflow read: half the scratch buffer (``SparseFFN`` double-buffers it, the
    next chunk is read while this one computes); a one-row scratch reads one at a time."""
    return scratch_rows // 2 if scratch_rows >= 2 else max(1, scratch_rows)


@dataclass(frozen=True)
class ReadModel:
    """How the flash reader turns a read of neuron ids into disk bytes, for ``simulate``.

    The same coalescing as ``FlashReader`` (``storage.reader.coalesced_runs``):
    bundles aligned to ``alignment``, neighbours closer than ``max_gap_bytes``
    merged (the gap is read too). Overflow is read in one piece when it fits the scratch, else
    streams in reads of :attr:`stream_rows` ids (half of ``scratch_neurons``), as ``SparseFFN`` does.
    Layer regions start at aligned offsets, so offset 0 stands for any layer. Splitting runs into
    ``chunk_bytes`` requests does not change the bytes (except a chunk wholly inside a gap, which the reader skips:
    only possible when ``chunk_bytes < max_gap_bytes``; counted here).
    """

    bundle_bytes: int
    alignment: int = 4096
    max_gap_bytes: int = 16 * 1024
    chunk_bytes: int = 1 << 20
    scratch_neurons: int = FlashConfig.scratch_neurons

    @classmethod
    def of_reader(cls, reader, scratch_neurons: int) -> "ReadModel":
        return cls(reader.bundle_bytes, reader.alignment, reader.max_gap_bytes, reader.chunk_bytes,
                   max(1, int(scratch_neurons)))

    @property
    def stream_rows(self) -> int:
        """Neurons per overflow read (:func:`stream_chunk_rows` of the scratch)."""
        return stream_chunk_rows(self.scratch_neurons)

    def bytes_read(self, ids: np.ndarray, breaks: Optional[np.ndarray] = None) -> int:
        """Disk bytes of reading the distinct ids ``ids`` (sorted) in one ``reader.read``;
        ``breaks``: indices where a separate read call starts (ids sorted within each)."""
        if len(ids) == 0:
            return 0

        starts = np.asarray(ids, dtype=np.int64) * self.bundle_bytes
        lo, hi = coalesced_runs(starts, self.bundle_bytes, self.alignment, self.max_gap_bytes, breaks)
        return int((hi - lo).sum())

    def step_bytes(self, plan: StepPlan) -> int:
        """Disk bytes of one token: the loads in one read, the overflow in one (when it fits the scratch)
        or in reads of :attr:`stream_rows`."""
        n_load, n_over = len(plan.load_ids), len(plan.overflow_ids)
        k = max(1, n_over) if n_over <= self.scratch_neurons else self.stream_rows
        breaks = np.arange(n_load, n_load + len(plan.overflow_ids), k)
        return self.bytes_read(np.concatenate([plan.load_ids, plan.overflow_ids]), breaks)


@dataclass
class SimStats(CacheStats):
    """``CacheStats`` of a simulation, plus the disk bytes its reads would cost
    (with a ``ReadModel``; 0 without)."""

    bytes_read: int = 0

    @property
    def bytes_read_per_token(self) -> float:
        return self.bytes_read / self.steps if self.steps else 0.0

    def __add__(self, other: CacheStats) -> "SimStats":
        return SimStats(**{f.name: getattr(self, f.name) + getattr(other, f.name, 0) for f in fields(self)})


def simulate(
    active_sets,
    n_neurons: int,
    capacity: int,
    policy: Union[CachePolicy, str] = "lru",
    window: int = 5,
    frequencies: Optional[np.ndarray] = None,
    hot_fraction: Optional[float] = None,
    warmup: int = 0,
    read_model: Optional[ReadModel] = None,
) -> SimStats:
    """Replay one layer's per-token active sets through a real ``LayerCache`` (one-byte
    bundles, nothing read) and return its counters.

    ``active_sets``: a (tokens, n) bool matrix or a sequence of id (or bool mask) arrays.
    ``policy``: a ``CachePolicy`` or a name (with ``hot_fraction`` as in
    ``CachePolicy.make``); pinning policies need the layer's ``frequencies`` (n,).
    ``warmup``: tokens replayed before counting (``preload_bytes`` is kept).
    ``read_model``: also count the disk bytes the reads would cost (``bytes_read``):
    the hit rate alone misses that scattered ids cost whole aligned blocks and gaps.
    """
    pol = policy if isinstance(policy, CachePolicy) else CachePolicy.make(policy, hot_fraction)
    c = LayerCache(n_neurons, capacity, 1, mx.uint8, window, pol.lazy)
    k = pol.pinned_rows(c.capacity)
    if k:
        if frequencies is None:
            raise ValueError(f"simulating cache policy {pol.name!r} needs the neurons' frequencies")
        c.pin(hot_ids(frequencies, k))
    nbytes = 0
    for t, ids in enumerate(_iter_sets(active_sets)):
        if warmup and t == warmup:
            pre = c.stats.preload_bytes
            c.reset_stats()
            c.stats.preload_bytes = pre
            nbytes = 0
        plan = c.step(ids)
        if read_model is not None:
            nbytes += read_model.step_bytes(plan)
    return SimStats(**asdict(c.stats), bytes_read=nbytes)


OBJECTIVES = ("hit_rate", "bytes_read")


def simulate_fractions(
    active_sets,
    n_neurons: int,
    capacity: int,
    frequencies: np.ndarray,
    window: int = 5,
    fractions: Sequence[float] = HOT_FRACTIONS,
    warmup: int = 0,
    read_model: Optional[ReadModel] = None,
) -> Dict[float, SimStats]:
    """``simulate`` with ``CachePolicy.from_fraction(f)`` (0 = lru, 1 = hot) for each f.

    One layer: ``active_sets`` as in ``simulate`` and ``frequencies`` (n,). Several
    layers: ``frequencies`` (layers, n) and ``active_sets`` one sequence per layer
    (their counters are pooled).
    """
    freqs = np.asarray(frequencies, dtype=np.float64)
    if freqs.ndim == 1:
        layers = [(active_sets, freqs)]
    else:
        sets = list(active_sets)
        if len(sets) != len(freqs):
            raise ValueError(f"{len(sets)} layers of active sets for {len(freqs)} layers of frequencies")
        layers = list(zip(sets, freqs))
    if not len(fractions):
        raise ValueError("no hot fractions to compare")
    out: Dict[float, SimStats] = {}
    for f in fractions:
        pol = CachePolicy.from_fraction(f)
        total = SimStats()
        for s_, fr in layers:
            total = total + simulate(s_, n_neurons, capacity, pol, window, fr, warmup=warmup, read_model=read_model)
        out[float(f)] = total
    return out


def pick_fraction(stats: Mapping[float, CacheStats], objective: str = "hit_rate", tol: Optional[float] = None) -> float:
    """The best fraction of a ``simulate_fractions`` table; near-ties go to the smaller one.

    ``hit_rate``: highest hit rate, ties within ``tol`` (absolute, default 0.001).
    ``bytes_read``: fewest bytes read (needs a ``ReadModel``), ties within ``tol``
    (relative, default 0.01).
    """
    if objective == "hit_rate":
        score = {f: st.hit_rate for f, st in stats.items()}
        best = max(score.values())
        tol = 1e-3 if tol is None else tol
        return min(f for f, v in score.items() if v >= best - tol)
    if objective == "bytes_read":
        score = {f: float(getattr(st, "bytes_read", 0)) for f, st in stats.items()}
        best = min(score.values())
        tol = 0.01 if tol is None else tol
        return min(f for f, v in score.items() if v <= best * (1 + tol))
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def choose_hot_fraction(
    active_sets,
    n_neurons: int,
    capacity: int,
    frequencies: np.ndarray,
    window: int = 5,
    fractions: Sequence[float] = HOT_FRACTIONS,
    warmup: int = 0,
    tol: Optional[float] = None,
    objective: str = "hit_rate",
    read_model: Optional[ReadModel] = None,
) -> Tuple[float, Dict[float, float]]:
    """The pinned share with the best simulated hit rate, and the table ``{fraction: hit rate}``.

    Measured, not guessed: ``simulate_fractions`` replays ``active_sets`` (one layer, or
    one sequence per layer with 2-D ``frequencies``) for each fraction. Hit rates within
    ``tol`` of the best are a tie: the smaller fraction wins (fewer pinned rows, less
    preloading, more room for the window). ``objective="bytes_read"`` (with a
    ``read_model``) ranks by the disk bytes the reads cost instead (``pick_fraction``).
    """
    if objective == "bytes_read" and read_model is None:
        raise ValueError("objective 'bytes_read' needs a read_model")
    stats = simulate_fractions(active_sets, n_neurons, capacity, frequencies, window, fractions, warmup, read_model)
    return pick_fraction(stats, objective, tol), {f: st.hit_rate for f, st in stats.items()}


AUTO_TOKENS = 200
AUTO_LAYERS = 4
AUTO_WARMUP = 20


@dataclass(frozen=True)
class PolicyInfo:
    """The neuron cache policy a flash engine runs, and why (``Engine.policy_info``).

    The choice (``resolve_auto_policy``, or the MoE engine's): the policy's ``name`` and
    ``hot_fraction``, the ``reason`` and its ``source`` ("default", "config", "simulated":
    the dense engine's simulation, "simulation": the MoE engine's); a simulation adds the
    simulated ``hit_rates`` per pinned fraction, and the dense engine's its ``objective``,
    the simulated ``layers``, the ``chosen_fraction`` of neurons per token,
    ``bytes_read_per_token`` (with a read model) and its ``seconds``. Applying it at load
    adds what was ``asked``, the ``window``, the per-layer ``capacity``, the rows ``pinned``,
    their ``preload_bytes`` and ``load_seconds``; the engine then adds how it computes
    (``compute_dtype``, ``ffn_quantization``, ``pipeline``, ``staging_neurons``; MoE:
    ``experts_per_layer``, ``top_k``, ``num_experts``, ``moe_layers``, ``expert_bytes``,
    ``expert_quantization``). Unset fields are None; ``to_dict`` leaves them out (JSON records).
    """

    name: str
    hot_fraction: float
    reason: str
    source: str
    hit_rates: Optional[Dict[float, float]] = None
    objective: Optional[str] = None
    layers: Optional[Tuple[int, ...]] = None
    chosen_fraction: Optional[float] = None
    bytes_read_per_token: Optional[Dict[float, float]] = None
    seconds: Optional[float] = None
    asked: Optional[str] = None
    window: Optional[int] = None
    capacity: Optional[int] = None
    pinned: Optional[int] = None
    preload_bytes: Optional[int] = None
    load_seconds: Optional[float] = None
    compute_dtype: Optional[str] = None
    ffn_quantization: Optional[Dict[str, str]] = None
    pipeline: Optional[bool] = None
    staging_neurons: Optional[int] = None
    experts_per_layer: Optional[int] = None
    top_k: Optional[int] = None
    num_experts: Optional[int] = None
    moe_layers: Optional[int] = None
    expert_bytes: Optional[int] = None
    expert_quantization: Optional[Dict[str, str]] = None

    @classmethod
    def of(cls, policy: CachePolicy, reason: str, source: str, **kw: Any) -> "PolicyInfo":
        """``policy`` chosen for ``reason`` (from ``source``), with any further fields."""
        return cls(name=policy.name, hot_fraction=policy.hot_fraction, reason=reason, source=source, **kw)

    def to_dict(self) -> Dict[str, Any]:
        """The set fields as a plain dict (the speed test's JSON records)."""
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in fields(self) if (v := getattr(self, f.name)) is not None}


def resolve_auto_policy(
    frequencies: Optional[np.ndarray],
    capacity: int,
    window: int = 5,
    *,
    hot_fraction: Optional[float] = None,
    read_model: Optional[ReadModel] = None,
    density: Optional[float] = None,
    recall: float = 1.0,
    tokens: int = AUTO_TOKENS,
    n_layers: int = AUTO_LAYERS,
    warmup: int = AUTO_WARMUP,
    seed: int = 0,
) -> Tuple[CachePolicy, PolicyInfo]:
    """``FlashConfig.policy == "auto"``: the policy for per-layer ``capacity``, and why.

    No ``frequencies`` (uncalibrated model): ``lru``. A given ``hot_fraction``: that
    share pinned. Else ``simulate_fractions`` on ``tokens`` synthetic tokens (``sample_active_sets``:
    independent per token, from ``chosen_frequencies(frequencies, density, recall)``:
    what the chooser picks, not only the truly active neurons) of ``n_layers`` evenly
    spaced layers, ranked by the bytes
    the reads cost when a ``read_model`` is given (what the disk pays: scattered
    streamed ids cost whole blocks and coalesced gaps), else by hit rate. The info
    record (:class:`PolicyInfo`) has name, hot_fraction, reason, source and, when measured, hit_rates (and
    bytes_read_per_token: one layer's simulated reads).
    """
    def done(pol: CachePolicy, reason: str, source: str, **kw) -> Tuple[CachePolicy, PolicyInfo]:
        return pol, PolicyInfo.of(pol, reason, source, **kw)

    if frequencies is None:
        return done(CachePolicy("lru"), "no calibrated neuron frequencies (run `mlx-flash calibrate`): "
                    "the lazy window", "default")
    freqs = np.asarray(frequencies, dtype=np.float64)
    n = freqs.shape[-1]
    if hot_fraction is not None:
        return done(CachePolicy.from_fraction(hot_fraction), f"hot fraction {hot_fraction:g} was given", "config")
    if capacity >= n:
        return done(CachePolicy("lru"), "every neuron fits in the cache: nothing to choose", "default")
    if capacity <= 0:
        return done(CachePolicy("lru"), "the cache has no rows: every neuron streams", "default")
    t0 = time.perf_counter()
    L = freqs.shape[0] if freqs.ndim == 2 else 1
    freqs = chosen_frequencies(freqs.reshape(L, n), density, recall)
    layers = np.unique(np.linspace(0, L - 1, min(n_layers, L)).round().astype(int))
    sets = [sample_active_sets(freqs[i], tokens + warmup, seed + int(i)) for i in layers]
    stats = simulate_fractions(sets, n, capacity, freqs[layers], window, warmup=warmup, read_model=read_model)
    objective = "hit_rate" if read_model is None else "bytes_read"
    f = pick_fraction(stats, objective)
    hit = {k: v.hit_rate for k, v in stats.items()}
    kw: Dict[str, Any] = {"hit_rates": hit, "objective": objective, "layers": tuple(int(i) for i in layers),
                          "chosen_fraction": round(float(freqs.mean()), 4)}
    how = f"hit rate {hit[f]:.1%} (lru {hit.get(0.0, float('nan')):.1%}, hot {hit.get(1.0, float('nan')):.1%})"
    if read_model is not None:
        per = {k: v.bytes_read / max(1, v.steps) for k, v in stats.items()}
        kw["bytes_read_per_token"] = per
        how = (f"fewest bytes read, {per[f] / 1e3:.0f} kB per layer-token (lru {per.get(0.0, 0) / 1e3:.0f}, "
               f"hot {per.get(1.0, 0) / 1e3:.0f}); {how}")
    kw["seconds"] = round(time.perf_counter() - t0, 4)
    return done(CachePolicy.from_fraction(f),
                f"simulated {tokens} tokens on {len(layers)} layers, each neuron chosen independently with its "
                f"calibrated frequency ({freqs.mean():.0%} chosen per token): {f:.0%} of the rows pinned gives the "
                f"{how}", "simulated", **kw)
