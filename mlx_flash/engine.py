"""The engine: load a model (dense mlx-lm folder or flash folder) and stream tokens with Stats.

``load(path, FlashConfig)`` returns an :class:`Engine`. Generation has two layers, as in
mlx-lm: ``Engine.generate_step`` is the token-level generator (reads the prompt in chunks, then
yields a :class:`Step` per token: id, log-probabilities, :class:`Stats`); ``Engine.stream_generate``
wraps it into a :class:`Response` per token (text piece, finish reason, the same ``stats``), the
one record every front end shows.

Prefill: the prompt runs in chunks of ``prefill_step`` tokens, the last prompt token inside the
last chunk (its logits alone go through the output head: ``models.<arch>.final_norm``), so the
first token costs one pass over the weights. With ``FlashConfig.prefill == "all"`` every FFN
neuron is used: the resident rows as they are, the others read per layer in one large read into a
transient staging buffer (``NeuronCache.prefill_rows``) and multiplied in one batch. With
"sparse" each chunk reads the union of its tokens' active neurons once and each token uses only
its own (per-token masks). Decoding then runs one token at a time.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import _get_classes, load_model, load_tokenizer

from .active import ActiveCandidate, ActiveChoice, AllNeurons, Oracle, is_exact
from .config import FlashConfig, format_budget
from .dense_model import load_dense_model
from .gate_first import GATE_SEGMENTS, gate_info, gate_scale_bytes, load_gate_chooser
from .models import get_architecture, llama, sanitize
from .moe.format import is_moe_config, is_moe_flash_dir
from .neuron_cache import (
    AUTO_LAYERS,
    CachePolicy,
    NeuronCache,
    PolicyInfo,
    ReadModel,
    RowStore,
    cache_rows,
    chosen_frequencies,
    resolve_auto_policy,
    sample_active_sets,
    scratch_rows,
    simulate,
)
from .pipeline import attach_pipeline
from .predictor import (
    CALIBRATE_HINT,
    PREDICTOR_FILE,
    PredictorError,
    has_predictors,
    load_frequencies,
    load_predictor_chooser,
    predictor_info,
    predictor_resident_bytes,
)
from .quantized import cast_floats, compute_dtype, fast_cpu_modules, quantize_like
from .sparse_ffn import DenseFFN, SparseFFN
from .stats import FFNCounters, Stats, process_rss
from .storage.format import (
    DENSE_FILE,
    MANIFEST_FILE,
    FlashFormatError,
    bundle_layout,
    bundle_parts,
    bundle_segments,
    ffn_groups,
    ffn_state_dict,
    group_quant_bytes,
    load_dense_weights,
    open_flash,
    read_group_quant,
    read_layer_segments,
    read_layer_weights,
    role_quantization,
    updown_files,
    updown_segments,
    verify_file,
)
from .storage.platform_io import direct_alignment
from .storage.probe import load_cached_choice, load_cached_gap
from .storage.reader import FlashReader
from .storage.verify import BackgroundVerifier

Prompt = Union[str, Sequence[int], Sequence[dict]]


class ModelLoadError(ValueError):
    """The folder is not a model mlx-flash can load (message says why)."""


@dataclass
class Response:
    """One streamed piece of a generation."""

    text: str
    token: int
    finish_reason: Optional[str]
    stats: Stats


@dataclass
class Step:
    """One token of :meth:`Engine.generate_step`: its id, the log-probabilities it was sampled
    from (vocabulary-sized, float), and its :class:`Stats`."""

    token: int
    logprobs: mx.array
    stats: Stats


class _LastPosition(nn.Module):
    """Wraps a model's final norm so that only the last position goes on to the output head
    (the head and what follows it work per position)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def __call__(self, h: mx.array) -> mx.array:
        return self.norm(h[:, -1:, :])


def is_flash_dir(path: Union[str, Path]) -> bool:
    return (Path(path) / "manifest.json").is_file()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""A model folder needs one of these for ``load_tokenizer`` (fast tokenizer, SentencePiece,
GPT-2 style BPE with merges.txt)."""


def _load_tokenizer(path: Path, eos_token_ids):
    """The folder's tokenizer, or a :class:`ModelLoadError` saying it has none (rather
    than transformers' advice to install sentencepiece)."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{path} has no tokenizer ({' / '.join(TOKENIZER_FILES)} is missing): "
                             "copy the tokenizer files of the original model into it, or convert the model again")
    try:
        return load_tokenizer(path, eos_token_ids=eos_token_ids)
    except Exception as e:  # tokenizers raises a bare Exception on a damaged tokenizer.json (transformers: others)
        raise ModelLoadError(f"{path}: its tokenizer cannot be read ({type(e).__name__}: {e}); copy the tokenizer "
                             "files of the original model into it, or convert the model again") from None


def _param_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


@dataclass(frozen=True)
class EngineChoice:
    """Which engine runs a flash folder (``engine``: "flash" or "dense"), what was ``asked``
    (``FlashConfig.engine``) and the ``reason`` (``Engine.engine_info``)."""

    engine: str
    asked: str
    reason: str


