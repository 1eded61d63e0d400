"""Sandbox tests: hostile programs run in one batch with normal ones; each gets the right typed result.

The batch runs once per module (CPU limit 1 s to keep it quick; the mechanism is the same as with
the default 3 s). Every hostile program that tries to escape or cheat would, if the sandbox let it,
go on to checks that pass; every program that tries to *forge* a verdict goes on to checks that
fail. So "not passed" really means the trick was caught. The numbered cases of issue 14 are named
``case<N>_...``.

CI runs this module three times: as root (programs as claimed uids) and, from
``tests/test_eval_sandbox_hostile.py``, as a non-root user made for the test (a user namespace per
slot), with that user's subordinate uids and without them (``DINFILL_TEST_NO_SUBUIDS=1``: programs
keep the user's uid); full isolation is required there (``DINFILL_EXPECT_FULL=1``). Tests of what
only some of these do say so in their name or skip with the reason.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from dinfill.eval import execution
from dinfill.eval._sandbox_server import TMP_MOUNTS
from dinfill.eval.execution import (
    STATUSES,
    ExecResult,
    Sandbox,
    SandboxConfig,
    SandboxInterrupted,
    _parse_report,
    _pids,
    _privileges,
    _proc_status,
    available_cores,
    run_programs,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")
# "root": programs run as claimed uids; "user" (or "setuid"): a user namespace per slot, programs keep our uid.
MODE = _privileges()
ROOT = MODE == "root"
needs_root = pytest.mark.skipif(not ROOT, reason="programs run as other uids only under a root evaluator")
# Full isolation is required of a root evaluator and where DINFILL_EXPECT_FULL=1 (the CI user's run); elsewhere the
# tests that only need programs to run accept weaker isolation, and the hostile ones skip, saying why.
EXPECT_FULL = ROOT or os.environ.get("DINFILL_EXPECT_FULL") == "1"
WEAK_OK = not EXPECT_FULL


@pytest.fixture(autouse=True, scope="module")
def _without_subordinate_uids():
    """The run without subordinate uids (DINFILL_TEST_NO_SUBUIDS=1), as on a machine without /etc/subuid or uidmap."""
    if os.environ.get("DINFILL_TEST_NO_SUBUIDS") != "1":
        yield
        return
    real = execution._subordinate_ranges
    execution._subordinate_ranges = lambda: (None, "switched off for this test run")
    yield
    execution._subordinate_ranges = real

CHECKS = textwrap.dedent(
    """
    def add(a, b):
        return a + b

    def check(candidate):
        assert candidate(2, 3) == 5
        assert candidate(-1, 1) == 0

    check(add)
    """
)


def normal(i: int, correct: bool = True) -> str:
    """A small HumanEval-like program; distinct per ``i`` so the batch does not deduplicate them."""
    body = "a + b" if correct else "a - b"
    return f"# normal problem {i}\n" + CHECKS.replace("a + b", body)


def hostile(code: str) -> str:
    """``code`` at module level, then checks that would pass if the program got that far."""
    return textwrap.dedent(code) + "\n" + CHECKS


def forger(code: str) -> str:
    """``code`` at module level, then checks that fail: only a forged report could make this pass."""
    return textwrap.dedent(code) + "\n" + CHECKS.replace("a + b", "a - b")


def _world_writable_dirs() -> list[str]:
    """World-writable directories of this machine (a shallow walk of the usual places), plus / and /etc."""
    found = {*TMP_MOUNTS, "/", "/etc", os.path.expanduser("~")}
    for top in ("/tmp", "/var", "/run", "/dev", "/home", "/opt", "/srv", "/mnt", "/media"):
        for folder, subdirs, _ in os.walk(top):
            if folder.count("/") - top.count("/") >= 2 or folder.startswith(("/dev/pts", "/proc", "/sys")):
                subdirs[:] = []
            try:
                if os.stat(folder).st_mode & 0o002:
                    found.add(folder)
            except OSError:
                continue
    return sorted(f for f in found if os.path.isdir(f))


@pytest.fixture(scope="module")
def places():
    """Files of 'the user' (home and working directory), and every place a program might try to write to."""
    base = tempfile.mkdtemp(prefix="dinfill-test-user-")
    home, work = os.path.join(base, "home"), os.path.join(base, "work")
    for folder in (home, work):
        os.makedirs(folder)
        with open(os.path.join(folder, "precious.txt"), "w") as handle:
            handle.write("keep me")
    shared = tempfile.mkdtemp(prefix="dinfill-test-shared-")
    os.chmod(shared, 0o1777)  # a world-writable folder of the host: the programs must not reach it either
    marker = f"dinfill-escape-{secrets.token_hex(6)}"
    yield {"home": home, "work": work, "writable": [*_world_writable_dirs(), shared], "marker": marker}
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(shared, ignore_errors=True)


SHM_PROGRAM = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    ids = []
    for _ in range(4):
        shmid = libc.shmget(0, 48 << 20, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600, never IPC_RMID-ed
        address = libc.shmat(shmid, None, 0)
        ctypes.memset(address, 1, 48 << 20)  # touched: 192 MiB really allocated
        ids.append(shmid)
    print("segments", ids)
"""

