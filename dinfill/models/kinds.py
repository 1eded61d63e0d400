"""Which checkpoints are diffusion models, which are AR, and which mask token a diffusion checkpoint was trained with.

Why this needs a module: a checkpoint's ``config.json`` cannot say. Open-dCoder calls itself a plain ``qwen2``
(its weights have Qwen2.5-Coder's shape), so a local copy of it looks exactly like an AR model. Running it as
one gives plausible-looking garbage, so the decision is made from every piece of evidence a checkpoint
carries, strongest first:

1. an explicit ``kind=`` (``--kind``);
2. a built-in shape name (``open-dcoder-0.5b``, ``tiny-dcoder``...);
3. a known hub id, given directly or recognised in a Hugging Face cache path
   (``.../models--fredzzp--open-dcoder-0.5B/snapshots/<rev>``);
4. for a local directory: the hub id its ``config.json`` records in ``_name_or_path``;
5. for a local directory: its tokenizer declares a mask token (or has Open-dLLM's ``<M>``): AR FIM
   tokenizers have none, a masked-diffusion model cannot work without one (a guess, logged as a warning);
6. otherwise ``"ar"`` (a guess, logged as a warning that says how to override it).

The first four are *certain* (logged at INFO); the last two are guesses and are logged at WARNING level, so a
user sees them without ``-v``. Everything here reads small JSON files only (no torch), so the command line can
decide the kind, and reject options that do not apply to it, before it loads any weights.

Mask tokens: Open-dLLM adds ``<M>`` with ``tokenizer.add_special_tokens({"mask_token": "<M>"})`` to the
Qwen2.5-Coder tokenizer before training, which puts it at id 151665 (the first id after Qwen's 22 added
tokens). :data:`KNOWN_CHECKPOINTS` records that, so that a trained Open-dCoder is never driven with another,
untrained mask id.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from dinfill.models.config import BUILTIN_SHAPES

__all__ = [
    "KINDS",
    "KNOWN_CHECKPOINTS",
    "KNOWN_KINDS",
    "OPEN_DLLM_MASK_TOKEN",
    "KindDecision",
    "checkpoint_id",
    "detect_kind",
    "known_mask",
    "resolve_kind",
]

KINDS = ("diffusion", "ar")
OPEN_DLLM_MASK_TOKEN = "<M>"  # Open-dLLM's training code: add_special_tokens({"mask_token": "<M>"})

# Known checkpoints (hub ids compared case-insensitively). mask_id: the id the released weights were trained
# with (Open-dCoder: <M> appended to the 151665-token Qwen2.5-Coder tokenizer).
KNOWN_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "fredzzp/open-dcoder-0.5b": {"kind": "diffusion", "mask_token": OPEN_DLLM_MASK_TOKEN, "mask_id": 151665},
    "qwen/qwen2.5-coder-0.5b": {"kind": "ar"},
    "qwen/qwen2.5-coder-1.5b": {"kind": "ar"},
    "qwen/qwen2.5-coder-1.5b-instruct": {"kind": "ar"},
    "deepseek-ai/deepseek-coder-1.3b-base": {"kind": "ar"},
    "bigcode/starcoder2-3b": {"kind": "ar"},
}
# kept for callers of the first version: hub id -> kind
KNOWN_KINDS: dict[str, str] = {hub: entry["kind"] for hub, entry in KNOWN_CHECKPOINTS.items()}

_HUB_CACHE_DIR = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class KindDecision:
    """The kind of a checkpoint and why.

    Attributes
    ----------
    kind : str
        ``"diffusion"`` or ``"ar"``.
    source : str
        Why, in words (stored on the model as ``kind_source`` and printed by the CLI).
    certain : bool
        False for the two guesses (tokenizer evidence, the AR default): those are logged as warnings.
    checkpoint : str or None
        The known hub id the name was recognised as, if any.
    """

    kind: str
    source: str
    certain: bool
    checkpoint: str | None = None


def _known(hub: str | None) -> dict[str, Any] | None:
    """The :data:`KNOWN_CHECKPOINTS` entry of a hub id (compared case-insensitively), or None."""
    return KNOWN_CHECKPOINTS.get(hub.lower()) if hub else None


def _hub_id_of(name: str) -> str | None:
    """The hub id behind a name: a built-in shape's source, an HF cache snapshot path, or the name itself."""
    if name.lower() in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[name.lower()].get("hub_id")
    m = _HUB_CACHE_DIR.search(str(Path(name).resolve()).replace(os.sep, "/") + "/")
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if not Path(name).exists() and _HUB_ID.fullmatch(name):
        return name
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


