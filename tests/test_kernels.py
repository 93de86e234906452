"""The fused softmax-KL kernel and its chunked fused-linear form against a float64 reference.

The expected values come from `token_losses` (plain log-softmax arithmetic, differentiated by
autograd) on float64 copies of the same inputs, reduced and masked here in the test, so neither the
kernel's hand-derived gradient nor the launcher's reduction plumbing checks itself. The reference is
in turn held to textbook formulas (F.kl_div, F.cross_entropy, the GKD paper's JSD) and gradcheck.
On CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest): small N, a few large-V rows.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minitron.kernels import (
    FusedLinearSoftmaxKL,
    SoftmaxKL,
    fused_linear_softmax_kl,
    softmax_kl,
    token_losses,
)
from minitron.kernels.reference import reference_rows
from minitron.kernels.softmax_kl import _pick_rows_fn, softmax_kl_rows

# The interpreter evaluates masked -inf lanes through numpy, which warns about them.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIVERGENCES = ["kl", "reverse_kl", "jsd"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Gradient tolerances per dtype and path, in bf16 / fp16 unit roundoffs (2^-8, 2^-11). Both paths
# compute in fp32. The kernel rounds the gradient to the input dtype once, with grad_output folded
# in; the torch path rounds once, then its backward's scale by grad_output rounds again. Triton's
# interpreter casts fp32 -> bf16 by truncation (up to 2 unit roundoffs), not round-to-nearest as
# the GPU does. atol is relative to the largest gradient entry, for entries near zero and fp16
# subnormals; in fp32 it covers the log-ratios of tiny probabilities (e.g. log q - log m in JSD at
# T=0.5), which fp32 logs carry to ~1e-6 absolute.
_KERNEL_BF16_ROUNDOFFS = 2 if DEVICE == "cpu" else 1
KERNEL_GRAD_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=_KERNEL_BF16_ROUNDOFFS * 2**-8 * 1.05, atol=1e-4),
    torch.float16: dict(rtol=2**-11 * 1.05, atol=1e-4),
}
GRAD_TOL = {  # the torch path
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2 * 2**-8 * 1.05, atol=1e-4),
    torch.float16: dict(rtol=2 * 2**-11 * 1.05, atol=1e-4),
}
# The loss is fp32 math on the very same (already rounded) input values for every dtype.
LOSS_TOL = dict(rtol=2e-5, atol=1e-6)


def expected(student, teacher, temperature=1.0, mask=None, reduction="mean", grad_output=None,
             divergence="kl", beta=0.5, labels=None, ce_weight=0.0, ignore_index=-100):
    """float64 loss and student gradient, with masking and reduction spelled out here."""
    s = student.detach().to(torch.float64).requires_grad_(True)
    t = teacher.detach().to(torch.float64)
    lead = s.shape[:-1]
    rows = token_losses(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), temperature, divergence,
                        beta, labels.reshape(-1) if labels is not None else None, ce_weight,
                        ignore_index).reshape(lead)
    if mask is not None:
        rows = torch.where(mask, rows, 0.0)
    count = mask.sum().item() if mask is not None else rows.numel()
    out = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / max(count, 1)}[reduction]
    go = grad_output if grad_output is not None else torch.ones_like(out)
    out.backward(go.to(torch.float64))
    return out.detach(), s.grad


def assert_close(actual, reference, rtol, atol):
    """Elementwise |a - r| <= rtol |r| + atol * max|r| (atol scaled: gradients shrink as 1/N)."""
    reference = reference.to(torch.float64)
    actual = actual.detach().to(torch.float64).cpu()
    reference = reference.cpu()
    assert torch.isfinite(actual).all(), "non-finite values"
    scale = reference.abs().max().item() if reference.numel() else 0.0
    torch.testing.assert_close(actual, reference, rtol=rtol, atol=atol * max(scale, 1e-30))


def run(student, teacher, grad_output=None, **kw):
    """Kernel loss and student gradient (through autograd, so backward is exercised too)."""
    s = student.detach().clone().requires_grad_(True)
    loss = softmax_kl(s, teacher, **kw)
    loss.backward(grad_output if grad_output is not None else torch.ones_like(loss))
    return loss.detach(), s.grad


def logits(*shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def check(student, teacher, grad_output=None, dtype=None, **kw):
    dtype = dtype or student.dtype
    loss, grad = run(student, teacher, grad_output, **kw)
    backend = kw.pop("backend", "auto")
    ref_loss, ref_grad = expected(student, teacher, grad_output=grad_output, **kw)
    assert loss.dtype == torch.float32
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert_close(loss, ref_loss, **LOSS_TOL)
    tol = GRAD_TOL if backend == "torch" else KERNEL_GRAD_TOL
    assert_close(grad, ref_grad, **tol[dtype])
    return loss, grad


# --------------------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_reference_matches_textbook_formulas(temperature):
    s, t = logits(5, 37, dtype=torch.float64), logits(5, 37, dtype=torch.float64, seed=1)
    T = temperature
    log_q, log_p = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1) * T * T
    rkl = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1) * T * T
    beta = 0.3  # GKD / TRL generalized JSD: beta KL(p || m) + (1 - beta) KL(q || m)
    m = beta * log_p.exp() + (1 - beta) * log_q.exp()
    jsd = (beta * (log_p.exp() * (log_p - m.log())).sum(-1)
           + (1 - beta) * (log_q.exp() * (log_q - m.log())).sum(-1)) * T * T
    torch.testing.assert_close(token_losses(s, t, T, "kl"), kl)
    torch.testing.assert_close(token_losses(s, t, T, "reverse_kl"), rkl)
    torch.testing.assert_close(token_losses(s, t, T, "jsd", beta=beta), jsd)
    labels = torch.tensor([0, 36, -100, 5, 7], device=s.device)
    ce = F.cross_entropy(s, labels, reduction="none", ignore_index=-100)
    torch.testing.assert_close(token_losses(s, t, T, "kl", labels=labels, ce_weight=0.7), kl + 0.7 * ce)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_gradcheck(divergence):
    s = logits(4, 9, dtype=torch.float64)
    t = logits(4, 9, dtype=torch.float64, seed=1)
    t[0, 3] = -math.inf  # a column the teacher rules out: the guards must keep the gradient right
    if divergence != "kl":
        s[0, 3] = -math.inf  # reverse KL / JSD are finite only if the student rules it out too
    banned = torch.isinf(s)
    labels = torch.tensor([1, -100, 8, 0], device=s.device)

    def f(x):
        # The -inf entry stays -inf (finite differences of -inf are meaningless).
        return token_losses(torch.where(banned, s, x), t, 2.0, divergence, 0.3, labels, 0.5)

    assert torch.autograd.gradcheck(f, (s.masked_fill(banned, 0.0).requires_grad_(True),))


def test_reference_chunks_agree_with_one_pass():
    s, t = logits(7, 33, dtype=torch.float32), logits(7, 33, seed=1)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool, device=s.device)
    scale = torch.tensor(0.25, device=s.device)
    args = (s, t, mask, None, scale, 2.0, "jsd", 0.4, 0.0, -100, True)
    loss1, grad1 = reference_rows(*args, chunk_rows=2)
    ref_loss, ref_grad = expected(s, t, 2.0, mask, "sum", torch.tensor(0.25), "jsd", 0.4)
    assert_close(loss1.sum() * 0.25, ref_loss * 0.25, rtol=1e-5, atol=1e-7)
    assert_close(grad1, ref_grad, **GRAD_TOL[torch.float32])


# --------------------------------------------------------------------------- kernel vs reference
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kernel_matches_reference(dtype, divergence):
    s, t = logits(6, 1271, dtype=dtype), logits(6, 1271, dtype=dtype, seed=1)
    mask = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool, device=DEVICE)
    check(s, t, temperature=2.0, mask=mask, divergence=divergence, beta=0.3,
          grad_output=torch.tensor(0.37, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_torch_backend_matches_reference(dtype, divergence):
    # The CPU training path (closed-form gradient, chunked) against autograd on the definition.
    s, t = logits(7, 1300, dtype=dtype), logits(7, 1271, dtype=dtype, seed=1)
    s[:, 1200] = -math.inf
    t[:, 1200] = -math.inf
    mask = torch.tensor([1, 0, 1, 1, 1, 1, 1], dtype=torch.bool, device=DEVICE)
    labels = torch.tensor([0, 3, -100, 1299, 8, 9, 1000], device=DEVICE)
    check(s, t, temperature=2.0, mask=mask, divergence=divergence, beta=0.3, labels=labels,
          ce_weight=0.5, grad_output=torch.tensor(1.3, device=DEVICE), backend="torch")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_small_blocks_cross_every_boundary(monkeypatch, divergence):
    # The GPU sweeps V in 4096-wide blocks, the interpreter in up to 32768: force 128 so that the
    # online rescaling (max, sum and the KL numerator) meets every case at a block boundary: a
    # later block raising the max by far (the earlier sum rescales to ~0), an all -inf block,
    # extra student columns, and a fused CE over them.
    kl_module = __import__("minitron.kernels.softmax_kl", fromlist=["_launch_config"])
    monkeypatch.setattr(kl_module, "_launch_config", lambda vocab, interpret: (128, 4))
    s, t = logits(5, 1300), logits(5, 1271, seed=1)
    s[0, 1000], t[0, 1100] = 90.0, 120.0  # late maxima: everything before rescales by e^-90 and less
    t[1, 256:384] = -math.inf  # one whole block banned for the teacher ...
    s[1, 256:384] = -math.inf  # ... and the student
    s[2, :1271] = s[2, :1271] * 0.0 + t[2] * 1.0  # same distribution as the teacher on one row
    labels = torch.tensor([0, 1299, -100, 700, 5], device=DEVICE)
    mask = torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool, device=DEVICE)
    loss, _ = check(s, t, temperature=2.0, mask=mask, divergence=divergence, reduction="none")
    assert abs(loss[2].item()) < 1e-5
    check(s, t, temperature=0.5, divergence=divergence, labels=labels, ce_weight=0.7,
          grad_output=torch.tensor(0.3, device=DEVICE))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_temperatures(temperature, divergence):
    s, t = logits(4, 1271), logits(4, 1271, seed=1)
    check(s, t, temperature=temperature, divergence=divergence)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vocab_32000(dtype):
    # Not a power of two and, on a GPU, many blocks; under the interpreter one 32768-wide block.
    s, t = logits(3, 32000, dtype=dtype), logits(3, 32000, dtype=dtype, seed=1)
    check(s, t, temperature=1.0, reduction="sum")


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_vocab_128256_bf16(divergence):
    # Several vocabulary blocks even at the interpreter's block size: the online max/sum rescaling.
    s = logits(2, 128256, dtype=torch.bfloat16)
    t = logits(2, 128256, dtype=torch.bfloat16, seed=1)
    s[0, 100_000] = 40.0  # the row max arrives in a late block
    check(s, t, temperature=1.0, divergence=divergence)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reductions_with_grad_output(reduction, dtype):
    s, t = logits(3, 5, 300, dtype=dtype), logits(3, 5, 300, dtype=dtype, seed=1)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(2)).to(DEVICE) > 0.3
    go = (torch.randn(3, 5, generator=torch.Generator().manual_seed(3)).to(DEVICE)
          if reduction == "none" else torch.tensor(-1.7, device=DEVICE))
    loss, grad = check(s, t, go, temperature=2.0, mask=mask, reduction=reduction)
    if reduction == "none":
        assert loss.shape == (3, 5) and (loss[~mask] == 0).all()
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_masked_batch(reduction, divergence):
    s, t = logits(4, 300), logits(4, 300, seed=1)
    mask = torch.zeros(4, dtype=torch.bool, device=DEVICE)
    loss, grad = run(s, t, mask=mask, reduction=reduction, divergence=divergence,
                     labels=torch.zeros(4, dtype=torch.long, device=DEVICE), ce_weight=1.0)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    assert torch.isfinite(grad).all() and (grad == 0).all()


def test_non_contiguous_inputs():
    # [S, B, V] storage read as [B, S, V], and vocab-sliced rows whose stride exceeds their length.
    base_s = logits(5, 2, 1400)
    base_t = logits(5, 2, 1500, seed=1)
    s = base_s.transpose(0, 1)[..., :1271]
    t = base_t.transpose(0, 1)[..., 3:1274]
    assert not s.is_contiguous() and not t.is_contiguous()
    check(s, t, temperature=2.0)
    s2, t2 = base_s[0, :, :1271], base_t[1, :, 100:1371]  # 2-D, row stride 1400 / 1500
    check(s2, t2, temperature=0.5, divergence="reverse_kl")


@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits_stay_finite(temperature, divergence):
    s, t = logits(4, 1271, scale=1.0), logits(4, 1271, scale=1.0, seed=1)
    s[:, ::7] = 1e4
    t[:, ::5] = -1e4
    t[:, 1::11] = 1e4
    s[1] -= 1e4  # a whole row shifted: softmax is shift invariant, the kernel must not cancel
    # -inf where a vocabulary entry is banned for both models (e.g. padding columns of the head).
    s[:, 1270] = -math.inf
    t[:, 1270] = -math.inf
    if divergence == "kl":
        t[2, 50:60] = -math.inf  # p = 0 there: contributes nothing, student still gets q
    check(s, t, temperature=temperature, divergence=divergence)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identical_inputs_give_zero(dtype, divergence):
    s = logits(3, 1271, dtype=dtype)
    loss, grad = run(s, s.clone(), temperature=2.0, divergence=divergence, reduction="none")
    assert loss.abs().max().item() < 1e-6
    # q - p from the same numbers is exactly 0 in fp32.
    assert grad.abs().max().item() < 1e-8


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_near_identical_distributions(monkeypatch, divergence):
    # Late in distillation the per-token KL is tiny while the logits are not. The one-sweep loss
    # (E_p[z_t - z_s] minus the difference of the log-normalizers) must then keep fp32's absolute
    # resolution, like the log-softmax form does: measured ~3e-7 at |logits| ~ 10-30, V = 32000.
    kl_module = __import__("minitron.kernels.softmax_kl", fromlist=["_launch_config"])
    monkeypatch.setattr(kl_module, "_launch_config", lambda vocab, interpret: (1024, 4))
    t = logits(4, 4000, scale=15.0)
    s = (t.double() + 0.01 * logits(4, 4000, scale=1.0, seed=1).double()).float()
    got = softmax_kl(s, t, reduction="none", divergence=divergence, backend="triton")
    ref = token_losses(s.double(), t.double(), divergence=divergence)
    assert ref.max().item() < 1e-3  # the regime this is about
    assert (got.double() - ref).abs().max().item() < 1e-6


@pytest.mark.parametrize("v_student, v_teacher", [(1300, 1271), (1271, 1300)])
def test_unequal_vocabularies(v_student, v_teacher):
    s, t = logits(5, v_student), logits(5, v_teacher, seed=1)
    _, grad = check(s, t, temperature=2.0)
    assert (grad[:, min(v_student, v_teacher):] == 0).all()  # extra student columns: no KD signal
    labels = torch.tensor([0, v_student - 1, -100, 7, v_student - 2], device=DEVICE)
    check(s, t, temperature=2.0, divergence="jsd", labels=labels, ce_weight=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_cross_entropy(dtype, divergence):
    s, t = logits(2, 4, 1271, dtype=dtype), logits(2, 4, 1271, dtype=dtype, seed=1)
    labels = torch.tensor([[3, -100, 1270, 0], [5, 6, -100, 1000]], device=DEVICE)
    check(s, t, temperature=2.0, divergence=divergence, labels=labels, ce_weight=0.5,
          mask=labels != -100)
    # ce_weight alone (no KD disagreement): identical logits leave exactly the CE.
    loss, _ = run(s, s.clone(), labels=labels, ce_weight=1.0, mask=labels != -100)
    ce = F.cross_entropy(s.double().reshape(-1, 1271), labels.reshape(-1), ignore_index=-100)
    assert abs(loss.item() - ce.item()) < 1e-5 * max(1.0, ce.item())


def test_eval_path_matches_training_path():
    s, t = logits(4, 1271), logits(4, 1271, seed=1)
    with torch.no_grad():
        eval_loss = softmax_kl(s.requires_grad_(True), t, 2.0, divergence="reverse_kl")
    ref, _ = expected(s, t, 2.0, divergence="reverse_kl")
    assert_close(eval_loss, ref, **LOSS_TOL)


def test_kernel_and_torch_backends_agree():
    # "Same results either way": the dispatch must not change the numbers.
    s, t = logits(6, 1271), logits(6, 1271, seed=1)
    mask = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool, device=DEVICE)
    a_loss, a_grad = run(s, t, temperature=2.0, mask=mask, backend="triton")
    b_loss, b_grad = run(s, t, temperature=2.0, mask=mask, backend="torch")
    torch.testing.assert_close(a_loss, b_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a_grad, b_grad, rtol=1e-4, atol=1e-9)


def test_fp64_runs_the_reference():
    s, t = logits(3, 50, dtype=torch.float64), logits(3, 50, dtype=torch.float64, seed=1)
    loss, grad = run(s, t, temperature=2.0)
    ref_loss, ref_grad = expected(s, t, 2.0)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_dispatch_follows_device_and_interpreter(monkeypatch):
    s = torch.zeros(2, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _pick_rows_fn(s, s, "auto") is reference_rows
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _pick_rows_fn(s, s, "auto") is softmax_kl_rows
    assert _pick_rows_fn(s.double(), s.double(), "auto") is reference_rows
    assert _pick_rows_fn(s, s, "torch") is reference_rows


def test_second_backward():
    # The kernel path recomputes the gradient from the saved inputs in backward, so a retained graph
    # replays correctly: two backwards accumulate exactly twice the gradient.
    s, t = logits(3, 1271), logits(3, 1271, seed=1)
    go = torch.tensor(0.7, device=DEVICE)
    once, twice = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    softmax_kl(once, t, 2.0, backend="triton").backward(go)
    loss = softmax_kl(twice, t, 2.0, backend="triton")
    loss.backward(go, retain_graph=True)
    loss.backward(go)
    torch.testing.assert_close(twice.grad, 2 * once.grad)
    # The torch path scales its saved gradient in place (no second [N, V] buffer): it must raise
    # rather than return a twice-scaled gradient.
    ref = s.clone().requires_grad_(True)
    loss = softmax_kl(ref, t, 2.0, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_logits_edited_before_backward_is_an_error():
    # The kernel path keeps the logits for backward: editing them in place in between must fail
    # loudly, not produce the gradient of other logits.
    s = logits(2, 300).requires_grad_(True)
    student = s * 1.0
    loss = softmax_kl(student, logits(2, 300, seed=1), backend="triton")
    with torch.no_grad():
        student.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_module_form():
    s, t = logits(2, 3, 300), logits(2, 3, 300, seed=1)
    labels = torch.randint(0, 300, (2, 3), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    mod = SoftmaxKL(temperature=2.0, reduction="sum", divergence="jsd", beta=0.2, ce_weight=0.3)
    s_ = s.clone().requires_grad_(True)
    mod(s_, t, labels=labels).backward()
    ref_loss, ref_grad = expected(s, t, 2.0, reduction="sum", divergence="jsd", beta=0.2,
                                  labels=labels, ce_weight=0.3)
    assert_close(s_.grad, ref_grad, **GRAD_TOL[torch.float32])
    assert "jsd" in repr(mod)


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="avg"), "reduction"),
    (dict(divergence="js"), "divergence"),
    (dict(divergence="jsd", beta=0.0), "beta"),
    (dict(temperature=0.0), "temperature"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), "mask"),
    (dict(labels=torch.zeros(2, 2)), "labels"),
])
def test_bad_arguments_are_errors(kwargs, message):
    s, t = torch.zeros(2, 10), torch.zeros(2, 10)
    with pytest.raises(ValueError, match=message):
        softmax_kl(s, t, **kwargs)
    with pytest.raises(ValueError, match="leading"):
        softmax_kl(torch.zeros(2, 10), torch.zeros(3, 10))


# --------------------------------------------------------------------------- the fused-linear form
def linear_inputs(n, h_s, h_t, v_s, v_t, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    mk = lambda *shape, sd=1.0: (torch.randn(*shape, generator=g) * sd).to(dtype).to(DEVICE)  # noqa: E731
    return mk(n, h_s), mk(v_s, h_s, sd=0.3), mk(n, h_t), mk(v_t, h_t, sd=0.3)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fused_linear_matches_plain_form(reduction, backend):
    hs, ws, ht, wt = linear_inputs(11, 24, 40, 1300, 1271)
    mask = torch.ones(11, dtype=torch.bool, device=DEVICE)
    mask[[2, 7]] = False
    labels = torch.randint(0, 1300, (11,), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    go = torch.randn(11).to(DEVICE) if reduction == "none" else torch.tensor(0.6, device=DEVICE)
    kw = dict(temperature=2.0, mask=mask, reduction=reduction, divergence="kl", labels=labels,
              ce_weight=0.25)

    # Plain form, float64, autograd through the matmuls: the independent reference.
    hs64, ws64 = hs.double().requires_grad_(True), ws.double().requires_grad_(True)
    rows = token_losses(hs64 @ ws64.T, ht.double() @ wt.double().T, 2.0, "kl", labels=labels,
                        ce_weight=0.25)
    rows = torch.where(mask, rows, 0.0)
    ref = rows if reduction == "none" else rows.sum() / mask.sum()
    ref.backward(go.double())

    hs_, ws_ = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    loss = fused_linear_softmax_kl(hs_, ws_, ht, wt, chunk_size=4, backend=backend, **kw)
    loss.backward(go)
    assert_close(loss, ref.detach(), **LOSS_TOL)
    assert_close(hs_.grad, hs64.grad, rtol=1e-4, atol=1e-5)
    assert_close(ws_.grad, ws64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_linear_chunking_is_invisible(divergence):
    # One chunk vs many chunks vs the kernel on materialized logits: the same numbers in fp32.
    hs, ws, ht, wt = linear_inputs(9, 16, 16, 700, 700)
    results = []
    for chunk in (9, 2):
        hs_, ws_ = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        mod = FusedLinearSoftmaxKL(temperature=1.0, divergence=divergence, chunk_size=chunk)
        mod(hs_, ws_, ht, wt).backward()
        results.append((hs_.grad, ws_.grad))
    hs_, ws_ = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    softmax_kl(hs_ @ ws_.T, ht @ wt.T, divergence=divergence).backward()
    for gh, gw in results:
        torch.testing.assert_close(gh, hs_.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(gw, ws_.grad, rtol=1e-4, atol=1e-7)


def test_fused_linear_bf16():
    hs, ws, ht, wt = linear_inputs(8, 32, 32, 1271, 1271, dtype=torch.bfloat16)
    hs_, ws_ = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    loss = fused_linear_softmax_kl(hs_, ws_, ht, wt, temperature=2.0, chunk_size=3)
    loss.backward()
    # Reference: float64 on the bf16 logits the chunks compute (the matmul rounds to bf16 first).
    hs64, ws64 = hs.double().requires_grad_(True), ws.double().requires_grad_(True)
    ref = token_losses(hs64 @ ws64.T, (ht @ wt.T).double(), 2.0).mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    assert_close(hs_.grad, hs64.grad, rtol=3e-2, atol=3e-2)
    assert_close(ws_.grad, ws64.grad, rtol=3e-2, atol=3e-2)


# --------------------------------------------------------------------------- compiled for GPUs (no GPU needed)
@pytest.fixture(scope="module")
def compiled_for_gpus():
    """Every kernel variant lowered to sm_80 and sm_90 cubins by the ptxas in triton's wheel, at the
    launch configuration for V = 128256, in a fresh process (this one interprets Triton)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "minitron.kernels.aot", "--json", "--dtypes", "bf16", "fp32"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_kernels_compile_for_gpus_without_spills(compiled_for_gpus):
    # What a memory-bound sweep needs: no spilled blocks, registers leaving room for two 8-warp
    # programs per SM, 128-bit (fully vectorized) loads, and 128-bit gradient stores. ptxas may
    # spill a scalar (reverse KL with CE on sm_80: a 4-byte spill, 8-byte frame); a spilled block
    # of logits costs kilobytes (BLOCK_V = 32768 at 4 warps: a 6.8 KB frame).
    assert len(compiled_for_gpus) == 2 * 2 * 2 * 3  # arch x kernel x dtype x divergence
    for c in compiled_for_gpus:
        assert c["local_bytes"] <= 16, c
        assert c["registers"] <= 128, c
        assert c["widest_load_bits"] == 128, c
        if c["kernel"] == "grad":
            assert c["widest_store_bits"] == 128, c


