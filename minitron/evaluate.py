"""Measure a model: held-out perplexity, agreement with a teacher, parameter count, size, speed,
and (with the `tasks` extra) downstream task accuracy through lm-evaluation-harness.

`python -m minitron.evaluate --model M [--teacher T] [--tasks T1,T2 [--limit N] [--num-fewshot K]]
[--json FILE]`; M may be an exported ONNX folder, which is scored on the tasks only.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minitron.common import StageTimer, format_table, run_cli, write_json_atomic
from minitron.data import batches, load_blocks
from minitron.models import EMBEDDED_NAME, count_params, load_model



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
    model_name: str = EMBEDDED_NAME,
    teacher_name: str | None = None,
    *,
    source: str = "stdlib",
    num_blocks: int = 32,
    block_size: int = 256,
    batch_size: int = 8,
    device: str | None = None,
    measure_speed: bool = True,
    tasks: list[str] | None = None,
    task_limit: int | None = None,
    num_fewshot: int | None = None,
) -> dict[str, Any]:
    """All measurements of one model, as a flat dict (what the CLI prints and `--json` writes);
    task accuracy under "tasks" when `tasks` names lm-eval tasks."""
    from minitron.tasks import evaluate_onnx, is_onnx_folder, require_lm_eval

    if tasks:
        require_lm_eval()  # before any model loads
    if is_onnx_folder(model_name):
        return evaluate_onnx(model_name, tasks, task_limit, num_fewshot)
    with StageTimer("evaluate") as timer:
        model, tokenizer = load_model(model_name, device=device)
        blocks = load_blocks(tokenizer, "eval", num_blocks, source=source, block_size=block_size,
                             max_positions=model.config.max_position_embeddings)
        result: dict[str, Any] = {"model": str(model_name), "parameters": count_params(model)}
        size = weights_size_mb(model_name)
        if size is not None:
            result["weights_mb"] = round(size, 1)
        result.update(perplexity(model, blocks, batch_size))
        if teacher_name is not None:
            teacher, _ = load_model(teacher_name, device=device)
            result.update(teacher_agreement(model, teacher, blocks, batch_size))
            del teacher
        if measure_speed:
            result.update(speed(model))
        if tasks:
            from minitron.tasks import score_torch

            result["tasks"] = score_torch(model, tokenizer, tasks, task_limit, num_fewshot, batch_size)
        timer.tokens = result["tokens"]
    result["eval_blocks"] = f"{len(blocks)}x{block_size} of '{source}' eval split"
    result["timing"] = timer.as_dict()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minitron.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=EMBEDDED_NAME, help="folder, hub id or 'smollm2-135m'")
    p.add_argument("--teacher", help="also report top-1 agreement and KL to this model")
    p.add_argument("--data", default="stdlib", help="data source (its eval split is used)")
    p.add_argument("--blocks", type=int, default=32, help="number of eval blocks")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--no-speed", action="store_true", help="skip the latency measurement")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. minitron_words_and_code "
                   "(shipped, offline) or hellaswag,arc_easy (need a network); extra: minitron[tasks]")
    p.add_argument("--limit", type=int, help="score at most this many items per task")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per item (task default if unset)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    from minitron.tasks import TASK_COLUMNS, parse_tasks, task_rows

    result = evaluate(args.model, args.teacher, source=args.data, num_blocks=args.blocks,
                      block_size=args.block_size, batch_size=args.batch_size, device=args.device,
                      measure_speed=not args.no_speed, tasks=parse_tasks(args.tasks),
                      task_limit=args.limit, num_fewshot=args.num_fewshot)
    rows = [{"metric": k, "value": v} for k, v in result.items() if k not in ("timing", "tasks")]
    print(format_table(rows))
    if result.get("tasks"):
        print(format_table(task_rows([{**result, "model": str(args.model)}]), TASK_COLUMNS))
    print(f"evaluated in {result['timing']['wall_s']:.1f}s")
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    run_cli(main)
