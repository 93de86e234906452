"""Teacher -> student distillation: the loop that gives a pruned model its quality back.

A frozen teacher (eval mode, no grad, its own dtype and device) teaches a trainable student with the
forward-KL kernel of `minitron.kernels` on the logits (the fused linear+KL form when the vocabulary
is large, so [N, V] logits never exist at once), optionally mixed with cross-entropy on the data
(`alpha`) and an intermediate-state loss between chosen layers. An optional first phase fine-tunes the
teacher with plain cross-entropy ("teacher correction"). Two baselines run in the same harness:
cross-entropy retraining of the pruned model (`baseline="ce"`) and the pruned shape trained from a
random initialization (`baseline="scratch"`).

Every run lives in one output folder: `checkpoint/` (latest; atomic), `metrics.jsonl`, `loss.png`
(those three: `minitron.checkpoint`), `distill_run.json` (the settings the run was started with)
and, at the end, the student as a plain Hugging Face checkpoint with `minitron.json`. Rerunning the
same command resumes from the checkpoint in the same data order; a finished run is not repeated.

`python -m minitron.distill --teacher T --student S --output DIR [distill.tokens=N]
 [distill.baseline=ce|scratch] ...` (`--help` lists every setting; `--tokens N` and the like are aliases)

Past one device the same command runs under torchrun (`torchrun --nproc_per_node=K -m
minitron.distill ...`, or `distill.nproc_per_node=K`, which starts the processes itself): PyTorch's FSDP2
(`fully_shard`) or DDP splits the student, each rank reads a disjoint share of every global batch
(`batch_indices`), checkpoints are sharded (torch.distributed.checkpoint: each rank writes its part;
they resume on any process count), and rank 0 alone writes the other files and logs. One process is the K=1 case of the same loop, with no wrapper. That
process plumbing (torchrun, the process group, DDP/FSDP2, gathered state) is `minitron.distributed`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minitron import distributed, precision
from minitron.checkpoint import (CKPT, MetricsLog, NullLog, PendingCheckpoint, find_checkpoint,
                                 load_checkpoint, plot_losses, rng_state, save_checkpoint,
                                 save_checkpoint_async)
from minitron.common import (MinitronError, StageTimer, atomic_dir, check_writable, clean_stale,
                             format_table, run_cli, write_json_atomic)
from minitron.config import (DataConfig, DistillConfig, ModelConfig, TeacherCorrectionConfig,
                             check_correction, check_world, resumable_keys)
from minitron.models import logit_softcap, parse_dtype

# Above this vocabulary size `loss_impl="auto"` takes the fused linear+KL form.
FUSED_MIN_VOCAB = 32_768
IGNORE_INDEX = -100
# Settings that may change between a run and its resumption (config.resumable: they do not change
# the weights). Checkpoints are resharded on load, so the process count and the strategy may change.
RESUMABLE_SETTINGS = resumable_keys(DistillConfig)
# A loss median below this counts as this much in the loss-spike check (distill.spike_loss_factor):
# a KL near zero would otherwise "spike" on batch noise.
SPIKE_LOSS_FLOOR = 0.5
LOGS = "logs"  # under torchrun: rank<N>.log, the traceback of a rank that failed unexpectedly
FINAL_STAGING = ".final"  # the final model is written here, then its files move into the run folder
# The settings the command takes (minitron.cli); the models are --teacher and --student. The
# distill section comes first, so `--tokens` and `--lr` are its aliases (teacher_correction.tokens
# is set by name).
CLI_KEYS = {"distill": None, "teacher_correction": None,
            "model": ("dtype", "device", "trust_remote_code"),
            "data": ("source", "text_field")}


# ----------------------------------------------------------------------------- schedule and data
def micro_steps(config: DistillConfig, world: int) -> int:
    """Forward/backward passes per process per optimizer step."""
    if config.micro_batch_size is None:
        return config.grad_accum
    return config.batch_size * config.grad_accum // (config.micro_batch_size * world)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step`: linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, micro: int, n_blocks: int, config: DistillConfig,
                  rank: int = 0, world: int = 1) -> torch.Tensor:
    """Block indices of one rank's micro-batch: a pure function of (seed, step, micro).

    Global sample g = (step * grad_accum + micro) * batch_size + j walks a fresh seeded permutation
    of the train blocks each epoch; rank r of `world` takes the samples with j % world == r, so ranks
    read disjoint shares and the global order does not depend on the process count. With a
    per-process `micro_batch_size` m, the step's samples are cut into runs of m and run
    micro * world + r goes to rank r: the same samples per step, whatever the process count.

    With `config.skip_blocks` = s (blocks an earlier stage read), the run's own blocks are rows
    [s, n_blocks) and the permutation walks those only, so a later stage never repeats one.
    """
    if config.micro_batch_size is not None:
        m = config.micro_batch_size
        start = step * config.batch_size * config.grad_accum + (micro * world + rank) * m
        samples = range(start, start + m)
    else:
        start = (step * config.grad_accum + micro) * config.batch_size
        samples = range(start + rank, start + config.batch_size, world)
    skip = config.skip_blocks
    own = n_blocks - skip
    out = []
    for g in samples:
        epoch, pos = divmod(g, own)
        out.append(skip + int(_permutation(own, config.seed, epoch)[pos]))
    return torch.tensor(out, dtype=torch.long)


_PERM_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 8:
            _PERM_CACHE.clear()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _PERM_CACHE[key] = torch.randperm(n, generator=gen)
    return _PERM_CACHE[key]


def blocks_fingerprint(blocks) -> str:
    """Shards' blocks (`minitron.shards.BlockView`) name their manifest's fingerprint, so nothing
    hashes a corpus; an in-memory tensor is hashed."""
    if hasattr(blocks, "fingerprint"):
        return blocks.fingerprint
    return hashlib.sha1(blocks.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- model plumbing
@dataclass
class LossSetup:
    """What the trainee's loss needs besides the batch: the frozen teacher (None: cross-entropy on
    the data), the settings, the teacher's LM head for the fused form, and the layer captures."""

    teacher: nn.Module | None
    config: DistillConfig
    teacher_head: torch.Tensor | None = None
    fused: bool = False
    captures: list["_Capture"] = dataclasses.field(default_factory=list)
    eval_teacher: nn.Module | None = None  # for evaluation sums inside the wrapper's forward
    cache: Any = None  # a minitron.teacher_cache.TeacherCache that stands in for the teacher


