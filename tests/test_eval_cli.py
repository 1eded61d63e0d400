"""Command line: the three subcommands, their wiring to the real sampler API, prompts per model kind, reports."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import dinfill
import dinfill.sampler
from dinfill.eval import cli
from dinfill.eval.runner import FunctionGenerator, RunSpec, run_eval
from dinfill.eval.tasks import get_task
from dinfill.sampler.settings import SamplerSettings

REPO = Path(__file__).resolve().parents[1]
FAKES = REPO / "tests" / "eval_fixtures" / "fakes.py"

# These tests need programs to run, not full isolation (tests/test_eval_execution.py checks that): where the
# evaluator is not root they accept the weaker sandbox instead of being refused.
if os.geteuid() != 0:
    os.environ.setdefault("DINFILL_ALLOW_WEAK_SANDBOX", "1")


@pytest.fixture
def toy_santacoder(tmp_path) -> Path:
    """A SantaCoder-format parquet with two Python rows and one JavaScript row."""
    path = tmp_path / "train.parquet"
    rows = {
        "name": ["a", "b", "c"],
        "language": ["py", "js", "py"],
        "prompt": ["def f():\n    x = 1", "function f() {", "def g():\n    y = 2"],
        "suffix": ["\n", "\n}", "\n"],
        "canonical_solution": ["    return x", "  return 1;", "    return y"],
        "tests": ["assert f() == 1\n", "", "assert g() == 2\n"],
    }
    pq.write_table(pa.table(rows), path)
    return path


def test_register_adds_the_contract_subcommands():
    parser = argparse.ArgumentParser(prog="dinfill")
    cli.register(parser.add_subparsers(dest="command"))
    for argv, handler in (
        (["eval", "--model", "m", "--task", "humaneval-infill", "--out", "o"], cli.cmd_eval),
        (["score", "--task", "santacoder-fim", "f.jsonl", "--json"], cli.cmd_score),
        (["report", "a", "b"], cli.cmd_report),
    ):
        args = parser.parse_args(argv)
        assert args.func is handler
    with pytest.raises(SystemExit):
        parser.parse_args(["score", "--task", "mbpp", "f.jsonl"])


def test_module_entry_point_help():
    done = subprocess.run(
        [sys.executable, "-m", "dinfill.eval", "--help"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    assert all(name in done.stdout for name in ("eval", "score", "report"))


def test_eval_needs_exactly_one_source_of_middles(capsys):
    assert cli.main(["eval", "--task", "humaneval-infill", "--out", "x"]) == 2
    assert "exactly one of --model" in capsys.readouterr().err


def test_eval_then_report(tmp_path, toy_santacoder, capsys):
    out = tmp_path / "runs"
    argv = ["eval", "--generator", f"{FAKES}:canonical", "--task", "santacoder-fim", "--data", str(toy_santacoder)]
    assert cli.main([*argv, "--out", str(out), "--no-progress", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    assert "exact match" in captured.out and "2/2" in captured.out
    assert "untrusted" not in captured.err  # exact match needs no execution
    assert cli.main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0]
    for column in ("metric", "rule", "middle length", "seeds", "sampler", "throughput"):
        assert column in header
    assert "| first_line |" in table and "| whole |" in table and "| oracle |" in table and "| 3 |" in table
    assert cli.main(["report", str(out), "--json"]) == 0
    (summary,) = json.loads(capsys.readouterr().out)
    assert summary["counts"]["exact_match_first_line"] == 2 and summary["seeds"] == [3]


def test_execution_flag_for_santacoder(tmp_path, toy_santacoder, capsys):
    argv = ["eval", "--generator", f"{FAKES}:canonical", "--task", "santacoder-fim", "--data", str(toy_santacoder)]
    assert cli.main([*argv, "--out", str(tmp_path / "x"), "--no-progress", "--execute"]) == 0
    captured = capsys.readouterr()
    assert "untrusted" in captured.err and "pass@1" in captured.out and "2/2" in captured.out
    js = [*argv, "--language", "js", "--out", str(tmp_path / "y"), "--execute"]
    assert cli.main(js) == 2
    assert "cannot be executed" in capsys.readouterr().err


def test_report_errors(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no records" in capsys.readouterr().err


def capture_prefixes(task_name: str, data: Path, kind: str, tmp_path: Path) -> list[str]:
    seen: list[str] = []

    def generate(prefixes, suffixes, middles, seed):
        seen.extend(prefixes)
        return list(middles)

    generator = FunctionGenerator(generate, kind)
    spec = RunSpec(task=get_task(task_name, data=data), model="m", kind=kind, execute=False)
    run_eval(spec, generator, tmp_path / kind, progress=False)
    return seen


def test_santacoder_prompts_per_kind(tmp_path, toy_santacoder):
    prompts = ["def f():\n    x = 1", "def g():\n    y = 2"]
    assert capture_prefixes("santacoder-fim", toy_santacoder, "diffusion", tmp_path) == [p + "\n" for p in prompts]
    assert capture_prefixes("santacoder-fim", toy_santacoder, "ar", tmp_path) == prompts


def test_sampler_settings_defaults_and_overrides():
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    base = ["eval", "--model", "m", "--task", "humaneval-infill", "--out", "o"]
    diffusion = cli.sampler_settings(parser.parse_args(base), "diffusion")
    assert diffusion["steps"] == 64 and diffusion["alg"] == "p2" and diffusion["length"] == "oracle"
    assert diffusion["top_p"] == 0.95 and diffusion["temperature"] == 0.6
    ar = cli.sampler_settings(parser.parse_args([*base, "--temperature", "0"]), "ar")
    assert ar == {"temperature": 0.0, "top_p": None, "top_k": None, "stop": [], "max_new_tokens": 512}
    with pytest.raises(ValueError, match="--steps applies to diffusion models only, and this is an AR model"):
        cli.sampler_settings(parser.parse_args([*base, "--steps", "8"]), "ar")


class StubModel(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.weight = torch.nn.Parameter(torch.zeros(1))


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_model_generator_calls_the_sampler_api(monkeypatch, kind):
    calls = {}

    def load_model(name, **options):
        calls["load_model"] = (name, options)
        return StubModel(options.get("kind", kind))

    def load_tokenizer(name, add_mask_token=False):
        calls["load_tokenizer"] = (name, add_mask_token)
        return "tokenizer"

    def infill(model, tokenizer, prefixes, suffixes, **options):
        calls["infill"] = options
        texts = [f"{p}|{s}" for p, s in zip(prefixes, suffixes, strict=True)]
        return (texts, []) if options.get("return_stats") else texts

    monkeypatch.setattr(dinfill, "load_model", load_model, raising=False)
    monkeypatch.setattr(dinfill, "load_tokenizer", load_tokenizer, raising=False)
    monkeypatch.setattr(dinfill.sampler, "infill", infill, raising=False)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(
        ["eval", "--model", "hub/model", "--task", "humaneval-infill", "--out", "o", "--kind", kind]
    )
    generator = cli.build_model_generator(args, local_rank=0)
    assert generator.kind == kind
    assert calls["load_model"][0] == "hub/model" and calls["load_model"][1]["kind"] == kind
    assert calls["load_tokenizer"] == ("hub/model", False)  # trained weights: never a new, untrained mask token
    assert generator(["p1", "p2"], ["s1", "s2"], ["m1", "m2"], seed=7) == ["p1|s1", "p2|s2"]
    options = calls["infill"]
    assert isinstance(options.pop("generator"), torch.Generator)
    assert options.pop("middles") == ["m1", "m2"]  # oracle length needs the canonical middles
    assert options.pop("return_stats") is True  # for the tokens generated, which the records keep
    assert generator.last_tokens == 0 and generator.last_peak_memory is None  # no stats; no CUDA memory on a CPU
    assert generator.environment["device_type"] == "cpu" and generator.environment["random_weights"] is False
    # every option of the kind, at the published setting (dinfill.sampler.settings)
    assert options == SamplerSettings.preset("published", kind).for_kind(kind)
    assert options["temperature"] == 0.6 and options.get("steps", options.get("max_new_tokens")) in (64, 512)


def test_load_generator_forms(tmp_path):
    generator = cli.load_generator(f"{FAKES}:mixed", None)
    assert generator.kind == "ar"
    wrapped = cli.load_generator(f"{FAKES}:mixed", "diffusion")
    assert wrapped.kind == "diffusion"
    with pytest.raises(ValueError, match="FILE.py:NAME"):
        cli.load_generator("nocolon", None)
    with pytest.raises(ValueError, match="has no attribute"):
        cli.load_generator(f"{FAKES}:nothing", None)
    with pytest.raises(FileNotFoundError):
        cli.load_generator(f"{tmp_path}/x.py:f", None)


def test_report_names_the_run_folders_it_skips(tmp_path, toy_santacoder, capsys):
    # Issue 15 item 11: a run folder without records yet is listed under the table, not silently left out.
    argv = ["eval", "--generator", f"{FAKES}:canonical", "--task", "santacoder-fim", "--data", str(toy_santacoder)]
    assert cli.main([*argv, "--out", str(tmp_path / "done"), "--no-progress"]) == 0
    assert cli.main([*argv, "--out", str(tmp_path / "failed"), "--generator", f"{FAKES}:rejecting"]) == 2
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "2/2" in text
    assert f"skipped 1 run folder(s) without records yet: {tmp_path / 'failed' / 'santacoder-fim-py'}" in text


def test_two_samples_report_pass_at_2(tmp_path, toy_santacoder, capsys):
    # Issue 15 item 8: pass@k for every useful k <= n, not only k in (1, 10, 100).
    argv = ["eval", "--generator", f"{FAKES}:mixed", "--task", "santacoder-fim", "--data", str(toy_santacoder)]
    assert cli.main([*argv, "--out", str(tmp_path), "--samples", "2", "--execute", "--no-progress"]) == 0
    captured = capsys.readouterr()
    table = captured.out
    assert captured.err.count(cli.EXEC_WARNING) == 1  # running model-written code is never silent
    assert "| pass@1 |" in table and "| pass@2 |" in table
    summary = json.loads((tmp_path / "santacoder-fim-py" / "summary.json").read_text())
    assert list(summary["pass@k"]) == ["pass@1", "pass@2"]


def test_score_out_refuses_another_run_unless_overwrite(tmp_path, toy_santacoder, capsys):
    # Issue 12: one layout for score and eval; another model's file into a folder holding a run is refused.
    task = get_task("santacoder-fim", data=toy_santacoder)
    lines = [json.dumps({"task_id": p.task_id, "completion": p.canonical}) for p in task.problems()]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.jsonl").write_text(lines[0] + "\n")
    score = ["score", "--task", "santacoder-fim", "--data", str(toy_santacoder), "--out", str(tmp_path / "runs")]
    assert cli.main([*score, str(tmp_path / "a.jsonl"), "--model", "a"]) == 0
    assert cli.main([*score, str(tmp_path / "b.jsonl"), "--model", "b"]) == 2
    assert "holds a different run (model: 'a' there, 'b' now; source:" in capsys.readouterr().err
    assert cli.main([*score, str(tmp_path / "b.jsonl"), "--model", "b", "--overwrite"]) == 0
    records = (tmp_path / "runs" / "santacoder-fim-py" / "records.jsonl").read_text().splitlines()
    assert [json.loads(line)["model"] for line in records] == ["b"]
    assert cli.main(["score", "--task", "santacoder-fim", str(tmp_path / "b.jsonl"), "--overwrite"]) == 2
    assert "needs --out" in capsys.readouterr().err


def _executed_run(folder: Path, model: str, sandboxes: list[str]) -> None:
    from dinfill.eval.records import write_records_atomically

    folder.mkdir(parents=True)
    records = [
        {
            "task": "humaneval-infill",
            "subset": "single-line",
            "task_id": f"T/{i}",
            "index": i,
            "seed": 0,
            "sample": 0,
            "model": model,
            "kind": None,
            "sampler": None,
            "postprocess": {"rule": "none"},
            "completion": "x",
            "processed": "x",
            "outcome": {"passed": True, "status": "passed", "detail": "", "sandbox": sandbox},
            "task_size": len(sandboxes),
        }
        for i, sandbox in enumerate(sandboxes)
    ]
    write_records_atomically(folder / "records.jsonl", records)


def test_report_says_how_isolated_each_run_was(tmp_path, capsys):
    weak = "weak (no user namespaces, so no pid, mount, IPC or network namespaces)"
    _executed_run(tmp_path / "a", "full-model", ["full", "full"])
    assert cli.main(["report", str(tmp_path / "a")]) == 0
    assert "Sandbox: full for every run that executed programs." in capsys.readouterr().out
    _executed_run(tmp_path / "b", "weak-model", [weak, weak])
    _executed_run(tmp_path / "c", "resumed-model", ["full", weak])
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"Note: sandbox: {weak} in {tmp_path / 'b'}." in out
    assert f"Note: sandbox: mixed: full + {weak} in {tmp_path / 'c'}." in out
    assert "different sandbox isolation (full and weak)" in out
    assert cli.main(["report", str(tmp_path / "b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["sandbox"] == weak
