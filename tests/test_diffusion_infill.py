"""Text-level diffusion infilling: canvas building, truncation, the middle slice, length strategies."""

from __future__ import annotations

import pytest
import torch
from tiny import qwen_vocab_diffusion_model

import dinfill
from dinfill.models import Decoder
from dinfill.sampler.canvas import build_row, end_token_ids, layout_rows, middle_lengths, trim_at_end
from dinfill.sampler.diffusion import diffusion_generate, infill

LIMIT = 96  # the tiny model's position limit, so truncation is cheap to reach


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(shared_dir):
    return shared_dir / "tokenizers" / "qwen2.5-coder"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return dinfill.load_tokenizer(str(tokenizer_dir), add_mask_token=True)


@pytest.fixture(scope="module")
def model():
    return qwen_vocab_diffusion_model(LIMIT)


LONG_PREFIX = (
    "".join(f"def helper_{i}(x):\n    return x * {i} + {i * 7}\n\n" for i in range(12)) + "def target(a, b):\n"
)
SUFFIX = "\n    return result\n"


def _by_hand(model, tok, prefix, suffix, m, limit, **kw):
    """Build the canvas independently, run the sampler on it, slice where the masks really are."""
    p_ids = tok(prefix, add_special_tokens=True)["input_ids"]
    s_ids = tok(suffix, add_special_tokens=False)["input_ids"]
    canvas = (p_ids + [tok.mask_token_id] * m + s_ids)[-limit:]
    start = len(canvas) - m - len(s_ids)
    out = diffusion_generate(model, torch.tensor([canvas]), mask_id=tok.mask_token_id, **kw)
    return out[0, start : start + m].tolist(), start, len(p_ids)


def test_middle_slice_after_left_truncation(model, tok):
    kw = dict(steps=3, alg="maskgit_plus")
    mid, start, n_prefix = _by_hand(model, tok, LONG_PREFIX, SUFFIX, 6, LIMIT, **kw)
    assert n_prefix > LIMIT and start < n_prefix, "the prefix must really be truncated"
    got = infill(model, tok, [LONG_PREFIX], [SUFFIX], length="fixed", middle_tokens=6, max_length=2048, **kw)
    assert got == [tok.decode(mid, skip_special_tokens=True)]
    assert got[0] != ""


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_batch_of_mixed_problems_equals_each_alone(model, tok, cache):
    prefixes = [LONG_PREFIX, "", "x = 1\n", "import os\n"]
    suffixes = [SUFFIX, "\nprint(y)\n", "", ""]
    middles = ["    result = a + b", "y = 2", "z = x + 1\n", ""]  # the last oracle middle is empty
    kw = dict(length="oracle", middles=middles, steps=4, alg="p2", cache=cache, refresh=2)
    batched = infill(model, tok, prefixes, suffixes, batch_size=4, **kw)
    triples = zip(prefixes, suffixes, middles, strict=True)
    alone = [infill(model, tok, [p], [s], **(kw | dict(middles=[m])))[0] for p, s, m in triples]
    assert batched == alone
    assert batched[3] == ""
    n = len(tok(middles[0], add_special_tokens=False)["input_ids"])
    mid, _, _ = _by_hand(model, tok, prefixes[0], suffixes[0], n, LIMIT, steps=4, alg="p2")
    if cache == "none":
        assert batched[0] == tok.decode(mid, skip_special_tokens=True)


def test_empty_prefix_and_suffix_are_valid(model, tok):
    out, stats = infill(model, tok, ["", "a = 1\n", ""], ["", "", "b = 2\n"], length="fixed", middle_tokens=4,
                        steps=2, alg="entropy", return_stats=True)  # fmt: skip
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    assert stats[0].variable_rows == 8  # 4 masks; logits rows are rounded up to a row bucket (graphs.bucket_rows)
    mid, start, _ = _by_hand(model, tok, "", "", 4, LIMIT, steps=2, alg="entropy")
    assert start == 0 and out[0] == tok.decode(mid, skip_special_tokens=True)


def test_adaptive_cuts_at_the_first_end_token(model, tok):
    out = infill(model, tok, ["def f():\n"], ["\n"], length="adaptive", middle_tokens=8, steps=2, alg="maskgit_plus")
    mid, _, _ = _by_hand(model, tok, "def f():\n", "\n", 8, LIMIT, steps=2, alg="maskgit_plus")
    assert out == [tok.decode(trim_at_end(mid, end_token_ids(tok, tok.mask_token_id)), skip_special_tokens=True)]
    ends = end_token_ids(tok, tok.mask_token_id)
    assert {tok.eos_token_id, tok.mask_token_id, tok.convert_tokens_to_ids("<|fim_pad|>")} <= ends
    assert trim_at_end([5, 6, tok.eos_token_id, 7], ends) == [5, 6]
    assert trim_at_end([tok.mask_token_id, 5], ends) == []
    assert trim_at_end([5, 6], ends) == [5, 6]


