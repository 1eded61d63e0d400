"""One diffusion step after the model: logits rows -> sampled tokens + confidences -> chosen positions.

Why a fused op: the reference sampler spends a step in ~20 passes over the ``(N, V)`` logits (a full
sort per row for top-p, softmax, multinomial, a second sort for the margin, topk over the canvas)
and syncs the host several times. Here a step is two kernel launches and no host sync, so a whole
step can be captured in a CUDA graph:

1. ``_fused_step_row_kernel``: one program per logits row streams the vocabulary in blocks. Pass A
   keeps an online max / first argmax / second max / sum of ``exp``. Rows with top-p or top-k run a
   threshold search (pass B, below); rows that sample or want ``neg_entropy`` read the row once
   more (pass C) for Gumbel-max over the kept tokens and the entropy. It writes the row's token,
   confidence, selection key and mask state to ``(N,)`` scratch vectors, never ``(N, V)`` ones.
2. ``_fused_step_select_kernel``: one program per (sequence, block of rows) ranks the rows of its
   sequence (key descending, or ascending for ``p2``; ties to the lowest position), turns counts
   or fractions into a number of positions, and writes the chosen ids into ``x`` in place.

Exact top-p without a sort. Token ``i`` survives top-p iff the probability mass of the tokens with
a strictly larger logit is ``<= top_p`` (the reference's "cumulative sum shifted right by one"
with ties kept), and top-k iff fewer than ``k`` tokens are strictly larger. Both predicates are
monotone in the logit, so the kept set is ``{z > lo}`` for one cut value ``lo``. Pass B finds it
by a multi-pivot search over the row: every sweep evaluates 16 pivots at once (8 spread evenly in
value, 8 evenly in the order-preserving integer image of fp32, which bounds the worst case to
about 11 sweeps) and also records, per pivot, the smallest logit above it, so the next sweep
starts at an actual data value and the search ends exactly when that value passes.

Supports
    bf16 / fp16 / fp32 logits ``(N, V)`` or ``(B, M, V)`` with any row strides (unit stride along
    ``V``), any ``V`` (not a block multiple), per-row or scalar temperature / top-p / top-k,
    confidences ``prob`` / ``margin`` / ``neg_entropy``, selections ``topk`` (count or fraction,
    optional Gumbel-perturbed ranking ``alg_temp``), ``threshold``, ``factor``, ``p2``, ``bernoulli``,
    a ``torch.Generator`` or device-resident ``seed`` / ``offset`` tensors (CUDA-graph friendly).
    ``DINFILL_BACKEND`` picks the Triton kernels or the vectorised torch path (same semantics).
Limitations
    One program per row: with very few rows and a huge vocabulary the GPU is under-used. Rows
    with top-p / top-k read their logits ``2 + (search sweeps)`` times (from L2 when it fits).
    Logits must be finite or ``-inf`` after the temperature division, and a row needs at least
    one finite logit (NaN rows give an unspecified token). Positions must be unique within a
    sequence. Samples are exact in distribution, but the Triton and torch paths draw different
    random streams, so they agree on sampled tokens only statistically.
Differences from the reference
    Logits are upcast to fp32 *before* the temperature division and the top-p cumulative sum is
    fp32 (the reference does both in bf16 for bf16 logits). Greedy picks the argmax of the
    filtered fp32 logits, lowest id on ties (the reference takes the argmax of the probabilities,
    which only differs when distinct logits round to the same fp32 probability). Ties in the
    top-p cut are kept. Selection ties go to the lowest canvas position. ``alg_temp`` ranks by
    ``conf / alg_temp + Gumbel`` (the reference samples without replacement from
    ``softmax(conf / alg_temp)``: the same distribution). Top-p membership near an exact boundary
    may differ from a sort + cumsum by fp32 summation order.
"""

import contextlib
import math
import types

import torch
from torch import Tensor

from dinfill.backend import use_triton

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # triton is Linux-only; keep the torch path importable elsewhere
    triton = None
    tl = types.SimpleNamespace(constexpr=None)

    def _jit(fn):
        return fn


__all__ = ["fused_step", "CONFIDENCES", "SELECTIONS"]

CONFIDENCES = ("prob", "margin", "neg_entropy")
SELECTIONS = ("topk", "threshold", "factor", "p2", "bernoulli")
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Launch tunables (module attributes so tests can shrink them to exercise the block loops).
MAX_BLOCK_V = 4096  # streaming block of passes A and C: 8 KiB of bf16 per load
MAX_BLOCK_S = 512  # block of the search sweeps, which hold a (BLOCK_S, 16) pivot tile
BLOCK_ROWS = 64  # rows per program in the selection kernel (a (64, 64) rank tile)
_PIVOTS_VALUE = 8
_PIVOTS_KEY = 8
_ROW_NOISE_COUNTER = tl.constexpr(1 << 30) if triton is not None else 1 << 30
_MAX_SWEEPS = 48  # > 32 / log2(8) + slack: the integer-key pivots alone end the search by then
_TORCH_CANDIDATES = 1024  # torch path: sort only this many of a row's largest logits when its cut lies there


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


