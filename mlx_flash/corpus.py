"""Real English text for tests and evaluation, without committing copied books.

The King James Bible comes from Debian's ``bible-kjv`` package (its ``bible`` command
decompresses the text that ``bible-kjv-text`` installs). :func:`kjv_text` runs it once per
passage, strips the verse references so the result is plain prose (one paragraph per
chapter), and caches it under ``data_dir()/corpus/``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from .atomic import atomic_write_text
from .paths import data_dir

INSTALL_HINT = "apt-get install bible-kjv"

# `bible -f` (pretty-printing off) prints one verse per line: "Ge1:1 In the beginning ..."
# (books with digits: "1Sa3:4", "Song1:1").
_VERSE = re.compile(r"^(?P<book>\S*?)(?P<chapter>\d+):(?P<verse>\d+)\s+(?P<text>.*)$")


class CorpusUnavailable(RuntimeError):
    """The text cannot be produced on this machine (the message says what to install)."""


def _bible_command() -> Optional[str]:
    return shutil.which("bible")


def available() -> bool:
    """True when Debian's ``bible`` command (package ``bible-kjv``) is installed."""
    return _bible_command() is not None


def corpus_dir() -> Path:
    return data_dir() / "corpus"


def _cache_name(book_range: str) -> str:
    return "kjv-" + re.sub(r"[^A-Za-z0-9]+", "_", book_range).strip("_") + ".txt"


def verses_to_prose(output: str) -> str:
    """Turn ``bible -f`` output into prose: references dropped, verses of a chapter joined
    by spaces, chapters separated by a blank line."""
    paragraphs = []
    current: list[str] = []
    last_chapter = None
    for line in output.splitlines():
        line = line.strip()
        if not line:
            continue
        m = _VERSE.match(line)
        if m is None:  # a continuation line (should not happen with -f, kept anyway)
            current.append(line)
            continue
        chapter = (m["book"], m["chapter"])
        if last_chapter is not None and chapter != last_chapter and current:
            paragraphs.append(" ".join(current))
            current = []
        last_chapter = chapter
        current.append(m["text"])
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs) + ("\n" if paragraphs else "")


def kjv_text(book_range: str = "Genesis 1:1-50:26", *, cache: bool = True) -> str:
    """The King James text of ``book_range`` (any reference ``bible`` accepts) as prose.

    Raises :class:`CorpusUnavailable` when ``bible`` is not installed or prints nothing.
    """
    path = corpus_dir() / _cache_name(book_range)
    if cache and path.is_file():
        return path.read_text(encoding="utf-8")
    exe = _bible_command()
    if exe is None:
        raise CorpusUnavailable(f"the KJV corpus needs Debian's `bible` command: run `{INSTALL_HINT}`")
    try:
        # -f turns pretty-printing off: one "Ge1:1 text" line per verse, no pager, no
        # line wrapping; stdin is /dev/null so it never waits for interactive input.
        out = subprocess.run([exe, "-f", book_range], stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CorpusUnavailable(f"`bible -f {book_range!r}` failed: {e}") from e
    text = verses_to_prose(out)
    if not text.strip():
        raise CorpusUnavailable(f"`bible -f {book_range!r}` printed no verses")
    if cache:
        _atomic_write(path, text)
    return text


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_text(path, text)
