"""Drive the real window with the real default model and save screenshots.

    xvfb-run -s "-screen 0 1400x900x24" .venv/bin/python -m mlx_flash_app.screenshots [--out docs/screenshots]

With ``--first-run`` it first starts as a new user does (see ``first_run``): run it with
``MLX_FLASH_HOME`` set to an empty folder for ``first_run.png`` and ``first_answer.png``.
Saves ``chat.png`` (a chat with answers), ``stats.png`` (the performance panel during
generation), ``import.png`` (an import in progress), ``library.png`` and
``speed_test.png``. Uses the normal data folder (or
``$MLX_FLASH_HOME``); the default model is prepared on first use, as in the app. The
import it shows is cancelled, so nothing is added to the library.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import shiboken6
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication

from mlx_flash import default_model
from mlx_flash.stats import process_rss
from mlx_flash.units import fmt_bytes

from . import theme
from .main_window import MainWindow

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlx_flash_app.screenshots")
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=880)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--bench-policies", action="store_true",
                    help="the speed test also compares the cache policies (about 15 more runs)")
    ap.add_argument("--first-run", action="store_true",
                    help="start as a new user does: the window prepares the default model when the data folder "
                         "has none (first_run.png at 30%%), then answers the first suggested question "
                         "(first_answer.png); prints the process's memory after loading and after the answer")
    ap.add_argument("--only-first-run", action="store_true", help="stop after --first-run's screenshots")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    app = QApplication.instance() or QApplication([sys.argv[0]])
    app.setApplicationName("mlx-flash")
    theme.apply(app)

    def spin(cond, timeout=600.0, what="") -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            app.processEvents()
            if cond():
                return True
            time.sleep(0.01)
        print(f"timed out waiting for {what}", file=sys.stderr)
        return False

    def settle(seconds=0.4):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)

    def shot(widget, name):
        settle()
        p = out / name
        widget.grab().save(str(p))
        print(f"saved {p}")

    if args.first_run:
        if not first_run(args, app, spin, settle, shot):
            return 1
        if args.only_first_run:
            return 0

    win = MainWindow()
    win.settings.remove("last_model")  # always the built-in model
    win.resize(args.width, args.height)
    win.move(0, 0)
    win.show()
    win.nav_panel.setChecked(True)
    win.right.setCurrentIndex(0)
    win.start()
    if not spin(lambda: win.engine is not None, 900, "the model"):
        return 1
    win.chat_settings.set_values({"temperature": 0.0, "top_p": 1.0, "max_tokens": 200, "system_prompt": ""})
    win.new_chat()

    def ask(text, timeout=600):
        done = []
        win.answer_finished.connect(done.append)
        win.send(text)
        spin(lambda: done, timeout, "an answer")
        win.answer_finished.disconnect(done.append)
        return done[0] if done else None

    ask("What is the capital of France?")
    ask("Give me three short tips for writing clear Python code, as a bulleted list.")
    settle(0.8)
    win.chat.scroll_to_bottom()
    shot(win, "chat.png")

    # the performance panel while an answer streams
    win.chat_settings.set_values({"temperature": 0.7, "top_p": 0.9, "max_tokens": 400, "system_prompt": ""})
    win.new_chat()
    win.send("Write a short story about a robot who learns to paint.")
    spin(lambda: win.stats_panel.count >= 60 or not win.generating, 600, "tokens")
    win.stats_panel.flush()
    shot(win, "stats.png")
    if win.generating:
        win.stop()
    spin(lambda: not win.generating, 60, "the stop")

    # an import in progress (cancelled afterwards: nothing is kept)
    src = default_model.default_mlx_dir()
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(src))])
    pos = QPointF(win.width() / 2, win.height() / 2)
    QApplication.sendEvent(win, QDragEnterEvent(pos.toPoint(), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier))
    shot(win, "drop.png")  # the overlay a drag shows
    QApplication.sendEvent(win, QDropEvent(pos, Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier))
    spin(lambda: win.library.progress.bar.value() >= 250 or not win.library.importing, 600, "import progress")
    shot(win, "import.png")
    win.library.cancel_import()
    spin(lambda: not win.library.importing, 120, "the cancel")
    win.library_notice.hide()
    win.notice.hide()
    settle(0.3)
    shot(win, "library.png")

    # the speed test
    if not args.skip_bench:
        win.show_page(0)
        dlg = win.open_speed_test(win.engine_path)
        dlg.resize(1280, 820)
        dlg.tokens.setValue(16 if args.bench_policies else 32)
        dlg.probe.setChecked(True)
        dlg.policies.setChecked(args.bench_policies)
        dlg.run()
        spin(lambda: not dlg.running, 1800, "the speed test")
        dlg.close_btn.setFocus()
        settle(0.8)
        shot(dlg, "speed_test.png")
        dlg.close()

    win.close()
    shiboken6.delete(win)
    return 0


def first_run(args, app, spin, settle, shot) -> bool:
    """The first ten minutes: window, preparation (if the data folder has no default model),
    first answer. Prints the progress cadence and the process's RSS (``Stats.process_rss``'s
    reading) after the model loaded and after the first answer."""
    win = MainWindow()
    win.settings.remove("last_model")
    win.resize(args.width, args.height)
    win.move(0, 0)
    win.show()
    win.nav_panel.setChecked(True)
    win.right.setCurrentIndex(0)
    t0 = time.monotonic()
    win.start()
    prepared = win._preparer is not None
    if prepared:
        stamps = []
        win._preparer.progress.connect(lambda f, m: stamps.append((time.monotonic(), f)))
        spin(lambda: win.banner.bar.value() >= 300 or win._preparer is None, 1800, "first-run progress")
        shot(win, "first_run.png")
    if not spin(lambda: win.engine is not None, 3600, "the model"):
        return False
    t_ready = time.monotonic() - t0
    if prepared and stamps:
        gaps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
        print(f"prepared in the window in {stamps[-1][0] - t0:.0f} s; {len(stamps)} progress updates, longest gap "
              f"{max(gaps or [0]):.1f} s")
    settle(1.0)
    rss_loaded = process_rss()
    win.chat_settings.set_values({"temperature": 0.0, "top_p": 1.0, "max_tokens": 120, "system_prompt": ""})
    done = []
    win.answer_finished.connect(done.append)
    win.send(win.chat.empty.SUGGESTIONS[0])
    spin(lambda: done, 900, "the first answer")
    settle(0.8)
    shot(win, "first_answer.png")
    meta = done[0]["meta"] if done else {}
    print(f"{'first run (prepared in a worker process)' if prepared else 'normal start'}: model ready after "
          f"{t_ready:.0f} s; RSS after loading {fmt_bytes(rss_loaded)}, after the first answer "
          f"{fmt_bytes(process_rss())}; first token {meta.get('first_token_s')} s, {meta.get('tokens_per_s')} tok/s; "
          f"answer: {done[0]['text'][:80]!r}" if done else "no answer")
    win.close()
    shiboken6.delete(win)
    return bool(done)


if __name__ == "__main__":
    sys.exit(main())
