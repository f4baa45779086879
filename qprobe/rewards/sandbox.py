"""Run untrusted, model-written Python in a separate, limited process.

What it does: writes the program to a fresh temporary directory (deleted
afterwards), runs it under the interpreter running qprobe, with a wall-clock
timeout that kills the whole process tree, CPU/memory/file-size/process-count
rlimits, a scrubbed environment, stdin closed and output read through a
bounded buffer; then classifies the outcome into a small vocabulary:
``passed``, ``failed: <first line of the exception>``, ``timeout``,
``syntax error``, ``crash: <signal or exit code>``, ``memory``,
``output limit``.

Backends (``backend=`` argument, else ``$QPROBE_SANDBOX``, else auto):

``bwrap``
    bubblewrap: read-only root, new pid/net/ipc/uts namespaces (no network,
    the whole tree dies with its pid 1), tmpfs over /tmp, /var/tmp, /dev/shm,
    /home, /root, /run, only the work dir writable. As root, bwrap runs
    privileged and the program drops to a dedicated unused uid; otherwise
    bwrap uses an unprivileged user namespace. Chosen when a trial run works.
    As root it is not given ``--disable-userns``: that needs ``--unshare-user``,
    which as root maps the sandbox uid to the real root (the program could then
    read root-only files such as /etc/shadow). So a program may create a user
    namespace of its own, with capabilities over that namespace only.
``user``
    As root: the program runs as a dedicated unused uid (one per concurrent
    run), so root-owned files are read-only to it, it cannot signal other
    processes, RLIMIT_NPROC binds, and every process of that uid is killed and
    every file it left in /tmp, /var/tmp, /dev/shm removed afterwards. Also as
    root, where a network namespace can be created (CAP_SYS_ADMIN, which
    Docker's default profile withholds, and a util-linux ``unshare`` with
    ``--setuid``/``--setgid``; a trial run checks once per process), each run
    gets its own network namespace and nothing else: ``unshare --net`` creates
    it while still root, drops supplementary groups, sets gid and uid to the
    sandbox uid, then execs the interpreter. Its only interface is a loopback
    that is down, so no IP traffic of any kind (TCP, UDP, raw; to the host's
    127.0.0.1 too, by ctypes or a child process alike) and no abstract unix
    sockets. Where that trial fails, runs have the host's network, with a
    warning. As another user: rlimits and a new session only, no namespace.

What the ``user`` backend cannot protect against: network access when it has
no network namespace (non-root, or the trial failed: an audit hook refuses
Python-level sockets, but ctypes or ``subprocess`` + curl get around it);
unix sockets in the filesystem that the uid may open (the namespace does not
cover them; bwrap hides /run); writing to world-writable places other than the
temp dirs it cleans (and deleting others' files in world-writable, non-sticky
dirs);
zombies piling up when the system's init does not reap orphans; sleeping
processes outliving a scorer that is itself SIGKILLed (bwrap's
``--die-with-parent`` covers that). As root it runs the program with a system
Python of the same version when the sandbox uid cannot run ours (e.g. pyenv
under /root), with a warning. Run by a non-root user it also cannot protect
that user's files, processes (``os.kill(-1, 9)``) or secrets visible in
``/proc/<ppid>/environ``; a warning says so.

Both backends: world-readable files can be read (bwrap: outside the dirs it
hides); the total size of the files written to the work dir is bounded only
per file (RLIMIT_FSIZE) and by time. The interpreter runs with ``-S -s -P`` and a boot snippet rather than
``-I``, so that ``PYTHONHASHSEED=0`` applies (see ``_isolation.py``).

Not a defence against kernel exploits; not for Windows or macOS.
"""
from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

from qprobe.errors import QProbeError, one_line
from qprobe.rewards import _isolation as iso

