"""Triton kernels for distillation: the fused softmax-KL loss, its torch reference, a chunked LM-head form,
and the sparse KL against a cached teacher's top-k (pure torch).

    from minitron.kernels import softmax_kl, fused_linear_softmax_kl, sparse_kl
"""

from minitron.kernels.fused_linear import FusedLinearSoftmaxKL, fused_linear_softmax_kl
from minitron.kernels.reference import token_losses
from minitron.kernels.softmax_kl import SoftmaxKL, softmax_kl
from minitron.kernels.sparse_kl import fused_linear_sparse_kl, sparse_kl

__all__ = ["softmax_kl", "SoftmaxKL", "fused_linear_softmax_kl", "FusedLinearSoftmaxKL", "token_losses",
           "sparse_kl", "fused_linear_sparse_kl"]
