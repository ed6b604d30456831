"""Chat history in SQLite (WAL), Qt-free.

One database file in the user data folder (``paths.data_dir() / "history.sqlite3"``)
holds conversations and their messages. Every write commits at once, and the app
writes an answer's partial text while it streams (status ``streaming``), so a crash
or a kill mid-answer loses at most the last half second: on the next start
:meth:`History.recover` marks those messages ``interrupted``.

Message status: ``complete`` | ``streaming`` (being written now) | ``stopped`` (the
user pressed Stop) | ``interrupted`` (the app died while it streamed) | ``error``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from mlx_flash import paths

SCHEMA_VERSION = 1
DB_FILENAME = "history.sqlite3"

COMPLETE, STREAMING, STOPPED, INTERRUPTED, ERROR = "complete", "streaming", "stopped", "interrupted", "error"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    model TEXT,
    system_prompt TEXT,
    settings TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'complete',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


def default_path() -> Path:
    return paths.data_dir() / DB_FILENAME


@dataclass
class Conversation:
    id: int
    title: str
    created: float
    updated: float
    model: Optional[str] = None
    system_prompt: Optional[str] = None
    settings: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Message:
    id: int
    conversation_id: int
    role: str
    content: str
    status: str = COMPLETE
    created: float = 0.0
    updated: float = 0.0
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def incomplete(self) -> bool:
        return self.status in (STREAMING, INTERRUPTED, STOPPED, ERROR)


def _loads(s: Optional[str]) -> dict:
    try:
        v = json.loads(s or "{}")
        return v if isinstance(v, dict) else {}
    except (json.JSONDecodeError, TypeError):
        return {}


_COLUMNS = {
    "conversations": {"id", "title", "created", "updated", "model", "system_prompt", "settings"},
    "messages": {"id", "conversation_id", "role", "content", "status", "created", "updated", "meta"},
}


class _Unusable(Exception):
    """The file is not a usable history database (damaged, or not SQLite at all)."""


class _NotWritable(Exception):
    """The database cannot be written here (read-only, full disk, no permission, newer schema)."""


def _aside_path(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cand, i = path.with_name(f"{path.name}.corrupt-{stamp}"), 2
    while cand.exists() or Path(f"{cand}-wal").exists():
        cand, i = path.with_name(f"{path.name}.corrupt-{stamp}-{i}"), i + 1
    return cand


class History:
    """The chat history database. Use from one thread (the GUI thread in the app).

    Opening never fails for a bad file: a damaged database (not SQLite, malformed, failing
    ``quick_check``, tables without the needed columns, a folder in its place) is moved aside
    to ``history.sqlite3.corrupt-YYYYmmdd-HHMMSS`` (with its ``-wal``/``-shm`` files) and a new
    one is started; a database that cannot be written (read-only or full disk, no permission,
    written by a newer mlx-flash) is left alone and the history lives in memory for this
    session. :attr:`problem` then says what happened, for the app to tell the user;
    :attr:`moved_aside` is where the damaged file went.
    """

    def __init__(self, path: Union[str, Path, None] = None):
        self.path = Path(path) if path is not None else default_path()
        self.problem: Optional[str] = None
        self.moved_aside: Optional[Path] = None
        self.in_memory = False
        self.on_problem: Optional[Callable[[str], None]] = None
        self._db: Optional[sqlite3.Connection] = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open(self.path)
        except _Unusable as e:
            self.close()
            try:
                self.moved_aside = self._move_aside()
                self._open(self.path)
            except (OSError, sqlite3.Error, _Unusable) as e2:
                self.close()
                self._open_memory(f"the chat history {self.path} is damaged ({e}) and could not be moved aside "
                                  f"({e2})")
                return
            self.problem = (f"The chat history was damaged ({e}) and could not be read. It was kept as "
                            f"{self.moved_aside} and a new, empty history was started.")
        except _NotWritable as e:
            self.close()
            self._open_memory(str(e))
        except (OSError, sqlite3.Error) as e:
            self.close()
            self._open_memory(f"{self.path} cannot be opened ({e})")

    def _open(self, path: Path) -> None:
        if path.is_dir():
            raise _Unusable("a folder is in its place")
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as f:
                if f.read(16) != b"SQLite format 3\x00":  # not SQLite at all: judged without SQLite touching it
                    raise _Unusable("file is not a database")
            self._check(path)
        db = self._db = sqlite3.connect(str(path), isolation_level=None, timeout=10.0)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable against process crashes in WAL mode
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise
            raise _NotWritable(f"{path} cannot be written ({e})") from None
        except sqlite3.DatabaseError as e:
            raise _Unusable(str(e)) from None

    @staticmethod
    def _check(path: Path) -> None:
        """Validate an existing database through a read-only connection, which neither writes
        the file nor checkpoints or deletes its -wal (a file moved aside stays as it was)."""
        try:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
        except sqlite3.Error as e:
            raise _NotWritable(f"{path} cannot be opened ({e})") from None
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise _NotWritable(f"{path} was written by a newer mlx-flash (schema {version})")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise _Unusable(f"integrity check: {check}")
            for table, cols in _COLUMNS.items():
                have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                if have and not cols <= have:
                    raise _Unusable(f"table {table} lacks {', '.join(sorted(cols - have))}")
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e) or "unable to open" in str(e):
                raise _NotWritable(f"{path} cannot be opened ({e})") from None
            raise _Unusable(str(e)) from None
        except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
            raise _Unusable(str(e)) from None
        finally:
            db.close()

    def _open_memory(self, why: str) -> None:
        self.in_memory = True
        self._db = sqlite3.connect(":memory:", isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self.problem = f"Chats are not saved in this session: {why}."

    def _move_aside(self) -> Path:
        aside = _aside_path(self.path)
        os.replace(self.path, aside)
        for suffix in ("-wal", "-shm", "-journal"):
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                os.replace(side, Path(f"{aside}{suffix}"))
        return aside

    def _write(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        """Run a writing statement. When the disk refuses (full, read-only, I/O error), the history
        so far is copied into memory and this session goes on there: :attr:`problem` says so and
        :attr:`on_problem` (if set) is called once with the message; what is on disk stays as it was."""
        try:
            return self._db.execute(sql, args)
        except sqlite3.OperationalError as e:
            if self.in_memory or not any(w in str(e).lower() for w in ("full", "readonly", "read-only", "i/o")):
                raise
            mem = sqlite3.connect(":memory:", isolation_level=None)
            self._db.backup(mem)
            self._db.close()
            self._db = mem
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA foreign_keys=ON")
            self.in_memory = True
            self.problem = (f"The chat history could not be saved ({e}): what was saved before is kept in "
                            f"{self.path}; new messages are kept only until the app closes. Free up disk space "
                            "and restart to save again.")
            if self.on_problem is not None:
                self.on_problem(self.problem)
            return self._db.execute(sql, args)

    # --------------------------------------------------------------- life cycle
    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> "History":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def recover(self) -> int:
        """Mark answers left ``streaming`` by a previous run as ``interrupted``; return how many."""
        cur = self._write("UPDATE messages SET status=? WHERE status=?", (INTERRUPTED, STREAMING))
        return cur.rowcount

    # ------------------------------------------------------------ conversations
    def new_conversation(self, title: str = "New chat", *, model: Optional[str] = None,
                         system_prompt: Optional[str] = None, settings: Optional[dict] = None) -> int:
        now = time.time()
        cur = self._write(
            "INSERT INTO conversations(title, created, updated, model, system_prompt, settings) VALUES (?,?,?,?,?,?)",
            (title, now, now, model, system_prompt, json.dumps(settings or {})))
        return int(cur.lastrowid)

    def conversations(self) -> List[Conversation]:
        """All conversations, most recently updated first."""
        rows = self._db.execute("SELECT * FROM conversations ORDER BY updated DESC, id DESC").fetchall()
        return [self._conv(r) for r in rows]

    def conversation(self, conv_id: int) -> Optional[Conversation]:
        r = self._db.execute("SELECT * FROM conversations WHERE id=?", (conv_id,)).fetchone()
        return self._conv(r) if r else None

    def update_conversation(self, conv_id: int, *, title: Optional[str] = None, model: Optional[str] = None,
                            system_prompt: Optional[str] = None, settings: Optional[dict] = None,
                            touch: bool = True) -> None:
        sets, args = [], []
        for col, val in (("title", title), ("model", model), ("system_prompt", system_prompt)):
            if val is not None:
                sets.append(f"{col}=?")
                args.append(val)
        if settings is not None:
            sets.append("settings=?")
            args.append(json.dumps(settings))
        if touch:
            sets.append("updated=?")
            args.append(time.time())
        if sets:
            self._write(f"UPDATE conversations SET {', '.join(sets)} WHERE id=?", (*args, conv_id))

    def rename_conversation(self, conv_id: int, title: str) -> None:
        self.update_conversation(conv_id, title=title, touch=False)

    def delete_conversation(self, conv_id: int) -> None:
        self._write("DELETE FROM conversations WHERE id=?", (conv_id,))

    # ----------------------------------------------------------------- messages
    def messages(self, conv_id: int) -> List[Message]:
        rows = self._db.execute("SELECT * FROM messages WHERE conversation_id=? ORDER BY id", (conv_id,)).fetchall()
        return [self._msg(r) for r in rows]

    def message(self, msg_id: int) -> Optional[Message]:
        r = self._db.execute("SELECT * FROM messages WHERE id=?", (msg_id,)).fetchone()
        return self._msg(r) if r else None

    def add_message(self, conv_id: int, role: str, content: str, *, status: str = COMPLETE,
                    meta: Optional[dict] = None) -> int:
        now = time.time()
        cur = self._write(
            "INSERT INTO messages(conversation_id, role, content, status, created, updated, meta) "
            "VALUES (?,?,?,?,?,?,?)", (conv_id, role, content, status, now, now, json.dumps(meta or {})))
        self._write("UPDATE conversations SET updated=? WHERE id=?", (now, conv_id))
        return int(cur.lastrowid)

    def update_message(self, msg_id: int, content: Optional[str] = None, *, status: Optional[str] = None,
                       meta: Optional[dict] = None) -> None:
        sets, args = ["updated=?"], [time.time()]
        if content is not None:
            sets.append("content=?")
            args.append(content)
        if status is not None:
            sets.append("status=?")
            args.append(status)
        if meta is not None:
            sets.append("meta=?")
            args.append(json.dumps(meta))
        self._write(f"UPDATE messages SET {', '.join(sets)} WHERE id=?", (*args, msg_id))

    def delete_messages_from(self, conv_id: int, msg_id: int) -> None:
        """Delete message ``msg_id`` and every later one in the conversation (regenerate, edit)."""
        self._write("DELETE FROM messages WHERE conversation_id=? AND id>=?", (conv_id, msg_id))

    # ------------------------------------------------------------------- export
    def export_markdown(self, conv_id: int) -> str:
        conv = self.conversation(conv_id)
        if conv is None:
            raise KeyError(f"no conversation {conv_id}")
        lines = [f"# {conv.title}", ""]
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(conv.created))
        lines += [f"*{stamp}" + (f" · {conv.model}" if conv.model else "") + "*", ""]
        if conv.system_prompt:
            lines += ["> **System:** " + conv.system_prompt.replace("\n", "\n> "), ""]
        for m in self.messages(conv_id):
            who = "You" if m.role == "user" else ("Assistant" if m.role == "assistant" else m.role.title())
            lines += [f"## {who}", "", m.content.rstrip(), ""]
            note = []
            if m.role == "assistant":
                if m.meta.get("tokens"):
                    note.append(f"{m.meta['tokens']} tokens")
                if m.meta.get("tokens_per_s"):
                    note.append(f"{m.meta['tokens_per_s']:.1f} tok/s")
                if m.meta.get("seconds"):
                    note.append(f"{m.meta['seconds']:.1f} s")
            if m.status != COMPLETE:
                note.append(m.status)
            if note:
                lines += [f"*{' · '.join(note)}*", ""]
        return "\n".join(lines).rstrip() + "\n"

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _conv(r: sqlite3.Row) -> Conversation:
        return Conversation(r["id"], r["title"], r["created"], r["updated"], r["model"], r["system_prompt"],
                            _loads(r["settings"]))

    @staticmethod
    def _msg(r: sqlite3.Row) -> Message:
        return Message(r["id"], r["conversation_id"], r["role"], r["content"], r["status"], r["created"],
                       r["updated"], _loads(r["meta"]))


def title_from(text: str, limit: int = 48) -> str:
    """A conversation title from the first user message."""
    t = " ".join(text.split())
    return t if len(t) <= limit else t[: limit - 1].rstrip() + "…"
