"""Every loss path under the bf16 precision policy, against float64 references, on CPU.

bf16 compute means the logits themselves are rounded to bf16 (8 significant bits) before the fp32
softmax-KL math, and the gradient matmuls run on bf16 operands. So the reference is float64 on the
exact (unrounded) inputs and the tolerance is the rounding of the logits carried through: a relative
2^-8 on each logit moves each gradient entry by about one bf16 roundoff. The checks are normwise (||got - ref|| / ||ref||), which is what an optimizer
sees; elementwise bf16 checks of single entries near zero would test only noise. A path that returned
fp32 math on unrounded values would pass more tightly; one that dropped a term, used the wrong
weights, or returned the gradient in the wrong dtype fails.

Triton runs under TRITON_INTERPRET=1 (conftest), so "auto" is the kernel and "torch" the reference.
"""

from __future__ import annotations

import pytest
import torch

from minitron.kernels import fused_linear_softmax_kl, softmax_kl, token_losses

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

BACKENDS = ["auto", "torch"]  # the Triton kernel (interpreted) and the torch path
# Normwise relative error allowed for bf16 compute (see the docstring). Measured on these inputs:
# loss 4e-5, gradients 3-5e-3 (about one bf16 roundoff, 2^-8 = 3.9e-3), every backend and case.
# The loss is a mean over tokens, whose rounding errors partly cancel; the gradients get four
# roundoffs of room.
BF16_LOSS_RTOL = 1e-3
BF16_GRAD_RTOL = 4 * 2**-8


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make(n=24, h=32, v=1271, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g)
    ws = torch.randn(v, h, generator=g) * 0.3
    ht = torch.randn(n, h, generator=g)
    wt = torch.randn(v, h, generator=g) * 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3] = -100
    return hs, ws, ht, wt, labels


def reference(hs, ws, ht, wt, labels, temperature=2.0, ce_weight=0.5):
    hs64, ws64 = hs.double().requires_grad_(True), ws.double().requires_grad_(True)
    rows = token_losses(hs64 @ ws64.T, ht.double() @ wt.double().T, temperature, "kl",
                        labels=labels, ce_weight=ce_weight)
    loss = rows.mean()
    loss.backward()
    return loss.detach(), hs64.grad, ws64.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["autocast_fp32_weights", "autocast_bf16_weights",
                                  "bf16_hidden_fp32_weights", "all_bf16"])
