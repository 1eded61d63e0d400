"""Benchmark results: the append-only JSONL file, the run environment, tables, and the README section.

Why one results file of JSON lines: every benchmark entry point (``dinfill bench``, ``dinfill sweep``, the
pytest-benchmark micro-benchmarks in ``bench/``, the GPU check) appends one self-describing record per
configuration, stamped with the device, library versions, git revision and date, so numbers from
different machines and commits can sit in one file without ever being confused. Nothing rewrites it.

``bench/RESULTS.md`` is the curated, committed view of those records; the README's results section is
*generated* from the block of RESULTS.md between ``<!-- README:BEGIN -->`` and ``<!-- README:END -->``
(``python -m dinfill.bench.report readme``), so the two cannot drift.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RESULTS_ENV",
    "default_results_path",
    "environment",
    "package_checkout",
    "git_revision",
    "append_records",
    "read_records",
    "text_table",
    "markdown_table",
    "readme_block",
    "update_readme",
]

RESULTS_ENV = "DINFILL_BENCH_RESULTS"  # the results file every benchmark entry point appends to
README_BEGIN, README_END = "<!-- README:BEGIN -->", "<!-- README:END -->"
RESULTS_BEGIN, RESULTS_END = "<!-- RESULTS:BEGIN -->", "<!-- RESULTS:END -->"


def default_results_path() -> Path:
    """``$DINFILL_BENCH_RESULTS``, else ``bench/results.jsonl`` under the working directory."""
    return Path(os.environ.get(RESULTS_ENV) or "bench/results.jsonl")


def package_checkout() -> Path:
    """The folder holding the ``dinfill`` package directory (a checkout's root when run from one)."""
    return Path(__file__).resolve().parents[2]


def git_revision(path: str | os.PathLike | None = None) -> str:
    """``git describe --always --dirty`` of the checkout holding this package, or ``"unknown"``.

    ``$DINFILL_GIT_REV`` wins when set: a copy of the working tree without ``.git`` (a lent GPU machine)
    still gets the revision it was copied from. Otherwise the revision counts only when git's top level
    *is* ``path`` (default: :func:`package_checkout`): a copy without its own ``.git`` that sits inside
    some other repository must not report that repository's revision (it did, on the 2026-11-30 GPU run).
    """
    if os.environ.get("DINFILL_GIT_REV"):
        return os.environ["DINFILL_GIT_REV"]
    where = Path(path).resolve() if path is not None else package_checkout()

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() or None if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != where:
        return "unknown"
    return git("describe", "--always", "--dirty", "--abbrev=12") or "unknown"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # absent or broken: the record says so rather than failing the benchmark
        return None


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """What a results record needs to be comparable: device, versions, git revision, date, backend."""
    from dinfill.bench.roofline import device_name

    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return {
        "device": device_name(dev),
        "device_type": dev.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "dinfill": _version("dinfill"),
        "python": platform.python_version(),
        "backend": os.environ.get("DINFILL_BACKEND", "auto"),
        "git": git_revision(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None  # NaN is not JSON
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def append_records(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> Path:
    """Append one JSON line per record to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(_jsonable(r), sort_keys=True) for r in records]
    with path.open("a", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    return path


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parse a results file; a malformed line is an error that names its line number."""
    from dinfill.eval.datasets import read_jsonl

    return read_jsonl(path)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 1e-2 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return f"{value:.2e}"
    return str(value)


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A fixed-width table for the terminal: ``columns`` are ``(key, header)`` pairs."""
    cells = [[h for _, h in columns]] + [[_cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """The same table in GitHub markdown."""
    out = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(out)


def _between(text: str, begin: str, end: str, where: str) -> tuple[int, int]:
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"{where} has no '{begin}' ... '{end}' block; add the two marker lines around it")
    return i + len(begin), j


def readme_block(results_md: str | os.PathLike) -> str:
    """The README's results section: the marked block of ``bench/RESULTS.md``, with where it came from."""
    path = Path(results_md)
    text = path.read_text(encoding="utf-8")
    i, j = _between(text, README_BEGIN, README_END, str(path))
    note = f"<!-- generated from {path.name} by `python -m dinfill.bench.report readme`; edit it there -->"
    return note + "\n" + text[i:j].strip() + "\n"


def update_readme(readme: str | os.PathLike, results_md: str | os.PathLike) -> bool:
    """Replace the README's ``<!-- RESULTS:BEGIN -->`` block with :func:`readme_block`; True when it changed."""
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    i, j = _between(text, RESULTS_BEGIN, RESULTS_END, str(path))
    new = text[:i] + "\n" + readme_block(results_md) + text[j:]
    if new == text:
        return False
    path.write_text(new, encoding="utf-8")
    return True


# Columns of the summary tables printed from a results file (bench records).
BENCH_COLUMNS = [
    ("kind", "kind"),
    ("batch", "B"),
    ("steps", "steps"),
    ("alg", "alg"),
    ("cache", "cache"),
    ("length", "length"),
    ("ms_per_problem", "ms/prob"),
    ("tokens_per_s", "tok/s"),
    ("problems_per_s", "prob/s"),
    ("latency_p50_ms", "p50 ms"),
    ("latency_p90_ms", "p90 ms"),
    ("forward_passes", "fwd"),
    ("ref_ms_per_problem", "ref ms/prob"),
    ("speedup", "vs ref"),
    ("agreement", "agree"),
    ("tflops", "TFLOP/s"),
    ("gbps", "GB/s"),
]


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """One table row from a nested ``dinfill bench`` record (config + metrics + reference + roofline)."""
    row: dict[str, Any] = {}
    row.update(record.get("config", {}))
    row.update(record.get("metrics", {}))
    ref = record.get("reference") or {}
    row["ref_ms_per_problem"] = ref.get("ms_per_problem")
    row["speedup"] = ref.get("speedup")
    row["agreement"] = ref.get("agreement")
    roof = record.get("roofline") or {}
    if roof.get("flop_per_s") is not None:
        row["tflops"] = roof["flop_per_s"] / 1e12
    if roof.get("bytes_per_s") is not None:
        row["gbps"] = roof["bytes_per_s"] / 1e9
    row["device"] = record.get("env", {}).get("device")
    return row


def main(argv: list[str] | None = None) -> int:
    """``python -m dinfill.bench.report {table,readme}``: print tables from results, or refresh the README."""
    p = argparse.ArgumentParser(prog="python -m dinfill.bench.report", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="print a markdown table of the bench records of a results file")
    t.add_argument("results", nargs="?", help="results JSONL (default: $DINFILL_BENCH_RESULTS or bench/results.jsonl)")
    t.add_argument("--last", type=int, help="only the last N records")
    r = sub.add_parser("readme", help="regenerate the README results block from bench/RESULTS.md")
    r.add_argument("--results-md", default="bench/RESULTS.md")
    r.add_argument("--readme", default="README.md")
    args = p.parse_args(argv)
    if args.cmd == "table":
        records = [rec for rec in read_records(args.results or default_results_path()) if rec.get("type") == "bench"]
        if args.last:
            records = records[-args.last :]
        rows = [flatten(rec) for rec in records]
        devices = sorted({str(r["device"]) for r in rows})
        print(f"device: {', '.join(devices) or '-'}")
        print(markdown_table(rows, BENCH_COLUMNS))
        return 0
    changed = update_readme(args.readme, args.results_md)
    print(f"{args.readme}: {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
