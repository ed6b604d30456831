"""Neuron cache policies (window, lru, hot, hot+window, auto): budget, pins, simulation,
the measured choice, and on a tiny calibrated flash model the bytes actually read."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash.calibrate import calibrate
from mlx_flash.cli import build_parser, flash_config_from_args
from mlx_flash.config import FlashConfig
from mlx_flash.engine import load
from mlx_flash.neuron_cache import (
    CachePolicy,
    CacheStats,
    LayerCache,
    NeuronCache,
    ReadModel,
    choose_hot_fraction,
    chosen_frequencies,
    hot_ids,
    pick_fraction,
    resolve_auto_policy,
    sample_active_sets,
    simulate,
    simulate_fractions,
)
from mlx_flash.storage.format import open_flash
from mlx_flash.storage.reader import FlashReader
from tests.tiny import make_tiny_flash

POLICIES = ("window", "lru", "hot", "hot+window")


def _zipf(n: int, mean_active: float, seed: int = 0, s: float = 1.1) -> np.ndarray:
    """Zipf-skewed per-neuron activation frequencies (random id order), mean sum ``mean_active``."""
    rng = np.random.default_rng(seed)
    f = 1.0 / np.arange(1, n + 1) ** s
    f = np.minimum(f * mean_active / f.sum(), 0.98)
    return f[rng.permutation(n)]


def _bundles(n: int, elems: int, dtype=mx.float16, seed: int = 0):
    rows = mx.array(np.random.default_rng(seed).standard_normal((n, elems)).astype(np.float32))
    rows = (rows + mx.arange(n)[:, None]).astype(dtype)
    mx.eval(rows)
    return rows, np.array(rows.view(mx.uint8))


def _rows_ok(c: LayerCache, ref_bytes: np.ndarray) -> bool:
    live = c.slot_ids[: c.n_used].astype(np.int64)
    return np.array_equal(c.rows.row_bytes(np.arange(c.n_used)), ref_bytes[live])


# ------------------------------------------------------------------ policy objects
def test_cache_policy_values():
    assert CachePolicy.make("hot") == CachePolicy("hot", 1.0)
    assert CachePolicy.make("hot+window").hot_fraction == 0.5
    assert CachePolicy.make("hot+window", 0.25).pinned_rows(10) == 3  # 2.5 rounds half up
    assert CachePolicy.make("window").lazy is False and CachePolicy.make("lru").lazy is True
    assert CachePolicy.from_fraction(0) == CachePolicy("lru")
    assert CachePolicy.from_fraction(1.0) == CachePolicy("hot", 1.0)
    assert CachePolicy.from_fraction(0.75) == CachePolicy("hot+window", 0.75)
    assert CachePolicy("hot", 1.0).pinned_rows(37) == 37
    for bad in (("lru", 0.5), ("hot", 0.5), ("hot+window", 1.5), ("nope", 0.0)):
        with pytest.raises(ValueError):
            CachePolicy(*bad)


def test_hot_ids_top_k_ties_by_id():
    f = np.array([0.1, 0.9, 0.5, 0.9, 0.0, 0.5])
    assert hot_ids(f, 3).tolist() == [1, 2, 3]  # 0.9, 0.9, then the first 0.5
    assert hot_ids(f, 0).tolist() == [] and hot_ids(f, 99).tolist() == list(range(6))


def test_config_policy_validation():
    assert FlashConfig().policy == "auto" and FlashConfig().hot_fraction is None
    assert FlashConfig(policy="hot+window", hot_fraction=0.3).hot_fraction == 0.3
    FlashConfig(policy="auto", hot_fraction=0.0)
    FlashConfig(policy="hot", hot_fraction=1.0)
    for kw in ({"policy": "lfu"}, {"policy": "hot+window", "hot_fraction": 1.2},
               {"policy": "lru", "hot_fraction": 0.5}, {"policy": "hot", "hot_fraction": 0.5}):
        with pytest.raises(ValueError):
            FlashConfig(**kw)


def test_cli_policy_args():
    args = build_parser().parse_args(["generate", "-p", "x", "--policy", "hot+window", "--hot-fraction", "0.3"])
    cfg = flash_config_from_args(args)
    assert cfg.policy == "hot+window" and cfg.hot_fraction == 0.3
    cfg = flash_config_from_args(build_parser().parse_args(["chat"]))
    assert cfg.policy == "auto" and cfg.hot_fraction is None


# ------------------------------------------------------------- budget and pins
@pytest.mark.parametrize("policy", POLICIES)
def test_long_run_budget_and_pins(policy):
    """2000 Zipf-skewed tokens: invariants every step, never above capacity or budget,
    pinned neurons resident throughout, rows always hold the right bundles."""
    rng = np.random.default_rng(7)
    n_layers, n, elems, dtype = 2, 200, 4, mx.float16
    bb = elems * dtype.size
    budget = 16 * bb + n_layers * 60 * bb
    nc = NeuronCache.from_budget(n_layers, n, elems, bb, dtype, budget, window=3, scratch_neurons=16)
    freqs = np.stack([_zipf(n, 45, seed=i) for i in range(n_layers)])
    ref = [_bundles(n, elems, dtype, seed=i)[1] for i in range(n_layers)]

    def fill(i, plan):
        plan.load_dest[:] = ref[i][plan.load_ids]

    pinned = nc.apply_policy(CachePolicy.make(policy), freqs, fill=fill)
    want_pins = CachePolicy.make(policy).pinned_rows(60)
    assert [len(p) for p in pinned] == [want_pins] * n_layers
    for i, p in enumerate(pinned):
        assert p.tolist() == hot_ids(freqs[i], want_pins).tolist()
        assert nc.layers[i].stats.preload_bytes == want_pins * bb
    assert all(c.lazy == (policy != "window") for c in nc.layers)
    for t in range(2000):
        for i, c in enumerate(nc.layers):
            a = np.flatnonzero(rng.random(n) < freqs[i])
            if t % 97 == 0:  # now and then more active neurons than rows
                a = rng.choice(n, 90, replace=False)
            plan = c.step(a)
            fill(i, plan)
            c.check_invariants()
            assert c.n_used <= c.capacity and c.resident_bytes <= c.capacity_bytes
            assert np.all(c.slot_of[pinned[i]] >= 0), "a pinned neuron left the cache"
            assert np.all(c.pinned[pinned[i]]) and c.n_pinned == len(pinned[i])
            if policy == "hot":
                assert len(plan.load_ids) == 0  # every row pinned: nothing else is ever cached
        assert nc.resident_bytes <= nc.capacity_bytes - nc.scratch_bytes <= budget
        if t % 250 == 0:
            assert all(_rows_ok(c, ref[i]) for i, c in enumerate(nc.layers))
    assert all(_rows_ok(c, ref[i]) for i, c in enumerate(nc.layers))
    s = nc.stats
    assert s.overflow > 0 and s.hits > 0
    if policy == "hot":
        assert s.misses == 0 and s.evictions == 0 and s.moves == 0
    else:
        assert s.misses > 0 and s.evictions > 0


@pytest.mark.parametrize("lazy", [True, False])
def test_fully_pinned_step(lazy):
    """free == 0 and nothing evictable: every missing neuron is overflow, with or without priority."""
    c = LayerCache(30, 8, bundle_elems=2, dtype=mx.float32, window=2, lazy=lazy)
    c.step(np.array([20, 21]))  # resident neurons that the pin will evict
    c.pin(np.arange(8))
    assert c.n_used == 8 and c.n_pinned == 8 and c.slot_of[20] == -1 and c.slot_of[21] == -1
    assert c.stats.evictions == 2
    c.reset_stats()
    for pri in (None, np.linspace(1, 0, 6)):
        plan = c.step(np.array([25, 3, 11, 7, 12, 0]), priority=pri)
        assert sorted(plan.hit_ids.tolist()) == [0, 3, 7]
        assert len(plan.load_ids) == 0 and len(plan.load_dest) == 0
        assert plan.overflow_ids.tolist() == [11, 12, 25]
        c.check_invariants()
    assert c.stats.evictions == 0 and c.stats.moves == 0 and c.stats.overflow == 6 and c.stats.misses == 0
    c.unpin(np.array([0, 1]))  # two rows become evictable again
    plan = c.step(np.array([26, 27, 28]))
    assert len(plan.load_ids) == 2 and len(plan.overflow_ids) == 1
    c.check_invariants()


def test_apply_policy_needs_frequencies_and_replaces_pins():
    nc = NeuronCache.from_budget(2, 50, 2, 8, mx.float32, budget_bytes=8 * (8 + 2 * 10), scratch_neurons=8)
    with pytest.raises(ValueError, match="frequencies"):
        nc.apply_policy("hot")
    with pytest.raises(ValueError, match="shape"):
        nc.apply_policy("hot", np.ones((3, 50)))
    f = np.stack([np.linspace(0, 1, 50), np.linspace(1, 0, 50)])
    pins = nc.apply_policy("hot", f)
    assert pins[0].tolist() == list(range(40, 50)) and pins[1].tolist() == list(range(10))
    pins = nc.apply_policy(CachePolicy("hot+window", 0.5), f)
    assert [len(p) for p in pins] == [5, 5] and nc.policy.name == "hot+window"
    assert [c.n_pinned for c in nc.layers] == [5, 5]
    nc.apply_policy("window")
    assert [c.n_pinned for c in nc.layers] == [0, 0] and not nc.layers[0].lazy


# ------------------------------------------------------------------ simulation
def test_simulate_replays_a_real_layer_cache():
    f = _zipf(80, 20, seed=1)
    sets = sample_active_sets(f, 300, seed=2)
    assert sets.shape == (300, 80) and sets.dtype == bool
    for policy in POLICIES:
        pol = CachePolicy.make(policy)
        c = LayerCache(80, 25, 1, mx.uint8, window=4, lazy=pol.lazy)
        if pol.pinned_rows(25):
            c.pin(hot_ids(f, pol.pinned_rows(25)))
        for row in sets:
            c.step(np.flatnonzero(row))
        got = simulate(sets, 80, 25, policy, window=4, frequencies=f)
        assert CacheStats(**{k: v for k, v in got.to_dict().items() if k in CacheStats.__dataclass_fields__}) == c.stats
        # the same from id lists; warmup drops the first tokens' counts (preload kept)
        ids = [np.flatnonzero(r) for r in sets]
        assert simulate(ids, 80, 25, policy, 4, f).hits == got.hits
        w = simulate(ids, 80, 25, policy, 4, f, warmup=100)
        assert w.steps == 200 and w.preload_bytes == got.preload_bytes
    with pytest.raises(ValueError, match="frequencies"):
        simulate(sets, 80, 25, "hot")


def test_choose_prefers_pinning_on_skewed_independent_tokens():
    f = _zipf(400, 60, seed=3, s=1.2)
    sets = sample_active_sets(f, 600, seed=4)
    frac, table = choose_hot_fraction(sets, 400, 80, f, window=5, warmup=20)
    assert frac > 0, table
    assert table[frac] >= table[0.0] + 0.02
    assert set(table) == {0.0, 0.25, 0.5, 0.75, 0.9, 1.0}


def test_choose_prefers_the_window_on_temporal_locality():
    """Flat frequencies but phases that reuse a small working set: the window wins, pins lose."""
    rng = np.random.default_rng(5)
    n, cap = 400, 100
    rows = []
    for _ in range(40):  # 40 phases x 30 tokens; each phase works on 95 random neurons
        work = rng.choice(n, 95, replace=False)
        for _ in range(30):
            rows.append(np.sort(work[rng.random(95) < 0.7]))
    freq = np.bincount(np.concatenate(rows), minlength=n) / len(rows)
    assert freq.max() < 4 * freq.mean()  # flat-ish: no neuron is hot across phases
    frac, table = choose_hot_fraction(rows, n, cap, freq, window=5)
    assert frac == 0.0, table
    assert table[0.0] > table[1.0] + 0.3


def test_choose_tie_goes_to_the_smaller_fraction():
    assert pick_fraction({0.0: CacheStats(hits=5, misses=5), 0.5: CacheStats(hits=5, misses=5)}) == 0.0
    stats = simulate_fractions([np.arange(10)] * 20, 10, 10, np.full(10, 1.0), warmup=1)  # all fit: 100%
    assert pick_fraction(stats) == 0.0


def test_several_layers_pool_their_counters():
    f = np.stack([_zipf(100, 20, seed=i) for i in range(3)])
    sets = [sample_active_sets(f[i], 120, seed=i) for i in range(3)]
    stats = simulate_fractions(sets, 100, 30, f, fractions=(0.0, 1.0))
    for fr in (0.0, 1.0):
        one = [simulate(sets[i], 100, 30, CachePolicy.from_fraction(fr), 5, f[i]) for i in range(3)]
        assert stats[fr].hits == sum(s.hits for s in one) and stats[fr].steps == 360
    with pytest.raises(ValueError, match="layers"):
        simulate_fractions(sets[:2], 100, 30, f)


def test_read_model_counts_scattered_streams():
    """Streaming ids scattered between pinned ones costs more disk bytes than the same
    number of contiguous ids: what the bytes objective sees and the hit rate does not."""
    rm = ReadModel(bundle_bytes=3456, alignment=4096, max_gap_bytes=0, scratch_neurons=256)
    contiguous = rm.bytes_read(np.arange(100))
    scattered = rm.bytes_read(np.arange(0, 200, 2))
    assert contiguous == -(-100 * 3456 // 4096) * 4096
    assert scattered > 1.5 * contiguous
    # separate read calls (scratch chunks) never merge across the call boundary
    ids = np.arange(512)
    assert rm.bytes_read(ids, breaks=np.array([256])) >= rm.bytes_read(ids)
    stats = simulate_fractions(sample_active_sets(_zipf(300, 150, seed=9), 60, 1), 300, 100,
                               _zipf(300, 150, seed=9), fractions=(0.0, 1.0), read_model=rm)
    assert all(s.bytes_read >= (s.misses + s.overflow) * 3456 for s in stats.values())
    assert pick_fraction(stats, "bytes_read") in (0.0, 1.0)
    with pytest.raises(ValueError):
        pick_fraction(stats, "speed")


def test_chosen_frequencies():
    f = _zipf(300, 120, seed=2)
    assert np.array_equal(chosen_frequencies(f), f)
    for density, recall in ((0.96, 0.99), (0.9, 1.0)):
        g = chosen_frequencies(f, density, recall)
        assert g.mean() == pytest.approx(density) and np.all((g >= 0) & (g <= 1))
        order = np.argsort(f, kind="stable")
        assert np.all(np.diff(g[order]) >= -1e-12)  # still ranks the neurons like f
    g = chosen_frequencies(f, 0.1)  # sparser than the calibration: scaled down
    assert g.mean() == pytest.approx(0.1) and np.allclose(g / f, g[0] / f[0])
    assert np.all(chosen_frequencies(f, 1.0) == 1.0)


def test_resolve_auto_policy():
    f = np.stack([_zipf(200, 40, seed=i) for i in range(6)])
    pol, info = resolve_auto_policy(None, 50)
    assert pol.name == "lru" and "calibrate" in info.reason
    pol, info = resolve_auto_policy(f, 50, hot_fraction=0.25)
    assert pol == CachePolicy("hot+window", 0.25) and info.source == "config"
    pol, info = resolve_auto_policy(f, 200)
    assert pol.name == "lru" and "fits" in info.reason
    pol, info = resolve_auto_policy(f, 50, tokens=100)
    assert info.source == "simulated" and info.objective == "hit_rate"
    assert pol == CachePolicy.from_fraction(pick_fraction({k: _hr(v) for k, v in info.hit_rates.items()}))
    assert info.layers == (0, 2, 3, 5) and set(info.hit_rates) == {0.0, 0.25, 0.5, 0.75, 0.9, 1.0}
    d = info.to_dict()  # the JSON record (bench rows): the set fields only, as plain lists and dicts
    assert d["layers"] == [0, 2, 3, 5] and d["name"] == pol.name and "pinned" not in d and "asked" not in d
    pol, info = resolve_auto_policy(f, 50, tokens=100, read_model=ReadModel(16, 16, 0, 1 << 20, 8))
    assert info.objective == "bytes_read" and set(info.bytes_read_per_token) == set(info.hit_rates)


def _hr(h: float) -> CacheStats:
    """A CacheStats whose hit rate is ``h`` (to one part in a million)."""
    return CacheStats(hits=int(round(h * 1e6)), misses=int(1e6) - int(round(h * 1e6)))


# ------------------------------------------------------------ engine, end to end
PROMPTS = ["hi", "what is the time?", "tell me about cats", "please help me", "a story", "the end"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny flash model, and a calibrated copy (predictors with per-neuron frequencies)."""
    root = tmp_path_factory.mktemp("policy")
    plain = make_tiny_flash(root / "a", layers=2, hidden=64, ffn=128, dtype="float32", seed=11)
    cal = shutil.copytree(plain, root / "cal.flash")
    calibrate(cal, sparsity=0.5, rank=8, tokens=200, max_new_tokens=8, prompts=PROMPTS)
    return plain, cal


