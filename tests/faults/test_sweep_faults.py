"""Cases the fault sweep (tests/faults/sweep.py, docs/faults/sweep.md) found bad, on tiny real models:
each failed before its fix (a traceback, a misleading message, a stuck window or a wrong answer)."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PySide6.QtCore import QSettings

from mlx_flash import default_model
from mlx_flash.calibrate import calibrate
from mlx_flash.cli import main
from mlx_flash.config import FlashConfig
from mlx_flash.engine import ModelLoadError, load
from mlx_flash.moe.format import convert_to_moe_flash
from mlx_flash.storage.format import ChecksumError, Manifest, convert_to_flash, file_checksum, signed
from mlx_flash_app.widgets.model_library import flash_config_for, save_model_settings
from tests.tiny import make_tiny_llama, quantize_tiny
from tests.tiny_moe import make_tiny_moe_q4


@pytest.fixture(scope="module")
def q4_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-q4")
    return quantize_tiny(make_tiny_llama(root / "f", layers=2, hidden=64, ffn=128, dtype="float16", seed=5),
                         root / "q4", bits=4, group_size=32)


@pytest.fixture(scope="module")
def q4_flash(q4_src):
    """A tiny 4-bit flash folder in the exact down layout (format version 3: group scales in dense)."""
    return convert_to_flash(q4_src, q4_src.parent / "q4.flash")


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _rename_tensor(st: Path, old: str, new: str) -> None:
    """A bit flip inside a safetensors header that turns one tensor name into another (same length)."""
    raw = bytearray(st.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8:8 + n].decode()
    assert old in header and len(old) == len(new)
    raw[8:8 + n] = header.replace(old, new, 1).encode()
    st.write_bytes(bytes(raw))


GEN = ["--prompt", "hello", "--raw", "--max-tokens", "3", "--budget", "50%"]


def test_a_renamed_dense_tensor_is_the_checksum_error_not_a_keyerror(q4_flash, tmp_path, home, capsys):
    bad = shutil.copytree(q4_flash, tmp_path / "bad.flash")
    _rename_tensor(bad / "dense.safetensors", "layers.1.self_attn.v_proj.weight", "layers.1.self_attn.v_proj.wfight")
    assert main(["generate", "-m", str(bad), *GEN]) == 1
    err = capsys.readouterr().err
    assert "dense.safetensors checksum mismatch" in err and "Traceback" not in err
    with pytest.raises(ChecksumError):
        load(bad, FlashConfig(budget=0.5))


def test_dense_weights_that_do_not_fit_the_model_name_the_file(q4_flash, tmp_path):
    """The same damage with a checksum that matches (a faulty writer): a ModelLoadError naming the file."""
    bad = shutil.copytree(q4_flash, tmp_path / "bad.flash")
    _rename_tensor(bad / "dense.safetensors", "layers.1.self_attn.v_proj.weight", "layers.1.self_attn.v_proj.wfight")
    m = Manifest.load(bad)
    m.checksums["dense.safetensors"] = file_checksum(bad / "dense.safetensors")
    m.save(bad)
    with pytest.raises(ModelLoadError, match=r"dense\.safetensors does not hold the weights .*v_proj"):
        load(bad, FlashConfig(budget=0.5))


def test_moe_renamed_dense_tensor_is_the_checksum_error(tmp_path, home, capsys):
    flash = convert_to_moe_flash(make_tiny_moe_q4(tmp_path / "src", "qwen3_moe", layers=2), tmp_path / "m.flash")
    _rename_tensor(flash / "dense.safetensors", "layers.1.self_attn.k_proj.scales", "layers.1.self_attn.k_proj.scqles")
    assert main(["generate", "-m", str(flash), *GEN]) == 1
    err = capsys.readouterr().err
    assert "dense.safetensors checksum mismatch" in err and "parameters not in model" not in err


@pytest.fixture()
def file_size_limit():
    """Set this process's file-size limit (``ulimit -f``; Python ignores SIGXFSZ, so a write past it fails
    with EFBIG, or with MLX's RuntimeError), and put it back afterwards."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)

    def set_limit(n: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, old[1]))
    yield set_limit
    resource.setrlimit(resource.RLIMIT_FSIZE, old)


