"""The flash folder format: conversion round trip, validation errors, cleanup."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs

from mlx_flash.progress import Cancelled
from mlx_flash.storage.format import (
    ALIGNMENT,
    FORMAT_VERSION,
    MANIFEST_CHECKSUM,
    FlashFormatError,
    Manifest,
    bundle_view,
    convert_to_flash,
    load_dense_weights,
    manifest_digest,
    open_flash,
    read_layer_weights,
    signed,
    verify_checksums,
)
from tests.tiny import make_tiny_llama

# ffn=100: a layer is 100 bundles, not a multiple of 4096 bytes, so padding is exercised.
TINY = dict(layers=3, hidden=64, ffn=100, heads=4, kv_heads=2, vocab=256)
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _u(a: mx.array) -> np.ndarray:
    """An mx array's raw bits as numpy (bfloat16 → uint16)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One source model and its flash conversion per dtype."""
    root = tmp_path_factory.mktemp("fmt")
    out = {}
    for dt in ("float16", "bfloat16", "float32"):
        src = make_tiny_llama(root / f"src-{dt}", dtype=dt, seed=1, **TINY)
        out[dt] = (src, convert_to_flash(src, root / f"{dt}.flash"))
    return out


@pytest.fixture()
def flash_copy(models, tmp_path):
    """A private copy of the float16 flash folder, free to damage."""
    dst = tmp_path / "copy.flash"
    shutil.copytree(models["float16"][1], dst)
    return dst


def _edit_manifest(folder: Path, **changes) -> None:
    p = folder / "manifest.json"
    d = json.loads(p.read_text())
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    p.write_text(json.dumps(signed(d)))  # consistent with its own checksum: a writer's mistake


_DROP = object()


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dt", ["float16", "bfloat16", "float32"])
def test_bundles_reproduce_source_weights_exactly(models, dt):
    src, dst = models[dt]
    files = open_flash(dst)
    m = files.manifest
    w = mx.load(str(src / "model.safetensors"))
    h, n = TINY["hidden"], TINY["ffn"]
    item = {"float16": 2, "bfloat16": 2, "float32": 4}[dt]
    assert (m.dtype, m.hidden_size, m.intermediate_size, m.num_layers) == (dt, h, n, TINY["layers"])
    assert m.bundle_parts == ["gate", "up", "down"]
    assert m.bundle_elems == 3 * h and m.bundle_bytes == 3 * h * item
    assert m.architecture == "llama" and m.format_version == 2  # version 3 only for the exact down layout
    assert m.model_args == json.loads((src / "config.json").read_text())
    raw = np.fromfile(files.ffn_path, dtype=np.uint8)
    assert raw.size == m.ffn_size and m.ffn_size % ALIGNMENT == 0
    assert m.ffn_bytes_total == TINY["layers"] * n * m.bundle_bytes
    prev_end = 0
    for i, e in enumerate(m.layers):
        assert e.offset % ALIGNMENT == 0 and e.offset >= prev_end
        assert not raw[prev_end : e.offset].any(), "padding must be zeros"
        prev_end = e.offset + e.size
        g, u, d = (_u(w[f"model.layers.{i}.{k}.weight"]) for k in MLP)
        expect = np.concatenate([g, u, d.T], axis=1)  # row i = neuron i's bundle
        got = raw[e.offset : e.offset + e.size].view(expect.dtype).reshape(n, 3 * h)
        np.testing.assert_array_equal(got, expect)
        # neuron_offset agrees with the layout
        j = 37
        o = m.neuron_offset(i, j)
        assert raw[o : o + m.bundle_bytes].tobytes() == expect[j].tobytes()
        # read_layer_weights gives the source tensors back
        rg, ru, rd = read_layer_weights(files, i)
        for got_w, key in zip((rg, ru, rd), MLP):
            src_w = w[f"model.layers.{i}.{key}.weight"]
            assert got_w.dtype == src_w.dtype and got_w.shape == src_w.shape
            assert mx.array_equal(got_w, src_w).item()
    assert not raw[prev_end:].any()
    verify_checksums(files)


