"""Tests for mlx_flash.neuron_cache: swap-delete storage, window, budget, pinning."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash.neuron_cache import CacheStats, LayerCache, NeuronCache, StepPlan

DTYPES = [mx.float16, mx.bfloat16, mx.float32]


def _bundles(n_neurons: int, elems: int, dtype: mx.Dtype, seed: int = 0):
    """A distinct bundle per neuron id: (mx rows, their uint8 bytes)."""
    rows = mx.array(np.random.default_rng(seed).standard_normal((n_neurons, elems)).astype(np.float32))
    rows = rows + mx.arange(n_neurons)[:, None]  # make every id's row different
    rows = rows.astype(dtype)
    mx.eval(rows)
    return rows, np.array(rows.view(mx.uint8))


def _fill(plan: StepPlan, ref_bytes: np.ndarray) -> None:
    """What the flash reader does: write each loaded neuron's bundle into its row."""
    plan.load_dest[:] = ref_bytes[plan.load_ids]


def _random_active(rng, n: int, hi: int) -> np.ndarray:
    return rng.choice(n, size=int(rng.integers(0, hi + 1)), replace=False)


def _check_storage(c: LayerCache, ref: mx.array) -> None:
    live = c.slot_ids[: c.n_used].astype(np.int64)
    if len(live) == 0:
        return
    got = mx.take(c.storage, mx.arange(c.n_used), axis=0)
    want = mx.take(ref, mx.array(live), axis=0)
    assert np.array_equal(np.array(got.view(mx.uint8)), np.array(want.view(mx.uint8)))


# ---------------------------------------------------------------- host view
@pytest.mark.parametrize("dtype", DTYPES)
def test_host_view_writes_into_storage(dtype):
    c = LayerCache(n_neurons=8, capacity=4, bundle_elems=6, dtype=dtype)
    assert c.rows.hosts["bundle"].shape == (4, 6 * dtype.size) and c.rows.hosts["bundle"].dtype == np.uint8
    ref, ref_bytes = _bundles(8, 6, dtype)
    plan = c.step(np.array([5, 2]))
    assert plan.load_dest.shape == (2, c.bundle_bytes)
    _fill(plan, ref_bytes)
    got = mx.take(c.storage, mx.array(plan.active_slots), axis=0)
    assert mx.array_equal(got, ref[mx.array(plan.active_ids)]).item()
    # and the matrix is usable for compute directly
    x = mx.ones((1, 6), dtype)
    assert mx.allclose(x @ got.T, x @ ref[mx.array(plan.active_ids)].T).item()


# ------------------------------------------------------------ swap-delete
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("lazy", [True, False])
def test_swap_delete_keeps_rows_and_maps(dtype, lazy):
    rng = np.random.default_rng(1)
    n, cap = 50, 20
    c = LayerCache(n, cap, bundle_elems=8, dtype=dtype, window=3, lazy=lazy)
    ref, ref_bytes = _bundles(n, 8, dtype)
    for t in range(400):
        plan = c.step(_random_active(rng, n, 30))  # sometimes bigger than capacity
        _fill(plan, ref_bytes)
        c.check_invariants()
        assert np.array_equal(c.slot_of[plan.hit_ids], plan.hit_slots)
        assert np.array_equal(c.slot_of[plan.load_ids], plan.load_slots)
        if len(plan.active_ids):  # what the FFN computes with: the rows of exactly these neurons
            got = mx.take(c.storage, mx.array(plan.active_slots), axis=0)
            assert mx.array_equal(got, mx.take(ref, mx.array(plan.active_ids), axis=0)).item()
        if t % 20 == 0:
            _check_storage(c, ref)
    _check_storage(c, ref)
    assert c.stats.moves > 0 and c.stats.evictions > 0


