"""The static GPU model (issue 18): the target table, its arithmetic, the SASS loop reader, and the budgets.

The arithmetic is checked against values computed by hand here; the loop reader against small hand-written
disassemblies whose answers are obvious; the budgets and fit rules by compiling the real launchers' kernels
for sm_90 / sm_89 on the CPU (Triton's NVIDIA backend ships ptxas and nvdisasm; no GPU is involved). The
compile tests share one module-scoped set of results so each kernel compiles once per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dinfill.backend import compiled_target
from dinfill.bench import static as S
from dinfill.target import TARGETS, Unservable, lookup, static_active, static_target, target_for

# ------------------------------------------------------------------------------------------------
# the target table and its arithmetic
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, expected",
    [
        # SMs x 4 schedulers x clock x 32 lanes / (bandwidth / 2 bytes), by hand
        ("h200", 132 * 4 * 1.98e9 * 32 / (4.3e12 / 2)),  # ~15.56 at the measured 4.3 TB/s
        ("h100", 132 * 4 * 1.98e9 * 32 / (3.0e12 / 2)),  # ~22.3 at the measured 3.0 TB/s
        ("a100", 108 * 4 * 1.41e9 * 32 / (2.039e12 / 2)),  # ~19.1
        ("a10", 72 * 4 * 1.695e9 * 32 / (600e9 / 2)),  # ~52.1
        ("l4", 58 * 4 * 2.04e9 * 32 / (300e9 / 2)),  # ~101
    ],
)
def test_issue_budget_matches_hand_computation(key, expected):
    assert TARGETS[key].issue_budget(2) == pytest.approx(expected, rel=1e-9)


def test_issue_budget_values_quoted_in_the_docs():
    """docs/gpu.md and the issue quote H200 ~15.5, H100 SXM ~20 (datasheet bandwidth), L4 ~100."""
    assert TARGETS["h200"].issue_budget() == pytest.approx(15.5, abs=0.1)
    assert TARGETS["h100"].issue_budget(bandwidth=3.35e12) == pytest.approx(20.0, abs=0.1)
    assert TARGETS["l4"].issue_budget() == pytest.approx(101, abs=1)
    assert TARGETS["h200"].issue_budget(4) == pytest.approx(2 * TARGETS["h200"].issue_budget(2))  # fp32


@pytest.mark.parametrize(
    "threads, regs, smem, key, expected",
    [
        (256, 98, 1024, "h100", 2),  # 98 regs -> 13 x 256 a warp -> 26,624 a block: 2 blocks of 65,536
        (256, 40, 32, "h100", 6),  # 40 -> 1,280 a warp, 10,240 a block: 6 by registers (8 by threads)
        (256, 32, 32, "l4", 6),  # 1,536 threads an SM on sm_89: 6 blocks of 256
        (128, 32, 50 * 1024, "l4", 1),  # 100 KB an SM, 1 KB reserved per block: one 50 KB block
        (128, 32, 100 * 1024, "l4", 0),  # over the 99 KB per-block limit: cannot launch
        (128, 32, 100 * 1024, "h100", 2),  # fits sm_90's 227 KB
        (1024, 255, 0, "a100", 0),  # 255 x 1024 registers do not exist on any SM
    ],
)
def test_resident_blocks(threads, regs, smem, key, expected):
    assert TARGETS[key].resident_blocks(threads, regs, smem) == expected


def test_lookup_by_key_arch_and_name():
    assert lookup("l4") is TARGETS["l4"] and lookup("sm_89") is TARGETS["l4"] and lookup("89") is TARGETS["l4"]
    assert lookup("sm_90") is TARGETS["h100"] and lookup("NVIDIA H200") is TARGETS["h200"]
    assert lookup("sm_80").smem_per_block == 163 * 1024 and lookup("sm_86").smem_per_block == 99 * 1024
    with pytest.raises(ValueError, match="unknown GPU target 'sm_75'.*known: a100"):
        lookup("sm_75")


def test_a_gpu_below_sm80_runs_the_torch_path_or_is_refused_before_any_launch(monkeypatch):
    """auto: a T4-like sm_75 target gets the torch path; DINFILL_BACKEND=triton there: Unservable, by name."""
    from dataclasses import replace

    from dinfill.backend import use_triton
    from dinfill.target import Unservable

    t4 = replace(TARGETS["l4"], name="T4", arch=75, smem_per_block=64 * 1024, smem_per_sm=64 * 1024)
    with static_target(t4):
        monkeypatch.setenv("DINFILL_BACKEND", "auto")
        assert not use_triton("meta")
        monkeypatch.setenv("DINFILL_BACKEND", "triton")
        with pytest.raises(Unservable, match=r"T4 \(sm_75\).*need sm_80 or newer.*set it to torch"):
            use_triton("meta")
    with static_target("l4"):
        assert use_triton("meta")


def test_pdl_is_off_by_default_on_for_sm90_refused_below_and_never_in_the_interpreter(monkeypatch):
    from dinfill.target import pdl

    monkeypatch.delenv("DINFILL_PDL", raising=False)
    with static_target("h100"):
        assert not pdl("meta")
        monkeypatch.setenv("DINFILL_PDL", "1")
        assert pdl("meta")
    for gpu in ("l4", "a100"):
        with static_target(gpu), pytest.raises(Unservable, match=r"DINFILL_PDL=1 on .* \(sm_8\d\): .* needs sm_90"):
            pdl("meta")
    assert not pdl("cpu")  # the interpreter: nothing to overlap
    monkeypatch.setenv("DINFILL_PDL", "yes")
    with pytest.raises(ValueError, match="DINFILL_PDL must be 0 or 1, got 'yes'"):
        pdl("cpu")


def test_the_pdl_forward_is_evaluated_on_sm90_only():
    w = S.Workload("open-dcoder-0.5b", "forward-pdl", 1, 276)
    assert S.applies(w, TARGETS["h100"]) and S.applies(w, TARGETS["h200"])
    assert not S.applies(w, TARGETS["l4"]) and not S.applies(w, TARGETS["a100"])
    assert S.applies(S.Workload("open-dcoder-0.5b", "forward-decode", 1, 276), TARGETS["l4"])


def test_command_line_choices_match_the_model():
    """bench's --static choices are plain tuples (the command line is checked before torch is imported)."""
    from dinfill.bench import cli

    assert cli.STATIC_MODES == S.MODES and set(cli.STATIC_STEP_PRESETS) == set(S.STEP_PRESETS)


