"""First launch of ``fused_step``: every logits row -> one token, its confidence and its selection key.

Why this design (bytes, passes, instructions)
---------------------------------------------
A step reads ``N x V`` logits (V = 151936: 304 KB of bf16 per row); nothing else it touches is big, so the
floor is reading the logits once. At that floor an H200 (4.3 TB/s, 132 SMs x 4 schedulers x 32 lanes) can
issue about 15.5 instructions per bf16 element (``Target.issue_budget``), an H100 ~22, an L4 ~100: a loop
above that cannot reach the floor however good its memory access is. So the hot loops are written against
their compiled SASS, counted by ``dinfill bench --static`` (body instructions / elements a thread loads per
iteration, every rare path included; sm_90, triton 3.9 / 3.6):

============================  ===========  ===========  ==========================================
loop                          3.9          3.6          what it does per element
============================  ===========  ===========  ==========================================
greedy pass 1 (online)        8.1          8.1          max, sum of exp, argmax by block
published pass 1a (max)       1.4          1.3          packed bf16x2 max, block of the first max
published pass 1b (sums)      17.2 (7.2)   17.2 (7.2)   exp2, sum, window count (fast path)
published sample scan         11.8         11.8         exp2, compare, block sums (L2-hot chunk)
============================  ===========  ===========  ==========================================

(The previous design, one pass with a sliding 256-bin ``tl.histogram`` window, cost 41 / 89 per element.)

* **The whole GPU works even for a handful of rows.** Each row is split into ``C`` chunks, one program
  each, with ``C`` chosen so ``N * C`` is a few times the SM count (and, on a GPU target, chunks short enough
  that what the programs in flight re-read stays in half the L2). The programs of a row combine their
  partial results without a host sync and without a third launch: every program writes its partials, then
  takes a ticket from a per-row counter (``atomic_add``, acq_rel, after a CTA barrier); the program that
  draws the last ticket *finishes* the row (the "last block" pattern; it reads the partials with
  L1-bypassing loads) and resets the counter to 0, so the next call, or the next replay of a CUDA graph,
  finds it at 0 again. Nobody waits for anybody, which is also why the same code runs in Triton's
  interpreter (programs one after another).
* **Greedy and unfiltered rows: one online pass.** ``(G, 8)`` tiles (16 bytes a thread), per group an online
  max and ``sum exp2((x - max) * log2(e) / T)``; the argmax is tracked per group as the *block* of its first
  maximum (two instructions per 8 elements), and the exact column is found at the end by re-loading that one
  group's 8 columns.
* **Top-p / top-k rows: the chunk is read twice, from memory once.** Pass 1a finds the chunk max (packed
  ``max.bf16x2``, ~1.4 instructions an element). Pass 1b re-reads the chunk (it is L1 / L2 hot) and, with the
  max known, sums ``exp2`` without any rescaling and **counts every key of a window of the 256 largest keys
  below the chunk max** (the key being the order-preserving 16-bit image of the bf16 / fp16 logit) into the
  chunk's slots ``key mod 256``. A window slot holds one logit *value*, so its probability mass is exactly
  ``count * exp(z(value) - max)``: the exact top-p / top-k cut, the kept mass and the entropy of the kept
  distribution follow from 256 counts per chunk, with no sort and no further pass. The count is the costly
  part, so it is done in inline PTX (:func:`_count_window`): per thread, the max of its eight elements
  (three ``max.bf16x2``) decides whether any can be in the window; only then are the eight counted with
  fire-and-forget atomic adds. On a trained model's rows few elements are that close to the max, so most
  threads take the 9-instruction skip (the table's fast path); a flat row pays the full body, still under
  20 an element. The interpreter counts with ``tl.atomic_add`` (same result; the PTX runs only compiled).
* **Sampling without a random number per element.** Philox + ``log(-log(u))`` per element (Gumbel-max)
  alone costs more than the budget. The sample is drawn by inverse CDF in vocabulary order from **one**
  uniform per row: the finisher picks the chunk from the chunks' kept masses (exact, from their windows;
  from the pass-1 sums without a filter), then :func:`_sample_scan` sums that one chunk's kept mass block by
  block (a compare, an ``exp2`` and an add an element) and scans only the block that holds the target. The
  scan re-reads on average half a chunk that a sibling program read microseconds before, so it comes from
  L2; that is why sampling calls use ``C >= 4`` even for large ``N``.

Exact cut, bounded passes, no convergence question. Token ``i`` survives top-p iff the mass of the
tokens with a strictly larger logit is ``<= top_p`` of the total (the reference's shift-right rule
with ties kept) and top-k iff fewer than ``k`` tokens are strictly larger; both are monotone in the
logit, so the kept set is ``{z >= cut}`` for one logit value, and ties at the cut are all kept. The cut
lies in the window iff the window's mass exceeds ``top_p`` of the total, or it holds ``>= k`` tokens, or
every finite token; the finisher tests exactly that. Otherwise (a flat row whose 256 largest values
carry less than ``top_p`` of the mass, logits packed near 0 where bf16 values are dense, fp32 logits)
the finisher takes the **deep path**, alone over the whole row: sweeps with 16 key pivots (exact counts
and masses above each) shrink the key bracket of the cut 16-fold each, so a 16-bit key needs at most 2
sweeps and an fp32 key (32 bits) at most 6; one window pass over the last <= 256 keys then resolves the
cut exactly, and one scan samples (and sums the entropy). A bounded number of passes, exact by
construction; slower (one program, several passes over the row), and only for the rows that need it.

Launches: this kernel, then ``fused_step_select.py`` (positions per sequence): two, for every mode.
Budgets (issue 18, checked by ``dinfill bench --static --check`` and tests/test_static.py): pass 1 and the
sample scan of the published preset <= 20 instructions an element, greedy pass 1 <= 10, no spills, on
sm_80 / 86 / 89 / 90 with triton 3.6 and the newest.

Supports
    bf16 / fp16 / fp32 logits ``(N, V)`` or ``(B, M, V)`` with any row strides (unit stride along
    ``V``), any ``V``, per-row or scalar temperature / top-p / top-k, confidences ``prob`` /
    ``margin`` / ``neg_entropy``, device-resident ``seed`` / ``offset`` (CUDA-graph capturable).
Limitations
    Logits must be finite or ``-inf`` after the temperature division, and a row needs one finite
    logit (NaN rows give an unspecified token). bf16 / fp16 keys index logit values, so ``x / T`` must
    keep distinct values distinct: true unless the quotient is an fp32 subnormal (``|x / T| <
    2**-126``). The arrival counters live in a per-device workspace: two calls must not run at once on
    two streams. Rows that take the deep path cost several passes of one program.
Differences from the reference
    Logits are upcast to fp32 before the division by the temperature and top-p sums are fp32 (the
    reference does both in bf16 for bf16 logits); top-p membership exactly at the boundary may differ
    from a sort + cumsum by fp32 summation order. Pass 1 and the sample scan sum
    ``exp2((x - max) * (log2(e) / T))``, not ``exp(x / T - max / T)``: a mass differs by ~1e-6 relative at
    most (it scales the top-p bound and, without a filter, the confidence; a scan that falls short of its
    target by rounding takes the chunk's last kept token). Kept masses, the cut and every confidence use
    the exact ``exp(x / T - max)``. Greedy picks the lowest id among equal maxima. The entropy of a row without
    top-p / top-k is ``sum p log p`` from the running sums, without the reference's clamp
    ``p >= 1e-10`` (a difference of at most ``V * 3.7e-11``); filtered rows apply the clamp exactly.
    Samples are exact in distribution up to fp32 rounding of the masses and a 24-bit uniform.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from dinfill.kernels._common import device_context
from dinfill.kernels.fused_step_options import CONFIDENCES, FusedStepOptions
from dinfill.target import target_for

__all__ = ["launch_rows", "split_rows", "arrival_counters"]

# Launch tunables (module attributes so tests can shrink them to exercise every loop and path).
MAX_BLOCK_V = 4096  # pass 1 streaming block: 8 KiB of bf16 per load, 16 elements a thread at 8 warps
BLOCK_F = 1024  # deep path: window / scan block (fp32 temporaries: 4 a thread at 8 warps; more spills on triton 3.6)
BLOCK_S = 4096  # the finisher's sample scan block: 16 bf16 a thread at 8 warps amortise its block reduction
GROUP_W = 8  # pass 1 columns per thread-group and block: one 16-byte load of bf16, reduced in-thread
BLOCK_D = 128  # deep-path sweep block: a (128, 16) pivot tile
WINDOW_KEYS = 256  # keys counted exactly per chunk: 2 binades of bf16 values below the row max
PIVOTS = 16  # deep-path sweep: the key bracket of the cut shrinks 16-fold per pass
FINISH_CHUNKS = 8  # chunks whose windows the finisher loads per step (a (8, 256) tile: independent loads)
PROGRAMS_PER_SM = 4  # split rows until N * C reaches this many programs per SM
MIN_CHUNK = 4096  # never split a row into chunks shorter than this
MIN_SPLIT_SAMPLED = 4  # sampling calls split rows at least this much, so the sample scan hits L2
DEFAULT_SMS = 132  # SM count assumed off CUDA (the interpreter): an H100/H200


# --------------------------------------------------------------------------------------------------
# helpers (inlined into the kernel)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _key16(raw):
    """Order-preserving image of bf16 / fp16 values as int32 in ``[0, 65536)``; -0 maps like +0."""
    bits = raw.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    bits = tl.where(bits == 0x8000, 0, bits)
    return tl.where(bits >= 0x8000, bits ^ 0xFFFF, bits | 0x8000)


@triton.jit
def _value16(key, DT: tl.constexpr):
    """Inverse of :func:`_key16`, as fp32 (exact)."""
    bits = tl.where(key >= 0x8000, key & 0x7FFF, key ^ 0xFFFF)
    return bits.to(tl.int16).to(DT, bitcast=True).to(tl.float32)


@triton.jit
def _key32(z):
    """Order-preserving image of fp32 values as int64 in ``[0, 2**32)``; -0 maps like +0."""
    bits = z.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2147483648


@triton.jit
def _value32(key):
    """Inverse of :func:`_key32`."""
    s = (key - 2147483648).to(tl.int32)
    return tl.where(s >= 0, s, s ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _key_value(key, DT: tl.constexpr, KEY_BITS: tl.constexpr):
    """The logit value (x for 16-bit keys, z = x / T for 32-bit ones) of a key."""
    if KEY_BITS == 16:
        v = _value16(key.to(tl.int32), DT)
    else:
        v = _value32(key)
    return v


@triton.jit
def _philox24(seed, offset, row, stream):
    """24 random bits (int32) per element of ``row`` / ``offset`` (broadcast) from Philox keyed on
    (seed, offset, row, stream): the same inputs always give the same bits."""
    row = row.to(tl.uint32)
    zero = row * 0
    c2 = zero + (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    r0, _, _, _ = tl.philox(seed, zero + stream, row, c2, c3)
    return (r0 >> 8).to(tl.int32)


@triton.jit
def _uniform(seed_ptr, offset_ptr, row, stream, OPEN: tl.constexpr):
    """One uniform for a row: in ``[0, 1)``, or in ``(0, 1)`` with ``OPEN`` (for logarithms)."""
    two = tl.zeros((2,), dtype=tl.int64) + row  # Philox works on tensors: two equal lanes
    bits = tl.max(_philox24(tl.load(seed_ptr), tl.load(offset_ptr), two, stream), axis=0)
    if OPEN:
        u = (bits.to(tl.float32) + 0.5) * 5.9604645e-08  # 2**-24
    else:
        u = bits.to(tl.float32) * 5.9604645e-08
    return u


@triton.jit
def _over_t(x, t_safe, sampling, TEMP_MODE: tl.constexpr):
    """``x / T`` (IEEE division, like torch) on a sampling row; ``x`` itself on a greedy row or call."""
    if TEMP_MODE != 0:
        x = tl.where(sampling, tl.math.div_rn(x, t_safe), x)
    return x


@triton.jit
def _load_z(row_ptr, cols, inb, t_safe, sampling, TEMP_MODE: tl.constexpr, KEY_BITS: tl.constexpr):
    """Load a block: (raw logits, x fp32, z = x / T (IEEE division, like torch), v the value keys order)."""
    raw = tl.load(row_ptr + cols, mask=inb, other=float("-inf"))
    x = raw.to(tl.float32)
    z = _over_t(x, t_safe, sampling, TEMP_MODE)
    if KEY_BITS == 16:
        v = x
    else:
        v = z
    return raw, x, z, v


@triton.jit
def _max_block(raw, start, m_g, b_g):
    """Pass 1a: fold one ``(G, W)`` block into each group's running max and the block of its first maximum."""
    bm = tl.max(raw.to(tl.float32), axis=1)  # (G,) in-thread: a group is one thread's W columns
    b_g = tl.where(bm > m_g, start, b_g).to(tl.int32)  # strict: an earlier block keeps a tie
    return tl.maximum(m_g, bm), b_g


