"""Sandbox tests: hostile programs run in one batch with normal ones; each gets the right typed result.

The batch runs once per module (CPU limit 1 s to keep it quick; the mechanism is the same as with
the default 3 s). Every hostile program, if the sandbox let it get away with its trick, would go
on to run checks that pass, so "not passed" really means the trick was caught.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import textwrap
import time

import pytest

from dinfill.eval.execution import (
    STATUSES,
    ExecResult,
    Sandbox,
    SandboxConfig,
    _uid_has_live_processes,
    available_cores,
    run_programs,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="uid drop and namespaces need root (CI runs as root)")

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


@pytest.fixture(scope="module")
def places():
    """Files of 'the user' (home and working directory) and a world-writable folder for a daemon's heartbeat."""
    base = tempfile.mkdtemp(prefix="dinfill-test-user-")
    home, work = os.path.join(base, "home"), os.path.join(base, "work")
    for folder in (home, work):
        os.makedirs(folder)
        with open(os.path.join(folder, "precious.txt"), "w") as handle:
            handle.write("keep me")
    beat_dir = tempfile.mkdtemp(prefix="dinfill-test-beat-")
    os.chmod(beat_dir, 0o1777)  # the daemon runs as an unprivileged uid
    yield {"home": home, "work": work, "beat": os.path.join(beat_dir, "beat")}
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(beat_dir, ignore_errors=True)


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
            f"""
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    for _ in range(400):
                        with open({places["beat"]!r}, "a") as beat:
                            beat.write("x")
                        time.sleep(0.02)
                    os._exit(0)
                os._exit(0)
            for _ in range(200):
                if os.path.exists({places["beat"]!r}):
                    break
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
    "kill_parent": {"failed"},
    "kill_evaluator_by_pid": {
        "failed",
        "crashed",
    },  # crashed if our pid happens to be the program's own in its namespace
    "kill_everything": {"failed", "crashed"},
    "delete_and_overwrite_files": {"passed"},
    "flood_stdout": {"passed"},
    "read_stdin": {"failed"},
    "close_stdout": {"passed"},
    "change_directory": {"passed"},
    "daemon": {"passed"},
    "forge_result": {"crashed"},
    "child_finishes_for_parent": {"crashed"},
}

CONFIG = SandboxConfig(cpu_seconds=1.0, max_output_bytes=4096)


@pytest.fixture(scope="module")
def batch(places):
    """Run every hostile program interleaved with normal ones in one batch; also note the slot uids."""
    if not ROOT:
        pytest.skip("hostile programs need a root evaluator that drops them to other uids (CI runs as root)")
    programs = hostile_programs(places)
    names, texts = [], []
    for i, (name, text) in enumerate(programs.items()):
        names += [name, f"normal_pass_{i}", f"normal_fail_{i}"]
        texts += [text, normal(i, True), normal(i, False)]
    with Sandbox(CONFIG) as box:
        uids = [server.uid for server in box._servers]
        start = time.monotonic()
        results = box.run_many(texts)
        elapsed = time.monotonic() - start
        # After the batch the same slots still work: a fresh directory and a clean state every time.
        after = box.run_many(["import os\nprint(os.getcwd(), sorted(os.listdir('.')))\n" + CHECKS])
    return {"results": dict(zip(names, results, strict=True)), "uids": uids, "elapsed": elapsed, "after": after[0]}


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
    assert "before confirming" in results["forge_result"].detail


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


@needs_root
def test_user_files_survive(batch, places):
    for folder in ("home", "work"):
        with open(os.path.join(places[folder], "precious.txt")) as handle:
            assert handle.read() == "keep me"
    stdout = batch["results"]["delete_and_overwrite_files"].stdout
    assert stdout.count("denied") == 4 and "done" not in stdout


@needs_root
def test_cannot_signal_the_evaluator(batch):
    assert "PermissionError" in batch["results"]["kill_parent"].detail
    by_pid = batch["results"]["kill_evaluator_by_pid"]
    # The evaluator's pid is either not visible from the program's pid namespace or not signalable.
    if by_pid.status == "failed":
        assert any(e in by_pid.detail for e in ("ProcessLookupError", "PermissionError"))
    assert os.getpid() > 0  # and this process, the evaluator, is still running the tests


@needs_root
def test_daemon_is_killed_and_nothing_is_left(batch, places):
    assert os.path.getsize(places["beat"]) > 0  # the daemon did start
    size = os.path.getsize(places["beat"])
    time.sleep(0.3)
    assert os.path.getsize(places["beat"]) == size
    for uid in batch["uids"]:
        assert not _uid_has_live_processes(uid)


@needs_root
def test_programs_run_unprivileged_without_network():
    probe = textwrap.dedent(
        """
        import os, socket
        print(os.getuid(), os.getgid(), os.getgroups())
        try:
            socket.create_connection(("1.1.1.1", 53), timeout=1)
            print("network reachable")
        except OSError as exc:
            print("no network", exc.errno)
        """
    )
    (result,) = run_programs([probe], jobs=1)
    assert result.passed, result
    uid, gid, groups = result.stdout.split("\n")[0].split(" ", 2)
    assert int(uid) != 0 and int(gid) != 0 and groups == "[]"
    if result.network_isolated:
        assert "no network" in result.stdout


def test_fresh_directory_after_hostile_batch(batch):
    after = batch["after"]
    assert after.passed, after
    cwd, listing = after.stdout.split(" ", 1)
    assert os.path.basename(cwd).startswith("dinfill-sandbox-") and listing.strip() == "[]"
    assert not os.path.exists(cwd)  # removed afterwards


def test_never_more_programs_than_jobs():
    sleeper = "import time\nprint(time.monotonic())\ntime.sleep(0.3)\nprint(time.monotonic())  # {}"
    results = run_programs([sleeper.format(i) for i in range(6)], jobs=2)
    spans = [tuple(map(float, r.stdout.split())) for r in results]
    # CLOCK_MONOTONIC is system-wide, so the spans of different processes can be compared.
    overlap = max(sum(start <= t < end for start, end in spans) for t, _ in spans)
    assert overlap == min(2, available_cores())


def test_identical_programs_run_once_and_random_is_fresh():
    same = "import random\nprint(random.random())"
    other = "import random\nprint(random.random())  # other"
    results = run_programs([same, other, same, same], jobs=2)
    assert all(r.passed for r in results)
    assert results[0].stdout == results[2].stdout == results[3].stdout
    assert results[0].stdout != results[1].stdout  # the fork server does not hand out one random state


def test_memo_reuses_results_across_calls():
    with Sandbox(jobs=1, memo=True) as box:
        first = box.run_many(["import random\nprint(random.random())"])
        second = box.run_many(["import random\nprint(random.random())"])
    assert first[0].stdout == second[0].stdout


@pytest.mark.parametrize(
    "config",
    [
        SandboxConfig(cpu_seconds=1, pid_namespace=False),
        SandboxConfig(cpu_seconds=1, pid_namespace=False, drop_privileges=False, isolate_network=False),
    ],
    ids=["no-pid-namespace", "no-privilege-drop"],
)
def test_fallback_cleanup_kills_daemons(config, places):
    beat = places["beat"] + "-fallback-" + str(config.drop_privileges)
    daemon = hostile(
        f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                for _ in range(400):
                    with open({beat!r}, "a") as handle:
                        handle.write("x")
                    time.sleep(0.02)
                os._exit(0)
            os._exit(0)
        while not os.path.exists({beat!r}):
            time.sleep(0.01)
        """
    )
    results = run_programs([daemon, normal(100), normal(101, False)], config=config, jobs=1)
    assert [r.status for r in results] == ["passed", "passed", "failed"]
    size = os.path.getsize(beat)
    time.sleep(0.3)
    assert os.path.getsize(beat) == size