@pytest.mark.parametrize("which", ["ffn.bin", "dense.safetensors"])
def test_convert_past_the_file_size_limit_says_so(which, q4_src, q4_flash, tmp_path, home, capsys, file_size_limit):
    """ffn.bin is written by Python (EFBIG), dense.safetensors by MLX (a RuntimeError without errno: it was a
    traceback); both were called "disk full" or not explained."""
    sizes = {p.name: p.stat().st_size for p in q4_flash.iterdir()}
    # ffn.bin is written first: a limit below it stops that write; one above every other file stops dense's
    limit = sizes[which] - 1 if which == "ffn.bin" else max(v for k, v in sizes.items() if k != which) + 1
    assert limit < sizes[which]
    file_size_limit(limit)
    rc = main(["convert", str(q4_src), str(tmp_path / "out.flash")])
    file_size_limit(resource.RLIM_INFINITY)
    err = capsys.readouterr().err
    assert rc == 1 and "file-size limit" in err and "disk full" not in err, err
    assert not [p for p in tmp_path.iterdir() if p.name != "home"]  # nothing published, no temporaries


@pytest.mark.parametrize("values", [
    {"active": "bogus"}, {"policy": "fastest"}, {"threads": 1000000}, {"threads": -3}, {"window": 0},
    {"window": "many"}, {"budget_pct": 500}, {"budget_pct": "1e999"},
])
def test_damaged_model_settings_fall_back_to_the_defaults(values, tmp_path):
    """A hand-edited or damaged settings.ini: the window built a FlashConfig from it in the main thread (a
    ValueError: the model never loaded, the banner said "Loading…" for ever) or a reader with a million
    threads."""
    s = QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)
    save_model_settings(s, "m.flash", values)
    cfg = flash_config_for(tmp_path / "m.flash", s)
    default = FlashConfig()
    assert (cfg.active, cfg.policy, cfg.threads, cfg.window, cfg.budget) == \
        (default.active, default.policy, default.threads, default.window, default.budget)


def test_settings_in_range_are_kept(tmp_path):
    s = QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)
    save_model_settings(s, "m.flash", {"active": "gate", "policy": "lru", "threads": 8, "window": 3, "budget_pct": 30})
    cfg = flash_config_for(tmp_path / "m.flash", s)
    assert (cfg.active, cfg.policy, cfg.threads, cfg.window, cfg.budget) == ("gate", "lru", 8, 3, 0.3)



# --------------------------------------------------------------------------- non-finite values behind a good checksum
PROMPTS = ["hello there", "tell me a short story", "what is two plus two?", "list three colours"]


@pytest.fixture(scope="module")
def calibrated(q4_src):
    """The tiny 4-bit folder calibrated (predictors.safetensors with frequencies and gate scales)."""
    flash = convert_to_flash(q4_src, q4_src.parent / "cal.flash")
    calibrate(flash, sparsity=0.5, rank=8, tokens=200, max_new_tokens=8, prompts=PROMPTS)
    return flash


def _rewrite(folder: Path, name: str, key: str, fn) -> None:
    """Rewrite one array of a safetensors file of ``folder`` with ``fn`` and record the new file's checksum
    (a faulty writer: the damage is not a checksum mismatch)."""
    arrays, meta = mx.load(str(folder / name), return_metadata=True)
    arrays = dict(arrays)
    arrays[key] = mx.array(fn(np.array(arrays[key].astype(mx.float32)))).astype(arrays[key].dtype)
    (folder / name).unlink()
    mx.save_safetensors(str(folder / name), arrays, metadata=meta)
    m = Manifest.load(folder)
    m.checksums[name] = file_checksum(folder / name)
    m.save(folder)


@pytest.mark.parametrize("key, fn, active", [
    ("gate_scales", lambda a: a * np.nan, "gate"),        # gate-first chose no neuron: silent wrong text
    ("gate_scales", lambda a: -a, "gate"),
    ("frequencies", lambda a: a * np.nan, "predictor"),
    ("layers.1.A", lambda a: a * np.nan, "predictor"),   # the predictor chose no neuron
])
def test_non_finite_predictor_arrays_are_refused(calibrated, tmp_path, home, capsys, key, fn, active):
    bad = shutil.copytree(calibrated, tmp_path / "bad.flash")
    _rewrite(bad, "predictors.safetensors", key, fn)
    rc = main(["generate", "-m", str(bad), *GEN, "--active", active, "--policy", "hot"])
    err = capsys.readouterr().err
    assert rc == 1 and "non-finite" in err and "predictors.safetensors" in err, err


def test_non_finite_dense_weights_fail_the_token_not_silently(q4_flash, tmp_path, home, capsys):
    bad = shutil.copytree(q4_flash, tmp_path / "bad.flash")
    _rewrite(bad, "dense.safetensors", "model.layers.1.input_layernorm.weight", lambda a: a * np.nan)
    rc = main(["generate", "-m", str(bad), *GEN])
    captured = capsys.readouterr()
    assert rc == 1 and "non-finite logits" in captured.err and captured.out.strip() == "", captured


