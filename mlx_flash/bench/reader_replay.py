"""Reader micro-bench: the engine's real read calls replayed through the reader, plain threads and the probe.

``python -m mlx_flash.bench.reader_replay trace OUT.npz`` runs the engine (default model, or
``--model``) for ``--tokens`` tokens and records every read call after the warm-up: ``(layer,
ids)``, in order. ``... replay OUT.npz`` replays them, on the same ``ffn.bin`` with page-cache
bypass, as:

- ``reader``: ``FlashReader.read`` one call after another (what the serial engine does);
- ``reader-async``: ``FlashReader.submit`` of each call, waiting for each before the next
  (the serial engine with the submit/wait API) and with ``--depth`` calls in flight;
- ``raw-barrier``: the same preads (:func:`~mlx_flash.storage.reader.plan_requests`) issued
  by ``threads`` plain threads, all of a call's requests done before the next call starts;
- ``raw-stream``: the same preads with no barrier (one queue across all calls);
- ``probe``: random reads of the mean request size from ``threads`` threads on the same file;
- ``reader-plain`` / ``reader-plain-async``: as ``reader`` / ``reader-async`` with a reader whose
  threads do not ask to be favoured (``FlashReader(favour_threads=False)``).

``--burn N`` runs N CPU-bound threads beside the replay (``python``: pure Python, holding the
GIL like the engine's Python between MLX calls; ``mlx``: MLX matmuls, which release it), the
engine's compute in miniature. After the table, per reader mode: where a request's time went
(:meth:`~mlx_flash.storage.reader.ReadStats.split`, medians over the repeats).

Each line: GB/s, the share of the probe line, ms/token of reads; ``reader... (reading)``: the
reader's bytes over the time a read thread was at work (``ReadStats.service_seconds``).
Figures are wall-clock on a shared machine: compare lines of one run.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..storage.format import open_flash
from ..storage.platform_io import aligned_buffer, open_uncached
from ..storage.reader import FlashReader, plan_requests


def trace(model: Optional[str], out: Path, tokens: int, warmup: int, budget: float, active: str,
          pipeline: bool) -> None:
    from ..bench.runners import default_flash_model  # noqa: PLC0415 - heavy; trace mode only
    from ..config import FlashConfig  # noqa: PLC0415
    from ..engine import load  # noqa: PLC0415

    path = Path(model) if model else default_flash_model()
    eng = load(path, FlashConfig(budget=budget, active=active, engine="flash", pipeline=pipeline))
    calls: List[Tuple[int, np.ndarray]] = []
    recording = [False]
    orig = eng.reader.submit  # read() and the prefetch both submit

    def rec(layer, ids, out, rows=None):
        if recording[0]:
            calls.append((int(layer), np.unique(np.asarray(ids, dtype=np.int64))))
        return orig(layer, ids, out, rows)

    eng.reader.submit = rec
    eng.tokenizer.eos_token_ids = []
    for i, _ in enumerate(eng.stream_generate("Explain how a refrigerator works.", tokens, temperature=0.0)):
        if i + 1 == warmup:
            recording[0] = True
    files = eng.files
    eng.close()
    lay = np.array([c[0] for c in calls], dtype=np.int64)
    cnt = np.array([len(c[1]) for c in calls], dtype=np.int64)
    ids = np.concatenate([c[1] for c in calls]) if calls else np.zeros(0, np.int64)
    np.savez(out, layer=lay, count=cnt, ids=ids, root=str(files.root), ffn=str(files.ffn_path),
             tokens=tokens - warmup)
    print(f"{len(calls)} read calls, {ids.size} neurons over {tokens - warmup} tokens -> {out}")


def _load(path: Path):
    z = np.load(path)
    cuts = np.cumsum(z["count"])[:-1]
    return [int(v) for v in z["layer"]], np.split(z["ids"], cuts), str(z["root"]), int(z["tokens"])


def _requests(reader: FlashReader, layers, ids_list):
    """Per call: (req_lo, req_hi) of the reader's plan."""
    m = reader.manifest
    offs = np.array([e.offset for e in m.layers], dtype=np.int64)
    out = []
    for lay, ids in zip(layers, ids_list):
        starts = offs[lay] + ids * reader.bundle_bytes
        lo, hi, _, _ = plan_requests(starts, reader.bundle_bytes, reader.alignment, reader.max_gap_bytes,
                                     reader.chunk_bytes)
        out.append((lo.tolist(), hi.tolist()))
    return out


def _raw(fd: int, reqs, threads: int, barrier: bool, chunk: int) -> float:
    bufs = [aligned_buffer(chunk) for _ in range(threads)]
    flat = [(a, b - a) for lo, hi in reqs for a, b in zip(lo, hi)]
    bounds = np.cumsum([0] + [len(lo) for lo, _ in reqs]).tolist()
    lock = threading.Lock()
    state = {"i": 0, "end": len(flat) if not barrier else 0}
    go = threading.Condition(lock)
    done = [0]
    alive = [True]

    def worker(k: int) -> None:
        with memoryview(bufs[k]) as mv:
            while True:
                with go:
                    while state["i"] >= state["end"] and alive[0]:
                        go.wait()
                    if not alive[0] and state["i"] >= state["end"]:
                        return
                    i = state["i"]
                    state["i"] += 1
                off, n = flat[i]
                os.preadv(fd, [mv[:n]], off)
                with go:
                    done[0] += 1
                    go.notify_all()

    ths = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in ths:
        t.start()
    t0 = time.perf_counter()
    if barrier:
        for c in range(len(reqs)):
            with go:
                state["end"] = bounds[c + 1]
                go.notify_all()
                while done[0] < bounds[c + 1]:
                    go.wait()
    else:
        with go:
            while done[0] < len(flat):
                go.wait()
    dt = time.perf_counter() - t0
    with go:
        alive[0] = False
        go.notify_all()
    for t in ths:
        t.join()
    return dt


