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

Synchronisation: ``step``/``pin`` move bytes in the rows through the host
views at once, while MLX evaluates lazily. Evaluate every computation that reads
the rows (or the scratch buffer) before the next ``step``/``pin``/scratch
fill on them; the engine evaluates once per token and once per scratch chunk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

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


def _segments(bundle_elems: int, layout: Optional[dict]) -> List[Tuple[str, int, int]]:
    """``[(role, start, stop)]`` in bundle order, tiling ``[0, bundle_elems)``. ``layout``
    is ``storage.format.bundle_layout``'s dict (role -> (start, stop), or an int index
    for a per-neuron bias); None gives one segment, ``"bundle"``."""
    if layout is None:
        return [("bundle", 0, bundle_elems)]
    segs = sorted(((r, v, v + 1) if isinstance(v, int) else (r, int(v[0]), int(v[1]))
                   for r, v in layout.items()), key=lambda t: t[1])
    edge = 0
    for r, a, b in segs:
        if a != edge or b <= a:
            raise ValueError(f"bundle layout {layout} does not tile {bundle_elems} elements")
        edge = b
    if edge != bundle_elems:
        raise ValueError(f"bundle layout covers {edge} of {bundle_elems} elements")
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
    """

    def __init__(self, rows: int, bundle_elems: int, dtype: mx.Dtype, layout: Optional[dict] = None):
        self.rows = int(rows)
        self.bundle_elems = int(bundle_elems)
        self.dtype = dtype
        self.bundle_bytes = self.bundle_elems * dtype.size
        self.segments = _segments(self.bundle_elems, layout)
        self.mats: Dict[str, mx.array] = {}
        self.hosts: Dict[str, np.ndarray] = {}
        for role, a, b in self.segments:
            m = mx.zeros((self.rows, b - a), dtype)
            mx.eval(m)
            self.mats[role] = m
            self.hosts[role] = _host_view(m)
        self._single = len(self.segments) == 1

    @property
    def nbytes(self) -> int:
        return self.rows * self.bundle_bytes

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
        from .storage.reader import SplitRows

        sz = self.dtype.size
        return SplitRows([(a * sz, b * sz, self.hosts[r][start : start + k]) for r, a, b in self.segments],
                         k, self.bundle_bytes)

    def row_bytes(self, rows) -> np.ndarray:
        """The bundles in ``rows`` as ``(len, bundle_bytes)`` uint8 (a copy; for tests)."""
        rows = np.asarray(rows)
        return np.concatenate([self.hosts[r][rows] for r, _, _ in self.segments], axis=1)

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
        layout: the bundle's roles (``storage.format.bundle_layout``): the rows are then
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
        layout: Optional[dict] = None,
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
        self.bundle_bytes = self.bundle_elems * dtype.size
        self.window = int(window)
        self.lazy = bool(lazy)

        self.rows = RowStore(self.capacity, self.bundle_elems, dtype, layout)

        self.slot_ids = np.full(self.capacity, -1, dtype=np.int32)
        self.slot_of = np.full(self.n_neurons, -1, dtype=np.int32)
        self.last_used = np.full(self.n_neurons, _NEVER, dtype=np.int64)
        self.pinned = np.zeros(self.n_neurons, dtype=bool)
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

        self._make_room(len(missing))
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
        self._make_room(len(missing), keep_current=False)
        assert self.capacity - self.n_used >= len(missing)
        load_slots, load_dest = self._append(missing)
        hit_ids = ids[hit_mask]
        self.stats.preload_bytes += len(missing) * self.bundle_bytes
        return StepPlan(hit_ids, self.slot_of[hit_ids], missing, load_slots, load_dest, missing[:0])

    def unpin(self, ids: np.ndarray) -> None:
        """Let ``ids`` be evicted again (they stay resident until their rows are needed)."""
        self.pinned[self._ids(ids)] = False

    def clear(self) -> None:
        """Empty the cache: no resident or pinned neurons, window restarted. Keeps stats."""
        self.slot_ids[:] = -1
        self.slot_of[:] = -1
        self.last_used[:] = _NEVER
        self.pinned[:] = False
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
        assert self.resident_bytes <= self.capacity_bytes
        self.rows.check()


class NeuronCache:
    """The LayerCaches of all layers, plus the scratch buffer they share, under one budget.

    ``scratch`` (a :class:`RowStore` of ``scratch_neurons`` rows, with the layers'
    layout) streams the overflow neurons of a token chunk by chunk; layers run one
    after another, so one buffer serves all.
    """

    def __init__(self, layers: List[LayerCache], scratch_neurons: int, budget_bytes: Optional[int] = None,
                 layout: Optional[dict] = None):
        if not layers:
            raise ValueError("a NeuronCache needs at least one layer")
        first = layers[0]
        self.layers = layers
        self.bundle_elems = first.bundle_elems
        self.bundle_bytes = first.bundle_bytes
        self.dtype = first.dtype
        self.scratch_neurons = int(scratch_neurons)
        self.scratch = RowStore(self.scratch_neurons, self.bundle_elems, self.dtype, layout)
        self.budget_bytes = budget_bytes if budget_bytes is not None else self.capacity_bytes

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
        scratch_neurons: int = 256,
        lazy: bool = True,
        layout: Optional[dict] = None,
    ) -> "NeuronCache":
        """Split ``budget_bytes`` into the scratch buffer and equal per-layer caches.

        The scratch holds ``min(scratch_neurons, n_neurons)`` neurons, or none when
        the whole FFN fits in the budget (nothing can overflow then). Raises
        ValueError when the budget cannot hold the scratch plus one neuron per layer.
        """
        if bundle_bytes != bundle_elems * dtype.size:
            raise ValueError(f"bundle_bytes {bundle_bytes} != bundle_elems {bundle_elems} * {dtype.size} bytes")
        budget_bytes = int(budget_bytes)
        full = n_layers * n_neurons * bundle_bytes
        scratch = 0 if budget_bytes >= full else max(0, min(int(scratch_neurons), n_neurons))
        scratch_bytes = scratch * bundle_bytes
        minimum = scratch_bytes + n_layers * bundle_bytes
        if budget_bytes < minimum:
            raise ValueError(
                f"FFN memory budget of {budget_bytes} bytes is too small: it must hold the scratch buffer "
                f"({scratch} neurons, {scratch_bytes} bytes) plus one neuron per layer "
                f"({n_layers} x {bundle_bytes} bytes); the minimum budget is {minimum} bytes"
            )
        capacity = min((budget_bytes - scratch_bytes) // n_layers // bundle_bytes, n_neurons)
        layers = [LayerCache(n_neurons, capacity, bundle_elems, dtype, window, lazy, layout)
                  for _ in range(n_layers)]
        return cls(layers, scratch, budget_bytes, layout)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerCache:
        return self.layers[layer]

    @property
    def scratch_bytes(self) -> int:
        return self.scratch_neurons * self.bundle_bytes

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
