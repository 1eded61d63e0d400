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


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one torch thread (tiny models gain nothing from intra-op threads, and on a shared
    2-core machine two OpenMP threads spin-wait against other processes), then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
