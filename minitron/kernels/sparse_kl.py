"""Forward KL against a sparse teacher (its top-k log-probabilities plus the tail mass): the loss of
distillation from a teacher cache (`minitron.teacher_cache`).

Math, per token, with the student's logits s over the whole vocabulary V (temperature 1):
  teacher     kept set K (k distinct indices), log-probs lp_j (j in K) and the log of the tail mass
              lt = log(1 - sum_K p_j). Storage rounds them (fp16), so they are renormalized first:
              Z = sum_K e^lp_j + e^lt;  p_j = e^lp_j / Z,  p_tail = e^lt / Z  (Z = 1 up to rounding).
  student     L = logsumexp(s);  log q_j = s_j - L;
              log q_tail = logsumexp_{v not in K}(s_v) - L   (the kept lanes masked to -inf: exact,
              where log(1 - sum_K q_j) would cancel when K holds almost all of the student's mass).
  loss        sum_K p_j (log p_j - log q_j) + p_tail (log p_tail - log q_tail)     (0 log 0 = 0)
              = KL between the (k+1)-bucket coarsenings of the two distributions (the kept tokens and
              one "everything else" bucket). With K = the whole vocabulary, p_tail = 0 and this is the
              full-vocabulary forward KL of `softmax_kl` at T = 1.
  gradient    d loss / d s_v = q_v - p_v                    (v in K)
                             = q_v (1 - p_tail / q_tail)    (v not in K)
              i.e. q - p~, where p~ spreads the teacher's tail mass over the tokens outside K in the
              student's own proportions (q_v / q_tail = e^(s_v - logsumexp_tail), computed that way).
  + ce_weight * (L - s_label) for labels != ignore_index (the data's cross-entropy, as in softmax_kl).

Temperature: the cache stores T = 1 log-probs. Softening by T would need sum_{v not in K} p_v^(1/T),
which the tail mass does not determine, so the sparse loss has no temperature (distillation refuses
T != 1 with a cache).

Two forms, both pure torch (chunk by chunk over tokens, so no more than one chunk of [rows, V]
temporaries exists at a time; the loss and its gradient come from the same pass, and backward is a
multiply by grad_output):
  `sparse_kl(student_logits, ...)`               the logits form: keeps the [N, V] logit gradient,
                                                 as the online torch path does.
  `fused_linear_sparse_kl(hidden, weight, ...)`  from the student's final hidden states and LM head:
                                                 logits exist one chunk of tokens at a time; keeps
                                                 grad_hidden [N, H] and grad_weight [V, H].
"""

from __future__ import annotations

import math

import torch

from minitron.kernels.reference import CHUNK_ELEMENTS_CPU, CHUNK_ELEMENTS_GPU

SPARSE_REDUCTIONS = ("mean", "sum")


def teacher_log_probs(top_logp: torch.Tensor, log_tail: torch.Tensor):
    """(log p_j [N, k], log p_tail [N]) renormalized in fp32 (see the module header)."""
    lp, lt = top_logp.float(), log_tail.float()
    log_z = torch.logaddexp(torch.logsumexp(lp, dim=-1), lt)
    return lp - log_z[:, None], lt - log_z