@lru_cache(maxsize=32)
def _tokenizer_mask_token(directory: str, _mtime: float) -> str | None:
    """The mask token a tokenizer directory declares, or ``<M>`` when it has that token without declaring it."""
    folder = Path(directory)
    config = _read_json(folder / "tokenizer_config.json")
    declared = _token_text(config.get("mask_token"))
    if declared:
        return declared
    added = [_token_text(t) for t in (config.get("added_tokens_decoder") or {}).values()]
    if OPEN_DLLM_MASK_TOKEN in added:
        return OPEN_DLLM_MASK_TOKEN
    if (folder / "tokenizer.json").is_file():  # transformers 5 keeps added tokens only here (~0.2 s to parse)
        tokens = _read_json(folder / "tokenizer.json").get("added_tokens") or []
        if any(isinstance(t, dict) and t.get("content") == OPEN_DLLM_MASK_TOKEN for t in tokens):
            return OPEN_DLLM_MASK_TOKEN
    return None


def _local_evidence(folder: Path) -> tuple[str | None, str | None]:
    """``(hub id from config.json's _name_or_path, mask token of the tokenizer beside it)``."""
    hub = None
    recorded = _read_json(folder / "config.json").get("_name_or_path")
    if isinstance(recorded, str):
        m = _HUB_CACHE_DIR.search(recorded.replace(os.sep, "/") + "/")
        candidate = f"{m.group(1)}/{m.group(2)}" if m else recorded.strip()
        if _known(candidate):
            hub = candidate
    stamp = max((p.stat().st_mtime for p in folder.glob("tokenizer*.json")), default=0.0)
    return hub, _tokenizer_mask_token(str(folder.resolve()), stamp)


def detect_kind(name_or_path: str, kind: str | None = None) -> KindDecision:
    """Decide whether ``name_or_path`` is a diffusion or an AR model (see the module docstring for the order).

    Parameters
    ----------
    name_or_path : str
        A built-in shape, a hub id, an HF cache snapshot path or a local checkpoint directory.
    kind : {"diffusion", "ar"}, optional
        An explicit decision (wins over everything).

    Returns
    -------
    KindDecision
    """
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return KindDecision(kind, "override", True, checkpoint_id(name_or_path))
    key = str(name_or_path).lower()
    hub = _hub_id_of(name_or_path)  # a built-in shape's source, a cache path's or the name itself
    if key in BUILTIN_SHAPES:
        return KindDecision(BUILTIN_SHAPES[key]["kind"], "built-in shape", True, hub)
    if _known(hub):
        return KindDecision(_known(hub)["kind"], f"registry ({hub})", True, hub)
    folder = Path(name_or_path)
    if folder.is_dir():
        recorded, mask = _local_evidence(folder)
        if recorded is not None:
            return KindDecision(_known(recorded)["kind"], f"config.json names {recorded}", True, recorded)
        if mask is not None:
            return KindDecision(
                "diffusion",
                f"guessed: its tokenizer has the mask token {mask!r}, which AR FIM tokenizers lack; "
                "pass kind='ar' (--kind ar) if it is an AR model",
                False,
            )
    return KindDecision(
        "ar",
        "guessed: not a known checkpoint and its tokenizer has no mask token; "
        "pass kind='diffusion' (--kind diffusion) if it is a diffusion model",
        False,
    )


def resolve_kind(name_or_path: str, kind: str | None = None) -> tuple[str, str]:
    """``(kind, source)`` of :func:`detect_kind` (the first version's interface)."""
    decision = detect_kind(name_or_path, kind)
    return decision.kind, decision.source


def checkpoint_id(name_or_path: str) -> str | None:
    """The known hub id ``name_or_path`` stands for (directly, via a cache path or its config.json), else None."""
    hub = _hub_id_of(str(name_or_path))
    if _known(hub):
        return hub
    folder = Path(name_or_path)
    if folder.is_dir():
        return _local_evidence(folder)[0]
    return None


def known_mask(checkpoint: str | None) -> tuple[str, int] | None:
    """``(mask token, id)`` a known diffusion checkpoint was trained with, or None."""
    entry = _known(checkpoint) or {}
    if "mask_id" not in entry:
        return None
    return entry["mask_token"], int(entry["mask_id"])