def _burner(kind: str, stop: threading.Event) -> None:
    if kind == "mlx":
        import mlx.core as mx  # noqa: PLC0415 - only the mlx burner needs it

        a = mx.random.normal((384, 384))
        while not stop.is_set():
            mx.eval(a @ a)
    else:
        x = 0
        while not stop.is_set():
            for i in range(2000):
                x += i * i


def replay(path: Path, modes: List[str], threads: int, repeat: int, depth: int, burn: int = 0,
           burn_kind: str = "python") -> None:
    from ..storage.probe import load_cached_choice, load_cached_gap, probe_file  # noqa: PLC0415

    layers, ids_list, root, ntok = _load(path)
    files = open_flash(root)
    t, chunk = load_cached_choice(root)
    threads = threads or t
    gap = load_cached_gap(root, threads, 512)
    rd = FlashReader(files, threads=threads, chunk_bytes=chunk, max_gap_bytes=gap)
    plain = FlashReader(files, threads=threads, chunk_bytes=chunk, max_gap_bytes=gap, favour_threads=False)
    reqs = _requests(rd, layers, ids_list)
    nbytes = sum(b - a for lo, hi in reqs for a, b in zip(lo, hi))
    nreq = sum(len(lo) for lo, _ in reqs)
    mean = nbytes / max(1, nreq)
    print(f"{len(layers)} calls ({len(layers) / ntok:.0f}/token), {nreq} requests ({nreq / len(layers):.1f}/call), "
          f"mean request {mean / 1e3:.1f} KB, {nbytes / ntok / 1e6:.1f} MB/token; threads {threads}, "
          f"chunk {chunk}, gap {rd.max_gap_bytes}, alignment {rd.alignment}; threads favoured: "
          f"{rd.thread_priority or 'no'}; burn {burn} {burn_kind}; load {os.getloadavg()[0]:.1f}")
    stop = threading.Event()
    burners = [threading.Thread(target=_burner, args=(burn_kind, stop), daemon=True) for _ in range(burn)]
    for b in burners:
        b.start()
    outs = [np.empty((len(ids), rd.bundle_bytes), dtype=np.uint8) for ids in ids_list]
    f = open_uncached(files.ffn_path)
    res: dict = {}
    splits: dict = {}
    for _ in range(repeat):
        for mode in modes:
            rd.reset_totals()
            plain.reset_totals()
            reader = plain if mode.startswith("reader-plain") else rd
            if mode in ("reader", "reader-plain"):
                t0 = time.perf_counter()
                for lay, ids, o in zip(layers, ids_list, outs):
                    reader.read(lay, ids, o)
                dt = time.perf_counter() - t0
            elif mode in ("reader-async", "reader-plain-async"):
                t0 = time.perf_counter()
                pend: List = []
                for lay, ids, o in zip(layers, ids_list, outs):
                    pend.append(reader.submit(lay, ids, o))
                    if len(pend) >= depth:
                        pend.pop(0).wait()
                for h in pend:
                    h.wait()
                dt = time.perf_counter() - t0
            elif mode in ("raw-barrier", "raw-stream"):
                dt = _raw(f.fd, reqs, threads, mode == "raw-barrier", rd.chunk_bytes)
            elif mode == "probe":
                gb = probe_file(files.ffn_path, int(mean), threads, 1.0)
                dt = nbytes / gb / 1e9
            else:
                raise SystemExit(f"unknown mode {mode}")
            res.setdefault(mode, []).append(nbytes / dt / 1e9)
            if mode.startswith("reader"):  # the reader's own figure: time a read thread was at work
                tot = reader.reset_totals()
                res.setdefault(mode + " (reading)", []).append(tot.service_gbps)
                for k, v in tot.split().items():
                    splits.setdefault(mode, {}).setdefault(k, []).append(v)
    pr = np.median(res["probe"]) if "probe" in res else None
    for mode, v in res.items():
        g = float(np.median(v))
        share = f"{g / pr:5.0%} of probe" if pr else ""
        print(f"{mode:24s} {g:5.2f} GB/s  {share}  ms/token {nbytes / ntok / g / 1e6:6.2f}  runs "
              + " ".join(f"{x:.2f}" for x in v))
    for mode, d in splits.items():
        print(f"{mode:24s} " + " ".join(f"{k} {float(np.median(v)):.2f}" for k, v in d.items()))
    print(f"load {os.getloadavg()[0]:.1f}")
    stop.set()
    for b in burners:
        b.join()
    f.close()
    rd.close()
    plain.close()


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mlx_flash.bench.reader_replay", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trace")
    t.add_argument("out", type=Path)
    t.add_argument("--model")
    t.add_argument("--tokens", type=int, default=16)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--budget", type=float, default=0.5)
    t.add_argument("--active", default="predictor")
    t.add_argument("--pipeline", action="store_true")
    r = sub.add_parser("replay")
    r.add_argument("trace", type=Path)
    r.add_argument("--modes", default="probe,reader,raw-barrier,raw-stream")
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--repeat", type=int, default=3)
    r.add_argument("--depth", type=int, default=1)
    r.add_argument("--burn", type=int, default=0, help="CPU-bound threads beside the replay")
    r.add_argument("--burn-kind", choices=("python", "mlx"), default="python")
    a = ap.parse_args(argv)
    if a.cmd == "trace":
        trace(a.model, a.out, a.tokens, a.warmup, a.budget, a.active, a.pipeline)
    else:
        replay(a.trace, a.modes.split(","), a.threads, a.repeat, a.depth, a.burn, a.burn_kind)


if __name__ == "__main__":
    main()