class Engine:
    """A loaded model plus everything it needs to generate (Qt-free)."""

    def __init__(self, model, tokenizer, path: Path, config: Optional[FlashConfig], *,
                 files=None, cache=None, reader=None, chooser=None, counters=None,
                 policy_info: Optional[PolicyInfo] = None, notes: Sequence[str] = (),
                 context_length: Optional[int] = None, verifier: Optional[BackgroundVerifier] = None,
                 prefetcher=None, active_info: Optional[ActiveChoice] = None, arch_config: Optional[dict] = None,
                 group_quant_bytes: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.path = Path(path)
        self.config = config
        self.files = files
        self.cache = cache
        self.reader = reader
        self.chooser = chooser
        self.counters = counters or FFNCounters()
        self.prefetcher = prefetcher  # pipelined layers (mlx_flash.pipeline.Prefetcher) or None
        self.dense_bytes = _param_bytes(model)
        # the exact down layout's resident group scales (storage.format.group_quant_bytes; 0 otherwise)
        self.group_quant_bytes = group_quant_bytes
        self.mode = "dense" if files is None else f"flash-{chooser.name}"
        # The neuron cache policy that runs and why (flash only; see _apply_cache_policy):
        # name, hot_fraction, asked, reason, source, pinned, preload_bytes, hit_rates (simulated).
        self.policy_info: Optional[PolicyInfo] = policy_info
        # What a user should know about how this model runs (a fallback, a clamped budget):
        # the CLI prints them to stderr, the app shows them; each Stats carries them too.
        self.notes: List[str] = list(notes)
        # max_position_embeddings, when the config has it (and it is a number: a damaged one is no limit)
        self.context_length = context_length if isinstance(context_length, int) and context_length > 0 else None
        self.verifier = verifier  # ffn.bin's per-layer checksums, checked in the background
        # Which engine runs a flash folder and why (FlashConfig.engine; "auto": dense when the whole
        # FFN fits the budget); None for a plain dense folder.
        self.engine_info: Optional[EngineChoice] = None
        # The active-neuron chooser that runs and why (flash only; see choose_active): name, asked,
        # reason, and for "auto" the measured candidates (density, bytes_per_token, capacity, quality).
        self.active_info: Optional[ActiveChoice] = active_info
        self._arch_config = arch_config  # the model's config (models.<arch>.final_norm)
        self._prefill_rows_bytes = 0  # the transient prefill staging rows while a prompt is read

    # ------------------------------------------------------------------ info
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_flash(self) -> bool:
        return self.files is not None

    @property
    def budget_bytes(self) -> int:
        return self.cache.budget_bytes if self.cache is not None else 0

    @property
    def predictor_bytes(self) -> int:
        """The activation predictors' memory: part of the FFN budget (0 without them)."""
        return self.chooser.resident_bytes if self.chooser is not None and self.chooser.name == "predictor" else 0

    @property
    def budget_text(self) -> str:
        """The budget and what it holds (:func:`mlx_flash.config.format_budget`), for every screen."""
        return format_budget(self.budget_bytes, self.predictor_bytes, self.group_quant_bytes)

    @property
    def ffn_bytes(self) -> int:
        return self.files.manifest.ffn_bytes_total if self.files is not None else 0

    def resident_bytes(self) -> int:
        """Weights held in memory: dense part, neuron cache in use, staging buffers, chooser."""
        n = self.dense_bytes + self.group_quant_bytes
        if self.cache is not None:
            n += self.cache.resident_bytes
            if self.prefetcher is not None:
                n += self.cache.staging_bytes  # pipelined layers' I/O buffers (outside the budget)
            n += self._prefill_rows_bytes  # exact prefill's staging rows while a prompt is read
        if self.chooser is not None:
            n += self.chooser.resident_bytes
        return n

    def _sparse_ffns(self) -> list:
        if not hasattr(self, "_ffns"):

            self._ffns = [m for _, m in self.model.named_modules() if isinstance(m, SparseFFN)]
        return self._ffns

    def _exact_prefill(self, on: bool) -> None:
        """While reading a prompt with ``FlashConfig.prefill == "all"``: every FFN neuron, the
        rows the cache does not hold read per layer in one large read into a transient staging
        buffer (``NeuronCache.prefill_rows``: one layer's non-resident rows, an I/O buffer outside
        the budget like the pipeline's staging buffers; allocated here, freed when the prompt is
        read; counted in :meth:`resident_bytes` meanwhile)."""
        if self.config is None or self.config.prefill != "all":
            return
        rows = self.cache.prefill_rows() if on and self.cache is not None else None
        self._prefill_rows_bytes = rows.nbytes if rows is not None else 0
        for ffn in self._sparse_ffns():
            ffn._state.all_neurons = on
            ffn._state.prefill_rows = rows

    @contextmanager
    def _last_position_only(self):
        """While active, the model's forward pass puts only the last position through the
        output head (``models.<arch>.final_norm``; a model without one: every position)."""

        cfg = self._arch_config
        found = None
        if cfg is not None:  # MoE families run mlx-lm's own classes: the same outer layout as llama's
            found = (llama if is_moe_config(cfg) else get_architecture(cfg)).final_norm(self.model)
        if found is None:
            yield
            return
        owner, name = found
        norm = getattr(owner, name)
        setattr(owner, name, _LastPosition(norm))
        try:
            yield
        finally:
            setattr(owner, name, norm)

    # ------------------------------------------------------------- prompting
    def encode(self, prompt: Prompt, system: Optional[str] = None) -> List[int]:
        """Token ids for a plain string, a list of ids, or chat messages."""
        if isinstance(prompt, str):
            tok = self.tokenizer
            add = tok.bos_token is None or not prompt.startswith(tok.bos_token)
            return list(tok.encode(prompt, add_special_tokens=add))
        items: List[Union[int, dict]] = list(prompt)
        messages = [m for m in items if isinstance(m, dict)]
        ids = [t for t in items if not isinstance(t, dict)]
        if messages and ids:
            raise ValueError("a prompt list holds token ids or chat messages (dicts), not both")
        if messages:
            if system and not any(m.get("role") == "system" for m in messages):
                messages = [{"role": "system", "content": system}] + messages
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return [int(t) for t in ids]

    # ------------------------------------------------------------ generation
    def generate_step(
        self,
        tokens: Sequence[int],
        max_tokens: int = 256,
        *,
        sampler: Optional[Callable[[mx.array], mx.array]] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        prefill_step: int = 512,
    ) -> Iterator[Step]:
        """The token-level generator (mlx-lm's ``generate_step``): read prompt ``tokens`` in
        chunks of ``prefill_step``, then yield a :class:`Step` per generated token (at most
        ``max_tokens``; end-of-sequence is the caller's business). The last prompt token runs
        inside the last chunk, so the first token's :class:`Stats` cover that chunk and
        ``Stats.ms_first_token`` is the time from the call to the first token. ``sampler``
        maps log-probabilities ``(1, vocab)`` to a token (default greedy). ``should_stop`` is
        asked before each prompt chunk (True: return before any token); after the first token
        the caller stops by not asking for the next."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("empty prompt")
        if prefill_step < 1:
            raise ValueError(f"prefill_step must be at least 1, got {prefill_step}")
        sampler = sampler or make_sampler(temp=0.0)
        notes = list(self.notes)
        if self.context_length and len(tokens) > self.context_length:
            notes.append(f"the prompt has {len(tokens)} tokens, more than this model's context of "
                         f"{self.context_length} (max_position_embeddings): the answer may be poor; "
                         "shorten the prompt or start a new chat")
        kv = make_prompt_cache(self.model)
        mx.reset_peak_memory()

        tic = time.perf_counter()
        prompt_arr = mx.array(tokens)
        n_prompt = len(tokens)
        last = ((n_prompt - 1) // prefill_step) * prefill_step  # start of the chunk holding the last token
        self._exact_prefill(True)
        try:
            for start in range(0, last, prefill_step):
                if should_stop is not None and should_stop():
                    return  # stopped while reading the prompt: nothing generated
                self.model(prompt_arr[start : start + prefill_step][None], cache=kv)
                mx.eval([c.state for c in kv])
            if should_stop is not None and should_stop():
                return
            before = _copy(self.counters)
            t0 = time.perf_counter()
            with self._last_position_only():
                logits = self.model(prompt_arr[last:][None], cache=kv)[:, -1, :]
                logprobs = logits - mx.logsumexp(logits, keepdims=True)
                nxt = sampler(logprobs)
                mx.eval(nxt, logprobs)
        finally:
            self._exact_prefill(False)
        prompt_time = gen_tic = 0.0  # set at the first token (n == 0)
        hits = active = 0
        n = 0
        while True:
            token = int(nxt.item())
            _check_finite(logprobs, self.path, n)
            t1 = time.perf_counter()
            if n == 0:
                prompt_time = t1 - tic
                gen_tic = t1
            d = _diff(self.counters, before)
            n += 1
            hits += d.neurons_hit
            active += d.neurons_active
            ms_total = (t1 - t0) * 1e3
            stats = Stats(
                token_index=n - 1,
                ms_total=ms_total,
                ms_predictor=d.predictor_s * 1e3,
                ms_io=d.io_s * 1e3,
                ms_compute=max(0.0, ms_total - (d.predictor_s + d.io_s) * 1e3),
                ms_prefetch=d.prefetch_s * 1e3,
                ms_overlap=d.overlap_s * 1e3,
                neurons_prefetched=d.neurons_prefetched,
                neurons_prefetch_used=d.neurons_prefetch_used,
                bytes_read=d.bytes_read,
                bytes_useful=d.bytes_useful,
                neurons_active=d.neurons_active,
                neurons_loaded=d.neurons_loaded,
                neurons_streamed=d.neurons_streamed,
                hit_rate=(d.neurons_hit / d.neurons_active) if d.neurons_active else 1.0,
                cum_hit_rate=(hits / active) if active else 1.0,
                resident_bytes=self.resident_bytes(),
                cache_bytes=self.cache.resident_bytes if self.cache is not None else 0,
                budget_bytes=self.budget_bytes,
                predictor_bytes=self.predictor_bytes,
                peak_memory=mx.get_peak_memory(),
                process_rss=process_rss(),
                tokens_per_s=(n - 1) / (t1 - gen_tic) if n > 1 and t1 > gen_tic else 1e3 / ms_total,
                prompt_tokens=n_prompt,
                prompt_tps=n_prompt / prompt_time if prompt_time else 0.0,
                ms_first_token=prompt_time * 1e3,
                mode=self.mode,
                notes=notes,
            )
            yield Step(token, logprobs[0], stats)
            if n >= max_tokens:
                return
            before = _copy(self.counters)
            t0 = time.perf_counter()
            logits = self.model(nxt.reshape(1, 1), cache=kv)[:, -1, :]
            logprobs = logits - mx.logsumexp(logits, keepdims=True)
            nxt = sampler(logprobs)
            mx.eval(nxt, logprobs)

    def stream_generate(
        self,
        prompt: Prompt,
        max_tokens: int = 256,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        system: Optional[str] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        prefill_step: int = 512,
        seed: Optional[int] = None,
    ) -> Iterator[Response]:
        """Yield a :class:`Response` per generated token (:meth:`generate_step`'s tokens as
        text); the last has a finish_reason ("stop": end of sequence, "length", "cancelled")."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be 0 (greedy) or more, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be more than 0 and at most 1, got {top_p}")
        tokens = self.encode(prompt, system)
        if not tokens:
            raise ValueError("empty prompt")
        if seed is not None:
            mx.random.seed(seed)
        detok = self.tokenizer.detokenizer
        detok.reset()
        eos = set(self.tokenizer.eos_token_ids)
        n = 0
        for step in self.generate_step(tokens, max_tokens, sampler=make_sampler(temp=temperature, top_p=top_p),
                                       should_stop=should_stop, prefill_step=prefill_step):
            n += 1
            token = step.token
            if token in eos:
                detok.finalize()
                yield Response(detok.last_segment, token, "stop", step.stats)
                return
            detok.add_token(token)
            finish = ("length" if n >= max_tokens else
                      "cancelled" if should_stop is not None and should_stop() else None)
            if finish is not None:
                detok.finalize()
                yield Response(detok.last_segment, token, finish, step.stats)
                return
            yield Response(detok.last_segment, token, None, step.stats)

    def generate(self, prompt: Prompt, max_tokens: int = 256, **kw) -> str:
        return "".join(r.text for r in self.stream_generate(prompt, max_tokens, **kw))

    # ------------------------------------------------------------ evaluation
    def perplexity(self, tokens: Sequence[int], chunk: int = 512) -> float:
        """Perplexity of ``tokens`` in independent chunks (teacher forcing)."""
        toks = np.asarray(tokens, dtype=np.int64)
        nll, count = 0.0, 0
        for start in range(0, len(toks) - 1, chunk):
            seg = toks[start : start + chunk + 1]
            if len(seg) < 2:
                break
            x = mx.array(seg[:-1])[None]
            logits = self.model(x).astype(mx.float32)[0]
            targets = mx.array(seg[1:])
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            nll_chunk = -mx.take_along_axis(lp, targets[:, None], axis=-1).sum()
            nll += float(nll_chunk.item())
            count += len(seg) - 1
        return float(np.exp(nll / max(count, 1)))

    def pipeline_info(self) -> Optional[dict]:
        """Pipelined layers: staging rows, the lookahead's recall per layer against the layer's
        own choice, the share of missing neurons the prefetch served (None without the pipeline)."""
        return self.prefetcher.info() if self.prefetcher is not None else None

    def reset_stats(self) -> None:
        self.counters = _reset(self.counters)
        if self.cache is not None:
            self.cache.reset_stats()
        if self.prefetcher is not None:
            self.prefetcher.reset_stats()

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.verifier is not None:
            self.verifier.close()
        if self.reader is not None:
            self.reader.close()