FD_SWAP_WITH_FLUSH_HOOK = """
    import os, sys
    real = os.dup(3)
    r, w = os.pipe()
    os.dup2(w, 3)

    class Hook:
        def __init__(self, inner):
            self.inner = inner

        def write(self, text):
            return self.inner.write(text)

        def flush(self):
            os.set_blocking(r, False)
            try:
                data = os.read(r, 65536)
            except BlockingIOError:
                data = b""
            os.write(real, data.replace(b"failed", b"passed"))
            self.inner.flush()

    sys.stdout = Hook(sys.stdout)
"""

MAIN_RESULT_FD_WITH_STDERR_HOOK = """
    import __main__, os, sys
    real = os.dup(3)
    r, w = os.pipe()
    __main__._RESULT_FD = w

    class Hook:
        def __init__(self, inner):
            self.inner = inner

        def write(self, text):
            return self.inner.write(text)

        def flush(self):
            os.set_blocking(r, False)
            try:
                data = os.read(r, 65536)
            except BlockingIOError:
                data = b""
            os.write(real, data.replace(b"failed", b"passed"))

    sys.stderr = Hook(sys.stderr)
"""

# A thread keeps swapping fd 3 between the real channel and its own pipe and relays whatever lands in
# its pipe with "failed" turned into "passed": whatever the race gives it, it never holds a pass token.
TOCTOU_RELAY = """
    import os, threading
    real = os.dup(3)
    r, w = os.pipe()
    os.set_blocking(r, False)

    def relay():
        while True:
            os.dup2(w, 3)
            try:
                data = os.read(r, 65536)
                os.write(real, data.replace(b"failed", b"passed"))
            except BlockingIOError:
                pass
            os.dup2(real, 3)

    threading.Thread(target=relay, daemon=True).start()
"""


def hostile_programs(places: dict) -> dict[str, str]:
    home_file = os.path.join(places["home"], "precious.txt")
    work_file = os.path.join(places["work"], "precious.txt")
    attack_files = f"""
        import os, shutil
        for path in ({home_file!r}, {work_file!r}):
            for attack in ("remove", "overwrite"):
                try:
                    if attack == "remove":
                        os.remove(path)
                    else:
                        open(path, "w").write("gone")
                    print(attack, path, "done")
                except OSError as exc:
                    print(attack, path, "denied", type(exc).__name__)
        shutil.rmtree(os.path.expanduser("~"), ignore_errors=True)  # HOME is the sandbox's own folder
        for name in os.listdir("."):
            os.remove(name)
    """
    write_everywhere = f"""
        import os
        for folder in {places["writable"]!r} + [os.getcwd(), os.path.expanduser("~")]:
            try:
                with open(os.path.join(folder, {places["marker"]!r}), "w") as handle:
                    handle.write("escaped")
                print("wrote", folder)
            except OSError as exc:
                print("denied", folder, exc.errno)
    """
    return {
        "infinite_loop": hostile("while True:\n    pass"),
        "sleep_forever": hostile("import time\ntime.sleep(3600)"),
        "fork_bomb": hostile("import os\nwhile True:\n    os.fork()"),
        "fork_bomb_spinning": hostile(
            """
            import os
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
            """
        ),
        "alloc_50gb": hostile("block = bytearray(50 * 1024**3)"),
        "sys_exit_0": hostile("import sys\nsys.exit(0)"),
        "os_exit_0": hostile("import os\nos._exit(0)"),
        "raise_systemexit": hostile("raise SystemExit"),
        "kill_parent": hostile("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"),
        "kill_evaluator_by_pid": hostile(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)"),
        "kill_everything": hostile("import os, signal\nos.kill(-1, signal.SIGKILL)"),
        "delete_and_overwrite_files": hostile(attack_files),
        "flood_stdout": hostile(
            """
            import sys
            for _ in range(100000):
                print("spam " * 20)
            sys.stderr.write("noise" * 200000)
            """
        ),
        "read_stdin": hostile("data = input()"),
        "close_stdout": hostile("import os\nos.close(1)\nos.close(2)"),
        "change_directory": hostile("import os\nos.chdir('/')\nos.chdir('..')"),
        "daemon": hostile(
            """
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    print("daemon", os.getpid(), flush=True)
                    while True:
                        with open("/tmp/beat", "a") as beat:
                            beat.write("x")
                        time.sleep(0.02)
                os._exit(0)
            while not os.path.exists("/tmp/beat"):
                time.sleep(0.01)
            """
        ),
        "forge_result": hostile(
            """
            import os
            os.write(3, b"{'token': 'guess', 'status': 'passed', 'detail': ''}\\n")
            os._exit(0)
            """
        ),
        "child_finishes_for_parent": hostile("import os\nif os.fork():\n    os._exit(0)"),
        # -- issue 14 --------------------------------------------------------------------------
        "case1_rebind_builtins_repr": forger(
            """
            import builtins
            r = builtins.repr
            builtins.repr = lambda o: r({**o, "status": "passed"} if type(o) is dict and "token" in o else o)
            """
        ),
        "case2_fd_swap_flush_hook": forger(FD_SWAP_WITH_FLUSH_HOOK),
        "case2_main_result_fd_stderr_hook": forger(MAIN_RESULT_FD_WITH_STDERR_HOOK),
        "case3_unhashable_report": hostile('import os\nos.write(3, b"{[]: 1}\\n")'),
        "case3_non_ascii_token": hostile("import os\nos.write(3, \"\\u00e9\\u00e9 ''\\n\".encode())\nos._exit(0)"),
        "case4_deep_tree": forger('import os\nfor _ in range(5000):\n    os.mkdir("d")\n    os.chdir("d")'),
        "case5_sysv_shm": forger(SHM_PROGRAM),
        "case7_proc_view": hostile(
            """
            import os, time
            if os.fork() == 0:
                time.sleep(0.5)
                os._exit(0)
            for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
                try:
                    command = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ")
                except OSError as exc:
                    command = repr(exc).encode()
                print(pid, command.decode(errors="replace"))
            # The reaper lives in the fork server's mount namespace: none of it may be reached through /proc/1.
            for what in ("root", "cwd", "fd", "environ"):
                try:
                    os.listdir(f"/proc/1/{what}") if what != "environ" else open(f"/proc/1/{what}", "rb").read()
                    print("reached", what)
                except OSError:
                    print("denied", what)
            """
        ),
        "case8_write_everywhere": hostile(write_everywhere),
        # -- our own ---------------------------------------------------------------------------
        "toctou_relay_thread": forger(TOCTOU_RELAY),
        "atexit_and_finalizers_on_failure": forger(
            """
            import atexit, os
            atexit.register(os.write, 3, b"forged by atexit\\n")

            class Finalizer:
                def __del__(self):
                    os.write(3, b"forged by a finalizer\\n")

            keep = Finalizer()
            cycle = [Finalizer()]
            cycle.append(cycle)
            del cycle
            """
        ),
        "atexit_and_finalizers_on_pass": hostile(
            """
            import atexit, os
            atexit.register(os.write, 3, b"spoiled by atexit\\n")

            class Finalizer:
                def __del__(self):
                    os.write(3, b"spoiled by a finalizer\\n")

            keep = Finalizer()
            """
        ),
        "exception_str_writes_report": textwrap.dedent(
            """
            import os

            class Loud(Exception):
                def __str__(self):
                    os.write(3, b"forged by __str__\\n")
                    return "loud"

            raise Loud()
            """
        ),
        "kill_the_reaper": hostile("import os, signal\nos.kill(1, signal.SIGKILL)"),
        "tmp_filler": hostile(
            """
            import os
            block = b"x" * (1 << 20)
            for i in range(100000):
                with open(f"/tmp/fill-{i}", "wb") as handle:
                    handle.write(block)
            """
        ),
        "no_new_privs": hostile("print(open('/proc/self/status').read().split('NoNewPrivs:')[1].split()[0])"),
    }


