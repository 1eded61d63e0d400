"""Summaries and comparison tables, computed from the records JSONL alone.

Why from the records only: a summary that could drift from the per-problem records would be one
more thing to trust. ``summary.json``, ``summary.md`` and ``dinfill report`` all recompute from
``records*.jsonl``. Every number in a table sits next to the settings that produced it: the
scoring rule, the middle-length mode (the published diffusion number used the oracle length),
the seeds, the sampler settings and the generation throughput.

Two layouts: :func:`markdown_table` (one row per run and metric, for any run folders: ``dinfill report``) and
:func:`comparison_table` (the published comparison's own layout, one row per metric and one column per model
and setting, each cell beside its published number: ``dinfill compare``). The published numbers live here
(:data:`PUBLISHED`) because this is where they are put beside ours. Costs (ms per problem, tokens per second,
peak GPU memory) and the device and versions come from the records too; :func:`plot_runs` draws the speed /
quality plane.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dinfill.eval.metrics import summarize_records
from dinfill.eval.postprocess import PostProcess
from dinfill.eval.records import RUN_FILE, load_records, mix_labels

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
    # How isolated the executed programs were: full, weak (what was missing), or a mix after a resume.
    executed = [r["outcome"] for r in records if "status" in (r.get("outcome") or {})]
    if executed:
        summary["sandbox"] = mix_labels(o.get("sandbox", "not recorded (scored by an older dinfill)") for o in executed)
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
    if mode in ("fixed", "adaptive", "search") and sampler.get("middle_tokens"):
        return f"{mode} {sampler['middle_tokens']}"  # fixed: the length; adaptive, search: the longest
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
    sandbox = f"\nsandbox: {summary['sandbox']}\n" if summary.get("sandbox") else ""
    (out / "summary.md").write_text(markdown_table([summary]) + sandbox, encoding="utf-8")


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


def _sandbox_notes(summaries: Sequence[dict]) -> list[str]:
    """How isolated each run's programs were: one line when all were fully isolated, else one per other run."""
    executed = [s for s in summaries if s.get("sandbox")]
    if not executed:
        return []
    if all(s["sandbox"] == "full" for s in executed):
        return ["Sandbox: full for every run that executed programs."]
    notes = [f"Note: sandbox: {s['sandbox']} in {s['run']}." for s in executed if s["sandbox"] != "full"]
    if len({s["sandbox"] for s in executed}) > 1:
        notes.append("Note: these runs were executed with different sandbox isolation (full and weak); see above.")
    return notes


