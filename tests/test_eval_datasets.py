"""Dataset sources: local folders, explicit files, and the sha256-checked download into the cache.

Downloads are exercised offline: the HumanEval URL is pointed at a ``file://`` copy and the hub
download is replaced by a function that hands back a local file (the code path around it is real).
"""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dinfill.eval import datasets
from dinfill.eval.datasets import (
    DATA_ENV,
    DatasetUnavailable,
    load_humaneval,
    load_santacoder,
    sha256_of,
)

DATA = os.environ.get(DATA_ENV)
needs_data = pytest.mark.skipif(not DATA, reason="DINFILL_DATA_DIR is not set (CI sets it to ../shared/data)")
HE_NAME = "HumanEval-SingleLineInfilling.jsonl.gz"


def humaneval_rows(n: int = 3) -> list[dict]:
    return [
        {
            "task_id": f"SingleLineInfilling/HumanEval/{i}/L0",
            "entry_point": "f",
            "prompt": "def f():\n",
            "suffix": "",
            "canonical_solution": f"    return {i}\n",
            "test": f"def check(c):\n    assert c() == {i}\n",
        }
        for i in range(n)
    ]


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No data dir, an empty cache, and a local 'remote' holding a small HumanEval file."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv(datasets.CACHE_ENV, str(tmp_path / "cache"))
    remote = tmp_path / "remote"
    remote.mkdir()
    with gzip.open(remote / HE_NAME, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in humaneval_rows())
    monkeypatch.setitem(datasets.SHA256, HE_NAME, sha256_of(remote / HE_NAME))
    monkeypatch.setattr(datasets, "HUMANEVAL_URL", "file://" + str(remote) + "/{name}")
    return tmp_path


def test_download_once_into_cache(isolated, monkeypatch):
    problems = load_humaneval()
    assert [p.task_id for p in problems][-1] == "SingleLineInfilling/HumanEval/2/L0"
    cached = isolated / "cache" / "data" / "humaneval-infilling" / HE_NAME
    assert cached.is_file()
    # Second time the cache answers: a fetch would now fail.
    monkeypatch.setattr(datasets, "HUMANEVAL_URL", "file://" + str(isolated / "gone") + "/{name}")
    assert len(load_humaneval()) == 3


def test_checksum_mismatch_is_refused(isolated, monkeypatch):
    monkeypatch.setitem(datasets.SHA256, HE_NAME, "0" * 64)
    with pytest.raises(DatasetUnavailable, match="sha256"):
        load_humaneval()
    folder = isolated / "cache" / "data" / "humaneval-infilling"
    assert list(folder.iterdir()) == []  # neither the bad file nor a temporary one is left


def test_offline_without_copy_names_the_options(isolated, monkeypatch):
    monkeypatch.setattr(datasets, "HUMANEVAL_URL", "file://" + str(isolated / "gone") + "/{name}")
    with pytest.raises(DatasetUnavailable) as info:
        load_humaneval()
    for option in ("--data", "--data-dir", DATA_ENV, "cache"):
        assert option in str(info.value)
    with pytest.raises(DatasetUnavailable, match="downloads disabled"):
        load_humaneval(download=False)


def write_santacoder(path, languages=("py", "js", "py")) -> None:
    rows = {
        "name": [f"row{i}" for i in range(len(languages))],
        "language": list(languages),
        "prompt": [f"p{i}" for i in range(len(languages))],
        "suffix": ["\n"] * len(languages),
        "canonical_solution": [f"    return {i}" for i in range(len(languages))],
        "tests": [""] * len(languages),
    }
    pq.write_table(pa.table(rows), path)


def test_santacoder_from_the_hub(isolated, monkeypatch):
    source = isolated / "remote" / "train.parquet"
    write_santacoder(source)
    monkeypatch.setitem(datasets.SHA256, "train.parquet", sha256_of(source))
    calls = []

    def fake_hf_hub_download(repo_id, filename, repo_type):
        calls.append((repo_id, filename, repo_type))
        return str(source)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    problems = load_santacoder("py")
    assert calls == [(datasets.SANTACODER_REPO, datasets.SANTACODER_FILE, "dataset")]
    # Row index within the language is the task id; dataset order is kept.
    assert [(p.task_id, p.name) for p in problems] == [("0", "row0"), ("1", "row2")]
    assert [p.task_id for p in load_santacoder("js")] == ["0"]

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    (isolated / "cache" / "data" / "santacoder-fim" / "train.parquet").unlink()
    with pytest.raises(DatasetUnavailable, match="bigcode/santacoder-fim-task"):
        load_santacoder()


def test_explicit_file_and_folder(isolated):
    remote = isolated / "remote"
    assert len(load_humaneval(data=remote / HE_NAME)) == 3
    assert len(load_humaneval(data=remote)) == 3  # a folder holding the file directly
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_humaneval(data=remote / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="laid out like"):
        load_humaneval(data_dir=isolated / "cache")


def test_env_folder_must_have_the_layout(isolated, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(isolated / "remote"))
    with pytest.raises(FileNotFoundError, match=f"{DATA_ENV}=.*humaneval-infilling/{HE_NAME}"):
        load_humaneval()


def test_unknown_subset_and_bad_rows(isolated):
    with pytest.raises(ValueError, match="unknown HumanEval subset"):
        load_humaneval("two-line")
    with pytest.raises(ValueError, match="unknown SantaCoder-FIM language"):
        load_santacoder("rust")
    bad = isolated / "bad.jsonl"
    rows = humaneval_rows(2)
    del rows[1]["test"]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"row 2: missing or non-string field\(s\) \['test'\]"):
        load_humaneval(data=bad)
    bad.write_text(json.dumps(rows[0]) + "\n{\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_humaneval(data=bad)


@needs_data
def test_shared_data_matches_the_pins():
    for subset, size in (
        ("single-line", 1033),
        ("multi-line", 5815),
        ("random-span", 1640),
        ("random-span-light", 164),
    ):
        path = datasets.humaneval_file(subset, download=False)
        assert sha256_of(path) == datasets.SHA256[path.name]
        assert len(load_humaneval(subset, download=False)) == size
    assert sha256_of(datasets.santacoder_file(download=False)) == datasets.SHA256["train.parquet"]
    sizes = {language: len(load_santacoder(language, download=False)) for language in ("py", "js", "java")}
    assert sizes == {"py": 1043, "js": 1969, "java": 1780}
