"""The code sandbox against hostile programs, on every backend that works here.

Each hostile program must end in time with a sensible reason, leave nothing
running and nothing changed outside its directory, and not stop the batch.
The fork bomb runs last (file order) so that a failure there cannot disturb
the other tests.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from qprobe.errors import QProbeError
from qprobe.rewards import _isolation as iso
from qprobe.rewards import run_python, sandbox_backend, score_rows

SLACK = 3.0  # seconds on top of a timeout: 2 cores shared with a sampling job
ROOT = os.geteuid() == 0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["bwrap", "user"])
def backend(request):
    try:
        sandbox_backend(request.param)
    except QProbeError as exc:
        pytest.skip(f"sandbox backend {request.param!r} unavailable here: {exc}")
    return request.param


def _needs_root_for(backend):
    if backend == "user" and not ROOT:
        pytest.skip("the user backend without root cannot protect the caller (documented)")


def _live_sandbox_pids():
    """Live (non-zombie) processes of any uid the sandbox hands out."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    status = f.read()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            uids = {int(u) for u in fields["Uid"].split()}
            if any(iso.UID_FIRST <= u <= iso.UID_LAST for u in uids) and fields["State"].split()[0] != "Z":
                found.append(int(name))
    return found


def test_passing_program_and_result_fields(backend):
    res = run_python("import os\nprint('hello', os.getcwd() == os.environ['HOME'])", backend=backend)
    assert res.passed and res.reason == "passed"
    assert res.stdout == "hello True\n" and res.stderr == ""
    assert res.backend == backend and res.returncode == 0 and 0 < res.duration < 3 + SLACK


@pytest.mark.parametrize("program, reason", [
    ("assert 1 + 1 == 3", "failed: AssertionError"),
    ("assert False, 'two\\nlines'", "failed: AssertionError: two"),
    ("def f(:\n    pass", "syntax error"),
    ("def f():\nreturn 1", "syntax error"),
    ("raise ValueError('bad value')", "failed: ValueError: bad value"),
    ("input()", "failed: EOFError: EOF when reading a line"),  # stdin is closed
    ("import sys\nsys.exit(3)", "crash: exit code 3"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", "crash: SIGSEGV"),
    ("import json, sys\njson.dump({1: 2}, sys.stdout)", "passed"),
])
def test_reasons(backend, program, reason):
    assert run_python(program, backend=backend).reason == reason


def test_infinite_loop_times_out(backend):
    res = run_python("while True:\n    pass", timeout=1.0, backend=backend)
    assert res.reason == "timeout" and not res.passed
    assert 1.0 <= res.duration < 1.0 + SLACK


def test_memory_bomb(backend):
    res = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))",
                     memory_mb=256, backend=backend)
    assert res.reason == "memory"


def test_output_bomb_is_cut_short(backend):
    program = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)"
    t0 = time.monotonic()
    res = run_python(program, max_output=10_000, backend=backend)
    assert res.reason == "output limit"
    assert len(res.stdout) <= 10_000 and time.monotonic() - t0 < 3 + SLACK


def test_no_inherited_secrets(backend, monkeypatch):
    _needs_root_for(backend)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    program = (
        "import os\nprint(dict(os.environ))\n"
        "for pid in ('self', os.getppid(), 1):\n"
        "    try:\n        print(open(f'/proc/{pid}/environ').read())\n"
        "    except OSError as e:\n        print(pid, type(e).__name__)\n")
    res = run_python(program, backend=backend)
    assert res.passed, res.stderr
    assert "sk-secret" not in res.stdout + res.stderr
    assert "OPENAI_API_KEY" not in res.stdout


def test_files_outside_are_untouched(backend):
    _needs_root_for(backend)
    outside = tempfile.mkdtemp(prefix="qprobe-sentinel-")
    mode = os.stat(REPO).st_mode
    try:
        os.chmod(outside, 0o755)
        sentinel = os.path.join(outside, "sentinel.txt")
        with open(sentinel, "w") as f:
            f.write("keep")
        leak = f"/tmp/qprobe-leak-{uuid.uuid4().hex}"
        repo_file = os.path.join(REPO, "tests", f"pwned-{uuid.uuid4().hex}.txt")
        program = f"""
import os, shutil
attempts = [
    lambda: os.remove({sentinel!r}),
    lambda: open({sentinel!r}, "w").write("gone"),
    lambda: shutil.rmtree({outside!r}),
    lambda: open({outside!r} + "/new.txt", "w").write("x"),
    lambda: open({repo_file!r}, "w").write("x"),
    lambda: os.chmod({REPO!r}, 0o777),
]
results = []
for attempt in attempts:
    try:
        attempt()
        results.append("ok")
    except OSError as e:
        results.append(type(e).__name__)
with open({leak!r}, "w") as f:  # allowed, but must not reach the real /tmp
    f.write("leak")
print(results)
"""
        res = run_python(program, backend=backend)
        assert res.passed, res.stderr
        assert "ok" not in res.stdout, res.stdout
        with open(sentinel) as f:
            assert f.read() == "keep"
        assert os.listdir(outside) == ["sentinel.txt"]
        assert not os.path.exists(leak) and not os.path.exists(repo_file)
        assert os.stat(REPO).st_mode == mode
    finally:
        shutil.rmtree(outside)
        os.chmod(REPO, mode)
        for path in (leak, repo_file):
            if os.path.exists(path):
                os.remove(path)


