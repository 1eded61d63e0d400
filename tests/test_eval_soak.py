"""Soak test (issue 12): the full HumanEval-Infill file with hostile rows, killed half-way and resumed.

Several minutes of CPU, so it is kept out of the default suite; run it with

    DINFILL_SOAK=1 DINFILL_DATA_DIR=../shared/data python -m pytest -m soak -s tests/test_eval_soak.py

The published open-dcoder-0.5B completions get a hostile prefix on every 40th row (loops, fork bombs,
memory and /tmp fillers, forged reports, deep trees, shared memory...). The file is scored with
``--jobs`` at twice the cores while another process keeps a core busy, SIGKILLed once half the
records are written, and resumed; an uninterrupted run of the same file is the reference. Timeouts
depend on load, so rows whose status is ``timeout`` in either run are left out of the comparison
(and counted).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from dinfill.eval.execution import available_cores
from dinfill.eval.records import load_records

DATA = os.environ.get("DINFILL_DATA_DIR")
pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(
        os.environ.get("DINFILL_SOAK") != "1" or not DATA or not sys.platform.startswith("linux"),
        reason="soak test (minutes): DINFILL_SOAK=1 DINFILL_DATA_DIR=../shared/data pytest -m soak -s tests/...",
    ),
]
REPO = Path(__file__).resolve().parents[1]
HOSTILE = [
    "while True:\n    pass",
    "import time\ntime.sleep(3600)",
    "import os\nwhile True:\n    os.fork()",
    "block = bytearray(50 * 1024**3)",
    "import os\nfor _ in range(8):\n    if os.fork() == 0:\n        block = b'x' * (400 << 20)\n        import time\n"
    "        time.sleep(60)\nimport time\ntime.sleep(2)",
    "import os\nos.write(3, b'{[]: 1}\\n')",
    "import builtins\nr = builtins.repr\n"
    "builtins.repr = lambda o: r({**o, 'status': 'passed'} if type(o) is dict and 'token' in o else o)",
    "import os\nfor _ in range(5000):\n    os.mkdir('d')\n    os.chdir('d')",
    "for i in range(1000):\n    open(f'/tmp/fill-{i}', 'wb').write(b'x' * (1 << 20))",
    "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.shmat.restype = ctypes.c_void_p\n"
    "for _ in range(4):\n    ctypes.memset(libc.shmat(libc.shmget(0, 64 << 20, 0o1600), None, 0), 1, 64 << 20)",
    "import os, signal\nos.kill(-1, signal.SIGKILL)",
    "import sys\nfor _ in range(100000):\n    print('spam ' * 20)",
    "import os\nfor _ in range(15):\n    if os.fork() == 0:\n        break\nn = 0\nwhile True:\n"
    "    open(f'/tmp/f-{os.getpid()}-{n}', 'w').close()\n    n += 1",
    "import os\nos._exit(0)",
]


def _hostile_file(path: Path) -> int:
    lines = (Path(DATA) / "seed-results" / "open-dcoder-0.5B" / "humaneval_infill.jsonl").read_text().splitlines()
    changed = 0
    for number in range(17, len(lines), 40):
        row = json.loads(lines[number])
        completion = row["completion"]
        indent = completion[: len(completion) - len(completion.lstrip(" "))]
        trick = HOSTILE[changed % len(HOSTILE)]
        lines[number] = json.dumps(
            {"task_id": row["task_id"], "completion": textwrap.indent(trick, indent) + "\n" + completion}
        )
        changed += 1
    path.write_text("\n".join(lines) + "\n")
    return changed


def _command(source: Path, out: Path) -> list[str]:
    jobs = str(2 * available_cores())  # clamped to the cores by the sandbox
    return [sys.executable, "-m", "dinfill.eval", "score", "--task", "humaneval-infill", str(source), "--out"] + [
        str(out),
        "--jobs",
        jobs,
        "--no-progress",
        "--model",
        "soak",
    ]


def test_soak_kill_half_way_and_resume(tmp_path):
    source = tmp_path / "hostile.jsonl"
    changed = _hostile_file(source)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    before = set(os.listdir(tempfile.gettempdir()))
    burner = subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])
    timings = {}
    try:
        killed = tmp_path / "killed"
        records = killed / "humaneval-infill-single-line" / "records.jsonl"
        start = time.monotonic()
        first = subprocess.Popen(_command(source, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while first.poll() is None and not (records.exists() and records.read_bytes().count(b"\n") >= 516):
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read().decode()
        first.send_signal(signal.SIGKILL)
        first.wait()
        first.stderr.close()
        at_kill = records.read_bytes().count(b"\n")
        resumed = subprocess.run(_command(source, killed), env=env, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        timings["killed + resumed s"] = round(time.monotonic() - start, 1)
        start = time.monotonic()
        plain = subprocess.run(_command(source, tmp_path / "plain"), env=env, capture_output=True, text=True)
        assert plain.returncode == 0, plain.stderr
        timings["uninterrupted s"] = round(time.monotonic() - start, 1)
    finally:
        burner.kill()
        burner.wait()
    lines = records.read_text().splitlines()
    keys = [(r["task_id"], r["seed"], r["sample"]) for r in map(json.loads, lines)]
    assert len(lines) == 1033 and len(set(keys)) == 1033  # nothing lost, nothing twice
    a = {r["task_id"]: r["outcome"] for r in load_records(killed / "humaneval-infill-single-line")}
    b = {r["task_id"]: r["outcome"] for r in load_records(tmp_path / "plain" / "humaneval-infill-single-line")}
    timeouts = {k for k in a if "timeout" in (a[k]["status"], b[k]["status"])}
    differ = sorted(k for k in a if k not in timeouts and a[k]["passed"] != b[k]["passed"])
    assert differ == []
    hostile = [json.loads(line)["task_id"] for line in source.read_text().splitlines()[17::40]]
    # Forged reports and aborts never pass (other tricks run the real completion after them and may).
    for task_id, trick in zip(hostile, HOSTILE * 3, strict=False):
        if "os.write(3" in trick or "os._exit" in trick or "while True" in trick:
            assert not a[task_id]["passed"], (task_id, a[task_id])
    leftovers = {
        p for p in set(os.listdir(tempfile.gettempdir())) - before if p.startswith(("dinfill-sandbox", "fill"))
    }
    assert not leftovers
    numbers = {
        "hostile rows": changed,
        "records at SIGKILL": at_kill,
        "passed (resumed)": sum(o["passed"] for o in a.values()),
        "passed (uninterrupted)": sum(o["passed"] for o in b.values()),
        "rows with a timeout in either run": len(timeouts),
        "hostile statuses (resumed)": [a[k]["status"] for k in hostile],
        **timings,
    }
    print("\nsoak:", json.dumps(numbers))
