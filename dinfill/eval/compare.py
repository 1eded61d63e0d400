"""``dinfill compare``: the published comparison in one command, beside the published numbers, with its costs.

The comparison this package exists for (docs/eval-protocol.md) is five models on two benchmarks. By hand it is
five ``dinfill eval`` commands with the right flags per kind of model and a report that shows neither the
published numbers nor what each model costs. Here it is one command whose defaults are that comparison: the
five published checkpoints, both tasks, each model at the ``published`` preset of its kind, and for the
diffusion model the oracle length the published column used *and* length settings a user can actually run
(``fixed:32``, ``adaptive:64``, ``search:64``), each shown with its gap to the oracle.

How it runs, and why:

- **One process per model.** A model is loaded once and runs every (task, setting) of its plan in that process
  (``python -m dinfill.eval.compare JOB.json``), so one GPU runs the models one after another, each loaded once.
  A model that cannot load, runs out of memory or crashes takes only its own process down: its column shows the
  reason and the other models still run. Its memory is given back when its process ends.
- **GPUs.** With several GPUs (``--gpus``, default every visible one) each process gets one of them
  (``CUDA_VISIBLE_DEVICES``) and the models are spread over them, one process per GPU at a time.
- **The ``eval`` layout.** Every (model, task, setting) is one run folder, exactly what ``dinfill eval`` writes
  (``DIR/<model>/<task>-<subset>`` for an AR model, ``DIR/<model>/<setting>/<task>-<subset>`` for a diffusion
  model), with its records, ``run.json``, summaries and the folder lock held while it is written.
- **Redoes nothing.** Before a model is even loaded, each of its run folders is compared with the run it would
  write (:func:`dinfill.eval.runner.run_progress`): a model whose runs are all complete, with the same settings,
  is skipped; otherwise its process resumes what is missing (the runner's resume).
- **Options are checked first.** Every flag is validated before torch is imported; a sampler flag applies to
  the models of its kind only (``--steps`` to the diffusion model) and is an error when no model is of that kind.

Outputs in ``DIR``: ``compare.md`` (also printed), ``compare.csv``, ``compare.json`` and ``compare.png`` (the
speed / quality plane, plus the steps curve of any ``dinfill sweep`` results under ``DIR``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinfill.eval.report import PUBLISHED, published_for
from dinfill.sampler.settings import FIELD_KINDS, add_sampler_arguments, given_sampler_options, length_setting

__all__ = ["DEFAULT_LENGTHS", "DEFAULT_MODELS", "ModelJob", "RunPlan", "cmd_compare", "register", "run_jobs"]

DEFAULT_MODELS: tuple[str, ...] = tuple(entry.hub for entry in PUBLISHED)
# the published oracle, and three settings that need no oracle (docs/sampler-semantics.md, "Unknown middle lengths")
DEFAULT_LENGTHS: tuple[str, ...] = ("oracle", "fixed:32", "adaptive:64", "search:64")
TASKS: tuple[str, ...] = ("humaneval-infill", "santacoder-fim")
STATUS_FILE = "compare-status.json"  # per model folder: what its process did, and why a run failed


@dataclass
class RunPlan:
    """One (task, setting) of a model: the run folder and the sampler options that make it."""

    task: str
    setting: str  # "oracle", "fixed:32"... for a diffusion model, "-" for an AR model
    out: Path
    overrides: dict[str, Any] = field(default_factory=dict)  # length / middle_tokens of the setting


@dataclass
class ModelJob:
    """Everything one model process does: load ``load_name`` once, then run each of ``runs``."""

    model: str  # as the user named it
    load_name: str  # what is loaded (the built-in shape of a published checkpoint under --random-weights)
    kind: str
    folder: Path
    runs: list[RunPlan]
    todo: bool = True  # False: every run folder is complete, with these settings


# -- parser ------------------------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compare`` subcommand."""
    from dinfill.eval.cli import _add_data_options, _add_scoring_options, add_run_options

    cp = subparsers.add_parser(
        "compare",
        help="the published comparison in one command: models x tasks x length settings, table + CSV/JSON/PNG",
        description="Run the published comparison (five models, HumanEval-Infill and SantaCoder-FIM, the published "
        "settings of each kind; the diffusion model also without the oracle length) into DIR, resumably, and write "
        "the table in the published layout beside the published numbers, with ms per problem, tokens/s, peak GPU "
        "memory, device and versions: DIR/compare.{md,csv,json,png}.",
    )
    cp.add_argument("--out", required=True, metavar="DIR", help="output folder (reuse it to resume)")
    cp.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL",
        help="hub ids, local checkpoints or built-in shapes (default: the five published checkpoints; under "
        "--random-weights a published checkpoint runs as its built-in shape)",
    )  # fmt: skip
    cp.add_argument("--task", nargs="+", choices=TASKS, default=list(TASKS), help="benchmarks (default: both)")
    cp.add_argument(
        "--length", nargs="+", default=None, metavar="MODE[:N]",
        help="middle-length settings of the diffusion models, one column each: oracle, fixed:N, adaptive:N, "
        f"search:N (default: {' '.join(DEFAULT_LENGTHS)}); AR models need none",
    )  # fmt: skip
    cp.add_argument(
        "--gpus", nargs="+", default=None, metavar="ID",
        help="GPUs to spread the models over, one process per GPU (default: every visible GPU; none: the CPU, or "
        "--device)",
    )  # fmt: skip
    cp.add_argument("--no-plot", action="store_true", help="skip compare.png (which needs matplotlib)")
    add_run_options(cp)
    add_sampler_arguments(
        cp, exclude=("length",),
        help_overrides={"middle_tokens": "N of a --length setting written without one (default 64)"},
    )  # fmt: skip
    _add_data_options(cp)
    _add_scoring_options(cp, stop=False)
    cp.set_defaults(func=cmd_compare)


