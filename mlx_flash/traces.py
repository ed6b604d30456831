"""Active-neuron traces: which FFN neurons each generated token used, per layer.

A :class:`Trace` is recorded on a real model (:func:`record`, or :func:`recording`
around any generation of a flash engine) and replayed elsewhere: the speed
test's large-shape runs (``mlx-flash bench --shape 7b``) drive the real
``NeuronCache`` + ``FlashReader`` + ``SparseFFN`` of a bigger random model with
the recorded per-token active sets, so its I/O pattern has the real model's
sparsity and reuse from token to token.

Only decode steps (one token per forward pass) are recorded; the prompt's
prefill pass is not.

Scaling to a wider FFN (:meth:`Trace.scaled`): each source neuron ``j`` of ``n``
stands for a group of ``N/n`` target neurons (``floor(N/n)`` or ``ceil``), and the
groups are scattered over the target layer by a fixed random permutation per
layer ("permuted", the default):

    target neuron ``perm[k]`` copies source neuron ``k * n // N``

so a target neuron is active exactly when its source neuron is. This keeps, per
layer and token, the fraction of active neurons (up to rounding of group sizes:
the sparsity), the fraction shared with the previous tokens (the window reuse,
hence the cache's hit rate) and the hot/cold skew of neuron frequencies, while
active neurons land at random file positions like independent neurons of a
real model (no artificial runs of neighbours that would make the reads look
better than they are). What it does not keep: a real wide model's neurons do not
fire in groups of 7; within a token that only changes which neurons, not how
many or where on disk. ``mode="block"`` maps source ``j`` to the contiguous block
``[j*N//n, (j+1)*N//n)`` instead (neighbours fire together: optimistic for I/O,
for comparison).

Layers: a target with ``L`` layers takes recorded layers evenly spaced over the
source's depth (``round(i * (S-1) / (L-1))``), so shallow (sparser) and deep
layers are both represented; with more target layers than recorded ones,
layers repeat.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from .sparse_ffn import SparseFFN

TRACE_VERSION = 1


@dataclass
class Trace:
    """Per-token, per-layer active neuron ids (sorted, unique int64 arrays).

    ``tokens[t][l]`` is the active set of generated token ``t`` in layer ``l``.
    """

    n_layers: int
    n_neurons: int
    tokens: List[List[np.ndarray]] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.tokens)

    def active(self, token: int, layer: int) -> np.ndarray:
        return self.tokens[token][layer]

    # ------------------------------------------------------------ measures
    def density(self) -> float:
        """Mean fraction of a layer's neurons active per token (1 - sparsity)."""
        if not self.tokens:
            return 0.0
        return float(np.mean([len(ids) for tok in self.tokens for ids in tok]) / self.n_neurons)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density()

    def reuse(self, window: int = 1) -> float:
        """Mean fraction of a token's active neurons that were active in one of the
        previous ``window`` tokens (same layer); tokens without a predecessor are
        left out. The higher, the more a sliding-window cache hits."""
        fr = []
        for li in range(self.n_layers):
            seen: List[np.ndarray] = []
            for tok in self.tokens:
                ids = tok[li]
                if seen and len(ids):
                    prev = np.unique(np.concatenate(seen[-window:]))
                    fr.append(np.isin(ids, prev, assume_unique=True).mean())
                seen.append(ids)
        return float(np.mean(fr)) if fr else 0.0

    def new_fraction(self, window: int = 5) -> float:
        """Mean fraction of the layer's neurons a token must newly load when the
        last ``window`` tokens' neurons are cached (the paper's 'newly loaded')."""
        fr = []
        for li in range(self.n_layers):
            seen: List[np.ndarray] = []
            for tok in self.tokens:
                ids = tok[li]
                if seen:
                    prev = np.unique(np.concatenate(seen[-window:]))
                    fr.append((~np.isin(ids, prev, assume_unique=True)).sum() / self.n_neurons)
                seen.append(ids)
        return float(np.mean(fr)) if fr else 0.0

    def summary(self) -> Dict[str, Any]:
        return {
            "tokens": len(self),
            "layers": self.n_layers,
            "neurons": self.n_neurons,
            "sparsity": self.sparsity,
            "reuse_last_token": self.reuse(1),
            "new_per_token_window5": self.new_fraction(5),
        }

    # ------------------------------------------------------------ scaling
    def scaled(self, n_neurons: int, n_layers: Optional[int] = None, *, mode: str = "permuted",
               seed: int = 0) -> "Trace":
        """This trace mapped onto ``n_layers`` layers of ``n_neurons`` neurons
        (see the module docstring for the mapping and what it keeps)."""
        N, n = int(n_neurons), self.n_neurons
        L = int(n_layers or self.n_layers)
        if N < 1 or L < 1:
            raise ValueError("n_neurons and n_layers must be >= 1")
        if mode not in ("permuted", "block"):
            raise ValueError(f"mode must be 'permuted' or 'block', got {mode!r}")
        S = self.n_layers
        src_layers = [int(round(i * (S - 1) / (L - 1))) if L > 1 else 0 for i in range(L)]
        # targets of each source neuron: k in [starts[j], starts[j+1]) has source j
        starts = (np.arange(n + 1, dtype=np.int64) * N + n - 1) // n  # first k with k*n//N == j
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(N) if mode == "permuted" else np.arange(N) for _ in range(L)]
        out: List[List[np.ndarray]] = []
        for tok in self.tokens:
            row = []
            for li in range(L):
                ids = tok[src_layers[li]]
                lo, hi = starts[ids], starts[ids + 1]
                cnt = hi - lo
                ks = np.repeat(lo - np.cumsum(cnt) + cnt, cnt) + np.arange(int(cnt.sum()))
                row.append(np.sort(perms[li][ks]).astype(np.int64))
            out.append(row)
        meta = dict(self.meta)
        meta.update({"scaled_from": {"layers": S, "neurons": n}, "scale_mode": mode, "scale_seed": seed,
                     "source_layers": src_layers})
        return Trace(L, N, out, meta)

    # ------------------------------------------------------------ files
    def save(self, path: Union[str, Path]) -> Path:
        """Write an ``.npz`` (ids concatenated + offsets; meta as JSON)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = [ids for tok in self.tokens for ids in tok]
        lengths = np.array([len(a) for a in flat], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.concatenate(flat).astype(np.int32) if flat else np.zeros(0, np.int32)
        header = {"version": TRACE_VERSION, "n_layers": self.n_layers, "n_neurons": self.n_neurons,
                  "n_tokens": len(self.tokens), "meta": self.meta}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, ids=ids, offsets=offsets, header=np.array(json.dumps(header)))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Trace":
        with np.load(Path(path), allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            ids, offsets = z["ids"].astype(np.int64), z["offsets"]
        if header.get("version") != TRACE_VERSION:
            raise ValueError(f"{path}: trace version {header.get('version')}, expected {TRACE_VERSION}")
        L, T = int(header["n_layers"]), int(header["n_tokens"])
        if len(offsets) != T * L + 1:
            raise ValueError(f"{path}: {len(offsets) - 1} active sets, expected {T} tokens x {L} layers")
        tokens = [[ids[offsets[t * L + li]: offsets[t * L + li + 1]] for li in range(L)] for t in range(T)]
        return cls(L, int(header["n_neurons"]), tokens, dict(header.get("meta") or {}))


# ---------------------------------------------------------------------- replaying
class ReplayChooser:
    """A chooser (``mlx_flash.active.Chooser`` protocol) that returns a trace's
    recorded active set of the current token: set :attr:`token` before each
    token's forward pass. For one-token passes only (no per-token mask)."""

    name = "replay"
    resident_bytes = 0
    computes_gate = False

    def __init__(self, trace: Trace):
        self.trace = trace
        self.token = 0

    def choose(self, layer: int, x) -> Tuple[np.ndarray, None]:
        if x.shape[0] != 1:
            raise ValueError("ReplayChooser replays one token per forward pass")
        return self.trace.tokens[self.token][layer], None