def test_batch_eviction_moves_only_surviving_tail_rows():
    """Fig. 6: evicting m neurons fills the holes below n_used - m with the live tail rows."""
    c = LayerCache(10, 6, bundle_elems=2, dtype=mx.float32, window=1)
    ref, ref_bytes = _bundles(10, 2, mx.float32)
    _fill(c.step(np.arange(6)), ref_bytes)  # slots 0..5 hold ids 0..5
    # ids 1, 4, 5 stay active; 0, 2, 3 are evicted for three new ones
    plan = c.step(np.array([1, 4, 5, 7, 8, 9]))
    assert c.stats.evictions == 3
    # holes 0, 2 are below the new end (3) and slot 3 (id 3) is evicted too: ids 4, 5 move into 0, 2
    assert c.stats.moves == 2
    assert c.slot_of[4] == 0 and c.slot_of[5] == 2 and c.slot_of[1] == 1
    assert list(plan.load_slots) == [3, 4, 5]
    _fill(plan, ref_bytes)
    c.check_invariants()
    _check_storage(c, ref)


# ---------------------------------------------------------------- budget
@pytest.mark.parametrize("window", [1, 2, 5, 9])
@pytest.mark.parametrize("lazy", [True, False])
def test_budget_never_exceeded(window, lazy):
    rng = np.random.default_rng(window)
    n_layers, n, elems, dtype = 2, 64, 6, mx.float16
    bb = elems * dtype.size
    budget = 16 * bb + n_layers * 20 * bb + bb - 1  # scratch 16 + 20 per layer (+ slack)
    nc = NeuronCache.from_budget(n_layers, n, elems, bb, dtype, budget, window=window, scratch_neurons=16, lazy=lazy)
    assert [c.capacity for c in nc.layers] == [20, 20]
    assert nc.capacity_bytes <= budget
    for t in range(1500):
        for c in nc.layers:
            a = _random_active(rng, n, 40)
            plan = c.step(a, priority=rng.random(len(a)) if t % 2 else None)
            assert c.n_used <= c.capacity
            assert len(plan.overflow_ids) == 0 or c.n_used == c.capacity
        assert nc.resident_bytes <= nc.capacity_bytes - nc.scratch_bytes <= budget
        if t % 100 == 0:
            for c in nc.layers:
                c.check_invariants()
    assert nc.stats.overflow > 0


def test_from_budget_sizes_and_errors():
    bb = 12
    nc = NeuronCache.from_budget(3, 100, 6, bb, mx.float16, budget_bytes=8 * bb + 3 * 10 * bb + 5, scratch_neurons=8)
    assert [c.capacity for c in nc.layers] == [10, 10, 10]
    assert nc.scratch["bundle"].shape == (8, 6) and nc.scratch.dest(0, 8).shape == (8, bb)
    assert nc.capacity_bytes == (8 + 30) * bb
    # the minimum budget works, one byte less does not
    NeuronCache.from_budget(3, 100, 6, bb, mx.float16, budget_bytes=8 * bb + 3 * bb, scratch_neurons=8)
    with pytest.raises(ValueError, match=f"minimum budget is {8 * bb + 3 * bb} bytes"):
        NeuronCache.from_budget(3, 100, 6, bb, mx.float16, budget_bytes=8 * bb + 3 * bb - 1, scratch_neurons=8)
    with pytest.raises(ValueError, match="bundle_bytes"):
        NeuronCache.from_budget(3, 100, 6, 6, mx.float16, budget_bytes=10**6)
    # a budget holding the whole FFN: every neuron cached, no scratch needed
    nc = NeuronCache.from_budget(3, 100, 6, bb, mx.float16, budget_bytes=3 * 100 * bb)
    assert [c.capacity for c in nc.layers] == [100] * 3 and nc.scratch_neurons == 0
    # a huge budget is clamped to the FFN size
    nc = NeuronCache.from_budget(2, 10, 6, bb, mx.float16, budget_bytes=10**9)
    assert [c.capacity for c in nc.layers] == [10, 10] and nc.capacity_bytes == 2 * 10 * bb


# ---------------------------------------------------------------- window
def test_window_semantics():
    k = 4
    c = LayerCache(20, 20, bundle_elems=2, dtype=mx.float32, window=k, lazy=False)
    c.step(np.array([3]))
    for _ in range(k - 1):  # idle for k-1 tokens: still inside the window
        c.step(np.array([10]))
        assert c.slot_of[3] >= 0
    c.step(np.array([10]))  # k tokens later, 3 is outside the window: eager mode drops it
    assert c.slot_of[3] == -1 and c.slot_of[10] >= 0