def _copy(c: FFNCounters) -> FFNCounters:
    return FFNCounters(**c.__dict__)


def _diff(a: FFNCounters, b: FFNCounters) -> FFNCounters:
    return FFNCounters(**{k: getattr(a, k) - getattr(b, k) for k in a.__dict__})


def _reset(c: FFNCounters) -> FFNCounters:
    for k in c.__dict__:
        setattr(c, k, type(getattr(c, k))())
    return c


# ---------------------------------------------------------------------- loading
def load(path: Union[str, Path], config: Optional[FlashConfig] = None, *, dense: bool = False,
         dense_dtype: Optional[str] = None) -> Engine:
    """Load a model folder. A flash folder (manifest.json) runs through the flash
    engine, or dense (its FFN read fully into memory) when ``dense`` or when
    ``config.engine`` says so ("auto": the whole FFN fits the budget; the choice and
    why are in ``Engine.engine_info``); an mlx-lm/Hugging Face folder runs dense.
    ``dense_dtype`` (with ``dense``, a flash folder): every weight dequantized and cast to
    this float dtype (e.g. "bfloat16": the speed test's dense bfloat16 row of a 4-bit folder)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model not found: {path}")
    if is_moe_flash_dir(path):  # mixture-of-experts: experts from flash (mlx_flash.moe)
        from .moe.engine import load as load_moe  # noqa: PLC0415 - import cycle: moe.engine builds on this module

        return load_moe(path, config, dense=dense)
    if is_flash_dir(path):
        config = config or FlashConfig()
        if dense and dense_dtype is not None:
            return _load_flash_float(path, dense_dtype)
        if dense:
            return _load_flash(path, config, dense=True)

        engine, reason = config.choose_engine(open_flash(path).manifest.ffn_bytes_total)
        eng = _load_flash(path, config, dense=engine == "dense")
        eng.engine_info = EngineChoice(engine, config.engine, reason)
        return eng
    return _load_dense(path)


def _read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{path} is not a model folder: config.json is missing")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg}: invalid JSON ({e})") from None


def _load_dense(path: Path) -> Engine:

    config = _read_config(path)
    # clear error for architectures we do not run; MoE families run as mlx-lm's own classes
    get_classes = _get_classes if is_moe_config(config) else get_architecture(config).get_classes
    if not list(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no .safetensors weights")

    tokenizer = _load_tokenizer(path, config.get("eos_token_id"))
    model, config = load_model(path, get_model_classes=get_classes)  # honours hidden_act, runs OPT
    if config.get("quantization"):  # a quantized folder runs in quantized.compute_dtype (float32 on CPU)

        cast_floats(model, compute_dtype(mx.float16))
        fast_cpu_modules(model)
    return Engine(model, tokenizer, path, None, context_length=config.get("max_position_embeddings"),
                  arch_config=config)


def _fmt_mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _make_chooser(files, config: FlashConfig, act: str, act_param, budget_bytes: int, notes: List[str],
                  compute_dtype=None, reader=None):
    """``(chooser, active_info)``: the active-neuron chooser ``config.active`` names, and
    why. "auto" on a calibrated model: :func:`choose_active` (gate-first, predictor or all,
    measured per model); without predictors every neuron ("all") when ``budget_bytes``
    holds the whole FFN (nothing to save), else the oracle — either way with a note in
    ``notes`` (saying so when the manifest records predictors whose file is gone). The
    oracle uses the calibrated thresholds when ``config.sparsity`` is None or equals the
    calibrated sparsity."""

    m = files.manifest
    active = config.active
    record = ActiveChoice(name=active, asked=active, reason="asked for")
    if active == "auto":
        info = predictor_info(m)
        if has_predictors(files):
            try:
                record = choose_active(files, config, act, reader)
            except (KeyError, TypeError, ValueError, AttributeError) as e:  # a damaged calibration record
                if isinstance(e, (PredictorError, FlashFormatError)):  # already say what is wrong
                    raise
                raise PredictorError(f"{files.root / MANIFEST_FILE}: field 'predictors' is malformed "
                                     f"({type(e).__name__}: {e}); {CALIBRATE_HINT} again") from None
            active = record.name
        else:
            why = (f"manifest.json records activation predictors but {files.root / info.get('file', PREDICTOR_FILE)} "
                   f"is missing" if info else "this model has no activation predictors (not calibrated)")
            if budget_bytes >= m.ffn_bytes_total:
                active = "all"
                notes.append(f"{why}: every FFN neuron runs (the budget holds the whole FFN); {CALIBRATE_HINT}")
            else:
                active = "oracle"
                sp = config.sparsity if config.sparsity is not None else FlashConfig.DEFAULT_SPARSITY
                notes.append(f"{why}: falling back to the oracle, which drops the {sp:.0%} weakest neurons of "
                             f"each token and holds every layer's gate/up weights in memory; {CALIBRATE_HINT}, "
                             f"or give a 100% budget to run every neuron")
            record = ActiveChoice(name=active, asked="auto", reason=why)
    if active == "all":
        return AllNeurons(m.intermediate_size), record
    if active == "predictor":
        return load_predictor_chooser(files, config), record
    if active == "gate":
        ch = load_gate_chooser(files, config, act, act_param, compute_dtype)
        if record.sparsity is None:
            record = replace(record, sparsity=ch.sparsity)
        return ch, record
    gate_up, biases = [], []
    for i in range(m.num_layers):
        parts = dict(zip((p.role for p in bundle_parts(m)), read_layer_weights(files, i)))
        gate_up.append((parts["gate"], parts.get("up")))
        biases.append((parts.get("gate_bias"), parts.get("up_bias")))
    mx.eval([a for pair in gate_up + biases for a in pair if a is not None])
    info = predictor_info(m) or {}
    calibrated = info.get("sparsity")
    thresholds = None
    sparsity = config.sparsity
    if info.get("thresholds") and (sparsity is None or (calibrated is not None and abs(sparsity - calibrated) < 1e-9)):
        thresholds, sparsity = info["thresholds"], calibrated
    if sparsity is None:
        sparsity = FlashConfig.DEFAULT_SPARSITY
    return Oracle(gate_up, sparsity, act=act, thresholds=thresholds, biases=biases, act_param=act_param), record


#: Tokens simulated per candidate chooser by ``choose_active`` (on ``AUTO_LAYERS`` layers).
AUTO_ACTIVE_TOKENS = 120


def choose_active(files, config: FlashConfig, act: str, reader=None) -> ActiveChoice:
    """``FlashConfig.active == "auto"``: gate-first, predictor or all, by measurement.

    Candidates: "all" (exact, every neuron), "predictor" (calibrated low-rank predictors
    at the recall target; held-out predicted fraction) and "gate" (gate-first at the
    calibrated sparsity; held-out active fraction and FFN output error, see
    ``calibrate.gate_first_record``). A candidate must keep quality: the predictor at its
    recall target, gate-first when its held-out perplexity at the calibrated sparsity is within
    the calibration's tolerance of dense (``calibrate.gate_first_perplexity``; older records:
    its held-out FFN error within the oracle's). Among those the fewest disk bytes per token win: each
    candidate's resident bytes (predictor weights, gate rows) leave that much less cache,
    and ``neuron_cache.simulate`` replays tokens sampled from the calibrated neuron
    frequencies (scaled to the candidate's density) through a cache of the remaining
    capacity run by the policy the engine would run for that candidate
    (:func:`candidate_policy`: ``config.policy``, "auto" resolved as at load) with the
    reader's coalescing. Uncalibrated: "oracle" (as before:
    a measuring tool) for thresholded models; returns the record ``Engine.active_info``."""

    m = files.manifest
    if not has_predictors(files):
        return ActiveChoice(name="oracle", asked="auto",
                            reason="no calibration (run `mlx-flash calibrate`): the oracle")
    pinfo = predictor_info(m) or {}
    freqs = load_frequencies(files)
    seg = bundle_segments(m)
    full_row = m.bundle_bytes
    up_down_row = RowStore(0, m.bundle_elems, getattr(mx, m.dtype), seg,
                           [n for n, _, _, _ in seg if n in GATE_SEGMENTS]).kept_bytes
    gate_bytes = (full_row - up_down_row) * m.intermediate_size * m.num_layers
    budget = config.budget_bytes(m.ffn_bytes_total) - group_quant_bytes(m)  # resident group scales first
    cands: Dict[str, ActiveCandidate] = {"all": ActiveCandidate(density=1.0, recall=1.0, resident_bytes=0,
                                                                row_bytes=full_row, quality="exact")}
    recall = float((config.extra or {}).get("recall", pinfo.get("recall", 0.99)))
    held = (pinfo.get("held_out") or {}).get(str(recall))
    why_not_predictor = predictor_left_out(pinfo, recall)
    if held and why_not_predictor is None:
        cands["predictor"] = ActiveCandidate(density=float(held["predicted_fraction"]), recall=float(held["recall"]),
                                             resident_bytes=predictor_resident_bytes(m, config), row_bytes=full_row,
                                             quality=f"recall {float(held['recall']):.3f} of the oracle's neurons"
                                                     + predictor_ppl_text(pinfo, recall))
    rec = gate_info(m)
    why_not_gate = "not calibrated (an older calibration: run `mlx-flash calibrate` again)"
    if rec is None and is_exact(act) and act != "drelu":  # act(gate x) != 0 is the model's own active set
        true = (held or {}).get("true_fraction")
        if true is not None:
            cands["gate"] = ActiveCandidate(density=float(true), recall=1.0, resident_bytes=int(gate_bytes),
                                            row_bytes=up_down_row, quality=f"exact ({act}(gate x) != 0)")
        else:
            why_not_gate = "no held-out active fraction in the calibration"
    elif rec is not None:
        s = float(rec["sparsity"] if config.sparsity is None else config.sparsity)
        h = (rec.get("held_out") or {}).get(str(s)) or (rec.get("held_out") or {}).get(f"{s:g}")
        ppl = rec.get("perplexity") or {}
        if h is not None and ppl.get("gate", {}).get(str(s)) is not None:  # measured held-out perplexity
            p, dense, tol = float(ppl["gate"][str(s)]), float(ppl["dense"]), float(ppl["tolerance"])
            if p <= dense * (1 + tol):
                cands["gate"] = ActiveCandidate(density=float(h["active_fraction"]), recall=1.0,
                                                resident_bytes=int(gate_bytes) + gate_scale_bytes(rec, m),
                                                row_bytes=up_down_row, sparsity=s,
                                                quality=f"held-out perplexity {p:.3f} ({p / dense - 1:+.1%} "
                                                        f"vs dense, within {tol:.1%})")
            else:
                why_not_gate = (f"held-out perplexity {p:.3f} is {p / dense - 1:+.1%} vs dense {dense:.3f} "
                                f"(more than {tol:.1%}) at sparsity {s:g}")
        elif h is not None:
            err, limit = float(h["rel_error"]), float(rec.get("oracle_rel_error", float("inf")))
            if err <= limit * (1 + 1e-6):
                cands["gate"] = ActiveCandidate(density=float(h["active_fraction"]), recall=1.0,
                                                resident_bytes=int(gate_bytes), row_bytes=up_down_row, sparsity=s,
                                                quality=f"held-out FFN error {err:.3f} <= oracle's {limit:.3f}")
            else:
                why_not_gate = f"held-out FFN error {err:.3f} above the oracle's {limit:.3f} at sparsity {s:g}"
        else:
            why_not_gate = f"no calibrated gate thresholds for sparsity {s:g}"
    rm = ReadModel.of_reader(reader, config.scratch_neurons) if reader is not None else None
    if "gate" in cands and updown_files(files) is not None:
        cands["gate"] = replace(cands["gate"], read_row_bytes=up_down_row)  # misses read the up/down side file
    n = m.intermediate_size
    layers = np.unique(np.linspace(0, m.num_layers - 1, min(AUTO_LAYERS, m.num_layers)).round().astype(int))
    for k, c in cands.items():
        # sized as _build_flash sizes the cache (neuron_cache.cache_rows)
        cap, scratch = cache_rows(budget, c.resident_bytes, c.row_bytes, m.num_layers, n, config.scratch_neurons)
        if budget - c.resident_bytes - scratch * c.row_bytes <= 0:  # resident bytes fill the budget: it cannot run
            cands[k] = replace(c, capacity=cap, bytes_per_token=None)
            continue
        if freqs is None:
            cands[k] = replace(c, capacity=cap, bytes_per_token=float(c.density * n * m.num_layers * full_row))
            continue
        read_row = c.read_row_bytes if c.read_row_bytes is not None else full_row
        rmc = replace(rm, bundle_bytes=read_row) if rm is not None else None
        pol = candidate_policy(config, freqs, cap, rmc, c.density, c.recall)
        f = chosen_frequencies(freqs, c.density, c.recall)
        per = []
        for i in layers:
            st = simulate(sample_active_sets(f[i], AUTO_ACTIVE_TOKENS, int(i)), n, cap, pol, config.window,
                          frequencies=freqs[i], warmup=AUTO_ACTIVE_TOKENS // 4, read_model=rmc)
            steps = max(1, st.steps)
            per.append(st.bytes_read / steps if rm is not None else (st.misses + st.overflow) * read_row / steps)
        cands[k] = replace(c, capacity=cap, bytes_per_token=float(np.mean(per) * m.num_layers), policy=pol)
    def cost(k: str) -> float:
        b = cands[k].bytes_per_token
        return float("inf") if b is None else b

    best = min(cands, key=lambda k: (cost(k), k != "all"))
    table = ", ".join((f"{k} {v.bytes_per_token / 1e6:.1f} MB" if v.bytes_per_token is not None else
                       f"{k} does not fit the budget") + f" ({v.density:.0%} active, {v.capacity} rows/layer"
                      + (f", {_policy_text(v.policy)}" if v.policy is not None else "") + ")"
                      for k, v in cands.items())
    reason = (f"fewest bytes read per token among the choices that keep quality (simulated with the cache "
              f"policy each would run, {config.budget:g} budget): {table}")
    if "gate" not in cands:
        reason += f"; gate-first left out: {why_not_gate}"
    if why_not_predictor is not None:
        reason += f"; predictor left out: {why_not_predictor}"
    return ActiveChoice(name=best, asked="auto", reason=reason, candidates=cands,
                        sparsity=cands["gate"].sparsity if best == "gate" else None)


def _predictor_ppl(pinfo: dict, recall: float) -> Optional[Tuple[float, float, float]]:
    """``(perplexity, dense, tolerance)`` the calibration measured for the predictors at ``recall``
    (``calibrate.predictor_perplexity``, ``predictors.perplexity``), or None."""
    ppl = pinfo.get("perplexity") or {}
    p = (ppl.get("predictor") or {}).get(str(recall))
    return None if p is None else (float(p), float(ppl["dense"]), float(ppl["tolerance"]))


def predictor_left_out(pinfo: dict, recall: float) -> Optional[str]:
    """Why ``choose_active`` leaves the predictor out at ``recall``: its measured held-out
    perplexity above the calibration's tolerance of dense; None when it kept it or was not
    measured there (older records, other recall targets, ReLU-family models: admitted by recall)."""
    got = _predictor_ppl(pinfo, recall)
    if got is None or got[0] <= got[1] * (1 + got[2]):
        return None
    p, dense, tol = got
    return (f"held-out perplexity {p:.3f} is {p / dense - 1:+.1%} vs dense {dense:.3f} (more than {tol:.1%}) "
            f"at recall {recall:g}")


def predictor_ppl_text(pinfo: dict, recall: float) -> str:
    """", held-out perplexity +0.3% vs dense" when calibration measured it at ``recall``, else ""."""
    got = _predictor_ppl(pinfo, recall)
    return "" if got is None else f", held-out perplexity {got[0] / got[1] - 1:+.1%} vs dense"


def candidate_policy(config: FlashConfig, freqs: np.ndarray, capacity: int, read_model: Optional[ReadModel],
                     density: Optional[float], recall: float) -> CachePolicy:
    """The cache policy the engine would run for a chooser of this ``density`` / ``recall``
    with ``capacity`` rows per layer: ``config.policy``, "auto" resolved the way
    :func:`_apply_cache_policy` resolves it (``neuron_cache.resolve_auto_policy``, same
    inputs, so ``choose_active`` simulates each candidate with the policy that will run)."""
    if config.policy != "auto":
        return CachePolicy.make(config.policy, config.hot_fraction)
    return resolve_auto_policy(freqs, capacity, config.window, hot_fraction=config.hot_fraction,
                               read_model=read_model, density=density, recall=recall)[0]


def _policy_text(policy: CachePolicy) -> str:
    """A ``CachePolicy`` in words: "lru", "hot", "hot+window 50%"."""
    return policy.name + (f" {policy.hot_fraction:.0%}" if policy.name == "hot+window" else "")


def _load_flash_float(path: Path, dtype: str) -> Engine:
    """A flash folder's whole model in memory as float ``dtype`` weights (quantized ones dequantized)."""

    files = open_flash(path)
    cfg = files.manifest.model_args
    model = load_dense_model(files, dtype)
    return Engine(model, _load_tokenizer(path, cfg.get("eos_token_id")), path, None,
                  context_length=cfg.get("max_position_embeddings"))


