"""``dinfill compare``: one command for the whole comparison, its table in the published layout, its picture.

End to end on two tiny random models (one diffusion, one AR) and both tasks with the real tokenizer and data:
the run folders in ``dinfill eval``'s layout, the table with both columns and both tasks beside the published
numbers, CSV / JSON / PNG, a second run that does nothing, and a model that cannot load becoming a column with
its reason while the rest runs. The table itself is checked cell by cell on hand-made records; the scheduler
that spreads models over GPUs on a fake launcher.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from pathlib import Path

import pytest

from dinfill.cli import main
from dinfill.eval.compare import ModelJob, run_jobs
from dinfill.eval.records import RunLock
from dinfill.eval.report import CompareColumn, comparison_table, find_sweeps, summarize_run

# Programs must run, not be fully isolated (tests/test_eval_execution.py checks that): where the evaluator is
# not root, accept the weaker sandbox rather than be refused (the model processes inherit it).
if os.geteuid() != 0:
    os.environ.setdefault("DINFILL_ALLOW_WEAK_SANDBOX", "1")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_argv(shared_dir, tmp_path, monkeypatch) -> list[str]:
    data = Path(os.environ.get("DINFILL_DATA_DIR") or shared_dir / "data")
    if not (data / "santacoder-fim" / "train.parquet").is_file():
        pytest.skip(f"no benchmark data in {data}: set DINFILL_DATA_DIR to a copy of ../shared/data")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the model processes: one thread each on a shared machine
    return [
        "--random-weights", "--limit", "4", "--tokenizer", str(shared_dir / "tokenizers" / "qwen2.5-coder"),
        "--data-dir", str(data), "--no-download", "--length", "oracle", "search:8",
        "--steps", "4", "--temperature", "0", "--max-new-tokens", "8", "--no-progress",
    ]  # fmt: skip


def test_compare_end_to_end_then_nothing_to_do(tiny_argv, tmp_path, capsys):
    out = tmp_path / "cmp"
    broken = tmp_path / "broken-checkpoint"  # a folder without config.json: it fails in its own process
    broken.mkdir()
    # one run folder per (model, task, setting), exactly where `dinfill eval --out` puts a task
    tasks = ("humaneval-infill-single-line", "santacoder-fim-py")
    runs = [out / "tiny-dcoder" / setting / task for setting in ("oracle", "search-8") for task in tasks]
    runs += [out / "tiny-qwen2" / task for task in tasks]
    busy = RunLock(runs[5]).acquire()  # another writer holds one run folder: that run waits, the rest goes on
    try:
        rc = main(["compare", "--out", str(out), "--models", "tiny-dcoder", "tiny-qwen2", str(broken), *tiny_argv])
    finally:
        busy.release()
    captured = capsys.readouterr()
    assert rc == 1, captured.err  # something failed, and the command says so
    assert not (runs[5] / "records.jsonl").exists()
    assert f"santacoder-fim: {runs[5]} is being written by pid {os.getpid()}" in captured.out
    # run again: only the missing run is done (its model loaded once more); the complete ones are not touched
    stamps = {run: (run / "records.jsonl").stat().st_mtime_ns for run in runs[:5]}
    rc = main(["compare", "--out", str(out), "--models", "tiny-dcoder", "tiny-qwen2", str(broken), *tiny_argv])
    captured = capsys.readouterr()
    assert rc == 1 and {run: (run / "records.jsonl").stat().st_mtime_ns for run in runs[:5]} == stamps
    assert "tiny-dcoder: every run is complete; nothing to do" in captured.err
    assert "# compare: tiny-qwen2 (ar): 2 run(s)" in captured.err
    for run in runs:
        records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
        assert len(records) == 4 and (run / "run.json").is_file() and (run / "summary.json").is_file(), run
        assert records[0]["env"]["random_weights"] is True and records[0]["timings"]["tokens"] > 0
    sampler = json.loads((runs[2] / "summary.json").read_text())["sampler"]
    assert sampler["length"] == "search" and sampler["middle_tokens"] == 8 and sampler["steps"] == 4
    ar = json.loads((runs[4] / "summary.json").read_text())["sampler"]
    assert ar["max_new_tokens"] == 8 and "steps" not in ar  # each flag went to the models of its kind only
    # the table: published layout, both columns, both tasks, the broken model as a column with its reason
    table = (out / "compare.md").read_text()
    assert table == captured.out
    header = table.splitlines()[0]
    for label in ("tiny-dcoder (random weights), oracle", "tiny-dcoder (random weights), search:8",
                  "tiny-qwen2 (random weights)", str(broken)):  # fmt: skip
        assert label in header
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:] if line.startswith("|")}
    for name in ("HumanEval-Infill pass@1", "SantaCoder-FIM exact match (first_line)",
                 "SantaCoder-FIM exact match (whole)", "gap to the oracle: HumanEval-Infill pass@1",
                 "ms per problem: SantaCoder-FIM", "tokens / s: HumanEval-Infill", "peak GPU memory", "device",
                 "versions", "settings", "status"):  # fmt: skip
        assert name in rows, name
    assert rows["HumanEval-Infill pass@1"].count("/4") == 3  # the three columns that ran: n/4 each
    assert "n/a (CPU)" in rows["peak GPU memory"] and "cpu" in rows["device"]
    assert rows["status"].count("| complete") == 3 and f"failed: could not load {broken}" in rows["status"]
    assert "no config.json" in rows["status"]
    with (out / "compare.csv").open(encoding="utf-8") as f:
        lines = list(csv.DictReader(f))
    assert {line["column"] for line in lines} >= {"tiny-qwen2 (random weights)", str(broken)}
    assert {line["task"] for line in lines if line["model"] == "tiny-qwen2"} == {"humaneval-infill", "santacoder-fim"}
    document = json.loads((out / "compare.json").read_text())
    assert [c["setting"] for c in document["columns"]] == ["oracle", "search:8", "-", "-"]
    assert document["complete"] is False and document["columns"][3]["failure"].startswith("could not load")
    assert (out / "compare.png").read_bytes()[:8] == PNG

    # a third run of the models that worked: every run folder is complete, so no model is even loaded
    stamps = {run: (run / "records.jsonl").stat().st_mtime_ns for run in runs}
    status = out / "tiny-qwen2" / "compare-status.json"
    before = status.stat().st_mtime_ns
    rc = main(["compare", "--out", str(out), "--models", "tiny-dcoder", "tiny-qwen2", *tiny_argv])
    again = capsys.readouterr()
    assert rc == 0, again.err
    assert again.err.count("every run is complete; nothing to do") == 2 and "run(s)" not in again.err
    assert {run: (run / "records.jsonl").stat().st_mtime_ns for run in runs} == stamps
    assert status.stat().st_mtime_ns == before
    assert "| complete | complete | complete |" in again.out

    # `dinfill report DIR --plot` draws the same picture for any run folders, with a sweep's steps curve
    sweep = {"type": "sweep", "task": "humaneval-infill", "model": "tiny-dcoder",
             "row": {"steps": 4, "alg": "p2", "length": "oracle", "quality": None, "problems_per_s": 2.0}}  # fmt: skip
    (out / "sweep").mkdir()
    (out / "sweep" / "sweep.jsonl").write_text(json.dumps(sweep) + "\n" + json.dumps({**sweep, "row": {
        **sweep["row"], "steps": 8, "problems_per_s": 1.0}}) + "\n{torn")  # fmt: skip
    assert [r["steps"] for r in find_sweeps([out])] == [4, 8]
    assert main(["report", str(out), "--plot"]) == 0
    assert f"Plot: {out / 'report.png'}" in capsys.readouterr().out
    assert (out / "report.png").read_bytes()[:8] == PNG


def _summary(task: str, model: str, kind: str, outcomes: list[dict], *, length: str = "oracle", size: int = 4,
             peak: int | None = None) -> dict:  # fmt: skip
    """A run's summary from hand-made records (the fields ``dinfill.eval.runner`` writes)."""
    rule = "none" if task == "humaneval-infill" else "first_line"
    records = [
        {
            "task": task,
            "subset": "single-line" if task == "humaneval-infill" else "py",
            "task_id": f"t{i}",
            "seed": 0,
            "sample": 0,
            "model": model,
            "kind": kind,
            "postprocess": {"rule": rule},
            "sampler": {"length": length, "middle_tokens": 64} if kind == "diffusion" else {"max_new_tokens": 512},
            "outcome": outcome,
            "task_size": size,
            "timings": {"generate_s": 0.05, "tokens": 10.0, "peak_memory_bytes": peak},
            "env": {
                "device": "NVIDIA H100",
                "device_type": "cuda",
                "dtype": "bfloat16",
                "torch": "2.13",
                "git": "abc",
                "random_weights": False,
            },
        }  # fmt: skip
        for i, outcome in enumerate(outcomes)
    ]
    return summarize_run(records)


