"""Neuron order on disk: which neuron's bundle sits where in each layer of ``ffn.bin``.

The FFN's output does not depend on the order of its neurons, so any per-layer
permutation applied *consistently* to everything indexed by neuron (the bundles in
``ffn.bin``: gate/up rows and down columns; the predictors' output columns
``B[:, i]`` and biases ``b[i]``; the calibrated ``frequencies``) gives the same model.
What changes is the disk: a token's missing neurons are read in aligned blocks and
coalesced runs (``storage.reader``), so neurons that are needed together or often
can be placed next to each other to make fewer, longer reads with less padding.

Orders (:func:`compute_order`), per layer, ``perm[p]`` = the neuron (in the folder's
current numbering) that goes to position ``p``:

* ``identity``: as the source model has them (and, on a reordered folder, the way
  back to the source's order: :func:`restore_perms`);
* ``hot``: by calibrated activation frequency, most frequent first (PowerInfer-2's
  hot/cold split, needs only the stored ``frequencies``);
* ``coact``: a greedy chain through the co-activation graph (Ripple-style placement):
  start at the most frequent neuron, always append the unplaced neuron with the
  highest Jaccard co-activation with the last placed one; needs per-token active
  sets (a calibration trace).

:func:`replay_reads` measures an order before it is applied: the per-token active
sets of a recorded trace (:mod:`mlx_flash.traces`), renumbered, replayed through a
real ``LayerCache`` under a budget and policy, with the reader's own coalescing
(``neuron_cache.ReadModel``): bytes read, bytes useful, read requests.

:func:`reorder_flash` rewrites a flash folder in the chosen order (a new folder built
aside and published by rename, :mod:`mlx_flash.atomic`: a killed or failed reorder
leaves the old folder as it was); the manifest's ``neuron_order``
(``storage.format``) records the permutation from the source's numbering, so a
reordered folder is recognised and every id can be mapped back.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .atomic import FolderBuild
from .neuron_cache import CachePolicy, LayerCache, ReadModel, hot_ids
from .predictor import (
    PREDICTOR_FILE,
    PredictorWeights,
    load_frequencies,
    load_predictors,
    predictor_info,
    save_predictors,
)
from .progress import ProgressCallback, report, scaled
from .storage.format import (
    MANIFEST_FILE,
    UPDOWN_FIELD,
    UPDOWN_FILE,
    encode_neuron_order,
    file_checksum,
    neuron_perms,
    open_flash,
    validate_manifest,
    verify_checksums,
    write_permuted_ffn,
    write_updown,
)
from .storage.reader import coalesced_runs
from .traces import Trace

ORDERS = ("identity", "hot", "coact")
"""Order methods :func:`compute_order` knows."""


# ----------------------------------------------------------------------------- orders
def hot_order(frequencies: np.ndarray) -> np.ndarray:
    """One layer's neurons by frequency, most frequent first (ties: lower id first)."""
    f = np.asarray(frequencies, dtype=np.float64).reshape(-1)
    return np.argsort(-f, kind="stable").astype(np.int64)


def coactivation_order(active: np.ndarray) -> np.ndarray:
    """One layer's greedy co-activation chain from a (tokens, n) bool matrix of active sets.

    Jaccard similarity ``|i and j| / |i or j|`` over the tokens; the chain starts at the
    most frequent neuron and always appends the unplaced neuron most similar to the last
    one placed (ties: the more frequent, then lower id). Neurons never active end the
    chain in id order. O(n^2) memory and time (n = 11,008: ~0.5 GB float32)."""
    a = np.asarray(active, dtype=bool)
    if a.ndim != 2:
        raise ValueError(f"active sets must be a (tokens, n) bool matrix, got shape {a.shape}")
    n = a.shape[1]
    af = a.astype(np.float32)
    cnt = af.sum(axis=0)
    inter = af.T @ af
    union = cnt[:, None] + cnt[None, :] - inter
    sim = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    sim += (cnt / max(1.0, float(cnt.max())) * 1e-6)[None, :]  # ties: the more frequent
    np.fill_diagonal(sim, -1.0)
    live = np.flatnonzero(cnt > 0)
    order: List[int] = []
    if len(live):
        placed = np.zeros(n, dtype=bool)
        placed[cnt == 0] = True
        cur = int(live[np.argmax(cnt[live])])
        for _ in range(len(live)):
            order.append(cur)
            placed[cur] = True
            row = np.where(placed, -np.inf, sim[cur])
            cur = int(np.argmax(row))
            if not np.isfinite(row[cur]):
                break
    order.extend(np.flatnonzero(cnt == 0).tolist())
    return np.asarray(order, dtype=np.int64)


