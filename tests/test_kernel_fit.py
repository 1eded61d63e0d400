"""Every decoder-path kernel fits every target (issue 18): compiled for sm_80, sm_86, sm_89 and sm_90 on the CPU.

The interpreter neither type-checks like the compiler nor allocates registers, so these tests compile the real
kernels with Triton's NVIDIA backend (no GPU involved) in a subprocess without ``TRITON_INTERPRET``. They drive the
real launchers (attention, its split-K merge, skinny_linear, add_norm, rope_cache, activation) on ``meta`` tensors
under :func:`dinfill.target.static_target`, so what is compiled is what a call on that GPU would launch, and read
each kernel's resources through the static GPU model's recorder (``dinfill.bench.static.Recorder``: shared memory
from the compiled kernel, registers and spill bytes from ``ptxas -v``). The rules: shared memory at most the
target's per-block limit minus 8 KB, no spill bytes, and the attention / skinny_linear configs' own estimates
(shared memory, registers) never below what the compiler reports, since the launchers choose by them.

The default suite compiles a representative subset: on every target the largest attention tile of each head dim,
the causal sliding window, the split-K decode with its merge and the experimental GEMV's SwiGLU variant; on sm_89
the GEMV's LayerNorm + GELU variant and the decoder's small kernels (test_decoder_kernels.py compiles those for
sm_90 in every dtype); on sm_90 attention in fp32. ``dinfill bench --static --check``
compiles the whole seed-shape matrix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinfill.bench import static as S

needs_nvidia = pytest.mark.skipif(
    not S.nvidia_backend_available(), reason="the installed triton has no NVIDIA backend (ptxas / nvdisasm)"
)

# Runs without TRITON_INTERPRET: one JSON line per Triton launch, {"case", "target", kernel resources, config}.
FIT_SCRIPT = r"""
import json, sys
import torch
from dinfill.bench import static as S
from dinfill.target import TARGETS, static_active, static_target
from dinfill.kernels import attention_fwd as A, skinny_linear_kernel as SK
from dinfill.kernels.activation_kernel import activation
from dinfill.kernels.add_norm_kernel import add_norm
from dinfill.kernels.rope_cache_kernel import rope_cache

bf16 = torch.bfloat16
E = lambda *shape, dt=bf16: torch.empty(*shape, device="meta", dtype=dt)


def attn(B, Hq, Hkv, Lq, Lk, D, causal=False, window=None, dt=bf16):
    q = E(B, Lq, Hq, D, dt=dt).transpose(1, 2)  # (B, Hq, Lq, D) view of a (B, L, H, D) buffer, as the model has it
    kv = E(B, Hkv, Lk, D, dt=dt)
    kw = dict(kv_start=E(B, dt=torch.int64), kv_end=E(B, dt=torch.int64))
    if causal:
        kw.update(causal=True, causal_offset=E(B, dt=torch.int64), window=window)
    A.attention(q, kv, kv, **kw)
    cfg = A.pick_config(q, kv)
    return {"config": [cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.num_splits], "D": D,
            "itemsize": dt.itemsize, "dtype": str(dt)}


def skinny(M, K, N, **kw):
    SK.skinny_linear(E(M, K), E(N, K), **kw)
    sw, nm = kw.get("act") == "swiglu", kw.get("norm") is not None
    return {"skinny": list(SK.skinny_config(K, bf16, sw, nm, static_active())) + [sw, nm]}


