"""Fault sweep of a prepared flash folder (not a pytest module: run it by hand).

    PYTHONPATH=$PWD python -m tests.faults.sweep --base /work/home-NAME/models/SmolLM2-135M-Instruct.flash \
        --work /tmp/sweep --out docs/faults/sweep.md [--only PATTERN]

The base folder is never written: it is copied once into ``--work`` (``base/``), and every case is a
hard-linked copy of that in which the damaged file is a real copy (damage never reaches a shared
inode). Each case runs in its own process (a hang or a crash is seen as such) through the real entry
points: ``mlx-flash verify``, ``generate`` (auto; gate-first; dense engine; predictor pipelined), the
library's scan and the default-model check (``default_model.prepared_flash``: what the app's first run
decides). A probe is *good* when it answers as the unharmed folder does (same text) or fails with a clear
one-line error (exit code 1, no traceback); *bad* when it prints other text with exit code 0 (silent wrong
output), raises past the CLI (traceback), crashes or hangs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

PROMPT = "The capital of France is"
GEN = ["--prompt", PROMPT, "--raw", "--max-tokens", "6", "--quiet"]
PROBES = {
    "verify": [],
    "gen": [],
    "gate": ["--active", "gate"],
    "dense": ["--engine", "dense"],
}
NAME = "SmolLM2-135M-Instruct.flash"  # the default model's folder name: prepared_flash looks at it
MOE_MANIFEST = "moe_manifest.json"  # a mixture-of-experts flash folder (mlx_flash.moe.format)

Mutation = Callable[[Path], None]
PROBE_CACHE = Path(os.environ.get("MLX_FLASH_HOME", "/nonexistent")) / "probe.json"


# --------------------------------------------------------------------------- damage
def _flip(path: Path, offset: int) -> None:
    size = path.stat().st_size
    offset = offset % size
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(max(0, size))


def _st_header(path: Path) -> Tuple[int, dict]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


def _st_offset(path: Path, key: str) -> int:
    n, h = _st_header(path)
    return 8 + n + h[key]["data_offsets"][0]


def _manifest_name(folder: Path) -> str:
    return "manifest.json" if (folder / "manifest.json").exists() or not (folder / MOE_MANIFEST).exists() \
        else MOE_MANIFEST


def _manifest(folder: Path) -> dict:
    return json.loads((folder / _manifest_name(folder)).read_text())


def _save_manifest(folder: Path, m: dict) -> None:
    (folder / _manifest_name(folder)).write_text(json.dumps(m, indent=2))


def _edit(fn: Callable[[dict], None]) -> Mutation:
    def mutate(folder: Path) -> None:
        m = _manifest(folder)
        fn(m)
        _save_manifest(folder, m)
    return mutate


def _file_cases(name: str) -> List[Tuple[str, str, Mutation]]:
    """(case, class, mutation) of the generic damage to one file of the folder."""

    def p(folder: Path) -> Path:
        return folder / name

    def to_dir(folder: Path) -> None:
        p(folder).unlink()
        p(folder).mkdir()
        (p(folder) / "x").write_text("x")

    out: List[Tuple[str, str, Mutation]] = [
        ("missing", "missing file", lambda f: p(f).unlink()),
        ("empty", "empty file", lambda f: _truncate(p(f), 0)),
        ("dir", "a folder in its place", to_dir),
        ("trunc-8", "truncation", lambda f: _truncate(p(f), 8)),
        ("trunc-half", "truncation", lambda f: _truncate(p(f), p(f).stat().st_size // 2)),
        ("trunc-1", "truncation", lambda f: _truncate(p(f), p(f).stat().st_size - 1)),
        ("extend", "extra bytes", lambda f: p(f).open("ab").write(b"\0" * 4096)),
        ("flip-0", "bit flip (header)", lambda f: _flip(p(f), 0)),
        ("flip-mid", "bit flip (data)", lambda f: _flip(p(f), p(f).stat().st_size // 2 + 3)),
        ("flip-last", "bit flip (data)", lambda f: _flip(p(f), -1)),
    ]
    if name.endswith(".json") and name not in ("manifest.json", MOE_MANIFEST, "tokenizer.json"):  # small side files
        out = [c for c in out if c[0] in ("missing", "empty", "dir", "trunc-half", "flip-mid")]
    if name.endswith(".safetensors"):
        out += [
            ("flip-hdr-json", "bit flip (header)", lambda f: _flip(p(f), 8 + _st_header(p(f))[0] // 2)),
            ("trunc-hdr", "truncation", lambda f: _truncate(p(f), 8 + _st_header(p(f))[0] // 2)),
            ("flip-data0", "bit flip (data)", lambda f: _flip(p(f), 8 + _st_header(p(f))[0] + 1)),
        ]
    if name == "dense.safetensors":
        out += [("flip-groupscale", "bit flip (data)",
                 lambda f: _flip(p(f), _st_offset(p(f), "flash_ffn_groups.7.down.scales") + 101))]
    if name == "experts.bin":
        out += [
            ("flip-layer0", "bit flip (data)", lambda f: _flip(p(f), 5)),
            ("flip-last-layer", "bit flip (data)", lambda f: _flip(p(f), _layer_end(f, name, -1) - 1)),
            ("trunc-last-layer", "truncation", lambda f: _truncate(p(f), _layer_end(f, name, -1) - 4096)),
        ]
    if name in ("ffn.bin", "ffn_updown.bin"):
        out += [
            ("flip-layer0", "bit flip (data)", lambda f: _flip(p(f), 5)),
            ("flip-layer29-end", "bit flip (data)", lambda f: _flip(p(f), _layer_end(f, name, 29) - 1)),
            ("flip-padding", "bit flip (padding)", lambda f: _flip(p(f), _layer_end(f, name, 0) + 7)),
            ("trunc-layer29", "truncation", lambda f: _truncate(p(f), _layer_end(f, name, 29) - 4096)),
        ]
    return out


def _layer_end(folder: Path, name: str, layer: int) -> int:
    m = _manifest(folder)
    layers = m["updown"]["layers"] if name == "ffn_updown.bin" else m["layers"]
    return int(layers[layer]["offset"]) + int(layers[layer]["size"])


def _wrong_type(v):
    if isinstance(v, bool):
        return "yes"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return 7
    if isinstance(v, list):
        return {"0": v[:1]}
    if isinstance(v, dict):
        return list(v)[:2]
    return 5


def _perm_edit(fn: Callable[[list], None]) -> Mutation:
    """Edit layer 0's neuron permutation (decoded to a list)."""
    def edit(m: dict) -> None:
        o = m["neuron_order"]
        row = list(struct.unpack(f"<{len(base64.b64decode(o['layers'][0])) // 2}H", base64.b64decode(o["layers"][0])))
        fn(row)
        o["layers"][0] = base64.b64encode(struct.pack(f"<{len(row)}H", *row)).decode()
    return _edit(edit)