# ---------------------------------------------------------------------- recording
class _Recorder:
    """Wraps a chooser; records the ids it returns for one-token forward passes."""

    def __init__(self, inner, trace: Trace):
        self.inner = inner
        self.name = inner.name
        self.trace = trace
        self._row: Optional[List[Optional[np.ndarray]]] = None

    @property
    def resident_bytes(self) -> int:
        return self.inner.resident_bytes

    def choose(self, layer, x):
        ids, mask = self.inner.choose(layer, x)
        if x.shape[0] == 1:
            if layer == 0 or self._row is None:
                self._row = [None] * self.trace.n_layers
                self.trace.tokens.append(self._row)
            self._row[layer] = np.array(ids, dtype=np.int64, copy=True)
        return ids, mask

    def __getattr__(self, name):  # anything else a chooser offers
        return getattr(self.inner, name)


def _sparse_states(engine) -> List[Any]:
    return [m._state for m in engine.model.modules() if isinstance(m, SparseFFN)]


@contextmanager
def recording(engine) -> Iterator[Trace]:
    """Record the active sets of every one-token forward pass of ``engine`` (a
    flash engine) while the block runs. Yields the :class:`Trace` being filled."""
    if not engine.is_flash:
        raise ValueError("traces are recorded on a flash engine (a dense engine has no active sets)")
    m = engine.files.manifest
    trace = Trace(m.num_layers, m.intermediate_size,
                  meta={"model": engine.name, "chooser": engine.chooser.name,
                        "sparsity": getattr(engine.chooser, "sparsity", None)})
    rec = _Recorder(engine.chooser, trace)
    states = _sparse_states(engine)
    old = [s.chooser for s in states]
    for s in states:
        s.chooser = rec
    try:
        yield trace
    finally:
        for s, c in zip(states, old):
            s.chooser = c
        # a cancelled generation may leave a half-filled last token
        trace.tokens[:] = [row for row in trace.tokens if all(a is not None for a in row)]


def record(engine, prompt, tokens: int, **generate_kw) -> Trace:
    """Generate from ``prompt`` on ``engine`` (greedy unless ``generate_kw`` says otherwise)
    and return the active sets of ``tokens`` one-token passes (``tokens + 1`` tokens are
    generated: the first comes from the prompt's last chunk, ``Engine.generate_step``)."""
    with recording(engine) as trace:
        for _ in engine.stream_generate(prompt, tokens + 1, **generate_kw):
            pass
    trace.meta["prompt_tokens"] = len(engine.encode(prompt))
    return trace


__all__ = ["ReplayChooser", "Trace", "record", "recording", "TRACE_VERSION"]
