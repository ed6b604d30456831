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
