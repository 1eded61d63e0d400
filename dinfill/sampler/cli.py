"""``dinfill infill``: fill one middle from the command line (diffusion or AR, by the model's kind).

Also the options every model-loading subcommand shares (:func:`add_model_args`) and :func:`prepare`, which
decides the model's kind and validates the sampler options from small JSON files only, before torch is
imported or any weight is read: a typo costs a fraction of a second, not a model load.
"""

from __future__ import annotations

import argparse
import sys

from dinfill.sampler.settings import SamplerSettings, add_sampler_arguments, settings_from_args

# every spelling load_model accepts (dinfill.models.loading._DTYPES; a test keeps the two in step)
DTYPES = ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options every command that loads a model shares."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="hub id, local checkpoint dir, or built-in shape name")
    g.add_argument("--tokenizer", help="tokenizer dir or hub id (default: the model's)")
    g.add_argument(
        "--kind", choices=("diffusion", "ar"),
        help="diffusion or ar (default: detected from the checkpoint: known hub ids, config.json, its tokenizer)",
    )  # fmt: skip
    g.add_argument("--random-weights", action="store_true", help="random weights (offline benchmarks only)")
    g.add_argument("--device", help="cuda, cpu, cuda:1 ... (default: cuda when available)")
    g.add_argument(
        "--dtype", choices=DTYPES, metavar="DTYPE",
        help="bf16|bfloat16, fp16|float16, fp32|float32 (default: bf16 on CUDA, fp32 on the CPU)",
    )  # fmt: skip


def prepare(args: argparse.Namespace, **overrides) -> tuple[str, str, SamplerSettings]:
    """Decide the model's kind and validate the sampler options, without loading anything.

    Returns
    -------
    (kind, source, settings)
        ``settings``: the preset for that kind with the flags given (a flag of the other kind is an error).
    """
    from dinfill.models.kinds import detect_kind

    decision = detect_kind(args.model, args.kind)
    return decision.kind, decision.source, settings_from_args(args, decision.kind, overrides=overrides)


def load(args: argparse.Namespace):
    """Load the model and tokenizer named by :func:`add_model_args` options.

    A new mask token is added to the tokenizer only for random weights: a trained diffusion checkpoint must come
    with its own (``dinfill.load_tokenizer`` declares Open-dLLM's ``<M>`` when the vocabulary has it).
    """
    import dinfill

    model = dinfill.load_model(
        args.model, device=args.device, dtype=args.dtype, random_weights=args.random_weights, kind=args.kind
    )
    tok = dinfill.load_tokenizer(
        args.tokenizer or args.model, add_mask_token=bool(args.random_weights) and model.kind == "diffusion"
    )
    return model, tok


def _infill(args: argparse.Namespace) -> int:
    kind, source, settings = prepare(args)  # everything checked before the stdin read and the model load
    if kind == "diffusion" and settings.length == "oracle" and args.middle is None:
        raise ValueError(
            "--length oracle (the published setting, the default) needs --middle, the true middle, for its length; "
            "or pass --length adaptive (up to --middle-tokens tokens) or --length fixed"
        )
    prefix = args.prefix if args.prefix is not None else sys.stdin.read()
    model, tok = load(args)
    print(f"# {args.model}: {'an AR' if model.kind == 'ar' else 'a diffusion'} model ({model.kind_source})",
          file=sys.stderr)  # fmt: skip
    from dinfill.sampler import infill

    middles = [args.middle] if args.middle is not None else None
    print(infill(model, tok, [prefix], [args.suffix], middles=middles, settings=settings, seed=args.seed)[0])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``infill`` to the ``dinfill`` command."""
    p = sub.add_parser(
        "infill",
        help="fill in the middle between a prefix and a suffix",
        description="Fill the middle between --prefix (or stdin) and --suffix with a diffusion or an AR model. "
        "Sampler defaults: the published setting of the model's kind (--preset).",
    )
    add_model_args(p)
    io = p.add_argument_group("text")
    io.add_argument("--prefix", help="code before the hole (default: read stdin)")
    io.add_argument("--suffix", default="", help="code after the hole (default: empty)")
    io.add_argument("--middle", help="the true middle (diffusion --length oracle only)")
    io.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_sampler_arguments(p)
    p.set_defaults(func=_infill)
