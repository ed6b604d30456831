"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF), converted for real.

The conversion runs once per session into a temporary ``MLX_FLASH_HOME``. The checks:
it answers a factual question, greedy generation agrees with a plain greedy loop, and
its perplexity on real English (KJV Genesis, from Debian's ``bible-kjv``) is sane, while
the same model with q/k left in llama.cpp's order is far worse.

The converted folder keeps the GGUF's bits (4-bit group 32, 8-bit embedding); the tests
load it with float32 scales (MLX's CPU quantized matmul is ~40x slower with float16 ones).
Measured on the 2-core x86 CPU (MLX CPU build, no OpenBLAS, shared with other jobs):
conversion ~2 s; the default run scores 256 tokens of Genesis (perplexity 4.06; 50 with q/k
left in llama.cpp's order) and the slow test 4096.
"""

from __future__ import annotations

import json
import math
import shutil
import time

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from mlx_flash import corpus, default_model
from mlx_flash.convert.gguf import convert_gguf, permute_qk, read_gguf_info
from mlx_flash.paths import HOME_ENV, models_dir
from mlx_flash.progress import Cancelled
from mlx_flash.storage.format import convert_to_flash, open_flash

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def mlx_flash_home(tmp_path_factory):
    """A private MLX_FLASH_HOME for the whole session."""
    home = tmp_path_factory.mktemp("mlx_flash_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HOME_ENV, str(home))
        yield home


@pytest.fixture(scope="session")
def default_dir(mlx_flash_home):
    t = time.perf_counter()
    folder = default_model.ensure_default_mlx()
    print(f"\n[default model] GGUF -> mlx conversion: {time.perf_counter() - t:.2f} s")
    return folder


def load_float32(folder):
    """mlx-lm's model with float32 scales, biases and norms: MLX's CPU quantized matmul is
    ~40x faster with float32 than with float16/bfloat16 activations (FACTS.md)."""
    model, tok = mlx_lm.load(str(folder))
    model.set_dtype(mx.float32)
    return model, tok


@pytest.fixture(scope="session")
def loaded(default_dir):
    return load_float32(default_dir)


@pytest.fixture(scope="session")
def genesis_ids(loaded, mlx_flash_home):
    if not corpus.available():
        pytest.skip(f"no KJV text: Debian's `bible` command is missing ({corpus.INSTALL_HINT})")
    _, tok = loaded
    return tok.encode(corpus.kjv_text("Genesis 1:1-50:26"))


def chat_prompt(tok, question: str = QUESTION) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)


def perplexity(model, ids, n_tokens: int, chunk: int = 512) -> tuple[float, float]:
    """(perplexity, tokens/s) of ``model`` on the first ``n_tokens`` predictions of ``ids``,
    in independent chunks of ``chunk`` tokens."""
    nll, count = 0.0, 0
    t = time.perf_counter()
    for start in range(0, n_tokens, chunk):
        x = mx.array(ids[start:start + min(chunk, n_tokens - start) + 1])[None]
        logits = model(x[:, :-1]).astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, x[:, 1:], reduction="sum")
        nll += loss.item()
        count += x.shape[1] - 1
    return math.exp(nll / count), count / (time.perf_counter() - t)


def keep_llama_cpp_qk_order(model) -> None:
    """Undo the converter's q/k un-permutation in place (what a converter without it gives):
    the rows of the packed weights and of their scales and biases."""
    args = model.args
    for layer in model.model.layers:
        for proj, heads in ((layer.self_attn.q_proj, args.num_attention_heads),
                            (layer.self_attn.k_proj, args.num_key_value_heads)):
            for name in ("weight", "scales", "biases"):
                a = getattr(proj, name)
                setattr(proj, name, mx.array(permute_qk(np.array(a), heads)))


def test_kjv_corpus_is_prose(mlx_flash_home):
    if not corpus.available():
        pytest.skip(f"Debian's `bible` command is missing ({corpus.INSTALL_HINT})")
    text = corpus.kjv_text("Genesis 1:1-2:25")
    assert text.startswith("In the beginning God created the heaven and the earth. And the earth")
    assert "Ge1:" not in text and "Ge2:" not in text
    assert text.count("\n\n") == 1  # one paragraph per chapter
    assert (corpus.corpus_dir() / "kjv-Genesis_1_1_2_25.txt").read_text() == text  # cached


def test_gguf_path_and_info():
    path = default_model.gguf_path()
    assert path.name == default_model.GGUF_FILENAME and path.is_file()
    info = read_gguf_info(path)
    assert info["supported"] and info["architecture"] == "llama"
    assert info["hyperparameters"]["block_count"] == 30 and info["vocab_size"] == 49152
    assert info["tensor_types"].keys() == {"Q4_1", "Q8_0", "F32"}


def test_default_dir_and_reuse(default_dir):
    assert default_dir == default_model.default_mlx_dir() == models_dir() / "SmolLM2-135M-Instruct-mlx"
    assert default_model.is_complete(default_dir) and default_model.is_quantized(default_dir)
    q = json.loads((default_dir / "config.json").read_text())["quantization"]
    assert q == {"group_size": 32, "bits": 4, "mode": "affine",  # Q4_1; token_embd is Q8_0 (tied output)
                 "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"}}
    assert (default_dir / "model.safetensors").stat().st_size < 100e6  # bfloat16: 269 MB
    before = (default_dir / "model.safetensors").stat().st_mtime_ns
    assert default_model.ensure_default_mlx() == default_dir  # no second conversion
    assert (default_dir / "model.safetensors").stat().st_mtime_ns == before
    leftovers = [p.name for p in default_dir.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_bfloat16_folder_from_an_earlier_version_is_upgraded(default_dir, tmp_path):
    keep = tmp_path / "keep"
    shutil.move(default_dir, keep)
    try:
        convert_gguf(default_model.gguf_path(), default_dir, dtype="bfloat16")
        assert default_model.is_complete(default_dir) and not default_model.is_quantized(default_dir)
        msgs = []
        assert default_model.ensure_default_mlx(progress=lambda f, m="": msgs.append(m)) == default_dir
        assert default_model.is_quantized(default_dir) and "upgrading" in msgs[0]
    finally:
        shutil.rmtree(default_dir, ignore_errors=True)
        shutil.move(keep, default_dir)


def test_same_numbers_as_the_dequantized_conversion(loaded, tmp_path):
    """Q4_1 and Q8_0 are MLX's affine 4-/8-bit exactly: the logits equal those of the
    float32 (dequantized) conversion up to float rounding."""
    model, tok = loaded
    ref, _ = load_float32(convert_gguf(default_model.gguf_path(), tmp_path / "f32", dtype="float32"))
    x = mx.array(tok.encode("In the beginning God created the heaven and the earth."))[None]
    a, b = model(x), ref(x)
    assert mx.abs(a - b).max().item() < 2e-3 * mx.abs(b).max().item()
    assert (mx.argmax(a, -1) == mx.argmax(b, -1)).all().item()


def test_cancelled_calibration_keeps_the_converted_flash_folder(default_dir):
    """Preparing the flash model ends with calibration; cancelling it leaves a valid,
    uncalibrated folder, and the next preparation only calibrates (no second conversion)."""
    seen = []

    def cancel_once_calibrating(fraction, message=""):
        seen.append((fraction, message))
        return message != "loading the model"  # calibration's first step (conversion is done by then)

    with pytest.raises(Cancelled):
        default_model.ensure_default_flash(progress=cancel_once_calibrating)
    folder = default_model.default_flash_dir()
    open_flash(folder)  # complete and valid
    assert not default_model.is_calibrated(folder)
    assert seen[-1] == (default_model.CONVERT_SHARE, "loading the model")  # conversion: the bar's first part
    before = (folder / "ffn.bin").stat().st_mtime_ns
    msgs = []
    with pytest.raises(Cancelled):
        default_model.ensure_default_flash(progress=lambda f, m="": msgs.append((f, m)) or False)
    assert (folder / "ffn.bin").stat().st_mtime_ns == before  # not converted again
    assert msgs and msgs[0][0] == 0.0  # the bar is the calibration's alone now
    assert default_model.ensure_default_flash(calibrate=False) == folder  # without calibration: as it is


def test_flash_folder_with_8_bit_down_rows_is_upgraded(default_dir, tmp_path):
    """A default flash folder from before the exact down layout (down rows re-quantized at 8 bits,
    format version 2) still opens, but is not current: preparing converts it again, with a message,
    into the exact layout (the GGUF's own down codes, 1,008-byte bundles instead of 1,368)."""
    folder = default_model.default_flash_dir()
    keep = tmp_path / "keep"
    if folder.exists():
        shutil.move(folder, keep)
    try:
        convert_to_flash(default_dir, folder, down_bits=8)
        old = open_flash(folder).manifest
        assert old.format_version == 2 and old.bundle_bytes == 1368
        assert default_model.prepared_flash(calibrate=False) is None
        msgs = []
        assert default_model.ensure_default_flash(progress=lambda f, m="": msgs.append(m), calibrate=False) == folder
        m = open_flash(folder).manifest
        assert m.format_version == 3 and m.bundle_bytes == 1008 and m.quantization["down"]["axis"] == "ffn"
        assert any("exact 4-bit" in x for x in msgs)
        assert default_model.prepared_flash(calibrate=False) == folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if keep.exists():
            shutil.move(keep, folder)


def test_answers_paris(loaded):
    model, tok = loaded
    t = time.perf_counter()
    text = mlx_lm.generate(model, tok, chat_prompt(tok), max_tokens=24)
    print(f"\n[default model] {text!r} ({time.perf_counter() - t:.2f} s)")
    assert "Paris" in text


def test_greedy_generation_matches_plain_greedy_loop(loaded):
    """mlx-lm's stream_generate with temperature 0 == argmax over model(...) with a KV cache."""
    model, tok = loaded
    prompt = tok.encode(chat_prompt(tok, "Name three colours."))
    n = 24
    streamed, tps = [], 0.0
    for r in mlx_lm.stream_generate(model, tok, prompt, max_tokens=n, sampler=make_sampler(temp=0.0)):
        streamed.append(r.token)
        tps = r.generation_tps
    print(f"\n[default model] generation: {tps:.1f} tokens/s (4-bit, float32 scales)")

    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)
    manual = []
    for _ in range(len(streamed)):
        token = mx.argmax(logits[0, -1]).item()
        manual.append(token)
        if token in tok.eos_token_ids:
            break
        logits = model(mx.array([[token]]), cache=cache)
    assert manual == streamed
    assert len(streamed) > 3


def test_perplexity_and_qk_order_matters(loaded, genesis_ids, default_dir):
    model, _ = loaded
    n = 256
    ppl, tps = perplexity(model, genesis_ids, n)
    print(f"\n[default model] perplexity on {n} tokens of Genesis: {ppl:.2f} ({tps:.1f} tokens/s, 4-bit)")
    assert 1.5 < ppl < 30

    wrong, _ = load_float32(default_dir)
    keep_llama_cpp_qk_order(wrong)
    bad, _ = perplexity(wrong, genesis_ids, n)
    print(f"[default model] ... with q/k in llama.cpp's order: {bad:.2f}")
    assert bad > 3 * ppl


@pytest.mark.slow
def test_perplexity_4k_tokens(loaded, genesis_ids):
    model, _ = loaded
    n = 4096
    ppl, tps = perplexity(model, genesis_ids, n)
    print(f"\n[default model] perplexity on {n} tokens of Genesis: {ppl:.2f} ({tps:.1f} tokens/s, 4-bit)")
    assert 1.5 < ppl < 30
