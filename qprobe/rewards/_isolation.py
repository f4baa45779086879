"""Low-level pieces of the code sandbox: uids, limits, bwrap arguments, cleanup.

``sandbox.py`` decides *whether* and *how* to run a program; this module holds
the mechanics it needs that no library provides:

* a pool of dedicated, otherwise unused uids, one per concurrent sandbox when
  we run as root, so that RLIMIT_NPROC (which root ignores and which counts per
  uid) bounds each sandbox separately, and so that "kill every process of this
  uid" is a complete and safe cleanup (flock files in /run/qprobe-sandbox keep
  two qprobe processes from sharing a uid);
* finding and killing those processes (``/proc`` scan + pidfd, race-free);
* removing what a uid left in world-writable directories (``/tmp`` ...);
* the ``bwrap`` argument list and the boot snippet that applies rlimits,
  drops privileges and then runs the program inside the sandbox.

It does not choose a backend, read program output or classify results.
Linux only.
"""
from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

# systemd's docs/UIDS-GIDS.md leaves 60578..61183 unused (above regular users,
# below systemd-homed's and DynamicUser's ranges); we also skip any uid that has
# a passwd/group entry or a running process.
UID_FIRST = 60600
UID_LAST = 61183

# Sizes of the tmpfs mounts bwrap puts over /tmp, /var/tmp, /dev/shm: writes
# there live in RAM and do not count against RLIMIT_AS, so they must be capped.
TMPFS_BYTES = 64 * 1024 * 1024
FSIZE_BYTES = 16 * 1024 * 1024  # largest file a program may write
NOFILE = 256

# Directories bwrap hides behind an empty tmpfs: users' homes (keys, tokens),
# /run (docker/dbus sockets reachable despite --unshare-net), temp dirs.
HIDDEN_DIRS = ("/home", "/root", "/run", "/tmp", "/var/tmp")
_TMP_LIKE = ("/tmp", "/var/tmp")

# Runs first inside the sandbox process (as root under privileged bwrap, else as
# the sandbox user): rlimits, privilege drop, site, optional audit hook, then
# the program itself via runpy (same process, so limits and hook apply to it).
# When the boot's own set-up fails (limits, privilege drop), it writes this mark and
# the error to stderr and exits BOOT_FAILED_RC: the sandbox failed, not the program,
# and `sandbox.py` raises instead of scoring (a program that prints the mark itself
# and exits with that code gets an error, never a reward).
BOOT_FAILED_MARK = "qprobe-sandbox: boot failed:"
BOOT_FAILED_RC = 125
BOOT = """\
import json, os, resource, sys
_spec = json.loads(sys.argv[1])
try:
    for _name, _soft, _hard in _spec["limits"]:
        _res = getattr(resource, _name)
        _cap = resource.getrlimit(_res)[1]
        if _cap != resource.RLIM_INFINITY:
            _hard = min(_hard, _cap)
            _soft = min(_soft, _hard)
        resource.setrlimit(_res, (_soft, _hard))
    if _spec["uid"] is not None:
        os.setgroups([])
        os.setgid(_spec["uid"])
        os.setuid(_spec["uid"])
except BaseException as _e:
    os.write(2, ("qprobe-sandbox: boot failed: " + type(_e).__name__ + ": " + str(_e) + "\\n").encode())
    os._exit(125)
import site
site.main()
if _spec["blocked"]:
    def _audit(event, args, _blocked=frozenset(_spec["blocked"])):
        if event in _blocked:
            raise PermissionError("qprobe sandbox: " + event + " is not allowed")
    sys.addaudithook(_audit)
import runpy
sys.argv = [_spec["main"]]
_main = _spec["main"]
if _spec["token"]:
    # the completion token comes down stdin, never through argv, the environment or a
    # file; fd 0 then becomes /dev/null, and the token is written back only if the
    # program returns normally (no exception, no sys.exit, no os._exit)
    def _finish(_t=os.read(0, 64).strip(), _w=os.write, _flush=sys.stdout.flush):
        _flush()
        _w(1, b"\\n" + _t + b"\\n")
    _null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(_null, 0)
    os.close(_null)
    del _null
else:
    _finish = None
del _spec, _name, _soft, _hard, _res, _cap, json
runpy.run_path(_main, run_name="__main__")
if _finish is not None:
    _finish()
"""

# Audit events refused by the "user" backend, which has a network namespace only
# as root where one can be created (see sandbox.py). Without one this is best
# effort only: ctypes or a subprocess running curl get around it.
NET_EVENTS = ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
              "socket.getaddrinfo")


