"""The decoder's fused Triton kernels (add_norm, rope_cache, activation, skinny_linear) against their specs.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``); with
CUDA the same tests run the compiled kernels on CUDA tensors. Shapes are odd (1, 97, 257 rows; hidden 97;
head dim 12) and every dtype is covered. The tolerance rule is the style guide's: the kernel's error against
the fp32 reference stays within twice torch's own low-precision error plus a small absolute slack, and the
bound is checked to be small next to the values, so no check passes vacuously. Where the kernels round
exactly where torch rounds (the residual sum, the v copy) the check is bit equality.

The last test compiles add_norm, rope_cache and activation for sm_90 in every dtype and in the variants the
runtime launches, in a subprocess: the interpreter does not type-check like the real compiler. Attention and
skinny_linear are compiled as their launchers configure them, for sm_80 / 86 / 89 / 90, by test_kernel_fit.py.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinfill.kernels.activation_kernel import activation
from dinfill.kernels.add_norm_kernel import add_norm
from dinfill.kernels.reference import activation_ref, add_norm_ref, rope_cache_ref, skinny_linear_ref
from dinfill.kernels.rope_cache_kernel import rope_cache
from dinfill.kernels.skinny_linear_kernel import skinny_config, skinny_linear
from dinfill.kernels.skinny_linear_kernel import smem_estimate as skinny_smem_estimate
from dinfill.models.decoder import rope_table
from dinfill.target import TARGETS, Target, Unservable, static_target

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-4}  # one rounding of a ~1 value, or less


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)


def assert_rule(out, ref32, low, dtype, what=""):
    """|kernel - ref32| <= 2 |torch low precision - ref32| + atol, and the bound is tight next to the values."""
    assert out.dtype == dtype and out.shape == ref32.shape, f"{what}: {out.dtype} {tuple(out.shape)}"
    assert torch.isfinite(out).all(), f"{what}: NaN/inf"
    err = (out.float() - ref32.float()).abs().max().item()
    torch_err = (low.float() - ref32.float()).abs().max().item()
    bound = 2 * torch_err + ATOL[dtype] * max(1.0, ref32.abs().max().item())
    assert err <= bound, f"{what}: kernel error {err:.3g} > bound {bound:.3g} (torch error {torch_err:.3g})"
    scale = ref32.abs().max().item()
    assert bound < 0.05 * max(scale, 1e-3), f"{what}: tolerance {bound:.3g} is loose next to values {scale:.3g}"


# ------------------------------------------------------------------------------------------------
# add_norm
# ------------------------------------------------------------------------------------------------

NORMS = ["rms", "layernorm", "layernorm-nobias"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,H", [(1, 896), (97, 97), (257, 64)], ids=lambda v: str(v))
@pytest.mark.parametrize("norm", NORMS)
def test_add_norm_matches_reference(norm, rows, H, dtype):
    x = _randn(rows, H, dtype=dtype, seed=1, scale=3.0)
    delta = _randn(rows, H, dtype=dtype, seed=2)
    w = _randn(H, dtype=dtype, seed=3, scale=0.3) + 1
    b = _randn(H, dtype=dtype, seed=4, scale=0.1) if norm == "layernorm" else None
    kw = dict(eps=1e-5, layernorm=norm != "rms")
    res, y = add_norm(x, w, b, delta=delta, **kw)
    r32, y32 = add_norm_ref(x.float(), w.float(), None if b is None else b.float(), delta=delta.float(), **kw)
    r_low, y_low = add_norm_ref(x, w, b, delta=delta, upcast=False, **kw)
    assert torch.equal(res, x + delta), "the new residual must be exactly torch's x + delta"
    assert_rule(y, y32, y_low, dtype, "normed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_add_norm_without_delta_and_in_place(dtype):
    """First-layer style (no delta) and the runtime's in-place residual update give the same as fresh buffers."""
    x = _randn(33, 97, dtype=dtype, seed=5, scale=2.0)
    d = _randn(33, 97, dtype=dtype, seed=6)
    w = _randn(97, dtype=dtype, seed=7, scale=0.2) + 1
    res, y = add_norm(x, w, eps=1e-6)
    assert torch.equal(res, x)
    ref32, low = add_norm_ref(x.float(), w.float(), eps=1e-6)[1], add_norm_ref(x, w, eps=1e-6, upcast=False)[1]
    assert_rule(y, ref32, low, dtype)
    fresh_r, fresh_y = add_norm(x, w, delta=d, eps=1e-6)
    buf = x.clone()
    res, y = add_norm(buf, w, delta=d, eps=1e-6, residual_out=buf)
    assert res is buf and torch.equal(buf, fresh_r) and torch.equal(y, fresh_y)
    none, y2 = add_norm(x, w, delta=d, eps=1e-6, store_residual=False)
    assert none is None and torch.equal(y2, fresh_y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_norm_embedding_gather(dtype):
    """The first layer's norm reads embedding rows by token id (vocab 111, odd batch x length)."""
    table = _randn(111, 97, dtype=dtype, seed=8)
    w = _randn(97, dtype=dtype, seed=9, scale=0.2) + 1
    ids = torch.randint(0, 111, (3, 7), generator=torch.Generator().manual_seed(0)).to(DEV)
    res, y = add_norm(table, w, eps=1e-6, index=ids)
    assert torch.equal(res, table[ids.reshape(-1)]), "the residual must be the embedding rows themselves"
    ref32 = add_norm_ref(table.float(), w.float(), eps=1e-6, index=ids)[1]
    low = add_norm_ref(table, w, eps=1e-6, index=ids, upcast=False)[1]
    assert_rule(y, ref32, low, dtype, "embedding")
    ids32 = ids.to(torch.int32)
    assert torch.equal(add_norm(table, w, eps=1e-6, index=ids32)[1], y)


@pytest.mark.parametrize("norm", NORMS[:2])
def test_add_norm_row_selection(norm):
    """The last norm: residual + delta at the (B, N) positions that need logits, rows of (B * T, H)."""
    B, T, H, dtype = 3, 13, 64, torch.bfloat16
    x = _randn(B * T, H, dtype=dtype, seed=10, scale=2.0)
    d = _randn(B * T, H, dtype=dtype, seed=11)
    w = _randn(H, dtype=dtype, seed=12, scale=0.2) + 1
    b = _randn(H, dtype=dtype, seed=13, scale=0.1) if norm == "layernorm" else None
    idx = torch.tensor([[0, 12, 5, 5], [1, 1, 2, 3], [12, 11, 0, 7]], device=DEV)  # (B, N) with repeats
    kw = dict(eps=1e-5, layernorm=norm == "layernorm", delta=d, index=idx, index_rows=T)
    none, y = add_norm(x, w, b, store_residual=False, **kw)
    assert none is None and y.shape == (B * 4, H)
    _, full = add_norm(x, w, b, eps=1e-5, layernorm=norm == "layernorm", delta=d)
    rows = (torch.arange(B, device=DEV).view(B, 1) * T + idx).reshape(-1)
    assert torch.equal(y, full[rows]), "selecting rows must not change them"


# ------------------------------------------------------------------------------------------------
# rope_cache
# ------------------------------------------------------------------------------------------------


def _inv_freq(D, theta=10000.0, factor=1.0):
    return 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D)) / factor