def _load_flash(path: Path, config: FlashConfig, dense: bool = False) -> Engine:

    files = open_flash(path)
    # dense.safetensors' and the read layered file's per-layer checksums: hashed in a background thread
    # once the chooser says which file it reads (ffn.bin, or the up/down side file: _build_flash starts
    # it), overlapping the rest of loading; every SparseFFN waits for its layer (dense=True: below).
    verifier = None if dense else BackgroundVerifier(files, direct=config.direct_io, side_files=(DENSE_FILE,),
                                                     start=False)
    try:
        return _build_flash(path, files, config, dense, verifier)
    except BaseException:
        if verifier is not None:
            verifier.close()
        raise


def _build_flash(path: Path, files, config: FlashConfig, dense: bool, verifier) -> Engine:

    m = files.manifest
    arch_cfg = dict(m.model_args)
    arch = get_architecture(arch_cfg)
    act, act_param = arch.activation_of(arch_cfg)
    layout = bundle_layout(m)
    quant = role_quantization(m)
    tokenizer = _load_tokenizer(path, arch_cfg.get("eos_token_id"))
    context = arch_cfg.get("max_position_embeddings")

    def load_dense_part(model) -> Optional[mx.Dtype]:
        """Dense weights into ``model`` (quantized modules stay quantized); a quantized
        model runs in ``quantized.compute_dtype`` (returned; None: float model, as stored)."""
        try:
            weights = sanitize(model, dense_weights)
            quantized = quantize_like(model, weights, arch_cfg)
            model.load_weights(list(weights.items()))
        except (KeyError, ValueError, TypeError) as e:
            dense_mismatch(files, e)
        cd = None
        if quantized or quant:
            cd = compute_dtype(getattr(mx, m.dtype))
            cast_floats(model, cd)
            fast_cpu_modules(model)
        mx.eval(model.parameters())
        return cd

    if dense:
        verify_file(files, DENSE_FILE)  # and read_layer_segments / read_layer_weights verify each layer
    dense_weights = load_dense_weights(files)
    layer_groups = _layer_groups(files)
    if dense and quant:  # the dense quantized model: every layer's bundles in memory, as stored

        cd = compute_dtype(getattr(mx, m.dtype))
        segs = [read_layer_segments(files, i) for i in range(m.num_layers)]
        model = arch.build(arch_cfg, lambda i: DenseFFN(segs[i], act, act_param, quant, cd, layer_groups[i]))
        del segs
        for name, mod in model.named_modules():  # the FFN rows are the model's own: load them as they are
            if isinstance(mod, DenseFFN):
                dense_weights.update({f"{name}.{k}": v for k, v in tree_flatten(mod.parameters())})
        load_dense_part(model)
        return Engine(model, tokenizer, path, None, context_length=context, arch_config=arch_cfg)
    if dense:
        model = arch.build(arch_cfg)
        for i in range(m.num_layers):
            dense_weights.update(ffn_state_dict(files, i))
        load_dense_part(model)
        return Engine(model, tokenizer, path, None, context_length=context, arch_config=arch_cfg)

    threads, chunk = config.threads, config.chunk_bytes
    if not threads or not chunk:

        t, c = load_cached_choice(path)
        threads = threads or t
        chunk = chunk or c
    dtype = getattr(mx, m.dtype)
    counters = FFNCounters()
    notes: List[str] = []
    budget_bytes = config.budget_bytes(m.ffn_bytes_total)
    cdtype = compute_dtype(dtype) if quant else None
    reader = FlashReader(files, threads=threads, chunk_bytes=chunk,
                         max_gap_bytes=reader_max_gap(path, config, threads), direct=config.direct_io)
    try:
        chooser, active_info = _make_chooser(files, config, act, act_param, budget_bytes, notes, cdtype, reader)
    except BaseException:
        reader.close()
        raise
    most = m.ffn_bytes_total + (chooser.resident_bytes if chooser.name in ("predictor", "gate") else 0)
    if budget_bytes > most:
        rows = f" plus the {chooser.name} rows" if most > m.ffn_bytes_total else ""
        notes.append(f"the budget of {_fmt_mb(budget_bytes)} is more than this model can use "
                     f"({_fmt_mb(most)}: the whole FFN{rows}); using {_fmt_mb(most)}")
        budget_bytes = most
    if chooser.name in ("predictor", "gate"):  # predictors / resident gate rows live inside the FFN budget
        budget_bytes = max(0, budget_bytes - chooser.resident_bytes)
    budget_bytes = max(0, budget_bytes - group_quant_bytes(m))  # exact down rows' group scales: resident
    # A gate-first chooser holds every gate row: the cache keeps (and the budget pays for) up/down only.
    drop = [name for name, _, _, _ in bundle_segments(m) if name in GATE_SEGMENTS] if chooser.computes_gate else []
    row_bytes = m.bundle_bytes - sum(b - a for name, a, b, _ in bundle_segments(m) if name in drop)
    cache_layout, cache_bundle = bundle_segments(m), m.bundle_bytes
    split = None
    if drop:  # the up/down side file, when the folder has one: misses and the pipeline's prefetch read up/down only
        reader, split = _use_updown(files, config, reader, threads, chunk)
        if split is not None:
            cache_layout, cache_bundle, drop = updown_segments(m, GATE_SEGMENTS), split.manifest.bundle_bytes, []
            notes.append(f"gate-first reads {split.manifest.ffn_file} (up/down rows only)")
    verifier.start(split)  # hash only the file the cache reads (the resident gate rows were verified as read)
    # The streaming scratch buffer takes at most an eighth of the budget (small models, small budgets).
    scratch_neurons = scratch_rows(budget_bytes, row_bytes, config.scratch_neurons)
    try:
        cache = NeuronCache.from_budget(
            n_layers=m.num_layers,
            n_neurons=m.intermediate_size,
            bundle_elems=m.bundle_elems,
            bundle_bytes=cache_bundle,
            dtype=dtype,
            budget_bytes=budget_bytes,
            window=config.window,
            scratch_neurons=scratch_neurons,
            lazy=config.policy != "window",
            layout=cache_layout,
            pipeline=config.pipeline,
            drop=drop,
            pipeline_depth=config.pipeline_depth,
        )
    except ValueError as e:
        reader.close()
        if chooser.name not in ("predictor", "gate"):
            raise
        what = ("the activation predictors take" if chooser.name == "predictor" else "the resident gate rows take")
        hint = ("calibrate with a smaller --rank" if chooser.name == "predictor" else "choose --active predictor")
        raise ValueError(f"{e} ({what} {chooser.resident_bytes} bytes of the "
                         f"{config.budget_bytes(m.ffn_bytes_total)}-byte FFN budget: raise the budget or "
                         f"{hint})") from None
    try:
        policy_info = _apply_cache_policy(files, config, chooser, cache, reader)
    except BaseException:
        reader.close()
        raise
    scratch = cache.scratch

    def factory(i: int) -> SparseFFN:
        return SparseFFN(i, m.hidden_size, chooser, cache.layers[i], reader, scratch, counters, act=act,
                         layout=layout, act_param=act_param, quant=quant, compute_dtype=cdtype, verifier=verifier,
                         groups=layer_groups[i])

    model = arch.build(arch_cfg, factory)
    cd = load_dense_part(model)
    prefetcher = _wire_pipeline(model, arch, files, config, cache, reader)
    policy_info = replace(policy_info, compute_dtype=str(cd or dtype).rsplit(".", 1)[-1],
                          ffn_quantization={r: f"{q['bits']}b/g{q['group_size']}" for r, q in quant.items()},
                          pipeline=prefetcher is not None, staging_neurons=cache.staging_neurons)
    if (files.root / PREDICTOR_FILE).is_file():  # after the predictors' own checks, whose messages are specific
        verify_file(files, PREDICTOR_FILE)
    if config.verify == "load":
        verifier.wait()
    verifier.raise_if_failed()  # a layer found corrupt while loading: fail the load, not a token
    return Engine(model, tokenizer, path, config, files=files, cache=cache, reader=reader,
                  chooser=chooser, counters=counters, policy_info=policy_info, notes=notes,
                  context_length=context, verifier=verifier, prefetcher=prefetcher, active_info=active_info,
                  arch_config=arch_cfg, group_quant_bytes=group_quant_bytes(m))

