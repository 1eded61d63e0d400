"""Run folders: append-only JSONL records that survive a SIGKILL, one writer at a time, strict readers.

Why append-only with an fsync per record: a long GPU run that is killed (pre-emption, OOM, a
SIGKILL) must resume without losing or duplicating a problem. Each record is one ``write`` of a
whole line followed by ``fsync``, so after a crash the file holds complete records plus at most one
torn last line (no newline). On restart the writer cuts that fragment off and the runner redoes
that problem; a damaged line anywhere else is a real corruption and is reported with its number.

Why a lock: two processes appending to one folder would each redo every problem (every key
twice). :class:`RunLock` is an OS file lock (``flock``) held for the whole run and released by the
kernel when the process dies, so a killed run never leaves a stale lock; a second writer fails at
once with the holder's pid and command. Under torchrun every rank holds a shared lock on the
folder and an exclusive one on its own rank file, so a second job (or a single process) collides
with the first. Readers (``dinfill report``) never take it. ``run.json`` says which run a folder
holds; a folder without records is not a run yet, so its ``run.json`` may be replaced.

The same strict reading (line numbers in every error) serves ``dinfill score`` on completion
files in the human-eval sample format and in the field names of the published result files.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import platform
import shlex
import stat
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

RECORDS = "records.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
RECORD_FIELDS = ("task", "task_id", "seed", "sample", "completion", "outcome")
# Field names accepted for the generated middle, in order of preference.
COMPLETION_FIELDS = ("completion", "generated_code")
# Seeds are labels here, but generators feed them to torch.Generator.manual_seed (a signed 64-bit integer).
_SEED_RANGE = (-(2**63), 2**64)
_SAMPLE_RANGE = (0, 2**31)


class RecordsError(ValueError):
    """A malformed results or completion file; the message names the file and line."""


class RunFolderBusy(RuntimeError):
    """Another live process is writing this run folder; the message names it."""


def _decode_line(path: Path, number: int, raw: bytes) -> dict | None:
    """Parse one JSONL line; None for a blank line; RecordsError naming the line otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordsError(
            f"{path}:{number}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "re-encode the file as UTF-8"
        ) from exc
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordsError(
            f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line"
        ) from exc
    if not isinstance(value, dict):
        raise RecordsError(f"{path}:{number}: expected a JSON object per line, found {type(value).__name__}")
    return value


def read_jsonl(path: str | os.PathLike, torn_tail_ok: bool = False) -> tuple[list[tuple[int, dict]], int | None]:
    """Read a JSONL file strictly.

    Parameters
    ----------
    path : path
        The file.
    torn_tail_ok : bool
        Treat a last line without a newline as the fragment of an interrupted append (ignored,
        its byte offset returned) instead of as a final line.

    Returns
    -------
    rows : list of (line number, object)
    torn_at : int or None
        Byte offset where a torn last line starts, when one was ignored.
    """
    path = Path(path)
    data = path.read_bytes()
    # Bytes, not text: a bad byte must be reported with its line number, not fail the whole read.
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    rows = []
    for number, raw in enumerate(lines, 1):
        value = _decode_line(path, number, raw)
        if value is not None:
            rows.append((number, value))
    # Only our own append-only files can have a torn tail; a hand-made file may just lack the final newline.
    if tail.strip():
        if torn_tail_ok:
            return rows, len(data) - len(tail)
        value = _decode_line(path, len(lines) + 1, tail)
        if value is not None:
            rows.append((len(lines) + 1, value))
    return rows, None


def record_key(record: dict) -> tuple[str, int, int]:
    """Identity of a record: (task_id, seed, sample)."""
    return (str(record["task_id"]), int(record["seed"]), int(record["sample"]))


class RecordWriter:
    """Append-only JSONL writer: one ``write`` + ``fsync`` per record; repairs a torn tail on open.

    Parameters
    ----------
    path : path
        The records file (created if missing).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _, torn_at = read_jsonl(self.path, torn_tail_ok=True)
            if torn_at is not None:
                # The fragment of a record whose append was interrupted: drop it, its problem is redone.
                os.truncate(self.path, torn_at)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _fsync_dir(self.path.parent)

    def append(self, record: dict) -> None:
        """Write one record durably."""
        # ASCII JSON: a middle with lone surrogates (bad bytes from a tokenizer) still encodes.
        data = (json.dumps(record, ensure_ascii=True) + "\n").encode("ascii")
        view = memoryview(data)
        # O_APPEND: every write lands at the end even if another writer appended in between.
        while view:
            view = view[os.write(self.fd, view) :]
        # Durable before the next problem starts: a crash loses at most the record being written.
        os.fsync(self.fd)

    def close(self) -> None:
        """Close the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _fsync_dir(path: Path) -> None:
    try:
        # A new file's name is durable only once its directory is synced.
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def record_files(out_dir: str | os.PathLike) -> list[Path]:
    """The records files of a run folder: the merged/single file first, then the per-rank files."""
    out = Path(out_dir)
    # records.jsonl is the single-process file or the merge of a multi-rank run.
    files = [out / RECORDS] if (out / RECORDS).exists() else []
    return files + sorted(out.glob("records.rank*.jsonl"))