def test_target_for_devices():
    """CPU: the interpreter (no target); meta: a GPU only inside static_target, restored after."""
    assert target_for("cpu") is None and target_for("meta") is None and not compiled_target("meta")
    with static_target("sm_89") as t:
        assert t is TARGETS["l4"] and target_for("meta") is t and compiled_target("meta")
        with static_target(TARGETS["h200"]):
            assert target_for("meta") is TARGETS["h200"]
        assert target_for("meta") is t and target_for("cpu") is None
    assert static_active() is None


# ------------------------------------------------------------------------------------------------
# the SASS loop reader, on hand-written disassemblies
# ------------------------------------------------------------------------------------------------


def _ins(addr, op, rest="", line=10, predicated=False):
    return (addr, op, rest, [("kernel.py", line)], predicated)


def test_loop_body_and_fast_path():
    """A loop of 8 instructions whose 3-instruction rare block is skipped by a predicated forward branch."""
    ins = [
        _ins(0x00, "MOV"),
        _ins(0x10, "LDG.E.128", "R4, [R2.64]"),  # head
        _ins(0x20, "HMNMX2"),
        _ins(0x30, "BRA", "0x70", predicated=True),  # skip the rare block
        _ins(0x40, "SHF"),
        _ins(0x50, "LOP3"),
        _ins(0x60, "REDG.E.ADD"),
        _ins(0x70, "IADD3"),
        _ins(0x80, "BRA", "0x10", predicated=True),  # back edge
        _ins(0x90, "EXIT"),
    ]
    (loop,) = S.sass_loops(ins)
    assert (loop.start, loop.body, loop.fast, loop.loads, loop.bytes) == (0x10, 8, 5, 1, 16)
    loop.elems = loop.bytes / 2  # bf16
    assert loop.per_elem == 1.0 and loop.fast_per_elem == 5 / 8