def _he(*passed: bool) -> list[dict]:
    return [{"passed": p, "status": "passed" if p else "failed"} for p in passed]


def _sc(*pairs: tuple[bool, bool]) -> list[dict]:
    return [{"exact_match": a, "exact_match_first_line": a, "exact_match_whole": b} for a, b in pairs]


def test_comparison_table_cells():
    dcoder = "fredzzp/open-dcoder-0.5B"
    oracle = CompareColumn(
        dcoder,
        "diffusion",
        "oracle",
        {
            "humaneval-infill": _summary("humaneval-infill", dcoder, "diffusion", _he(1, 1, 0, 0), peak=3 * 2**29),
            "santacoder-fim": _summary("santacoder-fim", dcoder, "diffusion", _sc((1, 0), (0, 0), (1, 1), (0, 0))),
        },
    )
    search = CompareColumn(dcoder, "diffusion", "search:64", {
        "humaneval-infill": _summary("humaneval-infill", dcoder, "diffusion", _he(1, 0, 0, 0), length="search"),
        "santacoder-fim": _summary("santacoder-fim", dcoder, "diffusion", _sc((1, 1), (1, 0), (1, 0), (0, 0)),
                                   length="search")})  # fmt: skip
    qwen = CompareColumn(
        "Qwen/Qwen2.5-Coder-1.5B",
        "ar",
        "-",
        {  # the base model: published with -Instruct
            "humaneval-infill": _summary("humaneval-infill", "Qwen/Qwen2.5-Coder-1.5B", "ar", _he(1, 1, 1, 0)),
            "santacoder-fim": _summary("santacoder-fim", "Qwen/Qwen2.5-Coder-1.5B", "ar", _sc((1, 1), (0, 1))),
        },
    )
    star = CompareColumn("bigcode/starcoder2-3b", "ar", "-", {"humaneval-infill": None, "santacoder-fim": None},
                         failure="could not load bigcode/starcoder2-3b: out of memory")  # fmt: skip
    table = comparison_table([oracle, search, qwen, star], ["humaneval-infill", "santacoder-fim"])
    assert table["header"] == ["metric", "Open-dCoder 0.5B, oracle", "Open-dCoder 0.5B, search:64",
                               "Qwen2.5-Coder 1.5B", "StarCoder2 3B"]  # fmt: skip
    rows = {row[0]: row[1:] for row in table["rows"]}
    # ours% n/N (published% n/N), the published number only beside the published setting and rule
    assert rows["HumanEval-Infill pass@1"] == [
        "50.00% 2/4 (76.48% 790/1033)",
        "25.00% 1/4",
        "75.00% 3/4 (80.25% 829/1033)",
        "- (75.61% 781/1033)",
    ]
    assert rows["SantaCoder-FIM exact match (first_line)"] == [
        "50.00% 2/4 (55.99% 584/1043)",
        "75.00% 3/4",
        "50.00% 1/2",
        "-",
    ]
    assert rows["SantaCoder-FIM exact match (whole)"] == [
        "25.00% 1/4",
        "25.00% 1/4",
        "100.00% 2/2 (59.54% 621/1043)",
        "- (56.66% 591/1043)",
    ]
    assert rows["gap to the oracle: HumanEval-Infill pass@1"] == ["", "-25.00 pts", "", ""]
    assert rows["gap to the oracle: SantaCoder-FIM exact match (first_line)"] == ["", "+25.00 pts", "", ""]
    assert rows["ms per problem: HumanEval-Infill"][:3] == ["50", "50", "50"]
    assert rows["tokens / s: HumanEval-Infill"][0] == "200"
    assert rows["peak GPU memory"] == ["1.50 GiB", "-", "-", "-"]
    assert rows["device"][0] == "NVIDIA H100 (bfloat16)" and rows["versions"][0] == "torch 2.13, git abc"
    assert rows["status"][:3] == ["complete", "complete", "incomplete: santacoder-fim: 2/4 records"]
    assert rows["status"][3].endswith("failed: could not load bigcode/starcoder2-3b: out of memory")
    assert "Qwen/Qwen2.5-Coder-1.5B: the published column used Qwen/Qwen2.5-Coder-1.5B-Instruct" in table["markdown"]
    assert table["complete"] is False
    gap = [r for r in table["records"] if r["column"] == "Open-dCoder 0.5B, search:64" and r["metric"] == "pass@1"]
    assert gap[0]["gap_to_oracle_points"] == -25.0 and gap[0]["rate"] == 0.25 and gap[0]["published_n"] is None
    with pytest.raises(ValueError, match="unknown task"):
        comparison_table([oracle], ["mbpp"])