EXPECTED = {
    "infinite_loop": {"timeout"},
    "sleep_forever": {"timeout"},
    "fork_bomb": {"failed"},
    "fork_bomb_spinning": {"timeout"},
    "alloc_50gb": {"oom"},
    "sys_exit_0": {"failed"},
    "os_exit_0": {"crashed"},
    "raise_systemexit": {"failed"},
    # With a uid of its own (root's claimed uids, subordinate uids) the reaper is another uid: PermissionError. A
    # program that keeps the user's uid may signal its reaper, but SIGKILL from inside to the pid 1 of a pid
    # namespace is dropped by the kernel: the checks pass. Which applies is checked in test_cannot_signal_...
    "kill_parent": {"failed", "passed"},
    "kill_evaluator_by_pid": {"failed"},  # that pid does not exist in the program's pid namespace
    "kill_everything": {"failed"},  # nobody to kill: kill(-1) spares the caller, and the reaper is pid 1
    "delete_and_overwrite_files": {"passed"},
    "flood_stdout": {"passed"},
    "read_stdin": {"failed"},
    "close_stdout": {"passed"},
    "change_directory": {"passed"},
    "daemon": {"passed"},
    "forge_result": {"crashed"},
    "child_finishes_for_parent": {"crashed"},
    # Issue 14: 1-2 never passed; 3 crashed (the run goes on); 4 keeps its own verdict, the tree vanishes
    # with the private tmpfs; 5, 7 and 8 are checked on the host below.
    "case1_rebind_builtins_repr": {"failed"},
    "case2_fd_swap_flush_hook": {"crashed"},  # the report went nowhere: fd 3 was not the channel any more
    "case2_main_result_fd_stderr_hook": {"failed"},
    "case3_unhashable_report": {"crashed"},
    "case3_non_ascii_token": {"crashed"},
    "case4_deep_tree": {"failed"},
    "case5_sysv_shm": {"failed"},
    "case7_proc_view": {"passed"},
    "case8_write_everywhere": {"passed"},
    "toctou_relay_thread": {"failed", "crashed"},
    "atexit_and_finalizers_on_failure": {"failed"},  # crashed would mean atexit or a finalizer ran
    "atexit_and_finalizers_on_pass": {"passed"},
    "exception_str_writes_report": {"crashed"},
    "kill_the_reaper": {"failed", "passed"},
    "tmp_filler": {"failed"},
    "no_new_privs": {"passed"},
}

