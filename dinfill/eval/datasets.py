"""Benchmark data: HumanEval-Infill and SantaCoder-FIM from a local copy or a one-time, sha256-checked download.

Why this module is strict about sources: the published numbers we reproduce are counts over exact
problem sets (1033 single-line HumanEval problems, the 1043 Python rows of SantaCoder-FIM in
dataset order, whose row index is the task id of the published files). A silently different file
would give different numbers, so every file has a pinned sha256 and every download is verified
before it lands in the cache.

Where data is looked for, in this order:

1. ``data=PATH``: one file (``.jsonl``, ``.jsonl.gz`` or ``.parquet``) or a directory laid out like 2.;
2. ``data_dir=DIR`` or the environment variable ``DINFILL_DATA_DIR`` (**contract**): a folder with
   ``humaneval-infilling/<name>.jsonl.gz`` and ``santacoder-fim/train.parquet``;
3. the cache (``$DINFILL_CACHE_DIR``, else ``$XDG_CACHE_HOME/dinfill`` or ``~/.cache/dinfill``), same layout;
4. a download into the cache: HumanEval from GitHub ``openai/human-eval-infilling`` (``data/``),
   SantaCoder-FIM from the Hugging Face dataset ``bigcode/santacoder-fim-task`` (``huggingface_hub``).

Offline with none of these, :class:`DatasetUnavailable` names every option.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "DINFILL_DATA_DIR"
CACHE_ENV = "DINFILL_CACHE_DIR"

HUMANEVAL_SUBSETS = {
    "single-line": "HumanEval-SingleLineInfilling",
    "multi-line": "HumanEval-MultiLineInfilling",
    "random-span": "HumanEval-RandomSpanInfilling",
    "random-span-light": "HumanEval-RandomSpanInfillingLight",
}
SANTACODER_LANGUAGES = ("py", "js", "java")
# Pinned checksums of the files as published (see ../shared/data/README.md).
SHA256 = {
    "HumanEval-SingleLineInfilling.jsonl.gz": "1277073e7ddce163ef68598c2bca777f688a53df99422f097e37362090f88e1f",
    "HumanEval-MultiLineInfilling.jsonl.gz": "2f341612eee1d35da1357a4f365e0c0b3ba6e2b62eb491e88aaefa4855af0349",
    "HumanEval-RandomSpanInfilling.jsonl.gz": "b4f330d8a8ff97bf85d9def497dffcae4d741e506449386a877236e422e33e8d",
    "HumanEval-RandomSpanInfillingLight.jsonl.gz": "1432250ecac0cb56e6f97f8faf0970419ef892a98fda7e1f5aa4c4b87209b760",
    "train.parquet": "54d62b5a4f1554ca3f7ab65f901fe1fecdb3eaebac28ebd52a90397c9239c6d9",
}
# GitHub raw files at the commit whose data/ folder the checksums above describe.
HUMANEVAL_URL = (
    "https://raw.githubusercontent.com/openai/human-eval-infilling/88062ff9859c875d04db115b698ed4b0f0395170/data/{name}"
)
SANTACODER_REPO = "bigcode/santacoder-fim-task"
SANTACODER_FILE = "data/train-00000-of-00001-b6ec1fdd66018baa.parquet"
HUMANEVAL_FIELDS = ("task_id", "entry_point", "prompt", "suffix", "canonical_solution", "test")
SANTACODER_FIELDS = ("name", "language", "prompt", "suffix", "canonical_solution", "tests")


class DatasetUnavailable(RuntimeError):
    """No local copy, no cache and no way to download: the message lists the options."""


@dataclass(frozen=True)
class Problem:
    """One infilling problem, benchmark-neutral.

    Attributes
    ----------
    task_id : str
        HumanEval's ``task_id``; for SantaCoder-FIM the row index within the language subset
        (the id the published result files use).
    prompt, suffix : str
        The raw text before and after the hole, as stored in the dataset.
    canonical : str
        The reference middle.
    test : str
        Test code (HumanEval ``test`` with a ``check`` function; SantaCoder ``tests``).
    entry_point : str
        Function the HumanEval checks call (empty for SantaCoder).
    language : str
        ``py``, ``js`` or ``java``.
    name : str
        SantaCoder's row ``name`` (empty for HumanEval).
    """

    task_id: str
    prompt: str
    suffix: str
    canonical: str
    test: str
    entry_point: str = ""
    language: str = "py"
    name: str = ""


def cache_dir() -> Path:
    """Root of the download cache (laid out like a ``DINFILL_DATA_DIR``)."""
    # An explicit cache folder wins; otherwise follow the XDG convention like huggingface_hub does.
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dinfill"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        # Read in 1 MiB blocks: the files are small, but a cache may hold anything.
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_url(url: str, dest: Path) -> None:
    """Download ``url`` (http(s) or file://) to ``dest``."""
    # urllib understands file:// too, which is how the tests point it at a local "remote".
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out)


