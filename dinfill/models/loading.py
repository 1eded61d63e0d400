"""Loading models and tokenizers: hub ids, local checkpoint dirs, built-in shapes.

Weights come from ``*.safetensors`` (single file or a sharded ``model.safetensors.index.json``) in a
local directory or a hub snapshot (``huggingface_hub.snapshot_download``, which keeps its own cache
and verifies what it downloads). ``random_weights=True`` builds a model offline, e.g. the real
open-dcoder-0.5B shape for benchmarks.

Whether a checkpoint is a diffusion or an AR model cannot be read from its config (Open-dCoder calls
itself a plain ``qwen2``), so it comes from :data:`KNOWN_KINDS` (exact hub ids) or an explicit
``kind=`` override; the decision and its source are stored on the model and logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from dinfill.models.config import BUILTIN_SHAPES, ModelConfig, builtin_config
from dinfill.models.decoder import Decoder

log = logging.getLogger("dinfill")

KINDS = ("diffusion", "ar")
# Known checkpoints whose kind the config cannot tell (exact hub ids, compared case-insensitively).
KNOWN_KINDS: dict[str, str] = {
    "fredzzp/open-dcoder-0.5b": "diffusion",
    "qwen/qwen2.5-coder-0.5b": "ar",
    "qwen/qwen2.5-coder-1.5b": "ar",
    "qwen/qwen2.5-coder-1.5b-instruct": "ar",
    "deepseek-ai/deepseek-coder-1.3b-base": "ar",
    "bigcode/starcoder2-3b": "ar",
}
_HUB_CACHE_DIR = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:  # bf16 where it is fast, fp32 on the CPU (exactness tests, no bf16 matmul speed)
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _hub_id_of(name: str) -> str | None:
    """The hub id behind a name: itself, a built-in shape's source, or an HF cache snapshot path."""
    if name.lower() in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[name.lower()].get("hub_id")
    m = _HUB_CACHE_DIR.search(str(Path(name).resolve()).replace(os.sep, "/") + "/")
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if not Path(name).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return name
    return None


def resolve_kind(name: str, kind: str | None = None) -> tuple[str, str]:
    """Decide ``"diffusion"`` or ``"ar"`` for ``name``; returns ``(kind, source)``."""
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return kind, "override"
    if name.lower() in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[name.lower()]["kind"], "built-in shape"
    hub = _hub_id_of(name)
    if hub is not None and hub.lower() in KNOWN_KINDS:
        return KNOWN_KINDS[hub.lower()], f"registry ({hub})"
    return "ar", "default (not in the registry; pass kind='diffusion' for a diffusion checkpoint)"


def _local_dir(name: str) -> Path:
    """A local checkpoint directory for ``name`` (downloading a hub snapshot if needed)."""
    path = Path(name)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{name} is a file; pass the checkpoint directory (config.json + *.safetensors)")
    hub = _hub_id_of(name)
    if hub is None:
        raise FileNotFoundError(
            f"{name!r} is neither a local checkpoint directory, a hub id (owner/name) nor a built-in shape "
            f"({', '.join(BUILTIN_SHAPES)})"
        )
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
    try:
        return Path(snapshot_download(hub, allow_patterns=patterns))
    except Exception as err:  # offline, gated, missing: say what to do
        raise OSError(
            f"could not fetch {hub!r} from the Hugging Face hub ({type(err).__name__}: {err}). Download it on a "
            f"machine with access (huggingface-cli download {hub}) and pass the local directory, or use "
            "random_weights=True with a built-in shape for offline benchmarks"
        ) from err


def _weight_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index: {err}") from err
        files = [ckpt / s for s in shards]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{ckpt}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in ckpt.iterdir())[:10]) or "nothing"
        raise FileNotFoundError(
            f"no *.safetensors weights in {ckpt} (found: {found}); dinfill reads safetensors only: convert "
            "pytorch_model.bin with transformers' save_pretrained(safe_serialization=True)"
        )
    return files


def _load_state(model: Decoder, files: list[Path]) -> None:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is the head
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not match the config: "
            + (f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} " if missing else "")
            + (f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}" if unexpected else "")
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"weight {key} has shape {tuple(tensor.shape)} but config.json implies {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=False)