@_jit
def _fused_step_row_kernel(
    # pointers
    logits_ptr,
    x_ptr,
    pos_ptr,
    temp_ptr,
    top_p_ptr,
    top_k_ptr,
    seed_ptr,
    offset_ptr,
    conf_ptr,
    key_ptr,
    tok_ptr,
    state_ptr,
    # sizes and scalar parameters
    V,
    M,
    L,
    mask_id,
    temp_val,
    top_p_val,
    top_k_val,
    alg_temp,
    # strides
    stride_lb,
    stride_lm,
    stride_xb,
    stride_xl,
    stride_pb,
    stride_pm,
    stride_t,
    stride_tp,
    stride_tk,
    # constexprs
    CONFIDENCE: tl.constexpr,  # 0 prob, 1 margin, 2 neg_entropy
    TEMP_MODE: tl.constexpr,  # 0 greedy everywhere, 1 scalar > 0, 2 per-row tensor
    TOP_P_MODE: tl.constexpr,  # 0 off, 1 scalar, 2 per-row tensor
    TOP_K_MODE: tl.constexpr,  # 0 off, 1 scalar, 2 per-row tensor
    NOISE: tl.constexpr,  # selection key: 0 the confidence, 1 conf / alg_temp + Gumbel, 2 a uniform
    BLOCK_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PV: tl.constexpr,
    PK: tl.constexpr,
    MAX_SWEEPS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // M
    m = row - b * M
    pos = tl.load(pos_ptr + b * stride_pb + m * stride_pm).to(tl.int64)
    valid = (pos >= 0) & (pos < L)
    cur = tl.load(x_ptr + b * stride_xb + pos * stride_xl, mask=valid, other=0)
    state = tl.where(valid, tl.where(cur == mask_id, 2, 1), 0)  # 0 padding, 1 fixed token, 2 mask
    tl.store(state_ptr + row, state.to(tl.int8))

    conf = float("-inf")
    sel_key = float("-inf")
    x0 = tl.full((), 0, dtype=tl.int64)
    if valid:
        row_ptr = logits_ptr + b * stride_lb + m * stride_lm
        # per-row sampling parameters
        if TEMP_MODE == 2:
            t = tl.load(temp_ptr + row * stride_t).to(tl.float32)
        else:
            t = temp_val
        sampling = t > 0
        t_safe = tl.where(sampling, t, 1.0)
        if TOP_P_MODE == 2:
            top_p = tl.maximum(tl.load(top_p_ptr + row * stride_tp).to(tl.float32), 0.0)  # < 0 acts as 0
        elif TOP_P_MODE == 1:
            top_p = top_p_val
        else:
            top_p = 2.0
        if TOP_K_MODE == 2:
            k = tl.load(top_k_ptr + row * stride_tk).to(tl.int64)
        elif TOP_K_MODE == 1:
            k = tl.full((), 0, dtype=tl.int64) + top_k_val
        else:
            k = tl.full((), 0, dtype=tl.int64)
        k_limit = tl.where(k > 0, k - 1, V)  # a token stays while fewer than k tokens are larger
        filtered = (top_p < 1.0) | (k > 0)

        # ---- pass A: per-lane running max / first argmax / second max / sum of exp; one reduction at the end ----
        # Lane j sees columns j, j + BLOCK_V, ...; keeping its statistics element-wise avoids a cross-thread
        # reduction per block. One exp per element: either the new value or the old running max is the max.
        lane = tl.arange(0, BLOCK_V)
        m_vec = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
        s_vec = tl.full((BLOCK_V,), 0.0, dtype=tl.float32)
        i_vec = tl.full((BLOCK_V,), 0, dtype=tl.int32)
        if CONFIDENCE == 1:
            m2_vec = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
        if TOP_P_MODE + TOP_K_MODE != 0:
            min_vec = tl.full((BLOCK_V,), float("inf"), dtype=tl.float32)
            fin_vec = tl.full((BLOCK_V,), 0, dtype=tl.int32)
        for start in range(0, V, BLOCK_V):
            cols = start + lane
            z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)  # (BLOCK_V,)
            if TEMP_MODE != 0:
                z = tl.where(sampling, tl.math.div_rn(z, t_safe), z)  # IEEE division, like torch
            up = z > m_vec  # strict: the lane keeps its earliest column on a tie
            m_ref = tl.where(m_vec == float("-inf"), 0.0, m_vec)  # a lane with nothing yet: s_vec is 0 anyway
            e = tl.where(z == float("-inf"), 0.0, tl.exp(-tl.abs(z - m_ref)))
            s_vec = tl.where(up, s_vec * e + 1.0, s_vec + e)
            if CONFIDENCE == 1:
                m2_vec = tl.where(up, m_vec, tl.maximum(m2_vec, z))
            i_vec = tl.where(up, cols, i_vec)
            m_vec = tl.maximum(m_vec, z)
            if TOP_P_MODE + TOP_K_MODE != 0:
                min_vec = tl.minimum(min_vec, tl.where(z > float("-inf"), z, float("inf")))
                fin_vec += (z > float("-inf")).to(tl.int32)
        m1 = tl.max(m_vec, axis=0)
        i1 = tl.min(tl.where(m_vec == m1, i_vec, V), axis=0).to(tl.int64)  # lowest column holding the max
        m_safe = tl.where(m1 == float("-inf"), 0.0, m1)  # an all -inf row: avoid inf - inf
        z_sum = tl.sum(tl.where(m_vec == float("-inf"), 0.0, s_vec * tl.exp(m_vec - m_safe)), axis=0)
        m2 = float("-inf")
        if CONFIDENCE == 1:  # second largest with multiplicity: other lanes' maxima and every lane's second
            winner = (m_vec == m1) & (i_vec == i1)
            m2 = tl.maximum(tl.max(m2_vec, axis=0), tl.max(tl.where(winner, float("-inf"), m_vec), axis=0))
        z_min = float("inf")
        n_finite = tl.full((), 0, dtype=tl.int64)
        if TOP_P_MODE + TOP_K_MODE != 0:
            z_min = tl.min(min_vec, axis=0)
            n_finite = tl.sum(fin_vec, axis=0).to(tl.int64)

        # ---- pass B: the cut `lo` of the top-p / top-k filter; kept tokens are {z > lo} ----
        lo = float("-inf")
        kept_sum = z_sum  # sum of exp(z - m1) over the kept tokens
        if TOP_P_MODE + TOP_K_MODE != 0:
            # invariant: pivot `lo` fails, `hi` passes, `succ` is the smallest logit above `lo`
            done = ((~filtered) | (n_finite == 0) | ((top_p >= 1.0) & (n_finite <= k_limit))).to(tl.int32)
            hi = m1
            succ = z_min
            j = tl.arange(0, PV + PK)
            sweeps = tl.full((), 0, dtype=tl.int32)
            while (done == 0) & (sweeps < MAX_SWEEPS):
                # pivot 0 is `succ` itself; the others spread over [succ, hi) in value and in key
                frac = j.to(tl.float32) / PV
                piv_value = succ * (1.0 - frac) + hi * frac  # (P,) no overflow for huge ranges; pivot 0 = succ
                # order-preserving int image of fp32 (flip the magnitude bits of negatives), in int64
                b_lo = succ.to(tl.int32, bitcast=True)
                b_hi = hi.to(tl.int32, bitcast=True)
                k_lo = tl.where(b_lo >= 0, b_lo, b_lo ^ 0x7FFFFFFF).to(tl.int64)
                k_hi = tl.where(b_hi >= 0, b_hi, b_hi ^ 0x7FFFFFFF).to(tl.int64)
                k_piv = (k_lo + ((k_hi - k_lo) * (j - PV).to(tl.int64)) // PK).to(tl.int32)  # (P,)
                piv_key = tl.where(k_piv >= 0, k_piv, k_piv ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
                piv = tl.where(j < PV, piv_value, piv_key)  # (P,)
                mass = tl.full((PV + PK,), 0, dtype=tl.float32)
                above = tl.full((PV + PK,), 0, dtype=tl.int64)
                nxt = tl.full((PV + PK,), float("inf"), dtype=tl.float32)
                for start in range(0, V, BLOCK_S):
                    cols = start + tl.arange(0, BLOCK_S)
                    z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)  # (BLOCK_S,)
                    if TEMP_MODE != 0:
                        z = tl.where(sampling, tl.math.div_rn(z, t_safe), z)
                    e = tl.exp(z - m1)
                    gt = z[:, None] > piv[None, :]  # (BLOCK_S, P)
                    mass += tl.sum(tl.where(gt, e[:, None], 0.0), axis=0)
                    if TOP_K_MODE != 0:
                        above += tl.sum(gt.to(tl.int64), axis=0)
                    nxt = tl.minimum(nxt, tl.min(tl.where(gt, z[:, None], float("inf")), axis=0))
                ok = (mass / z_sum <= top_p) & (above <= k_limit)  # (P,)
                if tl.sum(((j == 0) & ok).to(tl.int32), axis=0) > 0:
                    done = tl.full((), 1, dtype=tl.int32)  # succ passes: the cut is exactly at lo
                else:
                    fail = ~ok
                    lo = tl.max(tl.where(fail, piv, float("-inf")), axis=0)
                    kept_sum = tl.min(tl.where(fail, mass, float("inf")), axis=0)
                    succ = tl.max(tl.where(fail, nxt, float("-inf")), axis=0)
                    hi = tl.minimum(hi, tl.min(tl.where(ok, piv, float("inf")), axis=0))
                sweeps += 1

        # ---- pass C: Gumbel-max over the kept tokens and/or the entropy of the kept distribution ----
        seed = tl.load(seed_ptr)
        offset = tl.load(offset_ptr)
        # Philox counter (c0, row, offset_lo, offset_hi): column c takes output c % 4 of counter c0 = c // 4,
        # so its noise does not depend on BLOCK_V; c0 = 2**30 (beyond any vocabulary) is the row's own noise
        q = tl.arange(0, BLOCK_V // 4)
        c1 = q.to(tl.uint32) * 0 + row.to(tl.uint32)
        c2 = q.to(tl.uint32) * 0 + (offset & 0xFFFFFFFF).to(tl.uint32)
        c3 = q.to(tl.uint32) * 0 + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
        c2_row = tl.full((2,), 0, dtype=tl.uint32) + (offset & 0xFFFFFFFF).to(tl.uint32)
        c3_row = tl.full((2,), 0, dtype=tl.uint32) + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
        x0 = i1
        z_x0 = m1
        entropy = 0.0
        best = float("-inf")
        if CONFIDENCE == 2:
            final_pass = valid
        else:
            final_pass = sampling
        if (TEMP_MODE != 0) | (CONFIDENCE == 2):
            if final_pass:
                for start in range(0, V, BLOCK_V):
                    cols = start + tl.arange(0, BLOCK_V)
                    z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)  # (BLOCK_V,)
                    if TEMP_MODE != 0:
                        z = tl.where(sampling, tl.math.div_rn(z, t_safe), z)
                    kept = z > lo
                    if CONFIDENCE == 2:
                        p = tl.exp(z - m1) / kept_sum
                        entropy += tl.sum(tl.where(kept, p * tl.log(tl.maximum(p, 1e-10)), 0.0), axis=0)
                    if TEMP_MODE != 0:
                        if sampling:
                            r0, r1, r2, r3 = tl.philox(seed, (start // 4 + q).to(tl.uint32), c1, c2, c3)
                            bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_V,))  # 4q+k <- r_k
                            bits = bits.to(tl.int32, bitcast=True)
                            u = tl.where(bits < 0, ~bits, bits).to(tl.float32) * 4.6566127342e-10  # [0, 1)
                            noisy = tl.where(kept, z - tl.log(-tl.log(u)), float("-inf"))
                            bs = tl.max(noisy, axis=0)
                            bi = tl.min(tl.where(noisy == bs, cols, V), axis=0).to(tl.int64)
                            better = bs > best
                            x0 = tl.where(better, bi, x0)
                            z_x0 = tl.where(better, tl.max(tl.where(cols == bi, z, float("-inf")), axis=0), z_x0)
                            best = tl.maximum(best, bs)

        # ---- confidence of the fresh sample and the selection key ----
        if CONFIDENCE == 0:
            conf = tl.exp(z_x0 - m1) / kept_sum
        elif CONFIDENCE == 1:
            p_second = tl.where(m2 > lo, tl.exp(m2 - m1) / kept_sum, 0.0)
            conf = 1.0 / kept_sum - p_second
        else:
            conf = entropy
        # no finite logit (max is -inf, sums are 0): confidence -inf, never NaN/inf, so the ranks stay sane
        conf = tl.where((m1 > float("-inf")) & (conf == conf), conf, float("-inf"))
        sel_key = conf
        if NOISE != 0:
            two = tl.arange(0, 2).to(tl.uint32)
            r0, _, _, _ = tl.philox(seed, two * 0 + _ROW_NOISE_COUNTER, two * 0 + row.to(tl.uint32), c2_row, c3_row)
            bits = r0.to(tl.int32, bitcast=True)
            u_row = tl.max(tl.where(two == 0, tl.where(bits < 0, ~bits, bits).to(tl.float32) * 4.6566127342e-10, 0.0))
            if NOISE == 1:
                sel_key = conf / alg_temp - tl.log(-tl.log(u_row))
            else:
                sel_key = u_row
    tl.store(conf_ptr + row, conf)
    tl.store(tok_ptr + row, x0)
    if NOISE != 0:
        tl.store(key_ptr + row, sel_key)


@_jit
def _fused_step_select_kernel(
    # pointers
    x_ptr,
    pos_ptr,
    key_ptr,
    tok_ptr,
    state_ptr,
    count_ptr,
    frac_ptr,
    # sizes and scalar parameters
    M,
    mask_id,
    count_val,
    frac_val,
    tau,
    factor,
    # strides
    stride_xb,
    stride_xl,
    stride_pb,
    stride_pm,
    stride_c,
    stride_f,
    # constexprs
    SELECT: tl.constexpr,  # 0 topk, 1 threshold, 2 factor, 3 p2, 4 bernoulli
    COUNT_MODE: tl.constexpr,  # 0 none, 1 count tensor, 2 count scalar, 3 fraction scalar, 4 fraction tensor
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    mi = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_i = mi < M
    ri = b * M + mi  # (BLOCK_I,) flat row ids
    st_i = tl.load(state_ptr + ri, mask=in_i, other=0)
    if SELECT == 3:
        member_i = st_i > 0  # p2: every row is a variable position
    else:
        member_i = st_i == 2  # only rows that are masks right now
    key_i = tl.load(key_ptr + ri, mask=in_i, other=float("-inf"))
    pos_i = tl.load(pos_ptr + b * stride_pb + mi * stride_pm, mask=in_i, other=-1).to(tl.int64)

    # number of members of the sequence and the rank of each of our rows among them
    n = tl.full((), 0, dtype=tl.int32)
    rank = tl.full((BLOCK_I,), 0, dtype=tl.int32)
    for j0 in range(0, M, BLOCK_J):
        mj = j0 + tl.arange(0, BLOCK_J)
        in_j = mj < M
        st_j = tl.load(state_ptr + b * M + mj, mask=in_j, other=0)
        if SELECT == 3:
            member_j = st_j > 0
        else:
            member_j = st_j == 2
        n += tl.sum(member_j.to(tl.int32), axis=0)
        if SELECT != 4:
            key_j = tl.load(key_ptr + b * M + mj, mask=in_j, other=float("-inf"))
            pos_j = tl.load(pos_ptr + b * stride_pb + mj * stride_pm, mask=in_j, other=-1).to(tl.int64)
            tie = (key_j[None, :] == key_i[:, None]) & (pos_j[None, :] < pos_i[:, None])  # (BLOCK_I, BLOCK_J)
            if SELECT == 3:
                ahead = (key_j[None, :] < key_i[:, None]) | tie  # least confident first
            else:
                ahead = (key_j[None, :] > key_i[:, None]) | tie  # most confident first
            rank += tl.sum((ahead & member_j[None, :]).to(tl.int32), axis=1)

    # how many positions: a count, or trunc(fp32(n) * fraction) in fp32 like the reference
    if COUNT_MODE == 1:
        cnt = tl.load(count_ptr + b * stride_c).to(tl.int32)
    elif COUNT_MODE == 2:
        cnt = tl.full((), 0, dtype=tl.int32) + count_val
    elif COUNT_MODE == 3:
        cnt = tl.minimum(n.to(tl.float32) * frac_val, n.to(tl.float32)).to(tl.int32)
    elif COUNT_MODE == 4:
        frac = tl.load(frac_ptr + b * stride_f).to(tl.float32)
        cnt = tl.minimum(n.to(tl.float32) * frac, n.to(tl.float32)).to(tl.int32)
    else:
        cnt = n
    cnt = tl.maximum(tl.minimum(cnt, n), 0)

    tok_i = tl.load(tok_ptr + ri, mask=in_i, other=0)
    value = tok_i
    if SELECT == 0:
        write = member_i & (rank < cnt)
    elif SELECT == 1:
        write = member_i & ((key_i >= tau) | (rank == 0))
    elif SELECT == 2:
        # Fast-dLLM: the n-th most confident (1-based) needs conf >= 1 - f / (n + 1); at least one
        bound = 1.0 - tl.math.div_rn(tl.full((BLOCK_I,), 0, dtype=tl.float32) + factor, (rank + 2).to(tl.float32))
        write = member_i & ((rank == 0) | (key_i >= bound))
    elif SELECT == 3:
        remask = member_i & (rank < cnt)
        value = tl.where(remask, mask_id, tok_i)
        write = remask | (member_i & (st_i == 2))
    else:
        if COUNT_MODE == 4:
            prob = tl.load(frac_ptr + b * stride_f).to(tl.float32)
        else:
            prob = frac_val
        write = member_i & (key_i < prob)
    tl.store(x_ptr + b * stride_xb + pos_i * stride_xl, value, mask=write & in_i)


# --------------------------------------------------------------------------------------------------
# launcher (Triton path)
# --------------------------------------------------------------------------------------------------


def _mode(value, scalar_mode: int = 1) -> tuple[int, Tensor | None, float | int, int]:
    """(mode, tensor, scalar, stride) of a per-row or scalar kernel parameter (mode 0: absent)."""
    if isinstance(value, Tensor):
        return 2, value, 0, (value.stride(0) if value.dim() == 1 else 0)
    if value is None:
        return 0, None, 0, 0
    return scalar_mode, None, value, 0


def fused_step_triton(
    logits: Tensor,
    x: Tensor,
    positions: Tensor,
    *,
    mask_id: int,
    select: str,
    confidence: str,
    temperature: float | Tensor,
    top_p: float | Tensor | None,
    top_k: int | Tensor | None,
    count: int | Tensor | None,
    fraction: float | Tensor | None,
    threshold: float,
    factor: float,
    alg_temp: float,
    seed: Tensor | None,
    offset: Tensor | None,
) -> Tensor:
    """Launch the two kernels. Arguments as in :func:`fused_step`, already validated by it.

    ``seed`` / ``offset`` must be set (1-element int64 tensors on ``x.device``) whenever the call
    samples, uses ``alg_temp`` or ``select="bernoulli"``.
    """
    if triton is None:
        raise RuntimeError("fused_step_triton needs triton; install it or set DINFILL_BACKEND=torch")
    if logits.stride(-1) != 1:
        raise ValueError("fused_step: logits need unit stride along the vocabulary; pass logits.contiguous()")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"fused_step: the Triton path runs on CUDA (or the CPU interpreter), not {x.device}")
    if logits.dtype not in _FLOAT_DTYPES or x.dtype != torch.int64 or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"fused_step: got logits {logits.dtype}, x {x.dtype}, positions {positions.dtype}; "
            "need bf16/fp16/fp32 logits, an int64 canvas and int32/int64 positions"
        )
    if not (logits.device == x.device == positions.device):
        raise ValueError("fused_step: logits, x and positions must be on one device; move them together")
    B, L = x.shape
    M = positions.shape[1]
    V = logits.shape[-1]
    N = B * M
    if logits.dim() == 3:
        stride_lb, stride_lm = logits.stride(0), logits.stride(1)
    else:
        stride_lb, stride_lm = M * logits.stride(0), logits.stride(0)

    conf = torch.empty(N, dtype=torch.float32, device=x.device)
    tok = torch.empty(N, dtype=torch.int64, device=x.device)
    state = torch.empty(N, dtype=torch.int8, device=x.device)
    noise = 1 if (select == "topk" and alg_temp > 0) else 2 if select == "bernoulli" else 0
    key = torch.empty_like(conf) if noise else conf
    if seed is None:  # nothing random in this call: any readable int64 will do
        seed = offset = tok

    temp_mode, temp_t, temp_val, stride_t = _mode(temperature)
    if temp_mode == 1 and temp_val <= 0:
        temp_mode = 0
    top_p_mode, top_p_t, top_p_val, stride_tp = _mode(top_p)
    if top_p_mode == 1 and top_p_val >= 1:
        top_p_mode = 0
    top_k_mode, top_k_t, top_k_val, stride_tk = _mode(top_k)
    if top_k_mode == 1 and top_k_val <= 0:
        top_k_mode = 0

    if isinstance(count, Tensor):
        count_mode, stride_c = 1, (count.stride(0) if count.dim() == 1 else 0)
    elif count is not None:
        count_mode, stride_c = 2, 0
    elif isinstance(fraction, Tensor):
        count_mode, stride_c = 4, 0
    elif fraction is not None:
        count_mode, stride_c = 3, 0
    else:
        count_mode, stride_c = 0, 0
    stride_f = fraction.stride(0) if isinstance(fraction, Tensor) and fraction.dim() == 1 else 0

    # the plain greedy pass keeps ~96 registers a thread at 4096 (two programs an SM on sm_90); the passes
    # with Philox, the search or the entropy reach ~155 there, so they stream half as much per step
    heavy = temp_mode != 0 or top_p_mode != 0 or top_k_mode != 0 or confidence == "neg_entropy"
    block_v = min(MAX_BLOCK_V // 2 if heavy else MAX_BLOCK_V, max(16, triton.next_power_of_2(V)))
    block_s = min(MAX_BLOCK_S, block_v)
    num_warps = 8 if block_v >= 2048 else 4
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _fused_step_row_kernel[(N,)](
            logits,
            x,
            positions,
            temp_t if temp_t is not None else conf,
            top_p_t if top_p_t is not None else conf,
            top_k_t if top_k_t is not None else tok,
            seed,
            offset,
            conf,
            key,
            tok,
            state,
            V,
            M,
            L,
            mask_id,
            float(temp_val),
            float(top_p_val),
            int(top_k_val),
            float(alg_temp),
            stride_lb,
            stride_lm,
            x.stride(0),
            x.stride(1),
            positions.stride(0),
            positions.stride(1),
            stride_t,
            stride_tp,
            stride_tk,
            CONFIDENCE=CONFIDENCES.index(confidence),
            TEMP_MODE=temp_mode,
            TOP_P_MODE=top_p_mode,
            TOP_K_MODE=top_k_mode,
            NOISE=noise,
            BLOCK_V=block_v,
            BLOCK_S=block_s,
            PV=_PIVOTS_VALUE,
            PK=_PIVOTS_KEY,
            MAX_SWEEPS=_MAX_SWEEPS,
            num_warps=num_warps,
        )
        _fused_step_select_kernel[(B, triton.cdiv(M, BLOCK_ROWS))](
            x,
            positions,
            key,
            tok,
            state,
            count if isinstance(count, Tensor) else tok,
            fraction if isinstance(fraction, Tensor) else conf,
            M,
            mask_id,
            int(count) if count_mode == 2 else 0,
            float(fraction) if count_mode == 3 else 0.0,
            float(threshold),
            float(factor),
            x.stride(0),
            x.stride(1),
            positions.stride(0),
            positions.stride(1),
            stride_c,
            stride_f,
            SELECT=SELECTIONS.index(select),
            COUNT_MODE=count_mode,
            BLOCK_I=BLOCK_ROWS,
            BLOCK_J=BLOCK_ROWS,
            num_warps=4,
        )
    return conf


# --------------------------------------------------------------------------------------------------
# torch path (CPU default; same semantics, [N, V] temporaries allowed)
# --------------------------------------------------------------------------------------------------


def _torch_generator(seed: Tensor, offset: Tensor, device: torch.device) -> torch.Generator:
    """A generator derived from seed/offset tensors (the torch path reads them on the host)."""
    mixed = (int(seed.reshape(-1)[0]) * 0x9E3779B97F4A7C15 + int(offset.reshape(-1)[0])) % (1 << 63)
    gen = torch.Generator(device=device)
    gen.manual_seed(mixed)
    return gen


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``torch.rand`` on ``device`` from a generator that may live on another device."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def _rows(value, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A scalar or per-row parameter as an ``(n,)`` tensor."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype).reshape(-1).expand(n)
    return torch.full((n,), value, dtype=dtype, device=device)


