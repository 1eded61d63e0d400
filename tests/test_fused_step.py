"""fused_step: the Triton kernels and the torch path against the reference in dinfill/kernels/reference.py.

The op runs on CUDA when there is one (compiled kernels: the only place where the split rows' arrival
counters meet real concurrency), else through Triton's interpreter on the CPU; the reference always runs on
the CPU.

Exact checks use logits drawn without replacement from values every dtype represents exactly, so
no two logits of a row tie and no two rows share a confidence. The sampled path (distribution, kept
set, split rows, replays) is tested in test_fused_step_sampling.py. The interpreter is slow (each
reduction costs milliseconds): big shapes run greedy only, and the block sizes are set so V=1031 walks
two full blocks and a ragged tail in one program per row; rows split across programs and the deep path
have their own tests.
"""

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fused_step_helpers import MASK, kept_distribution, step
from fused_step_helpers import i64 as _t

from dinfill.kernels import fused_step
from dinfill.kernels.reference import _fp32_count, fused_step_ref, sample_tokens_ref

fs = importlib.import_module("dinfill.kernels.fused_step_kernel")
# the interpreter computes masked -inf lanes with numpy, which warns about values the kernels then discard
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
rows_mod = importlib.import_module("dinfill.kernels.fused_step_rows")
select_mod = importlib.import_module("dinfill.kernels.fused_step_select")

BACKENDS = ["torch", "triton"]
FILTERS = {"none": {}, "top_p": {"top_p": 0.8}, "top_k": {"top_k": 7}, "both": {"top_p": 0.9, "top_k": 4}}


def use_backend(monkeypatch, name: str) -> str:
    """Route fused_step to the torch path or to the Triton kernels (small blocks for the interpreter)."""
    monkeypatch.setenv("DINFILL_BACKEND", name)
    monkeypatch.setattr(rows_mod, "MAX_BLOCK_V", 512)  # V=1031: two full blocks, then a ragged tail
    monkeypatch.setattr(rows_mod, "MIN_CHUNK", 1 << 20)  # one program per row (split rows: the sampling tests)
    monkeypatch.setattr(rows_mod, "MIN_SPLIT_SAMPLED", 1)
    monkeypatch.setattr(rows_mod, "BLOCK_F", 512)
    monkeypatch.setattr(rows_mod, "BLOCK_S", 512)
    monkeypatch.setattr(rows_mod, "BLOCK_D", 256)
    monkeypatch.setattr(select_mod, "BLOCK_ROWS", 16)
    monkeypatch.setattr(fs, "_TORCH_CANDIDATES", 16)  # torch path: both the top-16 shortcut and the full sort run
    return name


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run a test through the torch path and through the Triton kernels."""
    return use_backend(monkeypatch, request.param)


def _pool() -> torch.Tensor:
    """Every bf16 value with 2**-4 <= |v| <= 12: exact in bf16, fp16 and fp32, and all distinct."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.bfloat16).float()
    keep = torch.isfinite(values) & (values.abs() >= 2**-4) & (values.abs() <= 12)
    return values[keep].unique()


POOL = _pool()


