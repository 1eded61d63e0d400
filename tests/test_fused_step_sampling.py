"""fused_step's sampled path: the kept set, the distribution of the samples, determinism, split rows.

How the distribution is tested, and why this way
------------------------------------------------
The Triton kernel samples by inverse CDF: one uniform ``u`` per row picks the kept token whose
interval ``[F(i-1), F(i))`` (vocabulary order, ``F`` the CDF of ``softmax(z)`` on the kept set) holds
``u``. So a sample is ``token = map(u)`` with ``u`` from Philox. Both halves are tested separately, each
far more sharply than counting draws could in Triton's interpreter (~0.1 s a row):

* ``test_uniform_maps_to_the_inverse_cdf``: the launcher's test hook feeds chosen uniforms. For every
  kept token with ``p >= 2e-3`` two rows probe its interval 0.25 % of ``p`` inside each end, and must
  return it: a token whose probability is off by 1 % (an interval end moved by ``0.01 p``) fails a
  probe. Probes at ``u = 0`` and ``u = 1 - 2**-24`` return the first and the last kept token, and no
  probe ever returns a token outside the kept set. This covers top-p alone, top-k alone, both, no
  filter, the extremes (top-p 0.01 / 0.999, top-k 1 / V), bf16 / fp16 / fp32, the window and the deep
  path, and rows split across programs.
* ``test_philox_uniforms_are_uniform``: 2**16 uniforms from the kernel's own generator (the same
  jit helper), over 64 rows x 1024 offsets: a chi-square over 256 equal bins. With n = 65536 draws a
  bin expects 256; a generator whose bin probabilities were off by 10 % in a quarter of the bins gives
  a noncentrality of ~160, far beyond the p = 1e-3 threshold (critical chi-square ~330 on 255 df).
* ``test_triton_samples_chi_square``: the two halves together (Philox -> kernel -> token) on 160 rows
  sharing one logit vector: a smoke test of the whole path. Its power is modest (it detects errors of
  roughly 40 % in a token of probability 0.3), which is what the interpreter affords.
* ``test_torch_path_chi_square``: the torch path draws with ``torch.rand`` + Gumbel-max, so there only
  counting works, and it is cheap: n = 400 000 draws per setting. A token of probability p with a
  relative error d shifts its count by ``d p n`` against a standard deviation ``sqrt(n p (1 - p))``:
  for d = 1 %, p >= 0.25 that is >= 5.8 standard deviations, and the test fails any token beyond 5
  (per-token false alarm ~6e-7) or a Pearson p-value below 1e-4.

Fixed seeds everywhere: every test is deterministic.
"""

import importlib
import math

import pytest
import torch
from fused_step_helpers import DEV, MASK, kept_distribution, step
from fused_step_helpers import i64 as _t

from dinfill.kernels.fused_step_options import FusedStepOptions
from dinfill.kernels.reference import fused_step_ref

rows_mod = importlib.import_module("dinfill.kernels.fused_step_rows")
select_mod = importlib.import_module("dinfill.kernels.fused_step_select")
fs = importlib.import_module("dinfill.kernels.fused_step_kernel")

# the interpreter computes masked -inf lanes with numpy, which warns about values the kernel discards
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture
def small_blocks(monkeypatch):
    """Triton path with interpreter-sized blocks: one program per row unless a test splits rows."""
    monkeypatch.setenv("DINFILL_BACKEND", "triton")
    for name, value in dict(MAX_BLOCK_V=64, BLOCK_F=64, BLOCK_S=64, BLOCK_D=32, MIN_CHUNK=1 << 20,
                            MIN_SPLIT_SAMPLED=1).items():  # fmt: skip
        monkeypatch.setattr(rows_mod, name, value)
    monkeypatch.setattr(select_mod, "BLOCK_ROWS", 16)
    return monkeypatch


