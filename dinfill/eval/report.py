"""Summaries and comparison tables, computed from the records JSONL alone.

Why from the records only: a summary that could drift from the per-problem records would be one
more thing to trust. ``summary.json``, ``summary.md`` and ``dinfill report`` all recompute from
``records*.jsonl``. Every number in a table sits next to the settings that produced it: the
scoring rule, the middle-length mode (the published diffusion number used the oracle length),
the seeds, the sampler settings and the generation throughput.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from dinfill.eval.metrics import summarize_records
from dinfill.eval.postprocess import PostProcess
from dinfill.eval.records import RUN_FILE, load_records

_META = ("task", "subset", "model", "kind", "sampler", "postprocess")


def summarize_run(records: Sequence[dict]) -> dict:
    """The summary of one run folder's records: settings, counts, rates, pass@k, throughput."""
    if not records:
        raise ValueError("no records to summarize")
    meta = {}
    for name in _META:
        # Compare as JSON: sampler settings are dicts, which cannot go into a set.
        values = {json.dumps(r.get(name), sort_keys=True) for r in records}
        if len(values) > 1:
            raise ValueError(f"records mix several values of {name!r} ({sorted(values)[:3]}...); one run per folder")
        meta[name] = records[0].get(name)
    summary = {**meta, **summarize_records(records)}
    # Each record carries its share of its batch's generation time, so the sum is the total.
    generate_s = sum(float(r.get("timings", {}).get("generate_s", 0.0)) for r in records)
    summary["generate_s"] = round(generate_s, 3)
    summary["problems_per_s"] = round(len(records) / generate_s, 4) if generate_s > 0 else None
    # the part of it spent capturing CUDA graphs (first batch of each shape bucket), and the rate without it
    capture_s = sum(float(r.get("timings", {}).get("graph_capture_s", 0.0)) for r in records)
    summary["graph_capture_s"] = round(capture_s, 3)
    steady_s = generate_s - capture_s
    summary["problems_per_s_steady"] = round(len(records) / steady_s, 4) if steady_s > 0 else None
    summary["ms_per_problem"] = round(1000 * generate_s / len(records), 3) if generate_s > 0 else None
    # what the generator said about its cost (absent for custom generators and re-scored files)
    tokens = [r["timings"]["tokens"] for r in records if (r.get("timings") or {}).get("tokens") is not None]
    summary["tokens"] = round(sum(tokens), 3) if tokens else None
    summary["tokens_per_s"] = round(sum(tokens) / generate_s, 3) if tokens and generate_s > 0 else None
    peaks = [r["timings"]["peak_memory_bytes"] for r in records if (r.get("timings") or {}).get("peak_memory_bytes")]
    summary["peak_memory_bytes"] = max(peaks) if peaks else None
    # the environments the records were generated in (one, unless a run was resumed elsewhere)
    envs = {json.dumps(r["env"], sort_keys=True) for r in records if r.get("env")}
    summary["env"] = [json.loads(e) for e in sorted(envs)]
    # Complete means every problem for every seed and sample; a resumed run may still be short.
    sizes = {r["task_size"] for r in records if "task_size" in r}
    if sizes:
        expected = max(sizes) * len(summary["seeds"]) * summary["samples"]
        summary["expected_records"] = expected
        summary["complete"] = len(records) == expected
    return summary


def _length_mode(summary: dict) -> str:
    sampler = summary.get("sampler") or {}
    if summary.get("kind") is None:  # re-scored files: the settings that made them are unknown
        return "-"
    # AR models decide their own length; only their token budget is a setting.
    if summary.get("kind") == "ar":
        budget = sampler.get("max_new_tokens")
        return f"generated (<= {budget} tokens)" if budget else "generated"
    mode = sampler.get("length", "?")
    if mode == "fixed" and sampler.get("middle_tokens"):
        return f"fixed {sampler['middle_tokens']}"
    return str(mode)


def _sampler_text(summary: dict) -> str:
    sampler = summary.get("sampler") or {}
    # Length settings have their own column.
    skip = {"length", "middle_tokens", "max_new_tokens"} if summary.get("kind") != "ar" else {"max_new_tokens"}
    parts = [f"{k}={v}" for k, v in sorted(sampler.items()) if k not in skip and v is not None]
    return " ".join(parts) or "-"


def _percent(rate: dict) -> str:
    text = f"{100 * rate['mean']:.2f}%"
    # The spread across seeds, so a reader sees whether two numbers differ by more than noise.
    return text + (f" ± {100 * rate['sd']:.2f}" if rate["n"] > 1 else "")


def _throughput_text(summary: dict) -> str:
    rate = summary.get("problems_per_s")
    if not rate:
        return "-"
    text = f"{rate:.2f} problems/s"
    if summary.get("ms_per_problem"):
        text += f", {summary['ms_per_problem']:.4g} ms/problem"
    if summary.get("tokens_per_s"):
        text += f", {summary['tokens_per_s']:.4g} tokens/s"
    if summary.get("graph_capture_s") and summary.get("problems_per_s_steady"):
        text += f" ({summary['problems_per_s_steady']:.2f} without {summary['graph_capture_s']:.3g} s of graph capture)"
    return text