def _fetch_hub(dest: Path) -> None:
    """Download the SantaCoder-FIM parquet from the Hugging Face hub to ``dest``."""
    from huggingface_hub import hf_hub_download

    # The hub keeps its own cache; we copy out of it so that our cache has one fixed layout.
    path = hf_hub_download(SANTACODER_REPO, SANTACODER_FILE, repo_type="dataset")
    shutil.copyfile(path, dest)


def _download(name: str, target: Path, fetch: Callable[[Path], None], source: str) -> Path:
    """Fetch into a temporary file next to ``target``, check its sha256, then move it in place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target, so the final os.replace is an atomic rename.
    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.")
    os.close(handle)
    try:
        fetch(Path(tmp))
        got = sha256_of(Path(tmp))
        if got != SHA256[name]:
            raise DatasetUnavailable(
                f"{name} downloaded from {source} has sha256 {got}, expected {SHA256[name]}: the file changed "
                f"upstream or the download is corrupt; pass a verified copy with --data-dir / {DATA_ENV}"
            )
        # Only a verified file ever appears under its real name.
        os.replace(tmp, target)
    finally:
        # A failed or refused download leaves nothing behind.
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _locate(subdir: str, name: str, data: str | os.PathLike | None, data_dir: str | os.PathLike | None) -> Path | None:
    """The first existing local copy of ``subdir/name`` (explicit file, data dir, env var, cache)."""
    if data is not None:
        path = Path(data)
        if path.is_file():
            return path
        if not path.is_dir():
            raise FileNotFoundError(f"--data {path}: no such file or directory")
        # A folder may be laid out like DINFILL_DATA_DIR or simply hold the file.
        candidates = [path / subdir / name, path / name]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"--data {path}: found neither {candidates[0]} nor {candidates[1]}")
    # An explicit --data-dir shadows the environment variable.
    roots = []
    if data_dir is not None:
        roots.append(("--data-dir", Path(data_dir)))
    elif os.environ.get(DATA_ENV):
        roots.append((DATA_ENV, Path(os.environ[DATA_ENV])))
    for label, root in roots:
        # A folder that was named but lacks the file is a mistake to report, not to skip over.
        if not (root / subdir / name).is_file():
            raise FileNotFoundError(
                f"{label}={root} has no {subdir}/{name}; the folder must be laid out like ../shared/data "
                "(humaneval-infilling/*.jsonl.gz, santacoder-fim/train.parquet)"
            )
        return root / subdir / name
    # Last local chance: an earlier verified download.
    cached = cache_dir() / "data" / subdir / name
    return cached if cached.is_file() else None


def _unavailable(what: str, source: str, error: BaseException) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"{what} is not available locally and could not be downloaded from {source} ({error}). Options: pass "
        f"--data FILE, or --data-dir DIR / set {DATA_ENV}=DIR to a folder laid out like ../shared/data, or run once "
        f"with network access to fill the cache at {cache_dir() / 'data'}"
    )


def humaneval_file(
    subset: str = "single-line",
    data: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> Path:
    """Path of a HumanEval-Infilling file, downloading it into the cache when needed.

    Parameters
    ----------
    subset : str
        One of :data:`HUMANEVAL_SUBSETS` (``single-line`` is what the published table used).
    data, data_dir : path, optional
        Explicit file or folder; see the module docstring for the search order.
    download : bool
        Allow the one-time download into the cache.
    """
    if subset not in HUMANEVAL_SUBSETS:
        raise ValueError(f"unknown HumanEval subset {subset!r}; choose one of {sorted(HUMANEVAL_SUBSETS)}")
    name = HUMANEVAL_SUBSETS[subset] + ".jsonl.gz"
    found = _locate("humaneval-infilling", name, data, data_dir)
    if found is not None:
        return found
    # Nothing local: fetch once from GitHub into the cache.
    url = HUMANEVAL_URL.format(name=name)
    target = cache_dir() / "data" / "humaneval-infilling" / name
    if not download:
        raise _unavailable(f"HumanEval-Infilling {subset}", url, RuntimeError("downloads disabled"))
    try:
        return _download(name, target, lambda dest: _fetch_url(url, dest), url)
    # URLError covers DNS and refused connections; OSError a read-only or full cache folder.
    except (urllib.error.URLError, OSError) as exc:
        raise _unavailable(f"HumanEval-Infilling {subset}", url, exc) from exc


def santacoder_file(
    data: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None, download: bool = True
) -> Path:
    """Path of the SantaCoder-FIM parquet, downloading it into the cache when needed (see :func:`humaneval_file`)."""
    found = _locate("santacoder-fim", "train.parquet", data, data_dir)
    if found is not None:
        return found
    source = f"the Hugging Face dataset {SANTACODER_REPO}"
    if not download:
        raise _unavailable("SantaCoder-FIM", source, RuntimeError("downloads disabled"))
    # Stored as train.parquet so the cache has the same layout as a data folder.
    target = cache_dir() / "data" / "santacoder-fim" / "train.parquet"
    try:
        return _download("train.parquet", target, _fetch_hub, source)
    except DatasetUnavailable:
        raise
    except Exception as exc:  # huggingface_hub raises many types when offline
        raise _unavailable("SantaCoder-FIM", source, exc) from exc


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file (gzipped when the name ends in ``.gz``); a bad line is an error naming it."""
    # The published files are gzipped JSONL; a user-made subset may be plain JSONL.
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            # Tolerate blank lines (a trailing one is common in hand-edited files).
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    return rows


