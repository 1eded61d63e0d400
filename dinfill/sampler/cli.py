"""``dinfill infill``: fill one middle from the command line (diffusion or AR, by the model's kind)."""

from __future__ import annotations

import argparse
import sys


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options every command that loads a model shares."""
    p.add_argument("--model", required=True, help="hub id, local checkpoint dir, or built-in shape name")
    p.add_argument("--tokenizer", help="tokenizer dir or hub id (default: the model's)")
    p.add_argument("--kind", choices=("diffusion", "ar"), help="override the registry's diffusion/AR decision")
    p.add_argument("--random-weights", action="store_true", help="random weights (offline benchmarks only)")
    p.add_argument("--device", help="cuda, cpu, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """Sampler options for both kinds of model (each uses the ones that apply to it)."""
    g = p.add_argument_group("sampling (both kinds)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int, default=0)
    d = p.add_argument_group("diffusion")
    d.add_argument("--steps", type=int, default=64)
    d.add_argument(
        "--alg", default="p2", help="origin | maskgit_plus | topk_margin | entropy | p2 | threshold | factor"
    )
    d.add_argument("--alg-temp", type=float, default=0.0)
    d.add_argument("--length", default="oracle", help="middle length: oracle | fixed | adaptive")
    d.add_argument("--middle-tokens", type=int, default=32, help="middle length for --length fixed / max for adaptive")
    d.add_argument("--cache", choices=("none", "dual"), default="none")
    d.add_argument("--refresh", type=int, default=8, help="dual cache: recompute prefix/suffix every N steps")
    d.add_argument("--threshold", type=float, default=0.9)
    d.add_argument("--factor", type=float, default=1.0)
    a = p.add_argument_group("autoregressive")
    a.add_argument("--max-new-tokens", type=int, default=128)
    a.add_argument("--stop", action="append", default=[], help="stop string (repeatable), e.g. --stop $'\\n' in bash")


def sampler_options(args: argparse.Namespace, kind: str) -> dict:
    """The keyword options of ``dinfill.sampler.infill`` for a model of ``kind`` from parsed args."""
    # a seed rather than a generator: each sampler seeds a generator on the model's own device
    common = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if kind == "diffusion":
        return dict(
            common, steps=args.steps, alg=args.alg, alg_temp=args.alg_temp, length=args.length,
            middle_tokens=args.middle_tokens, cache=args.cache, refresh=args.refresh, threshold=args.threshold,
            factor=args.factor,
        )  # fmt: skip
    return dict(common, max_new_tokens=args.max_new_tokens, stop_strings=tuple(args.stop))


def load(args: argparse.Namespace, add_mask_token: bool = False):
    """Load the model and tokenizer named by ``add_model_args`` options."""
    import dinfill

    model = dinfill.load_model(
        args.model, device=args.device, dtype=args.dtype, random_weights=args.random_weights, kind=args.kind
    )
    tok = dinfill.load_tokenizer(args.tokenizer or args.model, add_mask_token=add_mask_token or args.random_weights)
    return model, tok


def _infill(args: argparse.Namespace) -> int:
    from dinfill.sampler import infill

    prefix = args.prefix if args.prefix is not None else sys.stdin.read()
    model, tok = load(args)
    opts = sampler_options(args, model.kind)
    if model.kind == "diffusion" and args.length == "oracle":
        if args.middle is None:
            raise ValueError("--length oracle needs --middle (the true middle, for its length); or use --length fixed")
        opts["middles"] = [args.middle]
    print(f"# {args.model}: {model.kind} model ({model.kind_source})", file=sys.stderr)
    print(infill(model, tok, [prefix], [args.suffix], **opts)[0])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``infill`` to the ``dinfill`` command."""
    p = sub.add_parser("infill", help="fill in the middle between a prefix and a suffix")
    add_model_args(p)
    p.add_argument("--prefix", help="code before the hole (default: read stdin)")
    p.add_argument("--suffix", default="", help="code after the hole")
    p.add_argument("--middle", help="the true middle (only for --length oracle)")
    add_sampler_args(p)
    p.set_defaults(func=_infill)