def python_flags() -> list[str]:
    """Interpreter flags for the boot: no site at startup, no user site.

    Not ``-I``: it implies ``-E``, which would ignore ``PYTHONHASHSEED=0`` (set
    for reproducible rewards); the environment is built from scratch anyway,
    so ``-E`` would add nothing. ``-P`` keeps the work dir off ``sys.path``.
    """
    return ["-S", "-s"] + (["-P"] if sys.version_info >= (3, 11) else [])


def rlimits(timeout: float, memory_mb: int, nproc: int) -> list[list]:
    """``[name, soft, hard]`` triples for the boot snippet."""
    cpu = int(timeout) + 2
    return [
        ["RLIMIT_AS", memory_mb << 20, memory_mb << 20],
        ["RLIMIT_CPU", cpu, cpu + 1],
        ["RLIMIT_FSIZE", FSIZE_BYTES, FSIZE_BYTES],
        ["RLIMIT_NOFILE", NOFILE, NOFILE],
        ["RLIMIT_CORE", 0, 0],
        ["RLIMIT_NPROC", nproc, nproc],
    ]


# ---------------------------------------------------------------- processes

def _uids_and_state(pid: int) -> tuple[set[int], str] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:  # gone, or not ours to read
        return None
    uids: set[int] = set()
    state = "?"
    for line in text.splitlines():
        if line.startswith("Uid:"):
            uids = {int(u) for u in line.split()[1:4]}  # real, effective, saved
        elif line.startswith("State:"):
            state = line.split()[1]
    return uids, state


def pids_of_uid(uid: int, zombies: bool = False) -> list[int]:
    """Processes whose real, effective or saved uid is ``uid``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _uids_and_state(int(name))
            if info and uid in info[0] and (zombies or info[1] != "Z"):
                found.append(int(name))
    return found


def kill_uid(uid: int, rounds: int = 100) -> bool:
    """SIGKILL every live process of ``uid``; True when none is left.

    Done by hand because nothing in the stdlib signals "all processes of a
    uid". A pidfd is opened *before* the uid is checked, so a pid recycled by
    an unrelated process is never signalled. Repeated until a scan is empty,
    which also catches children forked during a scan (a killed process cannot
    fork, and RLIMIT_NPROC bounds how many there can be).
    """
    for _ in range(rounds):
        pids = pids_of_uid(uid)
        if not pids:
            return True
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                info = _uids_and_state(pid)
                if info and uid in info[0]:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)
        time.sleep(0.002)
    return not pids_of_uid(uid)


def remove_files_of_uid(uid: int, roots=None, depth: int = 2) -> None:
    """Delete what ``uid`` created in world-writable directories.

    Without a mount namespace a sandbox user can write to ``/tmp`` and the
    like; with a dedicated uid everything it owns there is its own leftovers.
    Symlinks are removed, never followed.
    """
    if roots is None:
        roots = dict.fromkeys([tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"])
    for root in roots:
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if st.st_uid == uid:
                    if stat.S_ISDIR(st.st_mode):
                        rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                elif depth > 0 and stat.S_ISDIR(st.st_mode) and st.st_mode & 0o002:
                    remove_files_of_uid(uid, [entry.path], depth - 1)
            except OSError:
                pass


def rmtree(path: str) -> None:
    """``shutil.rmtree`` that also gets through dirs a program chmod-ed to 000."""
    def retry(func, p, _exc):
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            if func is not os.open and os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
    shutil.rmtree(path, onerror=retry)


class UidPool:
    """Hands out dedicated uids, one per concurrently running sandbox.

    A uid is taken only if it has no passwd/group entry and no process; a uid
    whose processes cannot all be reaped (zombies under an init that does not
    reap) is set aside and retried later, so its leftovers never count against
    the next program's RLIMIT_NPROC.
    """

    def __init__(self, first: int = UID_FIRST, last: int = UID_LAST):
        self._cond = threading.Condition()
        self._candidates = list(range(last, first - 1, -1))  # pop() gives first
        self._free: list[int] = []
        self._dirty: list[int] = []
        self._lock_dir: str | None = None
        self._lock_fds: list[int] = []

    def _usable(self, uid: int) -> bool:
        for lookup in (pwd.getpwuid, grp.getgrgid):
            try:
                lookup(uid)
                return False
            except KeyError:
                pass
        return self._lock_across_processes(uid) and not pids_of_uid(uid, zombies=True)

    def _lock_across_processes(self, uid: int) -> bool:
        """Claim ``uid`` for this process (another qprobe run may use the pool).

        The flock is held for the life of this process; False if someone
        else holds it. Without a safe lock directory, no cross-process lock.
        """
        if self._lock_dir is None:
            self._lock_dir = _lock_dir()
        if not self._lock_dir:
            return True
        try:
            fd = os.open(os.path.join(self._lock_dir, str(uid)),
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fds.append(fd)
        return True

    def _take(self) -> int | None:
        if self._free:
            return self._free.pop()
        for i, uid in enumerate(self._dirty):
            if not pids_of_uid(uid, zombies=True):
                return self._dirty.pop(i)
        while self._candidates:
            uid = self._candidates.pop()
            if self._usable(uid):
                return uid
        return None

    @contextlib.contextmanager
    def lease(self, remove_files: bool):
        """Yield a uid; on exit kill its processes (and files) and return it."""
        with self._cond:
            uid = self._take()
            while uid is None:
                self._cond.wait(1.0)
                uid = self._take()
        try:
            yield uid
        finally:
            kill_uid(uid)
            if remove_files:
                remove_files_of_uid(uid)
            with self._cond:
                clean = not pids_of_uid(uid, zombies=True)
                (self._free if clean else self._dirty).append(uid)
                self._cond.notify()


def _lock_dir() -> str:
    """A root-only directory for the pool's lock files, or "" if none is safe."""
    path = "/run/qprobe-sandbox" if os.path.isdir("/run") else os.path.join(
        tempfile.gettempdir(), "qprobe-sandbox-uids")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return ""
    ok = stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022
    return path if ok else ""


