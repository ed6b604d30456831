"""MLP predictor 576->H relu->1536 on log(|h|/thr) (MSE) and on BCE; recall .99 predicted fraction."""
import os
import sys, time, math
import numpy as np, mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
from mlx_flash.storage.format import open_flash
from mlx_flash.dense_model import layer_ffn_parts
from mlx_flash.calibrate import CalibrationData, split_by_sequence
files = open_flash(os.environ["FLASH"])
d = CalibrationData.load(os.environ["CALDATA"])
tr, va, te = split_by_sequence(d.seq, seed=0)
silu = lambda g: g / (1 + np.exp(-g))
def f32(a): return np.array(a.astype(mx.float32))
L = int(sys.argv[1]); H = int(sys.argv[2]); EP = int(sys.argv[3]); loss_kind = sys.argv[4]
p = layer_ffn_parts(files, L)
G, U = f32(p["gate"]), f32(p["up"])
x = d.X[L].astype(np.float32)
a = np.abs(silu(x @ G.T) * (x @ U.T)); thr = np.quantile(a[tr], 0.35); y = a > thr
t = np.clip(np.log(a / thr + 1e-12), -6, 6).astype(np.float32)
mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
xs = (x - mu) / sd
class M(nn.Module):
    def __init__(s):
        super().__init__(); s.l1 = nn.Linear(576, H); s.l2 = nn.Linear(H, 1536)
    def __call__(s, v): return s.l2(nn.relu(s.l1(v)))
m = M(); mx.random.seed(0)
X = mx.array(xs); T = mx.array(t); Y = mx.array(y.astype(np.float32))
def lossf(m, xb, tb, yb):
    z = m(xb)
    if loss_kind == "mse": return mx.mean(mx.square(z - tb))
    w = 1 + 3 * yb
    return mx.mean(w * (nn.softplus(z) - yb * z))
vg = nn.value_and_grad(m, lossf)
steps = EP * (len(tr) // 128)
opt = optim.AdamW(learning_rate=optim.cosine_decay(2e-3, steps, 1e-4), weight_decay=1e-2)
rng = np.random.default_rng(0); t0 = time.time()
def evalp():
    z = np.array(m(X))
    zv = np.sort(z[va][y[va]]); k = int(math.floor(0.01 * len(zv))); c = np.nextafter(zv[k], -np.inf)
    pm = z[te] > c
    return float(pm.mean()), float((pm & y[te]).sum() / y[te].sum())
for e in range(EP):
    perm = tr[rng.permutation(len(tr))]
    for s in range(len(tr) // 128):
        idx = mx.array(perm[s*128:(s+1)*128])
        l, gr = vg(m, X[idx], T[idx], Y[idx]); opt.update(m, gr); mx.eval(m.parameters(), opt.state)
    if e % 5 == 4 or e == EP - 1:
        print(L, H, loss_kind, "epoch", e + 1, "loss", float(l), "pred frac, recall", evalp(), f"{time.time()-t0:.0f}s", flush=True)