def test_loop_excludes_code_laid_out_inside_but_off_the_loop():
    """A block between head and tail that the loop never reaches (an exit path placed there) is not counted."""
    ins = [
        _ins(0x00, "LDG.E", "R1, [R2.64]"),  # head
        _ins(0x10, "BRA", "0x40"),  # unconditional: jump over the block below
        _ins(0x20, "FADD"),  # off the loop: only reached from outside
        _ins(0x30, "EXIT"),
        _ins(0x40, "IADD3"),
        _ins(0x50, "BRA", "0x00", predicated=True),  # back edge
        _ins(0x60, "BRA", "0x20"),  # the block at 0x20 is entered from here
    ]
    (loop,) = S.sass_loops(ins)
    assert loop.body == 4 and loop.fast == 4


def test_a_divergence_check_falls_through_and_the_final_self_branch_is_no_loop():
    """sm_80-89 SASS: ``BRA.DIV ~URZ, <out of line>`` (taken only if the warp diverged) and ``BRA P0, <head>``
    are conditional: the loop continues after them. The ``BRA`` to itself after the last ``EXIT`` is padding."""
    ins = [
        _ins(0x00, "LDG.E.128", "R4, [R2.64]"),  # head
        _ins(0x10, "FMNMX"),
        _ins(0x20, "BRA.DIV", "~URZ, 0x80"),  # warp-divergent path, laid out after the kernel's end
        _ins(0x30, "SHFL.BFLY", "PT, R12, R14, 0x1, 0x1f"),
        _ins(0x40, "FADD"),
        _ins(0x50, "BRA", "P0, 0x00"),  # back edge with a condition operand
        _ins(0x60, "EXIT"),
        _ins(0x70, "BRA", "0x70"),  # padding
        _ins(0x80, "WARPSYNC"),  # the divergent path, which rejoins the loop
        _ins(0x90, "BRA", "0x40"),
    ]
    (loop,) = S.sass_loops(ins)
    assert (loop.start, loop.body, loop.fast, loop.bytes) == (0x00, 6, 6, 16)


def test_nested_loops_and_tags(tmp_path):
    """Tags come from the loop statement's line; the innermost loop carrying a tag owns it."""
    src = tmp_path / "k.py"
    src.write_text("x\nfor a in b:  # static: outer\nfor c in d:  # static: inner\n")
    f = str(src)
    ins = [
        (0x00, "LDG.E.128", "", [(f, 2)], False),  # outer head
        (0x10, "LDG.E.64", "", [(f, 3)], False),  # inner head
        (0x20, "BRA", "0x10", [(f, 3)], True),  # inner back edge
        (0x30, "BRA", "0x00", [(f, 2)], True),  # outer back edge
    ]
    loops = {lp.tag: lp for lp in S.sass_loops(ins)}
    assert set(loops) == {"outer", "inner"}
    assert loops["inner"].body == 2 and loops["inner"].bytes == 8
    assert loops["outer"].body == 4 and loops["outer"].bytes == 24


# ------------------------------------------------------------------------------------------------
# the rules, on hand-made results (no compile)
# ------------------------------------------------------------------------------------------------


def _fake_result(per_elem: float, shared: int = 1024, spills: int = 0, target: str = "h100") -> S.Result:
    t = TARGETS[target]
    loop = S.Loop("pass-1", "k.py:1", 0, int(per_elem * 16), 16, 2, 32, elems=16.0)
    info = S.KernelInfo("_fused_step_rows_kernel", "abc", t.arch, t.name, shared, t.smem_per_block, 64, spills, 8,
                        t.resident_blocks(256, 64, shared), 2, [loop])  # fmt: skip
    launch = S.Launch("_fused_step_rows_kernel", "triton", (528, 1, 1), info, 9e6, 0.0, {"pass-1": 4.5e6})
    w = S.Workload("open-dcoder-0.5b", "step", 1, 276, "bf16", "published")
    return S.Result(w, t, [launch], [S.predict(launch, t)], 1e-5, 3e-6, "bytes")


def test_rules_report_budget_fit_and_spills_by_name():
    assert S.check_rules([_fake_result(12.0)]) == []
    (over,) = S.check_rules([_fake_result(25.0)])
    assert "fused_step published loop pass-1" in over and "25.0 instructions per element (budget 20)" in over
    (big,) = S.check_rules([_fake_result(12.0, shared=100 * 1024, target="l4")])
    assert "uses 102400 B of shared memory" in big and "101376 - 8192 margin" in big
    (spill,) = S.check_rules([_fake_result(12.0, spills=8)])
    assert "spills 8 B" in spill
    assert S.check_rules([_fake_result(25.0, target="l4")]) == []  # the budget is for sm_90 (an L4 allows ~100)