def _set(path: str, value) -> Mutation:
    """Set (``value`` not ``...``) or remove (``...``) a manifest field (``a/b/0``: keys and list indices)."""
    def edit(m: dict) -> None:
        keys = path.split("/")
        d = m
        for k in keys[:-1]:
            d = d[int(k)] if isinstance(d, list) else d[k]
        last = keys[-1]
        if value is ...:
            del d[last]
        elif isinstance(d, list):
            d[int(last)] = value(d[int(last)]) if callable(value) else value
        else:
            d[last] = value(d[last]) if callable(value) else value
    return _edit(edit)


def _rewrite_st(name: str, fn: Callable[[dict], None]) -> Mutation:
    """Rewrite a safetensors file with ``fn`` applied to its arrays, and its manifest checksum updated:
    a wrong array that a checksum does not catch (a faulty writer)."""
    def mutate(folder: Path) -> None:
        import mlx.core as mx  # noqa: PLC0415 - only the cases that rewrite arrays need MLX here

        from mlx_flash.storage.format import file_checksum  # noqa: PLC0415

        arrays, meta = mx.load(str(folder / name), return_metadata=True)
        arrays = dict(arrays)
        fn(arrays)
        (folder / name).unlink()
        mx.save_safetensors(str(folder / name), arrays, metadata=meta)
        m = _manifest(folder)
        m["checksums"][name] = file_checksum(folder / name)
        _save_manifest(folder, m)
    return mutate


def _np_edit(key: str, fn) -> Callable[[dict], None]:
    def edit(arrays: dict) -> None:
        import mlx.core as mx  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415

        a = np.array(arrays[key].astype(mx.float32))
        arrays[key] = mx.array(fn(a)).astype(arrays[key].dtype)
    return edit


