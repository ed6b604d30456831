"""FlashConfig: the one configuration object passed down through the engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Union


@dataclass
class FlashConfig:
    """How the flash engine runs a model.

    budget:   memory the FFN neuron cache may use: a fraction of the model's FFN
              bytes when <= 1.0 (the paper: about half), else absolute bytes.
              The streaming scratch buffer counts against it too.
    window:   sliding window k: neurons active in the last k tokens stay cached.
    threads:  parallel positional reads (0 = pick from the disk probe).
    chunk_bytes: largest single read; coalesced runs are split at this size
              (0 = pick from the disk probe).
    max_gap_bytes: neighbouring neuron runs closer than this are read in one
              request (the gap is read and thrown away): fewer, larger reads.
    active:   how each token's active neurons are chosen:
              "auto" (the default: on a calibrated model "gate", "predictor" or
              "all", whichever reads the fewest bytes per token while keeping
              quality, measured at load from the calibration's held-out figures
              (``engine.choose_active``; the reason is in ``Engine.active_info``);
              uncalibrated: "oracle"),
              "gate" (gate-first: every layer's gate rows resident inside the
              budget, ``|act(gate x)|`` above calibrated per-layer thresholds;
              only the up/down parts of active neurons are read; ``sparsity``
              picks a calibrated gate sparsity, None the calibrated choice),
              "all" (naive flash, the paper's baseline: every neuron),
              "oracle" (true gated activation above the layer's threshold,
              computed from full weights; an upper bound, not a product mode),
              "predictor" (the low-rank predictors stored with the model;
              ``extra["recall"]`` picks one of the calibrated recall targets).
    sparsity: target fraction of inactive neurons for the oracle's rule. None
              (the default): the calibrated per-layer thresholds when the model
              has them (``mlx-flash calibrate``), else 0.5 (per-token top-k).
              A value equal to the calibrated sparsity uses those thresholds too.
              For "gate" it picks one of the calibrated gate sparsities (None: the
              one calibration chose).
    direct_io: bypass the page cache (O_DIRECT / F_NOCACHE). Only turn off for
              debugging: with the page cache on, measured I/O is not real.
    scratch_neurons: size of the streaming buffer (in neurons) used for active
              neurons that do not fit in the cache.
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
    hot_fraction: share of each layer's cache rows pinned with hot neurons, in
              [0, 1]. None (the default): "hot+window" pins half, "auto" measures.
              Only "auto" and "hot+window" take a value ("hot" means 1).
    """

    budget: float = 0.5
    window: int = 5
    threads: int = 0
    chunk_bytes: int = 0
    max_gap_bytes: int = 16 * 1024
    active: str = "auto"
    sparsity: Optional[float] = None
    direct_io: bool = True
    scratch_neurons: int = 256
    policy: str = "auto"
    hot_fraction: Optional[float] = None
    prefill: str = "all"
    extra: dict = field(default_factory=dict)

    ACTIVE_CHOICES = ("auto", "all", "oracle", "predictor", "gate")
    PREFILL_CHOICES = ("all", "sparse")
    DEFAULT_SPARSITY = 0.5  # the oracle's top-k rule for models without calibration
    POLICY_CHOICES = ("auto", "window", "lru", "hot", "hot+window")

    def __post_init__(self) -> None:
        if self.budget <= 0:
            raise ValueError(f"budget must be > 0, got {self.budget}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.active not in self.ACTIVE_CHOICES:
            raise ValueError(f"active must be one of {self.ACTIVE_CHOICES}, got {self.active!r}")
        if self.policy not in self.POLICY_CHOICES:
            raise ValueError(f"policy must be one of {self.POLICY_CHOICES}, got {self.policy!r}")
        if self.hot_fraction is not None:
            if not 0.0 <= self.hot_fraction <= 1.0:
                raise ValueError(f"hot_fraction must be in [0, 1], got {self.hot_fraction}")
            if self.policy not in ("auto", "hot+window") and not (self.policy == "hot" and self.hot_fraction == 1.0):
                raise ValueError(f"hot_fraction applies to policy 'hot+window' or 'auto', not {self.policy!r}")
        if self.prefill not in self.PREFILL_CHOICES:
            raise ValueError(f"prefill must be one of {self.PREFILL_CHOICES}, got {self.prefill!r}")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.threads < 0 or self.chunk_bytes < 0:
            raise ValueError("threads and chunk_bytes must be >= 0")

    def budget_bytes(self, ffn_bytes: int) -> int:
        """The budget in bytes for a model whose FFN weighs ``ffn_bytes``."""
        if self.budget <= 1.0:
            return int(self.budget * ffn_bytes)
        return int(self.budget)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FlashConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def parse_budget(text: Union[str, float, int]) -> float:
    """Parse a budget as the CLI takes it: "50%", "0.5", "300MB", "1.5GiB", "123456"."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().lower().replace(" ", "")
    if s.endswith("%"):
        return float(s[:-1]) / 100.0
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1e3, "mb": 1e6, "gb": 1e9, "b": 1}
    for u, m in units.items():
        if s.endswith(u):
            return float(s[: -len(u)]) * m
    return float(s)

