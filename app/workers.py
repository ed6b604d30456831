"""Workers on QThreads (napari/superqt style): started / yielded / finished / errored signals.

The inference itself lives in ``mlx_flash``; a worker only runs a Qt-free
callable on a thread and forwards what it yields. ``request_stop()`` is
checked between yields (generation stops within one token).

:class:`ProcessWorker` runs heavy one-off work (the first-run preparation) in a
worker process instead, so that its memory is returned when it ends.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as _queue
import traceback
from typing import Any, Callable, Iterator, Optional

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot

from mlx_flash.atomic import clean_stale
from mlx_flash.progress import Cancelled, run_reporting

#: Threads started by :func:`start` that have not finished yet (tests check it ends empty).
_live: "set[QThread]" = set()


def running_threads() -> list:
    """QThreads started by :func:`start` that are still running."""
    out = []
    for t in list(_live):
        try:
            if t.isRunning():
                out.append(t)
        except RuntimeError:  # deleted
            _live.discard(t)
    return out


class Worker(QObject):
    """Runs ``fn(worker)``; if it returns an iterator, each item is emitted as ``yielded``."""

    started = Signal()
    yielded = Signal(object)
    progress = Signal(float, str)
    finished = Signal(object)
    errored = Signal(str)

    def __init__(self, fn: Callable[["Worker"], Any]):
        super().__init__()
        self._fn = fn
        self._stop = False
        self._done = False
        self.thread: Optional[QThread] = None

    @property
    def done(self) -> bool:
        """True once ``run`` has returned (finished or errored)."""
        return self._done

    @property
    def running(self) -> bool:
        return self.thread is not None and not self._done

    # Called from the GUI thread; read from the worker thread (a bool is atomic enough).
    def request_stop(self) -> None:
        self._stop = True

    @property
    def stop_requested(self) -> bool:
        return self._stop

    def progress_callback(self, fraction: float, message: str) -> bool:
        """A ``mlx_flash.progress`` callback: emits progress, returns False once stop was requested."""
        self.progress.emit(fraction, message)
        return not self._stop

    @Slot()
    def run(self) -> None:
        self.started.emit()
        result = None
        try:
            out = self._fn(self)
            if isinstance(out, Iterator):
                for item in out:
                    self.yielded.emit(item)
                    if self._stop:
                        out.close()
                        break
            else:
                result = out
        except Exception as e:
            if isinstance(e, Cancelled):
                result = None
            else:
                traceback.print_exc()
                self._done = True
                self.errored.emit(_message(e))
                return
        self._done = True
        self.finished.emit(result)


def _message(e: BaseException) -> str:
    """A user-facing message: the text of well-known errors, else ``Type: text``."""
    text = str(e) or type(e).__name__
    if isinstance(e, (ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError)):
        return text
    return f"{type(e).__name__}: {text}"


def start(worker: Worker, parent: QObject) -> Worker:
    """Move ``worker`` to a new QThread owned by ``parent`` and start it; the thread quits when done."""
    thread = QThread(parent)
    worker.thread = thread
    worker.moveToThread(thread)
    thread.started.connect(worker.run)
    worker.finished.connect(thread.quit)
    worker.errored.connect(thread.quit)
    _live.add(thread)
    thread.finished.connect(lambda t=thread: _live.discard(t))
    thread.finished.connect(thread.deleteLater)
    thread.start()
    return worker


def wait(worker: Optional[Worker], ms: int = 30000) -> None:
    """Ask a worker to stop and wait for its thread (used on close and in tests)."""
    if worker is None or worker.thread is None:
        return
    worker.request_stop()
    try:
        if worker.thread.isRunning():
            worker.thread.quit()
            worker.thread.wait(ms)
    except RuntimeError:  # the thread object is already gone
        pass


class ProcessWorker(QObject):
    """Runs ``fn(progress=..., **kwargs)`` (a module-level ``mlx_flash`` function) in a worker
    *process* (``multiprocessing``, spawn), for heavy work whose memory must go back to the system
    afterwards (first-run preparation: GGUF → mlx → flash → calibration). Its progress arrives
    as ``progress`` signals (polled from a queue every ``poll_ms``), its return value as
    ``finished``, a failure as ``errored``. :meth:`cancel` kills the process and removes its
    temporaries from ``clean`` (:func:`mlx_flash.atomic.clean_stale`: the pid in their names
    is dead), then emits ``finished(None)``."""

    progress = Signal(float, str)
    finished = Signal(object)
    errored = Signal(str)

    def __init__(self, fn: Callable, kwargs: Optional[dict] = None, *, clean=None, poll_ms: int = 100,
                 parent: Optional[QObject] = None):
        super().__init__(parent)
        self._fn = fn
        self._kwargs = dict(kwargs or {})
        self._clean = clean
        self._poll_ms = poll_ms
        self._proc = None
        self._queue = None
        self._timer = None
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def running(self) -> bool:
        return self._proc is not None and not self._done

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> "ProcessWorker":
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no Qt, no threads, no MLX state
        self._queue = ctx.Queue()
        self._proc = ctx.Process(target=run_reporting, args=(self._queue, self._fn, self._kwargs, os.getpid()),
                                 name="mlx-flash-prepare", daemon=True)
        self._proc.start()
        self._timer = QTimer(self)
        self._timer.setInterval(self._poll_ms)
        self._timer.timeout.connect(self._poll)
        self._timer.start()
        return self

    def _drain(self) -> Optional[tuple]:
        """Emit queued progress; return the final message ("done"/"error") if it came."""
        while True:
            try:
                msg = self._queue.get_nowait()
            except _queue.Empty:
                return None
            except (EOFError, OSError):  # the pipe broke with the process
                return None
            if msg[0] == "progress":
                self.progress.emit(msg[1], msg[2])
            else:
                return msg

    def _poll(self) -> None:
        if self._done:
            return
        alive = self._proc.is_alive()
        final = self._drain()
        if final is None and not alive:
            final = self._drain()  # what was sent just before the exit
        if final is None:
            if alive:
                return
            final = ("error", f"the preparation process ended without a result (exit code {self._proc.exitcode})")
        self._end()
        if final[0] == "done":
            self.finished.emit(final[1])
        else:
            self.errored.emit(final[1])

    def _end(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.stop()
        if self._proc is not None:
            self._proc.join(5)
        if self._queue is not None:
            self._queue.close()

    def cancel(self) -> None:
        """Kill the process now, remove its temporaries, emit ``finished(None)``."""
        if self._done or self._proc is None:
            return
        self._proc.kill()
        self._proc.join()
        self._end()
        if self._clean is not None:
            clean_stale(self._clean)
        self.finished.emit(None)