@pytest.mark.parametrize("dt", ["float16", "bfloat16", "float32"])
def test_dense_part_and_copied_files(models, dt):
    src, dst = models[dt]
    files = open_flash(dst)
    dense = load_dense_weights(files)
    w = mx.load(str(src / "model.safetensors"))
    assert not [k for k in dense if ".mlp." in k]
    assert set(dense) == {k for k in w if ".mlp." not in k}
    for k, v in dense.items():
        assert v.dtype == w[k].dtype and mx.array_equal(v, w[k]).item(), k
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    assert not (dst / "model.safetensors").exists()
    assert not list(dst.parent.glob(".*tmp-*"))


def test_flash_model_computes_like_source(models):
    """Dense weights + read_layer_weights rebuild the source model exactly."""
    src, dst = models["float32"]
    files = open_flash(dst)
    ref, _ = mlx_lm.load(str(src))
    model = Model(ModelArgs.from_dict(files.manifest.model_args))
    weights = load_dense_weights(files)
    for i in range(files.manifest.num_layers):
        for key, t in zip(MLP, read_layer_weights(files, i)):
            weights[f"model.layers.{i}.{key}.weight"] = t
    model.load_weights(list(weights.items()), strict=True)
    x = mx.array([[1, 5, 9, 200, 33]])
    assert mx.array_equal(model(x), ref(x)).item()


def test_convert_to_other_dtype(models, tmp_path):
    src, _ = models["float32"]
    dst = convert_to_flash(src, tmp_path / "bf.flash", dtype="bfloat16")
    files = open_flash(dst)
    assert files.manifest.dtype == "bfloat16" and files.manifest.bundle_bytes == 3 * 64 * 2
    w = mx.load(str(src / "model.safetensors"))
    g, u, d = read_layer_weights(files, 2)
    assert mx.array_equal(d, w["model.layers.2.mlp.down_proj.weight"].astype(mx.bfloat16)).item()
    assert all(v.dtype == mx.bfloat16 for v in load_dense_weights(files).values())


def test_bundle_view(models):
    _, dst = models["bfloat16"]
    files = open_flash(dst)
    m = files.manifest
    off = m.neuron_offset(1, 10)
    raw = np.fromfile(files.ffn_path, dtype=np.uint8, count=5 * m.bundle_bytes, offset=off).reshape(5, -1)
    b = bundle_view(raw, m)
    assert b.shape == (5, m.bundle_elems) and b.dtype == mx.bfloat16
    g, u, d = read_layer_weights(files, 1)
    h = m.hidden_size
    assert mx.array_equal(b[:, :h], g[10:15]).item()
    assert mx.array_equal(b[:, h : 2 * h], u[10:15]).item()
    assert mx.array_equal(b[:, 2 * h :], d[:, 10:15].T).item()
    with pytest.raises(ValueError):
        bundle_view(raw.reshape(-1)[:-1], m)


