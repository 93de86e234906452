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

`python -m minitron.distill --teacher T --student S --output DIR [--tokens N] [--baseline ce|scratch]`

Past one device the same command runs under torchrun (`torchrun --nproc_per_node=K -m
minitron.distill ...`, or `--nproc-per-node K`, which starts torchrun itself): PyTorch's FSDP2
(`fully_shard`) or DDP splits the student, each rank reads a disjoint share of every global batch
(`batch_indices`), checkpoints are sharded (torch.distributed.checkpoint: each rank writes its part;
they resume on any process count), and rank 0 alone writes the other files and logs. One process is the K=1 case of the same loop, with no wrapper. That
process plumbing (torchrun, the process group, DDP/FSDP2, gathered state) is `minitron.distributed`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minitron import distributed, precision
from minitron.checkpoint import (CKPT, MetricsLog, NullLog, find_checkpoint, load_checkpoint,
                                 plot_losses, save_checkpoint)
from minitron.common import (MinitronError, StageTimer, atomic_dir, format_table, run_cli,
                             write_json_atomic)
from minitron.kernels.reference import DIVERGENCES
from minitron.models import logit_softcap

BASELINES = ("ce", "scratch")
INTERMEDIATE_LOSSES = ("cosine", "mse")
LOSS_IMPLS = ("auto", "logits", "fused")
# How the student is split across processes: auto = FSDP on GPUs, DDP on CPU (K=1: no wrapper).
STRATEGIES = ("auto", "ddp", "fsdp", "hsdp")
# Above this vocabulary size `loss_impl="auto"` takes the fused linear+KL form.
FUSED_MIN_VOCAB = 32_768
IGNORE_INDEX = -100
# Settings that may change between a run and its resumption (they do not change the weights).
# Checkpoints are resharded on load, so the process count and the strategy may change too.
RESUMABLE_SETTINGS = {"checkpoint_every", "eval_every", "log_every", "progress", "keep_checkpoint",
                      "strategy", "nproc_per_node", "micro_batch_size", "nnodes", "rdzv_endpoint",
                      "hsdp_shard_size", "process_group_timeout_s", "gpu_memory_gib"}


