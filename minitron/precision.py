"""The one precision policy of training: bf16 compute over fp32 master weights with fp32 gradient
reduction, or plain fp32.

`precision` is a setting with three values:
  "bf16"  the optimizer holds fp32 weights and fp32 gradients are reduced across ranks; matmuls run in
          bf16. One process and DDP: `torch.autocast(device_type, bfloat16)` over fp32 parameters
          (on the CPU too, so the CPU stands in for the GPU's numerics). FSDP2: PyTorch's
          `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` (the all-gather moves bf16,
          the reduce-scatter fp32) plus the same autocast, so fp32-only ops (softmax, norms'
          statistics, the losses' math) stay fp32 under every wrapper.
  "fp32"  everything fp32.
  "auto"  (the default) bf16 on CUDA, fp32 elsewhere: a CPU's bf16 matmuls are slow on most CPUs,
          and the CPU runs are the tests and the demo; "bf16" on a CPU is the GPU policy's stand-in.

Numerics: one process and DDP do identical arithmetic (autocast casts each fp32 weight to bf16 for
its matmul). FSDP2 rounds every parameter to bf16 before the forward, including the embedding and
norm weights that autocast leaves in fp32, so its losses differ from one process by bf16 roundoff,
not by a different policy; tests/test_precision.py states the tolerance.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: settings modules validate against PRECISIONS without it.
PRECISIONS = ("auto", "bf16", "fp32")


def resolve(precision: str, device: torch.device | str) -> str:
    """"auto" -> "bf16" on CUDA, "fp32" elsewhere; "bf16" / "fp32" unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if str(device).startswith("cuda") else "fp32"


def autocast(precision: str, device: torch.device | str):
    """The compute context of one training or evaluation forward under `precision`."""
    import torch

    device = torch.device(device)
    if resolve(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fsdp_policy(precision: str, device: torch.device | str):
    """The `mp_policy` for `fully_shard` (None means FSDP2's default: everything in the parameters'
    dtype, fp32 here)."""
    if resolve(precision, device) != "bf16":
        return None
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
