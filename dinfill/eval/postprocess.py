"""Post-processing rules applied to a generated middle before it is scored (sampler-semantics.md, section 3).

Why explicit: the published comparison scored the diffusion model's SantaCoder output with the
first-line rule and the AR models' with the whole completion, which moves exact match by about
ten points. Every record and every report therefore names the rule it used, and a comparison
must use one rule for all models.

Rules: ``none`` (the middle as generated), ``first_line`` (the first line, or the second when the
middle starts with ``"\\n"`` or ``" \\n"``), ``stop_sequences`` (cut at the earliest of a list of strings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

RULES = ("none", "first_line", "stop_sequences")


def first_line(text: str) -> str:
    """The first line of ``text``, or the second when ``text`` starts with ``"\\n"`` or ``" \\n"``.

    This is the rule behind the published open-dcoder SantaCoder-FIM number (584/1043): AR-style
    middles often begin with the newline that ends the prompt's last line.
    """
    lines = text.split("\n")
    # Exactly these two prefixes, as in the published scorer: not any whitespace-only first line.
    if len(lines) > 1 and (text.startswith("\n") or text.startswith(" \n")):
        return lines[1]
    return lines[0]


def cut_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any of ``stops``."""
    # The earliest stop wins, whichever string it is.
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


@dataclass(frozen=True)
class PostProcess:
    """A post-processing rule and its parameters; callable on a middle.

    Parameters
    ----------
    rule : str
        One of :data:`RULES`.
    stop_sequences : tuple of str
        Used by ``stop_sequences`` only (required there, refused elsewhere).
    """

    rule: str = "none"
    stop_sequences: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown post-processing rule {self.rule!r}; choose one of {RULES}")
        if self.rule == "stop_sequences" and not self.stop_sequences:
            raise ValueError("post-processing rule stop_sequences needs at least one stop string (--stop STR)")
        # Stop strings under another rule would be ignored silently: refuse instead.
        if self.rule != "stop_sequences" and self.stop_sequences:
            raise ValueError(f"stop strings were given but the rule is {self.rule!r}; use --postprocess stop_sequences")
        if any(not isinstance(s, str) or not s for s in self.stop_sequences):
            raise ValueError("stop strings must be non-empty strings")

    def __call__(self, text: str) -> str:
        if self.rule == "first_line":
            return first_line(text)
        if self.rule == "stop_sequences":
            return cut_at_stop(text, self.stop_sequences)
        return text

    def to_dict(self) -> dict:
        """JSON form stored in records and summaries."""
        data: dict = {"rule": self.rule}
        if self.stop_sequences:
            data["stop_sequences"] = list(self.stop_sequences)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PostProcess:
        """Inverse of :meth:`to_dict`."""
        return cls(data.get("rule", "none"), tuple(data.get("stop_sequences", ())))

    def describe(self) -> str:
        """Short label for tables, e.g. ``first_line`` or ``stop_sequences['\\ndef ']``."""
        if self.rule == "stop_sequences":
            return f"stop_sequences{list(self.stop_sequences)!r}"
        return self.rule
