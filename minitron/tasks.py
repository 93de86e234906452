"""Downstream task accuracy through EleutherAI's lm-evaluation-harness (the `minitron[tasks]` extra).

A PyTorch model is scored where it already sits (lm-eval's HFLM takes a model instance: no second
load, any dtype and device); an exported ONNX folder is scored by lm-eval's own `onnxruntime` model
(a plain ONNX Runtime session over a folder described by genai_config.json, which our export
writes). The task `minitron_words_and_code` ships in `task_data/` and runs offline;
any lm-eval task name (hellaswag, arc_easy, ...) works for users with a network.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from minitron.common import MinitronError

TASK_DIR = Path(__file__).with_name("task_data")
SHIPPED_TASKS = ("minitron_words_and_code",)
INSTALL_HINT = "pip install 'minitron[tasks]'"
TASK_COLUMNS = ["model", "task", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "items"]


def require_lm_eval() -> None:
    """Fail with one line naming the extra when lm-evaluation-harness is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MinitronError("task accuracy (tasks) needs lm-evaluation-harness, which is not "
                            f"installed: {INSTALL_HINT}") from None


@contextlib.contextmanager
def _offline_if_local(tasks: list[str]):
    """Hub libraries offline while only shipped tasks run, so that a local task never waits on the
    network. Belt and braces: the shipped task's loader reads its JSONL directly, and
    tests/test_tasks.py runs it with sockets refused; `datasets` reads HF_DATASETS_OFFLINE when it
    loads anything, while huggingface_hub reads HF_HUB_OFFLINE once, at import."""
    if any(t not in SHIPPED_TASKS for t in tasks):
        yield
        return
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _task_manager(tasks: list[str]):
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's thousands of built-in YAMLs takes seconds: skip it for shipped tasks.
    return TaskManager(include_path=str(TASK_DIR),
                       include_defaults=any(t not in SHIPPED_TASKS for t in tasks))


def score_lm(lm, tasks: list[str], limit: int | None = None,
             num_fewshot: int | None = None) -> dict[str, dict[str, Any]]:
    """Run lm-eval's `simple_evaluate` on an lm-eval model; per task: acc, acc_norm, their standard
    errors and the number of items scored."""
    from lm_eval import simple_evaluate

    # lm-eval reads a limit below 1 as a fraction of the task; ours is a count of items.
    if limit is not None and limit < 1:
        raise MinitronError(f"limit: {limit} is invalid; valid: a number of items >= 1")
    if num_fewshot is not None and num_fewshot < 0:
        raise MinitronError(f"num_fewshot: {num_fewshot} is invalid; valid: an integer >= 0")
    with _offline_if_local(tasks):
        manager = _task_manager(tasks)
        unknown = [t for t in tasks if not manager.match_tasks([t])]
        if unknown:
            raise MinitronError(f"tasks: {', '.join(map(repr, unknown))} not found among lm-eval's "
                                f"tasks or the shipped ones ({', '.join(SHIPPED_TASKS)})")
        out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, log_samples=False, bootstrap_iters=1000)
    results = {}
    for task, metrics in out["results"].items():
        row = {k.split(",")[0]: v for k, v in metrics.items()
               if "," in k and isinstance(v, (int, float))}
        row["items"] = out.get("n-samples", {}).get(task, {}).get("effective")
        row["num_fewshot"] = out.get("n-shot", {}).get(task)
        results[task] = row
    return results


def score_torch(model, tokenizer, tasks: list[str], limit: int | None = None,
                num_fewshot: int | None = None, batch_size: int = 8) -> dict[str, dict[str, Any]]:
    """Task accuracy of an already loaded PyTorch causal LM (scored in its own dtype and device)."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from minitron.data import block_bos

    # Contexts start with BOS exactly when minitron's blocks do (the tokenizer adds one).
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              add_bos_token=block_bos(tokenizer) is not None)
    return score_lm(lm, tasks, limit, num_fewshot)


def score_onnx(folder: str | os.PathLike, tasks: list[str], limit: int | None = None,
               num_fewshot: int | None = None, file_name: str | None = None) -> dict[str, dict[str, Any]]:
    """Task accuracy of an exported ONNX folder (the deployed `model.onnx` unless `file_name`)."""
    require_lm_eval()
    return score_lm(ort_lm(folder, file_name), tasks, limit, num_fewshot)


def is_onnx_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and any(path.glob("*.onnx"))


def ort_lm(folder: str | os.PathLike, file_name: str | None = None):
    """lm-eval's `onnxruntime` model over an exported folder (its deployed graph, or `file_name`).

    It scores log-likelihood requests (multiple choice, perplexity tasks) one sequence at a time on
    the CPU provider. lm-eval's ONNX models encode text without special tokens; ours encodes it
    as `score_torch` does (BOS first exactly when the tokenizer adds one, `data.block_bos`), so a
    PyTorch model and its export are scored on the same tokens."""
    require_lm_eval()
    from lm_eval.models.onnxruntime_ort import ONNXRuntimeLM

    from minitron.data import block_bos
    from minitron.onnx_lm import read_genai_config

    class BlockRuleLM(ONNXRuntimeLM):
        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
            if add_special_tokens is None:
                if not hasattr(self, "_adds_bos"):
                    self._adds_bos = block_bos(self.tokenizer) is not None
                add_special_tokens = self._adds_bos
            return super().tok_encode(string, add_special_tokens=add_special_tokens, **kwargs)

    folder = Path(folder)
    name = file_name or read_genai_config(folder)["model"]["decoder"]["filename"]
    if not (folder / name).is_file():
        raise MinitronError(f"model: no '{name}' in ONNX folder '{folder}'")
    return BlockRuleLM(pretrained=str(folder / name), execution_provider="cpu")


def task_rows(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per (model, task) from rows that carry a `tasks` dict (the report's table)."""
    rows = []
    for m in models:
        for task, r in (m.get("tasks") or {}).items():
            rows.append({"model": m["model"], "task": task,
                         **{k: r[k] for k in TASK_COLUMNS[2:] if r.get(k) is not None}})
    return rows


def evaluate_onnx(folder: str | os.PathLike, tasks: list[str] | None, limit: int | None = None,
                  num_fewshot: int | None = None) -> dict[str, Any]:
    """`minitron.evaluate.evaluate` for an exported ONNX folder: task accuracy only (perplexity,
    agreement and speed of ONNX models are measured by `python -m minitron.export`)."""
    from minitron.common import StageTimer

    if not tasks:
        raise MinitronError(f"model: '{folder}' is an ONNX folder: it is scored on --tasks only "
                            "(python -m minitron.export measures its perplexity and speed)")
    with StageTimer("evaluate") as timer:
        result: dict[str, Any] = {"model": str(folder),
                                  "tasks": score_onnx(folder, tasks, limit, num_fewshot)}
    result["timing"] = timer.as_dict()
    return result
