"""Loading models and tokenizers: hub ids, local checkpoint dirs, built-in shapes.

Weights come from ``*.safetensors`` (single file or a sharded ``model.safetensors.index.json``) in a
local directory or a hub snapshot (``huggingface_hub.snapshot_download``, which keeps its own cache
and verifies what it downloads). ``random_weights=True`` builds a model offline, e.g. the real
open-dcoder-0.5B shape for benchmarks.

Whether a checkpoint is a diffusion or an AR model cannot be read from its config (Open-dCoder calls
itself a plain ``qwen2``): :mod:`dinfill.models.kinds` decides from what the checkpoint carries (known hub
ids, the HF cache path, ``_name_or_path`` in config.json, a mask token in its tokenizer) or an explicit
``kind=``. The decision and its source are stored on the model; a guess is logged as a warning that says how
to override it.

Mask tokens: a tokenizer that has Open-dLLM's ``<M>`` without declaring it gets it declared; a new token
is added only on request (``add_mask_token=True``, for random-weight models). A trained checkpoint with a
known mask id (Open-dCoder: ``<M>`` = 151665) refuses any other id in :func:`require_mask_token`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from dinfill.models.config import BUILTIN_SHAPES, ModelConfig, builtin_config
from dinfill.models.decoder import Decoder
from dinfill.models.kinds import (  # noqa: F401  (re-exported: the first version defined them here)
    KINDS,
    KNOWN_CHECKPOINTS,
    KNOWN_KINDS,
    OPEN_DLLM_MASK_TOKEN,
    _hub_id_of,
    detect_kind,
    known_mask,
    resolve_kind,
)

log = logging.getLogger("dinfill")

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
            f"machine with access (huggingface-cli download {hub}) and pass the local directory (its kind is "
            "recognised from its config.json and tokenizer; kind= overrides), or use random_weights=True with a "
            "built-in shape for offline benchmarks"
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
        Override the detected kind (see :mod:`dinfill.models.kinds`: known hub ids, the HF cache path,
        ``_name_or_path`` in config.json, a mask token in the tokenizer; otherwise AR, with a warning).
    seed : int
        Seed of the random initialisation.

    Returns
    -------
    Decoder
        In eval mode, with ``kind``, ``kind_source`` (why), ``name``, ``checkpoint`` (the known hub id of trained
        weights, else None) and ``random_weights`` set.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _resolve_dtype(dtype, device)
    decision = detect_kind(name_or_path, kind)
    if name_or_path.lower() in BUILTIN_SHAPES:
        config = builtin_config(name_or_path)
        ckpt = None
        if not random_weights:
            hub = _hub_id_of(name_or_path)  # the shape's published checkpoint
            if hub is None:
                raise ValueError(
                    f"{name_or_path!r} is a built-in test shape with no published weights: pass random_weights=True "
                    "(--random-weights on the command line)"
                )
            ckpt = _local_dir(hub)
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
    model.kind, model.kind_source, model.name = decision.kind, decision.source, name_or_path
    # trained weights of a known checkpoint: what require_mask_token checks the tokenizer against
    model.checkpoint = None if random_weights else decision.checkpoint
    model.random_weights = bool(random_weights)
    what = "an AR" if decision.kind == "ar" else "a diffusion"
    if decision.certain:
        log.info("loaded %s as %s model (%s), %s on %s", name_or_path, what, decision.source, dtype, device)
    else:  # a guess: say it where users look, with the way to override it
        log.warning("%s: loaded as %s model (%s)", name_or_path, what, decision.source)
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


def _has_token(tok, token: str) -> bool:
    tid = tok.convert_tokens_to_ids(token)
    return tid is not None and not (tid == tok.unk_token_id and token != tok.unk_token)


def load_tokenizer(name_or_path: str, add_mask_token: bool = False, mask_token: str = OPEN_DLLM_MASK_TOKEN):
    """Load a tokenizer with transformers' ``AutoTokenizer`` (contract: ``dinfill.load_tokenizer``).

    The mask token: a declared one is kept; a tokenizer that has Open-dLLM's ``<M>`` (or ``mask_token``) in its
    vocabulary without declaring it gets it declared (no new id); a *new* token is added only with
    ``add_mask_token=True``. Its embedding is untrained, so that is for random-weight models only: a trained
    diffusion checkpoint must come with the tokenizer it was trained with (Open-dCoder's ``<M>`` is id 151665;
    :func:`require_mask_token` refuses any other).

    Parameters
    ----------
    name_or_path : str
        Local dir, hub id, or a built-in shape name (resolved to its hub id).
    add_mask_token : bool
        Add ``mask_token`` when the tokenizer has no mask token (random-weight diffusion models).
    mask_token : str
        The mask token looked for, and added by ``add_mask_token`` (default ``<M>``, as Open-dLLM does: for a
        Qwen2.5-Coder tokenizer it lands at 151665, Open-dCoder's id).
    """
    from transformers import AutoTokenizer

    target = name_or_path
    if name_or_path.lower() in BUILTIN_SHAPES:
        target = _hub_id_of(name_or_path)  # the shape's published checkpoint
        if target is None:
            raise ValueError(
                f"built-in shape {name_or_path!r} has no tokenizer; pass a tokenizer directory (for the Qwen2-shaped "
                "test shapes any Qwen2.5-Coder tokenizer works)"
            )
    try:
        tok = AutoTokenizer.from_pretrained(target)
    except Exception as err:
        raise OSError(
            f"could not load a tokenizer from {target!r} ({type(err).__name__}: {err}); pass a local directory "
            "with tokenizer.json / tokenizer_config.json"
        ) from err
    if tok.mask_token is None and _has_token(tok, mask_token):
        tok.add_special_tokens({"mask_token": mask_token})  # already in the vocabulary: declares it, adds no id
        log.info("%s: using %s (id %d) as the mask token", name_or_path, mask_token, tok.mask_token_id)
    elif tok.mask_token is None and add_mask_token:
        tok.add_special_tokens({"mask_token": mask_token})
        log.info("%s: added a new mask token %s at id %d (untrained)", name_or_path, mask_token, tok.mask_token_id)
    return tok


def require_mask_token(tokenizer, model: Decoder | None = None, mask_id: int | None = None) -> int:
    """The mask id to run a diffusion model with, or a clear error.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Supplies ``mask_token_id`` unless ``mask_id`` is given.
    model : Decoder, optional
        Checks the id against its vocabulary and, for the trained weights of a known checkpoint
        (``model.checkpoint``), against the id it was trained with.
    mask_id : int, optional
        An explicit id (checked the same way).
    """
    known = known_mask(getattr(model, "checkpoint", None)) if model is not None else None
    if mask_id is None:
        mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        if known is not None:
            raise ValueError(
                f"this tokenizer has no mask token; {model.checkpoint} was trained with {known[0]!r} (id {known[1]}): "
                "load the checkpoint's own tokenizer (dinfill.load_tokenizer(<checkpoint>))"
            )
        raise ValueError(
            "this tokenizer has no mask token, which a diffusion model needs; load the model's own tokenizer, "
            "or for random-weight models use dinfill.load_tokenizer(..., add_mask_token=True)"
        )
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise TypeError(f"mask_id must be an int token id, got {mask_id!r}")
    if model is not None and not 0 <= mask_id < model.config.vocab_size:
        raise ValueError(
            f"mask token id {mask_id} is outside the model's vocabulary of {model.config.vocab_size}; "
            "is the tokenizer the model's own?"
        )
    if known is not None and mask_id != known[1]:
        raise ValueError(
            f"mask id {mask_id} is not the one {model.checkpoint} was trained with ({known[0]!r}, id {known[1]}): an "
            "untrained mask embedding makes every infill garbage; load the checkpoint's own tokenizer (or one "
            f"where {known[0]!r} is id {known[1]}) and do not add a mask token"
        )
    return int(mask_id)