def report(paths: Sequence[str | os.PathLike], plot: str | os.PathLike | None = None) -> tuple[str, list[dict]]:
    """Markdown comparison table and the summaries of every run found under ``paths``.

    Run folders without records yet (a run that has not written its first record) are listed
    in a note under the table rather than silently left out. With ``plot``, the speed / quality plane of the
    runs (and the steps curve of any ``dinfill sweep`` results under ``paths``) is written to that PNG.
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
    notes += _sandbox_notes(summaries)
    if empty:
        notes.append(f"Note: skipped {len(empty)} run folder(s) without records yet: {', '.join(empty)}.")
    if plot is not None:
        notes.append(f"Plot: {plot_runs(summaries, plot, sweeps=find_sweeps(paths))}")
    text = markdown_table(summaries) + ("\n" + "\n".join(notes) + "\n" if notes else "")
    return text, summaries


# -- the published comparison, in its own layout --------------------------------------------------------------


@dataclass(frozen=True)
class PublishedModel:
    """One column of the published comparison (docs/eval-protocol.md, NVIDIA L4).

    Attributes
    ----------
    name : str
        Display name of the column.
    hub : str
        Hub id of the checkpoint behind the numbers.
    shape : str
        The dinfill built-in shape with that checkpoint's config (what ``--random-weights`` builds).
    kind : str
        ``diffusion`` or ``ar``.
    humaneval : (int, int)
        HumanEval-Infill single-line pass@1: problems passed, problems.
    santacoder : (int, int)
        SantaCoder-FIM Python exact match: matches, problems.
    santacoder_rule : str
        The exact-match rule the published number used (``first_line`` for diffusion, ``whole`` for AR).
    aliases : tuple of str
        Other hub ids shown beside these numbers, with a note (the published 1.5B column is the Instruct model).
    """

    name: str
    hub: str
    shape: str
    kind: str
    humaneval: tuple[int, int]
    santacoder: tuple[int, int]
    santacoder_rule: str
    aliases: tuple[str, ...] = ()


# docs/eval-protocol.md, "The comparison it reproduces"; the counts are checked by re-scoring the published files
PUBLISHED: tuple[PublishedModel, ...] = (
    PublishedModel("Open-dCoder 0.5B", "fredzzp/open-dcoder-0.5B", "open-dcoder-0.5b", "diffusion",
                   (790, 1033), (584, 1043), "first_line"),
    PublishedModel("Qwen2.5-Coder 0.5B", "Qwen/Qwen2.5-Coder-0.5B", "qwen2.5-coder-0.5b", "ar",
                   (766, 1033), (677, 1043), "whole"),
    PublishedModel("Qwen2.5-Coder 1.5B", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "qwen2.5-coder-1.5b", "ar",
                   (829, 1033), (621, 1043), "whole", aliases=("Qwen/Qwen2.5-Coder-1.5B",)),
    PublishedModel("DeepSeek-Coder 1.3B", "deepseek-ai/deepseek-coder-1.3b-base", "deepseek-coder-1.3b", "ar",
                   (821, 1033), (604, 1043), "whole"),
    PublishedModel("StarCoder2 3B", "bigcode/starcoder2-3b", "starcoder2-3b", "ar",
                   (781, 1033), (591, 1043), "whole"),
)  # fmt: skip
# the subsets the published numbers are for
_PUBLISHED_SUBSETS = {"humaneval-infill": "single-line", "santacoder-fim": "py"}
_TASK_LABELS = {"humaneval-infill": "HumanEval-Infill", "santacoder-fim": "SantaCoder-FIM"}


def published_for(model: str) -> tuple[PublishedModel, str | None] | None:
    """The published column of ``model`` (a hub id, case-insensitive, or a built-in shape name) and a note when
    the published numbers came from another checkpoint; None for a model outside the comparison."""
    key = model.lower()
    for entry in PUBLISHED:
        if key in (entry.hub.lower(), entry.shape):
            return entry, None
        if key in (a.lower() for a in entry.aliases):
            return entry, f"{model}: the published column used {entry.hub}"
    return None


@dataclass
class CompareColumn:
    """One column of the comparison table: a model under one setting, with a run per task.

    Attributes
    ----------
    model : str
        The model as given (hub id, folder or built-in shape).
    kind : str or None
        ``diffusion`` or ``ar`` (None when it could not be told).
    setting : str
        The middle-length setting of a diffusion column (``oracle``, ``fixed:32``, ``search:64``...); ``-`` for AR.
    runs : dict
        Task name -> summary of its run folder (:func:`summarize_run`), or None when it holds no records.
    failure : str, optional
        Why the model could not load or run (the column still shows whatever its runs hold).
    """

    model: str
    kind: str | None
    setting: str
    runs: dict[str, dict | None] = field(default_factory=dict)
    failure: str | None = None

    @property
    def label(self) -> str:
        """The column header: the published name when the model is one of the comparison, and its setting."""
        found = published_for(self.model)
        name = found[0].name if found else self.model
        random = any(env.get("random_weights") for s in self.runs.values() if s for env in s.get("env", []))
        name += " (random weights)" if random else ""
        return f"{name}, {self.setting}" if self.kind == "diffusion" else name


def _cell_rate(summary: dict, key: str) -> tuple[float, str] | None:
    if summary is None or key not in summary.get("counts", {}):
        return None
    rate = summary["rates"][key]
    return rate["mean"], f"{_percent(rate)} {summary['counts'][key]}/{summary['total']}"


def _published_cell(column: CompareColumn, task: str, subset: str | None, key: str) -> tuple[int, int] | None:
    """The published count beside this cell: the model's own column, the published setting, the published rule."""
    found = published_for(column.model)
    if found is None or subset != _PUBLISHED_SUBSETS[task]:
        return None
    entry = found[0]
    if column.kind == "diffusion" and column.setting != "oracle":  # the published diffusion runs used the oracle
        return None
    if task == "humaneval-infill":
        return entry.humaneval if key == "passed" else None
    return entry.santacoder if key == f"exact_match_{entry.santacoder_rule}" else None


def _metric_rows(columns: Sequence[CompareColumn], task: str) -> list[tuple[str, str]]:
    """(label, counts key) of each quality row of a task."""
    if task == "humaneval-infill":
        return [("pass@1", "passed")]
    rows = [("exact match (first_line)", "exact_match_first_line"), ("exact match (whole)", "exact_match_whole")]
    if any(c.runs.get(task) and "passed" in c.runs[task]["counts"] for c in columns):
        rows.append(("pass@1 (executed)", "passed"))
    return rows


def _memory_text(column: CompareColumn) -> str:
    peaks = [s["peak_memory_bytes"] for s in column.runs.values() if s and s.get("peak_memory_bytes")]
    if peaks:
        return f"{max(peaks) / 2**30:.2f} GiB"
    envs = [env for s in column.runs.values() if s for env in s.get("env", [])]
    return "n/a (CPU)" if envs and all(env.get("device_type") == "cpu" for env in envs) else "-"