def _check_finite(logprobs: mx.array, path, index: int) -> None:
    """A NaN in the logits (weights with non-finite values that no checksum caught, e.g. written so, or a
    computation that overflowed) would be sampled as some token without a word: a clear error instead."""
    if mx.any(mx.isnan(logprobs)).item():
        raise ModelLoadError(f"{path}: the model computed non-finite logits (NaN) for token {index + 1}: its weights "
                             "hold non-finite values or overflow in this dtype; nothing was generated from them "
                             "(convert or import the model again)")


def dense_mismatch(files, e: BaseException) -> NoReturn:
    """A flash folder's dense weights that do not fit its model (a missing or misshapen tensor): a
    :class:`ChecksumError` when ``dense.safetensors`` is corrupt (a damaged header renames a tensor), else a
    :class:`ModelLoadError` naming the file (not a KeyError from deep inside MLX)."""
    verify_file(files, DENSE_FILE)
    what = f"tensor {e.args[0]!r} is missing" if isinstance(e, KeyError) and e.args else str(e)
    raise ModelLoadError(f"{files.dense_path}: {files.manifest.dense_file} does not hold the weights of the model "
                         f"its manifest describes ({what}); convert or import the model again") from None


def _layer_groups(files) -> list:
    """Per layer ``(scales, biases, position groups)`` of the down rows kept exactly
    (``storage.format.GROUPS_ALONG_FFN``: the resident group rows in the stored dtype, evaluated
    once), or None per layer for other folders."""
    m = files.manifest
    pos = ffn_groups(m)
    if pos is None:
        return [None] * m.num_layers
    out = []
    for i in range(m.num_layers):
        scales, biases = read_group_quant(files, i)["down"]
        mx.eval(scales, biases)
        out.append((scales, biases, pos[i]))
    return out


