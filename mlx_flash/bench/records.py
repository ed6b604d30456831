"""The speed test's records: configuration names, shapes, :class:`BenchRow`, :class:`SweepPoint`,
:class:`PolicyPoint` and :class:`BenchReport` with their dict / JSON round trips, and the speed ratios.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..config import format_budget
from ..storage.format import DTYPE_SIZES
from ..storage.probe import ProbeResult

PathLike = Union[str, Path]


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
    """FFN dimensions of a large-shape run (random weights). ``bits``: the FFN stored quantized the
    way the product stores a 4-bit model (``storage.format``'s exact layout: gate/up rows ``bits``-bit
    with ``group_size`` groups along hidden, down codes per neuron with its group scales resident);
    None: float rows of ``dtype`` (``dtype`` is then also the scales' dtype)."""

    name: str
    hidden: int
    ffn: int
    dtype: str = "float16"
    bits: Optional[int] = None
    group_size: int = 32

    @property
    def bundle_bytes(self) -> int:
        """Bytes of one neuron's bundle in ffn.bin (an estimate for sizing; the manifest has the truth)."""
        if self.bits is None:
            return 3 * self.hidden * DTYPE_SIZES[self.dtype]
        codes = self.hidden * self.bits // 8
        return 3 * codes + 2 * 2 * (self.hidden // self.group_size) * DTYPE_SIZES[self.dtype]

    @property
    def layer_bytes(self) -> int:
        return self.ffn * self.bundle_bytes

    @property
    def label(self) -> str:
        """``"4-bit g32"`` or the float dtype."""
        return self.dtype if self.bits is None else f"{self.bits}-bit g{self.group_size}"

    def layers_for(self, gib: float) -> int:
        """As many layers as fit ``gib`` GiB of ffn.bin (at least one)."""
        return max(1, int(gib * 2**30 // self.layer_bytes))


SHAPES: Dict[str, Shape] = {
    # Llama-2-7B FFN, 4-bit g32 exact layout as users run it: bundle 7 KiB, 75 MiB a layer
    "7b": Shape("7b", 4096, 11008, bits=4),
    "7b-f16": Shape("7b-f16", 4096, 11008),  # the same in float16: bundle 24 KiB, 258 MiB a layer
    "13b": Shape("13b", 5120, 13824, bits=4),
}


def canonical_config(name: str) -> str:
    """``"oracle"`` → ``"flash oracle"`` etc.; ValueError for unknown names."""
    key = str(name).strip().lower()
    if key not in ALIASES:
        raise ValueError(f"unknown bench configuration {name!r}; known: {', '.join(sorted(set(ALIASES)))}")
    return ALIASES[key]


@dataclass
class _Record:
    """``to_dict`` / ``from_dict`` for the report's dataclasses (unknown keys are ignored on load); a dataclass
    without fields itself, so that the type checker knows ``asdict`` and ``fields`` apply."""

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
    ms_prefetch: float = 0.0              # pipelined: the prefetch in flight per token
    ms_overlap: float = 0.0               # pipelined: disk and compute busy at once per token
    lookahead: Optional[Dict[str, Any]] = None  # pipelined: Engine.pipeline_info() (recall per layer)
    same_as_serial: Optional[bool] = None  # pipelined: generated the same tokens as its serial row
    read_alignment: int = 0               # the reader's read alignment (O_DIRECT: the device's logical block)
    max_gap_bytes: Optional[int] = None   # the reader's coalescing gap (from the probe unless configured)
    requests_per_token: Optional[float] = None  # read system calls per measured token
    disk_gbps_at_request: Optional[float] = None  # probe interpolated at the mean request size, same threads
    reader_of_probe: Optional[float] = None  # io_gbps / disk_gbps_at_request
    serving_gbps: Optional[float] = None  # bytes read / time a read thread was at work (ReadStats.service_gbps)
    reader_split: Optional[Dict[str, float]] = None  # where a request's time went (ReadStats.split)
    live_probe_gbps: Optional[float] = None  # probe.probe_file on this ffn.bin right after the row (same load)
    reader_of_live_probe: Optional[float] = None  # io_gbps / live_probe_gbps
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
    group_quant_bytes: int = 0            # the exact down layout's resident group scales (in the budget)

    def budget_text(self) -> str:
        """The main budget and what it holds (:func:`budget_text`)."""
        return budget_text({"budget_bytes": self.budget_bytes, "rows": [r.to_dict() for r in self.rows],
                            "group_quant_bytes": self.group_quant_bytes})

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


def read_ms(row: BenchRow) -> Optional[float]:
    """Milliseconds per token with the row's reads in flight (bytes read / the reader's GB/s):
    what a token would cost if compute were free and the reads were not overlapped."""
    if not row.io_gbps or row.bytes_read_per_token <= 0:
        return None
    return row.bytes_read_per_token / (row.io_gbps * 1e9) * 1e3


def shape_io_ratios(rows: Sequence[BenchRow]) -> Dict[str, Dict[str, float]]:
    """For each replayed flash-oracle row against the naive row of its group with the same
    pipelining: what bounds the speed-up. ``total`` (tokens/s), ``read_time`` (the I/O-only ratio,
    :func:`read_ms`: the speed-up if compute were free, as on a fast GPU), ``bytes`` (bytes read),
    ``gbps`` (the naive reader's GB/s over the oracle's) and ``compute`` (ms of compute)."""
    out: Dict[str, Dict[str, float]] = {}
    for r in rows:
        if r.source != REPLAYED or r.name.split(" (")[0] != ORACLE:
            continue
        for b in rows:
            if b.group != r.group or b.name.split(" (")[0] != NAIVE or bool(b.pipeline) != bool(r.pipeline):
                continue
            d: Dict[str, float] = {}
            if r.tokens_per_s > 0 and b.tokens_per_s > 0:
                d["total"] = r.tokens_per_s / b.tokens_per_s
            rb, rr = read_ms(b), read_ms(r)
            if rb and rr:
                d["read_time"] = rb / rr
            if r.bytes_read_per_token > 0:
                d["bytes"] = b.bytes_read_per_token / r.bytes_read_per_token
            if r.io_gbps and b.io_gbps:
                d["gbps"] = b.io_gbps / r.io_gbps
            if r.ms_compute > 0:
                d["compute"] = b.ms_compute / r.ms_compute
            out[f"{r.name} / {b.name}"] = d
    return out


def budget_text(report: Dict[str, Any]) -> str:
    """A report's (or its JSON's) main budget as :func:`mlx_flash.config.format_budget` shows it:
    the predictors' share as the real predictor row measured it, the rest cache."""
    pred = max((int(r.get("predictor_bytes") or 0) for r in report.get("rows") or []
                if r.get("source", REAL) == REAL), default=0)
    scales = int(report.get("group_quant_bytes") or 0)
    return format_budget(int(report.get("budget_bytes") or 0) - pred - scales, pred, scales)


def _sweep_point(c: str, b: float, row: BenchRow) -> SweepPoint:
    return SweepPoint.from_dict({**row.to_dict(), "config": c, "budget": b, "error": None})