@triton.jit
def _online_block(raw, start, c2, inv_t, m_g, b_g, s_g, h_g, m2_g, nf_g,
                  ENTROPY: tl.constexpr, SECOND: tl.constexpr, COUNT: tl.constexpr):  # fmt: skip
    """Pass 1 without a window: fold one ``(G, W)`` block into per-group online softmax statistics.

    Group ``g`` owns ``W`` contiguous columns per block, held by one thread, so every reduction is
    in-thread. ``exp((x - m) / T)`` is ``exp2((x - m) * c2)`` with ``c2 = log2(e) / T`` (subtracting first: a
    huge finite logit must not overflow ``m * c2``).
    """
    x = raw.to(tl.float32)  # (G, W) -inf on masked columns
    bm = tl.max(x, axis=1)  # (G,)
    b_g = tl.where(bm > m_g, start, b_g).to(tl.int32)  # block of the first maximum (an earlier one keeps a tie)
    new_m = tl.maximum(m_g, bm)
    m_ref = tl.where(new_m == float("-inf"), 0.0, new_m)  # an empty group: its sums stay 0
    scale = tl.exp2((m_g - m_ref) * c2)  # rescales the old sums (0 for a group that was empty)
    e = tl.exp2((x - m_ref[:, None]) * c2)  # (G, W) exp(z - max); 0 for -inf logits
    if ENTROPY:  # sum exp(z - max) * (z - max), rescaled like the sum
        d_old = tl.where(m_g > float("-inf"), (m_g - m_ref) * inv_t, 0.0)
        d = (x - m_ref[:, None]) * inv_t
        h_g = scale * (h_g + d_old * s_g) + tl.sum(tl.where(e > 0.0, e * d, 0.0), axis=1)
    s_g = s_g * scale + tl.sum(e, axis=1)
    if SECOND:  # the two largest with multiplicity
        n_top = tl.sum((x == bm[:, None]).to(tl.int32), axis=1)
        b2 = tl.where(n_top >= 2, bm, tl.max(tl.where(x < bm[:, None], x, float("-inf")), axis=1))
        m2_g = tl.maximum(tl.minimum(m_g, bm), tl.maximum(m2_g, b2))
    if COUNT:
        nf_g += tl.sum((x > float("-inf")).to(tl.int32), axis=1)
    return new_m, b_g, s_g, h_g, m2_g, nf_g