def _env_texts(column: CompareColumn) -> tuple[str, str]:
    """(device, versions) of a column's runs; several when its runs were generated in several places."""
    envs = {json.dumps(env, sort_keys=True): env for s in column.runs.values() if s for env in s.get("env", [])}
    devices = sorted({f"{e.get('device', '?')} ({e.get('dtype', '?')})" for e in envs.values()})
    versions = sorted(
        {
            ", ".join(f"{k} {e[k]}" for k in ("torch", "cuda", "triton", "transformers", "dinfill", "git") if e.get(k))
            for e in envs.values()
        }
    )
    return "; ".join(devices) or "-", "; ".join(versions) or "-"


def _settings_text(column: CompareColumn) -> str:
    summaries = [s for s in column.runs.values() if s]
    if not summaries:
        return "-"
    first = summaries[0]
    seeds = ",".join(map(str, first["seeds"]))
    return f"{_length_mode(first)}; {_sampler_text(first)}; seeds {seeds}"


def _status_text(column: CompareColumn, tasks: Sequence[str]) -> tuple[str, bool]:
    parts, complete = [], True
    for task in tasks:
        summary = column.runs.get(task)
        if summary is None:
            parts.append(f"{task}: no records")
            complete = False
        elif not summary.get("complete", True):
            parts.append(f"{task}: {summary['records']}/{summary['expected_records']} records")
            complete = False
    if column.failure:
        parts.append(f"failed: {column.failure}")
        complete = False
    return ("complete" if complete else "incomplete: " + "; ".join(parts)), complete


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def comparison_table(columns: Sequence[CompareColumn], tasks: Sequence[str]) -> dict:
    """The comparison in the published layout: one row per metric, one column per model (and setting).

    Quality cells read ``ours% n/N (published% n/N)``; a diffusion column under another length setting than the
    oracle gets its gap to the same model's oracle column; under them: ms per problem and tokens per second per
    task, peak GPU memory, device, versions, settings and how far the column's runs got.

    Parameters
    ----------
    columns : sequence of CompareColumn
    tasks : sequence of str
        The benchmarks, in row order (``humaneval-infill``, ``santacoder-fim``).

    Returns
    -------
    dict
        ``markdown`` (the table and its notes), ``header`` and ``rows`` (the cells as text), ``records`` (one
        flat dict per column, task and metric: the CSV lines) and ``complete`` (every column complete).
    """
    if not columns:
        raise ValueError("nothing to compare: no columns")
    unknown = [t for t in tasks if t not in _TASK_LABELS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the comparison covers {', '.join(_TASK_LABELS)}")
    header = ["metric", *(c.label for c in columns)]
    oracle = {c.model: c for c in columns if c.kind == "diffusion" and c.setting == "oracle"}
    rows: list[list[str]] = []
    records: list[dict] = []
    statuses = [_status_text(c, tasks) for c in columns]
    memory = [_memory_text(c) for c in columns]
    envs = [_env_texts(c) for c in columns]
    gaps: list[list[str]] = []
    for task in tasks:
        subset = next((c.runs[task]["subset"] for c in columns if c.runs.get(task)), _PUBLISHED_SUBSETS[task])
        name = _TASK_LABELS[task] + ("" if subset == _PUBLISHED_SUBSETS[task] else f" ({subset})")
        for metric, key in _metric_rows(columns, task):
            row, gap_row = [f"{name} {metric}"], [f"gap to the oracle: {name} {metric}"]
            for column, (status, complete) in zip(columns, statuses, strict=True):
                summary = column.runs.get(task)
                ours = _cell_rate(summary, key)
                published = _published_cell(column, task, subset, key)
                cell = ours[1] if ours else "-"
                if published:
                    cell += f" ({100 * published[0] / published[1]:.2f}% {published[0]}/{published[1]})"
                row.append(cell)
                gap = None
                base = oracle.get(column.model) if column.kind == "diffusion" and column.setting != "oracle" else None
                base_rate = _cell_rate(base.runs.get(task), key) if base else None
                if ours and base_rate:
                    gap = round(100 * (ours[0] - base_rate[0]), 2)
                gap_row.append("" if gap is None else f"{gap:+.2f} pts")
                records.append(
                    {
                        "column": column.label, "model": column.model, "kind": column.kind, "setting": column.setting,
                        "task": task, "subset": subset, "metric": metric,
                        "rate": None if ours is None else round(ours[0], 6),
                        "n": summary["counts"].get(key) if ours else None, "N": summary["total"] if ours else None,
                        "published_rate": None if published is None else round(published[0] / published[1], 6),
                        "published_n": published[0] if published else None,
                        "published_N": published[1] if published else None, "gap_to_oracle_points": gap,
                        "ms_per_problem": summary.get("ms_per_problem") if summary else None,
                        "tokens_per_s": summary.get("tokens_per_s") if summary else None,
                        "peak_memory_bytes": summary.get("peak_memory_bytes") if summary else None,
                        "device": envs[columns.index(column)][0], "complete": complete, "status": status,
                        "failure": column.failure,
                    }
                )  # fmt: skip
            rows.append(row)
            if any(gap_row[1:]):
                gaps.append(gap_row)
    rows += gaps
    for task in tasks:
        name = _TASK_LABELS[task]
        ms = [c.runs.get(task) and c.runs[task].get("ms_per_problem") for c in columns]
        tps = [c.runs.get(task) and c.runs[task].get("tokens_per_s") for c in columns]
        rows.append([f"ms per problem: {name}", *(f"{v:.4g}" if v else "-" for v in ms)])
        rows.append([f"tokens / s: {name}", *(f"{v:.4g}" if v else "-" for v in tps)])
    rows.append(["peak GPU memory", *memory])
    rows.append(["device", *(e[0] for e in envs)])
    rows.append(["versions", *(e[1] for e in envs)])
    rows.append(["settings", *(_settings_text(c) for c in columns)])
    rows.append(["status", *(s[0] for s in statuses)])
    for column, (status, _complete) in zip(columns, statuses, strict=True):
        if not any(column.runs.get(t) for t in tasks):  # nothing ran: still one CSV line, with the reason
            records.append({"column": column.label, "model": column.model, "kind": column.kind,
                            "setting": column.setting, "complete": False, "status": status,
                            "failure": column.failure})  # fmt: skip
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    notes = [
        "Cells: ours% n/N (published% n/N). Published: the comparison in docs/eval-protocol.md (NVIDIA L4); its "
        "diffusion column used the oracle middle length (the true middle's), which AR models never get, so only "
        "the oracle column of a diffusion model sits beside a published number, and the other length settings "
        "show their gap to it. Published SantaCoder-FIM exact match used first_line for the diffusion model and "
        "whole for the AR models; both rules are shown for every model. ms per problem and tokens / s: generation "
        "only (scoring excluded); tokens / s counts every token the sampler generated."
    ]
    for column in columns:
        found = published_for(column.model)
        if found and found[1] and found[1] not in notes:
            notes.append(found[1])
    if any("random weights" in c.label for c in columns):
        notes.append("Random weights: the scores are meaningless; such a run shows the pipeline and the costs.")
    markdown = "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return {
        "header": header,
        "rows": rows,
        "records": records,
        "markdown": markdown,
        "complete": all(s[1] for s in statuses),
    }