# --------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gpu_bf16_large_vocab(divergence):
    s = logits(64, 128256, dtype=torch.bfloat16)
    t = logits(64, 128256, dtype=torch.bfloat16, seed=1)
    mask = torch.rand(64, device=DEVICE) > 0.25
    check(s, t, temperature=2.0, mask=mask, divergence=divergence, grad_output=torch.tensor(0.5, device=DEVICE))


@pytest.mark.gpu
def test_gpu_no_fp32_intermediate():
    # Forward allocates [N] vectors only; backward allocates the bf16 gradient and nothing else:
    # no [N, V] tensor in fp32 anywhere, and at most one [N, V] in the input dtype.
    n, v = 2048, 128256
    s = logits(n, v, dtype=torch.bfloat16).requires_grad_(True)
    t = logits(n, v, dtype=torch.bfloat16, seed=1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = softmax_kl(s, t, 2.0)
    torch.cuda.synchronize()
    forward_extra = torch.cuda.max_memory_allocated() - base
    assert forward_extra < (1 << 22), f"forward allocated {forward_extra / 2**20:.0f} MiB"
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n * v * 2 + (1 << 22), f"{extra / 2**20:.0f} MiB for a {n * v * 2 / 2**20:.0f} MiB gradient"
    assert torch.isfinite(s.grad).all()


@pytest.mark.gpu
def test_gpu_fused_linear_matches_plain():
    hs, ws, ht, wt = linear_inputs(1000, 256, 512, 32000, 32000, dtype=torch.bfloat16)
    hs_, ws_ = hs.clone().float().requires_grad_(True), ws.clone().float().requires_grad_(True)
    loss = fused_linear_softmax_kl(hs_, ws_, ht.float(), wt.float(), 2.0, chunk_size=256)
    loss.backward()
    hs64, ws64 = hs.double().requires_grad_(True), ws.double().requires_grad_(True)
    ref = token_losses(hs64 @ ws64.T, ht.double() @ wt.double().T, 2.0).mean()
    ref.backward()
    # fp32 matmuls on a GPU may use TF32: a few 1e-3 relative.
    assert_close(loss, ref.detach(), rtol=5e-3, atol=1e-6)
    assert_close(hs_.grad, hs64.grad, rtol=5e-2, atol=5e-3)
    assert_close(ws_.grad, ws64.grad, rtol=5e-2, atol=5e-3)
