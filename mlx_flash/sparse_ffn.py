"""SparseFFN: one layer's feed-forward network computed from flash, neuron by neuron.

Per forward pass (see docs/ARCHITECTURE.md):

1. the chooser says which neurons are active for these tokens   (predictor time);
   a gate-first chooser (``gate_first.GateFirst``) computes the gate product here and
   the FFN reuses it: the cache then holds only up/down rows
2. the layer's neuron cache says which of them are missing; it makes room by
   swap-deleting neurons outside the sliding window and appends new ones
3. the reader fills the appended rows straight from disk          (I/O time)
   — active neurons that do not fit in the cache are streamed through the
   shared scratch buffer in chunks and never cached; while the engine reads a
   prompt with every neuron (exact prefill) they are read in one large read into
   the transient staging rows (``NeuronCache.prefill_rows``) and multiplied in one batch
4. ``y = down_active · (act(gate_active · x) * (up_active · x))``  (compute time)

The bundle's columns follow ``storage.format.bundle_layout``: per-neuron biases
(OPT's fc1 bias, llama's ``mlp_bias``) sit inside the bundle, ungated FFNs (OPT:
``fc2 · relu(fc1 · x + b)``) have no up part, dReLU applies ReLU to up too, and the
output projection's bias (one vector per layer) is a dense parameter added by
:meth:`SparseFFN.add_output_bias`.

Quantized bundles (flash format v2): the cache rows hold per role the packed words,
scales and biases (``role``, ``role.scales``, ``role.biases``); gate/up are multiplied
with ``mx.quantized_matmul(x, W, transpose=True)`` (rows = output features), down with
``h @ W`` (``transpose=False``: the rows are ``down_proj.weight.T`` quantized along
hidden), in ``quantized.compute_dtype`` (float32 on the CPU).

With every neuron active the result equals the dense FFN.
"""

from __future__ import annotations

import time
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .active import AllNeurons, Chooser, gated_activation
from .neuron_cache import stream_chunk_rows
from .pipeline import DENSE_LOOKAHEAD_SHARE
from .predictor import PredictorChooser
from .quantized import qmatmul, use_quantized_matmul
from .stats import FFNCounters
from .storage.format import unit_dequantize


class _OutputBias(nn.Module):
    """Holds the output projection's dense bias under the dense model's key name
    (``...mlp.down_proj.bias``, ``...mlp.fc2.bias``)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.bias = mx.zeros((hidden,))


class SparseFFN(nn.Module):
    """Drop-in replacement for an mlx-lm ``MLP`` whose weights live on disk.

    layout: ``storage.format.bundle_layout(manifest)``; None means the plain
        ``[gate | up | down]`` bundle of ``hidden`` elements each.
    act, act_param: the FFN activation (``active.activation``); ``drelu`` also applies
        ReLU to the up projection.
    quant: ``storage.format.role_quantization(manifest)``: the quantized roles (empty: float).
    compute_dtype: activation/scale dtype of the quantized matmuls (``quantized.compute_dtype``).
    verifier: a ``storage.verify.BackgroundVerifier``: each pass waits until this layer's
        region of ``ffn.bin`` is verified (at once after the first time) and raises its
        ``ChecksumError`` before the output is used.
    groups: down rows kept exactly (``storage.format.GROUPS_ALONG_FFN``): ``(scales, biases,
        position groups)``, this layer's resident group rows (stored dtype) and the group of the
        neuron at each position (``storage.format.ffn_groups``); None otherwise.
    """

    def __init__(self, layer: int, hidden: int, chooser: Chooser, cache, reader, scratch, counters: FFNCounters,
                 act: str = "silu", *, layout: Optional[dict] = None, act_param: Optional[float] = None,
                 quant: Optional[dict] = None, compute_dtype: Optional[mx.Dtype] = None, verifier=None,
                 groups: Optional[tuple] = None):
        super().__init__()
        if layout is None:
            layout = {"gate": (0, hidden), "up": (hidden, 2 * hidden), "down": (2 * hidden, 3 * hidden)}
        # Plain attributes (not arrays/lists): nn.Module keeps them out of the parameters.
        object.__setattr__(self, "_state", _State(layer, hidden, chooser, cache, reader, scratch, counters,
                                                  gated_activation(act, act_param), layout, quant or {},
                                                  compute_dtype, verifier, groups))
        object.__setattr__(self, "_out_bias", None)

    def add_output_bias(self, name: str) -> None:
        """Give this FFN a dense output bias, loaded as ``<name>.bias`` (e.g. ``down_proj``,
        ``fc2``) so the dense model's key name fits."""
        setattr(self, name, _OutputBias(self._state.hidden))
        object.__setattr__(self, "_out_bias", name)

    def __call__(self, x: mx.array) -> mx.array:
        y = self._state.forward(x)
        if self._out_bias is not None:
            y = y + getattr(self, self._out_bias).bias.astype(y.dtype)
        return y


