"""Probe files: save and load a fitted ``QProbe`` as a directory, without pickle.

A probe directory holds ``probe.safetensors`` (coef, intercept, mean, scale and
any hidden layer, float64) and ``config.json`` (format version, objective,
beta, n_features, hyper-parameters, embedder identity and a sha256 checksum,
``_digest``, over the weights and the rest of the config). ``_save_probe``
writes into a temporary directory beside the target and swaps it into place
atomically, under a lock, leaving nothing behind (see ``_replace_dir``);
``_load_probe`` refuses another format version, a checksum mismatch,
unexpected tensors or shapes, and bad hyper-parameters, each with one
``QProbeError`` line.

Not here: fitting or using a probe (:mod:`qprobe.probe`), feature files
(:mod:`qprobe.io`).
"""
from __future__ import annotations

import numpy as np

from qprobe.errors import QProbeError, one_line

FORMAT = "qprobe-probe v1"
_CONFIG, _WEIGHTS = "config.json", "probe.safetensors"


def _digest(blob: bytes, config: dict) -> str:
    """sha256 over the weights and every config field but the checksum: a hand edit of either is refused."""
    import hashlib
    import json

    rest = json.dumps({k: v for k, v in config.items() if k != "sha256"}, sort_keys=True).encode()
    return hashlib.sha256(blob + b"\0" + rest).hexdigest()


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return list(v)  # signal names
    return str(v) if type(v).__name__ == "device" else None  # e.g. a RandomState: not recorded


def _save_probe(probe, path):
    import json
    from pathlib import Path

    from safetensors.numpy import save as st_save

    path = Path(path)
    tensors = {"coef": probe.coef_, "intercept": np.array([probe.intercept_]), "mean": probe.mean_, "scale": probe.scale_}
    if probe.hidden_coef_ is not None:
        tensors.update(hidden_coef=probe.hidden_coef_, hidden_intercept=probe.hidden_intercept_)
    blob = st_save({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()})
    config = {
        "format": FORMAT,
        "objective": probe.objective,
        "beta": float(probe.beta),
        "n_features": int(probe.n_features_in_),
        "hidden": probe.hidden,
        "params": {k: _jsonable(v) for k, v in probe.get_params().items()},
        "embedder": probe.embedder_,
    }
    if getattr(probe, "prefix_", False):  # a value probe of partial completions (`train --prefix`)
        config["prefix"] = True
    try:
        config["sha256"] = _digest(blob, config)
        text = json.dumps(config, indent=2, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as err:
        raise QProbeError(f"cannot save probe: embedder identity is not JSON ({one_line(err)})") from None
    try:
        _replace_dir(path, {_WEIGHTS: blob, _CONFIG: text.encode()})
    except OSError as err:
        raise QProbeError(f"{path}: cannot write the probe ({err.strerror or one_line(err)})") from None


def _replace_dir(path, files: dict) -> None:
    """Write ``files`` (name -> bytes) as the folder ``path``, replacing an old probe there.

    The new folder is built beside the target, then swapped in with one atomic
    ``renameat2(RENAME_EXCHANGE)`` (Linux; elsewhere two renames), and the old
    one deleted: a reader sees the old probe or the new one, never a mix or
    nothing. The swap holds an exclusive lock on the parent folder, so two saves
    into one place take turns (the last one wins) and leave no temporary folder
    behind. A symlink is followed: its target is replaced, the link stays.
    """
    import fcntl
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from qprobe.io import _umask

    given = Path(path)
    path = Path(os.path.realpath(given))
    if given.is_symlink() and not path.exists():
        raise QProbeError(f"{given}: is a symlink to {path}, which does not exist; refusing to write through it")

    def check_target():
        if path.exists() and not (path.is_dir() and set(os.listdir(path)) <= set(files)):
            raise QProbeError(f"{given} exists and is not a probe directory; refusing to replace it")

    check_target()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    lock = None
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        lock = os.open(path.parent, os.O_RDONLY)
        fcntl.flock(lock, fcntl.LOCK_EX)
        check_target()  # again, under the lock
        os.chmod(tmp, os.stat(path).st_mode & 0o7777 if path.exists() else 0o777 & ~_umask())
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            pass  # tmp now holds the old probe: removed below
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old.tmp", dir=path.parent))
            try:
                os.replace(path, old)
                os.replace(tmp, path)
            finally:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if lock is not None:
            os.close(lock)  # releases the flock
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a, b) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import errno
    import os

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _load_probe(cls, path):
    import json
    from pathlib import Path

    from safetensors.numpy import load as st_load

    path = Path(path)
    cfg_path, w_path = path / _CONFIG, path / _WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise QProbeError(f"{path} is not a probe directory (needs {_CONFIG} and {_WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise QProbeError(f"{cfg_path} is not a qprobe config (JSON nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise QProbeError(f"{cfg_path} is not a qprobe config ({one_line(err)})") from None
    fmt = cfg.get("format") if isinstance(cfg, dict) else None
    if fmt != FORMAT:
        shown = repr(fmt) if len(repr(fmt)) <= 40 else repr(fmt)[:37] + "..."
        raise QProbeError(f"{cfg_path} has format {shown}; this qprobe reads {FORMAT!r} only")
    for field, types in (("params", dict), ("n_features", int), ("embedder", dict), ("sha256", str)):
        if cfg.get(field) is not None and not isinstance(cfg[field], types):
            raise QProbeError(f"{cfg_path}: field '{field}' must be {types.__name__}, got {type(cfg[field]).__name__}")
    blob = w_path.read_bytes()
    try:
        digest = _digest(blob, cfg)
    except (RecursionError, ValueError) as err:
        raise QProbeError(f"{cfg_path} is not a qprobe config ({one_line(err) or 'nested too deeply'})") from None
    if digest != cfg.get("sha256"):
        raise QProbeError(f"{path}: weights or config do not match the checksum in {_CONFIG}: "
                          "the probe is corrupt or was edited by hand")
    try:
        t = st_load(blob)
        params = dict(cfg["params"])
        if isinstance(params.get("signals"), list):
            params["signals"] = tuple(params["signals"])  # JSON has no tuples
        probe = cls(**params)
        probe._check_params()
        d, h = int(cfg["n_features"]), params.get("hidden")
        if len(params.get("signals") or ()) > d:
            raise QProbeError(f"{cfg_path}: {len(params['signals'])} signals but only {d} features")
    except QProbeError:
        raise
    except Exception as err:  # noqa: BLE001 - any malformation is one user-facing error
        raise QProbeError(f"{path} is not a valid probe ({one_line(err)})") from None
    shapes = {"coef": (h or d,), "intercept": (1,), "mean": (d,), "scale": (d,)}
    if h is not None:
        shapes.update(hidden_coef=(d, h), hidden_intercept=(h,))
    if set(t) != set(shapes):
        raise QProbeError(f"{w_path} holds tensors {sorted(t)}, expected {sorted(shapes)}")
    for name, shape in shapes.items():
        if t[name].shape != shape or t[name].dtype != np.float64 or not np.isfinite(t[name]).all():
            raise QProbeError(f"{w_path}: tensor {name!r} has shape {t[name].shape}, expected {shape} finite float64")
    probe.coef_, probe.intercept_ = t["coef"], float(t["intercept"][0])
    probe.mean_, probe.scale_ = t["mean"], t["scale"]
    probe.hidden_coef_, probe.hidden_intercept_ = t.get("hidden_coef"), t.get("hidden_intercept")
    probe.n_features_in_, probe.loss_curve_, probe.embedder_ = d, [], cfg.get("embedder")
    probe.prefix_ = bool(cfg.get("prefix", False))
    return probe
