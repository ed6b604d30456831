"""The command line on a tiny MoE model: convert, verify, calibrate, generate from flash."""

from __future__ import annotations

import pytest

from mlx_flash.cli import main
from mlx_flash.moe.format import is_moe_flash_dir, open_moe_flash
from tests.tiny_moe import make_tiny_moe


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_convert_verify_calibrate_generate(tmp_path, home, capsys):
    src = make_tiny_moe(tmp_path / "m", "mixtral")
    dst = tmp_path / "m.flash"
    assert main(["convert", str(src), str(dst)]) == 0
    assert is_moe_flash_dir(dst)
    assert main(["verify", str(dst)]) == 0
    assert "experts.bin (2 layers)" in capsys.readouterr().out
    assert main(["calibrate", str(dst), "--tokens", "128"]) == 0
    assert open_moe_flash(dst).manifest.calibration["tokens"] == 128
    capsys.readouterr()
    rc = main(["generate", "--model", str(dst), "--flash", "--budget", "50%", "-p", "hi", "--max-tokens", "6",
               "--raw"])
    out = capsys.readouterr()
    assert rc == 0 and "flash-router" in out.err and "hit rate" in out.err
