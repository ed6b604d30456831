"""Set-up faults (#17 findings 9 and 10): apt's lock held by another process, a cached default model whose
predictors fail their quality gate or come from an older calibration, Qt's xcb plugin missing a library.

Real things throughout: apt-get against the real dpkg lock (root only, marked slow: it runs `apt-get update`),
the real PySide6 xcb plugin (a copy with one dependency renamed stands for a machine that lacks it), and a tiny
real model calibrated for real in a temporary MLX_FLASH_HOME.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_flash import default_model
from mlx_flash.calibrate import CALIBRATION_VERSION, calibrate, calibration_problem, quality_gate
from mlx_flash.paths import HOME_ENV
from mlx_flash.storage.format import Manifest, convert_to_flash, role_quantization
from mlx_flash_app import platform_qt
from tests.tiny import make_tiny_flash, make_tiny_llama, quantize_tiny

ROOT = Path(__file__).resolve().parents[2]
APT_INSTALL = ROOT / "packaging" / "linux" / "apt_install.sh"
FRONTEND_LOCK = "/var/lib/dpkg/lock-frontend"
LISTS_LOCK = "/var/lib/apt/lists/lock"


# --------------------------------------------------------------------------- apt's lock
def test_apt_install_says_already_present():
    if shutil.which("dpkg-query") is None:
        pytest.skip("no dpkg here")
    out = subprocess.run(["bash", str(APT_INSTALL), "libc6", "the C library", "nothing runs"],
                         capture_output=True, text=True, check=True).stdout
    assert "libc6: already present" in out


_HOLDER = """
import fcntl, sys, time
files = [open(p, "w") for p in sys.argv[2:]]
try:
    for f in files:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # apt's own kind of lock (fcntl), not flock
except OSError:
    print("busy", flush=True)
    sys.exit(0)
