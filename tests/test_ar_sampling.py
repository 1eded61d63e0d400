"""Shared sampling helpers: steps 1-5 of sample_tokens (docs/sampler-semantics.md) and their statistics."""

from __future__ import annotations

import math

import pytest
import torch

from dinfill.sampler.sampling import check_sampling_args, filter_logits, sample_tokens, sampling_probs


def _kept_top_p(probs: list[float], top_p: float) -> set[int]:
    """Plain-Python nucleus: walk tokens by descending probability, stop once the mass *before* exceeds top_p."""
    kept, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda j: -probs[j]):
        if mass > top_p:
            break
        kept.add(i)
        mass += probs[i]
    return kept


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("vocab", [7, 1031])
def test_top_p_keeps_the_nucleus(top_p, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=gen) * 3  # (N, V)
    out = filter_logits(logits, temperature=0.8, top_p=top_p)
    probs = torch.softmax(logits.double() / 0.8, dim=-1)
    for row in range(5):
        want = _kept_top_p(probs[row].tolist(), top_p)
        got = set(torch.isfinite(out[row]).nonzero().flatten().tolist())
        assert got == want
        assert logits[row].argmax().item() in got  # top-1 always kept


def test_handmade_top_p_boundaries():
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()  # unsorted on purpose
    keep = lambda p: set(torch.isfinite(filter_logits(logits, top_p=p)).nonzero()[:, 1].tolist())  # noqa: E731
    assert keep(0.4) == {1}  # mass before the 2nd token is 0.5 > 0.4
    assert keep(0.7) == {1, 3}
    assert keep(0.85) == {0, 1, 3}
    assert keep(1.0) == {0, 1, 2, 3}


def test_top_k_keeps_ties_and_runs_after_top_p():
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0, -1.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=1))[0].tolist()
    assert kept == [True, False, True, False, False]
    kept = torch.isfinite(filter_logits(logits, top_k=3))[0].tolist()
    assert kept == [True, False, True, True, False]
    # top-p leaves 2 of 5 tokens; top-k=4 afterwards cannot bring any back
    both = filter_logits(torch.tensor([[5.0, 4.9, 0.0, -1.0, -2.0]]), top_p=0.6, top_k=4)
    assert torch.isfinite(both)[0].tolist() == [True, True, False, False, False]


def test_greedy_is_argmax_and_ignores_filters():
    logits = torch.randn(9, 257, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    want = logits.argmax(dim=-1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        lg = logits.to(dtype)
        assert torch.equal(sample_tokens(lg, top_p=0.1, top_k=2), lg.argmax(dim=-1))
    assert torch.equal(sample_tokens(logits, temperature=0.0, generator=None), want)


def test_samples_follow_the_filtered_distribution():
    # 20000 draws from one row: every sample is in the kept set and frequencies match p
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -3.0, 0.9])
    n = 20000
    rows = logits.expand(n, -1)  # (n, V)
    probs = sampling_probs(logits[None], temperature=0.7, top_p=0.9, top_k=4)[0]
    gen = torch.Generator().manual_seed(0)
    draws = sample_tokens(rows, temperature=0.7, top_p=0.9, top_k=4, generator=gen)
    freq = torch.bincount(draws, minlength=7).double() / n
    assert set(draws.unique().tolist()) <= set((probs > 0).nonzero().flatten().tolist())
    # binomial standard error <= sqrt(0.25 / n) ~ 0.0035: allow about 4.5 sigma
    assert (freq - probs.double()).abs().max().item() < 4.5 * math.sqrt(0.25 / n)


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(4, 1031, generator=torch.Generator().manual_seed(1))
    a = sample_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = sample_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(7))
    c = [sample_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(s)) for s in range(8, 12)]
    assert torch.equal(a, b)
    assert any(not torch.equal(a, x) for x in c)


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match=r"temperature \(--temperature\) must be >= 0 .*, got -1"):
        check_sampling_args(-1, None, None)
    with pytest.raises(ValueError, match=r"top_p \(--top-p\) must lie in \(0, 1\] .*, got 0$"):
        check_sampling_args(1.0, 0, None)
    with pytest.raises(ValueError, match=r"top_p \(--top-p\) must lie in \(0, 1\] .*, got 1.5"):
        check_sampling_args(1.0, 1.5, None)
    with pytest.raises(ValueError, match=r"top_k \(--top-k\) must be an integer >= 1 .*, got 0"):
        check_sampling_args(1.0, None, 0)
    with pytest.raises(ValueError, match=r"top_k \(--top-k\) must be an integer >= 1 .*, got 2.5"):
        check_sampling_args(1.0, None, 2.5)
    with pytest.raises(ValueError, match="must be \\(N, V\\)"):
        sample_tokens(torch.zeros(3))