def test_middle_lengths(tok):
    n = len(tok.encode("    a = 1", add_special_tokens=False))
    assert n > 1 and middle_lengths(tok, 2, length="oracle", middles=["    a = 1", ""]) == [n, 0]
    assert middle_lengths(tok, 2, length="fixed", middle_tokens=7) == [7, 7]
    with pytest.raises(ValueError, match="needs middles"):
        middle_lengths(tok, 1, length="oracle")
    with pytest.raises(ValueError, match="needs middle_tokens"):
        middle_lengths(tok, 1, length="fixed")
    with pytest.raises(ValueError, match=">= 1"):
        middle_lengths(tok, 1, length="fixed", middle_tokens=0)
    with pytest.raises(ValueError, match="not one of"):
        middle_lengths(tok, 1, length="guess", middle_tokens=4)


def test_canvas_rows_and_layouts():
    row = build_row(list(range(10, 30)), [7, 8, 9], 4, mask_id=99, limit=12)
    assert row.truncated == 15 and row.middle_start == 5
    assert row.ids == [25, 26, 27, 28, 29, 99, 99, 99, 99, 7, 8, 9]
    with pytest.raises(ValueError, match="exceed the canvas limit"):
        build_row([1, 2], [3] * 10, 4, mask_id=99, limit=12)
    rows = [build_row([1, 2, 3], [4], 2, 99, 50), build_row([1], [4, 5, 6, 7], 3, 99, 50)]
    right = layout_rows(rows, pad_id=0, layout="right")
    assert right.middle_start == [3, 1] and right.input_ids.shape == (2, 8)
    aligned = layout_rows(rows, pad_id=0, layout="aligned")
    assert aligned.middle_start == [3, 3] and aligned.input_ids.shape == (2, 10)
    assert aligned.input_ids[1, 2:6].tolist() == [1, 99, 99, 99] and aligned.attention_mask[1, :2].sum() == 0
    assert aligned.middles(aligned.input_ids) == [[99, 99], [99, 99, 99]]
    assert layout_rows(rows, pad_id=0, layout="aligned", limit=9).layout == "right"  # too wide: fall back


def test_infill_bad_input(model, tok, tokenizer_dir, tmp_path, monkeypatch):
    plain = dinfill.load_tokenizer(str(tokenizer_dir))  # Qwen ships no mask token
    with pytest.raises(ValueError, match="no mask token"):
        infill(model, plain, ["a"], ["b"], length="fixed", middle_tokens=3)
    with monkeypatch.context() as m:  # the trained-weights check of require_mask_token, without the dispatcher
        m.setattr(model, "checkpoint", "fredzzp/open-dcoder-0.5B", raising=False)
        with pytest.raises(ValueError, match=r"mask id 151666 is not the one .* trained with \('<M>', id 151665\)"):
            infill(model, tok, ["a"], ["b"], length="fixed", middle_tokens=3, mask_id=151666)
    with pytest.raises(TypeError, match=r"infill\(\): suffixes\[0\] must be a string, got int"):
        infill(model, tok, ["a"], [3], length="fixed", middle_tokens=3)
    with pytest.raises(ValueError, match="exceed the canvas limit"):
        infill(model, tok, ["a"], [LONG_PREFIX], length="fixed", middle_tokens=3)
    with pytest.raises(ValueError, match="one suffix per prefix"):
        infill(model, tok, ["a", "b"], ["c"], length="fixed", middle_tokens=3)
    with pytest.raises(ValueError, match="batch_size"):
        infill(model, tok, ["a"], ["c"], length="fixed", middle_tokens=3, batch_size=0)
    with pytest.raises(ValueError, match="needs middles"):
        infill(model, tok, ["a"], ["c"])
    ar = Decoder(model.config)
    with pytest.raises(ValueError, match="needs a diffusion model"):
        infill(ar, tok, ["a"], ["c"], length="fixed", middle_tokens=3)


def test_dispatch_through_sampler_package(model, tok):
    from dinfill import sampler

    opts = dict(length="fixed", middle_tokens=3, steps=2, alg="maskgit_plus")
    a = sampler.infill(model, tok, ["x = "], ["\n"], preset="greedy", **opts)  # the dispatcher's default: published
    b = infill(model, tok, ["x = "], ["\n"], length="fixed", middle_tokens=3, steps=2, alg="maskgit_plus")
    assert a == b
    assert sampler.diffusion_generate is diffusion_generate
