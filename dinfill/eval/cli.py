"""Command line of the evaluation layer: ``dinfill eval``, ``dinfill score``, ``dinfill report`` (**contract**).

``dinfill.cli`` (the package's main parser) calls :func:`register`; ``python -m dinfill.eval`` (and so
``torchrun ... -m dinfill.eval eval ...``) goes through :func:`main`, which builds a parser with the
same three subcommands: both paths share the handlers below.

Why the generator is built lazily: ``score`` and ``report`` must work without torch or a model,
and the runner is tested with fake generators (``--generator FILE.py:NAME``), so model loading
(``dinfill.load_model`` / ``dinfill.sampler.infill``) is imported only when ``eval`` needs a model.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from dinfill.eval.datasets import DatasetUnavailable
from dinfill.eval.postprocess import RULES, PostProcess
from dinfill.eval.records import RecordsError, RunFolderBusy
from dinfill.eval.tasks import TASKS, get_task
from dinfill.sampler.settings import add_sampler_arguments, settings_from_args

EXEC_WARNING = (
    "warning: executing untrusted model-written code in the dinfill sandbox (see dinfill.eval.execution for what "
    "it does and does not cover); pass --no-execute to skip execution"
)
# Errors a user can fix (bad file, missing data, wrong option): one line on stderr, exit code 2.
_USER_ERRORS = (
    RecordsError,
    RunFolderBusy,
    DatasetUnavailable,
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    TypeError,
)


# -- parser ------------------------------------------------------------------------------------
def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--subset",
        default=None,
        help="HumanEval variant (single-line [default], multi-line, random-span, random-span-light) "
        "or SantaCoder language (py [default], js, java)",
    )
    # One destination for both names: a run has one subset whatever the benchmark calls it.
    group.add_argument("--language", dest="subset", help="alias of --subset for santacoder-fim")
    group.add_argument("--data", default=None, help="a dataset file (.jsonl[.gz] or .parquet) or a folder")
    group.add_argument(
        "--data-dir",
        default=None,
        help="folder laid out like ../shared/data (default: $DINFILL_DATA_DIR, then the cache)",
    )
    group.add_argument("--no-download", action="store_true", help="never download; fail if no local copy exists")


def _add_scoring_options(parser: argparse.ArgumentParser, stop: bool = True) -> None:
    group = parser.add_argument_group("scoring")
    group.add_argument("--postprocess", choices=RULES, default=None, help="rule applied to each middle before scoring")
    if stop:  # `eval` has --stop among its sampler options: the same stop strings, also used while generating
        group.add_argument(
            "--stop", action="append", default=[], help="stop string: the middle is cut before it (repeatable)"
        )
    group.add_argument(
        "--execute",
        # Tri-state: None means the task decides (HumanEval must execute to score at all).
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the programs in the sandbox (default: on for humaneval-infill, off for santacoder-fim)",
    )
    group.add_argument("--jobs", type=int, default=None, help="programs at once (default and maximum: the CPU cores)")
    group.add_argument("--cpu-seconds", type=float, default=3.0, help="CPU limit per program (default 3, as published)")
    group.add_argument(
        "--memory-mb",
        type=int,
        default=2048,
        help="memory limit per program (each process, and all its processes together), MiB (default 2048)",
    )
    group.add_argument(
        "--allow-weak-sandbox",
        action="store_true",
        help="run programs even where the machine cannot isolate them fully (user namespaces off, no seccomp); "
        "every record then says 'sandbox: weak (...)'; see docs/eval-protocol.md for what is then covered",
    )
    group.add_argument(
        "--python",
        default=None,
        help="interpreter the programs run with (default: the one running dinfill); it needs only the standard "
        "library",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of a model run that ``eval`` and ``compare`` share: seeds, samples, batches, limit, device,
    dtype, random weights, tokenizer."""
    parser.add_argument("--seed", nargs="+", type=int, default=[0], help="one run per seed (default 0)")
    parser.add_argument("--samples", type=int, default=1, help="samples per problem and seed (pass@k)")
    # Part of the run identity: the batches fix the seeds, so a resume must keep it.
    parser.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=16,
                        help="holes per generator call (default 16)")  # fmt: skip
    parser.add_argument("--limit", "--problems", dest="limit", type=int, default=None,
                        help="only the first N problems")  # fmt: skip
    parser.add_argument("--device", default=None,
                        help="model device (default: cuda:LOCAL_RANK if available, else cpu)")  # fmt: skip
    parser.add_argument("--dtype", choices=("bf16", "bfloat16", "fp16", "float16", "fp32", "float32"),
                        metavar="DTYPE", help="bf16|bfloat16, fp16|float16, fp32|float32 (default: bf16 on CUDA, "
                        "fp32 on CPU)")  # fmt: skip
    parser.add_argument("--random-weights", action="store_true",
                        help="built-in shape with random weights (smoke tests)")  # fmt: skip
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or folder (default: --model)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval``, ``score`` and ``report`` subcommands to a parser's subparsers."""
    ev = subparsers.add_parser(
        "eval",
        help="generate, score and record a benchmark run (resumable; torchrun-aware)",
        description="Generate middles with a model, post-process, score, and append records to OUT/<task>-<subset>/.",
    )
    ev.add_argument("--model", default=None, help="hub id, local checkpoint or built-in shape name")
    ev.add_argument("--generator", default=None, help="FILE.py:NAME or module:NAME, a custom generator callable")
    ev.add_argument("--kind", choices=("diffusion", "ar"), default=None, help="override the model's kind")
    # Several tasks in one command, each into its own OUT/<task>-<subset> folder: one command per model.
    ev.add_argument("--task", nargs="+", required=True, choices=sorted(TASKS), help="one or more benchmarks")
    ev.add_argument("--out", required=True, help="output folder (reuse it to resume)")
    add_run_options(ev)
    # the sampler options every subcommand shares (dinfill.sampler.settings): unset = the published setting
    stop = (
        "stop string (repeatable): the middle ends before it, AR decoding stops there, and without --postprocess "
        "scoring uses the stop_sequences rule with these strings (default: none)"
    )
    add_sampler_arguments(ev, help_overrides={"stop": stop})
    _add_data_options(ev)
    _add_scoring_options(ev, stop=False)
    ev.set_defaults(func=cmd_eval)

    sc = subparsers.add_parser(
        "score",
        help="re-score a completion file (task_id + completion, or the published files' fields)",
        description="Re-score completions; prints e.g. 'passed 790/1033' or 'exact_match first_line 584/1043'.",
    )
    sc.add_argument("--task", required=True, choices=sorted(TASKS))
    sc.add_argument("file", help="JSONL with task_id and completion (or generated_code) per line")
    sc.add_argument("--json", action="store_true", help="print a machine-readable summary")
    # Optional: write the re-scored file as a run (like eval) so that `dinfill report` can show it next to runs.
    sc.add_argument(
        "--out",
        default=None,
        help="also keep the records in OUT/<task>-<subset>/ (one --out per model; resumable; a folder holding "
        "another run is refused)",
    )
    sc.add_argument("--overwrite", action="store_true", help="with --out: replace what the run folder holds")
    sc.add_argument("--model", default=None, help="model label for --out (default: the file's folder name)")
    _add_data_options(sc)
    _add_scoring_options(sc)
    sc.set_defaults(func=cmd_score)

    rp = subparsers.add_parser(
        "report",
        help="comparison table of run folders",
        description="Markdown table with rule, middle-length mode, seeds, settings and throughput by every number.",
    )
    rp.add_argument("dirs", nargs="+", help="run folders (or folders containing them)")
    rp.add_argument("--json", action="store_true", help="print the summaries as JSON instead")
    rp.add_argument(
        "--plot", nargs="?", const="", default=None, metavar="PNG",
        help="also draw the speed / quality plane of the runs (and the steps curve of dinfill sweep results found "
        "under the folders) into PNG (default: report.png in the first folder); needs matplotlib",
    )  # fmt: skip
    rp.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with the three subcommands (used by ``python -m dinfill.eval``)."""
    parser = argparse.ArgumentParser(prog="dinfill", description="dinfill evaluation: eval, score, report")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dinfill.eval``; returns the exit code."""
    # The same handlers as `dinfill eval|score|report`: only the parser is built here.
    args = build_parser().parse_args(argv)
    return args.func(args)