ROPE_CASES = [  # (B, T, Hq, Hkv, D, theta, linear factor)
    (1, 1, 14, 2, 64, 1e6, 1.0),  # decode at the 0.5B model's head layout
    (2, 17, 4, 2, 16, 1e4, 4.0),  # Llama linear scaling
    (3, 9, 3, 3, 12, 1e5, 1.0),  # plain MHA, head dim not a power of two
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: "B{}_T{}_H{}:{}_D{}_t{:g}_f{:g}".format(*c))
def test_rope_cache_matches_reference(case, dtype):
    """q/k rotated within the tolerance rule, v copied bit for bit, into fresh buffers (no cache)."""
    B, T, Hq, Hkv, D, theta, factor = case
    inv = _inv_freq(D, theta, factor)
    table = rope_table(inv, 64).to(DEV)
    qkv = _randn(B, T, (Hq + 2 * Hkv) * D, dtype=dtype, seed=20)
    pos = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(1)).to(DEV)
    q, k, v = rope_cache(qkv, table, Hq, Hkv, positions=pos)
    assert q.shape == (B, Hq, T, D) and q.transpose(1, 2).is_contiguous(), "q must be a (B, T, Hq, D) buffer"
    q32, k32, v32 = rope_cache_ref(qkv.float(), inv, Hq, Hkv, positions=pos)
    q_low, k_low, _ = rope_cache_ref(qkv, inv, Hq, Hkv, positions=pos, upcast=False)
    assert_rule(q, q32, q_low, dtype, "q")
    assert_rule(k, k32, k_low, dtype, "k")
    assert torch.equal(v, v32.to(dtype)), "v must be copied bit for bit"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_cache_writes_only_its_columns(dtype):
    """With a cache: k/v land at cache_pos (default position = column); every other column is untouched."""
    B, T, Hq, Hkv, D, L = 2, 5, 4, 2, 16, 19
    inv = _inv_freq(D)
    table = rope_table(inv, 32).to(DEV)
    qkv = _randn(B, T, (Hq + 2 * Hkv) * D, dtype=dtype, seed=21)
    k_cache = torch.full((B, Hkv, L, D), float("nan"), dtype=dtype, device=DEV)
    v_cache = torch.full((B, Hkv, L, D), float("nan"), dtype=dtype, device=DEV)
    cols = torch.arange(7, 7 + T, device=DEV)
    q, k, v = rope_cache(qkv, table, Hq, Hkv, cache_pos=cols, k_out=k_cache, v_out=v_cache)
    assert k is k_cache and v is v_cache
    kr, vr = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    q32, kr, vr = rope_cache_ref(qkv.float(), inv, Hq, Hkv, cache_pos=cols, k_cache=kr.float(), v_cache=vr.float())
    q_low, k_low, _ = rope_cache_ref(qkv, inv, Hq, Hkv, cache_pos=cols, upcast=False)
    untouched = torch.ones(L, dtype=torch.bool, device=DEV)
    untouched[cols] = False
    assert torch.isnan(k_cache[:, :, untouched]).all() and torch.isnan(v_cache[:, :, untouched]).all()
    assert_rule(q, q32, q_low, dtype, "q")
    assert_rule(k_cache[:, :, cols], kr[:, :, cols], k_low, dtype, "k in the cache")
    assert torch.equal(v_cache[:, :, cols], vr[:, :, cols].to(dtype))


