"""The parts of ``dinfill.bench``: work model, peaks table, workloads, results file, profiling, GPU-check dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import dinfill
from dinfill.bench import profiling, report, roofline, throughput, workload
from dinfill.models import builtin_config

REPO = Path(__file__).resolve().parent.parent


# --- roofline ------------------------------------------------------------------------------------


def test_forward_work_matches_a_hand_count():
    """FLOPs and bytes of one bidirectional forward of the 0.5B shape, counted term by term."""
    cfg = builtin_config("open-dcoder-0.5b")
    B, T, rows = 2, 300, 16
    w = roofline.forward_work(cfg, batch=B, queries=T, logits_rows=rows, itemsize=2)
    H, I, L, D, V = 896, 4864, 24, 64, 151936  # noqa: E741
    per_layer = H * D * (14 + 14 + 2 + 2) + 3 * H * I  # q, o (14 heads), k, v (2 heads); gate, up, down
    blocks = L * per_layer
    flops = 2 * blocks * B * T + 4 * L * 14 * D * B * T * T + 2 * H * V * rows
    assert w.flops == pytest.approx(flops, rel=1e-12)
    kv = 2 * L * B * 2 * D * T * 2
    bytes_ = blocks * 2 + V * H * 2 + kv + 2 * B * T * H * 2 + rows * V * 2
    assert w.bytes == pytest.approx(bytes_, rel=1e-12)
    # ~0.49e9 parameters: the 2 * N * T rule of docs/gpu.md up to attention and the head
    assert 2 * blocks * B * T < w.flops < 2 * 0.5e9 * B * T * 1.2


def test_forward_work_cache_and_causal():
    cfg = builtin_config("tiny-llama")
    window = roofline.forward_work(cfg, batch=1, queries=10, keys=200, logits_rows=10)
    full = roofline.forward_work(cfg, batch=1, queries=200, logits_rows=10)
    assert window.flops < full.flops and window.bytes < full.bytes
    causal = roofline.forward_work(cfg, batch=1, queries=200, causal=True)
    bidir = roofline.forward_work(cfg, batch=1, queries=200)
    assert causal.flops < bidir.flops
    with pytest.raises(ValueError, match="batch >= 1"):
        roofline.forward_work(cfg, batch=0, queries=1)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", None),  # not an L4
        ("cpu (2 threads)", None),
    ],
)
def test_device_peaks_lookup(name, expected):
    peaks = roofline.device_peaks(name)
    assert (peaks.name if peaks else None) == expected


def test_achieved_fractions_and_floor():
    peaks = roofline.device_peaks("NVIDIA H100 80GB HBM3")
    work = roofline.Work(flops=800e12 * 1e-3, bytes=3.0e12 * 2e-3)  # 1 ms of math, 2 ms of memory at the ceilings
    got = roofline.achieved(work, 4e-3, peaks)
    assert got["floor_s"] == pytest.approx(2e-3) and got["floor_bound"] == "bytes"  # memory bound
    assert got["of_floor"] == pytest.approx(0.5)
    assert got["bandwidth_of_peak"] == pytest.approx(work.bytes / 4e-3 / 3.35e12)
    measured = roofline.achieved(work, 4e-3, None, {"bandwidth": 1.5e12, "flops": 400e12})
    assert measured["bandwidth_of_measured"] == pytest.approx(1.0)
    assert measured["floor_s"] == pytest.approx(4e-3) and measured["floor_bound"] == "bytes"  # the measured ceilings
    compute = roofline.achieved(roofline.Work(flops=800e12 * 3e-3, bytes=3.0e12 * 1e-3), 4e-3, peaks)
    assert compute["floor_s"] == pytest.approx(3e-3) and compute["floor_bound"] == "flops"
    with pytest.raises(ValueError, match="positive finite"):
        roofline.achieved(work, 0.0)


def test_measure_ceilings_cpu():
    c = roofline.measure_ceilings("cpu", copy_mb=16, matmul_n=128)
    assert c["dtype"] == "float32"
    # loose on purpose (a shared CI machine): a 2-core CPU copies > 10 MB/s and multiplies > 10 MFLOP/s
    assert 1e7 < c["bandwidth"] < 1e13 and 1e7 < c["flops"] < 1e14


# --- workload and configs ------------------------------------------------------------------------


def test_synthetic_workload_is_seeded_and_humaneval_like():
    a = workload.draw_workload(2000, "synthetic", seed=3)
    assert a.problems == workload.draw_workload(2000, "synthetic", seed=3).problems
    assert a.problems != workload.draw_workload(2000, "synthetic", seed=4).problems
    s = a.summary()
    assert s["source"] == "synthetic"
    # the documented fit: medians 171 / 7.4 / 28.6 (suffix empty 15% of the time, so its median is lower)
    assert 150 < s["median_prefix"] < 195 and 6 <= s["median_middle"] <= 9 and 15 < s["median_suffix"] < 30
    empty = sum(p.suffix == 0 for p in a.problems) / 2000
    assert 0.12 < empty < 0.18
    assert all(p.middle >= 1 and p.prefix >= 16 for p in a.problems)


def test_humaneval_lengths_match_the_tokenizer(shared_dir):
    data = shared_dir / "data"
    if workload.humaneval_path(data) is None:
        pytest.skip(f"{data} has no HumanEval-Infill file")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared_dir / "tokenizers" / "qwen2.5-coder"))
    w = workload.draw_workload(5, "humaneval", seed=1, tokenizer=tok, data_dir=data)
    assert w.source == "humaneval-single-line"
    import gzip

    rows = [json.loads(line) for line in gzip.open(workload.humaneval_path(data), "rt")]
    lengths = {
        (len(tok(r["prompt"])["input_ids"]), len(tok(r["canonical_solution"], add_special_tokens=False)["input_ids"]))
        for r in rows
    }
    assert all((p.prefix, p.middle) in lengths for p in w.problems)
    estimate = workload.draw_workload(5, "auto", seed=1, data_dir=data)  # no tokenizer: characters / 3.38
    assert "estimate" in estimate.source
    assert all(abs(a.prefix - b.prefix) <= 0.35 * b.prefix for a, b in zip(estimate.problems, w.problems, strict=True))


def test_workload_errors(tmp_path):
    with pytest.raises(ValueError, match="int >= 1"):
        workload.draw_workload(0)
    with pytest.raises(ValueError, match="not one of"):
        workload.draw_workload(3, "imaginary")
    with pytest.raises(FileNotFoundError, match="--lengths synthetic"):
        workload.draw_workload(3, "humaneval", data_dir=tmp_path)
    assert workload.draw_workload(3, "auto", data_dir=tmp_path).source == "synthetic"


def test_random_ids_never_hit_the_mask():
    gen = torch.Generator().manual_seed(0)
    ids = workload.random_ids(5000, 7, 3, gen)
    assert set(ids) == {0, 1, 2, 4, 5, 6}


def test_expand_configs():
    cfgs = throughput.expand_configs(
        "diffusion", batches=[1, 4], steps=[8, 16], algs=["p2", "threshold"], caches=["none", "dual"],
        lengths=["oracle", "fixed"], middle_tokens=24, refresh=4,
    )  # fmt: skip
    assert len(cfgs) == 2 * 2 * 2 * 2 * 2
    dual = [c for c in cfgs if c.cache == "dual"]
    assert all(c.refresh == 4 for c in dual) and all(c.refresh is None for c in cfgs if c.cache == "none")
    assert {c.middle_tokens for c in cfgs if c.length == "fixed"} == {24}
    ar = throughput.expand_configs("ar", batches=[1, 1, 2], steps=[8, 16], algs=["p2", "threshold"])
    assert [c.batch for c in ar] == [1, 2]  # diffusion axes collapse, duplicates go
    assert ar[0].label() == "ar-B1-oracle"
    assert dual[0].label() == "diffusion-B1-s8-p2-dual4-oracle"


def test_percentile_matches_numpy():
    values = [5.0, 1.0, 9.0, 3.0, 7.5, 2.25]
    for q in (0, 10, 50, 90, 100):
        assert throughput.percentile(values, q) == pytest.approx(np.percentile(values, q))
    with pytest.raises(ValueError):
        throughput.percentile([], 50)


def test_warm_up_calls_once_per_graph_bucket():
    """On CUDA the untimed warm-up runs one call per bucket of the workload; elsewhere the first batch only."""
    from types import SimpleNamespace

    calls = []
    batches = ["a1", "a2", "b1", "a3", "c1"]
    for device, want in (("cuda", [0, 2, 4]), ("cpu", [0])):
        calls.clear()
        model = SimpleNamespace(device=torch.device(device))
        throughput._warm(model, batches, lambda i, b: calls.append(i), lambda b: b[0])
        assert calls == want, device


def test_run_config_rejects_a_model_of_the_other_kind():
    model = dinfill.load_model("tiny-llama", random_weights=True, kind="ar")
    cfg = throughput.BenchConfig("diffusion", 1, steps=2, alg="p2", cache="none")
    with pytest.raises(ValueError, match="configuration is for a diffusion model"):
        throughput.run_config(model, workload.draw_workload(1, "synthetic"), cfg)


# --- results file and README ---------------------------------------------------------------------


def test_results_file_round_trip(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    report.append_records(path, [{"a": 1, "nan": float("nan"), "t": torch.tensor(2.5)}])
    report.append_records(path, [{"b": [1, 2]}])
    assert report.read_records(path) == [{"a": 1, "nan": None, "t": 2.5}, {"b": [1, 2]}]
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(ValueError, match=r"r.jsonl:3"):
        report.read_records(path)


def test_environment_stamp():
    env = report.environment("cpu")
    assert env["device"].startswith("cpu") and env["torch"] == torch.__version__
    assert env["date"].endswith("+00:00") and env["git"]


def test_readme_block_and_update(tmp_path):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# R\nintro\n<!-- README:BEGIN -->\n| a | b |\n<!-- README:END -->\nmore\n")
    readme = tmp_path / "README.md"
    readme.write_text("# P\n<!-- RESULTS:BEGIN -->\nold\n<!-- RESULTS:END -->\ntail\n")
    assert report.update_readme(readme, results_md)
    text = readme.read_text()
    assert "| a | b |" in text and "old" not in text and text.endswith("tail\n")
    assert not report.update_readme(readme, results_md)  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="RESULTS:BEGIN"):
        report.update_readme(readme, results_md)


def test_committed_results_md_has_the_readme_block():
    block = report.readme_block(REPO / "bench" / "RESULTS.md")
    assert "CPU" in block and "GPU" in block


def test_text_and_markdown_tables():
    rows = [{"x": 1.23456, "y": None, "z": "a"}, {"x": 12345.6, "y": 2e-5, "z": "bb"}]
    cols = [("x", "X"), ("y", "Y"), ("z", "Z")]
    text = report.text_table(rows, cols).splitlines()
    assert len(text) == 4 and len({len(line) for line in text}) == 1
    assert "1.23" in text[2] and "12346" in text[3] and "2.00e-05" in text[3]
    md = report.markdown_table(rows, cols).splitlines()
    assert md[0] == "| X | Y | Z |" and md[2] == "| 1.23 | - | a |"


# --- profiling -----------------------------------------------------------------------------------


def test_region_is_free_when_off_and_labels_the_trace(tmp_path):
    model = dinfill.load_model("tiny-llama", random_weights=True)
    ids = torch.randint(0, 1000, (1, 9))
    with profiling.instrument(model), torch.inference_mode():
        model(ids, causal=True)  # hooks installed but profiling off: nothing recorded, nothing raised
        with profiling.torch_profile(tmp_path, "tiny forward"):
            model(ids, causal=True)
            cache = model.new_cache(1, 9)  # a forward over every cache column: a dual-cache refresh
            model(ids, causal=False, cache=cache, cache_pos=torch.arange(9), attention_mask=torch.ones(1, 9))
            with profiling.region("fused step"):
                torch.ones(3).sum()
    trace = (tmp_path / "tiny_forward.json").read_text()
    for name in ("forward", "attention", "lm_head", "fused step", "cache refresh"):
        assert f'"name": "{name}"' in trace, name
    assert (tmp_path / "tiny_forward.txt").read_text().strip()
    assert not model._forward_pre_hooks and not model.lm_head._forward_hooks  # removed afterwards


def test_nvtx_ranges_open_and_close():
    if not profiling.nvtx_available():
        pytest.skip("neither CUDA nor the nvtx package: NVTX cannot be emitted here")
    model = dinfill.load_model("tiny-llama", random_weights=True)
    with profiling.profiling(nvtx=True), profiling.instrument(model), torch.inference_mode():
        model(torch.randint(0, 1000, (1, 5)), causal=True)
    assert profiling._state["nvtx"] is None  # restored


# --- GPU check and micro-benchmarks on the CPU -----------------------------------------------------


@pytest.mark.interpreter_only  # the dry run's kernel checks run Triton on CPU tensors
def test_gpu_check_dry_run(tmp_path, capsys):
    """The whole script on tiny shapes: kernels, the end-to-end table with its targets, agreement, forward."""
    from dinfill.bench import gpu_check

    code = gpu_check.main(["--cpu-dry-run", "--out", str(tmp_path), "--seed", "11"])
    out = capsys.readouterr().out
    assert code == 0, out
    for phase in ("kernels: ok", "end to end: ok", "agreement: ok", "forward", "summary"):
        assert f"== {phase}" in out, phase
    records = report.read_records(tmp_path / "results.jsonl")
    summary = records[-1]
    assert summary["type"] == "gpu_check" and summary["ok"] and summary["seed"] == 11
    phases = {p["name"]: p for p in summary["phases"]}
    kernels = phases["kernels"]["rows"]
    assert {r["kernel"] for r in kernels} == {
        "attention", "fused_step", "add_norm", "activation", "rope_cache", "skinny_linear"
    }  # fmt: skip
    assert {r["dtype"] for r in kernels} == {"bfloat16", "float32"} and all(r["ok"] for r in kernels)
    e2e = phases["end to end"]["rows"]
    modes = {(r["mode"], r["B"]) for r in e2e}
    for mode in ("p2 published", "dual+threshold", "ar 64 new", "ar + stops"):
        assert {(mode, 1), (mode, 2)} <= modes, mode
    assert ("ar decode (steady)", 1) in modes
    first = next(r for r in e2e if r["mode"] == "p2 published" and r["B"] == 1)
    assert first["target"] == "<= 60 ms" and first["met"] == (first["ms/prob"] <= 60) and first["x target"] == 5
    assert all(r["captured"] == 0 for r in e2e if "captured" in r), "the timed pass replays warmed-up buckets"
    bench = [r for r in records if r.get("type") == "bench"]
    assert {r["config"]["kind"] for r in bench} == {"diffusion", "ar"}
    assert all(r["metrics"]["ms_per_problem"] > 0 and r["reference"]["ms_per_problem"] > 0 for r in bench)
    assert all(r["env"]["git"] for r in bench)
    agree = {r["check"]: r for r in phases["agreement"]["rows"]}
    assert agree["p2 exact vs reference loop"]["agree"] == 1.0  # fp32 on the CPU: exact
    assert agree["diffusion graph vs eager, own bucket"]["ok"] and agree["ar graph vs eager, own bucket"]["ok"]
    assert phases["forward"]["skipped"] is None and phases["forward"]["ok"], phases["forward"]
    assert {r["shape"] for r in phases["forward"]["rows"]} == {"B1 x 1", "B1 x 24", "B2 x 24"}


def test_ar_with_stops_survives_a_baseline_that_ends_sooner():
    """In bf16 generate's greedy tokens can diverge from ours and hit a stop id first: its output is then
    narrower than our longest row. The row must still be measured, the missing tokens counted as disagreeing."""
    from dinfill.bench import gpu_check
    from dinfill.sampler.autoregressive import ar_generate

    sh = gpu_check._shapes(True)
    model = dinfill.load_model(sh.ar, random_weights=True, kind="ar")

    class TwoTokenGenerate:  # agrees on the first two tokens, then every row "stops"
        def generate(self, ids, **_kw):
            first = ar_generate(model, ids, max_new_tokens=2, stop_ids=()).tokens  # (B, 2)
            return torch.cat([ids, first], dim=1)

    row = gpu_check._ar_with_stops(model, TwoTokenGenerate(), 2, sh, torch.device("cpu"), 0, True)
    per_row = float(row["note"].split()[0])  # rows end by sh.stop_at = 3 tokens
    assert per_row > 2, "the stub must end before our rows (and every row reach 2 tokens) for this test to mean much"
    assert row["agree"] == pytest.approx(2 / per_row) and row["x ref"] > 0


@pytest.mark.usefixtures("one_thread")
def test_gpu_check_phases_fail_row_by_row(tmp_path, monkeypatch):
    """One row that raises (a failed capture, out of memory) is a failed row naming the error: the other rows of
    the end-to-end and agreement phases still run, and the records measured are still written."""
    import dataclasses
    import time

    from dinfill.bench import gpu_check

    def broken(*_args, **_kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    shapes = dataclasses.replace(gpu_check._shapes(True), steps=2, sizes=((1, 1),))  # the dry run's, smaller
    monkeypatch.setattr(gpu_check, "_shapes", lambda small: shapes)
    monkeypatch.setattr(gpu_check, "_ar_with_stops", broken)
    results = tmp_path / "r.jsonl"
    e2e = gpu_check.phase_e2e(torch.device("cpu"), True, results, 0, "none", time.perf_counter() + 600)
    failed = [r for r in e2e.rows if r.get("ok") is False]
    assert not e2e.ok and [(r["mode"], r["B"]) for r in failed] == [("ar + stops", 1)]
    assert failed[0]["note"].startswith("failed: RuntimeError: operation not permitted")
    measured = [r["mode"] for r in e2e.rows if r.get("ok") is not False]
    assert measured == ["p2 published", "dual+threshold", "ar 64 new", "ar decode (steady)"]
    assert all(r["graphs"] is False for r in e2e.rows if "graphs" in r)  # the CPU replays no CUDA graph
    records = report.read_records(results)
    assert sum(r["type"] == "bench" for r in records) == 3 and sum(r["type"] == "gpu_check_e2e" for r in records) == 5

    monkeypatch.setattr(throughput, "run_config", broken)
    agreement = gpu_check.phase_agreement(torch.device("cpu"), True, 0)
    rows = {r["check"]: r for r in agreement.rows}
    assert not agreement.ok and rows["p2 exact vs reference loop"]["note"].startswith("failed: RuntimeError")
    assert rows["diffusion graph vs eager, own bucket"]["ok"] and rows["ar graph vs eager, own bucket"]["ok"]


def test_gpu_check_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from dinfill.bench import gpu_check

    assert gpu_check.main(["--out", "unused"]) == 2
    assert "--cpu-dry-run" in capsys.readouterr().err


def test_micro_benchmarks_smoke_run_on_cpu(tmp_path):
    """``bench/test_bench_model.py`` on its tiny CPU shapes, once each (pytest-benchmark disabled)."""
    # CUDA hidden: on a GPU machine the file would otherwise load the 0.5B shape and time it (gpu_check's job)
    env = dict(os.environ, DINFILL_BENCH_RESULTS=str(tmp_path / "micro.jsonl"), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
           str(REPO / "bench" / "test_bench_model.py")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, textwrap.shorten(proc.stdout + proc.stderr, 3000)
    records = report.read_records(tmp_path / "micro.jsonl")
    assert {r["bench"] for r in records} == {"forward", "ar_decode_step", "diffusion_step"}
    assert all(r["speedup"] > 0 and r["roofline"]["flops"] > 0 for r in records)


def test_unchecked_kernel_modules_are_reported(tmp_path):
    from dinfill.bench import gpu_check

    assert gpu_check.unchecked_kernel_modules() == []  # every kernel of the package has a check
    (tmp_path / "fused_step_kernel.py").write_text("@triton.jit\ndef _k(): pass\n")
    (tmp_path / "new_op.py").write_text("import triton\n@triton.jit\ndef _new_kernel(): pass\n")
    (tmp_path / "helpers.py").write_text("def plain(): pass\n")
    assert gpu_check.unchecked_kernel_modules(tmp_path) == ["new_op"]


def test_gpu_check_pytest_phases_collect_their_results(tmp_path):
    """The kernel-test and micro-benchmark phases on a stand-in repository (no GPU needed for the wiring)."""
    from dinfill.bench import gpu_check

    repo, out = tmp_path / "repo", tmp_path / "out"
    (repo / "tests").mkdir(parents=True)
    (repo / "bench").mkdir()
    out.mkdir()
    (repo / "tests" / "test_attention_stub.py").write_text("def test_ok():\n    assert 1 + 1 == 2\n")
    (repo / "tests" / "test_unrelated.py").write_text("def test_never_collected():\n    raise AssertionError\n")
    (repo / "tests" / "test_fused_step_stub.py").write_text(  # only the compiled-hazard subset runs on CUDA
        "def test_split_rows_ok():\n    assert True\n\ndef test_slow_sweep_not_selected():\n    raise AssertionError\n"
    )
    (repo / "bench" / "test_bench_stub.py").write_text(
        textwrap.dedent(
            """
            import json, os

            def test_micro(benchmark):
                benchmark(lambda: sum(range(10)))
                rec = {"type": "micro", "bench": "stub", "shape": {"batch": 3}, "ours_s": 0.002,
                       "reference_s": 0.006, "speedup": 3.0}
                with open(os.environ["DINFILL_BENCH_RESULTS"], "a") as f:
                    f.write(json.dumps(rec) + "\\n")
            """
        )
    )
    (repo / "bench" / "test_bench_fused_step.py").write_text(
        textwrap.dedent(
            """
            import json, os

            def test_sampling(benchmark):
                benchmark(lambda: None)
                rec = {"bench": "fused_step", "case": "stub", "shape": {"N": 6, "V": 11},
                       "ms": {"triton": 1.0, "torch": 2.0, "reference": 4.0}, "of_floor": 0.5,
                       "ratio_vs_reference": 4.0}
                with open(os.environ["DINFILL_BENCH_RESULTS"], "a") as f:
                    f.write(json.dumps(rec) + "\\n")
            """
        )
    )
    tests = gpu_check.phase_kernel_tests(repo, out, timeout=120)
    assert tests.ok and tests.rows[0]["files"] == "test_attention_stub.py" and "1 passed" in tests.rows[0]["result"]
    assert tests.rows[1]["files"].startswith("test_fused_step_stub.py -k ")
    assert "1 passed, 1 deselected" in tests.rows[1]["result"]
    micro = gpu_check.phase_micro(repo, out, out / "results.jsonl", timeout=120)
    assert micro.ok, (out / "micro.log").read_text()
    assert micro.rows[0] == {"bench": "stub", "batch": 3, "ms": 2.0, "ref_ms": 6.0, "speedup": 3.0}
    assert json.loads((out / "micro.json").read_text())["benchmarks"][0]["name"] == "test_micro"
    assert len(micro.rows) == 2, "the micro phase leaves the sampling file to its own phase"
    sampling = gpu_check.phase_sampling(repo, out, out / "results.jsonl", timeout=120)
    assert sampling.ok, (out / "sampling.log").read_text()
    assert sampling.rows[0] == {"case": "stub", "N": 6, "V": 11, "ms": 1.0, "torch ms": 2.0, "ref ms": 4.0,
                                "% floor": 50.0, "x ref": 4.0}  # fmt: skip


def test_gpu_workflow_keeps_the_runners_torch_and_the_results():
    """The self-hosted GPU workflow: a GPU runner, torch pinned to the runner's, gpu_check run, results kept."""
    yaml = pytest.importorskip("yaml", reason="PyYAML (a transformers dependency) parses the workflow")
    flow = yaml.safe_load((REPO / ".github" / "workflows" / "gpu-bench.yml").read_text())
    job = flow["jobs"]["gpu-check"]
    assert {"self-hosted", "gpu"} <= set(job["runs-on"])
    steps = {s.get("name", s.get("uses")): s for s in job["steps"]}
    install = steps["Install dinfill over the runner's torch"]["run"]
    assert "--system-site-packages" in install and "-c constraints-gpu.txt" in install and "torch|triton" in install
    assert "bench/gpu_check.sh" in steps["GPU check"]["run"]
    keep = steps["Keep the results"]
    assert keep["if"] == "always()" and keep["uses"].startswith("actions/upload-artifact@")
    assert "gpu-check/results.jsonl" in keep["with"]["path"] and "gpu-check/*.json" in keep["with"]["path"]


