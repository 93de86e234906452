"""Fused softmax + KL divergence between student and teacher logits, for distillation.

Two Triton kernels, each one sweep over the vocabulary with every statistic in fp32 registers:
the loss kernel reads the raw logits once and writes the per-token loss plus a few per-token
statistics; the gradient kernel, launched from backward, reads the logits once more and writes
d loss / d student in the input dtype with `grad_output` already folded in. No [N, V] fp32 tensor
is ever allocated, and nothing waits on the host. The pure-torch definition (and the CPU path) is
`reference.py`; this file is only a faster way to compute it.

Math, per token (row), with z_s = student / T, z_t = teacher / T over the shared V = min(V_s, V_t)
columns, q = softmax(z_s), p = softmax(z_t), and each log-sum-exp kept as (max m, log of the
rescaled sum ld) so that log q_j = (z_s_j - m_s) - ld_s never subtracts two large numbers:

  loss pass   online max / sum over vocabulary blocks: (m_s, d_s), (m_t, d_t), and for a fused
              cross-entropy term (m_r, d_r) of the raw student over all V_s columns. Forward KL
              rides along with the teacher's sum:  a = sum_j e^(z_t_j - m_t) (z_t_j - z_s_j),
              rescaled by e^(m_old - m_new) exactly as d_t is, so at the end
                  KL(p||q) = a / d_t - (m_t - m_s) - (ld_t - ld_s)
              (reverse KL the same with s and t swapped). JSD needs log m_j = logaddexp(log p_j +
              log beta, log q_j + log(1-beta)), i.e. both normalizers first: a second sweep.
  loss        kl:          T^2 KL(p||q);   reverse_kl:  T^2 KL(q||p)
              jsd:         T^2 (beta KL(p||m) + (1-beta) KL(q||m))
              + ce_weight * (logsumexp(student) - student[label])   (label != ignore_index)
  gradient    d loss / d student_j (chain rule through z_s = s / T gives T^2 / T = T):
              kl:          T (q_j - p_j)
              reverse_kl:  T q_j (log q_j - log p_j - KL(q||p))
              jsd:         T (1-beta) q_j (log q_j - log m_j - KL(q||m))
              + ce_weight (softmax(student)_j - [j == label]);  columns j >= V of the student get
              only the CE part (0 without labels).

Why the gradient is not computed in the forward launch and saved (as liger-kernel does, and as
STYLE.md describes): backward would then have to scale the saved [N, V] gradient by `grad_output`,
one more read and write of it, unless a host sync proves grad_output == 1; and in distillation it
rarely is (alpha * kd + ce, or a loss divided by the accumulation steps). Recomputing instead
costs one read of each input in backward and writes the gradient once, scaled. Memory traffic of
a forward-KL training step, bf16 [8192, 128256] (2.1 GB per tensor): forward reads student and
teacher (4.2 GB), backward reads both and writes the gradient (6.3 GB): 10.5 GB in all, against
14.7 GB for compute-in-forward + scale-in-backward. The peak is the same three [N, V] tensors
(student, teacher, gradient) either way, only reached in backward instead of at the end of forward.
The chunked fused-linear form, which needs each chunk's gradient at once, calls both kernels back
to back (`softmax_kl_rows`).
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch
from torch import nn

from minitron.kernels.reference import DIVERGENCES, Divergence, reference_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the kernels below are defined but never launched.
    triton = None
    tl = None

Reduction = Literal["mean", "sum", "none"]
Backend = Literal["auto", "triton", "torch"]
REDUCTIONS = ("mean", "sum", "none")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DIVERGENCE_ID = {"kl": 0, "reverse_kl": 1, "jsd": 2}
# Per-token statistics the loss kernel leaves for the gradient kernel: [N, 8] fp32.
_STATS = 8  # m_s, ld_s, m_t, ld_t, m_r, ld_r, row_term (KL(q||p) or KL(q||m)), unused


def _jit(fn):
    # `triton.jit` when triton is installed; the annotations are strings (postponed evaluation), so
    # the function body is only parsed, never run, without it.
    return triton.jit(fn) if triton is not None else fn


@_jit
def _online_lse(m, d, x):
    # Fold a block x into the running (max m, sum d of exp(x - m)).
    m_new = tl.maximum(m, tl.max(x, axis=0))
    d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
    return m_new, d


@_jit
def _online_lse_kl(m, d, a, x, y):
    # `_online_lse` of x, and the running a = sum_j e^(x_j - m) (x_j - y_j) under the same rescaling.
    # Lanes whose e^(x_j - m) is 0 (x = -inf, or underflow) carry no mass, as in the reference's
    # 0 log 0 = 0; y = -inf under a live x makes a = +inf (the KL is infinite), which a later rescale
    # must keep rather than turn into inf * 0 = NaN.
    m_new = tl.maximum(m, tl.max(x, axis=0))
    alpha = tl.exp(m - m_new)
    e = tl.exp(x - m_new)
    live = e > 0.0  # only where x is finite; the selects keep -inf - -inf out of dead lanes
    term = tl.where(live, e * (tl.where(live, x, 0.0) - tl.where(live, y, 0.0)), 0.0)
    a = tl.where(a == float("inf"), a, a * alpha) + tl.sum(term, axis=0)
    d = d * alpha + tl.sum(e, axis=0)
    return m_new, d, a


@_jit
def _kl_terms(log_a, log_b, live):
    # a_j (log a_j - log b_j) with 0 log 0 = 0; finite stand-ins keep dead lanes free of NaN.
    ok = live & (log_a > float("-inf"))
    la = tl.where(ok, log_a, 0.0)
    lb = tl.where(ok, log_b, 0.0)
    return tl.where(ok, tl.exp(la) * (la - lb), 0.0)


@_jit
def _log_mix(log_p, log_q, log_beta, log_1m_beta):
    # log(beta p + (1 - beta) q) as a two-term logaddexp; -inf where both p and q are 0.
    a = log_p + log_beta
    b = log_q + log_1m_beta
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    live = hi > float("-inf")
    hi_safe = tl.where(live, hi, 0.0)
    lo_safe = tl.where(live, lo, 0.0)
    return tl.where(live, hi_safe + tl.log(1.0 + tl.exp(lo_safe - hi_safe)), float("-inf"))


@_jit
def _softmax_kl_loss_kernel(
    s_ptr,  # [N, V_S] student logits, unit column stride
    t_ptr,  # [N, V_T] teacher logits, unit column stride
    mask_ptr,  # [N] bool: tokens that count (read only if HAS_MASK)
    labels_ptr,  # [N] int64 hard labels (read only if HAS_LABELS)
    loss_ptr,  # [N] fp32 per-token loss, 0 where masked
    stats_ptr,  # [N, 8] fp32 statistics for the gradient kernel (unwritten where masked)
    s_stride,
    t_stride,
    V_S,  # student vocabulary
    V_SHARED,  # min(V_S, V_T): the columns both distributions are taken over
    temperature,
    inv_temperature,
    beta,
    log_beta,
    log_1m_beta,
    ce_weight,
    ignore_index,
    DIVERGENCE: tl.constexpr,  # 0 kl, 1 reverse_kl, 2 jsd
    HAS_MASK: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    offs = tl.arange(0, BLOCK_V)

    keep = tl.full([], 1, tl.int1)
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    if keep:
        # The running maxima start at a finite -3e38, not -inf, so exp(m_old - m_new) never
        # computes -inf - -inf, even for a block that is all -inf.
        m_s = tl.full([], -3.0e38, tl.float32)
        d_s = tl.zeros([], tl.float32)
        m_t = tl.full([], -3.0e38, tl.float32)
        d_t = tl.zeros([], tl.float32)
        m_r = tl.full([], -3.0e38, tl.float32)
        d_r = tl.zeros([], tl.float32)
        a = tl.zeros([], tl.float32)  # the running KL numerator (forward or reverse)
        if HAS_LABELS:
            n_stat = V_S
        else:
            n_stat = V_SHARED
        for start in range(0, n_stat, BLOCK_V):
            cols = start + offs
            shared = cols < V_SHARED
            s_raw = tl.load(s_row + cols, mask=cols < n_stat, other=float("-inf")).to(tl.float32)
            t = tl.load(t_row + cols, mask=shared, other=float("-inf")).to(tl.float32) * inv_temperature
            s = tl.where(shared, s_raw * inv_temperature, float("-inf"))
            if DIVERGENCE == 0:
                m_t, d_t, a = _online_lse_kl(m_t, d_t, a, t, s)
                m_s, d_s = _online_lse(m_s, d_s, s)
            elif DIVERGENCE == 1:
                m_s, d_s, a = _online_lse_kl(m_s, d_s, a, s, t)
                m_t, d_t = _online_lse(m_t, d_t, t)
            else:
                m_s, d_s = _online_lse(m_s, d_s, s)
                m_t, d_t = _online_lse(m_t, d_t, t)
            if HAS_LABELS:
                m_r, d_r = _online_lse(m_r, d_r, s_raw)
        ld_s = tl.log(d_s)
        ld_t = tl.log(d_t)
        ld_r = tl.zeros([], tl.float32)
        if HAS_LABELS:
            ld_r = tl.log(d_r)

        row_term = tl.zeros([], tl.float32)  # the gradient's row constant: KL(q||p) or KL(q||m)
        if DIVERGENCE == 0:
            div = a / d_t - (m_t - m_s) - (ld_t - ld_s)
        elif DIVERGENCE == 1:
            div = a / d_s - (m_s - m_t) - (ld_s - ld_t)
            row_term = div
        else:
            div = tl.zeros([], tl.float32)
            for start in range(0, V_SHARED, BLOCK_V):
                cols = start + offs
                live = cols < V_SHARED
                s_raw = tl.load(s_row + cols, mask=live, other=0.0).to(tl.float32)
                t = tl.load(t_row + cols, mask=live, other=0.0).to(tl.float32)
                log_q = (s_raw * inv_temperature - m_s) - ld_s
                log_p = (t * inv_temperature - m_t) - ld_t
                log_m = _log_mix(log_p, log_q, log_beta, log_1m_beta)
                kl_qm = tl.sum(_kl_terms(log_q, log_m, live), axis=0)
                div += beta * tl.sum(_kl_terms(log_p, log_m, live), axis=0) + (1.0 - beta) * kl_qm
                row_term += kl_qm

        # The cross-entropy term: logsumexp(student) - student[label].
        ce = tl.zeros([], tl.float32)
        if HAS_LABELS:
            label = tl.load(labels_ptr + row).to(tl.int64)
            has_ce = label != ignore_index
            # The launcher refuses labels outside [0, V_S) (unless its caller checked them
            # once, earlier); a label that still gets here is never read through: its loss is NaN,
            # which the training loop's finiteness check stops on.
            in_range = (label >= 0) & (label < V_S)
            s_label = tl.load(s_row + label, mask=has_ce & in_range, other=0.0).to(tl.float32)
            ce = tl.where(has_ce, tl.where(in_range, ce_weight * ((m_r - s_label) + ld_r),
                                           float("nan")), 0.0)
        tl.store(loss_ptr + row, temperature * temperature * div + ce)

        st = stats_ptr + row * 8
        tl.store(st + 0, m_s)
        tl.store(st + 1, ld_s)
        tl.store(st + 2, m_t)
        tl.store(st + 3, ld_t)
        tl.store(st + 4, m_r)
        tl.store(st + 5, ld_r)
        tl.store(st + 6, row_term)
    else:
        tl.store(loss_ptr + row, 0.0)


@_jit
def _softmax_kl_grad_kernel(
    s_ptr,  # [N, V_S] student logits, unit column stride
    t_ptr,  # [N, V_T] teacher logits, unit column stride
    mask_ptr,  # [N] bool (read only if HAS_MASK)
    labels_ptr,  # [N] int64 (read only if HAS_LABELS)
    stats_ptr,  # [N, 8] fp32 from the loss kernel
    scale_ptr,  # [] fp32: 1 / counted tokens for "mean", else 1
    go_ptr,  # grad_output: [] (go_stride 0) or [N] (reduction "none"), fp32
    grad_ptr,  # [N, V_S] out: d loss / d student logits, in the student's dtype
    s_stride,
    t_stride,
    grad_stride,
    go_stride,
    V_S,
    V_SHARED,
    temperature,
    inv_temperature,
    beta,
    log_beta,
    log_1m_beta,
    ce_weight,
    ignore_index,
    DIVERGENCE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = grad_ptr + row * grad_stride
    offs = tl.arange(0, BLOCK_V)

    keep = tl.full([], 1, tl.int1)
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    if keep:
        st = stats_ptr + row * 8
        m_s = tl.load(st + 0)
        ld_s = tl.load(st + 1)
        m_t = tl.load(st + 2)
        ld_t = tl.load(st + 3)
        m_r = tl.load(st + 4)
        ld_r = tl.load(st + 5)
        row_term = tl.load(st + 6)
        label = tl.zeros([], tl.int64)
        w_ce = tl.zeros([], tl.float32)
        if HAS_LABELS:
            label = tl.load(labels_ptr + row).to(tl.int64)
            w_ce = tl.where(label != ignore_index, ce_weight, 0.0)
        g_scale = tl.load(scale_ptr) * tl.load(go_ptr + row * go_stride).to(tl.float32)

        for start in range(0, V_S, BLOCK_V):
            cols = start + offs
            live = cols < V_SHARED
            s_raw = tl.load(s_row + cols, mask=cols < V_S, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=live, other=0.0).to(tl.float32)
            log_q = (s_raw * inv_temperature - m_s) - ld_s
            log_p = (t * inv_temperature - m_t) - ld_t
            if DIVERGENCE == 0:
                q = tl.where(live, tl.exp(log_q), 0.0)
                p = tl.where(live, tl.exp(log_p), 0.0)
                g = temperature * (q - p)
            else:
                ok = live & (log_q > float("-inf"))
                lq = tl.where(ok, log_q, 0.0)
                if DIVERGENCE == 1:
                    lo = tl.where(ok, log_p, 0.0)
                    g = tl.where(ok, temperature * tl.exp(lq) * (lq - lo - row_term), 0.0)
                else:
                    lo = tl.where(ok, _log_mix(log_p, log_q, log_beta, log_1m_beta), 0.0)
                    g = tl.where(ok, temperature * (1.0 - beta) * tl.exp(lq) * (lq - lo - row_term), 0.0)
            if HAS_LABELS:
                g += w_ce * (tl.exp((s_raw - m_r) - ld_r) - tl.where(cols == label, 1.0, 0.0))
            tl.store(g_row + cols, (g * g_scale).to(grad_ptr.dtype.element_ty), mask=cols < V_S)
    else:
        # A masked token costs one gradient write of zeros and no reads.
        for start in range(0, V_S, BLOCK_V):
            cols = start + offs
            tl.store(g_row + cols, tl.zeros([BLOCK_V], tl.float32).to(grad_ptr.dtype.element_ty),
                     mask=cols < V_S)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _launch_config(vocab: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary. Chosen per call from V, never probed at import."""
    if interpret:
        # The interpreter pays per loop iteration, not per element: take the biggest blocks it can.
        return min(_next_power_of_2(vocab), 32768), 4
    block = min(_next_power_of_2(vocab), 4096)
    return block, 8 if block >= 2048 else 4


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    # Rows may be strided (a vocab-sliced view); the kernels need unit stride along the vocabulary.
    return x if x.stride(1) == 1 else x.contiguous()