CASES = {  # compiled for every target
    # attention: the largest tile of each head dim, the causal sliding window, and the split-K decode + merge
    "attn qwen0.5b full B8 608": lambda: attn(8, 14, 2, 608, 608, 64),
    "attn qwen1.5b full B8 608": lambda: attn(8, 12, 2, 608, 608, 128),
    "attn starcoder2 prefill 4600 window": lambda: attn(1, 24, 2, 4600, 4664, 128, causal=True, window=4096),
    "attn qwen0.5b decode B1 1152": lambda: attn(1, 14, 2, 1, 1152, 64, causal=True),
    "attn head dim 80 fp16 (padded to 128)": lambda: attn(2, 8, 2, 276, 276, 80, dt=torch.float16),
    # DINFILL_GEMV=triton: gate_up + SwiGLU, the variant with the most shared memory and registers
    "skinny qwen0.5b gate_up": lambda: skinny(4, 896, 2 * 4864, bias=None, norm="rmsnorm", norm_weight=E(896),
                                              act="swiglu"),
    # the o / down projection: no norm, the residual add in the epilogue
    "skinny qwen0.5b o_proj + residual": lambda: skinny(4, 896, 896, bias=None, residual=E(4, 896)),
}
L4_ONLY = {  # Starcoder2's LayerNorm + GELU GEMV on the tightest target
    "skinny starcoder2 c_fc": lambda: skinny(4, 3072, 12288, bias=E(12288), norm="layernorm", norm_weight=E(3072),
                                             norm_bias=E(3072), act="gelu_tanh"),
}
H100_ONLY = {  # fp32 (16 x 16 tiles; a batch-1 window splits, so the merge too)
    "attn qwen1.5b window B1 fp32": lambda: attn(1, 12, 2, 30, 276, 128, dt=torch.float32),
}
SMALL = {  # the decoder's small kernels in the variants the fused forward launches
    "add_norm embedding gather": lambda: add_norm(E(151936, 896), E(896), eps=1e-6,
                                                  index=E(8, 276, dt=torch.int64), index_rows=0),
    "add_norm residual": lambda: add_norm(E(2208, 896), E(896), eps=1e-6, delta=E(2208, 896),
                                          residual_out=E(2208, 896)),
    "add_norm final rows": lambda: add_norm(E(2208, 896), E(896), eps=1e-6, delta=E(2208, 896),
                                            index=E(8, 30, dt=torch.int64), index_rows=276, store_residual=False),
    "add_norm starcoder2 layernorm": lambda: add_norm(E(2208, 3072), E(3072), E(3072), eps=1e-5, layernorm=True,
                                                      delta=E(2208, 3072)),
    "rope_cache qwen0.5b": lambda: rope_cache(E(8, 276, 1152), E(4096, 64, dt=torch.float32), 14, 2,
                                              positions=E(8, 276, dt=torch.int64)),
    "rope_cache starcoder2 into cache": lambda: rope_cache(E(1, 1, 3584), E(4096, 128, dt=torch.float32), 24, 2,
                                                           cache_pos=E(1, dt=torch.int64), k_out=E(1, 2, 1152, 128),
                                                           v_out=E(1, 2, 1152, 128)),
    "activation swiglu": lambda: activation(E(2208, 2 * 4864), "swiglu"),
    "activation gelu_tanh": lambda: activation(E(2208, 12288), "gelu_tanh"),
}
for key in sys.argv[1].split(","):
    t = TARGETS[key]
    cases = CASES | (L4_ONLY | SMALL if key == "l4" else {}) | (H100_ONLY if key == "h100" else {})
    for name, run in cases.items():
        with static_target(t), S.Recorder(t) as rec:
            extra = run()
        extra = extra if isinstance(extra, dict) else {}  # the small kernels' launchers return tensors
        for launch in rec.launches:
            if launch.kind != "triton":
                continue
            info = launch.info
            row = dict(case=name, target=key, arch=t.arch, op=launch.op, grid=launch.grid, shared=info.shared,
                       limit=t.smem_per_block, regs=info.regs, spills=info.spill_bytes, warps=info.num_warps)
            print(json.dumps(row | extra), flush=True)