def test_git_revision_override(monkeypatch):
    monkeypatch.setenv("DINFILL_GIT_REV", "abc123-copied")
    assert report.environment("cpu")["git"] == "abc123-copied"


def test_git_revision_is_the_packages_own(tmp_path, monkeypatch):
    """A copy without its own .git inside another repository is "unknown", not that repository's revision."""
    monkeypatch.delenv("DINFILL_GIT_REV", raising=False)
    git = dict(capture_output=True, check=True, cwd=tmp_path)
    subprocess.run(["git", "init", "-q"], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   **git)  # fmt: skip
    copy = tmp_path / "copy-of-the-project"
    copy.mkdir()
    assert report.git_revision(copy) == "unknown"
    assert report.git_revision(tmp_path) not in ("unknown", None)  # the repository's own top level does count
    if (report.package_checkout() / ".git").exists():
        assert report.git_revision() != "unknown"


def _load_conftest(path: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interpreter_only_marker_skips_where_the_interpreter_is_off(monkeypatch):
    """On a CUDA machine without TRITON_INTERPRET an ``interpreter_only`` test is skipped, saying why."""
    conf = _load_conftest(REPO / "tests" / "conftest.py", "_conftest_tests")

    class Item:
        def __init__(self, *marks):
            self.keywords, self.added = dict.fromkeys(marks, True), []

        def add_marker(self, mark):
            self.added.append(mark)

    def collect(cuda: bool, interpret: str | None) -> tuple[Item, Item]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        if interpret is None:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        else:
            monkeypatch.setenv("TRITON_INTERPRET", interpret)
        marked, plain = Item("interpreter_only"), Item()
        conf.pytest_collection_modifyitems(None, [marked, plain])
        return marked, plain

    for interpret in (None, "0"):
        marked, plain = collect(cuda=True, interpret=interpret)
        assert len(marked.added) == 1 and "TRITON_INTERPRET" in marked.added[0].kwargs["reason"] and not plain.added
    # "true" switches Triton's interpreter on as "1" does (dinfill.backend.triton_interpreted, as the backend reads it)
    for cuda, interpret in ((True, "1"), (True, "true"), (False, None), (False, "1")):
        marked, _ = collect(cuda, interpret)
        assert not [m for m in marked.added if "TRITON_INTERPRET" in m.kwargs.get("reason", "")], (cuda, interpret)


def test_kernel_tests_phase_runs_every_kernel_test_file_of_the_repo():
    """gpu_check's CUDA test phase must not miss a kernel's tests: the decoder kernels, the fused-vs-torch
    decoder paths and the op-count budget run there too, beside attention, the fused step and the AR path."""
    from dinfill.bench import gpu_check

    names = {Path(f).name for f in gpu_check.kernel_test_files(Path(__file__).resolve().parent.parent)}
    for name in ("test_attention.py", "test_fused_step.py", "test_fused_step_sampling.py", "test_ar.py",
                 "test_decoder_kernels.py", "test_decoder_paths.py", "test_op_count.py"):  # fmt: skip
        assert name in names
    assert "test_eval_execution.py" not in names and "test_readme.py" not in names
