"""Progress reporting shared by every long operation (convert, import, calibrate, bench).

A progress callback is ``callback(fraction: float, message: str) -> bool | None``.
Returning ``False`` asks the operation to stop: it cleans up what it started and
raises :class:`Cancelled`. ``None``/``True`` mean "go on".
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

from tqdm import tqdm

ProgressCallback = Callable[[float, str], Optional[bool]]


class Cancelled(Exception):
    """Raised by a long operation when its progress callback asked it to stop."""


def report(callback: Optional[ProgressCallback], fraction: float, message: str = "") -> None:
    """Call ``callback`` (if any); raise :class:`Cancelled` when it returns ``False``."""
    if callback is None:
        return
    if callback(min(max(fraction, 0.0), 1.0), message) is False:
        raise Cancelled(message or "cancelled")


def scaled(callback: Optional[ProgressCallback], start: float, end: float) -> Optional[ProgressCallback]:
    """A callback mapping a sub-task's 0..1 onto ``start..end`` of ``callback``."""
    if callback is None:
        return None

    def inner(fraction: float, message: str) -> Optional[bool]:
        return callback(start + (end - start) * fraction, message)

    return inner


def tqdm_callback(desc: str = "", disable: bool = False) -> ProgressCallback:
    """A progress callback drawing a tqdm bar on stderr (for the CLI).

    The bar appears on the first report, so an operation with nothing to do draws nothing.
    """
    state: dict = {}

    def cb(fraction: float, message: str) -> bool:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=1000, desc=desc, disable=disable, mininterval=0.25,
                                      bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
        step = int(fraction * 1000) - bar.n
        changed = message[:50] != state.get("message")
        state["message"] = message[:50]
        bar.set_postfix_str(message[:50], refresh=False)
        bar.update(step)
        if step == 0 and changed:  # a new message at the same fraction: show it (update(0) draws nothing)
            bar.refresh()
        if fraction >= 1.0 and not state.get("closed"):
            state["closed"] = True
            bar.close()
        return True

    return cb


def run_reporting(queue, fn: Callable, kwargs: dict, parent_pid: Optional[int] = None,
                  interval: float = 0.25) -> None:
    """Run ``fn(progress=..., **kwargs)`` and send what happens over ``queue`` (a
    ``multiprocessing`` queue): ``("progress", fraction, message)`` at most every
    ``interval`` seconds (and the last one), then ``("done", result)`` or ``("error", text)``.

    The entry point of a worker process (the app prepares models in one, so that the
    memory the preparation used goes back to the system when the process ends). ``fn``
    must be a module-level function (it is pickled by reference) and ``result`` picklable.
    When ``parent_pid`` is no longer this process's parent (the app died without cancelling),
    the next progress report cancels the work, which then cleans up after itself (and
    ``("done", None)`` is sent, as for any cancel).
    """

    last = [0.0]

    def cb(fraction: float, message: str) -> bool:
        if parent_pid is not None and os.getppid() != parent_pid:
            return False  # orphaned: nobody waits for the result
        now = time.monotonic()
        if now - last[0] >= interval or fraction >= 1.0:
            last[0] = now
            queue.put(("progress", float(fraction), str(message)))
        return True

    try:
        result = fn(progress=cb, **kwargs)
    except Cancelled:
        result = None
    except Exception as e:
        text = str(e) or type(e).__name__
        queue.put(("error", text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"))
        return
    queue.put(("done", result))