# -- the picture ----------------------------------------------------------------------------------------------


def quality_of(summary: dict) -> tuple[float | None, str]:
    """The headline quality of a run and its name: pass@1 for HumanEval-Infill, exact match under the run's own
    rule for SantaCoder-FIM (what the published column of each kind reported)."""
    rates = summary.get("rates", {})
    if summary.get("task") == "humaneval-infill":
        return (rates["passed"]["mean"] if "passed" in rates else None), "pass@1"
    rule = PostProcess.from_dict(summary.get("postprocess") or {}).describe()
    return (rates["exact_match"]["mean"] if "exact_match" in rates else None), f"exact match ({rule})"


def plane_point(summary: dict, label: str | None = None) -> dict:
    """One run as a point of the speed / quality plane (:func:`dinfill.bench.plots.plot_comparison`)."""
    quality, metric = quality_of(summary)
    if label is None:
        label = summary["model"] + (f", {_length_mode(summary)}" if summary.get("kind") == "diffusion" else "")
    return {
        "label": label,
        "kind": summary.get("kind"),
        "task": summary["task"],
        "metric": metric,
        "quality": quality,
        "ms_per_problem": summary.get("ms_per_problem"),
    }


def find_sweeps(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """The points of every ``dinfill sweep`` under ``paths`` (``sweep.jsonl``): its row, with task and model."""
    rows = []
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(path.rglob("sweep.jsonl"))
        for file in files:
            for line in file.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line of an append-only file: the rest still counts
                if isinstance(record, dict) and record.get("type") == "sweep" and isinstance(record.get("row"), dict):
                    rows.append({**record["row"], "task": record.get("task"), "model": record.get("model")})
    return rows


def plot_runs(summaries: Sequence[dict], path: str | os.PathLike, *, sweeps: Sequence[dict] = ()) -> Path:
    """Write the speed / quality plane of ``summaries`` (and the steps sweep curve of ``sweeps``) to ``path``."""
    from dinfill.bench.plots import plot_comparison

    devices = sorted({env.get("device", "?") for s in summaries for env in s.get("env", [])})
    title = "on " + ", ".join(devices) if devices else ""
    return plot_comparison([plane_point(s) for s in summaries], path, sweeps=sweeps, title=title)