def distinct_logits(n: int, v: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``(n, v)`` logits whose values in each row are all different."""
    rows = [POOL[torch.randperm(POOL.numel(), generator=gen)[:v]] for _ in range(n)]
    return torch.stack(rows).to(dtype)


def make_canvas(B: int, M: int, L: int, gen: torch.Generator, *, masked: float = 0.7, pad: int = 0):
    """Canvas ``(B, L)`` and positions ``(B, M)``: unique columns, ``pad`` trailing -1 rows in the last sequence."""
    x = torch.randint(0, 1000, (B, L), generator=gen)
    x[torch.rand(B, L, generator=gen) < masked] = MASK
    positions = torch.stack([torch.randperm(L, generator=gen)[:M] for _ in range(B)])
    if pad:
        positions[-1, M - pad :] = -1
    return x, positions


def both(logits, x, positions, **kw):
    """Run fused_step (on DEV) and the reference (on the CPU) on copies of the canvas."""
    x_out, x_ref = x.clone(), x.clone()
    conf = step(logits, x_out, positions, mask_id=MASK, **kw)
    conf_ref = fused_step_ref(logits, x_ref, positions, mask_id=MASK, **kw)
    return conf, x_out, conf_ref, x_ref


def assert_conf_close(conf, conf_ref):
    # fp32 sums in another order: a few ulps of the largest term (no low-precision step involved)
    torch.testing.assert_close(conf, conf_ref, rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------------------------------------
# exact agreement with the reference (greedy)
# ------------------------------------------------------------------------------------------------

ROW_CASES = [  # (B, M, L, V, dtype, filters): the interpreter pays per row, so big shapes run fewer filters
    (1, 1, 1, 111, torch.float32, list(FILTERS)),
    (1, 7, 17, 111, torch.bfloat16, list(FILTERS)),
    (1, 7, 17, 1031, torch.float16, list(FILTERS)),
    (1, 97, 97, 1031, torch.bfloat16, ["none"]),
]
ROW_PARAMS = [(case, conf) for case in ROW_CASES for conf in ("prob", "margin", "neg_entropy")]
ROW_PARAMS = [(case, conf) for case, conf in ROW_PARAMS if case[1] < 97 or conf == "prob"]  # 97 rows: prob only


def _row_id(v) -> str:
    return v if isinstance(v, str) else f"B{v[0]}M{v[1]}L{v[2]}V{v[3]}-{str(v[4])[6:]}"


@pytest.mark.parametrize("case,confidence", ROW_PARAMS, ids=_row_id)
def test_greedy_rows_match_reference(backend, case, confidence):
    """p2 with count 0 writes every masked row's token: tokens and confidences of every row."""
    B, M, L, V, dtype, filters = case
    gen = torch.Generator().manual_seed(B * 1000 + M * 10 + V)
    logits = distinct_logits(B * M, V, dtype, gen)
    x, positions = make_canvas(B, M, L, gen, masked=1.0, pad=1 if M > 1 else 0)
    for name in filters:
        conf, x_out, conf_ref, x_ref = both(
            logits,
            x,
            positions,
            select="p2",
            count=torch.zeros(B, dtype=torch.long),
            confidence=confidence,
            **FILTERS[name],
        )
        assert torch.equal(x_out, x_ref), name
        assert_conf_close(conf, conf_ref)
        if M > 1:
            assert torch.isneginf(conf[-1]), "padding rows report -inf"


SELECT_CASES = [  # (select, confidence, arguments): the selection kernel does not care which confidence
    ("topk", "prob", {"count": [2, 9, 0]}),
    ("topk", "margin", {"fraction": 0.6}),
    ("topk", "neg_entropy", {"fraction": [0.25, 1.0, 0.5]}),
    ("threshold", "prob", {"threshold": 0.2}),
    ("threshold", "neg_entropy", {"threshold": -2.0}),
    ("threshold", "margin", {"threshold": 1.0}),  # nothing passes: exactly the most confident one per sequence
    ("factor", "prob", {"factor": 2.0}),
    ("factor", "neg_entropy", {"factor": 0.01}),
    ("p2", "prob", {"count": [3, 1, 30]}),
    ("p2", "margin", {"fraction": 0.5}),
]


@pytest.mark.parametrize("select,confidence,extra", SELECT_CASES, ids=lambda v: str(v))
def test_selection_matches_reference(backend, select, confidence, extra):
    B, M, L, V = 3, 20, 37, 111
    gen = torch.Generator().manual_seed(7)
    logits = distinct_logits(B * M, V, torch.bfloat16, gen)
    x, positions = make_canvas(B, M, L, gen, masked=0.6, pad=4)
    kw = {k: (torch.tensor(v) if isinstance(v, list) else v) for k, v in extra.items()}
    conf, x_out, conf_ref, x_ref = both(logits, x, positions, select=select, confidence=confidence, **kw)
    assert torch.equal(x_out, x_ref)
    assert_conf_close(conf, conf_ref)
    assert not torch.equal(x_out, x), "the case must change the canvas"


def test_ties_go_to_the_lowest_id_and_position(backend):
    """Documented tie rules: argmax -> lowest token id; selection -> lowest canvas position;
    top-p keeps every token tied with the last one it keeps."""
    V = 111
    logits = torch.full((6, V), -4.0)
    logits[:, 40] = logits[:, 17] = 7.0  # every row: two equal maxima
    positions = torch.tensor([[9, 2, 7, 4, 11, 0]])
    for select, count in (("topk", 2), ("p2", 2)):
        x = torch.full((1, 12), MASK)
        conf = step(logits, x, positions, mask_id=MASK, select=select, count=torch.tensor([count]), confidence="margin")
        assert (conf == 0).all(), "margin of a tie at the top is 0"
        expected = torch.full((12,), MASK)
        fills = [0, 2] if select == "topk" else [4, 7, 9, 11]  # topk reveals, p2 re-masks, the lowest positions
        expected[fills] = 17
        assert torch.equal(x[0], expected), select

    row = torch.full((1, V), float("-inf"))
    row[0, :5] = torch.tensor([4.0, 2.0, 2.0, 2.0, 0.0])
    top_p = 0.85
    sorted_probs = torch.softmax(row[0, :5], dim=0)
    cumulative = sorted_probs.cumsum(0)
    # a plain sorted prefix would keep 4.0 and two of the 2.0s (cumulative[2] > top_p removes the third)
    assert cumulative[1] <= top_p < cumulative[2]
    x = torch.full((1, 1), MASK)
    conf = step(row, x, torch.tensor([[0]]), mask_id=MASK, select="p2", count=torch.tensor([0]), top_p=top_p)
    kept = sorted_probs[:4]  # 4.0 and all three 2.0s
    torch.testing.assert_close(conf, (kept[0] / kept.sum())[None], rtol=2e-6, atol=0)


def test_alg_temp_tiny_equals_plain_topk(backend):
    """With alg_temp -> 0 the Gumbel perturbation cannot reorder distinct confidences."""
    B, M, L, V = 2, 9, 17, 111
    gen = torch.Generator().manual_seed(11)
    logits = distinct_logits(B * M, V, torch.float32, gen)
    x, positions = make_canvas(B, M, L, gen, masked=1.0)
    count = torch.tensor([4, 7])
    x_noisy, x_plain = x.clone(), x.clone()
    step(logits, x_noisy, positions, mask_id=MASK, select="topk", count=count, alg_temp=1e-9, seed=_t(1), offset=_t(0))
    step(logits, x_plain, positions, mask_id=MASK, select="topk", count=count)
    assert torch.equal(x_noisy, x_plain)
    assert ((x_plain != MASK).sum(1) == count).all()


def test_fp32_count_is_truncated_in_fp32(backend):
    """count = trunc(fp32(n) * fraction) in fp32: pick a case where float64 would give one less."""
    case = None
    for n in range(2, 98):
        for k in range(1, n):
            f = torch.nextafter(torch.tensor(k / n, dtype=torch.float32), torch.tensor(0.0))  # just below k/n
            if _fp32_count(n, f.item()) != math.floor(n * f.item()):
                case = (n, f.item())
                break
        if case:
            break
    assert case is not None, "no discriminating (n, fraction) found"
    n, f = case
    expected = _fp32_count(n, f)
    logits = distinct_logits(n, 111, torch.float32, torch.Generator().manual_seed(0))
    x = torch.full((1, n), MASK)
    step(logits, x, torch.arange(n)[None], mask_id=MASK, select="topk", fraction=f)
    assert (x != MASK).sum().item() == expected != math.floor(n * f)


# ------------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------------


def test_inf_and_huge_logits(backend):
    """-inf entries are never chosen and never counted; huge finite values do not overflow."""
    V = 111
    gen = torch.Generator().manual_seed(3)
    logits = distinct_logits(6, V, torch.float32, gen)
    logits[0, 5:] = float("-inf")  # five finite tokens
    logits[1, :-1] = float("-inf")  # a single finite token, the last one
    logits[2] = logits[2] * 3e37  # values up to 3.6e38: differences overflow to -inf
    logits[3, ::2] = float("-inf")
    logits[3, 1] = -3.0e38
    logits[4] = logits[4] * 1e30
    x, positions = make_canvas(1, 6, 6, gen, masked=1.0)
    for kw in ({}, {"top_p": 0.5}, {"top_k": 3}):
        for confidence in ("prob", "margin", "neg_entropy"):
            conf, x_out, conf_ref, x_ref = both(
                logits, x, positions, select="p2", count=torch.tensor([0]), confidence=confidence, **kw
            )
            assert torch.equal(x_out, x_ref)
            assert_conf_close(conf, conf_ref)
            assert torch.isfinite(conf).all()
    x_out = x.clone()
    step(
        logits,
        x_out,
        positions,
        mask_id=MASK,
        select="p2",
        count=torch.tensor([0]),
        temperature=2.0,  # logits must stay finite after the division
        top_k=50,
        seed=_t(5),
        offset=_t(1),
    )
    chosen = logits.gather(1, x_out[0, positions[0]][:, None])
    assert torch.isfinite(chosen).all()
    assert x_out[0, positions[0, 1]].item() == V - 1


def test_row_without_finite_logit_ranks_last(backend):
    """A row whose logits are all -inf gets confidence -inf (not NaN), so the other rows still rank right."""
    V = 111
    gen = torch.Generator().manual_seed(11)
    logits = distinct_logits(7, V, torch.float32, gen)
    logits[2] = float("-inf")
    x, positions = make_canvas(1, 7, 9, gen, masked=1.0)
    for confidence in ("prob", "margin", "neg_entropy"):
        for select, kw in (("topk", {"count": torch.tensor([3])}), ("p2", {"count": torch.tensor([2])})):
            conf, x_out, conf_ref, x_ref = both(logits, x, positions, select=select, confidence=confidence, **kw)
            assert conf[2].item() == float("-inf") and not torch.isnan(conf).any()
            assert torch.equal(x_out, x_ref)
            assert_conf_close(conf, conf_ref)


def test_rows_with_nothing_masked(backend):
    B, M, L, V = 2, 7, 17, 111
    gen = torch.Generator().manual_seed(4)
    logits = distinct_logits(B * M, V, torch.bfloat16, gen)
    x, positions = make_canvas(B, M, L, gen, masked=0.0)
    for select, kw in (
        ("topk", {"count": torch.tensor([3, 3])}),
        ("threshold", {}),
        ("factor", {}),
        ("bernoulli", {"fraction": 1.0}),
    ):
        x_out = x.clone()
        conf = step(logits, x_out, positions, mask_id=MASK, select=select, **kw)
        assert torch.equal(x_out, x), select
        assert torch.isfinite(conf).all() and (conf > 0).all()
    # p2 treats every row as variable: it re-masks the least confident ones even if none is a mask
    conf, x_out, conf_ref, x_ref = both(logits, x, positions, select="p2", count=torch.tensor([2, 0]))
    assert torch.equal(x_out, x_ref)
    assert (x_out == MASK).sum().item() == 2


def test_counts_larger_than_candidates(backend):
    B, M, L, V = 2, 7, 17, 111
    gen = torch.Generator().manual_seed(5)
    logits = distinct_logits(B * M, V, torch.float32, gen)
    x, positions = make_canvas(B, M, L, gen, masked=0.5)
    masked_rows = x.gather(1, positions) == MASK
    x_out = x.clone()
    step(logits, x_out, positions, mask_id=MASK, select="topk", count=torch.tensor([1000, 8]))
    assert not (x_out.gather(1, positions) == MASK).any(), "every masked row was revealed"
    assert torch.equal(x_out.gather(1, positions)[~masked_rows], x.gather(1, positions)[~masked_rows])
    x_out = x.clone()
    step(logits, x_out, positions, mask_id=MASK, select="p2", count=torch.tensor([1000, -5]))
    assert (x_out.gather(1, positions)[0] == MASK).all(), "count > rows re-masks all of them"
    assert not (x_out.gather(1, positions)[1] == MASK).any(), "a negative count re-masks nothing"


def test_bernoulli_extremes_and_rate(backend):
    """Per-sequence reveal probabilities 0, 1 and 0.3 in one call."""
    B, M, V = 16, 10, 16
    gen = torch.Generator().manual_seed(6)
    logits = distinct_logits(B * M, V, torch.float32, gen)
    x = torch.full((B, M), MASK)
    positions = torch.arange(M).expand(B, M).contiguous()
    fraction = torch.tensor([0.0] * 3 + [1.0] * 3 + [0.3] * 10)
    step(logits, x, positions, mask_id=MASK, select="bernoulli", fraction=fraction, seed=_t(9), offset=_t(2))
    revealed = (x != MASK).sum(dim=1)  # (B,)
    assert (revealed[:3] == 0).all() and (revealed[3:6] == M).all()
    rate = revealed[6:].sum().item()  # binomial(100, 0.3): mean 30, sd 4.6
    assert 30 - 4 * 4.6 <= rate <= 30 + 4 * 4.6, rate


# ------------------------------------------------------------------------------------------------
# sampling with per-row parameters, determinism (distribution: test_fused_step_sampling.py)
# ------------------------------------------------------------------------------------------------


def test_per_row_parameters(backend):
    """Per-row tensors: greedy rows equal the reference; sampled rows stay inside their own filter."""
    N, V = 12, 111
    gen = torch.Generator().manual_seed(12)
    logits = distinct_logits(N, V, torch.bfloat16, gen)
    temperature = torch.tensor([0.0, 0.7, 0.0, 1.3] * 3)
    top_p = torch.tensor([0.5, 0.6, 1.0, 0.9, 0.3, -0.5] * 2)  # < 0 keeps the top token only
    top_k = torch.tensor([0, 3, 9, 0] * 3)
    x = torch.full((1, N), MASK)
    positions = torch.arange(N)[None]
    conf = step(
        logits,
        x,
        positions,
        mask_id=MASK,
        select="p2",
        count=torch.tensor([0]),
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        generator=torch.Generator().manual_seed(0),
    )
    for r in range(N):
        t, p, k = temperature[r].item(), top_p[r].item(), int(top_k[r])
        c_ref, x0_ref = sample_tokens_ref(logits[r : r + 1], temperature=0.0, top_p=p, top_k=k)
        if t == 0:
            assert x[0, r] == x0_ref[0]
            assert_conf_close(conf[r : r + 1], c_ref)
        else:
            probs = kept_distribution(logits[r], t, top_p=p, top_k=k)  # (V,) float64
            assert probs[x[0, r]] > 0
            torch.testing.assert_close(conf[r].double(), probs[x[0, r]], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("source", ["seed", "generator"])
def test_same_seed_same_result(backend, source):
    B, M, L, V = 2, 5, 17, 111
    gen = torch.Generator().manual_seed(13)
    logits = distinct_logits(B * M, V, torch.float16, gen) / 4
    x, positions = make_canvas(B, M, L, gen, masked=0.8)

    def run(stream: int):
        rng = (
            {"seed": _t(77), "offset": _t(stream)}
            if source == "seed"
            else {"generator": torch.Generator().manual_seed(77 + stream)}
        )
        x_out = x.clone()
        conf = step(
            logits,
            x_out,
            positions,
            mask_id=MASK,
            select="topk",
            count=torch.tensor([3, 3]),
            temperature=1.0,
            top_p=0.95,
            alg_temp=0.5,
            **rng,
        )
        return x_out, conf

    x_a, conf_a = run(0)
    x_b, conf_b = run(0)
    assert torch.equal(x_a, x_b) and torch.equal(conf_a, conf_b)
    x_c, _ = run(1)
    assert not torch.equal(x_a, x_c), "another stream must give other samples"


# ------------------------------------------------------------------------------------------------
# input validation
# ------------------------------------------------------------------------------------------------


def _ok_args():
    return torch.randn(6, 11), torch.full((2, 5), MASK), torch.tensor([[0, 1, 2], [1, 2, -1]])


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.update(logits=torch.randn(5, 11)), r"not \(B\*M=6, V\)"),
        (lambda a: a.update(logits=torch.randn(2, 4, 11)), r"do not match positions"),
        (lambda a: a.update(logits=torch.randn(6, 11).double()), r"dtype torch.float64 is not supported"),
        (lambda a: a.update(x=torch.full((2, 5), MASK, dtype=torch.int32)), r"x must be a \(B, L\) int64"),
        (lambda a: a.update(positions=torch.zeros(3, 3, dtype=torch.long)), r"positions must be \(B=2, M\)"),
        (lambda a: a.update(positions=torch.zeros(2, 3)), r"int32/int64"),
        (lambda a: a.update(logits=torch.randn(6, 11, device="meta")), r"logits is on meta but x is on cpu"),
        (lambda a: a.update(select="greedy"), r"select='greedy' is not one of"),
        (lambda a: a.update(confidence="entropy"), r"confidence='entropy' is not one of"),
        (lambda a: a.update(count=None), r"needs count or fraction"),
        (lambda a: a.update(fraction=0.5), r"both count and fraction"),
        (lambda a: a.update(count=torch.tensor([1, 2, 3])), r"count has shape \(3,\), expected \(\) or \(2,\)"),
        (lambda a: a.update(count=torch.tensor([1.0, 2.0])), r"count has dtype torch.float32"),
        (lambda a: a.update(temperature=-1.0), r"temperature=-1.0 is out of range"),
        (lambda a: a.update(temperature=torch.ones(5)), r"temperature has shape \(5,\)"),
        (lambda a: a.update(top_k=torch.ones(6)), r"top_k has dtype"),
        (lambda a: a.update(alg_temp=1.0, select="threshold", count=None), r"alg_temp is only used by select='topk'"),
        (lambda a: a.update(seed=_t(1)), r"seed and offset go together"),
        (lambda a: a.update(seed=torch.tensor([1.0]), offset=_t(0)), r"seed must be a 1-element int64"),
        (lambda a: a.update(select="bernoulli", count=None), r"needs fraction"),
        (lambda a: a.update(mask_id=3.0), r"mask_id must be an int"),
        (lambda a: a.update(temperature=torch.ones(6, dtype=torch.bool)), r"temperature has dtype torch.bool"),
        (lambda a: a.update(count=None, fraction=-0.5), r"fraction=-0.5 is out of range"),
        (lambda a: a.update(top_p=float("nan")), r"top_p=nan is out of range"),
    ],
)
def test_bad_input_is_named(backend, change, message):
    logits, x, positions = _ok_args()
    args = dict(logits=logits, x=x, positions=positions, mask_id=MASK, select="topk", count=torch.tensor([1, 1]))
    change(args)
    with pytest.raises(ValueError, match=message):
        fused_step(**args)