def test_lazy_eviction_keeps_outside_window_until_needed():
    k = 2
    c = LayerCache(20, 4, bundle_elems=2, dtype=mx.float32, window=k, lazy=True)
    c.step(np.array([1, 2]))
    c.step(np.array([3]))
    c.step(np.array([3]))  # 1, 2 are outside the window, but nothing needs their rows
    assert c.slot_of[1] >= 0 and c.slot_of[2] >= 0
    plan = c.step(np.array([1, 3]))  # 1 comes back: a hit the eager cache would miss
    assert list(plan.hit_ids) == [1, 3]
    c.step(np.array([5, 6, 7]))  # 1 row free, 3 needed: evict 2 (outside the window) first,
    assert c.slot_of[2] == -1  # then one of 1, 3 (both inside the window, same last use):
    assert c.slot_of[1] == -1 and c.slot_of[3] >= 0  # the tie goes by id
    assert c.stats.evictions == 2 and c.stats.forced_evictions == 1


def test_window_neurons_resident_when_capacity_allows():
    """With capacity >= the window's union, every neuron of the last k tokens is resident."""
    rng = np.random.default_rng(3)
    k, n = 3, 60
    c = LayerCache(n, 3 * 15, bundle_elems=2, dtype=mx.float32, window=k)
    hist = []
    for _ in range(300):
        a = rng.choice(n, size=15, replace=False)
        plan = c.step(a)
        assert len(plan.overflow_ids) == 0
        hist = (hist + [a])[-k:]
        assert np.all(c.slot_of[np.concatenate(hist)] >= 0)
    assert c.stats.forced_evictions == 0


# ---------------------------------------------------------------- pinning
def test_pinned_never_evicted():
    rng = np.random.default_rng(4)
    n, cap = 40, 12
    c = LayerCache(n, cap, bundle_elems=4, dtype=mx.float16, window=2)
    ref, ref_bytes = _bundles(n, 4, mx.float16)
    for _ in range(5):
        _fill(c.step(_random_active(rng, n, 12)), ref_bytes)
    _fill(c.step(np.arange(cap)), ref_bytes)  # fill the cache with neurons active *now*
    pins = np.array([30, 31, 32, 0, 1])
    plan = c.pin(pins)  # must still find rows (evicting neurons of the current token)
    assert set(plan.hit_ids) | set(plan.load_ids) == set(pins)
    _fill(plan, ref_bytes)
    c.check_invariants()
    for _ in range(300):
        plan = c.step(_random_active(rng, n, 20))
        _fill(plan, ref_bytes)
        assert np.all(c.slot_of[pins] >= 0)
        assert len(plan.load_ids) <= cap - len(pins)
    c.check_invariants()
    _check_storage(c, ref)
    with pytest.raises(ValueError, match="cannot pin"):
        c.pin(np.arange(2, 2 + cap - len(pins) + 1))
    c.check_invariants()
    assert np.count_nonzero(c.pinned) == len(pins)  # failed pin changed nothing
    c.unpin(pins)
    plan = c.step(np.setdiff1d(np.arange(n), pins)[:cap])  # cap other neurons at once
    assert len(plan.overflow_ids) == 0 and np.all(c.slot_of[pins] == -1)


def test_all_pinned_behaves_like_naive_flash():
    """Static resident part: pinned rows are hits, everything else streams (overflow)."""
    n, cap = 30, 10
    c = LayerCache(n, cap, bundle_elems=2, dtype=mx.float32)
    c.pin(np.arange(cap))
    for _ in range(5):
        plan = c.step(np.arange(n))
        assert len(plan.hit_ids) == cap and len(plan.load_ids) == 0 and len(plan.overflow_ids) == n - cap
    assert c.stats.evictions == 0 and c.stats.preload_bytes == cap * c.bundle_bytes


