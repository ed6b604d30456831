"""Fault suite (issue #17): corrupt weights, budget and sampling flags, unclear messages.

Every case runs the real CLI (``mlx_flash.cli.main``, which returns the exit code) or the
real library / engine on tiny real models (tests/tiny.py), damages real files, and checks
the message, the exit code, that nothing is left behind and that earlier data survived.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from PySide6.QtCore import QSettings

from mlx_flash import library
from mlx_flash.calibrate import calibrate
from mlx_flash.cli import main
from mlx_flash.config import FlashConfig, parse_budget
from mlx_flash.engine import ModelLoadError, load
from mlx_flash.predictor import PREDICTOR_FILE
from mlx_flash.storage.format import ChecksumError, Manifest, open_flash, signed, verify_checksums
from mlx_flash_app.main_window import MainWindow
from mlx_flash_app.widgets.model_library import ModelLibraryPage
from tests.convert.test_gguf import write_gguf
from tests.tiny import make_tiny_flash

PROMPTS = ["hello there", "tell me a short story", "what is two plus two?", "list three colours"]


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny 3-layer float32 flash model (not calibrated) and its mlx-lm source."""
    root = tmp_path_factory.mktemp("faults-weights")
    flash = make_tiny_flash(root, layers=3, hidden=64, ffn=256, dtype="float32", seed=3)
    return flash, root / "src"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """The same kind of model, calibrated (predictors.safetensors + its checksum)."""
    root = tmp_path_factory.mktemp("faults-cal")
    flash = make_tiny_flash(root, layers=3, hidden=64, ffn=256, dtype="float32", seed=4)
    calibrate(flash, sparsity=0.5, rank=8, tokens=240, max_new_tokens=12, prompts=PROMPTS)
    return flash


