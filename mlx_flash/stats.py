"""Per-token statistics: the one record the CLI, the speed test and the app all show; ``print_summary``,
the closing lines of a generation (CLI and the app's selftest)."""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import asdict, dataclass, field

from .config import format_budget
from .units import fmt_bytes


@dataclass
class FFNCounters:
    """What the sparse FFNs did during one forward pass (summed over layers)."""

    predictor_s: float = 0.0
    io_s: float = 0.0
    ffn_compute_s: float = 0.0
    bytes_read: int = 0          # from disk, including alignment and gaps
    bytes_useful: int = 0        # bundle bytes actually needed
    read_requests: int = 0
    neurons_active: int = 0
    neurons_loaded: int = 0      # cache misses read into the cache
    neurons_streamed: int = 0    # active neurons that did not fit, read through scratch
    neurons_hit: int = 0
    # pipelined layers (mlx_flash.pipeline): the prefetch's busy time (submit to its last request), the part of it
    # while the engine's thread computed (disk and compute busy at once), prefetched neurons
    prefetch_s: float = 0.0
    overlap_s: float = 0.0
    neurons_prefetched: int = 0
    neurons_prefetch_used: int = 0   # missing neurons copied from the staging buffer, not read

    def add(self, other: "FFNCounters") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class Stats:
    """One generated token's numbers (times in milliseconds, sizes in bytes). The first token
    (``token_index`` 0) comes out of the prompt's last chunk (``Engine.generate_step``): its
    per-token figures (ms, bytes, neurons) are that chunk's."""

    token_index: int = 0
    ms_total: float = 0.0
    ms_predictor: float = 0.0
    ms_io: float = 0.0
    ms_compute: float = 0.0          # everything that is not predictor or I/O
    ms_prefetch: float = 0.0         # pipelined: the prefetch in flight (beside the token's own time)
    ms_overlap: float = 0.0          # pipelined: disk and compute busy at once (I/O hidden behind compute)
    bytes_read: int = 0              # from disk, including 4 KiB alignment and coalescing gaps
    bytes_useful: int = 0            # bundle bytes of the neurons actually needed
    neurons_active: int = 0
    neurons_loaded: int = 0
    neurons_streamed: int = 0
    neurons_prefetched: int = 0      # pipelined: read ahead into the staging buffer
    neurons_prefetch_used: int = 0   # pipelined: missing neurons that came from the staging buffer
    hit_rate: float = 1.0            # this token: hits / active
    cum_hit_rate: float = 1.0        # since the start of the generation
    resident_bytes: int = 0          # weights in memory: dense part + neuron cache + predictors
    cache_bytes: int = 0             # neuron cache in use now
    budget_bytes: int = 0            # the neuron cache's share of the FFN budget (0 for dense)
    predictor_bytes: int = 0         # the predictors' share of the FFN budget (config.format_budget shows both)
    peak_memory: int = 0             # MLX peak allocation
    process_rss: int = 0             # the whole process
    tokens_per_s: float = 0.0        # generation speed so far
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    ms_first_token: float = 0.0      # time to first token: reading the prompt (its last chunk gives the token)
    mode: str = "dense"
    notes: list = field(default_factory=list)  # warnings about this run (Engine.notes + this prompt's)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def process_rss() -> int:
    """Resident set size of this process in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ru if sys.platform == "darwin" else ru * 1024  # peak, not current, on macOS
    except Exception:  # pragma: no cover
        return 0


def print_summary(stats_list, file=None, engine=None) -> None:
    """mlx-lm style closing lines, plus the flash engine's breakdown (and, given the
    ``engine``, which active-neuron chooser ran and why)."""
    file = file or sys.stderr
    if not stats_list:
        return
    last = stats_list[-1]
    n = len(stats_list)
    print("=" * 10, file=file)
    print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec; first token after "
          f"{last.ms_first_token / 1e3:.2f} s", file=file)
    print(f"Generation: {n} tokens, {last.tokens_per_s:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {last.peak_memory / 1e9:.3f} GB", file=file)
    if last.mode.startswith("flash"):
        steady = stats_list[1:] or stats_list
        k = len(steady)
        pred = sum(s.ms_predictor for s in steady) / k
        io = sum(s.ms_io for s in steady) / k
        comp = sum(s.ms_compute for s in steady) / k
        read = sum(s.bytes_read for s in steady) / k
        print(f"Flash ({last.mode}): {pred + io + comp:.1f} ms/token = predictor {pred:.1f} + I/O {io:.1f} "
              f"+ compute {comp:.1f}; read {fmt_bytes(read)}/token; hit rate {last.cum_hit_rate:.1%}; "
              f"cache {fmt_bytes(last.cache_bytes)} in use; budget "
              f"{format_budget(last.budget_bytes, last.predictor_bytes)}", file=file)
        prefetch = sum(s.ms_prefetch for s in steady) / k
        if prefetch > 0:
            overlap = sum(s.ms_overlap for s in steady) / k
            used = sum(s.neurons_prefetch_used for s in steady) / k
            fetched = sum(s.neurons_prefetched for s in steady) / k
            print(f"Pipeline: prefetch {prefetch:.1f} ms/token, {overlap:.1f} ms of it behind compute "
                  f"(disk and compute busy at once); {used:.0f} of {fetched:.0f} prefetched neurons/token used",
                  file=file)
    info = engine.active_info if engine is not None else None
    if info is not None:
        print(f"Active neurons: {info.name} ({info.reason})", file=file)