def test_models_are_spread_over_gpus_one_process_per_gpu_at_a_time():
    jobs = [ModelJob(f"m{i}", f"m{i}", "ar", Path(f"m{i}"), []) for i in range(5)]
    spans, lock = [], threading.Lock()

    def launch(job, slot):
        start = time.monotonic()
        time.sleep(0.02)
        with lock:
            spans.append((slot, job.model, start, time.monotonic()))
        return {"slot": slot}

    results = run_jobs(jobs, ["0", "1"], launch)
    assert sorted(results) == [f"m{i}" for i in range(5)]  # every model ran once
    assert {s[0] for s in spans} == {"0", "1"}  # both GPUs were used
    for slot in ("0", "1"):  # never two models on one GPU at once
        mine = sorted(s[2:] for s in spans if s[0] == slot)
        assert all(a[1] <= b[0] for a, b in zip(mine, mine[1:], strict=False))
    order = []
    run_jobs(jobs, [None], lambda job, slot: order.append((job.model, slot)))  # one slot: in order, one at a time
    assert order == [(f"m{i}", None) for i in range(5)]


def test_the_default_plan_and_a_model_process(tmp_path, monkeypatch):
    from dinfill.cli import build_parser
    from dinfill.eval import compare

    args = build_parser().parse_args(["compare", "--out", str(tmp_path), "--random-weights", "--steps", "8"])
    jobs = compare.plan_jobs(args)
    # the five published checkpoints, as their built-in shapes under --random-weights (nothing to download)
    assert [job.load_name for job in jobs] == ["open-dcoder-0.5b", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b",
                                               "deepseek-coder-1.3b", "starcoder2-3b"]  # fmt: skip
    assert [job.kind for job in jobs] == ["diffusion", "ar", "ar", "ar", "ar"]
    dcoder = jobs[0]
    assert [run.setting for run in dcoder.runs[::2]] == ["oracle", "fixed:32", "adaptive:64", "search:64"]
    assert dcoder.runs[7].out == tmp_path / "fredzzp--open-dcoder-0.5B" / "search-64" / "santacoder-fim-py"
    assert jobs[4].runs[0].out == tmp_path / "bigcode--starcoder2-3b" / "humaneval-infill-single-line"
    assert compare._settings(args, "ar", {}) == {"temperature": 0.6, "top_p": None, "top_k": None, "stop": [],
                                                 "max_new_tokens": 512}  # --steps is the diffusion model's  # fmt: skip
    assert compare._settings(args, "diffusion", dcoder.runs[6].overrides)["steps"] == 8

    seen = {}

    class Process:  # a model process that dies without a word of its own: its last lines are the reason
        def __init__(self, argv, env, **options):
            seen.update(argv=argv, env=env, job=json.loads(Path(argv[-1]).read_text()))
            self.stderr = iter(["loading the weights\n", "\n", "Killed\n"])

        def wait(self):
            return -9

    monkeypatch.setattr(compare.subprocess, "Popen", Process)
    status = compare._launch(args, jobs[4], "3", quiet=True)
    assert seen["argv"][1:3] == ["-m", "dinfill.eval.compare"] and seen["env"]["CUDA_VISIBLE_DEVICES"] == "3"
    assert seen["env"]["PYTHONPATH"].split(os.pathsep)[0] == str(Path(compare.__file__).resolve().parents[2])
    assert seen["job"]["load_name"] == "starcoder2-3b" and seen["job"]["args"]["no_progress"] is True
    assert status["error"] == "its process exited with code -9: loading the weights / Killed"
