"""Triton kernels for distillation: the fused softmax-KL loss, its torch reference, a chunked LM-head form.

    from minitron.kernels import softmax_kl, fused_linear_softmax_kl
"""

from minitron.kernels.fused_linear import FusedLinearSoftmaxKL, fused_linear_softmax_kl
from minitron.kernels.reference import token_losses
from minitron.kernels.softmax_kl import SoftmaxKL, softmax_kl

__all__ = ["softmax_kl", "SoftmaxKL", "fused_linear_softmax_kl", "FusedLinearSoftmaxKL", "token_losses"]