CONFIG = SandboxConfig(cpu_seconds=1.0, max_output_bytes=4096)


def _shm_kib() -> int:
    with open("/proc/meminfo") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("Shmem:"))


def _uid_has_live_processes(uid: int) -> bool:
    return any(s is not None and s[0] == uid and s[1] not in "ZX" for s in map(_proc_status, _pids()))


def _host_segments(uids: list[int]) -> list[str]:
    with open("/proc/sysvipc/shm") as handle:
        rows = [line.split() for line in handle.read().splitlines()[1:]]
    # Columns: key shmid perms size cpid lpid nattch uid gid cuid cgid ...
    return [" ".join(row) for row in rows if int(row[7]) in uids or int(row[9]) in uids]


@pytest.fixture(scope="module")
def full_isolation() -> str:
    """This machine's sandbox label; full isolation is required as root or where DINFILL_EXPECT_FULL=1, else the
    tests that use it skip."""
    with Sandbox(SandboxConfig(cpu_seconds=1, allow_weaker_isolation=True), jobs=1) as box:
        box.self_check()
        label = box.label
    if EXPECT_FULL:
        assert label == "full", label
    elif label != "full":
        pytest.skip(f"the hostile batch needs full isolation; this machine gives sandbox: {label}")
    return label


@pytest.fixture(scope="module")
def batch(places, full_isolation):
    """Run every hostile program interleaved with normal ones in one batch; also note the slot uids."""
    programs = hostile_programs(places)
    names, texts = [], []
    for i, (name, text) in enumerate(programs.items()):
        names += [name, f"normal_pass_{i}", f"normal_fail_{i}"]
        texts += [text, normal(i, True), normal(i, False)]
    shm_before = _shm_kib()
    with Sandbox(CONFIG) as box:
        results = box.run_many(texts)
        uids = [server.uid for server in box._servers if server.uid is not None]
        # After the batch the same slots still work: a fresh directory and a clean state every time.
        after = box.run_many(["import os\nprint(os.getcwd(), sorted(os.listdir('.')), os.listdir('/tmp'))\n" + CHECKS])
    # The IPC namespaces are freed by a kernel worker shortly after their last process.
    deadline = time.monotonic() + 5
    while _shm_kib() - shm_before > 96 * 1024 and time.monotonic() < deadline:
        time.sleep(0.05)
    return {
        "results": dict(zip(names, results, strict=True)),
        "uids": uids,
        "after": after[0],
        "shm_growth_kib": _shm_kib() - shm_before,
    }


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_program_is_classified(batch, name):
    result = batch["results"][name]
    assert result.status in EXPECTED[name], (name, result)
    assert result.status in STATUSES


def test_normal_programs_in_the_batch_are_right(batch):
    results = batch["results"]
    normals = [n for n in results if n.startswith("normal_")]
    assert len(normals) == 2 * len(EXPECTED)
    for name in normals:
        expected = "passed" if name.startswith("normal_pass") else "failed"
        assert results[name].status == expected, (name, results[name])
    assert "AssertionError" in results["normal_fail_0"].detail


def test_exit_before_checks_is_explained(batch):
    results = batch["results"]
    assert "SystemExit(0)" in results["sys_exit_0"].detail
    assert "SystemExit(None)" in results["raise_systemexit"].detail
    assert "before confirming" in results["os_exit_0"].detail
    assert "without this program's token" in results["forge_result"].detail


def test_limits_are_what_stopped_them(batch):
    results = batch["results"]
    assert "CPU time limit" in results["infinite_loop"].detail
    assert "wall-clock" in results["sleep_forever"].detail
    assert "MemoryError" in results["alloc_50gb"].detail
    assert "BlockingIOError" in results["fork_bomb"].detail
    assert "closed file" in results["read_stdin"].detail


def test_output_is_capped_but_drained(batch):
    flood = batch["results"]["flood_stdout"]
    assert len(flood.stdout.encode()) == CONFIG.max_output_bytes
    assert flood.stdout.startswith("spam spam")
    assert len(flood.stderr.encode()) == CONFIG.max_output_bytes


def test_forgeries_are_failures_with_their_own_error(batch):
    # Cases 1-2: the program's real error is what the report says (the trick changed nothing) ...
    results = batch["results"]
    for name in ("case1_rebind_builtins_repr", "case2_main_result_fd_stderr_hook", "atexit_and_finalizers_on_failure"):
        assert "AssertionError" in results[name].detail, (name, results[name])
    # ... or no report reached the channel at all, when the program had put its own pipe on fd 3.
    assert "before confirming" in results["case2_fd_swap_flush_hook"].detail
    for name in ("case3_unhashable_report", "case3_non_ascii_token", "exception_str_writes_report"):
        assert "only the harness may write" in results[name].detail, (name, results[name])


