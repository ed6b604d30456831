"""Perplexity (KJV Genesis, teacher forced) and simulated bytes/token at a 50% budget for several choosers."""
import os
import sys, json
import numpy as np, mlx.core as mx
from mlx_flash.storage.format import open_flash
from mlx_flash.dense_model import float32_gates
from mlx_flash.calibrate import load_dense_model, model_activation
from mlx_flash.evaluate import run_mode, text_chunks, threshold_selector, gate_selector, predictor_selector
from mlx_flash.predictor import load_predictor_chooser, load_gate_scales, load_frequencies, predictor_info
from mlx_flash.config import FlashConfig
from mlx_flash.corpus import kjv_text
from mlx_flash.neuron_cache import simulate, ReadModel, hot_ids
from mlx_lm.utils import load_tokenizer
root = os.environ["FLASH"]
files = open_flash(root); m = files.manifest
NTOK = int(sys.argv[1]); modes = sys.argv[2].split(",")
info = predictor_info(m); grec = info["gate_first"]
act = model_activation(m.model_args)
tok = load_tokenizer(files.root, eos_token_ids=2)
chunks = text_chunks(tok, kjv_text("Genesis 1:1-50:26"), NTOK, 512)
model = load_dense_model(files, "float32")
n, NL = m.intermediate_size, m.num_layers
freqs = load_frequencies(files)
budget = 0.5 * m.ffn_bytes_total
def cap_for(resident, row):
    room = budget - resident
    room -= min(256, n, max(8, room // 8 // row)) * row
    return int(min(n, room // NL // row))
gates = float32_gates(files); scales = load_gate_scales(files)
gate_res = 360 * n * NL + 4 * n * NL
sels = {}
class _All:
    def __call__(self, layer, x, h): return mx.ones(h.shape, dtype=mx.bool_)
for mo in modes:
    kind, _, arg = mo.partition(":")
    if kind == "all": sels[mo] = (_All(), 0, 1368)
    elif kind == "oracle": sels[mo] = (threshold_selector(info["thresholds"]), 0, 1368)
    elif kind == "gate": sels[mo] = (gate_selector(gates, grec["thresholds"][arg], act, scales), gate_res, 1008)
    elif kind == "gatepin":  # gate-first with the rows the hot policy pins always used (they cost no I/O)
        pins = [mx.array(np.isin(np.arange(n), hot_ids(freqs[L], cap_for(gate_res, 1008)))) for L in range(NL)]
        base = gate_selector(gates, grec["thresholds"][arg], act, scales)
        sels[mo] = ((lambda layer, x, h, base=base, pins=pins: base(layer, x, h) | pins[layer]), gate_res, 1008)
    elif kind == "pred":
        ch = load_predictor_chooser(files, FlashConfig(extra={"recall": float(arg)}))
        sels[mo] = (predictor_selector(ch), ch.resident_bytes, 1368)
out = {}
dense = run_mode(model, chunks, NL, n, name="dense", act=act, windows=1).perplexity
print("dense", dense, flush=True)
for mo, (sel, res, row) in sels.items():
    masks = [[] for _ in range(NL)]
    def rec(layer, x, h, sel=sel):
        mk = sel(layer, x, h); masks[layer].append(mk); return mk
    r = run_mode(model, chunks, NL, n, name=mo, act=act, select=rec, windows=1)
    cap = cap_for(res, row)
    by = {}
    for gap in (0, 25600):
      rm = ReadModel(row, 512, gap)
      for pol in ("lru", "hot+window", "hot"):
        tot = 0; steps = 0; useful = 0
        for L in range(0, NL, 3):
            M = np.concatenate([np.array(a).reshape(-1, n) for a in masks[L]])
            st = simulate(M, n, cap, pol, 5, freqs[L], warmup=64, read_model=rm)
            tot += st.bytes_read; steps += st.steps; useful += (st.misses + st.overflow) * row
        by[f"{pol} gap{gap}"] = round(tot / steps * NL / 1e6, 2)
        by[f"{pol} useful"] = round(useful / steps * NL / 1e6, 2)
    out[mo] = {"ppl": r.perplexity, "vs_dense": r.perplexity / dense - 1, "active": r.active_fraction, "cap": cap, "MB/tok": by}
    print(mo, json.dumps(out[mo]), flush=True)