def load_model(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    random_weights: bool = False,
    kind: str | None = None,
    seed: int = 0,
) -> Decoder:
    """Load a decoder (contract: ``dinfill.load_model``).

    Parameters
    ----------
    name_or_path : str
        A local checkpoint dir (``config.json`` + ``*.safetensors``), a hub id, or a built-in shape
        (``open-dcoder-0.5b``, ``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``, ``deepseek-coder-1.3b``,
        ``starcoder2-3b``, and the test shapes ``tiny-qwen2``, ``tiny-dcoder``, ``tiny-llama``, ``tiny-starcoder2``).
    device : str or torch.device, optional
        Default: CUDA when available, else CPU.
    dtype : str or torch.dtype, optional
        Default: bf16 on CUDA, fp32 on the CPU.
    random_weights : bool
        Build the shape with random weights (offline; needs no weight files).
    kind : {"diffusion", "ar"}, optional
        Override the registry's decision.
    seed : int
        Seed of the random initialisation.

    Returns
    -------
    Decoder
        In eval mode, with ``kind``, ``kind_source`` and ``name`` set.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _resolve_dtype(dtype, device)
    the_kind, source = resolve_kind(name_or_path, kind)
    if name_or_path.lower() in BUILTIN_SHAPES:
        config = builtin_config(name_or_path)
        ckpt = None
        if not random_weights:
            ckpt = _local_dir(BUILTIN_SHAPES[name_or_path.lower()].get("hub_id") or name_or_path)
    else:
        ckpt = _local_dir(name_or_path)
        if not (ckpt / "config.json").exists():
            raise FileNotFoundError(f"no config.json in {ckpt}")
        config = ModelConfig.from_file(ckpt / "config.json")

    with torch.device("meta"):
        model = Decoder(config)
    model = model.to_empty(device=device)
    model.rotary = type(model.rotary)(config).to(device)  # buffers are not parameters: rebuild on device
    if config.tie_word_embeddings:  # to_empty() allocates each parameter anew, which unties them
        model.lm_head.weight = model.model.embed_tokens.weight
    if random_weights:
        _init_random(model, seed)
    else:
        _load_state(model, _weight_files(ckpt))
    model = model.to(dtype).eval().requires_grad_(False)
    model.kind, model.kind_source, model.name = the_kind, source, name_or_path
    log.info("loaded %s as a %s model (%s), %s on %s", name_or_path, the_kind, source, dtype, device)
    return model


def _init_random(model: Decoder, seed: int) -> None:
    """Normal(0, 0.02) weights, unit norms, zero biases (the HF initialisation)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data.zero_()
        elif "norm" in name:
            p.data.fill_(1.0)
        else:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def load_tokenizer(name_or_path: str, add_mask_token: bool = False, mask_token: str = "<|mask|>"):
    """Load a tokenizer with transformers' ``AutoTokenizer`` (contract: ``dinfill.load_tokenizer``).

    Parameters
    ----------
    name_or_path : str
        Local dir, hub id, or a built-in shape name (resolved to its hub id).
    add_mask_token : bool
        Add ``mask_token`` as the mask token when the tokenizer has none (random-weight diffusion models).
    mask_token : str
        The string of the added mask token.
    """
    from transformers import AutoTokenizer

    target = name_or_path
    if name_or_path.lower() in BUILTIN_SHAPES:
        target = BUILTIN_SHAPES[name_or_path.lower()].get("hub_id")
        if target is None:
            raise ValueError(f"built-in shape {name_or_path!r} has no tokenizer; pass a tokenizer directory")
    try:
        tok = AutoTokenizer.from_pretrained(target)
    except Exception as err:
        raise OSError(
            f"could not load a tokenizer from {target!r} ({type(err).__name__}: {err}); pass a local directory "
            "with tokenizer.json / tokenizer_config.json"
        ) from err
    if add_mask_token and tok.mask_token is None:
        tok.add_special_tokens({"mask_token": mask_token})
    return tok


def require_mask_token(tokenizer, model: Decoder | None = None) -> int:
    """The mask id of a diffusion model's tokenizer, or a clear error."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise ValueError(
            "this tokenizer has no mask token, which a diffusion model needs; load the model's own tokenizer, "
            "or for random-weight models use dinfill.load_tokenizer(..., add_mask_token=True)"
        )
    if model is not None and mask_id >= model.config.vocab_size:
        raise ValueError(f"mask token id {mask_id} is outside the model's vocabulary of {model.config.vocab_size}")
    return int(mask_id)
