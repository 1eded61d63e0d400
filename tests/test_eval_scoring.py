"""Full-set scoring against the real data: canonical solutions, wrong bodies, the published counts, run folders.

Needs ``DINFILL_DATA_DIR`` (CI sets it to ../shared/data). All HumanEval programs of this module go
through one sandbox with ``memo=True``, so a program shared by several files (most completions
equal the canonical line) runs once; every distinct program really executes.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import tempfile
import textwrap
from pathlib import Path

import pytest

from dinfill.eval.cli import main
from dinfill.eval.datasets import Problem
from dinfill.eval.execution import Sandbox
from dinfill.eval.postprocess import PostProcess
from dinfill.eval.records import load_records, read_completions
from dinfill.eval.tasks import get_task

DATA = os.environ.get("DINFILL_DATA_DIR")
pytestmark = [
    pytest.mark.skipif(not DATA, reason="DINFILL_DATA_DIR is not set (CI sets it to ../shared/data)"),
    pytest.mark.slow,
]
SEEDS = Path(DATA or ".") / "seed-results"

# These tests need programs to run, not full isolation (tests/test_eval_execution.py checks that): where the
# evaluator is not root they accept the weaker sandbox instead of being refused.
if os.geteuid() != 0:
    os.environ.setdefault("DINFILL_ALLOW_WEAK_SANDBOX", "1")
# Published counts (../shared/data/README.md) the re-scoring must reproduce exactly.
HUMANEVAL_PASSED = {
    "open-dcoder-0.5B": 790,
    "Qwen2.5-Coder-1.5B-Instruct": 829,
    "deepseek-coder-1.3b-base": 821,
    "starcoder2-3b": 781,
}
SANTACODER_EM = {
    ("open-dcoder-0.5B", "first_line"): 584,
    ("Qwen2.5-Coder-1.5B-Instruct", "whole"): 621,
    ("deepseek-coder-1.3b-base", "whole"): 604,
    ("starcoder2-3b", "whole"): 591,
    # The README's re-scoring of the AR models under the first-line rule: 70.76% / 68.17% / 66.73%.
    ("Qwen2.5-Coder-1.5B-Instruct", "first_line"): 738,
    ("deepseek-coder-1.3b-base", "first_line"): 711,
    ("starcoder2-3b", "first_line"): 696,
}


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(memo=True) as box:
        box.self_check()
        yield box


@pytest.fixture(scope="module")
def humaneval():
    return get_task("humaneval-infill")


@pytest.fixture(scope="module")
def santacoder():
    return get_task("santacoder-fim")


def score_file(task, path: Path, sandbox):
    problems = task.problems()
    entries = read_completions(path, [p.task_id for p in problems], [p.canonical for p in problems], task.name)
    chosen = [problems[e.index] for e in entries]
    return task.score(chosen, [e.completion for e in entries], PostProcess("none"), sandbox)


def test_dataset_sizes(humaneval, santacoder):
    assert len(humaneval.problems()) == 1033
    assert len(santacoder.problems()) == 1043
    assert santacoder.problems()[0].task_id == "0" and santacoder.problems()[-1].task_id == "1042"


def test_canonical_humaneval_all_pass(humaneval, sandbox):
    problems = humaneval.problems()
    scored = humaneval.score(problems, [p.canonical for p in problems], PostProcess("none"), sandbox)
    statuses = collections.Counter(outcome["status"] for _, outcome in scored)
    assert statuses == {"passed": 1033}


def test_pass_body_fails_for_every_function(humaneval, sandbox):
    # Each function's whole body (the canonical lines L0..Lk of one HumanEval problem) becomes `pass`.
    groups: dict[str, list[Problem]] = {}
    for problem in humaneval.problems():
        groups.setdefault(problem.task_id.rsplit("/", 1)[0], []).append(problem)
    hollow = []
    for first, *_, last in ([g[0], g[0]] if len(g) == 1 else g for g in groups.values()):
        indent = first.canonical[: len(first.canonical) - len(first.canonical.lstrip())]
        hollow.append((Problem(first.task_id, first.prompt, last.suffix, "", first.test, first.entry_point), indent))
    results = sandbox.run_many([humaneval.program(p, indent + "pass\n") for p, indent in hollow])
    assert len(results) == 164
    assert collections.Counter(r.status for r in results) == {"failed": 164}


# open-dcoder-0.5B and starcoder2-3b are re-scored through `dinfill score --out` below (each file runs once).
@pytest.mark.parametrize("model", ["Qwen2.5-Coder-1.5B-Instruct", "deepseek-coder-1.3b-base"])
def test_seed_results_humaneval(humaneval, sandbox, model):
    scored = score_file(humaneval, SEEDS / model / "humaneval_infill.jsonl", sandbox)
    assert len(scored) == 1033
    assert sum(outcome["passed"] for _, outcome in scored) == HUMANEVAL_PASSED[model]


def test_santacoder_canonical_matches_and_runs_clean(santacoder, sandbox):
    problems = santacoder.problems()
    scored = santacoder.score(problems, [p.canonical for p in problems], santacoder.default_postprocess, sandbox)
    for key in ("exact_match", "exact_match_first_line", "exact_match_whole", "passed"):
        assert sum(outcome[key] for _, outcome in scored) == 1043, key


@pytest.mark.parametrize(("model", "rule"), sorted(SANTACODER_EM))
def test_seed_results_santacoder(santacoder, model, rule):
    scored = score_file(santacoder, SEEDS / model / "santacoder_fim.jsonl", None)
    assert len(scored) == 1043
    assert sum(outcome[f"exact_match_{rule}"] for _, outcome in scored) == SANTACODER_EM[(model, rule)]


def test_santacoder_published_flags_agree_with_whole_rule(santacoder):
    # The AR files carry their own exact_match flag: it is the whole-completion rule, line by line.
    path = SEEDS / "starcoder2-3b" / "santacoder_fim.jsonl"
    flags = [json.loads(line)["exact_match"] for line in path.read_text().splitlines()]
    scored = score_file(santacoder, path, None)
    assert [outcome["exact_match_whole"] for _, outcome in scored] == flags


def test_score_command_santacoder(capsys):
    path = SEEDS / "open-dcoder-0.5B" / "santacoder_fim.jsonl"
    assert main(["score", "--task", "santacoder-fim", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "exact_match first_line 584/1043" in out
    assert main(["score", "--task", "santacoder-fim", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["exact_match_first_line"] == 584 and summary["total"] == 1043


def test_score_command_humaneval_subset(tmp_path, capsys, humaneval, sandbox):
    lines = (SEEDS / "open-dcoder-0.5B" / "humaneval_infill.jsonl").read_text().splitlines()[:40]
    subset = tmp_path / "subset.jsonl"
    subset.write_text("\n".join(lines) + "\n")
    expected = sum(outcome["passed"] for _, outcome in score_file(humaneval, subset, sandbox))
    out_dir = tmp_path / "scored"
    argv = ["score", "--task", "humaneval-infill", str(subset), "--no-progress", "--out", str(out_dir)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"passed {expected}/40" in captured.out
    assert "covers 40 of 1033 problems" in captured.out
    assert "untrusted" in captured.err  # execution is announced
    assert main(["report", str(out_dir)]) == 0
    table = capsys.readouterr().out
    assert f"{expected}/40" in table and "pass@1" in table


def test_score_command_reports_bad_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "SingleLineInfilling/HumanEval/0/L0", "completion": "x"}) + "\n{oops\n")
    assert main(["score", "--task", "humaneval-infill", str(bad), "--no-execute"]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err


def test_two_tasks_two_models_share_a_parent_folder(tmp_path, capsys):
    # Issue 12: `score --out` uses OUT/<task>-<subset>/ like eval, so every run of every model is found.
    parent = tmp_path / "runs"
    for model in ("open-dcoder-0.5B", "starcoder2-3b"):
        for task, name in (("humaneval-infill", "humaneval_infill"), ("santacoder-fim", "santacoder_fim")):
            argv = ["score", "--task", task, str(SEEDS / model / f"{name}.jsonl"), "--no-progress"]
            assert main([*argv, "--out", str(parent / model)]) == 0
    capsys.readouterr()
    assert main(["report", str(parent), "--json"]) == 0
    summaries = {(s["model"], s["task"]): s for s in json.loads(capsys.readouterr().out)}
    runs = {key: summary["counts"] for key, summary in summaries.items()}
    assert len(runs) == 4
    assert runs["open-dcoder-0.5B", "humaneval-infill"]["passed"] == HUMANEVAL_PASSED["open-dcoder-0.5B"]
    assert summaries["open-dcoder-0.5B", "humaneval-infill"]["statuses"]["timeout"] == 1  # as published
    assert runs["starcoder2-3b", "humaneval-infill"]["passed"] == HUMANEVAL_PASSED["starcoder2-3b"]
    assert runs["open-dcoder-0.5B", "santacoder-fim"]["exact_match_first_line"] == 584
    assert runs["starcoder2-3b", "santacoder-fim"]["exact_match_whole"] == 591
    assert all(summary["complete"] for summary in summaries.values())
    # Another model's file into a model's folder is refused with the reason; an identical re-score does nothing.
    other = ["score", "--task", "santacoder-fim", str(SEEDS / "starcoder2-3b" / "santacoder_fim.jsonl")]
    assert main([*other, "--out", str(parent / "open-dcoder-0.5B")]) == 2
    error = capsys.readouterr().err
    assert "holds a different run" in error and "model: 'open-dcoder-0.5B' there, 'starcoder2-3b' now" in error
    assert "source:" in error and "--overwrite" in error
    again = ["score", "--task", "santacoder-fim", str(SEEDS / "starcoder2-3b" / "santacoder_fim.jsonl")]
    assert main([*again, "--out", str(parent / "starcoder2-3b")]) == 0
    captured = capsys.readouterr()
    assert "already holds this scoring" in captured.err and "exact_match whole 591/1043" in captured.out
    records = parent / "starcoder2-3b" / "santacoder-fim-py" / "records.jsonl"
    assert len(records.read_text().splitlines()) == 1043


WRONG_L0 = "    for idx, elem in enumerate(numbers[:0]):\n"  # HumanEval/0 L0, wrong: the checks fail


def _in_function(code: str) -> str:
    return textwrap.indent(textwrap.dedent(code).strip("\n"), "    ") + "\n"


HOSTILE_L0 = {
    # Issue 14 cases 1-4, each before a wrong answer line: anything but `passed` is right, and the run goes on.
    "case1": (
        "import builtins\nr = builtins.repr\n"
        'builtins.repr = lambda o: r({**o, "status": "passed"} if type(o) is dict and "token" in o else o)\n',
        {"failed"},
    ),
    "case2": (
        "import os, sys\nreal = os.dup(3)\nr, w = os.pipe()\nos.dup2(w, 3)\n"
        "class Hook:\n    def write(self, text):\n        return len(text)\n"
        "    def flush(self):\n        os.set_blocking(r, False)\n"
        "        os.write(real, os.read(r, 65536).replace(b'failed', b'passed'))\n"
        "sys.stdout = Hook()\n",
        {"crashed"},
    ),
    "case3_unhashable": ('import os\nos.write(3, b"{[]: 1}\\n")\n', {"crashed"}),
    "case3_non_ascii_token": ("import os\nos.write(3, \"\\u00e9 ''\\n\".encode())\n", {"crashed"}),
    "case4_deep_tree": ('import os\nfor _ in range(5000):\n    os.mkdir("d")\n    os.chdir("d")\n', {"failed"}),
}


def test_hostile_rows_cannot_stop_or_spoil_a_scoring_run(tmp_path, capsys):
    # Issue 14: each hostile row gets its own verdict, the run finishes, every other row keeps its verdict.
    # Issue 12: a program writing /tmp/<random> and one filling /tmp leave nothing in the machine's /tmp.
    clean = (SEEDS / "open-dcoder-0.5B" / "humaneval_infill.jsonl").read_text().splitlines()[:30]
    marker = f"dinfill-test-{secrets.token_hex(6)}"
    canonical_l0 = "    for idx, elem in enumerate(numbers):\n"
    extra = {name: (_in_function(code) + WRONG_L0, expected) for name, (code, expected) in HOSTILE_L0.items()}
    extra["tmp_writer"] = (_in_function(f"open('/tmp/{marker}', 'w').write('x')") + canonical_l0, {"passed"})
    filler = f"for i in range(1000):\n    open(f'/tmp/{marker}-{{i}}', 'wb').write(b'x' * (1 << 20))"
    extra["tmp_filler"] = (_in_function(filler) + canonical_l0, {"failed"})
    task_id = "SingleLineInfilling/HumanEval/0/L0"
    rows = clean + [
        json.dumps({"task_id": task_id, "completion": c, "sample": 1 + i}) for i, (c, _) in enumerate(extra.values())
    ]
    for name, lines in (("clean", clean), ("mixed", rows)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        argv = ["score", "--task", "humaneval-infill", str(tmp_path / f"{name}.jsonl"), "--no-progress"]
        assert main([*argv, "--out", str(tmp_path / name), "--model", "m"]) == 0
    capsys.readouterr()

    def verdicts(name):
        records = load_records(tmp_path / name / "humaneval-infill-single-line")
        return {(r["task_id"], r["sample"]): r["outcome"] for r in records}

    alone, mixed = verdicts("clean"), verdicts("mixed")
    assert len(mixed) == len(alone) + len(extra)
    for key, outcome in alone.items():
        assert mixed[key]["status"] == outcome["status"], key
    for sample, (name, (_, expected)) in enumerate(extra.items(), start=1):
        outcome = mixed[task_id, sample]
        assert outcome["status"] in expected, (name, outcome)
    assert "No space left" in mixed[task_id, 1 + list(extra).index("tmp_filler")]["detail"]
    assert not [p for p in os.listdir(tempfile.gettempdir()) if p.startswith(marker)]
