"""Held-out recall vs the oracle and predicted fraction per layer, float vs quantized predictors.

FLASH= a calibrated flash folder, CALDATA= an .npz of docs/bench/predict/collect.py. Uses the calibration's
held-out test split (calibrate.split_by_sequence), the manifest's thresholds and cutoffs at RECALL (0.99).
"""
import os

import mlx.core as mx
import numpy as np

from mlx_flash.calibrate import CalibrationData, hidden_activation, split_by_sequence
from mlx_flash.config import FlashConfig
from mlx_flash.dense_model import layer_ffn_parts, model_activation
from mlx_flash.predictor import load_predictor_chooser
from mlx_flash.storage.format import open_flash

files = open_flash(os.environ["FLASH"])
m = files.manifest
data = CalibrationData.load(os.environ["CALDATA"])
recall = float(os.environ.get("RECALL", 0.99))
_, _, test = split_by_sequence(data.seq, seed=0)
act, act_param = model_activation(m.model_args)
thr = m.predictors["thresholds"]
modes = {"float": 0, "8-bit": 8, "4-bit": 4}
ch = {k: load_predictor_chooser(files, FlashConfig(extra={"recall": recall}, predictor_bits=b))
      for k, b in modes.items()}
tot = {k: [0, 0, 0, 0] for k in modes}  # tp, predicted, true, cells
agree = {k: [0, 0] for k in modes}  # |pred ∩ float|, |pred ∪ float|
print("layer " + " ".join(f"{k:>16}" for k in modes), "(recall, predicted fraction)")
for i in range(m.num_layers):
    parts = layer_ffn_parts(files, i)
    parts.pop("down", None)
    x = mx.array(data.X[i][test]).astype(mx.float32)
    y = np.array(mx.abs(hidden_activation(x, parts, act, act_param)) > thr[i])
    ref = None
    row = []
    for k in modes:
        p = np.array(ch[k].predict(i, x))
        if ref is None:
            ref = p
        tp = int((p & y).sum())
        tot[k] = [a + b for a, b in zip(tot[k], (tp, int(p.sum()), int(y.sum()), p.size))]
        agree[k] = [agree[k][0] + int((p & ref).sum()), agree[k][1] + int((p | ref).sum())]
        row.append(f"{tp / max(1, y.sum()):.4f} {p.mean():.4f}")
    print(f"{i:5d} " + " ".join(f"{r:>16}" for r in row), flush=True)
for k, t in tot.items():
    print(f"{k}: recall {t[0] / t[2]:.4f}, predicted fraction {t[1] / t[3]:.4f}, "
          f"Jaccard vs float {agree[k][0] / agree[k][1]:.4f}, resident {ch[k].resident_bytes} B")
