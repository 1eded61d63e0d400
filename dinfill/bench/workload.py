"""Benchmark workloads: how long prefixes, middles and suffixes are, and random token ids of those lengths.

Why lengths and not texts: with random weights (the offline benchmark) the content of a canvas does not
change the work a step does, only its shape does; and the shape is what differs between a toy benchmark
and a real evaluation (HumanEval-Infill canvases are ~200 tokens with ~8-token middles, so a step is
dominated by the prefix and suffix, which is exactly what the dual cache removes). Two sources:

* ``humaneval``: the (prefix, middle, suffix) token lengths of HumanEval-SingleLineInfilling problems read
  from ``$DINFILL_DATA_DIR/humaneval-infilling/`` (or ``data_dir``), tokenized with the given tokenizer.
  Without a tokenizer, lengths are estimated as characters / 3.38, the mean characters per Qwen2.5-Coder
  token over those prompts (measured on the 1033 problems).
* ``synthetic``: a documented parametric fit of the same measurement (below), for machines without the
  data. Seeded, so two runs draw the same problems.

``auto`` takes ``humaneval`` when the data file is there and ``synthetic`` otherwise, and the record says
which one ran.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Problem", "Workload", "LENGTH_SOURCES", "SYNTHETIC", "draw_workload", "random_ids", "humaneval_path"]

LENGTH_SOURCES = ("auto", "humaneval", "synthetic")
_HUMANEVAL_FILE = "humaneval-infilling/HumanEval-SingleLineInfilling.jsonl.gz"
_CHARS_PER_TOKEN = 3.38  # Qwen2.5-Coder tokenizer on the HumanEval-SingleLineInfilling prompts

# Log-normal fits (median, sigma of log, clip range) of the HumanEval-SingleLineInfilling token lengths
# with the Qwen2.5-Coder tokenizer: prefix median 171 (p10 96, p90 325), middle median 7.4 (p10 4, p90 15),
# suffix empty for 15% of problems and otherwise median 29 (p10 7, p90 87). Clip ranges span the data.
SYNTHETIC = {
    "prefix": (171.0, 0.48, (16, 1024)),
    "middle": (7.4, 0.53, (1, 64)),
    "suffix": (28.6, 0.98, (1, 512)),
    "suffix_empty": 0.15,
}


@dataclass(frozen=True)
class Problem:
    """Token lengths of one infilling problem."""

    prefix: int
    middle: int
    suffix: int


@dataclass
class Workload:
    """Problems to benchmark, and where their lengths came from (for the record)."""

    problems: list[Problem]
    source: str

    def summary(self) -> dict:
        """Count, source and median lengths (what a results record stores)."""

        def median(values: Sequence[int]) -> float:
            s = sorted(values)
            n = len(s)
            return float(s[n // 2]) if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2

        ps = self.problems
        return {
            "problems": len(ps),
            "source": self.source,
            "median_prefix": median([p.prefix for p in ps]),
            "median_middle": median([p.middle for p in ps]),
            "median_suffix": median([p.suffix for p in ps]),
        }


def humaneval_path(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The HumanEval-SingleLineInfilling file under ``data_dir`` or ``$DINFILL_DATA_DIR``, if it exists."""
    root = data_dir if data_dir is not None else os.environ.get("DINFILL_DATA_DIR")
    if not root:
        return None
    path = Path(root) / _HUMANEVAL_FILE
    return path if path.is_file() else None


def _lognormal(rng: random.Random, median: float, sigma: float, clip: tuple[int, int]) -> int:
    return int(min(max(round(median * math.exp(rng.gauss(0.0, sigma))), clip[0]), clip[1]))


def _synthetic(n: int, rng: random.Random) -> list[Problem]:
    out = []
    for _ in range(n):
        prefix = _lognormal(rng, *SYNTHETIC["prefix"])
        middle = _lognormal(rng, *SYNTHETIC["middle"])
        empty = rng.random() < SYNTHETIC["suffix_empty"]
        out.append(Problem(prefix, middle, 0 if empty else _lognormal(rng, *SYNTHETIC["suffix"])))
    return out


def _humaneval(path: Path, n: int, rng: random.Random, tokenizer) -> list[Problem]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    picked = rng.sample(records, n) if n <= len(records) else [rng.choice(records) for _ in range(n)]

    def count(text: str, special: bool) -> int:
        if tokenizer is None:
            return max(0, round(len(text) / _CHARS_PER_TOKEN))
        return len(tokenizer(text, add_special_tokens=special)["input_ids"])

    return [
        Problem(count(r["prompt"], True), max(1, count(r["canonical_solution"], False)), count(r["suffix"], False))
        for r in picked
    ]


def draw_workload(
    n: int, source: str = "auto", *, seed: int = 0, tokenizer=None, data_dir: str | os.PathLike | None = None
) -> Workload:
    """Draw ``n`` problems' token lengths.

    Parameters
    ----------
    n : int
        Number of problems (>= 1).
    source : str
        ``"auto"``, ``"humaneval"`` (error when the data file is missing) or ``"synthetic"``.
    seed : int
        Seeds the draw (problems are sampled without replacement from HumanEval while ``n <= 1033``).
    tokenizer : transformers tokenizer, optional
        Counts HumanEval tokens exactly; without it lengths are estimated from characters.
    data_dir : path, optional
        Overrides ``$DINFILL_DATA_DIR``.

    Returns
    -------
    Workload
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of problems must be an int >= 1, got {n!r}")
    if source not in LENGTH_SOURCES:
        raise ValueError(f"lengths source {source!r} is not one of {LENGTH_SOURCES}")
    rng = random.Random(seed)
    path = humaneval_path(data_dir)
    if source == "humaneval" and path is None:
        where = data_dir or os.environ.get("DINFILL_DATA_DIR") or "(DINFILL_DATA_DIR is unset)"
        raise FileNotFoundError(
            f"--lengths humaneval needs {_HUMANEVAL_FILE} under the data directory {where}; set DINFILL_DATA_DIR "
            "or use --lengths synthetic"
        )
    if source == "synthetic" or path is None:
        return Workload(_synthetic(n, rng), "synthetic")
    label = "humaneval-single-line" + ("" if tokenizer is not None else f" (chars/{_CHARS_PER_TOKEN} estimate)")
    return Workload(_humaneval(path, n, rng, tokenizer), label)


def random_ids(n: int, vocab_size: int, exclude: int, generator: torch.Generator) -> list[int]:
    """``n`` token ids uniform in ``[0, vocab_size)`` without ``exclude`` (the mask id)."""
    ids = torch.randint(0, vocab_size - 1, (n,), generator=generator)
    return (ids + (ids >= exclude).long()).tolist()
