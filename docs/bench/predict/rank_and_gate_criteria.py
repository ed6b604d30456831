"""Criteria and predictors per layer on calibration activations (numpy)."""
import os
import sys, time, math, json
import numpy as np, mlx.core as mx
from mlx_flash.storage.format import open_flash
from mlx_flash.dense_model import layer_ffn_parts
from mlx_flash.calibrate import CalibrationData, split_by_sequence, fit_low_rank

files = open_flash(os.environ["FLASH"])
d = CalibrationData.load(os.environ["CALDATA"])
tr, va, te = split_by_sequence(d.seq, seed=0)
layers = [int(v) for v in sys.argv[1].split(",")] if len(sys.argv) > 1 else list(range(30))
SP = 0.35
silu = lambda g: g / (1 + np.exp(-g))
def f32(a): return np.array(a.astype(mx.float32))
FR = np.round(np.arange(0.40, 1.001, 0.025), 3)

res = {}
for L in layers:
    t0 = time.time()
    p = layer_ffn_parts(files, L)
    G, U, D = f32(p["gate"]), f32(p["up"]), f32(p["down"])
    x = d.X[L].astype(np.float32)
    g = x @ G.T; u = x @ U.T; sg = silu(g); h = sg * u; a = np.abs(h)
    thr = np.quantile(a[tr], SP)
    y = a > thr
    dn = np.sqrt((D ** 2).sum(0))
    hte = h[te]; ref = float(((hte @ D.T) ** 2).sum())
    def rel_err(keep):  # keep: test mask
        return math.sqrt(float((((hte * ~keep) @ D.T) ** 2).sum()) / ref)
    def at_frac(s, f):  # mask on test with train-quantile per-layer threshold for fraction f
        t = np.quantile(s[tr].ravel(), 1 - f)
        return s[te] > t
    def min_frac(s, target):  # smallest fraction whose error <= target
        best = None
        for f in FR[::-1]:
            if rel_err(at_frac(s, f)) <= target: best = f
            else: break
        return best
    oracle_keep = y[te]
    o_err = rel_err(oracle_keep)
    row = {"oracle_frac": float(oracle_keep.mean()), "oracle_err": o_err}
    # criteria
    crit = {}
    crit["|h|*dn"] = a * dn
    crit["gate_scaled"] = np.abs(sg) * np.sqrt((u[tr] ** 2).mean(0)) * dn
    for r in (16, 32, 64):
        A, B, b = (np.array(v) for v in fit_low_rank(x[tr], u[tr], r))
        uh = (x @ A) @ B + b
        sig2 = ((u[tr] - uh[tr]) ** 2).mean(0)
        crit[f"gate+u r{r}"] = np.abs(sg) * np.sqrt(uh ** 2 + sig2) * dn
        crit[f"gate+u r{r} nosig"] = np.abs(sg) * np.abs(uh) * dn
    for k, s in crit.items():
        row[f"err@oracle_frac {k}"] = rel_err(at_frac(s, row["oracle_frac"]))
        row[f"frac@oracle_err {k}"] = min_frac(s, o_err)
    row["err@oracle_frac |h|"] = o_err
    # predictors of log(|h|/thr): recall .99 predicted fraction on test
    target = np.clip(np.log(a / thr + 1e-12), -6, 6)
    def pred_frac(z):
        zv = np.sort(z[va][y[va]]); k = int(math.floor(0.01 * len(zv))); c = np.nextafter(zv[k], -np.inf)
        pm = z[te] > c
        return float(pm.mean()), float((pm & y[te]).sum() / y[te].sum())
    for r in (32, 128, 256, 576):
        A, B, b = (np.array(v) for v in fit_low_rank(x[tr], target[tr], r))
        row[f"pred r{r}"] = pred_frac((x @ A) @ B + b)
    # predictor on target |h|*dn (d)
    thr2 = np.quantile((a * dn)[tr], SP); y2 = a * dn > thr2
    row["oracle2_frac"] = float(y2[te].mean()); row["oracle2_err"] = rel_err(y2[te])
    res[L] = row
    print(L, json.dumps({k: (round(v, 4) if isinstance(v, float) else (tuple(round(q, 4) for q in v) if isinstance(v, tuple) else v)) for k, v in row.items()}), f"{time.time()-t0:.0f}s", flush=True)
json.dump(res, open(os.environ.get("OUT", "exp1.json"), "w"))
