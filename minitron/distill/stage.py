"""The public entry points on models in memory: `distill` (a run in its folder, resumable) and
`teacher_correct_` (the optional first phase), with the input checks and the final model's
writing."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from minitron import distributed
from minitron.checkpoint import CKPT, MetricsLog, find_checkpoint, plot_losses
from minitron.common import MinitronError, StageTimer, atomic_dir, write_json_atomic
from minitron.config import DistillConfig, TeacherCorrectionConfig, check_correction, check_world
from minitron.models import parse_dtype
from minitron.distill.schedule import blocks_fingerprint
from minitron.distill.losses import (_device_of, evaluate_student, freeze_, make_projections,
                                     reinitialize_)
from minitron.distill.loop import FINAL_STAGING, _check_run_dir, _clean_leftovers, _train


def teacher_correct_(teacher: nn.Module, train_blocks: torch.Tensor, eval_blocks: torch.Tensor,
                     config: DistillConfig, correction: TeacherCorrectionConfig,
                     run_dir: str | os.PathLike) -> dict[str, Any]:
    """Fine-tune `teacher` in place with cross-entropy for `correction.tokens` tokens (the other
    settings are distillation's).

    The phase checkpoints and resumes like distillation; its result (`teacher.safetensors`) is kept,
    so a rerun loads it instead of training again. Training uses the precision policy on an fp32
    copy of the teacher (fp32 master weights: AdamW's small updates would round away in bf16), under
    `config.strategy` (FSDP2 shards it on GPUs); the result is loaded back into `teacher`, which
    keeps its own dtype, stays whole (replicated) and is left frozen in eval mode.
    """
    run_dir = Path(run_dir)
    done = run_dir / "teacher.safetensors"
    tc = dataclasses.replace(
        config, tokens=correction.tokens, lr=correction.lr or config.lr, baseline="ce",
        intermediate=(), alpha=0.0, seed=config.seed + 1)

    def finished() -> dict | None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if done.exists() and (run_dir / "metrics.json").exists():
            return json.loads((run_dir / "metrics.json").read_text())
        return None

    saved = distributed.on_rank0(finished)
    if saved is not None:
        _load_corrected(teacher, done)
        if distributed.rank() == 0:
            print(f"[minitron] teacher correction: already done, loaded {done}")
        return saved
    # A separate fp32 module when the teacher is not fp32, or when FSDP (or HSDP, the same
    # fully_shard on a 2-D mesh) would shard it in place.
    sharded = (distributed.dist_on()
               and distributed.strategy(tc.strategy, _device_of(teacher)) in ("fsdp", "hsdp"))
    master = (copy.deepcopy(teacher).float()
              if sharded or any(p.dtype != torch.float32 for p in teacher.parameters()) else teacher)
    metrics = _train(master, None, train_blocks, eval_blocks, tc, run_dir, "teacher_correction")
    # The hand-off, one tensor at a time: each fp32 parameter is gathered whole (a collective),
    # copied into every rank's teacher in its dtype, and streamed by rank 0 into the file a rerun
    # loads. No rank gathers the whole model, and no rank reads the file back.
    targets = dict(teacher.state_dict()) if master is not teacher else {}

    @torch.no_grad()
    def hand_off(name: str, whole: torch.Tensor) -> None:
        if name in targets:
            targets[name].copy_(whole)

    distributed.write_streamed_safetensors(done, master, on_tensor=hand_off)
    distributed.on_rank0(lambda: write_json_atomic(run_dir / "metrics.json", metrics))
    del master, targets
    freeze_(teacher)
    return metrics


def _load_corrected(teacher: nn.Module, path: Path) -> None:
    """The corrected fp32 weights into `teacher`, cast to its dtype; tied aliases may be absent."""
    from safetensors import safe_open

    targets = teacher.state_dict()
    aliases = distributed.tied_aliases(teacher)
    with safe_open(str(path), framework="pt") as f, torch.no_grad():  # one tensor at a time
        names = set(f.keys())
        missing = sorted(set(targets) - names - set(aliases))
        unexpected = sorted(names - set(targets))
        if unexpected or missing:
            raise MinitronError(f"{path} does not hold this teacher's weights (missing "
                                f"{missing[:3]}, unexpected {unexpected[:3]})")
        for name in names:
            targets[name].copy_(f.get_tensor(name))
    freeze_(teacher)


def distill(
    teacher: nn.Module | None,
    student: nn.Module,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor,
    config: DistillConfig,
    output_dir: str | os.PathLike,
    *,
    tokenizer=None,
    info: dict[str, Any] | None = None,
    on_step: Callable[[int], None] | None = None,
    correction: TeacherCorrectionConfig | None = None,
    student_device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train `student` (in place) from `teacher` and write the finished model to `output_dir`.

    `correction` (tokens > 0) first fine-tunes the teacher on the train blocks.
    `student_device`: where the student trains, when it is handed over elsewhere (on the host, so
    that a teacher correction has the GPU to itself); it moves there after the correction.

    train_blocks / eval_blocks: LongTensor [n, block_size] of disjoint splits (train_blocks may
    be a `minitron.shards.BlockView`, read by index, with a loss mask for chat data). `teacher`
    may be None only for a baseline (then no KL metrics) or with `config.teacher_cache`: the KD
    loss then reads the cache (which must hold these train blocks); a teacher given with a cache
    only adds KL and agreement to the evaluations. Resumes from `output_dir/checkpoint`; returns the
    metrics saved in `output_dir/minitron.json` (at once, if the run has already finished).

    Under torch.distributed (e.g. torchrun) every rank calls it with the same arguments; the
    teacher is replicated, the student wrapped per `config.strategy` (under FSDP it is left sharded:
    the final weights are in `output_dir`), and all ranks return rank 0's metrics.
    """
    out = Path(output_dir)
    saved = distributed.on_rank0(lambda: _finished_metrics(out))
    if saved is not None:
        return saved
    correction = correction or TeacherCorrectionConfig()
    cache = _open_cache(config, student, train_blocks)
    _check_inputs(teacher, student, train_blocks, config, correction, cache)
    phase = "distill" if config.uses_teacher else f"baseline_{config.baseline}"
    if teacher is not None:
        freeze_(teacher)
        if config.intermediate:
            make_projections(teacher, student, config)  # range check before any work
    settings = {"config": config.to_dict(), "teacher_correction": correction.to_dict(),
                "train_data": blocks_fingerprint(train_blocks),
                "eval_data": blocks_fingerprint(eval_blocks),
                "student_shape": _shape(student), "teacher_shape": _shape(teacher)}
    if cache is not None:  # a rebuilt cache at the same path is another teacher
        settings["teacher_cache"] = cache.fingerprint
    _same_on_every_rank(settings)
    distributed.on_rank0(lambda: _check_run_dir(out, settings))
    distributed.on_rank0(lambda: _clean_leftovers(out))

    with StageTimer(phase) as timer:
        result: dict[str, Any] = {}
        if teacher is not None:
            result["teacher"] = distributed.on_rank0(lambda: _cached(
                out / "teacher_eval.json",
                lambda: evaluate_student(teacher, None, eval_blocks, config.eval_batch_size)))
        if correction.tokens:
            result["teacher_correction"] = teacher_correct_(
                teacher, train_blocks, eval_blocks, config, correction, out / "teacher_correction")
            result["teacher_corrected"] = {k: result["teacher_correction"][k]
                                           for k in ("eval_loss", "eval_perplexity")}
        if config.baseline == "scratch" and distributed.on_rank0(lambda: find_checkpoint(out)) is None:
            reinitialize_(student, config.seed)  # seeded: the same weights on every rank
        student.float()
        if student_device is not None:
            student.to(student_device)
        metrics = _train(student, teacher, train_blocks, eval_blocks, config, out, phase,
                         on_step=on_step, eval_teacher=teacher, cache=cache)
        timer.tokens = metrics["this_session_tokens"]
    # Streamed tensor by tensor (no whole-model gather on rank 0's host), in the source's dtype.
    save_dtype = parse_dtype((info or {}).get("student_dtype") or "float32")
    weights = out / f".{FINAL_STAGING.lstrip('.')}-weights.safetensors"
    distributed.write_streamed_safetensors(weights, student, dtype=save_dtype,
                                           metadata={"format": "pt"})

    def finish() -> dict[str, Any]:
        records = MetricsLog(out / "metrics.jsonl").records
        start = next((r for r in records if r.get("kind") == "eval" and r["step"] == 0), {})
        metrics["start"] = {k: v for k, v in start.items() if k not in ("kind", "step", "tokens")}
        result.update(metrics)
        result["timing"] = timer.as_dict()
        if distributed.world() > 1:
            result["processes"] = {"world_size": distributed.world(), "strategy":
                                   distributed.strategy(config.strategy, _device_of(student))}
        plot_losses(records, out / "loss.png", f"{phase}: {out.name}")
        _write_final(out, student, weights, save_dtype, tokenizer, config, result, info or {})
        if not config.keep_checkpoint:
            shutil.rmtree(out / CKPT, ignore_errors=True)
        return result

    return distributed.on_rank0(finish)


def _finished_metrics(out: Path) -> dict | None:
    """The metrics of a run that already finished in `out`, else None."""
    final = out / "minitron.json"
    if final.exists():
        saved = json.loads(final.read_text()).get("distillation", {})
        if saved.get("status") == "finished":
            print(f"[minitron] {out} holds a finished run; not repeating it")
            return saved["metrics"]
    return None


def _open_cache(config: DistillConfig, student: nn.Module, train_blocks):
    """The teacher cache of `config.teacher_cache` (None when unset), checked against this run's
    train blocks and student before any work."""
    if config.teacher_cache is None:
        return None
    from minitron.teacher_cache import open_cache

    cache = open_cache(config.teacher_cache)
    cache.check_student(student.config.vocab_size)
    cache.check_data(train_blocks)
    return cache


def _check_inputs(teacher: nn.Module | None, student: nn.Module, train_blocks: torch.Tensor,
                  config: DistillConfig, correction: TeacherCorrectionConfig,
                  cache: Any = None) -> None:
    """Refuse, before any work, inputs the run cannot use."""
    check_correction(config, correction)
    check_world(config, distributed.world(), "world size")
    if config.uses_teacher and teacher is None and cache is None:
        raise MinitronError("distillation needs a teacher (--teacher); without one, use "
                            "distill.baseline=ce or distill.baseline=scratch")
    if train_blocks.ndim != 2 or train_blocks.size(1) != config.block_size:
        raise MinitronError(f"train blocks have shape {tuple(train_blocks.shape)}; expected "
                            f"[n, block_size={config.block_size}]")
    if config.skip_blocks >= len(train_blocks):
        raise MinitronError(
            f"distill.skip_tokens={config.skip_tokens} skips {config.skip_blocks} blocks of "
            f"{config.block_size} tokens, but the train split has {len(train_blocks)}: no fresh "
            f"block is left to train on; lower distill.skip_tokens or train on a larger source")
    if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
        raise MinitronError(
            f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the student's "
            f"({student.config.vocab_size}); distillation needs the same tokenizer")
    _check_token_ids(train_blocks, student.config.vocab_size)


def _check_token_ids(blocks: torch.Tensor, vocab: int) -> None:
    """Every token id in [0, vocab), checked once on the host, so the loss kernels need not check
    their labels (a device sync) at every step. Shards are not scanned: their tokenizer's
    vocabulary (from the manifest) bounds every id."""
    if hasattr(blocks, "vocab_size"):
        if blocks.vocab_size > vocab:
            raise MinitronError(f"the training data was tokenized with a vocabulary of "
                                f"{blocks.vocab_size} entries but the student's has {vocab}: the "
                                f"tokenizer does not match the model")
        return
    if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= vocab):
        raise MinitronError(f"the training data holds token ids in [{int(blocks.min())}, "
                            f"{int(blocks.max())}] but the student's vocabulary has {vocab} entries: "
                            f"the tokenizer does not match the model")


def _same_on_every_rank(settings: dict[str, Any]) -> None:
    """Every rank must hold the same data and models, or the shards do not add up."""
    if not distributed.dist_on():
        return
    everyone = [None] * distributed.world()
    dist.all_gather_object(everyone, settings)
    if any(s != settings for s in everyone):
        bad = [r for r, s in enumerate(everyone) if s != everyone[0]]
        raise MinitronError(f"ranks {bad} loaded other data or models than rank 0 (data "
                            f"fingerprints and shapes differ); every rank needs the same inputs")


def _shape(model: nn.Module | None) -> dict[str, Any] | None:
    if model is None:
        return None
    c = model.config
    return {k: getattr(c, k, None) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads",
                                             "vocab_size")}