def reader_max_gap(path: Path, config: FlashConfig, threads: int) -> int:
    """``config.max_gap_bytes``, or when None the disk probe's (``probe.load_cached_gap``)."""
    if config.max_gap_bytes is not None:
        return config.max_gap_bytes

    return load_cached_gap(path, threads, direct_alignment(path))


def _use_updown(files, config: FlashConfig, reader, threads: int, chunk: int):
    """``(reader, split)``: with an up/down side file (``storage.format.updown_files``) a reader
    of it replaces ``reader`` (closed), and the load's verifier is started on ``split``;
    without one (``split`` None) ``reader`` is returned as it is."""

    split = updown_files(files)
    if split is None:
        return reader, None
    new_reader = FlashReader(split, threads=threads, chunk_bytes=chunk,
                             max_gap_bytes=reader_max_gap(files.root, config, threads), direct=config.direct_io)
    reader.close()
    return new_reader, split


def _wire_pipeline(model, arch, files, config: FlashConfig, cache, reader):
    """Pipelined layers (``mlx_flash.pipeline``): a Prefetcher on the engine's reader, and each
    layer's SparseFFN told the next layer's cache and the lookahead map of their input norms.
    None when ``config.pipeline`` is off or nothing can be staged (every layer fits whole)."""

    if not config.pipeline:
        return None
    layers = model.layers
    norms = [arch.ffn_input_norm(layer) for layer in layers]
    return attach_pipeline([layer.mlp for layer in layers], cache, reader, norms)