def sparse_rows(s: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor,
                log_tail: torch.Tensor, labels: torch.Tensor | None, ce_weight: float,
                ignore_index: int, compute_grad: bool):
    """Per-token loss [C] (fp32) and d loss / d s [C, V] (fp32, or None) of one chunk of rows."""
    s = s.float()
    idx = top_idx.long()
    lse = torch.logsumexp(s, dim=-1)  # [C]
    log_q = s - lse[:, None]  # [C, V]
    lq_k = log_q.gather(1, idx)  # [C, k]
    lp, lt = teacher_log_probs(top_logp, log_tail)
    kept = torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True)
    s_tail = s.masked_fill(kept, -math.inf)  # [C, V]
    lse_tail = torch.logsumexp(s_tail, dim=-1)  # -inf when K is the whole vocabulary
    lq_tail = lse_tail - lse
    p, pt = lp.exp(), lt.exp()
    kept_term = torch.where(p > 0, p * (lp - lq_k), 0.0).sum(-1)
    tail_term = torch.where(pt > 0, pt * (lt - lq_tail), 0.0)
    loss = kept_term + tail_term
    grad = None
    if compute_grad:
        q = log_q.exp_()  # log_q is not needed past this point
        safe = torch.where(torch.isfinite(lse_tail), lse_tail, 0.0)
        grad = q.sub_(s_tail.sub_(safe[:, None]).exp_().mul_(pt[:, None]))  # 0 on kept lanes
        grad.scatter_add_(1, idx, -p)
    if labels is not None and ce_weight != 0.0:
        keep = labels != ignore_index
        safe_labels = torch.where(keep, labels, 0).long()
        w = torch.where(keep, ce_weight, 0.0).float()
        loss = loss + w * (lse - s.gather(1, safe_labels[:, None]).squeeze(1))
        if compute_grad:
            grad.add_((s - lse[:, None]).exp_().mul_(w[:, None]))
            grad.scatter_add_(1, safe_labels[:, None], -w[:, None])
    return loss, grad


def _scale(mask: torch.Tensor | None, n: int, reduction: str, device) -> torch.Tensor:
    """1 / counted tokens for "mean" (0 counted: 1, so an all-masked batch gives 0), else 1."""
    if reduction == "sum":
        return torch.ones((), device=device)
    if mask is None:
        return torch.full((), 1.0 / max(n, 1), device=device)
    return 1.0 / mask.sum().clamp(min=1).float()


def _chunk_rows(v: int, device: torch.device) -> int:
    elements = CHUNK_ELEMENTS_CPU if device.type == "cpu" else CHUNK_ELEMENTS_GPU
    return max(1, elements // v)


def _check(lead: torch.Size, vocab: int, top_logp, top_idx, log_tail, mask, reduction) -> None:
    if reduction not in SPARSE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {SPARSE_REDUCTIONS}, got {reduction!r}")
    if top_logp.shape != top_idx.shape or top_logp.shape[:-1] != lead or log_tail.shape != lead:
        raise ValueError(f"teacher top-k {tuple(top_logp.shape)} / indices {tuple(top_idx.shape)} / "
                         f"tail {tuple(log_tail.shape)} must have the student's leading shape "
                         f"{tuple(lead)} (plus k for the first two)")
    if top_logp.shape[-1] > vocab:
        raise ValueError(f"k={top_logp.shape[-1]} kept tokens exceed the vocabulary ({vocab})")
    if mask is not None and mask.shape != lead:
        raise ValueError(f"mask {tuple(mask.shape)} must have the leading shape {tuple(lead)}")


class _SparseKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, top_logp, top_idx, log_tail, mask, labels, ce_weight, ignore_index, reduction):
        n, v = s.shape
        scale = _scale(mask, n, reduction, s.device)
        need = ctx.needs_input_grad[0]
        loss = torch.zeros(n, dtype=torch.float32, device=s.device)
        grad = torch.zeros_like(s) if need else None
        rows = _chunk_rows(v, s.device)
        with torch.no_grad():
            for start in range(0, n, rows):
                sl = slice(start, min(start + rows, n))
                l, g = sparse_rows(s[sl], top_logp[sl], top_idx[sl], log_tail[sl],
                                   labels[sl] if labels is not None else None, ce_weight,
                                   ignore_index, need)
                keep = mask[sl] if mask is not None else None
                loss[sl] = l if keep is None else torch.where(keep, l, 0.0)
                if need:
                    w = scale if keep is None else torch.where(keep, scale, 0.0)[:, None]
                    grad[sl] = g.mul_(w)
        ctx.save_for_backward(grad)
        return loss.sum() * scale

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None, None, None, None