def test_rope_cache_drops_columns_outside_the_cache():
    """cache_pos lives on the device, unchecked: a column outside [0, L) writes nothing, not the memory beside
    the cache (here guard columns of the buffer the cache is a view of); the other columns are written."""
    B, T, Hq, Hkv, D, L = 2, 4, 2, 1, 16, 6
    table = rope_table(_inv_freq(D), 16).to(DEV)
    qkv = _randn(B, T, (Hq + 2 * Hkv) * D, dtype=torch.float32, seed=23)
    k_buf = torch.full((B, Hkv, L + 2, D), float("nan"), device=DEV)  # (B, Hkv, guard | L columns | guard, D)
    v_buf = torch.full_like(k_buf, float("nan"))
    cols = torch.tensor([-1, 2, L, 5], device=DEV)  # two columns outside the cache
    k_cache, v_cache = k_buf[:, :, 1 : L + 1], v_buf[:, :, 1 : L + 1]  # (B, Hkv, L, D) views
    _, k, v = rope_cache(qkv, table, Hq, Hkv, cache_pos=cols, k_out=k_cache, v_out=v_cache)
    for buf in (k_buf, v_buf):
        assert torch.isnan(buf[:, :, [0, L + 1]]).all(), "a column outside the cache was written"
        assert not torch.isnan(buf[:, :, [3, 6]]).any(), "columns 2 and 5 of the cache must be written"
        assert torch.isnan(buf[:, :, [1, 2, 4, 5]]).all()
    assert torch.equal(v[:, :, [2, 5]], qkv[:, [1, 3], (Hq + Hkv) * D :].view(B, 2, Hkv, D).transpose(1, 2))