def _chooser_density(chooser):
    """``(density, recall)`` of the chooser's picks relative to the calibrated active
    neurons (``neuron_cache.chosen_frequencies``): the predictor's held-out predicted
    fraction and recall at its recall target; every neuron for "all"; the oracle's
    top-k share without calibrated thresholds; else (None, 1): the frequencies as they are."""
    name = getattr(chooser, "name", "")
    if name == "all":
        return 1.0, 1.0
    if name == "predictor":
        held = (getattr(chooser, "info", None) or {}).get("held_out") or {}
        for key, h in held.items():
            try:
                if chooser.recall is not None and abs(float(key) - float(chooser.recall)) < 1e-9:
                    return float(h["predicted_fraction"]), float(h["recall"])
            except (KeyError, TypeError, ValueError):
                break
        return None, 1.0
    if name == "gate":
        return chooser.density, 1.0
    if name == "oracle" and getattr(chooser, "thresholds", None) is None:
        return 1.0 - float(chooser.sparsity), 1.0
    return None, 1.0


def _apply_cache_policy(files, config: FlashConfig, chooser, cache, reader) -> PolicyInfo:
    """Resolve ``config.policy`` ("auto": see ``neuron_cache.resolve_auto_policy``), pin
    the hot neurons it asks for and read them from disk once. Returns ``Engine.policy_info``."""

    asked = config.policy
    t0 = time.perf_counter()
    freqs = None
    if asked in ("auto", "hot", "hot+window"):
        freqs = getattr(chooser, "frequencies", None)
        if freqs is None:
            try:
                freqs = load_frequencies(files)
            except PredictorError as e:
                if asked != "auto":
                    raise ValueError(f"cache policy {asked!r} needs the calibrated neuron frequencies, "
                                     f"but the predictors cannot be read: {e}") from None
                freqs = None
    if asked == "auto":
        density, recall = _chooser_density(chooser)
        policy, info = resolve_auto_policy(freqs, cache.layers[0].capacity, config.window,
                                           hot_fraction=config.hot_fraction,
                                           read_model=ReadModel.of_reader(reader, cache.scratch_neurons),
                                           density=density, recall=recall)
    else:
        if asked in ("hot", "hot+window") and freqs is None:
            raise ValueError(f"cache policy {asked!r} pins each layer's most frequently active neurons, but "
                             f"{files.root} has no calibrated neuron frequencies: {CALIBRATE_HINT} "
                             f"(or use --policy lru / window / auto)")
        policy = CachePolicy.make(asked, config.hot_fraction)
        info = PolicyInfo.of(policy, "asked for", "config")

    def fill(layer: int, plan) -> None:
        reader.read(layer, plan.load_ids, plan.load_dest)

    pinned = cache.apply_policy(policy, freqs, fill=fill)
    return replace(info, asked=asked, window=config.window, capacity=cache.layers[0].capacity,
                   pinned=int(sum(len(p) for p in pinned)), preload_bytes=int(cache.stats.preload_bytes),
                   load_seconds=round(time.perf_counter() - t0, 4))
