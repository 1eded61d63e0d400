"""Test-suite set-up.

Without CUDA, Triton kernels can only run in its interpreter, which must be switched on before
triton is imported anywhere: this conftest is the first thing pytest imports, so it does it here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA_DIR = os.environ.get("DINFILL_DATA_DIR")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """``../shared`` beside the checkout (tokenizers, data); skip with the reason when it is absent."""
    path = REPO.parent / "shared"
    if not (path / "tokenizers").is_dir():
        pytest.skip(f"{path}/tokenizers not found: these tests need the shared tokenizer files beside the repo")
    return path
