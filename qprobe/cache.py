"""A content-addressed on-disk cache for completions and features.

Keys are hashes of (the producer's identity, the exact input); values are JSON or
float32 vectors. It is one SQLite file in WAL mode: each `put` commits, so a run
killed at any moment keeps everything it finished, and several processes may
share one cache directory at once (SQLite does the locking; we use it rather than
hand-written lock files for exactly that reason).

It does not decide what to compute: the samplers and embedders ask it first.
The file is marked as qprobe's (``PRAGMA application_id``); a file that is not
an SQLite database, that SQLite finds corrupt, or that belongs to another
application is one `QProbeError` naming it, and is neither changed nor
emptied. A cache written before the mark existed (only qprobe's one ``kv``
table, same columns) is marked when opened; an entry whose value cannot be decoded counts as missing,
so it is computed again and overwritten.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from qprobe.errors import QProbeError, one_line

APPLICATION_ID = 0x51507262  # "QPrb": PRAGMA application_id of qprobe's cache files
_KV_COLUMNS = [("k", "TEXT", 1), ("kind", "TEXT", 0), ("v", "BLOB", 0)]  # (name, type, pk) of our one table
DEFAULT_CACHE_DIR = Path(os.environ.get("QPROBE_CACHE", Path.home() / ".cache" / "qprobe"))


def make_key(identity: dict | str, payload: Any) -> str:
    """sha256 over a canonical JSON of the producer identity and the input."""
    blob = json.dumps([identity, payload], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class Cache:
    """Key -> value store in `<directory>/cache.sqlite`. Thread-safe; process-safe."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else DEFAULT_CACHE_DIR
        self.path = self.directory / "cache.sqlite"
        self._local = threading.local()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._open()
        except (sqlite3.DatabaseError, OSError) as e:
            raise self._error(e) from None

    def _error(self, e: Exception) -> QProbeError:
        return QProbeError(f"{self.path}: cache unusable ({one_line(e)}); delete it or give another --cache-dir")

    def _claim(self, c: sqlite3.Connection) -> None:
        """Refuse a database that is not qprobe's; mark a new (or pre-mark qprobe) one as ours."""
        app_id = c.execute("PRAGMA application_id").fetchone()[0]
        if app_id == APPLICATION_ID:
            return
        tables = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")]
        ours = app_id == 0 and (not tables or (tables == ["kv"] and [
            (r[1], r[2].upper(), r[5]) for r in c.execute("PRAGMA table_info(kv)")] == _KV_COLUMNS))
        if not ours:
            named = " with tables " + ", ".join(tables[:3]) if tables else ""
            raise QProbeError(f"{self.path}: not a qprobe cache (another application's SQLite database{named}); "
                              "it was left as it was: give another --cache-dir")
        c.execute(f"PRAGMA application_id={APPLICATION_ID}")

    def _open(self) -> None:
        # WAL is a property of the database file, set once here. Changing the journal
        # mode can fail with "database is locked" at once, without waiting for the busy
        # timeout, while another process writes; so retry it for a while.
        c = self._conn()
        self._claim(c)  # before anything writes to the file
        for attempt in range(600):
            try:
                c.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == 599:
                    raise
                time.sleep(0.1)
        c.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, kind TEXT, v BLOB)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:  # one connection per thread; per-connection settings only
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    # -- raw
    def get_many(self, keys: Iterable[str]) -> dict[str, tuple[str, bytes]]:
        keys = list(keys)
        out: dict[str, tuple[str, bytes]] = {}
        try:
            conn = self._conn()
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                q = f"SELECT k, kind, v FROM kv WHERE k IN ({','.join('?' * len(chunk))})"
                for k, kind, v in conn.execute(q, chunk):
                    out[k] = (kind, v)
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None
        return out

    def put_many(self, items: Iterable[tuple[str, str, bytes]]) -> None:
        items = list(items)
        try:
            conn = self._conn()
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT OR REPLACE INTO kv (k, kind, v) VALUES (?, ?, ?)", items)
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None

    # -- typed helpers
    def get_json(self, keys: Iterable[str]) -> dict[str, Any]:
        out = {}
        for k, (kind, v) in self.get_many(keys).items():
            if kind == "json":
                try:
                    out[k] = json.loads(v)
                except (ValueError, TypeError, RecursionError):  # a damaged entry: computed again
                    continue
        return out

    def put_json(self, items: dict[str, Any]) -> None:
        self.put_many((k, "json", json.dumps(v, ensure_ascii=False).encode()) for k, v in items.items())

    def get_vectors(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        return {k: np.frombuffer(v, dtype=np.float32) for k, (kind, v) in self.get_many(keys).items()
                if kind == "f32" and isinstance(v, bytes) and len(v) % 4 == 0}  # else damaged: computed again

    def put_vectors(self, items: dict[str, np.ndarray]) -> None:
        self.put_many((k, "f32", np.asarray(v, dtype=np.float32).tobytes()) for k, v in items.items())

    def __len__(self) -> int:
        try:
            return self._conn().execute("SELECT COUNT(*) FROM kv").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None

    def stats(self) -> dict:
        """Entries by kind (``json``: completions and rewards, ``f32``: feature vectors) and bytes on disk."""
        try:
            counts = dict(self._conn().execute("SELECT kind, COUNT(*) FROM kv GROUP BY kind").fetchall())
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None
        files = [self.path, self.path.with_name(self.path.name + "-wal")]
        return {"path": str(self.path), "entries": counts, "bytes": sum(f.stat().st_size for f in files if f.exists())}

    def clear(self) -> int:
        """Delete every entry and give the space back; returns how many were deleted.

        Safe while another process uses the cache (SQLite locks): that process only
        finds its finished work gone and recomputes it.
        """
        try:
            conn = self._conn()
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                n = conn.execute("DELETE FROM kv").rowcount
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None
        return n

    def __bool__(self) -> bool:  # an empty cache is still a cache (`cache or default` must keep it)
        return True

    @staticmethod
    def null() -> "Cache":
        return NullCache()


class NullCache(Cache):
    """A cache that stores nothing (`--no-cache`)."""

    def __init__(self):  # noqa: D401 - no directory
        self.directory = None

    def get_many(self, keys):
        return {}

    def put_many(self, items):
        return None

    def __len__(self):
        return 0
