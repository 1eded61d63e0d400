"""``dinfill bench`` and ``dinfill sweep`` end to end on tiny models, through the real command line.

The diffusion runs use the ``tiny-llama`` shape with ``kind="diffusion"`` (a 1031-token vocabulary keeps
the reference loop's full logits cheap on the CPU). Each test checks what a user gets: the records
appended to the results file (valid JSON with the environment stamp), the table, the PNGs, and, for
``--vs reference`` in exact mode, that both loops produced the same tokens.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from dinfill.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV_KEYS = {"device", "torch", "triton", "git", "date", "python"}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_diffusion_bench_vs_reference(tmp_path, capsys):
    results, plots = tmp_path / "results.jsonl", tmp_path / "plots"
    argv = [
        "bench", "--model", "tiny-llama", "--kind", "diffusion", "--random-weights", "--problems", "3",
        "--batch", "2", "--steps", "4", "--cache", "none", "dual", "--lengths", "synthetic", "--temperature", "0",
        "--vs", "reference", "--results", str(results), "--plot", str(plots), "--no-ceilings",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    records = _records(results)
    assert [r["config"]["cache"] for r in records] == ["none", "dual"]
    for rec in records:
        assert rec["type"] == "bench" and ENV_KEYS <= set(rec["env"])
        m = rec["metrics"]
        assert m["tokens"] > 0 and m["tokens_per_s"] > 0 and m["problems_per_s"] > 0
        assert m["latency_p90_ms"] >= m["latency_p50_ms"] > 0
        assert 0 < m["forward_passes"] <= 4
        assert abs(m["model_frac"] + m["sampling_frac"] + m["other_frac"] - 1) < 1e-6 or m["other_frac"] == 0
        assert rec["roofline"]["flops"] > 0 and rec["roofline"]["bytes_per_s"] > 0
        ref = rec["reference"]
        # the ratio is the reference's total time over ours, both measured here on the same batches
        assert ref["speedup"] == pytest.approx(ref["total_s"] / m["total_s"])
        assert ref["tokens"] == m["tokens"] and ref["forward_passes"] > 0
    exact = records[0]["reference"]
    assert exact["exact"] and exact["agreement"] == 1.0, "exact mode must reproduce the reference loop's tokens"
    assert 0.0 <= records[1]["reference"]["agreement"] <= 1.0
    assert "diffusion-B2-s4-p2-none-oracle" in out.out and "x ref" in out.out  # the table, on stdout
    for name in ("throughput.png",):
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC


def test_ar_bench_vs_transformers(tmp_path):
    results = tmp_path / "r.jsonl"
    argv = [
        "bench", "--model", "tiny-llama", "--random-weights", "--problems", "2", "--batch", "2", "--temperature", "0",
        "--lengths", "synthetic", "--vs", "reference", "--results", str(results), "--no-ceilings",
    ]  # fmt: skip
    assert main(argv) == 0
    (rec,) = _records(results)
    assert rec["config"]["kind"] == "ar" and rec["config"]["steps"] is None
    assert rec["reference"]["baseline"] == "transformers generate"
    assert rec["reference"]["agreement"] == 1.0, "greedy fp32 decoding must match transformers token for token"
    assert rec["metrics"]["forward_passes"] >= 1


def test_results_default_path_from_environment(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere" / "bench.jsonl"
    monkeypatch.setenv("DINFILL_BENCH_RESULTS", str(target))
    argv = ["bench", "--model", "tiny-llama", "--kind", "diffusion", "--random-weights", "--steps", "2",
            "--lengths", "synthetic", "--no-ceilings"]  # fmt: skip
    assert main(argv) == 0
    (rec,) = _records(target)
    assert rec["config"]["batch"] == 1 and rec["workload"]["problems"] == 1  # the CPU defaults


def _run(argv: list[str]) -> int:
    """``main(argv)``, with argparse's own exit (a bad choice) returned as its exit code."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "steps (--steps) must be an integer >= 1, got 0"),
        (["--steps", "4", "0"], "steps (--steps) must be an integer >= 1, got 0"),  # every value of an axis
        (["--batch", "0"], "batch size must be an int >= 1"),
        (["--alg", "bogus"], "argument --alg: invalid choice: 'bogus'"),
        (["--cache", "triple"], "argument --cache: invalid choice: 'triple'"),
        (["--length", "psychic"], "argument --length: invalid choice: 'psychic'"),
        (["--problems", "0"], "--problems must be >= 1"),
        (["--top-p", "1.5"], "top_p (--top-p) must lie in (0, 1] (1 turns it off), got 1.5"),
        (["--refresh", "0"], "refresh (--refresh) must be an integer >= 1"),
        (["--factor", "0"], "factor (--factor) must be > 0"),
        (["--max-new-tokens", "8"], "unrecognized arguments: --max-new-tokens"),  # bench times fixed middles
        (["--mask-id", "5000"], "mask token id 5000 is outside the model's vocabulary of 1031"),
    ],
)
def test_bad_options_are_clear_errors(extra, message, capsys):
    argv = ["bench", "--model", "tiny-llama", "--kind", "diffusion", "--random-weights", "--no-results", *extra]
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "pass None" not in err


