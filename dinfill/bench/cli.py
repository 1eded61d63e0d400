"""``dinfill bench`` and ``dinfill sweep``: command-line front ends of :mod:`dinfill.bench`.

Defaults depend on the device on purpose. On a GPU they are the issue's measurement (batch 1 and 32,
64 steps, 64 problems with HumanEval-like lengths, an untimed warm-up batch); on a CPU they shrink to
one problem at 4 steps without the warm-up (nothing is compiled on the CPU path), so the README
quickstart (``dinfill bench --model open-dcoder-0.5b --random-weights``: the real 0.5B shape, offline)
ends in about a minute on a 2-core machine. Every default is printed before the run and stored in each
record, so a CPU number is never mistaken for a GPU one.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

log = logging.getLogger("dinfill")

# device -> defaults of the options left unset (None) on the command line
GPU_DEFAULTS = {"batch": [1, 32], "steps": [64], "problems": 64, "warmup": True}
CPU_DEFAULTS = {"batch": [1], "steps": [4], "problems": 1, "warmup": False}  # nothing compiles on the CPU path


# options of the sampler settings that the timed loops of dinfill.bench.throughput do not take: bench times
# every problem's own middle length (random weights never stop early), with the default schedule
BENCH_EXCLUDED = ("alg_temp", "eps", "max_new_tokens", "stop")
SWEEP_AXES = ("steps", "alg", "cache", "length")


def _add_common(p: argparse.ArgumentParser, *, axes: tuple[str, ...], exclude: tuple[str, ...] = ()) -> None:
    from dinfill.sampler.cli import add_model_args
    from dinfill.sampler.settings import add_sampler_arguments

    add_model_args(p)
    g = p.add_argument_group("workload")
    g.add_argument(
        "--problems", "--limit", dest="problems", type=int,
        help="problems per configuration (default: GPU 64, CPU 1; sweep quality runs: all)",
    )  # fmt: skip
    g.add_argument("--lengths", choices=("auto", "humaneval", "synthetic"), default="auto",
                   help="problem lengths (default auto: HumanEval-Infill in DINFILL_DATA_DIR if there)")  # fmt: skip
    g.add_argument("--data-dir", help="benchmark data directory (default: $DINFILL_DATA_DIR)")
    g.add_argument("--mask-id", type=int, help="diffusion mask id (default: the tokenizer's, else vocab_size - 1)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    steps = "diffusion steps; several values sweep over them (default: GPU 64, CPU 4; sweep: GPU 8-128, CPU 4 8)"
    add_sampler_arguments(p, axes=axes, exclude=exclude, help_overrides={"steps": steps})


# the static GPU model's choices (dinfill.bench.static.MODES / STEP_PRESETS / TARGETS, which import torch: the
# command line is parsed and checked before torch is; tests/test_static.py checks the lists agree)
STATIC_MODES = (
    "full", "window", "prefill", "decode", "decode-gemv", "step", "forward", "forward-decode", "forward-pdl",
)  # fmt: skip
STATIC_STEP_PRESETS = ("greedy", "published", "fast", "maskgit", "origin", "entropy-topk", "margin-topk")


def _add_static_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--static`` options of ``dinfill bench`` (:mod:`dinfill.bench.static`; no GPU needed)."""
    g = p.add_argument_group("static GPU model (dinfill bench --static; no GPU needed)")
    g.add_argument("--static", action="store_true", help="compile every launch for the target GPUs and report "
                   "shared memory, registers, spills, waves, instructions per element and predicted times")
    g.add_argument("--arch", nargs="+", help="targets: a100 a10 l4 h100 h200, or sm_80 sm_86 sm_89 sm_90 "
                   "(default: the four architectures)")
    g.add_argument("--kernel", nargs="+", help="only report these kernels (substring match)")
    g.add_argument("--mode", nargs="+", choices=STATIC_MODES, help="only these workload modes")
    g.add_argument("--step-preset", nargs="+", choices=STATIC_STEP_PRESETS,
                   help="only these fused_step settings in --mode step (default: all)")
    g.add_argument("--json", metavar="FILE", help="also write every result as JSON ('-' for stdout)")
    g.add_argument("--check", action="store_true", help="print only what breaks a fit or budget rule; exit 1 if any")
    g.add_argument("--full", action="store_true", help="with --check: the whole matrix (default: a CI-sized subset)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` and ``sweep`` to the ``dinfill`` command (called by :mod:`dinfill.cli`)."""
    p = subparsers.add_parser(
        "bench",
        help="throughput of diffusion / AR infilling (random weights work offline)",
        description="End-to-end infilling throughput, optionally against the reference loop on the same inputs.",
    )
    _add_common(p, axes=SWEEP_AXES, exclude=BENCH_EXCLUDED)
    p.add_argument("--batch", "--batch-size", dest="batch", type=int, nargs="+",
                   help="batch sizes (default: GPU 1 32, CPU 1)")  # fmt: skip
    p.add_argument(
        "--results", help="results JSONL to append to (default: $DINFILL_BENCH_RESULTS, bench/results.jsonl)"
    )
    p.add_argument("--no-results", action="store_true", help="do not write a results file")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots into DIR")
    p.add_argument("--vs", choices=("none", "reference"), default="none",
                   help="also run the baseline on the same inputs: the reference loop (diffusion) or "
                        "transformers' generate (AR), and print the ratio")  # fmt: skip
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction,
                   help="untimed first batch before each timed pass (default: on for CUDA, off on CPU)")  # fmt: skip
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the copy / matmul ceilings")
    p.add_argument("--nvtx", action="store_true", help="NVTX ranges for Nsight Systems")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace per configuration into DIR")
    _add_static_arguments(p)
    for action in p._actions:  # --static needs no model (it runs every seed shape); a timed run checks below
        if action.dest == "model":
            action.required = False
    p.set_defaults(func=bench_command)

    from dinfill.bench.sweep import add_sweep_args, sweep_command

    q = subparsers.add_parser(
        "sweep",
        help="diffusion steps x alg x middle length -> quality (eval layer) and speed",
        description="Quality against throughput over steps, algorithms and middle-length modes.",
    )
    _add_common(q, axes=("steps", "alg", "length"))
    add_sweep_args(q)
    q.set_defaults(func=sweep_command)


