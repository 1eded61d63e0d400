"""Real checkpoints as a user has them: the right model kind, the right mask token, clear refusals.

Tiny random checkpoints are saved to temporary folders the way a user's copy of Open-dCoder looks (config.json
says ``model_type: qwen2``, ``_name_or_path: fredzzp/open-dcoder-0.5B``; its tokenizer is Qwen2.5-Coder's with
Open-dLLM's ``<M>`` added at 151665), or an HF cache snapshot, or a copy that says nothing about its kind.
The real Qwen2.5-Coder tokenizer comes from ../shared (these tests skip with the reason when it is absent).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import dinfill
from dinfill.models import detect_kind
from dinfill.models.loading import require_mask_token
from dinfill.sampler import infill
from dinfill.sampler.autoregressive import ar_generate
from dinfill.sampler.diffusion import diffusion_generate

OPEN_DCODER = "fredzzp/open-dcoder-0.5B"
QWEN_VOCAB = 151936  # Qwen2.5-Coder's embedding rows (the tokenizer uses 151665 + Open-dLLM's <M>)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen_dir(shared_dir) -> Path:
    return shared_dir / "tokenizers" / "qwen2.5-coder"


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 checkpoint with Qwen's vocabulary size (config.json + model.safetensors)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=QWEN_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=151643,
        eos_token_id=151643,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("weights")
    Qwen2ForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory, qwen_dir) -> dict[str, Path]:
    """Three copies of the Qwen2.5-Coder tokenizer, as checkpoints ship them.

    ``declared``: mask_token <M> (what Open-dLLM saves); ``undeclared``: <M> in the vocabulary but not declared
    as the mask token; ``plain``: Qwen2.5-Coder's own, no <M>.
    """
    from transformers import AutoTokenizer

    out = {}
    for variant in ("declared", "undeclared", "plain"):
        tok = AutoTokenizer.from_pretrained(str(qwen_dir))
        if variant == "declared":
            tok.add_special_tokens({"mask_token": "<M>"})
        elif variant == "undeclared":
            tok.add_tokens(["<M>"], special_tokens=True)
        out[variant] = tmp_path_factory.mktemp(f"tok-{variant}")
        tok.save_pretrained(str(out[variant]))
    return out


def _checkpoint(base: Path, weights: Path, tokenizer: Path, *, name_or_path=None) -> Path:
    """A checkpoint folder: the tiny weights, config.json with ``_name_or_path``, and a tokenizer copy."""
    base.mkdir(parents=True)
    for folder in (weights, tokenizer):
        for f in folder.iterdir():
            shutil.copy(f, base / f.name)
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("_name_or_path", None)
    if name_or_path is not None:
        cfg["_name_or_path"] = name_or_path
    (base / "config.json").write_text(json.dumps(cfg))
    return base


def test_local_open_dcoder_copy_is_a_diffusion_model(tmp_path, weights_dir, tokenizer_dirs, caplog):
    ckpt = _checkpoint(tmp_path / "open-dcoder", weights_dir, tokenizer_dirs["declared"], name_or_path=OPEN_DCODER)
    with caplog.at_level(logging.INFO, logger="dinfill"):
        model = dinfill.load_model(str(ckpt), device="cpu")
    assert model.kind == "diffusion" and model.checkpoint == OPEN_DCODER
    assert OPEN_DCODER in model.kind_source
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # certain: INFO, not a warning
    assert any("as a diffusion model" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="needs an AR model.*diffusion model.*kind='ar'"):
        ar_generate(model, [[1, 2, 3]], max_new_tokens=2)
    ar_model = dinfill.load_model(str(ckpt), device="cpu", kind="ar")
    with pytest.raises(ValueError, match="needs a diffusion model"):
        diffusion_generate(ar_model, torch.tensor([[1, 151665]]), mask_id=151665)


def test_hf_cache_snapshot_is_recognised(tmp_path, weights_dir, tokenizer_dirs):
    snap = tmp_path / "hub" / "models--fredzzp--open-dcoder-0.5B" / "snapshots" / "0123abc"
    _checkpoint(snap, weights_dir, tokenizer_dirs["plain"])  # nothing else says what it is
    decision = detect_kind(str(snap))
    assert (decision.kind, decision.certain, decision.checkpoint) == ("diffusion", True, OPEN_DCODER)


def test_tokenizer_mask_token_is_evidence_and_a_guess_is_a_warning(tmp_path, weights_dir, tokenizer_dirs, caplog):
    masked = _checkpoint(tmp_path / "masked", weights_dir, tokenizer_dirs["undeclared"])
    with caplog.at_level(logging.WARNING, logger="dinfill"):
        model = dinfill.load_model(str(masked), device="cpu")
    assert model.kind == "diffusion" and model.checkpoint is None
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "'<M>'" in warning and "--kind ar" in warning
    caplog.clear()
    plain = _checkpoint(tmp_path / "plain", weights_dir, tokenizer_dirs["plain"])
    with caplog.at_level(logging.WARNING, logger="dinfill"):
        model = dinfill.load_model(str(plain), device="cpu")
    assert model.kind == "ar"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "loaded as an AR model" in warning and "kind='diffusion'" in warning and "--kind diffusion" in warning
    assert dinfill.load_model(str(plain), device="cpu", kind="diffusion").kind_source == "override"


def test_mask_token_of_a_trained_checkpoint(tmp_path, weights_dir, tokenizer_dirs, qwen_dir):
    ckpt = _checkpoint(tmp_path / "od", weights_dir, tokenizer_dirs["undeclared"], name_or_path=OPEN_DCODER)
    model = dinfill.load_model(str(ckpt), device="cpu")
    # <M> is in the copy's vocabulary but not declared: it is declared, nothing is added
    tok = dinfill.load_tokenizer(str(ckpt), add_mask_token=True)
    assert (tok.mask_token, tok.mask_token_id, len(tok)) == ("<M>", 151665, 151666)
    assert require_mask_token(tok, model) == 151665
    out = infill(model, tok, "def f(x):\n    return ", "\n", length="fixed", middle_tokens=3, steps=2, seed=0)
    assert len(out) == 1 and isinstance(out[0], str)
    # a tokenizer that would add a new, untrained mask token elsewhere (the bug: <|mask|> at 151666) is refused
    other = dinfill.load_tokenizer(str(qwen_dir))
    other.add_tokens(["<extra>"], special_tokens=True)  # 151665 is taken, so an added mask lands at 151666
    other.add_special_tokens({"mask_token": "<|mask|>"})
    assert other.mask_token_id == 151666
    with pytest.raises(ValueError, match=r"mask id 151666 is not.*trained with \('<M>', id 151665\).*untrained"):
        infill(model, other, ["x = "], ["\n"], length="fixed", middle_tokens=2, steps=1)
    with pytest.raises(ValueError, match="trained with"):
        infill(model, tok, ["x = "], ["\n"], length="fixed", middle_tokens=2, steps=1, mask_id=151666)
    # no mask token at all: the message names the one the checkpoint needs
    plain = dinfill.load_tokenizer(str(qwen_dir))
    assert plain.mask_token is None
    with pytest.raises(ValueError, match=r"no mask token.*'<M>' \(id 151665\)"):
        infill(model, plain, ["x = "], ["\n"], length="fixed", middle_tokens=2, steps=1)


def test_declared_mask_token_and_random_weights(tmp_path, weights_dir, tokenizer_dirs, qwen_dir):
    ckpt = _checkpoint(tmp_path / "declared", weights_dir, tokenizer_dirs["declared"], name_or_path=OPEN_DCODER)
    assert dinfill.load_tokenizer(str(ckpt)).mask_token_id == 151665
    # random weights: adding a token is allowed, explicitly, and no trained id is enforced
    random = dinfill.load_model("tiny-dcoder", random_weights=True, device="cpu")
    assert random.checkpoint is None and random.random_weights
    tok = dinfill.load_tokenizer(str(qwen_dir), add_mask_token=True)
    assert tok.mask_token == "<M>" and require_mask_token(tok, random) == 151665
    assert dinfill.load_tokenizer(str(qwen_dir)).mask_token is None  # never added without being asked


def test_builtin_test_shape_needs_random_weights():
    with pytest.raises(ValueError, match=r"'tiny-dcoder' is a built-in test shape.*random_weights=True"):
        dinfill.load_model("tiny-dcoder")


def test_out_of_vocabulary_ids_name_the_vocabulary():
    model = dinfill.load_model("tiny-llama", random_weights=True, device="cpu")
    with pytest.raises(ValueError, match=r"token id 1000000, outside the model's vocabulary of 1031"):
        model(torch.tensor([[10**6]]), causal=False)
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[3, -1]]), causal=True)


def test_dtype_spellings_match_the_cli():
    from dinfill.models.loading import _DTYPES
    from dinfill.sampler.cli import DTYPES

    assert set(DTYPES) == set(_DTYPES)
