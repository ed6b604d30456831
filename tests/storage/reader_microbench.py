"""Reader throughput against the disk, at the same requests, request size and threads.

Not a test (pytest does not collect it): the focused microbenchmark of issue #15.

    PYTHONPATH=$PWD python tests/storage/reader_microbench.py MODEL.flash [--threads 16] [--reps 5]

For each access pattern (``all``: every neuron of a layer; ``D``: a random subset of density D;
``D/K``: the same read K ids at a time, as the scratch buffer streams; ``engine``: a cache-load
call of 10% of the layer then 45% in 256-neuron scratch calls) it times three things, interleaved
``--reps`` times (medians; the machine is shared, so compare the ratios of one run):

- reader:  ``FlashReader.read`` layer after layer (plan, reads, copy-out into rows);
- raw:     exactly the reader's requests (its own plan), issued by ``threads`` plain threads
           into one buffer each, one call at a time with the same barrier after each call,
           no copy-out: what the disk gives for these requests at this queue depth;
- probe:   the disk probe's own cell (``probe._measure_cell``) at the reader's mean request size
           and threads: random reads with no barrier between calls (the issue's yardstick).

reader / raw is the reader's own overhead (Python, hand-offs, copies); raw / probe is what a
barrier per call with only that call's requests in flight costs on this disk.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mlx_flash.storage.format import open_flash
from mlx_flash.storage.platform_io import aligned_buffer, drop_page_cache, open_uncached
from mlx_flash.storage.probe import _measure_cell
from mlx_flash.storage.reader import FlashReader


def make_calls(n_neurons: int, n_layers: int, pattern: str, n: int, seed: int = 0):
    """``[(layer, ids)]``: the read calls of ``n`` layer visits."""
    rng = np.random.default_rng(seed)
    calls = []
    for j in range(n):
        layer = j % n_layers
        if pattern == "all":
            calls.append((layer, np.arange(n_neurons)))
        elif pattern == "engine":
            perm = rng.permutation(n_neurons)
            k_load, k_over = n_neurons // 10, n_neurons * 45 // 100
            calls.append((layer, np.sort(perm[:k_load])))
            over = np.sort(perm[k_load : k_load + k_over])
            calls += [(layer, over[s : s + 256]) for s in range(0, len(over), 256)]
        elif "/" in pattern:  # "D/K": density D, read K ids at a time (the scratch buffer's streaming)
            d, k = pattern.split("/")
            ids = np.flatnonzero(rng.random(n_neurons) < float(d))
            calls += [(layer, ids[s : s + int(k)]) for s in range(0, len(ids), int(k))]
        else:
            calls.append((layer, np.flatnonzero(rng.random(n_neurons) < float(pattern))))
    return calls


def time_reader(reader: FlashReader, calls, out) -> float:
    t0 = time.perf_counter()
    for layer, ids in calls:
        reader.read(layer, ids, out[: len(ids)])
    return time.perf_counter() - t0


def raw_requests(reader: FlashReader, calls):
    """The reader's request list of each call, ``[(lo, hi)]`` (its own plan)."""
    out = []
    for layer, ids in calls:
        plan = reader._plan(layer, np.asarray(ids, dtype=np.int64))[0]
        out.append(list(zip(plan.req_lo.tolist(), plan.req_hi.tolist())))
    return out


def time_raw(fd: int, pool: ThreadPoolExecutor, bufs, threads: int, reqs) -> float:
    def worker(k, job, take):
        with memoryview(bufs[k]) as mv:
            while True:
                i = next(take)
                if i >= len(job):
                    return
                lo, hi = job[i]
                os.preadv(fd, [mv[: hi - lo]], lo)

    t0 = time.perf_counter()
    for job in reqs:
        take = itertools.count()
        futs = [pool.submit(worker, k, job, take) for k in range(min(threads, len(job)))]
        for f in futs:
            f.result()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=256 * 1024)
    ap.add_argument("--gap", type=int, default=25600, help="max_gap_bytes")
    ap.add_argument("--layers", type=int, default=60, help="layer visits per pattern and repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--probe-seconds", type=float, default=0.5)
    ap.add_argument("--patterns", default="all,0.1,0.3,0.55,engine")
    args = ap.parse_args()
    files = open_flash(args.model)
    m = files.manifest
    drop_page_cache(files.ffn_path)
    out = np.empty((m.intermediate_size, m.bundle_bytes), dtype=np.uint8)
    size = files.ffn_path.stat().st_size
    T = args.threads
    with FlashReader(files, threads=T, chunk_bytes=args.chunk, max_gap_bytes=args.gap) as r, \
            open_uncached(files.ffn_path) as f, ThreadPoolExecutor(T) as pool:
        a = r.alignment
        bufs = [aligned_buffer(r.chunk_bytes) for _ in range(T)]
        print(f"{r!r} alignment={a} mode={r.mode}")
        print("| pattern | calls/layer | read/layer | read/useful | requests/call | mean request | reader GB/s "
              "| raw GB/s | probe GB/s | reader/raw | raw/probe | reader/probe |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for pattern in args.patterns.split(","):
            calls = make_calls(m.intermediate_size, m.num_layers, pattern, args.layers)
            reqs = raw_requests(r, calls)
            r.reset_totals()
            t_reader, t_raw, g_probe = [], [], []
            for _ in range(args.reps):
                t_reader.append(time_reader(r, calls, out))
                t_raw.append(time_raw(f.fd, pool, bufs, T, reqs))
            st = r.reset_totals()
            nbytes = st.bytes_read / args.reps
            mean_req = st.bytes_read / max(1, st.requests)
            chunk = max(a, int(round(mean_req / a)) * a)
            pbufs = [aligned_buffer(chunk) for _ in range(T)]
            for _ in range(3):
                g_probe.append(_measure_cell(pool, f.fd, pbufs, size, chunk, T, args.probe_seconds))
            gr, gw, gp = (nbytes / np.median(t_reader) / 1e9, nbytes / np.median(t_raw) / 1e9,
                          float(np.median(g_probe)))
            print(f"| {pattern} | {len(calls) / args.layers:.1f} | {nbytes / args.layers / 1e3:.0f} KB | "
                  f"{st.bytes_read / max(1, st.bytes_useful):.2f}x | {st.requests / args.reps / len(calls):.1f} | "
                  f"{mean_req / 1e3:.1f} KB | {gr:.2f} | {gw:.2f} | {gp:.2f} | {gr / gw:.0%} | {gw / gp:.0%} | "
                  f"{gr / gp:.0%} |",
                  flush=True)


if __name__ == "__main__":
    main()