# --------------------------------------------------------------------------------------------------


def resolve_device(args: argparse.Namespace) -> str:
    """The device a command will run on (``--device`` or CUDA when available)."""
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def apply_defaults(args: argparse.Namespace, device: str, names: tuple[str, ...]) -> dict[str, Any]:
    """Fill the device-dependent defaults of ``names`` left unset; returns the ones filled."""
    table = GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    filled = {}
    for name in names:
        if getattr(args, name, None) is None:
            setattr(args, name, table[name])
            filled[name] = table[name]
    return filled


def load_for_bench(args: argparse.Namespace, device: str):
    """Load the model and (when one can be had offline or is named) the tokenizer; returns ``(model, tok)``."""
    import dinfill

    model = dinfill.load_model(
        args.model, device=device, dtype=args.dtype, random_weights=args.random_weights, kind=args.kind
    )
    tok = None
    if args.tokenizer or not args.random_weights:
        # a new (untrained) mask token only for random weights: trained checkpoints bring theirs (Open-dCoder: <M>)
        add = bool(args.random_weights) and model.kind == "diffusion"
        tok = dinfill.load_tokenizer(args.tokenizer or args.model, add_mask_token=add)
    return model, tok


def mask_id_for(args: argparse.Namespace, model, tok) -> int | None:
    """``--mask-id``, else the tokenizer's mask id, else ``vocab_size - 1`` (random weights only).

    Trained weights of a known checkpoint accept only the mask id they were trained with.
    """
    from dinfill.models.loading import require_mask_token

    if model.kind != "diffusion":
        return None
    if args.mask_id is not None or (tok is not None and getattr(tok, "mask_token_id", None) is not None):
        return require_mask_token(tok, model, args.mask_id)
    if not getattr(model, "random_weights", True):
        return require_mask_token(tok, model)  # the error names the mask token the checkpoint needs
    return model.config.vocab_size - 1


def check_common(args: argparse.Namespace):
    """Validate the options shared by bench and sweep before anything is loaded.

    Returns
    -------
    (kind, settings)
        The model's kind (decided from small files only) and the validated sampler settings.
    """
    from dinfill.sampler.cli import prepare

    if args.problems is not None and args.problems < 1:
        raise ValueError(f"--problems must be >= 1, got {args.problems}")
    kind, _, settings = prepare(args)
    if getattr(args, "plot", None):
        from dinfill.bench.plots import require_matplotlib

        require_matplotlib()
    return kind, settings


def sampling_of(settings, kind: str, seed: int):
    """The :class:`dinfill.bench.throughput.Sampling` of validated settings."""
    from dinfill.bench.throughput import Sampling

    opts = settings.for_kind(kind)
    return Sampling(
        temperature=opts["temperature"], top_p=opts["top_p"], top_k=opts["top_k"], threshold=settings.threshold,
        factor=settings.factor, seed=seed,
    )  # fmt: skip


BENCH_TABLE = [
    ("label", "config"),
    ("ms_per_problem", "ms/prob"),
    ("tokens_per_s", "tok/s"),
    ("problems_per_s", "prob/s"),
    ("latency_p50_ms", "p50 ms"),
    ("latency_p90_ms", "p90 ms"),
    ("forward_passes", "fwd/batch"),
    ("split", "model/samp/other %"),
    ("peak_mem_mib", "peak MiB"),
    ("tflops", "TFLOP/s"),
    ("flops_pct", "%peak"),
    ("gbps", "GB/s"),
    ("bw_pct", "%peak bw"),
    ("ref_ms_per_problem", "ref ms/prob"),
    ("ref_tokens_per_s", "ref tok/s"),
    ("speedup", "x ref"),
    ("agreement", "agree"),
]


