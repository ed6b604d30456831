"""Reader throughput against the disk probe, at the same mean request size and threads.

Not a test (pytest does not collect it): a focused microbenchmark for issue #15.

    PYTHONPATH=$PWD python tests/storage/reader_microbench.py MODEL.flash [--threads 16] [--seconds 3]

For each access pattern (every neuron of a layer; random subsets at a few densities, the
shape of the engine's per-layer loads) it calls ``FlashReader.read`` layer after layer for
``--seconds`` and reports bytes read, useful bytes (amplification), mean request size and
GB/s, then measures the disk itself right after with the probe's own cell
(``probe._measure_cell``: that many threads reading random chunks of the mean request size from
the same file, no barrier between calls) and prints the ratio. Run it twice and compare ratios
only: the machine is shared.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mlx_flash.storage.format import open_flash
from mlx_flash.storage.platform_io import aligned_buffer, drop_page_cache, open_uncached
from mlx_flash.storage.probe import _measure_cell
from mlx_flash.storage.reader import FlashReader


def patterns(n_neurons: int, densities):
    yield "all", None
    for d in densities:
        yield f"random {d:.0%}", d


def run_pattern(reader: FlashReader, density, seconds: float, seed: int = 0):
    m = reader.manifest
    rng = np.random.default_rng(seed)
    out = np.empty((m.intermediate_size, m.bundle_bytes), dtype=np.uint8)
    reader.reset_totals()
    calls = 0
    t_end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        layer = calls % m.num_layers
        if density is None:
            ids = np.arange(m.intermediate_size)
        else:
            ids = np.flatnonzero(rng.random(m.intermediate_size) < density)
        reader.read(layer, ids, out[: len(ids)])
        calls += 1
    wall = time.perf_counter() - t0
    return reader.reset_totals(), calls, wall


def probe_at(fd: int, file_bytes: int, chunk: int, threads: int, seconds: float, align: int) -> float:
    chunk = max(align, int(round(chunk / align)) * align)
    bufs = [aligned_buffer(chunk) for _ in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        return _measure_cell(pool, fd, bufs, file_bytes, chunk, threads, seconds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=256 * 1024)
    ap.add_argument("--gap", type=int, default=None, help="max_gap_bytes (default: the reader's own)")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--densities", default="0.1,0.3,0.55")
    args = ap.parse_args()
    files = open_flash(args.model)
    kw = {} if args.gap is None else {"max_gap_bytes": args.gap}
    dens = [float(x) for x in args.densities.split(",") if x]
    drop_page_cache(files.ffn_path)
    with FlashReader(files, threads=args.threads, chunk_bytes=args.chunk, **kw) as r, \
            open_uncached(files.ffn_path) as f:
        print(f"{r!r} alignment={r.alignment}")
        print("| pattern | calls | ms/call | read/call | useful/call | amplification | mean request | reader GB/s "
              "| probe GB/s there | of probe |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        size = files.ffn_path.stat().st_size
        for name, d in patterns(files.manifest.intermediate_size, dens):
            st, calls, wall = run_pattern(r, d, args.seconds)
            mean_req = st.bytes_read / max(1, st.requests)
            probe = probe_at(f.fd, size, mean_req, args.threads, args.seconds, r.alignment)
            print(f"| {name} | {calls} | {wall / calls * 1e3:.2f} | {st.bytes_read / calls / 1e3:.0f} KB | "
                  f"{st.bytes_useful / calls / 1e3:.0f} KB | {st.bytes_read / max(1, st.bytes_useful):.2f}x | "
                  f"{mean_req / 1e3:.1f} KB | {st.gbps:.2f} | {probe:.2f} | {st.gbps / probe:.0%} |", flush=True)


if __name__ == "__main__":
    main()