def load_records(out_dir: str | os.PathLike) -> list[dict]:
    """Every complete record of a run folder, each key once, in (seed, sample, index) order.

    Torn last lines are ignored (a writer repairs its own file when it reopens it). A key recorded
    twice with different completions is an error: it would mean two runs wrote into one folder.
    """
    seen: dict[tuple, tuple[dict, str]] = {}
    for path in record_files(out_dir):
        rows, _ = read_jsonl(path, torn_tail_ok=True)
        for number, record in rows:
            missing = [name for name in RECORD_FIELDS if name not in record]
            if missing:
                raise RecordsError(f"{path}:{number}: record without field(s) {missing}; not a dinfill results file?")
            key = record_key(record)
            where = f"{path}:{number}"
            # The merged file repeats the rank files: identical repeats are expected.
            if key in seen:
                if seen[key][0]["completion"] != record["completion"]:
                    raise RecordsError(
                        f"{where}: {key} was already recorded at {seen[key][1]} with a different completion; "
                        "two different runs wrote into this folder"
                    )
                continue
            seen[key] = (record, where)
    records = [record for record, _ in seen.values()]
    # Dataset order within each (seed, sample), whatever order the ranks finished in.
    records.sort(key=lambda r: (r["seed"], r["sample"], r.get("index", 0)))
    return records