print("locked", flush=True)
time.sleep(float(sys.argv[1]))
"""


def _hold_apt_locks(seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(seconds), LISTS_LOCK, FRONTEND_LOCK],
                              stdout=subprocess.PIPE, text=True)
    if holder.stdout.readline().strip() != "locked":
        holder.wait()
        pytest.skip("apt is in use by another process right now")
    return holder


@pytest.mark.slow
def test_apt_install_waits_for_a_held_dpkg_lock():
    """With apt's locks held by another process, apt_install.sh waits and then goes on (here: to apt's
    answer for a package that does not exist); with no waiting allowed it says the lock was the reason."""
    if shutil.which("apt-get") is None or os.geteuid() != 0 or not Path(FRONTEND_LOCK).exists():
        pytest.skip("needs root and apt")
    pkg = "mlx-flash-no-such-package"
    args = ["bash", str(APT_INSTALL), pkg, "a test", "nothing"]
    holder = _hold_apt_locks(30)
    try:  # control: no waiting allowed -> the lock is named as the reason
        out = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "APT_LOCK_TIMEOUT": "0"},
                             check=True).stdout
    finally:
        holder.kill()
        holder.wait()
    assert f"{pkg}: could not install" in out and "lock" in out.lower(), out
    holder = _hold_apt_locks(3)
    out = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "APT_LOCK_TIMEOUT": "120"},
                         check=True).stdout
    assert holder.poll() is not None  # the script only finished after the holder let go
    assert "waiting up to 120 s" in out
    assert "Could not get lock" not in out, out
    assert f"{pkg}: could not install" in out
    if "Unable to locate package" not in out:
        pytest.skip(f"apt-get could not reach its sources here: {out}")


# --------------------------------------------------------------------------- the cached default model
_MESSAGES: list = []


@pytest.fixture(scope="module")
def tiny_calibrated(tmp_path_factory):
    """A tiny calibrated 4-bit flash folder (the default model's form: a float one is upgraded)."""
    d = tmp_path_factory.mktemp("tiny")
    src = quantize_tiny(make_tiny_llama(d / "src", layers=2, hidden=64, ffn=128, dtype="float32", seed=3), d / "q4")
    folder = convert_to_flash(src, d / "model.flash")
    calibrate(folder, sparsity=0.5, rank=8, tokens=256, max_new_tokens=8,
              progress=lambda f, m: _MESSAGES.append((f, m)))
    return folder


def test_calibration_reports_progress_inside_every_phase(tiny_calibrated):
    """The phases that once ran without a word (#17: the bar stood still for 11 minutes): the prompts are
    read in chunks of positions, and each layer's fit reports its steps."""
    msgs = [m for _, m in _MESSAGES]
    reading = [m for m in msgs if m.startswith("reading ") and "positions" in m]
    assert len(reading) >= 2 and reading[0].endswith(" 0/" + reading[0].rsplit("/", 1)[1])
    for step in ("activations", "ridge fit", "cutoffs"):
        assert f"layer 1/2: {step}" in msgs and f"layer 2/2: {step}" in msgs
    assert [f for f, _ in _MESSAGES] == sorted(f for f, _ in _MESSAGES)


@pytest.fixture
def tiny_default(tiny_calibrated, tmp_path, monkeypatch):
    """A tiny real calibrated model in place of the default model, in a temporary MLX_FLASH_HOME."""
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    folder = default_model.default_flash_dir()
    folder.parent.mkdir(parents=True)
    return shutil.copytree(tiny_calibrated, folder)


def _set_predictors(folder: Path, **changes) -> str:
    m = Manifest.load(folder)
    info = dict(m.predictors)
    for k, v in changes.items():
        if v is None:
            info.pop(k, None)
        else:
            info[k] = v
    m.predictors = info
    m.save(folder)
    return info["id"]


def test_gate_verdict_is_stored_and_read_back(tiny_default):
    info = Manifest.load(tiny_default).predictors
    assert info["calibration_version"] == CALIBRATION_VERSION
    assert info["gate"] == quality_gate(info)
    bad = {**info, "held_out": {**info["held_out"], str(info["recall"]): {"recall": 0.80, "predicted_fraction": 0.5}}}
    verdict = quality_gate(bad)
    assert not verdict["passed"] and "held-out recall 0.800" in verdict["reason"]
    assert not quality_gate({**info, "held_out": {str(info["recall"]): {"recall": 1.0,
                                                                       "predicted_fraction": 1.0}}})["passed"]


def test_cached_default_model_failing_its_gate_is_recalibrated(tiny_default, caplog):
    old = _set_predictors(tiny_default, gate={"passed": False, "reason": "held-out recall 0.700 is below 0.980"})
    assert "quality gate" in calibration_problem(Manifest.load(tiny_default).predictors)
    msgs = []
    with caplog.at_level(logging.WARNING, logger="mlx_flash.default_model"):
        assert default_model.ensure_default_flash(progress=lambda f, m: msgs.append(m)) == tiny_default
    info = Manifest.load(tiny_default).predictors
    assert info["id"] != old  # new predictors
    assert info["calibration_version"] == CALIBRATION_VERSION and "passed" in info["gate"]
    why = "re-calibrating the default model's predictors: failed its quality gate: held-out recall 0.700"
    assert any(why in r.getMessage() for r in caplog.records)
    assert any(why in m for m in msgs)


def test_cached_default_model_from_an_older_calibration_is_recalibrated(tiny_default, caplog):
    old = _set_predictors(tiny_default, calibration_version=None)
    with caplog.at_level(logging.WARNING, logger="mlx_flash.default_model"):
        default_model.ensure_default_flash()
    assert Manifest.load(tiny_default).predictors["id"] != old
    assert any("made by calibration version 1" in r.getMessage() for r in caplog.records)


def test_cached_default_model_that_passed_is_kept(tiny_default):
    kept = _set_predictors(tiny_default, gate={**quality_gate({}), "passed": True, "reason": "ok"})
    default_model.ensure_default_flash()
    assert Manifest.load(tiny_default).predictors["id"] == kept


# --------------------------------------------------------------------------- Qt's xcb plugin
def _plugin() -> Path:
    if not sys.platform.startswith("linux"):
        pytest.skip("the xcb check is Linux only")
    q = platform_qt.qt_dir()
    if q is None or not (q / platform_qt.PLUGIN).is_file():
        pytest.skip("PySide6 ships no xcb plugin here")
    return q / platform_qt.PLUGIN


def test_xcb_plugin_needs_are_found_and_load_here():
    plugin = _plugin()
    assert "libQt6XcbQpa.so.6" in platform_qt.needed_sonames(plugin)
    needed, missing = platform_qt.xcb_missing()
    # the libraries a minimal Debian lacks (#17) are among those read from the plugin's Qt library
    assert {"libxcb-icccm.so.4", "libxcb-keysyms.so.1", "libxcb-cursor.so.0", "libxkbcommon-x11.so.0"} <= set(needed)
    assert not any(n.startswith("libQt6") for n in needed)  # Qt's own libraries ship with PySide6
    assert missing == []  # this machine has them all (it runs the app under Xvfb)


def test_xcb_plugin_missing_library_is_named_with_the_apt_command(tmp_path):
    """A copy of the real Qt xcb library with one dependency renamed (same length) stands for a machine
    without libxcb-icccm4: the check names exactly that library."""
    plugin = _plugin()
    qlib = plugin.parents[2] / "lib"
    for src in (plugin, qlib / "libQt6XcbQpa.so.6"):  # both name it
        data = src.read_bytes()
        (tmp_path / src.name).write_bytes(data.replace(b"libxcb-icccm.so.4\0", b"libxcb-icccX.so.4\0"))
    fake_plugin = tmp_path / plugin.name
    needed = platform_qt.system_libraries(fake_plugin, [tmp_path, qlib])  # the broken copy is found first
    assert "libxcb-icccX.so.4" in needed and "libxcb-icccm.so.4" not in needed
    missing = platform_qt.missing_libraries(needed)
    assert [m[0] for m in missing] == ["libxcb-icccX.so.4"]
    text = platform_qt.describe(missing)
    assert "libxcb-icccX.so.4" in text and "cannot open shared object file" in text
    # a real soname maps to its Debian package in the printed command
    assert "sudo apt-get install libxcb-icccm4 libxcb-keysyms1" in platform_qt.describe(
        [("libxcb-keysyms.so.1", "x"), ("libxcb-icccm.so.4", "y")])


def test_xcb_check_is_a_no_op_on_other_platforms(monkeypatch):
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert platform_qt.check_before_qapplication() is None
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delenv("QT_QPA_PLATFORM")
    assert platform_qt.xcb_missing() == ([], [])
    assert platform_qt.check_before_qapplication() is None


def test_cached_bfloat16_default_model_is_upgraded_to_4_bit(tmp_path, monkeypatch, caplog):
    """A default flash folder from before quantized flash (float bundles) is converted again from
    the GGUF, keeping its bits, with a message; the old folder is replaced only once the new one is
    complete."""
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    folder = default_model.default_flash_dir()
    folder.parent.mkdir(parents=True)
    make_tiny_flash(tmp_path / "old", layers=2, hidden=64, ffn=128).rename(folder)
    assert not role_quantization(Manifest.load(folder))
    msgs = []
    with caplog.at_level(logging.INFO, logger="mlx_flash.default_model"):
        assert default_model.ensure_default_flash(progress=lambda f, m: msgs.append(m), calibrate=False) == folder
    m = Manifest.load(folder)
    assert role_quantization(m)["gate"]["bits"] == 4 and m.num_layers == 30
    assert role_quantization(m)["down"]["axis"] == "ffn"  # the exact down layout (the GGUF's own down rows)
    assert "upgrading the default model to its exact 4-bit flash form (smaller reads)" in msgs
    assert any("not the current default model" in r.getMessage() for r in caplog.records)
