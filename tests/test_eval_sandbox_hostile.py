"""Issue 19's hostile cases, each as real HumanEval-Infill rows through ``dinfill score``, run as a user runs it.

Every row is HumanEval/0 line 0 with code put before the answer line; the code runs once (the first
time the function is called), then the row answers correctly unless it says otherwise, so a row's
verdict shows whether the trick worked. Each test fails on the sandbox before issue 19 and passes
after. Programs get 1 s of CPU (wall limit 4 s) to keep the module short; the mechanism is the one of
the default 3 s.

CI runs this module twice (with ``tests/test_eval_execution.py``): as root, and from
:func:`test_sandbox_tests_pass_as_a_non_root_user_with_full_isolation` as a non-root user made for
the purpose, who must get full isolation. Cases that need something this machine lacks (util-linux
``unshare``, Landlock, root for ``setpriv``) skip and say which.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from dinfill.eval._sandbox_server import remove_tree
from dinfill.eval.execution import _cgroup_parents, _privileges

REPO = Path(__file__).resolve().parents[1]
DATA = os.environ.get("DINFILL_DATA_DIR")
pytestmark = pytest.mark.skipif(
    not DATA or not sys.platform.startswith("linux"),
    reason="needs Linux and DINFILL_DATA_DIR (CI sets it to ../shared/data)",
)
ROOT = _privileges() == "root"
TASK_ID = "SingleLineInfilling/HumanEval/0/L0"
ANSWER = "    for idx, elem in enumerate(numbers):\n"  # the canonical line: the checks pass
WRONG = "    for idx, elem in enumerate(numbers[:0]):\n"  # the checks fail
needs_unshare = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")


def row(code: str, sample: int, correct: bool = True) -> dict:
    """A completion of HumanEval/0 line 0 that runs ``code`` once, then answers (wrongly if not ``correct``)."""
    once = "import sys\nif not hasattr(sys, '_dinfill_once'):\n    sys._dinfill_once = True\n"
    body = once + textwrap.indent(textwrap.dedent(code).strip("\n"), "    ")
    return {"task_id": TASK_ID, "completion": textwrap.indent(body, "    ") + "\n" + (ANSWER if correct else WRONG),
            "sample": sample}  # fmt: skip


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def score_command(rows_file: Path, out: Path | None, *flags: str) -> list[str]:
    command = [sys.executable, "-m", "dinfill.eval", "score", "--task", "humaneval-infill", str(rows_file)]
    command += ["--no-progress", "--cpu-seconds", "1", *flags]
    return command + (["--out", str(out), "--model", "m"] if out is not None else [])


def environment(**extra: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "DINFILL_ALLOW_WEAK_SANDBOX"}
    return {**env, "PYTHONPATH": str(REPO), "DINFILL_DATA_DIR": DATA or "", **extra}


def score(rows_file: Path, out: Path | None, *flags: str, prefix: tuple = (), timeout: float = 120, **env: str):
    return subprocess.run(
        [*prefix, *score_command(rows_file, out, *flags)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment(**env),
        stdin=subprocess.DEVNULL,
    )


def outcomes(out: Path) -> dict[int, dict]:
    lines = (out / "humaneval-infill-single-line" / "records.jsonl").read_text().splitlines()
    return {record["sample"]: record["outcome"] for record in map(json.loads, lines)}


def no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr and "remove it" not in done.stderr, done.stderr


def process_named(name: str) -> list[int]:
    """Pids whose command name (``prctl(PR_SET_NAME)``, 15 characters) is ``name``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                found.append(int(pid))
        except OSError:
            continue
    return found


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def named(name: str) -> str:
    """Code that gives the program's process a name the test can find on the host."""
    return f"import ctypes\nctypes.CDLL(None).prctl(15, {name.encode()!r}, 0, 0, 0)\n"


# -- fairness -----------------------------------------------------------------------------------
SPINNER = """
import os, signal, time
for _ in range(15):
    if os.fork() == 0:
        os.setsid()
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        while True:
            pass
time.sleep(30)
"""
NEEDS_CPU = """
import time
start = time.process_time()
while time.process_time() - start < {seconds}:
    pass
"""


