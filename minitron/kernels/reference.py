"""The pure-torch definition of the distillation losses, and the CPU path that trains with it.

`token_losses` is the semantics: a few lines of log-softmax arithmetic that autograd
differentiates; the tests hold everything else to it in float64. `reference_rows` is the CPU path
for training: chunk by chunk over tokens (so no more than one chunk of [N, V] temporaries exists at
a time) it returns the loss and, in closed form, the gradient with respect to the student logits in
the same call, exactly as the Triton kernel in `softmax_kl.py` does.

Conventions shared with the kernel (see `softmax_kl` for the user-facing contract):
  z_s = student / T, z_t = teacher / T, both over the first V = min(V_s, V_t) columns
  q = softmax(z_s) (student), p = softmax(z_t) (teacher)
  "kl":          T^2 * KL(p || q)                                  forward KL (Hinton et al.)
  "reverse_kl":  T^2 * KL(q || p)                                  mode seeking
  "jsd":         T^2 * (beta * KL(p || m) + (1 - beta) * KL(q || m)),  m = beta * p + (1 - beta) * q
                 (the generalized JSD of on-policy distillation, GKD; 0 < beta < 1)
  plus, with labels, ce_weight * cross_entropy(student, label) over the student's full vocabulary at
  temperature 1; tokens whose label is `ignore_index` get no CE term.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minitron.config import DIVERGENCES, Divergence  # noqa: F401  (defined once, with the settings)

# Rows per chunk are chosen so that one chunk holds about this many elements per [rows, V]
# temporary; a chunk keeps about eight of them alive at its peak. On a CPU 2^18 (1 MiB of fp32)
# keeps them in cache between ops. Measured loss+gradient, bf16, 2 threads: 2^24 -> 2^18 took
# [512, 49152] from 352 to 97 ms and [64, 128256] from 81 to 25 ms; 2^17 was no faster. On a GPU
# every op is a kernel launch, so chunks stay large (64 MiB) to amortize the launches.
CHUNK_ELEMENTS_CPU = 1 << 18
CHUNK_ELEMENTS_GPU = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 inputs, fp64 only when the caller asks for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_j a_j (log a_j - log b_j) over the last dim, with 0 * log 0 = 0 in value and in gradient.

    Masking only the result would leave 0 * (-inf) = NaN in the backward of the unselected lanes, so
    the -inf lanes are replaced by finite stand-ins before any arithmetic.
    """
    live = log_a > -math.inf
    la, lb = torch.where(live, log_a, 0.0), torch.where(live, log_b, 0.0)
    return torch.where(live, la.exp() * (la - lb), 0.0).sum(-1)