def _cached(path: Path, fn: Callable[[], dict]) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    value = fn()
    write_json_atomic(path, value)
    return value


def _write_final(out: Path, student: nn.Module, weights: Path, dtype: torch.dtype, tokenizer,
                 config: DistillConfig, metrics: dict[str, Any], info: dict[str, Any]) -> None:
    """The student as a plain HF checkpoint in `out`, the same whatever the process count: its
    `weights` file (streamed by `distributed.write_streamed_safetensors`, in `dtype`), its config
    and tokenizer; minitron.json moves in last (the commit)."""
    from minitron.models import count_params

    meta = {k: v for k, v in info.items() if k != "student_dtype"}
    meta["parameters"] = {"after": count_params(student)}  # global counts, also when sharded
    meta["distillation"] = {"status": "finished", "config": config.to_dict(), "metrics": metrics}
    with atomic_dir(out / FINAL_STAGING, overwrite=True) as tmp:
        student.config.dtype = dtype  # what the weights file holds
        student.config.save_pretrained(tmp)
        if getattr(student, "generation_config", None) is not None and student.can_generate():
            student.generation_config.save_pretrained(tmp)
        os.replace(weights, tmp / "model.safetensors")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "minitron.json", meta)
    staged = out / FINAL_STAGING
    names = sorted(p.name for p in staged.iterdir())
    for name in [n for n in names if n != "minitron.json"] + ["minitron.json"]:
        os.replace(staged / name, out / name)
    staged.rmdir()


def _source_dtype(folder: str | os.PathLike) -> str:
    """The dtype a model folder's weights are stored in (config.json's dtype): the final student
    is written in it (bf16 stays bf16; the training itself is fp32)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def _read_info(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path) / "minitron.json"
    return json.loads(p.read_text()) if p.exists() else {}
