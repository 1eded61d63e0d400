"""Metrics and post-processing rules: pass@k against brute force, both exact-match rules, summaries."""

from __future__ import annotations

import itertools
import math

import pytest

from dinfill.eval.metrics import exact_match, mean_pass_at_k, pass_at_k, summarize_records, useful_ks
from dinfill.eval.postprocess import PostProcess, cut_at_stop, first_line


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k"), [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (7, 0, 4), (7, 6, 2), (9, 3, 9)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_and_errors():
    assert pass_at_k(200, 10, 1) == pytest.approx(10 / 200)
    assert pass_at_k(200, 10, 100) == pytest.approx(1 - math.comb(190, 100) / math.comb(200, 100))
    assert mean_pass_at_k([(1, 1), (1, 0), (1, 0), (1, 1)], 1) == 0.5
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("        return False", "        return False"),
        ("\n        return False\n\nprint(1)", "        return False"),
        (" \n    x = 1\n", "    x = 1"),
        ("x = 1\ny = 2", "x = 1"),
        ("\n", ""),
        ("", ""),
    ],
)
def test_first_line_rule(text, line):
    assert first_line(text) == line


def test_exact_match_rules_differ_where_the_published_ones_did():
    canonical = "        return False"
    ar_style = "\n        return False\n\n\nprint(is_multiply_prime(30))"
    assert exact_match(ar_style, canonical, "first_line") and not exact_match(ar_style, canonical, "whole")
    assert exact_match("\n  return False  \n", "return False", "whole")
    with pytest.raises(ValueError, match="unknown exact-match rule"):
        exact_match("a", "a", "fuzzy")


def test_postprocess_rules():
    assert PostProcess("none")("a\nb") == "a\nb"
    assert PostProcess("first_line")("\na\nb") == "a"
    stop = PostProcess("stop_sequences", ("\ndef ", "\nclass "))
    assert stop("x = 1\nclass A:\n\ndef f():") == "x = 1"
    assert cut_at_stop("abc", ["z"]) == "abc"
    assert PostProcess.from_dict(stop.to_dict()) == stop
    assert "stop_sequences" in stop.describe()
    with pytest.raises(ValueError, match="needs at least one stop string"):
        PostProcess("stop_sequences")
    with pytest.raises(ValueError, match="unknown post-processing rule"):
        PostProcess("trim")
    with pytest.raises(ValueError, match="stop strings were given"):
        PostProcess("none", ("x",))


def outcome_record(task_id: str, seed: int, sample: int, passed: bool) -> dict:
    return {
        "task_id": task_id,
        "seed": seed,
        "sample": sample,
        "outcome": {"passed": passed, "status": "passed" if passed else "failed"},
    }


def test_summary_over_seeds_and_samples():
    records = []
    # Seed 0: problem a passes 2 of 2 samples, b 0 of 2; seed 1: a 1 of 2, b 1 of 2.
    for seed, results in ((0, {"a": [True, True], "b": [False, False]}), (1, {"a": [True, False], "b": [False, True]})):
        for task_id, outcomes in results.items():
            records += [outcome_record(task_id, seed, sample, ok) for sample, ok in enumerate(outcomes)]
    summary = summarize_records(records, ks=(1, 2))
    assert summary["counts"] == {"passed": 4} and summary["total"] == 8 and summary["samples"] == 2
    assert summary["per_seed"]["0"]["pass@k"] == {"pass@1": 0.5, "pass@2": 0.5}
    assert summary["per_seed"]["1"]["pass@k"] == {"pass@1": 0.5, "pass@2": 1.0}
    assert summary["pass@k"]["pass@2"]["mean"] == pytest.approx(0.75)
    assert summary["pass@k"]["pass@2"]["sd"] == pytest.approx(math.sqrt(0.125))
    assert summary["statuses"] == {"failed": 4, "passed": 4}
    with pytest.raises(ValueError, match="no records"):
        summarize_records([])
    # Without ks, every useful k up to the samples there are.
    assert list(summarize_records(records)["pass@k"]) == ["pass@1", "pass@2"]


@pytest.mark.parametrize(
    ("n", "ks"),
    [
        (1, [1]),
        (3, [1, 2, 3]),
        (7, [1, 2, 5, 7]),
        (10, [1, 2, 5, 10]),
        (100, [1, 2, 5, 10, 20, 50, 100]),
        (257, [1, 2, 5, 10, 20, 50, 100, 200, 257]),
    ],
)
def test_useful_ks_are_1_2_5_per_decade_and_n(n, ks):
    assert useful_ks(n) == ks