def ffn_rows(x: mx.array, w: dict, role: str, rows_out: bool, quant: dict, cdtype: Optional[mx.Dtype]) -> mx.array:
    """``x @ rows.T`` (``rows_out``: gate/up, rows = output features) or ``x @ rows`` (down:
    rows = ``down_proj.weight.T``) for float rows or quantized ones (``w[role]`` packed words,
    ``w[role + ".scales"]``, ``w[role + ".biases"]``; ``quant[role]``: bits, group size, mode)."""
    q = quant.get(role)
    if q is None:
        return x @ (w[role].T if rows_out else w[role])
    cd = cdtype or w[f"{role}.scales"].dtype
    return qmatmul(x.astype(cd), w[role], w[f"{role}.scales"].astype(cd), w[f"{role}.biases"].astype(cd),
              transpose=rows_out, group_size=q["group_size"], bits=q["bits"], mode=q["mode"])


def grouped_down(h: mx.array, codes: mx.array, groups: np.ndarray, scales: mx.array, biases: mx.array,
                 q: dict, cdtype: Optional[mx.Dtype]) -> mx.array:
    """``h @ W`` for down rows kept exactly as the source quantized them, along the FFN dimension
    (``storage.format.GROUPS_ALONG_FFN``): row ``r`` of ``W`` is ``scales[g] * codes[r] + biases[g]``,
    ``g = groups[r]`` (numpy, the rows' source groups); ``codes`` ``(C, hidden * bits / 32)`` packed
    along hidden; ``scales``/``biases`` ``(n_groups, hidden)``, the layer's resident group rows.

    One token (``quantized.use_quantized_matmul``: 1-2 rows on the CPU, any on a GPU): the rows are
    laid out in a (group, group_size) grid (a group holds at most ``group_size`` neurons; empty cells
    get ``h = 0``), one ``mx.gather_qmm`` with unit scales gives each group's partial sums
    ``z[g] = h_g @ codes_g`` and ``y = sum_g scales[g] * z[g] + (sum h_g) * biases[g]``: no
    dequantized copy of the rows (measured on the 2-core CPU, 1,000 rows x 576, float32: 0.37 ms,
    against 0.15 ms for 8-bit re-quantized rows' ``quantized_matmul`` and ~1-2.5 ms for dequantizing
    the rows and scaling them by gathered group rows). Batches (CPU) dequantize the grid's rows, scale
    them by their group's rows (a broadcast, no gathered scale rows), take the rows back in ``h``'s
    order and multiply once (the batched rule of ``quantized.dequantized_matmul``)."""
    t, c = h.shape
    n_groups, hidden = scales.shape
    cd = cdtype or scales.dtype
    h, s, b = h.astype(cd), scales.astype(cd), biases.astype(cd)
    if c == 0:
        return mx.zeros((t, hidden), dtype=cd)
    gs = q["group_size"]
    order = np.argsort(groups, kind="stable")
    sorted_g = np.asarray(groups)[order]
    counts = np.bincount(sorted_g, minlength=n_groups)
    cell = sorted_g * gs + (np.arange(c) - (np.cumsum(counts) - counts)[sorted_g])
    rows = np.zeros(n_groups * gs, dtype=np.int32)
    rows[cell] = order
    w = mx.take(codes, mx.array(rows), axis=0)  # (grid, hidden * bits / 32)
    if not use_quantized_matmul(h):  # batches (CPU): the grid's rows dequantized, scaled per group, one matmul
        # after the activations: else MLX may dequantize every layer's rows up front (the model's whole
        # down projection in float32 at once; measured +87 MB peak on the default model's prompt)
        w = mx.depends(w, h)
        wd = unit_dequantize(w, q["bits"], cd).reshape(n_groups, gs, hidden) * s[:, None, :] + b[:, None, :]
        cell_of_row = np.empty(c, dtype=np.int32)
        cell_of_row[order] = cell
        return h @ mx.take(wd.reshape(n_groups * gs, hidden), mx.array(cell_of_row), axis=0)
    cols = np.full(n_groups * gs, c, dtype=np.int32)  # column c of the padded h: zero
    cols[cell] = order
    x = mx.take(mx.concatenate([h, mx.zeros((t, 1), dtype=cd)], axis=1), mx.array(cols), axis=1)  # (t, grid)
    x = x.reshape(t, n_groups, gs).transpose(1, 0, 2)  # (groups, tokens, group_size)
    ones = mx.ones((n_groups, gs, hidden // 32), dtype=cd)
    z = mx.gather_qmm(x, w.reshape(n_groups, gs, -1), ones, mx.zeros_like(ones), transpose=False, group_size=32,
                      bits=q["bits"])
    return mx.sum(z * s[:, None, :], axis=0) + x.sum(axis=-1).T @ b


def ffn_hidden(xt: mx.array, w: dict, mask: Optional[mx.array], *, gated, quant: dict,
               cdtype: Optional[mx.Dtype], g: Optional[mx.array] = None) -> mx.array:
    """``act(gate x) * up x`` of the neurons whose rows ``w`` holds (by role; ``up``,
    ``gate_bias``, ``up_bias`` when the model has them), optionally masked: the input of
    the down product (:func:`ffn_partial`). ``g``: the gate product of these neurons (bias
    included) when the chooser computed it already (``gate_first.GateFirst``); ``w`` then
    holds no gate rows."""
    if g is None:
        g = ffn_rows(xt, w, "gate", True, quant, cdtype)
        if "gate_bias" in w:
            g = g + w["gate_bias"][:, 0]
    u = None
    if "up" in w:
        u = ffn_rows(xt, w, "up", True, quant, cdtype)
        if "up_bias" in w:
            u = u + w["up_bias"][:, 0]
    h = gated(g, u)
    if mask is not None:
        h = h * mask.astype(h.dtype)
    return h


def ffn_partial(xt: mx.array, w: dict, mask: Optional[mx.array], *, gated, quant: dict,
                cdtype: Optional[mx.Dtype], g: Optional[mx.array] = None, groups=None) -> mx.array:
    """``down(act(gate x) * up x)`` over the neurons whose rows ``w`` holds (:func:`ffn_hidden`).
    ``groups``: for down rows kept exactly (``storage.format.GROUPS_ALONG_FFN``) ``(scales,
    biases, row groups)`` (:func:`grouped_down`)."""
    h = ffn_hidden(xt, w, mask, gated=gated, quant=quant, cdtype=cdtype, g=g)
    if groups is not None:
        return grouped_down(h, w["down"], groups[2], groups[0], groups[1], quant["down"], cdtype)
    return ffn_rows(h, w, "down", False, quant, cdtype)


class DenseFFN(nn.Module):
    """A flash layer's whole FFN in memory, as stored (quantized rows stay quantized): what
    ``engine.load(flash_dir, dense=True)`` runs for a quantized flash folder: the dense
    quantized model, with the same arithmetic as every neuron through :class:`SparseFFN`.
    ``segments``: ``storage.format.read_layer_segments``; parameters are named
    ``gate``, ``gate_scales``, ... (counted by the engine's resident bytes)."""

    def __init__(self, segments: dict, act: str, act_param: Optional[float], quant: dict,
                 compute_dtype: Optional[mx.Dtype], groups: Optional[tuple] = None):
        super().__init__()
        for name, a in segments.items():
            setattr(self, name.replace(".", "_"), a)
        object.__setattr__(self, "_names", list(segments))
        object.__setattr__(self, "_cfg", (gated_activation(act, act_param), quant, compute_dtype))
        object.__setattr__(self, "_groups", None if groups is None else groups[2])
        if groups is not None:  # exact down rows: the layer's group rows (parameters, like the rows)
            self.down_group_scales, self.down_group_biases = groups[0], groups[1]

    def __call__(self, x: mx.array) -> mx.array:
        gated, quant, cd = self._cfg
        w = {n: getattr(self, n.replace(".", "_")) for n in self._names}
        groups = None if self._groups is None else (self.down_group_scales, self.down_group_biases, self._groups)
        shape = x.shape
        y = ffn_partial(x.reshape(-1, shape[-1]), w, None, gated=gated, quant=quant, cdtype=cd, groups=groups)
        return y.astype(x.dtype).reshape(*shape[:-1], y.shape[-1])


#: Compute over the whole resident prefix (with a 0/1 mask) instead of gathering the
#: active rows when at least this share of the resident neurons is active: a
#: gather copies the rows first (measured on the 2-core CPU, bfloat16, 576 x 1536:
#: gathering 1,000 rows 3.5 ms, the 1,536-row prefix 2.2 ms).
PREFIX_MIN_SHARE = 0.4
#: The same for quantized rows: gathering them is cheap (a 4-bit row is a quarter of a bfloat16 one),
#: so the masked prefix only pays when nearly all resident neurons are active (measured on the
#: 2-core CPU, 4-bit g32, float32, 576 x 1536, CPU time per FFN: prefix 1.4 ms at any share; gathered
#: 1,200 rows 1.2 ms, 1,000 rows 1.1 ms, 400 rows 0.4 ms).
QUANT_PREFIX_MIN_SHARE = 0.9
#: An overflow that fits the scratch buffer is read in this many pieces, all in flight at once, and
#: multiplied together with the cached rows in one product (one ``grouped_down`` call per layer for down rows
#: kept exactly) and one evaluation; each piece's activations start computing as soon as it is in.
STREAM_PIECES = 1
#: A choice that needs no input (every neuron: naive flash, the exact prefill) does not evaluate the FFN's
#: input first: its reads are in flight while attention etc. computes.
LAZY_INPUT = True


class _State:
    def __init__(self, layer, hidden, chooser, cache, reader, scratch, counters, gated, layout, quant, cdtype,
                 verifier=None, groups=None):
        self.layer = layer
        self.groups = groups  # exact down rows: (scales, biases, group of each position), else None
        self.verifier = verifier
        self.hidden = hidden
        self.chooser = chooser
        self.cache = cache
        self.reader = reader
        self.scratch = scratch  # a neuron_cache.RowStore shared by all layers
        self.counters = counters
        self.gated = gated
        self.layout = layout
        self.has_up = "up" in layout
        self.gate_bias = "gate_bias" in layout
        self.up_bias = "up_bias" in layout
        self.quant = quant
        self.cdtype = cdtype
        self.all_neurons = False  # set by the engine while it reads a prompt (FlashConfig.prefill == "all")
        # ... with the transient staging rows (NeuronCache.prefill_rows) the non-resident rows go to
        self.prefill_rows = None
        self.g = None  # the chooser's gate product of this call (gate-first), else None
        rows = cache.rows
        # Share of a read bundle that is used: all of it, or up/down only when the gate rows are resident.
        self.useful_share = rows.kept_bytes / rows.bundle_bytes
        # Pipelined layers (mlx_flash.pipeline), wired by the engine: the shared Prefetcher, and per layer
        # read ahead its cache and the lookahead map (scale, shift) to its input norm (None: as is).
        self.prefetcher = None
        # the layers this one reads ahead for: [(layer, its cache, lookahead map or None)], pipeline.attach_pipeline
        self.ahead: list = []
        self.inflight: list = []  # reads submitted by this layer's pass and not yet waited for
        self.unfilled: Optional[np.ndarray] = None  # neurons given cache rows this pass, not yet read into them

    def _fill_wait(self, pending) -> int:
        """Wait for the read :meth:`_fill_submit` started (waiting counts as I/O of the
        engine's thread); returns how many bundles came from the staging buffer."""
        n_staged, handle = pending
        if handle is not None:
            ta = time.perf_counter()
            self.inflight.remove(handle)
            rs = handle.wait()
            if self.prefetcher is not None:
                self.prefetcher.main_io(ta, time.perf_counter())
            c = self.counters
            c.bytes_read += rs.bytes_read
            c.bytes_useful += int(rs.bytes_useful * self.useful_share)
            c.read_requests += rs.requests
        return n_staged

    def _fill_submit(self, ids: np.ndarray, dest, staged):
        """Bundles of neurons ``ids`` (sorted) into the read destination ``dest``: copies the ones
        the prefetch staged from the staging buffer and submits the read of the rest
        (``FlashReader.submit``); returns ``(staged count, handle or None)`` for
        :meth:`_fill_wait`. ``dest`` must not be used before that."""
        c = self.counters
        have = None
        if staged is not None:
            have, pos = staged.find(ids)
            if have.all():
                staged.copy_to(dest, slice(0, len(ids)), pos)
            elif have.any():
                staged.copy_to(dest, np.flatnonzero(have), pos[have])
            else:
                have = None
        n_staged = 0 if have is None else int(np.count_nonzero(have))
        c.bytes_useful += n_staged * self.cache.bundle_bytes  # the kept (used) bytes of each staged bundle
        c.neurons_prefetch_used += n_staged
        handle = None
        if n_staged < len(ids):
            if have is None:
                handle = self.reader.submit(self.layer, ids, dest)
            else:
                rest = np.flatnonzero(~have)
                handle = self.reader.submit(self.layer, ids[rest], dest, rows=rest)
            self.inflight.append(handle)
        return n_staged, handle

    def _stream_chunks(self, overflow: np.ndarray):
        """``[(ids, first scratch row)]``. An overflow that fits the scratch rows: ``STREAM_PIECES``
        pieces side by side, all read at once (one product over them, :meth:`_forward`); a larger one
        in chunks of half the rows, alternating halves (double buffering: the next chunk is read while
        this one computes); a one-row scratch takes one neuron at a time."""
        rows = self.scratch.rows
        if len(overflow) <= rows:
            k = -(-len(overflow) // STREAM_PIECES)
            return [(overflow[s : s + k], s) for s in range(0, len(overflow), k)]
        half = stream_chunk_rows(rows)
        return [(overflow[s : s + half], (k % 2) * half if rows >= 2 else 0)
                for k, s in enumerate(range(0, len(overflow), half))]

    def _lookahead_input(self, xt: mx.array, lmap) -> mx.array:
        """This layer's FFN input moved to a later layer's input norm (``pipeline.lookahead_map``)."""
        if lmap is None:
            return xt
        scale, shift = lmap
        return (xt.astype(mx.float32) * scale + shift).astype(xt.dtype)

    def _lookahead_start(self, xt: mx.array) -> dict:
        """Predictor lookaheads of the layers :meth:`_prefetch_next` will read ahead for, started
        (``mx.async_eval``) before this layer's own choice so that one evaluation serves both:
        ``{layer: predicted mask}`` (empty for other choosers: they choose in :meth:`_prefetch_next`)."""
        if not isinstance(self.chooser, PredictorChooser):
            return {}
        pf = self.prefetcher
        early = {layer: self.chooser.predict(layer, self._lookahead_input(xt, lmap))
                 for layer, _, lmap in self.ahead if not pf.pending(layer) and pf.dense_left[layer] == 0}
        if early:
            mx.async_eval(list(early.values()))
        return early

    def _prefetch_next(self, xt: mx.array, early: dict) -> None:
        """Pipelined layers: for each layer read ahead that has no prefetch in flight yet (all of
        them at the first layer, then the one ``depth`` layers on), choose its neurons from this
        layer's input (the lookahead; ``early``: predictions :meth:`_lookahead_start` started) and
        start reading the ones its cache lacks (predictor time)."""
        pf = self.prefetcher
        for layer, cache, lmap in self.ahead:
            if pf.pending(layer):
                continue
            if not self.all_neurons and layer not in early and pf.dense(layer):
                pf.dense_staged[layer] += 1
                pf.issue(layer, None, np.flatnonzero(cache.slot_of < 0))
                continue
            if self.all_neurons:
                look = np.arange(cache.n_neurons, dtype=np.int64)
            elif layer in early:
                look = PredictorChooser.choice(early[layer])[0]
            else:
                look = self.chooser.choose(layer, self._lookahead_input(xt, lmap))[0]
            slot_of = cache.slot_of
            want = look[slot_of[look] < 0]
            absent = cache.n_neurons - cache.n_used
            if not self.all_neurons:
                pf.saw(layer, len(want), absent)
            if len(want) >= DENSE_LOOKAHEAD_SHARE * absent:
                if len(want) < absent:  # nearly every absent neuron: all of them (the gaps hold the rest)
                    want = np.flatnonzero(slot_of < 0)
            else:
                # the non-resident neurons in the read's coalesced gaps too: read anyway, staged at no extra byte
                span = self.reader.covered(layer, want)
                span = span[slot_of[span] < 0]
                if len(span) <= pf.rows:
                    want = span
            pf.issue(layer, look, want)

    def _staged_chunks(self, staged, overflow: np.ndarray, stream: list) -> list:
        """Per chunk of ``stream`` (of the sorted ``overflow``): where the staging buffer holds every
        one of its neurons in a RowStore, their rows there (a slice when consecutive, else an index
        array), to multiply in place; else None."""
        if staged is None or staged.store is None or not stream:
            return [None] * len(stream)
        have, pos = staged.find(overflow)
        out: list = []
        s = 0
        for chunk, _ in stream:
            e = s + len(chunk)
            p = pos[s:e]
            if not have[s:e].all():
                out.append(None)
            elif int(p[-1]) - int(p[0]) == len(p) - 1:
                out.append(slice(int(p[0]), int(p[0]) + len(p)))
            else:
                out.append(mx.array(p.astype(np.int32)))
            s = e
        return out

    def _roles(self, store, rows) -> dict:
        """``{role: (k, width) matrix}`` of ``rows`` (a slice or an mx index array) of a
        role-major RowStore (the engine builds its caches with the bundle layout)."""
        mats = store.mats
        if isinstance(rows, slice):
            return {role: m[rows] for role, m in mats.items()}
        return {role: mx.take(m, rows, axis=0) for role, m in mats.items()}

    def _part(self, xt: mx.array, w: dict, mask: Optional[mx.array], ids=None) -> tuple:
        """One source of rows of this pass's product: ``(w, h, ids)``, rows ``w`` of neurons ``ids``
        (numpy, row order: the gate product of a gate-first chooser and the down rows' groups are
        taken by them) and their (lazy) hidden activations ``h`` (:func:`ffn_hidden`)."""
        g = None
        if self.g is not None:
            g = mx.take(self.g, mx.array(np.asarray(ids, dtype=np.int32)), axis=1)
        return w, ffn_hidden(xt, w, mask, gated=self.gated, quant=self.quant, cdtype=self.cdtype, g=g), ids

    def _product(self, y: mx.array, parts: list) -> mx.array:
        """``y`` plus the down product of :meth:`_part` ``parts``. Down rows kept exactly (one
        ``grouped_down`` call costs about the same whatever its rows): one call over the parts'
        rows together; else one product per part, summed into ``y`` (float32)."""
        if self.groups is None:
            for w, h, _ in parts:
                y = y + ffn_rows(h, w, "down", False, self.quant, self.cdtype)
            return y
        scales, biases, pos_groups = self.groups
        rg = np.concatenate([pos_groups[np.asarray(ids, dtype=np.int64)] for _, _, ids in parts])
        if len(parts) == 1:
            h, codes = parts[0][1], parts[0][0]["down"]
        else:
            h = mx.concatenate([p[1] for p in parts], axis=1)
            codes = mx.concatenate([p[0]["down"] for p in parts], axis=0)
        return y + grouped_down(h, codes, rg, scales, biases, self.quant["down"], self.cdtype)

    def _start(self, y: mx.array, parts: list) -> tuple:
        """Start evaluating (``mx.async_eval``) what the product of ``parts`` needs before the next
        read is in: with down rows kept exactly their activations (the down product waits for every
        part: one grouped_down call), else their products, summed into ``y``. Returns ``(y, parts
        still to multiply)``."""
        if self.groups is None:
            y = self._product(y, parts)
            mx.async_eval(y)
            return y, []
        mx.async_eval([h for _, h, _ in parts])
        return y, parts

    def forward(self, x: mx.array) -> mx.array:
        try:
            return self._forward(x)
        except BaseException:  # reads still in flight must not land in rows the next pass uses
            self._drain()
            if self.unfilled is not None:  # rows given to neurons whose read failed: not theirs
                self.cache.forget(self.unfilled)
                self.unfilled = None
            raise

    def _drain(self) -> None:
        """Wait for this layer's submitted reads nobody waited for (their errors are dropped:
        the exception that interrupted the pass is the one that matters)."""
        pending, self.inflight = self.inflight, []
        for h in pending:
            try:
                h.wait()
            except BaseException:  # see the docstring
                pass

    def _forward(self, x: mx.array) -> mx.array:
        c = self.counters
        shape = x.shape
        xt = x.reshape(-1, shape[-1])
        chooser = self.chooser
        if not (LAZY_INPUT and (self.all_neurons or isinstance(chooser, AllNeurons)) and not chooser.computes_gate):
            mx.eval(xt)  # attention etc. up to here is compute, not predictor time
        # else the choice needs no input: the reads start before attention etc. is computed (with the product)

        pf = self.prefetcher
        staged = pf.take(self.layer, c) if pf is not None else None  # waiting counts as I/O
        t0 = time.perf_counter()
        early: dict = {}
        if self.all_neurons:
            ids, mask = np.arange(self.cache.n_neurons, dtype=np.int64), None
            if chooser.computes_gate:  # the cache holds no gate rows: the chooser's product serves
                chooser.gate_product(self.layer, xt)
        else:
            early = self._lookahead_start(xt) if pf is not None and self.ahead else {}
            ids, mask = chooser.choose(self.layer, xt)
        self.g = chooser.gate(self.layer) if chooser.computes_gate else None
        t1 = time.perf_counter()
        c.predictor_s += t1 - t0

        plan = self.cache.step(ids)
        self.unfilled = plan.load_ids
        order = np.concatenate([plan.hit_ids, plan.load_ids]).astype(np.int64)
        slots = np.concatenate([plan.hit_slots, plan.load_slots]).astype(np.int32)
        served = 0
        overflow = plan.overflow_ids
        big = self.prefill_rows if self.all_neurons else None
        if big is not None and len(overflow) > big.rows:  # sized for every layer: not expected; stream then
            big = None
        stream = self._stream_chunks(overflow) if len(overflow) and big is None else []
        pend_load = self._fill_submit(plan.load_ids, plan.load_dest, staged) if len(plan.load_ids) else None
        # chunks the prefetch staged whole are multiplied in the staging buffer (no copy, no read); the
        # first chunk's read is in flight with the loads and during the cached part's compute
        store = self.scratch
        double = store.rows >= 2
        # an overflow that fits the scratch: every piece in flight at once, one product (``one``)
        one = big is not None or 0 < len(overflow) <= store.rows
        lag = len(stream) if one else 1
        in_staging = self._staged_chunks(staged, overflow, stream)
        pends = {}

        def submit(j: int) -> None:
            if j < len(stream) and in_staging[j] is None:
                pends[j] = self._fill_submit(stream[j][0], store.dest(stream[j][1], len(stream[j][0])), staged)

        for k in range(min(lag, len(stream))):
            submit(k)
        # exact prefill: every missing row in one read, in flight while the cached part computes
        pend_big = self._fill_submit(overflow, big.dest(0, len(overflow)), staged) \
            if big is not None and len(overflow) else None
        if pend_load is not None:
            served += self._fill_wait(pend_load)
        self.unfilled = None
        t2 = time.perf_counter()
        c.io_s += t2 - t1
        if pf is not None and self.ahead:
            self._prefetch_next(xt, early)
            t2b = time.perf_counter()
            c.predictor_s += t2b - t2
            t2 = t2b

        if mask is not None:
            pos = np.empty(int(ids.max()) + 1 if len(ids) else 1, dtype=np.int64)
            pos[ids] = np.arange(len(ids))

            def cols_np(sub_ids):
                return mask[:, pos[sub_ids]]
        else:
            def cols_np(sub_ids):
                return None

        def cols(sub_ids):
            m = cols_np(sub_ids)
            return None if m is None else mx.array(m.astype(np.float32)).astype(xt.dtype)

        # Partial sums accumulate in float32. The product is one evaluation over the cached rows and an
        # overflow that fits in one go (the exact prefill's staging rows, a stream that fits the scratch):
        # with down rows kept exactly one grouped_down call; else the cached rows' product, then one per chunk.
        y = mx.zeros((xt.shape[0], self.hidden), dtype=mx.float32)
        n_used = self.cache.n_used
        parts: list = []
        if len(slots):
            resident = self.cache.slot_ids[:n_used] if self.g is not None or self.groups is not None else None
            if len(slots) == n_used and mask is None:  # every resident neuron is active: no mask at all
                parts.append(self._part(xt, self._roles(self.cache.rows, slice(0, n_used)), None, resident))
            elif len(slots) >= (QUANT_PREFIX_MIN_SHARE if self.quant else PREFIX_MIN_SHARE) * n_used:
                # the resident prefix, inactive rows masked out
                m = np.zeros((xt.shape[0], n_used), dtype=np.float32)
                sub = cols_np(order)
                m[:, slots] = 1.0 if sub is None else sub
                parts.append(self._part(xt, self._roles(self.cache.rows, slice(0, n_used)),
                                        mx.array(m).astype(xt.dtype), resident))
            else:
                parts.append(self._part(xt, self._roles(self.cache.rows, mx.array(slots)), cols(order), order))
        if not one:
            y = self._product(y, parts)
            parts = []
            mx.eval(y)
        elif parts:
            y, parts = self._start(y, parts)  # computes while the overflow's reads finish
        t3 = time.perf_counter()
        c.ffn_compute_s += t3 - t2

        if pend_big is not None:  # exact prefill: every missing row in one read
            ta = time.perf_counter()
            served += self._fill_wait(pend_big)
            c.io_s += time.perf_counter() - ta
            parts.append(self._part(xt, self._roles(big, slice(0, len(overflow))), None, overflow))
        for k, (chunk, r0) in enumerate(stream):
            ta = time.perf_counter()
            rows = in_staging[k]
            if rows is None:
                served += self._fill_wait(pends.pop(k))
                w = self._roles(store, slice(r0, r0 + len(chunk)))
            else:
                n = len(chunk)
                served += n
                c.bytes_useful += n * self.cache.bundle_bytes
                c.neurons_prefetch_used += n
                assert staged is not None and staged.store is not None  # _staged_rows found them there
                w = self._roles(staged.store, rows)
            tb = time.perf_counter()
            parts.append(self._part(xt, w, cols(chunk), chunk))
            if one:  # every piece is in flight already: the last one's product is the layer's
                if k + 1 < len(stream):
                    y, parts = self._start(y, parts)
                c.io_s += tb - ta
                c.ffn_compute_s += time.perf_counter() - tb
                continue
            y = self._product(y, parts)
            parts = []
            tc = time.perf_counter()
            if double:
                # the other half (its chunk was evaluated already), submitted just before the
                # evaluation lets go of the GIL: the read threads start at once
                submit(k + 1)
            td = time.perf_counter()
            mx.eval(y)  # these scratch rows are overwritten by the chunk after next
            te = time.perf_counter()
            if not double:
                submit(k + 1)  # its scratch rows are free now
            c.io_s += (tb - ta) + (td - tc) + (time.perf_counter() - te)
            c.ffn_compute_s += (tc - tb) + (te - td)
        if one:
            tb = time.perf_counter()
            y = self._product(y, parts)
            mx.eval(y)
            c.ffn_compute_s += time.perf_counter() - tb

        c.neurons_active += len(ids)
        c.neurons_hit += len(plan.hit_ids)
        c.neurons_loaded += len(plan.load_ids)
        c.neurons_streamed += len(overflow)
        if pf is not None:
            pf.record(self.layer, staged, ids, len(plan.load_ids) + len(overflow), served)
        if self.verifier is not None:
            self.verifier.check(self.layer)  # never hand on an output computed from corrupt weights
        return y.astype(x.dtype).reshape(*shape[:-1], self.hidden)