def table_row(record: dict[str, Any]) -> dict[str, Any]:
    """Flatten a bench record into the screen table's cells."""
    m, roof, ref = record["metrics"], record["roofline"], record.get("reference") or {}
    row = {"label": record["label"], **m}
    if "model_frac" in m:
        row["split"] = "/".join(f"{100 * m[k]:.0f}" for k in ("model_frac", "sampling_frac", "other_frac"))
    row["tflops"] = roof["flop_per_s"] / 1e12
    row["gbps"] = roof["bytes_per_s"] / 1e9
    fl = roof.get("flops_of_peak", roof.get("flops_of_measured"))
    bw = roof.get("bandwidth_of_peak", roof.get("bandwidth_of_measured"))
    row["flops_pct"] = None if fl is None else 100 * fl
    row["bw_pct"] = None if bw is None else 100 * bw
    if ref:
        row.update(ref_tokens_per_s=ref.get("tokens_per_s"), speedup=ref.get("speedup"), agreement=ref.get("agreement"))
        row["ref_ms_per_problem"] = ref.get("ms_per_problem")
    return row


def bench_command(args: argparse.Namespace) -> int:
    """Handler of ``dinfill bench``; returns the exit code."""
    from dinfill.sampler.settings import axis_values

    if args.static:
        from dinfill.bench import static

        return static.main(args)
    if not args.model:
        raise ValueError("dinfill bench needs --model (a hub id, a local checkpoint or a built-in shape), or --static")
    kind, settings = check_common(args)  # every option checked before torch or the model is loaded
    if args.nvtx:
        from dinfill.bench.profiling import nvtx_available

        if not nvtx_available():
            raise ValueError("--nvtx needs a CUDA build of torch or the nvtx package (pip install nvtx)")
    from dinfill.bench import report, roofline, throughput
    from dinfill.bench.workload import draw_workload

    device = resolve_device(args)
    filled = apply_defaults(args, device, ("batch", "problems", "warmup") + (("steps",) if kind == "diffusion" else ()))
    axes = axis_values(args, settings)
    configs = throughput.expand_configs(
        kind, batches=args.batch, steps=axes["steps"], algs=axes["alg"], caches=axes["cache"], lengths=axes["length"],
        middle_tokens=settings.middle_tokens, refresh=settings.refresh,
    )  # fmt: skip
    if filled:
        shown = ", ".join(f"{k}={v}" for k, v in filled.items())
        print(f"# defaults for {device}: {shown}", file=sys.stderr)

    model, tok = load_for_bench(args, device)
    mask_id = mask_id_for(args, model, tok)
    workload = draw_workload(args.problems, args.lengths, seed=args.seed, tokenizer=tok, data_dir=args.data_dir)
    env = report.environment(model.device)
    peaks = roofline.device_peaks(env["device"]) if model.device.type == "cuda" else None
    ceilings = None if args.no_ceilings else roofline.measure_ceilings(model.device)
    sampling = sampling_of(settings, kind, args.seed)
    summary = workload.summary()
    print(
        f"# {args.model} ({model.kind}, {str(model.dtype).replace('torch.', '')}, "
        f"{'random' if args.random_weights else 'real'} weights) on {env['device']}; {summary['problems']} problems, "
        f"lengths {summary['source']} (median prefix {summary['median_prefix']:.0f} / middle "
        f"{summary['median_middle']:.0f} / suffix {summary['median_suffix']:.0f} tokens)",
        file=sys.stderr,
    )
    hf = None
    records = []
    for cfg in configs:
        if args.vs == "reference" and kind == "ar" and hf is None:
            from dinfill.sampler.autoregressive import hf_twin

            hf = hf_twin(model)
        rec = throughput.run_config(
            model, workload, cfg, sampling, mask_id=mask_id, vs=args.vs, hf_model=hf, warmup=args.warmup,
            nvtx=args.nvtx, profile_dir=args.profile, peaks=peaks, ceilings=ceilings,
        )  # fmt: skip
        rec["env"] = env
        rec["model"].update(random_weights=bool(args.random_weights), kind=model.kind)
        rec["peaks"] = roofline.peaks_dict(peaks)
        rec["ceilings"] = ceilings
        records.append(rec)
        m = rec["metrics"]
        ref = rec["reference"] or {}
        vs = f", {ref['speedup']:.2f}x the {ref['baseline']}" if ref.get("speedup") else ""
        rate = f"{m['ms_per_problem']:.4g} ms/problem, {m['tokens_per_s']:.3g} tok/s"
        print(f"# {cfg.label()}: {rate}{vs}", file=sys.stderr)
    if not args.no_results:
        path = report.append_records(args.results or report.default_results_path(), records)
        print(f"# appended {len(records)} record(s) to {path}", file=sys.stderr)
    if getattr(args, "plot", None):
        from dinfill.bench.plots import plot_bench

        for p in plot_bench(records, args.plot):
            print(f"# wrote {p}", file=sys.stderr)
    if model.device.type == "cpu":
        print("# CPU numbers: a smoke run of the code path, not a measurement of the GPU targets", file=sys.stderr)
    print(report.text_table([table_row(r) for r in records], BENCH_TABLE))
    return 0
