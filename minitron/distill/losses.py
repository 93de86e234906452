"""What a distillation step computes: the trainee (student plus intermediate-state projections),
the KD / CE / intermediate losses (fused linear+KL, logits kernel, teacher cache) and the
student's held-out evaluation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minitron.common import MinitronError
from minitron.config import DistillConfig
from minitron.models import logit_softcap

# Above this vocabulary size `loss_impl="auto"` takes the fused linear+KL form.
FUSED_MIN_VOCAB = 32_768
IGNORE_INDEX = -100


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
            from minitron.scoring import batch_metric_sums

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

    From hidden states through chunked logits (`minitron.scoring.metric_sums`): no [B, T, V]
    tensor. `student` is a plain model or the loop's (wrapped) trainee, whose forward computes the
    sums, so that FSDP gathers its weights. `shard=(rank, world)`: this rank evaluates blocks
    rank, rank + world, ... and the sums are added over ranks (every rank must call it then, and
    runs the same number of forwards: an FSDP forward is collective).
    """
    from minitron.scoring import batch_metric_sums, metrics_from_sums

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