def test_rope_cache_clamps_positions_to_the_table():
    """Positions beyond the table read its last row instead of memory past it (the model checks lengths)."""
    inv = _inv_freq(16)
    table = rope_table(inv, 8).to(DEV)
    qkv = _randn(1, 2, 4 * 16, dtype=torch.float32, seed=22)
    q_far, _, _ = rope_cache(qkv, table, 2, 1, positions=torch.tensor([[7, 500]], device=DEV))
    q_last, _, _ = rope_cache(qkv, table, 2, 1, positions=torch.tensor([[7, 7]], device=DEV))
    assert torch.equal(q_far, q_last)


# ------------------------------------------------------------------------------------------------
# activation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,inner", [(1, 1031), (97, 97), (257, 64)], ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["swiglu", "gelu_tanh"])
def test_activation_matches_reference(kind, M, inner, dtype):
    width = 2 * inner if kind == "swiglu" else inner
    x = _randn(M, width, dtype=dtype, seed=30, scale=3.0)
    y = activation(x, kind)
    assert y.shape == (M, inner)
    assert_rule(y, activation_ref(x.float(), kind), activation_ref(x, kind, upcast=False), dtype, kind)


def test_activation_strided_rows():
    """A row-strided view (e.g. a slice of a wider buffer) is read in place."""
    buf = _randn(9, 300, dtype=torch.bfloat16, seed=31)
    x = buf[:, :194]  # (9, 2 * 97), row stride 300
    assert torch.equal(activation(x, "swiglu"), activation(x.contiguous(), "swiglu"))


# ------------------------------------------------------------------------------------------------
# skinny_linear (DINFILL_GEMV=triton): norm prologue, activation / residual epilogue
# ------------------------------------------------------------------------------------------------

SKINNY = [  # (M, K, N, norm, act, residual)
    (1, 896, 97, "rmsnorm", None, False),  # decode q/k/v: the real hidden size, odd outputs
    (3, 97, 2 * 61, "rmsnorm", "swiglu", False),  # gate/up rows stacked, SiLU(gate) * up
    (16, 64, 33, "layernorm", "gelu_tanh", False),  # Starcoder2 c_fc: LayerNorm with bias, GELU-tanh
    (5, 257, 40, None, None, True),  # o_proj / down_proj: residual += y in place
    (2, 33, 17, None, None, False),  # plain, odd K
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SKINNY, ids=lambda c: "M{}_K{}_N{}_{}_{}_res{}".format(*c))
def test_skinny_linear_matches_reference(case, dtype):
    M, K, N, norm, act, res = case
    x = _randn(M, K, dtype=dtype, seed=40, scale=2.0)
    w = _randn(N, K, dtype=dtype, seed=41, scale=K**-0.5)
    b = _randn(N, dtype=dtype, seed=42, scale=0.1)
    nw = _randn(K, dtype=dtype, seed=43, scale=0.2) + 1 if norm else None
    nb = _randn(K, dtype=dtype, seed=44, scale=0.1) if norm == "layernorm" else None
    r = _randn(M, N, dtype=dtype, seed=45) if res else None
    kw = dict(norm=norm, norm_weight=nw, norm_bias=nb, eps=1e-5, act=act)
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    ref32 = skinny_linear_ref(x.float(), w.float(), b.float(), residual=f32(r), **{**kw, "norm_weight": f32(nw),
                              "norm_bias": f32(nb)})  # fmt: skip
    low = skinny_linear_ref(x, w, b, residual=r, upcast=False, **kw)
    out = skinny_linear(x, w, b, residual=None if r is None else r.clone(), **kw)
    assert_rule(out, ref32, low, dtype, f"skinny {case}")
    if res:
        buf = r.clone()
        assert skinny_linear(x, w, b, residual=buf, **kw) is buf and torch.equal(buf, out), "residual in place"