def test_spinning_children_do_not_starve_a_neighbour(tmp_path):
    # 15 children that setsid, ignore SIGXCPU and spin while their parent sleeps: before issue 19 they had 15 x the
    # CPU limit within the wall clock, and the concurrent row below (0.7 s of CPU, 4 s of wall) timed out.
    rows = write_rows(tmp_path / "rows.jsonl", [row(SPINNER, 0), row(NEEDS_CPU.format(seconds=0.7), 1)])
    done = score(rows, tmp_path / "out", "--jobs", "2")
    assert done.returncode == 0, done.stderr
    spinner, neighbour = outcomes(tmp_path / "out")[0], outcomes(tmp_path / "out")[1]
    assert neighbour["status"] == "passed", neighbour
    assert spinner["status"] == "timeout" and "processes together" in spinner["detail"], spinner
    assert spinner["cpu_s"] >= 0.9, spinner  # the program's CPU (all its processes), not its reaper's


def test_two_evaluators_never_share_a_program_uid(tmp_path):
    # Two evaluators with different TMPDIRs (or containers) used to claim the same uid: the first one's sleeping
    # children made the second one's fork fail with EAGAIN (RLIMIT_NPROC counts per uid). The holder sleeps 8 s (its
    # wall limit is 10 s) so that the second evaluator, started meanwhile, is done long before it on a busy machine.
    marker = f"dfl{secrets.token_hex(5)}"
    holder = row(named(marker) + "import os, time\nfor _ in range(14):\n    if os.fork() == 0:\n        time.sleep(8)"
                 "\n        os._exit(0)\ntime.sleep(8)\n", 0)  # fmt: skip
    forker = row("import subprocess\nsubprocess.run(['true'], check=True)\n", 0)
    first_tmp, second_tmp = tmp_path / "tmp-a", tmp_path / "tmp-b"
    first_tmp.mkdir()
    second_tmp.mkdir()
    first = subprocess.Popen(
        score_command(write_rows(tmp_path / "a.jsonl", [holder]), tmp_path / "a", "--jobs", "1", "--cpu-seconds", "3"),
        env=environment(TMPDIR=str(first_tmp)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: process_named(marker))
        done = score(write_rows(tmp_path / "b.jsonl", [forker]), tmp_path / "b", "--jobs", "1", TMPDIR=str(second_tmp))
        assert process_named(marker), "the first run's processes ended before the second run was done: no overlap"
        assert done.returncode == 0, done.stderr
        assert outcomes(tmp_path / "b")[0]["status"] == "passed", outcomes(tmp_path / "b")
    finally:
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0 and outcomes(tmp_path / "a")[0]["status"] == "passed", err


# -- the kernel surface ---------------------------------------------------------------------------
SEALED = {
    "user_namespace_and_mount": """
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.unshare(0x10000000 | 0x00020000) == -1 and ctypes.get_errno() == errno.EPERM  # NEWUSER|NEWNS
        assert libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == -1 and ctypes.get_errno() == errno.EPERM
        import subprocess
        subprocess.run(["true"], check=True)  # processes still start (clone3 falls back to clone)
    """,
    "ptrace": """
        import ctypes, errno, os, time
        libc = ctypes.CDLL(None, use_errno=True)
        child = os.fork()
        if child == 0:
            time.sleep(5)
            os._exit(0)
        assert libc.ptrace(16, child, None, None) == -1 and ctypes.get_errno() == errno.EPERM  # PTRACE_ATTACH
        os.kill(child, 9)
    """,
    "add_key": """
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        # add_key("user", "dinfill-probe", "secret", 6, KEY_SPEC_USER_KEYRING): shared by every row of the uid
        assert libc.syscall(248, b"user", b"dinfill-probe", b"secret", 6, -4) == -1
        assert ctypes.get_errno() == errno.EPERM
    """,
    "keyctl_search": """
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        # keyctl(KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, "user", "dinfill-probe", 0): what an earlier row left
        assert libc.syscall(250, 10, -4, b"user", b"dinfill-probe", 0) == -1
        assert ctypes.get_errno() == errno.EPERM
    """,
}


def test_no_user_namespaces_mounts_ptrace_or_keyrings(tmp_path):
    # Before issue 19 a program could make a user namespace and mount inside it, trace its own processes, and
    # leave a key in its uid's keyring for a later row (and on the host).
    rows = write_rows(tmp_path / "rows.jsonl", [row(code, i) for i, code in enumerate(SEALED.values())])
    done = score(rows, tmp_path / "out", "--jobs", "1")
    assert done.returncode == 0, done.stderr
    results = outcomes(tmp_path / "out")
    for sample, name in enumerate(SEALED):
        assert results[sample]["status"] == "passed", (name, results[sample])


# -- the evaluator's end ----------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (the evaluator starts its fork servers from worker threads)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return found


def _state(pid: int) -> str:
    """A process's state letter (``X`` once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def test_killing_the_evaluator_kills_its_programs_and_the_next_start_cleans_up(tmp_path):
    marker = f"dfl{secrets.token_hex(5)}"
    rows = write_rows(tmp_path / "rows.jsonl", [row(named(marker) + "import time\ntime.sleep(30)\n", 0)])
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    evaluator = subprocess.Popen(
        score_command(rows, tmp_path / "out", "--jobs", "1"),
        env=environment(TMPDIR=str(tmp)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(lambda: process_named(marker))
    # SIGKILL the evaluator and the fork-server processes it started, so that nothing of theirs can clean up (the
    # evaluator is stopped first: its servers must not see it go and tidy up before they are killed).
    os.kill(evaluator.pid, signal.SIGSTOP)
    servers = _children(evaluator.pid)
    assert servers, "the evaluator's fork servers were not found"
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    # Dead (zombies of the stopped evaluator) before the evaluator goes: a server that saw the evaluator's socket close
    # before its launcher's death reached it would tidy up after all (a race on a loaded machine).
    wait_for(lambda: all(_state(pid) in "ZX" for pid in servers))
    os.kill(evaluator.pid, signal.SIGKILL)
    evaluator.wait()
    try:
        wait_for(lambda: not process_named(marker), timeout=3)  # the program went with its slot
    finally:
        for pid in process_named(marker):
            os.kill(pid, signal.SIGKILL)
    left = [p.name for p in tmp.iterdir() if p.name.startswith("dinfill-sandbox-")]
    assert left, "a killed evaluator leaves its server folder (then removed by the next start)"
    owner = left[0].split("-")[2]
    # The next sandbox that starts (with the same TMPDIR) removes what the killed one left: folders and cgroups.
    done = score(write_rows(tmp_path / "ok.jsonl", [row("pass", 0)]), tmp_path / "out2", TMPDIR=str(tmp))
    assert done.returncode == 0, done.stderr
    assert not [p for p in tmp.iterdir() if owner in p.name]
    cgroups = [p for _, parent in _cgroup_parents() for p in Path(parent).glob(f"dinfill-sandbox-{owner}-*")]
    assert not cgroups, cgroups


def test_ctrl_c_keeps_finished_records_and_a_rerun_resumes(tmp_path):
    marker = f"dfl{secrets.token_hex(5)}"
    quick = [row(f"x = {i}", i) for i in range(6)]
    slow = [row(named(marker) + f"import time\ntime.sleep(6)  # slow {i}\n", 6 + i) for i in range(2)]  # two programs
    rows = write_rows(tmp_path / "rows.jsonl", quick + slow)
    out = tmp_path / "out"
    evaluator = subprocess.Popen(
        score_command(rows, out, "--jobs", "2", "--cpu-seconds", "2"),  # a wall limit of 7 s
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Both slots run a slow row (6 s each): every quick row has finished, none of the slow ones has.
    wait_for(lambda: len(process_named(marker)) == 2)
    os.kill(evaluator.pid, signal.SIGINT)
    start = time.monotonic()
    _, err = evaluator.communicate(timeout=30)
    # Within a second on a quiet machine; the bound leaves room for a busy one and still fails a wait for the programs.
    assert time.monotonic() - start < 3.0, "the programs in flight were waited for, not killed"
    assert evaluator.returncode == 130, err
    assert "Traceback" not in err and "run the same command again to resume" in err, err
    assert len([line for line in err.splitlines() if "interrupted" in line]) == 1, err
    records = out / "humaneval-infill-single-line" / "records.jsonl"
    kept = records.read_text().splitlines()
    assert sorted(json.loads(line)["sample"] for line in kept) == list(range(6))
    done = score(rows, out, "--jobs", "2", "--cpu-seconds", "2")  # the same command again
    assert done.returncode == 0, done.stderr
    lines = records.read_text().splitlines()
    assert lines[:6] == kept and len(lines) == 8  # nothing redone, nothing lost
    assert all(outcome["status"] == "passed" for outcome in outcomes(out).values())


# -- input -------------------------------------------------------------------------------------------------
def test_duplicate_keys_and_bad_seeds_are_refused_before_anything_is_scored(tmp_path):
    rows = [row("pass", 0), row("pass", 1), row("pass", 0, correct=False)]
    path = write_rows(tmp_path / "dup.jsonl", rows)
    for out in (tmp_path / "out", None):
        done = score(path, out)
        assert done.returncode == 2, done.stderr
        assert f"'{TASK_ID}' seed 0 sample 0 on lines 1 and 3" in done.stderr, done.stderr
        no_traceback(done)
    assert not (tmp_path / "out" / "humaneval-infill-single-line" / "records.jsonl").exists()
    path.write_text(json.dumps(row("pass", 0))[:-1] + ', "seed": 1e400}\n')
    done = score(path, None)
    assert done.returncode == 2 and ":1: seed must be an integer" in done.stderr, done.stderr
    no_traceback(done)


def test_parser_limits_cpu_of_timed_out_rows_and_the_python_flag(tmp_path):
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    rows = [
        # 10**6 unary minus: CPython's parser gives up with MemoryError, which is not the program using memory.
        {"task_id": TASK_ID, "completion": "    x = " + "-" * 10**6 + "1\n" + ANSWER, "sample": 0},
        # A row that times out reports the CPU of its processes (it was its reaper's 0.003 s before).
        row(SPINNER, 1),
        # --python: the programs run with that interpreter.
        row(f"assert sys.executable == {python!r}, sys.executable", 2),
    ]
    done = score(write_rows(tmp_path / "rows.jsonl", rows), tmp_path / "out", "--python", python, "--jobs", "2")
    assert done.returncode == 0, done.stderr
    results = outcomes(tmp_path / "out")
    assert results[0]["status"] == "failed" and "parser gave up" in results[0]["detail"], results[0]
    assert results[1]["status"] == "timeout" and results[1]["cpu_s"] >= 0.9, results[1]
    assert results[2]["status"] == "passed", results[2]


# -- set-ups without root -------------------------------------------------------------------------------
def _seccomp_wrapper() -> tuple[str, ...]:
    """A container's default seccomp profile, in miniature: unshare and clone refuse CLONE_NEWUSER (EPERM)."""
    code = (
        "import errno, os, sys, pyseccomp as s\n"
        "f = s.SyscallFilter(s.ALLOW)\n"
        "f.add_rule(s.ERRNO(errno.EPERM), 'unshare', s.Arg(0, s.MASKED_EQ, 0x10000000, 0x10000000))\n"
        "f.add_rule(s.ERRNO(errno.EPERM), 'clone', s.Arg(0, s.MASKED_EQ, 0x10000000, 0x10000000))\n"
        "f.add_rule(s.ERRNO(errno.ENOSYS), 'clone3')\n"
        "f.load()\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    # Root of the machine: also without CAP_SYS_ADMIN, as in a container.
    drop = ("setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin") if ROOT else ()
    return (*drop, sys.executable, "-c", code)


SETUPS = {
    "unshare -r": (("unshare", "-r"), {}, "full"),
    "unshare -r, private TMPDIR": (("unshare", "-r"), {"TMPDIR": "private"}, "full"),
    "unshare -r --fork --pid": (("unshare", "-r", "--fork", "--pid"), {}, "full"),
    "user namespaces off (sysctl)": (
        ("unshare", "-r", "sh", "-c", 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh"),
        {},
        "user.max_user_namespaces is 0",
    ),
    "container without CAP_SYS_ADMIN": ((), {}, "seccomp filter"),
}


class _Stop(Exception):
    pass


@pytest.mark.parametrize("side", ["reaper", "program"])
def test_the_reaper_is_not_dumpable_before_the_program_exists(monkeypatch, side):
    # /proc/1/fd is guarded by its owner alone, which is the reaper's uid while it is dumpable (the program's too
    # where programs keep ours): the reaper must turn non-dumpable before it forks P, not after (a descheduled
    # reaper lost that race on a busy CI machine), and P must take the server's setting back before anything else.
    import dinfill.eval._sandbox_server as server

    events: list[tuple] = []

    class Libc:
        def prctl(self, option, value, *_):
            events.append(("prctl", option, value))
            return 1 if option == server._PR_GET_DUMPABLE else 0

    class Os:
        def __getattr__(self, name):
            return getattr(os, name)

        def setsid(self):
            events.append(("setsid",))

        def fork(self):
            events.append(("fork",))
            return 1234 if side == "reaper" else 0

        def _exit(self, code):
            raise _Stop(code)

    def stop(*args):
        events.append(("next", args))
        raise _Stop

    monkeypatch.setattr(server, "_LIBC", Libc())
    monkeypatch.setattr(server, "os", Os())
    monkeypatch.setattr(server, "_fork", lambda state: (0, True))
    monkeypatch.setattr(server, "_reap", stop)
    monkeypatch.setattr(server, "_die_with_parent", stop)
    monkeypatch.setattr(server, "_harness_record", lambda *args: None)
    monkeypatch.setattr(server.gc, "freeze", lambda: None)
    with pytest.raises(_Stop):
        server._start({}, {}, {}, [5, 6, 7, 8])
    get, off = ("prctl", server._PR_GET_DUMPABLE, 0), ("prctl", server._PR_SET_DUMPABLE, 0)
    assert events[:4] == [get, off, ("setsid",), ("fork",)], events
    if side == "reaper":
        assert events[4:] == [("next", (1234, 8))], events
    else:  # P: dumpable again (as the server was) before its set-up starts
        assert events[4:] == [("prctl", server._PR_SET_DUMPABLE, 1), ("next", (1,))], events


@needs_unshare
@pytest.mark.parametrize("setup", list(SETUPS))
def test_rootless_setups_never_crash(tmp_path, setup):
    # Each of these crashed with a traceback before issue 19 (a lock folder of another uid, fork: ENOMEM, EINVAL).
    # Now: full isolation, or a refusal naming each missing feature once and how to get it, exit code 2.
    prefix, env, expect = SETUPS[setup]
    if setup == "container without CAP_SYS_ADMIN":
        if ROOT and shutil.which("setpriv") is None:
            pytest.skip("needs util-linux setpriv to drop CAP_SYS_ADMIN")
        prefix = _seccomp_wrapper()
    if env.get("TMPDIR") == "private":
        (tmp_path / "private").mkdir(mode=0o700)
        env = {"TMPDIR": str(tmp_path / "private")}
    rows = write_rows(tmp_path / "rows.jsonl", [row("pass", 0)])
    done = score(rows, None, prefix=prefix, **env)
    no_traceback(done)
    if expect == "full":
        assert done.returncode == 0 and "passed 1/1" in done.stdout and "sandbox: full" in done.stdout, done
        return
    assert done.returncode == 2, done
    # Each missing feature once, the root cause first. (A container's root also lacks a uid of its own for the
    # programs where its interpreter lives in a 0700 home that only a mount namespace could expose.)
    lines = [line for line in done.stderr.splitlines() if line.startswith("  - ")]
    names = [line.split(":")[0] for line in lines]
    assert names and names[0] == "  - user namespaces" and len(set(names)) == len(names), done.stderr
    assert expect in lines[0], done.stderr
    assert "--allow-weak-sandbox" in done.stderr
    weak = score(rows, None, "--allow-weak-sandbox", prefix=prefix, **env)
    assert weak.returncode == 0 and "passed 1/1" in weak.stdout, weak
    assert "sandbox: weak (no user namespaces" in weak.stdout, weak.stdout


# -- weak mode ----------------------------------------------------------------------------------------------
def _landlock() -> int:
    try:
        import landlockpy

        return landlockpy.abi_version()
    except Exception:  # noqa: BLE001 - no landlockpy, or an old kernel
        return 0


ATTACK = """
import glob, json, os, sys
# The run folder and the home folder, as a program that found the evaluator through /proc would know them (the test
# names them: the attack must not stop at a refused /proc read, which would leave everything below untried).
found = [("OUT_DIR", "HOME_DIR")]
forged = {"task": "humaneval-infill", "subset": "single-line", "task_id": "TASK_ID", "index": 0, "seed": 0,
          "sample": 9, "model": "m", "completion": "x", "outcome": {"passed": True, "status": "passed"}}
done = []
for out, home in found:
    for records in glob.glob(os.path.join(out, "*", "records.jsonl")):
        try:
            with open(records, "a") as handle:
                handle.write(json.dumps(forged) + "\\n")
            done.append("records")
        except OSError:
            pass
    try:
        open(os.path.join(home, ".bashrc"), "a").write("echo owned\\n")
        done.append("bashrc")
    except OSError:
        pass
    try:
        os.remove(os.path.join(home, "keep.txt"))
        done.append("home")
    except OSError:
        pass
for folder in sorted({p for p in sys.path if p.endswith("site-packages")}):
    try:
        open(os.path.join(folder, "MARKER.pth"), "w").write("# a .pth runs at every start of this Python\\n")
        done.append("site-packages")
    except OSError:
        pass
for path, size in (("/dev/shm/MARKER", 30 << 20), ("/tmp/MARKER", 1)):
    try:
        open(path, "wb").write(b"x" * size)
        done.append(path)
    except OSError:
        pass
assert done == [], done  # every write refused: the row then passes
"""


@needs_unshare
@pytest.mark.skipif(not _landlock(), reason="weak mode keeps the user's files with Landlock, which this kernel lacks")
def test_weak_mode_keeps_the_users_files_and_says_so(tmp_path):
    # User namespaces off (the sysctl, inside a user namespace of the test's own), weaker isolation accepted. Before
    # issue 19 this program found the evaluator through /proc and wrote a passed row into its records, a .pth into
    # site-packages and the user's .bashrc, deleted a file of the home folder, and left files in /dev/shm and /tmp.
    marker = f"dinfill-test-{secrets.token_hex(5)}"
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# mine\n")
    (home / "keep.txt").write_text("keep me\n")
    out = tmp_path / "out"
    attack = ATTACK.replace("MARKER", marker).replace("TASK_ID", TASK_ID).replace("OUT_DIR", str(out))
    rows = write_rows(tmp_path / "rows.jsonl", [row("pass", 0), row(attack.replace("HOME_DIR", str(home)), 1)])
    prefix = ("unshare", "-r", "sh", "-c", 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh")
    sites = sorted({p for p in sys.path if p.endswith("site-packages")})
    try:
        done = score(rows, out, "--allow-weak-sandbox", "--jobs", "1", prefix=prefix, HOME=str(home))
    finally:
        leaks = [Path(site, f"{marker}.pth") for site in sites] + [Path(f"/dev/shm/{marker}"), Path(f"/tmp/{marker}")]
        found = [path for path in leaks if path.exists()]
        for path in found:
            path.unlink()
    assert done.returncode == 0, done.stderr
    assert not found, found
    assert (home / ".bashrc").read_text() == "# mine\n" and (home / "keep.txt").exists()
    results = outcomes(out)
    # no forged record, and the attack ran to its end with every write refused
    assert sorted(results) == [0, 1] and results[1]["status"] == "passed", results
    label = results[0]["sandbox"]
    assert label.startswith("weak (no user namespaces") and "Landlock" in label, label
    assert all(outcome["sandbox"] == label for outcome in results.values())
    run = out / "humaneval-infill-single-line"
    assert json.loads((run / "run.json").read_text())["sandbox"] == label
    assert json.loads((run / "summary.json").read_text())["sandbox"] == label
    assert f"sandbox: {label}" in done.stdout
    report = subprocess.run([sys.executable, "-m", "dinfill.eval", "report", str(out)], capture_output=True,
                            text=True, env=environment(), timeout=60)  # fmt: skip
    assert f"Note: sandbox: {label} in {run}." in report.stdout, report.stdout


# -- the second run, as a user ----------------------------------------------------------------------------
CI_USER = "dinfill-ci-user"


def _blocked(path: str) -> str | None:
    """The first directory on ``path`` that others cannot traverse (pyenv under a 0700 /root), or None."""
    current = "/"
    for part in Path(path).resolve().parts[1:]:
        current = os.path.join(current, part)
        if os.path.isdir(current) and not os.stat(current).st_mode & 0o001:
            return current
    return None


def _cannot_make_a_user() -> str:
    if not ROOT:
        return "makes a user with useradd, which needs root (this run is not root: it may be that user's run)"
    missing = [tool for tool in ("useradd", "setpriv", "unshare") if shutil.which(tool) is None]
    return f"needs {', '.join(missing)} (passwd, util-linux)" if missing else ""


@pytest.mark.skipif(bool(_cannot_make_a_user()), reason=_cannot_make_a_user())
def test_sandbox_tests_pass_as_a_non_root_user_with_full_isolation(tmp_path):
    # The sandbox's tests once more, as an ordinary user: full isolation is required there (DINFILL_EXPECT_FULL=1).
    try:
        pwd.getpwnam(CI_USER)
    except KeyError:  # an ordinary user: useradd gives it subordinate uids where /etc/subuid is in use
        subprocess.run(["useradd", "--no-create-home", CI_USER], check=True, capture_output=True)
    script = ["set -e", "mount --make-rprivate /"]
    # The interpreter may live under a 0700 home (pyenv in /root): in a private mount namespace that home is covered
    # with an empty tmpfs and the interpreter's folders are bound back, as the sandbox itself does for its programs.
    # (The checkout and the data too, wherever CI put them.)
    folders = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, REPO, DATA) if _blocked(p)})
    for blocked in sorted({_blocked(p) for p in folders}):
        inside = [p for p in folders if p.startswith(blocked + "/")]
        stages = [tmp_path / f"stage{i}" for i in range(len(inside))]
        for folder, stage in zip(inside, stages, strict=True):
            script += [f"mkdir -p {stage}", f"mount --rbind {folder} {stage}"]
        script.append(f"mount -t tmpfs -o mode=0755,size=1m tmpfs {blocked}")
        for folder, stage in zip(inside, stages, strict=True):
            script += [f"mkdir -p {folder}", f"mount --move {stage} {folder}"]
    # cgroup v1 hierarchies delegated to that user (a folder it owns, its shell moved in), as an administrator
    # delegates one: the memory cap then covers each program as a whole without root, as the docs say.
    user = pwd.getpwnam(CI_USER)
    delegated = [Path(parent, f"dinfill-ci-{secrets.token_hex(4)}") for key, parent in _cgroup_parents() if key != "v2"]
    for folder in delegated:
        folder.mkdir()
        for path in (folder, folder / "cgroup.procs", folder / "tasks"):
            os.chown(path, user.pw_uid, user.pw_gid)
        script.append(f"echo $$ > {folder}/cgroup.procs")
    tests = [str(REPO / "tests" / name) for name in ("test_eval_execution.py", "test_eval_sandbox_hostile.py")]
    # Once more without the user's subordinate uids (the programs then keep its uid): both ways must be full.
    again = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", tests[0]]
    # The user's temporary folder: pytest's own (tmp_path) sits below a 0700 folder of root.
    user_tmp = Path(tempfile.mkdtemp(prefix="dinfill-ci-"))
    os.chmod(user_tmp, 0o1777)
    pytest_command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests]
    setpriv = 'setpriv --reuid "$0" --regid "$0" --clear-groups --reset-env -- env'
    script.append(f'{setpriv} DINFILL_TEST_NO_SUBUIDS=1 "$@" {shlex.join(again)}')
    script.append(f'exec {setpriv} "$@" {shlex.join(pytest_command)}')
    env = [f"PYTHONPATH={REPO}", f"DINFILL_DATA_DIR={DATA}", "DINFILL_EXPECT_FULL=1", f"HOME={user_tmp}",
           "PATH=/usr/local/bin:/usr/bin:/bin", f"TMPDIR={user_tmp}"]  # fmt: skip
    try:
        done = subprocess.run(
            ["unshare", "--mount", "sh", "-c", "\n".join(script), CI_USER, *env],
            capture_output=True,
            text=True,
            timeout=600,
            cwd="/",
        )
    finally:
        remove_tree(str(user_tmp))  # programs may leave trees deeper than shutil.rmtree's recursion
        for folder in delegated:
            for child in folder.glob("dinfill-*"):
                child.rmdir()
            folder.rmdir()
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
