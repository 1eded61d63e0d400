"""``length="search"``: candidate lengths of a hole decoded in one batch, scored by the model, one kept.

Checked against plain references: every candidate equals its length run alone (an adaptive canvas of that
length), the scores equal a plain full-logits forward of each scoring canvas alone, the kept middle is the
chosen candidate sliced at its true column (after truncation too), the choice follows the documented rule,
the same seed gives the same choice, and the cost is reported.
"""

from __future__ import annotations

import pytest
import torch
from tiny import qwen_vocab_diffusion_model

import dinfill
import dinfill.sampler
from dinfill.sampler import diffusion as diffusion_module
from dinfill.sampler.canvas import BOUNDARY_WINDOW, boundary_row, end_token_ids, search_lengths, trim_at_end
from dinfill.sampler.diffusion import boundary_scores, diffusion_generate, infill
from dinfill.sampler.settings import length_setting

LIMIT = 96  # the model's position limit: the long prefix below is truncated

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(shared_dir):
    return dinfill.load_tokenizer(str(shared_dir / "tokenizers" / "qwen2.5-coder"), add_mask_token=True)


@pytest.fixture(scope="module")
def model():
    return qwen_vocab_diffusion_model(LIMIT)


LONG_PREFIX = "".join(f"def helper_{i}(x):\n    return x * {i}\n\n" for i in range(10)) + "def target(a, b):\n"
PREFIXES = [LONG_PREFIX, "x = 1\n", "def f(x):\n    return "]
SUFFIXES = ["\n    return result\n", "print(x)\n", ""]  # the last hole has no suffix: its prefix end is scored
GREEDY = dict(steps=4, alg="p2", temperature=0.0, top_p=None)


