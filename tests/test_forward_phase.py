"""``dinfill.bench.forward.forward_phase`` (issue 10's GPU forward phase) runs its code path on the CPU.

Without CUDA it cannot time graphs or compile, so it counts device ops (:class:`DeviceOpCounter`) on the
fused path (Triton's interpreter) and the torch path of a tiny model; this checks the output contract
gpu_check relies on and that the counter sees what the op-count test sees.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import dinfill
from dinfill.bench.forward import DeviceOpCounter, forward_phase


@pytest.fixture(scope="module")
def tiny():
    return dinfill.load_model("tiny-dcoder", device="cpu", dtype=torch.float32, random_weights=True, kind="diffusion")


def test_forward_phase_cpu_contract(tiny, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the CPU dry run; on CUDA gpu_check runs the timed phase")
    monkeypatch.setenv("DINFILL_BACKEND", "torch")  # the phase must pick its backends itself
    results = tmp_path / "r.jsonl"
    out = forward_phase(shapes=((1, 1), (2, 9)), small=True, results=results, model=tiny)
    assert set(out) >= {"rows", "ok", "detail", "seconds"} and out["ok"] is True
    decode, canvas = out["rows"]
    assert (decode["batch"], decode["tokens"], canvas["batch"], canvas["tokens"]) == (1, 1, 2, 9)
    assert decode["mode"].startswith("decode") and canvas["mode"].startswith("bidirectional")
    layers = tiny.config.num_layers
    for row in out["rows"]:
        # the fused forward: <= 10 device ops per layer + 6 per forward; the torch path several times more
        assert 0 < row["fused_ops"] <= row["ops_per_layer_budget"] == 10 * layers + 6
        assert row["torch_ops"] > 2 * row["fused_ops"]
        assert row["compile_skipped"] == "needs CUDA" and "fused_ms" not in row
    # the experimental DINFILL_GEMV=triton path is counted where it applies (<= 16 tokens): 6 ops per layer
    assert decode["fused_gemv_ops"] < decode["fused_ops"] and "fused_gemv_ops" not in canvas
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["shape"] for r in lines] == ["B1 x 1", "B2 x 9"] and all("env" in r for r in lines)
    assert "fused ops" in out["detail"]


@pytest.mark.interpreter_only  # the fused variant runs Triton on the CPU model's tensors
def test_forward_phase_gpu_bookkeeping(tiny, monkeypatch):
    """The CUDA branch's bookkeeping, with the GPU-only timers stubbed: a variant that raises (a failed graph
    capture) leaves an error in its row and the other variants and shapes measured; a missed speed target is
    ``met: False``, not a failed phase (gpu_check reports targets, it fails on errors)."""
    from dinfill.bench import forward, roofline

    def graph_ms(fn):
        fused = os.environ.get("DINFILL_BACKEND") == "triton" and os.environ.get("DINFILL_GEMV") == "cublas"
        if fused and os.environ.get("FAIL_FUSED"):
            raise RuntimeError("operation not permitted when stream is capturing")
        fn()
        return 0.9  # over the (1, 1) target of 0.5 ms

    monkeypatch.setattr(forward, "_graph_ms", graph_ms)
    monkeypatch.setattr(forward, "_profiled_kernels", lambda fn: 7)
    monkeypatch.setattr(forward, "_graph_output", lambda fn: fn())
    monkeypatch.setattr(roofline, "device_name", lambda dev: "NVIDIA H200")
    out = forward_phase(shapes=((1, 1),), device="cuda", model=tiny, compile=False)
    (row,) = out["rows"]
    assert out["ok"] is True and row["ok"] is True and row["met"] is False and "missed" in out["detail"]
    assert row["fused_ms"] == row["torch_ms"] == 0.9 and row["fused_kernels"] == 7 and row["floor_ms"] > 0
    assert row["compile_skipped"] == "compile=False" and row["gemv_vs_cublas"] == 1.0
    assert "fused_gemv_pdl_ms" not in row  # no PDL below sm_90 (here: no CUDA at all)
    # sm_90: the GEMV path again with DINFILL_PDL=1 (the interpreter launches no dependents, the math is the same)
    monkeypatch.setattr(forward, "_pdl_capable", lambda dev: True)
    (row,) = forward_phase(shapes=((1, 1),), device="cuda", model=tiny, compile=False)["rows"]
    assert row["ok"] is True and row["fused_gemv_pdl_ms"] == 0.9 and row["pdl_vs_gemv"] == 1.0
    assert row["pdl_equal"] is True and row["fused_gemv_pdl_ops"] == row["fused_gemv_ops"]
    monkeypatch.setattr(forward, "_pdl_capable", lambda dev: False)
    monkeypatch.setenv("FAIL_FUSED", "1")  # the fused path's capture fails
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    out = forward_phase(shapes=((1, 9),), device="cuda", model=tiny)
    (row,) = out["rows"]
    assert out["ok"] is False and row["ok"] is False and "met" not in row
    assert row["fused_error"].startswith("RuntimeError: operation not permitted") and "fused_ms" not in row
    assert row["fused_gemv_ms"] == row["torch_ms"] == 0.9, "the variants after the failed one still ran"
    assert row["compile_skipped"] == "no fused time" and "floor_ms" not in row and "gemv_vs_cublas" not in row


def test_counter_restores_what_it_patches(tiny):
    """The counter wraps the Triton launchers and the model's validation only while it is open."""
    import triton.runtime.jit as jit

    from dinfill.models.decoder import Decoder

    run, check = jit.JITFunction.run, Decoder._check_inputs
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad(), DeviceOpCounter() as counter:
        assert jit.JITFunction.run is not run and Decoder._check_inputs is not check
        tiny(ids, causal=False)
    assert jit.JITFunction.run is run and Decoder._check_inputs is check
    assert counter.total > 0 and sum(counter.validation.values()) > 0 and not counter.syncs


def test_skinny_linear_check_for_gpu_check():
    """gpu_check's row check of the experimental GEMV kernel runs (interpreter, tiny sizes) and passes."""
    import random

    if torch.cuda.is_available():
        pytest.skip("gpu_check runs it on CUDA")
    from dinfill.bench.gpu_check import check_skinny_linear

    rows = check_skinny_linear(torch.device("cpu"), random.Random(0), small=True)
    assert len(rows) == 8 and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