def cases(base: Path) -> List[Tuple[str, str, Mutation]]:
    out: List[Tuple[str, str, Mutation]] = []
    for p in sorted(base.iterdir()):
        out += [(f"{p.name}:{c}", k, fn) for c, k, fn in _file_cases(p.name)]
    m = _manifest(base)
    for key, v in m.items():
        if key == "layers":
            out.append(("manifest:layers.0.checksum", "manifest value wrong", _set(
                "layers/0/checksum", lambda v: ("0" if v[0] != "0" else "1") + v[1:])))
        out.append((f"manifest:-{key}", "manifest field removed", _set(key, ...)))
        if key in ("format_version", "layers", "predictors", "neuron_order", "quantization", "updown", "checksums"):
            out.append((f"manifest:{key}->{key}_old", "manifest field renamed",
                        _edit(lambda d, k=key: d.__setitem__(f"{k}_old", d.pop(k)))))
        out.append((f"manifest:{key}:type", "manifest field wrong type", _set(key, _wrong_type(v))))
    if _manifest_name(base) == MOE_MANIFEST:
        return out
    out += [
        ("manifest:not-json-object", "manifest field wrong type", lambda f: (f / "manifest.json").write_text("[]")),
        ("manifest:NaN", "manifest field wrong type", _set("hidden_size", float("nan"))),
        ("manifest:format_version=4", "format version", _set("format_version", 4)),
        ("manifest:format_version=2", "format version", _set("format_version", 2)),
        ("manifest:format_version=1", "format version", _set("format_version", 1)),
        ("manifest:format_version=0", "format version", _set("format_version", 0)),
        ("perm:duplicate", "permutation not a permutation", _perm_edit(lambda r: r.__setitem__(1, r[0]))),
        ("perm:short", "permutation not a permutation", _perm_edit(lambda r: r.pop())),
        ("perm:out-of-range", "permutation not a permutation", _perm_edit(lambda r: r.__setitem__(0, 60000))),
        ("perm:swap", "permutation swapped (a valid other order)", _perm_edit(lambda r: r.__setitem__(
            slice(0, 2), [r[1], r[0]]))),
        ("perm:bad-base64", "permutation not a permutation", _set("neuron_order/layers/0", "@@@")),
        ("perm:dtype", "permutation not a permutation", _set("neuron_order/dtype", "<u8")),
        ("perm:version", "format version", _set("neuron_order/version", 2)),
        ("perm:layers-short", "permutation not a permutation", _set("neuron_order/layers", lambda v: v[:-1])),
        ("perm:layers-type", "manifest field wrong type", _set("neuron_order/layers", {"0": 1})),
        ("layers:checksum", "manifest value wrong", _set("layers/3/checksum", lambda v: ("0" if v[0] != "0" else "1")
                                                         + v[1:])),
        ("layers:offset+1", "manifest value wrong", _set("layers/3/offset", lambda v: v + 1)),
        ("layers:offset+4096", "manifest value wrong", _set("layers/3/offset", lambda v: v + 4096)),
        ("layers:size-1008", "manifest value wrong", _set("layers/3/size", lambda v: v - 1008)),
        ("layers:-checksum", "manifest field removed", _set("layers/3/checksum", ...)),
        ("layers:one-less", "manifest value wrong", _set("layers", lambda v: v[:-1])),
        ("quant:-axis", "manifest field removed", _set("quantization/down/axis", ...)),
        ("quant:down-bits8", "manifest value wrong", _set("quantization/down/bits", 8)),
        ("quant:down-gs64", "manifest value wrong", _set("quantization/down/group_size", 64)),
        ("quant:gate-bits8", "manifest value wrong", _set("quantization/gate/bits", 8)),
        ("quant:gate-gs-str", "manifest field wrong type", _set("quantization/gate/group_size", "32")),
        ("quant:down-none", "manifest value wrong", _set("quantization/down", "none")),
        ("quant:-down", "manifest field removed", _set("quantization/down", ...)),
        ("pred:-cutoffs", "manifest field removed", _set("predictors/cutoffs", ...)),
        ("pred:cutoffs-short", "manifest value wrong", _set("predictors/cutoffs/0.99", lambda v: v[:-1])),
        ("pred:cutoffs-str", "manifest field wrong type", _set("predictors/cutoffs/0.99",
                                                                      lambda v: [str(x) for x in v])),
        ("pred:cutoffs-type", "manifest field wrong type", _set("predictors/cutoffs", [0.5])),
        ("pred:id", "manifest value wrong", _set("predictors/id", "0" * 32)),
        ("pred:rank16", "manifest value wrong", _set("predictors/rank", 16)),
        ("pred:rank-str", "manifest field wrong type", _set("predictors/rank", "32")),
        ("pred:-thresholds", "manifest field removed", _set("predictors/thresholds", ...)),
        ("pred:thresholds-short", "manifest value wrong", _set("predictors/thresholds", lambda v: v[:-1])),
        ("pred:thresholds-str", "manifest field wrong type", _set("predictors/thresholds", "x")),
        ("pred:file-escape", "manifest value wrong", _set("predictors/file", "../ffn.bin")),
        ("pred:-file", "manifest field removed", _set("predictors/file", ...)),
        ("pred:recall-str", "manifest field wrong type", _set("predictors/recall", "high")),
        ("pred:recall-absent", "manifest value wrong", _set("predictors/recall", 0.42)),
        ("pred:-gate_first", "manifest field removed", _set("predictors/gate_first", ...)),
        ("pred:gate_first-type", "manifest field wrong type", _set("predictors/gate_first", "x")),
        ("pred:gate_first-thr-short", "manifest value wrong",
         _set("predictors/gate_first", lambda g: {k: (v[:-1] if isinstance(v, list) else v) for k, v in g.items()})),
        ("pred:gate_first-thr-str", "manifest field wrong type",
         _set("predictors/gate_first", lambda g: {k: ("x" if isinstance(v, (list, float)) else v)
                                                  for k, v in g.items()})),
        ("pred:-held_out", "manifest field removed", _set("predictors/held_out", ...)),
        ("pred:held_out-type", "manifest field wrong type", _set("predictors/held_out", {"0.99": "x"})),
        ("pred:sparsity-str", "manifest field wrong type", _set("predictors/sparsity", "x")),
        ("pred:dtype-bogus", "manifest value wrong", _set("predictors/dtype", "int8")),
        ("updown:-drop", "manifest field removed", _set("updown/drop", ...)),
        ("updown:drop-wrong", "manifest value wrong", _set("updown/drop", ["up"])),
        ("updown:layer-checksum", "manifest value wrong",
         _set("updown/layers/2/checksum", lambda v: ("0" if v[0] != "0" else "1") + v[1:])),
        ("updown:source-stale", "manifest value wrong",
         _set("updown/source_checksums/0", lambda v: ("0" if v[0] != "0" else "1") + v[1:])),
        ("updown:bundle_bytes", "manifest value wrong", _set("updown/bundle_bytes", 649)),
        ("updown:size", "manifest value wrong", _set("updown/size", lambda v: v + 4096)),
        ("updown:file-escape", "manifest value wrong", _set("updown/file", "../x.bin")),
        ("updown:offset+4096", "manifest value wrong", _set("updown/layers/2/offset", lambda v: v + 4096)),
        ("updown:layers-type", "manifest field wrong type", _set("updown/layers", "x")),
        ("checksums:dense", "manifest value wrong",
         _set("checksums/dense.safetensors", lambda v: ("0" if v[0] != "0" else "1") + v[1:])),
        ("checksums:-predictors", "manifest field removed", _set("checksums/predictors.safetensors", ...)),
        ("args:vocab_size", "manifest value wrong", _set("model_args/vocab_size", 1000)),
        ("args:heads", "manifest value wrong", _set("model_args/num_attention_heads", 8)),
        ("args:hidden_size", "manifest value wrong", _set("model_args/hidden_size", 512)),
        ("args:layers", "manifest value wrong", _set("model_args/num_hidden_layers", 29)),
        ("args:eps-str", "manifest field wrong type", _set("model_args/rms_norm_eps", "x")),
        ("args:eos-str", "manifest field wrong type", _set("model_args/eos_token_id", "x")),
        ("args:model_type", "manifest value wrong", _set("model_args/model_type", "gpt2")),
        ("args:hidden_act", "manifest value wrong", _set("model_args/hidden_act", "tanh")),
        ("args:-quantization", "manifest field removed", _set("model_args/quantization", ...)),
        ("args:quant-bits8", "manifest value wrong", _set("model_args/quantization/bits", 8)),
        ("args:rope_scaling", "manifest field wrong type", _set("model_args/rope_scaling", "x")),
        ("args:max_pos-str", "manifest field wrong type", _set("model_args/max_position_embeddings", "x")),
        ("densequant:bits8", "manifest value wrong", _set("dense_quantization/bits", 8)),
        ("pred-arr:freq-short", "wrong-length array", _rewrite_st("predictors.safetensors", lambda a: a.__setitem__(
            "frequencies", a["frequencies"][:, :-1]))),
        ("pred-arr:gate_scales-short", "wrong-length array", _rewrite_st(
            "predictors.safetensors", lambda a: a.__setitem__("gate_scales", a["gate_scales"][:-1]))),
        ("pred-arr:-gate_scales", "wrong-length array", _rewrite_st(
            "predictors.safetensors", lambda a: a.pop("gate_scales"))),
        ("pred-arr:-frequencies", "wrong-length array", _rewrite_st(
            "predictors.safetensors", lambda a: a.pop("frequencies"))),
        ("pred-arr:b-short", "wrong-length array", _rewrite_st(
            "predictors.safetensors", lambda a: a.__setitem__("layers.3.b", a["layers.3.b"][:-1]))),
        ("pred-arr:A-int", "wrong-length array", _rewrite_st(
            "predictors.safetensors", lambda a: a.__setitem__("layers.3.A", a["layers.3.A"].astype(_mx_int())))),
        ("pred-arr:freq-nan", "non-finite values", _rewrite_st(
            "predictors.safetensors", _np_edit("frequencies", lambda x: x * float("nan")))),
        ("pred-arr:gate_scales-nan", "non-finite values", _rewrite_st(
            "predictors.safetensors", _np_edit("gate_scales", lambda x: x * float("nan")))),
        ("pred-arr:gate_scales-neg", "non-finite values", _rewrite_st(
            "predictors.safetensors", _np_edit("gate_scales", lambda x: -x))),
        ("pred-arr:A-nan", "non-finite values", _rewrite_st(
            "predictors.safetensors", _np_edit("layers.5.A", lambda x: x * float("nan")))),
        ("dense-arr:groups-short", "wrong-length array", _rewrite_st(
            "dense.safetensors", lambda a: a.__setitem__("flash_ffn_groups.4.down.scales",
                                                         a["flash_ffn_groups.4.down.scales"][:-1]))),
        ("dense-arr:-groups", "wrong-length array", _rewrite_st(
            "dense.safetensors", lambda a: a.pop("flash_ffn_groups.4.down.biases"))),
        ("dense-arr:groups-f32", "wrong-length array", _rewrite_st(
            "dense.safetensors", lambda a: a.__setitem__("flash_ffn_groups.4.down.scales",
                                                         a["flash_ffn_groups.4.down.scales"].astype(_mx_f32())))),
        ("dense-arr:-q_proj", "wrong-length array", _rewrite_st(
            "dense.safetensors", lambda a: a.pop("model.layers.2.self_attn.q_proj.weight"))),
        ("dense-arr:q_proj-short", "wrong-length array", _rewrite_st(
            "dense.safetensors", lambda a: a.__setitem__("model.layers.2.self_attn.q_proj.scales",
                                                         a["model.layers.2.self_attn.q_proj.scales"][:-1]))),
        ("dense-arr:norm-nan", "non-finite values", _rewrite_st(
            "dense.safetensors", _np_edit("model.layers.2.input_layernorm.weight", lambda x: x * float("nan")))),
    ]
    return out