def sparse_kl(student_logits: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor,
              log_tail: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean", *,
              labels: torch.Tensor | None = None, ce_weight: float = 0.0,
              ignore_index: int = -100) -> torch.Tensor:
    """KL(teacher || student) against a sparse teacher, from the student's logits (see the header).

    Args:
        student_logits: [..., V] any float dtype; gets the gradient (in its own dtype).
        top_logp: [..., k] the teacher's kept log-probabilities (T = 1; fp16 or fp32).
        top_idx: [..., k] their token ids (distinct per token; any integer dtype).
        log_tail: [...] log of the teacher's probability outside the kept ids (-inf when none).
        mask, reduction, labels, ce_weight, ignore_index: as `softmax_kl` ("mean" over counted
            tokens, or "sum").
    Returns: the fp32 scalar loss.
    """
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    _check(lead, v, top_logp, top_idx, log_tail, mask, reduction)
    k = top_logp.shape[-1]
    return _SparseKLFunction.apply(
        student_logits.reshape(-1, v), top_logp.reshape(-1, k), top_idx.reshape(-1, k),
        log_tail.reshape(-1), mask.reshape(-1) if mask is not None else None,
        labels.reshape(-1) if labels is not None and ce_weight != 0.0 else None,
        ce_weight, ignore_index, reduction)


class _FusedLinearSparseKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, top_logp, top_idx, log_tail, mask, labels, ce_weight, ignore_index,
                reduction, chunk_size, dtype):
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = _scale(mask, n, reduction, h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=dtype, device=h.device) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        # Every cast explicit, autocast off: the same arithmetic whatever the caller's context.
        with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
            wc = w.to(dtype)
            for start in range(0, n, chunk_size):
                sl = slice(start, min(start + chunk_size, n))
                hs = h[sl].to(dtype)
                loss, g = sparse_rows(hs @ wc.T, top_logp[sl], top_idx[sl], log_tail[sl],
                                      labels[sl] if labels is not None else None, ce_weight,
                                      ignore_index, need_h or need_w)
                keep = mask[sl] if mask is not None else None
                total += (loss if keep is None else torch.where(keep, loss, 0.0)).sum()
                if not (need_h or need_w):
                    continue
                g = g.mul_(scale if keep is None else torch.where(keep, scale, 0.0)[:, None])
                g = g.to(dtype)
                if need_h:
                    torch.mm(g, wc, out=grad_h[sl])  # [C, H]
                if need_w:
                    grad_w.add_((g.T @ hs).to(grad_w.dtype))  # [V, H]
        ctx.save_for_backward(grad_h.to(h.dtype) if need_h else None, grad_w)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_output.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_output.to(grad_w.dtype)
        return (grad_h, grad_w) + (None,) * 10


def fused_linear_sparse_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                           top_logp: torch.Tensor, top_idx: torch.Tensor, log_tail: torch.Tensor,
                           mask: torch.Tensor | None = None, reduction: str = "mean", *,
                           labels: torch.Tensor | None = None, ce_weight: float = 0.0,
                           ignore_index: int = -100, chunk_size: int = 1024) -> torch.Tensor:
    """`sparse_kl(student_hidden @ student_weight.T, ...)` without more than `chunk_size` tokens of
    logits at once. student_hidden [..., H] and student_weight [V, H] (no bias) get gradients; the
    logits are computed in autocast's dtype when autocast is on, else the hidden states' dtype
    (as `fused_linear_softmax_kl`); the loss math is fp32."""
    from minitron.kernels.fused_linear import compute_dtype_for

    lead, v = student_hidden.shape[:-1], student_weight.shape[0]
    if student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"weight {tuple(student_weight.shape)} must be [V, H] with H = "
                         f"{student_hidden.shape[-1]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check(lead, v, top_logp, top_idx, log_tail, mask, reduction)
    k = top_logp.shape[-1]
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    return _FusedLinearSparseKLFunction.apply(
        h, student_weight, top_logp.reshape(-1, k), top_idx.reshape(-1, k), log_tail.reshape(-1),
        mask.reshape(-1) if mask is not None else None,
        labels.reshape(-1) if labels is not None and ce_weight != 0.0 else None,
        ce_weight, ignore_index, reduction, chunk_size, compute_dtype_for(h))