def token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    divergence: Divergence = "kl",
    beta: float = 0.5,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token loss [N] of 2-D logits [N, V_s], [N, V_t], differentiable by autograd.

    Computes in fp32 (fp64 for fp64 inputs). Holds several [N, V] temporaries: callers chunk.
    """
    dtype = compute_dtype(student_logits.dtype)
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_q = torch.log_softmax(student_logits[:, :vocab].to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits[:, :vocab].to(dtype) / temperature, dim=-1)
    if divergence == "kl":
        div = _kl(log_p, log_q)
    elif divergence == "reverse_kl":
        div = _kl(log_q, log_p)
    elif divergence == "jsd":
        # Columns where both p and q are 0 (-inf logits in both) carry no mass; a finite stand-in keeps
        # logsumexp's backward free of exp(-inf - -inf) = NaN there.
        live = (log_p > -math.inf) | (log_q > -math.inf)
        lp, lq = torch.where(live, log_p, 0.0), torch.where(live, log_q, 0.0)
        log_m = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log1p(-beta)]), dim=0)
        div = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    else:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    # The T^2 rule (Hinton et al. 2015): softening by T shrinks the gradients by 1/T^2, so the loss
    # is scaled back up to keep its weight against the CE term independent of T.
    loss = div * (temperature * temperature)
    if labels is not None and ce_weight != 0.0:
        keep = labels != ignore_index
        ce = F.cross_entropy(student_logits.to(dtype), torch.where(keep, labels, 0), reduction="none")
        loss = loss + ce_weight * torch.where(keep, ce, 0.0)
    return loss


def _loss_and_grad(
    s: torch.Tensor,
    t: torch.Tensor,
    temperature: float,
    divergence: Divergence,
    beta: float,
    labels: torch.Tensor | None,
    ce_weight: float,
    ignore_index: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_losses` and, in closed form, its gradient d loss_i / d s_i for one chunk.

    The same formulas as the kernel's header, in torch: about half the time of differentiating
    `token_losses` with autograd (which the tests use as the independent check of both).
    """
    dtype = compute_dtype(s.dtype)
    vocab = min(s.shape[-1], t.shape[-1])
    T = temperature
    log_q = torch.log_softmax(s[:, :vocab].to(dtype) / T, dim=-1)
    log_p = torch.log_softmax(t[:, :vocab].to(dtype) / T, dim=-1)
    # On CPU every [rows, V] pass costs about as much as the math, so: in-place ops where a
    # temporary dies, and nansum / nan_to_num instead of compare + where. The only NaNs here are
    # 0 * log 0 lanes (a probability that is exactly 0), whose true contribution is 0; +inf stays.
    q, p = log_q.exp(), log_p.exp()
    inf = math.inf
    if divergence == "kl":
        div = torch.nansum(p * (log_p - log_q), -1)
        g = q.sub_(p).mul_(T) if compute_grad else None
    elif divergence == "reverse_kl":
        div = torch.nansum(q * (log_q - log_p), -1)
        g = (log_q - log_p).sub_(div[:, None]).mul_(q).mul_(T).nan_to_num_(0.0, inf, -inf) if compute_grad else None
    elif divergence == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        kl_qm = torch.nansum(q * (log_q - log_m), -1)
        div = beta * torch.nansum(p * (log_p - log_m), -1) + (1.0 - beta) * kl_qm
        g = ((log_q - log_m).sub_(kl_qm[:, None]).mul_(q).mul_(T * (1.0 - beta)).nan_to_num_(0.0, inf, -inf)
             if compute_grad else None)
    else:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    loss = div * (T * T)
    grad = g
    if compute_grad and vocab < s.shape[-1]:  # the student's extra columns get no KD gradient
        grad = torch.zeros(s.shape, dtype=dtype, device=s.device)
        grad[:, :vocab] = g
    if labels is not None and ce_weight != 0.0:
        keep = labels != ignore_index
        safe = torch.where(keep, labels, 0).long()
        log_r = torch.log_softmax(s.to(dtype), dim=-1)
        ce = -log_r.gather(-1, safe[:, None]).squeeze(-1)
        w = torch.where(keep, ce_weight, 0.0).to(dtype)
        loss = loss + w * ce
        if compute_grad:
            grad += w[:, None] * log_r.exp()
            grad.scatter_add_(-1, safe[:, None], -w[:, None])
    return loss, grad


def reference_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    grad_scale: torch.Tensor,
    temperature: float,
    divergence: Divergence,
    beta: float,
    ce_weight: float,
    ignore_index: int,
    compute_grad: bool,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as the Triton launcher: per-token loss and the student-logit gradient.

    student [N, V_s], teacher [N, V_t], mask [N] bool or None, labels [N] int or None,
    grad_scale: 0-d fp32 tensor that multiplies the gradient (1/count for "mean").
    Returns loss [N] in the compute dtype (0 where masked) and grad [N, V_s] in the student's dtype
    (0 where masked), or None when `compute_grad` is False. Works chunk by chunk: no more than
    `chunk_rows` rows of [N, V] temporaries exist at once.
    """
    n, v_s = student.shape
    dtype = compute_dtype(student.dtype)
    loss = torch.zeros(n, dtype=dtype, device=student.device)
    grad = torch.zeros_like(student, memory_format=torch.contiguous_format) if compute_grad else None
    elements = CHUNK_ELEMENTS_CPU if student.device.type == "cpu" else CHUNK_ELEMENTS_GPU
    rows = chunk_rows or max(1, elements // max(v_s, teacher.shape[-1]))
    scale = grad_scale.to(dtype)
    with torch.no_grad():
        for start in range(0, n, rows):
            sl = slice(start, min(start + rows, n))
            chunk_loss, chunk_grad = _loss_and_grad(
                student[sl], teacher[sl], temperature, divergence, beta,
                labels[sl] if labels is not None else None, ce_weight, ignore_index, compute_grad)
            keep = mask[sl] if mask is not None else None
            loss[sl] = chunk_loss if keep is None else torch.where(keep, chunk_loss, 0.0)
            if compute_grad:
                weight = scale if keep is None else torch.where(keep, scale, 0.0)[:, None]
                grad[sl] = chunk_grad.mul_(weight)
    return loss, grad