def _mx_int():
    import mlx.core as mx  # noqa: PLC0415
    return mx.int32


def _mx_f32():
    import mlx.core as mx  # noqa: PLC0415
    return mx.float32


def permission_cases(base: Path) -> List[Tuple[str, str, Mutation]]:
    """Unreadable files and folders, a read-only model folder and data folder (probes run as ``nobody``)."""
    out: List[Tuple[str, str, Mutation]] = [
        (f"{p.name}:chmod000", "unreadable (permissions)", lambda f, n=p.name: (f / n).chmod(0))
        for p in sorted(base.iterdir())]
    out += [
        ("folder:chmod000", "unreadable (permissions)", lambda f: f.chmod(0)),
        ("folder:chmod111", "unreadable (permissions)", lambda f: f.chmod(0o111)),
        ("folder:read-only", "read-only folder", lambda f: f.chmod(0o555)),
        ("home:read-only", "read-only folder", lambda f: _chown_tree(f.parent.parent, 0)),
    ]
    return out


def _chown_tree(root: Path, uid: int) -> None:
    for p in [root, *root.rglob("*")]:
        os.chown(p, uid, uid, follow_symlinks=False)


# --------------------------------------------------------------------------- one case (child process)
def probe(folder: Path) -> Dict[str, dict]:
    """Run every probe on ``folder`` in this process; {probe: {rc, out, err, tb}}."""
    from mlx_flash import default_model, library  # noqa: PLC0415
    from mlx_flash.cli import main  # noqa: PLC0415

    res: Dict[str, dict] = {}

    def run(name: str, fn: Callable[[], object]) -> None:
        os.write(1, f"START {name}\n".encode())
        out, err = io.StringIO(), io.StringIO()
        tb = ""
        rc = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = fn()
            except BaseException:  # a probe's escape is what we look for
                tb = traceback.format_exc()
        res[name] = {"rc": rc, "out": out.getvalue(), "err": err.getvalue()[-2000:], "tb": tb[-3000:]}

    for name, extra in PROBES.items():
        args = ["verify", str(folder)] if name == "verify" else ["generate", "-m", str(folder), *GEN, *extra]
        run(name, lambda a=args: main(a))

    def scan():
        good, broken = library.scan_library(folder.parent)
        return 0 if good else 1 if broken else 2
    run("scan", scan)
    run("prepared", lambda: 0 if default_model.prepared_flash() is not None else 1)
    print(json.dumps(res))
    return res


