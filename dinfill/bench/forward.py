"""One forward pass, dinfill's runtime vs transformers, on the same random checkpoint in one process.

Run ``python -m dinfill.bench.forward [--family qwen2] [--batch 4] [--length 256]``. It builds a small
random transformers model (so no weights are needed), saves it, loads it with ``dinfill.load_model``
and times both forwards (median of repeats, after warm-up), printing the ratio. It also checks that
both produce the same logits, so the number compares like with like.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def _time(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare_forward(
    family: str = "qwen2",
    batch: int = 4,
    length: int = 256,
    hidden: int = 256,
    layers: int = 4,
    repeats: int = 5,
    device: str = "cpu",
) -> dict:
    """Median forward seconds of transformers and dinfill on one random checkpoint; returns a dict with the ratio."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Starcoder2Config

    import dinfill

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "starcoder2": Starcoder2Config}[family]
    cfg = cls(
        vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), max_position_embeddings=4096,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg).eval().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp, safe_serialization=True)
        ours = dinfill.load_model(tmp, device=device, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        err = (ours(ids, causal=True) - ref(ids).logits).abs().max().item()
        t_ref = _time(lambda: ref(ids), repeats, sync)
        t_ours = _time(lambda: ours(ids, causal=True), repeats, sync)
    return {
        "family": family, "batch": batch, "length": length, "device": device, "max_abs_logit_diff": err,
        "transformers_s": t_ref, "dinfill_s": t_ours, "speedup": t_ref / t_ours,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: print one line per family."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", action="append", choices=("qwen2", "llama", "starcoder2"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for fam in args.family or ["qwen2", "llama", "starcoder2"]:
        r = compare_forward(fam, args.batch, args.length, device=args.device)
        print(
            f"{fam:11s} B={r['batch']} L={r['length']} {r['device']}: transformers {r['transformers_s'] * 1e3:.1f} ms, "
            f"dinfill {r['dinfill_s'] * 1e3:.1f} ms, ratio {r['speedup']:.2f}x "
            f"(max |logit diff| {r['max_abs_logit_diff']:.1e})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