def table_rows(summary: dict) -> list[dict]:
    """One table row per metric of a run (pass@k; exact match under each rule)."""
    base = {
        "model": summary["model"],
        "kind": summary["kind"] or "-",
        "task": f"{summary['task']} ({summary['subset']})",
        "middle length": _length_mode(summary),
        "seeds": ",".join(map(str, summary["seeds"])) + (" (mean ± sd)" if len(summary["seeds"]) > 1 else ""),
        "sampler": _sampler_text(summary),
        "throughput": _throughput_text(summary),
    }
    rule = PostProcess.from_dict(summary["postprocess"] or {}).describe()
    counts, total, rates = summary["counts"], summary["total"], summary["rates"]
    rows = []

    def add(metric: str, rule: str, key: str) -> None:
        rows.append({"metric": metric, "rule": rule, "score": _percent(rates[key]), "count": f"{counts[key]}/{total}"})

    if "passed" in counts:
        add("pass@1", rule, "passed")
        for name, value in summary.get("pass@k", {}).items():
            if name != "pass@1":
                rows.append({"metric": name, "rule": rule, "score": _percent(value), "count": "-"})
    for key, label in (("exact_match_first_line", "first_line"), ("exact_match_whole", "whole")):
        if key in counts:
            add("exact match", label, key)
    # Under none/first_line the processed-middle match duplicates the whole/first_line row.
    if "exact_match" in counts and rule not in ("first_line", "none"):
        add("exact match", rule, "exact_match")
    for row in rows:
        row.update(base)
        # An incomplete run is still shown, marked, rather than silently mixed with complete ones.
        if not summary.get("complete", True):
            row["count"] += f" (incomplete: {summary['records']}/{summary['expected_records']} records)"
    return rows


COLUMNS = (
    "model",
    "kind",
    "task",
    "metric",
    "rule",
    "score",
    "count",
    "middle length",
    "seeds",
    "sampler",
    "throughput",
)


def markdown_table(summaries: Sequence[dict]) -> str:
    """The comparison table (markdown) of several runs."""
    rows = [row for summary in summaries for row in table_rows(summary)]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        # Escape pipes: a model name or stop string must not split a markdown cell.
        lines.append("| " + " | ".join(str(row[c]).replace("|", "\\|") for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | os.PathLike, summary: dict) -> None:
    """Write ``summary.json`` and ``summary.md`` next to the records."""
    out = Path(out_dir)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(markdown_table([summary]), encoding="utf-8")


def find_runs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Run folders (those holding records or a ``run.json``) at or below each path, in a stable order."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such directory")
        if path.is_file():
            raise NotADirectoryError(f"{path} is a file; pass run folders (the --out of dinfill eval/score)")
        # A folder may be a run itself, hold runs (the --out of eval and score), or both.
        marks = {p.parent for pattern in ("records*.jsonl", RUN_FILE) for p in path.rglob(pattern)}
        candidates = ([path] if path in marks else []) + sorted(marks - {path})
        if not candidates:
            raise FileNotFoundError(f"{path}: no records*.jsonl at or below it; pass the --out folder of a run")
        found += [c for c in candidates if c not in found]
    return found


def report(paths: Sequence[str | os.PathLike]) -> tuple[str, list[dict]]:
    """Markdown comparison table and the summaries of every run found under ``paths``.

    Run folders without records yet (a run that has not written its first record) are listed
    in a note under the table rather than silently left out.
    """
    summaries, empty = [], []
    for run in find_runs(paths):
        records = load_records(run)
        if records:
            summaries.append({"run": str(run), **summarize_run(records)})
        else:
            empty.append(str(run))
    if not summaries:
        raise ValueError(f"the runs under {list(map(str, paths))} hold no records yet ({', '.join(empty)})")
    notes = []
    # Comparisons are within a task: say so when its runs were scored under different rules.
    for task in sorted({s["task"] for s in summaries}):
        rules = {PostProcess.from_dict(s["postprocess"] or {}).describe() for s in summaries if s["task"] == task}
        if len(rules) > 1:
            notes.append(
                f"Note: the {task} runs use different post-processing rules ({', '.join(sorted(rules))}); "
                "compare rows with the same rule."
            )
    modes = {_length_mode(s) for s in summaries if s["kind"] == "diffusion"}
    # The flaw of the published comparison that cannot be fixed by re-scoring: say it next to the table.
    if "oracle" in modes and any(s["kind"] == "ar" for s in summaries):
        notes.append(
            "Note: oracle middle length gives the diffusion model the true middle length, which AR models do not get."
        )
    if empty:
        notes.append(f"Note: skipped {len(empty)} run folder(s) without records yet: {', '.join(empty)}.")
    text = markdown_table(summaries) + ("\n" + "\n".join(notes) + "\n" if notes else "")
    return text, summaries