@pytest.fixture()
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("MLX_FLASH_HOME", str(h))
    return h


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _fingerprint(folder: Path) -> dict:
    """File name → blake2b of a folder's files (to show nothing was changed or left)."""
    return {str(p.relative_to(folder)): hashlib.blake2b(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _flip_neuron(flash: Path, layer: int, neuron: int) -> None:
    m = Manifest.load(flash)
    _flip(flash / "ffn.bin", m.neuron_offset(layer, neuron) + 5)


def _safetensors_data_offset(path: Path) -> int:
    """First byte after a safetensors header (the tensor data)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return 8 + n


def _generate(model: Path, *extra: str) -> list:
    return ["generate", "--model", str(model), "-p", "hi", "--max-tokens", "3", "--raw", "--quiet", *extra]


# --------------------------------------------------------------------------- corrupt weights (finding 1)
@pytest.mark.parametrize("layer,neuron", [(0, 0), (1, 100), (2, 255)])
def test_flipped_byte_in_ffn_fails_generation(good, tmp_path, home, capsys, layer, neuron):
    bad = _copy(good[0], tmp_path / "bad.flash")
    _flip_neuron(bad, layer, neuron)
    before = _fingerprint(bad)
    assert main(_generate(bad)) == 1
    out = capsys.readouterr()
    assert f"layer {layer} checksum mismatch" in out.err and "ffn.bin" in out.err
    assert out.out == ""  # no answer computed from corrupt weights
    assert _fingerprint(bad) == before  # the user's files are left as they were
    assert main(_generate(good[0])) == 0  # the intact model still runs


def test_flipped_byte_in_ffn_fails_the_token_not_silently(good, tmp_path):
    """Through the engine: load (background verification) or the first token raises."""
    bad = _copy(good[0], tmp_path / "bad.flash")
    _flip_neuron(bad, 2, 7)
    with pytest.raises(ChecksumError, match="layer 2 checksum mismatch"):
        eng = load(bad, FlashConfig(active="all", scratch_neurons=32, threads=2))
        try:
            list(eng.stream_generate("hi", 3))
        finally:
            eng.close()
    with pytest.raises(ChecksumError, match="layer 2 checksum mismatch"):
        load(bad, FlashConfig(active="all", verify="load"))
    with pytest.raises(ChecksumError, match="layer 2 checksum mismatch"):
        load(bad, dense=True)  # reading the whole FFN into memory verifies it too


def test_flipped_byte_in_dense_weights(good, tmp_path, home, capsys):
    bad = _copy(good[0], tmp_path / "bad.flash")
    _flip(bad / "dense.safetensors", _safetensors_data_offset(bad / "dense.safetensors") + 100)
    assert main(_generate(bad)) == 1
    err = capsys.readouterr().err
    assert "dense.safetensors checksum mismatch" in err and "corrupt or was modified" in err


def test_flipped_byte_in_predictors(calibrated, tmp_path, home, capsys):
    bad = _copy(calibrated, tmp_path / "bad.flash")
    p = bad / PREDICTOR_FILE
    _flip(p, _safetensors_data_offset(p) + 64)
    assert main(_generate(bad, "--budget", "100%", "--engine", "flash")) == 1
    assert "predictors.safetensors checksum mismatch" in capsys.readouterr().err
    assert main(["verify", str(bad), "-q"]) == 1
    assert "predictors.safetensors checksum mismatch" in capsys.readouterr().err


def test_truncated_ffn_bin(good, tmp_path, home, capsys):
    bad = _copy(good[0], tmp_path / "bad.flash")
    size = (bad / "ffn.bin").stat().st_size
    with open(bad / "ffn.bin", "r+b") as f:
        f.truncate(size // 2)
    assert main(_generate(bad)) == 1
    assert f"ffn.bin is truncated: {size // 2} bytes, manifest says {size}" in capsys.readouterr().err


def test_extended_ffn_bin(good, tmp_path, home, capsys):
    bad = _copy(good[0], tmp_path / "bad.flash")
    with open(bad / "ffn.bin", "ab") as f:
        f.write(b"\0" * 4096)
    assert main(["verify", str(bad), "-q"]) == 1
    assert "manifest says" in capsys.readouterr().err


def test_altered_manifest_checksum(good, tmp_path, home, capsys):
    bad = _copy(good[0], tmp_path / "bad.flash")
    m = json.loads((bad / "manifest.json").read_text())
    m["layers"][1]["checksum"] = "0" * 128
    (bad / "manifest.json").write_text(json.dumps(signed(m)))  # re-signed: the layer check must catch it
    assert main(["verify", str(bad), "-q"]) == 1
    err = capsys.readouterr().err
    assert "layer 1 checksum mismatch (manifest field 'layers[1].checksum')" in err


def test_verify_cli_good_old_and_not_flash(good, tmp_path, home, capsys):
    assert main(["verify", str(good[0]), "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and "dense.safetensors" in out and "ffn.bin (3 layers)" in out
    # a manifest from before side-file checksums: ffn.bin is still checked, and it still loads
    old = _copy(good[0], tmp_path / "old.flash")
    m = json.loads((old / "manifest.json").read_text())
    del m["checksums"], m["manifest_checksum"]  # neither existed then
    (old / "manifest.json").write_text(json.dumps(m))
    assert main(["verify", str(old), "-q"]) == 0
    assert "dense.safetensors" not in capsys.readouterr().out
    assert main(_generate(old)) == 0
    # an mlx-lm folder has no checksums to check
    assert main(["verify", str(good[1]), "-q"]) == 1
    assert "not a flash folder" in capsys.readouterr().err


def test_verify_cli_names_file_and_layer(good, tmp_path, home, capsys):
    bad = _copy(good[0], tmp_path / "bad.flash")
    _flip_neuron(bad, 1, 3)
    assert main(["verify", str(bad), "-q"]) == 1
    err = capsys.readouterr().err
    assert str(bad / "ffn.bin") in err and "layer 1 checksum mismatch" in err


def test_convert_writes_dense_checksum_and_verifies(good, tmp_path):
    m = Manifest.load(good[0])
    assert set(m.checksums) == {"dense.safetensors"}
    assert "ffn.bin (3 layers)" in verify_checksums(open_flash(good[0]))[-1]


def test_library_import_refuses_corrupt_flash_folder(good, tmp_path, home):
    kept = library.import_model(good[0], name="kept", calibrate=False)  # earlier data
    kept_files = _fingerprint(kept)
    bad = _copy(good[0], tmp_path / "bad.flash")
    _flip_neuron(bad, 1, 50)
    with pytest.raises(library.ImportRejected, match="layer 1 checksum mismatch") as e:
        library.import_model(bad, calibrate=False)
    assert str(bad / "ffn.bin") in str(e.value)  # the user's path, not the hidden work folder's
    assert sorted(p.name for p in (home / "models").iterdir()) == ["kept.flash"]  # no work folder left
    assert _fingerprint(kept) == kept_files


def test_library_import_refuses_truncated_flash_folder(good, tmp_path, home):
    bad = _copy(good[0], tmp_path / "bad.flash")
    with open(bad / "ffn.bin", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(library.ImportRejected, match="truncated"):
        library.check_importable(bad)
    with pytest.raises(library.ImportRejected, match="truncated"):
        library.import_model(bad, calibrate=False)
    assert not (home / "models").exists() or list((home / "models").iterdir()) == []


def test_app_import_of_corrupt_flash_shows_the_message(good, tmp_path, home, qtbot):

    bad = _copy(good[0], tmp_path / "bad.flash")
    _flip_neuron(bad, 0, 9)
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)
    page = ModelLibraryPage(settings)
    qtbot.addWidget(page)
    page.calibrate_box.setChecked(False)
    notices = []
    page.notice.connect(lambda level, text: notices.append((level, text)))
    with qtbot.waitSignal(page.import_finished, timeout=60000) as done:
        assert page.import_paths([bad]) == 1
    assert done.args[0] == ""
    assert notices and notices[-1][0] == "error" and "layer 0 checksum mismatch" in notices[-1][1]
    assert page.entries() == [] and list((home / "models").iterdir()) == []
    page.shutdown()


# --------------------------------------------------------------------------- budget flags (finding 7)
@pytest.mark.parametrize("text,words", [
    ("150%", "at most 100%"), ("0%", "must be more than 0"), ("-5%", "must be more than 0"),
    ("abc", "is not understood"), ("", "is not understood"), ("1e400", "not a finite number"),
    ("50", "write 50% for a share or 50MB for a size"),
])
def test_bad_budget_is_a_clear_usage_error(good, home, capsys, text, words):
    assert main(_generate(good[0], f"--budget={text}")) == 2  # "=": "-5%" would read as an option
    err = capsys.readouterr().err
    assert "argument --budget" in err and words in err
    with pytest.raises(ValueError, match=words):
        parse_budget(text)


def test_good_budgets_parse():
    assert parse_budget("0.5") == parse_budget("50%") == 0.5
    assert parse_budget("512MB") == 512e6
    assert parse_budget("2GiB") == 2 * 1024**3
    assert parse_budget("100%") == 1.0


def test_budget_above_the_ffn_is_clamped_with_a_note(good, home, capsys):
    assert main(_generate(good[0], "--budget", "2GiB", "--active", "all", "--engine", "flash")) == 0
    err = capsys.readouterr().err
    assert "warning: the budget of 2147.5 MB is more than this model can use" in err
    assert main(_generate(good[0], "--budget", "2GiB")) == 0  # engine auto: the whole FFN fits, so dense
    assert "engine: dense (auto: the whole FFN" in capsys.readouterr().err


def test_uncalibrated_full_budget_runs_every_neuron(good):
    eng = load(good[0], FlashConfig(budget=1.0, engine="flash"))  # (engine auto would run it dense)
    try:
        assert eng.mode == "flash-all"
        assert any("every FFN neuron runs" in n for n in eng.notes)
        r = list(eng.stream_generate("hi", 2))[-1]
        assert r.stats.notes == eng.notes
    finally:
        eng.close()


def test_uncalibrated_half_budget_warns_about_the_oracle(good, home, capsys):
    assert main(_generate(good[0], "--budget", "50%")) == 0
    err = capsys.readouterr().err
    assert "warning: this model has no activation predictors (not calibrated): falling back to the oracle" in err
    assert "Flash (flash-oracle)" not in err  # --quiet: no summary; the warning still shows


def test_deleted_predictors_warns_and_notes(calibrated, tmp_path, home, capsys):
    c = _copy(calibrated, tmp_path / "c.flash")
    (c / PREDICTOR_FILE).unlink()
    assert main(_generate(c, "--budget", "50%")) == 0
    err = capsys.readouterr().err
    assert "manifest.json records activation predictors but" in err and "is missing" in err
    eng = load(c, FlashConfig(budget=0.5))
    try:
        assert eng.mode == "flash-oracle"
        assert any("predictors.safetensors is missing" in n for n in list(eng.stream_generate("hi", 1))[-1].stats.notes)
    finally:
        eng.close()
    assert main(["verify", str(c), "-q"]) == 1  # the manifest records its checksum: the file is missing
    assert "predictors.safetensors is missing" in capsys.readouterr().err


# --------------------------------------------------------------------------- unclear messages (finding 8)
@pytest.mark.parametrize("flag,value,words", [("--max-tokens", "0", "must be at least 1"),
                                              ("--temp", "-1", "must be at least 0"),
                                              ("--top-p", "0", "must be more than 0")])
def test_bad_sampling_flags(good, home, capsys, flag, value, words):
    assert main(_generate(good[0], flag, value)) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and words in err


def test_missing_tokenizer(good, tmp_path, home, capsys):
    for folder in (_copy(good[0], tmp_path / "t.flash"), _copy(good[1], tmp_path / "t-mlx")):
        (folder / "tokenizer.json").unlink()
        assert main(_generate(folder)) == 1
        err = capsys.readouterr().err
        assert f"{folder} has no tokenizer (tokenizer.json / tokenizer.model / vocab.json is missing)" in err
        assert "sentencepiece" not in err.lower()
        with pytest.raises(ModelLoadError):
            load(folder)


def test_convert_of_a_flash_folder(good, tmp_path, home, capsys):
    dst = tmp_path / "again.flash"
    before = _fingerprint(good[0])
    for extra in ([], ["--no-calibrate"]):
        assert main(["convert", str(good[0]), str(dst), *extra]) == 1
        err = capsys.readouterr().err
        assert "is already in the flash format" in err and "no FFN weights" not in err
        assert [p.name for p in tmp_path.iterdir()] == ["home"]  # no destination, no work folder
    assert _fingerprint(good[0]) == before


def test_gguf_with_another_extension_converts(tmp_path, home, capsys):
    src = tmp_path / "model.txt"
    write_gguf(src)
    dst = tmp_path / "m.flash"
    assert main(["convert", str(src), str(dst), "--no-calibrate"]) == 0
    assert open_flash(dst).manifest.architecture == "llama"
    assert library.check_importable(src) == "gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "m.flash", "model.txt"]
    # and a text file named .gguf is judged by its bytes too
    fake = tmp_path / "notes.gguf"
    fake.write_text("hello")
    assert main(["convert", str(fake), str(tmp_path / "x.flash"), "--no-calibrate"]) == 1
    assert "does not start with b'GGUF'" in capsys.readouterr().err


def test_prompt_longer_than_context_warns(good, tmp_path, home, capsys):
    short = _copy(good[0], tmp_path / "short.flash")
    m = Manifest.load(short)
    m.model_args["max_position_embeddings"] = 8
    m.save(short)
    assert main(["generate", "--model", str(short), "-p", "one two three four five six seven eight nine ten",
                 "--max-tokens", "2", "--raw", "--quiet", "--active", "all"]) == 0
    err = capsys.readouterr().err
    assert "more than this model's context of 8 (max_position_embeddings)" in err
    eng = load(short, FlashConfig(active="all"))
    try:
        notes = list(eng.stream_generate("one two three four five six seven eight nine ten", 1))[-1].stats.notes
        assert any("context of 8" in n for n in notes) and not eng.notes
    finally:
        eng.close()


def test_app_shows_the_engine_fallback_on_the_model_chip(good, tmp_path, home, qtbot):

    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)
    w = MainWindow(model_path=str(good[0]), config=FlashConfig(scratch_neurons=32, threads=2),
                   history_path=tmp_path / "history.sqlite", settings=settings)
    qtbot.addWidget(w)
    w.show()
    with qtbot.waitSignal(w.engine_ready, timeout=60000):
        w.start()
    assert w.engine.mode == "flash-oracle"  # 50% budget, not calibrated
    assert "⚠ 1 note" in w.mode_chip.text()
    assert "falling back to the oracle" in w.mode_chip.toolTip()
    w.close()
