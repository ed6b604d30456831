"""MoE models in the library: an mlx-lm MoE folder imports (converted to a MoE flash folder, expert
frequencies calibrated), is listed with its family, loads and chats like the dense model; a MoE
flash folder imports as a checked copy; a damaged one is refused."""

from __future__ import annotations

import shutil

import pytest

from mlx_flash import engine as flash_engine
from mlx_flash import library
from mlx_flash.config import FlashConfig
from mlx_flash.moe.format import EXPERTS_FILE, is_moe_flash_dir, open_moe_flash
from tests.tiny_moe import make_tiny_moe


def test_import_mlx_moe_folder_lists_loads_and_chats(tmp_path):
    src = make_tiny_moe(tmp_path / "src" / "tiny-qwen3-moe", "qwen3_moe")
    assert library.check_importable(src) == "folder"
    root = tmp_path / "models"
    dst = library.import_model(src, root=root)
    assert dst.name == "tiny-qwen3-moe.flash" and is_moe_flash_dir(dst)
    m = open_moe_flash(dst).manifest
    assert m.expert_frequencies is not None and "reference.txt" in m.calibration["source"]
    entries, broken = library.scan_library(root)
    assert not broken and [(e.kind, e.family) for e in entries] == [("flash", "Qwen3 MoE")]
    details = library.flash_details(dst)
    assert details is not None and details.experts == "16 experts, top-4" and details.ffn_bytes == m.ffn_bytes_total

    dense = flash_engine.load(src)
    flash = flash_engine.load(dst, FlashConfig(engine="flash", budget=0.5))
    try:
        assert flash.policy_info.name in ("lru", "hot+window")  # auto on calibrated frequencies
        msgs = [{"role": "user", "content": "Hello!"}]
        dense.tokenizer.eos_token_ids = flash.tokenizer.eos_token_ids = []
        a = [r.token for r in dense.stream_generate(msgs, max_tokens=16)]
        b = [r.token for r in flash.stream_generate(msgs, max_tokens=16)]
        assert a == b
    finally:
        dense.close()
        flash.close()

    # the MoE flash folder itself imports as a checked copy; a damaged copy is refused
    again = library.import_model(dst, root=root, name="copy", calibrate=False)
    assert is_moe_flash_dir(again)
    bad = tmp_path / "bad.flash"
    shutil.copytree(dst, bad)
    data = bytearray((bad / EXPERTS_FILE).read_bytes())
    data[5000] ^= 0x55
    (bad / EXPERTS_FILE).write_bytes(bytes(data))
    with pytest.raises(library.ImportRejected, match="checksum"):
        library.import_model(bad, root=root, name="bad", calibrate=False)
    assert not (root / "bad.flash").exists()