def _cut_from_sorted(sorted_z: Tensor, total: Tensor, p: Tensor | None, k: Tensor | None) -> tuple[Tensor, Tensor]:
    """Cut (smallest kept logit) of each row from its ``n`` largest logits, sorted descending.

    ``total`` is each row's full ``sum(exp(z - max))``. Returns ``(cut, resolved)``: ``resolved`` is
    False where the cut may lie beyond the ``n`` values given (all of them kept by top-p, no
    top-k at or above them); those rows need more values.
    """
    N, n = sorted_z.shape
    cut = torch.full((N,), float("-inf"), device=sorted_z.device)  # (N,)
    resolved = torch.ones(N, dtype=torch.bool, device=sorted_z.device)
    k_bounds = torch.zeros(N, dtype=torch.bool, device=sorted_z.device)  # a top-k cut inside the n values
    if k is not None:
        k_bounds = (k > 0) & (k <= n)
        cut_k = sorted_z.gather(1, (k.clamp(1, n) - 1)[:, None]).squeeze(1)
        cut = torch.where(k > 0, cut_k, cut)
        resolved = k_bounds | (k <= 0)
    if p is not None:
        probs = torch.exp(sorted_z - sorted_z[:, :1]) / total[:, None]  # (N, n) fp32
        cumulative = probs.cumsum(dim=-1)
        n_keep = 1 + (cumulative[:, :-1] <= p[:, None]).sum(dim=-1)  # shifted right: the top-1 always stays
        cut_p = sorted_z.gather(1, (n_keep - 1)[:, None]).squeeze(1)
        cut = torch.maximum(cut, torch.where(p < 1, cut_p, float("-inf")))
        # an unresolved top-p cut is <= the n-th value, so a top-k cut inside the n values still wins
        resolved = (resolved & ((p >= 1) | (n_keep < n))) | k_bounds
    return cut, resolved