"""

TARGET_KEYS = ("a100", "a10", "l4", "h100")


@pytest.fixture(scope="module")
def fit_rows() -> list[dict]:
    """Compile the cases for every target once, in two subprocesses side by side (compiling is single-threaded and
    CI has two cores; the suite's interpreter must stay off there)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is the historical default
    halves = (",".join(TARGET_KEYS[0::2]), ",".join(TARGET_KEYS[1::2]))
    procs = [
        subprocess.Popen([sys.executable, "-c", FIT_SCRIPT, keys], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for keys in halves
    ]  # fmt: skip
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


def _rows(fit_rows, target):
    rows = [r for r in fit_rows if r["target"] == target]
    assert rows, f"no launch compiled for {target}"
    return rows


@needs_nvidia
@pytest.mark.parametrize("target", TARGET_KEYS)
def test_launches_fit_and_do_not_spill(fit_rows, target):
    """Shared memory <= the per-block limit - 8 KB and zero spill bytes, for every launch of every case."""
    bad = [
        f"{r['case']}: {r['op']} uses {r['shared']} B (limit {r['limit']} - {S.SMEM_MARGIN}), "
        f"{r['regs']} registers, spills {r['spills']} B"
        for r in _rows(fit_rows, target)
        if r["shared"] > r["limit"] - S.SMEM_MARGIN or r["spills"]
    ]
    assert not bad, "\n".join(bad)


@needs_nvidia
@pytest.mark.parametrize("target", TARGET_KEYS)
def test_every_case_compiled(fit_rows, target):
    """Each case launched what it should: attention (+ the merge for the split decode) and one GEMV per call."""
    ops = {}
    for r in _rows(fit_rows, target):
        ops.setdefault(r["case"], []).append(r["op"])
    assert ops["attn qwen0.5b decode B1 1152"] == ["_attention_kernel", "_attention_merge_kernel"]
    for case in ("attn qwen0.5b full B8 608", "attn qwen1.5b full B8 608", "attn starcoder2 prefill 4600 window",
                 "attn head dim 80 fp16 (padded to 128)"):  # fmt: skip
        assert ops[case] == ["_attention_kernel"], (case, ops[case])
    assert ops["skinny qwen0.5b gate_up"] == ops["skinny qwen0.5b o_proj + residual"] == ["_skinny_linear_kernel"]
    if target == "l4":
        assert ops["skinny starcoder2 c_fc"] == ["_skinny_linear_kernel"]
        assert sum(case.startswith(("add_norm", "rope", "activation")) for case in ops) == 8
    if target == "h100":  # a batch-1 window splits its keys: the merge runs in fp32 too
        assert ops["attn qwen1.5b window B1 fp32"] == ["_attention_kernel", "_attention_merge_kernel"]


@needs_nvidia
@pytest.mark.parametrize("target", TARGET_KEYS)
def test_config_estimates_bound_the_compiled_kernels(fit_rows, target):
    """The launchers choose by estimates: attention's shared memory and tile registers, skinny_linear's shared
    memory. Each must be at least what the compiler reports, or a choice could overflow a target."""
    from dinfill.kernels import attention_fwd as A
    from dinfill.kernels import skinny_linear_kernel as SK
    from dinfill.target import TARGETS

    t = TARGETS[target]
    for r in _rows(fit_rows, target):
        if r["op"] == "_attention_kernel":
            block_m, block_n, warps, stages, _ = r["config"]
            block_d = max(16, 1 << (r["D"] - 1).bit_length())
            dtype = getattr(torch, r["dtype"].split(".")[1])
            assert r["shared"] <= A.smem_estimate(block_m, block_n, block_d, stages, r["itemsize"], t.arch), r
            tile = A._tiles(block_d, dtype, t.arch)[block_m]
            assert warps == tile.num_warps == r["warps"] and r["regs"] <= tile.regs, (r, tile)
        elif r["op"] == "_skinny_linear_kernel":
            block_k, stages, swiglu, norm = r["skinny"]
            assert r["shared"] <= SK.smem_estimate(block_k, stages, 2, swiglu, norm), r


# Runs without TRITON_INTERPRET: each forward kernel of the decoder compiled for sm_90 with DINFILL_PDL set as argv
# says, its PTX read back; then DINFILL_PDL=1 on an L4.
PDL_SCRIPT = r"""
import json, os, sys
import torch
from dinfill.bench import static as S
from dinfill.target import TARGETS, Unservable, static_target
from dinfill.kernels import attention_fwd as A, skinny_linear_kernel as SK
from dinfill.kernels.activation_kernel import activation
from dinfill.kernels.add_norm_kernel import add_norm
from dinfill.kernels.rope_cache_kernel import rope_cache

E = lambda *shape, dt=torch.bfloat16: torch.empty(*shape, device="meta", dtype=dt)
seen = []
record = S.Recorder._record
def keep(self, fn, kernel, grid, args, kwargs):
    ptx = kernel.asm["ptx"]
    memory = [ptx.find(op) for op in ("ld.global", "st.global", "cp.async", "atom.", "red.") if op in ptx]
    seen.append({"op": fn.fn.__name__, "pdl": bool(kernel.metadata.launch_pdl), "wait": "griddepcontrol.wait" in ptx,
                 "launch": "griddepcontrol.launch_dependents" in ptx,
                 "wait_first": ptx.find("griddepcontrol.wait") < min(memory)})
    return record(self, fn, kernel, grid, args, kwargs)
S.Recorder._record = keep


def forward_kernels():
    add_norm(E(8, 896), E(896), eps=1e-6, delta=E(8, 896), residual_out=E(8, 896))
    rope_cache(E(1, 1, 1152), E(4096, 64, dt=torch.float32), 14, 2, cache_pos=E(1, dt=torch.int64),
               k_out=E(1, 2, 1152, 64), v_out=E(1, 2, 1152, 64))
    A.attention(E(1, 14, 1, 64), E(1, 2, 1152, 64), E(1, 2, 1152, 64), kv_start=E(1, dt=torch.int64),
                kv_end=E(1, dt=torch.int64), causal=True, causal_offset=E(1, dt=torch.int64))
    SK.skinny_linear(E(1, 896), E(1152, 896), norm="rmsnorm", norm_weight=E(896))
    activation(E(8, 2 * 4864), "swiglu")


os.environ["DINFILL_PDL"] = sys.argv[1]
with static_target(TARGETS["h100"]), S.Recorder(TARGETS["h100"]):
    forward_kernels()
try:
    os.environ["DINFILL_PDL"] = "1"
    with static_target(TARGETS["l4"]), S.Recorder(TARGETS["l4"]):
        forward_kernels()
    refused = None
except Unservable as exc:
    refused = str(exc)
print(json.dumps({"kernels": seen, "refused": refused, "after_refusal": len(seen)}))
"""


@needs_nvidia
@pytest.mark.parametrize("pdl", ["1", "0"])
def test_pdl_kernels_wait_for_their_producer_and_launch_the_next(pdl):
    """DINFILL_PDL=1 on sm_90: every forward kernel (add_norm, rope_cache, attention and its split merge,
    skinny_linear, activation) is launched with programmatic dependent launch and its PTX waits for the previous
    kernel (griddepcontrol.wait, before its first global memory access) and lets the next one launch; without
    it, neither. On an L4 (sm_89) the switch is
    refused before anything is launched, naming the GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", PDL_SCRIPT, pdl], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    ops = [k["op"] for k in out["kernels"]]
    assert ops == ["_add_norm_kernel", "_rope_cache_kernel", "_attention_kernel", "_attention_merge_kernel",
                   "_skinny_linear_kernel", "_activation_kernel"], ops  # fmt: skip
    on = pdl == "1"
    assert all(k["pdl"] == k["wait"] == k["launch"] == on for k in out["kernels"]), out["kernels"]
    if on:  # the compiled code waits before its first global load, store or atomic: no read of unfinished data
        assert all(k["wait_first"] for k in out["kernels"]), out["kernels"]
    assert out["refused"].startswith("DINFILL_PDL=1 on L4 (sm_89): programmatic dependent launch needs sm_90")
    assert out["after_refusal"] == len(ops)  # the L4 launched nothing
