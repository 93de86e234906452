"""The training loop: run folder, model and optimizer set-up, resume, one step (loss, clipping, the
divergence guard), evaluation and checkpoints, and the final metrics."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from minitron import distributed, precision
from minitron.checkpoint import (CKPT, MetricsLog, NullLog, PendingCheckpoint, find_checkpoint,
                                 load_checkpoint, rng_state, save_checkpoint, save_checkpoint_async)
from minitron.common import MinitronError, clean_stale, write_json_atomic
from minitron.config import DistillConfig, check_world, resumable_keys
from minitron.distill.schedule import batch_indices, lr_factor, micro_steps
from minitron.distill.losses import (LossSetup, _Capture, _Trainee, _device_of, _use_fused,
                                     evaluate_student, make_projections)

# Settings that may change between a run and its resumption (config.resumable: they do not change
# the weights). Checkpoints are resharded on load, so the process count and the strategy may change.
RESUMABLE_SETTINGS = resumable_keys(DistillConfig)
# A loss median below this counts as this much in the loss-spike check (distill.spike_loss_factor):
# a KL near zero would otherwise "spike" on batch noise.
SPIKE_LOSS_FLOOR = 0.5
LOGS = "logs"  # under torchrun: rank<N>.log, the traceback of a rank that failed unexpectedly
FINAL_STAGING = ".final"  # the final model is written here, then its files move into the run folder


def _check_run_dir(run_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse a folder that holds something else, or a run started with other settings."""
    marker = run_dir / "distill_run.json"
    if marker.exists():
        old = json.loads(marker.read_text())
        diffs = []
        for key in sorted(set(old) | set(settings)):
            if key == "config":
                for k in sorted(set(old.get(key, {})) | set(settings[key])):
                    if k in RESUMABLE_SETTINGS:
                        continue
                    if old.get(key, {}).get(k) != settings[key].get(k):
                        diffs.append(f"{k}: {old.get(key, {}).get(k)!r} -> {settings[key].get(k)!r}")
            elif old.get(key) != settings.get(key):
                diffs.append(f"{key}: {old.get(key)!r} -> {settings.get(key)!r}")
        if diffs:
            raise MinitronError(
                f"{run_dir} holds a run started with other settings ({'; '.join(diffs)}); rerun "
                f"with the same settings to resume it, or choose another --output")
        return
    if run_dir.exists() and any(p for p in run_dir.iterdir()
                                if not p.name.startswith(".tmp-") and p.name != LOGS):
        raise MinitronError(f"output folder {run_dir} is not empty and holds no distillation run; "
                            f"choose a new or empty --output")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, settings)


def _clean_leftovers(run_dir: Path) -> None:
    """What a killed run of this folder left (`clean_stale`): a half-written checkpoint, a
    half-written final model; never what a live process is still writing."""
    for name in (CKPT, FINAL_STAGING):
        for leftover in clean_stale(run_dir / name):
            print(f"[minitron] removed {leftover.name}, left by an interrupted distillation",
                  file=sys.stderr)


