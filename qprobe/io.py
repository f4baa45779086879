"""Files on disk: JSONL rows, feature matrices aligned with rows, safe writes.

Everything here reads or writes files and raises `QProbeError` with the file and
line at fault; nothing here computes features, rewards or probes.

Writes (`output_path`, `write_jsonl`, `save_features`):

* a regular file (or a new name) is replaced atomically: a temporary file beside
  it is renamed over it, so a reader never sees half a file and a crash leaves the
  old one whole. A new file gets mode 0666 less the umask, an existing one keeps
  its mode. A symlink is followed: its target is replaced, the link stays.
* a character device or FIFO (``/dev/stdout``, ``/dev/null``, a named pipe) is
  written through, never renamed over; other special files and folders are refused.
* ``*.gz`` names are written gzip-compressed (the readers accept them).
* `check_outputs` refuses an output that is one of the command's inputs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from qprobe.errors import QProbeError, one_line

FEATURES_FORMAT = "qprobe-features v1"
MAX_ID = 2**63 - 1  # prompt_id / sample must fit an int64


# --------------------------------------------------------------------------- safe writes
def _umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the racy read-and-restore
    os.umask(mask)
    return mask


def resolve_output(path: str | os.PathLike) -> tuple[Path, os.stat_result | None]:
    """Where a write to `path` lands, and what is there now.

    A symlink resolves to its target (a dangling one is refused); a folder is refused.
    Returns (the real path, its stat or None when nothing is there yet).
    """
    path = Path(path)
    real = Path(os.path.realpath(path))
    try:
        st = os.stat(real)
    except FileNotFoundError:
        if path.is_symlink():
            raise QProbeError(f"{path}: is a symlink to {real}, which does not exist; refusing to write through it") from None
        return real, None
    except OSError as e:
        raise QProbeError(f"{path}: cannot write ({e.strerror or one_line(e)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise QProbeError(f"{path}: is a folder, not a file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise QProbeError(f"{path}: is a special file (socket or block device); refusing to write to it")
    return real, st


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the path to write; on success it becomes `path`'s content.

    For a regular file or a new name: a temporary file beside the (symlink-resolved)
    target, renamed onto it on success; a crash or an error leaves the old file intact
    and no temporary behind. For a character device or FIFO: the device itself,
    written through. OSErrors (disk full, read-only, bad name) become one QProbeError.
    """
    shown = Path(path)
    try:
        real, st = resolve_output(shown)
        if st is not None and not stat.S_ISREG(st.st_mode):  # /dev/null, /dev/stdout, a FIFO
            yield real
            return
        real.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
        try:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask())
            os.close(fd)
            yield Path(tmp)
            os.replace(tmp, real)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except OSError as e:
        raise QProbeError(f"{shown}: cannot write ({e.strerror or one_line(e)})") from None