def test_case5_no_shared_memory_outlives_the_program(batch):
    shm = batch["results"]["case5_sysv_shm"]
    segments = shm.stdout.split("segments")[1]
    assert segments.count(",") == 3 and "-1" not in segments, shm.stdout  # 4 segments were really made
    assert _host_segments(batch["uids"]) == []  # root: none of the slot uids' segments on the host
    # 192 MiB were touched in the segments; an IPC namespace that outlived the program would keep them.
    assert batch["shm_growth_kib"] < 96 * 1024


def test_case7_program_sees_only_its_own_processes(batch):
    lines = batch["results"]["case7_proc_view"].stdout.strip().splitlines()
    pids = [int(line.split()[0]) for line in lines if line[0].isdigit()]
    assert pids == [1, 2, 3], lines  # the reaper, the program, its child
    assert "_sandbox_server.py" in lines[0] and "pytest" not in "".join(lines)
    reaper = [line for line in lines if not line[0].isdigit()]
    assert reaper == ["denied root", "denied cwd", "denied fd", "denied environ"], lines


def test_case8_nothing_written_reaches_the_host(batch, places):
    stdout = batch["results"]["case8_write_everywhere"].stdout
    # The private places accept writes (programs may use /tmp); the rest of the file system is read-only.
    for folder in TMP_MOUNTS:
        if os.path.isdir(folder):
            assert f"wrote {folder}\n" in stdout, stdout
    assert "denied /etc 30" in stdout  # EROFS
    for folder in places["writable"]:
        assert not os.path.exists(os.path.join(folder, places["marker"])), folder
    assert not os.path.exists("/tmp/beat") and not os.path.exists("/tmp/fill-0")


def test_no_new_privs_and_deep_tree(batch):
    assert batch["results"]["no_new_privs"].stdout.strip() == "1"  # setuid binaries gain nothing
    assert "AssertionError" in batch["results"]["case4_deep_tree"].detail


def test_user_files_survive(batch, places):
    for folder in ("home", "work"):
        with open(os.path.join(places[folder], "precious.txt")) as handle:
            assert handle.read() == "keep me"
    stdout = batch["results"]["delete_and_overwrite_files"].stdout
    assert stdout.count("denied") == 4 and "done" not in stdout


def test_cannot_signal_the_evaluator(batch):
    results = batch["results"]
    if batch["uids"]:  # programs have a uid of their own: the reaper is another uid
        assert "PermissionError" in results["kill_parent"].detail
        assert "PermissionError" in results["kill_the_reaper"].detail
    else:  # the same uid, but SIGKILL from inside its namespace never reaches a pid 1: the reaper reported the exit
        assert results["kill_parent"].passed and results["kill_the_reaper"].passed
    assert "ProcessLookupError" in results["kill_evaluator_by_pid"].detail


def test_daemon_is_killed_and_nothing_is_left(batch):
    assert "daemon" in batch["results"]["daemon"].stdout  # the daemon did start
    for uid in batch["uids"]:  # root: nothing runs as a slot uid any more
        assert not _uid_has_live_processes(uid)


def test_programs_run_unprivileged_without_network(full_isolation):
    probe = textwrap.dedent(
        """
        import os, socket
        print(os.getuid(), os.getgid(), os.getgroups())
        print(open("/proc/self/status").read().split("CapEff:")[1].split()[0])
        try:
            socket.create_connection(("1.1.1.1", 53), timeout=1)
            print("network reachable")
        except OSError as exc:
            print("no network", exc.errno)
        # The program is no process group leader (its reaper leads its session), so it may make a session of its own.
        os.setsid()
        print("own session", os.getsid(0) == os.getpid())
        """
    )
    with Sandbox(jobs=1) as box:
        (result,) = box.run_many([probe])
        own = box._servers[0].uid  # the programs' uid on the machine; None: ours, in the slot's user namespace
    assert result.passed and result.sandbox == "full", result
    ids, caps = result.stdout.split("\n")[:2]
    uid, gid, groups = ids.split(" ", 2)
    assert int(caps, 16) == 0  # no capabilities, whichever uid
    if own is None:
        assert not ROOT and int(uid) == os.geteuid()
    else:  # a claimed uid (root) or a subordinate uid, no groups
        assert own not in (0, os.geteuid()) and int(uid) != 0 and int(gid) != 0 and groups == "[]"
    assert result.network_isolated and "no network" in result.stdout
    assert "own session True" in result.stdout


def test_fresh_directory_after_hostile_batch(batch):
    after = batch["after"]
    assert after.passed, after
    assert after.stdout.strip() == "/tmp/work [] ['work']"  # a new private /tmp, nothing left from before
    assert not os.path.exists("/tmp/work")  # never on the host


def test_case6_memory_cap_covers_the_whole_program(full_isolation):
    cap = 256 * 1024**2
    # Six children of 64 MiB each: every process is far below the per-process limit, together they are not.
    program = hostile(
        """
        import os, time
        for _ in range(6):
            if os.fork() == 0:
                block = b"x" * (64 << 20)
                time.sleep(30)
                os._exit(0)
        time.sleep(1.5)
        """
    )
    config = SandboxConfig(cpu_seconds=1, memory_bytes=cap)
    with Sandbox(config, jobs=1) as box:
        result, control = box.run_many([program, normal(0)])
        scope = box.memory_scope
    if scope == "per-process":
        pytest.skip("no writable memory cgroup (v2 or v1) on this machine: the cap is per process here")
    assert result.status == "oom" and "memory cap of 256 MiB" in result.detail, result
    assert control.passed


