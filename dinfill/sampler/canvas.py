"""Diffusion infilling canvases: text -> ``prefix + [MASK] * m + suffix`` ids, batched, and back to text.

Why a module of its own: this is where infilling goes silently wrong. The published evaluation keeps the
last 2048 tokens of the canvas but then slices the middle at the *untruncated* prefix length, so every
long-prefix problem decodes the wrong columns. Here each row remembers how many tokens were cut from its
left and where its middle really starts, and a canvas whose middle itself would be cut is an error.

Two batch layouts (both give each row exactly the outputs it would get alone, because padding keys are
masked and every row gets its real RoPE positions):

- ``"right"``: every row starts at column 0 and is right-padded (narrowest; used with ``cache="none"``).
- ``"aligned"``: prefixes are left-padded so that every middle starts at the same column and rows are
  right-padded after their suffixes. The dual cache then recomputes one window of columns shared by the
  whole batch instead of a union of scattered middles. It is wider than ``"right"`` (max prefix + max
  middle-plus-suffix), so it falls back to ``"right"`` when that width would exceed the length limit.

Middle lengths (``length=``): ``"oracle"`` (token length of the true middle, what the published numbers
used), ``"fixed"`` (``middle_tokens``), ``"adaptive"``: a canvas of ``middle_tokens`` masks whose
generated middle is cut at the first end token (eos / pad / mask / any special token), see
:func:`trim_at_end`, and ``"search"``: every length of :func:`search_lengths` decoded as an adaptive
canvas, the candidates of one hole in the same batch, and the one whose middle best predicts the context
tokens touching the hole kept (:func:`boundary_row` builds the scoring canvas; the rule and its cost are in
docs/sampler-semantics.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

LENGTH_STRATEGIES = ("oracle", "fixed", "adaptive", "search")
SEARCH_SHORTEST = 4  # the first candidate of length="search"; shorter middles come from trimming (end tokens)
BOUNDARY_WINDOW = 8  # context tokens scored on each side of the hole by length="search"
LAYOUTS = ("right", "aligned")


@dataclass(frozen=True)
class CanvasRow:
    """One tokenized canvas: ``ids = prefix + [mask] * middle_len + suffix`` after left truncation."""

    ids: list[int]
    middle_start: int  # column of the first middle token inside ``ids`` (true position after truncation)
    middle_len: int
    truncated: int  # tokens cut from the left of the prefix


@dataclass
class CanvasBatch:
    """Several canvases laid out in one padded tensor.

    Attributes
    ----------
    input_ids : Tensor
        ``(B, W)`` int64 canvas, padding filled with ``pad_id``.
    attention_mask : Tensor
        ``(B, W)`` bool, True on real tokens (one contiguous run per row).
    middle_start : list[int]
        Column of each row's middle in ``input_ids``.
    middle_len : list[int]
        Number of middle (mask) tokens of each row.
    layout : str
        ``"right"`` or ``"aligned"`` (the one actually used).
    """

    input_ids: Tensor
    attention_mask: Tensor
    middle_start: list[int]
    middle_len: list[int]
    layout: str

    def middles(self, ids: Tensor) -> list[list[int]]:
        """Slice each row's middle out of a finished ``(B, W)`` canvas (same layout)."""
        rows = ids.tolist()
        return [r[s : s + m] for r, s, m in zip(rows, self.middle_start, self.middle_len, strict=True)]


