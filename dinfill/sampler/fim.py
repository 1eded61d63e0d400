"""Fill-in-the-middle prompt formats, stop tokens and post-processing rules.

Each AR baseline was trained with its own FIM sentinels (docs/sampler-semantics.md section 2); the
prompt is built from the sentinel *ids* the tokenizer reports plus the separately encoded prefix and
suffix rather than by tokenizing one concatenated string, so the sentinels are exactly one token
each whatever the tokenizer's handling of special text (for the real tokenizers both ways give the
same ids; a test checks it). The family is detected from which sentinels the tokenizer knows (the
model's ``model_type`` only breaks ties and names the family in error messages).

The post-processing rules of section 3 (``none``, ``first_line``, ``stop_sequences``) live here too:
the eval layer imports :func:`postprocess` so that every model's output goes through one function.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from dinfill.eval.postprocess import RULES, PostProcess, first_line

log = logging.getLogger("dinfill")

__all__ = [
    "FimFormat",
    "FimTokens",
    "FIM_FORMATS",
    "POSTPROCESS_RULES",
    "resolve_family",
    "detect_family",
    "fim_tokens",
    "build_fim_prompts",
    "first_line",
    "cut_at_stop",
    "postprocess",
]


@dataclass(frozen=True)
class FimFormat:
    """The sentinel strings of one model family (prefix-suffix-middle order).

    Attributes
    ----------
    family : str
        Canonical family name.
    prefix, suffix, middle : str
        The three sentinel tokens; the prompt is ``prefix P suffix S middle``.
    stop_tokens : tuple of str
        Tokens that end the middle besides the tokenizer's eos.
    model_types : tuple of str
        HF ``model_type`` values this family's checkpoints use.
    """

    family: str
    prefix: str
    suffix: str
    middle: str
    stop_tokens: tuple[str, ...]
    model_types: tuple[str, ...]


# Sentinels and stop tokens: docs/sampler-semantics.md section 2 (checked against each family's
# tokenizer_config.json). DeepSeek's bars are U+FF5C and its "space" is U+2581.
#
# Stop tokens end the middle besides the tokenizer's eos; ids are looked up in the tokenizer at run time, and a
# token the tokenizer lacks is skipped. The rule for every family: once the model emits one of its own
# sentinels or document separators, the middle is over (whatever follows belongs to another FIM example or
# another file), and skip_special_tokens would hide the sentinel in the text anyway.
FIM_FORMATS: dict[str, FimFormat] = {
    "qwen2.5-coder": FimFormat(
        family="qwen2.5-coder",
        prefix="<|fim_prefix|>",
        suffix="<|fim_suffix|>",
        middle="<|fim_middle|>",
        # Qwen2.5-Coder's own FIM example (QwenLM/Qwen2.5-Coder, examples/Qwen2.5-Coder-fim.py) passes
        # eos_token_id=[151659..151664, 151645, 151643]: every FIM / repo sentinel, <|im_end|> and
        # <|endoftext|>. Instruct checkpoints (the published 1.5B run) end turns with <|im_end|>.
        stop_tokens=(
            "<|endoftext|>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
            "<|im_end|>",
        ),
        model_types=("qwen2",),
    ),
    "deepseek-coder": FimFormat(
        family="deepseek-coder",
        prefix="<\uff5cfim\u2581begin\uff5c>",
        suffix="<\uff5cfim\u2581hole\uff5c>",
        middle="<\uff5cfim\u2581end\uff5c>",
        # DeepSeek-Coder's README insertion example stops on eos only (<｜end▁of▁sentence｜>, 32014); editor
        # integrations also stop on the three FIM sentinels, which can only start a new FIM example. <|EOT|>
        # ends a turn of the instruct variants (its tokenizer has it; a base tokenizer without it skips it).
        stop_tokens=(
            "<\uff5cend\u2581of\u2581sentence\uff5c>",
            "<\uff5cfim\u2581begin\uff5c>",
            "<\uff5cfim\u2581hole\uff5c>",
            "<\uff5cfim\u2581end\uff5c>",
            "<|EOT|>",
        ),
        model_types=("llama",),
    ),
    "starcoder2": FimFormat(
        family="starcoder2",
        prefix="<fim_prefix>",
        suffix="<fim_suffix>",
        middle="<fim_middle>",
        # bigcode-evaluation-harness's StarCoder FIM task stops on <|endoftext|> and <file_sep> (eos, and the
        # start of the next file in repository-level training data); the FIM sentinels, <fim_pad> and
        # <repo_name> end the middle for the same reason as Qwen's (their ids 1-5 come from the tokenizer).
        stop_tokens=(
            "<|endoftext|>",
            "<file_sep>",
            "<fim_prefix>",
            "<fim_middle>",
            "<fim_suffix>",
            "<fim_pad>",
            "<repo_name>",
        ),
        model_types=("starcoder2",),
    ),
}

_ALIASES = {
    "qwen": "qwen2.5-coder",
    "qwen2": "qwen2.5-coder",
    "qwen2.5": "qwen2.5-coder",
    "qwen2.5-coder": "qwen2.5-coder",
    "deepseek": "deepseek-coder",
    "deepseek-coder": "deepseek-coder",
    "starcoder": "starcoder2",
    "starcoder2": "starcoder2",
}

POSTPROCESS_RULES = RULES


@dataclass(frozen=True)
class FimTokens:
    """A family's sentinel and stop ids as one tokenizer numbers them.

    Attributes
    ----------
    family : str
        Canonical family name.
    prefix_id, suffix_id, middle_id : int
        Sentinel ids.
    stop_ids : tuple of int
        eos plus the family's stop tokens that this tokenizer has, without duplicates.
    lead_ids : tuple of int
        Ids the tokenizer puts in front of every text it encodes with special tokens (DeepSeek's
        BOS; empty for Qwen and StarCoder2); they start the prompt, as in each family's examples.
    """

    family: str
    prefix_id: int
    suffix_id: int
    middle_id: int
    stop_ids: tuple[int, ...]
    lead_ids: tuple[int, ...]


def resolve_family(name: str) -> str:
    """Map a family name or alias (``qwen``, ``deepseek``, ``starcoder``...) to its canonical name."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown FIM family {name!r}; use one of {sorted(FIM_FORMATS)} (or leave family=None)")
    return _ALIASES[key]