def run_rows(base: torch.Tensor, uniforms: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row holds ``base``; row r samples with uniform ``uniforms[r]``. Returns (tokens, conf)."""
    N, V = uniforms.numel(), base.numel()
    logits = base[None].expand(N, V).contiguous().to(DEV)
    x = torch.full((1, N), MASK, device=DEV)
    opts = FusedStepOptions(mask_id=MASK, select="p2", count=0, **kw).check(N, 1, DEV)
    seed, offset, positions = _t(1).to(DEV), _t(0).to(DEV), torch.arange(N, device=DEV)[None]
    conf, _, tok, _ = rows_mod.launch_rows(logits, x, positions, opts, seed, offset, uniforms=uniforms.to(DEV))
    return tok.cpu(), conf.cpu()


def probes(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniforms just inside both ends of every kept token's CDF interval (and 0, 1-): (u, expected token)."""
    kept = (p > 0).nonzero().squeeze(1)
    end = torch.cumsum(p, 0)
    start = end - p
    big = kept[p[kept] >= 2e-3]
    inset = 0.0025 * p[big]
    u = torch.cat([start[big] + inset, end[big] - inset, torch.tensor([0.0, 1 - 2**-24], dtype=torch.float64)])
    want = torch.cat([big, big, kept[:1], kept[-1:]])
    return u.float(), want


def _base(V: int, dtype: torch.dtype, seed: int, scale: float = 1.5) -> torch.Tensor:
    """Distinct logits, exact in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.randperm(8 * V, generator=g)[:V].float() * (scale / V) - scale * 2
    return vals.to(dtype)


SPLIT = {"MIN_CHUNK": 64, "PROGRAMS_PER_SM": 64, "FINISH_CHUNKS": 2}  # V=200: 4 programs a row, 2 window steps
PROBE_CASES = [  # (id, V, dtype, temperature, filters, tunables)
    ("top_p", 40, torch.bfloat16, 0.7, {"top_p": 0.9}, {}),
    ("top_k", 40, torch.bfloat16, 1.0, {"top_k": 5}, {}),
    ("both", 40, torch.bfloat16, 0.6, {"top_p": 0.95, "top_k": 6}, {}),
    ("no-filter", 12, torch.bfloat16, 2.0, {}, {}),
    ("top_p-0.01", 40, torch.bfloat16, 1.0, {"top_p": 0.01}, {}),
    ("top_p-0.999", 12, torch.bfloat16, 3.0, {"top_p": 0.999}, {}),
    ("top_k-1", 40, torch.bfloat16, 1.0, {"top_k": 1}, {}),
    ("top_k-V", 12, torch.bfloat16, 2.0, {"top_k": 12}, {}),
    ("fp16", 40, torch.float16, 0.7, {"top_p": 0.9}, {}),
    ("fp32-deep", 40, torch.float32, 0.7, {"top_p": 0.9, "top_k": 7}, {}),
    ("bf16-deep", 40, torch.bfloat16, 0.7, {"top_p": 0.9}, {"WINDOW_KEYS": 16}),
    ("split-rows", 200, torch.bfloat16, 0.8, {"top_p": 0.6}, SPLIT),
]


@pytest.mark.parametrize("name,V,dtype,temperature,filters,tunables", PROBE_CASES, ids=[c[0] for c in PROBE_CASES])
def test_uniform_maps_to_the_inverse_cdf(small_blocks, name, V, dtype, temperature, filters, tunables):
    """u -> token is the inverse CDF of the kept distribution, to 0.25 % of every probed token's mass."""
    for attr, value in tunables.items():
        small_blocks.setattr(rows_mod, attr, value)
    base = _base(V, dtype, seed=V + len(name))
    if name in ("top_p-0.01", "top_k-1"):  # these keep the top value only: give it two tokens
        base[V // 3] = base.max()
    p = kept_distribution(base, temperature, **filters)
    u, want = probes(p)
    assert int((p > 0).sum()) >= 2, "the case must leave a choice"
    tok, conf = run_rows(base, u, temperature=temperature, **filters)
    assert (p[tok] > 0).all(), "a sample outside the kept set"
    bad = (tok != want).nonzero().squeeze(1)
    assert bad.numel() == 0, [(u[i].item(), want[i].item(), tok[i].item()) for i in bad[:5]]
    torch.testing.assert_close(conf.double(), p[tok], rtol=2e-5, atol=1e-7)  # prob of the drawn token


def test_split_rows_are_really_split(small_blocks):
    """The split-row case above runs several programs per row (or it would not test the combine)."""
    small_blocks.setattr(rows_mod, "MIN_CHUNK", 64)
    small_blocks.setattr(rows_mod, "PROGRAMS_PER_SM", 64)
    C, chunk, _ = rows_mod.split_rows(33, 200, torch.device("cpu"), sampled=True)
    assert C == 4 and chunk == 64


# ------------------------------------------------------------------------------------------------
# the kept set on adversarial rows (greedy confidences reveal the kept mass; probes reveal membership)
# ------------------------------------------------------------------------------------------------


def _adversarial_rows(V: int) -> list[tuple[str, torch.Tensor, dict]]:
    """(name, fp32 logits exact in bf16 and fp16, filters) rows whose cut is delicate."""
    rows = []
    tie = torch.full((V,), -6.0)
    tie[[3, 9, 20]] = 2.0
    tie[[5, 11, 17, 30]] = 1.0  # four tokens tied at the cut value
    tie[0] = 3.0
    top = torch.softmax(tie, 0).sort(descending=True).values
    mass_before_ties = top[:4].sum().item()  # 3.0 and the three 2.0s
    rows.append(("ties-at-the-top-p-cut", tie, {"top_p": mass_before_ties + 0.01}))
    rows.append(("ties-at-the-top-k-cut", tie, {"top_k": 5}))  # the 5th largest is a tied 1.0: all four stay
    inf = torch.full((V,), float("-inf"))
    inf[[2, 7, 8, 31]] = torch.tensor([0.5, 4.0, 3.5, -1.0])
    rows.append(("mostly--inf", inf, {"top_p": 0.7}))
    rows.append(("mostly--inf-top_k-beyond-finite", inf, {"top_k": 10}))
    one = torch.full((V,), float("-inf"))
    one[13] = -2.0
    rows.append(("one-finite-logit", one, {"top_p": 0.5, "top_k": 3}))
    huge = torch.linspace(-3.0, 3.0, V) * 2.0**14  # gaps of ~2**10: every weight but the maximum underflows to 0
    huge[4] = 3.0 * 2.0**14  # a tie with the maximum (fp16 tops out at 65504)
    rows.append(("huge", huge, {"top_p": 0.5}))
    # bf16/fp16 rounding at the boundary: the row's values are dense near the cut
    dense = torch.arange(V).float() / 256.0 + 0.5
    rows.append(("dense-near-the-cut", dense, {"top_p": 0.5}))
    return rows


ADVERSARIAL = _adversarial_rows(37)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=lambda d: str(d)[6:])
def test_kept_set_on_adversarial_rows(small_blocks, dtype):
    """Greedy confidences (prob = 1 / kept mass, margin, entropy) equal the reference on every row."""
    names = [r[0] for r in ADVERSARIAL]
    for confidence in ("prob", "margin", "neg_entropy"):
        for name, row, filters in ADVERSARIAL:
            logits = row.to(dtype)[None]
            x_out, x_ref = torch.full((1, 1), MASK), torch.full((1, 1), MASK)
            kw = dict(mask_id=MASK, select="p2", count=torch.tensor([0]), confidence=confidence, **filters)
            conf = step(logits, x_out, torch.tensor([[0]]), **kw)
            conf_ref = fused_step_ref(logits, x_ref, torch.tensor([[0]]), **kw)
            assert torch.equal(x_out, x_ref), (name, confidence)
            torch.testing.assert_close(conf, conf_ref, rtol=2e-5, atol=2e-6, msg=f"{name} {confidence}")
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name,row,filters", ADVERSARIAL, ids=[r[0] for r in ADVERSARIAL])
def test_adversarial_kept_set_membership(small_blocks, name, row, filters):
    """Sampling reaches exactly the reference's kept set: first, last and every probed token."""
    base = row.to(torch.bfloat16)
    p = kept_distribution(base, 1.0, **filters)
    assert p.sum().item() == pytest.approx(1.0) and torch.isfinite(p).all()
    u, want = probes(p)
    tok, _ = run_rows(base, u, temperature=1.0, **filters)
    assert (p[tok] > 0).all(), "a sample outside the kept set"
    assert torch.equal(tok, want)


# ------------------------------------------------------------------------------------------------
# the generator, and the whole path
# ------------------------------------------------------------------------------------------------


def _uniform_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def uniforms(seed_ptr, out_ptr, N_ROWS: tl.constexpr, N_OFFSETS: tl.constexpr):
        """The 24-bit uniforms of rows x offsets (a tile), from the row kernel's own generator."""
        rows = tl.arange(0, N_ROWS)[None, :].to(tl.int64)
        offsets = tl.arange(0, N_OFFSETS)[:, None].to(tl.int64) * 7919 + 3  # (N_OFFSETS, 1)
        bits = rows_mod._philox24(tl.load(seed_ptr), offsets, rows, 0)
        tl.store(out_ptr + offsets // 7919 * N_ROWS + rows, bits)

    return uniforms


def test_philox_uniforms_are_uniform():
    """The kernel's uniforms over many (row, offset) pairs: equal-bin chi-square, and no repeated stream."""
    pytest.importorskip("triton")
    n_rows, n_offsets = 64, 1024
    out = torch.full((n_rows * n_offsets,), -1, dtype=torch.int32, device=DEV)
    _uniform_kernel()[(1,)](_t(1234).to(DEV), out, N_ROWS=n_rows, N_OFFSETS=n_offsets)
    out = out.cpu()
    assert int(out.min()) >= 0 and int(out.max()) < 2**24
    counts = torch.bincount(out >> 16, minlength=256).double()  # 256 bins of the top 8 bits
    expected = out.numel() / 256
    stat = ((counts - expected) ** 2 / expected).sum()
    p_value = torch.special.gammaincc(torch.tensor(255 / 2, dtype=torch.float64), stat / 2).item()
    assert p_value > 1e-3, p_value
    assert out.unique().numel() > 0.99 * out.numel(), "rows / offsets repeat their random numbers"
    # neighbouring rows are not correlated (lag-1 correlation of a 65536-sample: sd ~ 0.004)
    u = out.view(n_offsets, n_rows).double() / 2**24
    corr = torch.corrcoef(torch.stack([u[:, :-1].reshape(-1), u[:, 1:].reshape(-1)]))[0, 1].item()
    assert abs(corr) < 0.02, corr


def _chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square p-value; categories expecting fewer than 5 counts are pooled into one."""
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum(0, keepdim=True)])
        expected = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    stat = ((observed - expected) ** 2 / expected).sum()
    df = observed.numel() - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2).item()


def _sample_counts(base, n, temperature, filters, rng) -> torch.Tensor:
    logits = base[None].expand(n, base.numel()).contiguous()
    x = torch.full((1, n), MASK)
    step(logits, x, torch.arange(n)[None], mask_id=MASK, select="p2", count=torch.tensor([0]),
               temperature=temperature, **filters, **rng)  # fmt: skip
    return torch.bincount(x[0], minlength=base.numel()).double()


def test_triton_samples_chi_square(small_blocks):
    """Philox -> kernel -> tokens, end to end: 160 rows, every draw kept, counts pass a chi-square."""
    n = 160
    base = _base(16, torch.bfloat16, seed=3, scale=1.0)
    filters = {"top_p": 0.9, "top_k": 6}
    p = kept_distribution(base, 0.8, **filters)
    counts = _sample_counts(base, n, 0.8, filters, dict(seed=_t(99), offset=_t(5)))
    assert counts[p == 0].sum() == 0, "a draw outside the kept set"
    assert (p * n >= 5).sum() >= 3
    assert _chi2_pvalue(counts[p > 0], p[p > 0] * n) > 1e-3


TORCH_CASES = [
    ({"top_p": 0.7}, 0.8),
    ({"top_k": 4}, 1.0),
    ({"top_p": 0.9, "top_k": 3}, 0.6),
    ({"top_p": 0.01}, 1.0),
    ({"top_p": 0.999}, 2.0),
    ({"top_k": 1}, 1.0),
    ({"top_k": 8}, 3.0),
    ({}, 1.5),
]


@pytest.mark.parametrize("filters,temperature", TORCH_CASES, ids=[str(c[0]) for c in TORCH_CASES])
def test_torch_path_chi_square(monkeypatch, filters, temperature):
    """400 000 draws of the torch path: every token within 5 sd of n p, Pearson p-value above 1e-4."""
    monkeypatch.setenv("DINFILL_BACKEND", "torch")
    n = 400_000
    base = _base(8, torch.float32, seed=11, scale=0.8)
    p = kept_distribution(base, temperature, **filters)
    counts = _sample_counts(base, n, temperature, filters, dict(generator=torch.Generator().manual_seed(7)))
    assert counts[p == 0].sum() == 0, "a draw outside the kept set"
    kept = p > 0
    z = (counts[kept] - n * p[kept]) / torch.sqrt(n * p[kept] * (1 - p[kept])).clamp_min(1e-12)
    assert z.abs().max() < 5, z
    if int(kept.sum()) > 1:
        assert _chi2_pvalue(counts[kept], n * p[kept]) > 1e-4


# ------------------------------------------------------------------------------------------------
# determinism, graph replays, split rows
# ------------------------------------------------------------------------------------------------


def test_replays_repeat_and_advance(small_blocks):
    """The CUDA-graph pattern on the CPU: the same seed/offset tensors give the same tokens; advancing the
    offset in place (what a captured step does) gives fresh ones; the arrival counters are back at 0."""
    base = _base(40, torch.bfloat16, seed=5)
    N = 6
    logits = base[None].expand(N, 40).contiguous()
    seed, offset = _t(2024).to(DEV), _t(0).to(DEV)  # device tensors, advanced in place like a captured step's

    def replay() -> torch.Tensor:
        x = torch.full((1, N), MASK)
        step(logits, x, torch.arange(N)[None], mask_id=MASK, select="p2", count=torch.tensor([0]),
                   temperature=1.0, top_p=0.95, seed=seed, offset=offset)  # fmt: skip
        offset.add_(1)
        return x[0].clone()

    first = [replay() for _ in range(3)]
    offset.zero_()
    again = [replay() for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True)), "same seed and offset, other tokens"
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2]), "an offset gave no new draws"
    assert int(rows_mod.arrival_counters(DEV, 1).abs().sum()) == 0


def test_split_rows_match_one_program_per_row(small_blocks):
    """Greedy tokens and confidences of rows split over 4-5 programs equal the one-program rows and the reference."""
    gen = torch.Generator().manual_seed(21)
    V, N = 300, 5
    logits = (torch.randn(N, V, generator=gen) * 2).to(torch.bfloat16)
    logits[1, 150:] = float("-inf")  # whole chunks without a finite logit
    logits[2, 250] = logits[2, 10] = 9.0  # the maximum tied across chunks: the lowest id wins
    outs = []
    small_blocks.setattr(rows_mod, "PROGRAMS_PER_SM", 64)
    small_blocks.setattr(rows_mod, "FINISH_CHUNKS", 2)  # the finisher walks the chunks' windows in 3 steps
    for min_chunk in (1 << 20, 64):
        small_blocks.setattr(rows_mod, "MIN_CHUNK", min_chunk)
        for confidence, filters in (("margin", {}), ("neg_entropy", {"top_p": 0.8}), ("prob", {"top_k": 3})):
            x, x_ref = torch.full((1, N), MASK), torch.full((1, N), MASK)
            kw = dict(mask_id=MASK, select="p2", count=torch.tensor([0]), confidence=confidence, **filters)
            conf = step(logits, x, torch.arange(N)[None], **kw)
            conf_ref = fused_step_ref(logits, x_ref, torch.arange(N)[None], **kw)
            assert torch.equal(x, x_ref), (min_chunk, confidence)
            torch.testing.assert_close(conf, conf_ref, rtol=2e-5, atol=2e-6)
            outs.append((x, conf))
    assert x[0, 2].item() == 10
    for (xa, ca), (xb, cb) in zip(outs[:3], outs[3:], strict=True):
        assert torch.equal(xa, xb)
        torch.testing.assert_close(ca, cb, rtol=1e-6, atol=1e-7)
    assert math.isfinite(float(outs[-1][1].min()))


@pytest.mark.parametrize(
    "dtype,filters,tunables",
    [
        (torch.bfloat16, {"top_p": 0.9}, {}),  # window path
        (torch.bfloat16, {"top_p": 0.9, "top_k": 5}, {"WINDOW_KEYS": 16}),  # deep path, 16-bit keys
        (torch.float32, {"top_k": 6}, {}),  # deep path, fp32 keys
        (torch.float16, {}, {}),  # no filter: the running sums
    ],
    ids=["window", "deep-bf16", "deep-fp32", "no-filter"],
)
def test_sampled_rows_margin_and_entropy(small_blocks, dtype, filters, tunables):
    """margin and neg_entropy do not depend on the draw: sampled rows equal the reference exactly."""
    for attr, value in tunables.items():
        small_blocks.setattr(rows_mod, attr, value)
    gen = torch.Generator().manual_seed(31)
    N, V = 3, 97
    logits = (torch.randn(N, V, generator=gen) * 2).to(dtype)
    for confidence in ("margin", "neg_entropy"):
        x, x_ref = torch.full((1, N), MASK), torch.full((1, N), MASK)
        kw = dict(mask_id=MASK, select="p2", count=torch.tensor([0]), confidence=confidence, temperature=0.7, **filters)
        conf = step(logits, x, torch.arange(N)[None], seed=_t(3), offset=_t(0), **kw)
        conf_ref = fused_step_ref(
            logits, x_ref, torch.arange(N)[None], generator=torch.Generator().manual_seed(0), **kw
        )
        torch.testing.assert_close(conf, conf_ref, rtol=2e-5, atol=2e-6, msg=confidence)
        p = torch.stack([kept_distribution(logits[r], 0.7, **filters) for r in range(N)])
        assert (p.gather(1, x[0][:, None]) > 0).all(), "a sample outside the kept set"