def test_fused_linear_bf16(backend, case):
    hs, ws, ht, wt, labels = make()
    ref_loss, ref_gh, ref_gw = reference(hs, ws, ht, wt, labels)
    h_dtype = torch.bfloat16 if case in ("bf16_hidden_fp32_weights", "all_bf16") else torch.float32
    w_dtype = torch.bfloat16 if case in ("autocast_bf16_weights", "all_bf16") else torch.float32
    hs_ = hs.to(h_dtype).requires_grad_(True)
    ws_ = ws.to(w_dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.startswith("autocast")):
        loss = fused_linear_softmax_kl(hs_, ws_, ht, wt, 2.0, labels=labels, ce_weight=0.5,
                                       chunk_size=7, backend=backend)
    loss.backward()
    # Gradients come back in the parameters' (and activations') own dtypes.
    assert hs_.grad.dtype == h_dtype and ws_.grad.dtype == w_dtype
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= BF16_LOSS_RTOL * ref_loss.item()
    assert rel_err(hs_.grad, ref_gh) < BF16_GRAD_RTOL
    assert rel_err(ws_.grad, ref_gw) < BF16_GRAD_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_bf16_reduction_none_recomputes_in_bf16(backend):
    # reduction="none" recomputes in backward, outside the caller's autocast: the same precision
    # must be used there (a forward in bf16 and a backward in fp32 would also "work", silently).
    hs, ws, ht, wt, labels = make(n=10, v=700, seed=1)
    go = torch.rand(10, generator=torch.Generator().manual_seed(2))
    hs64, ws64 = hs.double().requires_grad_(True), ws.double().requires_grad_(True)
    ref = token_losses(hs64 @ ws64.T, ht.double() @ wt.double().T, 1.0)
    ref.backward(go.double())
    hs_, ws_ = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = fused_linear_softmax_kl(hs_, ws_, ht, wt, reduction="none", chunk_size=3,
                                       backend=backend)
    rows.backward(go)
    assert rel_err(rows.detach(), ref.detach()) < BF16_GRAD_RTOL  # per token: no mean to average
    assert rel_err(hs_.grad, hs64.grad) < BF16_GRAD_RTOL
    assert rel_err(ws_.grad, ws64.grad) < BF16_GRAD_RTOL
    assert ws_.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_logits_form_under_autocast(backend, weights):
    # The plain form: an LM head under autocast hands the kernel bf16 logits.
    hs, ws, ht, wt, labels = make(seed=3)
    ref_loss, ref_gh, ref_gw = reference(hs, ws, ht, wt, labels)
    hs_, ws_ = hs.clone().requires_grad_(True), ws.to(weights).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_logits = hs_ @ ws_.T
        t_logits = ht @ wt.T
        assert s_logits.dtype == torch.bfloat16
        loss = softmax_kl(s_logits, t_logits, 2.0, labels=labels, ce_weight=0.5, backend=backend)
    loss.backward()
    assert ws_.grad.dtype == weights and hs_.grad.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= BF16_LOSS_RTOL * ref_loss.item()
    assert rel_err(hs_.grad, ref_gh) < BF16_GRAD_RTOL
    assert rel_err(ws_.grad, ref_gw) < BF16_GRAD_RTOL


def test_cross_entropy_and_intermediate_loss_under_autocast():
    # The other two training losses of the loop, under the same policy: bf16 matmuls over fp32
    # master weights, fp32 gradients, close to float64.
    from minitron.distill import intermediate_loss

    hs, ws, ht, _, _ = make(seed=4)
    labels = torch.randint(0, ws.shape[0], (hs.shape[0],), generator=torch.Generator().manual_seed(5))
    proj = torch.nn.Linear(32, 32, bias=False)
    for kind in ("cosine", "mse"):
        hs_, ws_ = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        p64 = proj.weight.detach().double().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = hs_ @ ws_.T
            ce = torch.nn.functional.cross_entropy(logits.float(), labels)
            inter = intermediate_loss(proj(hs_), ht, kind)
        (ce + inter).backward()
        h64, w64 = hs.double().requires_grad_(True), ws.double().requires_grad_(True)
        ref = (torch.nn.functional.cross_entropy(h64 @ w64.T, labels)
               + intermediate_loss(h64 @ p64.T, ht.double(), kind))
        ref.backward()
        assert ws_.grad.dtype == torch.float32 and proj.weight.grad.dtype == torch.float32
        assert abs((ce + inter).item() - ref.item()) <= BF16_LOSS_RTOL * ref.item()
        assert rel_err(hs_.grad, h64.grad) < BF16_GRAD_RTOL
        assert rel_err(ws_.grad, w64.grad) < BF16_GRAD_RTOL
        assert rel_err(proj.weight.grad, p64.grad) < BF16_GRAD_RTOL
        proj.weight.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [1271, 5000, -1, -7])
def test_labels_out_of_range_are_refused_before_any_launch(backend, bad):
    hs, ws, ht, wt, labels = make()
    labels[5] = bad
    s_logits = (hs @ ws.T).requires_grad_(True)
    with pytest.raises(ValueError, match=rf"labels must be in \[0, 1271\).*got {bad}"):
        softmax_kl(s_logits, ht @ wt.T, labels=labels, ce_weight=1.0, backend=backend)
    with pytest.raises(ValueError, match=rf"labels must be in \[0, 1271\).*got {bad}"):
        fused_linear_softmax_kl(hs.requires_grad_(True), ws, ht, wt, labels=labels, ce_weight=1.0,
                                backend=backend)
    # ignore_index is the one value outside the range that is allowed.
    labels[5] = -100
    softmax_kl(s_logits, ht @ wt.T, labels=labels, ce_weight=1.0, backend=backend)


