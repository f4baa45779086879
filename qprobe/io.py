"""Files on disk: JSONL rows, feature matrices aligned with rows, atomic writes.

Everything here reads or writes files and raises `QProbeError` with the file and
line at fault; nothing here computes features, rewards or probes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from qprobe.errors import QProbeError

FEATURES_FORMAT = "qprobe-features v1"


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` on success.

    A reader never sees a half-written file, and a crash leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps_row(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, default=_json_default)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows atomically; return how many."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(dumps_row(row) + "\n")
            n += 1
    return n


# --------------------------------------------------------------------------- reading rows
def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the rows of a JSONL file (plain or .gz); blank lines are skipped.

    Raises QProbeError naming the file and line for a missing file, a corrupt
    .gz, bad encoding, malformed JSON or a line that is not a JSON object. A
    UTF-8 byte-order mark at the start is accepted.
    """
    path = Path(path)
    if not path.exists():
        raise QProbeError(f"{path}: no such file")
    if path.is_dir():
        raise QProbeError(f"{path}: is a folder, not a JSONL file")
    opener = open
    if path.suffix == ".gz":
        import gzip

        opener = gzip.open  # type: ignore[assignment]
    with opener(path, "rb") as f:
        lineno = 0
        while True:
            try:
                raw = f.readline()
            except (EOFError, OSError) as e:  # gzip: truncated stream, not gzip at all, bad CRC
                what = "corrupt or truncated gzip data" if path.suffix == ".gz" else "cannot be read"
                raise QProbeError(f"{path}:{lineno + 1}: {what} ({e})") from None
            if not raw:
                break
            lineno += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise QProbeError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if lineno == 1 and line.startswith("\ufeff"):  # a UTF-8 byte-order mark (Windows editors)
                line = line[1:]
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                what = "truncated JSON" if not line.endswith("\n") else "malformed JSON"
                raise QProbeError(f"{path}:{lineno}: {what} ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise QProbeError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield row


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return list(iter_jsonl(path))


def require_fields(rows: list[dict], fields: Iterable[str], path: str | os.PathLike, hint: str = "") -> None:
    """Raise QProbeError naming the first row (1-based line of data) missing a field."""
    for i, row in enumerate(rows, 1):
        for field in fields:
            if field not in row:
                extra = f" ({hint})" if hint else ""
                raise QProbeError(f"{path}: row {i} has no '{field}' field{extra}")


def check_unique_keys(rows: list[dict], path: str | os.PathLike, keys: tuple[str, ...] = ("prompt_id", "sample")) -> None:
    seen: dict[tuple, int] = {}  # key -> first row number
    for i, row in enumerate(rows, 1):
        key = tuple(row.get(k) for k in keys)
        if key in seen:
            shown = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key))
            raise QProbeError(f"{path}: row {i} duplicates row {seen[key]} ({shown})")
        seen[key] = i


def row_key(row: dict) -> str:
    """The identity of a completion row within its file: prompt_id and sample (and `prefix`, for a prefix row)."""
    key = [row.get("prompt_id"), row.get("sample")] + ([row["prefix"]] if "prefix" in row else [])
    return json.dumps(key, ensure_ascii=False)


def rows_digest(rows: Iterable[dict]) -> str:
    """A hash of the row keys and their order, stored with features to check alignment."""
    h = hashlib.sha256()
    for row in rows:
        h.update(row_key(row).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- features
def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def save_features(path: str | os.PathLike, X: np.ndarray, rows: list[dict], extractor: dict) -> None:
    """Save a feature matrix aligned with `rows`, with the extractor's identity.

    `.safetensors` keeps everything in one file; any other name (`.npy`) writes the
    matrix with numpy and a `<name>.json` sidecar with the identity and row digest.
    """
    path = Path(path)
    X = np.ascontiguousarray(X)
    if X.ndim != 2 or X.shape[0] != len(rows):
        raise QProbeError(f"{path}: features of shape {X.shape} do not line up with {len(rows)} rows")
    meta = {
        "format": FEATURES_FORMAT,
        "extractor": extractor,
        "n_rows": len(rows),
        "rows_digest": rows_digest(rows),
    }
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        with atomic_path(path) as tmp:
            save_file({"features": X}, str(tmp), metadata={"qprobe": json.dumps(meta)})
        return
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, X, allow_pickle=False)
    with atomic_path(_meta_path(path)) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))


def load_features(path: str | os.PathLike, rows: list[dict] | None = None) -> tuple[np.ndarray, dict]:
    """Load features and their metadata; check they line up with `rows` when given.

    Returns (X of shape (n_rows, n_features) float32, meta). Refuses NaN or inf.
    """
    path = Path(path)
    if not path.exists():
        raise QProbeError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                meta = json.loads((f.metadata() or {}).get("qprobe", "{}"))
                X = f.get_tensor("features")
        else:
            X = np.load(path, allow_pickle=False)
            mp = _meta_path(path)
            meta = json.loads(mp.read_text()) if mp.exists() else {}
    except QProbeError:
        raise
    except Exception as e:  # numpy / safetensors raise many types for a corrupt file
        raise QProbeError(f"{path}: not a readable feature file ({type(e).__name__}: {e})") from None
    if X.ndim != 2:
        raise QProbeError(f"{path}: features must be a 2-D matrix, got shape {X.shape}")
    X = X.astype(np.float32, copy=False)
    bad = ~np.isfinite(X)
    if bad.any():
        r = int(np.argwhere(bad)[0][0])
        raise QProbeError(f"{path}: row {r + 1} has NaN or infinite features")
    if rows is not None:
        if X.shape[0] != len(rows):
            raise QProbeError(f"{path}: {X.shape[0]} feature rows do not line up with {len(rows)} data rows")
        digest = meta.get("rows_digest")
        if digest is not None and digest != rows_digest(rows):
            raise QProbeError(f"{path}: features were computed for other rows (or another order) than the data file")
    return X, meta


def finite_or_error(value: Any, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise QProbeError(f"{where}: reward {value!r} is not a number") from None
    if not math.isfinite(v):
        raise QProbeError(f"{where}: reward {value!r} is not finite")
    return v
