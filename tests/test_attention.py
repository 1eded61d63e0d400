"""Tests of ``dinfill.kernels.attention`` against its plain-torch spec, ``attention_ref``.

Without CUDA the Triton kernel runs in Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``), so shapes are small but odd (1, 17, 97 against 16-wide blocks) and the
kernel paths are forced explicitly where the heuristic would not pick them (split-K, other block
sizes). The tolerance rule is the style guide's: the kernel's error against the fp32 reference must
stay within twice torch's own low-precision error plus a small absolute slack, and that bound is
itself checked to be small next to the values, so a check cannot pass vacuously.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
import triton

from dinfill.bench.forward import DeviceOpCounter
from dinfill.kernels.attention_fwd import AttentionConfig, attention, attention_triton, cuda_config, pick_config
from dinfill.kernels.reference import attention_ref
from dinfill.target import TARGETS, Target, Unservable, static_target

attn_mod = importlib.import_module("dinfill.kernels.attention_fwd")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# absolute slack of the tolerance rule: fp32 sums in another order, or one rounding of a ~1 output
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _qkv(B, Hq, Hkv, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)  # (B, Hq, Lq, D)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)  # (B, Hkv, Lk, D)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    dev = _device()
    return q.to(dev), k.to(dev), v.to(dev)


def assert_matches_ref(out, q, k, v, **kw):
    """The tolerance rule: |kernel - ref32| <= 2 |torch low precision - ref32| + atol, elementwise max."""
    ref = attention_ref(q.float(), k.float(), v.float(), **kw)  # (B, Hq, Lq, D) fp32 spec
    low = attention_ref(q, k, v, upcast=False, **kw).float()  # torch in the input dtype
    assert out.shape == ref.shape and out.dtype == q.dtype and out.device == q.device
    assert torch.isfinite(out).all(), "kernel produced NaN/inf"
    kernel_err = (out.float() - ref).abs().max().item()
    torch_err = (low - ref).abs().max().item()
    bound = 2 * torch_err + ATOL[q.dtype]
    assert kernel_err <= bound, f"kernel error {kernel_err:.3g} > bound {bound:.3g} (torch error {torch_err:.3g})"
    scale = ref.abs().max().item()
    if scale > 0:  # the bound must be tight next to the values, or the check means nothing
        assert bound < 0.05 * scale, f"tolerance {bound:.3g} is loose next to outputs of size {scale:.3g}"


# (B, Hq, Hkv, Lq, Lk, D, causal): odd lengths around the 16-wide interpreter blocks
CASES = [
    (2, 4, 2, 17, 17, 16, False),
    (2, 4, 2, 17, 17, 16, True),
    (1, 2, 1, 97, 97, 64, True),
    (2, 3, 3, 1, 97, 16, False),  # plain multi-head, one query
    (2, 7, 1, 17, 97, 64, False),  # the 0.5B model's 7 query heads per KV head; queries shorter than keys
    (1, 2, 2, 97, 17, 16, True),  # more queries than keys
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_H{}:{}_Lq{}_Lk{}_D{}_{}".format(*c))
def test_matches_reference(case, dtype):
    B, Hq, Hkv, Lq, Lk, D, causal = case
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D, dtype)
    assert_matches_ref(attention_triton(q, k, v, causal=causal), q, k, v, causal=causal)


@pytest.mark.parametrize("D", [32, 128, 256])
def test_other_head_dims(D):
    """Every supported head dim (the model shapes use 64 and 128), causal with a key range."""
    q, k, v = _qkv(2, 4, 2, 17, 33, D, torch.bfloat16, seed=9)
    kw = dict(causal=True, causal_offset=16, kv_start=torch.tensor([0, 3], device=q.device))
    assert_matches_ref(attention_triton(q, k, v, **kw), q, k, v, **kw)


@pytest.mark.parametrize("D", [12, 80])
def test_padded_head_dims(D):
    """Head dims that are not powers of two (tiny test models: 12; some real models: 80) are padded inside."""
    q, k, v = _qkv(2, 4, 2, 17, 33, D, torch.bfloat16, seed=10)
    kw = dict(causal=True, causal_offset=16, kv_end=torch.tensor([33, 20], device=q.device))
    assert_matches_ref(attention_triton(q, k, v, **kw), q, k, v, **kw)
    split = attention_triton(q, k, v, config=AttentionConfig(16, 16, num_splits=3), **kw)
    assert_matches_ref(split, q, k, v, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "case",
    [
        (17, 97, 80, 8),  # prefill-like block: the window cuts keys inside and before the block
        (1, 97, torch.tensor([96, 40]), 16),  # decode: one query per sequence, window behind it
        (5, 97, torch.tensor([60, 3]), 1),  # window 1: each query sees itself only
        (17, 33, 16, 64),  # window longer than every query's history: a no-op
    ],
    ids=["block", "decode", "window1", "wide"],
)
def test_sliding_window(case, dtype):
    """Causal sliding window (Starcoder2): query at p sees keys p - window < j <= p; split-K too."""
    Lq, Lk, offset, window = case
    q, k, v = _qkv(2, 4, 2, Lq, Lk, 16, dtype, seed=11)
    if isinstance(offset, torch.Tensor):
        offset = offset.to(q.device)
    kw = dict(causal=True, causal_offset=offset, window=window, kv_start=torch.tensor([0, 2], device=q.device))
    assert_matches_ref(attention_triton(q, k, v, **kw), q, k, v, **kw)
    split = attention_triton(q, k, v, config=AttentionConfig(16, 16, num_splits=4), **kw)
    assert_matches_ref(split, q, k, v, **kw)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sliding_window_backends(backend, monkeypatch):
    """``attention(window=)`` honours the window on both backends."""
    monkeypatch.setenv("DINFILL_BACKEND", backend)
    q, k, v = _qkv(2, 4, 2, 9, 40, 16, torch.float32, seed=12)
    kw = dict(causal=True, causal_offset=torch.tensor([31, 20], device=q.device), window=6)
    assert_matches_ref(attention(q, k, v, **kw), q, k, v, **kw)


@pytest.mark.parametrize("form", ["int", "0-dim", "(1,)", "(B,) int64", "(B,) int32", "negative int"])
def test_causal_offset_forms(form):
    """Query i sits at key column offset + i whichever way the offset is given; int and tensor agree bitwise."""
    B, Lq, Lk = 2, 17, 97
    q, k, v = _qkv(B, 4, 2, Lq, Lk, 16, torch.bfloat16)
    dev = q.device
    offset = {
        "int": 40,
        "0-dim": torch.tensor(40, device=dev),
        "(1,)": torch.tensor([40], device=dev),
        "(B,) int64": torch.tensor([80, 3], device=dev),
        "(B,) int32": torch.tensor([80, 3], device=dev, dtype=torch.int32),
        "negative int": -5,  # the first five queries see no key at all: zero rows
    }[form]
    out = attention_triton(q, k, v, causal=True, causal_offset=offset)
    assert_matches_ref(out, q, k, v, causal=True, causal_offset=offset)
    if isinstance(offset, torch.Tensor) and offset.numel() == 1:
        as_int = attention_triton(q, k, v, causal=True, causal_offset=int(offset.reshape(())))
        assert torch.equal(out, as_int)
    if form == "negative int":
        assert torch.all(out[:, :, :5] == 0) and out[:, :, 5:].abs().amax() > 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kv_range_padding_is_never_read(causal, dtype):
    """Keys outside [kv_start, kv_end) hold NaN: the output must match the reference on clean inputs."""
    B, Hq, Hkv, Lq, Lk, D = 4, 4, 2, 17, 97, 16
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D, dtype)
    dev = q.device
    kv_start = torch.tensor([0, 9, 30, -3], device=dev)  # left padding; -3 is clamped to 0
    kv_end = torch.tensor([97, 50, 30, 120], device=dev)  # right padding; batch 2 sees nothing; 120 -> Lk
    offset = torch.tensor([80, 20, 0, 5], device=dev)
    cols = torch.arange(Lk, device=dev)
    hidden = (cols < kv_start.clamp(min=0).view(B, 1)) | (cols >= kv_end.view(B, 1))  # (B, Lk)
    if causal:  # keys above every query's causal bound are never visible either
        hidden |= cols.view(1, Lk) > (offset + Lq - 1).view(B, 1)
    hidden = hidden.view(B, 1, Lk, 1)
    k_dirty, v_dirty = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("nan"))
    k_clean, v_clean = k.masked_fill(hidden, 0.0), v.masked_fill(hidden, 0.0)
    kw = dict(causal=causal, causal_offset=offset, kv_start=kv_start, kv_end=kv_end)
    out = attention_triton(q, k_dirty, v_dirty, **kw)
    assert_matches_ref(out, q, k_clean, v_clean, **kw)
    assert torch.all(out[2] == 0), "a sequence with an empty key range must give zeros"
    split = attention_triton(q, k_dirty, v_dirty, config=AttentionConfig(16, 16, num_splits=3), **kw)
    assert_matches_ref(split, q, k_clean, v_clean, **kw)


def test_diffusion_cache_shape():
    """The dual cache: a short middle of queries over prefix + middle + suffix keys, right-padded batch."""
    B, Hq, Hkv, Lm, Lk, D = 2, 14, 2, 17, 97, 64
    q, k, v = _qkv(B, Hq, Hkv, Lm, Lk, D, torch.bfloat16, seed=1)
    kv_end = torch.tensor([97, 61], device=q.device)
    out = attention_triton(q, k, v, kv_end=kv_end)
    assert_matches_ref(out, q, k, v, kv_end=kv_end)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_step(num_splits):
    """AR decode: one query per sequence at column len - 1, keys beyond len invisible (static cache)."""
    B, Hq, Hkv, Lk, D = 3, 14, 2, 97, 64
    q, k, v = _qkv(B, Hq, Hkv, 1, Lk, D, torch.bfloat16, seed=2)
    lens = torch.tensor([97, 40, 1], device=q.device)
    kw = dict(causal=True, causal_offset=lens - 1, kv_end=lens)
    out = attention_triton(q, k, v, config=AttentionConfig(16, 16, num_splits=num_splits), **kw)
    assert_matches_ref(out, q, k, v, **kw)


@pytest.mark.parametrize(
    "cfg",
    [AttentionConfig(32, 16), AttentionConfig(16, 32), AttentionConfig(64, 64), AttentionConfig(16, 16, num_splits=7)],
    ids=lambda c: f"m{c.block_m}_n{c.block_n}_s{c.num_splits}",
)
def test_block_configs(cfg):
    """Other block shapes and many splits (some of them empty) give the same answer."""
    B, Hq, Hkv, Lq, Lk = 2, 6, 2, 33, 97
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, 16, torch.float32, seed=3)
    kw = dict(causal=True, causal_offset=torch.tensor([64, 10], device=q.device), kv_start=torch.tensor([0, 4]))
    kw["kv_start"] = kw["kv_start"].to(q.device)
    assert_matches_ref(attention_triton(q, k, v, config=cfg, **kw), q, k, v, **kw)


def test_strided_views_and_output_layout():
    """Views of fused projections are read in place; the output follows q's (B, L, H, D) memory layout."""
    B, Hq, Hkv, L, D = 2, 4, 2, 17, 16
    dev = _device()
    g = torch.Generator().manual_seed(4)
    q_buf = torch.randn(B, L, Hq, D, generator=g).to(dev, torch.bfloat16)  # (B, L, Hq, D)
    kv_buf = torch.randn(B, L, 2, Hkv, D, generator=g).to(dev, torch.bfloat16)  # (B, L, 2, Hkv, D)
    q = q_buf.transpose(1, 2)  # (B, Hq, L, D), not contiguous
    k, v = kv_buf[:, :, 0].transpose(1, 2), kv_buf[:, :, 1].transpose(1, 2)  # (B, Hkv, L, D) strided
    out = attention_triton(q, k, v, causal=True)
    assert_matches_ref(out, q, k, v, causal=True)
    assert out.transpose(1, 2).is_contiguous(), "output should share q's (B, L, H, D) layout"
    assert torch.equal(out, attention_triton(q.contiguous(), k.contiguous(), v.contiguous(), causal=True))
    # a non-unit stride on the head dim is copied, not rejected
    wide = torch.randn(B, Hq, L, 2 * D, generator=g).to(dev, torch.bfloat16)
    q_gap = wide[..., ::2]  # (B, Hq, L, D), stride 2 on D
    assert_matches_ref(attention_triton(q_gap, k, v), q_gap, k, v)