# -- planning (no torch) -------------------------------------------------------------------------------------------
def _slug(model: str) -> str:
    """A folder name for a model: ``owner--name`` for a hub id, the folder's name for a local checkpoint."""
    path = Path(model)
    if path.is_dir():
        return re.sub(r"[^\w.-]+", "_", path.resolve().name)
    return re.sub(r"[^\w.-]+", "_", model.replace("/", "--"))


def _setting_folder(setting: str) -> str:
    return setting.replace(":", "-")


def _subset_folder(task: str, subset: str | None) -> str:
    """``<task>-<subset>``, the folder ``dinfill eval`` writes a task's run into."""
    from dinfill.eval.tasks import TASKS as TASK_CLASSES

    cls = TASK_CLASSES[task]
    subset = subset or cls.default_subset
    if subset not in cls.subsets:
        raise ValueError(f"{task}: unknown subset {subset!r}; choose one of {list(cls.subsets)}")
    return f"{task}-{subset}"


def _load_name(model: str, random_weights: bool) -> str:
    """Under random weights a published checkpoint runs as its built-in shape (nothing is downloaded)."""
    found = published_for(model)
    return found[0].shape if random_weights and found else model


def plan_jobs(args: argparse.Namespace) -> list[ModelJob]:
    """Every model's process and run folders; validates models, settings and sampler flags (no torch)."""
    from dinfill.models.kinds import detect_kind

    models = list(args.models)
    repeated = sorted({m for m in models if models.count(m) > 1})
    if repeated:
        raise ValueError(f"--models names {', '.join(repeated)} more than once")
    specs = args.length or DEFAULT_LENGTHS
    settings = [length_setting(spec, args.middle_tokens) for spec in specs]
    labels = [s["length"] if s["length"] == "oracle" else f"{s['length']}:{s['middle_tokens']}" for s in settings]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--length repeats a setting: {' '.join(specs)}")
    out = Path(args.out)
    # each run in its task's folder, as `dinfill eval --out` lays it out (OUT/<task>-<subset>)
    subsets = {task: _subset_folder(task, args.subset) for task in args.task}
    jobs, slugs = [], {}
    for model in models:
        load = _load_name(model, args.random_weights)
        kind = detect_kind(load).kind
        slug = _slug(model)
        if slug in slugs:
            raise ValueError(f"--models {slugs[slug]} and {model} would share the folder {out / slug}")
        slugs[slug] = model
        folder = out / slug
        if kind == "diffusion":
            runs = [
                RunPlan(task, label, folder / _setting_folder(label) / subsets[task], setting)
                for label, setting in zip(labels, settings, strict=True)
                for task in args.task
            ]
        else:
            runs = [RunPlan(task, "-", folder / subsets[task]) for task in args.task]
        jobs.append(ModelJob(model, load, kind, folder, runs))
    kinds = {job.kind for job in jobs}
    if args.length is not None and "diffusion" not in kinds:
        raise ValueError("--length sets the middle length of diffusion models, and no model in --models is one")
    given = given_sampler_options(args, include_axes=True)
    for name in given:  # a flag of a kind that no model has is a mistake, not something to drop silently
        if not kinds & set(FIELD_KINDS[name]):
            flag = "--" + name.replace("_", "-")
            only = "diffusion" if FIELD_KINDS[name] == ("diffusion",) else "AR"
            raise ValueError(f"{flag} applies to {only} models only, and no model in --models is one; drop it")
    for kind in kinds:
        _settings(args, kind, {})  # every value checked once per kind present
    return jobs