def _strings(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence):
        raise TypeError(f"infill(): {name} must be a string or a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise TypeError(f"infill(): {name}[{i}] must be a string, got {type(item).__name__}")
    return list(value)


def text_problems(
    prefixes: Sequence[str] | str, suffixes: Sequence[str] | str, middles: Sequence[str] | str | None = None
) -> tuple[list[str], list[str], list[str] | None]:
    """The text inputs of an ``infill`` call as lists: a bare string is one problem; one suffix (and one middle,
    when given) per prefix. Shared by :func:`dinfill.sampler.infill` and the diffusion ``infill``.

    Raises
    ------
    TypeError
        For something that is neither a string nor a list of strings.
    ValueError
        When the counts differ.
    """
    prefixes, suffixes = _strings("prefixes", prefixes), _strings("suffixes", suffixes)
    if len(prefixes) != len(suffixes):
        raise ValueError(
            f"infill(): got {len(prefixes)} prefixes and {len(suffixes)} suffixes; pass one suffix per prefix"
        )
    if middles is not None:
        middles = _strings("middles", middles)
        if len(middles) != len(prefixes):
            raise ValueError(f"infill(): got {len(middles)} middles for {len(prefixes)} prefixes; pass one per prefix")
    return prefixes, suffixes, middles


def middle_lengths(
    tokenizer,
    count: int,
    *,
    length: str,
    middles: Sequence[str] | None = None,
    middle_tokens: int | None = None,
) -> list[int]:
    """Number of mask tokens per problem under a length strategy.

    Parameters
    ----------
    tokenizer
        Hugging Face tokenizer (for ``oracle``: the middle is tokenized without special tokens).
    count : int
        Number of problems.
    length : str
        ``"oracle"`` (needs ``middles``), ``"fixed"``, ``"adaptive"`` or ``"search"`` (need ``middle_tokens``;
        ``search`` gives the longest candidate, see :func:`search_lengths`).
    middles : sequence of str, optional
        True middles, for ``oracle``.
    middle_tokens : int, optional
        Canvas middle length for ``fixed``; the maximum length for ``adaptive`` and ``search``.

    Returns
    -------
    list[int]
        One length per problem (``oracle`` may give 0 for an empty middle).
    """
    if length not in LENGTH_STRATEGIES:
        raise ValueError(f"length={length!r} is not one of {LENGTH_STRATEGIES}")
    if length == "oracle":
        if middles is None:
            raise ValueError("length='oracle' needs middles= (the true middles); or use length='fixed'/'adaptive'")
        if len(middles) != count:
            raise ValueError(f"got {len(middles)} middles for {count} prefix/suffix pairs")
        return [len(tokenizer(m, add_special_tokens=False)["input_ids"]) for m in middles]
    if middle_tokens is None or isinstance(middle_tokens, bool) or int(middle_tokens) != middle_tokens:
        raise ValueError(f"length={length!r} needs middle_tokens= (a positive int), got {middle_tokens!r}")
    if middle_tokens < 1:
        raise ValueError(f"middle_tokens must be >= 1, got {middle_tokens}")
    return [int(middle_tokens)] * count


def build_row(prefix_ids: list[int], suffix_ids: list[int], middle_len: int, mask_id: int, limit: int) -> CanvasRow:
    """Assemble one canvas and keep its last ``limit`` tokens, tracking where the middle went.

    Raises
    ------
    ValueError
        When the middle plus suffix alone exceed ``limit``: left truncation would eat the middle.
    """
    ids = list(prefix_ids) + [mask_id] * middle_len + list(suffix_ids)
    cut = max(0, len(ids) - limit)
    if cut > len(prefix_ids):
        raise ValueError(
            f"the middle ({middle_len} tokens) plus the suffix ({len(suffix_ids)} tokens) exceed the canvas limit "
            f"of {limit} tokens, so truncating the prefix cannot make it fit; shorten the suffix or the middle "
            "(middle_tokens), or raise max_length (up to the model's max_position_embeddings)"
        )
    return CanvasRow(ids=ids[cut:], middle_start=len(prefix_ids) - cut, middle_len=middle_len, truncated=cut)


def tokenize_rows(
    tokenizer,
    prefixes: Sequence[str],
    suffixes: Sequence[str],
    middle_lens: Sequence[int],
    *,
    mask_id: int,
    limit: int,
) -> list[CanvasRow]:
    """Tokenize each (prefix, suffix) pair the way the reference does and build its canvas.

    The prefix is tokenized with the tokenizer's special tokens (``add_special_tokens=True``; Qwen adds
    none), the suffix without; both may be empty strings.
    """
    if len(prefixes) != len(suffixes) or len(prefixes) != len(middle_lens):
        raise ValueError(
            f"got {len(prefixes)} prefixes, {len(suffixes)} suffixes and {len(middle_lens)} middle lengths; "
            "pass one of each per problem"
        )
    rows = []
    for p, s, m in zip(prefixes, suffixes, middle_lens, strict=True):
        if not isinstance(p, str) or not isinstance(s, str):
            raise TypeError(f"prefixes and suffixes must be strings, got {type(p).__name__} and {type(s).__name__}")
        p_ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        s_ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        rows.append(build_row(p_ids, s_ids, m, mask_id, limit))
    cut = sum(r.truncated > 0 for r in rows)
    if cut:  # said, not silent: the published protocol truncates too, but a user should know
        logging.getLogger("dinfill").warning(
            "%d of %d canvas(es) exceed %d tokens: their prefixes lose their first tokens", cut, len(rows), limit
        )
    return rows


def layout_rows(
    rows: Sequence[CanvasRow], *, pad_id: int, layout: str = "right", limit: int | None = None, device=None
) -> CanvasBatch:
    """Pad canvases into one batch.

    Parameters
    ----------
    rows : sequence of CanvasRow
        Canvases from :func:`build_row` / :func:`tokenize_rows`.
    pad_id : int
        Id written into padding columns (never attended to; any valid id works).
    layout : str
        ``"right"`` or ``"aligned"`` (middles share a start column); ``"aligned"`` falls back to ``"right"``
        when its width would exceed ``limit``.
    limit : int, optional
        Maximum batch width (the model's position limit).
    device
        Where to put the tensors.

    Returns
    -------
    CanvasBatch
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    if not rows:
        raise ValueError("no canvases to lay out")
    if layout == "aligned":
        start = max(r.middle_start for r in rows)
        width = start + max(len(r.ids) - r.middle_start for r in rows)
        if limit is not None and width > limit:
            layout = "right"
    if layout == "right":
        width = max(len(r.ids) for r in rows)
        offsets = [0] * len(rows)
    else:
        offsets = [start - r.middle_start for r in rows]
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, W)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)  # (B, W)
    for b, (r, o) in enumerate(zip(rows, offsets, strict=True)):
        ids[b, o : o + len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        mask[b, o : o + len(r.ids)] = True
    return CanvasBatch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        middle_start=[r.middle_start + o for r, o in zip(rows, offsets, strict=True)],
        middle_len=[r.middle_len for r in rows],
        layout=layout,
    )


def end_token_ids(tokenizer, mask_id: int) -> set[int]:
    """Token ids that end an adaptive middle: eos, pad, the mask and every special token of the tokenizer."""
    ids = {mask_id}
    for tid in (tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            ids.add(int(tid))
    ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    return ids


def trim_at_end(middle: Sequence[int], end_ids: set[int]) -> list[int]:
    """The adaptive rule: keep the middle up to (excluding) its first end token.

    A canvas longer than the true middle leaves the model room it has to fill; a model trained on padded
    documents fills it with end-of-text / pad tokens, which here end the middle. A leftover mask (the
    model may predict the mask id itself) counts as an end too.
    """
    out = []
    for t in middle:
        if t in end_ids:
            break
        out.append(t)
    return out


def search_lengths(max_tokens: int) -> list[int]:
    """The candidate middle lengths of ``length="search"``: 4, 8, 16, ... doubling while below ``max_tokens``,
    then ``max_tokens`` itself (``[4, 8, 16, 32, 64]`` for 64; ``[max_tokens]`` when it is at most 4).

    Doubling keeps the candidate count logarithmic in the maximum (5 rows per hole for 64) while every true
    length up to the maximum lies within a factor of two of a candidate; each candidate is an adaptive canvas
    (cut at its first end token), so a candidate can also produce any shorter middle.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(
            f"length='search' needs middle_tokens= (an int >= 1, the longest candidate), got {max_tokens!r}"
        )
    lengths, n = [], SEARCH_SHORTEST
    while n < max_tokens:
        lengths.append(n)
        n *= 2
    return lengths + [max_tokens]


@dataclass(frozen=True)
class BoundaryRow:
    """A finished candidate laid out for scoring: ``prefix + middle + suffix`` with the context tokens that touch
    the middle masked.

    Attributes
    ----------
    ids : list[int]
        The canvas, after left truncation, with ``mask_id`` at every scored column.
    columns : list[int]
        The scored columns (the last ``window`` prefix tokens, then the first ``window`` suffix tokens).
    targets : list[int]
        The true token of each scored column.
    """

    ids: list[int]
    columns: list[int]
    targets: list[int]


def boundary_row(
    prefix_ids: Sequence[int],
    middle_ids: Sequence[int],
    suffix_ids: Sequence[int],
    *,
    mask_id: int,
    limit: int,
    window: int = BOUNDARY_WINDOW,
) -> BoundaryRow:
    """The scoring canvas of one candidate middle (see :func:`search_lengths`).

    The scored tokens are the same for every candidate of a hole (the last ``window`` prefix tokens and the
    first ``window`` suffix tokens, fewer when the context is shorter), so the candidates' scores compare
    like with like whatever their lengths: only the middle between them differs.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    prefix_ids, middle_ids, suffix_ids = list(prefix_ids), list(middle_ids), list(suffix_ids)
    ids = prefix_ids + middle_ids + suffix_ids
    cut = max(0, len(ids) - limit)
    if cut > len(prefix_ids):
        raise ValueError(
            f"the middle ({len(middle_ids)} tokens) plus the suffix ({len(suffix_ids)} tokens) exceed the canvas "
            f"limit of {limit} tokens"
        )
    ids = ids[cut:]
    n_prefix = len(prefix_ids) - cut
    suffix_start = n_prefix + len(middle_ids)
    columns = list(range(max(0, n_prefix - window), n_prefix))
    columns += list(range(suffix_start, suffix_start + min(window, len(suffix_ids))))
    targets = [ids[c] for c in columns]
    for c in columns:
        ids[c] = mask_id
    return BoundaryRow(ids=ids, columns=columns, targets=targets)