def test_repeated_runs_bit_identical():
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 17, 97, 16
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D, torch.bfloat16, seed=5)
    kv_end = torch.tensor([97, 33], device=q.device)
    for cfg in (None, AttentionConfig(16, 16, num_splits=3)):
        first = attention_triton(q, k, v, causal=True, causal_offset=60, kv_end=kv_end, config=cfg)
        for _ in range(3):
            again = attention_triton(q, k, v, causal=True, causal_offset=60, kv_end=kv_end, config=cfg)
            assert torch.equal(first, again)


def test_scale_and_empty_shapes():
    q, k, v = _qkv(1, 2, 1, 17, 17, 16, torch.float32, seed=6)
    assert_matches_ref(attention_triton(q, k, v, scale=0.3), q, k, v, scale=0.3)
    assert attention_triton(q[:, :, :0], k, v).shape == (1, 2, 0, 16)
    no_keys = attention_triton(q, k[:, :, :0], v[:, :, :0])
    assert no_keys.shape == q.shape and torch.all(no_keys == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backend_switch_same_answer(backend, monkeypatch):
    """``attention`` honours DINFILL_BACKEND; both paths meet the spec on the same inputs."""
    q, k, v = _qkv(2, 4, 2, 17, 97, 16, torch.bfloat16, seed=7)
    kw = dict(causal=True, causal_offset=torch.tensor([80, 3], device=q.device))
    kw["kv_start"], kw["kv_end"] = torch.tensor([0, 5], device=q.device), torch.tensor([97, 50], device=q.device)
    calls = []
    real = attn_mod._launch
    monkeypatch.setattr(attn_mod, "_launch", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("DINFILL_BACKEND", backend)
    out = attention(q, k, v, **kw)
    assert_matches_ref(out, q, k, v, **kw)
    assert bool(calls) == (backend == "triton")
    assert torch.all(out[1, :, :2] == 0)  # batch 1's queries 0, 1 sit at columns 3, 4: before its first key


def test_auto_backend_on_cpu_uses_torch(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU default; on CUDA, auto is the Triton path (covered by the tests above)")
    monkeypatch.setenv("DINFILL_BACKEND", "auto")
    monkeypatch.setattr(attn_mod, "_launch", lambda *a: pytest.fail("auto on CPU must use torch"))
    q, k, v = _qkv(1, 2, 1, 17, 17, 16, torch.float32)
    assert_matches_ref(attention(q, k, v), q, k, v)


def test_package_exports_the_function():
    """``from dinfill.kernels import attention`` is the function (contract), even after the submodule is imported."""
    from dinfill.kernels import attention as exported

    assert exported is attention, (
        "dinfill.kernels.attention resolves to the submodule: importing the submodule (as the runtime does) rebinds "
        "the package attribute after any lazy __getattr__; dinfill/kernels/__init__.py must import the function "
        "eagerly or intercept that rebinding (a ModuleType subclass whose __setattr__ swaps the module for its op)"
    )


def test_pick_config_in_the_interpreter():
    q, k, _ = _qkv(1, 14, 2, 17, 97, 64, torch.bfloat16)
    if q.device.type != "cpu":
        pytest.skip("the interpreter's config applies to CPU tensors; CUDA tensors get cuda_config's")
    # all 7 x 17 packed rows in one 64-row block, 16-key blocks, no split
    assert pick_config(q, k) == AttentionConfig(64, 16, num_warps=4, num_stages=1)


# (B, Hkv, packed rows = Hq / Hkv * Lq, Lk, D): the seed models at the shapes the runtime launches
SEED = {
    "qwen0.5b decode B1 276": (1, 2, 7, 276, 64),
    "qwen0.5b decode B1 1152": (1, 2, 7, 1152, 64),
    "qwen0.5b window B1 30/276": (1, 2, 7 * 30, 276, 64),
    "qwen0.5b prefill B1 276": (1, 2, 7 * 276, 340, 64),
    "qwen0.5b full B8 608": (8, 2, 7 * 608, 608, 64),
    "qwen0.5b decode B32 1152": (32, 2, 7, 1152, 64),
    "qwen1.5b decode B1 1152": (1, 2, 6, 1152, 128),
    "deepseek decode B1 1152": (1, 16, 1, 1152, 128),
    "deepseek full B32 608": (32, 16, 608, 608, 128),
    "starcoder2 window B1 30/276": (1, 2, 12 * 30, 276, 128),
    "starcoder2 prefill B8 608": (8, 2, 12 * 608, 672, 128),
    "starcoder2 decode B8 64": (8, 2, 12, 64, 128),
}
# cuda_config's choices, (block_m, block_n, warps, stages, splits), per target: the table the rules below produce
EXPECTED = {
    "a100": {
        "qwen0.5b decode B1 276": (16, 16, 4, 3, 17),
        "qwen0.5b decode B1 1152": (16, 16, 4, 3, 54),
        "qwen0.5b window B1 30/276": (32, 32, 4, 3, 8),
        "qwen0.5b prefill B1 276": (32, 64, 4, 3, 1),
        "qwen0.5b full B8 608": (128, 64, 8, 3, 1),
        "qwen0.5b decode B32 1152": (16, 64, 4, 3, 2),
        "qwen1.5b decode B1 1152": (16, 16, 4, 3, 54),
        "deepseek decode B1 1152": (16, 64, 4, 3, 7),
        "deepseek full B32 608": (64, 32, 8, 2, 1),
        "starcoder2 window B1 30/276": (32, 32, 4, 3, 5),
        "starcoder2 prefill B8 608": (64, 32, 8, 2, 1),
        "starcoder2 decode B8 64": (16, 64, 4, 3, 1),
    },
    "a10": {
        "qwen0.5b decode B1 276": (16, 16, 4, 3, 17),
        "qwen0.5b decode B1 1152": (16, 32, 4, 3, 36),
        "qwen0.5b window B1 30/276": (32, 32, 4, 3, 6),
        "qwen0.5b prefill B1 276": (32, 64, 4, 3, 1),
        "qwen0.5b full B8 608": (128, 64, 8, 3, 1),
        "qwen0.5b decode B32 1152": (16, 64, 4, 3, 2),
        "qwen1.5b decode B1 1152": (16, 32, 4, 3, 36),
        "deepseek decode B1 1152": (16, 64, 4, 3, 5),
        "deepseek full B32 608": (64, 32, 8, 2, 1),
        "starcoder2 window B1 30/276": (32, 32, 4, 3, 3),
        "starcoder2 prefill B8 608": (64, 32, 8, 2, 1),
        "starcoder2 decode B8 64": (16, 64, 4, 3, 1),
    },
    "l4": {
        "qwen0.5b decode B1 276": (16, 16, 4, 3, 17),
        "qwen0.5b decode B1 1152": (16, 32, 4, 3, 29),
        "qwen0.5b window B1 30/276": (32, 32, 4, 3, 5),
        "qwen0.5b prefill B1 276": (128, 64, 8, 3, 1),
        "qwen0.5b full B8 608": (128, 64, 8, 3, 1),
        "qwen0.5b decode B32 1152": (16, 64, 4, 3, 1),
        "qwen1.5b decode B1 1152": (16, 32, 4, 3, 29),
        "deepseek decode B1 1152": (16, 64, 4, 3, 4),
        "deepseek full B32 608": (64, 32, 8, 2, 1),
        "starcoder2 window B1 30/276": (32, 32, 4, 3, 3),
        "starcoder2 prefill B8 608": (64, 32, 8, 2, 1),
        "starcoder2 decode B8 64": (16, 64, 4, 3, 1),
    },
    "h100": {
        "qwen0.5b decode B1 276": (16, 16, 4, 3, 17),
        "qwen0.5b decode B1 1152": (16, 16, 4, 3, 66),
        "qwen0.5b window B1 30/276": (16, 32, 4, 3, 5),
        "qwen0.5b prefill B1 276": (16, 32, 4, 3, 1),
        "qwen0.5b full B8 608": (128, 64, 8, 3, 1),
        "qwen0.5b decode B32 1152": (16, 32, 4, 3, 3),
        "qwen1.5b decode B1 1152": (16, 16, 4, 3, 66),
        "deepseek decode B1 1152": (16, 64, 4, 3, 9),
        "deepseek full B32 608": (128, 64, 8, 3, 1),
        "starcoder2 window B1 30/276": (32, 32, 4, 3, 6),
        "starcoder2 prefill B8 608": (128, 64, 8, 3, 1),
        "starcoder2 decode B8 64": (16, 64, 4, 3, 1),
    },
}


@pytest.mark.parametrize("target", list(EXPECTED))
def test_cuda_config_choices_per_target(target):
    """The chooser's picks on A100 / A10 / L4 / H100 at the seed shapes (a change here is a deliberate one)."""
    t = TARGETS[target]
    got = {name: tuple(dataclasses.astuple(cuda_config(*shape[:4], shape[4], torch.bfloat16, t)))
           for name, shape in SEED.items()}  # fmt: skip
    assert got == EXPECTED[target]


@pytest.mark.parametrize("target", ["a100", "a10", "l4", "h100"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_config_rules_hold_on_every_target(target, dtype):
    """What the configs promise, at every seed shape: they fit the target's shared memory (by the estimate the
    fit tests check against the compiler) with 8 KB to spare; the query block never exceeds the packed rows;
    splits happen only where 16-row blocks leave SMs idle, from 256 keys on, keep >= 16 keys (and read at least
    as many K / V bytes as they write partial output), and then decode / window at batch 1 launch a full wave
    wherever 16-key splits can make one (issue 18)."""
    t = TARGETS[target]
    for name, (B, Hkv, rows, Lk, D) in SEED.items():
        cfg = cuda_config(B, Hkv, rows, Lk, D, dtype, t)
        block_d = max(16, triton.next_power_of_2(D))
        smem = attn_mod.smem_estimate(cfg.block_m, cfg.block_n, block_d, cfg.num_stages, dtype.itemsize, t.arch)
        assert smem <= t.smem_per_block - 8 * 1024, (name, cfg)
        assert cfg.block_m <= max(16, triton.next_power_of_2(rows)), (name, cfg)
        programs = triton.cdiv(rows, cfg.block_m) * B * Hkv * cfg.num_splits
        may_split = Lk >= 256 and triton.cdiv(rows, 16) * B * Hkv < t.sms
        min_len = max(16, 2 * cfg.block_m // dtype.itemsize)
        assert cfg.num_splits == 1 or (may_split and Lk // cfg.num_splits >= min_len), (name, cfg)
        if B == 1 and may_split:
            reachable = triton.cdiv(rows, cfg.block_m) * Hkv * (Lk // 16)  # programs at one key block per split
            assert programs >= min(t.sms, reachable), (name, cfg, programs)


def test_cuda_config_accounts_for_residency():
    """100 programs of 128 rows on 132 SMs: halving gives 200, two per SM on 68 SMs, so no shorter busiest SM; the old
    rule ("fewer programs than SMs: 64 rows") halved anyway. 20 such programs on an L4 do go smaller."""
    h100 = cuda_config(50, 2, 128, 200, 64, torch.bfloat16, TARGETS["h100"])
    assert h100.block_m == 128
    l4 = cuda_config(10, 2, 128, 200, 64, torch.bfloat16, TARGETS["l4"])
    assert l4.block_m < 128 and triton.cdiv(128, l4.block_m) * 20 <= 58 * 4


T4 = Target("T4", 75, 40, 64 * 1024, 64 * 1024, 65536, 1024, 16, 4 << 20, 320e9, 65e12, 1.59e9)


def test_unservable_targets_fail_before_any_launch():
    """Below sm_80, or with too little shared memory for any tile: a clear Unservable naming the target and the
    limit, raised before the launcher touches the device (the non-contiguous q would be copied first otherwise)."""
    with pytest.raises(Unservable, match=r"T4 \(sm_75\).*DINFILL_BACKEND=torch"):
        cuda_config(1, 2, 7, 1152, 64, torch.bfloat16, T4)
    tiny = dataclasses.replace(TARGETS["a100"], name="tiny", smem_per_block=24 * 1024)
    with pytest.raises(Unservable, match=r"tiny \(sm_80\).*24576 bytes minus 8192"):
        cuda_config(1, 2, 7, 1152, 256, torch.float32, tiny)
    q = torch.empty(1, 14, 1, 128, device="meta", dtype=torch.bfloat16)[..., ::2]  # a non-unit last stride
    k = torch.empty(1, 2, 300, 64, device="meta", dtype=torch.bfloat16)
    offset = torch.zeros(1, dtype=torch.int64, device="meta")

    with static_target(T4), DeviceOpCounter() as seen, pytest.raises(Unservable, match="sm_75"):
        attention_triton(q, k, k, causal=True, causal_offset=offset)
    assert seen.total == 0, (seen.aten, seen.triton)  # refused before any device op
    with static_target(T4), pytest.raises(Unservable, match="sm_75"):  # the up-front check callers can make
        attn_mod.check_target("meta", torch.bfloat16, 64)
    with static_target("l4"):
        attn_mod.check_target("meta", torch.bfloat16, 128)  # servable: no error
    attn_mod.check_target("cpu", torch.bfloat16, 64)  # the interpreter: nothing to check


@pytest.mark.parametrize(
    "dtype, Lk, splits",
    [(torch.bfloat16, 300, None), (torch.float32, 97, 40)],
    ids=["bf16-h100-config", "fp32-40-splits"],
)
def test_split_matches_unsplit(dtype, Lk, splits):
    """Flash-decoding splits give the unsplit answer: the split the H100 config picks for a 300-key decode (18 splits
    of 16-17 keys, not on block boundaries), and 40 splits of 2-3 keys (the merge steps over two chunks of up to 32
    splits); the sequence ends before the cache does, so the last splits are empty."""
    B, Hq, Hkv, D = 1, 14, 2, 64
    q, k, v = _qkv(B, Hq, Hkv, 1, Lk, D, dtype, seed=11)
    lens = torch.tensor([2 * Lk // 3], device=q.device)  # the splits past it see no key
    kw = dict(causal=True, causal_offset=lens - 1, kv_end=lens)
    if splits is None:
        cfg = cuda_config(1, Hkv, Hq // Hkv, Lk, D, dtype, TARGETS["h100"])
        assert (cfg.num_splits, cfg.block_n) == (18, 16)
    else:
        cfg = AttentionConfig(16, 16, num_splits=splits)
    one = attention_triton(q, k, v, config=AttentionConfig(16, 16), **kw)
    split = attention_triton(q, k, v, config=cfg, **kw)
    assert_matches_ref(split, q, k, v, **kw)
    # the same softmax summed in another order: fp32 agrees to rounding, bf16 to one rounding of the output
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert (split.float() - one.float()).abs().max().item() <= tol * one.float().abs().max().item()


def _bad(**over):
    base = dict(zip("qkv", _qkv(2, 4, 2, 17, 17, 16, torch.float32), strict=True))
    base.update(over)
    return base


k_meta = torch.empty(2, 2, 17, 16, device="meta")
BAD_INPUTS = [
    (lambda: _bad(q=torch.randn(2, 17, 16)), ValueError, "must be 4-D"),
    (lambda: _bad(v=torch.randn(2, 2, 16, 16)), ValueError, "same shape|one shape"),
    (lambda: _bad(k=torch.randn(3, 2, 17, 16), v=torch.randn(3, 2, 17, 16)), ValueError, "batch"),
    (lambda: _bad(k=torch.randn(2, 3, 17, 16), v=torch.randn(2, 3, 17, 16)), ValueError, "multiple of key/value"),
    (lambda: _bad(k=torch.randn(2, 2, 17, 16).half(), v=torch.randn(2, 2, 17, 16).half()), TypeError, "one dtype"),
    (lambda: _bad(**dict(zip("qkv", _qkv(1, 2, 1, 3, 3, 16, torch.float64), strict=True))), TypeError, "float64"),
    (lambda: _bad(k=k_meta, v=k_meta), ValueError, "one device"),
    (lambda: _bad(kv_end=torch.tensor([17.0, 3.0])), TypeError, "integer tensor"),
    (lambda: _bad(kv_end=17), TypeError, "integer tensor"),
    (lambda: _bad(kv_start=torch.tensor([0, 1, 2])), ValueError, r"shape \(B,\)"),
    (lambda: _bad(causal=True, causal_offset=torch.tensor([1, 2, 3])), ValueError, "0-dim, \\(1,\\) or \\(B,\\)"),
    (lambda: _bad(causal=True, causal_offset=torch.tensor(1.5)), TypeError, "integer tensor"),
    (lambda: _bad(causal=True, causal_offset=True), TypeError, "int or an integer tensor"),
    (lambda: _bad(scale="big"), TypeError, "scale"),
]


@pytest.mark.parametrize("make,exc,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
@pytest.mark.parametrize("entry", ["attention", "attention_triton"])
def test_bad_inputs_raise_clear_errors(make, exc, match, entry, monkeypatch):
    monkeypatch.setenv("DINFILL_BACKEND", "torch")
    fn = attention if entry == "attention" else attention_triton
    kwargs = make()
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(exc, match=match):
        fn(q, k, v, **kwargs)


def test_triton_specific_errors(monkeypatch):
    q, k, v = _qkv(1, 2, 1, 5, 5, 320, torch.float32)
    with pytest.raises(ValueError, match="head dim 320 is not supported.*DINFILL_BACKEND=torch"):
        attention_triton(q, k, v)
    q, k, v = _qkv(1, 2, 1, 5, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="causal attention only"):
        attention(q, k, v, causal=False, window=4)
    with pytest.raises(TypeError, match="positive int"):
        attention_triton(q, k, v, causal=True, window=0)
    with pytest.raises(ValueError, match="block_m, block_n >= 16"):
        attention_triton(q, k, v, config=AttentionConfig(8, 16))
    if not torch.cuda.is_available():
        dev_off = torch.tensor([0], device="meta")
        with pytest.raises(ValueError, match="move it to q's device"):
            attention(q, k, v, causal=True, causal_offset=dev_off)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="needs CUDA"):
            attention_triton(q, k, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (the GPU check script runs this)")
@pytest.mark.parametrize("num_splits", [1, 4])
def test_cuda_graph_replay_with_changing_offset(num_splits):
    """A decode step captured once replays with new offsets and key ends read on the device (a sync fails capture)."""
    B, Hq, Hkv, Lk, D = 2, 14, 2, 300, 64
    q, k, v = _qkv(B, Hq, Hkv, 1, Lk, D, torch.bfloat16, seed=8)
    offset = torch.zeros(B, dtype=torch.int32, device="cuda")  # static buffers the graph reads
    kv_end = torch.ones(B, dtype=torch.int32, device="cuda")
    cfg = AttentionConfig(16, 64, num_splits=num_splits)
    run = lambda: attention_triton(q, k, v, causal=True, causal_offset=offset, kv_end=kv_end, config=cfg)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for lens in ([1, 300], [77, 150], [299, 5]):
        lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        offset.copy_(lens - 1)
        kv_end.copy_(lens)
        graph.replay()
        kw = dict(causal=True, causal_offset=lens - 1, kv_end=lens)
        assert_matches_ref(out, q, k, v, **kw)
        assert torch.equal(out, attention_triton(q, k, v, config=cfg, **kw))
