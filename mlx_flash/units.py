"""The one byte formatter every figure the program prints goes through (CLI, bench, app)."""

from __future__ import annotations

from typing import Optional


def fmt_bytes(n: Optional[float]) -> str:
    """``1.2 GB``, ``350.0 MB``, ``12 B`` (decimal units, as disk tools show); ``–`` for None."""
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop returns at TB


def fmt_duration(seconds: float) -> str:
    """``45 s``, ``2 min 05 s``, ``1 h 03 min``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def eta_text(fraction: float, elapsed: float) -> str:
    """``"1 min 10 s so far, about 2 min 05 s left"``: the time left at the rate measured so far
    (no estimate before 3% and 5 s: too little to measure); ``""`` before anything ran."""
    if elapsed <= 0:
        return ""
    if fraction < 0.03 or elapsed < 5 or fraction >= 1.0:
        return f"{fmt_duration(elapsed)} so far"
    return f"{fmt_duration(elapsed)} so far, about {fmt_duration(elapsed * (1 - fraction) / fraction)} left"
