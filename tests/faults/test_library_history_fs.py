"""Fault suite (issue #17): damaged library entries, damaged chat history, two writers of one
destination, killed conversions, full and read-only disks.

Every case checks the message, the exit code (CLI cases), that nothing is left behind and
that the data that was there survives. Disk-full and read-only cases use a real small tmpfs
(``mount -t tmpfs``, needs root: skipped with the reason otherwise); a disk is filled for real
from the progress callback, i.e. after the up-front space check and in the middle of a write.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from mlx_flash import cli, default_model, library
from mlx_flash.atomic import DestinationBusy, WriteError, clean_stale, destination_lock, pid_alive
from mlx_flash.convert.gguf import output_bytes
from mlx_flash.storage.format import Manifest, open_flash, signed
from mlx_flash_app.history import History
from tests.convert.test_gguf import write_gguf
from tests.tiny import make_tiny_flash, make_tiny_llama, quantize_tiny

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 120  # generous: the machine is shared; a wait, never an assert on time


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    (h / "models").mkdir(parents=True)
    monkeypatch.setenv("MLX_FLASH_HOME", str(h))
    return h


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("faults-src") / "Tiny-mlx", layers=2, hidden=64, ffn=128)


@pytest.fixture(scope="module")
def tiny_flash(tmp_path_factory):
    return make_tiny_flash(tmp_path_factory.mktemp("faults-flash"), layers=2, hidden=64, ffn=128, seed=3)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (relative path → bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_leftovers(folder: Path) -> list:
    """Temporaries and lock files (hidden entries) under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def wait_for(pred, what: str, proc=None):
    deadline = time.monotonic() + WAIT_S
    while not pred():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended before {what}: rc {proc.returncode}\n{out}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


BLOCKED_CONVERT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mlx_flash.library import convert_any
    src, dst, ready, release, cal = sys.argv[1:6]
    ready, release = Path(ready), Path(release)

    def progress(fraction, message):
        if not ready.exists():
            ready.write_text("converting")   # the temp folder exists by now
        while not release.exists():
            time.sleep(0.02)

    convert_any(Path(src), Path(dst), progress=progress, calibrate=cal == "1")
    print("done")