@triton.jit
def _known_max_block(raw, mx, c2, inv_t, s_g, h_g, n_top, b2_g, nf_g, hist_row, lo_v, key_mask,
                     ENTROPY: tl.constexpr, SECOND: tl.constexpr, COUNT: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """Pass 1b (a window is counted): sums against the chunk max ``mx`` found by pass 1a, and the window.

    Every element ``>= lo_v`` (one of the window's ``NB`` largest keys below the chunk max) is counted into
    ``hist_row[key16 & key_mask]``. With ``mx`` known nothing is rescaled: ``exp2((x - mx) * c2)`` and a sum.
    """
    raw = _count_window(raw, hist_row, lo_v, key_mask, ASM)
    x = raw.to(tl.float32)
    e = tl.exp2((x - mx) * c2)  # (G, W)
    s_g += tl.sum(e, axis=1)
    if ENTROPY:
        h_g += tl.sum(tl.where(e > 0.0, e * ((x - mx) * inv_t), 0.0), axis=1)
    if SECOND:  # how many hold the max, and the largest below it
        n_top += tl.sum((x == mx).to(tl.int32), axis=1)
        b2_g = tl.maximum(b2_g, tl.max(tl.where(x < mx, x, float("-inf")), axis=1))
    if COUNT:
        nf_g += tl.sum((x > float("-inf")).to(tl.int32), axis=1)
    return s_g, h_g, n_top, b2_g, nf_g


# Pass 1b's window count in PTX, eight bf16 / fp16 logits (one 16-byte load: $0-$3, returned unchanged) per
# instance: the max of the eight decides, per thread, whether any of them can be in the window (``>= lo``,
# $16); only then are the eight counted, each with a fire-and-forget atomic add of 0 or 1 into
# ``base[key & mask]`` ($8, $24; adding 0 instead of a predicated add keeps ptxas from wrapping every element in
# a reconvergence branch). A thread that skips pays 9 instructions for 8 elements, one that counts ~10 an
# element; Triton's own masked atomic_add costs ~16 an element whether or not it counts. The interpreter runs
# the same count with tl.atomic_add.
_WINDOW_HEAD = """{
    .reg .pred p, q;
    .reg .b32 m, t, f, b, s, v;
    .reg .b64 a;
    .reg .b16 h0, h1;
"""
_BF16_MAX8 = """    max.bf16x2 m, $0, $1;
    max.bf16x2 m, m, $2;
    max.bf16x2 m, m, $3;
    prmt.b32 t, m, 0, 0x1032;
    max.bf16x2 m, m, t;
    shl.b32 f, m, 16;
"""
_FP16_MAX8 = """    max.f16x2 m, $0, $1;
    max.f16x2 m, m, $2;
    max.f16x2 m, m, $3;
    prmt.b32 t, m, 0, 0x1032;
    max.f16x2 m, m, t;
    mov.b32 {h0, h1}, m;
    cvt.f32.f16 f, h0;
"""
_SKIP = """    setp.ge.f32 p, f, $16;
    @!p bra SKIP${:uid};
"""
# one element: f = its value as fp32, b = its 16-bit pattern (-0 as +0); key & mask = (b ^ sign fill) & mask
_BF16_ONE = """    {lift}
    setp.ge.f32 p, f, $16;
    selp.u32 v, 1, 0, p;
    add.f32 f, f, 0f00000000;
    shr.u32 b, f, 16;
    shr.s32 s, f, 31;
    xor.b32 b, b, s;
    and.b32 b, b, $24;
    mad.wide.u32 a, b, 4, $8;
    red.global.add.u32 [a], v;
"""
_FP16_ONE = """    mov.b32 {{h0, h1}}, ${reg};
    cvt.f32.f16 f, {half};
    setp.ge.f32 p, f, $16;
    selp.u32 v, 1, 0, p;
    cvt.u32.u16 b, {half};
    and.b32 t, b, 0x7FFF;
    setp.eq.u32 q, t, 0;
    selp.b32 b, 0, b, q;
    shl.b32 s, b, 16;
    shr.s32 s, s, 31;
    xor.b32 b, b, s;
    and.b32 b, b, $24;
    mad.wide.u32 a, b, 4, $8;
    red.global.add.u32 [a], v;
"""
_WINDOW_BF16 = tl.constexpr(
    _WINDOW_HEAD + _BF16_MAX8 + _SKIP
    + "".join(_BF16_ONE.format(lift=f"and.b32 f, ${i // 2}, 0xFFFF0000;" if i % 2 else f"shl.b32 f, ${i // 2}, 16;")
              for i in range(8))
    + "SKIP${:uid}:\n}"
)  # fmt: skip
_WINDOW_FP16 = tl.constexpr(
    _WINDOW_HEAD + _FP16_MAX8 + _SKIP
    + "".join(_FP16_ONE.format(reg=i // 2, half=f"h{i % 2}") for i in range(8))
    + "SKIP${:uid}:\n}"
)  # fmt: skip
_WINDOW_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r,0,1,2,3," + "l," * 8 + "f," * 8 + "r," * 7 + "r")


@triton.jit
def _count_window(raw, hist_row, lo_v, key_mask, ASM: tl.constexpr):
    """Count the elements of ``raw`` (``(G, W)`` bf16 / fp16, W = 8) that are ``>= lo_v`` into
    ``hist_row[key16 & key_mask]``; returns ``raw``."""
    if ASM:
        base = (hist_row + tl.zeros(raw.shape, tl.int32)).to(tl.int64, bitcast=True)
        lo = tl.zeros(raw.shape, tl.float32) + lo_v
        km = tl.zeros(raw.shape, tl.int32) + key_mask
        if raw.dtype == tl.bfloat16:
            raw = tl.inline_asm_elementwise(_WINDOW_BF16, _WINDOW_CONSTRAINTS, [raw, base, lo, km],
                                            dtype=tl.bfloat16, is_pure=False, pack=8)  # fmt: skip
        else:
            raw = tl.inline_asm_elementwise(_WINDOW_FP16, _WINDOW_CONSTRAINTS, [raw, base, lo, km],
                                            dtype=tl.float16, is_pure=False, pack=8)  # fmt: skip
    else:
        tl.atomic_add(hist_row + (_key16(raw) & key_mask), 1, mask=raw.to(tl.float32) >= lo_v, sem="relaxed")
    return raw


@triton.jit
def _chunk_windows(part_f_ptr, hist_ptr, row, C, c0, kj, NB: tl.constexpr, CB: tl.constexpr, DT: tl.constexpr):
    """Counts of the row-window keys ``kj`` in chunks ``c0 .. c0 + CB - 1``, as a ``(CB, NB)`` tile.

    Each chunk's ring covers the ``NB`` keys below its own max, so it holds every row-window key up to
    that max (and none above it).
    """
    cg = c0 + tl.arange(0, CB)  # (CB,)
    cm = cg < C
    mc = tl.load(part_f_ptr + (row * C + cg) * 4, mask=cm, other=float("-inf"), cache_modifier=".cg")
    top_c = tl.where(mc == float("-inf"), -1, _key16(mc.to(DT)))  # (CB,) the chunk's largest key
    ok = (kj[None, :] <= top_c[:, None]) & (kj[None, :] >= 0) & cm[:, None]
    offs = (row * C + cg)[:, None] * NB + (kj & (NB - 1))[None, :]
    return tl.load(hist_ptr + offs, mask=ok, other=0, cache_modifier=".cg")


@triton.jit
def _resolve_window(cnt, w, j, a_cnt, a_mass, total, top_p, k, p_on, k_on):
    """Exact cut inside a window of single-key bins ``j`` (0 = largest key), given what lies above it.

    ``cnt`` / ``w``: tokens per key and the weight ``exp(z - max)`` of that key; ``a_cnt`` /
    ``a_mass``: tokens and mass above the window. Returns ``(j_cut, kept mass)``: the kept keys are
    ``j <= j_cut`` (``-1``: none of the window).
    """
    mass = cnt.to(tl.float32) * w
    above_m = tl.cumsum(mass, axis=0) - mass + a_mass  # mass strictly above each key
    above_c = tl.cumsum(cnt, axis=0) - cnt + a_cnt
    pred = ((above_m / total <= top_p) | (p_on == 0)) & ((above_c <= k - 1) | (k_on == 0))
    j_cut = tl.max(tl.where(pred & (cnt > 0), j, -1), axis=0)
    kept = a_mass + tl.sum(tl.where(j <= j_cut, mass, 0.0), axis=0)
    return j_cut, kept


@triton.jit
def _scan(row_ptr, col_lo, col_hi, cut_v, m_z, kept_mass, target, want_sample, want_ent, t_safe, sampling,
          TEMP_MODE: tl.constexpr, KEY_BITS: tl.constexpr, ENTROPY: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Inverse-CDF sample over the kept tokens of ``[col_lo, col_hi)`` (vocabulary order) and/or their entropy.

    Returns ``(token, entropy)``: the first kept column where the running kept mass exceeds ``target``
    (the last kept one if rounding never gets there), and ``sum p log max(p, 1e-10)`` over the range.
    Stops at the sample unless the entropy is wanted.
    """
    lane = tl.arange(0, BLOCK)
    acc = tl.full((), 0.0, dtype=tl.float32)
    ent = tl.full((), 0.0, dtype=tl.float32)
    tok = tl.full((), -1, dtype=tl.int64)
    last = tl.full((), -1, dtype=tl.int64)
    start = tl.full((), 0, dtype=tl.int64) + col_lo
    go = start < col_hi
    while go:
        cols = start + lane
        inb = cols < col_hi
        raw, x, z, v = _load_z(row_ptr, cols, inb, t_safe, sampling, TEMP_MODE, KEY_BITS)
        kept = (x > float("-inf")) & (v >= cut_v)
        w = tl.where(kept, tl.exp(z - m_z), 0.0)  # (BLOCK,)
        if ENTROPY:
            p = w / kept_mass
            ent += tl.sum(tl.where(kept, p * tl.log(tl.maximum(p, 1e-10)), 0.0), axis=0)
        if (want_sample != 0) & (tok < 0):
            block_mass = tl.sum(w, axis=0)
            if acc + block_mass > target:
                run = tl.cumsum(w, axis=0) + acc
                hit = tl.min(tl.where(kept & (run > target), cols, 2**62), axis=0)
                tok = tl.where(hit < 2**62, hit, tl.max(tl.where(kept, cols, -1), axis=0))
            else:
                acc += block_mass
                last = tl.maximum(last, tl.max(tl.where(kept, cols, -1), axis=0))
        start += BLOCK
        go = (start < col_hi) & ((want_ent != 0) | ((want_sample != 0) & (tok < 0)))
    tok = tl.where(tok < 0, last, tok)
    return tok, ent


@triton.jit
def _sample_scan(row_ptr, col_lo, col_hi, cut_v, mx, c2, target, BLOCK: tl.constexpr):
    """Inverse-CDF sample inside one chunk: the first kept column of ``[col_lo, col_hi)`` where the running kept
    mass passes ``target`` (the last kept one if rounding never gets there; -1 if none is kept).

    The chunk was read by its own program moments before, so this re-read comes from L2. The loop only sums
    block masses (one ``exp2((x - mx) * c2)``, a compare and an add an element) until the block holding the
    target; one scan of that block then finds the token. ``cut_v``: a value of x (16-bit keys), or -inf for
    a row without a cut (then any dtype).
    """
    lane = tl.arange(0, BLOCK)
    cut = tl.maximum(cut_v, -3.4028234663852886e38)  # -inf logits are never kept
    acc = tl.full((), 0.0, dtype=tl.float32)
    hit = tl.full((), -1, dtype=tl.int64)  # start of the block holding the target
    last = tl.full((), -1, dtype=tl.int64)  # start of the last block with kept mass (rounding fallback)
    before_last = tl.full((), 0.0, dtype=tl.float32)
    before_hit = tl.full((), 0.0, dtype=tl.float32)
    start = tl.full((), 0, dtype=tl.int64) + col_lo
    go = start < col_hi
    while go:  # static: scan
        cols = start + lane
        x = tl.load(row_ptr + cols, mask=cols < col_hi, other=float("-inf")).to(tl.float32)
        block_mass = tl.sum(tl.where(x >= cut, tl.exp2((x - mx) * c2), 0.0), axis=0)
        found = acc + block_mass > target
        hit = tl.where(found, start, hit)
        before_hit = tl.where(found, acc, before_hit)
        last = tl.where(block_mass > 0.0, start, last)
        before_last = tl.where(block_mass > 0.0, acc, before_last)
        acc += block_mass
        start += BLOCK
        go = (start < col_hi) & (hit < 0)
    # the one block: its running mass from the mass before it
    use_last = hit < 0
    blk = tl.where(use_last, last, hit)
    base = tl.where(use_last, before_last, before_hit)
    cols = tl.maximum(blk, col_lo) + lane
    end = tl.where(blk >= 0, col_hi, col_lo)  # no block: nothing to load
    x = tl.load(row_ptr + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
    w = tl.where(x >= cut, tl.exp2((x - mx) * c2), 0.0)
    run = tl.cumsum(w, axis=0) + base
    first = tl.min(tl.where((w > 0.0) & (run > target), cols, 2**62), axis=0)
    tok = tl.where(first < 2**62, first, tl.max(tl.where(w > 0.0, cols, -1), axis=0))
    return tl.where(blk >= 0, tok, -1)


# --------------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _fused_step_rows_kernel(
    # pointers
    logits_ptr,
    x_ptr,
    pos_ptr,
    temp_ptr,
    top_p_ptr,
    top_k_ptr,
    seed_ptr,
    offset_ptr,
    u_ptr,
    conf_ptr,
    key_ptr,
    tok_ptr,
    state_ptr,
    part_f_ptr,
    part_i_ptr,
    hist_ptr,
    arrive_ptr,
    # sizes and scalar parameters
    V,
    M,
    L,
    C,
    CHUNK,
    mask_id,
    temp_val,
    top_p_val,
    top_k_val,
    alg_temp,
    key_lo,
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
    KEY_BITS: tl.constexpr,  # 16 (bf16 / fp16 logits: keys of x) or 32 (fp32: keys of z = x / T)
    U_FROM_PTR: tl.constexpr,  # tests: read each row's sampling uniform from u_ptr instead of Philox
    BLOCK_V: tl.constexpr,
    W: tl.constexpr,  # columns per group and block in pass 1 (one 16-byte load of bf16)
    BLOCK_F: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NB: tl.constexpr,
    P: tl.constexpr,
    C_POW2: tl.constexpr,
    CB: tl.constexpr,  # chunks whose windows the finisher loads at once
    ASM: tl.constexpr,  # compiled for sm_80+: pass 1b counts its window with inline PTX (see _count_window)
):
    DT: tl.constexpr = logits_ptr.dtype.element_ty
    FILTERS: tl.constexpr = TOP_P_MODE + TOP_K_MODE != 0
    WINDOW: tl.constexpr = (TOP_P_MODE + TOP_K_MODE != 0) and (KEY_BITS == 16)
    pid = tl.program_id(0).to(tl.int64)
    row = pid // C
    chunk = pid - row * C
    b = row // M
    m = row - b * M
    pos = tl.load(pos_ptr + b * stride_pb + m * stride_pm).to(tl.int64)
    valid = (pos >= 0) & (pos < L)
    row_ptr = logits_ptr + b * stride_lb + m * stride_lm

    # per-row sampling parameters
    if TEMP_MODE == 2:
        t = tl.load(temp_ptr + row * stride_t).to(tl.float32)
    else:
        t = temp_val
    sampling = t > 0
    t_safe = tl.where(sampling, t, 1.0)
    inv_t = 1.0 / t_safe
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

    # ---- pass 1: this chunk; per-group statistics (one thread's W columns), one reduction at the end ----
    c_lo = chunk * CHUNK
    c_hi = tl.minimum(c_lo + CHUNK, V)
    G: tl.constexpr = BLOCK_V // W
    g_off = tl.arange(0, G) * W  # (G,) first column of each group in a block
    cols0 = g_off[:, None] + tl.arange(0, W)[None, :]  # (G, W) contiguous along W
    c2 = 1.4426950408889634 * inv_t  # exp((x - m) / T) = exp2(x * c2 - m * c2)
    m_g = tl.full((G,), float("-inf"), dtype=tl.float32)
    b_g = tl.zeros((G,), dtype=tl.int32)
    s_g = tl.zeros((G,), dtype=tl.float32)
    h_g = tl.zeros((G,), dtype=tl.float32)
    m2_g = tl.full((G,), float("-inf"), dtype=tl.float32)
    nf_g = tl.zeros((G,), dtype=tl.int32)
    n_top = tl.zeros((G,), dtype=tl.int32)
    hist_row = hist_ptr + pid * NB
    full_end = c_lo + ((c_hi - c_lo) // BLOCK_V) * BLOCK_V
    if WINDOW:
        # pass 1a: the chunk max (and the block of each group's first maximum), from memory
        if valid:
            for start in range(c_lo, full_end, BLOCK_V):  # static: pass-1a (full blocks: unmasked, 16-byte loads)
                raw = tl.load(row_ptr + start + cols0)
                m_g, b_g = _max_block(raw, start, m_g, b_g)
            if full_end < c_hi:  # the ragged tail
                cols = full_end + cols0
                m_g, b_g = _max_block(tl.load(row_ptr + cols, mask=cols < c_hi, other=float("-inf")), full_end,
                                      m_g, b_g)  # fmt: skip
        mx = tl.max(m_g, axis=0)
        # pass 1b: the same chunk again (L1 / L2 hot): sums against mx and the window of the NB keys below it
        slots = tl.arange(0, NB)
        tl.store(hist_row + slots, tl.zeros((NB,), dtype=tl.int32))
        tl.debug_barrier()  # the zeros land before any thread's count
        top = tl.where(mx == float("-inf"), -1, _key16(mx.to(DT)))
        lo_v = tl.where(top < 0, float("inf"), _value16(tl.maximum(top - (NB - 1), key_lo), DT))
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        if valid:
            for start in range(c_lo, full_end, BLOCK_V):  # static: pass-1
                raw = tl.load(row_ptr + start + cols0)
                s_g, h_g, n_top, m2_g, nf_g = _known_max_block(
                    raw, mx_safe, c2, inv_t, s_g, h_g, n_top, m2_g, nf_g, hist_row, lo_v, NB - 1,
                    CONFIDENCE == 2, CONFIDENCE == 1, TOP_K_MODE != 0, ASM,
                )  # fmt: skip
            if full_end < c_hi:
                cols = full_end + cols0
                raw = tl.load(row_ptr + cols, mask=cols < c_hi, other=float("-inf"))
                s_g, h_g, n_top, m2_g, nf_g = _known_max_block(
                    raw, mx_safe, c2, inv_t, s_g, h_g, n_top, m2_g, nf_g, hist_row, lo_v, NB - 1,
                    CONFIDENCE == 2, CONFIDENCE == 1, TOP_K_MODE != 0, ASM,
                )  # fmt: skip
        s_c = tl.sum(s_g, axis=0)
        h_c = tl.sum(h_g, axis=0)
        m2_c = tl.where(tl.sum(n_top, axis=0) >= 2, mx, tl.max(m2_g, axis=0))
    else:
        # one online pass from memory: per-group max, sum of exp (and entropy / second max / finite count)
        if valid:
            for start in range(c_lo, full_end, BLOCK_V):  # static: pass-1
                raw = tl.load(row_ptr + start + cols0)
                m_g, b_g, s_g, h_g, m2_g, nf_g = _online_block(
                    raw, start, c2, inv_t, m_g, b_g, s_g, h_g, m2_g, nf_g,
                    CONFIDENCE == 2, CONFIDENCE == 1, FILTERS,
                )  # fmt: skip
            if full_end < c_hi:
                cols = full_end + cols0
                raw = tl.load(row_ptr + cols, mask=cols < c_hi, other=float("-inf"))
                m_g, b_g, s_g, h_g, m2_g, nf_g = _online_block(
                    raw, full_end, c2, inv_t, m_g, b_g, s_g, h_g, m2_g, nf_g,
                    CONFIDENCE == 2, CONFIDENCE == 1, FILTERS,
                )  # fmt: skip
        mx = tl.max(m_g, axis=0)
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        f = tl.exp2((m_g - mx_safe) * c2)  # (G,) each group's sums to the chunk max; 0 for empty groups
        s_c = tl.sum(f * s_g, axis=0)
        dz = tl.where(m_g == float("-inf"), 0.0, (m_g - mx_safe) * inv_t)
        h_c = tl.sum(tl.where(f > 0.0, f * (h_g + dz * s_g), 0.0), axis=0)
    # the chunk's first maximum: the winning group's block, then its W columns once more
    first_g = tl.where(m_g == mx, b_g + g_off, 2147483647)  # (G,) first column of each group's max block
    col0 = tl.min(first_g, axis=0)
    w_cols = col0 + tl.arange(0, W)
    w_end = tl.where(mx > float("-inf"), c_hi, 0)  # nothing to find in an empty chunk
    w_raw = tl.load(row_ptr + w_cols, mask=w_cols < w_end, other=float("-inf"))
    i_c = tl.min(tl.where(w_raw.to(tl.float32) == mx, w_cols, 2147483647), axis=0)
    if not WINDOW:
        winner = first_g == col0  # the group holding the first maximum; another group at mx makes M2 = mx
        m2_c = tl.maximum(tl.max(m2_g, axis=0), tl.max(tl.where(winner, float("-inf"), m_g), axis=0))
    nf_c = tl.sum(nf_g, axis=0)
    part = pid * 4
    tl.store(part_f_ptr + part, mx)
    tl.store(part_f_ptr + part + 1, s_c)
    tl.store(part_f_ptr + part + 2, h_c)
    tl.store(part_f_ptr + part + 3, m2_c)
    tl.store(part_i_ptr + pid * 2, tl.where(mx == float("-inf"), 0, i_c))
    tl.store(part_i_ptr + pid * 2 + 1, nf_c)

    # ---- arrival: the program that takes the row's last ticket finishes the row ----
    tl.debug_barrier()  # every thread's partial stores precede the release below
    ticket = tl.atomic_add(arrive_ptr + row, 1, sem="acq_rel")
    if ticket == C - 1:
        tl.atomic_xchg(arrive_ptr + row, 0)  # ready for the next call / graph replay
        cur = tl.load(x_ptr + b * stride_xb + pos * stride_xl, mask=valid, other=0)
        state = tl.where(valid, tl.where(cur == mask_id, 2, 1), 0)  # 0 padding, 1 fixed token, 2 mask
        conf = tl.full((), float("-inf"), dtype=tl.float32)
        sel_key = tl.full((), float("-inf"), dtype=tl.float32)
        x0 = tl.full((), 0, dtype=tl.int64)
        if valid:
            # ---- combine the chunks (loads bypass L1: other programs wrote them) ----
            cc = tl.arange(0, C_POW2)
            cin = cc < C
            base = row * C + cc  # (C_POW2,)
            mx_v = tl.load(part_f_ptr + base * 4, mask=cin, other=float("-inf"), cache_modifier=".cg")
            s_v = tl.load(part_f_ptr + base * 4 + 1, mask=cin, other=0.0, cache_modifier=".cg")
            h_v = tl.load(part_f_ptr + base * 4 + 2, mask=cin, other=0.0, cache_modifier=".cg")
            m2_v = tl.load(part_f_ptr + base * 4 + 3, mask=cin, other=float("-inf"), cache_modifier=".cg")
            am_v = tl.load(part_i_ptr + base * 2, mask=cin, other=2147483647, cache_modifier=".cg")
            nf_v = tl.load(part_i_ptr + base * 2 + 1, mask=cin, other=0, cache_modifier=".cg")
            MX = tl.max(mx_v, axis=0)  # the row max of x
            MX_safe = tl.where(MX == float("-inf"), 0.0, MX)
            dzc = tl.where(mx_v == float("-inf"), float("-inf"), (mx_v - MX_safe) * inv_t)
            fc = tl.exp(dzc)  # (C_POW2,)
            km = fc * s_v  # each chunk's mass relative to the row max (replaced by kept masses below)
            S = tl.sum(km, axis=0)
            H = tl.sum(tl.where(fc > 0.0, fc * (h_v + dzc * s_v), 0.0), axis=0)
            i1 = tl.min(tl.where(mx_v == MX, am_v, 2147483647), axis=0).to(tl.int64)
            win_c = (mx_v == MX) & (am_v == i1)
            M2 = tl.maximum(tl.max(m2_v, axis=0), tl.max(tl.where(win_c, float("-inf"), mx_v), axis=0))
            NF = tl.sum(nf_v, axis=0)
            m_z = _over_t(MX, t_safe, sampling, TEMP_MODE)
            x0 = tl.where(MX == float("-inf"), 0, i1)

            # kept tokens: v >= cut_v, where v = x for 16-bit keys and z for 32-bit ones
            cut_v = tl.full((), float("-inf"), dtype=tl.float32)
            kept_mass = S
            ent = H / S - tl.log(S)
            deep = tl.full((), 0, dtype=tl.int32)
            if FILTERS:
                p_on = (top_p < 1.0).to(tl.int32)
                k_on = ((k > 0) & (k < NF)).to(tl.int32)
                jj = tl.arange(0, NB)
                if ((p_on + k_on) > 0) & (MX > float("-inf")):
                    deep = tl.full((), 1, dtype=tl.int32)
                    if WINDOW:
                        # the row window: the NB largest keys; each chunk's ring covers them exactly
                        TOP = _key16(MX.to(DT))
                        kj = TOP - jj  # (NB,) keys, largest first
                        cnt = tl.zeros((NB,), dtype=tl.int32)
                        for c0 in range(0, C, CB):  # CB chunks per step: independent loads, one latency
                            cnt += tl.sum(_chunk_windows(part_f_ptr, hist_ptr, row, C, c0, kj, NB, CB, DT), axis=0)
                        zk = _over_t(_value16(tl.maximum(kj, key_lo), DT), t_safe, sampling, TEMP_MODE)
                        w = tl.where(kj >= key_lo, tl.exp(zk - m_z), 0.0)  # (NB,) weight of one token of each key
                        cw = tl.sum(cnt, axis=0)
                        sw = tl.sum(cnt.to(tl.float32) * w, axis=0)
                        fast = (cw == NF) | ((p_on != 0) & (sw / S > top_p)) | ((k_on != 0) & (cw >= k))
                        if fast:
                            deep = tl.full((), 0, dtype=tl.int32)
                            j_cut, kept_mass = _resolve_window(cnt, w, jj, 0, 0.0, S, top_p, k, p_on, k_on)
                            cut_v = _value16(TOP - j_cut, DT)
                            pk = w / kept_mass
                            ent = tl.sum(tl.where((jj <= j_cut) & (cnt > 0),
                                                  cnt.to(tl.float32) * pk * tl.log(tl.maximum(pk, 1e-10)), 0.0),
                                         axis=0)  # fmt: skip
                            # each chunk's kept mass, for the sampler
                            w_kept = tl.where(jj <= j_cut, w, 0.0)
                            km = tl.zeros((C_POW2,), dtype=tl.float32)
                            for c0 in range(0, C, CB):
                                cnt_t = _chunk_windows(part_f_ptr, hist_ptr, row, C, c0, kj, NB, CB, DT)  # (CB, NB)
                                km_t = tl.sum(cnt_t.to(tl.float32) * w_kept[None, :], axis=1)  # (CB,)
                                hit = cc[:, None] == (c0 + tl.arange(0, CB))[None, :]  # (C_POW2, CB)
                                km += tl.sum(tl.where(hit, km_t[None, :], 0.0), axis=1)
                    if deep != 0:
                        # ---- deep path: the cut lies below the window (or fp32 keys): whole row, bounded ----
                        if WINDOW:
                            hi = (TOP - NB).to(tl.int64)
                            a_cnt = cw.to(tl.int64)
                            a_mass = sw
                        else:
                            hi = _key32(m_z)
                            a_cnt = tl.full((), 0, dtype=tl.int64)
                            a_mass = tl.full((), 0.0, dtype=tl.float32)
                        lo = tl.full((), 0, dtype=tl.int64) + key_lo
                        pj = tl.arange(0, P)
                        dl = tl.arange(0, BLOCK_D)
                        while hi - lo + 1 > NB:
                            span = hi - lo + 1
                            piv = lo + (span * pj) // P  # (P,) keys; piv[0] = lo
                            piv_v = _key_value(piv, DT, KEY_BITS)
                            hi_v = _key_value(hi, DT, KEY_BITS)
                            cnt_p = tl.zeros((P,), dtype=tl.int64)
                            mass_p = tl.zeros((P,), dtype=tl.float32)
                            for start in range(0, V, BLOCK_D):
                                cols = start + dl
                                raw, xx, z, v = _load_z(row_ptr, cols, cols < V, t_safe, sampling, TEMP_MODE, KEY_BITS)
                                inb = (xx > float("-inf")) & (v <= hi_v)
                                w_e = tl.where(inb, tl.exp(z - m_z), 0.0)
                                ge = inb[:, None] & (v[:, None] >= piv_v[None, :])  # (BLOCK_D, P)
                                cnt_p += tl.sum(ge.to(tl.int64), axis=0)
                                mass_p += tl.sum(tl.where(ge, w_e[:, None], 0.0), axis=0)
                            # cut >= piv[j] iff the tokens from piv[j] up are already too many / too heavy
                            heavy = (p_on != 0) & ((a_mass + mass_p) / S > top_p)
                            above = heavy | ((k_on != 0) & (a_cnt + cnt_p >= k))
                            jn = tl.max(tl.where(above, pj, 0), axis=0)
                            nxt = pj == jn + 1
                            a_cnt += tl.sum(tl.where(nxt, cnt_p, 0), axis=0)
                            a_mass += tl.sum(tl.where(nxt, mass_p, 0.0), axis=0)
                            new_hi = tl.where(jn + 1 < P, tl.sum(tl.where(nxt, piv, 0), axis=0) - 1, hi)
                            lo = tl.sum(tl.where(pj == jn, piv, 0), axis=0)
                            hi = new_hi
                        # one window pass over the last <= NB keys of the bracket
                        cnt = tl.zeros((NB,), dtype=tl.int32)
                        fl = tl.arange(0, BLOCK_F)
                        for start in range(0, V, BLOCK_F):
                            cols = start + fl
                            raw, xx, z, v = _load_z(row_ptr, cols, cols < V, t_safe, sampling, TEMP_MODE, KEY_BITS)
                            if KEY_BITS == 16:
                                key = _key16(raw).to(tl.int64)
                            else:
                                key = _key32(z)
                            inw = (xx > float("-inf")) & (key <= hi) & (key >= lo)
                            cnt += tl.histogram((hi - key).to(tl.int32), NB, mask=inw)
                        kd = hi - jj.to(tl.int64)  # (NB,) keys of the window, largest first
                        zd = _key_value(tl.maximum(kd, lo), DT, KEY_BITS)
                        if KEY_BITS == 16:  # 16-bit keys are values of x: divide; 32-bit ones are of z already
                            zd = _over_t(zd, t_safe, sampling, TEMP_MODE)
                        wd = tl.where(kd >= lo, tl.exp(zd - m_z), 0.0)
                        j_cut, kept_mass = _resolve_window(cnt, wd, jj, a_cnt, a_mass, S, top_p, k, p_on, k_on)
                        cut_v = _key_value(hi - j_cut, DT, KEY_BITS)  # j_cut = -1: only what lies above the window

            # ---- the token ----
            if TEMP_MODE != 0:
                if sampling:
                    if U_FROM_PTR:
                        u = tl.load(u_ptr + row)
                    else:
                        u = _uniform(seed_ptr, offset_ptr, row, 0, False)
                    target = u * kept_mass
                    if deep != 0:
                        x0, ent_d = _scan(row_ptr, 0, V, cut_v, m_z, kept_mass, target, 1, CONFIDENCE == 2, t_safe,
                                          sampling, TEMP_MODE, KEY_BITS, CONFIDENCE == 2, BLOCK_F)  # fmt: skip
                        if CONFIDENCE == 2:
                            ent = ent_d
                    else:
                        # the chunk holding the target, then the token inside it (that chunk is hot in L2)
                        run = tl.cumsum(km, axis=0)
                        c_star = tl.min(tl.where((run > target) & cin, cc, C_POW2), axis=0)
                        c_last = tl.max(tl.where((km > 0.0) & cin, cc, 0), axis=0)
                        c_star = tl.where(c_star < C_POW2, c_star, c_last).to(tl.int64)
                        before = tl.sum(tl.where(cc < c_star, km, 0.0), axis=0)
                        s_lo = c_star * CHUNK
                        s_hi = tl.minimum(s_lo + CHUNK, V)
                        x0 = _sample_scan(  # static: scan
                            row_ptr, s_lo, s_hi, cut_v, MX, c2, target - before, BLOCK_S
                        )
                    x0 = tl.where(x0 < 0, i1, x0)
            if CONFIDENCE == 2:
                if FILTERS:
                    need = (deep != 0) & ((sampling == 0) | (TEMP_MODE == 0))  # greedy deep rows: entropy pass
                    if need:
                        _, ent = _scan(row_ptr, 0, V, cut_v, m_z, kept_mass, 0.0, 0, 1, t_safe, sampling,
                                       TEMP_MODE, KEY_BITS, True, BLOCK_F)  # fmt: skip

            # ---- confidence of the fresh sample and the selection key ----
            if CONFIDENCE == 0:
                z0 = _over_t(tl.load(row_ptr + x0).to(tl.float32), t_safe, sampling, TEMP_MODE)
                conf = tl.exp(z0 - m_z) / kept_mass
            elif CONFIDENCE == 1:
                z2 = _over_t(M2, t_safe, sampling, TEMP_MODE)
                if KEY_BITS == 16:
                    v2 = M2
                else:
                    v2 = z2
                p_second = tl.where((M2 > float("-inf")) & (v2 >= cut_v), tl.exp(z2 - m_z) / kept_mass, 0.0)
                conf = 1.0 / kept_mass - p_second
            else:
                conf = ent
            # no finite logit (max is -inf, sums are 0): confidence -inf, never NaN/inf, so the ranks stay sane
            conf = tl.where((MX > float("-inf")) & (conf == conf), conf, float("-inf"))
            sel_key = conf
            if NOISE != 0:
                u_row = _uniform(seed_ptr, offset_ptr, row, 1, True)
                if NOISE == 1:
                    sel_key = conf / alg_temp - tl.log(-tl.log(u_row))
                else:
                    sel_key = u_row
        tl.store(state_ptr + row, state.to(tl.int8))
        tl.store(conf_ptr + row, conf)
        tl.store(tok_ptr + row, x0)
        if NOISE != 0:
            tl.store(key_ptr + row, sel_key)


# --------------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------------

_ARRIVALS: dict[torch.device, list[Tensor]] = {}


def arrival_counters(device: torch.device, n: int) -> Tensor:
    """A per-device int32 vector of at least ``n`` counters, zero between calls.

    Allocated (zeroed) once and kept forever: the kernel's finishing program resets its counter,
    and a CUDA graph that captured a buffer keeps pointing at it, so none is ever freed.
    """
    device = torch.device(device)
    held = _ARRIVALS.setdefault(device, [])
    if not held or held[-1].numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # a zeros() captured in a graph only runs at replay: eager calls would find garbage counters
            raise RuntimeError(
                f"fused_step: first call with {n} rows inside CUDA-graph capture; run one eager call with at "
                "least as many rows first (the usual warm-up, which also compiles the kernels)"
            )
        size = max(n, 65536, 2 * held[-1].numel() if held else 0)  # 256 KiB: enough for any usual batch
        held.append(torch.zeros(size, dtype=torch.int32, device=device))
    return held[-1]


def split_rows(N: int, V: int, device: torch.device, sampled: bool, itemsize: int = 2) -> tuple[int, int, int]:
    """``(C, CHUNK, BLOCK_V)``: chunks per row so ``N * C`` fills the GPU, chunk length, pass-1 block.

    On a GPU (a :class:`dinfill.target.Target`) chunks are also kept short enough that what the programs in
    flight re-read (pass 1b, the sample scan) stays in half the L2: ``chunk * itemsize * resident programs
    <= L2 / 2``, with up to ``PROGRAMS_PER_SM`` programs per SM.
    """
    block_v = min(MAX_BLOCK_V, max(16, triton.next_power_of_2(V)))
    target = target_for(device)
    sms = target.sms if target is not None else DEFAULT_SMS
    chunks = max(1, -(-PROGRAMS_PER_SM * sms // max(N, 1)))
    if sampled:
        chunks = max(chunks, MIN_SPLIT_SAMPLED)
    chunk = max(MIN_CHUNK, -(-V // chunks))
    if target is not None:
        in_flight = PROGRAMS_PER_SM * target.sms
        chunk = min(chunk, max(MIN_CHUNK, target.l2_bytes // 2 // (in_flight * itemsize)))
    chunk = -(-chunk // block_v) * block_v  # whole blocks: only the row's last chunk has a ragged tail
    return -(-V // chunk), chunk, block_v


def _mode(value, off) -> tuple[int, Tensor | None, float | int, int]:
    """(mode, tensor, scalar, stride) of a per-row parameter: 0 off / greedy, 1 scalar, 2 tensor."""
    if isinstance(value, Tensor):
        return 2, value, 0, (value.stride(0) if value.dim() == 1 else 0)
    if value is None or off(value):
        return 0, None, 0, 0
    return 1, None, value, 0


@functools.cache
def _lowest_finite_key(dtype: torch.dtype) -> int:
    """Key of the most negative finite value (keys below it are -inf and NaNs); a constant per dtype, so cached
    rather than rebuilt from CPU tensors on every step."""
    if dtype == torch.float32:
        bits = torch.tensor([-torch.finfo(torch.float32).max]).view(torch.int32).item()
        return (bits ^ 0x7FFFFFFF) + 2**31
    bits = torch.tensor([-torch.finfo(dtype).max], dtype=dtype).view(torch.int16).item() & 0xFFFF
    return bits ^ 0xFFFF


def launch_rows(
    logits: Tensor,
    x: Tensor,
    positions: Tensor,
    opts: FusedStepOptions,
    seed: Tensor | None,
    offset: Tensor | None,
    uniforms: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the row phase. Returns ``(conf, key, tok, state)``, each ``(B*M,)``.

    ``seed`` / ``offset`` (1-element int64 tensors on ``x.device``) must be set whenever the call
    samples or draws a per-row selection noise. ``uniforms`` (tests only): a ``(B*M,)`` fp32 tensor of
    the sampling uniforms to use instead of Philox, so the map uniform -> token can be checked exactly.
    """
    if logits.stride(-1) != 1:
        raise ValueError("fused_step: logits need unit stride along the vocabulary; pass logits.contiguous()")
    if logits.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"fused_step: logits dtype {logits.dtype} is not supported; pass bf16, fp16 or fp32")
    if x.dtype != torch.int64 or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError("fused_step: need an int64 canvas and int32/int64 positions")
    if not (logits.device == x.device == positions.device):
        raise ValueError("fused_step: logits, x and positions must be on one device; move them together")
    dev = x.device
    B, L = x.shape
    M = positions.shape[1]
    V = logits.shape[-1]
    N = B * M
    if logits.dim() == 3:
        stride_lb, stride_lm = logits.stride(0), logits.stride(1)
    else:
        stride_lb, stride_lm = M * logits.stride(0), logits.stride(0)

    temp_mode, temp_t, temp_val, stride_t = _mode(opts.temperature, lambda v: v <= 0)
    top_p_mode, top_p_t, top_p_val, stride_tp = _mode(opts.top_p, lambda v: v >= 1)
    top_k_mode, top_k_t, top_k_val, stride_tk = _mode(opts.top_k, lambda v: v <= 0)
    if temp_mode and (seed is None or offset is None):
        raise ValueError("fused_step: a sampling call needs seed and offset tensors on the Triton path")
    noise = opts.row_noise
    if noise and seed is None:
        raise ValueError("fused_step: alg_temp / bernoulli need seed and offset tensors on the Triton path")
    key_bits = 32 if logits.dtype == torch.float32 else 16
    window = (top_p_mode or top_k_mode) and key_bits == 16
    C, chunk, block_v = split_rows(N, V, dev, sampled=temp_mode != 0, itemsize=logits.element_size())
    target = target_for(dev)
    nb = WINDOW_KEYS
    if not (16 <= PIVOTS <= nb and nb & (nb - 1) == 0 and PIVOTS & (PIVOTS - 1) == 0):
        raise ValueError("fused_step: WINDOW_KEYS and PIVOTS must be powers of two with 16 <= PIVOTS <= WINDOW_KEYS")

    c_pow2 = max(2, triton.next_power_of_2(-(-V // MIN_CHUNK)))  # >= C; depends on V only: fewer variants
    conf = torch.empty(N, dtype=torch.float32, device=dev)
    tok = torch.empty(N, dtype=torch.int64, device=dev)
    state = torch.empty(N, dtype=torch.int8, device=dev)
    key = torch.empty_like(conf) if noise else conf
    part_f = torch.empty(N * C * 4, dtype=torch.float32, device=dev)
    part_i = torch.empty(N * C * 2, dtype=torch.int32, device=dev)
    hist = torch.empty(N * C * nb if window else 1, dtype=torch.int32, device=dev)
    arrive = arrival_counters(dev, N)
    if seed is None:  # nothing random in this call: any readable int64 will do
        seed = offset = tok
    if uniforms is not None and (uniforms.shape != (N,) or uniforms.dtype != torch.float32 or uniforms.device != dev):
        raise ValueError(f"launch_rows: uniforms must be a ({N},) fp32 tensor on {dev}")

    with device_context(x):
        _fused_step_rows_kernel[(N * C,)](
            logits,
            x,
            positions,
            temp_t if temp_t is not None else conf,
            top_p_t if top_p_t is not None else conf,
            top_k_t if top_k_t is not None else tok,
            seed,
            offset,
            uniforms if uniforms is not None else conf,
            conf,
            key,
            tok,
            state,
            part_f,
            part_i,
            hist,
            arrive,
            V,
            M,
            L,
            C,
            chunk,
            opts.mask_id,
            float(temp_val),
            float(top_p_val),
            int(top_k_val),
            float(opts.alg_temp),
            _lowest_finite_key(logits.dtype),
            stride_lb,
            stride_lm,
            x.stride(0),
            x.stride(1),
            positions.stride(0),
            positions.stride(1),
            stride_t,
            stride_tp,
            stride_tk,
            CONFIDENCE=CONFIDENCES.index(opts.confidence),
            TEMP_MODE=temp_mode,
            TOP_P_MODE=top_p_mode,
            TOP_K_MODE=top_k_mode,
            NOISE=noise,
            KEY_BITS=key_bits,
            U_FROM_PTR=uniforms is not None,
            BLOCK_V=block_v,
            W=min(GROUP_W, block_v),
            BLOCK_F=BLOCK_F,
            BLOCK_S=BLOCK_S,
            BLOCK_D=BLOCK_D,
            NB=nb,
            P=PIVOTS,
            C_POW2=c_pow2,
            CB=min(FINISH_CHUNKS, c_pow2),
            ASM=window and target is not None and target.arch >= 80,  # max.bf16x2 / f16x2 need sm_80
            num_warps=8 if block_v >= 2048 else 4,
        )
    return conf, key, tok, state