def _keep_threshold(z: Tensor, top_p, top_k) -> tuple[Tensor, Tensor, Tensor] | None:
    """Smallest logit each row keeps after top-p then top-k (``-inf``: no filter), or ``None``.

    Exact like a full sort + cumsum, but sorts only the ``_TORCH_CANDIDATES`` largest logits of a
    row, and the whole row only when its cut lies deeper (a flat distribution).

    Returns
    -------
    tuple of Tensor or None
        ``(cut (N, 1), top values (N, n), their indices (N, n))``; ``None`` when nothing filters.
    """
    N, V = z.shape
    p_on = isinstance(top_p, Tensor) or (top_p is not None and top_p < 1)
    k_on = isinstance(top_k, Tensor) or bool(top_k)
    if not (p_on or k_on):
        return None
    p = _rows(top_p, N, torch.float32, z.device) if p_on else None
    k = _rows(top_k, N, torch.int64, z.device) if k_on else None
    row_max = z.amax(dim=-1, keepdim=True)  # (N, 1)
    total = torch.exp(z - row_max).sum(dim=-1)  # (N,)
    top, top_idx = torch.topk(z, min(V, _TORCH_CANDIDATES), dim=-1)  # (N, n) descending
    cut, resolved = _cut_from_sorted(top, total, p, k)
    if not bool(resolved.all()):
        rows = (~resolved).nonzero().squeeze(1)
        full = torch.sort(z[rows], dim=-1, descending=True).values  # (r, V)
        p_rows = p[rows] if p is not None else None
        k_rows = k[rows] if k is not None else None
        cut[rows] = _cut_from_sorted(full, total[rows], p_rows, k_rows)[0]
    return cut[:, None], top, top_idx