def test_skinny_config_fits_every_target():
    """512-byte K tiles and 4 stages fit A100 / A10 / L4 / H100 with 8 KB to spare in every variant (the SwiGLU one
    is the largest); a smaller GPU gets fewer stages, then narrower tiles, then a clear refusal."""
    for key in ("a100", "a10", "l4", "h100"):
        t = TARGETS[key]
        for dtype, width in ((torch.bfloat16, 256), (torch.float16, 256), (torch.float32, 128)):
            for swiglu, norm in ((True, True), (False, True), (False, False)):
                assert skinny_config(4864, dtype, swiglu, norm, t) == (width, 4), (key, dtype, swiglu, norm)
                est = skinny_smem_estimate(width, 4, dtype.itemsize, swiglu, norm)
                assert est <= t.smem_per_block - 8 * 1024, (key, est)
    assert skinny_config(33, torch.bfloat16, False, False, TARGETS["l4"]) == (64, 4)  # never wider than K
    assert skinny_config(896, torch.bfloat16, True, True, None) == (256, 1)  # the interpreter
    small = dataclasses.replace(TARGETS["l4"], name="small", smem_per_block=48 * 1024)
    assert skinny_config(896, torch.bfloat16, True, True, small) == (256, 2)
    smaller = dataclasses.replace(small, smem_per_block=28 * 1024)
    assert skinny_config(896, torch.bfloat16, True, True, smaller) == (128, 2)
    with pytest.raises(Unservable, match=r"no tile fits tiny \(sm_89\).*12288 bytes minus 8192"):
        skinny_config(896, torch.bfloat16, True, True, dataclasses.replace(small, name="tiny", smem_per_block=12288))


T4 = Target("T4", 75, 40, 64 * 1024, 64 * 1024, 65536, 1024, 16, 4 << 20, 320e9, 65e12, 1.59e9)


@pytest.mark.parametrize(
    "target, match",
    [
        (T4, r"T4 \(sm_75\).*need sm_80 or newer"),
        (dataclasses.replace(TARGETS["a10"], smem_per_block=12288), "no tile"),
    ],
    ids=["sm_75", "12KB"],
)
def test_gemv_on_an_unservable_target_fails_before_any_launch(target, match, monkeypatch):
    """DINFILL_GEMV=triton on a GPU the GEMVs cannot serve: Unservable from the decoder's first line, not an
    OutOfResources from a launch in the middle of a forward (meta tensors stand for that GPU's). On sm_75 the
    Triton path itself is refused (with DINFILL_BACKEND=auto such a GPU runs the torch path, GEMV flag or not)."""
    from tiny import hf_config

    from dinfill.bench.forward import DeviceOpCounter
    from dinfill.models import ModelConfig
    from dinfill.models.decoder import Decoder

    monkeypatch.setenv("DINFILL_GEMV", "triton")
    monkeypatch.setenv("DINFILL_BACKEND", "triton")
    with torch.device("meta"):
        model = Decoder(ModelConfig.from_hf_dict(hf_config("qwen2").to_dict())).eval()
    ids = torch.zeros(1, 1, dtype=torch.int64, device="meta")
    with static_target(target), DeviceOpCounter() as seen, pytest.raises(Unservable, match=match):
        model(ids, causal=True)
    assert seen.total == 0, (seen.aten, seen.triton)  # refused before any device op


# ------------------------------------------------------------------------------------------------
# bad inputs: clear errors from the launchers
# ------------------------------------------------------------------------------------------------

F32 = dict(dtype=torch.float32, seed=0)


