"""Measure a model: held-out perplexity, agreement with a teacher, parameter count, size, speed.

`python -m minitron.evaluate --model M [--teacher T] [--json FILE] [section.key=value ...]`
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minitron.common import StageTimer, format_table, run_cli, write_json_atomic
from minitron.config import DataConfig, EvaluateConfig, ModelConfig
from minitron.data import batches, load_blocks
from minitron.models import count_params, load_model

# The settings the command takes (minitron.cli): the models are --model and --teacher.
CLI_KEYS = {"model": ("dtype", "device"),
            "data": ("source", "text_field", "block_size", "eval_blocks"), "evaluate": None}

@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Token-weighted mean next-token loss over `blocks` [n, L] and its exp (perplexity)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches(blocks, batch_size):
        batch = batch.to(device)
        logits = model(batch).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


@torch.no_grad()
def teacher_agreement(student, teacher, blocks: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Top-1 agreement and mean per-token KL(teacher || student) over the shared vocabulary."""
    from minitron.kernels import softmax_kl

    device = next(student.parameters()).device
    teacher_device = next(teacher.parameters()).device
    agree, kl_sum, count = 0, 0.0, 0
    for batch in batches(blocks, batch_size):
        s = student(batch.to(device)).logits.float()
        t = teacher(batch.to(teacher_device)).logits.float().to(device)
        v = min(s.size(-1), t.size(-1))
        agree += (s[..., :v].argmax(-1) == t[..., :v].argmax(-1)).sum().item()
        kl_sum += softmax_kl(s, t, reduction="sum").item()
        count += batch.numel()
    return {"top1_agreement": agree / count, "kl_to_teacher": kl_sum / count}


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

    prefill, decode = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True)
        sync()
        prefill.append(time.perf_counter() - t0)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
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


def evaluate(
    model_name: str,
    teacher_name: str | None = None,
    settings: EvaluateConfig | None = None,
    data: DataConfig | None = None,
    model: ModelConfig | None = None,
) -> dict[str, Any]:
    """All measurements of one model, as a flat dict (what the CLI prints and `--json` writes).

    Both models load in `model.dtype` on `model.device`; the eval split of `data` is measured.
    """
    settings, data, model = settings or EvaluateConfig(), data or DataConfig(), model or ModelConfig()
    with StageTimer("evaluate") as timer:
        lm, tokenizer = load_model(model_name, dtype=model.dtype, device=model.device)
        blocks = load_blocks(tokenizer, "eval", data.eval_blocks, source=data.source,
                             block_size=data.block_size, text_field=data.text_field,
                             max_positions=lm.config.max_position_embeddings)
        result: dict[str, Any] = {"model": str(model_name), "parameters": count_params(lm),
                                  "dtype": model.dtype}
        size = weights_size_mb(model_name)
        if size is not None:
            result["weights_mb"] = round(size, 1)
        result.update(perplexity(lm, blocks, settings.batch_size))
        if teacher_name is not None:
            teacher, _ = load_model(teacher_name, dtype=model.dtype, device=model.device)
            result.update(teacher_agreement(lm, teacher, blocks, settings.batch_size))
            del teacher
        if settings.speed:
            result.update(speed(lm))
        timer.tokens = result["tokens"]
    result["eval_blocks"] = f"{len(blocks)}x{data.block_size} of '{data.source}' eval split"
    result["timing"] = timer.as_dict()
    return result


def build_parser():
    from minitron import cli

    p = cli.stage_parser("python -m minitron.evaluate", __doc__.splitlines()[0], CLI_KEYS)
    p.add_argument("--model", default=ModelConfig.name, help="folder, hub id or 'smollm2-135m'")
    p.add_argument("--teacher", help="also report top-1 agreement and KL to this model")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    from minitron import cli

    args = cli.parse(build_parser(), argv)
    c = cli.configs(args)
    result = evaluate(args.model, args.teacher, c["evaluate"], c["data"], c["model"])
    rows = [{"metric": k, "value": v} for k, v in result.items() if k != "timing"]
    print(format_table(rows))
    print(f"evaluated in {result['timing']['wall_s']:.1f}s")
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    run_cli(main)