# --------------------------------------------------------------------------- driver
def _classify(name: str, r: dict, base: dict) -> str:
    if r is None:
        return "CRASH"
    if r["tb"]:
        return "TRACEBACK"
    if name == "scan":
        return "ok" if r["rc"] == 0 else "broken-listed" if r["rc"] == 1 else "MISSING"
    if name == "prepared":
        return "kept" if r["rc"] == 0 else "re-prepare"
    if name == "verify":
        return "ok" if r["rc"] == 0 else "error" if r["rc"] == 1 and r["err"].strip() else "UNCLEAR"
    if r["rc"] == 0:  # other text is silent wrong output unless a new warning said why (e.g. a fallback chooser)
        return "same" if r["out"] == base["out"] else "warned" if _new_warnings(r["err"], base.get("err", "")) \
            else "WRONG"
    last = r["err"].strip().splitlines()[-1:] or [""]
    return "error" if r["rc"] == 1 and last[0].startswith("error:") else "UNCLEAR"


def _link_copy(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        os.link(p, dst / p.name)


def _unshare(folder: Path) -> None:
    """Give every file its own inode (a mutation may write any file in place)."""
    for p in folder.iterdir():
        if p.is_file() and p.stat().st_nlink > 1:
            tmp = p.with_name(p.name + ".unshare")
            shutil.copy2(p, tmp)
            os.replace(tmp, p)


def run_case(work: Path, base: Path, name: str, mutate: Mutation, timeout: float,
             as_user: Optional[int] = None) -> Tuple[Dict[str, dict], float]:
    case = work / "case"
    work.mkdir(parents=True, exist_ok=True)
    if case.exists():
        for p in case.rglob("*"):
            with contextlib.suppress(OSError):
                p.chmod(0o700)
        shutil.rmtree(case)
    folder = case / "models" / (NAME if (base / "manifest.json").exists() else base.name)
    _link_copy(base, folder)
    _unshare(folder)  # cheap enough (130 MB) and safe against in-place writes anywhere
    if PROBE_CACHE.is_file():  # the disk probe's result: no probe run per case
        shutil.copy(PROBE_CACHE, case / PROBE_CACHE.name)
    try:
        if as_user is None:
            mutate(folder)
    except (KeyError, IndexError, TypeError, ValueError):  # the damage does not apply to this folder
        return {"_skip": {}}, 0.0
    env = dict(os.environ, MLX_FLASH_HOME=str(case), PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, "-m", "tests.faults.sweep", "--probe", str(folder)]
    if as_user is not None:  # permissions mean nothing to root: the probes run as this uid
        if name != "home:read-only":
            _chown_tree(case, as_user)
        mutate(folder)
        env["HOME"] = str(case)
        cmd = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups", *cmd]
    t0 = time.time()
    try:
        cp = subprocess.run(cmd, env=env,
                            capture_output=True, text=True, timeout=timeout)
        lines = cp.stdout.strip().splitlines()
        try:
            res = json.loads(lines[-1])
        except (IndexError, ValueError):
            started = [x[6:] for x in lines if x.startswith("START ")]
            res = {"_crash": {"rc": cp.returncode, "at": started[-1:], "err": cp.stderr[-1500:]}}
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        started = [x[6:] for x in out.splitlines() if x.startswith("START ")]
        res = {"_hang": {"at": started[-1:]}}
    return res, time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base")
    ap.add_argument("--work", default="/tmp/mlx-flash-sweep")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None)
    ap.add_argument("--probe", default=None)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--as-user", type=int, default=None, help="uid: the permission cases, probes run as this user")
    ap.add_argument("--report", nargs="*", default=None, metavar="BEFORE=AFTER",
                    help="write --out from the results of sweeps (work folders: before=after, or one)")
    ap.add_argument("--prefix", default=None, help="only the cases whose names start with one of these (comma list)")
    ap.add_argument("--reverse", action="store_true", help="the cases in reverse order")
    ap.add_argument("--kills", default=None, help="mlx-lm source folder: kill convert / reorder mid-write instead")
    ap.add_argument("--shard", default="0/1", help="i/n: every n-th case from the i-th (parallel runs)")
    a = ap.parse_args(argv)
    if a.probe:
        probe(Path(a.probe))
        return 0
    if a.report is not None:
        Path(a.out).write_text(report(a.report))
        return 0
    work = Path(a.work)
    if a.kills:
        kill_sweep(Path(a.kills), Path(a.base), work, [1, 3, 5, 8, 12])
        return 0
    base = work / "base" / Path(a.base).name
    if not base.exists():
        work.mkdir(parents=True, exist_ok=True)
        shutil.copytree(a.base, base)
    todo = [("baseline", "none", lambda f: None)] + (permission_cases(base) if a.as_user is not None else cases(base))
    done = {json.loads(x)["case"] for r in work.glob("shard*/results.jsonl") for x in r.read_text().splitlines()}
    todo = todo[:1] + [c for c in todo[1:] if c[0] not in done]  # a sweep that was stopped goes on
    if a.reverse:
        todo = todo[:1] + todo[1:][::-1]
    if a.only:
        todo = [c for c in todo if a.only in c[0] or c[0] == "baseline"]
    if a.prefix:
        todo = todo[:1] + [c for c in todo[1:] if c[0].startswith(tuple(a.prefix.split(",")))]
    i, n = map(int, a.shard.split("/"))
    todo = todo[:1] + todo[1:][i::n]
    results = []
    work = work / f"shard{i}"
    jsonl = work / "results.jsonl"
    baseline: Dict[str, dict] = {}
    for name, klass, mutate in todo:
        res, secs = run_case(work, base, name, mutate, a.timeout, a.as_user)
        if name == "baseline":
            baseline = res
        if "_skip" in res:
            continue
        verdict = {p: ("HANG" if "_hang" in res else "CRASH" if "_crash" in res
                       else _classify(p, res.get(p), baseline.get(p, {}))) for p in [*PROBES, "scan", "prepared"]}
        row = {"case": name, "class": klass, "verdict": verdict, "secs": round(secs, 1),
               "detail": {p: (r.get("tb") or r.get("err", ""))[-600:] for p, r in res.items()
                          if isinstance(r, dict) and p in verdict and verdict[p] in ("TRACEBACK", "UNCLEAR", "WRONG")}
               | ({"_": res} if "_hang" in res or "_crash" in res else {})}
        results.append(row)
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        bad = [p for p, v in verdict.items() if v.isupper()]
        print(f"{name:40s} {klass:32s} {' '.join(f'{p}={v}' for p, v in verdict.items())} "
              f"{'BAD' if bad else 'good'} ({secs:.0f}s)", flush=True)
    return 0