def _token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` as one whole token, or ``None`` (``get_vocab()`` would build a 150k dict)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == getattr(tokenizer, "unk_token_id", None) and token != tokenizer.unk_token):
        return None
    return int(tid)


def _missing_sentinels(tokenizer, fmt: FimFormat) -> list[str]:
    return [t for t in (fmt.prefix, fmt.suffix, fmt.middle) if _token_id(tokenizer, t) is None]


def _family_of_model_type(model_type: str | None) -> str | None:
    for fmt in FIM_FORMATS.values():
        if model_type in fmt.model_types:
            return fmt.family
    return None


def detect_family(tokenizer, model_type: str | None = None) -> str:
    """Return the FIM family whose three sentinels the tokenizer knows.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Anything with ``convert_tokens_to_ids`` (added tokens included, as HF tokenizers do).
    model_type : str, optional
        The model's ``config.model_type``: breaks a tie and names the expected family in the error.

    Raises
    ------
    ValueError
        When the tokenizer has no complete set of sentinels, naming the expected family and the
        missing tokens.
    """
    found = [f for f, fmt in FIM_FORMATS.items() if not _missing_sentinels(tokenizer, fmt)]
    expected = _family_of_model_type(model_type)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        if expected in found:
            return expected
        raise ValueError(f"tokenizer has the FIM tokens of several families {found}; pass family= explicitly")
    if expected is not None:
        missing = _missing_sentinels(tokenizer, FIM_FORMATS[expected])
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no FIM tokens of family {expected!r} (model_type "
            f"{model_type!r}): missing {missing}; load the tokenizer that ships with the checkpoint "
            "(dinfill.load_tokenizer(<checkpoint>)) or pass family= for a tokenizer of another family"
        )
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} has the FIM tokens of none of the supported families "
        f"{sorted(FIM_FORMATS)}; load a Qwen2.5-Coder, DeepSeek-Coder or StarCoder2 tokenizer"
    )


def fim_tokens(tokenizer, family: str | None = None, model_type: str | None = None) -> FimTokens:
    """Look up a family's sentinel and stop ids in ``tokenizer``.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    family : str, optional
        Force a family (name or alias); default: :func:`detect_family`.
    model_type : str, optional
        Passed to :func:`detect_family`.

    Raises
    ------
    ValueError
        When a forced family's sentinels are not in the tokenizer (naming the family and tokens).
    """
    family = detect_family(tokenizer, model_type) if family is None else resolve_family(family)
    fmt = FIM_FORMATS[family]
    missing = _missing_sentinels(tokenizer, fmt)
    if missing:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no FIM tokens of family {family!r}: missing {missing}; "
            "use the tokenizer of a checkpoint of that family or choose another family="
        )
    stops: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for tid in [eos] + [_token_id(tokenizer, t) for t in fmt.stop_tokens]:
        if tid is not None and tid not in stops:
            stops.append(int(tid))
    # What the tokenizer prepends to any text (DeepSeek: BOS), found by encoding an empty string.
    lead = list(tokenizer("", add_special_tokens=True)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    lead_ids = (bos,) if bos is not None and lead[:1] == [bos] else ()
    return FimTokens(
        family=family,
        prefix_id=_token_id(tokenizer, fmt.prefix),
        suffix_id=_token_id(tokenizer, fmt.suffix),
        middle_id=_token_id(tokenizer, fmt.middle),
        stop_ids=tuple(stops),
        lead_ids=lead_ids,
    )


def build_fim_prompts(
    tokenizer,
    prefixes: Sequence[str],
    suffixes: Sequence[str],
    tokens: FimTokens,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Token ids of ``[lead] <prefix> P <suffix> S <middle>`` for each pair (``tokens`` from :func:`fim_tokens`).

    Parameters
    ----------
    tokenizer, prefixes, suffixes, tokens
        As named; one suffix per prefix.
    max_tokens : int, optional
        The longest prompt allowed (the model's limit minus the new tokens). A longer prompt loses the start
        of its prefix, as a diffusion canvas does (the code nearest the hole is kept), and a warning says how
        many prompts were cut.

    Raises
    ------
    ValueError
        When the lists differ in length, are empty, hold something other than strings, or when a prompt
        without any prefix still exceeds ``max_tokens``.
    """
    if isinstance(prefixes, str) or isinstance(suffixes, str):
        raise ValueError("prefixes and suffixes must be lists of strings; wrap a single pair as [prefix], [suffix]")
    prefixes, suffixes = list(prefixes), list(suffixes)
    if len(prefixes) != len(suffixes):
        raise ValueError(f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes; pass one suffix per prefix")
    if not prefixes:
        raise ValueError("no prefixes given; pass at least one (prefix, suffix) pair")
    for i, (p, s) in enumerate(zip(prefixes, suffixes, strict=True)):
        if not isinstance(p, str) or not isinstance(s, str):
            raise ValueError(f"pair {i}: prefix and suffix must be str, got {type(p).__name__}, {type(s).__name__}")
    pre = tokenizer(prefixes, add_special_tokens=False)["input_ids"]
    suf = tokenizer(suffixes, add_special_tokens=False)["input_ids"]
    lead = list(tokens.lead_ids)
    prompts, cut = [], 0
    for i, (p, s) in enumerate(zip(pre, suf, strict=True)):
        p = list(p)
        if max_tokens is not None:
            fixed = len(lead) + 3 + len(s)  # lead, three sentinels, the suffix
            if fixed > max_tokens:
                raise ValueError(
                    f"pair {i}: the suffix alone ({len(s)} tokens) plus the FIM sentinels exceed the prompt limit "
                    f"of {max_tokens} tokens (the model's positions minus max_new_tokens); shorten the suffix or "
                    "lower max_new_tokens"
                )
            if fixed + len(p) > max_tokens:
                p = p[len(p) - (max_tokens - fixed) :]  # keep the end of the prefix, next to the hole
                cut += 1
        prompts.append(lead + [tokens.prefix_id] + p + [tokens.suffix_id] + list(s) + [tokens.middle_id])
    if cut:
        log.warning(
            "%d of %d FIM prompt(s) exceed %d tokens (the model's positions minus max_new_tokens): their prefixes "
            "lose their first tokens",
            cut,
            len(prompts),
            max_tokens,
        )
    return prompts


def cut_at_stop(text: str, stop_sequences: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest occurrence of any stop sequence.

    Returns
    -------
    (str, bool)
        The text up to (not including) the first stop sequence, and whether one was found.
    """
    cut = len(text)
    for stop in stop_sequences:
        if not isinstance(stop, str) or not stop:
            raise ValueError(f"stop sequences must be non-empty strings, got {stop!r}")
        at = text.find(stop)
        if 0 <= at < cut:
            cut = at
    return text[:cut], cut < len(text)


def postprocess(text: str, rule: str = "none", stop_sequences: Sequence[str] = ()) -> str:
    """Apply one post-processing rule of docs/sampler-semantics.md section 3 to a generated middle.

    The rules themselves live in :mod:`dinfill.eval.postprocess` (one definition for sampling and scoring);
    this is the keyword-style entry point.

    Parameters
    ----------
    text : str
        The generated middle.
    rule : {"none", "first_line", "stop_sequences"}
        ``none``: unchanged; ``first_line``: the first line, or the second when ``text`` starts with
        ``"\\n"`` or ``" \\n"``; ``stop_sequences``: cut before the first of ``stop_sequences``.
    stop_sequences : sequence of str
        Needed (non-empty) by ``stop_sequences``; ignored by the other rules.

    Returns
    -------
    str
        The post-processed middle.
    """
    if not isinstance(text, str):
        raise ValueError(f"postprocess expects the middle as str, got {type(text).__name__}")
    if isinstance(stop_sequences, str):
        raise ValueError("stop_sequences must be a list of strings, e.g. ['\\ndef ', '\\nclass ']")
    if rule == "stop_sequences" and not stop_sequences:
        raise ValueError("rule='stop_sequences' needs at least one stop sequence; pass stop_sequences=[...]")
    stops = tuple(stop_sequences) if rule == "stop_sequences" else ()
    return PostProcess(rule, stops)(text)
