"""The distillation loss straight from final hidden states and LM-head weights, chunked over tokens.

For each chunk of tokens: logits = hidden @ weight.T (student and teacher), the fused softmax-KL
kernels (the loss, then the logit gradient, one sweep each), then the gradient matmuls into the
student's hidden states and LM-head weight. The full [N, V] logits never exist: peak extra memory is about
chunk_size * (2 V_s + V_t) elements in the logits' dtype, whatever N is, plus the weight gradient
(which autograd would hold anyway).

Memory sketch at N=8192, V=128256, bf16: the plain form holds student logits, teacher logits and
the logit gradient, 3 * 2.1 GB; with chunk_size=1024 this form holds 3 * 0.26 GB.
"""

from __future__ import annotations

import torch
from torch import nn

from minitron.kernels.reference import Divergence
from minitron.kernels.softmax_kl import (
    Backend,
    Reduction,
    _check_args,
    _grad_scale,
    _pick_rows_fn,
    _reduce,
    check_label_range,
)

DEFAULT_CHUNK_SIZE = 1024


def compute_dtype_for(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the chunk matmuls run in: autocast's, when it is on for the hidden states' device
    (bf16 compute over fp32 master weights), else the hidden states' own dtype (the activations
    carry the precision; weights in another dtype are cast to it once per call)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _chunk_grads(h_s, w_s, h_t, w_t, mask, labels, scale, rows_fn, options, chunk_size,
                 need_h, need_w, dtype, row_scale=None):
    """Run every chunk in `dtype`; return (loss [N], grad_hidden or None, grad_weight or None),
    the gradients in the dtypes of h_s and w_s.

    `row_scale` [N] (reduction "none" in backward) multiplies each token's logit gradient.
    Autocast is off inside: every cast is explicit, so the forward and a recomputing backward (which
    runs outside the caller's autocast) do the same arithmetic, and `out=` buffers keep their dtype.
    """
    n = h_s.shape[0]
    compute_grad = need_h or need_w
    loss = None
    with torch.autocast(h_s.device.type, enabled=False):
        # One cast of each head per call (no copy when the dtypes match), as autocast would do.
        wc_s, wc_t = w_s.to(dtype), w_t.to(dtype)
        grad_h = torch.empty(h_s.shape, dtype=dtype, device=h_s.device) if need_h else None
        # Accumulated in the weight's dtype (fp32 master weights: fp32 over every chunk; a bf16
        # head, as FSDP2's bf16 parameters: one bf16 rounding per chunk, no extra fp32 [V, H]).
        grad_w = torch.zeros_like(w_s) if need_w else None
        for start in range(0, n, chunk_size):
            sl = slice(start, min(start + chunk_size, n))
            hs = h_s[sl].to(dtype)
            s_logits = hs @ wc_s.T  # [C, V_s]
            t_logits = h_t[sl].to(dtype) @ wc_t.T  # [C, V_t]
            chunk_loss, g = rows_fn(s_logits, t_logits,
                                    mask[sl] if mask is not None else None,
                                    labels[sl] if labels is not None else None,
                                    scale, *options, compute_grad=compute_grad)
            if loss is None:
                loss = torch.empty(n, dtype=chunk_loss.dtype, device=chunk_loss.device)
            loss[sl] = chunk_loss
            if not compute_grad:
                continue
            if row_scale is not None:
                g.mul_(row_scale[sl].unsqueeze(-1).to(g.dtype))
            if need_h:
                torch.mm(g, wc_s, out=grad_h[sl])  # [C, H]
            if need_w:
                if grad_w.dtype == dtype:
                    grad_w.addmm_(g.T, hs)  # [V_s, H]
                else:  # fp32 master weight, bf16 compute: one [V_s, H] product per chunk
                    grad_w.add_(g.T @ hs)
    if loss is None:
        loss = torch.zeros(0, dtype=torch.float32, device=h_s.device)
    if grad_h is not None:
        grad_h = grad_h.to(h_s.dtype)
    return loss, grad_h, grad_w


class _FusedLinearSoftmaxKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, mask, labels, rows_fn, options, reduction, chunk_size, dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = _grad_scale(mask, h_s.shape[0], reduction, h_s.device)
        ctx.reduction = reduction
        if reduction == "none":
            # A per-token grad_output reaches the weight gradient as sum_i g_i dlogits_i^T h_i, which
            # cannot be rescaled after the fact: keep the inputs and recompute in backward.
            loss, _, _ = _chunk_grads(h_s, w_s, h_t, w_t, mask, labels, scale, rows_fn, options,
                                      chunk_size, False, False, dtype)
            ctx.save_for_backward(h_s, w_s, h_t, w_t, mask, labels, scale)
            ctx.recompute = (rows_fn, options, chunk_size, need_h, need_w, dtype)
            return loss
        loss, grad_h, grad_w = _chunk_grads(h_s, w_s, h_t, w_t, mask, labels, scale, rows_fn, options,
                                            chunk_size, need_h, need_w, dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return _reduce(loss, scale, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            h_s, w_s, h_t, w_t, mask, labels, scale = ctx.saved_tensors
            rows_fn, options, chunk_size, need_h, need_w, dtype = ctx.recompute
            _, grad_h, grad_w = _chunk_grads(h_s, w_s, h_t, w_t, mask, labels, scale, rows_fn, options,
                                             chunk_size, need_h, need_w, dtype, row_scale=grad_output)
        else:
            grad_h, grad_w = ctx.saved_tensors
            # In place, as in softmax_kl: a second backward trips autograd's version check.
            if grad_h is not None:
                grad_h.mul_(grad_output)
            if grad_w is not None:
                grad_w.mul_(grad_output)
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None


def fused_linear_softmax_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    *,
    divergence: Divergence = "kl",
    beta: float = 0.5,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: Backend = "auto",
    check_labels: bool = True,
) -> torch.Tensor:
    """`softmax_kl(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, ...)` without
    ever holding more than `chunk_size` tokens of logits.

    Args:
        student_hidden: [..., H_s], the student's final (normed) hidden states; gets a gradient.
        student_weight: [V_s, H_s], the student's LM head (`lm_head.weight`, nn.Linear layout);
            gets a gradient. No bias: Llama-family heads have none.
        teacher_hidden: [..., H_t], same leading shape; constant.
        teacher_weight: [V_t, H_t]; constant.
        chunk_size: tokens per chunk; peak extra memory ~ chunk_size * (2 V_s + V_t) logits.
        Precision: the logits are computed in autocast's dtype when autocast is on for the hidden
        states' device, else in the student hidden states' dtype (`compute_dtype_for`); weights
        and teacher states of another dtype are cast to it. The softmax-KL math is fp32 either way,
        and the gradients come back in the dtypes of `student_hidden` and `student_weight`
        (fp32 master weights get an fp32 gradient accumulated in fp32 over the chunks).
        The other arguments are those of `softmax_kl` (same meaning, same defaults).

    Returns:
        The loss as `softmax_kl` returns it. With reduction="none" the backward recomputes the
        logits chunk by chunk (a per-token grad_output cannot be folded in earlier).
    """
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} must share their leading (token) shape")
    if student_weight.shape[1] != student_hidden.shape[-1] or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(f"weights must be [V, H] matching the hidden sizes: student "
                         f"{tuple(student_weight.shape)} vs H={student_hidden.shape[-1]}, teacher "
                         f"{tuple(teacher_weight.shape)} vs H={teacher_hidden.shape[-1]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # Argument checks shared with softmax_kl, on logits-shaped stand-ins that allocate nothing.
    s_like = student_hidden.new_empty(()).expand(*lead, student_weight.shape[0])
    t_like = teacher_hidden.new_empty(()).expand(*lead, teacher_weight.shape[0])
    _check_args(s_like, t_like, temperature, mask, reduction, divergence, beta, labels)
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    mask_rows = mask.reshape(-1) if mask is not None else None
    label_rows = labels.reshape(-1) if labels is not None and ce_weight != 0.0 else None
    if label_rows is not None and check_labels:
        check_label_range(label_rows, student_weight.shape[0], ignore_index)
    dtype = compute_dtype_for(h_s)
    rows_fn = _pick_rows_fn(h_s.new_empty(0, dtype=dtype), h_t.new_empty(0, dtype=dtype), backend)
    options = (temperature, divergence, beta, ce_weight, ignore_index)
    loss = _FusedLinearSoftmaxKLFunction.apply(h_s, student_weight, h_t, teacher_weight.detach(),
                                               mask_rows, label_rows, rows_fn, options, reduction,
                                               chunk_size, dtype)
    return loss.reshape(lead) if reduction == "none" else loss


class FusedLinearSoftmaxKL(nn.Module):
    """`fused_linear_softmax_kl` as a module: the loss options are fixed at construction."""

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: Reduction = "mean",
        divergence: Divergence = "kl",
        beta: float = 0.5,
        ce_weight: float = 0.0,
        ignore_index: int = -100,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        super().__init__()
        self.temperature, self.reduction, self.divergence = temperature, reduction, divergence
        self.beta, self.ce_weight, self.ignore_index = beta, ce_weight, ignore_index
        self.chunk_size = chunk_size

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None, labels=None):
        return fused_linear_softmax_kl(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                       self.temperature, mask, self.reduction, divergence=self.divergence,
                                       beta=self.beta, labels=labels, ce_weight=self.ce_weight,
                                       ignore_index=self.ignore_index, chunk_size=self.chunk_size)