def _require(row: dict, fields: tuple[str, ...], where: str) -> None:
    # Every field is text in both benchmarks; a None or a number means a different file.
    missing = [name for name in fields if not isinstance(row.get(name), str)]
    if missing:
        raise ValueError(f"{where}: missing or non-string field(s) {missing}; expected {list(fields)}")


def load_humaneval(
    subset: str = "single-line",
    data: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> list[Problem]:
    """Load HumanEval-Infilling problems in file order (see :func:`humaneval_file` for the sources)."""
    path = humaneval_file(subset, data, data_dir, download)
    problems = []
    for number, row in enumerate(read_jsonl(path), 1):
        _require(row, HUMANEVAL_FIELDS, f"{path}: row {number}")
        problems.append(
            Problem(
                task_id=row["task_id"],
                prompt=row["prompt"],
                suffix=row["suffix"],
                canonical=row["canonical_solution"],
                test=row["test"],
                entry_point=row["entry_point"],
            )
        )
    return problems


def load_santacoder(
    language: str = "py",
    data: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> list[Problem]:
    """Load the SantaCoder-FIM rows of one language, in dataset order; ``task_id`` is the row index."""
    if language not in SANTACODER_LANGUAGES:
        raise ValueError(f"unknown SantaCoder-FIM language {language!r}; choose one of {SANTACODER_LANGUAGES}")
    path = santacoder_file(data, data_dir, download)
    # pyarrow only when needed: HumanEval-only users never pay for importing it.
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = read_jsonl(path)
    problems = []
    for number, row in enumerate(rows):
        _require(row, SANTACODER_FIELDS, f"{path}: row {number}")
        # Filtering keeps the dataset order, so the row index within the language is the published task id.
        if row["language"] != language:
            continue
        problems.append(
            Problem(
                # A string like every task id; the published files write an integer, which the reader accepts.
                task_id=str(len(problems)),
                prompt=row["prompt"],
                suffix=row["suffix"],
                canonical=row["canonical_solution"],
                test=row["tests"],
                language=language,
                name=row["name"],
            )
        )
    return problems
