"""Workers on QThreads (napari/superqt style): started / yielded / finished / errored signals.

The inference itself lives in ``mlx_flash``; a worker only runs a Qt-free
callable on a thread and forwards what it yields. ``request_stop()`` is
checked between yields (generation stops within one token).
"""

from __future__ import annotations

import traceback
from typing import Any, Callable, Iterator, Optional

from PySide6.QtCore import QObject, QThread, Signal, Slot

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
        except Exception as e:  # noqa: BLE001 - every failure reaches the UI as a message
            from mlx_flash.progress import Cancelled

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