def test_option_of_the_other_kind_is_an_error(capsys):
    assert _run(["bench", "--model", "tiny-llama", "--random-weights", "--no-results", "--steps", "4"]) == 2
    assert "--steps applies to diffusion models only, and this is an AR model" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["bench", "--model", "no-such-model", "--random-weights", "--no-results"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "built-in shape" in err


def test_humaneval_lengths_without_data_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DINFILL_DATA_DIR", str(tmp_path))  # a folder without the dataset
    argv = ["bench", "--model", "tiny-llama", "--kind", "diffusion", "--random-weights", "--lengths", "humaneval",
            "--no-results"]  # fmt: skip
    assert main(argv) == 2
    assert "--lengths humaneval needs" in capsys.readouterr().err


def test_sweep_random_weights_is_speed_only(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [
        "sweep", "--model", "tiny-llama", "--kind", "diffusion", "--random-weights", "--steps", "2", "4",
        "--alg", "p2", "threshold", "--problems", "2", "--batch-size", "2", "--lengths", "synthetic", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    shown = capsys.readouterr()
    assert "quality is meaningless" in shown.err
    # every file with its folder, the PNG included
    assert f"# wrote {out / 'sweep.csv'}, {out / 'sweep.jsonl'}, {out / 'quality_vs_speed.png'}" in shown.out
    rows = list(csv.DictReader((out / "sweep.csv").open(encoding="utf-8")))
    assert {(r["steps"], r["alg"]) for r in rows} == {("2", "p2"), ("4", "p2"), ("2", "threshold"), ("4", "threshold")}
    assert all(r["quality"] == "" and r["quality_measured"] == "False" and float(r["problems_per_s"]) > 0 for r in rows)
    records = _records(out / "sweep.jsonl")
    assert len(records) == 4 and all(ENV_KEYS <= set(r["env"]) for r in records)
    assert (out / "quality_vs_speed.png").read_bytes()[:8] == PNG_MAGIC


def test_sweep_speed_points_are_labelled_with_the_batch_timed(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [
        "sweep", "--model", "tiny-llama", "--kind", "diffusion", "--random-weights", "--steps", "2", "--problems", "1",
        "--batch-size", "16", "--lengths", "synthetic", "--out", str(out), "--no-plot",
    ]  # fmt: skip
    assert main(argv) == 0
    assert "batches of 1, not 16" in capsys.readouterr().err
    (row,) = list(csv.DictReader((out / "sweep.csv").open(encoding="utf-8")))
    assert row["batch"] == "1" and row["label"].startswith("diffusion-B1-")


def test_sweep_measures_quality_through_the_eval_layer(tmp_path, shared_dir, capsys):
    data = os.environ.get("DINFILL_DATA_DIR")
    if not data:
        pytest.skip("DINFILL_DATA_DIR is unset: the quality side needs the SantaCoder-FIM data")
    out = tmp_path / "sweep"
    argv = [
        "sweep", "--model", "tiny-dcoder", "--random-weights", "--quality", "on", "--tokenizer",
        str(shared_dir / "tokenizers" / "qwen2.5-coder"), "--task", "santacoder-fim", "--no-download",
        "--steps", "2", "--problems", "2", "--batch-size", "2", "--out", str(out), "--no-plot",
    ]  # fmt: skip
    assert main(argv) == 0
    assert "measuring it anyway" in capsys.readouterr().err
    (row,) = list(csv.DictReader((out / "sweep.csv").open(encoding="utf-8")))
    assert row["quality_measured"] == "True" and row["quality_metric"] == "exact_match"
    assert 0.0 <= float(row["quality"]) <= 1.0 and float(row["tokens_per_s"]) > 0
    (rec,) = _records(out / "sweep.jsonl")
    assert rec["eval_summary"]["records"] == 2  # the eval layer scored both problems
    assert (out / "runs" / "diffusion-B2-s2-p2-none-oracle" / "records.jsonl").is_file()


def test_profile_and_nvtx_flags(tmp_path):
    from dinfill.bench.profiling import nvtx_available

    results, traces = tmp_path / "r.jsonl", tmp_path / "traces"
    argv = ["bench", "--model", "tiny-llama", "--kind", "diffusion", "--random-weights", "--steps", "2",
            "--cache", "dual", "--refresh", "1", "--lengths", "synthetic", "--profile", str(traces),
            "--results", str(results), "--no-ceilings"]  # fmt: skip
    if nvtx_available():
        argv.append("--nvtx")
    assert main(argv) == 0
    (rec,) = _records(results)
    assert rec["profiled"] is True
    trace = (traces / "diffusion-B1-s2-p2-dual1-oracle.json").read_text()
    # module ranges from the hooks; with refresh 1 every forward rewrites the whole cache
    for name in ("cache refresh", "attention", "lm_head"):
        assert f'"name": "{name}"' in trace, name