def _can_lower_oom_scores() -> bool:
    """Whether a process of ours may take OOM score -1000, tried in a child (CAP_SYS_RESOURCE of the machine's
    namespace: root inside a user namespace, as under ``unshare -r``, has the bit but not the right)."""
    code = "import os; os.write(os.open('/proc/self/oom_score_adj', os.O_WRONLY), b'-1000')"  # raises if refused
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _servers_score() -> str:
    """The sandbox server's OOM score: -1000 where it may lower it, else ours (a systemd user session sets 100-200)."""
    return "-1000" if _can_lower_oom_scores() else open("/proc/self/oom_score_adj").read().strip()


def test_the_oom_killer_takes_the_program_never_the_server(full_isolation):
    # The server and the reaper share the slot's memory cgroup with the program: the program runs at +1000 (the
    # first victim of any OOM kill); the reaper keeps the server's score, -1000 where that may be set (root).
    program = hostile(
        """
        print(open("/proc/self/oom_score_adj").read().strip(), open("/proc/1/oom_score_adj").read().strip())
        """
    )
    (result,) = run_programs([program], config=SandboxConfig(cpu_seconds=1))
    assert result.passed, result
    mine, reaper = result.stdout.split()
    assert mine == "1000" and reaper == _servers_score(), result.stdout


def test_without_an_immune_server_the_group_kill_is_switched_off(tmp_path):
    # cgroup v2's memory.oom.group kills every process of the cgroup but those at -1000: a server that cannot take
    # -1000 (a user with a delegated cgroup) switches it off rather than die with the program. A cgroup v1 folder
    # (no such file) is left as it is. In a child process: the score of this one stays.
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    for folder in (v2, v1):
        folder.mkdir()
        (folder / "cgroup.procs").write_text("")
    (v2 / "memory.oom.group").write_text("1")
    code = (
        "import sys; from dinfill.eval._sandbox_server import _set_oom_score, _shield_from_oom;"
        "_set_oom_score(b'-1000');"  # what the slot's launcher does first
        "print(_shield_from_oom(sys.argv[1:]), open('/proc/self/oom_score_adj').read().strip())"
    )
    done = subprocess.run([sys.executable, "-c", code, str(v2 / "cgroup.procs"), str(v1 / "cgroup.procs")],
                          capture_output=True, text=True, check=True)  # fmt: skip
    immune = _can_lower_oom_scores()
    assert done.stdout.split() == [str(immune), _servers_score()], done
    assert (v2 / "memory.oom.group").read_text() == ("1" if immune else "0")
    assert sorted(p.name for p in v1.iterdir()) == ["cgroup.procs"]


def test_case9_a_row_ends_within_its_wall_limit_plus_a_bounded_cleanup(full_isolation):
    storm = hostile(
        """
        import os
        for _ in range(15):
            if os.fork() == 0:
                break
        me, n = os.getpid(), 0
        while True:
            try:
                open(f"/tmp/f-{me}-{n}", "w").close()
                os.mkdir(f"d-{me}-{n}")
            except OSError:
                pass
            n += 1
        """
    )
    config = SandboxConfig(cpu_seconds=1, wall_seconds=2)
    with Sandbox(config, jobs=1) as box:
        box.run(normal(0))  # the slot is started outside the measured time
        start = time.monotonic()
        result = box.run(storm)
        elapsed = time.monotonic() - start
    assert result.status == "timeout", result
    assert elapsed < config.wall_limit + 2.0, elapsed  # the teardown of its tmpfs is not a walk


def test_report_parser_is_total():
    tokens = {status: secrets.token_hex(16) for status in ("passed", "failed", "oom")}
    good = f"{tokens['failed']} 'AssertionError'\n".encode()
    assert _parse_report(good, False, tokens) == ("failed", "AssertionError")
    assert _parse_report(b"", False, tokens) == (None, "")
    hostile_inputs = [
        b"{[]: 1}\n",
        "\u00e9 ''\n".encode(),
        b"\xff\xfe\n",
        good + good,
        good[:-1],
        f"{tokens['passed']} ".encode() + b"[" * 100000 + b"\n",
        f"{tokens['passed']} 12\n".encode(),
        f"{tokens['passed']} {{[]: 1}}\n".encode(),
        f"{tokens['passed']}\n".encode(),
    ]
    rng = random.Random(0)
    hostile_inputs += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))) + b"\n" for _ in range(200)]
    for data in hostile_inputs:
        status, detail = _parse_report(data, False, tokens)
        assert status == "crashed" and detail, data[:40]
    assert _parse_report(good, True, tokens)[0] == "crashed"  # more than the cap arrived


