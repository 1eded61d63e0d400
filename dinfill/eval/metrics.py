"""Metrics: unbiased pass@k, exact match under both published rules, and summaries of per-problem records.

Why these exact definitions: pass@k uses the unbiased estimator of Chen et al. (2021), which with
one sample per problem is just the fraction passed; exact match has two rules because the
published SantaCoder-FIM numbers used two (``first_line`` for the diffusion model, ``whole`` for the
AR models), and a fair comparison has to show both.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from dinfill.eval.postprocess import first_line

EM_RULES = ("first_line", "whole")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` passed.

    ``1 - C(n - c, k) / C(n, k)``, evaluated as a product so that large ``n`` does not overflow.

    Parameters
    ----------
    n : int
        Samples drawn for the problem.
    c : int
        Samples that passed (0 <= c <= n).
    k : int
        The k of pass@k (1 <= k <= n).
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    # Every k-subset then holds a correct sample.
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(per_problem: Iterable[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as ``(n, c)`` pairs (problems with ``n < k`` are an error)."""
    values = [pass_at_k(n, c, k) for n, c in per_problem]
    if not values:
        raise ValueError("mean_pass_at_k: no problems")
    return sum(values) / len(values)


def exact_match(completion: str, canonical: str, rule: str) -> bool:
    """Exact match of a raw middle against the canonical one under ``first_line`` or ``whole``.

    ``first_line``: :func:`dinfill.eval.postprocess.first_line` of the completion, stripped, equals the
    stripped canonical; ``whole``: the stripped completion equals the stripped canonical.
    """
    if rule == "first_line":
        return first_line(completion).strip() == canonical.strip()
    if rule == "whole":
        return completion.strip() == canonical.strip()
    raise ValueError(f"unknown exact-match rule {rule!r}; choose one of {EM_RULES}")


def useful_ks(n: int) -> list[int]:
    """The k worth reporting for ``n`` samples per problem: 1, 2, 5, 10, 20, 50, 100, ... up to n, and n itself."""
    ks, base = {n}, 1
    while base <= n:
        ks.update(k for k in (base, 2 * base, 5 * base) if k <= n)
        base *= 10
    return sorted(ks)


def summarize_records(records: Sequence[dict], ks: Sequence[int] | None = None) -> dict:
    """Metrics of one run from its records alone (what summary.json and every report show).

    Counts are over records (problem x seed x sample); pass@k is computed per seed over the
    samples of each problem and then averaged over seeds, with the spread across seeds. ``ks``
    defaults to :func:`useful_ks` of the fewest samples any problem has (pass@2 with 2 samples).
    """
    if not records:
        raise ValueError("summarize_records: no records")
    out: dict = {"records": len(records), "problems": len({r["task_id"] for r in records})}
    seeds = sorted({r["seed"] for r in records})
    out["seeds"] = seeds
    out["samples"] = max(r["sample"] for r in records) + 1
    outcomes = [r["outcome"] for r in records]
    statuses = Counter(o["status"] for o in outcomes if "status" in o)
    if statuses:
        out["statuses"] = dict(sorted(statuses.items()))
    counts: dict = {}
    if any("passed" in o for o in outcomes):
        counts["passed"] = sum(bool(o.get("passed")) for o in outcomes)
    for key in ("exact_match", "exact_match_first_line", "exact_match_whole"):
        if any(key in o for o in outcomes):
            counts[key] = sum(bool(o.get(key)) for o in outcomes)
    out["counts"] = counts
    out["total"] = len(records)
    # Per seed: counts and pass@k over the samples of each problem.
    # Seeds are independent runs: pass@k within each, then mean and spread across them.
    per_seed: dict = {}
    for seed in seeds:
        rows = [r for r in records if r["seed"] == seed]
        entry = {name: sum(bool(r["outcome"].get(name)) for r in rows) for name in counts}
        entry["total"] = len(rows)
        if "passed" in counts:
            by_problem: dict = defaultdict(lambda: [0, 0])
            for r in rows:
                by_problem[r["task_id"]][0] += 1
                by_problem[r["task_id"]][1] += bool(r["outcome"].get("passed"))
            # pass@k needs k samples of every problem; report only the k that all problems have.
            n_min = min(n for n, _ in by_problem.values())
            wanted = useful_ks(n_min) if ks is None else [k for k in ks if k <= n_min]
            entry["pass@k"] = {f"pass@{k}": mean_pass_at_k(map(tuple, by_problem.values()), k) for k in wanted}
        per_seed[str(seed)] = entry
    out["per_seed"] = per_seed
    # Rates per seed, then mean and sample standard deviation over seeds.
    rates = {name: [e[name] / e["total"] for e in per_seed.values()] for name in counts}
    out["rates"] = {name: _mean_sd(values) for name, values in rates.items()}
    if "passed" in counts:
        names = set.intersection(*(set(e["pass@k"]) for e in per_seed.values()))
        out["pass@k"] = {
            name: _mean_sd([e["pass@k"][name] for e in per_seed.values()])
            for name in sorted(names, key=lambda s: int(s[5:]))
        }
    return out


def _mean_sd(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value) of per-seed rates."""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "n": len(values)}