def test_killing_the_parent_fails(backend):
    _needs_root_for(backend)
    res = run_python("import os\nos.kill(os.getppid(), 9)\nos.kill(-1, 9)\nprint('survived')",
                     backend=backend)
    assert not res.passed and res.reason.startswith("failed:")
    assert run_python("print(1)", backend=backend).passed  # and we are still here


def test_network_is_blocked(backend):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                   "print('connected')")
        res = run_python(program, backend=backend)
        assert not res.passed and res.reason.startswith("failed:"), res
        assert "connected" not in res.stdout
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()


def _netns_unavailable():
    """Why the user backend as root cannot have its own network namespace here, or None.

    Checked independently of the sandbox's own probe, so that a sandbox that
    wrongly falls back where the namespace works fails the tests below.
    """
    if not ROOT:
        return "the user backend gets a network namespace only when run as root"
    unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin")
    if not unshare:
        return "util-linux unshare not found"
    try:
        help_text = subprocess.run([unshare, "--help"], capture_output=True, text=True, timeout=10).stdout
        trial = subprocess.run([unshare, "--net", "--setgid", str(iso.UID_FIRST - 2),
                                "--setuid", str(iso.UID_FIRST - 2), "--", "true"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unshare does not run: {exc}"
    if "--setuid" not in help_text or "--setgid" not in help_text:
        return "this unshare has no --setuid/--setgid"
    if trial.returncode != 0:
        return f"unshare --net fails here (no CAP_SYS_ADMIN?): {trial.stderr.strip()[:200]}"
    return None


_RAW_CONNECT = """
import ctypes, ctypes.util, socket, struct
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
assert fd >= 0, ctypes.get_errno()
addr = struct.pack("=H", socket.AF_INET) + struct.pack("!H", {port}) + socket.inet_aton("127.0.0.1") + bytes(8)
rc = libc.connect(fd, ctypes.c_char_p(addr), len(addr))
print("connected" if rc == 0 else "refused errno " + str(ctypes.get_errno()))
"""

_SUBPROCESS_CONNECT = """
import subprocess, sys
code = "import socket\\ntry:\\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\\n    print('connected')\\nexcept OSError as e:\\n    print('refused', type(e).__name__, e.errno)"
out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=5)
print(out.stdout.strip() or out.stderr.strip())
"""


@pytest.mark.parametrize("how", ["ctypes", "subprocess"])
def test_user_backend_as_root_has_no_network(how):
    """Around the audit hook (ctypes, a fresh interpreter): only a network namespace stops these."""
    why = _netns_unavailable()
    if why is not None:
        pytest.skip(f"no network namespace for the user backend here: {why}")
    try:
        sandbox_backend("user")
    except QProbeError as exc:
        pytest.skip(f"sandbox backend 'user' unavailable here: {exc}")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        program = (_RAW_CONNECT if how == "ctypes" else _SUBPROCESS_CONNECT).format(port=port)
        res = run_python(program, timeout=8.0, backend="user")
        # the program itself must have run to the attempt, so the test cannot pass by a crash
        assert res.passed, res
        assert "refused" in res.stdout and "connected" not in res.stdout, res.stdout
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()


_FAKE_UNSHARE = """#!/bin/sh
# unshare --net --setgid G --setuid U -- CMD...: drops privileges but makes no namespace
[ "$1" = --net ] && [ "$2" = --setgid ] && [ "$4" = --setuid ] && [ "$6" = -- ] || exit 99
g=$3; u=$5; shift 6
exec {setpriv} --regid "$g" --reuid "$u" --clear-groups -- "$@"
"""


@pytest.mark.parametrize("unshare", ["missing", "no-namespace"])
def test_user_backend_without_network_namespace_falls_back(unshare, monkeypatch, tmp_path):
    """No unshare, or one that makes no namespace: the trial says so, warns, runs as before."""
    if not ROOT:
        pytest.skip("the user backend tries a network namespace only when run as root")
    from qprobe.rewards import sandbox

    fake = None
    if unshare == "no-namespace":
        setpriv = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")
        if not setpriv:
            pytest.skip("util-linux setpriv not found (needed for the fake unshare)")
        os.chmod(tmp_path, 0o755)
        fake = tmp_path / "unshare"
        fake.write_text(_FAKE_UNSHARE.format(setpriv=setpriv))
        fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "_backend_cache",
                        {k: v for k, v in sandbox._backend_cache.items() if k != "user"})
    monkeypatch.setattr(sandbox, "_netns_cache", {})
    monkeypatch.setattr(sandbox, "_python_cache", dict(sandbox._python_cache))
    real_which = shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, **kw: (
        (fake and str(fake)) if name == "unshare" else real_which(name, **kw)))
    with pytest.warns(UserWarning, match="cannot put programs in their own network namespace") as rec:
        try:
            sandbox_backend("user")
        except QProbeError as exc:
            pytest.skip(f"sandbox backend 'user' unavailable here: {exc}")
    why = sandbox._netns_cache["user"]
    expected = "unshare (util-linux) not found" if fake is None else "trial run not isolated"
    assert why is not None and why.startswith(expected), why
    assert any(expected in str(w.message) for w in rec)
    res = run_python("import os\nprint(os.getuid(), os.getgroups())", backend="user")
    assert res.passed, res
    uid, groups = res.stdout.split(" ", 1)
    assert iso.UID_FIRST <= int(uid) <= iso.UID_LAST and groups.strip() == "[]"