class _Trainee(nn.Module):
    """The student and its intermediate-loss projections as the one module DDP/FSDP wrap.

    Its forward computes the whole training loss (teacher forward included, under no_grad), so every
    trainable parameter is used inside the wrapper's forward and gradient sync is never bypassed;
    without a loss (`trainee(ids)`) it is the student (evaluation goes through the wrapper too).
    `setup` is set by the loop once the module is wrapped (the teacher is not a submodule).
    """

    def __init__(self, student: nn.Module, projections: nn.ModuleList | None):
        super().__init__()
        self.student = student
        self.projections = projections if projections is not None else nn.ModuleList()
        self.setup: LossSetup | None = None

    def forward(self, ids: torch.Tensor, loss: bool = False, eval_sums: bool = False,
                mask: torch.Tensor | None = None, rows: torch.Tensor | None = None):
        if eval_sums:  # inside the wrapper's forward: FSDP has the root's weights gathered
            from minitron.evaluate import batch_metric_sums

            return batch_metric_sums(self.student, self.setup.eval_teacher, ids)
        if not loss:
            return self.student(ids, use_cache=False)
        a = self.setup
        if a.cache is not None:  # the batch's block rows index the cache (ints: FSDP leaves them)
            return _cached_kd_loss(self.student, a.cache, rows, ids, a.config, a.fused, mask), None
        return _micro_loss(self.student, a.teacher, ids, a.config, a.teacher_head, a.fused,
                           self.projections if a.captures else None, a.captures, mask)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def freeze_(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def reinitialize_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights in the model's own shape (the from-scratch baseline), seeded."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    model.load_state_dict(fresh.state_dict())
    return model


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _Capture:
    """Forward hooks that keep the outputs of chosen decoder layers for the intermediate loss."""

    def __init__(self, model: nn.Module, layers: list[int]):
        from minitron.models import decoder_layers

        self.outputs: dict[int, torch.Tensor] = {}
        modules = decoder_layers(model)
        self.handles = [modules[i].register_forward_hook(self._hook(i)) for i in layers]

    def _hook(self, i: int) -> Callable:
        def hook(_module, _inputs, out):
            self.outputs[i] = _layer_output(out)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.outputs.clear()


def make_projections(teacher: nn.Module, student: nn.Module, config: DistillConfig) -> nn.ModuleList:
    """One learned linear map (student width -> teacher width) per intermediate pair, or Identity."""
    from minitron.models import decoder_layers

    n_t, n_s = len(decoder_layers(teacher)), len(decoder_layers(student))
    for t, s in config.intermediate:
        if t >= n_t or s >= n_s:
            raise MinitronError(
                f"intermediate pair {t}:{s} is out of range: the teacher has layers 0..{n_t - 1}, "
                f"the student 0..{n_s - 1}")
    h_t, h_s = teacher.config.hidden_size, student.config.hidden_size
    torch.manual_seed(config.seed)
    maps = nn.ModuleList()
    for _ in config.intermediate:
        if h_t == h_s:
            maps.append(nn.Identity())
        else:
            lin = nn.Linear(h_s, h_t, bias=False)
            # Start as a slice of the identity: pruned channels are a subset of the teacher's.
            nn.init.eye_(lin.weight)
            maps.append(lin)
    return maps.to(_device_of(student))


def intermediate_loss(s: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over tokens of 1 - cos(s, t), or MSE(s, t) / mean(t^2) (scale-free: residual streams of
    LLMs carry large outlier channels, so a raw MSE would dwarf the logit loss)."""
    s, t = s.float(), t.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)


def _use_fused(config: DistillConfig, vocab: int, model_config: Any = None) -> bool:
    # The fused kernel forms logits as hidden @ W^T itself, so it cannot apply a family's final
    # logit soft-capping (Gemma 2): such models take the logits path, where the model applies it.
    softcap = logit_softcap(model_config) if model_config is not None else None
    if softcap is not None:
        if config.loss_impl == "fused":
            raise MinitronError(f"loss_impl='fused' cannot be used with this model: it soft-caps "
                                f"its logits (final_logit_softcapping={softcap}), which the fused "
                                f"kernel does not apply; use loss_impl 'auto' or 'logits'")
        return False
    if config.loss_impl == "fused":
        return True
    return config.loss_impl == "auto" and vocab >= FUSED_MIN_VOCAB


# ----------------------------------------------------------------------------- the loss
def _next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """labels[:, i] = ids[:, i+1]; the last position has no next token (ignored)."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    return labels


def position_mask(token_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Which positions' predictions count: position i predicts token i + 1, so it counts when that
    token does (a reply token of a conversation); the last position has no next token."""
    if token_mask is None:
        return None
    pos = torch.zeros_like(token_mask, dtype=torch.bool)
    pos[:, :-1] = token_mask[:, 1:]
    return pos


def _ce_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    logits = model(ids, use_cache=False).logits
    flat = logits[:, :-1].float().reshape(-1, logits.size(-1))
    if mask is None:
        return F.cross_entropy(flat, ids[:, 1:].reshape(-1))
    # Mean over the counted targets; a batch of prompts only contributes 0 (not 0/0).
    labels = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), IGNORE_INDEX).reshape(-1)
    total = F.cross_entropy(flat, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _kd_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, config: DistillConfig,
             teacher_head: torch.Tensor | None, fused: bool,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - alpha) * divergence(teacher || student) + alpha * CE, through the kernel in one pass.

    `mask` (bool [B, T], per token; chat data) restricts both terms to the positions that predict
    reply tokens (the kernel's mean is over those; 0 when there are none)."""
    from minitron import kernels

    # KL counts every position (the last one has a teacher distribution too); CE every position
    # but the last (no next token). The kernel's mean divides both by all positions.
    labels = _next_token_labels(ids) if config.alpha > 0 else None
    ce_weight = config.alpha / (1 - config.alpha) if config.alpha > 0 else 0.0
    kw = dict(temperature=config.temperature, divergence=config.divergence, beta=config.beta,
              labels=labels.reshape(-1) if labels is not None else None, ce_weight=ce_weight,
              ignore_index=IGNORE_INDEX, check_labels=False)  # `distill` checked the token ids
    if mask is not None:
        kw["mask"] = position_mask(mask).reshape(-1)
    t_ids = ids.to(_device_of(teacher))
    dev = ids.device
    if fused:
        with torch.no_grad():
            t_hidden = teacher.get_decoder()(t_ids, use_cache=False).last_hidden_state.to(dev)
        s_hidden = student.get_decoder()(ids, use_cache=False).last_hidden_state
        s_head = student.get_output_embeddings().weight
        loss = kernels.fused_linear_softmax_kl(
            s_hidden.reshape(-1, s_hidden.size(-1)), s_head,
            t_hidden.reshape(-1, t_hidden.size(-1)), teacher_head, **kw)
    else:
        with torch.no_grad():
            t_logits = teacher(t_ids, use_cache=False).logits.to(dev)
        s_logits = student(ids, use_cache=False).logits
        loss = kernels.softmax_kl(s_logits.reshape(-1, s_logits.size(-1)),
                                  t_logits.reshape(-1, t_logits.size(-1)), **kw)
    return loss * (1 - config.alpha)


def _cached_kd_loss(student: nn.Module, cache, rows: torch.Tensor, ids: torch.Tensor,
                    config: DistillConfig, fused: bool,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """`_kd_loss` with the teacher read from a cache (`minitron.teacher_cache`): the sparse forward
    KL over the cached top-k + tail (minitron/kernels/sparse_kl.py) at T = 1, the same CE mix and
    mask, the same chunked hidden-state form when `fused`."""
    from minitron.kernels.sparse_kl import fused_linear_sparse_kl, sparse_kl

    t = cache.targets(rows).to(ids.device)
    labels = _next_token_labels(ids) if config.alpha > 0 else None
    kw = dict(labels=labels, ce_weight=config.alpha / (1 - config.alpha) if config.alpha else 0.0,
              ignore_index=IGNORE_INDEX)
    pos = position_mask(mask)
    if fused:
        s_hidden = student.get_decoder()(ids, use_cache=False).last_hidden_state
        loss = fused_linear_sparse_kl(s_hidden, student.get_output_embeddings().weight,
                                      t.top_logp, t.top_idx, t.log_tail, pos, **kw)
    else:
        s_logits = student(ids, use_cache=False).logits
        loss = sparse_kl(s_logits, t.top_logp, t.top_idx, t.log_tail, pos, **kw)
    return loss * (1 - config.alpha)


def _micro_loss(model: nn.Module, teacher: nn.Module | None, ids: torch.Tensor,
                config: DistillConfig, teacher_head: torch.Tensor | None, fused: bool,
                projections: nn.ModuleList | None, captures: list["_Capture"],
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-batch's training loss (and its intermediate part, detached, if any); `mask`
    (per token, chat data) selects the tokens the logit losses learn."""
    if teacher is None:
        return _ce_loss(model, ids, mask), None
    loss = _kd_loss(model, teacher, ids, config, teacher_head, fused, mask)
    if projections is None:
        return loss, None
    t_out, s_out = captures[0].outputs, captures[1].outputs
    inter = torch.zeros((), device=ids.device)
    for (t, s), proj in zip(config.intermediate, projections):
        inter = inter + intermediate_loss(proj(s_out[s]), t_out[t].to(ids.device),
                                          config.intermediate_loss)
    return loss + config.intermediate_weight * inter, inter.detach()


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_student(student: nn.Module, teacher: nn.Module | None, blocks: torch.Tensor,
                     batch_size: int, shard: tuple[int, int] = (0, 1)) -> dict[str, float]:
    """Held-out loss and perplexity, and (with a teacher) KL to it and top-1 agreement.

    From hidden states through chunked logits (`minitron.evaluate.metric_sums`): no [B, T, V]
    tensor. `student` is a plain model or the loop's (wrapped) trainee, whose forward computes the
    sums, so that FSDP gathers its weights. `shard=(rank, world)`: this rank evaluates blocks
    rank, rank + world, ... and the sums are added over ranks (every rank must call it then, and
    runs the same number of forwards: an FSDP forward is collective).
    """
    from minitron.evaluate import batch_metric_sums, metrics_from_sums

    rank, world = shard
    trainee = isinstance(getattr(student, "module", student), _Trainee)
    device = _device_of(student)
    mine = blocks[rank::world]
    n_batches = math.ceil(math.ceil(len(blocks) / world) / batch_size)  # the same on every rank
    was_training = student.training
    student.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    try:
        for i in range(n_batches):
            batch = mine[i * batch_size:(i + 1) * batch_size]
            padding = len(batch) == 0  # this rank's share ran out: a forward to keep step
            ids = (blocks[:1] if padding else batch).to(device)
            s = student(ids, eval_sums=True) if trainee else batch_metric_sums(student, teacher, ids)
            if not padding:
                sums += s
    finally:
        student.train(was_training)
    if world > 1:
        dist.all_reduce(sums)
    return metrics_from_sums(sums.cpu(), teacher is not None)


# ----------------------------------------------------------------------------- the loop
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


# ----------------------------------------------------------------------------- public entry points
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


def run_distill(
    teacher_path: str | os.PathLike | None,
    student_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: DistillConfig,
    *,
    correction: TeacherCorrectionConfig | None = None,
    data: DataConfig | None = None,
    model: ModelConfig | None = None,
) -> dict[str, Any]:
    """From model paths to a finished output folder (resuming a run that is already there).

    `data` gives the source and text field (the blocks are distillation's own: `config.block_size`,
    `config.seed`); `model` the teacher's dtype and the student's device (the student trains in
    float32). Under torchrun it joins the process group and runs as one rank. Outside torchrun
    with `config.nproc_per_node` > 1 it starts `python -m minitron.distill` with the same settings
    on that many local processes and waits (so a recipe can ask for K processes).
    """
    from minitron.models import check_same_tokenizer, load_config

    correction = correction or TeacherCorrectionConfig()
    data, model = data or DataConfig(), model or ModelConfig()
    check_correction(config, correction)
    out = Path(output_dir)
    for name, path in (("--teacher", teacher_path), ("--student", student_path)):
        if path is not None and Path(str(path)).expanduser().resolve() == out.expanduser().resolve():
            raise MinitronError(f"--output {out} is the {name} folder itself; choose another --output")
    done = _read_info(out).get("distillation", {})
    if done.get("status") == "finished":
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"[minitron] {out} holds a finished run; not repeating it")
        return done["metrics"]
    if config.uses_teacher and teacher_path is None and not config.uses_cache:
        raise MinitronError("distillation needs --teacher or distill.teacher_cache; without a "
                            "teacher use distill.baseline=ce or distill.baseline=scratch")
    # Cheap checks on the folders, configs and tokenizers before any weights load.
    trust = model.trust_remote_code
    s_cfg = load_config(student_path, trust)
    t_cfg = load_config(teacher_path, trust) if teacher_path is not None else None
    if teacher_path is not None:
        check_same_tokenizer(teacher_path, student_path, trust)
    check_writable(out, "--output")
    max_pos = min(c.max_position_embeddings for c in (s_cfg, t_cfg) if c is not None)
    if config.block_size > max_pos:
        raise MinitronError(f"distill.block_size={config.block_size} is longer than the models' "
                            f"context ({max_pos} positions); choose block_size <= {max_pos}")
    world = int(os.environ.get("WORLD_SIZE", config.nproc_per_node * config.nnodes))
    memory_plan_(t_cfg, s_cfg, config, correction, world, model, show=False)
    sections = {"distill": config, "teacher_correction": correction, "data": data, "model": model}
    if not distributed.under_torchrun() and (config.nproc_per_node > 1 or config.nnodes > 1):
        return _launch(teacher_path, student_path, out, sections)
    if distributed.under_torchrun():  # a failing rank's traceback goes there (child_failure)
        os.environ.setdefault(distributed.LOG_DIR_ENV, str(out / LOGS))
    with distributed.process_group(model.device, config.process_group_timeout_s) as device:
        try:
            return _run_rank(teacher_path, student_path, out, sections, device, max_pos)
        except MinitronError as e:
            if distributed.world() == 1:
                raise
            distributed.record_for_torchrun(e)
            raise MinitronError(f"rank {distributed.rank()}: {e}") from None


def memory_plan_(teacher_cfg, student_cfg, config: DistillConfig,
                 correction: TeacherCorrectionConfig, world: int, model: ModelConfig,
                 show: bool = True):
    """The per-GPU memory plan (`minitron.memory_plan`), printed if `show`; refuses a plan over
    `config.gpu_memory_gib` or, on a GPU, the detected memory. Returns the plan."""
    from minitron import memory_plan
    from minitron.models import default_device

    dev = torch.device(model.device or default_device())
    gpu = (int(config.gpu_memory_gib * memory_plan.GIB) if config.gpu_memory_gib
           else memory_plan.detected_gpu_bytes() if dev.type == "cuda" else None)
    # nodes: the setting's, or what a torchrun started by hand spans
    n_nodes = max(config.nnodes, int(os.environ.get("WORLD_SIZE", 1))
                  // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1))
    strategy = distributed.strategy(config.strategy, torch.device("cuda" if gpu else dev.type),
                                    n_nodes)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", config.nproc_per_node))
    checkpointed = None
    if config.gradient_checkpointing is None:  # the plan chooses (`_checkpointed_layers`)
        checkpointed = memory_plan.choose_checkpointing(teacher_cfg or student_cfg, student_cfg,
                                                        config, world, model.dtype, strategy,
                                                        gpu, per_node)
    plan = memory_plan.plan_distill(teacher_cfg or student_cfg, student_cfg, config, world,
                                    model.dtype, strategy, correction_tokens=correction.tokens,
                                    per_node=per_node, checkpointed=checkpointed)
    if show:
        print(format_table(plan.rows()))
        if checkpointed is not None:
            layers = memory_plan.Shape.of(student_cfg).layers
            print(f"activation checkpointing (chosen by the plan): {checkpointed} of {layers} "
                  f"decoder layers")
        print(f"estimated peak per GPU: {plan.peak / memory_plan.GIB:.1f} GiB on {world} "
              f"process(es), {strategy}" + (f", of {gpu / memory_plan.GIB:.1f} GiB" if gpu else ""))
    memory_plan.check_fits(plan, gpu)
    return plan


def _launch(teacher_path, student_path, out: Path, sections: dict[str, Any]) -> dict[str, Any]:
    """Run this same distillation on `nproc_per_node` local processes (torch's elastic launcher);
    each receives the settings on its command line, as `section.key=value` arguments."""
    from minitron import cli

    config = sections["distill"]
    k = config.nproc_per_node
    dev = sections["model"].device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and k > torch.cuda.device_count():
        raise MinitronError(f"distill.nproc_per_node={k} but this node has "
                            f"{torch.cuda.device_count()} GPU(s); choose nproc_per_node <= "
                            f"{torch.cuda.device_count()}")
    argv = ["--student", str(student_path), "--output", str(out)]
    if teacher_path is not None:
        argv += ["--teacher", str(teacher_path)]
    distributed.launch_torchrun("minitron.distill", argv + cli.as_overrides(sections, CLI_KEYS), k,
                                config.nnodes, config.rdzv_endpoint,
                                f"minitron-{out.resolve().name}", config.max_restarts)
    return json.loads((out / "minitron.json").read_text())["distillation"]["metrics"]


def _run_rank(teacher_path, student_path, out: Path, sections: dict[str, Any], device: str,
              max_pos: int) -> dict[str, Any]:
    """One process's part of `run_distill` (all of it when there is one process)."""
    from minitron.data import block_rule, load_blocks, open_blocks
    from minitron.models import load_model, resolve_model

    config, data, model = sections["distill"], sections["data"], sections["model"]
    teacher_device = config.teacher_device
    if distributed.dist_on() and teacher_device is not None and teacher_device.startswith("cuda"):
        teacher_device = device  # this rank's GPU
    teacher = None
    if teacher_path is not None and config.uses_cache:
        from minitron.teacher_cache import open_cache

        open_cache(config.teacher_cache).check_teacher(teacher_path)  # not loaded: the cache is it
    elif teacher_path is not None:
        teacher, _ = load_model(teacher_path, dtype=model.dtype, device=teacher_device or device,
                                trust_remote_code=model.trust_remote_code)
    # A teacher correction trains first: the student waits on the host until it is done.
    correction = sections["teacher_correction"]
    student, tokenizer = load_model(student_path, dtype="float32",
                                    device="cpu" if correction.tokens else device,
                                    trust_remote_code=model.trust_remote_code)
    # From a prepared folder the train blocks stay on disk and are read by index per micro-batch.
    train_blocks = open_blocks(tokenizer, "train", config.blocks_read, source=data.source,
                               block_size=config.block_size, seed=config.seed,
                               text_field=data.text_field, max_positions=max_pos)
    eval_blocks = load_blocks(tokenizer, "eval", config.eval_blocks, source=data.source,
                              block_size=config.block_size, seed=0, text_field=data.text_field,
                              max_positions=max_pos)
    info = _read_info(resolve_model(student_path, model.trust_remote_code))
    info = {"student_source": str(student_path),
            "student_dtype": _source_dtype(resolve_model(student_path, model.trust_remote_code)),
            "teacher": str(teacher_path) if teacher_path is not None else None,
            "data": {"source": data.source, "train_blocks": len(train_blocks),
                     "eval_blocks": len(eval_blocks), "block_size": config.block_size,
                     "blocks": block_rule(tokenizer)},
            "pruning": info or None}
    return distill(teacher, student, train_blocks, eval_blocks, config, out, tokenizer=tokenizer,
                   info=info, correction=correction, student_device=device)


# ----------------------------------------------------------------------------- CLI
def build_parser():
    from minitron import cli

    p = cli.stage_parser("python -m minitron.distill", __doc__.splitlines()[0], CLI_KEYS)
    p.add_argument("--teacher", help="teacher model: folder, hub id or 'smollm2-135m' "
                                     "(needed unless a baseline; with a baseline, only for eval KL)")
    p.add_argument("--student", required=True, help="student model folder (e.g. a pruned model)")
    p.add_argument("--output", required=True, help="run folder; the final HF model is written here")
    p.add_argument("--dry-run", action="store_true",
                   help="print the per-GPU memory plan from the model configs and stop")
    return p


def main(argv: list[str] | None = None) -> int:
    from minitron import cli

    args = cli.parse(build_parser(), argv)
    c = cli.configs(args)
    config = c["distill"]
    if args.dry_run:
        from minitron.models import load_config

        trust = c["model"].trust_remote_code
        t_cfg = load_config(args.teacher, trust, need_weights=False) if args.teacher else None
        memory_plan_(t_cfg, load_config(args.student, trust, need_weights=False), config, c["teacher_correction"],
                     config.nproc_per_node * config.nnodes, c["model"])
        return 0
    result = run_distill(args.teacher, args.student, args.output, config,
                         correction=c["teacher_correction"], data=c["data"], model=c["model"])
    launched = config.nproc_per_node > 1 or config.nnodes > 1
    if int(os.environ.get("RANK", 0)) != 0 or (launched and not distributed.under_torchrun()):
        return 0  # the summary comes from rank 0 (which the launcher's torchrun already ran)
    rows = []
    if "teacher" in result:
        rows.append({"model": "teacher", **_ppl_row(result["teacher"])})
    if result.get("start"):
        rows.append({"model": "student before training", **_ppl_row(result["start"])})
    rows.append({"model": f"student after {result.get('train_tokens')} tokens", **_ppl_row(result)})
    print(format_table(rows))
    print(f"wrote {args.output} ({result.get('train_tokens_per_s')} student tokens/s in training)")
    return 0


def _ppl_row(m: dict[str, Any]) -> dict[str, Any]:
    return {"eval_loss": m.get("eval_loss"), "perplexity": m.get("eval_perplexity"),
            "kl_to_teacher": m.get("kl_to_teacher"), "top1_agreement": m.get("top1_agreement")}


if __name__ == "__main__":
    run_cli(main)