def _param_groups(model: nn.Module, extra: nn.Module | None, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for module in (model, extra):
        if module is None:
            continue
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class _Loop:
    """Everything one training phase holds: models, optimizer, data, logs and progress. The
    functions below are its steps (set up, resume, one loss step, evaluate, checkpoint, the loop)."""

    config: DistillConfig
    phase: str
    run_dir: Path
    device: torch.device  # the student's, taken before wrapping (FSDP2 makes its parameters DTensors)
    student: nn.Module
    trainee: _Trainee
    model: nn.Module  # the trainee, or DDP / FSDP2 around it
    aliases: dict[str, str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_blocks: torch.Tensor
    eval_blocks: torch.Tensor
    eval_teacher: nn.Module | None
    kd: bool
    fused: bool
    projections: nn.ModuleList | None
    cache: Any = None  # a TeacherCache read instead of running the teacher
    state: dict[str, Any] = dataclasses.field(default_factory=dict)
    log: Any = None
    last_ckpt_step: int | None = None
    pending: tuple[dict[str, Any], dict[str, Any]] | None = None  # (state, RNG) not yet confirmed
    saving: PendingCheckpoint | None = None  # a confirmed checkpoint being written (async)
    checkpoint_group: dist.ProcessGroup | None = None  # async_checkpoint's, with several ranks
    start_step: int = 0
    bar: Any = None

    @property
    def steps(self) -> int:
        return self.config.steps

    def autocast(self):
        return precision.autocast(self.config.precision, self.device)


def _setup_model(student: nn.Module, teacher: nn.Module | None, config: DistillConfig, kd: bool):
    """Student in training mode, its projections, the trainee and the wrapper around it."""
    projections = make_projections(teacher, student, config) if kd and config.intermediate else None
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    from minitron.models import decoder_layers

    checkpointed = _checkpointed_layers(student, teacher, config)
    if checkpointed:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in decoder_layers(student)[checkpointed:]:  # selective: the first ones only
            layer.gradient_checkpointing = False
    trainee = _Trainee(student, projections)
    aliases = distributed.tied_aliases(trainee)
    model = distributed.wrap_model(trainee, config.strategy, config.precision,
                                   config.hsdp_shard_size)
    return projections, trainee, aliases, model


def _checkpointed_layers(student: nn.Module, teacher: nn.Module | None,
                         config: DistillConfig) -> int:
    """How many of the student's decoder layers recompute activations: all or none as
    `gradient_checkpointing` says, or the memory plan's choice when it is null."""
    from minitron import memory_plan
    from minitron.models import decoder_layers

    layers = len(decoder_layers(student))
    if config.gradient_checkpointing is not None:
        return layers if config.gradient_checkpointing else 0
    device = next(student.parameters()).device
    gpu = (int(config.gpu_memory_gib * memory_plan.GIB) if config.gpu_memory_gib
           else memory_plan.detected_gpu_bytes() if device.type == "cuda" else None)
    t_cfg = (teacher.config if teacher is not None else student.config).to_dict()
    t_dtype = str(next(teacher.parameters()).dtype).removeprefix("torch.") if teacher else None
    strategy = distributed.strategy(config.strategy, torch.device("cuda" if gpu else device.type))
    return memory_plan.choose_checkpointing(
        t_cfg, student.config.to_dict(), config, distributed.world(), t_dtype, strategy, gpu,
        per_node=int(os.environ.get("LOCAL_WORLD_SIZE", distributed.world())))


def _setup_optimizer(trainee: _Trainee, config: DistillConfig):
    """AdamW (decay on matrices only) and the warmup + cosine schedule. Called after wrapping:
    FSDP2 swaps the parameters for sharded ones, which the optimizer must hold."""
    optimizer = torch.optim.AdamW(_param_groups(trainee.student, trainee.projections,
                                                config.weight_decay),
                                  lr=config.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = int(config.warmup_fraction * config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.steps, warmup, config.min_lr_ratio))
    return optimizer, scheduler


def _resume(loop: _Loop) -> None:
    """Load the newest checkpoint of the run folder if there is one (else seed), open the log."""
    config, rank, world = loop.config, distributed.rank(), distributed.world()
    ckpt = distributed.on_rank0(lambda: find_checkpoint(loop.run_dir))
    loop.state = {"step": 0, "tokens": 0, "train_time_s": 0.0}
    if ckpt is not None:
        loop.state = load_checkpoint(ckpt, loop.trainee, loop.optimizer, loop.scheduler,
                                     loop.aliases)
        if rank == 0:
            print(f"[minitron] {loop.phase}: resuming from step {loop.state['step']}/{loop.steps} "
                  f"({ckpt})" + (f" on {world} processes" if world > 1 else ""))
    else:
        torch.manual_seed(config.seed)
        random.seed(config.seed)
    loop.start_step = loop.state["step"]
    loop.log = (MetricsLog(loop.run_dir / "metrics.jsonl",
                           keep_up_to=loop.start_step if ckpt is not None else -1)
                if rank == 0 else NullLog())
    loop.last_ckpt_step = loop.start_step if ckpt is not None else None


def _set_loss(loop: _Loop, teacher: nn.Module | None) -> LossSetup:
    """The trainee's loss inputs: teacher, its LM head for the fused form, the layer captures."""
    config = loop.config
    teacher_head = None
    if loop.fused and teacher is not None:
        teacher_head = teacher.get_output_embeddings().weight.detach().to(loop.device)
    captures: list[_Capture] = []
    if loop.projections is not None:
        captures = [_Capture(teacher, [t for t, _ in config.intermediate]),
                    _Capture(loop.student, [s for _, s in config.intermediate])]
    loop.trainee.setup = LossSetup(teacher if loop.kd else None, config, teacher_head, loop.fused,
                                   captures, loop.eval_teacher, loop.cache)
    return loop.trainee.setup


def _evaluate(loop: _Loop, step: int) -> dict[str, Any]:
    """Held-out metrics at `step`. Each rank evaluates its share of the eval set through the
    wrapper (an FSDP forward is collective); the sums are added over ranks, so every rank has the
    numbers; rank 0 logs."""
    config = loop.config
    rec = {"kind": "eval", "step": step, "tokens": step * config.tokens_per_step}
    with loop.autocast():
        rec.update(evaluate_student(loop.model, loop.eval_teacher, loop.eval_blocks,
                                    config.eval_batch_size,
                                    shard=(distributed.rank(), distributed.world())))
    loop.log.write(rec)
    msg = ", ".join(f"{k} {v:.4g}" for k, v in rec.items() if k not in ("kind", "step", "tokens"))
    if distributed.rank() == 0:
        print(f"[minitron] {loop.phase} step {step}/{loop.steps}: {msg}", file=sys.stderr)
    return rec


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A micro-batch's host tensor on `device`: to a GPU through pinned memory without blocking
    (the copy overlaps the work queued before it; the caching host allocator keeps the pinned
    block until the copy has run), elsewhere a plain copy (no pinning without CUDA)."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _loss_step(loop: _Loop, step: int, captures: list[_Capture]):
    """Forward and backward of one optimizer step's micro-batches; returns the global batch's loss
    and intermediate loss (averaged over ranks: every rank gets the same values)."""
    config, device = loop.config, loop.device
    rank, world = distributed.rank(), distributed.world()
    total = torch.zeros((), device=device)
    inter_total = torch.zeros((), device=device)
    n_micro = micro_steps(config, world)
    for micro in range(n_micro):
        rows = batch_indices(step, micro, len(loop.train_blocks), config, rank, world)
        host_ids = loop.train_blocks[rows]
        ids = to_device(host_ids, device)
        # Chat shards carry a loss mask beside the tokens (prompt tokens excluded).
        mask = (to_device(loop.train_blocks.mask(rows), device)
                if getattr(loop.train_blocks, "has_mask", False) else None)
        last = micro == n_micro - 1
        kw = {}
        if loop.cache is not None:  # read by row inside the forward; the tokens checked here
            loop.cache.check_ids(rows, host_ids)
            kw["rows"] = rows
        with distributed.grad_sync(loop.model, last, config.fsdp_unsynced_accum):
            with loop.autocast():
                loss, inter = loop.model(ids, loss=True, mask=mask, **kw)
            (loss / n_micro).backward()
        total += loss.detach() / n_micro
        if inter is not None:
            inter_total += inter / n_micro
        for c in captures:
            c.outputs.clear()
    total, inter_total = distributed.mean_over_ranks(torch.stack([total, inter_total])).unbind()
    return total, inter_total


def _clip_and_check(loop: _Loop, step: int, loss_value: float) -> torch.Tensor:
    """Clip the gradients; stop every rank at the same step when the loss or the gradient norm is
    not finite or spikes (`_spike`). The loss is the global batch's and the norm the global one,
    so every rank decides the same and no rank is left waiting in a collective."""
    config = loop.config
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for g in loop.optimizer.param_groups for p in g["params"]],
        config.clip_grad if config.clip_grad > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP: the global norm
        grad_norm = grad_norm.full_tensor()
    norm = grad_norm.item()
    if not math.isfinite(loss_value) or not math.isfinite(norm):
        what = "loss" if not math.isfinite(loss_value) else "gradient norm"
        value = loss_value if what == "loss" else norm
        _stop(loop, step, f"non-finite {what}", f"the {what} became {value} at step "
                                                 f"{step + 1}/{loop.steps}")
    spike = _spike(loop, loss_value, norm)
    if spike is not None:
        _stop(loop, step, "divergence", f"the training is diverging at step {step + 1}/"
                                         f"{loop.steps}: {spike}")
    return grad_norm


def _spike(loop: _Loop, loss_value: float, norm: float) -> str | None:
    """What spiked at this step (the loss or the gradient norm, against its running median over
    the last `spike_window` healthy steps), or None: then the step joins the history, which the
    checkpoints carry, so a resumed run checks against the same medians."""
    config = loop.config
    history = loop.state.setdefault("health", {"loss": [], "grad_norm": []})
    if history["loss"]:
        loss_median = statistics.median(history["loss"])
        norm_median = statistics.median(history["grad_norm"])
        n = len(history["loss"])
        if config.spike_loss_factor and loss_value > config.spike_loss_factor * max(
                loss_median, SPIKE_LOSS_FLOOR):
            return (f"the loss jumped to {loss_value:.4g}, {loss_value / loss_median:.3g} times "
                    f"its median {loss_median:.4g} over the last {n} steps (distill.spike_loss_factor="
                    f"{config.spike_loss_factor})")
        if config.spike_grad_factor and norm > config.spike_grad_factor * norm_median:
            return (f"the gradient norm jumped to {norm:.4g}, {norm / norm_median:.3g} times its "
                    f"median {norm_median:.4g} over the last {n} steps (distill.spike_grad_factor="
                    f"{config.spike_grad_factor})")
    window = config.spike_window
    history["loss"] = (history["loss"] + [loss_value])[-window:]
    history["grad_norm"] = (history["grad_norm"] + [norm])[-window:]
    return None


def _stop(loop: _Loop, step: int, reason: str, what: str) -> None:
    """Stop the phase at `step`, before its update, naming the checkpoint that is kept: one whose
    weights the following step found healthy (`_confirm_checkpoint`), so from before the trouble."""
    config = loop.config
    _await_checkpoint(loop)  # the message names a checkpoint that is on disk
    loop.log.write({"kind": "stopped", "step": step + 1, "reason": reason})
    kept = (f"the last good checkpoint (step {loop.last_ckpt_step}) in {loop.run_dir / CKPT} "
            f"is intact" if loop.last_ckpt_step is not None
            else "no checkpoint had been written yet")
    raise MinitronError(
        f"{loop.phase} stopped: {what}; the weights were not updated and {kept}. Lower the "
        f"learning rate (lr={config.lr}) in a new --output, check the data, or resume from the "
        f"checkpoint by rerunning the command")


def _confirm_checkpoint(loop: _Loop) -> None:
    """Write the checkpoint `_after_step` deferred: this step's loss and gradient norm, computed
    from its weights, passed the checks, so they are not the weights of a diverging update. The
    weights, optimizer and scheduler are still those of that step (this step's update comes
    after); its RNG state was taken then."""
    if loop.pending is None:
        return
    state, rng = loop.pending
    loop.pending = None
    if loop.config.async_checkpoint:
        _await_checkpoint(loop)  # one write at a time; the previous one is committed first
        loop.saving = save_checkpoint_async(loop.run_dir, loop.trainee, loop.optimizer,
                                            loop.scheduler, state, loop.aliases, rng,
                                            loop.checkpoint_group)
        return
    save_checkpoint(loop.run_dir, loop.trainee, loop.optimizer, loop.scheduler, state,
                    loop.aliases, rng=rng)
    loop.last_ckpt_step = state["step"]


def _await_checkpoint(loop: _Loop) -> None:
    """Collective: wait for the checkpoint being written in the background, and commit it."""
    if loop.saving is not None:
        loop.saving.wait()
        loop.last_ckpt_step = loop.saving.step
        loop.saving = None


def _after_step(loop: _Loop, done: int, dt: float, loss_value: float, grad_norm: torch.Tensor,
                inter_total: torch.Tensor, last_eval: dict | None) -> dict | None:
    """The cadence after optimizer step `done`: metrics, progress, evaluation, checkpoint."""
    config, state = loop.config, loop.state
    state["step"], state["tokens"] = done, done * config.tokens_per_step
    state["train_time_s"] += dt  # training steps only: eval and checkpoints excluded
    tok_s = config.tokens_per_step / max(dt, 1e-9)
    if done % config.log_every == 0 or done == loop.steps:
        rec = {"kind": "train", "step": done, "tokens": state["tokens"], "loss": loss_value,
               "lr": loop.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
               "tokens_per_s": tok_s}
        if loop.projections is not None:
            rec["intermediate_loss"] = inter_total.item()
        loop.log.write(rec)
    if loop.bar is not None:
        loop.bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:.0f}")
        loop.bar.update(1)
    if done % config.eval_every == 0 or done == loop.steps:
        last_eval = _evaluate(loop, done)
    if done % config.checkpoint_every == 0 or done == loop.steps:
        # Deferred to the next step's checks (the last step's weights are the result anyway).
        loop.pending = ({**copy.deepcopy(state), "phase": loop.phase}, rng_state())
        if done == loop.steps:
            _confirm_checkpoint(loop)
    return last_eval


