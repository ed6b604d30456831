"""The MoE-shape replay on a small shape (real FlashSwitchGLU, reader and expert cache), and its traces."""

from __future__ import annotations

import json

import numpy as np

from mlx_flash.config import FlashConfig
from mlx_flash.moe.bench import (
    MoeShape,
    format_moe_table,
    run_moe_replay,
    save_moe_plots,
    synthetic_trace,
    tiny_real_trace,
)
from mlx_flash.moe.format import open_moe_flash

SMALL = MoeShape(name="small", layers=8, experts=16, top_k=4, hidden=128, expert_ffn=64, bits=4, group_size=32)


def test_synthetic_trace_parameters():
    t = synthetic_trace(200, 2, 32, 4, zipf=1.2, repeat=0.0, seed=1)
    assert t.shape == (200, 2, 4) and all(len(set(row)) == 4 for row in t.reshape(-1, 4))
    counts = np.bincount(t[:, 0].reshape(-1), minlength=32)
    assert counts.max() > 4 * max(1, np.median(counts))  # skewed
    same = synthetic_trace(50, 1, 32, 4, zipf=0.0, repeat=1.0, seed=2)
    assert (same == same[0]).all()  # repeat 1: the first token's experts forever
    uni = synthetic_trace(400, 1, 32, 4, zipf=0.0, repeat=0.0, seed=3)
    reuse = np.mean([len(set(a) & set(b)) / 4 for a, b in zip(uni[:-1, 0], uni[1:, 0])])
    assert reuse < 0.3  # uniform, independent: ~4/32 kept by chance


def test_tiny_real_trace_is_routing_of_the_real_class():
    t = tiny_real_trace(np.arange(40) % 250, 3, 16, 4)
    assert t.shape == (40, 3, 4) and t.min() >= 0 and t.max() < 16
    assert all(len(set(row)) == 4 for row in t.reshape(-1, 4))


def test_replay_rows(tmp_path):
    rep = run_moe_replay(SMALL, gib=1.0 / 1024, tokens=6, warmup=2, calib=16, budgets=(0.25, 0.5),
                         synthetic=((1.0, 0.5),), root=tmp_path, config=FlashConfig(threads=2, chunk_bytes=1 << 20))
    m = open_moe_flash(rep.shape["path"]).manifest
    assert m.num_layers == rep.shape["replayed_layers"] >= 2
    assert m.quantization["gate"] == {"bits": 4, "group_size": 32, "mode": "affine"}
    names = [(r.trace.split(" ")[0], r.name, r.budget) for r in rep.rows]
    assert ("synthetic", "naive", None) in names and ("tiny-real", "flash hot", 0.5) in names
    for r in rep.rows:
        if r.name == "naive":
            assert r.hit_rate == 0.0 and r.mb_per_token > 0
        if r.computed:
            assert r.mb_per_token == 0 and r.hit_rate == 1.0
    by = {(r.trace, r.name, r.budget): r for r in rep.rows}
    for tn in {r.trace for r in rep.rows}:
        naive = by[(tn, "naive", None)]
        for pol in ("flash lru", "flash hot"):
            assert by[(tn, pol, 0.5)].mb_per_token <= naive.mb_per_token
            assert by[(tn, pol, 0.5)].hit_rate > 0
    text = format_moe_table(rep)
    assert "| naive |" in text and "synthetic (zipf 1, repeat 0.5)" in text and "computed" in text
    assert json.loads(rep.to_json())["shape"]["experts"] == 16
    assert save_moe_plots(rep, tmp_path / "plots")[0].stat().st_size > 1000