def _scalar_args(temperature, beta, ce_weight, ignore_index) -> tuple:
    """The kernels' shared runtime scalars, in their signature's order (temperature .. ignore_index)."""
    jsd = 0.0 < beta < 1.0  # log beta is only read by JSD, which requires this
    return (float(temperature), 1.0 / float(temperature), float(beta),
            math.log(beta) if jsd else 0.0, math.log1p(-beta) if jsd else 0.0,
            float(ce_weight), int(ignore_index))


def softmax_kl_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    temperature: float,
    divergence: Divergence,
    beta: float,
    ce_weight: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [N] fp32 and the statistics [N, 8] fp32 that `softmax_kl_grad` needs.

    student [N, V_s], teacher [N, V_t]: fp32/bf16/fp16 (may differ), unit stride along the vocabulary.
    One read of each input (two for JSD). No host synchronization.
    """
    if triton is None:
        raise RuntimeError("the Triton kernel needs the `triton` package; use backend='torch'")
    n, v_s = student.shape
    v_t = teacher.shape[1]
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    stats = torch.empty((n, _STATS), dtype=torch.float32, device=student.device)
    if n == 0:
        return loss, stats
    has_labels = labels is not None and ce_weight != 0.0
    block, num_warps = _launch_config(max(v_s, v_t), student.device.type == "cpu")
    _softmax_kl_loss_kernel[(n,)](
        student, teacher,
        mask if mask is not None else loss,  # unread placeholders when the feature is off
        labels if has_labels else loss,
        loss, stats,
        student.stride(0), teacher.stride(0),
        v_s, min(v_s, v_t),
        *_scalar_args(temperature, beta, ce_weight, ignore_index),
        DIVERGENCE=_DIVERGENCE_ID[divergence],
        HAS_MASK=mask is not None,
        HAS_LABELS=has_labels,
        BLOCK_V=block,
        num_warps=num_warps,
    )
    return loss, stats


def softmax_kl_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    stats: torch.Tensor,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    grad_scale: torch.Tensor,
    grad_output: torch.Tensor,
    temperature: float,
    divergence: Divergence,
    beta: float,
    ce_weight: float,
    ignore_index: int,
) -> torch.Tensor:
    """d loss / d student [N, V_s] in the student's dtype, times grad_scale * grad_output.

    The inputs and options are those `softmax_kl_loss` produced `stats` from; grad_scale is a 0-d
    fp32 tensor (1 / counted tokens for "mean"), grad_output 0-d or [N] (per token). One read of
    each input and one write of the gradient; 0 on masked tokens. No host synchronization.
    """
    n, v_s = student.shape
    v_t = teacher.shape[1]
    grad = torch.empty((n, v_s), dtype=student.dtype, device=student.device)
    if n == 0:
        return grad
    go = grad_output.to(device=student.device, dtype=torch.float32).reshape(-1)
    if go.numel() not in (1, n):
        raise ValueError(f"grad_output must be a scalar or have one entry per token ({n}), got {go.numel()}")
    has_labels = labels is not None and ce_weight != 0.0
    block, num_warps = _launch_config(max(v_s, v_t), student.device.type == "cpu")
    _softmax_kl_grad_kernel[(n,)](
        student, teacher,
        mask if mask is not None else stats,
        labels if has_labels else stats,
        stats,
        grad_scale.to(device=student.device, dtype=torch.float32),
        go, grad,
        student.stride(0), teacher.stride(0), grad.stride(0), go.stride(0) if go.numel() > 1 else 0,
        v_s, min(v_s, v_t),
        *_scalar_args(temperature, beta, ce_weight, ignore_index),
        DIVERGENCE=_DIVERGENCE_ID[divergence],
        HAS_MASK=mask is not None,
        HAS_LABELS=has_labels,
        BLOCK_V=block,
        num_warps=num_warps,
    )
    return grad


def softmax_kl_rows(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss and gradient in one call: the same contract as `reference.reference_rows`.

    student [N, V_s], teacher [N, V_t] (fp32/bf16/fp16, may differ), mask [N] bool or None,
    labels [N] integer or None, grad_scale: 0-d fp32 tensor on the logits' device. Returns the
    per-token loss [N] fp32 and the gradient [N, V_s] in the student's dtype (None unless
    `compute_grad`): the loss kernel, then the gradient kernel. No host synchronization.
    """
    student, teacher = _unit_stride(student), _unit_stride(teacher)
    options = (temperature, divergence, beta, ce_weight, ignore_index)
    loss, stats = softmax_kl_loss(student, teacher, mask, labels, *options)
    if not compute_grad:
        return loss, None
    one = torch.ones((), dtype=torch.float32, device=student.device)
    return loss, softmax_kl_grad(student, teacher, stats, mask, labels, grad_scale, one, *options)


