"""The speed test: dense vs naive flash vs flash, same model, same prompt, one run.

:func:`run_bench` runs, in one process, the same prompt and the same number of
greedily generated tokens (end-of-sequence ignored) through:

* **dense**: the whole model in memory (``load(flash_dir, dense=True)``: the same
  weights as the flash runs), where it fits in RAM: the ceiling;
* **naive flash** (``active="all"``): every token reads every FFN neuron that is
  not resident, through the same reader, page cache bypassed: the paper's baseline;
* **flash oracle**: the true active neurons (an upper bound for a predictor);
* **flash predictor**: the model's low-rank predictors (skipped, with a note, when
  the model has none).

Each row gives tokens/s, ms/token split into predictor / I/O / compute, bytes
read per token (and the useful part), cache hit rate, resident and peak memory,
perplexity on the project's own reference text (``resources/reference.txt``), and
for flash rows the effective read throughput (bytes read / time in the reader)
as a fraction of the disk probe's best at the request sizes used. The first
``warmup`` token(s) of each run are left out of the per-token averages.

Optional parts of the same report: a memory-budget sweep (tokens/s vs budget),
the disk probe's table (:func:`mlx_flash.storage.probe.cached_probe`, measured
once per machine), and large-shape rows (``shape="7b"``): a random-weight flash
model with 7B-class FFN dimensions, driven through the real NeuronCache +
FlashReader + SparseFFN with per-token active sets replayed from the flash-oracle
run on the real model (:mod:`mlx_flash.traces`): their figures come from
replayed traces, FFN only, and the report says so.

``format_table(report)`` prints it; ``save_plots(report, dir)`` draws PNGs;
``report.to_json()`` saves it. Qt-free; every long step reports progress and can
be cancelled (``mlx_flash.progress``).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from . import default_model
from .active import AllNeurons
from .calibrate import read_prompts
from .config import FlashConfig, format_budget
from .neuron_cache import NeuronCache, ReadModel, resolve_auto_policy, simulate
from .neuron_order import compute_order, inverse, source_perms
from .neuron_order import replay_reads as replay_order_reads  # (this module has its own replay_reads)
from .paths import data_dir, models_dir, resources_dir
from .pipeline import attach_pipeline
from .predictor import has_predictors, load_frequencies
from .progress import Cancelled, ProgressCallback, scaled
from .progress import report as _report
from .quantized import compute_dtype, describe
from .sparse_ffn import SparseFFN
from .stats import FFNCounters, Stats, process_rss
from .storage.format import (
    ALIGNMENT,
    DTYPE_SIZES,
    FlashFormatError,
    bundle_layout,
    convert_to_flash,
    float_bundle_bytes,
    open_flash,
    role_quantization,
    write_flash,
)
from .storage.platform_io import drop_page_cache
from .storage.probe import DEFAULT_GAP, ProbeResult, cached_probe, load_cached_choice
from .storage.reader import FlashReader
from .traces import ReplayChooser, Trace, recording
from .traces import record as record_trace
from .units import fmt_bytes as _fb  # the one byte formatter, short for the tables below

PathLike = Union[str, Path]

# ----------------------------------------------------------------------------- names
DENSE = "dense"
DENSE_BF16 = "dense bfloat16"
NAIVE = "naive flash"
ORACLE = "flash oracle"
PREDICTOR = "flash predictor"
GATE = "flash gate-first"
AUTO = "flash auto"
CONFIGS: Tuple[str, ...] = (DENSE, DENSE_BF16, NAIVE, ORACLE, PREDICTOR, GATE, AUTO)
"""The configurations :func:`run_bench` knows, in the order it runs them."""

ALIASES = {"dense": DENSE, "bf16": DENSE_BF16, "dense-bf16": DENSE_BF16, "dense bfloat16": DENSE_BF16,
           "naive": NAIVE, "all": NAIVE, "naive flash": NAIVE, "oracle": ORACLE,
           "flash oracle": ORACLE, "predictor": PREDICTOR, "flash predictor": PREDICTOR, "flash": PREDICTOR,
           "gate": GATE, "gate-first": GATE, "flash gate-first": GATE, "auto": AUTO, "flash auto": AUTO}
_ACTIVE = {NAIVE: "all", ORACLE: "oracle", PREDICTOR: "predictor", GATE: "gate", AUTO: "auto"}
_NEEDS_CALIBRATION = (PREDICTOR, GATE)
_DENSE_ROWS = (DENSE, DENSE_BF16)

REAL = "real model"
REPLAYED = "replayed traces"

DEFAULT_PROMPT: List[Dict[str, str]] = [
    {"role": "user", "content": "Explain in a few paragraphs how a computer reads data from a solid state drive, "
                                "and why small random reads are slower than large sequential ones."}
]
DEFAULT_PPL_TOKENS = 300
REFERENCE_FILE = "reference.txt"


@dataclass(frozen=True)
class Shape:
    """FFN dimensions of a large-shape run (random weights)."""

    name: str
    hidden: int
    ffn: int
    dtype: str = "float16"

    @property
    def bundle_bytes(self) -> int:

        return 3 * self.hidden * DTYPE_SIZES[self.dtype]

    @property
    def layer_bytes(self) -> int:
        return self.ffn * self.bundle_bytes

    def layers_for(self, gib: float) -> int:
        """As many layers as fit ``gib`` GiB of ffn.bin (at least one)."""
        return max(1, int(gib * 2**30 // self.layer_bytes))


SHAPES: Dict[str, Shape] = {
    "7b": Shape("7b", 4096, 11008),     # Llama-2-7B: bundle 3*4096*2 = 24 KiB, 258 MiB a layer
    "13b": Shape("13b", 5120, 13824),
}


def canonical_config(name: str) -> str:
    """``"oracle"`` → ``"flash oracle"`` etc.; ValueError for unknown names."""
    key = str(name).strip().lower()
    if key not in ALIASES:
        raise ValueError(f"unknown bench configuration {name!r}; known: {', '.join(sorted(set(ALIASES)))}")
    return ALIASES[key]


# ----------------------------------------------------------------------------- records
class _Record:
    """``to_dict`` / ``from_dict`` for the report's dataclasses (unknown keys are ignored on load)."""

    __dataclass_fields__: ClassVar[Dict[str, Any]]  # every subclass is a dataclass (what asdict / fields take)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class BenchRow(_Record):
    """One configuration's measured figures (per-token figures: warm-up tokens left out).

    Times in ms, sizes in bytes, throughput in GB/s (10^9 B/s). ``None``: not
    applicable (a dense row has no hit rate or I/O; replayed rows no perplexity).
    """

    name: str
    source: str = REAL                    # "real model" or "replayed traces"
    group: str = "real"                   # rows compared with each other in ratios
    mode: str = ""                        # the engine's mode string
    prompt_tokens: int = 0
    ms_first_token: float = 0.0           # time to first token (prompt read + first forward pass)
    tokens: int = 0                       # measured tokens (warm-up excluded)
    warmup_tokens: int = 0
    tokens_per_s: float = 0.0             # 1000 / ms_total
    ms_total: float = 0.0
    ms_predictor: float = 0.0
    ms_io: float = 0.0
    ms_compute: float = 0.0
    bytes_read_per_token: float = 0.0
    bytes_useful_per_token: float = 0.0
    hit_rate: Optional[float] = None
    neurons_active_per_token: float = 0.0
    neurons_loaded_per_token: float = 0.0
    neurons_streamed_per_token: float = 0.0
    resident_bytes: int = 0               # weights held in memory (max over measured tokens)
    cache_bytes: int = 0                  # neuron cache in use at the end
    budget_bytes: int = 0                 # the neuron cache's share of the FFN budget (0: dense)
    predictor_bytes: int = 0              # the predictors' share of it (config.format_budget)
    peak_memory: int = 0                  # MLX peak allocation during the generation
    process_rss: int = 0                  # the process's resident set (max over measured tokens)
    perplexity: Optional[float] = None
    ms_perplexity: Optional[float] = None
    agree_with_dense: Optional[int] = None  # leading generated tokens identical to dense's
    threads: int = 0
    chunk_bytes: int = 0
    io_gbps: Optional[float] = None       # bytes read / time inside the reader
    mean_request_bytes: Optional[float] = None
    disk_best_gbps: Optional[float] = None  # probe: best thread count at the nearest chunk size
    disk_gbps_same_threads: Optional[float] = None  # probe at that chunk size and the reader's threads
    io_efficiency: Optional[float] = None  # io_gbps / disk_best_gbps
    read_mode: str = ""                   # O_DIRECT / F_NOCACHE / buffered
    policy: Optional[Dict[str, Any]] = None  # the cache policy the engine ran (Engine.policy_info)
    active: Optional[Dict[str, Any]] = None  # the active-neuron chooser the engine ran and why (Engine.active_info)
    active_fraction: Optional[float] = None  # neurons chosen per token / FFN neurons (flash rows)
    preload_bytes: int = 0                # read at load time (pinned hot neurons), not per token
    pipeline: bool = False                # pipelined layers ran (FlashConfig.pipeline, mlx_flash.pipeline)
    ms_prefetch: float = 0.0              # pipelined: the prefetch reader busy per token
    ms_overlap: float = 0.0               # pipelined: disk and compute busy at once per token
    lookahead: Optional[Dict[str, Any]] = None  # pipelined: Engine.pipeline_info() (recall per layer)
    same_as_serial: Optional[bool] = None  # pipelined: generated the same tokens as its serial row
    read_alignment: int = 0               # the reader's read alignment (O_DIRECT: the device's logical block)
    max_gap_bytes: Optional[int] = None   # the reader's coalescing gap (from the probe unless configured)
    requests_per_token: Optional[float] = None  # read system calls per measured token
    disk_gbps_at_request: Optional[float] = None  # probe interpolated at the mean request size, same threads
    reader_of_probe: Optional[float] = None  # io_gbps / disk_gbps_at_request
    sim_bytes_read_per_token: Optional[float] = None   # its recorded active sets replayed on this layout
    bf16_bytes_read_per_token: Optional[float] = None  # ... and on the bfloat16 layout (same choice)
    agreement: Optional[Dict[str, Any]] = None  # greedy agreement with dense over the prompt set
    text: str = ""
    notes: List[str] = field(default_factory=list)


@dataclass
class SweepPoint(_Record):
    """One (configuration, budget) point of the memory-budget sweep."""

    config: str
    budget: float                         # fraction of the FFN (or bytes when > 1)
    budget_bytes: int = 0
    tokens_per_s: float = 0.0
    ms_total: float = 0.0
    ms_io: float = 0.0
    bytes_read_per_token: float = 0.0
    hit_rate: Optional[float] = None
    resident_bytes: int = 0
    peak_memory: int = 0
    error: Optional[str] = None


POLICIES = ("window", "lru", "hot", "hot+window")
"""The cache policies the speed test compares (FlashConfig.policy); "auto" is run too."""
DEFAULT_POLICY_BUDGETS = (0.25, 0.5, 0.75)


@dataclass
class PolicyPoint(_Record):
    """One (cache policy, budget) point of the policy comparison."""

    policy: str                           # as asked: window / lru / hot / hot+window / auto
    budget: float
    budget_bytes: int = 0
    resolved: str = ""                    # what the engine ran ("auto" resolves to one of the others)
    hot_fraction: Optional[float] = None  # share of the cache pinned with hot neurons
    hit_rate: Optional[float] = None
    bytes_read_per_token: float = 0.0
    bytes_useful_per_token: float = 0.0
    neurons_loaded_per_token: float = 0.0
    neurons_streamed_per_token: float = 0.0
    tokens_per_s: float = 0.0
    ms_total: float = 0.0
    ms_io: float = 0.0
    preload_bytes: int = 0
    reason: str = ""
    error: Optional[str] = None


def _policy_point(policy: str, b: float, row: BenchRow) -> PolicyPoint:
    info = row.policy or {}
    return PolicyPoint.from_dict({**row.to_dict(), "policy": policy, "budget": b, "error": None,
                                  "resolved": str(info.get("name", policy)), "hot_fraction": info.get("hot_fraction"),
                                  "reason": str(info.get("reason", ""))})