def _run_steps(loop: _Loop, captures: list[_Capture], on_step: Callable[[int], None] | None,
               last_eval: dict[str, Any] | None) -> dict[str, Any]:
    """The loop: loss step, optimizer step and cadence per step; a final evaluation if the last
    step had none."""
    for step in range(loop.start_step, loop.steps):
        t0 = time.perf_counter()
        total, inter_total = _loss_step(loop, step, captures)
        loss_value = total.item()  # one host sync per optimizer step
        grad_norm = _clip_and_check(loop, step, loss_value)
        _confirm_checkpoint(loop)
        loop.optimizer.step()
        loop.scheduler.step()
        loop.optimizer.zero_grad(set_to_none=True)
        if loop.saving is not None:
            loop.saving.commit_if_written()  # no collective: each rank when its write is done
        last_eval = _after_step(loop, step + 1, time.perf_counter() - t0, loss_value, grad_norm,
                                inter_total, last_eval)
        if on_step is not None:
            on_step(step + 1)
    if last_eval is None or last_eval["step"] != loop.steps:
        last_eval = _evaluate(loop, loop.steps)
    _await_checkpoint(loop)  # before the final model is written (and the checkpoint removed)
    return last_eval


def _final_metrics(loop: _Loop, last_eval: dict[str, Any], run_time: float) -> dict[str, Any]:
    config, steps = loop.config, loop.steps
    train_time = loop.state["train_time_s"]
    metrics = {k: v for k, v in last_eval.items() if k not in ("kind", "step", "tokens")}
    metrics.update({
        "steps": steps, "train_tokens": config.train_tokens,
        "train_time_s": round(train_time, 2),
        # Student tokens per second of training steps, teacher forward included (eval excluded).
        "train_tokens_per_s": round(config.train_tokens / max(train_time, 1e-9), 1),
        "this_session_tokens": (steps - loop.start_step) * config.tokens_per_step,
        "this_session_wall_s": round(run_time, 2),
        "loss_impl": ("fused" if loop.fused else "logits") if loop.kd else "cross_entropy",
    })
    if loop.cache is not None:
        metrics["teacher_cache"] = {"path": str(loop.cache.folder), "k": loop.cache.k,
                                    "fingerprint": loop.cache.fingerprint}
    return metrics