# -- helpers ---------------------------------------------------------------------------------
def _task(args: argparse.Namespace, name: str):
    return get_task(name, args.subset, data=args.data, data_dir=args.data_dir, download=not args.no_download)


def _postprocess(args: argparse.Namespace, default: PostProcess) -> PostProcess:
    # Stop strings alone imply the stop_sequences rule; nothing at all keeps the task default.
    if args.postprocess is None:
        if args.stop:
            return PostProcess("stop_sequences", tuple(args.stop))
        return default
    return PostProcess(args.postprocess, tuple(args.stop or ()))


def _sandbox_config(args: argparse.Namespace):
    from dinfill.eval.execution import SandboxConfig

    # Other limits keep their defaults (see SandboxConfig); these two are the ones people tune. Without the
    # flag, SandboxConfig reads DINFILL_ALLOW_WEAK_SANDBOX.
    options = {"allow_weaker_isolation": True} if args.allow_weak_sandbox else {}
    if args.python is not None:
        options["python"] = args.python
    return SandboxConfig(cpu_seconds=args.cpu_seconds, memory_bytes=args.memory_mb * 1024**2, **options)


def _fail(message: object) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def load_generator(spec: str, kind: str | None):
    """Load ``FILE.py:NAME`` or ``module:NAME``; a plain function is wrapped with ``kind`` (default diffusion)."""
    from dinfill.eval.runner import FunctionGenerator

    # rpartition: a file path may itself contain colons, the attribute name cannot.
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"--generator {spec!r}: expected FILE.py:NAME or module:NAME")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"--generator {spec!r}: {path} does not exist")
        # Loaded under a private name so that it cannot shadow a real module.
        module_spec = importlib.util.spec_from_file_location(f"_dinfill_generator_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    if not hasattr(module, attr):
        raise ValueError(f"--generator {spec!r}: {target} has no attribute {attr!r}")
    obj = getattr(module, attr)
    # A plain function has no kind: wrap it (an explicit --kind also forces the wrapper).
    if kind is not None or not hasattr(obj, "kind"):
        return FunctionGenerator(obj, kind or "diffusion")
    return obj


def sampler_settings(args: argparse.Namespace, kind: str) -> dict:
    """The sampler options of a run (its record's ``sampler``): the preset of the kind, then the flags given.

    Everything is validated here (a flag of the other kind, say ``--steps`` for an AR model, is an error), so
    :func:`cmd_eval` calls this before it loads a model or writes anything.
    """
    return settings_from_args(args, kind).for_kind(kind)


class ModelGenerator:
    """The real generator: ``dinfill.sampler.infill`` on a loaded model, seeded per batch.

    After each call it says what the call cost (the runner records it): ``last_tokens`` (tokens generated),
    ``last_peak_memory`` (peak CUDA memory allocated during the call, weights included; None on the CPU) and
    ``last_capture_s`` (CUDA-graph captures); ``environment`` is the device, dtype and versions.
    """

    def __init__(self, model, tokenizer, settings: dict) -> None:
        from dinfill.eval.runner import generator_environment

        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.kind = model.kind
        self.last_capture_s = 0.0
        self.last_tokens: int | None = None
        self.last_peak_memory: int | None = None
        self.environment = generator_environment(model)

    def __call__(self, prefixes: list[str], suffixes: list[str], middles: list[str], *, seed: int) -> list[str]:
        import torch

        from dinfill.eval.runner import generated_tokens
        from dinfill.sampler import infill
        from dinfill.sampler.graphs import graph_pool

        device = next(self.model.parameters()).device if hasattr(self.model, "parameters") else torch.device("cpu")
        # One generator per batch, seeded by the runner: the batch's middles do not depend on what ran before.
        generator = torch.Generator(device=device).manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        captured = graph_pool().stats.capture_s
        # The oracle length mode (the published setting) reads the canonical middles; other modes ignore them.
        out, stats = infill(
            self.model, self.tokenizer, prefixes, suffixes, middles=middles, generator=generator, return_stats=True,
            **self.settings,
        )  # fmt: skip
        # seconds this batch spent capturing CUDA graphs (a new shape bucket); the runner records them
        self.last_capture_s = graph_pool().stats.capture_s - captured
        self.last_tokens = generated_tokens(stats)
        self.last_peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return out


def build_model_generator(args: argparse.Namespace, local_rank: int, settings: dict | None = None) -> ModelGenerator:
    """Load the model and tokenizer named by ``--model`` (imports torch and the runtime only here).

    ``settings``: the validated :func:`sampler_settings` (computed here when not given).
    """
    import torch

    import dinfill

    # Under torchrun every rank takes the GPU of its local rank.
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    options = {"device": device, "random_weights": args.random_weights}
    if args.dtype:
        options["dtype"] = args.dtype  # every spelling (bf16, bfloat16...) is load_model's
    if args.kind:
        options["kind"] = args.kind
    model = dinfill.load_model(args.model, **options)
    # A new (untrained) mask token only for random weights; trained checkpoints bring theirs (Open-dCoder: <M>).
    tokenizer = dinfill.load_tokenizer(
        args.tokenizer or args.model, add_mask_token=bool(args.random_weights) and model.kind == "diffusion"
    )
    return ModelGenerator(model, tokenizer, settings if settings is not None else sampler_settings(args, model.kind))


def run_spec(args: argparse.Namespace, task, model: str, kind: str, settings: dict, warn: bool = True):
    """The :class:`~dinfill.eval.runner.RunSpec` of one task of an ``eval`` (or ``compare``) command."""
    from dinfill.eval.runner import RunSpec

    return RunSpec(
        task=task,
        model=model,
        kind=kind,
        sampler=settings,
        postprocess=_postprocess(args, task.default_postprocess),
        seeds=args.seed,
        samples=args.samples,
        batch_size=args.batch_size,
        limit=args.limit,
        execute=_decide_execute(args, task, warn=warn),
    )


def _decide_execute(args: argparse.Namespace, task, warn: bool = True) -> bool:
    execute = task.executes_by_default if args.execute is None else args.execute
    # Said every time (once per torchrun job: by rank 0): running model-written code must never be a silent default.
    if execute and warn:
        print(EXEC_WARNING, file=sys.stderr)
    return execute


# -- handlers --------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    """``dinfill eval``: run each task into ``OUT/<task>-<subset>`` and print its table rows."""
    from contextlib import ExitStack

    from dinfill.eval.execution import SandboxUnavailable
    from dinfill.eval.records import RunLock
    from dinfill.eval.report import markdown_table
    from dinfill.eval.runner import DistContext, run_eval

    if (args.model is None) == (args.generator is None):
        return _fail("pass exactly one of --model (a model to load) or --generator (a custom generator)")
    # A placeholder, so that `finally` can always close; the real one joins the process group.
    ctx, locks = DistContext(), ExitStack()
    try:
        ctx = DistContext.from_env()
        # Every sampler option is checked first, before any data, lock, folder or model: the kind of a model
        # comes from small files only (dinfill.models.kinds), a custom generator carries its own.
        if args.generator is not None:
            generator = load_generator(args.generator, args.kind)
            settings = sampler_settings(args, generator.kind)
        else:
            from dinfill.models.kinds import detect_kind

            settings = sampler_settings(args, detect_kind(args.model, args.kind).kind)
        # One folder per task and subset (`dinfill report OUT` finds them all), each locked for the whole
        # run before any model loads: a second writer fails at once, naming the first.
        tasks = [_task(args, name) for name in args.task]
        outs = [Path(args.out) / f"{task.name}-{task.subset}" for task in tasks]
        held = [locks.enter_context(RunLock(out, ctx.rank, ctx.world_size)) for out in outs]
        # Either a custom callable (tests, remote APIs) or a model loaded with dinfill.
        if args.generator is not None:
            model_name = args.model or args.generator
        else:
            generator = build_model_generator(args, ctx.local_rank, settings)
            model_name = args.model
        summaries = []
        for task, out, lock in zip(tasks, outs, held, strict=True):
            spec = run_spec(args, task, model_name, generator.kind, settings, warn=ctx.rank == 0)
            summary = run_eval(
                spec,
                generator,
                out,
                _sandbox_config(args),
                jobs=args.jobs,
                progress=not args.no_progress,
                dist=ctx,
                lock=lock,
            )
            # Only rank 0 gets a summary back (it merged the ranks' records).
            if summary is not None:
                summaries.append(summary)
                print(f"{task.name}: records in {out}", file=sys.stderr)
    except (*_USER_ERRORS, SandboxUnavailable) as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        # Every record written so far is on disk (and the batch in flight kept what it finished).
        print(f"interrupted: the records written so far stay in {args.out}; run the same command again to resume",
              file=sys.stderr)  # fmt: skip
        return 130
    finally:
        locks.close()
        ctx.close()
    if summaries:
        print(markdown_table(summaries), end="")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """``dinfill score``: re-score a completion file and print its counts (or ``--json``).

    With ``--out`` the records go to ``OUT/<task>-<subset>/`` as for ``eval``: appended as they are
    scored (a killed re-scoring resumes), under the folder's lock, and refused when the folder holds
    another run (task, model, rule, source file); an identical re-score does nothing unless ``--overwrite``.
    """
    from contextlib import ExitStack

    from tqdm.auto import tqdm

    from dinfill.eval.datasets import sha256_of
    from dinfill.eval.execution import Sandbox, SandboxUnavailable, available_cores
    from dinfill.eval.records import (
        RECORDS,
        RecordWriter,
        RunLock,
        check_run_file,
        load_records,
        note_sandbox,
        read_completions,
        record_key,
    )
    from dinfill.eval.report import summarize_run, write_summary
    from dinfill.eval.runner import score_keeping_finished

    if args.overwrite and not args.out:
        return _fail("--overwrite replaces what a run folder holds: it needs --out")
    kept, todo, out, records = 0, [], None, []
    try:
        task = _task(args, args.task)
        problems = task.problems()
        label = f"{task.name} {task.subset}"
        entries = read_completions(args.file, [p.task_id for p in problems], [p.canonical for p in problems], label)
        # Re-scoring defaults to the file as it is (`none`); both exact-match rules are reported anyway.
        postprocess = _postprocess(args, PostProcess("none"))
        execute = _decide_execute(args, task)
        if execute and not task.can_execute():
            return _fail(f"{label} cannot be executed (not Python); drop --execute")
        # The published files sit in one folder per model, so the folder name is a good label.
        model = args.model or Path(args.file).resolve().parent.name
        with ExitStack() as stack:
            out, done = None, set()
            if args.out:
                out = Path(args.out) / f"{task.name}-{task.subset}"
                stack.enter_context(RunLock(out))
                if args.overwrite:
                    for path in [*out.glob("records*.jsonl"), out / "summary.json", out / "summary.md"]:
                        path.unlink(missing_ok=True)
                identity = {
                    "command": "score",
                    "task": task.name,
                    "subset": task.subset,
                    "model": model,
                    "source": {"file": str(Path(args.file).resolve()), "sha256": sha256_of(Path(args.file))},
                    "postprocess": postprocess.to_dict(),
                    "execute": execute,
                    "dataset_sha256": task.dataset_sha256(),
                }
                fix = "use another --out (one per model), or --overwrite to replace it"
                check_run_file(out, identity, overwrite=args.overwrite, fix=fix)
                done = {record_key(r) for r in load_records(out)}
            todo = [e for e in entries if (problems[e.index].task_id, e.seed, e.sample) not in done]
            if done and not todo:
                print(f"{out} already holds this scoring; pass --overwrite to score it again", file=sys.stderr)
            sandbox = None
            if execute and todo:
                # memo: a program that occurs twice in the file runs once, whichever chunk it is in.
                sandbox = stack.enter_context(Sandbox(_sandbox_config(args), jobs=args.jobs, memo=True))
                sandbox.self_check()
                if out is not None:
                    note_sandbox(out, sandbox.label)
            writer = stack.enter_context(RecordWriter(out / RECORDS)) if out is not None else None
            records = []
            # Chunks, each appended as soon as it is scored: a killed re-scoring loses at most one chunk.
            size = 32 * (sandbox.jobs if sandbox is not None else available_cores())
            with tqdm(total=len(todo), desc=f"{task.name} score", disable=args.no_progress, unit="prog") as bar:
                for start in range(0, len(todo), size):
                    part = todo[start : start + size]
                    chosen = [problems[e.index] for e in part]
                    # Ctrl-C: the programs that finished are recorded (a resumed run does not redo them).
                    keep, scored, stop = score_keeping_finished(
                        task, chosen, [e.completion for e in part], postprocess, sandbox
                    )
                    part, chosen = [part[k] for k in keep], [chosen[k] for k in keep]
                    for entry, problem, (processed, outcome) in zip(part, chosen, scored, strict=True):
                        record = {
                            "task": task.name,
                            "subset": task.subset,
                            "task_id": problem.task_id,
                            "index": entry.index,
                            "seed": entry.seed,
                            "sample": entry.sample,
                            "model": model,
                            # Unknown for a file made elsewhere; the report shows '-' rather than guessing.
                            "kind": None,
                            "sampler": None,
                            "postprocess": postprocess.to_dict(),
                            "completion": entry.completion,
                            "processed": processed,
                            "outcome": outcome,
                            "task_size": len(problems),
                            "source": {"file": str(args.file), "line": entry.line},
                        }
                        records.append(record)
                        if writer is not None:
                            writer.append(record)
                            kept += 1
                    bar.update(len(part))
                    if stop is not None:
                        raise stop
            if out is not None:
                # The whole run, resumed parts included, from the records alone.
                summary = summarize_run(load_records(out))
                write_summary(out, summary)
            else:
                summary = summarize_run(records)
    except (*_USER_ERRORS, SandboxUnavailable) as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        if out is not None:
            print(f"interrupted: {kept} new record(s) kept in {out}; run the same command again to resume",
                  file=sys.stderr)  # fmt: skip
        else:
            print(f"interrupted after {len(records)} of {len(todo)} completions; nothing is kept without --out",
                  file=sys.stderr)  # fmt: skip
        return 130
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_score_text(summary, args.file, len(problems)))
    return 0


