"""Predicted fraction at recall 0.99 (held-out) vs rank, for a calibration data file (more tokens?)."""
import os
import sys, math
import numpy as np, mlx.core as mx
from mlx_flash.storage.format import open_flash
from mlx_flash.dense_model import layer_ffn_parts
from mlx_flash.calibrate import CalibrationData, split_by_sequence, fit_low_rank
files = open_flash(os.environ["FLASH"])
d = CalibrationData.load(sys.argv[1])
tr, va, te = split_by_sequence(d.seq, seed=0)
print("tokens", len(d.seq), "train", len(tr), "val", len(va), "test", len(te))
silu = lambda g: g / (1 + np.exp(-g))
def f32(a): return np.array(a.astype(mx.float32))
for L in [int(v) for v in sys.argv[2].split(",")]:
    p = layer_ffn_parts(files, L)
    x = d.X[L].astype(np.float32)
    a = np.abs(silu(x @ f32(p["gate"]).T) * (x @ f32(p["up"]).T)); thr = np.quantile(a[tr], 0.35); y = a > thr
    t = np.clip(np.log(a / thr + 1e-12), -6, 6)
    row = []
    for r in [int(v) for v in os.environ.get("RANKS", "32,128,576").split(",")]:
        A, B, b = (np.array(v) for v in fit_low_rank(x[tr], t[tr], r))
        z = (x @ A) @ B + b
        zv = np.sort(z[va][y[va]]); k = int(math.floor(0.01 * len(zv))); c = np.nextafter(zv[k], -np.inf)
        pm = z[te] > c
        row.append((r, round(float(pm.mean()), 4), round(float((pm & y[te]).sum() / y[te].sum()), 4)))
    print(L, row, flush=True)