def test_sharded_source_gives_same_flash(models, tmp_path):
    src, ref_dst = models["float16"]
    shard_src = tmp_path / "sharded"
    shutil.copytree(src, shard_src)
    w = mx.load(str(shard_src / "model.safetensors"))
    (shard_src / "model.safetensors").unlink()
    keys = sorted(w)
    mx.save_safetensors(str(shard_src / "model-00001-of-00002.safetensors"), {k: w[k] for k in keys[::2]})
    mx.save_safetensors(str(shard_src / "model-00002-of-00002.safetensors"), {k: w[k] for k in keys[1::2]})
    (shard_src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    dst = convert_to_flash(shard_src, tmp_path / "s.flash")
    assert (dst / "ffn.bin").read_bytes() == (ref_dst / "ffn.bin").read_bytes()
    assert not (dst / "model.safetensors.index.json").exists()
    m1, m2 = Manifest.load(dst), Manifest.load(ref_dst)
    assert [e.checksum for e in m1.layers] == [e.checksum for e in m2.layers]


def test_quantized_source(tmp_path):
    src = make_tiny_llama(tmp_path / "src", layers=2, hidden=64, ffn=128, dtype="float16")
    model, _ = mlx_lm.load(str(src))
    nn.quantize(model, group_size=32, bits=4)
    qw = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(src / "model.safetensors"), qw)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization"] = {"group_size": 32, "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    mlx_lm.load(str(src))  # a valid mlx-lm quantized folder

    files = open_flash(convert_to_flash(src, tmp_path / "q.flash"))
    m = files.manifest
    assert m.dtype == "float16"
    assert m.dense_quantization == {"group_size": 32, "bits": 4}
    assert m.model_args["quantization"] == {"group_size": 32, "bits": 4}
    assert m.format_version == 3 and m.quantized  # the bits stay (tests/test_quantized.py checks them)
    g, u, d = read_layer_weights(files, 1)
    for name, got in (("gate", g), ("down", d)):  # down: the exact layout, the source's own weights
        p = f"model.layers.1.mlp.{name}_proj"
        ref = mx.dequantize(qw[p + ".weight"], qw[p + ".scales"], qw[p + ".biases"], group_size=32, bits=4)
        assert mx.array_equal(got, ref).item(), name
    # the opt-out: float bundles, down dequantized exactly
    fd = open_flash(convert_to_flash(src, tmp_path / "qd.flash", dtype="float16"))
    assert fd.manifest.quantization is None and fd.manifest.dense_quantization == {"group_size": 32, "bits": 4}
    p = "model.layers.1.mlp.down_proj"
    ref = mx.dequantize(qw[p + ".weight"], qw[p + ".scales"], qw[p + ".biases"], group_size=32, bits=4)
    assert mx.array_equal(read_layer_weights(fd, 1)[2], ref).item()
    dense = load_dense_weights(files)
    assert "model.layers.0.self_attn.q_proj.scales" in dense
    assert not [k for k in dense if ".mlp." in k]

    files2 = open_flash(convert_to_flash(src, tmp_path / "q2.flash", dequantize_dense=True, dtype="float32"))
    dense2 = load_dense_weights(files2)
    assert not [k for k in dense2 if k.endswith((".scales", ".biases"))]
    assert dense2["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert dense2["model.embed_tokens.weight"].dtype == mx.float32
    assert "quantization" not in files2.manifest.model_args and files2.manifest.dense_quantization is None


def test_conversion_streams_one_layer_at_a_time(tmp_path):
    """FFN tensors are freed as soon as their layer is written (no second copy of the FFN)."""
    src = make_tiny_llama(tmp_path / "src", layers=8, hidden=256, ffn=2048, heads=4, kv_heads=2)
    layer_bytes = 3 * 256 * 2048 * 2
    active = []
    mx.clear_cache()
    base = mx.get_active_memory()
    convert_to_flash(src, tmp_path / "m.flash", progress=lambda f, m: active.append(mx.get_active_memory() - base)
                     if m.startswith("layer") else None)
    assert len(active) == 8
    # holding every written layer would reach 8 layers; streaming stays at about one
    assert max(active) < 2.5 * layer_bytes, [a / layer_bytes for a in active]


# --------------------------------------------------------------------------- manifest
def test_manifest_json_round_trip(models, tmp_path):
    m = Manifest.load(models["float16"][1])
    m.extra["future_field"] = {"x": 1}
    m.predictors = {"rank": 8}
    p = m.save(tmp_path)
    assert p == tmp_path / "manifest.json"
    assert not [q for q in tmp_path.iterdir() if q.name != "manifest.json"]
    m2 = Manifest.load(p)
    assert m2 == m and Manifest.from_json(m.to_json()) == m
    assert json.loads(p.read_text())["future_field"] == {"x": 1}


def test_offsets_and_bounds(models):
    m = open_flash(models["float32"][1]).manifest
    assert m.layer_range(1) == (m.layers[1].offset, m.layers[1].size)
    assert m.neuron_offset(2, 0) == m.layers[2].offset
    assert m.neuron_offset(2, 99) == m.layers[2].offset + 99 * m.bundle_bytes
    for bad in [(-1, 0), (3, 0), (0, -1), (0, 100)]:
        with pytest.raises(IndexError):
            m.neuron_offset(*bad)
    with pytest.raises(IndexError):
        m.layer_range(3)


# --------------------------------------------------------------------------- open_flash errors
def _err(folder) -> str:
    with pytest.raises(FlashFormatError) as ei:
        open_flash(folder)
    return str(ei.value)


def test_missing_folder_and_manifest(tmp_path, flash_copy):
    assert "no such directory" in _err(tmp_path / "nope")
    (flash_copy / "manifest.json").unlink()
    msg = _err(flash_copy)
    assert "manifest.json" in msg and "missing" in msg


def test_bad_json(flash_copy):
    (flash_copy / "manifest.json").write_text("{not json")
    msg = _err(flash_copy)
    assert "manifest.json" in msg and "JSON" in msg


def test_missing_and_mistyped_fields(flash_copy):
    _edit_manifest(flash_copy, bundle_bytes=_DROP)
    assert "'bundle_bytes' is missing" in _err(flash_copy)
    _edit_manifest(flash_copy, bundle_bytes="384")
    assert "'bundle_bytes' has type str" in _err(flash_copy)


def test_wrong_version(flash_copy):
    _edit_manifest(flash_copy, format_version=FORMAT_VERSION + 1)
    msg = _err(flash_copy)
    assert "manifest.json" in msg and "format_version" in msg


def test_unsupported_architecture_in_manifest(flash_copy):
    _edit_manifest(flash_copy, architecture="gpt-neox")
    msg = _err(flash_copy)
    assert "unsupported architecture" in msg and "architecture" in msg


@pytest.mark.parametrize(
    "field,mutate,needle",
    [
        ("bundle_bytes", lambda d: d["bundle_bytes"] + 2, "'bundle_bytes'"),
        ("bundle_elems", lambda d: d["bundle_elems"] * 2, "'bundle_elems'"),
        ("dtype", lambda d: "int8", "'dtype'"),
        ("intermediate_size", lambda d: d["intermediate_size"] + 1, "intermediate_size"),
        ("layers", lambda d: d["layers"][:2], "'layers'"),
        ("layers", lambda d: [dict(e, size=e["size"] - 1) for e in d["layers"]], "'layers[0].size'"),
        ("layers", lambda d: [dict(e, offset=e["offset"] + 512) for e in d["layers"]], "'layers[0].offset'"),
        ("layers", lambda d: [d["layers"][0], dict(d["layers"][1], offset=0), d["layers"][2]], "overlaps"),
        ("ffn_size", lambda d: d["ffn_size"] - 4096, "beyond ffn_size"),
        ("ffn_size", lambda d: d["ffn_size"] + 1, "'ffn_size'"),
        ("ffn_file", lambda d: "../ffn.bin", "'ffn_file'"),
        ("predictors", lambda d: {**(d.get("predictors") or {}), "file": "../ffn.bin"}, "'predictors.file'"),
    ],
)
def test_wrong_sizes(flash_copy, field, mutate, needle):
    d = json.loads((flash_copy / "manifest.json").read_text())
    _edit_manifest(flash_copy, **{field: mutate(d)})
    msg = _err(flash_copy)
    assert "manifest.json" in msg and needle in msg, msg


def test_truncated_and_oversized_ffn(flash_copy):
    m = Manifest.load(flash_copy)
    ffn = flash_copy / "ffn.bin"
    os.truncate(ffn, m.ffn_size - 1000)
    msg = _err(flash_copy)
    assert f"ffn.bin is truncated: {m.ffn_size - 1000} bytes, manifest says {m.ffn_size}" in msg
    os.truncate(ffn, m.ffn_size + 4096)
    assert "ffn.bin has" in _err(flash_copy)
    ffn.unlink()
    assert "ffn.bin is missing" in _err(flash_copy)


def test_missing_dense(flash_copy):
    (flash_copy / "dense.safetensors").unlink()
    assert "dense.safetensors is missing" in _err(flash_copy)


def test_verify_checksums_names_the_layer(flash_copy):
    files = open_flash(flash_copy)
    off = files.manifest.neuron_offset(1, 5)
    with open(files.ffn_path, "r+b") as f:
        f.seek(off + 7)
        b = f.read(1)
        f.seek(off + 7)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(FlashFormatError, match="layer 1 checksum mismatch"):
        verify_checksums(files)


# --------------------------------------------------------------------------- conversion errors & cleanup
def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], list(parent.iterdir())