def _score_text(summary: dict, path: str, n_problems: int) -> str:
    counts, total = summary["counts"], summary["total"]
    rule = PostProcess.from_dict(summary["postprocess"]).describe()
    lines = [f"{summary['task']} ({summary['subset']}): {total} completions from {path}, post-processing {rule}"]
    # A partial file is scored as it is, but the reader must know it is partial.
    if summary["problems"] < n_problems:
        lines.append(f"note: the file covers {summary['problems']} of {n_problems} problems")
    if "passed" in counts:
        lines.append(f"passed {counts['passed']}/{total} ({100 * counts['passed'] / total:.2f}%)")
        for name, value in summary.get("pass@k", {}).items():
            lines.append(f"{name} {100 * value['mean']:.2f}%")
        lines.append("statuses: " + ", ".join(f"{k} {v}" for k, v in summary.get("statuses", {}).items()))
    if summary.get("sandbox"):
        lines.append(f"sandbox: {summary['sandbox']}")
    for key, label in (("exact_match_first_line", "first_line"), ("exact_match_whole", "whole")):
        if key in counts:
            lines.append(f"exact_match {label} {counts[key]}/{total} ({100 * counts[key] / total:.2f}%)")
    # Under none or first_line this count equals one of the two rule lines above.
    if "exact_match" in counts and rule not in ("none", "first_line"):
        lines.append(f"exact_match {rule} {counts['exact_match']}/{total} ({100 * counts['exact_match'] / total:.2f}%)")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    """``dinfill report``: the comparison table of run folders (markdown, or ``--json``)."""
    from dinfill.eval.report import report

    plot = None
    if args.plot is not None:  # checked first: a missing matplotlib fails before any folder is read
        from dinfill.bench.plots import require_matplotlib

        plot = args.plot or str(Path(args.dirs[0]) / "report.png")
    try:
        if plot is not None:
            require_matplotlib()
        text, summaries = report(args.dirs, plot=plot)
    except _USER_ERRORS as exc:
        return _fail(exc)
    print(json.dumps(summaries, indent=2) if args.json else text, end="" if not args.json else "\n")
    return 0