def _ranks(key: Tensor, pos: Tensor, member: Tensor, descending: bool) -> Tensor:
    """Rank of every row in its sequence: members first, then by key, then by position ascending."""
    B, M = key.shape
    order = torch.argsort(pos, dim=1, stable=True)  # (B, M)
    order = order.gather(1, torch.argsort(key.gather(1, order), dim=1, descending=descending, stable=True))
    order = order.gather(1, torch.argsort((~member).gather(1, order).to(torch.uint8), dim=1, stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(M, device=key.device).expand(B, M))
    return rank


def fused_step_torch(
    logits: Tensor,
    x: Tensor,
    positions: Tensor,
    *,
    mask_id: int,
    select: str,
    confidence: str,
    temperature: float | Tensor,
    top_p: float | Tensor | None,
    top_k: int | Tensor | None,
    count: int | Tensor | None,
    fraction: float | Tensor | None,
    threshold: float,
    factor: float,
    alg_temp: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Vectorised torch implementation of :func:`fused_step` (arguments already validated by it).

    Synchronises with the host (boolean indexing for the writes); meant for the CPU and as the
    switchable plain path, not for CUDA graphs.
    """
    B, L = x.shape
    M = positions.shape[1]
    dev = x.device
    z = logits.reshape(B * M, -1).float()  # (N, V)
    N, V = z.shape
    temp = _rows(temperature, N, torch.float32, dev)  # (N,)
    sampling = temp > 0
    may_sample = isinstance(temperature, Tensor) or temperature > 0
    if isinstance(temperature, Tensor):
        z = torch.where(sampling[:, None], z / torch.where(sampling, temp, 1.0)[:, None], z)
    elif temperature > 0:
        z = z / torch.tensor(temperature, dtype=torch.float32, device=dev)  # fp32 divisor, like the kernel
    filtered = _keep_threshold(z, top_p, top_k)
    if filtered is not None:
        cut, top, top_idx = filtered  # (N, 1), (N, n), (N, n)
        z = z.masked_fill(z < cut, float("-inf"))
    probs = torch.softmax(z, dim=-1)  # (N, V) fp32
    x0 = z.argmax(dim=-1)  # (N,) first maximum on ties
    if may_sample:
        # Gumbel-max over the kept tokens; when every row keeps few, only over its largest candidates
        if filtered is not None and (top.shape[1] == V or bool((cut[:, 0] > top[:, -1]).all())):
            cand = top.masked_fill(top < cut, float("-inf"))  # (N, n): every kept token is among them
            gumbel = -torch.log(-torch.log(_uniform(cand.shape, generator, dev)))
            drawn = top_idx.gather(1, (cand + gumbel).argmax(dim=-1, keepdim=True)).squeeze(1)
        else:
            gumbel = -torch.log(-torch.log(_uniform((N, V), generator, dev)))  # (N, V)
            drawn = (z + gumbel).argmax(dim=-1)
        x0 = torch.where(sampling, drawn, x0)
    if confidence == "prob":
        conf = probs.gather(1, x0[:, None]).squeeze(1)
    elif confidence == "margin":
        top2 = torch.topk(probs, min(2, V), dim=-1).values  # (N, 2)
        conf = top2[:, 0] - (top2[:, 1] if V > 1 else 0.0)
    else:
        conf = (probs * torch.log(probs.clamp_min(1e-10))).sum(dim=-1)

    conf = torch.nan_to_num(conf, nan=float("-inf"))  # a row with no finite logit ranks last, never NaN
    pos = positions.to(torch.int64)  # (B, M)
    valid = (pos >= 0) & (pos < L)
    cur = x.gather(1, pos.clamp(0, max(L - 1, 0)))  # (B, M)
    is_mask = valid & (cur == mask_id)
    member = valid if select == "p2" else is_mask
    conf = conf.masked_fill(~valid.reshape(-1), float("-inf"))
    conf_bm = conf.view(B, M)
    tok = x0.view(B, M)
    n = member.sum(dim=1)  # (B,)
    if count is not None:
        cnt = _rows(count, B, torch.int64, dev)
    elif fraction is not None and select != "bernoulli":
        cnt = (n.float() * _rows(fraction, B, torch.float32, dev)).clamp(max=n.float()).long()  # fp32, trunc
    else:
        cnt = n
    cnt = torch.minimum(cnt.clamp_min(0), n)[:, None]  # (B, 1)

    key = conf_bm
    if select == "topk" and alg_temp > 0:
        key = conf_bm / alg_temp - torch.log(-torch.log(_uniform((B, M), generator, dev)))
    new = cur
    if select == "bernoulli":
        chosen = member & (_uniform((B, M), generator, dev) < _rows(fraction, B, torch.float32, dev)[:, None])
    else:
        rank = _ranks(key, pos, member, descending=select != "p2")
        if select == "topk":
            chosen = member & (rank < cnt)
        elif select == "threshold":
            chosen = member & ((conf_bm >= torch.tensor(threshold, dtype=torch.float32)) | (rank == 0))
        elif select == "factor":
            bound = 1.0 - torch.tensor(factor, dtype=torch.float32, device=dev) / (rank + 2).float()
            chosen = member & ((rank == 0) | (conf_bm >= bound))
        else:
            remask = member & (rank < cnt)
            new = torch.where(remask, mask_id, torch.where(is_mask, tok, cur))
            chosen = None
    if chosen is not None:
        new = torch.where(chosen, tok, cur)
    rows = torch.arange(B, device=dev)[:, None].expand(B, M)
    x[rows[valid], pos[valid]] = new[valid]
    return conf


# --------------------------------------------------------------------------------------------------
# wrapper: validation and dispatch
# --------------------------------------------------------------------------------------------------


def _fail(problem: str, fix: str) -> None:
    raise ValueError(f"fused_step: {problem}; {fix}")


def _check_number(name: str, value, *, integer: bool = False, minimum: float | None = None) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        _fail(f"{name} must be a Python {'int' if integer else 'float'}, got {type(value).__name__}", "pass a number")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        _fail(f"{name}={value!r} is out of range", f"pass a finite value >= {minimum}")


def _check_param(name: str, value, n: int, device: torch.device, *, integer: bool, minimum: float | None) -> None:
    """A scalar, or a 0-dim / (n,) tensor on ``device`` with the right kind of dtype."""
    if not isinstance(value, Tensor):
        _check_number(name, value, integer=integer, minimum=minimum)
        return
    if value.device != device:
        _fail(f"{name} is on {value.device} but x is on {device}", f"move {name} to {device}")
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != n):
        _fail(f"{name} has shape {tuple(value.shape)}, expected () or ({n},)", f"pass one value per {name} slot")
    if integer:
        good = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    else:
        good = value.is_floating_point()
    if not good:
        _fail(f"{name} has dtype {value.dtype}", f"pass {'an integer' if integer else 'a floating-point'} tensor")


def fused_step(
    logits: Tensor,
    x: Tensor,
    positions: Tensor,
    *,
    mask_id: int,
    select: str,
    confidence: str = "prob",
    temperature: float | Tensor = 0.0,
    top_p: float | Tensor | None = None,
    top_k: int | Tensor | None = None,
    count: int | Tensor | None = None,
    fraction: float | Tensor | None = None,
    threshold: float = 0.9,
    factor: float = 1.0,
    alg_temp: float = 0.0,
    generator: torch.Generator | None = None,
    seed: Tensor | None = None,
    offset: Tensor | None = None,
) -> Tensor:
    """Sample every logits row, choose positions per sequence and write the chosen ids into ``x``.

    Row ``r = b * M + m`` predicts canvas column ``positions[b, m]`` of sequence ``b``. Sampling per
    row follows ``sample_tokens`` of sampler-semantics.md (temperature, top-p in fp32 with the
    shift-right rule, top-k with ties kept, fp32 softmax, argmax or an exact sample); then, per
    sequence, ``select`` decides which rows write their token (see below).

    Parameters
    ----------
    logits : Tensor
        ``(B*M, V)`` or ``(B, M, V)``; bf16, fp16 or fp32; unit stride along ``V``.
    x : Tensor
        ``(B, L)`` int64 canvas, **updated in place**.
    positions : Tensor
        ``(B, M)`` int32/int64 canvas column of each row; ``-1`` (any value outside ``[0, L)``)
        marks a padding row, which is ignored. Positions must be unique within a sequence.
    mask_id : int
        Token id of the mask.
    select : str
        ``"topk"``: reveal the ``count`` most confident masked rows (rows whose current token is
        ``mask_id``); with ``alg_temp > 0`` rank by ``conf / alg_temp + Gumbel`` instead.
        ``"threshold"``: every masked row with ``conf >= threshold``, and always the most
        confident one. ``"factor"`` (Fast-dLLM): sort masked rows by confidence, reveal the
        largest ``n >= 1`` with ``conf_(n) >= 1 - factor / (n + 1)``. ``"bernoulli"`` (alg
        ``origin``): each masked row with probability ``fraction``. ``"p2"``: every row is a
        variable position; the ``count`` least confident become ``mask_id``, every other row
        that is currently a mask takes its token, the rest keep theirs.
        Selection ties go to the lowest position; counts are clamped to the eligible rows.
    confidence : str
        ``"prob"`` (probability of the chosen token), ``"margin"`` (top1 - top2) or
        ``"neg_entropy"`` (``sum p log max(p, 1e-10)``), all of the filtered distribution.
    temperature : float or Tensor
        Scalar or ``(B*M,)``; ``0`` = greedy (exact argmax, lowest id on ties).
    top_p : float or Tensor, optional
        Scalar or ``(B*M,)``; ``None`` or ``>= 1`` = off. Ties at the cut are kept.
    top_k : int or Tensor, optional
        Scalar or ``(B*M,)`` integers; ``None`` or ``0`` = off. Ties kept.
    count : int or Tensor, optional
        ``(B,)`` integers (or one int): positions to reveal (``topk``) or re-mask (``p2``).
    fraction : float or Tensor, optional
        Instead of ``count``: a float, 0-dim or ``(B,)`` fp32 tensor. ``topk``: count =
        ``trunc(fp32(n_masked) * fraction)``; ``p2``: ``trunc(fp32(n_rows) * fraction)``;
        ``bernoulli``: the reveal probability.
    threshold : float
        ``tau`` of ``select="threshold"`` (compared in fp32).
    factor : float
        ``f`` of ``select="factor"``.
    alg_temp : float
        ``select="topk"`` only: > 0 perturbs the ranking with Gumbel noise.
    generator : torch.Generator, optional
        Source of randomness (one seed is drawn from it per call).
    seed, offset : Tensor, optional
        1-element int64 tensors on ``x.device`` instead of a generator: Philox key and stream
        (change ``offset`` every call). Without either, the default generator is used.

    Returns
    -------
    Tensor
        ``(B*M,)`` fp32 confidence of each row's fresh sample (not of ``x``'s token, not perturbed
        by ``alg_temp``); padding rows get ``-inf``.

    Notes
    -----
    ``DINFILL_BACKEND`` chooses the Triton kernels (two launches, no host sync, CUDA-graph friendly
    with ``seed`` / ``offset``) or the vectorised torch path. Both follow the same rules; they
    draw different random streams. Values inside per-row / per-sequence tensors are not checked
    (that would need a host sync): a negative ``top_p`` acts as 0 (keep the top token and its
    ties), a non-positive ``top_k`` or ``temperature`` turns that row's top-k / sampling off, a
    negative count as 0. Scalars are checked and rejected with a message.
    """
    if not isinstance(logits, Tensor) or not isinstance(x, Tensor) or not isinstance(positions, Tensor):
        _fail("logits, x and positions must be tensors", "pass torch tensors")
    if x.dim() != 2 or x.dtype != torch.int64:
        _fail(f"x must be a (B, L) int64 canvas, got {x.dtype} of shape {tuple(x.shape)}", "pass x.long() (2-D)")
    B, L = x.shape
    if positions.dim() != 2 or positions.shape[0] != B or positions.dtype not in (torch.int32, torch.int64):
        _fail(
            f"positions must be (B={B}, M) int32/int64, got {positions.dtype} of shape {tuple(positions.shape)}",
            "pass one canvas column per logits row, -1 for padding",
        )
    M = positions.shape[1]
    if logits.dtype not in _FLOAT_DTYPES:
        _fail(f"logits dtype {logits.dtype} is not supported", "pass bf16, fp16 or fp32 logits")
    if logits.dim() == 3:
        if tuple(logits.shape[:2]) != (B, M):
            _fail(f"logits of shape {tuple(logits.shape)} do not match positions {(B, M)}", "pass (B, M, V) logits")
    elif logits.dim() != 2 or logits.shape[0] != B * M:
        _fail(f"logits of shape {tuple(logits.shape)} are not (B*M={B * M}, V)", "pass one logits row per position")
    V = logits.shape[-1]
    if V < 1:
        _fail("the vocabulary is empty", "pass logits with V >= 1")
    for name, t in (("logits", logits), ("positions", positions)):
        if t.device != x.device:
            _fail(f"{name} is on {t.device} but x is on {x.device}", f"move {name} to {x.device}")
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        _fail(f"mask_id must be an int, got {type(mask_id).__name__}", "pass the tokenizer's mask token id")
    if select not in SELECTIONS:
        _fail(f"select={select!r} is not one of {SELECTIONS}", "pick one of them")
    if confidence not in CONFIDENCES:
        _fail(f"confidence={confidence!r} is not one of {CONFIDENCES}", "pick one of them")
    N, dev = B * M, x.device
    _check_param("temperature", temperature, N, dev, integer=False, minimum=0.0)
    if top_p is not None:
        _check_param("top_p", top_p, N, dev, integer=False, minimum=0.0)
    if top_k is not None:
        _check_param("top_k", top_k, N, dev, integer=True, minimum=0)
    for name, value in (("threshold", threshold), ("factor", factor)):
        _check_number(name, value)
    _check_number("alg_temp", alg_temp, minimum=0.0)
    if alg_temp > 0 and select != "topk":
        _fail(f"alg_temp is only used by select='topk', not {select!r}", "leave alg_temp=0")
    if count is not None and fraction is not None:
        _fail("both count and fraction were given", "pass one of them")
    if select in ("topk", "p2") and count is None and fraction is None:
        _fail(f"select={select!r} needs count or fraction", "pass count=(B,) ints or fraction=float")
    if select == "bernoulli" and fraction is None:
        _fail("select='bernoulli' needs fraction (the reveal probability)", "pass fraction=1 - s/t")
    if select in ("threshold", "factor", "bernoulli") and count is not None:
        _fail(f"count is not used by select={select!r}", "leave count=None")
    if select in ("threshold", "factor") and fraction is not None:
        _fail(f"fraction is not used by select={select!r}", "leave fraction=None")
    if count is not None:
        _check_param("count", count, B, dev, integer=True, minimum=None)
    if fraction is not None:
        _check_param("fraction", fraction, B, dev, integer=False, minimum=0.0)
    if generator is not None and not isinstance(generator, torch.Generator):
        _fail(f"generator must be a torch.Generator, got {type(generator).__name__}", "pass torch.Generator()")
    if (seed is None) != (offset is None):
        _fail("seed and offset go together", "pass both (1-element int64 tensors) or neither")
    if seed is not None:
        if generator is not None:
            _fail("both a generator and seed/offset were given", "pass one source of randomness")
        for name, t in (("seed", seed), ("offset", offset)):
            if not isinstance(t, Tensor) or t.numel() != 1 or t.dtype != torch.int64 or t.device != dev:
                _fail(f"{name} must be a 1-element int64 tensor on {dev}", f"pass torch.tensor([v], device='{dev}')")

    if N == 0:
        return torch.empty(0, dtype=torch.float32, device=dev)
    samples = isinstance(temperature, Tensor) or temperature > 0
    needs_noise = samples or select == "bernoulli" or (select == "topk" and alg_temp > 0)
    args = dict(
        mask_id=mask_id,
        select=select,
        confidence=confidence,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        count=count,
        fraction=fraction,
        threshold=threshold,
        factor=factor,
        alg_temp=alg_temp,
    )
    if use_triton(dev):
        if needs_noise and seed is None:
            where = generator.device if generator is not None else dev
            drawn = torch.randint(0, 1 << 62, (2,), generator=generator, device=where).to(dev)
            seed, offset = drawn[:1], drawn[1:]
        return fused_step_triton(logits, x, positions, seed=seed, offset=offset, **args)
    if needs_noise and seed is not None:
        generator = _torch_generator(seed, offset, dev)
    return fused_step_torch(logits, x, positions, generator=generator, **args)