def best_policy(points: Sequence[PolicyPoint], budget: float) -> Optional[PolicyPoint]:
    """The measured best named policy at ``budget``: fewest bytes read per token (the
    disk is the bottleneck the cache exists for), then highest tokens/s."""
    cands = [p for p in points if p.error is None and p.policy != "auto" and abs(p.budget - budget) < 1e-9]
    if not cands:
        return None
    return min(cands, key=lambda p: (round(p.bytes_read_per_token / 1e3), -p.tokens_per_s))


@dataclass
class BenchReport:
    """Everything one :func:`run_bench` measured. ``rows`` holds measured
    configurations only; ``skipped`` lists the others with the reason."""

    model: str
    model_name: str
    budget: float
    budget_bytes: int
    ffn_bytes: int
    tokens: int
    warmup: int
    prompt: Any
    prompt_tokens: int
    config: Dict[str, Any]
    perplexity_tokens: int = 0            # reference-text tokens scored (0: no perplexity)
    agreement_prompts: int = 0            # prompts of the greedy-agreement section (0: none)
    agreement_tokens: int = 0             # greedy tokens per prompt there
    rows: List[BenchRow] = field(default_factory=list)
    ratios: Dict[str, float] = field(default_factory=dict)
    probe: Any = None                     # a ProbeResult (or None)
    sweep: List[SweepPoint] = field(default_factory=list)
    policies: List[PolicyPoint] = field(default_factory=list)
    policy_active: str = ""               # the active-set choice the policy comparison used
    skipped: List[Dict[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    shape: Optional[Dict[str, Any]] = None
    trace: Optional[Dict[str, Any]] = None
    machine: Dict[str, Any] = field(default_factory=dict)
    created: str = ""
    seconds: float = 0.0

    def budget_text(self) -> str:
        """The main budget and what it holds (:func:`budget_text`)."""
        return budget_text({"budget_bytes": self.budget_bytes, "rows": [r.to_dict() for r in self.rows]})

    def row(self, name: str) -> Optional[BenchRow]:
        for r in self.rows:
            if r.name == name:
                return r
        return None

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["rows"] = [r.to_dict() for r in self.rows]
        d["sweep"] = [p.to_dict() for p in self.sweep]
        d["policies"] = [p.to_dict() for p in self.policies]
        d["probe"] = self.probe.to_dict() if self.probe is not None else None
        return _jsonable(d)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save_json(self, path: PathLike) -> Path:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "BenchReport":

        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["rows"] = [BenchRow.from_dict(r) for r in d.get("rows", [])]
        kw["sweep"] = [SweepPoint.from_dict(p) for p in d.get("sweep", [])]
        kw["policies"] = [PolicyPoint.from_dict(p) for p in d.get("policies", [])]
        kw["probe"] = ProbeResult.from_dict(d["probe"]) if d.get("probe") else None
        return cls(**kw)

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "BenchReport":
        return cls.from_dict(json.loads(text))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        x = float(x)
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


# ----------------------------------------------------------------------------- measures
def compute_ratios(rows: Sequence[BenchRow]) -> Dict[str, float]:
    """Speed ratios (tokens/s over tokens/s) of every flash row (oracle, predictor)
    to the naive-flash and dense rows of the same group: ``{"flash oracle /
    naive flash": 3.1, ...}``. Rows of different groups (real model vs replayed
    large shape) are never compared."""
    out: Dict[str, float] = {}
    for r in rows:
        if r.name.split(" (")[0] not in (ORACLE, PREDICTOR, GATE, AUTO):
            continue
        for base_kind in (NAIVE, DENSE):
            for b in rows:
                if b.group == r.group and b.name.split(" (")[0] == base_kind and b.tokens_per_s > 0:
                    out[f"{r.name} / {b.name}"] = r.tokens_per_s / b.tokens_per_s
    return out


def budget_text(report: Dict[str, Any]) -> str:
    """A report's (or its JSON's) main budget as :func:`mlx_flash.config.format_budget` shows it:
    the predictors' share as the real predictor row measured it, the rest cache."""
    pred = max((int(r.get("predictor_bytes") or 0) for r in report.get("rows") or []
                if r.get("source", REAL) == REAL), default=0)
    return format_budget(int(report.get("budget_bytes") or 0) - pred, pred)


def summarize(stats: Sequence[Stats], warmup: int) -> Dict[str, Any]:
    """Per-token means over ``stats[warmup:]`` (the figures of a :class:`BenchRow`)."""
    steady = list(stats[warmup:])
    if not steady:
        raise ValueError(f"no measured tokens: {len(stats)} generated, {warmup} warm-up")
    n = len(steady)

    def mean(attr: str) -> float:
        return float(sum(getattr(s, attr) for s in steady) / n)

    ms_total = mean("ms_total")
    active = sum(s.neurons_active for s in steady)
    hits = sum(s.hit_rate * s.neurons_active for s in steady)
    flash = steady[-1].mode.startswith("flash")
    return {
        "tokens": n,
        "warmup_tokens": min(warmup, len(stats)),
        "tokens_per_s": 1e3 / ms_total if ms_total > 0 else 0.0,
        "ms_total": ms_total,
        "ms_predictor": mean("ms_predictor"),
        "ms_io": mean("ms_io"),
        "ms_compute": mean("ms_compute"),
        "ms_prefetch": mean("ms_prefetch"),
        "ms_overlap": mean("ms_overlap"),
        "bytes_read_per_token": mean("bytes_read"),
        "bytes_useful_per_token": mean("bytes_useful"),
        "hit_rate": (hits / active if active else 1.0) if flash else None,
        "neurons_active_per_token": mean("neurons_active"),
        "neurons_loaded_per_token": mean("neurons_loaded"),
        "neurons_streamed_per_token": mean("neurons_streamed"),
        "resident_bytes": int(max(s.resident_bytes for s in steady)),
        "cache_bytes": int(steady[-1].cache_bytes),
        "budget_bytes": int(steady[-1].budget_bytes),
        "predictor_bytes": int(steady[-1].predictor_bytes),
        "peak_memory": int(max(s.peak_memory for s in stats)),
        "process_rss": int(max(s.process_rss for s in steady)),
        "mode": steady[-1].mode,
        "prompt_tokens": int(steady[-1].prompt_tokens),
        "ms_first_token": float(stats[0].ms_first_token),
    }


def _io_figures(row: BenchRow, reads, probe) -> None:
    """Fill the effective-throughput fields of a flash row from the reader's totals."""
    if reads is None or reads.seconds <= 0 or reads.bytes_read <= 0:
        return
    row.io_gbps = reads.bytes_read / reads.seconds / 1e9
    row.mean_request_bytes = reads.bytes_read / max(1, reads.requests)
    if probe is not None and probe.table:
        chunk = _nearest_chunk(probe, row.mean_request_bytes)
        t, best = probe.best(chunk)
        row.disk_best_gbps = best
        row.disk_gbps_same_threads = probe.table[chunk].get(row.threads)
        row.io_efficiency = row.io_gbps / best if best > 0 else None


def _reader_figures(row: BenchRow, reader, reads, probe, measured_tokens: int) -> None:
    """The reader's settings, requests per token, and its throughput against the probe at its
    own mean request size and thread count (interpolated, ``ProbeResult.at``)."""
    row.read_alignment, row.max_gap_bytes = reader.alignment, reader.max_gap_bytes
    if reads is None or reads.requests <= 0 or row.mean_request_bytes is None:
        return
    row.requests_per_token = reads.requests / max(1, measured_tokens)
    if probe is not None and probe.table and row.io_gbps:
        at = probe.at(row.mean_request_bytes, row.threads)
        row.disk_gbps_at_request = at
        row.reader_of_probe = row.io_gbps / at if at else None


def format_reader(r: BenchReport) -> List[str]:
    """Reader against the disk: read amplification (read / useful bytes), requests per token,
    and GB/s against the probe at the same mean request size and threads."""
    rows = [row for row in r.rows if row.io_gbps is not None]
    if not rows:
        return []
    lines = ["", "Reader vs disk (probe interpolated at the reader's mean request size and thread count):",
             "| configuration | alignment | max gap | requests/tok | mean request | read/useful | reader GB/s "
             "| probe there | reader / probe |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        amp = row.bytes_read_per_token / row.bytes_useful_per_token if row.bytes_useful_per_token else None
        lines.append(f"| {row.name} | {row.read_alignment or '?'} B | {_fb(row.max_gap_bytes or 0)} | "
                     f"{_f(row.requests_per_token, '{:.0f}')} | {_fb(row.mean_request_bytes)} | "
                     f"{_f(amp, '{:.2f}x')} | {row.io_gbps:.2f} | {_f(row.disk_gbps_at_request, '{:.2f}')} | "
                     f"{_f(row.reader_of_probe, '{:.0%}')} |")
    return lines


def _nearest_chunk(probe, nbytes: float) -> int:
    return min(probe.table, key=lambda c: abs(np.log2(c) - np.log2(max(1.0, nbytes))))


def reference_text() -> str:
    """The project's own reference prose (``resources/reference.txt``)."""

    return (resources_dir() / REFERENCE_FILE).read_text(encoding="utf-8")


def _free_mlx() -> None:

    gc.collect()
    clear = getattr(mx, "clear_cache", None)
    if clear is not None:
        clear()


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 0


def machine_info() -> Dict[str, Any]:

    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "mlx": getattr(mx, "__version__", "?"),
        "device": str(mx.default_device()),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _physical_memory(),
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except (OSError, AttributeError):
        pass
    return info


# ----------------------------------------------------------------------------- real-model runs
def _prompt_for(engine, prompt) -> Any:
    """Chat messages go through the chat template when the tokenizer has one."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        if not getattr(engine.tokenizer, "has_chat_template", True):
            return "\n".join(m.get("content", "") for m in prompt)
    return prompt


class _Skip(Exception):
    """A configuration cannot run on this model (the message says why)."""


def _twin_name(name: str, pipeline: bool) -> str:
    """The name of a row's twin run with pipelined layers on (``pipeline``) or off."""
    return f"{name} (pipelined)" if pipeline else f"{name} (serial)"


def _reader_totals(engine):
    """The engine's read totals since the last call (reset): its reader's plus, with pipelined
    layers, the prefetch reader's (seconds add up: time inside a reader, concurrent or not)."""
    reads = engine.reader.reset_totals()
    if engine.prefetcher is not None:
        reads.add(engine.prefetcher.reader.reset_totals())
    return reads


def _run_real(name: str, path: Path, cfg: FlashConfig, prompt, tokens: int, warmup: int,
              ref_ids: Optional[List[int]], probe, progress: Optional[ProgressCallback], *,
              record: bool = False, dense_tokens: Optional[List[int]] = None):
    """One configuration on the real model. Returns (row, generated token ids, trace or None)."""
    from .engine import load  # noqa: PLC0415 - the engine imports mlx-lm (seconds): the CLI imports this module

    _report(progress, 0.0, f"{name}: loading")
    try:
        engine = load(path, cfg, dense=name in _DENSE_ROWS, dense_dtype="bfloat16" if name == DENSE_BF16 else None)
    except Exception as e:
        if name not in _NEEDS_CALIBRATION:
            raise
        if isinstance(e, ImportError):
            raise _Skip(f"predictors are not available in this build ({e})") from e
        raise _Skip(f"{type(e).__name__}: {str(e).strip() or 'cannot load the predictors'}") from e
    trace = None
    try:
        engine.tokenizer.eos_token_ids = []  # every configuration generates exactly `tokens` tokens
        if engine.files is not None:
            drop_page_cache(engine.files.ffn_path)
        else:
            drop_page_cache(path / "ffn.bin")
        _free_mlx()
        p = _prompt_for(engine, prompt)
        stats: List[Stats] = []
        toks: List[int] = []
        text: List[str] = []
        gen_share = 0.8 if ref_ids else 1.0
        with (recording(engine) if record and engine.is_flash else nullcontext()) as tr:
            for i, r in enumerate(engine.stream_generate(p, tokens, temperature=0.0)):
                stats.append(r.stats)
                toks.append(r.token)
                text.append(r.text)
                if i + 1 == warmup and engine.reader is not None:
                    _reader_totals(engine)  # effective throughput over measured tokens only
                _report(progress, gen_share * (i + 1) / tokens, f"{name}: token {i + 1}/{tokens}")
        trace = tr
        reads = _reader_totals(engine) if engine.reader is not None else None
        s = summarize(stats, warmup)
        row = BenchRow(name=name, source=REAL, group="real", text="".join(text), **s)
        row.policy = _jsonable(getattr(engine, "policy_info", None))
        if engine.files is not None:
            mf = engine.files.manifest
            row.active = _jsonable(engine.active_info)
            row.active_fraction = row.neurons_active_per_token / (mf.num_layers * mf.intermediate_size)
        if engine.cache is not None:
            row.preload_bytes = int(engine.cache.stats.preload_bytes)
        row.pipeline = engine.prefetcher is not None
        row.lookahead = _jsonable(engine.pipeline_info())
        if engine.reader is not None:
            row.threads = engine.reader.threads
            row.chunk_bytes = engine.reader.chunk_bytes
            row.read_mode = engine.reader.mode
            _io_figures(row, reads, probe)
            _reader_figures(row, engine.reader, reads, probe, len(stats) - warmup)
        if dense_tokens is not None:
            k = 0
            while k < min(len(toks), len(dense_tokens)) and toks[k] == dense_tokens[k]:
                k += 1
            row.agree_with_dense = k
        if ref_ids:
            _report(progress, gen_share, f"{name}: perplexity")
            t0 = time.perf_counter()
            row.perplexity = engine.perplexity(ref_ids, chunk=len(ref_ids) - 1)
            row.ms_perplexity = (time.perf_counter() - t0) * 1e3
        _report(progress, 1.0, f"{name}: done")
        return row, toks, trace
    finally:
        engine.close()
        del engine
        _free_mlx()


def default_flash_model(progress: Optional[ProgressCallback] = None) -> Path:
    """The default model's flash folder (``default_model.ensure_default_flash`` when the
    project has it; else the converted default model written next to it once)."""

    ensure = getattr(default_model, "ensure_default_flash", None)
    if ensure is not None:
        return ensure(progress=progress)

    src = default_model.ensure_default_mlx(progress=scaled(progress, 0.0, 0.5))
    dst = models_dir() / f"{default_model.DEFAULT_MODEL_NAME}.flash"
    if (dst / "manifest.json").is_file():
        return dst
    return convert_to_flash(src, dst, progress=scaled(progress, 0.5, 1.0))


def _load_probe(probe, directory: Path, probe_kwargs: Optional[Dict[str, Any]],
                progress: Optional[ProgressCallback], notes: List[str]):

    if probe is None or probe is False:
        return None
    if isinstance(probe, ProbeResult):
        return probe
    try:
        return cached_probe(directory, progress=progress, **(probe_kwargs or {}))
    except Cancelled:
        raise
    except (OSError, ValueError) as e:
        notes.append(f"disk probe unavailable: {e}")
        return None


# ----------------------------------------------------------------------------- large shapes
def ensure_shape_model(shape: Union[str, Shape] = "7b", gib: float = 2.0, *, root: Optional[PathLike] = None,
                       seed: int = 0, progress: Optional[ProgressCallback] = None) -> Path:
    """A flash folder with ``shape``'s FFN dimensions and as many layers as fit
    ``gib`` GiB of ffn.bin, random weights; generated once (layer by layer through
    :func:`~mlx_flash.storage.format.write_flash`) under ``root`` (default
    ``data_dir()/bench``) and reused. Only its FFN is meant to be used."""


    sp = SHAPES[shape] if isinstance(shape, str) else shape
    layers = sp.layers_for(gib)
    base = Path(root).expanduser() if root is not None else data_dir() / "bench"
    path = base / f"{sp.name}-h{sp.hidden}-f{sp.ffn}-{sp.dtype}-{layers}L-s{seed}.flash"
    if (path / "manifest.json").is_file():
        try:
            m = open_flash(path).manifest
            if (m.hidden_size, m.intermediate_size, m.num_layers, m.dtype) == (sp.hidden, sp.ffn, layers, sp.dtype):
                return path
        except FlashFormatError:
            pass
    dt = getattr(mx, sp.dtype)
    heads = max(1, sp.hidden // 128)
    config = {
        "model_type": "llama",
        "hidden_size": sp.hidden,
        "num_hidden_layers": layers,
        "intermediate_size": sp.ffn,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": 32,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "mlx_flash_bench_shape": sp.name,
    }
    weights: Dict[str, Any] = {"model.norm.weight": mx.ones((sp.hidden,), dtype=dt)}
    for i in range(layers):  # lazy: write_flash evaluates (and frees) one layer at a time
        k = mx.random.split(mx.random.key(seed * 100003 + i), 3)
        pre = f"model.layers.{i}.mlp"
        weights[f"{pre}.gate_proj.weight"] = mx.random.normal((sp.ffn, sp.hidden), dtype=dt, key=k[0]) * sp.hidden**-0.5
        weights[f"{pre}.up_proj.weight"] = mx.random.normal((sp.ffn, sp.hidden), dtype=dt, key=k[1]) * sp.hidden**-0.5
        weights[f"{pre}.down_proj.weight"] = mx.random.normal((sp.hidden, sp.ffn), dtype=dt, key=k[2]) * sp.ffn**-0.5
    return write_flash(path, config=config, weights=weights,
                       source=f"random weights, {sp.name} FFN shape (mlx-flash bench)",
                       progress=progress, overwrite=path.exists())


def _trace_path(model_name: str) -> Path:

    return data_dir() / "bench" / "traces" / f"{model_name}.npz"


def _run_replay(name: str, files, trace, cfg: FlashConfig, tokens: int, warmup: int, probe,
                progress: Optional[ProgressCallback], seed: int = 0) -> BenchRow:
    """Drive one SparseFFN per layer of ``files`` with random inputs: every neuron
    (naive) or the trace's active sets (replayed oracle)."""

    from .engine import reader_max_gap  # noqa: PLC0415 - the engine imports mlx-lm (seconds): the CLI imports this module

    m = files.manifest
    threads, chunk = cfg.threads, cfg.chunk_bytes
    if not threads or not chunk:
        t, c = load_cached_choice(files.root)
        threads, chunk = threads or t, chunk or c
    dt = getattr(mx, m.dtype)
    replay = name.startswith(ORACLE)
    chooser = ReplayChooser(trace) if replay else AllNeurons(m.intermediate_size)
    counters = FFNCounters()
    cache = NeuronCache.from_budget(
        n_layers=m.num_layers, n_neurons=m.intermediate_size, bundle_elems=m.bundle_elems,
        bundle_bytes=m.bundle_bytes, dtype=dt, budget_bytes=cfg.budget_bytes(m.ffn_bytes_total),
        window=cfg.window, scratch_neurons=cfg.scratch_neurons, layout=bundle_layout(m), pipeline=cfg.pipeline)
    reader = FlashReader(files, threads=threads, chunk_bytes=chunk,
                         max_gap_bytes=reader_max_gap(files.root, cfg, threads), direct=cfg.direct_io)
    prefetcher = None
    try:
        ffns = [SparseFFN(i, m.hidden_size, chooser, cache.layers[i], reader, cache.scratch,
                          counters, act="silu") for i in range(m.num_layers)]
        if cfg.pipeline:  # the replayed sets are what the lookahead picks too: a perfect lookahead
            prefetcher = attach_pipeline(ffns, cache, reader, cfg.direct_io)
        drop_page_cache(files.ffn_path)
        _free_mlx()
        key = mx.random.key(seed)
        mx.reset_peak_memory()
        stats: List[Stats] = []
        mode = f"flash-{chooser.name}"
        for t in range(tokens):
            key, sub = mx.random.split(key)
            xs = mx.random.normal((m.num_layers, 1, m.hidden_size), dtype=dt, key=sub)
            mx.eval(xs)
            if isinstance(chooser, ReplayChooser):  # (replay)
                chooser.token = t
            before = FFNCounters(**counters.__dict__)
            t0 = time.perf_counter()
            for i, ffn in enumerate(ffns):
                ffn(xs[i])  # SparseFFN evaluates its output
            ms = (time.perf_counter() - t0) * 1e3
            d = FFNCounters(**{k: getattr(counters, k) - getattr(before, k) for k in counters.__dict__})
            stats.append(Stats(
                token_index=t, ms_total=ms, ms_predictor=d.predictor_s * 1e3, ms_io=d.io_s * 1e3,
                ms_compute=max(0.0, ms - (d.predictor_s + d.io_s) * 1e3), ms_prefetch=d.prefetch_s * 1e3,
                ms_overlap=d.overlap_s * 1e3, bytes_read=d.bytes_read,
                bytes_useful=d.bytes_useful, neurons_active=d.neurons_active, neurons_loaded=d.neurons_loaded,
                neurons_streamed=d.neurons_streamed,
                hit_rate=(d.neurons_hit / d.neurons_active) if d.neurons_active else 1.0,
                resident_bytes=cache.resident_bytes + cache.scratch_bytes, cache_bytes=cache.resident_bytes,
                budget_bytes=cache.budget_bytes, peak_memory=mx.get_peak_memory(),
                process_rss=_rss(), mode=mode))
            if t + 1 == warmup:
                reader.reset_totals()
                if prefetcher is not None:
                    prefetcher.reader.reset_totals()
            _report(progress, (t + 1) / tokens, f"{name}: token {t + 1}/{tokens}")
        reads = reader.reset_totals()
        if prefetcher is not None:
            reads.add(prefetcher.reader.reset_totals())
        s = summarize(stats, warmup)
        row = BenchRow(name=name, source=REPLAYED, **s)
        row.pipeline = prefetcher is not None
        row.lookahead = _jsonable(prefetcher.info()) if prefetcher is not None else None
        row.threads, row.chunk_bytes, row.read_mode = reader.threads, reader.chunk_bytes, reader.mode
        _io_figures(row, reads, probe)
        _reader_figures(row, reader, reads, probe, tokens - warmup)
        return row
    finally:
        if prefetcher is not None:
            prefetcher.close()
        reader.close()
        del cache
        _free_mlx()


def _rss() -> int:

    return process_rss()


# ----------------------------------------------------------------------------- quantized folders
AGREEMENT_PROMPTS_FILE = "evaluation/prompts.txt"
"""The project's prompt set for greedy agreement (resources/; none of them is a calibration prompt)."""


def agreement_prompt_set() -> List[str]:
    """The project's evaluation prompts (``resources/evaluation/prompts.txt``, one per line)."""

    return read_prompts(resources_dir() / AGREEMENT_PROMPTS_FILE)


def _cache_rows(budget: int, taken: int, row_bytes: int, n_layers: int, n: int,
                scratch_neurons: int) -> Tuple[int, int]:
    """(rows per layer, scratch rows) of a neuron cache made as the engine makes it
    (``engine._build_flash``: the chooser's resident bytes out of the budget, the scratch
    buffer at most an eighth of the rest; ``NeuronCache.from_budget``: no scratch when the
    whole FFN fits)."""
    room = max(0, budget - taken)
    scratch = min(scratch_neurons, max(8, room // 8 // row_bytes), n)
    if room >= n_layers * n * row_bytes:
        scratch = 0
    return int(max(0, min((room - scratch * row_bytes) // n_layers // row_bytes, n))), int(scratch)


def replay_reads(row: BenchRow, trace, files, cfg: FlashConfig) -> None:
    """Bytes per token of the row's own neuron choice on this quantized folder and on the
    bfloat16 layout of the same model: the recorded per-token active sets (``traces``) replayed
    through a real ``LayerCache`` with the reader's coalescing (``neuron_cache.simulate``), each
    cache sized from the same budget fraction (bfloat16: of the bfloat16 FFN). Fills
    ``row.sim_bytes_read_per_token`` (to check the replay against the measured figure) and
    ``row.bf16_bytes_read_per_token``. The row's cache policy (pinned hot neurons: the calibrated
    frequencies; read once at load, not per token). Gate-first rows (cache rows without the gate
    part) are left out."""

    m = files.manifest
    pol = str((row.policy or {}).get("name", "lru"))
    hot = float((row.policy or {}).get("hot_fraction") or 0.0)
    if (row.active or {}).get("name") == "gate" or len(trace) < 2:
        return
    freqs = load_frequencies(files) if hot > 0 else None
    if hot > 0 and freqs is None:
        return
    L, n = m.num_layers, m.intermediate_size
    warm = min(len(trace) - 1, max(1, row.warmup_tokens))
    out = []
    for bb in (m.bundle_bytes, float_bundle_bytes(m, "bfloat16")):
        total = L * n * bb
        cap, scratch = _cache_rows(cfg.budget_bytes(total), row.predictor_bytes, bb, L, n, cfg.scratch_neurons)
        gap = row.max_gap_bytes if row.max_gap_bytes is not None else (cfg.max_gap_bytes or DEFAULT_GAP)
        rm = ReadModel(bb, row.read_alignment or ALIGNMENT, gap, row.chunk_bytes or (1 << 20), max(1, scratch))
        per = [simulate([tok[i] for tok in trace.tokens], n, cap, pol, cfg.window,
                        frequencies=None if freqs is None else freqs[i], hot_fraction=hot if hot > 0 else None,
                        warmup=warm, read_model=rm) for i in range(L)]
        out.append(sum(st.bytes_read for st in per) / max(1, per[0].steps))
    row.sim_bytes_read_per_token, row.bf16_bytes_read_per_token = out


def _greedy(engine, prompt: str, tokens: int) -> List[int]:
    p = _prompt_for(engine, [{"role": "user", "content": prompt}])
    return [r.token for r in engine.stream_generate(p, tokens, temperature=0.0)]


def run_agreement(rep: BenchReport, path: Path, cfg_main: FlashConfig, n_prompts: int, tokens: int,
                  progress: Optional[ProgressCallback] = None) -> None:
    """Greedy agreement with dense over the project's prompt set: the first ``n_prompts``
    prompts of :func:`agreement_prompt_set` (chat template), ``tokens`` greedy tokens each
    (end-of-sequence ignored), through dense and through each measured row (pipelined twins
    are left out: their tokens equal their serial rows', checked by ``same_as_serial``);
    fills ``row.agreement`` with the tokens generated before the first divergence, per
    prompt and averaged."""
    from .engine import load  # noqa: PLC0415 - the engine imports mlx-lm (seconds): the CLI imports this module

    prompts = agreement_prompt_set()
    if n_prompts > len(prompts):
        raise ValueError(f"agreement: {n_prompts} prompts asked, the prompt set has {len(prompts)}")
    prompts = prompts[:n_prompts]
    rep.agreement_prompts, rep.agreement_tokens = len(prompts), int(tokens)
    rows = [r for r in rep.rows if r.source == REAL and " (" not in r.name]
    rows.sort(key=lambda r: r.name != DENSE)  # dense first: the reference
    if not rows or rows[0].name != DENSE:
        rep.notes.append("greedy agreement skipped: no dense row to compare with")
        return
    ref: List[List[int]] = []
    for k, row in enumerate(rows):
        cfg = FlashConfig.from_dict({**cfg_main.to_dict(), "active": _ACTIVE.get(row.name, "oracle")})
        engine = load(path, cfg, dense=row.name in _DENSE_ROWS,
                      dense_dtype="bfloat16" if row.name == DENSE_BF16 else None)
        try:
            engine.tokenizer.eos_token_ids = []
            per = []
            for j, pr in enumerate(prompts):
                toks = _greedy(engine, pr, tokens)
                if row.name == DENSE:
                    ref.append(toks)
                same = 0
                while same < min(len(toks), len(ref[j])) and toks[same] == ref[j][same]:
                    same += 1
                per.append(same)
                _report(progress, (k + (j + 1) / len(prompts)) / len(rows),
                        f"agreement: {row.name}, prompt {j + 1}/{len(prompts)}")
        finally:
            engine.close()
            del engine
            _free_mlx()
        row.agreement = {"prompts": len(prompts), "tokens": int(tokens), "per_prompt": per,
                         "mean": float(np.mean(per)), "identical": int(sum(v == tokens for v in per))}


def format_quantized(r: BenchReport) -> List[str]:
    """The quantized folder's extra sections: bytes per token against the bfloat16 layout of the
    same neuron choice, and greedy agreement with dense over the prompt set."""
    lines: List[str] = []
    replayed = [row for row in r.rows if row.bf16_bytes_read_per_token]
    if replayed:
        lines += ["", "Bytes read per token, this folder vs the bfloat16 layout of the same model (each row's recorded "
                      "active sets replayed through a real LayerCache with the reader's coalescing, same budget "
                      "fraction; 'measured' is the run itself):",
                  "| configuration | measured | replayed, this folder | replayed, bfloat16 | this / bfloat16 |",
                  "|---|---|---|---|---|"]
        for row in replayed:
            sim, bf16 = row.sim_bytes_read_per_token, row.bf16_bytes_read_per_token
            assert sim is not None and bf16  # replay_reads sets both; replayed holds the rows with bf16
            lines.append(f"| {row.name} | {_fb(row.bytes_read_per_token)} | {_fb(sim)} | {_fb(bf16)} | "
                         f"{sim / bf16:.2f}x |")
    agreed = [row for row in r.rows if row.agreement]
    if agreed:
        lines += ["", f"Greedy agreement with dense over {r.agreement_prompts} prompts "
                      f"(resources/{AGREEMENT_PROMPTS_FILE}), {r.agreement_tokens} tokens each: tokens generated "
                      "before the first divergence",
                  "| configuration | mean | prompts identical throughout | per prompt |", "|---|---|---|---|"]
        for row in agreed:
            a = row.agreement
            assert a  # agreed holds the rows with an agreement record
            lines.append(f"| {row.name} | {a['mean']:.1f} / {a['tokens']} | {a['identical']} / {a['prompts']} | "
                         + " ".join(str(v) for v in a["per_prompt"]) + " |")
    return lines


# ----------------------------------------------------------------------------- the bench
def _parse_configs(configs: Optional[Iterable[str]]) -> List[str]:
    if configs is None:
        return list(CONFIGS)
    chosen = {canonical_config(c) for c in configs}
    return [c for c in CONFIGS if c in chosen]


def run_bench(
    model_path: PathLike,
    *,
    budget: float = 0.5,
    tokens: int = 64,
    configs: Optional[Sequence[str]] = None,
    progress: Optional[ProgressCallback] = None,
    prompt: Any = None,
    warmup: int = 1,
    flash_config: Optional[FlashConfig] = None,
    sweep: Optional[Sequence[float]] = None,
    sweep_configs: Optional[Sequence[str]] = None,
    shape: Optional[Union[str, Shape]] = None,
    shape_gib: float = 2.0,
    shape_tokens: Optional[int] = None,
    shape_root: Optional[PathLike] = None,
    trace: Any = None,
    probe: Any = True,
    probe_kwargs: Optional[Dict[str, Any]] = None,
    ppl_tokens: int = DEFAULT_PPL_TOKENS,
    reference: Optional[str] = None,
    seed: int = 0,
    policies: Optional[Sequence[str]] = None,
    policy_budgets: Sequence[float] = DEFAULT_POLICY_BUDGETS,
    policy_active: str = "auto",
    pipeline_twins: bool = True,
    agreement_prompts: int = 0,
    agreement_tokens: int = 16,
) -> BenchReport:
    """Run the speed test on the flash folder ``model_path``; return a :class:`BenchReport`.

    budget:    FFN memory budget of the flash rows (fraction of the FFN bytes when
               <= 1, else bytes), as ``FlashConfig.budget``.
    tokens:    generated tokens per configuration (greedy; end-of-sequence ignored);
               the first ``warmup`` (>= 1) are left out of the per-token figures.
    configs:   names or aliases among dense / naive / oracle / predictor / gate / auto (default
               all; predictor and gate-first are skipped with a note when the model's
               calibration lacks them; auto is what ``FlashConfig.active = "auto"`` picks).
    progress:  ``callback(fraction, message)``; returning False cancels (``Cancelled``).
    prompt:    a string, token ids or chat messages (default :data:`DEFAULT_PROMPT`).
    flash_config: window, sparsity, threads, chunk_bytes, ... for the flash rows
               (``budget`` and ``active`` are set per row).
    sweep:     budgets (fractions) for the tokens/s-vs-budget sweep (none: no sweep);
               ``sweep_configs`` (default naive + oracle + predictor where measured).
    shape:     ``"7b"`` (or a :class:`Shape`): add naive/oracle rows replayed on a
               random model of that FFN shape with ``shape_gib`` GiB of FFN, driven by
               the active sets the flash-oracle run recorded (or ``trace``: a Trace
               or a path); ``shape_tokens`` tokens (default: ``tokens``, at most the
               trace's length: one per generated token after the first, which the
               prompt's last chunk computes).
    probe:     True: the disk's cached probe (measured once per machine,
               ``probe_kwargs`` go to ``cached_probe``); a ProbeResult; False: none.
    ppl_tokens: tokens of the reference text for perplexity (0: no perplexity);
               ``reference`` replaces ``resources/reference.txt``.
    policies:  cache policies to compare (e.g. :data:`POLICIES`; "auto" is added) at each
               of ``policy_budgets``, with the ``policy_active`` neuron choice (default
               the engine's: predictor when calibrated): hit rate, bytes per token,
               tokens/s, and which one "auto" picks and why.
    pipeline_twins: each flash row is run a second time with pipelined layers the other
               way (``FlashConfig.pipeline``): ``"<name> (pipelined)"`` or ``"<name> (serial)"``,
               no perplexity (the outputs are the same), side by side.
    agreement_prompts: greedy agreement with dense over the first N prompts of
               :func:`agreement_prompt_set` (0: none), ``agreement_tokens`` tokens each: per
               row, the tokens generated before the first divergence, averaged.
    """
    from .engine import is_flash_dir  # noqa: PLC0415 - the engine imports mlx-lm (seconds): the CLI imports this module

    t_start = time.perf_counter()
    path = Path(model_path).expanduser()
    if not is_flash_dir(path):
        raise ValueError(f"{path} is not a flash model folder (no manifest.json); convert it first: "
                         f"mlx-flash convert {path} {path.name}.flash")
    if tokens < 2:
        raise ValueError(f"tokens must be >= 2, got {tokens}")
    if not 1 <= warmup < tokens:
        raise ValueError(f"warmup must be in [1, tokens), got {warmup}")
    names = _parse_configs(configs)
    files = open_flash(path)
    m = files.manifest
    base = flash_config or FlashConfig()
    # flash rows run the flash engine whatever the budget ("auto" would run a 100% budget dense)
    cfg_main = FlashConfig.from_dict({**base.to_dict(), "budget": float(budget), "engine": "flash"})
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    sweep = [float(b) for b in (sweep or [])]
    shape_obj = (SHAPES[shape] if isinstance(shape, str) else shape) if shape else None
    if isinstance(shape, str) and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")

    rep = BenchReport(
        model=str(path), model_name=path.name, budget=float(budget),
        budget_bytes=cfg_main.budget_bytes(m.ffn_bytes_total),
        ffn_bytes=m.ffn_bytes_total, tokens=tokens, warmup=warmup, prompt=prompt, prompt_tokens=0,
        config=cfg_main.to_dict(), machine=machine_info(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    notes = rep.notes

    # ---- stages and their share of the progress bar
    stages: List[Tuple[str, float]] = []
    if probe is not None and probe is not False:
        stages.append(("probe", 1.0))
    stages += [(n, 1.0 if n in _DENSE_ROWS or not pipeline_twins else 1.7) for n in names]
    if agreement_prompts > 0:
        stages.append(("agreement", 0.3 * len(names) * agreement_prompts * agreement_tokens / max(1, tokens)))
    stages += [("sweep", 0.6 * len(sweep) * 2)] if sweep else []
    pol_list = list(dict.fromkeys([*policies, "auto"])) if policies else []
    for pname in pol_list:
        if pname not in FlashConfig.POLICY_CHOICES:
            raise ValueError(f"unknown cache policy {pname!r}; known: {', '.join(FlashConfig.POLICY_CHOICES)}")
    stages += [("policies", 0.6 * len(pol_list) * len(policy_budgets))] if pol_list else []
    if shape_obj is not None:
        stages += [("shape-build", 1.0), ("shape-naive", 1.5), ("shape-oracle", 1.0)]
    total = sum(w for _, w in stages)
    acc, bounds = 0.0, {}
    for s_name, w in stages:
        bounds[s_name] = (acc / total, (acc + w) / total)
        acc += w

    def stage(s_name: str) -> Optional[ProgressCallback]:
        lo, hi = bounds[s_name]
        return scaled(progress, lo, hi)

    # ---- disk probe (once per machine; the engine's threads/chunk come from it)
    probe_res = None
    if "probe" in bounds:
        probe_res = _load_probe(probe, path.parent, probe_kwargs, stage("probe"), notes)
    rep.probe = probe_res

    # ---- the reference text
    ref_ids: Optional[List[int]] = None
    if ppl_tokens and ppl_tokens > 0:
        from mlx_lm.utils import load_tokenizer  # noqa: PLC0415 - mlx-lm (seconds): the CLI imports this module

        tok = load_tokenizer(path)
        text = reference if reference is not None else reference_text()
        ids: List[int] = []
        for cut in (ppl_tokens * 12, len(text)):  # encode a prefix: long enough, no over-length warnings
            ids = list(tok.encode(text[:cut], add_special_tokens=False))
            if len(ids) > ppl_tokens + 1 or cut >= len(text):
                break
        ref_ids = ids[: ppl_tokens + 1]
        if len(ref_ids) < 2:
            ref_ids = None
        rep.perplexity_tokens = len(ref_ids) - 1 if ref_ids else 0

    # ---- the real-model configurations
    fits = True
    dense_estimate = m.ffn_bytes_total + files.dense_path.stat().st_size
    phys = _physical_memory()
    if phys and dense_estimate > 0.75 * phys:
        fits = False
    dense_tokens: Optional[List[int]] = None
    recorded = None
    for n in names:
        cb = stage(n)
        if n == DENSE and not fits:
            rep.skipped.append({"name": n, "reason": f"the whole model ({dense_estimate / 1e9:.1f} GB) does not fit "
                                                     f"in memory ({phys / 1e9:.1f} GB)"})
            _report(cb, 1.0, "dense skipped")
            continue
        if n == DENSE_BF16 and not m.quantized:  # dense is the float model already; said only when asked for
            if configs is not None:
                rep.skipped.append({"name": n, "reason": "the folder stores float bundles: dense is the float model"})
            _report(cb, 1.0, f"{n} skipped")
            continue
        cfg = FlashConfig.from_dict({**cfg_main.to_dict(), "active": _ACTIVE.get(n, "oracle")})
        two = pipeline_twins and n not in _DENSE_ROWS  # a twin with the pipeline the other way follows
        try:
            row, toks, tr = _run_real(n, path, cfg, prompt, tokens, warmup, ref_ids, probe_res,
                                      scaled(cb, 0.0, 0.6) if two else cb,
                                      record=n not in _DENSE_ROWS, dense_tokens=dense_tokens)
        except _Skip as e:
            rep.skipped.append({"name": n, "reason": str(e)})
            _report(cb, 1.0, f"{n} skipped")
            continue
        if n == DENSE:
            dense_tokens = toks
        if tr is not None and n == ORACLE:
            recorded = tr
        if tr is not None and m.quantized:
            replay_reads(row, tr, files, cfg)
        rep.rows.append(row)
        if two:
            cfg_t = FlashConfig.from_dict({**cfg.to_dict(), "pipeline": not cfg.pipeline})
            trow, ttoks, _ = _run_real(_twin_name(n, cfg_t.pipeline), path, cfg_t, prompt, tokens, warmup, None,
                                       probe_res, scaled(cb, 0.6, 1.0), dense_tokens=dense_tokens)
            trow.perplexity = row.perplexity  # same outputs, by construction (checked here)
            (row if row.pipeline else trow).same_as_serial = ttoks == toks
            rep.rows.append(trow)
    rep.prompt_tokens = max((r.prompt_tokens for r in rep.rows), default=0)
    if agreement_prompts > 0:
        run_agreement(rep, path, cfg_main, agreement_prompts, agreement_tokens, stage("agreement"))
    if recorded is not None:
        rep.trace = {**recorded.summary(), "model": path.name}

    # ---- the budget sweep
    if sweep:
        measured = {r.name for r in rep.rows}
        sc = _parse_configs(sweep_configs) if sweep_configs is not None else [NAIVE, ORACLE, PREDICTOR]
        sc = [c for c in sc if c != DENSE and (c in measured or sweep_configs is not None)]
        sc = [c for c in sc if c not in {s["name"] for s in rep.skipped}]
        cb = stage("sweep")
        pts = [(c, b) for b in sweep for c in sc]
        for k, (c, b) in enumerate(pts):
            sub = scaled(cb, k / len(pts), (k + 1) / len(pts))
            existing = rep.row(c)
            if existing is not None and abs(b - budget) < 1e-9:
                rep.sweep.append(_sweep_point(c, b, existing))
                continue
            cfg = FlashConfig.from_dict({**cfg_main.to_dict(), "budget": b, "active": _ACTIVE[c]})
            try:
                row, _, _ = _run_real(c, path, cfg, prompt, tokens, warmup, None, probe_res, sub)
                rep.sweep.append(_sweep_point(c, b, row))
            except Cancelled:
                raise
            except (ValueError, _Skip) as e:  # e.g. a budget too small for the scratch buffer
                rep.sweep.append(SweepPoint(config=c, budget=b, budget_bytes=cfg.budget_bytes(m.ffn_bytes_total),
                                            error=str(e)))
        _report(cb, 1.0, "sweep done")

    # ---- the cache policies, side by side at a few budgets
    if pol_list:
        cb = stage("policies")
        rep.policy_active = policy_active
        pts = [(pname, float(b)) for b in policy_budgets for pname in pol_list]
        for k, (pname, b) in enumerate(pts):
            sub = scaled(cb, k / len(pts), (k + 1) / len(pts))
            cfg = FlashConfig.from_dict({**cfg_main.to_dict(), "budget": b, "policy": pname,
                                         "active": policy_active})
            try:
                row, _, _ = _run_real(f"policy {pname}", path, cfg, prompt, tokens, warmup, None, probe_res, sub)
                rep.policies.append(_policy_point(pname, b, row))
            except Cancelled:
                raise
            except (ValueError, _Skip) as e:  # e.g. hot policies on a model without frequencies
                rep.policies.append(PolicyPoint(policy=pname, budget=b,
                                                budget_bytes=cfg.budget_bytes(m.ffn_bytes_total), error=str(e)))
        _report(cb, 1.0, "policies done")

    # ---- the large-shape rows (replayed traces)
    if shape_obj is not None:
        if trace is not None:
            tr_obj = trace if isinstance(trace, Trace) else Trace.load(trace)
        elif recorded is not None and len(recorded):
            tr_obj = recorded
        elif _trace_path(path.name).is_file():
            tr_obj = Trace.load(_trace_path(path.name))
            notes.append(f"replayed trace loaded from {_trace_path(path.name)} (recorded by an earlier run)")
        else:
            from .engine import load  # noqa: PLC0415 - the engine imports mlx-lm (seconds): the CLI imports this module

            cfg = FlashConfig.from_dict({**cfg_main.to_dict(), "active": "oracle"})
            eng = load(path, cfg)
            try:
                eng.tokenizer.eos_token_ids = []
                tr_obj = record_trace(eng, _prompt_for(eng, prompt), tokens)
            finally:
                eng.close()
                del eng
                _free_mlx()
        if recorded is not None and tr_obj is recorded:
            try:
                tr_obj.save(_trace_path(path.name))
            except OSError as e:  # pragma: no cover
                notes.append(f"could not save the trace: {e}")
        rep.trace = {**tr_obj.summary(), "model": tr_obj.meta.get("model", path.name)}
        spath = ensure_shape_model(shape_obj, shape_gib, root=shape_root, seed=seed, progress=stage("shape-build"))
        sfiles = open_flash(spath)
        sm = sfiles.manifest
        strace = tr_obj.scaled(sm.intermediate_size, sm.num_layers, seed=seed)
        n_tok = min(shape_tokens or tokens, len(strace))
        if n_tok <= warmup:
            raise ValueError(f"the trace has {len(strace)} tokens: too few for {warmup} warm-up token(s)")
        label = f" ({shape_obj.name} shape)"
        for n, st in ((NAIVE, "shape-naive"), (ORACLE, "shape-oracle")):
            cb = stage(st)
            row = _run_replay(n + label, sfiles, strace, cfg_main, n_tok, warmup, probe_res,
                              scaled(cb, 0.0, 0.5) if pipeline_twins else cb, seed=seed)
            row.group = f"{shape_obj.name} shape"
            rep.rows.append(row)
            if pipeline_twins:  # outputs are random-input FFN sums: not compared
                cfg_t = FlashConfig.from_dict({**cfg_main.to_dict(), "pipeline": not cfg_main.pipeline})
                trow = _run_replay(_twin_name(n + label, cfg_t.pipeline), sfiles, strace, cfg_t, n_tok, warmup,
                                   probe_res, scaled(cb, 0.5, 1.0), seed=seed)
                trow.group = row.group
                rep.rows.append(trow)
        rep.shape = {
            "name": shape_obj.name, "hidden": sm.hidden_size, "ffn": sm.intermediate_size, "dtype": sm.dtype,
            "layers": sm.num_layers, "ffn_bytes": sm.ffn_bytes_total, "bundle_bytes": sm.bundle_bytes,
            "gib": shape_gib, "path": str(spath), "tokens": n_tok, "trace_scaling": strace.meta.get("scale_mode"),
            "source_layers": strace.meta.get("source_layers"), "scaled_sparsity": strace.sparsity,
            "scaled_reuse_last_token": strace.reuse(1),
        }

    rep.ratios = compute_ratios(rep.rows)
    rep.notes[:0] = _standard_notes(rep, files)
    rep.seconds = time.perf_counter() - t_start
    try:
        rep.machine["load_average_end"] = list(os.getloadavg())
    except (OSError, AttributeError):
        pass
    _report(progress, 1.0, "bench done")
    return rep


def _sweep_point(c: str, b: float, row: BenchRow) -> SweepPoint:
    return SweepPoint.from_dict({**row.to_dict(), "config": c, "budget": b, "error": None})


def _standard_notes(rep: BenchReport, files) -> List[str]:
    n_meas = rep.tokens - rep.warmup
    out = [
        f"Every configuration generates exactly {rep.tokens} tokens greedily from the same prompt "
        f"({rep.prompt_tokens} prompt tokens; end-of-sequence ignored), one after another in one process.",
        f"Per-token figures leave out the first {rep.warmup} generated token(s) of each run (warm-up: cold neuron "
        f"cache, first-call overheads) and average the other {n_meas}; tokens/s = 1000 / mean ms per token.",
        "ms/token split: predictor = choosing the active neurons; I/O = neuron-cache bookkeeping + reads from "
        "ffn.bin; compute = the rest (attention, FFN arithmetic, sampling).",
        "The page cache of ffn.bin is dropped before each configuration, and flash reads bypass it.",
        "dense = the same flash folder loaded whole into memory (load(path, dense=True)); naive flash = every "
        "FFN neuron every token, the non-resident ones read from disk (the paper's baseline).",
        "flash oracle = the true active neurons from the full gate/up weights, which it holds in memory (counted in "
        "its resident bytes): an upper bound for a predictor, not a product mode.",
    ]
    if files.manifest.quantized:


        cd = str(compute_dtype(getattr(mx, files.manifest.dtype))).rsplit(".", 1)[-1]
        out.append(f"Quantized flash folder ({describe(role_quantization(files.manifest))}): dense = the dense "
                   "quantized model (every bundle in memory as stored, what mlx-lm runs with these bits); peak/dense "
                   f"compares each row's peak memory with it. Quantized matmuls run in {cd} here.")
        if rep.row(DENSE_BF16) is not None:
            out.append("dense bfloat16 = the same model with every weight dequantized to bfloat16, all in memory "
                       "(what mlx-lm runs with a bfloat16 conversion, `convert --dtype bfloat16`).")
    if any(r.perplexity is not None for r in rep.rows):
        out.append(f"Perplexity: {rep.perplexity_tokens} predicted tokens of resources/reference.txt (the project's "
                   "own prose) in one teacher-forced pass, after the generation.")
    if any(r.io_gbps for r in rep.rows):
        out.append("I/O GB/s = bytes read / time inside the reader over the measured tokens; 'of disk' divides it "
                   "by the probe's best throughput (any thread count) at the chunk size nearest the mean request.")
    if rep.shape:
        s = rep.shape
        out.append(
            f"Rows marked '{REPLAYED}' are not a real model: a random-weight flash model with {s['name']} FFN "
            f"dimensions (hidden {s['hidden']}, FFN {s['ffn']}, {s['dtype']}, bundle {s['bundle_bytes'] // 1024} KiB, "
            f"{s['layers']} layers = {s['ffn_bytes'] / 2**30:.2f} GiB) whose SparseFFNs (real NeuronCache, FlashReader "
            f"and sparse arithmetic) are driven with random inputs and the per-token active sets the flash-oracle run "
            f"recorded on the real model, each source neuron standing for a randomly placed group of "
            f"~{s['ffn'] / max(1, (rep.trace or {}).get('neurons', 1)):.1f} target neurons (same sparsity and reuse). "
            "FFN only: no attention, embeddings or sampling; predictor cost not modelled; no perplexity.")
    return out


# ----------------------------------------------------------------------------- text
def observations(report: BenchReport) -> List[str]:
    """Plain-language flags computed from the rows: streaming because the budget
    cannot hold the active set, read amplification, machine load."""
    out: List[str] = []
    gap = report.config.get("max_gap_bytes")
    for row in report.rows:
        if (row.neurons_streamed_per_token > 0 and row.neurons_active_per_token > 0
                and not row.name.startswith(NAIVE)):  # naive flash streams what does not fit by design
            frac = row.neurons_streamed_per_token / row.neurons_active_per_token
            out.append(f"{row.name}: {frac:.0%} of the active neurons of each token did not fit the neuron cache and "
                       "were streamed through the scratch buffer (read every token, never cached): the budget holds "
                       "less than the active set (raise the budget or the sparsity).")
        if row.bytes_useful_per_token > 0 and row.bytes_read_per_token > 1.5 * row.bytes_useful_per_token:
            out.append(f"{row.name}: reads {row.bytes_read_per_token / row.bytes_useful_per_token:.1f}x the useful "
                       f"bytes ({row.read_alignment or 4096}-byte alignment and coalescing gaps up to "
                       f"max_gap_bytes={row.max_gap_bytes if row.max_gap_bytes is not None else gap}).")
    la0 = (report.machine.get("load_average") or [None])[0]
    la1 = (report.machine.get("load_average_end") or [None])[0]
    cpus = report.machine.get("cpu_count") or 0
    if cpus and max(la0 or 0, la1 or 0) > 0.5 * cpus:
        seen = ", ".join(f"{v:.1f} at the {w}" for v, w in ((la0, "start"), (la1, "end")) if v is not None)
        out.append(f"The machine was busy (load average {seen}; {cpus} CPUs): timings are noisy.")
    return out


def _f(x: Optional[float], fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def format_pipeline(r: BenchReport) -> List[str]:
    """Serial vs pipelined rows side by side: the pipelined ms/token against the bound
    max(I/O, predictor + compute) of its own serial run, the overlap, the lookahead's recall."""
    by_name = {row.name: row for row in r.rows}
    pairs = []
    for row in r.rows:  # a row and its twin (the one whose name adds " (serial)" / " (pipelined)")
        for twin, piped_first in ((by_name.get(_twin_name(row.name, False)), True),
                                  (by_name.get(_twin_name(row.name, True)), False)):
            if twin is not None:
                p, s = (row, twin) if piped_first else (twin, row)
                if p.pipeline and not s.pipeline:
                    pairs.append((p, s))
    if not pairs:
        return []
    lines = ["", "Pipelined layers vs serial (ms/token; bound = max(I/O, predictor + compute) of the serial run):",
             "| configuration | serial ms | pipelined ms | bound | pipelined / bound | I/O behind compute | "
             "prefetch busy | speed-up | same tokens | lookahead recall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p, s in pairs:
        bound = max(s.ms_io, s.ms_predictor + s.ms_compute)
        rec = (p.lookahead or {}).get("mean_lookahead_recall")
        lines.append(f"| {s.name} | {s.ms_total:.1f} | {p.ms_total:.1f} | {bound:.1f} | "
                     f"{_f(p.ms_total / bound if bound else None, '{:.2f}x')} | {p.ms_overlap:.1f} | "
                     f"{p.ms_prefetch:.1f} | {_f(s.ms_total / p.ms_total if p.ms_total else None, '{:.2f}x')} | "
                     f"{ {True: 'yes', False: 'NO', None: '– (replayed)'}[p.same_as_serial]} | "
                     f"{_f(rec, '{:.1%}')} |")
    for p, _ in pairs:
        per = (p.lookahead or {}).get("lookahead_recall") or []
        if any(v is not None for v in per):
            lines.append(f"- {p.name}: lookahead recall per layer (1..{len(per) - 1}): " +
                         " ".join("–" if v is None else f"{v:.2f}" for v in per[1:]))
    return lines


def format_table(report: BenchReport) -> str:
    """The report as Markdown-ish text (tables of rows, ratios, sweep and probe, and the notes)."""
    r = report
    lines: List[str] = []
    budget = f"{r.budget:.0%}" if r.budget <= 1 else _fb(r.budget)
    lines.append(f"# mlx-flash bench: {r.model_name}")
    lines.append("")
    lines.append(f"FFN {_fb(r.ffn_bytes)}, budget {budget} ({r.budget_text()}); window {r.config.get('window')}, "
                 f"oracle sparsity {r.config.get('sparsity')}; {r.tokens} tokens per configuration, first "
                 f"{r.warmup} left out of the averages.")
    mi = r.machine
    la = mi.get("load_average")
    lines.append(f"Machine: {mi.get('platform')}, {mi.get('cpu_count')} CPUs, MLX {mi.get('mlx')} on {mi.get('device')}"
                 + (f", load average {la[0]:.2f} at the start" if la else "") + f"; run took {r.seconds:.0f} s.")
    lines.append("")
    head = ("| configuration | source | tok/s | ms/tok | predictor | I/O | compute | active | read/tok | useful/tok | "
            "hit rate | resident | peak | peak/dense | perplexity | I/O GB/s | of disk |")
    # each row's peak against the dense row's (a quantized flash folder's dense row is the dense
    # quantized model: what mlx-lm runs with the 4-bit weights)
    dense_peak = next((row.peak_memory for row in r.rows if row.name == DENSE and row.peak_memory), None)
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    skipped = [f"| {s['name']} | skipped: {s['reason']} |" for s in r.skipped]
    for row in r.rows:
        if row.group != "real" and skipped:
            lines += skipped
            skipped = []
        lines.append(
            f"| {row.name} | {row.source} | {row.tokens_per_s:.2f} | {row.ms_total:.1f} | {row.ms_predictor:.1f} | "
            f"{row.ms_io:.1f} | {row.ms_compute:.1f} | {_f(row.active_fraction, '{:.1%}')} | "
            f"{_fb(row.bytes_read_per_token)} | "
            f"{_fb(row.bytes_useful_per_token)} | {_f(row.hit_rate, '{:.1%}')} | {_fb(row.resident_bytes)} | "
            f"{_fb(row.peak_memory)} | {_f(row.peak_memory / dense_peak if dense_peak else None, '{:.2f}x')} | "
            f"{_f(row.perplexity, '{:.2f}')} | {_f(row.io_gbps, '{:.2f}')} | "
            f"{_f(row.io_efficiency, '{:.0%}')} |")
    lines += skipped
    if r.ratios:
        lines.append("")
        lines.append("Speed ratios (tokens/s):")
        for k, v in r.ratios.items():
            lines.append(f"- {k}: {v:.2f}x")
    chooser_lines = [f"- {row.name}: {row.active.get('name')}"
                     + (f" at sparsity {row.active['sparsity']:g}" if row.active.get("sparsity") is not None else "")
                     + f" ({row.active.get('reason')})"
                     for row in r.rows if row.active and row.active.get("asked") == "auto"]
    if chooser_lines:
        lines.append("")
        lines.append("Active-neuron choice of the auto rows:")
        lines += chooser_lines
    agree = [row for row in r.rows if row.agree_with_dense is not None and row.name != DENSE]
    if agree:
        lines.append("")
        lines.append("Same output as dense for the first N generated tokens: " +
                     ", ".join(f"{row.name} {row.agree_with_dense}/{r.tokens}" for row in agree))
    if any(row.io_gbps for row in r.rows):
        lines.append("")
        lines.append("| configuration | threads | chunk | mean request | I/O GB/s | disk best there "
                     "| disk at these threads | of disk best |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for row in r.rows:
            if row.io_gbps is None:
                continue
            lines.append(f"| {row.name} | {row.threads} | {row.chunk_bytes // 1024} KiB | "
                         f"{_fb(row.mean_request_bytes)} | {row.io_gbps:.2f} | {_f(row.disk_best_gbps, '{:.2f}')} | "
                         f"{_f(row.disk_gbps_same_threads, '{:.2f}')} | {_f(row.io_efficiency, '{:.0%}')} |")
    lines += format_reader(r)
    lines += format_pipeline(r)
    lines += format_quantized(r)
    lines += format_choosers(r)
    if r.sweep:
        lines.append("")
        lines.append("Budget sweep (tokens/s; hit rate; read per token):")
        budgets = sorted({p.budget for p in r.sweep})
        cfgs = list(dict.fromkeys(p.config for p in r.sweep))
        lines.append("| budget | " + " | ".join(cfgs) + " |")
        lines.append("|---|" + "---|" * len(cfgs))
        for b in budgets:
            cells = []
            for c in cfgs:
                p = next((p for p in r.sweep if p.config == c and p.budget == b), None)
                if p is None:
                    cells.append("")
                elif p.error:
                    cells.append("error")
                else:
                    cells.append(f"{p.tokens_per_s:.2f} tok/s; {_f(p.hit_rate, '{:.0%}')}; "
                                 f"{_fb(p.bytes_read_per_token)}")
            label = f"{b:.0%}" if b <= 1 else _fb(b)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for p in r.sweep:
            if p.error:
                lines.append(f"- {p.config} at {p.budget:.0%}: {p.error}" if p.budget <= 1 else
                             f"- {p.config} at {_fb(p.budget)}: {p.error}")
    if r.policies:
        lines += [""] + format_policies(r)
    if r.trace:
        t = r.trace
        lines.append("")
        lines.append(f"Trace recorded on {t.get('model')}: {t['tokens']} tokens x {t['layers']} layers x "
                     f"{t['neurons']} neurons; sparsity {t['sparsity']:.0%}, reuse from the last token "
                     f"{t['reuse_last_token']:.0%}, newly needed per token with a 5-token window "
                     f"{t['new_per_token_window5']:.1%} of the FFN.")
    if r.probe is not None:
        lines.append("")
        lines.append(f"Disk probe ({r.probe.directory}, measured {r.probe.created}):")
        lines.append(r.probe.format_table())
    obs = observations(r)
    if obs:
        lines.append("")
        lines.append("Observations (derived from the rows above):")
        lines += [f"- {o}" for o in obs]
    if r.notes:
        lines.append("")
        lines.append("Notes:")
        lines += [f"- {n}" for n in r.notes]
    return "\n".join(lines)


#: Issue #20's bars for the auto chooser: bytes read per token against the oracle's useful bytes,
#: perplexity against dense.
AUTO_BYTES_BAR = 1.15
AUTO_PPL_BAR = 0.02


def format_choosers(report: BenchReport) -> List[str]:
    """The active-neuron choosers side by side (serial real-model rows): which chooser ran,
    active share, bytes read and useful per token, perplexity and tok/s against dense and
    naive flash; then the auto row against issue #20's bars (reads at most
    ``AUTO_BYTES_BAR`` x the oracle's useful bytes, perplexity within ``AUTO_PPL_BAR`` of
    dense, tok/s above naive flash)."""
    rows = {row.name: row for row in report.rows if row.group == "real" and not row.pipeline}
    order = [n for n in CONFIGS if n in rows]
    if len(order) < 2:
        return []
    dense, naive, oracle, auto = (rows.get(n) for n in (DENSE, NAIVE, ORACLE, AUTO))
    lines = ["", "Active-neuron choosers side by side (serial rows; x: against dense / naive flash):",
             "| configuration | chooser | active | read/tok | useful/tok | perplexity | vs dense | tok/s | vs naive |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in order:
        row = rows[n]
        act = row.active or {}
        ch = act.get("name") or ("dense" if n == DENSE else _ACTIVE.get(n, ""))
        if act.get("sparsity") is not None:
            ch += f" (sparsity {act['sparsity']:g})"
        ppl_rel = (row.perplexity / dense.perplexity - 1 if dense and dense.perplexity and row.perplexity
                   else None)
        speed = row.tokens_per_s / naive.tokens_per_s if naive and naive.tokens_per_s else None
        lines.append(f"| {n} | {ch} | {_f(row.active_fraction, '{:.1%}')} | {_fb(row.bytes_read_per_token)} | "
                     f"{_fb(row.bytes_useful_per_token)} | {_f(row.perplexity, '{:.2f}')} | "
                     f"{_f(ppl_rel, '{:+.1%}')} | {row.tokens_per_s:.2f} | {_f(speed, '{:.2f}x')} |")
    if auto and oracle and oracle.bytes_useful_per_token:
        ratio = auto.bytes_read_per_token / oracle.bytes_useful_per_token
        lines.append(f"- auto reads {ratio:.2f}x the oracle's useful bytes per token (bar: at most "
                     f"{AUTO_BYTES_BAR:.2f}x): {'met' if ratio <= AUTO_BYTES_BAR else 'not met'}")
    if auto and dense and dense.perplexity and auto.perplexity:
        rel = auto.perplexity / dense.perplexity - 1
        lines.append(f"- auto perplexity {rel:+.1%} vs dense (bar: within {AUTO_PPL_BAR:.0%}): "
                     f"{'met' if abs(rel) <= AUTO_PPL_BAR else 'not met'}")
    if auto and naive and naive.tokens_per_s:
        sp = auto.tokens_per_s / naive.tokens_per_s
        lines.append(f"- auto runs {sp:.2f}x naive flash's tok/s (bar: above 1): {'met' if sp > 1 else 'not met'}")
    return lines


def format_policies(report: BenchReport) -> List[str]:
    """The cache-policy comparison as Markdown lines."""
    r = report
    pts = r.policies
    lines = [f"Cache policies (neuron choice: {r.policy_active or 'auto'}; per generated token: hit rate; "
             "read; tok/s):"]
    budgets = sorted({p.budget for p in pts})
    pols = list(dict.fromkeys(p.policy for p in pts))
    lines.append("| budget | " + " | ".join(pols) + " | best measured |")
    lines.append("|---|" + "---|" * (len(pols) + 1))
    for b in budgets:
        cells = []
        for pol in pols:
            p = next((p for p in pts if p.policy == pol and p.budget == b), None)
            if p is None:
                cells.append("")
            elif p.error:
                cells.append("error")
            else:
                tag = f" → {p.resolved}" + (f" ({p.hot_fraction:.0%} hot)" if p.hot_fraction else "") \
                    if pol == "auto" else ""
                cells.append(f"{_f(p.hit_rate, '{:.0%}')}; {_fb(p.bytes_read_per_token)}; "
                             f"{p.tokens_per_s:.2f}{tag}")
        best = best_policy(pts, b)
        label = f"{b:.0%}" if b <= 1 else _fb(b)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {best.policy if best else ''} |")
    for p in pts:
        if p.error:
            lines.append(f"- {p.policy} at {p.budget:.0%}: {p.error}")
    autos = [p for p in pts if p.policy == "auto" and p.error is None]
    for p in autos:
        best = best_policy(pts, p.budget)
        verdict = ""
        if best is not None:
            same = best.policy == p.resolved
            verdict = (" — the same as the measured best" if same else
                       f" — measured best here: {best.policy} ({_fb(best.bytes_read_per_token)}/token vs "
                       f"{_fb(p.bytes_read_per_token)})")
        lines.append(f"- auto at {p.budget:.0%} ran {p.resolved}"
                     + (f" with {p.hot_fraction:.0%} of the cache pinned" if p.hot_fraction else "")
                     + (f": {p.reason}" if p.reason else "") + verdict)
    pre = [p for p in pts if p.preload_bytes and p.error is None]
    if pre:
        lines.append("- pinned hot neurons are read once at load (not counted per token): " +
                     ", ".join(f"{p.policy} at {p.budget:.0%} {_fb(p.preload_bytes)}" for p in pre))
    return lines


# ----------------------------------------------------------------------------- neuron order: before/after
@dataclass
class OrderRow(_Record):
    """One chooser's reads with the neurons in one order on disk (replayed active sets)."""

    chooser: str
    order: str                      # "source" (as converted) or "hot" (most frequently active first)
    policy: str                     # the cache policy "auto" picks for this order
    model: str                      # "default model" or the shape's name
    tokens: int = 0
    bytes_per_token: float = 0.0
    useful_per_token: float = 0.0
    amplification: float = 0.0
    requests_per_token: float = 0.0
    mean_request_bytes: float = 0.0
    hit_rate: float = 0.0


def _order_rows(chooser: str, model: str, trace, freqs, capacity: int, rm, density, recall) -> List[OrderRow]:
    """Source order vs hot order of one trace (source numbering), each under the policy
    ``neuron_cache.resolve_auto_policy`` picks for that order (as the engine would)."""

    rows = []
    hot = compute_order("hot", n_layers=trace.n_layers, n_neurons=trace.n_neurons, frequencies=freqs)
    for order, perms in (("source", None), ("hot", hot)):
        f_order = freqs if perms is None else np.take_along_axis(freqs, perms, axis=1)
        pol, _ = resolve_auto_policy(f_order, capacity, read_model=rm, density=density, recall=recall)
        fig = replay_order_reads(trace, capacity, rm, perms=perms, policy=pol, frequencies=freqs)
        name = pol.name + (f" {pol.hot_fraction:.0%}" if pol.name == "hot+window" else "")
        rows.append(OrderRow(chooser=chooser, order=order, policy=name, model=model, tokens=fig.tokens,
                             bytes_per_token=fig.bytes_per_token,
                             useful_per_token=fig.bytes_useful / max(1, fig.tokens),
                             amplification=fig.amplification, requests_per_token=fig.requests_per_token,
                             mean_request_bytes=fig.mean_request_bytes, hit_rate=fig.hit_rate))
    return rows


def _scaled_frequencies(freqs: np.ndarray, trace, scaled) -> np.ndarray:
    """Per-layer frequencies of a ``Trace.scaled`` target: each target neuron has its source neuron's."""

    n, L = trace.n_neurons, scaled.n_layers
    probe = Trace(trace.n_layers, n, [[np.array([j])] * trace.n_layers for j in range(n)])
    m = probe.scaled(scaled.n_neurons, L, seed=scaled.meta.get("scale_seed", 0))
    src = m.meta["source_layers"]
    out = np.zeros((L, scaled.n_neurons))
    for j, tok in enumerate(m.tokens):
        for li in range(L):
            out[li, tok[li]] = freqs[src[li], j]
    return out


def run_order_bench(model_path: PathLike, *, budget: float = 0.5, tokens: int = 32, prompt: Any = None,
                    flash_config: Optional[FlashConfig] = None, shape: Optional[Union[str, Shape]] = "7b",
                    shape_layers: int = 8, progress: Optional[ProgressCallback] = None) -> Dict[str, Any]:
    """Neuron order on disk, before/after: the oracle's and the predictor's active sets of
    ``tokens`` generated tokens (recorded on the real model, :mod:`mlx_flash.traces`) replayed
    through a real ``LayerCache`` per layer at the engine's capacity for ``budget``, with the
    reader's coalescing (:func:`mlx_flash.neuron_order.replay_reads`), once with the neurons
    in the source's order and once most frequently active first (the calibrated frequencies),
    each under the cache policy "auto" picks for that order. With ``shape``: the oracle's
    trace scaled to that FFN shape (``shape_layers`` layers; random placement = the source
    order), the same two orders. Returns ``{"rows": [...], "notes": [...], ...}``."""
    from .engine import _chooser_density, load  # noqa: PLC0415 - the engine imports mlx-lm (seconds): the CLI imports this module

    path = Path(model_path).expanduser()
    files = open_flash(path)
    m = files.manifest
    if not has_predictors(files) or load_frequencies(files) is None:
        raise ValueError(f"{path}: the neuron-order bench needs calibrated frequencies: run `mlx-flash calibrate`")
    P = source_perms(m)  # position -> source id
    inv = inverse(P)
    freqs = np.take_along_axis(load_frequencies(files), inv, axis=1)  # in the source's numbering
    base = flash_config or FlashConfig()
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    rows: List[OrderRow] = []
    notes = [f"neurons on disk now: {(m.neuron_order or {}).get('method', 'source')} order"]
    oracle_trace = None
    for k, chooser in enumerate(("oracle", "predictor")):
        _report(progress, k / 3, f"neuron order: recording the {chooser}'s active sets")
        cfg = FlashConfig(**{**asdict(base), "engine": "flash", "active": chooser, "budget": budget})
        eng = load(path, cfg)
        try:
            tr = record_trace(eng, _prompt_for(eng, prompt), tokens)
            capacity = eng.cache.layers[0].capacity
            rm = ReadModel.of_reader(eng.reader, eng.cache.scratch_neurons)
            density, recall = _chooser_density(eng.chooser)
        finally:
            eng.close()
        src = Trace(tr.n_layers, tr.n_neurons,
                    [[np.sort(P[li][ids]) for li, ids in enumerate(tok)] for tok in tr.tokens], dict(tr.meta))
        if chooser == "oracle":
            oracle_trace = (src, rm)
        rows += _order_rows(chooser, "default model", src, freqs, capacity, rm, density, recall)
    if shape and oracle_trace is not None:
        _report(progress, 2 / 3, f"neuron order: the {shape} shape")
        sp = SHAPES[shape] if isinstance(shape, str) else shape
        src, rm = oracle_trace
        big = src.scaled(sp.ffn, shape_layers)
        bb = sp.bundle_bytes
        cap = int((budget * shape_layers * sp.ffn * bb - rm.scratch_neurons * bb) // shape_layers // bb)
        srm = ReadModel(bb, rm.alignment, rm.max_gap_bytes, rm.chunk_bytes, rm.scratch_neurons)
        rows += _order_rows("oracle", f"{sp.name} shape", big, _scaled_frequencies(freqs, src, big), cap, srm,
                            None, 1.0)
        notes.append(f"{sp.name} shape: the oracle's sets scaled to {sp.ffn} neurons x {shape_layers} layers "
                     f"(each source neuron = {sp.ffn / src.n_neurons:.1f} neurons at random places: the 'source' "
                     "order); simulated reads, no disk")
    _report(progress, 1.0, "neuron order: done")
    return {"model": str(path), "budget": budget, "tokens": tokens, "rows": [r.to_dict() for r in rows],
            "notes": notes}


def format_order(rep: Dict[str, Any]) -> List[str]:
    """The neuron-order comparison as Markdown lines."""
    lines = [f"Neuron order: before/after ({rep['budget']:.0%} budget, {rep['tokens']} tokens replayed per chooser; "
             "per token):",
             "| model | chooser | order | cache policy (auto) | read | useful | read / useful | requests | "
             "mean request | hit rate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d in rep["rows"]:
        r = OrderRow.from_dict(d)
        lines.append(f"| {r.model} | {r.chooser} | {r.order} | {r.policy} | {_fb(r.bytes_per_token)} | "
                     f"{_fb(r.useful_per_token)} | {r.amplification:.2f} | {r.requests_per_token:.0f} | "
                     f"{_fb(r.mean_request_bytes)} | {r.hit_rate:.0%} |")
    lines += [f"- {n}" for n in rep["notes"]]
    return lines


# ----------------------------------------------------------------------------- plots
_COLORS = {"predictor": "#8e6bbf", "I/O": "#d9822b", "compute": "#3a7dc9"}


def save_plots(report: BenchReport, out_dir: PathLike) -> List[Path]:
    """Write the report's PNG plots into ``out_dir``; return their paths.

    ``bench_ms_per_token.png``: stacked ms/token bars (predictor / I/O / compute)
    per configuration, one panel per source; ``bench_budget_sweep.png``: tokens/s
    vs memory budget (when the report has a sweep); ``bench_probe.png``: the disk
    probe's throughput vs chunk size per thread count, with each flash row's
    effective throughput (when it has a probe). Uses the Agg canvas directly (no
    global backend switch; safe from a worker thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - matplotlib (about a second): only when plotting
    from matplotlib.figure import Figure  # noqa: PLC0415 - matplotlib (about a second): only when plotting
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415 - matplotlib (about a second): only when plotting

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths: List[Path] = []

    def save(fig, name: str) -> None:
        FigureCanvasAgg(fig)
        p = out / name
        fig.savefig(p, dpi=120, bbox_inches="tight")
        paths.append(p)

    # ---- stacked ms/token bars
    groups = list(dict.fromkeys(r.group for r in report.rows))
    if groups:
        fig = Figure(figsize=(4.2 + 1.6 * len(report.rows), 4.6))
        axes = fig.subplots(1, len(groups), squeeze=False)[0]
        for ax, g in zip(axes, groups):
            rows = [r for r in report.rows if r.group == g]
            x = np.arange(len(rows))
            bottom = np.zeros(len(rows))
            for label, attr in (("predictor", "ms_predictor"), ("I/O", "ms_io"), ("compute", "ms_compute")):
                v = np.array([getattr(r, attr) for r in rows])
                ax.bar(x, v, 0.6, bottom=bottom, label=label, color=_COLORS[label])
                bottom += v
            for xi, r, top in zip(x, rows, bottom):
                ax.text(xi, top, f"{r.tokens_per_s:.2f} tok/s", ha="center", va="bottom", fontsize=8)
            ax.set_xticks(x)
            ax.set_xticklabels([r.name.replace(" (", "\n(") for r in rows], fontsize=8)
            ax.set_ylabel("ms per token")
            ax.set_title(rows[0].source if g == "real" else f"{g}: {rows[0].source}, FFN only", fontsize=9)
            ax.set_ylim(0, max(bottom.max(), 1e-3) * 1.15)
        axes[0].legend(fontsize=8, loc="upper left")
        budget = f"{report.budget:.0%}" if report.budget <= 1 else _fb(report.budget)
        fig.suptitle(f"{report.model_name}: ms per token at FFN budget {budget}", fontsize=10)
        save(fig, "bench_ms_per_token.png")

    # ---- tokens/s vs budget
    pts = [p for p in report.sweep if p.error is None]
    if pts:
        fig = Figure(figsize=(6, 4.2))
        ax = fig.subplots()
        for c in dict.fromkeys(p.config for p in pts):
            ps = sorted((p for p in pts if p.config == c), key=lambda p: p.budget)
            ax.plot([100 * p.budget for p in ps], [p.tokens_per_s for p in ps], marker="o", label=c)
        dense = report.row(DENSE)
        if dense is not None:
            ax.axhline(dense.tokens_per_s, color="gray", ls="--", lw=1, label="dense (whole model in memory)")
        ax.set_xlabel("FFN memory budget (% of the FFN weights)")
        ax.set_ylabel("tokens / s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{report.model_name}: speed vs memory budget", fontsize=10)
        save(fig, "bench_budget_sweep.png")

    # ---- cache policies: hit rate and bytes per token vs budget
    pps = [p for p in report.policies if p.error is None]
    if pps:
        fig = Figure(figsize=(11, 4.0))
        axes = fig.subplots(1, 3)
        for pol in dict.fromkeys(p.policy for p in pps):
            pol_pts = sorted((p for p in pps if p.policy == pol), key=lambda p: p.budget)
            xs = [100 * p.budget for p in pol_pts]
            style = dict(marker="o", label=pol, ls="--" if pol == "auto" else "-")
            axes[0].plot(xs, [100 * (p.hit_rate or 0) for p in pol_pts], **style)
            axes[1].plot(xs, [p.bytes_read_per_token / 1e6 for p in pol_pts], **style)
            axes[2].plot(xs, [p.tokens_per_s for p in pol_pts], **style)
        for ax, yl in zip(axes, ("hit rate (%)", "MB read per token", "tokens / s")):
            ax.set_xlabel("FFN memory budget (%)")
            ax.set_ylabel(yl)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{report.model_name}: neuron cache policies ({report.policy_active or 'auto'} neuron choice)",
                     fontsize=10)
        save(fig, "bench_policies.png")

    # ---- the disk probe
    pr = report.probe
    if pr is not None and pr.table:
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.subplots()
        chunks = pr.chunk_sizes
        for t in pr.thread_counts:
            xs = [c for c in chunks if t in pr.table[c]]
            ax.plot([c / 1024 for c in xs], [pr.table[c][t] for c in xs], marker="o", ms=3,
                    label=f"{t} thread{'s' if t > 1 else ''}")
        for r in report.rows:
            if r.io_gbps and r.mean_request_bytes:
                ax.scatter([r.mean_request_bytes / 1024], [r.io_gbps], marker="*", s=90, zorder=5,
                           label=f"{r.name} (reached)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("chunk size (KiB); stars: a configuration's mean request size")
        ax.set_ylabel("GB/s (random reads)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"disk read throughput ({pr.mode or '?'})", fontsize=10)
        save(fig, "bench_probe.png")
    return paths


# ----------------------------------------------------------------------------- time to first token
TTFT_LENGTHS: Tuple[int, ...] = (16, 128, 1024)
"""Prompt lengths (tokens) of the time-to-first-token section (:func:`run_ttft`)."""
TTFT_CONFIGS: Tuple[str, ...] = (DENSE, NAIVE, PREDICTOR, AUTO)
"""Its configurations (the others may be asked for: ``configs``)."""


def ttft_prompt(tokenizer, n: int, text: Optional[str] = None) -> List[int]:
    """A prompt of exactly ``n`` tokens: the first ``n`` tokens of the reference text (repeated
    when it is shorter)."""
    text = text if text is not None else reference_text()
    ids: List[int] = []
    while len(ids) < n:
        ids += list(tokenizer.encode(text, add_special_tokens=False))
    return [int(t) for t in ids[:n]]


def run_ttft(model_path: PathLike, *, lengths: Sequence[int] = TTFT_LENGTHS, configs: Optional[Sequence[str]] = None,
             budget: float = 0.5, repeats: int = 3, flash_config: Optional[FlashConfig] = None,
             progress: Optional[ProgressCallback] = None) -> Dict[str, Any]:
    """Time to first token per prompt length and configuration (the speed test's TTFT section).

    Every configuration's engine is loaded once and the runs go round-robin (length by length,
    ``repeats`` rounds, each configuration in turn), so a busy machine slows them alike: compare
    ratios. Each run reads a fresh prompt of the reference text (:func:`ttft_prompt`) into a new
    KV cache and stops at the first token (``Engine.generate_step``); ``Stats.ms_first_token``
    is recorded. One untimed short run per engine first (one-time costs such as the background
    checksum pass). Returns ``{"lengths", "repeats", "budget", "machine", "rows": [{config,
    prompt_tokens, ms_first_token (median), ms_runs, first_token, bytes_read (the whole prompt),
    mode}], "ratios": {"<config> / dense @ n": x}, "skipped": [{name, reason}]}``."""
    from .engine import load  # noqa: PLC0415 - the engine imports mlx-lm (seconds): the CLI imports this module

    path = Path(model_path).expanduser()
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"prompt lengths must be at least 1 token, got {lengths}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = [canonical_config(c) for c in (configs or TTFT_CONFIGS)]
    base = flash_config or FlashConfig()
    engines: Dict[str, Any] = {}
    skipped: List[Dict[str, str]] = []
    out: Dict[str, Any] = {"lengths": lengths, "repeats": repeats, "budget": float(budget),
                           "machine": machine_info(), "rows": [], "ratios": {}, "skipped": skipped}
    try:
        for k, name in enumerate(names):
            _report(progress, 0.1 * k / len(names), f"TTFT: loading {name}")
            cfg = FlashConfig.from_dict({**base.to_dict(), "budget": float(budget), "engine": "flash",
                                         "active": _ACTIVE.get(name, "auto")})
            try:
                engines[name] = load(path, cfg, dense=(name == DENSE))
            except Exception as e:
                if name not in _NEEDS_CALIBRATION:
                    raise
                skipped.append({"name": name, "reason": f"{type(e).__name__}: {e}"})
        tok = next(iter(engines.values())).tokenizer
        prompts = {n: ttft_prompt(tok, n) for n in lengths}
        for eng in engines.values():
            next(eng.generate_step(prompts[lengths[0]][:4], 1))  # untimed: one-time costs
        runs: Dict[Tuple[str, int], List[Stats]] = {(name, n): [] for name in engines for n in lengths}
        read: Dict[Tuple[str, int], int] = {}
        first: Dict[Tuple[str, int], int] = {}
        total, done = len(lengths) * repeats * len(engines), 0
        for n in lengths:
            for _ in range(repeats):
                for name, eng in engines.items():
                    before = eng.counters.bytes_read
                    step = next(eng.generate_step(prompts[n], 1))
                    st = step.stats
                    runs[(name, n)].append(st)
                    first[(name, n)] = step.token
                    read[(name, n)] = eng.counters.bytes_read - before
                    done += 1
                    _report(progress, 0.1 + 0.9 * done / total,
                            f"TTFT: {name}, {n} tokens: {st.ms_first_token / 1e3:.2f} s")
        for name, eng in engines.items():
            for n in lengths:
                sts = runs[(name, n)]
                ms = [s.ms_first_token for s in sts]
                out["rows"].append({"config": name, "prompt_tokens": n, "ms_first_token": float(np.median(ms)),
                                    "ms_runs": ms, "first_token": first[(name, n)],
                                    "bytes_read": int(read[(name, n)]), "mode": eng.mode})
    finally:
        for eng in engines.values():
            eng.close()
        engines.clear()
        _free_mlx()
    dense = {r["prompt_tokens"]: r["ms_first_token"] for r in out["rows"] if r["config"] == DENSE}
    for r in out["rows"]:
        d = dense.get(r["prompt_tokens"])
        if r["config"] != DENSE and d:
            out["ratios"][f"{r['config']} / {DENSE} @ {r['prompt_tokens']}"] = r["ms_first_token"] / d
    return out


def format_ttft(res: Dict[str, Any]) -> List[str]:
    """The TTFT section as Markdown lines: one row per configuration, one column per prompt
    length (median seconds, and the ratio to dense)."""
    lengths = res.get("lengths") or []
    rows = res.get("rows") or []
    if not rows:
        return []
    dense = {r["prompt_tokens"]: r["ms_first_token"] for r in rows if r["config"] == DENSE}
    lines = ["", f"### Time to first token (median of {res.get('repeats', 1)} runs, round-robin; budget "
                 f"{res.get('budget', 0):.0%}; prompts: reference text)", "",
             "| configuration | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for name in dict.fromkeys(r["config"] for r in rows):
        cells = []
        for n in lengths:
            r = next((x for x in rows if x["config"] == name and x["prompt_tokens"] == n), None)
            if r is None:
                cells.append("-")
                continue
            cell = f"{r['ms_first_token'] / 1e3:.2f} s"
            if name != DENSE and dense.get(n):
                cell += f" ({r['ms_first_token'] / dense[n]:.2f}x)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for sk in res.get("skipped") or []:
        lines.append(f"- {sk['name']} skipped: {sk['reason']}")
    load = (res.get("machine") or {}).get("load_average")
    if load:
        lines.append(f"- load average at the start: {', '.join(f'{x:.1f}' for x in load)}")
    return lines


__all__ = [
    "ALIASES", "AUTO", "GATE", "BenchReport", "BenchRow", "format_pipeline", "POLICIES", "PolicyPoint", "best_policy",
    "format_policies", "CONFIGS", "DEFAULT_PROMPT", "DENSE", "NAIVE", "ORACLE", "PREDICTOR",
    "REAL", "REPLAYED", "SHAPES", "Shape", "SweepPoint", "canonical_config", "compute_ratios",
    "default_flash_model", "ensure_shape_model", "format_order", "format_table", "OrderRow", "run_order_bench",
    "machine_info", "observations", "reference_text", "run_bench", "save_plots", "summarize",
    "TTFT_CONFIGS", "TTFT_LENGTHS", "format_ttft", "run_ttft", "ttft_prompt",
]
