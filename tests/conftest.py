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

# Under pytest-xdist (`make test` runs one worker per core) the workers share the cores: one
# intra-op thread each, for this process and the processes a test starts, instead of each spinning
# a thread per core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Fix that decision for the whole session now: a test that drops TRITON_INTERPRET to take the torch
# reference on CPU must not be the first to import the kernels, or every later test that runs them
# through the interpreter finds them compiled for a GPU ("0 active drivers").
import minitron.kernels  # noqa: E402,F401

import pytest  # noqa: E402

from tiny import make_tiny_model, tiny_tokenizer  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available()


# The slowest modules first (seconds of test time under `make test`, 2 workers: export 373,
# distributed 188, pipeline 149, hostile_runs 119, onnx_families 115, sweep 102, config 92, ...):
# pytest-xdist's loadscope hands each worker whole modules in collection order, so a slow module
# collected late runs alone at the end while the other worker idles (24 min in all, against 15.6
# min in this order).
SLOWEST_FIRST = ("test_export", "test_distributed", "test_pipeline", "test_hostile_runs",
                 "test_onnx_families", "test_sweep", "test_config", "test_teacher_cache", "test_distill",
                 "test_tasks", "test_scale_runs", "test_kernels", "test_gpu_check", "test_search")


def _module_rank(item) -> int:
    name = item.path.stem
    return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
    items.sort(key=_module_rank)  # stable: each module keeps its own order


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
