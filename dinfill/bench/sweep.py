"""``dinfill sweep``: how many diffusion steps can you afford? Quality against throughput over a grid.

For each point of ``steps x alg x middle-length mode`` the sweep measures both sides of the trade-off:

* **quality** through the evaluation layer (:func:`dinfill.eval.runner.run_eval`: the same prompts,
  post-processing, sandboxed execution and records as ``dinfill eval``), pass@1 for HumanEval-Infill and
  exact match for SantaCoder-FIM. Each point is its own resumable run folder under ``OUT/runs/``.
* **speed** of the generation calls of that same run: problems/s, generated tokens/s and forward passes,
  timed around each batch with a device sync (scoring time excluded).

With random weights the quality numbers would be noise, so by default (``--quality auto``) the sweep says
so and measures the speed side only, with :func:`dinfill.bench.throughput.run_config` on the task-like
workload of ``dinfill bench``; ``--quality on`` forces the evaluation anyway (to smoke-test the pipeline).
Outputs: ``OUT/sweep.jsonl`` (appended, one record per point, with the environment), ``OUT/sweep.csv``
(this invocation's points) and ``OUT/quality_vs_speed.png``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # throughput imports torch; `dinfill --help` must not
    from dinfill.bench.throughput import BenchConfig
    from dinfill.sampler.settings import SamplerSettings

__all__ = ["add_sweep_args", "sweep_command", "TimedGenerator", "CSV_FIELDS"]

TASK_CHOICES = ("humaneval-infill", "santacoder-fim")
CSV_FIELDS = [
    "label", "kind", "steps", "alg", "length", "middle_tokens", "cache", "batch", "quality", "quality_metric",
    "problems", "problems_per_s", "tokens_per_s", "forward_passes", "generate_s", "quality_measured", "device",
]  # fmt: skip


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """Options of ``dinfill sweep`` beyond the ones it shares with ``dinfill bench``."""
    g = p.add_argument_group("sweep")
    g.add_argument("--task", choices=TASK_CHOICES, default="humaneval-infill", help="benchmark for the quality side")
    g.add_argument("--subset", help="task subset (HumanEval variant or SantaCoder language)")
    g.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=16,
                   help="problems per generator call (default 16)")  # fmt: skip
    g.add_argument("--quality", choices=("auto", "on", "off"), default="auto",
                   help="measure quality through the eval layer (default auto: not with random weights)")  # fmt: skip
    g.add_argument("--execute", action=argparse.BooleanOptionalAction, default=None,
                   help="run programs in the sandbox (default: the task's, on for humaneval-infill)")  # fmt: skip
    g.add_argument("--no-download", action="store_true", help="never download the dataset")
    g.add_argument("--out", default="sweep-results",
                   help="output folder: CSV, JSONL, plot, eval run folders (default sweep-results)")  # fmt: skip
    g.add_argument("--no-plot", action="store_true", help="skip the PNG")


class TimedGenerator:
    """An :class:`dinfill.eval.runner.InfillGenerator` around ``dinfill.sampler.infill`` that times itself.

    Every call is timed with a device sync on both sides; the counters (seconds, problems, generated
    tokens, forward passes, calls) give the speed side of a sweep point from the very calls that produced
    its quality numbers.
    """

    def __init__(self, model, tokenizer, settings: SamplerSettings, batch_size: int):
        self.model, self.tokenizer, self.settings, self.batch_size = model, tokenizer, settings, batch_size
        self.kind = model.kind
        self.seconds = 0.0
        self.problems = self.tokens = self.forwards = self.calls = 0

    def __call__(self, prefixes: list[str], suffixes: list[str], middles: list[str], *, seed: int) -> list[str]:
        import torch

        from dinfill.bench.roofline import sync
        from dinfill.sampler import infill

        dev = self.model.device
        generator = torch.Generator(device=dev).manual_seed(seed)
        sync(dev)
        t0 = time.perf_counter()
        texts, stats = infill(
            self.model, self.tokenizer, prefixes, suffixes, middles=middles, settings=self.settings,
            generator=generator, batch_size=self.batch_size, return_stats=True,
        )  # fmt: skip
        sync(dev)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.problems += len(prefixes)
        if self.kind == "diffusion":
            self.tokens += sum(sum(st.revealed_per_step) + st.masks_left for st in stats)
        else:  # new tokens the AR loop generated, stop tokens included
            self.tokens += sum(st.new_tokens for st in stats)
        self.forwards += sum(st.forward_passes for st in stats)
        return texts


def _quality_of(summary: dict, task: str) -> tuple[float | None, str]:
    rates = summary.get("rates", {})
    name = "passed" if task == "humaneval-infill" else "exact_match"
    metric = "pass@1" if task == "humaneval-infill" else "exact_match"
    value = rates.get(name, {}).get("mean")
    return value, metric


def _point_settings(settings: SamplerSettings, cfg: BenchConfig, kind: str) -> SamplerSettings:
    """The settings of one sweep point: the command's settings with the point's axes."""
    if kind == "ar":
        return settings
    return settings.replace(steps=cfg.steps, alg=cfg.alg, length=cfg.length)


def _quality_point(args, settings, model, tok, task, cfg: BenchConfig, out: Path) -> dict[str, Any]:
    """Run one sweep point through the eval layer; returns its row (quality + speed)."""
    from dinfill.eval.runner import RunSpec, run_eval

    point = _point_settings(settings, cfg, model.kind)
    gen = TimedGenerator(model, tok, point, args.batch_size)
    execute = task.executes_by_default if args.execute is None else args.execute
    spec = RunSpec(
        task=task, model=args.model, kind=model.kind, sampler=point.for_kind(model.kind), seeds=[args.seed],
        batch_size=args.batch_size, limit=args.problems, execute=execute,
    )  # fmt: skip
    summary = run_eval(spec, gen, out / "runs" / cfg.label(), progress=False)
    quality, metric = _quality_of(summary, args.task)
    row = {"quality": quality, "quality_metric": metric, "quality_measured": True, "summary": summary}
    if gen.calls:  # a resumed run may have generated nothing new: then there is no speed to report
        row.update(
            problems=gen.problems, generate_s=gen.seconds, problems_per_s=gen.problems / gen.seconds,
            tokens_per_s=gen.tokens / gen.seconds, forward_passes=gen.forwards / gen.calls if gen.forwards else None,
        )  # fmt: skip
    else:
        row.update(problems=summary.get("records"), generate_s=summary.get("generate_s"),
                   problems_per_s=summary.get("problems_per_s"))  # fmt: skip
    return row


def _speed_point(args, settings, model, workload, cfg: BenchConfig, mask_id) -> dict[str, Any]:
    from dinfill.bench import throughput
    from dinfill.bench.cli import sampling_of

    sampling = sampling_of(settings, model.kind, args.seed)
    rec = throughput.run_config(model, workload, cfg, sampling, mask_id=mask_id, warmup=model.device.type == "cuda")
    m = rec["metrics"]
    return {
        "quality": None, "quality_metric": None, "quality_measured": False, "problems": len(workload.problems),
        "generate_s": m["total_s"], "problems_per_s": m["problems_per_s"], "tokens_per_s": m["tokens_per_s"],
        "forward_passes": m["forward_passes"],
    }  # fmt: skip


def sweep_command(args: argparse.Namespace) -> int:
    """Handler of ``dinfill sweep``; returns the exit code."""
    from dinfill.bench.cli import BENCH_EXCLUDED, apply_defaults, check_common, load_for_bench, mask_id_for
    from dinfill.sampler.settings import axis_values, given_sampler_options

    kind, settings = check_common(args)  # every sampler option checked before torch or the model is loaded
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.no_plot:
        from dinfill.bench.plots import require_matplotlib

        require_matplotlib()
    measure_quality = args.quality == "on" or (args.quality == "auto" and not args.random_weights)
    unused = [name for name in given_sampler_options(args) if name in BENCH_EXCLUDED]
    if unused and not measure_quality:
        flags = ", ".join("--" + n.replace("_", "-") for n in unused)
        raise ValueError(
            f"{flags}: a speed-only sweep times dinfill bench's loop, which does not take them; drop them or pass "
            "--quality on"
        )
    from dinfill.bench import report, throughput
    from dinfill.bench.cli import resolve_device

    device = resolve_device(args)
    if args.steps is None:
        args.steps = [8, 16, 32, 64, 128] if device.startswith("cuda") else [4, 8]
    batch = args.batch_size
    if not measure_quality:  # quality runs default to the whole benchmark (--problems limits them)
        apply_defaults(args, device, ("problems",))
        if batch > args.problems:  # the speed side times batches of the workload: never more than it holds
            print(f"# speed only: {args.problems} problem(s), so batches of {args.problems}, not {batch}",
                  file=sys.stderr)  # fmt: skip
            batch = args.problems
    axes = axis_values(args, settings)
    configs = throughput.expand_configs(
        kind, batches=[batch], steps=axes["steps"], algs=axes["alg"], caches=[settings.cache], lengths=axes["length"],
        middle_tokens=settings.middle_tokens, refresh=settings.refresh,
    )  # fmt: skip
    if args.random_weights:
        what = "measuring it anyway (--quality on), to exercise the pipeline" if measure_quality else "speed only"
        print(f"# random weights: quality is meaningless; {what}", file=sys.stderr)

    model, tok = load_for_bench(args, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = report.environment(model.device)
    task = workload = mask_id = None
    if measure_quality:
        if tok is None:
            raise ValueError("measuring quality needs a tokenizer: pass --tokenizer (random weights have none)")
        from dinfill.eval.tasks import get_task

        task = get_task(args.task, args.subset, data_dir=args.data_dir, download=not args.no_download)
    else:
        from dinfill.bench.workload import draw_workload

        workload = draw_workload(args.problems, args.lengths, seed=args.seed, tokenizer=tok, data_dir=args.data_dir)
        mask_id = mask_id_for(args, model, tok)

    rows, records = [], []
    for cfg in configs:
        if measure_quality:
            point = _quality_point(args, settings, model, tok, task, cfg, out)
        else:
            point = _speed_point(args, settings, model, workload, cfg, mask_id)
        summary = point.pop("summary", None)
        row = {**cfg.__dict__, "label": cfg.label(), **point, "device": env["device"]}
        rows.append(row)
        records.append({"type": "sweep", "task": args.task, "model": args.model, "random_weights": args.random_weights,
                        "row": row, "eval_summary": summary, "env": env})  # fmt: skip
        q = "-" if row["quality"] is None else f"{row['quality']:.3f}"
        print(f"# {cfg.label()}: quality {q}, {row['problems_per_s']:.3g} problems/s", file=sys.stderr)

    report.append_records(out / "sweep.jsonl", records)
    with (out / "sweep.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    written = [out / "sweep.csv", out / "sweep.jsonl"]
    if not args.no_plot:
        from dinfill.bench.plots import plot_quality_vs_speed

        metric = "pass@1" if args.task == "humaneval-infill" else "exact_match"
        title = f"{args.model} on {env['device']}\n{args.task} {metric} against speed"
        if not measure_quality:
            title = f"{args.model} on {env['device']}\nrandom weights: speed only"
        for r in rows:
            r[metric] = r["quality"]
        written.append(plot_quality_vs_speed(rows, out / "quality_vs_speed.png", metric=metric, title=title))
    cols = [("label", "point"), ("quality", "quality"), ("problems_per_s", "prob/s"), ("tokens_per_s", "tok/s"),
            ("forward_passes", "fwd/call")]  # fmt: skip
    print(report.text_table(rows, cols))
    print("# wrote " + ", ".join(str(p) for p in written))
    return 0