def test_candidate_lengths_and_length_settings():
    assert search_lengths(64) == [4, 8, 16, 32, 64]
    assert search_lengths(48) == [4, 8, 16, 32, 48]
    assert search_lengths(5) == [4, 5] and search_lengths(4) == [4] and search_lengths(2) == [2]
    with pytest.raises(ValueError, match="middle_tokens"):
        search_lengths(0)
    assert length_setting("oracle") == {"length": "oracle"}
    assert length_setting("fixed:32") == {"length": "fixed", "middle_tokens": 32}
    assert length_setting("search") == {"length": "search", "middle_tokens": 64}
    assert length_setting("adaptive", middle_tokens=12) == {"length": "adaptive", "middle_tokens": 12}
    for bad, message in (("oracle:8", "not a count"), ("fixed:0", "integer >= 1"), ("fixed:x", "integer >= 1"),
                         ("guess:8", "must be one of")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            length_setting(bad)


def _search(model, tok, **kw):
    return infill(model, tok, PREFIXES, SUFFIXES, length="search", middle_tokens=16, return_stats=True, **kw)


def test_batched_candidates_equal_each_length_alone(model, tok):
    texts, (stats,) = _search(model, tok, **GREEDY)
    found = stats.length_search
    assert found["candidates"] == [4, 8, 16] and found["rows_per_hole"] == 3
    assert stats.batch_size == 3 * len(PREFIXES), "every candidate of every hole in one sampler call"
    by_hole = {i: h for h, i in enumerate(found["holes"])}
    assert sorted(by_hole) == [0, 1, 2]
    for i, (prefix, suffix) in enumerate(zip(PREFIXES, SUFFIXES, strict=True)):
        for c, n in enumerate(found["candidates"]):
            # a candidate is an adaptive canvas of its length, run here alone
            alone = infill(model, tok, [prefix], [suffix], length="adaptive", middle_tokens=n, **GREEDY)
            assert tok.decode(found["middles"][by_hole[i]][c], skip_special_tokens=True) == alone[0], (i, n)
        chosen = found["chosen"][by_hole[i]]
        assert texts[i] == infill(model, tok, [prefix], [suffix], length="adaptive", middle_tokens=chosen, **GREEDY)[0]
    assert any(t.strip() for t in texts)


def test_chosen_middle_is_sliced_at_its_true_column(model, tok):
    texts, (stats,) = infill(model, tok, [LONG_PREFIX], [SUFFIXES[0]], length="search", middle_tokens=8,
                             return_stats=True, **GREEDY)  # fmt: skip
    (n,) = stats.length_search["chosen"]
    p_ids, s_ids = tok(LONG_PREFIX).input_ids, tok(SUFFIXES[0], add_special_tokens=False).input_ids
    canvas = (p_ids + [tok.mask_token_id] * n + s_ids)[-LIMIT:]
    start = len(canvas) - n - len(s_ids)
    assert len(p_ids) > LIMIT and start < len(p_ids), "the prefix must really be truncated"
    out = diffusion_generate(model, torch.tensor([canvas]), mask_id=tok.mask_token_id, steps=4, alg="p2")
    middle = trim_at_end(out[0, start : start + n].tolist(), end_token_ids(tok, tok.mask_token_id))
    assert texts == [tok.decode(middle, skip_special_tokens=True)] and texts[0]


@torch.no_grad()
def _plain_score(model, row) -> float:
    """A scoring canvas alone: full logits, shifted by hand, log-softmax at the scored columns."""
    logits = model(torch.tensor([row.ids]), causal=False)[0].float()  # (L, V)
    shifted = torch.cat([logits[:1], logits[:-1]])  # column j is predicted by the output of j - 1
    logp = shifted.log_softmax(-1)[row.columns, row.targets]
    return float(logp.mean())


def test_scores_equal_a_plain_forward_of_each_candidate_alone(model, tok):
    mask = tok.mask_token_id
    p_ids, s_ids = tok(LONG_PREFIX).input_ids, tok(SUFFIXES[0], add_special_tokens=False).input_ids
    middles = [[], tok("result = a + b").input_ids, tok("x").input_ids * 11]
    rows = [boundary_row(p_ids, m, s_ids, mask_id=mask, limit=LIMIT) for m in middles]
    rows.append(boundary_row(tok("y = 2\n").input_ids, [5, 6, 7], [], mask_id=mask, limit=LIMIT))  # no suffix
    w = min(BOUNDARY_WINDOW, len(s_ids))  # a suffix shorter than the window is scored whole
    for row, m in zip(rows, middles, strict=False):
        assert len(row.ids) == LIMIT and len(row.columns) == BOUNDARY_WINDOW + w
        suffix_at = LIMIT - len(s_ids)
        assert row.columns[BOUNDARY_WINDOW:] == list(range(suffix_at, suffix_at + w))
        assert row.targets[BOUNDARY_WINDOW:] == s_ids[:w]
        assert row.targets[:BOUNDARY_WINDOW] == p_ids[-BOUNDARY_WINDOW:]
        assert all(row.ids[c] == mask for c in row.columns)
        assert row.ids[suffix_at - len(m) : suffix_at] == m  # the candidate middle sits between the windows
    assert rows[-1].columns == list(range(len(tok("y = 2\n").input_ids)))  # a short prefix is scored whole
    batched = boundary_scores(model, rows, pad_id=0, chunk=3)  # padded, and split over two forwards
    alone = [_plain_score(model, row) for row in rows]
    assert batched == pytest.approx(alone, abs=1e-4)
    assert len(set(batched)) == len(batched), "different middles must score differently"


def test_the_choice_rule(model, tok, monkeypatch):
    texts, (stats,) = _search(model, tok, **GREEDY)
    found = stats.length_search
    for h, scores in enumerate(found["scores"]):
        filled = [c for c, m in enumerate(found["middles"][h]) if m] or list(range(3))
        best = max(filled, key=lambda c: (scores[c], -c))
        assert found["chosen"][h] == found["candidates"][best]
    # ties go to the shorter candidate; an empty middle is kept only when every candidate is empty
    trim = diffusion_module.trim_at_end
    monkeypatch.setattr(diffusion_module, "trim_at_end", lambda m, ends: [] if len(m) == 4 else trim(m, ends))
    monkeypatch.setattr(diffusion_module, "boundary_scores", lambda model, rows, **kw: [0.0] * len(rows))
    _, (stats,) = _search(model, tok, **GREEDY)
    assert stats.length_search["chosen"] == [8, 8, 8]
    monkeypatch.setattr(diffusion_module, "trim_at_end", lambda m, ends: [])
    texts, (stats,) = _search(model, tok, **GREEDY)
    assert stats.length_search["chosen"] == [4, 4, 4] and texts == ["", "", ""]


def test_search_is_deterministic_for_a_seed_and_reports_its_cost(model, tok):
    # sampled (two holes, candidates 4 and 8: the CPU sampling path is slow on a 152k vocabulary)
    sampled = dict(steps=4, alg="p2", temperature=0.6, top_p=None, length="search", middle_tokens=8)
    holes = (PREFIXES[1:], SUFFIXES[1:])
    first, (stats,) = infill(model, tok, *holes, seed=3, return_stats=True, **sampled)
    again, (stats_again,) = infill(model, tok, *holes, seed=3, return_stats=True, **sampled)
    other = infill(model, tok, *holes, seed=4, **sampled)
    assert first == again and stats.length_search["chosen"] == stats_again.length_search["chosen"]
    assert stats.length_search["scores"] == stats_again.length_search["scores"]
    assert other != first, "another seed must draw other middles"
    # the cost: the sampler's steps over 2 rows per hole, plus one scoring forward
    assert stats.batch_size == 4 and stats.length_search["rows_per_hole"] == 2
    assert stats.forward_passes == stats.steps_run + 1 and stats.length_search["scoring_forwards"] == 1
    assert stats.full_forwards == stats.steps_run + 1  # cache none: every step is a full forward
    # the public entry point takes the same setting
    assert dinfill.sampler.infill(model, tok, *holes, seed=3, **sampled) == first