""")


def start_blocked_convert(src: Path, dst: Path, tag: str, *, calibrate: bool = False):
    """A real ``convert_any`` in a subprocess that stops at its first progress report (after it
    made its temp folder and took the destination lock) until ``release`` exists."""
    ready, release = dst.parent / f"{tag}.ready", dst.parent / f"{tag}.release"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED_CONVERT, str(src), str(dst), str(ready), str(release),
                             "1" if calibrate else "0"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(ready.exists, f"{tag} to start converting", proc)
    return proc, release


def finish(proc, release: Path) -> str:
    release.write_text("go")
    out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, out + err
    release.unlink()
    (release.parent / release.name.replace(".release", ".ready")).unlink()
    return out


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------ small filesystems (root only)
@pytest.fixture
def small_fs(tmp_path):
    """``small_fs("2m")`` → a freshly mounted tmpfs of that size (unmounted after the test);
    ``small_fs(..., read_only=True)`` remounts it read-only after ``prepare(folder)`` ran."""
    if sys.platform != "linux":
        pytest.skip("small real filesystems are made with tmpfs (Linux)")
    mounts = []

    def make(size: str, *, read_only: bool = False, prepare=None) -> Path:
        d = tmp_path / f"fs{len(mounts)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a small tmpfs (needs root): {r.stderr.strip()}")
        mounts.append(d)
        if prepare is not None:
            prepare(d)
        if read_only:
            r = subprocess.run(["mount", "-o", "remount,ro", str(d)], capture_output=True, text=True)
            if r.returncode:
                pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.strip()}")
        return d

    yield make
    for d in reversed(mounts):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill the disk holding ``folder`` to the last byte (a real full disk); return the filler."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def filler_at(folder: Path, when):
    """A progress callback that fills the disk the first time ``when(fraction, message)`` holds."""
    state = {"filled": False}

    def cb(fraction, message):
        if not state["filled"] and when(fraction, message):
            state["filled"] = True
            fill(folder)

    return cb


# =================================================================== finding 2: damaged library entries
def _write(p: Path, data) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data if isinstance(data, bytes) else data.encode())


def _bad_manifest(mutate):
    def make(folder: Path, good: Path) -> None:
        shutil.copytree(good, folder)
        d = json.loads((folder / "manifest.json").read_text())
        _write(folder / "manifest.json", mutate(d))
    return make


BROKEN = {
    "manifest-is-a-list": (_bad_manifest(lambda d: json.dumps([d])), "expected a JSON object, got list"),
    "model_args-is-a-string": (_bad_manifest(lambda d: json.dumps(signed({**d, "model_args": "llama"}))),
                               "field 'model_args' has type str"),
    "manifest-missing-keys": (_bad_manifest(lambda d: json.dumps({"architecture": "llama"})),
                              "field 'format_version' is missing"),
    "manifest-bad-json": (_bad_manifest(lambda d: json.dumps(d)[:-7]), "not valid JSON"),
    "manifest-empty": (_bad_manifest(lambda d: ""), "not valid JSON"),
    "manifest-binary-garbage": (_bad_manifest(lambda d: bytes(range(256)) * 4), "not valid JSON"),
    "flash-without-manifest": (lambda folder, good: _write(folder / "config.json", "{}"),
                               "manifest.json is missing"),
    "folder-without-anything": (lambda folder, good: _write(folder / "notes.txt", "hello"),
                                "no manifest.json or config.json"),
    "config-is-a-list": (lambda folder, good: (_write(folder / "config.json", "[1, 2]"),
                                               _write(folder / "model.safetensors", b"x")),
                         "config.json holds a list"),
    "ffn-bin-truncated": (lambda folder, good: (_bad_manifest(lambda d: json.dumps(d))(folder, good),
                                                os.truncate(folder / "ffn.bin", 100)), "ffn.bin is truncated"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_damaged_library_entry_is_reported_not_fatal(case, home, tiny_flash, capsys):
    make, reason = BROKEN[case]
    models = home / "models"
    shutil.copytree(tiny_flash, models / "Good.flash")
    name = "Broken" if case in ("folder-without-anything", "config-is-a-list") else "Broken.flash"
    make(models / name, tiny_flash)
    before = snapshot(models)

    rc, out, err = run_cli(capsys, "models")

    assert rc == 0
    assert "Good.flash" in out and name not in out            # the good model is listed
    lines = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and name in lines[0] and reason in lines[0], err
    assert "Traceback" not in err
    models_, broken = library.scan_library()
    assert [m.name for m in models_] == ["Good.flash"]
    assert [b.name for b in broken] == [name] and reason in broken[0].reason
    assert library.describe(models / name) is None
    assert library.flash_details(models / name) is None or case == "ffn-bin-truncated"
    assert snapshot(models) == before                          # listing changes nothing


# =================================================================== finding 3: damaged chat history
def _real_history(path: Path) -> None:
    h = History(path)
    for i in range(40):
        c = h.new_conversation(f"chat {i}")
        h.add_message(c, "user", "hello " * 200)
    h.close()


HISTORIES = {
    "garbage-bytes": lambda p: p.write_bytes(os.urandom(8192)),
    "truncated": lambda p: (_real_history(p), os.truncate(p, p.stat().st_size // 3)),
    "text-file": lambda p: p.write_text("not a database\n" * 100),
    "wrong-schema": lambda p: sqlite3.connect(str(p)).executescript(
        "CREATE TABLE conversations (id INTEGER PRIMARY KEY, name TEXT); PRAGMA user_version=1;"),
}


@pytest.mark.parametrize("case", sorted(HISTORIES))
def test_damaged_history_is_moved_aside_and_a_new_one_started(case, tmp_path):
    path = tmp_path / "history.sqlite3"
    HISTORIES[case](path)
    original = path.read_bytes()

    h = History(path)

    assert h.moved_aside is not None and h.moved_aside.name.startswith("history.sqlite3.corrupt-")
    assert h.moved_aside.read_bytes() == original                 # the user's data is kept as it was
    assert "damaged" in h.problem and str(h.moved_aside) in h.problem
    c = h.new_conversation("fresh")                                # the new database works
    h.add_message(c, "user", "hi")
    h.close()
    h2 = History(path)                                             # and is sound on the next start
    assert h2.problem is None and [x.title for x in h2.conversations()] == ["fresh"]
    h2.close()


def test_history_with_a_folder_in_its_place(tmp_path):
    path = tmp_path / "history.sqlite3"
    (path / "inside").mkdir(parents=True)
    (path / "inside" / "keep.txt").write_text("mine")

    h = History(path)

    assert "a folder is in its place" in h.problem
    assert (h.moved_aside / "inside" / "keep.txt").read_text() == "mine"
    h.new_conversation("x")
    assert path.is_file()
    h.close()


def test_history_wal_and_shm_move_with_the_database(tmp_path):
    path = tmp_path / "history.sqlite3"
    path.write_bytes(os.urandom(4096))
    Path(f"{path}-wal").write_bytes(b"wal bytes")
    Path(f"{path}-shm").write_bytes(b"shm bytes")

    h = History(path)

    assert Path(f"{h.moved_aside}-wal").read_bytes() == b"wal bytes"
    assert Path(f"{h.moved_aside}-shm").read_bytes() == b"shm bytes"
    h.close()


def test_empty_history_file_is_simply_a_new_database(tmp_path):
    path = tmp_path / "history.sqlite3"
    path.write_bytes(b"")
    h = History(path)
    assert h.problem is None and h.moved_aside is None and h.conversations() == []
    h.close()
    assert [p.name for p in tmp_path.iterdir() if "corrupt" in p.name] == []


def test_history_on_a_read_only_disk_lives_in_memory(small_fs):
    fs = small_fs("4m", read_only=True, prepare=_real_history_at)
    before = (fs / "history.sqlite3").read_bytes()

    h = History(fs / "history.sqlite3")

    assert h.in_memory and "not saved" in h.problem
    h.new_conversation("x")                                         # the app still works
    h.close()
    assert (fs / "history.sqlite3").read_bytes() == before


def _real_history_at(folder: Path) -> None:
    _real_history(folder / "history.sqlite3")


# =================================================================== finding 4: two writers, one destination
def test_second_convert_to_the_same_destination_is_refused(tmp_path, tiny_src, capsys):
    dst = tmp_path / "out" / "Model.flash"
    dst.parent.mkdir()
    first, release = start_blocked_convert(tiny_src, dst, "first")

    rc, out, err = run_cli(capsys, "convert", tiny_src, dst, "--no-calibrate", "--overwrite")

    assert rc == 1 and "wrote" not in out
    assert f"is being written by another process (pid {first.pid})" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    finish(first, release)
    assert open_flash(dst).manifest.num_layers == 2                 # the first writer's result is whole
    assert hidden_leftovers(dst.parent) == [] and sorted(p.name for p in dst.parent.iterdir()) == ["Model.flash"]


def test_second_cli_process_gets_a_nonzero_exit(tmp_path, tiny_src):
    dst = tmp_path / "Model.flash"
    first, release = start_blocked_convert(tiny_src, dst, "first")

    r = subprocess.run([sys.executable, "-m", "mlx_flash.cli", "convert", str(tiny_src), str(dst), "--no-calibrate"],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)

    assert r.returncode == 1 and "wrote" not in r.stdout
    assert r.stderr.strip() == (f"error: {dst} is being written by another process (pid {first.pid}): wait for it "
                                "to finish or choose another destination")
    finish(first, release)
    open_flash(dst)


def test_library_import_and_rename_respect_the_lock(home, tiny_src, tiny_flash):
    models = home / "models"
    dst = models / "Tiny.flash"
    first, release = start_blocked_convert(tiny_src, dst, "first")

    with pytest.raises(DestinationBusy, match=f"pid {first.pid}"):
        library.import_model(tiny_flash, name="Tiny", calibrate=False)
    finish(first, release)
    assert library.import_model(tiny_flash, name="Other", calibrate=False) == models / "Other.flash"
    assert sorted(p.name for p in models.iterdir()) == ["Other.flash", "Tiny.flash"]


def test_default_model_preparation_waits_for_the_other_process(home, tiny_src, tmp_path):
    """Two processes preparing the default model: the second waits (saying so) and reuses the
    first one's result instead of failing or converting again."""
    folder = default_model.default_flash_dir()
    tiny_src = quantize_tiny(tiny_src, tmp_path / "Tiny-4bit")  # the default model is a 4-bit flash folder
    ready, release = home / "ready", home / "release"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from mlx_flash.atomic import destination_lock
        from mlx_flash.storage.format import convert_to_flash
        with destination_lock(Path({str(folder)!r})):
            Path({str(ready)!r}).write_text("locked")
            while not Path({str(release)!r}).exists():
                time.sleep(0.02)
            convert_to_flash(Path({str(tiny_src)!r}), Path({str(folder)!r}))
    """)
    other = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    wait_for(ready.exists, "the other process to take the lock", other)
    messages = []

    def progress(fraction, message):
        messages.append(message)
        if message.startswith("waiting"):
            release.write_text("go")   # let the other process finish while we wait

    assert default_model.ensure_default_flash(progress=progress, calibrate=False) == folder
    assert other.wait(timeout=WAIT_S) == 0
    assert f"waiting for process {other.pid} writing {folder.name}" in messages
    assert open_flash(folder).manifest.num_layers == 2
    assert not default_model.default_mlx_dir().exists()             # reused: nothing converted here
    assert hidden_leftovers(home / "models") == []


# =================================================================== finding 6: killed conversions
@pytest.mark.parametrize("calibrate", [False, True], ids=["convert", "calibrating-convert"])
def test_temp_folders_of_killed_converts_are_removed_live_ones_kept(home, tiny_src, calibrate, capsys):
    models = home / "models"
    victim, _ = start_blocked_convert(tiny_src, models / "Victim.flash", "victim", calibrate=calibrate)
    live, live_release = start_blocked_convert(tiny_src, models / "Live.flash", "live")
    victim_temps = [p for p in models.iterdir() if p.name.startswith(".Victim.flash.") and f"-{victim.pid}-" in p.name]
    assert victim_temps and (models / ".Victim.flash.lock").exists()

    victim.send_signal(signal.SIGKILL)
    victim.communicate()

    assert all(p.exists() for p in victim_temps)                    # what a kill leaves …
    rc, out, err = run_cli(capsys, "models")                        # … goes at the next listing
    assert rc == 0 and err == ""
    assert not any(p.exists() for p in victim_temps) and not (models / ".Victim.flash.lock").exists()
    live_temps = [p for p in models.iterdir() if f"-{live.pid}-" in p.name]
    assert live_temps, "a running conversion's temp folder must be kept"
    finish(live, live_release)
    (models / "victim.ready").unlink()
    assert library.convert_any(tiny_src, models / "Victim.flash") == models / "Victim.flash"
    assert hidden_leftovers(models) == []
    assert sorted(p.name for p in models.iterdir()) == ["Live.flash", "Victim.flash"]


def test_a_new_convert_next_to_a_killed_one_cleans_up(tmp_path, tiny_src):
    out = tmp_path / "out"
    out.mkdir()
    victim, _ = start_blocked_convert(tiny_src, out / "A.flash", "victim")
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    (out / "victim.ready").unlink()
    assert hidden_leftovers(out)

    library.convert_any(tiny_src, out / "B.flash")                 # not a library folder: cleaned by the writer

    assert hidden_leftovers(out) == [] and sorted(p.name for p in out.iterdir()) == ["B.flash"]


# =================================================================== finding 5: full and read-only disks
def test_space_check_says_needed_and_free(small_fs, tiny_src, capsys):
    fs = small_fs("1m")

    rc, out, err = run_cli(capsys, "convert", tiny_src, fs / "Model.flash", "--no-calibrate")

    assert rc == 1 and out == ""
    assert err.startswith("error: not enough disk space for ") and "is needed and" in err and "is free on" in err
    assert len(err.strip().splitlines()) == 1
    assert list(fs.iterdir()) == []


def test_space_check_of_gguf_to_flash_counts_both_stages(small_fs, tmp_path):
    src = tmp_path / "tiny.gguf"
    write_gguf(src)
    one_stage = output_bytes(src)
    fs = small_fs(str(one_stage + (4 << 20)))                      # room for one stage, not for two

    with pytest.raises(WriteError) as ei:
        library.convert_any(src, fs / "Model.flash")

    msg = str(ei.value)
    assert ei.value.errno == errno.ENOSPC and "temporary mlx folder" in msg and "then the flash folder" in msg
    assert list(fs.iterdir()) == []


@pytest.mark.parametrize("stage", ["ffn.bin", "dense.safetensors"])
def test_disk_full_while_writing_a_flash_folder(stage, small_fs, tiny_src):
    fs = small_fs("4m")
    when = ((lambda f, m: True) if stage == "ffn.bin"              # the first report: before any layer
            else (lambda f, m: m == "layer 2/2"))                   # after the FFN: MLX writes the dense part
    with pytest.raises(WriteError) as ei:
        library.convert_any(tiny_src, fs / "Model.flash", progress=filler_at(fs, when))

    msg = str(ei.value)
    assert ei.value.errno == errno.ENOSPC and "\n" not in msg
    assert msg.startswith(f"disk full while writing {fs / 'Model.flash'}") and "nothing was written" in msg
    assert sorted(p.name for p in fs.iterdir()) == ["filler"]       # no temp folder, no lock, no model


def test_failed_overwrite_leaves_the_existing_model_untouched(small_fs, tiny_src, tiny_flash):
    fs = small_fs("4m")
    dst = fs / "Model.flash"
    shutil.copytree(tiny_flash, dst)
    before = snapshot(dst)

    with pytest.raises(WriteError, match="disk full"):
        library.convert_any(tiny_src, dst, overwrite=True, progress=filler_at(fs, lambda f, m: True))

    assert snapshot(dst) == before
    open_flash(dst)
    assert sorted(p.name for p in fs.iterdir()) == ["Model.flash", "filler"]


def test_manifest_save_on_a_full_disk_keeps_the_old_manifest(small_fs, tiny_flash):
    """The calibration's save path (predictors + manifest) writes through atomic_path."""
    fs = small_fs("2m")
    dst = fs / "Model.flash"
    shutil.copytree(tiny_flash, dst)
    before = snapshot(dst)
    fill(fs)
    m = Manifest.load(dst)
    m.predictors = {"id": "x" * 20000}

    with pytest.raises(WriteError) as ei:
        m.save(dst)

    assert ei.value.errno == errno.ENOSPC and str(ei.value).startswith("disk full while writing")
    assert snapshot(dst) == before and hidden_leftovers(fs) == []


