"""Records, run folders and completion files: durable appends, torn-tail repair, the run lock, clear errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dinfill.eval.records import (
    RecordsError,
    RecordWriter,
    RunFolderBusy,
    RunLock,
    check_run_file,
    load_records,
    mix_labels,
    note_sandbox,
    read_completions,
    read_jsonl,
    read_run_identity,
    write_records_atomically,
)

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


IDS = ["T/0", "T/1", "T/2"]
CANONICAL = ["a\n", "b\n", "c\n"]


def record(task_id: str, seed: int = 0, sample: int = 0, completion: str = "x") -> dict:
    return {"task": "t", "task_id": task_id, "seed": seed, "sample": sample, "completion": completion, "outcome": {}}


def write_lines(path, *lines: bytes) -> None:
    path.write_bytes(b"".join(lines))


def test_writer_appends_and_repairs_a_torn_tail(tmp_path):
    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as writer:
        writer.append(record("T/0"))
        writer.append(record("T/1"))
    # A SIGKILL in the middle of an append leaves a fragment without a newline.
    with open(path, "ab") as handle:
        handle.write(b'{"task": "t", "task_id": "T/2", "se')
    assert [r["task_id"] for r in load_records(tmp_path)] == ["T/0", "T/1"]
    rows, torn_at = read_jsonl(path, torn_tail_ok=True)
    assert len(rows) == 2 and torn_at is not None
    with RecordWriter(path) as writer:  # reopening cuts the fragment off
        writer.append(record("T/2"))
    rows, torn_at = read_jsonl(path, torn_tail_ok=True)
    assert torn_at is None
    assert [r["task_id"] for _, r in rows] == ["T/0", "T/1", "T/2"]


def test_damage_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "records.jsonl"
    write_lines(
        path, json.dumps(record("T/0")).encode() + b"\n", b"{broken\n", json.dumps(record("T/1")).encode() + b"\n"
    )
    with pytest.raises(RecordsError, match=r"records.jsonl:2: not valid JSON"):
        load_records(tmp_path)


def test_duplicates_collapse_but_conflicts_are_errors(tmp_path):
    write_records_atomically(tmp_path / "records.jsonl", [record("T/0"), record("T/1")])
    write_records_atomically(tmp_path / "records.rank1.jsonl", [record("T/1"), record("T/2", seed=1)])
    assert [(r["task_id"], r["seed"]) for r in load_records(tmp_path)] == [("T/0", 0), ("T/1", 0), ("T/2", 1)]
    write_records_atomically(tmp_path / "records.rank2.jsonl", [record("T/0", completion="different")])
    with pytest.raises(RecordsError, match="already recorded"):
        load_records(tmp_path)


def test_record_without_fields_is_named(tmp_path):
    write_lines(tmp_path / "records.jsonl", b'{"task_id": "T/0"}\n')
    with pytest.raises(RecordsError, match=r"records.jsonl:1: record without field"):
        load_records(tmp_path)


def completions(tmp_path, *lines: bytes):
    path = tmp_path / "completions.jsonl"
    write_lines(path, *lines)
    return read_completions(path, IDS, CANONICAL, "toy")


def test_reads_human_eval_and_published_formats(tmp_path):
    entries = completions(
        tmp_path,
        b'{"task_id": "T/0", "completion": "a\\n"}\n',
        b"\n",
        b'{"task_id": "T/0", "completion": "again"}\n',
        b'{"task_id": "T/2", "generated_code": "c", "canonical_solution": "c\\n"}',  # no final newline
    )
    assert [(e.line, e.index, e.sample, e.completion) for e in entries] == [
        (1, 0, 0, "a\n"),
        (3, 0, 1, "again"),
        (4, 2, 0, "c"),
    ]


def test_integer_row_index_task_ids(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"task_id": 1, "completion": "b"}\n')
    (entry,) = read_completions(path, ["0", "1"], ["a", "b"], "rows")
    assert entry.index == 1


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ((b'{"task_id": "T/0", "completion": "a"}\n', b"{not json}\n"), r":2: not valid JSON"),
        ((b'{"completion": "a"}\n',), r":1: no 'task_id' field"),
        ((b'{"task_id": "T/0"}\n',), r":1: no completion field"),
        ((b'{"task_id": "T/0", "completion": 3}\n',), r":1: completion must be a string"),
        (
            (b'{"task_id": "T/0", "completion": "a"}\n', b'{"task_id": "T/9", "completion": "a"}\n'),
            r":2: unknown task_id",
        ),
        ((b'{"task_id": "T/0", "completion": "\xff\xfe"}\n',), r":1: not valid UTF-8 \(byte 0xff"),
        ((b'["T/0", "a"]\n',), r":1: expected a JSON object"),
        (
            (b'{"task_id": "T/1", "completion": "b", "ground_truth_middle": "zzz"}\n',),
            r":1: ground_truth_middle differs",
        ),
        ((b"\n",), r"no completions"),
        (
            (
                b'{"task_id": "T/0", "completion": "a", "sample": 0}\n',
                b'{"task_id": "T/2", "completion": "c"}\n',
                b'{"task_id": "T/0", "completion": "b", "sample": 0}\n',
            ),
            r"1 duplicate \(task_id, seed, sample\) key\(s\): 'T/0' seed 0 sample 0 on lines 1 and 3",
        ),
        ((b'{"task_id": "T/0", "completion": "a", "seed": 1e400}\n',), r":1: seed must be an integer .* got 'inf'"),
        ((b'{"task_id": "T/0", "completion": "a", "seed": "7"}\n',), r":1: seed must be an integer"),
        ((b'{"task_id": "T/0", "completion": "a", "seed": 36893488147419103232}\n',), r":1: seed must be an integer"),
        ((b'{"task_id": "T/0", "completion": "a", "sample": -1}\n',), r":1: sample must be an integer"),
    ],
    ids=[
        "bad-json",
        "no-task-id",
        "no-completion",
        "non-string",
        "unknown-id",
        "non-utf8",
        "not-object",
        "order",
        "empty",
        "duplicate-key",
        "huge-float-seed",
        "string-seed",
        "seed-over-64-bits",
        "negative-sample",
    ],
)
def test_malformed_completion_files_name_the_line(tmp_path, lines, message):
    with pytest.raises(RecordsError, match=message):
        completions(tmp_path, *lines)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_completions(tmp_path / "nope.jsonl", IDS, CANONICAL, "toy")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("dev-null", "is a character device"),
        ("directory", "is a directory"),
        ("fifo", "is a FIFO"),
        ("empty", "is empty"),
    ],
)
def test_completion_file_that_cannot_be_one(tmp_path, kind, message):
    path = {"dev-null": Path(os.devnull), "directory": tmp_path, "fifo": tmp_path / "f", "empty": tmp_path / "e"}[kind]
    if kind == "fifo":
        os.mkfifo(path)  # opening it would block: the check must not open it
    if kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(RecordsError, match=f"completion file {re.escape(str(path))} {message}"):
        read_completions(path, IDS, CANONICAL, "toy")


HOLD = (
    "import sys, time\nfrom dinfill.eval.records import RunLock\n"
    "RunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(60)\n"
)


def test_run_lock_excludes_a_second_writer_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO, env=_env()
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        start = time.monotonic()
        with pytest.raises(RunFolderBusy, match=rf"being written by pid {holder.pid} since .*RunLock"):
            RunLock(tmp_path).acquire()
        assert time.monotonic() - start < 1  # at once, not after a wait
        # A torchrun job collides with a single writer too.
        with pytest.raises(RunFolderBusy, match=f"pid {holder.pid}"):
            RunLock(tmp_path, rank=1, world_size=2).acquire()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # SIGKILL released it: no stale lock to clean up by hand.
    with RunLock(tmp_path):
        pass


SLOW_HOLDER = (
    "import fcntl, json, os, sys, time\n"
    "fd = os.open(os.path.join(sys.argv[1], 'run.lock'), os.O_RDWR | os.O_CREAT, 0o644)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(0.3)\n"
    "info = dict(pid=os.getpid(), host=os.uname().nodename, since='now', command='eval --slow', rank=0, world_size=1)\n"
    "os.pwrite(fd, json.dumps(info).encode(), 0)\ntime.sleep(60)\n"
)


def test_a_writer_blocked_by_a_holder_still_starting_waits_for_its_details(tmp_path):
    """A holder writes its details just after it took the lock: the writer it blocks meanwhile names it anyway."""
    holder = subprocess.Popen([sys.executable, "-c", SLOW_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunFolderBusy, match=rf"being written by pid {holder.pid} since now \(eval --slow\)"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_torchrun_ranks_share_the_folder_but_each_rank_file_has_one_writer(tmp_path):
    ranks = [RunLock(tmp_path, rank, 2).acquire() for rank in (0, 1)]
    with pytest.raises(RunFolderBusy, match=rf"pid {os.getpid()}, rank 0 of 2"):
        RunLock(tmp_path, 0, 2).acquire()  # the same rank of a second job
    with pytest.raises(RunFolderBusy):
        RunLock(tmp_path).acquire()  # a single process
    for lock in ranks:
        lock.release()
    with RunLock(tmp_path):
        pass


def test_a_folder_without_records_is_not_a_run(tmp_path):
    check_run_file(tmp_path, {"model": "a"})
    check_run_file(tmp_path, {"model": "b"})  # a first attempt that failed before its first record: replaced
    assert read_run_identity(tmp_path) == {"model": "b"}
    write_records_atomically(tmp_path / "records.jsonl", [record("T/0")])
    check_run_file(tmp_path, {"model": "b"})  # the same run: resumed
    with pytest.raises(ValueError, match=r"holds a different run \(model: 'b' there, 'c' now\); resume"):
        check_run_file(tmp_path, {"model": "c"})
    check_run_file(tmp_path, {"model": "c"}, overwrite=True)
    assert read_run_identity(tmp_path) == {"model": "c"}


def test_run_json_says_how_isolated_the_programs_were(tmp_path):
    check_run_file(tmp_path, {"model": "a"})
    note_sandbox(tmp_path, "full")
    note_sandbox(tmp_path, "full")
    assert json.loads((tmp_path / "run.json").read_text())["sandbox"] == "full"
    # A resume under weaker isolation: both are named, first seen first, and the identity is untouched.
    note_sandbox(tmp_path, "weak (no user namespaces)")
    note_sandbox(tmp_path, "full")
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["sandbox"] == "mixed: full + weak (no user namespaces)"
    assert read_run_identity(tmp_path) == {"model": "a"}
    assert mix_labels(["weak (x)", "weak (x)"]) == "weak (x)"