# --------------------------------------------------------------------------- permissions
_SCAN = ("import json, sys; from pathlib import Path; from mlx_flash import library; "
         "good, broken = library.scan_library(Path(sys.argv[1])); "
         "print(json.dumps([[e.name for e in good], [[b.name, b.reason] for b in broken]]))")


def test_an_unreadable_library_folder_is_listed_broken_not_fatal(q4_flash):
    """A model folder without read permission: asking whether its manifest exists raised PermissionError out of
    the library's scan (the app could not start). Root reads anything, so as root the scan runs as nobody."""
    root = Path(tempfile.mkdtemp(prefix="mlx-flash-perm-", dir="/tmp"))
    try:
        root.chmod(0o755)
        shutil.copytree(q4_flash, root / "Good.flash")
        shutil.copytree(q4_flash, root / "Locked.flash")
        (root / "Locked.flash").chmod(0)
        cmd = [sys.executable, "-c", _SCAN, str(root)]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("root, and no setpriv to drop to another user")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), HOME=str(root))
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        good, broken = json.loads(r.stdout.strip().splitlines()[-1])
        assert good == ["Good.flash"]
        assert broken == [["Locked.flash", "Locked.flash: cannot read the folder (Permission denied)"]]
    finally:
        (root / "Locked.flash").chmod(0o755)
        shutil.rmtree(root)


# --------------------------------------------------------------------------- the manifest's model_args
@pytest.mark.parametrize("field, value, words", [
    ("rms_norm_eps", "x", "does not build a llama model"),                       # was a TypeError traceback
    ("rope_scaling", "x", "does not build a llama model"),                       # was an AttributeError
    ("max_position_embeddings", "x", None),                                      # was a TypeError in generate
])
def test_mistyped_model_args_are_a_clear_error(q4_flash, tmp_path, home, capsys, field, value, words):
    bad = shutil.copytree(q4_flash, tmp_path / "bad.flash")
    m = json.loads((bad / "manifest.json").read_text())
    m["model_args"][field] = value
    (bad / "manifest.json").write_text(json.dumps(signed(m)))
    rc = main(["generate", "-m", str(bad), *GEN])
    err = capsys.readouterr().err
    if words is None:  # only the prompt-length note reads it: no limit, the model runs
        assert rc == 0, err
    else:
        assert rc == 1 and words in err and field in err, err


# --------------------------------------------------------------------------- the default model, damaged
def test_prepare_rebuilds_a_damaged_default_model(q4_src, home, capsys, caplog):
    """A prepared default model whose ffn.bin no longer matches its checksums: every load failed ("convert or
    import it again") and `mlx-flash prepare` said "ready" (it only reads the manifest), so nothing repaired it.
    Now prepare checks the checksums and converts it again. (A tiny model stands in for the default one.)"""
    shutil.copytree(q4_src, default_model.default_mlx_dir())
    flash = convert_to_flash(default_model.default_mlx_dir(), default_model.default_flash_dir())
    with open(flash / "ffn.bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert default_model.prepared_flash(calibrate=False) == flash  # the cheap check cannot see it
    with caplog.at_level(logging.WARNING, logger="mlx_flash.default_model"):
        assert main(["prepare", "--no-calibrate"]) == 0
    assert "default model ready" in capsys.readouterr().out
    assert any("the default model is damaged" in r.getMessage() and "checksum mismatch" in r.getMessage()
               for r in caplog.records)
    assert main(["verify", str(flash)]) == 0


def test_a_malformed_calibration_record_is_a_clear_error(calibrated, tmp_path, home, capsys):
    """`--active auto` reads the calibration's held-out record to choose: a mistyped one was a TypeError."""
    bad = shutil.copytree(calibrated, tmp_path / "bad.flash")
    m = Manifest.load(bad)
    m.predictors = {**m.predictors, "held_out": {str(m.predictors["recall"]): "x"}}
    m.save(bad)
    rc = main(["generate", "-m", str(bad), *GEN, "--active", "auto"])
    err = capsys.readouterr().err
    assert rc == 1 and "field 'predictors' is malformed" in err, err


def test_a_damaged_tokenizer_is_a_clear_error(q4_flash, tmp_path, home, capsys):
    """A changed byte in tokenizer.json that keeps it JSON (a merge naming a token the vocabulary lacks):
    the tokenizers library raised a bare Exception out of the CLI."""
    bad = shutil.copytree(q4_flash, tmp_path / "bad.flash")
    tok = json.loads((bad / "tokenizer.json").read_text())
    tok["model"]["merges"] = ["Zq Zq"]  # neither half is in the vocabulary
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    rc = main(["generate", "-m", str(bad), *GEN])
    err = capsys.readouterr().err
    assert rc == 1 and "its tokenizer cannot be read" in err, err