def _attention_result(grid: tuple[int, int, int], keys: int = 1152, flops: float = 0.0) -> S.Result:
    """A batch-1 decode's attention launch over ``keys`` cached keys of a 2-KV-head model, head dim 64; the grid
    is (query blocks, batch x KV heads, key splits), as ``attention_fwd`` launches it."""
    t = TARGETS["h100"]
    info = S.KernelInfo("_attention_kernel", "att", t.arch, t.name, 10_752, t.smem_per_block, 64, 0, 4,
                        t.resident_blocks(128, 64, 10_752), 2, [])  # fmt: skip
    kv = 2 * 2 * keys * 64 * 2
    launch = S.Launch("_attention_kernel", "triton", grid, info, float(kv), flops or 4.0 * 14 * keys * 64, {},
                      scalars={"L_k": keys})  # fmt: skip
    w = S.Workload("qwen2.5-coder-0.5b", "decode", 1, keys, "bf16")
    return S.Result(w, t, [launch], [S.predict(launch, t)], 1e-5, 3e-6, "bytes")


def test_decode_attention_wave_and_bandwidth_rules():
    """Batch-1 decode attention: 2 programs (one per KV head, no split) at 1152 keys break the wave rule; 66
    splits of each KV head (a full H100 wave) pass; at 276 keys 2 x 17 programs is all that 16-key splits reach,
    so that passes too, and 2 x 8 does not. A full wave that is not bandwidth-bound breaks the 50 % rule."""
    (few,) = S.check_rules([_attention_result((1, 2, 1))])
    assert "attention launches 2 programs on 132 SMs (1152 keys" in few
    assert S.check_rules([_attention_result((1, 2, 66))]) == []
    assert S.check_rules([_attention_result((1, 2, 17), keys=276)]) == []
    (short,) = S.check_rules([_attention_result((1, 2, 8), keys=276)])
    assert "16-key splits reach 34" in short
    (slow,) = S.check_rules([_attention_result((1, 2, 66), flops=1e12)])  # math-bound: the K/V trickles in
    assert "attention reaches 0% of the bandwidth (target 50%" in slow


def test_a_missed_forward_target_says_how_many_launches_it_allows():
    # 246 launches at 1.3 us over 426 us of the kernels' own work, a 331 us floor: 1.5x allows 496.5 us, 70.5 us of
    # it for launches, 54 of them; where the work alone is past the target there is room for none.
    r = SimpleNamespace(total_s=426e-6 + 246 * 1.3e-6, kernels=246, floor_s=331e-6)
    expected = "takes 426 us of the 496 us the target allows, leaving room for 54 launches at 1.3 us"
    assert S._launch_room(r).endswith(expected), S._launch_room(r)
    r = SimpleNamespace(total_s=700e-6 + 10 * 1.3e-6, kernels=10, floor_s=331e-6)
    assert S._launch_room(r).endswith("room for 0 launches at 1.3 us")


def test_issue_time_enters_the_prediction():
    """A loop costing 25 instructions an element for 4.5e6 elements on an H100 is issue-bound."""
    r = _fake_result(25.0)
    p = r.predictions[0]
    t = TARGETS["h100"]
    assert p["t_issue"] == pytest.approx(4.5e6 * 25.0 / (32 * t.warp_issue_rate))
    assert p["bound"] == "issue" and p["seconds"] == pytest.approx(p["t_issue"] + S.LAUNCH_S)


def test_recorder_counts_the_rows_a_gather_reads_not_its_table():
    """An embedding look-up of 3 ids reads 3 rows (and writes them), not the 272 MB table; a matmul moves its
    operands; a reshape that copies nothing is no kernel."""
    import torch
    import torch.nn.functional as F

    ids = torch.zeros(1, 3, dtype=torch.long, device="meta")
    table = torch.empty(151936, 896, dtype=torch.bfloat16, device="meta")
    with S.Recorder(TARGETS["h100"]) as rec:
        rows = F.embedding(ids, table)  # (1, 3, 896)
        rows @ table[:10].T  # a (3, 896) x (896, 10) GEMM after a copy-free reshape
    (gather, gemm) = rec.launches
    assert (gather.op, gather.bytes) == ("embedding", 2 * 3 * 896 * 2 + 3 * 8)
    assert gemm.kind == "gemm" and gemm.flops == 2 * 3 * 10 * 896
    assert gemm.bytes == (3 * 896 + 10 * 896 + 3 * 10) * 2


