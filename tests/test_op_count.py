"""Device ops per decoder layer: at most 10 on the fused (Triton) path in every forward mode (issue 10).

A device op is an aten op that launches a kernel (views, allocations and other metadata ops do not) or a
Triton launch. Both are counted on the CPU by :class:`dinfill.bench.forward.DeviceOpCounter`: aten ops with
a ``TorchDispatchMode``, Triton launches by wrapping the launcher (``InterpretedFunction.run`` in the
interpreter, ``JITFunction.run`` when compiled; aten ops the interpreter itself runs while emulating a
launch are not counted). The count per layer is the
difference between a 2-layer and a 1-layer model of the same shape, so nothing has to be attributed to a
layer by hand; what is left is the per-forward constant (embedding, attention plan, final norm, lm_head).
The model's CPU-only input validation (free on the CPU, skipped on CUDA because it would sync) is counted
apart. The torch path is counted too, for comparison. ``pytest -s`` prints the table (README "Runtime").

Modes: ``prefill`` (causal, writes a static cache), ``decode`` (one token against the cache; also with
split-K attention forced, the worst case: its merge is the tenth op; and with the experimental
``DINFILL_GEMV=triton``: 6), ``window`` (a diffusion call: bidirectional, the middle of a cached canvas) and
``full`` (bidirectional, no cache, logits at a few rows).
Starcoder2's sliding window is shorter than the cache, so its windowed attention is counted too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import hf_config

from dinfill.bench.forward import DeviceOpCounter
from dinfill.models import ModelConfig
from dinfill.models.decoder import Decoder

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BUDGET = 10  # device ops per layer on the fused path (issue 10)
FAMILIES = {
    "qwen2": dict(),
    "llama": dict(attention_bias=True),  # linear RoPE scaling, o_proj bias
    "starcoder2": dict(sliding_window=6),  # LayerNorm, GELU; a window shorter than the cache
}


def _model(family: str, layers: int) -> Decoder:
    over = dict(FAMILIES[family], num_hidden_layers=layers, hidden_size=64)  # head dim 16
    cfg = ModelConfig.from_hf_dict(hf_config(family, **over).to_dict())
    torch.manual_seed(0)
    return Decoder(cfg).to(DEV).eval().requires_grad_(False)


def _run_mode(model: Decoder, mode: str):
    """Set-up calls for ``mode`` (not counted) and a thunk running the one forward that is counted."""
    B, L, V = 2, 48, model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, L), generator=g).to(DEV)
    cols = {n: torch.arange(*n, device=DEV) for n in ((0, 12), (12, 13), (0, L), (5, 9))}  # cache columns
    if mode == "full":
        idx = torch.tensor([[2, 9, 11], [0, 5, 15]], device=DEV)
        return lambda: model(ids[:, :16], causal=False, logits_index=idx)
    cache = model.new_cache(B, L)
    mask = torch.ones(B, L, dtype=torch.bool, device=DEV)
    if mode == "prefill":
        mask[:, 12:] = False
        return lambda: model(ids[:, :12], causal=True, attention_mask=mask, cache=cache, cache_pos=cols[0, 12])
    if mode.startswith("decode"):
        mask[:, 13:] = False
        model(ids[:, :12], causal=True, attention_mask=mask, cache=cache, cache_pos=cols[0, 12])
        last = torch.zeros(B, 1, dtype=torch.long, device=DEV)
        return lambda: model(ids[:, 12:13], causal=True, attention_mask=mask, cache=cache, cache_pos=cols[12, 13],
                             logits_index=last)  # fmt: skip
    assert mode == "window"
    model(ids, causal=False, attention_mask=mask, cache=cache, cache_pos=cols[0, L])
    idx = torch.arange(4, device=DEV).expand(B, 4)
    return lambda: model(ids[:, 5:9], causal=False, attention_mask=mask, cache=cache, cache_pos=cols[5, 9],
                         logits_index=idx)  # fmt: skip


def count(family: str, mode: str, backend: str, layers: int, monkeypatch) -> DeviceOpCounter:
    model = _model(family, layers)
    with monkeypatch.context() as m:
        import dinfill.kernels.attention_fwd as attn

        # force split-K attention in decode-split (a GPU target splits from 256 keys, the interpreter never);
        # elsewhere one 64-key block per program, which the interpreter runs several times faster (counts do not
        # depend on it)
        cfg = attn.AttentionConfig(16, 16, num_splits=4) if mode == "decode-split" else attn.AttentionConfig(64, 64)
        if DEV.type == "cpu" or mode == "decode-split":
            m.setattr(attn, "pick_config", lambda q, k: cfg)
        m.setenv("DINFILL_BACKEND", "torch")  # set-up calls only fill the cache: the fast path will do
        fwd = _run_mode(model, mode)
        m.setenv("DINFILL_BACKEND", backend)
        if mode == "decode-gemv":  # the experimental DINFILL_GEMV=triton path (off by default)
            m.setenv("DINFILL_GEMV", "triton")
        with torch.no_grad(), DeviceOpCounter() as counter:
            fwd()
    return counter


MODES = ["prefill", "decode", "decode-split", "decode-gemv", "window", "full"]
RESULTS: dict[tuple[str, str, str], tuple[int, int, DeviceOpCounter]] = {}


def _per_layer(family, mode, backend, monkeypatch) -> tuple[int, int, DeviceOpCounter]:
    key = (family, mode, backend)
    if key not in RESULTS:
        one, two = (count(family, mode, backend, n, monkeypatch) for n in (1, 2))
        per_layer = two.total - one.total
        RESULTS[key] = (per_layer, one.total - per_layer, two)
    return RESULTS[key]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_path_ops_per_layer(family, mode, monkeypatch):
    """<= 10 device ops per layer on the fused path, and no host sync anywhere in the forward."""
    per_layer, constant, c = _per_layer(family, mode, "triton", monkeypatch)
    print(f"\n[fused {family} {mode}] {per_layer} ops/layer + {constant} per forward; triton {dict(c.triton)}; "
          f"aten {dict(c.aten)}; CPU-only validation {sum(c.validation.values())}")  # fmt: skip
    assert 0 < per_layer <= BUDGET, f"{per_layer} device ops per layer (budget {BUDGET})"
    assert not c.syncs, f"host syncs in the fused forward: {dict(c.syncs)}"
    if mode == "decode-gemv":  # norms, activation and residual adds folded into the GEMVs; + the embedding
        assert per_layer == 6 and constant <= 7, f"{per_layer} ops per layer, {constant} per forward"
    assert constant <= 7, f"{constant} ops per forward outside the layers (key range 4, final norm, lm_head)"
    if mode != "decode-gemv":
        assert constant <= 6
    if mode == "window":  # the middle's RoPE / cache write and attention ran as kernels, not torch ops
        assert c.triton["_rope_cache_kernel"] == 2 and c.triton["_attention_kernel"] == 2
    if mode == "decode-split":
        plain = _per_layer(family, "decode", "triton", monkeypatch)[0]
        assert per_layer == plain + 1, "forced split-K should add exactly its merge launch per layer"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torch_path_counted_for_comparison(family, monkeypatch):
    """The torch path, for the README's comparison (no budget: it is the exact reference path)."""
    for mode in ("prefill", "decode", "window", "full"):
        per_layer, constant, c = _per_layer(family, mode, "torch", monkeypatch)
        print(f"\n[torch {family} {mode}] {per_layer} ops/layer + {constant} per forward")
        fused = _per_layer(family, mode, "triton", monkeypatch)[0]
        assert per_layer > fused, "the fused path should launch fewer ops than the torch path"