@pytest.mark.parametrize("policy", ("window", "lru", "hot", "hot+window", "auto"))
def test_engine_bytes_match_cache_counters(tiny_models, policy):
    """Useful bytes the reader counts == (misses + overflow) * bundle_bytes per token;
    the pinned rows are read once at load and counted apart (preload_bytes)."""
    _, cal = tiny_models
    cfg = FlashConfig(policy=policy, budget=0.4, window=3, scratch_neurons=16, threads=2)
    eng = load(cal, cfg)
    try:
        info = eng.policy_info
        assert info.asked == policy and info.name in POLICIES and info.reason
        # the bytes of one cache row as the reader reads it: the whole bundle, or its up/down part when
        # auto chose gate-first with its side file (the gate rows are resident)
        bb = eng.reader.bundle_bytes
        assert bb == eng.files.manifest.bundle_bytes or eng.active_info.name == "gate"
        cache = eng.cache
        pol = cache.policy
        assert pol.name == info.name and pol.hot_fraction == info.hot_fraction
        pins = pol.pinned_rows(cache.layers[0].capacity) * len(cache)
        assert info.pinned == pins and info.preload_bytes == pins * bb
        assert eng.reader.totals.bytes_useful == pins * bb  # the load read exactly the pinned rows
        # the pinned rows hold the right bundles, read back independently
        for i, c in enumerate(cache.layers):
            live = c.slot_ids[: c.n_used].astype(np.int64)
            if len(live):
                want = np.zeros((len(live), bb), np.uint8)
                eng.reader.read(i, live, want)
                assert np.array_equal(c.rows.row_bytes(np.arange(c.n_used)), want)
        eng.reader.reset_totals()
        before = {i: c.slot_ids[: c.n_used].copy() for i, c in enumerate(cache.layers)}
        pinned_ids = [np.flatnonzero(c.pinned) for c in cache.layers]
        out = list(eng.stream_generate([{"role": "user", "content": "tell me about cats"}], 12))
        assert len(out) >= 2
        s, k = cache.stats, eng.counters
        assert k.bytes_useful == (s.misses + s.overflow) * bb
        # read now by the engine's reader, or read ahead by the pipeline's prefetch and copied from staging
        assert eng.reader.totals.bytes_useful + k.neurons_prefetch_used * bb == k.bytes_useful
        assert s.preload_bytes == pins * bb  # not part of the per-token reads
        assert (k.neurons_hit, k.neurons_loaded, k.neurons_streamed) == (s.hits, s.misses, s.overflow)
        assert k.neurons_active == s.hits + s.misses + s.overflow
        assert sum(r.stats.bytes_useful for r in out) <= k.bytes_useful  # prefill is counted too
        for i, c in enumerate(cache.layers):
            c.check_invariants()
            assert np.all(c.slot_of[pinned_ids[i]] >= 0)
            if pol.name == "hot":
                assert np.array_equal(c.slot_ids[: c.n_used], before[i])  # not one row changed
                assert s.misses == 0 and s.evictions == 0
        assert cache.resident_bytes <= cache.budget_bytes
    finally:
        eng.close()