def check_outputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output that is, or lies inside, one of the inputs, or a folder holding one.

    Inputs may be files (a features file brings its ``.json`` sidecar) or folders (a
    probe). Paths compare after resolving symlinks, and by inode, so a hard link or
    a symlink to an input is caught too. Special files (``/dev/stdout``) are never inputs.
    """
    def real(p) -> Path:
        return Path(os.path.realpath(p))

    ins: list[tuple[Path, Path]] = []  # (as given, resolved), existing inputs only
    for p in inputs:
        if p is None or not os.path.exists(p):
            continue
        ins.append((Path(p), real(p)))
        side = _meta_path(Path(p))
        if Path(p).suffix != ".json" and side.exists():
            ins.append((side, real(side)))
    for out in outputs:
        if out is None:
            continue
        o = real(out)
        try:
            mode = os.stat(o).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                continue  # a device or FIFO is written through: it holds no input
        except OSError:
            mode = None
        for given, r in ins:
            same = o == r
            if not same and mode is not None:
                with contextlib.suppress(OSError):
                    same = os.path.samefile(o, r)  # a hard link
            if same or (r.is_dir() and r in o.parents) or (mode is not None and stat.S_ISDIR(mode) and o in r.parents):
                raise QProbeError(f"output {out} would overwrite the input {given}; write it elsewhere")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps_row(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, default=_json_default)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows safely (see the module docstring; ``*.gz`` is gzip); return how many."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        f = raw
        if Path(path).name.endswith(".gz"):
            import gzip

            f = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)  # no temp name, no time: reproducible
        try:
            for row in rows:
                try:
                    line = dumps_row(row).encode("utf-8")
                except (TypeError, ValueError, RecursionError) as e:  # UnicodeEncodeError: a lone surrogate
                    raise QProbeError(f"{path}: row {n + 1} cannot be written as JSON ({one_line(e)})") from None
                f.write(line + b"\n")
                n += 1
        finally:
            if f is not raw:
                f.close()
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
            except RecursionError:
                raise QProbeError(f"{path}:{lineno}: JSON nested too deeply") from None
            except ValueError as e:  # e.g. an integer of more than 4300 digits
                raise QProbeError(f"{path}:{lineno}: unreadable JSON ({one_line(e)})") from None
            if not isinstance(row, dict):
                raise QProbeError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if "\\u" in line:  # only a \uD800-style escape can make a lone surrogate
                bad = _lone_surrogate(row)
                if bad is not None:
                    raise QProbeError(f"{path}:{lineno}: field {bad!r} holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                                      "which is not text")
            yield row


def _lone_surrogate(value: Any, field: str = "") -> str | None:
    """The field holding a string with a lone surrogate, if any (nested fields as a.b.0)."""
    stack = [(field, value)]
    while stack:
        name, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return name or "(row)"
        elif isinstance(v, dict):
            for k, x in v.items():
                if _lone_surrogate(k) is not None:
                    return f"{name}.{k!r}" if name else repr(k)
                stack.append((f"{name}.{k}" if name else k, x))
        elif isinstance(v, list):
            stack.extend((f"{name}.{i}", x) for i, x in enumerate(v))
    return None


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
    """Refuse a row whose keys have the wrong type, or that repeats an earlier row's keys.

    ``prompt_id`` is a string or an integer; ``sample`` a non-negative integer; both
    integers fit an int64 (JSON ``true`` and ``1.0`` are not integers here).
    """
    seen: dict[tuple, int] = {}  # key -> first row number
    for i, row in enumerate(rows, 1):
        key = tuple(row.get(k) for k in keys)
        for k, v in zip(keys, key):
            if k not in row:
                continue  # require_fields says which rows need which fields
            if k == "sample":
                ok = type(v) is int and 0 <= v <= MAX_ID
                want = "a non-negative integer"
            else:
                ok = type(v) is str or (type(v) is int and -MAX_ID <= v <= MAX_ID)
                want = "a string or an integer"
            if not ok:
                shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
                raise QProbeError(f"{path}: row {i}: '{k}' must be {want} (int64), got {type(v).__name__} {shown}")
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


def check_features_output(path: str | os.PathLike) -> None:
    """Refuse a features output that is not a regular file or a new name (a device, a pipe, a folder)."""
    _, st = resolve_output(path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise QProbeError(f"{path}: features go to a regular file (with a sidecar), not a device or pipe")


def save_features(path: str | os.PathLike, X: np.ndarray, rows: list[dict], extractor: dict) -> None:
    """Save a feature matrix aligned with `rows`, with the extractor's identity.

    `.safetensors` keeps everything in one file; any other name (`.npy`) writes the
    matrix with numpy and a `<name>.json` sidecar with the identity and row digest.
    """
    path = Path(path)
    X = np.ascontiguousarray(X)
    if X.ndim != 2 or X.shape[0] != len(rows):
        raise QProbeError(f"{path}: features of shape {X.shape} do not line up with {len(rows)} rows")
    check_features_output(path)
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


def _mmap_safetensors(path: Path) -> tuple[np.ndarray, dict]:
    """The `features` tensor of a safetensors file as a read-only memory map, and the raw qprobe metadata.

    The format is an 8-byte little-endian header length, a JSON header, then the raw
    tensors; numpy maps float16/32/64 directly. Other dtypes (bfloat16) are read whole.
    """
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    raw = (header.get("__metadata__") or {}).get("qprobe")
    info = header["features"]
    dtype = {"F16": np.float16, "F32": np.float32, "F64": np.float64}.get(info["dtype"])
    if dtype is None:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as sf:
            return sf.get_tensor("features"), raw
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        raise ValueError(f"tensor 'features' of shape {shape} does not fill bytes {start}..{end}")
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape), raw


def load_features(path: str | os.PathLike, rows: list[dict] | None = None,
                  unchecked: bool = False) -> tuple[np.ndarray, dict]:
    """Open features and their metadata; check they line up with `rows` when given.

    Returns (X of shape (n_rows, n_features) float32, meta). A float32 matrix
    (`.npy` or `.safetensors`) comes back as a read-only memory map: rows are read
    from disk when used, so a matrix larger than RAM can be trained on and scored
    (`QProbe.fit`, `predict` and `select` stream over it). Other dtypes are read
    whole and converted. Refuses NaN or inf (checked block by block) and non-numeric dtypes.
    With `rows`, features must record the rows they were computed for (the ``.json``
    sidecar of a ``.npy``, the metadata of a ``.safetensors``); a bare matrix is
    refused unless ``unchecked=True`` (the caller vouches that its row order is the
    rows' order).
    """
    path = Path(path)
    if not path.exists():
        raise QProbeError(f"{path}: no such file")
    mp = _meta_path(path)
    try:
        if path.suffix == ".safetensors":
            where = path
            X, raw = _mmap_safetensors(path)
        else:
            where = mp
            X = np.load(path, mmap_mode="r", allow_pickle=False)
            raw = mp.read_text(encoding="utf-8") if mp.exists() else None
    except QProbeError:
        raise
    except Exception as e:  # numpy / safetensors raise many types for a corrupt file
        raise QProbeError(f"{path}: not a readable feature file ({type(e).__name__}: {one_line(e)})") from None
    meta = _parse_meta(raw, where)
    if not isinstance(X, np.ndarray) or X.dtype.kind not in "biuf":
        raise QProbeError(f"{path}: features must be numbers, got dtype {getattr(X, 'dtype', type(X).__name__)}")
    if X.ndim != 2:
        raise QProbeError(f"{path}: features must be a 2-D matrix, got shape {X.shape}")
    if X.dtype != np.float32:
        X = np.array(X, dtype=np.float32)  # a plain in-memory array, not a memmap-typed copy
    step = max(1, (1 << 22) // max(1, X.shape[1]))  # ~16 MB of float32 per block
    for s in range(0, X.shape[0], step):
        bad = ~np.isfinite(X[s : s + step])
        if bad.any():
            r = s + int(np.argwhere(bad)[0][0])
            raise QProbeError(f"{path}: row {r + 1} has NaN or infinite features")
    if rows is not None:
        if X.shape[0] != len(rows):
            raise QProbeError(f"{path}: {X.shape[0]} feature rows do not line up with {len(rows)} data rows")
        digest = meta.get("rows_digest")
        if digest is None and not unchecked:
            where = f"no sidecar {mp.name}" if path.suffix != ".safetensors" else "no qprobe metadata"
            raise QProbeError(f"{path}: {where} records which rows these features belong to; give "
                              "--features-unchecked if its rows are in the data file's order")
        if digest is not None and digest != rows_digest(rows):
            raise QProbeError(f"{path}: features were computed for other rows (or another order) than the data file")
    return X, meta


def _parse_meta(raw: str | None, where: Path) -> dict:
    """The features' metadata (sidecar or safetensors header), checked for shape."""
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except RecursionError:
        raise QProbeError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:
        raise QProbeError(f"{where}: not a features sidecar ({one_line(e)})") from None
    if not isinstance(meta, dict):
        raise QProbeError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    for field, types in (("rows_digest", (str,)), ("extractor", (dict,)), ("n_rows", (int,)), ("format", (str,))):
        if meta.get(field) is not None and not isinstance(meta[field], types):
            raise QProbeError(f"{where}: field '{field}' must be {types[0].__name__}, got {type(meta[field]).__name__}")
    return meta


def finite_or_error(value: Any, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise QProbeError(f"{where}: reward {shown} is not a number (or too large)") from None
    if not math.isfinite(v):
        raise QProbeError(f"{where}: reward {value!r} is not finite")
    return v