def write_records_atomically(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Replace ``path`` with ``records`` in one rename (used for the merged file of a multi-rank run)."""
    path = Path(path)
    # Write aside, then rename: a reader never sees a half-written merged file.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _command_line() -> str:
    """This process's command line (what a user recognises in a lock message)."""
    try:
        with open("/proc/self/cmdline", "rb") as handle:
            args = [a.decode("utf-8", "replace") for a in handle.read().split(b"\0") if a]
    except OSError:
        args = [sys.executable, *sys.argv]
    return shlex.join(args).replace("\n", "\\n")[:500]  # one line, whatever the arguments hold


class RunLock:
    """The right to write one run folder, held from :meth:`acquire` until :meth:`release` or process death.

    Parameters
    ----------
    out_dir : path
        The run folder (created if missing).
    rank, world_size : int
        This process's place in a torchrun job (0 of 1 for a single process).
    """

    def __init__(self, out_dir: str | os.PathLike, rank: int = 0, world_size: int = 1) -> None:
        self.out = Path(out_dir)
        self.rank, self.world_size = rank, world_size
        self._fds: list[int] = []

    def acquire(self) -> RunLock:
        """Take the lock without waiting; :class:`RunFolderBusy` names the holder when it is taken."""
        self.out.mkdir(parents=True, exist_ok=True)
        # One process: the folder exclusively. torchrun ranks: the folder shared, their own rank file exclusively.
        if self.world_size == 1:
            self._take(LOCK_FILE, fcntl.LOCK_EX, write_holder=True)
        else:
            self._take(LOCK_FILE, fcntl.LOCK_SH, write_holder=self.rank == 0)
            self._take(f"run.rank{self.rank}.lock", fcntl.LOCK_EX, write_holder=True)
        return self

    def _take(self, name: str, mode: int, write_holder: bool) -> None:
        path = self.out / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            self.release()
            raise RunFolderBusy(
                f"{self.out} is being written by {_describe_holder(holder)}; wait for it to finish "
                "(a killed run releases its lock), or use another --out"
            ) from None
        self._fds.append(fd)
        if write_holder:
            # Written after the lock is ours, so what a blocked writer reads is the live holder.
            info = {
                "pid": os.getpid(),
                "command": _command_line(),
                "host": platform.node(),
                "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "rank": self.rank,
                "world_size": self.world_size,
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        """Give the lock back (the kernel also does when the process dies)."""
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> RunLock:
        return self.acquire() if not self._fds else self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _read_holder(fd: int, patience: float = 1.0) -> str:
    """The lock holder's details from its lock file; a holder that has just taken the lock writes them a moment
    later (truncate, then write), so a blocked writer waits up to ``patience`` seconds for them."""
    deadline = time.monotonic() + patience
    while True:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        try:
            json.loads(text)
            return text
        except ValueError:
            if time.monotonic() >= deadline:
                return text
        time.sleep(0.01)


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        where = f" on {info['host']}" if info.get("host") != platform.node() else ""
        rank = f", rank {info['rank']} of {info['world_size']}" if info.get("world_size", 1) > 1 else ""
        return f"pid {info['pid']}{where}{rank} since {info['since']} ({info['command']})"
    except (ValueError, TypeError, KeyError):  # the holder has not written its details yet
        return "another process (it is starting; pid not written yet)"


def check_run_file(
    out_dir: str | os.PathLike,
    identity: dict,
    overwrite: bool = False,
    fix: str = "resume with the same settings, or use another --out",
) -> None:
    """Record ``identity`` in ``run.json``, or refuse a folder that holds a different run.

    A folder whose ``run.json`` differs but that holds no records is not a run yet (say a first attempt
    that failed before its first record): its ``run.json`` is replaced. ``overwrite`` replaces it anyway
    (the caller has removed the old records); ``fix`` ends the refusal. Call with the folder's
    :class:`RunLock` held.
    """
    out = Path(out_dir)
    path = out / RUN_FILE
    if path.exists() and not overwrite:
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))["identity"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RecordsError(f"{path}: not a dinfill run.json ({exc}); remove it or use another --out") from exc
        if existing == identity:
            return
        if load_records(out):
            changed = sorted(k for k in set(existing) | set(identity) if existing.get(k) != identity.get(k))
            differences = "; ".join(f"{k}: {existing.get(k)!r} there, {identity.get(k)!r} now" for k in changed)
            raise ValueError(f"{out} holds a different run ({differences}); {fix}")
    info = {
        "identity": identity,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
    }
    # Write aside then rename, so another rank never reads half a run.json.
    tmp = path.with_name(RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def mix_labels(labels: Iterable[str]) -> str:
    """One text for the sandbox labels of several records.

    Parameters
    ----------
    labels : iterable of str
        ``full`` or ``weak (...)`` per record (see :attr:`dinfill.eval.execution.ExecResult.sandbox`).

    Returns
    -------
    str
        The label itself when all agree, else ``mixed: A + B`` (first seen first).
    """
    distinct = list(dict.fromkeys(labels))
    return distinct[0] if len(distinct) == 1 else "mixed: " + " + ".join(distinct)


def note_sandbox(out_dir: str | os.PathLike, label: str) -> None:
    """Record in ``run.json`` how isolated this run's programs are (``full``, ``weak (...)``, or a mix after a resume).

    Parameters
    ----------
    out_dir : path
        The run folder; call with its :class:`RunLock` held, after :func:`check_run_file`.
    label : str
        The sandbox's label (:attr:`dinfill.eval.execution.Sandbox.label`).
    """
    path = Path(out_dir) / RUN_FILE
    info = json.loads(path.read_text(encoding="utf-8"))
    before = info.get("sandbox")
    labels = [label] if before is None else [*before.removeprefix("mixed: ").split(" + "), label]
    info["sandbox"] = mix_labels(labels)
    if info["sandbox"] != before:
        tmp = path.with_name(RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def read_run_identity(out_dir: str | os.PathLike) -> dict | None:
    """The identity recorded in a folder's ``run.json`` (None when there is none)."""
    path = Path(out_dir) / RUN_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["identity"]


@dataclass(frozen=True)
class CompletionEntry:
    """One completion read from a file for re-scoring.

    Attributes
    ----------
    line : int
        Line number in the file (for messages).
    index : int
        Index of the problem in the task's dataset order.
    seed, sample : int
        ``seed`` from the line if present (else 0); ``sample`` from the line if present, else the
        count of earlier lines with the same task and seed.
    completion : str
        The raw middle.
    """

    line: int
    index: int
    seed: int
    sample: int
    completion: str


def _check_regular_file(path: Path) -> None:
    """A clear error for what cannot be a completion file (without opening it: a FIFO would block)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"completion file {path} does not exist") from None
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO (named pipe)",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    kind = next((name for test, name in kinds.items() if test(info.st_mode)), None)
    if kind is not None:
        raise RecordsError(f"completion file {path} is {kind}, not a regular file; pass a JSONL file of completions")
    if info.st_size == 0:
        raise RecordsError(f"completion file {path} is empty; expected one JSON object per line (task_id, completion)")


def read_completions(
    path: str | os.PathLike, task_ids: Sequence[str], canonicals: Sequence[str], label: str
) -> list[CompletionEntry]:
    """Read a completion file for re-scoring, with errors that name the line.

    Accepts the human-eval sample format (``task_id`` + ``completion``), the published result files
    (``generated_code``; SantaCoder ``task_id`` as the row index, an int) and dinfill records. When
    a line carries ``canonical_solution`` or ``ground_truth_middle`` it must match the dataset's,
    which catches files made for another subset or row order.

    Parameters
    ----------
    path : path
        The JSONL file.
    task_ids : sequence of str
        The task's ids in dataset order.
    canonicals : sequence of str
        Canonical middles in the same order.
    label : str
        Task and subset for messages (``humaneval-infill single-line``).
    """
    path = Path(path)
    _check_regular_file(path)
    # Ids are compared as strings: SantaCoder files use the integer row index.
    index_of = {task_id: i for i, task_id in enumerate(task_ids)}
    rows, _ = read_jsonl(path)
    entries = []
    counters: dict[tuple[int, int], int] = {}
    for number, row in rows:
        where = f"{path}:{number}"
        if "task_id" not in row:
            raise RecordsError(f"{where}: no 'task_id' field; each line needs task_id and completion or generated_code")
        task_id = row["task_id"]
        # bool is an int in Python, and `true` is never a task id.
        if isinstance(task_id, bool) or not isinstance(task_id, (str, int)):
            raise RecordsError(f"{where}: task_id must be a string or an integer row index, got {task_id!r}")
        if str(task_id) not in index_of:
            example = task_ids[0] if task_ids else "?"
            raise RecordsError(
                f"{where}: unknown task_id {task_id!r} for {label} ({len(task_ids)} problems, e.g. {example!r}); "
                "wrong --task or --subset?"
            )
        # human-eval writes completion, the published AR files generated_code.
        field = next((name for name in COMPLETION_FIELDS if name in row), None)
        if field is None:
            raise RecordsError(f"{where}: no completion field; expected one of {list(COMPLETION_FIELDS)}")
        completion = row[field]
        if not isinstance(completion, str):
            raise RecordsError(f"{where}: {field} must be a string, got {type(completion).__name__}")
        index = index_of[str(task_id)]
        # A cheap guard against a file scored against the wrong subset or row order.
        for name in ("canonical_solution", "ground_truth_middle"):
            if name in row and row[name] != canonicals[index]:
                raise RecordsError(
                    f"{where}: {name} differs from the dataset's canonical middle of task {task_id!r}; the file "
                    f"was made for another subset, language or row order than {label}"
                )
        seed = _integer(row, "seed", 0, _SEED_RANGE, where)
        # Several lines for one task (pass@k) are numbered in file order unless they say otherwise.
        sample = counters.get((index, seed), 0)
        counters[(index, seed)] = sample + 1
        if "sample" in row:
            sample = _integer(row, "sample", 0, _SAMPLE_RANGE, where)
        entries.append(CompletionEntry(number, index, seed, sample, completion))
    if not entries:
        raise RecordsError(f"{path}: no completions in the file")
    _refuse_duplicates(path, entries, task_ids)
    return entries


def _integer(row: dict, name: str, default: int, bounds: tuple[int, int], where: str) -> int:
    """``row[name]`` as an int in ``[low, high)``: a JSON integer, not a float, a bool or a string."""
    value = row.get(name, default)
    low, high = bounds
    # bool is an int in Python; 1e400 is an (infinite) float; neither is a seed.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise RecordsError(f"{where}: {name} must be an integer in [{low}, {high}), got {str(value)[:40]!r}")
    return value


def _refuse_duplicates(path: Path, entries: list[CompletionEntry], task_ids: Sequence[str]) -> None:
    """Every (task_id, seed, sample) once: a repeated key would be scored twice and counted once (or refused later
    by the run folder), so it is an error before anything is scored, naming the lines."""
    first: dict[tuple[int, int, int], int] = {}
    clashes = []
    for entry in entries:
        key = (entry.index, entry.seed, entry.sample)
        if key in first:
            clashes.append(f"{task_ids[entry.index]!r} seed {entry.seed} sample {entry.sample} on lines {first[key]} "
                           f"and {entry.line}")  # fmt: skip
        else:
            first[key] = entry.line
    if clashes:
        more = f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else ""
        raise RecordsError(
            f"{path}: {len(clashes)} duplicate (task_id, seed, sample) key(s): {'; '.join(clashes[:5])}{more}; "
            "give each repeated sample its own 'sample' number (or leave 'sample' out to number them in file order)"
        )