def test_never_more_programs_than_jobs():
    sleeper = "import time\nprint(time.monotonic())\ntime.sleep(0.3)\nprint(time.monotonic())  # {}"
    config = SandboxConfig(allow_weaker_isolation=WEAK_OK)
    results = run_programs([sleeper.format(i) for i in range(6)], config=config, jobs=2)
    spans = [tuple(map(float, r.stdout.split())) for r in results]
    # CLOCK_MONOTONIC is system-wide, so the spans of different processes can be compared.
    overlap = max(sum(start <= t < end for start, end in spans) for t, _ in spans)
    assert overlap == min(2, available_cores())


def test_identical_programs_run_once_and_random_is_fresh():
    same = "import random\nprint(random.random())"
    other = "import random\nprint(random.random())  # other"
    results = run_programs([same, other, same, same], SandboxConfig(allow_weaker_isolation=WEAK_OK), jobs=2)
    assert all(r.passed for r in results)
    assert results[0].stdout == results[2].stdout == results[3].stdout
    assert results[0].stdout != results[1].stdout  # the fork server does not hand out one random state


def test_memo_reuses_results_across_calls():
    with Sandbox(SandboxConfig(allow_weaker_isolation=WEAK_OK), jobs=1, memo=True) as box:
        first = box.run_many(["import random\nprint(random.random())"])
        second = box.run_many(["import random\nprint(random.random())"])
    assert first[0].stdout == second[0].stdout


@pytest.mark.parametrize(
    "config",
    [
        # 3 s of CPU: under Landlock (weaker isolation without root) every mkdir walks the whole path once more.
        SandboxConfig(cpu_seconds=3, pid_namespace=False, private_filesystem=False, allow_weaker_isolation=True),
        SandboxConfig(
            cpu_seconds=3,
            pid_namespace=False,
            private_filesystem=False,
            drop_privileges=False,
            isolate_network=False,
            ipc_namespace=False,
            allow_weaker_isolation=True,
        ),
    ],
    ids=["no-pid-namespace", "no-privilege-drop"],
)
def test_fallback_cleanup_kills_daemons_and_removes_deep_trees(config):
    # Explicitly switched-off features are weaker isolation, said in every result; the server (a subreaper) still
    # kills what a program leaves, and the program's folder on the host goes, however deep.
    daemon = hostile(
        """
        import os, time
        read, write = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(write, str(os.getpid()).encode())
                time.sleep(60)
            os._exit(0)
        print(os.read(read, 20).decode())
        """
    )
    # Deeper than the recursion limit that breaks shutil.rmtree before Python 3.12.4 (ext4 makes 5000 slow here).
    deep = forger('import os\nprint(os.getcwd())\nfor _ in range(1200):\n    os.mkdir("d")\n    os.chdir("d")')
    results = run_programs([daemon, normal(100), normal(101, False), deep], config=config, jobs=1)
    assert [r.status for r in results] == ["passed", "passed", "failed", "failed"], results
    assert all(r.sandbox.startswith("weak (") and "switched off" in r.sandbox for r in results), results[0].sandbox
    pid = int(results[0].stdout.strip())  # the host's pid: no pid namespace here
    status = _proc_status(str(pid))
    assert status is None or status[1] in "ZX", status  # killed when its program ended
    workdir = results[3].stdout.strip()
    assert os.path.basename(workdir).startswith("dinfill-sandbox-") and not os.path.exists(workdir)


@pytest.mark.skipif(not ROOT or shutil.which("setpriv") is None, reason="needs a root evaluator and util-linux setpriv")
def test_root_without_cap_sys_admin_gets_full_isolation_through_user_namespaces():
    # A container's root without CAP_SYS_ADMIN cannot make namespaces directly: it makes a user namespace per slot
    # (which needs no capability) and maps a claimed uid into it, so its programs still run as a uid of their own.
    script = textwrap.dedent(
        """
        from dinfill.eval.execution import Sandbox, SandboxConfig
        probe = "import os\\nprint(os.getuid(), sum(p.isdigit() for p in os.listdir('/proc')))\\n"
        with Sandbox(SandboxConfig(cpu_seconds=1), jobs=1) as box:
            box.self_check()
            (result,) = box.run_many([probe])
            print(box.privileges, box._servers[0].uid, result.status, result.sandbox, result.stdout.strip())
        """
    )
    done = subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))},
    )
    assert done.returncode == 0, done.stderr
    privileges, claimed, status, sandbox, uid, procs = done.stdout.split()
    assert (privileges, status, sandbox) == ("setuid", "passed", "full"), done.stdout
    low, high = SandboxConfig().uid_range
    assert low <= int(claimed) < high and uid == "1"  # the claimed uid, mapped as uid 1 of the slot's namespace
    assert int(procs) < 10  # a /proc of its own pid namespace
    # The uid's holder went with its slot (a launcher in a user namespace cannot signal it: it watches a pipe).
    deadline = time.monotonic() + 5
    while _uid_has_live_processes(int(claimed)):
        assert time.monotonic() < deadline, f"a process of uid {claimed} outlived its sandbox"
        time.sleep(0.05)


