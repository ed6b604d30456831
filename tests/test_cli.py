"""The `mlx-flash` command line on tiny real models (in-process, real files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from mlx_flash.cli import library_destination, main
from tests.convert.test_gguf import write_gguf
from tests.tiny import make_tiny_flash, make_tiny_llama


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_generate_dense_and_flash(tmp_path, home, capsys):
    src = make_tiny_llama(tmp_path / "m", dtype="float32")
    assert main(["generate", "--model", str(src), "-p", "hi", "--max-tokens", "8", "--raw"]) == 0
    dense_out = capsys.readouterr()
    assert "Generation:" in dense_out.err and "Peak memory:" in dense_out.err

    flash = make_tiny_flash(tmp_path / "f", dtype="float32")
    rc = main(["generate", "--model", str(flash), "--flash", "--active", "all", "--budget", "50%",
               "-p", "hi", "--max-tokens", "8", "--raw"])
    out = capsys.readouterr()
    assert rc == 0
    assert "Flash (flash-all)" in out.err and "ms/token" in out.err and "hit rate" in out.err
    assert "first token after" in out.err and " cache" in out.err.split("budget ")[-1]


def test_chat_multi_turn(tmp_path, home, capsys, monkeypatch):
    src = make_tiny_llama(tmp_path / "m", dtype="float32")
    lines = iter(["hello", "/reset", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(src), "--max-tokens", "5"]) == 0
    err = capsys.readouterr().err
    assert err.count("tok/s") == 2 and "[history cleared]" in err


def test_convert_gguf_to_flash_and_list(tmp_path, home, capsys):
    gguf = tmp_path / "tiny.gguf"
    write_gguf(gguf)
    dst = home / "models" / "tiny.flash"
    assert main(["convert", str(gguf), str(dst)]) == 0
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["architecture"] == "llama"
    # conversion to .flash calibrates the activation predictors by default
    assert manifest["predictors"] and (dst / "predictors.safetensors").is_file()
    assert "with activation predictors" in capsys.readouterr().out
    assert main(["models"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split() == ["NAME", "KIND", "ARCH", "SIZE", "PATH"]  # a header row, then the models
    assert "tiny.flash" in listed[1] and listed[1].split()[1] == "flash"
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(".")]  # no work folder left behind

    plain = home / "models" / "plain.flash"
    assert main(["convert", str(gguf), str(plain), "--no-calibrate"]) == 0
    assert json.loads((plain / "manifest.json").read_text())["predictors"] is None
    assert not (plain / "predictors.safetensors").exists()


def test_convert_gguf_to_mlx_keeps_the_bits_unless_a_dtype_is_given(tmp_path, home):
    gguf = tmp_path / "tiny.gguf"
    write_gguf(gguf, qtype=Q.Q4_1)
    assert main(["convert", str(gguf), str(tmp_path / "q4")]) == 0
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert main(["convert", str(gguf), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization" not in cfg and cfg["torch_dtype"] == "bfloat16"


def test_errors_are_clear(tmp_path, home, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "-p", "x"]) != 0
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    assert main(["convert", str(bad), str(tmp_path / "out.flash")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "not a GGUF file" in err
    assert not (tmp_path / "out.flash").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bare_destination_names_go_to_the_library(home, tmp_path):
    assert library_destination("my-relu") == home / "models" / "my-relu.flash"
    assert library_destination("my-relu.flash") == home / "models" / "my-relu.flash"
    assert library_destination(str(tmp_path / "x.flash")) == tmp_path / "x.flash"
    assert library_destination("./x.flash") == Path("./x.flash")