# --------------------------------------------------------------------------- kills mid-write
KILLS = {  # command (after ``mlx-flash``) -> what it writes; {src}/{dst}/{flash} filled in
    "convert": ["convert", "{src}", "{dst}"],
    "reorder": ["reorder", "{flash}", "--order", "source"],
}


def kill_sweep(src: Path, flash: Path, work: Path, delays: List[float]) -> List[dict]:
    """Kill (SIGKILL) a convert / a reorder after each of ``delays`` seconds; then the library is scanned, the
    destination checked (absent, or whole: ``verify``) and the folder loaded once."""
    rows = []
    for what, argv in KILLS.items():
        for delay in delays:
            home = work / f"kill-{what}-{delay}"
            if home.exists():
                shutil.rmtree(home)
            (home / "models").mkdir(parents=True)
            if PROBE_CACHE.is_file():
                shutil.copy(PROBE_CACHE, home / PROBE_CACHE.name)
            dst = home / "models" / "out.flash"
            target = home / "models" / flash.name
            if what == "reorder":
                shutil.copytree(flash, target)
            args = [x.format(src=src, dst=dst, flash=target) for x in argv]
            env = dict(os.environ, MLX_FLASH_HOME=str(home))
            proc = subprocess.Popen([sys.executable, "-m", "mlx_flash.cli", *args], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            proc.kill()
            rc = proc.wait()
            out = dst if what == "convert" else target
            check = subprocess.run([sys.executable, "-c", _AFTER_KILL, str(out)], env=env, capture_output=True,
                                   text=True, timeout=300)
            verdict = check.stdout.strip().splitlines()[-1:] or [f"CHECK FAILED: {check.stderr[-300:]}"]
            rows.append({"case": f"kill {what} after {delay}s", "killed": rc < 0, "verdict": verdict[0]})
            print(rows[-1], flush=True)
    return rows


_AFTER_KILL = """
import sys
from pathlib import Path
from mlx_flash import library
from mlx_flash.cli import main
out = Path(sys.argv[1])
good, broken = library.scan_library(out.parent)
left = sorted(p.name for p in out.parent.iterdir() if p.name.startswith('.') and not p.name.endswith('.lock'))
if broken:
    print('BAD: broken entry', broken[0].reason)
elif left:
    print('BAD: temporaries left', left)
elif not out.exists():
    print('good: nothing published')
else:
    rc = main(['verify', str(out)])
    print('good: whole and verified' if rc == 0 else 'BAD: published but corrupt')
"""


# --------------------------------------------------------------------------- report
def _load_results(work: Path) -> Dict[str, dict]:
    out: Dict[str, dict] = {}
    for f in sorted(work.glob("shard*/results.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if r["case"] != "baseline":
                out[r["case"]] = _reclassify(r)
    return out


def _bad(r: dict) -> bool:
    return any(v.isupper() for v in r["verdict"].values())


def _new_warnings(err: str, base_err: str) -> List[str]:
    """The warning lines of ``err`` that the unharmed folder's run did not print."""
    seen = {x for x in base_err.splitlines() if "warning:" in x} | set(BASE_WARNINGS)
    return [x for x in err.splitlines() if "warning:" in x and x not in seen]


BASE_WARNINGS = ("[mlx-flash] warning: gate-first reads ffn_updown.bin (up/down rows only)",)
"""What the unharmed default model prints on every gate-first run (sweeps that stored no baseline text)."""


def _reclassify(r: dict) -> dict:
    """Results of sweeps before "warned" existed: other text after a new printed warning is not silent."""
    for p, v in r["verdict"].items():
        if v == "WRONG" and _new_warnings(r["detail"].get(p, ""), ""):
            r["verdict"][p] = "warned"
    return r


def report(pairs: List[str]) -> str:
    """Markdown: per folder and fault class, cases tried, good/bad before and (re-run) after; then the bad cases."""
    lines = ["| folder | fault class | cases | bad before | bad after (re-run) |", "|---|---|---|---|---|"]
    details = []
    for pair in pairs:
        before_dir, _, after_dir = pair.partition("=")
        before = _load_results(Path(before_dir))
        after = _load_results(Path(after_dir)) if after_dir else {}
        by_class: Dict[str, List[str]] = {}
        for name, r in before.items():
            by_class.setdefault(r["class"], []).append(name)
        for klass, names in sorted(by_class.items()):
            bad = [n for n in names if _bad(before[n])]
            rerun = [n for n in bad if n in after]
            still = [n for n in rerun if _bad(after[n])]
            after_s = f"{len(still)} of {len(rerun)} re-run" if rerun else ("–" if not bad else "not re-run")
            lines.append(f"| {Path(before_dir).name} | {klass} | {len(names)} | {len(bad)} | {after_s} |")
            for n in bad:
                v = " ".join(f"{p}={x}" for p, x in before[n]["verdict"].items() if x.isupper())
                a = (" ".join(f"{p}={x}" for p, x in after[n]["verdict"].items() if p in before[n]["verdict"]
                              and before[n]["verdict"][p].isupper()) if n in after else "not re-run")
                details.append(f"| {n} | {v} | {a} |")
    return "\n".join(lines + ["", "| bad case | before | after |", "|---|---|---|", *details]) + "\n"


if __name__ == "__main__":
    sys.exit(main())