def test_self_check_and_config_validation():
    with Sandbox(SandboxConfig(allow_weaker_isolation=WEAK_OK), jobs=1) as box:
        box.self_check()
        assert box.jobs == 1
    assert Sandbox(SandboxConfig(allow_weaker_isolation=WEAK_OK), jobs=10_000).jobs == available_cores()
    with pytest.raises(ValueError, match="cpu_seconds"):
        SandboxConfig(cpu_seconds=0)
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxConfig(memory_bytes=1024)
    with pytest.raises(ValueError, match="tmp_bytes"):
        SandboxConfig(tmp_bytes=10)
    with pytest.raises(ValueError, match="jobs"):
        Sandbox(jobs=0)
    with pytest.raises(RuntimeError, match="closed"):
        box.run("pass")


def test_broken_interpreter_fails_closed():
    with pytest.raises(RuntimeError, match="could not start|set-up|self-check"):
        config = SandboxConfig(python="/nonexistent/python", allow_weaker_isolation=WEAK_OK)
        with Sandbox(config, jobs=1) as box:
            box.self_check()


def test_syntax_error_and_result_dict():
    (result,) = run_programs(["def broken(:\n    pass\n"], SandboxConfig(allow_weaker_isolation=WEAK_OK), jobs=1)
    assert result.status == "failed" and "SyntaxError" in result.detail
    data = result.to_dict()
    assert data["status"] == "failed" and "stdout" not in data
    assert ExecResult("passed").passed and not ExecResult("timeout").passed


def test_signal_death_is_a_crash():
    program = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n" + CHECKS
    (result,) = run_programs([program], SandboxConfig(allow_weaker_isolation=WEAK_OK), jobs=1)
    assert result.status == "crashed" and signal.Signals.SIGSEGV.name in result.detail


def test_a_fork_server_killed_mid_program_costs_one_crashed_row():
    with Sandbox(SandboxConfig(cpu_seconds=1, allow_weaker_isolation=WEAK_OK), jobs=1) as box:
        assert box.run(normal(0)).passed
        killer = threading.Timer(0.3, box._servers[0].proc.kill)  # from outside, while the program sleeps
        killer.start()
        result = box.run("import time\ntime.sleep(1)\n" + CHECKS)
        killer.join()
        after = box.run(normal(1))  # a new server for the next program
    assert result.status == "crashed" and "sandbox server failed" in result.detail, result
    assert after.passed, after


def test_ctrl_c_taken_by_a_worker_thread_still_stops_the_batch_at_once():
    """The kernel hands a process-directed SIGINT to any thread that does not block it; when a slot's worker thread
    takes it, run_many must still notice within a fraction of a second (not when the next program ends) and kill
    the programs in flight. The signal is sent to a worker thread itself here."""
    slow = [f"import time\ntime.sleep(20)  # {i}\n" for i in range(2)]
    with Sandbox(SandboxConfig(cpu_seconds=30, wall_seconds=30, allow_weaker_isolation=WEAK_OK), jobs=2) as box:
        box.self_check()  # the slots are up: what follows times only the interrupt

        def interrupt_a_worker():
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with box._lock:
                    running = len(box._watches)
                if running == 2:
                    break
                time.sleep(0.01)
            (worker, *_) = [t for t in threading.enumerate() if t.name.startswith("dinfill-sandbox")]
            signal.pthread_kill(worker.ident, signal.SIGINT)
            sent.append(time.monotonic())

        sent: list[float] = []
        threading.Thread(target=interrupt_a_worker, daemon=True).start()
        with pytest.raises(SandboxInterrupted) as caught:
            box.run_many(slow)
        assert sent, "the programs never ran"
        # A fraction of a second on a quiet machine; the bound leaves room for a busy one (the programs sleep 20 s).
        assert time.monotonic() - sent[0] < 5.0, "the interrupt waited for a program to end"
        assert caught.value.done == [None, None]


@pytest.mark.parametrize("children_files", [True, False])
def test_the_servers_process_tree_with_and_without_proc_children_files(monkeypatch, children_files):
    # The fork server finds leftovers and their CPU through /proc/PID/task/TID/children, and through every
    # process's parent field on kernels without CONFIG_PROC_CHILDREN: both must find the same tree.
    from dinfill.eval import _sandbox_server as server

    if children_files and not server._PROC_CHILDREN:
        pytest.skip("this kernel has no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)")
    monkeypatch.setattr(server, "_PROC_CHILDREN", children_files)
    code = "import os, sys, time\nif os.fork() == 0:\n    time.sleep(30)\n    os._exit(0)\nsys.stdout.write('x\\n')\n" \
           "sys.stdout.flush()\ntime.sleep(30)\n"  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdout.readline() == b"x\n"  # its own child is forked by now
        mine = {proc.pid for proc in procs}
        assert mine <= set(server._children_of(os.getpid()))
        grandchildren = [server._children_of(proc.pid) for proc in procs]
        assert all(len(found) == 1 for found in grandchildren), grandchildren
        _, tree = server._tree(exclude=procs[0].pid)  # the excluded child's subtree is left out too
        assert set(tree) >= {procs[1].pid, *grandchildren[1]}
        assert not set(tree) & {procs[0].pid, *grandchildren[0]}
    finally:
        for proc in procs:
            for pid in server._children_of(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
