"""Measure a model: held-out perplexity, agreement with a teacher, parameter count, size, speed,
and (with the `tasks` extra) downstream task accuracy through lm-evaluation-harness.

`python -m minitron.evaluate --model M [--teacher T] [--json FILE] [section.key=value ...]`, e.g.
`evaluate.tasks=[minitron_words_and_code] evaluate.limit=50` (or `--tasks a,b --limit 50`); M may be
an exported ONNX folder, which is scored on the tasks only.
"""

from __future__ import annotations

from typing import Any

from minitron.common import (StageTimer, check_writable, format_table, free_accelerator_memory,
                             run_cli, write_json_atomic)
from minitron.config import DataConfig, EvaluateConfig, ModelConfig
from minitron.data import block_rule, load_blocks
# Also export's (from a module of their own, so that export need not import this one: evaluate
# scores exported ONNX folders on tasks through export's loader).
from minitron.measure import speed, weights_size_mb  # noqa: F401
from minitron.models import check_same_tokenizer, count_params, load_model, resolve_device
from minitron.scoring import held_out

# The settings the command takes (minitron.cli): the models are --model and --teacher.
CLI_KEYS = {"model": ("dtype", "device", "trust_remote_code"),
            "data": ("source", "text_field", "block_size", "eval_blocks"), "evaluate": None}


def evaluate(
    model_name: str,
    teacher_name: str | None = None,
    settings: EvaluateConfig | None = None,
    data: DataConfig | None = None,
    model: ModelConfig | None = None,
) -> dict[str, Any]:
    """All measurements of one model, as a flat dict (what the CLI prints and `--json` writes);
    task accuracy under "tasks" when `settings.tasks` names lm-eval tasks.

    Both models load in `model.dtype` on `model.device`; the eval split of `data` is measured.
    """
    from minitron.tasks import evaluate_onnx, is_onnx_folder, require_lm_eval

    settings, data, model = settings or EvaluateConfig(), data or DataConfig(), model or ModelConfig()
    tasks = list(settings.tasks)
    if tasks:
        require_lm_eval()  # before any model loads
    if is_onnx_folder(model_name):
        return evaluate_onnx(model_name, tasks, settings.limit, settings.num_fewshot)
    trust = model.trust_remote_code
    if teacher_name is not None:  # before any work: agreement needs the same tokens
        check_same_tokenizer(teacher_name, model_name, trust, why="agreement with a teacher")
    with StageTimer("evaluate") as timer:
        lm, tokenizer = load_model(model_name, dtype=model.dtype, device=resolve_device(model.device),
                                   trust_remote_code=trust)
        blocks = load_blocks(tokenizer, "eval", data.eval_blocks, source=data.source,
                             block_size=data.block_size, text_field=data.text_field,
                             max_positions=lm.config.max_position_embeddings)
        result: dict[str, Any] = {"model": str(model_name), "parameters": count_params(lm),
                                  "dtype": model.dtype}
        size = weights_size_mb(model_name)
        if size is not None:
            result["weights_mb"] = round(size, 1)
        teacher = None
        if teacher_name is not None:
            teacher, _ = load_model(teacher_name, dtype=model.dtype, device=resolve_device(model.device),
                                    trust_remote_code=trust)
        result.update(held_out(lm, teacher, blocks, settings.batch_size))
        del teacher
        free_accelerator_memory()
        if settings.speed:
            result.update(speed(lm))
        if tasks:
            from minitron.tasks import score_torch

            result["tasks"] = score_torch(lm, tokenizer, tasks, settings.limit,
                                          settings.num_fewshot, settings.batch_size)
        timer.tokens = result["tokens"]
    result["eval_blocks"] = f"{len(blocks)}x{data.block_size} of '{data.source}' eval split"
    result["blocks"] = block_rule(tokenizer)
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
    from minitron.tasks import TASK_COLUMNS, task_rows

    args = cli.parse(build_parser(), argv)
    c = cli.configs(args)
    if args.json:
        check_writable(args.json, "--json")
    result = evaluate(args.model, args.teacher, c["evaluate"], c["data"], c["model"])
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
