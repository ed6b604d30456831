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

The package, by job: :mod:`.records` (names, records, JSON), :mod:`.runners` (one configuration:
real model or replayed shape), :mod:`.orchestration` (:func:`run_bench` as stages), :mod:`.quant`
(bfloat16-layout replay, greedy agreement), :mod:`.order` (neuron order before/after), :mod:`.ttft`
(time to first token), :mod:`.report` (text), :mod:`.plots` (PNGs).
"""

from .orchestration import run_bench
from .order import OrderRow, format_order, run_order_bench
from .plots import save_plots
from .quant import agreement_prompt_set, format_quantized, replay_reads, run_agreement
from .records import (
    ALIASES,
    AUTO,
    CONFIGS,
    DEFAULT_POLICY_BUDGETS,
    DEFAULT_PPL_TOKENS,
    DEFAULT_PROMPT,
    DENSE,
    DENSE_BF16,
    GATE,
    NAIVE,
    ORACLE,
    POLICIES,
    PREDICTOR,
    REAL,
    REPLAYED,
    SHAPES,
    BenchReport,
    BenchRow,
    PolicyPoint,
    Shape,
    SweepPoint,
    best_policy,
    budget_text,
    canonical_config,
    compute_ratios,
)
from .report import format_choosers, format_pipeline, format_policies, format_reader, format_table, observations
from .runners import _nearest_chunk as _nearest_chunk  # the tests check the probe lookup
from .runners import default_flash_model, ensure_shape_model, machine_info, reference_text, summarize
from .ttft import TTFT_CONFIGS, TTFT_LENGTHS, format_ttft, run_ttft, ttft_prompt

__all__ = [
    "ALIASES", "AUTO", "CONFIGS", "DEFAULT_POLICY_BUDGETS", "DEFAULT_PPL_TOKENS", "DEFAULT_PROMPT", "DENSE",
    "DENSE_BF16", "GATE", "NAIVE", "ORACLE", "POLICIES", "PREDICTOR", "REAL", "REPLAYED", "SHAPES", "TTFT_CONFIGS",
    "TTFT_LENGTHS", "BenchReport", "BenchRow", "OrderRow", "PolicyPoint", "Shape", "SweepPoint",
    "agreement_prompt_set", "best_policy", "budget_text", "canonical_config", "compute_ratios",
    "default_flash_model", "ensure_shape_model", "format_choosers", "format_order", "format_pipeline",
    "format_policies", "format_quantized", "format_reader", "format_table", "format_ttft", "machine_info",
    "observations", "reference_text", "replay_reads", "run_agreement", "run_bench", "run_order_bench", "run_ttft",
    "save_plots", "summarize", "ttft_prompt",
]
