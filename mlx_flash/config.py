"""FlashConfig: the one configuration object passed down through the engine."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Tuple, Union

from .units import fmt_bytes


@dataclass
class FlashConfig:
    """How the flash engine runs a model.

    engine:   "auto" (the default): a flash folder runs dense (its whole FFN read into
              memory once, every neuron computed, no disk reads per token) when the
              whole FFN fits the budget, else through the flash engine; the choice and
              the reason are in ``Engine.engine_info``. "flash" / "dense" force one.
    budget:   memory the FFN neuron cache may use: a fraction of the model's FFN
              bytes when <= 1.0 (the paper: about half), else absolute bytes.
              The streaming scratch buffer counts against it too.
    window:   sliding window k: neurons active in the last k tokens stay cached.
    threads:  parallel positional reads (0 = pick from the disk probe).
    chunk_bytes: largest single read; coalesced runs are split at this size
              (0 = pick from the disk probe).
    max_gap_bytes: neighbouring neuron runs closer than this are read in one
              request (the gap is read and thrown away): fewer, larger reads.
              None = from the disk probe: what one more request costs in bytes at the
              reader's threads (``ProbeResult.gap_bytes``; 16 KiB without a probe).
    active:   how each token's active neurons are chosen:
              "auto" (the default: on a calibrated model "gate", "predictor" or
              "all", whichever reads the fewest bytes per token while keeping
              quality, measured at load from the calibration's held-out figures
              (``engine.choose_active``; the reason is in ``Engine.active_info``);
              uncalibrated: "all" when the budget holds the whole FFN, else
              "oracle", with a note in ``Engine.notes``),
              "gate" (gate-first: every layer's gate rows resident inside the
              budget, ``|act(gate x)|`` above calibrated per-layer thresholds;
              only the up/down parts of active neurons are read; ``sparsity``
              picks a calibrated gate sparsity, None the calibrated choice),
              "all" (naive flash, the paper's baseline: every neuron),
              "oracle" (true gated activation above the layer's threshold,
              computed from full weights; an upper bound, not a product mode),
              "predictor" (the low-rank predictors stored with the model;
              ``extra["recall"]`` picks one of the calibrated recall targets;
              ``predictor_bits`` their in-memory bits).
    sparsity: target fraction of inactive neurons for the oracle's rule. None
              (the default): the calibrated per-layer thresholds when the model
              has them (``mlx-flash calibrate``), else 0.5 (per-token top-k).
              A value equal to the calibrated sparsity uses those thresholds too.
              For "gate" it picks one of the calibrated gate sparsities (None: the
              one calibration chose).
    direct_io: bypass the page cache (O_DIRECT / F_NOCACHE). Only turn off for
              debugging: with the page cache on, measured I/O is not real.
    scratch_neurons: size of the streaming buffer (in neurons) used for active
              neurons that do not fit in the cache (at most an eighth of the budget; it is
              inside it). Misses that fit it are read in one piece and multiplied with the
              cached rows in one product; more stream through its two halves, one FFN product
              per half: 1,024 (the default) against 256 took the default model's naive flash
              from ~255 to ~140-165 ms/token (exact 4-bit down rows, whose product has a
              fixed cost per call; 145 → 137 ms with 8-bit down rows), one run each, 2 cores.
    prefill:  how the prompt is read: "all" (the default: every FFN neuron, exact;
              a prompt's tokens together use nearly all neurons anyway, and an
              exact KV cache keeps the answer from drifting) or "sparse" (each
              prompt token through the active-set choice, like generated tokens).
    policy:   neuron cache policy (``mlx_flash.neuron_cache``; every policy uses
              the same preallocated rows under the same budget):
              "auto" (the default: on a calibrated model, the share of pinned hot
              neurons measured best, i.e. fewest bytes read per token, simulated at
              load on tokens sampled from the calibrated neuron frequencies —
              resolving to "lru", "hot" or
              "hot+window"; without calibration "lru"),
              "window" (the paper's: neurons not active in the last ``window``
              tokens are deleted each token),
              "lru" (the same deletions deferred until their rows are needed, so
              stale neurons may still hit),
              "hot" (each layer's rows all hold its most frequently active neurons,
              pinned; other active neurons stream every token; needs calibration),
              "hot+window" (``hot_fraction`` of the rows pinned hot neurons, the rest
              "lru"; needs calibration).
              The engine records what it ran, and why, in ``Engine.policy_info``.
    pipeline: pipelined layers (``mlx_flash.pipeline``): while layer l computes, the
              neurons layer l+1's chooser picks from layer l's input are read ahead
              into staging buffers (I/O buffers outside the budget); outputs are the
              same bit for bit, only where missing neurons' bytes come from changes.
              Off by default: the staging buffers are memory the budget does not
              count, and the gain is not proven here: one speed test on the default
              model at 50% (bfloat16, load 8) measured the predictor 1.25x and naive
              flash 1.36x faster pipelined (the oracle, whose lookahead recalls 75%,
              0.91x), another CLI run a tie; the prefetch's copies compete with
              compute for a loaded 2-core CPU. With its CPU work cut (staged
              overflow multiplied in place, lookaheads skipped on dense layers),
              token-by-token paired runs put it at 1.03x serial's time at load
              2-4 and 0.95-0.99x at load 4-6 (README). CLI ``--pipeline``.
              MoE models (``mlx_flash.moe``): the next MoE layer's likely experts
              (its router on this layer's input) are read ahead the same way.
    pipeline_depth: how many layers ahead pipelined layers read (>= 1; dense FFN models; MoE
              reads one ahead): layer l reads layer l+depth's lookahead, so the reads of
              ``depth`` layers are in flight while l computes; ``depth + 1`` staging
              buffers (outside the budget). 1: depth 2 measured no faster.
    predictor_bits: the in-memory bits of the predictors' low-rank matrices, quantized at
              load (``predictor.PredictorWeights.quantize``): 4 (the default: on the default
              model's held-out calibration tokens recall 0.9900 vs 0.9903 in floats, the same
              96.0% predicted, 1.7 MB instead of 4.3: docs/bench/predq), 8, or 0 for the
              stored floats.
    hot_fraction: share of each layer's cache rows pinned with hot neurons, in
              [0, 1]. None (the default): "hot+window" pins half, "auto" measures.
              Only "auto" and "hot+window" take a value ("hot" means 1).
    verify:   when ``ffn.bin``'s per-layer checksums are checked (they always are,
              once per load; ``dense.safetensors`` and ``predictors.safetensors`` are
              checked at load either way): "background" (the default: a thread hashes
              the layers from the moment the model is opened; each layer's FFN waits
              for its own layer before its output is used) or "load" (``load`` returns
              only when every layer is verified).
    """

    budget: float = 0.5
    engine: str = "auto"
    window: int = 5
    threads: int = 0
    chunk_bytes: int = 0
    max_gap_bytes: Optional[int] = None
    active: str = "auto"
    sparsity: Optional[float] = None
    direct_io: bool = True
    scratch_neurons: int = 1024
    policy: str = "auto"
    hot_fraction: Optional[float] = None
    prefill: str = "all"
    verify: str = "background"
    pipeline: bool = False
    pipeline_depth: int = 1
    predictor_bits: int = 4
    extra: dict = field(default_factory=dict)

    ACTIVE_CHOICES = ("auto", "all", "oracle", "predictor", "gate")
    ENGINE_CHOICES = ("auto", "flash", "dense")
    PREFILL_CHOICES = ("all", "sparse")
    DEFAULT_SPARSITY = 0.5  # the oracle's top-k rule for models without calibration
    POLICY_CHOICES = ("auto", "window", "lru", "hot", "hot+window")
    VERIFY_CHOICES = ("background", "load")
    PREDICTOR_BITS_CHOICES = (0, 4, 8)

    def __post_init__(self) -> None:
        if not isinstance(self.budget, (int, float)) or not math.isfinite(self.budget) or self.budget <= 0:
            raise ValueError(f"budget must be a finite number > 0 (a fraction <= 1 of the FFN, or bytes), "
                             f"got {self.budget!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.engine not in self.ENGINE_CHOICES:
            raise ValueError(f"engine must be one of {self.ENGINE_CHOICES}, got {self.engine!r}")
        if self.active not in self.ACTIVE_CHOICES:
            raise ValueError(f"active must be one of {self.ACTIVE_CHOICES}, got {self.active!r}")
        if self.policy not in self.POLICY_CHOICES:
            raise ValueError(f"policy must be one of {self.POLICY_CHOICES}, got {self.policy!r}")
        if self.hot_fraction is not None:
            if not 0.0 <= self.hot_fraction <= 1.0:
                raise ValueError(f"hot_fraction must be in [0, 1], got {self.hot_fraction}")
            if self.policy not in ("auto", "hot+window") and not (self.policy == "hot" and self.hot_fraction == 1.0):
                raise ValueError(f"hot_fraction applies to policy 'hot+window' or 'auto', not {self.policy!r}")
        if self.verify not in self.VERIFY_CHOICES:
            raise ValueError(f"verify must be one of {self.VERIFY_CHOICES}, got {self.verify!r}")
        if self.prefill not in self.PREFILL_CHOICES:
            raise ValueError(f"prefill must be one of {self.PREFILL_CHOICES}, got {self.prefill!r}")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.threads < 0 or self.chunk_bytes < 0:
            raise ValueError("threads and chunk_bytes must be >= 0")
        if self.predictor_bits not in self.PREDICTOR_BITS_CHOICES:
            raise ValueError(f"predictor_bits must be one of {self.PREDICTOR_BITS_CHOICES} (0: the stored floats), "
                             f"got {self.predictor_bits!r}")
        if not isinstance(self.pipeline_depth, int) or self.pipeline_depth < 1:
            raise ValueError(f"pipeline_depth must be an integer >= 1, got {self.pipeline_depth!r}")
        if self.max_gap_bytes is not None and self.max_gap_bytes < 0:
            raise ValueError(f"max_gap_bytes must be >= 0 (or None: from the disk probe), got {self.max_gap_bytes}")

    def budget_bytes(self, ffn_bytes: int) -> int:
        """The budget in bytes for a model whose FFN weighs ``ffn_bytes``."""
        if self.budget <= 1.0:
            return int(self.budget * ffn_bytes)
        return int(self.budget)

    def choose_engine(self, ffn_bytes: int) -> Tuple[str, str]:
        """``(engine, reason)``: "dense" or "flash" for a model whose FFN weighs ``ffn_bytes``."""
        budget = self.budget_bytes(ffn_bytes)
        fits = budget >= ffn_bytes
        if self.engine != "auto":
            return self.engine, "asked for"
        if fits:
            return "dense", (f"auto: the whole FFN ({ffn_bytes / 1e6:.1f} MB) fits the memory budget "
                             f"({budget / 1e6:.1f} MB): no reads from disk")
        return "flash", (f"auto: the FFN ({ffn_bytes / 1e6:.1f} MB) does not fit the memory budget "
                         f"({budget / 1e6:.1f} MB): neurons read from disk")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FlashConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def format_budget(cache_bytes: int, predictor_bytes: int = 0, scale_bytes: int = 0) -> str:
    """The FFN memory budget as every screen shows it, with what it includes.

    The budget (:meth:`FlashConfig.budget_bytes`, after the engine's clamp) holds the
    neuron cache (with its streaming scratch) and, on a calibrated model, the activation
    predictors: ``"79.6 MB: 75.5 MB cache + 4.1 MB predictors"``; without predictors
    ``"79.6 MB cache"``. ``cache_bytes`` is the cache's share (``Engine.budget_bytes``,
    ``Stats.budget_bytes``), ``predictor_bytes`` the predictors' (``Engine.predictor_bytes``,
    ``Stats.predictor_bytes``), ``scale_bytes`` the exact down layout's resident group scales
    (``Engine.group_quant_bytes``: ``" + 3.3 MB down scales"``)."""
    cache_bytes, predictor_bytes, scale_bytes = int(cache_bytes or 0), int(predictor_bytes or 0), int(scale_bytes or 0)
    if not predictor_bytes and not scale_bytes:
        return f"{fmt_bytes(cache_bytes)} cache"
    parts = [f"{fmt_bytes(cache_bytes)} cache"] + ([f"{fmt_bytes(predictor_bytes)} predictors"] if predictor_bytes
                                                  else []) + ([f"{fmt_bytes(scale_bytes)} down scales"]
                                                              if scale_bytes else [])
    return f"{fmt_bytes(cache_bytes + predictor_bytes + scale_bytes)}: {' + '.join(parts)}"


BUDGET_SYNTAX = ("a share of the model's FFN as a percentage (\"50%\", more than 0 and at most 100%) or a "
                 "fraction (\"0.5\", more than 0 and at most 1), or a size with a unit (\"512MB\", "
                 "\"1.5GiB\", \"300000B\"; units B, KB, MB, GB, KiB, MiB, GiB)")
"""What ``parse_budget`` accepts, for messages and help texts."""

_BUDGET_UNITS = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "b": 1}
_BUDGET_RE = re.compile(r"^(?P<num>[-+]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)(?P<unit>%|[kmg]i?b|b)?$")


def parse_budget(text: Union[str, float, int]) -> float:
    """The FFN memory budget from its one text syntax (CLI ``--budget``, the app):

    - ``"50%"``: a share of the model's FFN bytes, more than 0% and at most 100% → 0.5
    - ``"0.5"``: the same as a fraction, more than 0 and at most 1 → 0.5
    - ``"512MB"``, ``"1.5GiB"``, ``"300000B"``: a size (B, KB, MB, GB decimal; KiB, MiB,
      GiB binary) → bytes (a whole number > 1)

    A bare number above 1 is refused ("50" could mean 50% or 50 bytes): write ``50%`` or
    ``50MB``. Numbers (not text) are taken as :attr:`FlashConfig.budget` takes them.
    Anything else raises ValueError saying what is allowed. A size larger than the
    model's FFN is accepted here (the size of the FFN is not known yet); the engine
    clamps it to what the FFN can use and says so (``Engine.notes``)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        v = float(text)
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"budget {text!r}: must be a positive number")
        return v
    raw = str(text)
    s = raw.strip().lower().replace(" ", "")
    mt = _BUDGET_RE.match(s)
    if not mt:
        raise ValueError(f"budget {raw!r} is not understood: give {BUDGET_SYNTAX}")
    v = float(mt["num"])
    unit = mt["unit"]
    if not math.isfinite(v):
        raise ValueError(f"budget {raw!r} is not a finite number: give {BUDGET_SYNTAX}")
    if v <= 0:
        raise ValueError(f"budget {raw!r} is out of range: it must be more than 0 ({BUDGET_SYNTAX})")
    if unit == "%":
        if not v <= 100:
            hint = " (the whole FFN is 100%; a larger budget buys nothing)" if v > 100 else ""
            raise ValueError(f"budget {raw!r} is out of range: a percentage must be more than 0% and at most "
                             f"100%{hint}")
        return v / 100.0
    if unit is None:
        if not 0 < v <= 1:
            raise ValueError(f"budget {raw!r} is ambiguous or out of range: a bare number is a fraction of the "
                             f"FFN, more than 0 and at most 1; write {raw.strip()}% for a share or "
                             f"{raw.strip()}MB for a size")
        return v
    n = v * _BUDGET_UNITS[unit]
    if not math.isfinite(n) or round(n) < 2:
        raise ValueError(f"budget {raw!r} is out of range: a size must be at least 2 bytes (e.g. \"512MB\")")
    return float(round(n))  # > 1: bytes (FlashConfig reads values <= 1 as fractions)


def budget_as_text(budget: float) -> str:
    """:attr:`FlashConfig.budget` written in :func:`parse_budget`'s syntax (its inverse, up to float rounding): a
    fraction of the FFN as a percentage (0.5 → ``"50%"``), bytes with the unit B
    (300000.0 → ``"300000B"``). The CLI's ``--budget`` default is ``FlashConfig().budget``
    written this way."""
    if budget <= 1.0:
        return f"{budget * 100:.10g}%"
    return f"{int(budget)}B"