def compute_order(method: str, *, n_layers: int, n_neurons: int, frequencies: Optional[np.ndarray] = None,
                  active_sets: Optional[Sequence[np.ndarray]] = None,
                  progress: Optional[ProgressCallback] = None) -> np.ndarray:
    """Per-layer permutations ``(n_layers, n_neurons)`` int64 for ``method`` (see :data:`ORDERS`).

    ``frequencies``: (n_layers, n) calibrated frequencies (``hot``).
    ``active_sets``: per layer a (tokens, n) bool matrix (``coact``)."""
    if method not in ORDERS:
        raise ValueError(f"unknown neuron order {method!r}: choose one of {', '.join(ORDERS)}")
    if method == "identity":
        return np.tile(np.arange(n_neurons, dtype=np.int64), (n_layers, 1))
    if method == "hot":
        if frequencies is None:
            raise ValueError("the 'hot' order needs calibrated frequencies: calibrate the model first")
        f = np.asarray(frequencies)
        if f.shape != (n_layers, n_neurons):
            raise ValueError(f"frequencies have shape {f.shape}, expected {(n_layers, n_neurons)}")
        return np.stack([hot_order(f[i]) for i in range(n_layers)])
    if active_sets is None or len(active_sets) != n_layers:
        raise ValueError("the 'coact' order needs per-layer active sets of calibration tokens")
    out = []
    for i in range(n_layers):
        report(progress, i / n_layers, f"co-activation order: layer {i + 1}/{n_layers}")
        out.append(coactivation_order(active_sets[i]))
    report(progress, 1.0, "co-activation order: done")
    return np.stack(out)


def inverse(perms: np.ndarray) -> np.ndarray:
    """``inv[l][perm[l][p]] = p``: the new position of each old neuron id."""
    perms = np.asarray(perms, dtype=np.int64)
    inv = np.empty_like(perms)
    rows = np.arange(perms.shape[0])[:, None]
    inv[rows, perms] = np.arange(perms.shape[1], dtype=np.int64)[None, :]
    return inv


def check_perms(perms: np.ndarray, n_layers: int, n_neurons: int) -> np.ndarray:
    """``perms`` as (n_layers, n_neurons) int64; ValueError unless each row is a permutation."""
    p = np.asarray(perms)
    if p.shape != (n_layers, n_neurons) or not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"a neuron order must be ({n_layers}, {n_neurons}) integers, got {p.dtype} {p.shape}")
    p = p.astype(np.int64)
    if not (np.sort(p, axis=1) == np.arange(n_neurons)[None, :]).all():
        raise ValueError("a neuron order must hold every neuron of each layer exactly once")
    return p


# ----------------------------------------------------------------------------- measuring
@dataclass
class ReadFigures:
    """What replaying active sets through the cache and the reader's coalescing costs."""

    tokens: int = 0
    bytes_read: int = 0
    bytes_useful: int = 0
    requests: int = 0
    hits: int = 0
    active: int = 0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / self.tokens if self.tokens else 0.0

    @property
    def amplification(self) -> float:
        """Bytes read / bytes needed (alignment padding and coalesced gaps)."""
        return self.bytes_read / self.bytes_useful if self.bytes_useful else 0.0

    @property
    def requests_per_token(self) -> float:
        return self.requests / self.tokens if self.tokens else 0.0

    @property
    def mean_request_bytes(self) -> float:
        return self.bytes_read / self.requests if self.requests else 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.active if self.active else 0.0

    def to_dict(self) -> Dict[str, float]:
        return {"tokens": self.tokens, "bytes_read": self.bytes_read, "bytes_useful": self.bytes_useful,
                "requests": self.requests, "bytes_per_token": self.bytes_per_token,
                "amplification": self.amplification, "requests_per_token": self.requests_per_token,
                "mean_request_bytes": self.mean_request_bytes, "hit_rate": self.hit_rate}