def test_import_on_a_full_disk_leaves_nothing(small_fs, tiny_flash):
    fs = small_fs("4m")
    with pytest.raises(WriteError, match="disk full"):
        library.import_model(tiny_flash, name="Copy", root=fs, calibrate=False,
                             progress=filler_at(fs, lambda f, m: m.startswith("copying ")))
    assert sorted(p.name for p in fs.iterdir()) == ["filler"]


def test_convert_to_a_read_only_disk(small_fs, tiny_src, capsys):
    fs = small_fs("4m", read_only=True)

    rc, out, err = run_cli(capsys, "convert", tiny_src, fs / "Model.flash", "--no-calibrate")

    assert rc == 1 and out == ""
    assert err.strip() == (f"error: cannot write {fs / 'Model.flash'}: the disk is read-only "
                           f"({fs / '.Model.flash.lock'}); nothing was written (choose a folder you can write to)")
    assert list(fs.iterdir()) == []


def test_remove_and_rename_on_a_read_only_disk_keep_the_model(small_fs, tiny_flash):
    fs = small_fs("4m", read_only=True, prepare=lambda d: shutil.copytree(tiny_flash, d / "Model.flash"))
    before = snapshot(fs)

    with pytest.raises(WriteError, match="read-only"):
        library.remove_model(fs / "Model.flash")
    with pytest.raises(WriteError, match="read-only"):
        library.rename_model(fs / "Model.flash", "Other")

    assert snapshot(fs) == before