def test_escaped_child_is_killed(backend):
    _needs_root_for(backend)
    program = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
               "print('parent done')")
    res = run_python(program, timeout=5.0, backend=backend)
    assert res.passed and res.duration < 5.0
    assert _live_sandbox_pids() == []


# prints every 32-hex-digit string it can find in `source`, then exits 0 before the tests run
_FORGE = """import os, re, sys
for _t in set(re.findall(r"[0-9a-f]{{32}}", {source})):
    print(_t)
sys.stdout.flush()
os._exit(0)
"""

HOSTILE = {
    "infinite loop": ("while True:\n    pass", {"timeout"}),
    "memory bomb": ("x = [0] * 10**9", {"memory"}),
    # on a loaded machine the interpreter may not start within the short batch timeout;
    # test_output_bomb_is_cut_short checks the "output limit" reason itself
    "output bomb": ("while True:\n    print('x' * 100000)", {"output limit", "timeout"}),
    "kill parent": ("import os\nos.kill(os.getppid(), 9)", {"failed: PermissionError: [Errno 1] Operation not permitted"}),
    "exit early": ("import sys\nsys.exit(0)", {"failed: exited before the tests finished"}),
    "exit from atexit": ("import atexit, os\natexit.register(lambda: os._exit(0))",
                         {"failed: exited before the tests finished"}),
    # issue 16: forging the completion token from what the process can read about itself
    "token from argv[0]": (_FORGE.format(source="open(sys.argv[0]).read()"),
                           {"failed: exited before the tests finished"}),
    "token from cmdline": (_FORGE.format(source="open('/proc/self/cmdline').read()"),
                           {"failed: exited before the tests finished"}),
    "token from stdin": (_FORGE.format(source="sys.stdin.read()"),
                         {"failed: exited before the tests finished"}),
    "token from environ": (_FORGE.format(source="open('/proc/self/environ').read()"),
                           {"failed: exited before the tests finished",  # bwrap: not readable at all
                            "failed: PermissionError: [Errno 13] Permission denied: '/proc/self/environ'"}),
    "token from the work dir": (_FORGE.format(
        source="''.join(open(f, errors='replace').read() for f in os.listdir('.') if os.path.isfile(f))"),
        {"failed: exited before the tests finished"}),
}


def test_hostile_rows_score_zero_and_the_batch_goes_on(backend, monkeypatch):
    _needs_root_for(backend)
    monkeypatch.setenv("QPROBE_SANDBOX", backend)
    tests = ["assert square_perimeter(10)==40", "assert square_perimeter(5)==20"]  # MBPP task 17
    good = {"completion": "def square_perimeter(a):\n  return 4*a", "test_list": tests}
    rows = [{"task_id": name, "completion": code, "test_list": tests} for name, (code, _) in HOSTILE.items()]
    t0 = time.monotonic()
    out = score_rows(rows + [good], "code", workers=2, timeout=1.5, progress=False)
    assert time.monotonic() - t0 < 2 * 1.5 + 2 * SLACK
    for (name, (_, reasons)), (reward, reason) in zip(HOSTILE.items(), out):
        assert reward == 0.0 and reason in reasons, (name, reason)
    assert out[-1] == (1.0, "passed")