def _read_cost(rm: ReadModel, ids: np.ndarray, breaks: np.ndarray) -> tuple:
    """(bytes, requests) of one token's reads: the reader's coalesced runs, split at its chunk size."""
    if len(ids) == 0:
        return 0, 0
    lo, hi = coalesced_runs(np.asarray(ids, dtype=np.int64) * rm.bundle_bytes, rm.bundle_bytes, rm.alignment,
                            rm.max_gap_bytes, breaks)
    size = hi - lo
    return int(size.sum()), int((-(-size // rm.chunk_bytes)).sum())


def replay_reads(trace, capacity: int, read_model: ReadModel, *, perms: Optional[np.ndarray] = None,
                 policy: Union[str, CachePolicy] = "lru", frequencies: Optional[np.ndarray] = None,
                 window: int = 5, warmup: int = 1, layers: Optional[Sequence[int]] = None) -> ReadFigures:
    """Replay ``trace``'s per-token active sets (a :class:`~mlx_flash.traces.Trace`, ids in
    the source numbering) through one real ``LayerCache`` per layer of ``capacity`` rows, with
    the neurons placed on disk by ``perms`` (None: as numbered), and count the reads the
    reader would issue (``read_model``: its alignment, gap coalescing, chunk size; a token's
    loads in one read call, its overflow in scratch-sized calls, as ``SparseFFN`` does).

    ``frequencies`` (source numbering) pin hot neurons for the ``hot`` / ``hot+window``
    policies. The first ``warmup`` tokens fill the cache and are not counted."""
    pol = policy if isinstance(policy, CachePolicy) else CachePolicy.make(policy)
    n = trace.n_neurons
    inv = inverse(perms) if perms is not None else None
    out = ReadFigures()
    for li in (range(trace.n_layers) if layers is None else layers):
        c = LayerCache(n, capacity, 1, mx.uint8, window, pol.lazy)
        k = pol.pinned_rows(c.capacity)
        if k:
            if frequencies is None:
                raise ValueError(f"cache policy {pol.name!r} needs the neurons' frequencies")
            hot = hot_ids(frequencies[li], k)
            c.pin(np.sort(inv[li][hot]) if inv is not None else hot)
        for t, tok in enumerate(trace.tokens):
            ids = np.asarray(tok[li], dtype=np.int64)
            if inv is not None:
                ids = np.sort(inv[li][ids])
            plan = c.step(ids)
            if t < warmup:
                continue
            n_load, ks = len(plan.load_ids), read_model.stream_rows
            breaks = np.arange(n_load, n_load + len(plan.overflow_ids), ks)
            b, r = _read_cost(read_model, np.concatenate([plan.load_ids, plan.overflow_ids]), breaks)
            out.bytes_read += b
            out.requests += r
            out.bytes_useful += (n_load + len(plan.overflow_ids)) * read_model.bundle_bytes
            out.hits += len(plan.hit_ids)
            out.active += len(ids)
        out.tokens = max(out.tokens, len(trace.tokens) - warmup)
    return out


def permute_trace(trace, perms: np.ndarray):
    """``trace`` renumbered for a folder reordered by ``perms`` (ids sorted per token)."""
    inv = inverse(perms)
    toks = [[np.sort(inv[li][np.asarray(ids, dtype=np.int64)]) for li, ids in enumerate(tok)] for tok in trace.tokens]
    return Trace(trace.n_layers, trace.n_neurons, toks, dict(trace.meta))




# ----------------------------------------------------------------------------- applying
def source_perms(manifest) -> np.ndarray:
    """The folder's permutation from the source's numbering (identity when never reordered)."""
    p = neuron_perms(manifest)
    if p is None:
        return np.tile(np.arange(manifest.intermediate_size, dtype=np.int64), (manifest.num_layers, 1))
    return p


def restore_perms(manifest) -> np.ndarray:
    """The permutation (in the folder's current numbering) that puts the neurons back in the
    source model's order: ``reorder_flash(path, restore_perms(m), "source")``."""
    return inverse(source_perms(manifest))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # unchanged files: a hard link costs no space and no time
    except OSError:
        shutil.copy2(src, dst)


def reorder_flash(path: Union[str, Path], perms: np.ndarray, method: str, *,
                  calibration: Optional[Tuple[PredictorWeights, Dict[str, Any]]] = None,
                  progress: Optional[ProgressCallback] = None, **info) -> Path:
    """Rewrite the flash folder ``path`` with each layer's neurons permuted by ``perms``
    ((n_layers, n), in the folder's current numbering: position ``p`` gets neuron
    ``perms[l][p]``), consistently everywhere: ``ffn.bin``'s bundles (via
    ``storage.format.write_permuted_ffn``), the predictors' ``B`` columns, ``b`` and
    ``frequencies``; the manifest gets the new layer checksums, the predictor file's new
    checksum and id, and ``neuron_order`` (the permutation composed with any earlier one,
    from the source's numbering; ``method`` and ``info`` recorded with it; a composition that
    gives the source's order back clears it).

    The new folder is built beside ``path`` (unchanged files hard-linked), checked against
    its checksums and published by rename (:class:`mlx_flash.atomic.FolderBuild`): killed or
    failed at any point, ``path`` stays as it was. ``progress`` returning False cancels.

    ``calibration``: a new calibration's ``(weights, manifest predictors record)`` (the folder's
    current numbering) to store, permuted, instead of the folder's predictors: calibration and
    order published together (``calibrate(order=...)``)."""
    root = Path(path).expanduser()
    files = open_flash(root)
    m = files.manifest
    perms = check_perms(perms, m.num_layers, m.intermediate_size)
    total = source_perms(m)[np.arange(m.num_layers)[:, None], perms]
    pinfo: Dict[str, Any] = dict(calibration[1]) if calibration is not None else (predictor_info(m) or {})
    pfile = root / str(pinfo.get("file", PREDICTOR_FILE)) if pinfo or calibration is not None else None
    need = m.ffn_size + (pfile.stat().st_size if pfile is not None and pfile.is_file() else 0)
    build = FolderBuild(root, overwrite=True, need=need, what=f"the reordered {root.name}")
    try:
        tmp = build.tmp
        for f in sorted(root.iterdir()):
            if (f.is_file() and f.name not in (m.ffn_file, MANIFEST_FILE, UPDOWN_FILE)
                    and (pfile is None or f != pfile)):
                _link_or_copy(f, tmp / f.name)
        m.layers = write_permuted_ffn(files, perms, tmp / m.ffn_file, progress=scaled(progress, 0.0, 0.6))
        if pfile is not None and (calibration is not None or pfile.is_file()):
            report(progress, 0.6, "predictors")
            w = calibration[0] if calibration is not None else load_predictors(
                pfile, num_layers=m.num_layers, hidden_size=m.hidden_size, n_neurons=m.intermediate_size,
                file_id=pinfo.get("id"), rank=pinfo.get("rank"))
            pm = [mx.array(perms[i]) for i in range(m.num_layers)]
            w = PredictorWeights(list(w.A), [mx.take(B, p, axis=1) for B, p in zip(w.B, pm)],
                                 [mx.take(b, p, axis=0) for b, p in zip(w.b, pm)],
                                 None if w.frequencies is None else np.take_along_axis(w.frequencies, perms, axis=1),
                                 None if w.gate_scales is None else np.take_along_axis(w.gate_scales, perms, axis=1))
            mx.eval(w.B, w.b)
            new_id = uuid.uuid4().hex
            save_predictors(tmp / pfile.name, w, file_id=new_id)
            m.predictors = {**pinfo, "id": new_id}
            m.checksums[pfile.name] = file_checksum(tmp / pfile.name)
        identity = bool((total == np.arange(m.intermediate_size)[None, :]).all())
        m.neuron_order = None if identity else encode_neuron_order(
            total, method, created=datetime.now(timezone.utc).isoformat(timespec="seconds"), **info)
        split = m.extra.pop(UPDOWN_FIELD, None)  # gate-first's up/down side file follows ffn.bin: rewritten
        validate_manifest(m, str(root / MANIFEST_FILE))
        m.save(tmp / MANIFEST_FILE)
        if split is not None:
            report(progress, 0.65, "up/down side file")
            write_updown(open_flash(tmp), split["drop"])
        report(progress, 0.7, "checking the checksums")
        verify_checksums(open_flash(tmp), progress=scaled(progress, 0.7, 0.999))
        report(progress, 1.0, "publishing")  # the last chance to cancel
    except BaseException as e:
        if (t := build.fail(e)) is e:
            raise
        raise t from e
    return build.publish()


def order_flash(path: Union[str, Path], order: str = "hot", *,
                calibration: Optional[Tuple[PredictorWeights, Dict[str, Any]]] = None,
                progress: Optional[ProgressCallback] = None) -> Optional[Path]:
    """Put the flash folder's neurons in ``order``: ``"hot"`` (by the calibrated frequencies,
    most frequent first: needs a calibrated folder, or ``calibration``) or ``"source"`` (back
    to the source model's order). Returns the folder, or None when it already is in that
    order (nothing written, ``calibration`` included: save it as usual). ``calibration``: a new
    calibration to store with the order, in one publish (see :func:`reorder_flash`)."""
    files = open_flash(Path(path).expanduser())
    m = files.manifest
    if order not in ("hot", "source"):
        raise ValueError(f"unknown neuron order {order!r}: choose 'hot' or 'source'")
    info: Dict[str, Any] = {}
    if order == "source":
        perms = restore_perms(m)
    else:
        freq = calibration[0].frequencies if calibration is not None else load_frequencies(files)
        if freq is None:
            raise ValueError(f"{files.root}: the 'hot' order needs calibrated frequencies: run `mlx-flash calibrate` "
                             "first")
        perms = compute_order("hot", n_layers=m.num_layers, n_neurons=m.intermediate_size, frequencies=freq)
        info["basis"] = "calibrated frequencies, most frequent first"
    if (perms == np.arange(m.intermediate_size)[None, :]).all():
        return None
    return reorder_flash(files.root, perms, order, calibration=calibration, progress=progress, **info)



__all__ = [
    "ORDERS",
    "ReadFigures",
    "check_perms",
    "coactivation_order",
    "compute_order",
    "hot_order",
    "inverse",
    "order_flash",
    "permute_trace",
    "reorder_flash",
    "replay_reads",
    "restore_perms",
    "source_perms",
]