def test_a_broken_entry_can_be_removed(home, tiny_flash):
    models = home / "models"
    shutil.copytree(tiny_flash, models / "Broken.flash")
    (models / "Broken.flash" / "manifest.json").write_text("[]")
    (models / "NotAModel").mkdir()

    library.remove_model(models / "Broken.flash")
    with pytest.raises(ValueError, match="not a model folder"):
        library.remove_model(models / "NotAModel")

    assert sorted(p.name for p in models.iterdir()) == ["NotAModel"]


def test_history_on_a_disk_that_fills_up_goes_on_in_memory(small_fs):
    fs = small_fs("1m")
    h = History(fs / "history.sqlite3")
    told = []
    h.on_problem = told.append
    c = h.new_conversation("kept")
    h.add_message(c, "user", "saved before the disk filled")
    fill(fs)
    for i in range(200):                                           # until SQLite needs a new page
        h.add_message(c, "assistant", f"answer {i} " + "x" * 2000)

    assert h.in_memory and len(told) == 1 and "could not be saved" in told[0]
    assert len(h.messages(c)) == 201                               # nothing lost in this session
    h.close()
    (fs / "filler").unlink()
    h2 = History(fs / "history.sqlite3")                           # what was on disk is still sound
    assert h2.problem is None
    assert h2.messages(h2.conversations()[0].id)[0].content == "saved before the disk filled"
    h2.close()


