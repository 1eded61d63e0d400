"""Fake generators for the evaluation tests: deterministic stand-ins for a model, loaded with --generator.

``canonical`` returns the canonical middle (every HumanEval program must pass), ``pass_body`` a
``pass`` statement at the canonical line's indentation (must fail), ``mixed`` picks one of the two per
hole from the batch seed (so resumed and sharded runs must reproduce the same choices), and
``slow_mixed`` is ``mixed`` with a pause per batch so a test can SIGKILL a run part-way, and
``rejecting`` refuses its first batch the way a sampler rejects a bad option (a run that fails
before writing its first record).
"""

import os
import random
import time


def _indent(middle: str) -> str:
    return middle[: len(middle) - len(middle.lstrip(" \t"))]


class Canonical:
    kind = "diffusion"

    def __call__(self, prefixes, suffixes, middles, *, seed):
        return list(middles)


class PassBody:
    kind = "diffusion"

    def __call__(self, prefixes, suffixes, middles, *, seed):
        return [_indent(m) + "pass\n" for m in middles]


class Mixed:
    kind = "ar"

    def __call__(self, prefixes, suffixes, middles, *, seed):
        rng = random.Random(seed)
        return [m if rng.random() < 0.7 else _indent(m) + "pass\n" for m in middles]


class SlowMixed(Mixed):
    def __call__(self, prefixes, suffixes, middles, *, seed):
        time.sleep(float(os.environ.get("DINFILL_FAKE_DELAY", "0.2")))
        return super().__call__(prefixes, suffixes, middles, seed=seed)


class Rejecting:
    kind = "diffusion"

    def __call__(self, prefixes, suffixes, middles, *, seed):
        raise ValueError("steps must be >= 1, got 0")


canonical = Canonical()
pass_body = PassBody()
mixed = Mixed()
slow_mixed = SlowMixed()
rejecting = Rejecting()


class Capturing(Mixed):
    """``mixed`` that reports CUDA-graph capture time on its first batch, as a real sampler's first bucket does."""

    def __init__(self):
        self.calls, self.last_capture_s = 0, 0.0

    def __call__(self, prefixes, suffixes, middles, *, seed):
        self.calls += 1
        time.sleep(0.05 if self.calls == 1 else 0.0)
        self.last_capture_s = 0.04 if self.calls == 1 else 0.0
        return super().__call__(prefixes, suffixes, middles, seed=seed)
