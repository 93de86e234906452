"""Measurements shared by `minitron.evaluate` (PyTorch models) and `minitron.export` (which compares
ONNX Runtime's latency with PyTorch's by the same protocol): latency and weights on disk."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from minitron.models import cache_kwarg, cache_of


@torch.no_grad()
def speed(model, prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3,
          vocab_size: int | None = None) -> dict[str, float]:
    """Prefill tokens/s on one prompt and decode ms/token with the KV cache (batch 1, medians)."""
    device = next(model.parameters()).device
    vocab = vocab_size or model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    kwarg = cache_kwarg(model)
    prefill, decode = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True)
        sync()
        prefill.append(time.perf_counter() - t0)
        cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, use_cache=True, **{kwarg: cache})
            cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
        sync()
        decode.append((time.perf_counter() - t0) / new_tokens)
    return {
        "prefill_tokens_per_s": prompt_len / statistics.median(prefill),
        "decode_ms_per_token": 1000 * statistics.median(decode),
    }


def weights_size_mb(path: str | Path) -> float | None:
    path = Path(path)
    if not path.is_dir():
        return None
    files = list(path.glob("*.safetensors")) + list(path.glob("*.onnx")) + list(path.glob("*.onnx_data"))
    return sum(f.stat().st_size for f in files) / 2**20