# --------------------------------------------------- allocation, accounting
def test_no_reallocation():
    rng = np.random.default_rng(5)
    nc = NeuronCache.from_budget(2, 50, 8, 16, mx.float16, budget_bytes=16 * (8 + 2 * 10), scratch_neurons=8)
    ptrs = [(id(c.storage), c.rows.hosts["bundle"].ctypes.data) for c in nc.layers]
    scratch_ptr = nc.scratch.hosts["bundle"].ctypes.data
    for _ in range(200):
        for c in nc.layers:
            plan = c.step(_random_active(rng, 50, 25))
            plan.load_dest[:] = 7
            mx.eval(mx.sum(mx.take(c.storage, mx.array(plan.active_slots), axis=0)))
    assert ptrs == [(id(c.storage), c.rows.hosts["bundle"].ctypes.data) for c in nc.layers]
    for c in nc.layers:
        c.check_invariants()  # also compares the storage buffer address with _host
    assert nc.scratch.hosts["bundle"].ctypes.data == scratch_ptr


def test_hit_rate_accounting():
    rng = np.random.default_rng(6)
    c = LayerCache(40, 15, bundle_elems=4, dtype=mx.float16, window=3)
    active = loaded = hits = overflow = 0
    for _ in range(500):
        a = _random_active(rng, 40, 25)
        plan = c.step(a)
        active += len(a)
        loaded += len(plan.load_dest)
        hits += len(plan.hit_ids)
        overflow += len(plan.overflow_ids)
        assert len(plan.load_dest) == len(plan.load_ids) == len(plan.load_slots)
        assert sorted(plan.active_ids.tolist() + plan.overflow_ids.tolist()) == sorted(a.tolist())
    s = c.stats
    assert (s.hits, s.misses, s.overflow, s.steps) == (hits, loaded, overflow, 500)
    assert hits + loaded + overflow == active
    assert s.bytes_loaded == loaded * c.bundle_bytes and s.overflow_bytes == overflow * c.bundle_bytes
    assert c.hit_rate == pytest.approx(hits / active)
    assert (s + CacheStats(hits=1)).hits == hits + 1
    c.reset_stats()
    assert c.stats == CacheStats() and c.hit_rate == 1.0


def test_priority_decides_who_is_cached():
    c = LayerCache(20, 3, bundle_elems=2, dtype=mx.float32)
    ids = np.array([9, 4, 7, 1, 2])
    plan = c.step(ids, priority=np.array([0.1, 0.9, 0.5, 0.8, 0.0]))
    assert list(plan.load_ids) == [1, 4, 7] and list(plan.overflow_ids) == [2, 9]
    plan = c.step(np.array([11, 12, 13, 14]))  # no priority: the given order
    assert list(plan.load_ids) == [11, 12, 13] and list(plan.overflow_ids) == [14]


def test_zero_capacity_and_bad_ids():
    c = LayerCache(10, 0, bundle_elems=2, dtype=mx.bfloat16)
    plan = c.step(np.array([1, 2]))
    assert len(plan.load_ids) == 0 and list(plan.overflow_ids) == [1, 2] and c.hit_rate == 0.0
    c = LayerCache(10, 5, bundle_elems=2, dtype=mx.float32)
    with pytest.raises(ValueError, match="unique"):
        c.step(np.array([1, 2, 1]))
    with pytest.raises(IndexError):
        c.step(np.array([10]))
    with pytest.raises(IndexError):
        c.step(np.array([-1]))
    c.step(np.array([], dtype=np.int64))
    c.step(np.array([1, 2]))
    c.clear()
    assert c.n_used == 0 and np.all(c.slot_of == -1)
    c.check_invariants()