# ------------------------------------------------------------------------------------------------
# compiled for real targets: the fused_step budgets and fit rules
# ------------------------------------------------------------------------------------------------

needs_nvidia = pytest.mark.skipif(
    not S.nvidia_backend_available(), reason="the installed triton has no NVIDIA backend (ptxas / nvdisasm)"
)
STEP_ARGS = ["--model", "open-dcoder-0.5b", "--mode", "step", "--batch", "1", "--step-preset", "published", "greedy",
             "--arch", "sm_90", "sm_89"]  # fmt: skip


def _static(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    """``dinfill bench --static ...`` in a fresh process: the test process runs Triton's interpreter, whose
    kernels cannot be compiled for a GPU (TRITON_INTERPRET is read when triton is imported)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["DINFILL_STATIC_CACHE"] = str(tmp / "analysis")
    cmd = [sys.executable, "-m", "dinfill", "bench", "--static", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def step_json(tmp_path_factory):
    """The fused_step launches of the two budgeted presets at batch 1, compiled for sm_90 and sm_89."""
    tmp = tmp_path_factory.mktemp("static")
    done = _static([*STEP_ARGS, "--json", str(tmp / "out.json")], tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp / "out.json").read_text())
    data["tmp"] = tmp
    return data


def _rows_kernel(data, preset: str, dtype: str, arch: int) -> dict:
    (row,) = [r for r in data["workloads"] if r["preset"] == preset and r["dtype"] == dtype and r["arch"] == arch]
    assert row["error"] is None, row["error"]
    (launch,) = [x for x in row["launches"] if x["op"] == "_fused_step_rows_kernel"]
    (info,) = [k for k in data["kernels"] if k["key"] == launch["kernel"] and k["arch"] == arch]
    return info


def _loop(info: dict, tag: str) -> dict | None:
    found = [lp for lp in info["loops"] if lp["tag"] == tag and lp["elems"]]
    return max(found, key=lambda lp: lp["per_elem"], default=None)


@needs_nvidia
def test_fused_step_fits_and_does_not_spill(step_json):
    assert len(step_json["workloads"]) == 8  # 2 presets x 2 dtypes x 2 targets
    assert {tuple(x["op"] for x in r["launches"]) for r in step_json["workloads"]} == {
        ("_fused_step_rows_kernel", "_fused_step_select_kernel")
    }
    for k in step_json["kernels"]:
        assert k["shared"] <= k["smem_limit"] - S.SMEM_MARGIN and k["resident"] > 0, k["name"]
        assert k["spill_bytes"] == 0, (k["name"], k["target"], k["regs"])
    assert step_json["violations"] == []


@needs_nvidia
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_fused_step_loops_inside_their_budgets(step_json, dtype):
    """Issue 18, sm_90: published pass 1 (1a and 1b) and the sample scan <= 20 per element; greedy <= 10."""
    pub = _rows_kernel(step_json, "published", dtype, 90)
    for tag in ("pass-1a", "pass-1", "scan"):
        loop = _loop(pub, tag)
        assert loop is not None, f"no loop tagged {tag} in the compiled kernel"
        assert loop["per_elem"] <= S.BUDGET_PUBLISHED, (tag, loop["per_elem"])
        assert loop["fast"] <= loop["body"]
    greedy = _rows_kernel(step_json, "greedy", dtype, 90)
    assert _loop(greedy, "pass-1")["per_elem"] <= S.BUDGET_GREEDY
    assert _loop(greedy, "pass-1a") is None and _loop(greedy, "scan") is None  # one pass, nothing sampled
    # the pass-1 loops stream 16 bytes a thread per load (8 bf16), never 2-byte loads
    assert _loop(pub, "pass-1")["bytes"] % 16 == 0 and _loop(greedy, "pass-1")["bytes"] % 16 == 0


@needs_nvidia
def test_predictions_are_bounded_by_their_parts(step_json):
    """Predicted time = max(bytes / bandwidth, issue, flops) + launch, never below the read-once floor."""
    for r in step_json["workloads"]:
        for x in r["launches"]:
            assert x["seconds"] == pytest.approx(max(x["t_mem"], x["t_issue"], x["t_math"]) + S.LAUNCH_S)
        assert r["predicted_s"] >= r["floor_s"] > 0 and r["floor_bound"] == "bytes"
        assert r["launches"][0]["bytes"] >= S.middle(276) * 151936 * 2  # every logit read at least once


@needs_nvidia
def test_check_mode_prints_only_broken_rules(step_json):
    """``--check`` on the same launches (compiled already): nothing broken, exit 0, one summary line."""
    done = _static([*STEP_ARGS, "--check"], step_json["tmp"])
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert done.stdout.strip().splitlines() == ["static check: 0 broken rule(s) over 8 workload x target evaluations"]


@needs_nvidia
def test_gpu_check_predictions_on_the_dry_run_shapes(tmp_path):
    """gpu_check prints the static prediction beside each measured row: its helper works (tiny AR shape, the
    stand-in sm_90 target off CUDA) and gives a positive rate for the steady-decode row."""
    code = (
        "import json, torch\n"
        "from dinfill.bench import gpu_check, static\n"
        "t = static.calibrated_target('cpu')\n"
        "print(json.dumps([t.name, gpu_check._predicted('ar decode (steady)', 1, gpu_check._shapes(True), t)]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env.update(TRITON_DEFAULT_FP_FUSION="1", DINFILL_STATIC_CACHE=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    name, cells = json.loads(done.stdout.strip().splitlines()[-1])
    assert name == "H100 SXM (stand-in: no CUDA)"
    assert cells["pred tok/s"] > 0, cells


@needs_nvidia
def test_batch1_decode_attention_fills_the_gpu(tmp_path):
    """The wave and bandwidth rules on the real launchers (sm_89, sm_90): a batch-1 decode of the 2-KV-head 0.5B
    shape splits its keys over a full wave at 1152 cached keys (58 / 132 programs), and over every 16-key split
    of its 2 heads at 276 keys (34 programs); ``--check`` finds nothing broken in any of its launches."""
    args = ["--model", "qwen2.5-coder-0.5b", "--mode", "decode", "--batch", "1", "--dtype", "bf16",
            "--arch", "sm_89", "sm_90"]  # fmt: skip
    done = _static([*args, "--json", str(tmp_path / "out.json")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["violations"] == []
    programs = {}
    for r in data["workloads"]:
        assert r["error"] is None, r["error"]
        (first, *_) = [x for x in r["launches"] if x["op"] == "_attention_kernel"]
        gx, gy, gz = first["grid"]
        programs[r["arch"], r["length"]] = gx * gy * gz
        if r["length"] == 1152:
            assert first["bound"] == "bytes" and first["t_mem"] > 0
    assert programs[89, 1152] == 58 and programs[90, 1152] == 132
    assert programs[89, 276] == programs[90, 276] == 34
    done = _static([*args, "--check"], tmp_path)
    assert done.returncode == 0 and "0 broken rule(s)" in done.stdout, done.stdout + done.stderr[-2000:]


@needs_nvidia
def test_the_pdl_forward_launches_every_triton_kernel_with_pdl(tmp_path):
    """``--mode forward-pdl`` (the 0.5B batch-1 decode forward, GEMV path, DINFILL_PDL=1): evaluated on sm_90
    only; every Triton launch carries PDL, the embedding and the LM head (torch ops) do not; the tool says what a
    PDL launch may cost for the target, with the other launches at the stated 1.3 us."""
    args = ["--model", "open-dcoder-0.5b", "--mode", "forward-pdl", "--batch", "1", "--dtype", "bf16",
            "--arch", "sm_89", "sm_90", "--json", str(tmp_path / "out.json")]  # fmt: skip
    done = _static(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "out.json").read_text())
    (r,) = data["workloads"]
    assert r["arch"] == 90 and r["error"] is None and data["violations"] == []
    kinds = {(x["kind"], x["pdl"]) for x in r["launches"]}
    assert kinds <= {("triton", True), ("gemm", False), ("aten", False)} and ("triton", True) in kinds, kinds
    overlapped = sum(x["pdl"] for x in r["launches"])
    assert overlapped >= 6 * 24  # at least the six Triton launches of each of the 24 layers
    (line,) = data["pdl"]
    assert f"{len(r['launches'])} kernels, {overlapped} launched with PDL" in line and "us (gpu_check" in line, line
