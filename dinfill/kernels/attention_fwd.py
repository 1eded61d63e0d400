"""FlashAttention-2-style forward attention in Triton, shaped for infilling.

Why a kernel of our own rather than SDPA or flash-attn: the diffusion cache attends a short middle
(tens of queries) to a long prefix + middle + suffix, batched rows are padded on both sides, and the
AR decode step must replay in a CUDA graph with a key length that changes every step. SDPA needs a
materialised ``(B, 1, Lq, Lk)`` mask for all of that (and leaves its fastest kernels), flash-attn is
an optional extra. Here the per-sequence key range and the causal offset are *device tensors read
inside the kernel*, so no mask is built and no host sync happens.

Two choices shape the kernel:

* **Grouped heads share one program.** The ``G = Hq // Hkv`` query heads that read one key/value
  head are packed into the row dimension (row ``r`` = head ``r // Lq`` of the group, query
  ``r % Lq``), so each key/value block is loaded once for the whole group. A decode step of the
  0.5B model (7 heads per KV head, one query) fills one 16-row block instead of wasting 15/16 of
  seven blocks, and a 30-token diffusion middle fills 210 rows instead of seven nearly empty blocks.
* **Key blocks are visited in two passes.** Blocks every row of the query block may see entirely
  run without any masking; only the boundary blocks (``kv_end``, the causal diagonal) pay for it.
  Blocks outside ``[kv_start, kv_end)`` or above the causal bound are never loaded at all.

When even 16-row query blocks leave SMs idle and the cache holds at least 256 keys (AR decode and
the diffusion window at small batch), the key range is split flash-decoding style into enough parts
for one program per SM (each at least one 16-key block); a second small kernel merges the partial
results by their log-sum-exp, a few wide loads per row. Both are sized on the host from shapes and
the target only, so a captured CUDA graph stays valid.

Launch configurations come from the target (:mod:`dinfill.target`: compute capability, shared
memory per block, registers and SMs), see :func:`cuda_config`: register-safe tiles per head dim,
as many pipeline stages as the shared memory allows with 8 KB to spare, the query block that
minimises the predicted busiest SM given how many blocks an SM holds at once, and the key split.

Supports
--------
* q ``(B, Hq, Lq, D)``, k/v ``(B, Hkv, Lk, D)`` with ``Hq % Hkv == 0``; any strides with a unit
  stride on the last dim (views of a fused QKV projection work without copies).
* fp16, bf16 (fp32 accumulation) and fp32 (IEEE dot products, no TF32).
* Head dims 1 to 256 (padded to a power of two >= 16 inside the kernel, masked loads and stores).
* Bidirectional and causal; the causal offset is an int, a 0-dim tensor or a ``(B,)`` tensor.
* Causal sliding windows (Starcoder2): keys before a block's window are never loaded.
* Per-sequence visible key ranges ``kv_start``/``kv_end`` (left and right padding).
* ``Lq != Lk`` in both directions, Lq = 1 included.

Limitations
-----------
* Forward only (inference); no dropout, no ALiBi, no arbitrary masks.
* With a sliding window every visited key block is masked (no unmasked fast phase): fine for
  decode, about the cost of the causal diagonal on long prefills.
* Block sizes come from rules over the target description and a table of register-safe tiles
  measured by compiling for sm_80 / sm_86 / sm_89 / sm_90 with Triton 3.6 and 3.9, not from
  autotuning (an autotuner would benchmark inside CUDA-graph capture); the makespan model behind
  the query block is uncalibrated until a GPU run (``gpu_check``) measures it.
* Needs sm_80 or newer; older GPUs get :class:`dinfill.target.Unservable` before any launch (use
  ``DINFILL_BACKEND=torch``). fp32 runs 16 x 16 tiles only (larger ones spill).
* A batch-1 decode splits into at most ``Lk / 16`` parts: with 2 KV heads that is a full wave of
  an H100 only from ~1056 keys on (464 on an L4; 34 programs at 276 keys). Shorter splits would
  leave the tensor-core tile mostly empty and write more partial output than the K / V they read,
  for a launch that is latency-bound at that size anyway.

Differences from the reference (``dinfill.kernels.reference.attention_ref``)
-----------------------------------------------------------------------------
* Online softmax in base 2 with fp32 statistics; the probabilities are rounded to the input dtype
  before the second matmul (as FlashAttention does), so low-precision results differ from the
  fp32 reference by about as much as torch's own low-precision computation does.
* Under ``TRITON_INTERPRET=1`` on the CPU, bf16 is emulated in fp32: the interpreter's bf16
  ``tl.dot`` multiplies raw bit patterns (triton-lang/triton#11584) and its fp32 -> bf16 cast
  truncates. Operands are widened before each dot (products of bf16 values are exact in fp32) and
  p and the output are rounded to the nearest bf16 by bit arithmetic, so the interpreter matches
  the compiled kernel up to the order of the fp32 sums.
* The output's memory layout follows q's: if q is a ``(B, L, H, D)`` buffer seen through
  ``transpose(1, 2)``, so is the output (the output projection then needs no copy).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from dinfill.backend import compiled_target, triton_interpreted, use_triton
from dinfill.kernels._common import await_producer, device_context, emulate_bf16, pdl_args, round_to_bf16
from dinfill.target import MIN_ARCH, Target, Unservable, target_for

_MAX_HEAD_DIM = 256  # head dims are padded to a power of two >= 16 (tl.dot's minimum); 256 keeps tiles in registers
_MAX_SPLITS = 128  # upper bound on split-K partitions (one program per SM on every target in dinfill.target)
_LOG2E = 1.4426950408889634  # softmax is computed with exp2: exp(x) = exp2(x * log2(e))


@triton.jit
def _attention_block_loop(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    q_pos,
    lo,
    hi,
    window,
    stride_kn,
    stride_vn,
    qk_scale,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Fold keys ``[lo, hi)`` into the running (acc, l_i, m_i); MASKED blocks check ``n < hi``, causality, window."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < HEAD_DIM)[None, :]  # (1, BLOCK_D): all true unless the head dim is padded
    k_ptrs = k_base + (lo + offs_n).to(tl.int64)[:, None] * stride_kn + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
    v_ptrs = v_base + (lo + offs_n).to(tl.int64)[:, None] * stride_vn + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        n = start_n + offs_n  # (BLOCK_N,) key columns
        if MASKED:
            k = tl.load(k_ptrs, mask=(n < hi)[:, None] & d_ok, other=0.0)
            v = tl.load(v_ptrs, mask=(n < hi)[:, None] & d_ok, other=0.0)
        elif HEAD_DIM != BLOCK_D:
            k = tl.load(k_ptrs, mask=d_ok, other=0.0)
            v = tl.load(v_ptrs, mask=d_ok, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if EMULATE_BF16:  # interpreter only: bf16 dot products in fp32 (see module docstring)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        if MASKED:
            visible = (n < hi)[None, :]
            if CAUSAL:
                visible = visible & (n[None, :] <= q_pos[:, None])
                if WINDOW:  # sliding window: key n is visible to a query at p iff p - window < n <= p
                    visible = visible & (n[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row that has seen no key yet keeps m = -inf: shift by 0 instead (exp2(-inf) = 0, no NaN)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_use = m_new
            p = tl.exp2(s * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)  # rescales what was accumulated under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if EMULATE_BF16:
            p = round_to_bf16(p)
        else:
            p = p.to(v.dtype)  # rounded to the input dtype, as FlashAttention does
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)  # (BLOCK_M, D)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["causal_offset"])
def _attention_kernel(
    # pointers
    Q,
    K,
    V,
    Out,
    OFFSET,
    KV_START,
    KV_END,
    O_PART,
    LSE_PART,
    # sizes
    L_q,
    L_k,
    H_kv,
    GROUP,
    causal_offset,
    window,
    qk_scale,
    # strides
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_offb,
    stride_startb,
    stride_endb,
    # constexprs
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    OFFSET_IS_TENSOR: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    HAS_KV_END: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program: BLOCK_M packed (group head, query) rows of one (batch, kv head), one key split."""
    await_producer(USE_PDL)
    start_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // H_kv
    hk = pid_bh % H_kv
    n_rows = GROUP * L_q

    # packed rows -> (query head, query index)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < n_rows
    i = rows % L_q
    hq = hk * GROUP + rows // L_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # (BLOCK_D,) all true unless the head dim is padded to a power of two
    q_row = hq.to(tl.int64) * stride_qh + i.to(tl.int64) * stride_qm  # (BLOCK_M,) int64
    q_ptrs = Q + b.to(tl.int64) * stride_qb + q_row[:, None] + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if EMULATE_BF16:
        q = q.to(tl.float32)

    # visible key range of this sequence, clamped to [0, L_k)
    lo = 0
    hi = L_k
    if HAS_KV_START:
        lo = tl.maximum(tl.load(KV_START + b * stride_startb).to(tl.int32), 0)
    if HAS_KV_END:
        hi = tl.minimum(tl.load(KV_END + b * stride_endb).to(tl.int32), L_k)
    full_hi = hi  # keys below full_hi are visible to every row of this block
    q_pos = i  # (BLOCK_M,) key column of each query (only used when CAUSAL)
    if CAUSAL:
        off = causal_offset
        if OFFSET_IS_TENSOR:
            off = tl.load(OFFSET + b * stride_offb).to(tl.int32)
        q_pos = off + i
        i_min = tl.min(tl.where(row_ok, i, L_q), 0)
        i_max = tl.max(tl.where(row_ok, i, 0), 0)
        hi = tl.minimum(hi, off + i_max + 1)
        full_hi = tl.minimum(hi, off + i_min + 1)
        if WINDOW:  # keys before the window of the block's first query are never loaded; the rest is masked
            lo = tl.maximum(lo, off + i_min - window + 1)
            full_hi = lo
    if SPLIT:
        n_splits = tl.num_programs(2)  # split s holds keys [s * L_k // n, (s + 1) * L_k // n): none empty, +-1 key
        lo = tl.maximum(lo, split * L_k // n_splits)
        hi = tl.minimum(hi, (split + 1) * L_k // n_splits)
        full_hi = tl.minimum(full_hi, hi)
    n_full = tl.maximum(full_hi - lo, 0) // BLOCK_N
    mid = lo + n_full * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    acc, l_i, m_i = _attention_block_loop(
        acc, l_i, m_i, q, k_base, v_base, q_pos, lo, mid, window, stride_kn, stride_vn, qk_scale,
        CAUSAL, WINDOW, False, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_PRECISION, EMULATE_BF16,
    )  # fmt: skip
    acc, l_i, m_i = _attention_block_loop(
        acc, l_i, m_i, q, k_base, v_base, q_pos, mid, hi, window, stride_kn, stride_vn, qk_scale,
        CAUSAL, WINDOW, True, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_PRECISION, EMULATE_BF16,
    )  # fmt: skip

    # rows that saw no key: l = 0 -> output 0 (and log-sum-exp -inf for the merge)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]  # (BLOCK_M, D) fp32
    if SPLIT:
        # workspace (B * H_kv, n_rows, splits, BLOCK_D) and (B * H_kv, n_rows, splits): a row's partials are adjacent
        part = (pid_bh.to(tl.int64) * n_rows + rows) * tl.num_programs(2) + split  # (BLOCK_M,)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(LSE_PART + part, lse, mask=row_ok)
        tl.store(O_PART + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=row_ok[:, None])
    else:
        o_row = hq.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_om
        o_ptrs = Out + b.to(tl.int64) * stride_ob + o_row[:, None] + offs_d[None, :]
        if EMULATE_BF16:
            out = round_to_bf16(out)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attention_merge_kernel(
    # pointers
    Out,
    O_PART,
    LSE_PART,
    # sizes
    L_q,
    H_kv,
    GROUP,
    n_splits,
    # strides
    stride_ob,
    stride_oh,
    stride_om,
    # constexprs
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Merge the split-K partial outputs of BLOCK_R packed rows, BLOCK_S splits per load (online, by log-sum-exp).

    Each row's ``n_splits`` partials are adjacent in the workspace, so a step loads a ``(BLOCK_S, BLOCK_D)`` tile at
    once: a merge over 100+ splits (flash-decoding at batch 1) is a few wide loads, not a chain of dependent ones.
    Rows that saw no key in any split get 0.
    """
    await_producer(USE_PDL)
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_kv
    hk = pid_bh % H_kv
    n_rows = GROUP * L_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    row_end = tl.minimum((pid_r + 1) * BLOCK_R, n_rows)
    for r in range(pid_r * BLOCK_R, row_end):
        base = (pid_bh.to(tl.int64) * n_rows + r) * n_splits  # first partial of row r
        m_run = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)  # running max of the lse (scalar)
        total = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            s_ok = (s0 + offs_s) < n_splits
            lse = tl.load(LSE_PART + base + s0 + offs_s, mask=s_ok, other=float("-inf"))  # (BLOCK_S,)
            o_s = tl.load(
                O_PART + (base + s0 + offs_s)[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0
            )  # (BLOCK_S, BLOCK_D)
            m_new = tl.maximum(m_run, tl.max(lse, 0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: exp2(-inf) = 0, no NaN
            alpha = tl.exp2(m_run - shift)
            w = tl.exp2(lse - shift)  # (BLOCK_S,)
            acc = acc * alpha + tl.sum(w[:, None] * o_s, 0)
            total = total * alpha + tl.sum(w, 0)
            m_run = m_new
        out = acc / tl.where(total > 0.0, total, 1.0)  # (BLOCK_D,)
        i = r % L_q
        hq = hk * GROUP + r // L_q
        o_ptrs = Out + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_om + offs_d
        if EMULATE_BF16:
            out = round_to_bf16(out)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


@dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters of the attention kernel (block sizes, warps, pipeline stages, key splits)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int = 1


@dataclass(frozen=True)
class _Tile:
    """A register-safe key block, warps and most pipeline stages for one query block; ``regs`` bounds the registers
    per thread it compiled to (what the residency arithmetic uses)."""

    block_n: int
    num_warps: int
    regs: int
    max_stages: int = 3


# Register-safe tiles: padded head dim -> query block (block_m) -> tile. Registers are what breaks first: the fp32
# accumulator alone is block_m * BLOCK_D / (32 * warps) registers a thread, and at 255 ptxas spills (head dim 64 at
# 128 x 64 with 4 warps spilled 16-48 B on sm_80 / sm_89; head dim 128 at 128 x 64 with 8 warps 24-40 B). Each tile
# compiles without spills on sm_80, sm_86, sm_89 and sm_90 with Triton 3.6 and 3.9 at the seed shapes, in every
# kernel variant the models launch; ``regs`` is the most registers a thread measured there (rounded up to 8).
# ptxas sometimes holds an 8-warp kernel to 128 registers and spills 8-24 B (head dim 128: 64 x 32 at 3 stages on
# sm_86 / sm_89 with Triton 3.9, 32 x 64 on sm_90 with 3.6; head dim 256: 32 x 32): so the 64-row head-dim-128
# tile keeps 2 stages, 32-row blocks use 4 warps, and 8-warp launches name their register ceiling (_maxnreg).
# tests/test_kernel_fit.py recompiles a subset; ``dinfill bench --static --check`` the whole matrix.
_TILES_16BIT: dict[int, dict[int, _Tile]] = {
    64: {128: _Tile(64, 8, 200), 64: _Tile(32, 4, 184), 32: _Tile(64, 4, 136), 16: _Tile(64, 4, 120)},
    128: {64: _Tile(32, 8, 208, 2), 32: _Tile(32, 4, 176), 16: _Tile(64, 4, 184)},
    256: {64: _Tile(32, 8, 255, 2), 16: _Tile(32, 4, 176, 2)},
}
# sm_90 runs 64-row and larger blocks on warpgroup MMA (wgmma), which holds the accumulator in fewer registers:
# head dim 128 affords 128-row blocks there (244 registers with 8 warps, no spills, both Tritons). Head dim 64's
# 16-row blocks take 32-key blocks on sm_90: 16 x 64 at 3 stages spills 4 B at 80 registers with Triton 3.6's
# ptxas in the bidirectional variant over 64 keys (Open-dCoder's full canvas at length 64); 16 x 32 compiles to
# 72 there. Split decode keeps its 3 stages (its key blocks are 16-32 keys anyway).
_TILES_16BIT_SM90: dict[int, dict[int, _Tile]] = {
    64: {**_TILES_16BIT[64], 16: _Tile(32, 4, 120)},
    128: {128: _Tile(64, 8, 248), **_TILES_16BIT[128]},
}
# fp32 runs "ieee" dot products on the FMA units, whose operands and accumulator take far more registers, and ptxas
# spills a few bytes of most fp32 tiles somewhere (32-row blocks 8-480 B; 16 x 32 with 4 warps 8-16 B): fp32, a
# reference path rather than a speed one (not in issue 18's bf16 / fp16 matrix), runs 16 x 16 tiles on 8 warps.
# Clean with Triton 3.9 at head dims 64 and 128 on all four targets; Triton 3.6's ptxas still spills 8-12 B of head
# dim 128 on sm_80 / 86 / 89 (at 64 registers: a ptxas choice, not pressure), and head dim 256 4 B on sm_80.
_TILES_FP32: dict[int, dict[int, _Tile]] = {
    64: {16: _Tile(16, 8, 96, 2)},
    128: {16: _Tile(16, 8, 96, 2)},
    256: {16: _Tile(16, 8, 120, 1)},
}

_SMEM_MARGIN = 8 * 1024  # issue 18's fit rule: leave 8 KB of the per-block limit to what the estimate misses
_SPLIT_MIN_KEYS = 256  # issue 18: decode / window attention splits the key range from a 256-key cache on
_SPLIT_MIN_LEN = 16  # one tl.dot block: a shorter split leaves the tile empty, writes more partials than it reads
# The block-size model (see cuda_config): an SM is saturated by 8 resident warps (2 per scheduler, enough to overlap
# one warp's MMA with another's softmax); a key block costs about 32 rows' worth of work whatever block_m is (its K / V
# loads, the barrier and the pointer updates). Both are a model, not measurements: gpu_check calibrates them.
_SATURATING_WARPS = 8
_ROW_OVERHEAD = 32


def _tiles(block_d: int, dtype: torch.dtype, arch: int) -> dict[int, _Tile]:
    """The register-safe tiles for a padded head dim, dtype and compute capability."""
    if dtype == torch.float32:
        return _TILES_FP32[max(64, block_d)]
    if arch >= 90 and block_d in _TILES_16BIT_SM90:
        return _TILES_16BIT_SM90[block_d]
    return _TILES_16BIT[max(64, block_d)]


def _maxnreg(num_warps: int) -> int | None:
    """The register ceiling passed to ptxas (``.maxnreg``) for an attention launch of ``num_warps`` warps.

    Left to itself, ptxas (Triton 3.6's, for sm_80-89) holds some 8-warp variants to 128 registers, as if to fit
    two blocks on an SM, and spills (16 B in the 64 x 32 head-dim-128 tile over a bidirectional canvas) where
    160 registers would do; the tile tables already count on one 8-warp block per SM. So an 8-warp launch names
    the register file's share of a thread (65536 / 256 = 255 at most) as its ceiling: ptxas then takes what it
    needs. Fewer warps keep ptxas's own choice (it had no such cap there).
    """
    return min(255, 65536 // (32 * num_warps)) if num_warps >= 8 else None


def smem_estimate(block_m: int, block_n: int, block_d: int, stages: int, itemsize: int, arch: int) -> int:
    """Shared memory one program of the attention kernel uses, an upper bound: K / V buffers, the q tile, one p tile.

    Triton's software pipeline keeps ``stages - 1`` K and V buffers on sm_80 - sm_89 (one when unpipelined) and
    ``stages`` on sm_90; q and the probabilities of the second dot go through shared memory too, and 1 KB covers
    the cross-warp reduction scratch (64 B in fp32 at head dim 128). Measured with Triton 3.6 and 3.9 on sm_80 /
    86 / 89 / 90 over the seed shapes (2,720 launches), this bounds every compiled kernel, within 1 KB for most
    tiles on sm_8x (tests/test_kernel_fit.py compares it with the compiled kernels).
    """
    buffers = stages if arch >= 90 else max(1, stages - 1)
    return itemsize * (buffers * 2 * block_n * block_d + block_m * block_d + block_m * block_n) + 1024


def check_target(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> None:
    """Raise :class:`~dinfill.target.Unservable` now if the kernel cannot run on ``device``'s GPU at this dtype and
    head dim (below sm_80, or no tile fits its shared memory); nothing for the interpreter. For callers that
    want the refusal before a forward launches anything (the launcher itself raises before its own launch)."""
    target = target_for(device)
    if target is not None:
        cuda_config(1, 1, 1, 1, head_dim, dtype, target)


def pick_config(q: Tensor, k: Tensor) -> AttentionConfig:
    """Launch parameters for ``attention(q, k, v)`` from shapes and the target only, so CUDA graphs stay valid.

    On a GPU (or ``meta`` tensors under :func:`dinfill.target.static_target`) see :func:`cuda_config`. In the
    CPU interpreter, whose cost is per program and per operation rather than per element, one query block
    holds up to 64 packed rows (so a small problem is one program per (batch, KV head)) and 16-key blocks
    keep tests on small shapes crossing many key-block boundaries; bigger problems (more than 128 x 128
    packed rows x keys, e.g. whole-model runs through the interpreter) get 64-key blocks.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    rows = (Hq // Hkv) * Lq
    target = target_for(q.device)
    if target is None:
        block_n = 64 if rows * Lk > 128 * 128 else 16
        block_m = min(64, max(16, triton.next_power_of_2(rows)))
        return AttentionConfig(block_m=block_m, block_n=block_n, num_warps=4, num_stages=1)
    return cuda_config(B, Hkv, rows, Lk, D, q.dtype, target)


def _stages(block_m: int, block_n: int, block_d: int, itemsize: int, arch: int, budget: int, most: int) -> int:
    """Most pipeline stages (up to ``most``, then down to 1) whose shared memory fits ``budget``; 0 when none does."""
    fits = (s for s in range(most, 0, -1) if smem_estimate(block_m, block_n, block_d, s, itemsize, arch) <= budget)
    return next(fits, 0)


@functools.lru_cache(maxsize=256)  # a pure function, called per launch: tens of microseconds of host work otherwise
def cuda_config(B: int, Hkv: int, rows: int, Lk: int, D: int, dtype: torch.dtype, target: Target) -> AttentionConfig:
    """Launch parameters on ``target`` (a pure function of the shapes and the target: testable without a GPU).

    1. **Tiles that fit.** For each query block ``block_m`` the register-safe tile of ``_TILES*`` (key block,
       warps) gets the most pipeline stages (3, 2, 1) whose shared memory (:func:`smem_estimate`) stays 8 KB
       under the target's per-block limit. None fits, or a target below sm_80: :class:`Unservable`.
    2. **Key splits (flash-decoding).** Packed rows ``rows = Hq / Hkv * Lq`` give ``cdiv(rows, block_m) * B *
       Hkv`` programs; when that is fewer than the SMs and the cache holds at least 256 keys (decode and the
       diffusion window at small batch), the key range is split into enough parts for one program per SM,
       at most 128, each at least 16 keys (one key block) and at least ``2 * block_m / itemsize`` keys (so a
       split reads as many K / V bytes as it writes partial output). A second small launch merges the parts
       by their log-sum-exp. Where a split is possible, configurations that reach one program per SM come
       first.
    3. **Query block by predicted makespan.** Among the fitting ``block_m`` (up to the packed rows), take the
       one with the shortest busiest SM: it holds ``p = cdiv(programs, SMs)`` programs, of which
       ``c = min(p, resident)`` run at once (``Target.resident_blocks`` from the tile's registers, threads and
       shared memory); the SM runs at ``min(1, c * warps / 8)`` of its peak, and a program costs
       ``(block_m + 32) * keys``. So a 128-row block that leaves SMs idle gives way to smaller ones only
       where the smaller ones actually run side by side; ties keep the larger block (fewer K / V re-reads).
    """
    if target.arch < MIN_ARCH:
        raise Unservable(
            f"attention: {target.name} (sm_{target.arch}) is below sm_{MIN_ARCH}, which the Triton kernel needs "
            "(bf16 tensor-core dot products; older targets spill hundreds of bytes a thread); use DINFILL_BACKEND=torch"
        )
    block_d = max(16, triton.next_power_of_2(D))
    itemsize = dtype.itemsize
    budget = target.smem_per_block - _SMEM_MARGIN
    fitting = {}  # block_m -> (tile, stages)
    arch = target.arch
    for block_m, tile in _tiles(block_d, dtype, arch).items():
        stages = _stages(block_m, tile.block_n, block_d, itemsize, arch, budget, tile.max_stages)
        if stages:
            fitting[block_m] = (tile, stages)
    if not fitting:
        smallest = min(_tiles(block_d, dtype, arch).items())
        need = smem_estimate(smallest[0], smallest[1].block_n, block_d, 1, itemsize, arch)
        raise Unservable(
            f"attention: no launch configuration fits {target.name} (sm_{target.arch}) for head dim {D} in {dtype}: "
            f"the smallest tile needs {need} bytes of shared memory, the limit is {target.smem_per_block} bytes "
            f"minus {_SMEM_MARGIN} kept free; use DINFILL_BACKEND=torch"
        )
    cap = max(16, triton.next_power_of_2(rows))
    # split only where even 16-row blocks leave SMs idle (decode, the diffusion window at small batch): elsewhere
    # smaller query blocks fill the GPU without a merge launch and its partial-output traffic
    may_split = Lk >= _SPLIT_MIN_KEYS and triton.cdiv(rows, 16) * B * Hkv < target.sms
    best = None  # (fills a wave, -cost, block_m, config): the largest wins
    for block_m, (tile, stages) in fitting.items():
        if block_m > cap:
            continue
        programs = triton.cdiv(rows, block_m) * B * Hkv
        splits = 1
        if may_split:  # a split reads at least as many K / V bytes as it writes partial output (fp32, block_m rows)
            min_len = max(_SPLIT_MIN_LEN, 2 * block_m // itemsize)
            splits = max(1, min(triton.cdiv(target.sms, programs), Lk // min_len, _MAX_SPLITS))
        keys = triton.cdiv(Lk, splits)
        block_n = tile.block_n
        if splits > 1:  # short splits: the largest power-of-two key block that the split fills
            block_n = min(block_n, max(16, 1 << (keys.bit_length() - 1)))
            stages = _stages(block_m, block_n, block_d, itemsize, arch, budget, tile.max_stages)
        smem = smem_estimate(block_m, block_n, block_d, stages, itemsize, arch)
        resident = max(1, target.resident_blocks(32 * tile.num_warps, tile.regs, smem))
        per_sm = triton.cdiv(programs * splits, target.sms)
        rate = min(1.0, min(per_sm, resident) * tile.num_warps / _SATURATING_WARPS)
        cost = per_sm * (block_m + _ROW_OVERHEAD) * keys / rate
        full = may_split and programs * splits >= target.sms  # issue 18: decode / window launch a full wave
        key = (full, -cost, block_m)
        if best is None or key > best[0]:
            best = (key, AttentionConfig(block_m, block_n, tile.num_warps, stages, splits))
    return best[1]


def _is_int_tensor(t: Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def _check_inputs(q, k, v, causal_offset, kv_start, kv_end, scale, causal=False, window=None) -> None:
    """Validation shared by the Triton and torch paths: every message names the problem and the fix."""
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise TypeError(f"attention: window must be a positive int or None, got {window!r}")
        if not causal:
            raise ValueError("attention: a sliding window applies to causal attention only; pass causal=True")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"attention: {name} must be 4-D (B, H, L, D) like torch SDPA, got shape {tuple(t.shape)}; "
                "for (B, L, H, D) tensors pass x.transpose(1, 2)"
            )
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape (B, Hkv, Lk, D)")
    B, Hq, _, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch (dim 0) and head dim (dim 3)"
        )
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(
            f"attention: query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for grouped-query attention"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast first")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attention: dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not _is_int_tensor(t):
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"attention: {name} must be an integer tensor of shape (B,), got {got}")
        if tuple(t.shape) != (B,):
            raise ValueError(f"attention: {name} must have shape (B,) = ({B},), got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}; move it to q's device")
    if isinstance(causal_offset, Tensor):
        if not _is_int_tensor(causal_offset):
            raise TypeError(f"attention: causal_offset must be an integer tensor, got {causal_offset.dtype}")
        if causal_offset.dim() > 1 or causal_offset.numel() not in (1, B):
            raise ValueError(
                f"attention: causal_offset must be 0-dim, (1,) or (B,) = ({B},), got shape {tuple(causal_offset.shape)}"
            )
        if causal_offset.device != q.device:
            raise ValueError(
                f"attention: causal_offset is on {causal_offset.device} but q is on {q.device}; move it to q's "
                "device (a host tensor would need a copy, and a sync, every call)"
            )
    elif isinstance(causal_offset, bool) or not isinstance(causal_offset, int):
        got = type(causal_offset).__name__
        raise TypeError(f"attention: causal_offset must be an int or an integer tensor, got {got}")


def attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    causal_offset: int | Tensor = 0,
    kv_start: Tensor | None = None,
    kv_end: Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    config: AttentionConfig | None = None,
) -> Tensor:
    """Launch the Triton kernel (CUDA, or the interpreter with ``TRITON_INTERPRET=1``); see :func:`attention`.

    ``config`` overrides the heuristic launch parameters of :func:`pick_config` (tests use it to
    exercise other block sizes and the split-K path on small shapes).
    """
    _check_inputs(q, k, v, causal_offset, kv_start, kv_end, scale, causal, window)
    return _launch(q, k, v, causal, causal_offset, kv_start, kv_end, scale, window, config)


def _launch(q, k, v, causal, causal_offset, kv_start, kv_end, scale, window, config) -> Tensor:
    """Kernel-specific checks (device, head dim, config) and the launch, on inputs _check_inputs accepted."""
    if not compiled_target(q.device) and not triton_interpreted():
        raise RuntimeError(
            f"attention: tensors are on {q.device.type}; the Triton kernel needs CUDA, or TRITON_INTERPRET=1 "
            "set before triton is imported (slow), or call attention() with DINFILL_BACKEND=torch"
        )
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if not 1 <= D <= _MAX_HEAD_DIM:
        raise ValueError(
            f"attention: head dim {D} is not supported by the Triton kernel (1 to {_MAX_HEAD_DIM}); "
            "use DINFILL_BACKEND=torch"
        )
    if q.numel() == 0:
        return _empty_like_layout(q)
    cfg = pick_config(q, k) if config is None else config  # before any device work: Unservable raises here
    if cfg.block_m < 16 or cfg.block_n < 16 or cfg.num_splits < 1:
        raise ValueError(f"attention: config {cfg} needs block_m, block_n >= 16 (tl.dot) and num_splits >= 1")
    # the kernel vectorises along D: only a non-unit stride there forces a copy
    q, k, v = (t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in (q, k, v))
    out = _empty_like_layout(q)  # (B, Hq, Lq, D)

    block_d = max(16, triton.next_power_of_2(D))
    group = Hq // Hkv
    rows = group * Lq
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    offset_is_tensor = isinstance(causal_offset, Tensor)
    offset_t = causal_offset if offset_is_tensor else q  # q: placeholder pointer, never read
    per_batch = offset_is_tensor and causal_offset.dim() == 1 and causal_offset.numel() == B
    stride_offb = causal_offset.stride(0) if per_batch else 0  # 0-dim and (1,) offsets broadcast
    # splits of equal length (+-1 key; a split need not start on a block boundary), at least one key each
    num_splits = max(1, min(cfg.num_splits, Lk))
    if num_splits > 1:
        o_part = torch.empty(B * Hkv, rows, num_splits, block_d, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(B * Hkv, rows, num_splits, device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = out  # placeholders, never touched when SPLIT is False
    emulate = emulate_bf16(q)
    # the window matters only if some query sits at least `window` columns after column 0
    use_window = bool(causal) and window is not None and (offset_is_tensor or int(causal_offset) + Lq - 1 >= window)
    grid = (triton.cdiv(rows, cfg.block_m), B * Hkv, num_splits)
    pdl = pdl_args(q.device)
    with device_context(q):
        _attention_kernel[grid](
            q, k, v, out, offset_t,
            kv_start if kv_start is not None else q,
            kv_end if kv_end is not None else q,
            o_part, lse_part,
            Lq, Lk, Hkv, group, 0 if offset_is_tensor else int(causal_offset),
            int(window) if use_window else 0, scale * _LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            stride_offb,
            kv_start.stride(0) if kv_start is not None else 0,
            kv_end.stride(0) if kv_end is not None else 0,
            CAUSAL=bool(causal), WINDOW=use_window, OFFSET_IS_TENSOR=offset_is_tensor,
            HAS_KV_START=kv_start is not None, HAS_KV_END=kv_end is not None, SPLIT=num_splits > 1,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=D, BLOCK_D=block_d,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 or emulate else "tf32", EMULATE_BF16=emulate,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=_maxnreg(cfg.num_warps), **pdl,
        )  # fmt: skip
        if num_splits > 1:
            # one row per program on a GPU (the merge is a few wide loads per row); in the interpreter, whose cost is
            # per program, all rows of a (batch, KV head)
            merge_rows = rows if target_for(q.device) is None else 1
            _attention_merge_kernel[(triton.cdiv(rows, merge_rows), B * Hkv)](
                out, o_part, lse_part,
                Lq, Hkv, group, num_splits,
                out.stride(0), out.stride(1), out.stride(2),
                BLOCK_R=merge_rows, BLOCK_S=min(32, triton.next_power_of_2(num_splits)), HEAD_DIM=D, BLOCK_D=block_d,
                EMULATE_BF16=emulate, num_warps=4, **pdl,
            )  # fmt: skip
    return out


def _empty_like_layout(q: Tensor) -> Tensor:
    """Uninitialised ``(B, Hq, Lq, D)`` output laid out like q: ``(B, L, H, D)`` memory when q is a transposed view."""
    B, Hq, Lq, D = q.shape
    if Hq > 1 and Lq > 1 and q.stride(1) < q.stride(2):
        return torch.empty(B, Lq, Hq, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    return torch.empty(B, Hq, Lq, D, device=q.device, dtype=q.dtype)


def _attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    causal_offset: int | Tensor,
    kv_start: Tensor | None,
    kv_end: Tensor | None,
    scale: float | None,
    window: int | None = None,
) -> Tensor:
    """The same contract on torch SDPA (``DINFILL_BACKEND=torch`` or no CUDA): boolean mask, zeroed empty rows."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if q.numel() == 0:
        return torch.empty_like(q)
    if Lk == 0:
        return torch.zeros_like(q)
    dev = q.device
    mask = None
    if causal or kv_start is not None or kv_end is not None:
        cols = torch.arange(Lk, device=dev).view(1, 1, Lk)  # (1, 1, Lk)
        mask = torch.ones(B, 1, Lk, dtype=torch.bool, device=dev)  # (B, 1, Lk)
        if kv_start is not None:
            mask = mask & (cols >= kv_start.view(B, 1, 1))
        if kv_end is not None:
            mask = mask & (cols < kv_end.view(B, 1, 1))
        if causal:
            off = torch.as_tensor(causal_offset, device=dev).reshape(-1, 1, 1)  # (B or 1, 1, 1)
            q_pos = off + torch.arange(Lq, device=dev).view(1, Lq, 1)  # (B|1, Lq, 1)
            mask = mask & (cols <= q_pos)  # (B, Lq, Lk)
            if window is not None:
                mask = mask & (cols > q_pos - window)
        mask = mask.expand(B, Lq, Lk).unsqueeze(1)  # (B, 1, Lq, Lk)
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Lk, D)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, Hq, Lq, D)
    if mask is not None:
        out = torch.where(mask.any(dim=-1, keepdim=True), out, 0.0)  # rows with no visible key: 0, not NaN
    return out


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    causal_offset: int | Tensor = 0,
    kv_start: Tensor | None = None,
    kv_end: Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
) -> Tensor:
    """Scaled dot-product attention with grouped-query heads, key ranges and a causal offset (contract).

    Runs the Triton kernel when :func:`dinfill.backend.use_triton` says so (CUDA by default; the
    interpreter with ``DINFILL_BACKEND=triton TRITON_INTERPRET=1``) and torch SDPA otherwise.

    Parameters
    ----------
    q : Tensor
        ``(B, Hq, Lq, D)`` queries, fp16 / bf16 / fp32; any strides with a unit stride on D.
    k, v : Tensor
        ``(B, Hkv, Lk, D)`` keys and values, same dtype and device; query head ``h`` reads
        key/value head ``h // (Hq // Hkv)``.
    causal : bool
        Query ``i`` sits at key column ``causal_offset + i`` and sees keys at columns ``<=`` it.
    causal_offset : int or Tensor
        Key column of query 0: an int, or an integer 0-dim / ``(1,)`` / ``(B,)`` tensor on q's
        device, read inside the kernel (no host sync; a CUDA graph can replay it with new values).
    kv_start, kv_end : Tensor, optional
        ``(B,)`` integer tensors on q's device: only keys ``kv_start[b] <= j < kv_end[b]`` are
        visible (left / right padding); values outside ``[0, Lk]`` are clamped. Default: all keys.
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.
    window : int, optional
        Sliding window (Starcoder2), causal only: a query at column ``p`` sees keys ``p - window < j <= p``.

    Returns
    -------
    Tensor
        ``(B, Hq, Lq, D)`` in q's dtype; rows that see no key are zeros.
    """
    _check_inputs(q, k, v, causal_offset, kv_start, kv_end, scale, causal, window)
    if use_triton(q.device):
        return _launch(q, k, v, causal, causal_offset, kv_start, kv_end, scale, window, None)
    kwargs = dict(causal=causal, causal_offset=causal_offset, kv_start=kv_start, kv_end=kv_end, scale=scale)
    return _attention_torch(q, k, v, window=window, **kwargs)