def _train(
    student: nn.Module,
    teacher: nn.Module | None,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor,
    config: DistillConfig,
    run_dir: Path,
    phase: str,
    on_step: Callable[[int], None] | None = None,
    eval_teacher: nn.Module | None = None,
    cache: Any = None,
) -> dict[str, Any]:
    """Train `student` in place for config.steps optimizer steps, checkpointing into run_dir.

    `teacher=None` or a baseline means cross-entropy on the data; otherwise the KD loss.
    `eval_teacher` (the teacher, also for baselines) adds KL and agreement to each eval.
    Returns the final metrics. `on_step(step)` runs after each optimizer step and checkpoint
    (tests use it to interrupt a run). Under torch.distributed every rank calls it: each takes its
    share of every micro-batch, the loss is averaged over ranks, rank 0 alone logs and writes.
    """
    device = _device_of(student)
    check_world(config, distributed.world(), "world size")
    kd = (teacher is not None or cache is not None) and config.baseline is None
    fused = kd and _use_fused(config, student.config.vocab_size, student.config)
    projections, trainee, aliases, model = _setup_model(student, teacher, config, kd)
    optimizer, scheduler = _setup_optimizer(trainee, config)
    loop = _Loop(config=config, phase=phase, run_dir=run_dir, device=device, student=student,
                 trainee=trainee, model=model, aliases=aliases, optimizer=optimizer,
                 scheduler=scheduler, train_blocks=train_blocks, eval_blocks=eval_blocks,
                 eval_teacher=eval_teacher, kd=kd, fused=fused, projections=projections,
                 cache=cache if kd else None, checkpoint_group=_checkpoint_group(config))
    _resume(loop)
    captures = _set_loss(loop, teacher).captures
    if config.progress and distributed.rank() == 0:
        from tqdm import tqdm

        loop.bar = tqdm(total=loop.steps, initial=loop.start_step, desc=phase, unit="step",
                        dynamic_ncols=True, file=sys.stderr)
    try:
        last_eval = _evaluate(loop, 0) if loop.start_step == 0 else None
        t_train = time.perf_counter()  # the step-0 evaluation is not training time
        last_eval = _run_steps(loop, captures, on_step, last_eval)
    finally:
        if loop.saving is not None:  # failing: keep a finished write, wait for no other rank
            loop.saving.commit_if_written()
        if loop.bar is not None:
            loop.bar.close()
        for c in captures:
            c.close()
        if student.is_gradient_checkpointing:
            student.gradient_checkpointing_disable()
    student.eval()
    return _final_metrics(loop, last_eval, time.perf_counter() - t_train)


def _checkpoint_group(config: DistillConfig) -> dist.ProcessGroup | None:
    """With `async_checkpoint` under torch.distributed, a gloo group of all ranks for the
    background writes alone (collective: every rank creates it): async_save's thread runs DCP's
    plan and result exchanges, which on the training's default group could interleave with the
    training's own collectives (gloo on the CPU also when training runs on NCCL: async_save
    needs a CPU backend). None otherwise."""
    if not (config.async_checkpoint and distributed.dist_on()):
        return None
    return dist.new_group(backend="gloo")
