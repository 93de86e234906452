"""Shared test setup: CPU Triton through the interpreter, no network, tiny config-built models."""

import os

import torch

# Triton decides at @triton.jit time whether a kernel is interpreted, so this must precede any
# import of minitron.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Fix that decision for the whole session now: a test that drops TRITON_INTERPRET to take the torch
# reference on CPU must not be the first to import the kernels, or every later test that runs them
# through the interpreter finds them compiled for a GPU ("0 active drivers").
import minitron.kernels  # noqa: E402,F401

import pytest  # noqa: E402

from tiny import make_tiny_model, tiny_tokenizer  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(params=["llama", "mistral", "qwen2"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: a second intra-op thread only adds spin-waiting (5x slower on a busy 2-core
    box). Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