BACKENDS = ("bwrap", "user")
_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
MAX_TIMEOUT_S = 3600.0  # a longer limit is a mistake (and 1e308 overflows the rlimits)
_POLL_S = 0.05     # how often the reader checks whether the program has exited
_DRAIN_S = 0.1     # after exit, how long to wait for output still in flight
_PROBE_TIMEOUT = 30.0  # first runs on a loaded machine can be slow
_SYNTAX = ("SyntaxError", "IndentationError", "TabError")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    Attributes
    ----------
    passed : bool
        True exactly when ``reason == "passed"`` (exit status 0, in time).
    reason : str
        One of ``passed``, ``failed: <Exception: message>``, ``timeout``,
        ``syntax error``, ``crash: <SIGNAL or exit code N>``, ``memory``,
        ``output limit``.
    stdout, stderr : str
        The last ``max_output`` bytes of each stream, decoded as UTF-8.
    duration : float
        Wall-clock seconds from start to exit (or to the kill).
    backend : str
        ``"bwrap"`` or ``"user"``.
    returncode : int or None
        Exit status as seen by qprobe (bwrap reports a signal N as 128 + N).
    """

    passed: bool
    reason: str
    stdout: str
    stderr: str
    duration: float
    backend: str
    returncode: int | None = None


_lock = threading.Lock()
_backend_cache: dict[str, str | None] = {}  # backend -> None if it works, else why not
# "user" -> None if its runs (as root) get their own network namespace, else why not;
# set by the user backend's trial run, absent before it
_netns_cache: dict[str, str | None] = {}
_python_cache: dict[str, str] = {}          # backend -> interpreter it runs
_uid_pool = iso.UidPool()
_warned_fallback: list[str] = []  # non-empty once the bwrap -> user fallback was announced


def sandbox_backend(backend: str | None = None) -> str:
    """Resolve which backend :func:`run_python` will use, checking it works.

    Parameters
    ----------
    backend : {"bwrap", "user"} or None
        None reads ``$QPROBE_SANDBOX``; if that is unset or ``auto``, use
        ``bwrap`` when a trial run succeeds, else ``user``.

    Returns
    -------
    str
        The backend name. Trial runs happen once per process and are cached.

    Raises
    ------
    QProbeError
        Unknown name, or the requested backend does not work here.
    """
    want = backend or os.environ.get("QPROBE_SANDBOX") or "auto"
    if want not in BACKENDS + ("auto",):
        raise QProbeError(f"unknown sandbox backend {want!r}; expected one of {', '.join(BACKENDS)} or auto")
    if want == "auto":
        why = _why_not("bwrap")
        if why is None:
            return "bwrap"
        if not _warned_fallback:
            _warned_fallback.append(why)
            warnings.warn(f"sandbox: bwrap unusable ({why}); using the weaker 'user' backend",
                          stacklevel=2)
        return _checked("user")
    return _checked(want)


def _checked(name: str) -> str:
    why = _why_not(name)
    if why is not None:
        raise QProbeError(f"sandbox backend {name!r} does not work here: {why}")
    return name


def _why_not(name: str) -> str | None:
    """None if ``name`` works here, else a one-line reason. Cached."""
    with _lock:
        if name not in _backend_cache:
            _backend_cache[name] = _probe(name)
        return _backend_cache[name]


def _probe(name: str) -> str | None:
    if not sys.platform.startswith("linux"):
        return "the sandbox needs Linux"
    if name == "bwrap" and not _bwrap_path():
        return "bwrap not found (apt-get install bubblewrap)"
    try:
        _python_cache[name] = _pick_python(name)
        if name == "user" and os.geteuid() == 0:
            _netns_cache[name] = why = _probe_netns()
            if why is not None:
                warnings.warn(f"sandbox: backend 'user' cannot put programs in their own network "
                              f"namespace here ({why}); they can reach the network by ctypes or "
                              "a subprocess", stacklevel=4)
        res = _execute("print('qprobe-ok')", name, _PROBE_TIMEOUT, 256, 4096, 8)
    except (OSError, subprocess.SubprocessError, QProbeError) as exc:
        return one_line(exc)
    if res.passed and "qprobe-ok" in res.stdout:
        return None
    detail = (res.stderr.strip().splitlines() or [res.reason])[-1]
    return f"trial run gave {res.reason!r} ({detail[:200]})"


_NETNS_CHECK = """\
import fcntl, os, socket, struct
def up(name):  # SIOCGIFFLAGS & IFF_UP
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = fcntl.ioctl(s, 0x8913, struct.pack("16sH14x", name.encode(), 0))
    return bool(struct.unpack("16sH14x", req)[1] & 1)
state = (os.getuid() == os.getgid() != 0, os.getgroups(), os.readlink("/proc/self/ns/net") != {host!r},
         [(name, up(name)) for _, name in socket.if_nameindex()])