# ----------------------------------------------------------------------------- configuration
@dataclass
class DistillConfig:
    """Everything that shapes a distillation run; validated on construction."""

    tokens: int = 1_000_000                 # student training tokens (the budget)
    batch_size: int = 8                     # sequences per micro-batch
    block_size: int = 256                   # tokens per sequence
    grad_accum: int = 1                     # micro-batches per optimizer step
    # Sequences per process per forward; None: each micro-batch of batch_size is split over the
    # processes. When set, the global batch stays batch_size x grad_accum and each process runs
    # global / (micro_batch_size x processes) micro-steps per optimizer step (any process count
    # that divides it).
    micro_batch_size: int | None = None
    lr: float = 1e-4
    min_lr_ratio: float = 0.1               # cosine decays to lr * min_lr_ratio
    warmup_fraction: float = 0.05           # of the optimizer steps, linear warmup
    weight_decay: float = 0.1               # on matrices only (not norms or biases)
    clip_grad: float = 1.0                  # max global grad norm; 0 = off
    temperature: float = 1.0
    alpha: float = 0.0                      # loss = (1 - alpha) * divergence + alpha * CE
    divergence: str = "kl"                  # kl | reverse_kl | jsd
    beta: float = 0.5                       # JSD mixture weight
    intermediate: tuple[tuple[int, int], ...] = ()  # (teacher layer, student layer) pairs
    intermediate_loss: str = "cosine"       # cosine | mse (normalized by the teacher's mean square)
    intermediate_weight: float = 1.0
    teacher_correction_tokens: int = 0      # 0 = no teacher correction phase
    teacher_correction_lr: float | None = None  # default: lr
    baseline: str | None = None             # None (distill) | "ce" | "scratch"
    loss_impl: str = "auto"                 # auto | logits | fused
    gradient_checkpointing: bool = False
    precision: str = "auto"                 # bf16 | fp32 | auto (bf16 on CUDA, fp32 on CPU):
                                            # see minitron/precision.py
    fsdp_unsynced_accum: bool = False       # FSDP: reduce-scatter only on the last micro-batch
                                            # (keeps unsharded fp32 gradients between them)
    checkpoint_every: int = 100             # optimizer steps; a checkpoint is also written at the end
    eval_every: int = 50                    # optimizer steps; also at step 0 and at the end
    eval_blocks: int = 16
    eval_batch_size: int = 8
    log_every: int = 1
    seed: int = 0
    progress: bool = True
    keep_checkpoint: bool = True            # keep checkpoint/ after the final model is written
    strategy: str = "auto"                  # auto | ddp | fsdp (only used with > 1 process)
    nproc_per_node: int = 1                 # > 1 outside torchrun: start torchrun with that many
    nnodes: int = 1                         # > 1: this node joins the others (c10d rendezvous)
    rdzv_endpoint: str | None = None        # host:port of the rendezvous (the first node)
    hsdp_shard_size: int | None = None      # strategy hsdp: ranks per shard group (default: a node)
    process_group_timeout_s: float = 1800.0  # a collective waits this long for a missing rank
    gpu_memory_gib: float | None = None     # per-GPU memory the memory plan must fit (None: the
                                            # detected GPU's; no check without a GPU)

    def __post_init__(self) -> None:
        self.intermediate = tuple((int(t), int(s)) for t, s in self.intermediate)

        def need(ok: bool, name: str, valid: str) -> None:
            if not ok:
                raise MinitronError(f"{name}={getattr(self, name)!r} is invalid; valid: {valid}")

        for name in ("batch_size", "block_size", "grad_accum", "checkpoint_every", "eval_every",
                     "eval_blocks", "eval_batch_size", "log_every", "nproc_per_node", "nnodes"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                 "an integer >= 1")
        need(self.block_size >= 2, "block_size", "an integer >= 2")
        need(self.tokens >= 1, "tokens", "an integer >= 1")
        need(self.teacher_correction_tokens >= 0, "teacher_correction_tokens", "an integer >= 0")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "a number > 0")
        if self.teacher_correction_lr is not None:
            need(math.isfinite(self.teacher_correction_lr) and self.teacher_correction_lr > 0,
                 "teacher_correction_lr", "a number > 0")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "0 <= min_lr_ratio <= 1")
        need(0 <= self.warmup_fraction < 1, "warmup_fraction", "0 <= warmup_fraction < 1")
        need(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(self.clip_grad >= 0, "clip_grad", "a number >= 0 (0 turns clipping off)")
        need(math.isfinite(self.temperature) and self.temperature > 0, "temperature",
             "a number > 0")
        need(0 <= self.alpha <= 1, "alpha", "0 <= alpha < 1 (the cross-entropy share of the loss)")
        if self.alpha == 1 and self.baseline is None:
            raise MinitronError("alpha=1.0 is pure cross-entropy: no distillation is left; "
                                "use baseline='ce' (--baseline ce), or 0 <= alpha < 1")
        need(self.divergence in DIVERGENCES, "divergence", ", ".join(DIVERGENCES))
        need(0 < self.beta < 1, "beta", "0 < beta < 1")
        need(self.intermediate_loss in INTERMEDIATE_LOSSES, "intermediate_loss",
             ", ".join(INTERMEDIATE_LOSSES))
        need(self.intermediate_weight >= 0, "intermediate_weight", "a number >= 0")
        need(all(t >= 0 and s >= 0 for t, s in self.intermediate), "intermediate",
             "pairs of non-negative layer indices (teacher, student)")
        need(self.baseline is None or self.baseline in BASELINES, "baseline",
             "None (distillation), " + ", ".join(BASELINES))
        need(self.loss_impl in LOSS_IMPLS, "loss_impl", ", ".join(LOSS_IMPLS))
        need(self.strategy in STRATEGIES, "strategy", ", ".join(STRATEGIES))
        need(self.precision in precision.PRECISIONS, "precision", ", ".join(precision.PRECISIONS))
        need(self.gpu_memory_gib is None or self.gpu_memory_gib > 0, "gpu_memory_gib",
             "None (the detected GPU) or a number of GiB > 0")
        if self.micro_batch_size is not None:
            need(isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 1,
                 "micro_batch_size", "None or an integer >= 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise MinitronError(f"nnodes={self.nnodes} needs rdzv_endpoint (host:port on the first "
                                f"node, the same on every node), e.g. --rdzv-endpoint node0:29500")
        need(self.process_group_timeout_s > 0, "process_group_timeout_s", "a number of seconds > 0")
        check_world(self, self.nproc_per_node * self.nnodes,
                    "nproc_per_node" if self.nnodes == 1 else "nproc_per_node x nnodes")
        if self.baseline is not None and self.intermediate:
            raise MinitronError(f"intermediate={list(self.intermediate)} needs a teacher; the "
                                f"'{self.baseline}' baseline trains without one: drop one of them")
        if self.baseline is not None and self.teacher_correction_tokens:
            raise MinitronError(f"teacher_correction_tokens={self.teacher_correction_tokens} "
                                f"corrects a teacher that the '{self.baseline}' baseline does not "
                                f"use: drop one of them")
        if self.tokens < self.tokens_per_step:
            raise MinitronError(
                f"tokens={self.tokens} is less than one optimizer step (batch_size {self.batch_size}"
                f" x grad_accum {self.grad_accum} x block_size {self.block_size} = "
                f"{self.tokens_per_step} tokens); give tokens >= {self.tokens_per_step}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size

    @property
    def steps(self) -> int:
        return self.tokens // self.tokens_per_step

    @property
    def uses_teacher(self) -> bool:
        return self.baseline is None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["intermediate"] = [list(p) for p in self.intermediate]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DistillConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise MinitronError(f"unknown distillation setting(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)


def parse_intermediate(text: str | None) -> tuple[tuple[int, int], ...]:
    """'29:14,14:7' -> ((29, 14), (14, 7)): teacher layer, student layer."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
            raise MinitronError(f"--intermediate {text!r}: '{item}' is not TEACHER_LAYER:STUDENT_LAYER"
                                f" (e.g. --intermediate 29:14,14:7)")
        pairs.append((int(parts[0]), int(parts[1])))
    return tuple(pairs)


# ----------------------------------------------------------------------------- schedule and data
def check_world(config: DistillConfig, world: int, name: str) -> None:
    """Refuse a process count the batch does not split over."""
    if config.micro_batch_size is None:
        distributed.check_divisible(config.batch_size, world, name)
        return
    per_step = config.batch_size * config.grad_accum
    if per_step % (config.micro_batch_size * world):
        raise MinitronError(
            f"the global batch (batch_size {config.batch_size} x grad_accum {config.grad_accum} = "
            f"{per_step} sequences) does not split into micro_batch_size={config.micro_batch_size}"
            f" x {name}={world} processes; choose a micro_batch_size and process count whose "
            f"product divides {per_step}")


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
    """
    if config.micro_batch_size is not None:
        m = config.micro_batch_size
        start = step * config.batch_size * config.grad_accum + (micro * world + rank) * m
        samples = range(start, start + m)
    else:
        start = (step * config.grad_accum + micro) * config.batch_size
        samples = range(start + rank, start + config.batch_size, world)
    out = []
    for g in samples:
        epoch, pos = divmod(g, n_blocks)
        out.append(int(_permutation(n_blocks, config.seed, epoch)[pos]))
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
class _Trainee(nn.Module):
    """The student and its intermediate-loss projections as the one module DDP/FSDP wrap.

    Its forward computes the whole training loss (teacher forward included, under no_grad), so every
    trainable parameter is used inside the wrapper's forward and gradient sync is never bypassed;
    without a loss (`trainee(ids)`) it is the student (evaluation goes through the wrapper too).
    """

    def __init__(self, student: nn.Module, projections: nn.ModuleList | None):
        super().__init__()
        self.student = student
        self.projections = projections if projections is not None else nn.ModuleList()
        self.loss_args: dict[str, Any] = {}  # teacher, config, ...: set by the loop, not submodules

    def forward(self, ids: torch.Tensor, loss: bool = False, eval_sums: bool = False,
                mask: torch.Tensor | None = None):
        if eval_sums:  # inside the wrapper's forward: FSDP has the root's weights gathered
            from minitron.evaluate import batch_metric_sums

            return batch_metric_sums(self.student, self.loss_args.get("eval_teacher"), ids)
        if not loss:
            return self.student(ids, use_cache=False)
        a = self.loss_args
        return _micro_loss(self.student, a["teacher"], ids, a["config"], a["teacher_head"],
                           a["fused"], self.projections if a["captures"] else None, a["captures"],
                           mask)


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
    if run_dir.exists() and any(p for p in run_dir.iterdir() if not p.name.startswith(".tmp-")):
        raise MinitronError(f"output folder {run_dir} is not empty and holds no distillation run; "
                            f"choose a new or empty --output")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, settings)


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
) -> dict[str, Any]:
    """Train `student` in place for config.steps optimizer steps, checkpointing into run_dir.

    `teacher=None` or a baseline means cross-entropy on the data; otherwise the KD loss.
    `eval_teacher` (the teacher, also for baselines) adds KL and agreement to each eval.
    Returns the final metrics. `on_step(step)` runs after each optimizer step and checkpoint
    (tests use it to interrupt a run). Under torch.distributed every rank calls it: each takes its
    share of every micro-batch, the loss is averaged over ranks, rank 0 alone logs and writes.
    """
    device = _device_of(student)
    rank, world = distributed.rank(), distributed.world()
    check_world(config, world, "world size")
    n_micro = micro_steps(config, world)
    kd = teacher is not None and config.baseline is None
    steps, warmup = config.steps, int(config.warmup_fraction * config.steps)
    n_blocks = len(train_blocks)
    vocab = student.config.vocab_size
    fused = kd and _use_fused(config, vocab, student.config)

    projections = make_projections(teacher, student, config) if kd and config.intermediate else None
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    if config.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainee = _Trainee(student, projections)
    aliases = distributed.tied_aliases(trainee)
    model = distributed.wrap_model(trainee, config)
    # After wrapping: FSDP2 swaps the parameters for sharded ones, which the optimizer must hold.
    optimizer = torch.optim.AdamW(_param_groups(trainee.student, trainee.projections,
                                                config.weight_decay),
                                  lr=config.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup, config.min_lr_ratio))

    ckpt = distributed.on_rank0(lambda: find_checkpoint(run_dir))
    state: dict[str, Any] = {"step": 0, "tokens": 0, "train_time_s": 0.0}
    if ckpt is not None:
        state = load_checkpoint(ckpt, trainee, optimizer, scheduler, aliases)
        if rank == 0:
            print(f"[minitron] {phase}: resuming from step {state['step']}/{steps} ({ckpt})"
                  + (f" on {world} processes" if world > 1 else ""))
    else:
        torch.manual_seed(config.seed)
        random.seed(config.seed)
    start_step = state["step"]
    log = (MetricsLog(run_dir / "metrics.jsonl", keep_up_to=start_step if ckpt is not None else -1)
           if rank == 0 else NullLog())
    last_ckpt_step = start_step if ckpt is not None else None

    teacher_head = None
    if fused:
        teacher_head = teacher.get_output_embeddings().weight.detach().to(device)

    def autocast():
        return precision.autocast(config.precision, device)

    captures: list[_Capture] = []
    if projections is not None:
        captures = [_Capture(teacher, [t for t, _ in config.intermediate]),
                    _Capture(student, [s for _, s in config.intermediate])]
    trainee.loss_args = {"teacher": teacher if kd else None, "config": config,
                         "teacher_head": teacher_head, "fused": fused, "captures": captures,
                         "eval_teacher": eval_teacher}

    def run_eval(step: int) -> dict[str, Any]:
        # Each rank evaluates its share of the eval set through the wrapper (an FSDP forward is
        # collective); the sums are added over ranks, so every rank has the numbers; rank 0 logs.
        rec = {"kind": "eval", "step": step, "tokens": step * config.tokens_per_step}
        with autocast():
            rec.update(evaluate_student(model, eval_teacher, eval_blocks,
                                        config.eval_batch_size, shard=(rank, world)))
        log.write(rec)
        msg = ", ".join(f"{k} {v:.4g}" for k, v in rec.items() if k not in ("kind", "step", "tokens"))
        if rank == 0:
            print(f"[minitron] {phase} step {step}/{steps}: {msg}", file=sys.stderr)
        return rec

    bar = None
    if config.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start_step, desc=phase, unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    try:
        last_eval = None
        if start_step == 0:
            last_eval = run_eval(0)
        t_train = time.perf_counter()
        for step in range(start_step, steps):
            t0 = time.perf_counter()
            total = torch.zeros((), device=device)
            inter_total = torch.zeros((), device=device)
            for micro in range(n_micro):
                rows = batch_indices(step, micro, n_blocks, config, rank, world)
                ids = train_blocks[rows].to(device)
                # Chat shards carry a loss mask beside the tokens (prompt tokens excluded).
                mask = (train_blocks.mask(rows).to(device)
                        if getattr(train_blocks, "has_mask", False) else None)
                last = micro == n_micro - 1
                with distributed.grad_sync(model, last, config.fsdp_unsynced_accum):
                    with autocast():
                        loss, inter = model(ids, loss=True, mask=mask)
                    (loss / n_micro).backward()
                total += loss.detach() / n_micro
                if inter is not None:
                    inter_total += inter / n_micro
                for c in captures:
                    c.outputs.clear()
            # The global batch's loss: every rank gets the same value, so a non-finite loss stops
            # all ranks at the same step with the same message (none is left waiting in a
            # collective).
            total, inter_total = distributed.mean_over_ranks(
                torch.stack([total, inter_total])).unbind()
            loss_value = total.item()  # one host sync per optimizer step
            grad_norm = (torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]],
                config.clip_grad if config.clip_grad > 0 else float("inf")))
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP: the global norm
                grad_norm = grad_norm.full_tensor()
            if not math.isfinite(loss_value) or not math.isfinite(grad_norm.item()):
                what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                value = loss_value if what == "loss" else grad_norm.item()
                log.write({"kind": "stopped", "step": step + 1, "reason": f"non-finite {what}"})
                kept = (f"the last good checkpoint (step {last_ckpt_step}) in {run_dir / CKPT} is "
                        f"intact" if last_ckpt_step is not None
                        else "no checkpoint had been written yet")
                raise MinitronError(
                    f"{phase} stopped: the {what} became {value} at step {step + 1}/{steps}; the "
                    f"weights were not updated and {kept}. Lower the learning rate (lr={config.lr})"
                    f", check the data, or resume from the checkpoint by rerunning the command")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            dt = time.perf_counter() - t0
            state["step"], state["tokens"] = done, done * config.tokens_per_step
            state["train_time_s"] += dt  # training steps only: eval and checkpoints excluded
            tok_s = config.tokens_per_step / max(dt, 1e-9)
            if done % config.log_every == 0 or done == steps:
                rec = {"kind": "train", "step": done, "tokens": state["tokens"], "loss": loss_value,
                       "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                       "tokens_per_s": tok_s}
                if projections is not None:
                    rec["intermediate_loss"] = inter_total.item()
                log.write(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:.0f}")
                bar.update(1)
            if done % config.eval_every == 0 or done == steps:
                last_eval = run_eval(done)
            if done % config.checkpoint_every == 0 or done == steps:
                save_checkpoint(run_dir, trainee, optimizer, scheduler, {**state, "phase": phase},
                                aliases)
                last_ckpt_step = done
            if on_step is not None:
                on_step(done)
        if last_eval is None or last_eval["step"] != steps:
            last_eval = run_eval(steps)
    finally:
        if bar is not None:
            bar.close()
        for c in captures:
            c.close()
        if config.gradient_checkpointing:
            student.gradient_checkpointing_disable()
    student.eval()
    train_time = state["train_time_s"]
    trained_tokens = (steps - start_step) * config.tokens_per_step
    run_time = time.perf_counter() - t_train
    metrics = {k: v for k, v in last_eval.items() if k not in ("kind", "step", "tokens")}
    metrics.update({
        "steps": steps, "train_tokens": steps * config.tokens_per_step,
        "train_time_s": round(train_time, 2),
        # Student tokens per second of training steps, teacher forward included (eval excluded).
        "train_tokens_per_s": round(steps * config.tokens_per_step / max(train_time, 1e-9), 1),
        "this_session_tokens": trained_tokens, "this_session_wall_s": round(run_time, 2),
        "loss_impl": ("fused" if fused else "logits") if kd else "cross_entropy",
    })
    return metrics


# ----------------------------------------------------------------------------- public entry points
def teacher_correct_(teacher: nn.Module, train_blocks: torch.Tensor, eval_blocks: torch.Tensor,
                     config: DistillConfig, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Fine-tune `teacher` in place with cross-entropy for config.teacher_correction_tokens tokens.

    The phase checkpoints and resumes like distillation; its result (`teacher.safetensors`) is kept,
    so a rerun loads it instead of training again. Training uses the precision policy on an fp32
    copy of the teacher (fp32 master weights: AdamW's small updates would round away in bf16), under
    `config.strategy` (FSDP2 shards it on GPUs); the result is loaded back into `teacher`, which
    keeps its own dtype, stays whole (replicated) and is left frozen in eval mode.
    """
    run_dir = Path(run_dir)
    done = run_dir / "teacher.safetensors"
    tc = dataclasses.replace(
        config, tokens=config.teacher_correction_tokens, teacher_correction_tokens=0,
        lr=config.teacher_correction_lr or config.lr, baseline="ce", intermediate=(), alpha=0.0,
        seed=config.seed + 1)

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
    # A separate fp32 module when the teacher is not fp32, or when FSDP would shard it in place.
    sharded = distributed.dist_on() and distributed.strategy(tc, _device_of(teacher)) == "fsdp"
    master = (copy.deepcopy(teacher).float()
              if sharded or any(p.dtype != torch.float32 for p in teacher.parameters()) else teacher)
    metrics = _train(master, None, train_blocks, eval_blocks, tc, run_dir, "teacher_correction")
    weights = distributed.full_state_dict(master)  # collective under FSDP; {} on other ranks

    def save() -> None:
        from safetensors.torch import save_file

        tmp = run_dir / f".teacher.safetensors.tmp-{os.getpid()}"
        save_file(weights, str(tmp))
        os.replace(tmp, done)
        write_json_atomic(run_dir / "metrics.json", metrics)

    distributed.on_rank0(save)  # every rank waits for the file
    del master, weights
    _load_corrected(teacher, done)  # every rank reads it: the run folder is shared
    return metrics


def _load_corrected(teacher: nn.Module, path: Path) -> None:
    """The corrected fp32 weights into `teacher`, cast to its dtype; tied aliases may be absent."""
    from safetensors.torch import load_file

    missing, unexpected = teacher.load_state_dict(load_file(str(path)), strict=False)
    aliases = distributed.tied_aliases(teacher)
    if unexpected or set(missing) - set(aliases):
        raise MinitronError(f"{path} does not hold this teacher's weights (missing "
                            f"{sorted(set(missing) - set(aliases))[:3]}, unexpected {unexpected[:3]})")
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
    student_device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train `student` (in place) from `teacher` and write the finished model to `output_dir`.

    `student_device`: where the student trains, when it is handed over elsewhere (on the host, so
    that a teacher correction has the GPU to itself); it moves there after the correction.

    train_blocks / eval_blocks: LongTensor [n, block_size] of disjoint splits (train_blocks may
    be a `minitron.shards.BlockView`, read by index, with a loss mask for chat data). `teacher`
    may be None only for a baseline (then no KL metrics). Resumes from `output_dir/checkpoint`; returns the
    metrics saved in `output_dir/minitron.json` (at once, if the run has already finished).

    Under torch.distributed (e.g. torchrun) every rank calls it with the same arguments; the
    teacher is replicated, the student wrapped per `config.strategy` (under FSDP it is left sharded:
    the final weights are in `output_dir`), and all ranks return rank 0's metrics.
    """
    out = Path(output_dir)
    final = out / "minitron.json"

    def finished() -> dict | None:
        if final.exists():
            saved = json.loads(final.read_text()).get("distillation", {})
            if saved.get("status") == "finished":
                print(f"[minitron] {out} holds a finished run; not repeating it")
                return saved["metrics"]
        return None

    saved = distributed.on_rank0(finished)
    if saved is not None:
        return saved
    check_world(config, distributed.world(), "world size")
    if config.uses_teacher and teacher is None:
        raise MinitronError("distillation needs a teacher (--teacher); without one, use "
                            "--baseline ce or --baseline scratch")
    if train_blocks.ndim != 2 or train_blocks.size(1) != config.block_size:
        raise MinitronError(f"train blocks have shape {tuple(train_blocks.shape)}; expected "
                            f"[n, block_size={config.block_size}]")
    if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
        raise MinitronError(
            f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the student's "
            f"({student.config.vocab_size}); distillation needs the same tokenizer")
    _check_token_ids(train_blocks, student.config.vocab_size)
    phase = "distill" if config.uses_teacher else f"baseline_{config.baseline}"
    if teacher is not None:
        freeze_(teacher)
        if config.intermediate:
            make_projections(teacher, student, config)  # range check before any work
    settings = {"config": config.to_dict(), "train_data": blocks_fingerprint(train_blocks),
                "eval_data": blocks_fingerprint(eval_blocks),
                "student_shape": _shape(student), "teacher_shape": _shape(teacher)}
    # Every rank must hold the same data and models, or the shards do not add up.
    if distributed.dist_on():
        everyone = [None] * distributed.world()
        dist.all_gather_object(everyone, settings)
        if any(s != settings for s in everyone):
            bad = [r for r, s in enumerate(everyone) if s != everyone[0]]
            raise MinitronError(f"ranks {bad} loaded other data or models than rank 0 (data "
                                f"fingerprints and shapes differ); every rank needs the same inputs")
    distributed.on_rank0(lambda: _check_run_dir(out, settings))

    with StageTimer(phase) as timer:
        result: dict[str, Any] = {}
        if teacher is not None:
            result["teacher"] = distributed.on_rank0(lambda: _cached(
                out / "teacher_eval.json",
                lambda: evaluate_student(teacher, None, eval_blocks, config.eval_batch_size)))
        if config.teacher_correction_tokens:
            result["teacher_correction"] = teacher_correct_(
                teacher, train_blocks, eval_blocks, config, out / "teacher_correction")
            result["teacher_corrected"] = {k: result["teacher_correction"][k]
                                           for k in ("eval_loss", "eval_perplexity")}
        if config.baseline == "scratch" and distributed.on_rank0(lambda: find_checkpoint(out)) is None:
            reinitialize_(student, config.seed)  # seeded: the same weights on every rank
        student.float()
        if student_device is not None:
            student.to(student_device)
        metrics = _train(student, teacher, train_blocks, eval_blocks, config, out, phase,
                         on_step=on_step, eval_teacher=teacher)
        timer.tokens = metrics["this_session_tokens"]
    weights = distributed.full_state_dict(student)  # collective under FSDP; {} on ranks other than 0

    def finish() -> dict[str, Any]:
        records = MetricsLog(out / "metrics.jsonl").records
        start = next((r for r in records if r.get("kind") == "eval" and r["step"] == 0), {})
        metrics["start"] = {k: v for k, v in start.items() if k not in ("kind", "step", "tokens")}
        result.update(metrics)
        result["timing"] = timer.as_dict()
        if distributed.world() > 1:
            result["processes"] = {"world_size": distributed.world(),
                                   "strategy": distributed.strategy(config, _device_of(student))}
        plot_losses(records, out / "loss.png", f"{phase}: {out.name}")
        _write_final(out, student, weights, tokenizer, config, result, info or {})
        if not config.keep_checkpoint:
            shutil.rmtree(out / CKPT, ignore_errors=True)
        return result

    return distributed.on_rank0(finish)


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


def _write_final(out: Path, student: nn.Module, weights: dict[str, torch.Tensor], tokenizer,
                 config: DistillConfig, metrics: dict[str, Any], info: dict[str, Any]) -> None:
    """The student (its gathered `weights`) as a plain HF checkpoint in `out`, the same whatever
    the process count; minitron.json moves in last (the commit)."""
    from minitron.models import count_params

    meta = dict(info)
    meta["parameters"] = {"after": count_params(student)}  # global counts, also when sharded
    meta["distillation"] = {"status": "finished", "config": config.to_dict(), "metrics": metrics}
    with atomic_dir(out / ".final", overwrite=True) as tmp:
        student.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "minitron.json", meta)
    staged = out / ".final"
    names = sorted(p.name for p in staged.iterdir())
    for name in [n for n in names if n != "minitron.json"] + ["minitron.json"]:
        os.replace(staged / name, out / name)
    staged.rmdir()


def _read_info(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path) / "minitron.json"
    return json.loads(p.read_text()) if p.exists() else {}


def run_distill(
    teacher_path: str | os.PathLike | None,
    student_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: DistillConfig,
    *,
    data_source: str = "stdlib",
    text_field: str = "text",
    device: str | None = None,
    teacher_device: str | None = None,
    teacher_dtype: str | None = None,
) -> dict[str, Any]:
    """From model paths to a finished output folder (resuming a run that is already there).

    Under torchrun it joins the process group and runs as one rank. Outside torchrun with
    `config.nproc_per_node` > 1 it starts `torchrun --nproc-per-node K -m minitron.distill` with the
    same settings on this node and waits (so a recipe can ask for K processes).
    """
    from minitron.models import load_config, parse_dtype

    out = Path(output_dir)
    parse_dtype(teacher_dtype)  # refuse a bad --teacher-dtype before anything loads
    for name, path in (("--teacher", teacher_path), ("--student", student_path)):
        if path is not None and Path(str(path)).expanduser().resolve() == out.expanduser().resolve():
            raise MinitronError(f"--output {out} is the {name} folder itself; choose another --output")
    done = _read_info(out).get("distillation", {})
    if done.get("status") == "finished":
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"[minitron] {out} holds a finished run; not repeating it")
        return done["metrics"]
    if config.uses_teacher and teacher_path is None:
        raise MinitronError("distillation needs --teacher; without a teacher use --baseline ce or "
                            "--baseline scratch")
    # Cheap checks on the configs before any weights load.
    s_cfg = load_config(student_path)
    t_cfg = load_config(teacher_path) if teacher_path is not None else None
    if t_cfg is not None and t_cfg.vocab_size != s_cfg.vocab_size:
        raise MinitronError(
            f"the teacher's vocabulary ({t_cfg.vocab_size}) differs from the student's "
            f"({s_cfg.vocab_size}); distillation needs the same tokenizer")
    max_pos = min(c.max_position_embeddings for c in (s_cfg, t_cfg) if c is not None)
    if config.block_size > max_pos:
        raise MinitronError(f"block_size={config.block_size} is longer than the models' context "
                            f"({max_pos} positions); choose block_size <= {max_pos}")
    world = int(os.environ.get("WORLD_SIZE", config.nproc_per_node * config.nnodes))
    memory_plan_(t_cfg, s_cfg, config, world, teacher_dtype, device, show=False)
    if not distributed.under_torchrun() and (config.nproc_per_node > 1 or config.nnodes > 1):
        return _launch(teacher_path, student_path, out, config, data_source=data_source,
                       text_field=text_field, device=device, teacher_device=teacher_device,
                       teacher_dtype=teacher_dtype)
    with distributed.process_group(device, config.process_group_timeout_s) as device:
        try:
            return _run_rank(teacher_path, student_path, out, config, data_source, text_field,
                             device, teacher_device, teacher_dtype, max_pos)
        except MinitronError as e:
            if distributed.world() == 1:
                raise
            distributed.record_for_torchrun(e)
            raise MinitronError(f"rank {distributed.rank()}: {e}") from None


def memory_plan_(teacher_cfg, student_cfg, config: DistillConfig, world: int,
                 teacher_dtype: str | None, device: str | None, show: bool = True):
    """The per-GPU memory plan (`minitron.memory_plan`), printed if `show`; refuses a plan over
    `config.gpu_memory_gib` or, on a GPU, the detected memory. Returns the plan."""
    from minitron import memory_plan
    from minitron.models import default_device

    dev = torch.device(device or default_device())
    gpu = (int(config.gpu_memory_gib * memory_plan.GIB) if config.gpu_memory_gib
           else memory_plan.detected_gpu_bytes() if dev.type == "cuda" else None)
    strategy = "fsdp" if config.strategy == "fsdp" or (config.strategy == "auto"
                                                       and (dev.type == "cuda" or gpu)) else "ddp"
    strategy = "hsdp" if config.strategy == "hsdp" else strategy
    plan = memory_plan.plan_distill(teacher_cfg or student_cfg, student_cfg, config, world,
                                    teacher_dtype or "float32", strategy)
    if show:
        print(format_table(plan.rows()))
        print(f"estimated peak per GPU: {plan.peak / memory_plan.GIB:.1f} GiB on {world} "
              f"process(es), {strategy}" + (f", of {gpu / memory_plan.GIB:.1f} GiB" if gpu else ""))
    memory_plan.check_fits(plan, gpu)
    return plan


def _launch(teacher_path, student_path, out: Path, config: DistillConfig, **kw) -> dict[str, Any]:
    """Run this same distillation under torchrun on `config.nproc_per_node` local processes."""
    k = config.nproc_per_node
    dev = kw["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and k > torch.cuda.device_count():
        raise MinitronError(f"nproc_per_node={k} but this node has {torch.cuda.device_count()} "
                            f"GPU(s); choose nproc_per_node <= {torch.cuda.device_count()}")
    argv = ["--student", str(student_path), "--output", str(out)]
    if teacher_path is not None:
        argv += ["--teacher", str(teacher_path)]
    for flag, key in (("--data", "data_source"), ("--text-field", "text_field"),
                      ("--device", "device"), ("--teacher-device", "teacher_device"),
                      ("--teacher-dtype", "teacher_dtype")):
        if kw[key] is not None:
            argv += [flag, str(kw[key])]
    with tempfile.TemporaryDirectory(prefix="minitron-launch-") as tmp:
        settings = Path(tmp) / "distill_settings.json"
        write_json_atomic(settings, config.to_dict())
        distributed.launch_torchrun("minitron.distill", argv + ["--settings", str(settings)], k,
                                    config.nnodes, config.rdzv_endpoint,
                                    f"minitron-{out.resolve().name}")
    return json.loads((out / "minitron.json").read_text())["distillation"]["metrics"]


def _run_rank(teacher_path, student_path, out: Path, config: DistillConfig, data_source: str,
              text_field: str, device: str, teacher_device: str | None, teacher_dtype: str | None,
              max_pos: int) -> dict[str, Any]:
    """One process's part of `run_distill` (all of it when there is one process)."""
    from minitron.data import load_blocks, open_blocks
    from minitron.models import load_model, resolve_model

    if distributed.dist_on() and teacher_device is not None and teacher_device.startswith("cuda"):
        teacher_device = device  # this rank's GPU
    teacher = None
    if teacher_path is not None:
        teacher, _ = load_model(teacher_path, dtype=teacher_dtype, device=teacher_device or device)
    # A teacher correction trains first: the student waits on the host until it is done.
    student, tokenizer = load_model(student_path, dtype="float32",
                                    device="cpu" if config.teacher_correction_tokens else device)
    n_train = config.steps * config.batch_size * config.grad_accum
    # From a prepared folder the train blocks stay on disk and are read by index per micro-batch.
    train_blocks = open_blocks(tokenizer, "train", n_train, source=data_source,
                               block_size=config.block_size, seed=config.seed,
                               text_field=text_field, max_positions=max_pos)
    eval_blocks = load_blocks(tokenizer, "eval", config.eval_blocks, source=data_source,
                              block_size=config.block_size, seed=0, text_field=text_field,
                              max_positions=max_pos)
    info = _read_info(resolve_model(student_path))
    info = {"student_source": str(student_path),
            "teacher": str(teacher_path) if teacher_path is not None else None,
            "data": {"source": data_source, "train_blocks": len(train_blocks),
                     "eval_blocks": len(eval_blocks), "block_size": config.block_size},
            "pruning": info or None}
    return distill(teacher, student, train_blocks, eval_blocks, config, out, tokenizer=tokenizer,
                   info=info, student_device=device)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    d = DistillConfig()
    p = argparse.ArgumentParser(prog="python -m minitron.distill", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="teacher model: folder, hub id or 'smollm2-135m' "
                                     "(needed unless --baseline; with a baseline, only for eval KL)")
    p.add_argument("--student", required=True, help="student model folder (e.g. a pruned model)")
    p.add_argument("--output", required=True, help="run folder; the final HF model is written here")
    p.add_argument("--data", default="stdlib", help="data source (train split trains, eval split "
                                                    "evaluates)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--tokens", type=int, default=d.tokens, help="student training-token budget")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--block-size", "--seq-len", dest="block_size", type=int, default=d.block_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per process per forward (default: batch_size split over the "
                        "processes); the global batch stays batch_size x grad_accum")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip-grad", type=float, default=d.clip_grad)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help="cross-entropy share: loss = (1-alpha)*divergence + alpha*CE")
    p.add_argument("--divergence", default=d.divergence, help="kl | reverse_kl | jsd")
    p.add_argument("--beta", type=float, default=d.beta, help="JSD mixture weight")
    p.add_argument("--intermediate", help="teacher:student layer pairs, e.g. 29:14,14:7")
    p.add_argument("--intermediate-loss", default=d.intermediate_loss, help="cosine | mse")
    p.add_argument("--intermediate-weight", type=float, default=d.intermediate_weight)
    p.add_argument("--teacher-correction-tokens", type=int, default=0)
    p.add_argument("--teacher-correction-lr", type=float, default=None)
    p.add_argument("--baseline", default=None, help="ce (retrain on the data, no teacher) | scratch "
                                                    "(random init of the student's shape)")
    p.add_argument("--loss-impl", default=d.loss_impl, help="auto | logits | fused")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--precision", default=d.precision,
                   help="bf16 (bf16 compute, fp32 master weights and gradient reduction) | fp32 | "
                        "auto (bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--fsdp-unsynced-accum", action="store_true",
                   help="under FSDP, reduce-scatter gradients on the last micro-batch only (less "
                        "communication, unsharded fp32 gradients held between micro-batches)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-blocks", type=int, default=d.eval_blocks)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help="student device (default: cuda if available)")
    p.add_argument("--teacher-device", default=None, help="default: the student's device")
    p.add_argument("--teacher-dtype", default=None, help="float32 | bfloat16 | float16")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--drop-checkpoint", action="store_true",
                   help="delete checkpoint/ (weights + optimizer state) once the final model is written")
    p.add_argument("--nproc-per-node", type=int, default=d.nproc_per_node,
                   help="start torchrun with this many processes on this node (outside torchrun; "
                        "under torchrun its own --nproc_per_node counts)")
    p.add_argument("--strategy", default=d.strategy,
                   help="with several processes: fsdp (sharded student) | ddp (replicated) | hsdp "
                        "(sharded inside a node, replicated across nodes) | auto (fsdp on GPUs, "
                        "ddp on CPU)")
    p.add_argument("--nnodes", type=int, default=d.nnodes,
                   help="nodes (run the same command on each; needs --rdzv-endpoint)")
    p.add_argument("--rdzv-endpoint", default=None, help="host:port of the c10d rendezvous")
    p.add_argument("--hsdp-shard-size", type=int, default=None,
                   help="strategy hsdp: ranks per shard group (default: the ranks of a node)")
    p.add_argument("--process-group-timeout", type=float, default=d.process_group_timeout_s,
                   help="seconds a collective waits for a missing rank before failing")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="per-GPU memory the plan must fit (default: the detected GPU's)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the per-GPU memory plan from the model configs and stop")
    p.add_argument("--settings", help="JSON file of DistillConfig fields (what --nproc-per-node "
                                      "hands to its processes); replaces the training flags")
    return p


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    if args.settings:
        try:
            return DistillConfig.from_dict(json.loads(Path(args.settings).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise MinitronError(f"--settings {args.settings}: {e}") from None
    return DistillConfig(
        tokens=args.tokens, batch_size=args.batch_size, block_size=args.block_size,
        grad_accum=args.grad_accum, micro_batch_size=args.micro_batch_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_fraction=args.warmup_fraction, weight_decay=args.weight_decay,
        clip_grad=args.clip_grad, temperature=args.temperature, alpha=args.alpha,
        divergence=args.divergence, beta=args.beta,
        intermediate=parse_intermediate(args.intermediate),
        intermediate_loss=args.intermediate_loss, intermediate_weight=args.intermediate_weight,
        teacher_correction_tokens=args.teacher_correction_tokens,
        teacher_correction_lr=args.teacher_correction_lr, baseline=args.baseline,
        loss_impl=args.loss_impl, gradient_checkpointing=args.gradient_checkpointing,
        precision=args.precision, fsdp_unsynced_accum=args.fsdp_unsynced_accum,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every, eval_blocks=args.eval_blocks,
        eval_batch_size=args.eval_batch_size, log_every=args.log_every, seed=args.seed,
        progress=not args.no_progress, keep_checkpoint=not args.drop_checkpoint,
        strategy=args.strategy, nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
        rdzv_endpoint=args.rdzv_endpoint, hsdp_shard_size=args.hsdp_shard_size,
        process_group_timeout_s=args.process_group_timeout, gpu_memory_gib=args.gpu_memory_gib)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    if args.dry_run:
        from minitron.models import load_config

        t_cfg = load_config(args.teacher) if args.teacher else None
        memory_plan_(t_cfg, load_config(args.student), config, config.nproc_per_node,
                     args.teacher_dtype, args.device)
        return 0
    result = run_distill(args.teacher, args.student, args.output, config, data_source=args.data,
                         text_field=args.text_field, device=args.device,
                         teacher_device=args.teacher_device, teacher_dtype=args.teacher_dtype)
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