def test_cancel_mid_conversion_leaves_nothing(models, tmp_path):
    src, _ = models["float16"]
    calls = []

    def cb(frac, msg):
        calls.append((frac, msg))
        return len(calls) < 3  # cancel after the first layer was written

    with pytest.raises(Cancelled):
        convert_to_flash(src, tmp_path / "c.flash", progress=cb)
    assert len(calls) == 3 and calls[1][1].startswith("layer 1")
    _no_leftovers(tmp_path, "c.flash")


def test_error_mid_conversion_leaves_nothing(models, tmp_path):
    src, _ = models["float16"]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    w = dict(mx.load(str(bad / "model.safetensors")))
    w["model.layers.2.mlp.down_proj.weight"] = w["model.layers.2.mlp.down_proj.weight"][:, :50]
    mx.save_safetensors(str(bad / "model.safetensors"), w)
    with pytest.raises(FlashFormatError, match=r"model.layers.2.mlp.down_proj.weight has shape \(64, 50\)"):
        convert_to_flash(bad, tmp_path / "b.flash")
    _no_leftovers(tmp_path, "b.flash")


def test_missing_ffn_tensor(models, tmp_path):
    src, _ = models["float16"]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    w = dict(mx.load(str(bad / "model.safetensors")))
    del w["model.layers.1.mlp.up_proj.weight"]
    mx.save_safetensors(str(bad / "model.safetensors"), w)
    with pytest.raises(FlashFormatError, match="model.layers.1.mlp.up_proj.weight is missing"):
        convert_to_flash(bad, tmp_path / "b.flash")
    _no_leftovers(tmp_path, "b.flash")


