"""Measuring a model against the PyTorch reference (perplexity, top-1, logit difference, greedy
tokens, speed) and the gates an export must pass."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from minitron.config import ExportConfig
from minitron.measure import speed as torch_speed
from minitron.onnx_lm import OnnxLM, until_eos
from minitron.export.graph import onnx_size_mb

_DIFF_BLOCKS = 4  # blocks whose full reference logits are kept for the max-difference check
_DIFF_MAX_LOGITS = 2**26  # ... but at most 256 MB of them (a 128k vocabulary keeps one 512-token block)


# ----------------------------------------------------------------------------- measurement
@dataclass
class Reference:
    """PyTorch FP32 outputs on the eval blocks that every other model is compared with."""

    top1: torch.Tensor  # [n, L] argmax ids
    logits: torch.Tensor  # [min(n, _DIFF_BLOCKS), L, V]
    generation: list[int]
    loss: float


def _batches(blocks: torch.Tensor, size: int):
    for i in range(0, len(blocks), size):
        yield i, blocks[i:i + size]


@torch.no_grad()
def score(forward: Callable[[torch.Tensor], torch.Tensor], blocks: torch.Tensor,
          ref: Reference | None = None, batch_size: int = 1) -> tuple[dict[str, Any], Reference]:
    """Perplexity of `forward` (ids [b, L] -> logits [b, L, V]) on blocks; agreement with `ref`."""
    total, count, agree, max_diff, max_ref = 0.0, 0, 0, 0.0, 0.0
    top1, kept = [], []
    for start, batch in _batches(blocks, batch_size):
        logits = forward(batch).float()
        v = logits.size(-1)
        total += F.cross_entropy(logits[:, :-1].reshape(-1, v), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
        ids = logits.argmax(-1)
        top1.append(ids)
        n_diff = max(1, min(_DIFF_BLOCKS, _DIFF_MAX_LOGITS // max(1, logits[0].numel())))
        n_keep = max(0, min(len(batch), n_diff - start))
        if ref is not None:
            agree += (ids == ref.top1[start:start + len(batch)]).sum().item()
            if n_keep:
                expected = ref.logits[start:start + n_keep]
                max_diff = max(max_diff, (logits[:n_keep] - expected).abs().max().item())
                max_ref = max(max_ref, expected.abs().max().item())
        elif n_keep:
            kept.append(logits[:n_keep].clone())
    loss = total / count
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
    if ref is not None:
        result["top1_vs_fp32"] = agree / blocks.numel()
        result["max_logit_diff"] = max_diff
        result["rel_logit_diff"] = (max_diff / max_ref if max_ref
                                     else math.inf if max_diff else 0.0)
    return result, Reference(torch.cat(top1), torch.cat(kept) if kept else torch.empty(0), [], loss)


def _generate(model, prompt: torch.Tensor, new_tokens: int, pad_id: int | None) -> list[int]:
    """PyTorch's greedy continuation, up to and including its first EOS (where ONNX Runtime GenAI
    and `OnnxLM.generate` stop too)."""
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         do_sample=False, num_beams=1, pad_token_id=pad_id)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return until_eos(out[0, prompt.size(1):].tolist(), eos)


def greedy_match(tokens: list[int], reference: list[int]) -> int:
    """Leading tokens that agree with the reference continuation."""
    n = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        n += 1
    return n


def _cuda_ort_available() -> bool:
    import onnxruntime as ort

    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


def measure_onnx(folder: Path, file_name: str, blocks: torch.Tensor, ref: Reference,
                 prompt: torch.Tensor, settings: ExportConfig) -> dict[str, Any]:
    """A graph of the folder through plain ONNX Runtime: the same scores, generation and speed
    protocol as the PyTorch row."""
    model = OnnxLM(folder, file_name)
    row, _ = score(model.logits, blocks, ref)
    tokens = model.generate(prompt, settings.gen_tokens)
    row["greedy_match"] = greedy_match(tokens, ref.generation)
    row["greedy_tokens"] = tokens
    row["size_mb"] = onnx_size_mb(folder / file_name)
    if settings.speed:
        row.update(model.speed())
        if _cuda_ort_available():
            gpu = OnnxLM(folder, file_name, "CUDAExecutionProvider").speed()
            row.update({f"cuda_{k}": v for k, v in gpu.items()})
    return row


def measure_torch(model, blocks: torch.Tensor, ref: Reference, prompt: torch.Tensor,
                  settings: ExportConfig, pad_id: int | None) -> dict[str, Any]:
    device = model.device
    row, _ = score(lambda b: model(b.to(device)).logits.cpu(), blocks, ref)
    tokens = _generate(model, prompt.to(device), settings.gen_tokens, pad_id)
    row["greedy_match"] = greedy_match(tokens, ref.generation)
    row["greedy_tokens"] = tokens
    if settings.speed:
        row.update(torch_speed(model))
    return row


def load_bnb(where: str, scheme: Literal["int8", "nf4"], trust_remote_code: bool = False):
    """The checkpoint through bitsandbytes (LLM.int8 or NF4), on the GPU if there is one, else CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if scheme == "int8":
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_compute_dtype=torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(where, quantization_config=qconfig, device_map=device,
                                                 dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    return model.eval()


# ----------------------------------------------------------------------------- validation gates
def check_fp32(row: dict[str, Any], settings: ExportConfig, gen_tokens: int) -> list[str]:
    """The FP32 graph against PyTorch. The logit bound is relative to the largest |logit| on the
    same tokens (`fp32_rtol`): float32 rounding in a graph that sums in another order grows with
    the logits' scale and the model's depth, which an absolute bound ignores (see ExportConfig)."""
    problems = []
    if row["rel_logit_diff"] > settings.fp32_rtol:
        problems.append(f"max |logit difference| {row['max_logit_diff']:.3g} is "
                        f"{row['rel_logit_diff']:.3g} of the largest |logit|, > export.fp32_rtol "
                        f"{settings.fp32_rtol:g}")
    if row["top1_vs_fp32"] < settings.fp32_min_top1:
        problems.append(f"top-1 agreement {row['top1_vs_fp32']:.4f} < {settings.fp32_min_top1}")
    if row["greedy_match"] < gen_tokens:
        problems.append(f"greedy generation matches only {row['greedy_match']}/{gen_tokens} tokens")
    return problems


def check_quantized(row: dict[str, Any], fp32_ppl: float, settings: ExportConfig) -> list[str]:
    problems = []
    change = row["perplexity"] / fp32_ppl - 1
    if change > settings.ppl_budget:
        problems.append(f"perplexity {row['perplexity']:.4g} vs FP32 {fp32_ppl:.4g} (+{100 * change:.2f}%) "
                        f"exceeds the budget of +{100 * settings.ppl_budget:.2f}% (export.ppl_budget)")
    if row["top1_vs_fp32"] < settings.int8_min_top1:
        problems.append(f"top-1 agreement with FP32 {row['top1_vs_fp32']:.4f} < {settings.int8_min_top1}")
    return problems