def _kind_args(args: argparse.Namespace, kind: str) -> argparse.Namespace:
    """``args`` with the sampler flags of the other kind unset: they apply to the models of their kind only."""
    own = argparse.Namespace(**vars(args))
    for name in getattr(args, "_sampler_fields", ()):
        if kind not in FIELD_KINDS[name]:
            setattr(own, name, None)
    return own


def _settings(args: argparse.Namespace, kind: str, overrides: dict) -> dict:
    from dinfill.sampler.settings import settings_from_args

    return settings_from_args(_kind_args(args, kind), kind, overrides=overrides).for_kind(kind)


def _specs(args: argparse.Namespace, job: ModelJob, tasks: dict, warn: bool = False) -> list:
    from dinfill.eval.cli import run_spec

    own = _kind_args(args, job.kind)
    return [
        run_spec(own, tasks[run.task], job.load_name, job.kind, _settings(args, job.kind, run.overrides), warn=warn)
        for run in job.runs
    ]


def _gpu_slots(args: argparse.Namespace) -> list[str | None]:
    """One slot per GPU the models are spread over; ``[None]``: one process at a time, no device set here."""
    if args.gpus is not None:
        return list(dict.fromkeys(args.gpus))
    if args.device is not None:  # the user chose the device: every model goes there, one after another
        return [None]
    import torch

    if not torch.cuda.is_available():
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return ids[: torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


# -- running -------------------------------------------------------------------------------------------------------
def run_jobs(jobs: Sequence[ModelJob], slots: Sequence[str | None], launch: Callable[[ModelJob, str | None], Any]):
    """Run ``launch(job, slot)`` for every job, one job per slot at a time, every slot busy while jobs are left.

    Returns
    -------
    dict
        ``model -> what launch returned``.
    """
    queue, results, lock = deque(jobs), {}, threading.Lock()

    def work(slot: str | None) -> None:
        while True:
            with lock:
                if not queue:
                    return
                job = queue.popleft()
            results[job.model] = launch(job, slot)

    if len(slots) <= 1:
        work(slots[0] if slots else None)
        return results
    threads = [threading.Thread(target=work, args=(slot,), daemon=True) for slot in slots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _job_args(args: argparse.Namespace, quiet: bool) -> dict:
    """The parsed flags a model process needs (JSON: the same values, re-read on the other side). ``quiet``: no
    progress bars (processes running side by side would interleave them)."""
    skip = {"func", "models", "length", "gpus", "no_plot", "out"}
    flags = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k not in skip}
    flags["no_progress"] = bool(flags.get("no_progress")) or quiet
    return flags


def _launch(args: argparse.Namespace, job: ModelJob, slot: str | None, quiet: bool) -> dict:
    """Run one model's process, its output echoed line by line; returns its status (what it wrote, or why it
    died)."""
    job.folder.mkdir(parents=True, exist_ok=True)
    status_path = job.folder / STATUS_FILE
    status_path.unlink(missing_ok=True)
    payload = {
        "args": _job_args(args, quiet), "model": job.model, "load_name": job.load_name, "kind": job.kind,
        "runs": [{"task": r.task, "setting": r.setting, "out": str(r.out), "overrides": r.overrides} for r in job.runs],
        "status": str(status_path),
    }  # fmt: skip
    env = dict(os.environ)
    # the process runs this very checkout of dinfill, whatever an installed copy would be
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(slot)
    where = f" on GPU {slot}" if slot is not None else ""
    print(f"# compare: {job.model} ({job.kind}){where}: {len(job.runs)} run(s)", file=sys.stderr)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="dinfill-compare-", delete=False) as f:
        json.dump(payload, f)
    tail: deque[str] = deque(maxlen=20)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "dinfill.eval.compare", f.name], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace",
        )  # fmt: skip
        for line in process.stderr:
            tail.append(line.rstrip())
            print(f"[{job.model}] {line.rstrip()}", file=sys.stderr)
        code = process.wait()
    finally:
        os.unlink(f.name)
    try:
        status = json.loads(status_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        status = {"runs": {}}
    if code != 0 and not status.get("error") and not any(r.get("error") for r in status["runs"].values()):
        # died without saying why (killed, out of memory, a crash): its last words are the reason
        lines = [t for t in tail if t.strip()]
        status["error"] = f"its process exited with code {code}: " + (" / ".join(lines[-3:]) or "no output")
    return status


def _one_line(err: BaseException) -> str:
    text = f"{err}" or type(err).__name__
    return " ".join(text.split())[:500]


def worker_main(argv: Sequence[str]) -> int:
    """A model's process: ``python -m dinfill.eval.compare JOB.json`` (written by ``dinfill compare``).

    Loads the model once, runs each (task, setting) into its folder under the folder's lock, and writes what
    happened (per run: done, or the error) to the job's status file. Returns 0 when every run finished.
    """
    from dinfill.eval.cli import _sandbox_config, _task, build_model_generator
    from dinfill.eval.records import RunLock
    from dinfill.eval.runner import DistContext, run_eval

    (path,) = argv
    job = json.loads(Path(path).read_text(encoding="utf-8"))
    args = argparse.Namespace(**job["args"])
    args.model, args.kind = job["load_name"], job["kind"]
    runs = [RunPlan(r["task"], r["setting"], Path(r["out"]), r["overrides"]) for r in job["runs"]]
    plan = ModelJob(job["model"], job["load_name"], job["kind"], Path(job["status"]).parent, runs)
    status: dict[str, Any] = {"model": plan.model, "kind": plan.kind, "runs": {}}

    def save() -> None:
        Path(job["status"]).write_text(json.dumps(status, indent=2) + "\n", encoding="utf-8")

    try:  # the model first: a model that cannot load says so before any data is read
        generator = build_model_generator(_kind_args(args, plan.kind), 0, _settings(args, plan.kind, {}))
        tasks = {name: _task(args, name) for name in dict.fromkeys(r.task for r in plan.runs)}
        specs = _specs(args, plan, tasks, warn=True)
    except Exception as err:  # noqa: BLE001 - whatever stops the load is this model's row, not the end of the comparison
        status["error"] = f"could not load {plan.load_name}: {_one_line(err)}"
        save()
        print(f"error: {status['error']}", file=sys.stderr)
        return 1
    failed = False
    for run, spec in zip(plan.runs, specs, strict=True):
        generator.settings = spec.sampler
        try:
            with RunLock(run.out) as lock:
                run_eval(spec, generator, run.out, _sandbox_config(args), jobs=args.jobs,
                         progress=not args.no_progress, dist=DistContext(), lock=lock)  # fmt: skip
            status["runs"][str(run.out)] = {"task": run.task, "setting": run.setting, "done": True}
        except Exception as err:  # noqa: BLE001 - one failing run is its cell's reason; the others still run
            failed = True
            status["runs"][str(run.out)] = {"task": run.task, "setting": run.setting, "error": _one_line(err)}
            print(f"error: {run.task} {run.setting}: {_one_line(err)}", file=sys.stderr)
        save()
    return 1 if failed else 0


# -- the command ---------------------------------------------------------------------------------------------------
def cmd_compare(args: argparse.Namespace) -> int:
    """``dinfill compare``: plan, run what is missing (spread over the GPUs), then write and print the table."""
    from dinfill.eval.cli import _USER_ERRORS, _fail, _task

    try:
        jobs = plan_jobs(args)  # every flag checked before torch, data or folders
        if not args.no_plot:
            from dinfill.bench.plots import require_matplotlib

            require_matplotlib()
        tasks = {name: _task(args, name) for name in args.task}
        for job in jobs:
            try:
                progress = [run_progress(s, r.out) for s, r in zip(_specs(args, job, tasks), job.runs, strict=True)]
            except _USER_ERRORS:
                continue  # left to the model's process, which says why in its column
            job.todo = not all(p["complete"] for p in progress)
    except _USER_ERRORS as exc:
        return _fail(exc)
    todo = [job for job in jobs if job.todo]
    for job in jobs:
        if not job.todo:
            print(f"# compare: {job.model}: every run is complete; nothing to do", file=sys.stderr)
    slots = _gpu_slots(args) if todo else [None]
    if todo and args.gpus is None and slots[0] is not None:
        print(f"# compare: {len(todo)} model(s) over GPU(s) {', '.join(map(str, slots))}", file=sys.stderr)
    statuses = run_jobs(todo, slots, lambda job, slot: _launch(args, job, slot, quiet=len(slots) > 1))
    return _write_outputs(args, jobs, statuses)


def run_progress(spec, out: Path) -> dict:
    """:func:`dinfill.eval.runner.run_progress` (imported here: the runner is not needed to parse flags)."""
    from dinfill.eval.runner import run_progress as progress

    return progress(spec, out)


def _columns(jobs: Sequence[ModelJob], statuses: dict) -> list:
    from dinfill.eval.records import load_records
    from dinfill.eval.report import CompareColumn, summarize_run

    columns = []
    for job in jobs:
        status = statuses.get(job.model, {})
        settings = list(dict.fromkeys(run.setting for run in job.runs))
        for setting in settings:
            column = CompareColumn(job.model, job.kind, setting)
            errors = [status["error"]] if status.get("error") else []
            for run in (r for r in job.runs if r.setting == setting):
                records = load_records(run.out) if run.out.is_dir() else []
                column.runs[run.task] = summarize_run(records) if records else None
                error = status.get("runs", {}).get(str(run.out), {}).get("error")
                if error:
                    errors.append(f"{run.task}: {error}")
            column.failure = "; ".join(errors) or None
            columns.append(column)
    return columns


def _write_outputs(args: argparse.Namespace, jobs: Sequence[ModelJob], statuses: dict) -> int:
    from dinfill.eval.report import comparison_table, find_sweeps, plane_point

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = _columns(jobs, statuses)
    table = comparison_table(columns, args.task)
    (out / "compare.md").write_text(table["markdown"], encoding="utf-8")
    fields = list(dict.fromkeys(k for record in table["records"] for k in record))
    with (out / "compare.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table["records"])
    document = {
        "tasks": list(args.task),
        "header": table["header"],
        "rows": table["rows"],
        "records": table["records"],
        "columns": [
            {"label": c.label, "model": c.model, "kind": c.kind, "setting": c.setting, "failure": c.failure,
             "runs": c.runs}
            for c in columns
        ],
        "complete": table["complete"],
    }  # fmt: skip
    (out / "compare.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    written = [out / "compare.md", out / "compare.csv", out / "compare.json"]
    if not args.no_plot:
        from dinfill.bench.plots import plot_comparison

        points = [plane_point(s, c.label) for c in columns for s in c.runs.values() if s]
        sweeps = find_sweeps([out])
        if points or sweeps:
            devices = sorted({e.get("device", "?") for c in columns for s in c.runs.values() if s for e in s["env"]})
            title = "dinfill compare" + (f" on {', '.join(devices)}" if devices else "")
            written.append(plot_comparison(points, out / "compare.png", sweeps=sweeps, title=title))
    print(table["markdown"], end="")
    print("# wrote " + ", ".join(map(str, written)), file=sys.stderr)
    failed = [c.label for c in columns if c.failure]
    if failed:
        print(f"# compare: failed: {', '.join(failed)} (the reasons are in the status row)", file=sys.stderr)
    return 0 if table["complete"] else 1


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