def test_triton_path_rejects_non_unit_vocab_stride(monkeypatch):
    monkeypatch.setenv("DINFILL_BACKEND", "triton")
    logits, x, positions = _ok_args()
    with pytest.raises(ValueError, match="unit stride along the vocabulary"):
        step(logits.t().contiguous().t(), x, positions, mask_id=MASK, select="threshold")


def test_empty_batch(backend):
    conf = fused_step(
        torch.randn(0, 11),
        torch.zeros(0, 4, dtype=torch.long),
        torch.zeros(0, 3, dtype=torch.long),
        mask_id=MASK,
        select="threshold",
    )
    assert conf.shape == (0,) and conf.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# the kernels also compile for a real GPU (the interpreter does not type-check like the compiler)
# ------------------------------------------------------------------------------------------------


COMPILE_CHECK = """
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if "nvidia" not in importlib.import_module("triton.backends").backends:
    sys.exit(3)
rows = importlib.import_module("dinfill.kernels.fused_step_rows")
select = importlib.import_module("dinfill.kernels.fused_step_select")
ptr = lambda names, ty: dict.fromkeys(names, ty)


def row_sig(dtype):
    sig = ptr(["logits_ptr"], "*" + dtype) | ptr(["x_ptr", "pos_ptr", "top_k_ptr", "tok_ptr"], "*i64")
    sig |= ptr(["seed_ptr", "offset_ptr"], "*i64")
    sig |= ptr(["temp_ptr", "top_p_ptr", "u_ptr", "conf_ptr", "key_ptr", "part_f_ptr"], "*fp32") | {"state_ptr": "*i8"}
    sig |= ptr(["part_i_ptr", "hist_ptr", "arrive_ptr"], "*i32")
    sig |= ptr(["V", "M", "L", "C", "CHUNK", "mask_id", "top_k_val", "key_lo"], "i32")
    sig |= ptr(["temp_val", "top_p_val", "alg_temp"], "fp32")
    sig |= ptr(["stride_lb", "stride_lm", "stride_xb", "stride_xl", "stride_pb", "stride_pm"], "i64")
    return sig | ptr(["stride_t", "stride_tp", "stride_tk"], "i32")


sel_sig = ptr(["x_ptr", "pos_ptr", "tok_ptr", "count_ptr"], "*i64") | ptr(["key_ptr", "frac_ptr"], "*fp32")
sel_sig |= {"state_ptr": "*i8"} | ptr(["M", "mask_id", "count_val"], "i32") | ptr(["frac_val", "tau", "factor"], "fp32")
sel_sig |= ptr(["stride_xb", "stride_xl", "stride_pb", "stride_pm", "stride_c", "stride_f"], "i32")
base = dict(CONFIDENCE=0, TEMP_MODE=0, TOP_P_MODE=0, TOP_K_MODE=0, NOISE=0, KEY_BITS=16, U_FROM_PTR=False,
            BLOCK_V=4096, W=8, BLOCK_F=rows.BLOCK_F, BLOCK_S=rows.BLOCK_S, BLOCK_D=rows.BLOCK_D, NB=rows.WINDOW_KEYS,
            P=rows.PIVOTS,
            C_POW2=64, CB=8, ASM=False)
row_variants = [  # every constexpr switch is on in at least one of them, with the launcher's real block sizes
    ("bf16", base),  # greedy prob: the bandwidth-bound pass alone
    ("bf16", base | dict(CONFIDENCE=1, TEMP_MODE=1, TOP_P_MODE=1, ASM=True)),  # sampled top-p, margin: window
    ("bf16", base | dict(CONFIDENCE=2, TEMP_MODE=2, TOP_P_MODE=2, TOP_K_MODE=2, NOISE=1, U_FROM_PTR=True)),
    ("fp16", base | dict(TOP_K_MODE=1, NOISE=2, ASM=True)),
    ("fp32", base | dict(KEY_BITS=32, CONFIDENCE=2, TEMP_MODE=1, TOP_P_MODE=1, TOP_K_MODE=1)),  # deep path only
]
# the launcher specialises pointers and the row / chunk sizes as multiples of 16 (V = 151936 is one): with
# that, pass 1 must load 16 bytes at a time
names = rows._fused_step_rows_kernel.arg_names
div16 = {(names.index(n),): [["tt.divisibility", 16]] for n in names
         if n.endswith("_ptr") or n in ("V", "CHUNK", "stride_lb", "stride_lm")}
for dtype, consts in row_variants:
    src = ASTSource(rows._fused_step_rows_kernel, row_sig(dtype) | dict.fromkeys(consts, "constexpr"),
                    constexprs=consts, attrs=div16)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert k.asm["cubin"] and "ld.global.v4" in k.asm["ptx"], (dtype, consts)
for consts in (dict(SELECT=3, COUNT_MODE=4), dict(SELECT=2, COUNT_MODE=1), dict(SELECT=4, COUNT_MODE=3)):
    consts |= dict(BLOCK_I=64, BLOCK_J=64)
    src = ASTSource(select._fused_step_select_kernel, sel_sig | dict.fromkeys(consts, "constexpr"), constexprs=consts)
    assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["cubin"]
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The interpreter does not type-check like the compiler: compile real sm_90 binaries of every kernel and
    constexpr switch, no GPU needed, and check that pass 1 streams the logits with 16-byte loads."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", COMPILE_CHECK], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode == 3:
        pytest.skip("this triton build has no NVIDIA backend to compile for")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def test_package_exports_the_function_whatever_the_import_order():
    """``from dinfill.kernels import fused_step`` is the op (contract) even after the submodule was imported."""
    script = (
        "import types, dinfill.kernels.fused_step_kernel, dinfill.kernels.attention_fwd\n"
        "from dinfill.kernels import fused_step\n"
        "assert not isinstance(fused_step, types.ModuleType) and fused_step.__name__ == 'fused_step', fused_step\n"
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