# ------------------------------------------------------- oracle property
class _Oracle:
    """Set-based reference model of the cache's decisions."""

    def __init__(self, capacity: int, window: int, lazy: bool):
        self.cap, self.window, self.lazy = capacity, window, lazy
        self.res: set = set()
        self.pinned: set = set()
        self.last: dict = {}
        self.t = 0

    def pin(self, ids):
        ids = [int(i) for i in ids]
        missing = [i for i in ids if i not in self.res]
        self.pinned |= set(ids)
        cand = sorted((max(self.last.get(i, 0), 0), i) for i in self.res if i not in self.pinned)
        short = len(missing) - (self.cap - len(self.res))
        m = max(short, 0)
        if not self.lazy:
            m = max(m, sum(1 for lu, _ in cand if lu <= self.t - self.window))
        for _, i in cand[:m]:
            self.res.discard(i)
        self.res |= set(missing)

    def step(self, ids, priority=None):
        self.t += 1
        ids = [int(i) for i in ids]
        for i in ids:
            self.last[i] = self.t
        hits = [i for i in ids if i in self.res]
        missing = [(k, i) for k, i in enumerate(ids) if i not in self.res]
        cand = sorted((self.last[i], i) for i in self.res if i not in self.pinned and self.last[i] < self.t)
        m = max(len(missing) - (self.cap - len(self.res)), 0)
        if not self.lazy:
            m = max(m, sum(1 for lu, _ in cand if lu <= self.t - self.window))
        for _, i in cand[:m]:
            self.res.discard(i)
        free = self.cap - len(self.res)
        if priority is not None and len(missing) > free:
            missing = sorted(missing, key=lambda ki: -priority[ki[0]])  # stable
        load = [i for _, i in missing[:free]]
        self.res |= set(load)
        return set(hits), set(load), {i for _, i in missing[free:]}


@pytest.mark.parametrize("seed", range(6))
def test_matches_oracle(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(10, 60))
    cap = int(rng.integers(1, n))
    window = int(rng.integers(1, 7))
    lazy = bool(seed % 2)
    c = LayerCache(n, cap, bundle_elems=2, dtype=mx.float32, window=window, lazy=lazy)
    o = _Oracle(cap, window, lazy)
    if seed % 3 == 0:
        pins = rng.choice(n, size=cap // 3, replace=False)
        c.pin(pins)
        o.pin(pins)
    # a skewed activity: some neurons much hotter than others, like the real model
    p = 0.8 * rng.dirichlet(np.full(n, 0.3)) + 0.2 / n
    for _ in range(300):
        a = rng.choice(n, size=int(rng.integers(0, min(int(1.3 * cap) + 2, n + 1))), replace=False, p=p)
        pri = rng.random(len(a)) if rng.random() < 0.5 else None
        plan = c.step(a, priority=pri)
        hits, load, over = o.step(a, None if pri is None else pri.tolist())
        assert set(plan.hit_ids.tolist()) == hits
        assert set(plan.load_ids.tolist()) == load
        assert set(plan.overflow_ids.tolist()) == over
        assert set(c.resident_ids.tolist()) == o.res
    c.check_invariants()


# ---------------------------------------------------------------- role-major rows
LAYOUT = {"gate": (0, 4), "gate_bias": 4, "up": (5, 9), "down": (9, 13)}


@pytest.mark.parametrize("dtype", DTYPES)
def test_role_major_rows_follow_swap_delete(dtype):
    """With a layout, each role lives in its own contiguous matrix; loads scatter into
    them and swap-delete moves every role's row together."""
    rng = np.random.default_rng(5)
    n, elems = 40, 13
    ref, ref_bytes = _bundles(n, elems, dtype)
    c = LayerCache(n, 12, elems, dtype, window=2, lazy=False, layout=LAYOUT)
    assert set(c.rows.mats) == {"gate", "gate_bias", "up", "down"}
    assert c.rows["up"].shape == (12, 4) and c.rows["gate_bias"].shape == (12, 1)
    with pytest.raises(AttributeError):
        c.storage  # noqa: B018 (no bundle matrix in a role-major cache)
    for _ in range(200):
        plan = c.step(_random_active(rng, n, 6))
        _fill(plan, ref_bytes)
        c.check_invariants()
        live = c.slot_ids[: c.n_used].astype(np.int64)
        for role, v in LAYOUT.items():
            a, b = (v, v + 1) if isinstance(v, int) else v
            if not len(live):
                continue
            want = np.array(ref[mx.array(live)][:, a:b].astype(mx.float32))
            got = np.array(c.rows[role][: c.n_used].astype(mx.float32))
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(c.rows.row_bytes(np.arange(c.n_used)), ref_bytes[live])


def test_role_major_layout_must_tile_the_bundle():
    with pytest.raises(ValueError, match="tile"):
        LayerCache(10, 4, 13, mx.float16, layout={"gate": (0, 4), "down": (5, 13)})
    with pytest.raises(ValueError, match="covers"):
        LayerCache(10, 4, 13, mx.float16, layout={"gate": (0, 4), "down": (4, 12)})