def test_self_check_and_config_validation():
    with Sandbox(jobs=1) as box:
        box.self_check()
        assert box.jobs == 1
    assert Sandbox(jobs=10_000).jobs == available_cores()
    with pytest.raises(ValueError, match="cpu_seconds"):
        SandboxConfig(cpu_seconds=0)
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxConfig(memory_bytes=1024)
    with pytest.raises(ValueError, match="jobs"):
        Sandbox(jobs=0)
    with pytest.raises(RuntimeError, match="closed"):
        box.run("pass")


def test_broken_interpreter_fails_closed():
    with pytest.raises(RuntimeError, match="could not start|set-up|self-check"):
        with Sandbox(SandboxConfig(python="/nonexistent/python"), jobs=1) as box:
            box.self_check()


def test_syntax_error_and_result_dict():
    (result,) = run_programs(["def broken(:\n    pass\n"], jobs=1)
    assert result.status == "failed" and "SyntaxError" in result.detail
    data = result.to_dict()
    assert data["status"] == "failed" and "stdout" not in data
    assert ExecResult("passed").passed and not ExecResult("timeout").passed


def test_signal_death_is_a_crash():
    (result,) = run_programs(["import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n" + CHECKS], jobs=1)
    assert result.status == "crashed" and signal.Signals.SIGSEGV.name in result.detail