def _grad_scale(mask: torch.Tensor | None, n: int, reduction: str, device) -> torch.Tensor:
    """1 / (counted tokens) for "mean", else 1; a device tensor, so counting never syncs the host."""
    if reduction != "mean":
        return torch.ones((), dtype=torch.float32, device=device)
    if mask is None:
        return torch.full((), 1.0 / max(n, 1), dtype=torch.float32, device=device)
    # An all-masked batch divides 0 by 1: loss 0 and gradient 0, never NaN.
    return 1.0 / mask.sum().clamp(min=1).to(torch.float32)


def _reduce(loss: torch.Tensor, scale: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    return total * scale.to(total.dtype) if reduction == "mean" else total


class _SoftmaxKLFunction(torch.autograd.Function):
    """Kernel path: forward runs the loss kernel and keeps the inputs; backward runs the gradient
    kernel with grad_output folded in (see the module docstring for why). Torch path (CPU): forward
    computes the loss and the gradient together and backward scales the saved gradient, because on
    a CPU the cost is arithmetic, which recomputing would double, not memory traffic."""

    @staticmethod
    def forward(ctx, student, teacher, mask, labels, rows_fn, options, reduction):
        scale = _grad_scale(mask, student.shape[0], reduction, student.device)
        ctx.reduction, ctx.options = reduction, options
        ctx.recompute = rows_fn is softmax_kl_rows
        if ctx.recompute:
            student, teacher = _unit_stride(student), _unit_stride(teacher)
            loss, stats = softmax_kl_loss(student, teacher, mask, labels, *options)
            # Version-tracked: editing the logits in place before backward is an error, not a
            # silently wrong gradient.
            ctx.save_for_backward(student, teacher, stats, mask, labels, scale)
        else:
            loss, grad = rows_fn(student, teacher, mask, labels, scale, *options, compute_grad=True)
            # Scaled in place in backward: a second backward through the same graph trips the
            # version check instead of returning a twice-scaled gradient.
            ctx.save_for_backward(grad)
        return _reduce(loss, scale, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.recompute:
            student, teacher, stats, mask, labels, scale = ctx.saved_tensors
            grad = softmax_kl_grad(student, teacher, stats, mask, labels, scale, grad_output, *ctx.options)
            return grad, None, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad.mul_(grad_output.unsqueeze(-1))
        else:
            grad.mul_(grad_output)
        return grad, None, None, None, None, None, None


def _check_args(student, teacher, temperature, mask, reduction, divergence, beta, labels):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        # beta = 0 or 1 makes the mixture one of the two distributions and the JSD identically 0;
        # the limits the GKD paper means are "kl" and "reverse_kl", which are their own options.
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}; use divergence='kl' or 'reverse_kl'")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student.dim() < 1 or student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} logits "
                         "must share their leading (token) shape")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != student.shape[:-1]):
        raise ValueError(f"mask must be bool with the token shape {tuple(student.shape[:-1])}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if labels is not None and (labels.dtype.is_floating_point or labels.shape != student.shape[:-1]):
        raise ValueError(f"labels must be integer with the token shape {tuple(student.shape[:-1])}, "
                         f"got {labels.dtype} {tuple(labels.shape)}")


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Refuse labels outside [0, vocab) other than `ignore_index`, before any kernel runs.

    One fused reduction over the [N] labels and one host read of its result: free for CPU labels,
    a device sync for GPU labels (microseconds against a multi-millisecond loss). Callers on a hot
    path that validated their token ids once (the distillation loop checks its data blocks on the
    host) pass `check_labels=False` and skip it; the kernels never read through a bad label
    anyway (its loss becomes NaN).
    """
    if labels.numel() == 0:
        return
    bad = ((labels < 0) & (labels != ignore_index)) | (labels >= vocab)
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) (the student vocabulary) or "
                         f"ignore_index={ignore_index}; got {first} at {int(bad.sum())} position(s)")


def _pick_rows_fn(student: torch.Tensor, teacher: torch.Tensor, backend: Backend):
    kernel_ok = triton is not None and student.dtype in KERNEL_DTYPES and teacher.dtype in KERNEL_DTYPES
    if backend == "torch":
        return reference_rows
    if backend == "triton":
        if not kernel_ok:
            raise ValueError(f"backend='triton' needs triton and fp32/bf16/fp16 logits "
                             f"(triton installed: {triton is not None}, dtype {student.dtype})")
        return softmax_kl_rows
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    on_device = student.is_cuda or (student.device.type == "cpu"
                                     and os.environ.get("TRITON_INTERPRET") == "1")
    return softmax_kl_rows if kernel_ok and on_device else reference_rows


def softmax_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    *,
    divergence: Divergence = "kl",
    beta: float = 0.5,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    backend: Backend = "auto",
    check_labels: bool = True,
) -> torch.Tensor:
    """Distillation loss between student and teacher logits, fused with its gradient.

    Args:
        student_logits: [..., V_s] fp32/bf16/fp16 (fp64 runs the torch reference). Gets the gradient.
        teacher_logits: [..., V_t], same leading shape. Treated as a constant (no gradient).
            When V_s != V_t both softmaxes are taken over the shared prefix of min(V_s, V_t)
            columns (tokenizers that extend a common vocabulary with extra tokens at the end);
            the student's extra columns get no distillation gradient.
        temperature: T > 0. Both distributions are softmax(logits / T) and the divergence is
            multiplied by T^2, so its gradient scale does not change with T.
        mask: bool [...] of the tokens that count (e.g. not padding, not prompt), or None for all.
        reduction: "mean" over counted tokens (0 if none count), "sum", or "none" for the per-token
            loss with the leading shape (0 where masked).
        divergence: "kl" = T^2 KL(teacher || student) (forward, the Minitron default),
            "reverse_kl" = T^2 KL(student || teacher), "jsd" = T^2 (beta KL(p || m)
            + (1 - beta) KL(q || m)) with m = beta p + (1 - beta) q, p teacher, q student (GKD).
        beta: the JSD mixture weight, 0 < beta < 1.
        labels: integer [...] hard labels into the student vocabulary, for a fused cross-entropy
            term ce_weight * CE(student_logits, label) at temperature 1 over all V_s columns.
            Tokens labelled `ignore_index` get no CE term; masked tokens get none either.
            The "mean" divides the sum of both terms by the counted tokens, so for the usual CE
            mean pass `mask=labels != ignore_index`. Ignored when ce_weight is 0.
        ce_weight: weight of the CE term (0 disables it).
        ignore_index: label value that marks tokens without a CE term.
        backend: "auto" (Triton for CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; else the
            chunked torch reference), "triton" or "torch" to force one.
        check_labels: refuse labels outside [0, V_s) other than ignore_index (a ValueError) before
            anything runs. For GPU labels that costs one host sync; pass False on a hot path
            whose labels were checked once already (see `check_label_range`).

    Returns:
        fp32 loss (fp64 for fp64 logits): a scalar, or [...] for reduction="none".
    """
    _check_args(student_logits, teacher_logits, temperature, mask, reduction, divergence, beta, labels)
    lead = student_logits.shape[:-1]
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    mask_rows = mask.reshape(-1) if mask is not None else None
    label_rows = labels.reshape(-1) if labels is not None and ce_weight != 0.0 else None
    if label_rows is not None and check_labels:
        check_label_range(label_rows, student.shape[-1], ignore_index)
    rows_fn = _pick_rows_fn(student, teacher, backend)
    options = (temperature, divergence, beta, ce_weight, ignore_index)
    if student.requires_grad and torch.is_grad_enabled():
        loss = _SoftmaxKLFunction.apply(student, teacher, mask_rows, label_rows, rows_fn, options, reduction)
    else:
        # Evaluation: the same kernel with the gradient write compiled out.
        scale = _grad_scale(mask_rows, student.shape[0], reduction, student.device)
        rows, _ = rows_fn(student, teacher, mask_rows, label_rows, scale, *options, compute_grad=False)
        loss = _reduce(rows, scale, reduction)
    return loss.reshape(lead) if reduction == "none" else loss


class SoftmaxKL(nn.Module):
    """`softmax_kl` as a module: the loss options are fixed at construction."""

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: Reduction = "mean",
        divergence: Divergence = "kl",
        beta: float = 0.5,
        ce_weight: float = 0.0,
        ignore_index: int = -100,
    ):
        super().__init__()
        self.temperature, self.reduction, self.divergence = temperature, reduction, divergence
        self.beta, self.ce_weight, self.ignore_index = beta, ce_weight, ignore_index

    def forward(self, student_logits, teacher_logits, mask=None, labels=None):
        return softmax_kl(student_logits, teacher_logits, self.temperature, mask, self.reduction,
                          divergence=self.divergence, beta=self.beta, labels=labels,
                          ce_weight=self.ce_weight, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, reduction={self.reduction!r}, "
                f"divergence={self.divergence!r}, beta={self.beta}, ce_weight={self.ce_weight}")