print("qprobe-netns-ok" if state[0] and state[1:] == ([], True, [("lo", False)]) else state)
"""


def _probe_netns() -> str | None:
    """None if a ``user`` run as root can have its own network namespace, else why not.

    A trial run through the whole pipeline with the namespace on; the program
    checks that it runs as an unprivileged uid without supplementary groups,
    in a network namespace other than ours, whose only interface is a down
    loopback.
    """
    if not _unshare_path():
        return "unshare (util-linux) not found"
    try:
        host = os.readlink("/proc/self/ns/net")
        res = _execute(_NETNS_CHECK.format(host=host), "user", _PROBE_TIMEOUT, 256, 4096, 8,
                       netns=True)
    except (OSError, subprocess.SubprocessError, QProbeError) as exc:
        return one_line(exc)
    if res.passed and "qprobe-netns-ok" in res.stdout:
        return None
    if res.passed:
        return f"trial run not isolated: {res.stdout.strip()[:200]}"
    detail = (res.stderr.strip().splitlines() or [res.reason])[-1]
    return f"trial run gave {res.reason!r} ({detail[:200]})"


def _unshare_path() -> str | None:
    return shutil.which("unshare") or shutil.which("unshare", path=_SYSTEM_PATH)


def _pick_python(name: str) -> str:
    """The interpreter for the sandbox: ours, unless the sandbox uid can't run it.

    Only the ``user`` backend as root has that problem (bwrap binds the
    interpreter's directories into the sandbox): e.g. a pyenv Python under
    /root (mode 0700). Then a system Python of the same version is used.
    """
    if name == "bwrap" or os.geteuid() != 0:
        return sys.executable
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [sys.executable] + [
        p for p in (shutil.which(version, path=os.environ.get("PATH", "") + ":" + _SYSTEM_PATH),
                    f"/usr/bin/{version}", f"/usr/local/bin/{version}") if p and os.path.exists(p)]
    for cand in dict.fromkeys(candidates):
        with _uid_pool.lease(remove_files=False) as uid:
            try:
                ok = subprocess.run(
                    [cand, *iso.python_flags(), "-c", "import json, resource, runpy, site; site.main()"],
                    user=uid, group=uid, extra_groups=[], env={"PATH": _SYSTEM_PATH}, cwd="/",
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    timeout=_PROBE_TIMEOUT).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
        if ok:
            if cand != sys.executable:
                warnings.warn(f"sandbox: uid {uid} cannot run {sys.executable} "
                              f"({iso.blocking_dir(sys.executable)} is not searchable by others); "
                              f"running sandboxed code with {cand}", stacklevel=3)
            return cand
    raise QProbeError(
        f"backend 'user' runs code as an unprivileged uid, which cannot run {sys.executable} "
        f"({iso.blocking_dir(sys.executable)} is not searchable by others) and no other {version} "
        "was found; install bubblewrap or use a Python outside that directory")


def run_python(program: str, timeout: float = 3.0, memory_mb: int = 512,
               max_output: int = 64_000, *, backend: str | None = None,
               max_procs: int = 16, token: str | None = None) -> SandboxResult:
    """Run ``program`` in a sandbox and report how it ended.

    Parameters
    ----------
    program : str
        Python source, run as ``__main__``.
    timeout : float
        Wall-clock seconds before the whole process tree is killed,
        interpreter start-up (0.1-0.3 s) included.
    memory_mb : int
        Address-space limit (RLIMIT_AS) per process, in MiB.
    max_output : int
        Bytes of stdout + stderr allowed; more ends the run ("output limit").
    backend : {"bwrap", "user"} or None
        See :func:`sandbox_backend`.
    max_procs : int
        RLIMIT_NPROC for the program: processes *and threads* it may have.
    token : str or None
        When given, sent to the sandbox over stdin (not argv, environment or a file)
        and printed on its own line after ``program`` returns normally; the caller
        checks ``result.stdout`` for it. The program's own stdin is then empty.

    Returns
    -------
    SandboxResult
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise QProbeError(f"sandbox timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {timeout!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or not 16 <= memory_mb <= 1 << 20:
        raise QProbeError(f"sandbox memory_mb must be an integer in [16, {1 << 20}], got {memory_mb!r}")
    name = sandbox_backend(backend)
    if name == "user" and os.geteuid() != 0:
        warnings.warn("sandbox backend 'user' without root cannot protect your files, processes "
                      "or network; install bubblewrap", stacklevel=2)
    if token is not None and not (token.isascii() and token.isalnum() and 0 < len(token) <= 64):
        raise QProbeError("run_python: token must be 1-64 ASCII letters or digits")
    return _execute(program, name, timeout, memory_mb, max_output, max_procs, token=token)


def _execute(program: str, name: str, timeout: float, memory_mb: int, max_output: int,
             max_procs: int, netns: bool | None = None, token: str | None = None) -> SandboxResult:
    """``netns``: whether a ``user`` run as root gets its own network
    namespace; None: as the trial run found."""
    root = os.geteuid() == 0
    python = _python_cache.get(name, sys.executable)
    if netns is None:
        netns = name in _netns_cache and _netns_cache[name] is None
    lease = _uid_pool.lease(remove_files=name == "user") if root else nullcontext(None)
    with lease as uid:
        workdir = tempfile.mkdtemp(prefix="qprobe-sandbox-")
        try:
            main = os.path.join(workdir, "main.py")
            with open(main, "w", encoding="utf-8") as f:
                f.write(program)
            if uid is not None:
                # group root: privileged bwrap (root without CAP_DAC_OVERRIDE)
                # must still be able to chdir into it
                os.chown(workdir, uid, 0)
                os.chmod(workdir, 0o770)
            argv, kwargs = _command(name, python, workdir, main, uid, timeout, memory_mb, max_procs,
                                    netns, token=token is not None)
            return _supervise(argv, kwargs, name, timeout, max_output, uid, token)
        finally:
            iso.rmtree(workdir)


def _command(name, python, workdir, main, uid, timeout, memory_mb, max_procs, netns=False, token=False):
    """argv and Popen keyword arguments for one run."""
    if uid is None and name == "user":
        # RLIMIT_NPROC counts all processes of the real uid: leave ours room.
        max_procs += len(iso.pids_of_uid(os.getuid()))
    spec = {
        "limits": iso.rlimits(timeout, memory_mb, max_procs),
        # the bwrap boot starts as root and drops privileges itself; the user
        # backend's is started as the sandbox uid by Popen(user=...)
        "uid": uid if name == "bwrap" else None,
        "blocked": list(iso.NET_EVENTS) if name == "user" else [],
        "main": main,
        "token": token,
    }
    argv = [python, *iso.python_flags(), "-c", iso.BOOT, json.dumps(spec)]
    env = {
        "PATH": _SYSTEM_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }
    kwargs = dict(stdin=subprocess.PIPE if token else subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  env=env, cwd=workdir, close_fds=True, start_new_session=True)
    if name == "bwrap":
        bwrap = _bwrap_path()
        argv = iso.bwrap_args(bwrap, workdir, python, privileged=uid is not None,
                              has_size=_bwrap_has_size(bwrap)) + argv
    elif uid is not None and netns:
        # unshare (as root) makes the namespace, then setgroups([]), setgid,
        # setuid, and execs the interpreter: same pid, so same process group,
        # return code and cleanup as without it
        argv = [_unshare_path(), "--net", "--setgid", str(uid), "--setuid", str(uid), "--"] + argv
    elif uid is not None:
        kwargs.update(user=uid, group=uid, extra_groups=[])
    return argv, kwargs


_size_cache: dict[str, bool] = {}  # bwrap path -> knows --size


def _bwrap_path() -> str | None:
    return shutil.which("bwrap") or shutil.which("bwrap", path=_SYSTEM_PATH)


def _bwrap_has_size(bwrap: str) -> bool:
    if bwrap not in _size_cache:
        _size_cache[bwrap] = iso.bwrap_has_size(bwrap)
    return _size_cache[bwrap]


def _supervise(argv, kwargs, name, timeout, max_output, uid, token=None) -> SandboxResult:
    start = time.monotonic()
    proc = subprocess.Popen(argv, **kwargs)
    try:
        if token is not None:  # a few bytes: fits the pipe buffer, never blocks
            try:
                proc.stdin.write(token.encode() + b"\n")
                proc.stdin.close()
            except BrokenPipeError:
                pass
        stop, out, err = _collect(proc, start + timeout, max_output)
        duration = time.monotonic() - start
    finally:
        _kill_tree(proc, uid)
    rc = proc.returncode
    _raise_if_sandbox_failed(rc, err, name)
    reason = stop or _classify(rc, err, name)
    out_text, err_text = (b.decode("utf-8", errors="replace") for b in (out, err))
    return SandboxResult(reason == "passed", reason, out_text, err_text, duration, name, rc)


def _raise_if_sandbox_failed(rc: int | None, stderr: bytes, name: str) -> None:
    """Raise when the sandbox, not the program, failed: the boot's set-up, or bwrap's own.

    Such a run says nothing about the program, so it must not become a cached 0.
    """
    text = stderr.decode("utf-8", errors="replace")
    if rc == iso.BOOT_FAILED_RC and iso.BOOT_FAILED_MARK in text:
        line = next(ln for ln in text.splitlines() if iso.BOOT_FAILED_MARK in ln)
        raise QProbeError(f"the sandbox failed before the program ran ({line.strip()})")
    if name == "bwrap" and rc == 1 and text.startswith("bwrap: "):
        raise QProbeError(f"the sandbox failed before the program ran ({text.splitlines()[0].strip()})")


def _exited(proc) -> bool:
    """Has the child exited? Leaves it unreaped (WNOWAIT), so its pid and
    process group id cannot be recycled before we kill the group."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _collect(proc, deadline: float, max_output: int):
    """Read stdout/stderr until exit, deadline or output cap.

    Hand-written because ``Popen.communicate`` buffers everything a program
    prints (1 GB printed = 1 GB here) and cannot stop at an output cap; this
    keeps only the last ``max_output`` bytes of each stream.

    Returns ``(stop, stdout_tail, stderr_tail)``; ``stop`` is "timeout",
    "output limit" or None.
    """
    tails = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    fd_out, fd_err = list(tails)
    total, stop, exited_at = 0, None, None
    with selectors.DefaultSelector() as sel:
        for fd in tails:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                stop = "timeout"
                break
            if exited_at is None and _exited(proc):
                exited_at = now
            if exited_at is not None and now - exited_at > _DRAIN_S:
                break  # an orphaned child keeps the pipe open; it gets killed next
            for key, _ in sel.select(min(deadline - now, _POLL_S)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                total += len(chunk)
                tail = tails[key.fd]
                tail += chunk
                if len(tail) > max_output:
                    del tail[:-max_output]
            if total > max_output:
                stop = "output limit"
                break
    return stop, bytes(tails[fd_out]), bytes(tails[fd_err])


def _kill_tree(proc, uid) -> None:
    """Kill everything the run started; reap the child; close the pipes.

    As root, every process of the dedicated uid is killed first (this also
    catches children that left the process group with setsid), so a bwrap
    pid 1 can still reap them before it exits. Then the process group.
    """
    if uid is not None:
        iso.kill_uid(uid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # pgid still ours: the leader is not reaped yet
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
        pass
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _classify(rc: int | None, stderr: bytes, name: str) -> str:
    if rc == 0:
        return "passed"
    sig = -rc if rc is not None and rc < 0 else None
    if name == "bwrap" and rc is not None and 128 < rc < 128 + 65:
        sig = rc - 128  # bwrap exits 128 + N when its child died of signal N
    if sig == signal.SIGXCPU:
        return "timeout"
    exc = _exception_line(stderr.decode("utf-8", errors="replace"))
    if exc is not None:
        kind = exc.split(":", 1)[0].strip()
        if kind in _SYNTAX:
            return "syntax error"
        if kind == "MemoryError":
            return "memory"
        if sig is None:
            return "failed: " + exc[:300]
    if sig is not None:
        return "crash: " + _signal_name(sig)
    return f"crash: exit code {rc}"


def _exception_line(stderr: str) -> str | None:
    """First line of the last exception in a Python traceback, if any."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        for line in lines[starts[-1] + 1:]:
            if line and not line[0].isspace():
                return line.strip()
        return None
    for line in reversed(lines):  # e.g. a SyntaxError reported without a traceback
        if line.split(":", 1)[0] in _SYNTAX:
            return line.strip()
    return None


__all__ = ["BACKENDS", "SandboxResult", "run_python", "sandbox_backend"]