def test_old_unnamed_temporaries_go_after_a_day_recent_ones_stay(home):
    """Temp folders of versions before the pid was in the name: a day old means abandoned."""
    models = home / "models"
    old = [models / ".convert-ab_cd123", models / ".Model.flash.tmp-k2j4h5g6"]
    recent = models / ".import-zz9yy8xx"
    for p in old + [recent]:
        (p / "x").mkdir(parents=True)
    day_ago = time.time() - 25 * 3600
    for p in old:
        os.utime(p, (day_ago, day_ago))

    assert library.list_models() == []

    assert not any(p.exists() for p in old) and recent.is_dir()


def test_lock_refuses_another_thread_and_reenters_in_the_same_one(tmp_path):

    dst = tmp_path / "Model.flash"
    errors = []
    with destination_lock(dst), destination_lock(dst):             # re-entrant in this thread
        t = threading.Thread(target=lambda: errors.append(_try(dst)))
        t.start()
        t.join()
    assert isinstance(errors[0], DestinationBusy) and f"pid {os.getpid()}" in str(errors[0])
    assert list(tmp_path.iterdir()) == []                          # the lock file went with the lock


def _try(dst):
    try:
        with destination_lock(dst):
            return None
    except DestinationBusy as e:
        return e


def test_temp_files_of_a_killed_calibration_inside_a_model_go_at_listing(home, tiny_flash):
    """A calibration killed while it saved leaves ``.predictors.safetensors.tmp-PID-…`` in the model."""
    model = home / "models" / "Model.flash"
    shutil.copytree(tiny_flash, model)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        stale = model / f".predictors.safetensors.tmp-{dead.pid}-0123abcd.k1x.safetensors"
        live = model / f".manifest.json.tmp-{alive.pid}-89abcdef.zz.tmp"
        stale.write_bytes(b"x" * 1000)
        live.write_bytes(b"y")
        before = {p.name for p in model.iterdir() if not p.name.startswith(".")}

        assert [m.name for m in library.list_models()] == ["Model.flash"]

        assert not stale.exists() and live.exists()
        assert {p.name for p in model.iterdir() if not p.name.startswith(".")} == before
    finally:
        alive.kill()
        alive.wait()


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder even root cannot write into (``chattr +i``: immutable, EPERM); ``chmod`` would not
    stop root. Skipped where chattr is missing or the filesystem does not support it."""
    d = tmp_path / "locked"
    d.mkdir()
    r = subprocess.run(["chattr", "+i", str(d)], capture_output=True, text=True) if sys.platform == "linux" else None
    if r is None or r.returncode:
        pytest.skip(f"cannot make an immutable folder: {r.stderr.strip() if r else 'not Linux'}")
    try:
        yield d
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)


def test_convert_into_a_folder_without_permission(unwritable_dir, tiny_src, capsys):
    rc, out, err = run_cli(capsys, "convert", tiny_src, unwritable_dir / "Model.flash", "--no-calibrate")

    assert rc == 1 and out == ""
    assert err.strip() == (f"error: cannot write {unwritable_dir / 'Model.flash'}: permission denied "
                           f"({unwritable_dir / '.Model.flash.lock'}); nothing was written "
                           "(choose a folder you can write to)")
    assert list(unwritable_dir.iterdir()) == []


def test_a_kill_between_the_renames_of_an_overwrite_puts_the_old_model_back(home, tiny_flash):
    """Overwriting moves the old folder to ``.NAME.old-PID-…`` then the new one in; a kill between
    the two leaves no model under the name: the next scan moves the old one back, never deletes it."""
    models = home / "models"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = models / f".Model.flash.old-{dead.pid}-0badc0de"
    shutil.copytree(tiny_flash, aside)
    shutil.copytree(tiny_flash, models / f".Model.flash.tmp-{dead.pid}-0badc0df")   # the new, unpublished
    before = snapshot(aside)

    assert [m.name for m in library.list_models()] == ["Model.flash"]

    assert snapshot(models / "Model.flash") == before and hidden_leftovers(models) == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="tells zombies by /proc (Linux)")
def test_a_killed_process_not_yet_reaped_counts_as_dead(tmp_path):
    """A SIGKILLed convert whose parent has not waited for it yet is a zombie: kill(pid, 0) still
    succeeds, but its temporaries are abandoned all the same."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        tmp = tmp_path / f".M.flash.tmp-{child.pid}-0123abcd"
        tmp.mkdir()
        assert pid_alive(child.pid) and clean_stale(tmp_path) == [] and tmp.exists()
        child.send_signal(signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{child.pid}").exists()
                 or Path(f"/proc/{child.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z",
                 "the child to die")
        assert not pid_alive(child.pid)                             # not reaped: a zombie
        assert clean_stale(tmp_path) == [tmp] and not tmp.exists()
    finally:
        child.kill()
        child.wait()