def test_engine_auto_choice_is_recorded(tiny_models):
    plain, cal = tiny_models
    eng = load(cal, FlashConfig(budget=0.4, threads=1, active="predictor"))
    try:
        info = eng.policy_info
        assert info.asked == "auto" and info.source == "simulated"
        assert info.objective == "bytes_read" and set(info.hit_rates) == {0.0, 0.25, 0.5, 0.75, 0.9, 1.0}
        held = eng.chooser.info["held_out"][str(eng.chooser.recall)]  # the predictor's measured density
        assert info.chosen_fraction == pytest.approx(held["predicted_fraction"], abs=2e-3)
        assert info.name == CachePolicy.from_fraction(info.hot_fraction).name
    finally:
        eng.close()
    eng = load(plain, FlashConfig(budget=0.4, threads=1))  # not calibrated: the lazy window
    try:
        assert eng.policy_info.name == "lru" and "calibrate" in eng.policy_info.reason
    finally:
        eng.close()
    eng = load(cal, FlashConfig(budget=0.4, threads=1, hot_fraction=0.5))
    try:
        assert eng.policy_info.name == "hot+window" and eng.policy_info.source == "config"
    finally:
        eng.close()


@pytest.mark.parametrize("policy", ("hot", "hot+window"))
def test_hot_policies_need_calibration(tiny_models, policy):
    plain, _ = tiny_models
    with pytest.raises(ValueError, match="mlx-flash calibrate"):
        load(plain, FlashConfig(policy=policy, active="oracle", budget=0.4, threads=1))


def test_read_model_matches_the_reader(tiny_models):
    """The simulation's byte count is the reader's own: same ids, same bytes."""
    _, cal = tiny_models
    files = open_flash(cal)
    rng = np.random.default_rng(0)
    for gap, chunk in ((0, 4096), (4096, 8192), (16384, 1 << 20)):  # chunk >= gap: see ReadModel
        with FlashReader(files, threads=2, chunk_bytes=chunk, max_gap_bytes=gap) as r:
            rm = ReadModel.of_reader(r, scratch_neurons=16)
            n = files.manifest.intermediate_size
            for _ in range(20):
                ids = np.sort(rng.choice(n, int(rng.integers(1, n)), replace=False))
                out = np.zeros((len(ids), r.bundle_bytes), np.uint8)
                assert r.read(1, ids, out).bytes_read == rm.bytes_read(ids), gap
                got = sum(r.read(1, ids[s:s + 16], out[s:s + 16]).bytes_read for s in range(0, len(ids), 16))
                assert got == rm.bytes_read(ids, breaks=np.arange(16, len(ids), 16))