def _aliased(case: str):
    """Launch with an output that overlaps an input other programs read (each case must be refused)."""
    x, w = _randn(6, 8, **F32), _randn(8, **F32)
    if case == "skinny":  # residual = x: every program reads all of x while the others add into their columns
        return skinny_linear(x[:2], _randn(8, 8, **F32), residual=x[:2])
    if case == "shifted":  # row r's residual lands on row r + 1, which another program reads
        return add_norm(x[:5], w, eps=1e-6, residual_out=x[1:])
    ids = torch.tensor([[5, 0, 1, 2, 3, 4]], device=DEV)  # in place with a gather: program r reads row r - 1
    return add_norm(x, w, eps=1e-6, index=ids, index_rows=0, residual_out=x)


BAD = [
    (lambda: add_norm(_randn(4, 8, **F32).double(), _randn(8, **F32).double(), eps=1e-6), TypeError, "float64"),
    (lambda: add_norm(_randn(2, 4, 8, **F32), _randn(8, **F32), eps=1e-6), ValueError, "2-D"),
    (lambda: add_norm(_randn(4, 8, **F32), _randn(7, **F32), eps=1e-6), ValueError, r"\(8,\) vector"),
    (lambda: add_norm(_randn(4, 8, **F32), _randn(8, **F32), _randn(8, **F32), eps=1e-6), ValueError, "LayerNorm"),
    (lambda: add_norm(_randn(4, 8, **F32), _randn(8, **F32), eps=1e-6, delta=_randn(4, 9, **F32)), ValueError, "match"),
    (
        lambda: add_norm(_randn(4, 8, **F32), _randn(8, **F32), eps=1e-6, index=torch.zeros(4, device=DEV)),
        TypeError,
        "integer",
    ),
    (lambda: rope_cache(_randn(1, 2, 42, **F32), rope_table(_inv_freq(8), 4).to(DEV), 3, 1), ValueError, "num_heads"),
    (lambda: rope_cache(_randn(1, 2, 9 * 3, **F32), rope_table(_inv_freq(8), 4).to(DEV), 1, 1), ValueError, "odd"),
    (lambda: rope_cache(_randn(1, 2, 64, **F32), torch.ones(4, 16, device=DEV).half(), 2, 1), ValueError, "float32"),
    (
        lambda: rope_cache(
            _randn(1, 2, 64, **F32), rope_table(_inv_freq(16), 4).to(DEV), 2, 1, cache_pos=torch.arange(2, device=DEV)
        ),  # fmt: skip
        ValueError,
        "needs k_out",
    ),
    (lambda: activation(_randn(3, 7, **F32), "swiglu"), ValueError, "even width"),
    (lambda: activation(_randn(3, 8, **F32), "relu"), ValueError, "not one of"),
    (lambda: activation(torch.ones(3, 8, dtype=torch.int32, device=DEV), "gelu_tanh"), TypeError, "int32"),
    (lambda: skinny_linear(_randn(17, 8, **F32), _randn(4, 8, **F32)), ValueError, "exceed 16"),
    (lambda: skinny_linear(_randn(2, 8, **F32), _randn(4, 9, **F32)), ValueError, r"\(N, 8\)"),
    (lambda: skinny_linear(_randn(2, 8, **F32), _randn(4, 8, **F32), norm="rmsnorm"), ValueError, "norm_weight"),
    (lambda: skinny_linear(_randn(2, 8, **F32), _randn(5, 8, **F32), act="swiglu"), ValueError, "even number"),
    (
        lambda: skinny_linear(_randn(2, 8, **F32), _randn(4, 8, **F32), act="swiglu", residual=_randn(2, 2, **F32)),
        ValueError,
        "exclusive",
    ),
    # outputs overlapping an input that other programs read: a race on the GPU (the interpreter runs programs in turn)
    (lambda: _aliased("skinny"), ValueError, "residual overlaps x"),
    (lambda: _aliased("shifted"), ValueError, "residual_out overlaps x other than as the very same rows; pass"),
    (lambda: _aliased("index"), ValueError, "with index"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_inputs_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU message; on CUDA the kernels run compiled")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA.*DINFILL_BACKEND=torch"):
        activation(torch.ones(2, 8), "swiglu")


# ------------------------------------------------------------------------------------------------
# the decoder's small kernels compile for a real GPU (sm_90), in the dtypes and constexpr variants the runtime uses
# ------------------------------------------------------------------------------------------------

COMPILE_CHECK = r"""
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if "nvidia" not in importlib.import_module("triton.backends").backends:
    sys.exit(3)
an = importlib.import_module("dinfill.kernels.add_norm_kernel")
rc = importlib.import_module("dinfill.kernels.rope_cache_kernel")
ac = importlib.import_module("dinfill.kernels.activation_kernel")
sig = lambda names, ty: dict.fromkeys(names, ty)


def build(kernel, signature, consts, warps=4, stages=None):
    src = ASTSource(kernel, signature | dict.fromkeys(consts, "constexpr"), constexprs=consts)
    opts = {"num_warps": warps} | ({"num_stages": stages} if stages else {})
    assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["cubin"]


for dt in ("bf16", "fp16", "fp32"):
    s_norm = sig(["X", "DELTA", "W", "BIAS", "RES", "Y"], f"*{dt}") | {"IDX": "*i64", "eps": "fp32"}
    s_norm |= sig(["n_rows", "H", "n_src", "n_per_batch", "index_rows"], "i32")
    s_norm |= sig(["stride_xr", "stride_dr", "stride_ib", "stride_in", "stride_rr", "stride_yr"], "i64")
    norm = dict(HAS_DELTA=True, HAS_IDX=False, HAS_BIAS=False, STORE_RESIDUAL=True, LAYERNORM=False, BLOCK_R=1,
                BLOCK_H=1024, EMULATE_BF16=False, USE_PDL=False)
    build(an._add_norm_kernel, s_norm, norm)
    s = sig(["QKV", "Q_OUT", "K_OUT", "V_OUT"], f"*{dt}") | {"TABLE": "*fp32", "POS": "*i64", "CACHE_POS": "*i64"}
    s |= sig(["n_tokens", "T", "n_pos", "n_cols"], "i32")
    s |= sig(["stride_xb", "stride_xt", "stride_pb", "stride_pt"], "i64")
    s |= sig(["stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kh", "stride_kl"], "i64")
    s |= sig(["stride_vb", "stride_vh", "stride_vl"], "i64")
    rope = dict(HQ=14, HKV=2, HALF=32, HQ_PAD=16, HKV_PAD=2, HALF_PAD=32, BLOCK_R=1, HAS_POS=False,
                HAS_CACHE_POS=True, EMULATE_BF16=False, USE_PDL=False)
    build(rc._rope_cache_kernel, s, rope)
    s = sig(["X", "OUT"], f"*{dt}") | sig(["n_rows", "inner"], "i32") | sig(["stride_xm", "stride_om"], "i64")
    build(ac._activation_kernel, s, dict(SWIGLU=True, BLOCK_R=1, BLOCK=1024, EMULATE_BF16=False, USE_PDL=False))
    if dt != "bf16":
        continue
    # the other variants the runtime launches (bf16 is the GPU dtype)
    build(an._add_norm_kernel, s_norm, norm | dict(HAS_DELTA=False, HAS_IDX=True))  # first layer: embedding rows
    build(an._add_norm_kernel, s_norm, norm | dict(HAS_IDX=True, STORE_RESIDUAL=False))  # final rows + norm
    build(an._add_norm_kernel, s_norm, norm | dict(LAYERNORM=True, HAS_BIAS=True, BLOCK_H=4096), 8)  # Starcoder2
    build(ac._activation_kernel, s, dict(SWIGLU=True, BLOCK_R=1, BLOCK=1024, EMULATE_BF16=False, USE_PDL=True))  # PDL
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The interpreter does not type-check like the compiler: compile real sm_90 binaries, no GPU needed."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is the historical default
    done = subprocess.run([sys.executable, "-c", COMPILE_CHECK], env=env, capture_output=True, text=True, timeout=400)
    if done.returncode == 3:
        pytest.skip("this triton build has no NVIDIA backend to compile for")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