def test_print_table(monkeypatch, capsys):
    """One table of every count (run with -s to see it), and the README's quote of it still true."""
    lines = ["| family | mode | fused ops/layer | fused per forward | torch ops/layer | torch per forward |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for family in FAMILIES:
        for mode in MODES:
            fl, fc, _ = _per_layer(family, mode, "triton", monkeypatch)
            tl_, tc, _ = (
                (None, None, None) if mode.startswith("decode-") else _per_layer(family, mode, "torch", monkeypatch)
            )
            lines.append(f"| {family} | {mode} | {fl} | {fc} | {tl_ if tl_ is not None else '-'} | "
                         f"{tc if tc is not None else '-'} |")  # fmt: skip
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    # README "Runtime" gives per mode: fused ops per layer | + per forward | torch ops per layer of each family
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    for mode in ("prefill", "decode", "window", "full"):
        fused = {_per_layer(family, mode, "triton", monkeypatch)[:2] for family in FAMILIES}
        assert len(fused) == 1, f"{mode}: the fused counts differ between families {fused}; the README has one"
        torch_layers = " / ".join(str(_per_layer(family, mode, "torch", monkeypatch)[0]) for family in FAMILIES)
        cells = "| {} | {} | {} |".format(*fused.pop(), torch_layers)
        assert cells in readme, f"README's device-op table has no row ending {cells!r} ({mode}): update it"