def test_unsupported_source_architecture(models, tmp_path):
    src, _ = models["float16"]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlashFormatError, match="unsupported architecture.*gpt2"):
        convert_to_flash(bad, tmp_path / "b.flash")
    (bad / "config.json").unlink()
    with pytest.raises(FlashFormatError, match="config.json is missing"):
        convert_to_flash(bad, tmp_path / "b.flash")
    _no_leftovers(tmp_path, "b.flash")


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_llama_like_architectures(models, tmp_path, model_type):
    src, ref = models["float16"]
    other = tmp_path / model_type
    shutil.copytree(src, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = model_type
    (other / "config.json").write_text(json.dumps(cfg))
    files = open_flash(convert_to_flash(other, tmp_path / "o.flash"))
    assert files.manifest.architecture == model_type
    assert files.ffn_path.read_bytes() == (ref / "ffn.bin").read_bytes()


def test_existing_destination(models, tmp_path):
    src, _ = models["float16"]
    dst = tmp_path / "e.flash"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        convert_to_flash(src, dst)
    assert (dst / "old.txt").exists()
    convert_to_flash(src, dst, overwrite=True, dtype="float32")
    assert not (dst / "old.txt").exists()
    assert open_flash(dst).manifest.dtype == "float32"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]



def test_manifest_carries_its_own_checksum(flash_copy):
    """A saved manifest is signed; any edit after writing (a removed field such as the neuron order, a
    changed number) is refused with the reason, where before it was read as written; an unsigned manifest
    (written before the field existed) loads as before."""
    p = flash_copy / "manifest.json"
    d = json.loads(p.read_text())
    assert d[MANIFEST_CHECKSUM] == manifest_digest(d)
    assert open_flash(flash_copy).manifest.num_layers == d["num_layers"]

    for edit in ({"source": d["source"] + " (edited)"}, {"created": None}, {"neuron_order": {"kind": "hot"}}):
        changed = {k: v for k, v in {**d, **edit}.items() if v is not None}
        p.write_text(json.dumps(changed))
        msg = _err(flash_copy)
        assert "does not match its own checksum" in msg and "manifest.json" in msg, msg

    p.write_text(json.dumps({k: v for k, v in d.items() if k != MANIFEST_CHECKSUM}))  # an older, unsigned one
    m = open_flash(flash_copy).manifest
    assert m.num_layers == d["num_layers"] and MANIFEST_CHECKSUM not in m.extra
    m.save(flash_copy)  # saving signs it again
    again = json.loads(p.read_text())
    assert again[MANIFEST_CHECKSUM] == manifest_digest(again)
    assert open_flash(flash_copy).manifest.num_layers == d["num_layers"]