# ---------------------------------------------------------------- bwrap

def _under(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root


def _dirs_between(root: str, path: str) -> list[str]:
    """Strict ancestors of ``path`` below ``root``, outermost first."""
    out = []
    parent = os.path.dirname(path)
    while parent != root and _under(parent, root):
        out.append(parent)
        parent = os.path.dirname(parent)
    return out[::-1]


def python_dirs(python: str) -> list[str]:
    """Directories the interpreter needs: its prefixes and its real location."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
             os.path.dirname(python)}
    paths |= {os.path.realpath(p) for p in list(paths)}
    paths.add(os.path.dirname(os.path.realpath(python)))
    keep = []
    for p in sorted(paths, key=len):  # drop paths inside an already kept one
        if not any(p == k or _under(p, k) for k in keep):
            keep.append(p)
    return keep


def bwrap_args(bwrap: str, workdir: str, python: str, privileged: bool,
               has_size: bool) -> list[str]:
    """The bwrap command line up to (not including) the sandboxed command.

    Read-only ``/``, fresh ``/dev`` and ``/proc``, sized tmpfs over temp dirs,
    empty tmpfs over ``HIDDEN_DIRS`` with the interpreter's directories bound
    back read-only, the work dir bound read-write, new pid/net/ipc/uts
    namespaces. ``privileged`` (we are root, no user namespace): keep only
    CAP_SETUID/CAP_SETGID so the boot can drop to the sandbox uid. Otherwise
    bwrap makes a user namespace and we forbid nesting another.
    """
    def tmpfs(dest: str, perms: str, size: int) -> list[str]:
        return ["--perms", perms] + (["--size", str(size)] if has_size else []) + ["--tmpfs", dest]

    args = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    args += tmpfs("/dev/shm", "1777", TMPFS_BYTES)
    hidden = [d for d in HIDDEN_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    for d in hidden:
        tmp_like = d in _TMP_LIKE
        args += tmpfs(d, "1777" if tmp_like else "0755", TMPFS_BYTES if tmp_like else 1 << 20)
    made: set[str] = set()
    binds = [(p, "--ro-bind") for p in python_dirs(python)] + [(workdir, "--bind")]
    for path, how in binds:
        root = next((d for d in hidden if _under(path, d)), None)
        if root is None and how == "--ro-bind":
            continue  # visible (read-only) already
        for d in _dirs_between(root, path) if root else []:
            if d not in made:
                made.add(d)
                args += ["--perms", "0755", "--dir", d]
        args += [how, path, path]
    args += ["--chdir", workdir, "--unshare-pid", "--unshare-net", "--unshare-ipc",
             "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if privileged:
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--disable-userns"]
    return args + ["--"]


def bwrap_has_size(bwrap: str) -> bool:
    """Whether this bwrap knows ``--size`` (0.7+); older ones get unsized tmpfs."""
    try:
        out = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--size" in out.stdout + out.stderr


def blocking_dir(path: str) -> str | None:
    """The first directory on ``path`` that others cannot enter, if any."""
    parts = os.path.realpath(path).split(os.sep)
    for i in range(2, len(parts)):
        d = os.sep.join(parts[:i]) or os.sep
        try:
            if not os.stat(d).st_mode & 0o001:
                return d
        except OSError:
            return d
    return None