def test_unchecked_bad_label_is_never_read_through():
    # With the check skipped (a caller that validated once), the kernel masks the read and the
    # loss of that token is NaN, which the loop's finiteness check stops on.
    hs, ws, ht, wt, labels = make(n=4)
    labels[1] = 10**9
    rows = softmax_kl(hs @ ws.T, ht @ wt.T, labels=labels, ce_weight=1.0, reduction="none",
                      backend="triton", check_labels=False)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2, 3]]).all()


# ----------------------------------------------------------------------------- cached teacher
def sparse_reference(hs, ws, ht, wt, labels, k):
    """float64 sparse KL written out from its definition (kept tokens exact, the rest one bucket)
    plus 0.5 x CE, on the exact inputs; returns the cache's targets too."""
    t_logp = torch.log_softmax(ht.double() @ wt.double().T, dim=-1)
    top_logp, top_idx = t_logp.topk(k, dim=-1)
    log_tail = torch.log1p(-top_logp.exp().sum(-1).clamp(max=1 - 1e-12))
    hs64, ws64 = hs.double().requires_grad_(True), ws.double().requires_grad_(True)
    log_q = torch.log_softmax(hs64 @ ws64.T, dim=-1)
    lq_k = log_q.gather(1, top_idx)
    lq_tail = torch.log1p(-lq_k.exp().sum(-1))
    p, pt = top_logp.exp(), log_tail.exp()
    rows = (p * (top_logp - lq_k)).sum(-1) + pt * (log_tail - lq_tail)
    keep = labels != -100
    ce = -log_q.gather(1, torch.where(keep, labels, 0)[:, None]).squeeze(1) * keep
    loss = (rows + 0.5 * ce).mean()
    loss.backward()
    targets = (top_logp.to(torch.float16), top_idx.to(torch.int32), log_tail.float())
    return loss.detach(), hs64.grad, ws64.grad, targets


@pytest.mark.parametrize("form", ["logits", "fused_linear"])
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_sparse_kl_from_a_teacher_cache_under_autocast(form, weights):
    # Distilling from a cache under the bf16 policy: bf16 student logits (or bf16 chunk matmuls in
    # the hidden-state form) against fp16 cached log-probs, fp32 loss math, gradients in the
    # parameters' dtype and within bf16 rounding of the float64 definition.
    from minitron.kernels import fused_linear_sparse_kl, sparse_kl

    hs, ws, ht, wt, labels = make(seed=5)
    ref_loss, ref_gh, ref_gw, (top_logp, top_idx, log_tail) = sparse_reference(
        hs, ws, ht, wt, labels, k=64)
    hs_, ws_ = hs.clone().requires_grad_(True), ws.to(weights).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if form == "logits":
            s_logits = hs_ @ ws_.T
            assert s_logits.dtype == torch.bfloat16
            loss = sparse_kl(s_logits, top_logp, top_idx, log_tail, labels=labels, ce_weight=0.5)
        else:
            loss = fused_linear_sparse_kl(hs_, ws_, top_logp, top_idx, log_tail, labels=labels,
                                          ce_weight=0.5, chunk_size=7)
    loss.backward()
    assert loss.dtype == torch.float32
    assert ws_.grad.dtype == weights and hs_.grad.dtype == torch.float32
    # fp16 storage of the cached log-probs adds ~2^-11 relative on top of the bf16 logits.
    assert abs(loss.item() - ref_loss.item()) <= BF16_LOSS_RTOL * ref_loss.item()
    assert rel_err(hs_.grad, ref_gh) < BF16_GRAD_RTOL
    assert rel_err(ws_.grad, ref_gw) < BF16_GRAD_RTOL