def test_unknown_backend():
    with pytest.raises(QProbeError, match="unknown sandbox backend"):
        run_python("pass", backend="docker")


def test_auto_backend_prefers_bwrap(monkeypatch):
    monkeypatch.delenv("QPROBE_SANDBOX", raising=False)
    try:
        sandbox_backend("bwrap")
        expected = "bwrap"
    except QProbeError:
        expected = "user"
    assert sandbox_backend() == expected
    monkeypatch.setenv("QPROBE_SANDBOX", "user")
    assert sandbox_backend() == "user"


def test_without_bwrap_auto_falls_back_to_user(monkeypatch):
    from qprobe.rewards import sandbox

    cache = {k: v for k, v in sandbox._backend_cache.items() if k != "bwrap"}
    monkeypatch.setattr(sandbox, "_backend_cache", cache)
    real_which = shutil.which
    monkeypatch.setattr(sandbox.shutil, "which",
                        lambda name, **kw: None if name == "bwrap" else real_which(name, **kw))
    monkeypatch.delenv("QPROBE_SANDBOX", raising=False)
    with pytest.raises(QProbeError, match="sandbox backend 'bwrap' does not work here: bwrap not found"):
        run_python("pass", backend="bwrap")
    try:
        sandbox_backend("user")
    except QProbeError as exc:
        pytest.skip(f"user backend unavailable here: {exc}")
    assert sandbox_backend() == "user"
    assert run_python("print(2)").backend == "user"


_AS_USER = """
import json, sys, types
sys.path.insert(0, {repo!r})
pkg = types.ModuleType("qprobe")  # skip qprobe/__init__ (numpy) on a bare system Python
pkg.__path__ = [{repo!r} + "/qprobe"]
sys.modules["qprobe"] = pkg
import os, warnings
warnings.simplefilter("ignore")
from qprobe.errors import QProbeError
from qprobe.rewards.sandbox import run_python, sandbox_backend
os.environ["OPENAI_API_KEY"] = "sk-secret"
try:
    sandbox_backend({backend!r})
except QProbeError as exc:
    print(json.dumps({{"skip": str(exc)}}))
    raise SystemExit
out = {{}}
for name, program, timeout in [
        ("ok", "print('ok')", 3.0),
        ("loop", "while True: pass", 1.0),
        ("env", "import os; print(dict(os.environ))", 3.0)]:
    res = run_python(program, timeout=timeout, backend={backend!r})
    out[name] = [res.reason, res.stdout, res.duration]
print(json.dumps(out))
"""


@pytest.mark.parametrize("which", ["bwrap", "user"])
def test_non_root_caller(which):
    """Most users are not root: run the library itself as an unprivileged uid."""
    if not ROOT:
        pytest.skip("needs root to switch to an unprivileged uid")
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    pythons = [p for p in (sys.executable, shutil.which(version), f"/usr/bin/{version}")
               if p and os.path.exists(p) and iso.blocking_dir(p) is None]
    if not pythons or iso.blocking_dir(REPO) is not None:
        pytest.skip(f"no {version} and checkout that an unprivileged uid can use")
    uid = iso.UID_FIRST - 1  # outside the sandbox pool
    try:
        proc = subprocess.run([pythons[0], "-c", _AS_USER.format(repo=REPO, backend=which)],
                              user=uid, group=uid, extra_groups=[], cwd="/",
                              env={"PATH": "/usr/bin:/bin", "HOME": "/"},
                              capture_output=True, text=True, timeout=60)
    finally:
        iso.kill_uid(uid)
        iso.remove_files_of_uid(uid)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(f"{which} does not work for an unprivileged caller here: {out['skip']}")
    assert out["ok"][:2] == ["passed", "ok\n"]
    assert out["loop"][0] == "timeout" and out["loop"][2] < 1.0 + SLACK
    assert out["env"][0] == "passed" and "sk-secret" not in out["env"][1]


# Keep last: see module docstring.
@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()",
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
], ids=["fork-bomb", "fork-bomb-that-retries"])
@pytest.mark.slow  # seconds per case: the full lane
def test_fork_bomb_is_contained(backend, program):
    _needs_root_for(backend)
    t0 = time.monotonic()
    res = run_python(program, timeout=2.0, max_procs=8, backend=backend)
    assert time.monotonic() - t0 < 2.0 + SLACK
    assert res.reason in ("timeout", "failed: BlockingIOError: [Errno 11] Resource temporarily unavailable")
    assert _live_sandbox_pids() == []
    assert run_python("print(1)", backend=backend).passed  # the machine is fine
