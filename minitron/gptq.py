"""GPTQ (Frantar et al., arXiv 2210.17323) for ONNX Runtime's 4-bit MatMulNBits, and the packing
that writes its integers into the exported graph.

GPTQ rounds a linear layer's weight W [out, in] one input column at a time and spreads each
column's rounding error over the columns not yet rounded, so that the layer output over the
calibration tokens X moves as little as possible: it minimizes ||(Q - W) X^T||^2 = tr(dW G dW^T)
with G = X^T X (minitron.calibration's `gram`), through the inverse Hessian's Cholesky factor U
(H = G + damp * mean(diag G) * I, U upper with U^T U = H^-1):

    for column i:  q_i = Q(w_i);  e = (w_i - q_i) / U_ii;  w_j -= e * U_ij  for j > i

The grid is MatMulNBits' asymmetric one: per row, blocks of `block` consecutive input channels
with one float32 scale and one integer zero point in [0, 2^bits - 1], value = (code - zero) *
scale, min/max of the block (widened to include 0) as RTN takes it. Without act-order, a block's
grid is set from the (already updated) weights when its first column is reached; with act-order
(columns in order of decreasing diag G) every block's grid is set up front from the original
weights ("static groups"), so the blocks stay the contiguous ones MatMulNBits stores.

`pack_matmul_nbits` lays the codes out as MatMulNBits reads them (onnxruntime contrib op spec):
B uint8 [N, k_blocks, block * bits / 8], element k of a block in byte k * bits / 8, low bits
first; scales [N * k_blocks]; zero points uint8, each row's k_blocks values packed the same way
(4 bits: two per byte, row padded to whole bytes). N is `out`, K is `in`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Grid:
    """A weight on the MatMulNBits grid: codes [out, in] (0..2^bits-1), scales and zero points
    [out, in / block] (float32 and integer), decoding to (code - zero) * scale."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    block: int

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] the codes stand for (as MatMulNBits computes it)."""
        rep = lambda t: t.repeat_interleave(self.block, 1)[:, :self.codes.shape[1]]  # noqa: E731
        return ((self.codes.float() - rep(self.zeros).float()) * rep(self.scales)).float()


def block_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale as float32-representable float64, zero point) of each row of `w` [out, block]:
    RTN's asymmetric min/max grid, the range widened to include 0."""
    qmax = 2 ** bits - 1
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    scale = ((hi - lo) / qmax).float().double()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block
    zero = (-lo / scale).round().clamp(0, qmax)
    return scale, zero


def rtn(w: torch.Tensor, bits: int = 4, block: int = 32) -> Grid:
    """Round-to-nearest on the MatMulNBits grid (GPTQ's starting point and its baseline)."""
    w = w.double()
    out_f, in_f = w.shape
    codes = torch.empty(out_f, in_f, dtype=torch.int16)
    nb = -(-in_f // block)
    scales, zeros = torch.empty(out_f, nb, dtype=torch.float64), torch.empty(out_f, nb, dtype=torch.float64)
    for b in range(nb):
        cols = slice(b * block, min((b + 1) * block, in_f))
        scales[:, b], zeros[:, b] = block_grid(w[:, cols], bits)
        codes[:, cols] = _round(w[:, cols], scales[:, b:b + 1], zeros[:, b:b + 1], bits)
    return Grid(codes, scales.float(), zeros.to(torch.int16), bits, block)


def _round(w, scale, zero, bits):
    return ((w / scale).round() + zero).clamp(0, 2 ** bits - 1).to(torch.int16)


def inverse_hessian_factor(gram: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): the upper Cholesky factor of (G + damp * mean(diag G) * I)^-1, float64, and the
    input channels that never fired (diag G == 0; their weights are irrelevant to the output)."""
    h = gram.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True), dead


@torch.no_grad()
def gptq(w: torch.Tensor, gram: torch.Tensor, bits: int = 4, block: int = 32, damp: float = 0.01,
         act_order: bool = False, batch: int = 128) -> Grid:
    """GPTQ of `w` [out, in] over the calibration Gram matrix `gram` [in, in] (see the module
    docstring); `batch` columns are updated together (the lazy batch update: same result)."""
    w = w.double().clone()
    out_f, in_f = w.shape
    if gram.shape != (in_f, in_f):
        raise ValueError(f"gptq: gram {tuple(gram.shape)} does not match the weight's {in_f} inputs")
    perm = (torch.argsort(torch.diagonal(gram.double()), descending=True) if act_order
            else torch.arange(in_f))
    u, dead = inverse_hessian_factor(gram[perm][:, perm], damp)
    w[:, perm[dead]] = 0.0
    nb = -(-in_f // block)
    scales = torch.zeros(out_f, nb, dtype=torch.float64)
    zeros = torch.zeros(out_f, nb, dtype=torch.float64)
    if act_order:  # static groups: every block's grid from the original weights
        start = rtn(w, bits, block)
        scales, zeros = start.scales.double(), start.zeros.double()
    codes = torch.empty(out_f, in_f, dtype=torch.int16)
    batch = block * max(1, batch // block)  # whole blocks per batch (unpermuted, a block's grid
    wp = w[:, perm]                          # is set from columns its batch has updated)
    for b0 in range(0, in_f, batch):
        b1 = min(b0 + batch, in_f)
        wb, err = wp[:, b0:b1].clone(), torch.zeros(out_f, b1 - b0, dtype=torch.float64)
        for i in range(b1 - b0):
            col = int(perm[b0 + i])
            g = col // block
            if not act_order and col % block == 0:  # first column of its block: set its grid
                scales[:, g], zeros[:, g] = block_grid(wb[:, i:i + block], bits)  # as updated so far
            q = _round(wb[:, i:i + 1], scales[:, g:g + 1], zeros[:, g:g + 1], bits)
            codes[:, col] = q[:, 0]
            deq = (q.double() - zeros[:, g:g + 1]) * scales[:, g:g + 1]
            e = (wb[:, i:i + 1] - deq) / u[b0 + i, b0 + i]
            wb[:, i + 1:] -= e @ u[b0 + i:b0 + i + 1, b0 + i + 1:b1]
            err[:, i:i + 1] = e
        wp[:, b1:] -= err @ u[b0:b1, b1:]
    return Grid(codes, scales.float(), zeros.to(torch.int16), bits, block)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(dW G dW^T): the squared change of the layer output summed over the calibration tokens."""
    dw = w_hat.double() - w.double()
    return float(((dw @ gram.double()) * dw).sum())


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of `values` (0..2^bits-1) into bytes, low bits first, padded."""
    per = 8 // bits
    v = values.astype(np.uint8)
    pad = (-v.shape[-1]) % per
    if pad:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), np.uint8)], -1)
    v = v.reshape(v.shape[:-1] + (-1, per))
    out = np.zeros(v.shape[:-1], np.uint8)
    for k in range(per):
        out |= v[..., k] << (k * bits)
    return out


def _unpack_rows(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    per = 8 // bits
    vals = np.stack([(packed >> (k * bits)) & (2 ** bits - 1) for k in range(per)], -1)
    return vals.reshape(packed.shape[:-1] + (-1,))[..., :n]


def pack_matmul_nbits(grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B [N, k_blocks, blob], scales [N * k_blocks], zero_points) as MatMulNBits reads them."""
    out_f, in_f = grid.codes.shape
    nb = grid.scales.shape[1]
    codes = grid.codes.numpy()
    if in_f % grid.block:
        codes = np.pad(codes, ((0, 0), (0, nb * grid.block - in_f)))
    b = _pack_rows(codes.reshape(out_f, nb, grid.block), grid.bits)
    zp = _pack_rows(grid.zeros.numpy(), grid.bits).reshape(-1)
    return b, grid.scales.numpy().astype(np.float32).reshape(-1), zp


def unpack_matmul_nbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int,
                        bits: int, block: int) -> Grid:
    """The Grid a MatMulNBits node's B / scales / zero_points initializers hold (K = `k`)."""
    n, nb = b.shape[0], b.shape[1]
    codes = _unpack_rows(b.reshape(n, nb, -1), bits, block).reshape(n, nb * block)[:, :k]
    zeros = _unpack_rows(zero_points.reshape(n, -1), bits, nb)
    return Grid(torch.from_numpy(codes.astype(np.int16)), torch.from_numpy(scales.reshape(n, nb).astype(np.float32)),
                torch.from_numpy(zeros.astype(np.int16)), bits, block)


# ----------------------------------------------------------------------------- a whole model
@torch.no_grad()
def gptq_model_(model: torch.nn.Module, blocks: torch.Tensor, bits: int = 4, block: int = 32,
                head_bits: int = 4, damp: float = 0.01, act_order: bool = True,
                cache: dict | None = None) -> dict[str, Grid]:
    """GPTQ every linear layer of `model` (a float copy; the LM head at `head_bits`) over X^T X of
    one calibration pass on `blocks`, and put the dequantized weights in place (a tied LM head is
    untied: the embedding keeps its float weight). Returns {HF module name: Grid}. `cache` (a dict
    kept by the caller for copies of one model and the same `blocks`) keeps the statistics and
    grids for another call, e.g. the same layers with another head width."""
    from minitron import calibration
    from minitron.models import arch_of

    head = arch_of(model).lm_head
    cache = {} if cache is None else cache
    if "stats" not in cache:
        cache["stats"] = calibration.collect(model, blocks, gram=True, include_head=True)
    grids = {}
    for name, m in calibration.linear_modules(model, include_head=True):
        key = (name, head_bits if name == head else bits, block, damp, act_order)
        if key not in cache:
            cache[key] = gptq(m.weight.data, cache["stats"].get(name, "gram"), key[1], block, damp,
                              act_order)
        grids[name] = cache[key]
    for name, m in calibration.linear_modules(model, include_head=True):
        m.weight = torch.nn.Parameter(grids[name].dequantize().to(m.weight.dtype), requires_grad=False)
    return grids


def grids_file(graph: os.PathLike | str) -> Path:
    """Where the integer grids of an FP32 graph's GPTQ weights are kept beside it."""
    return Path(graph).with_suffix(".grids.safetensors")


def save_grids(grids: dict[str, Grid], path: Path) -> None:
    """{initializer name: Grid} to safetensors, atomically."""
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for name, g in grids.items():
        tensors.update({f"{name}::codes": g.codes, f"{name}::scales": g.scales,
                        f"{name}::zeros": g.zeros})
        meta[name] = f"{g.bits},{g.block}"
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_grids(path: Path) -> dict[str, Grid]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "pt") as f:
        for name, spec in f.metadata().items():
            bits, block = map(int, spec.split(","))
            out[name] = Grid(f.get_tensor(f"{name}::codes"), f.get_tensor(f"{name}::scales"),
                             f.get_tensor(f"{name}::zeros"), bits, block)
    return out


def write_grids_(proto, grids: dict[str, Grid]) -> None:
    """Overwrite the MatMulNBits nodes ONNX Runtime's quantizer made from the FP32 initializers
    named in `grids` (its B is `<name>_Q4`) with those grids' codes, scales and zero points (and
    their bit width). Raises if a grid's node is not found exactly once."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    nodes = {n.input[1]: n for n in proto.graph.node if n.op_type == "MatMulNBits"}
    for name, grid in grids.items():
        node = nodes.get(f"{name}_Q4")
        if node is None or len(node.input) < 4:
            raise ValueError(f"write_grids_: no asymmetric 4-bit MatMulNBits node made from '{name}'")
        attrs = {a.name: a for a in node.attribute}
        if attrs["block_size"].i != grid.block or attrs["K"].i != grid.codes.shape[1]:
            raise ValueError(f"write_grids_: '{name}' node has block {attrs['block_size'].i}, "
                             f"K {attrs['K'].i}; the grid has {grid.block}, {grid.codes.shape[1]}")
        for value, arr in zip(node.input[1:4], pack_matmul_nbits(grid)):
            inits[value].CopyFrom(numpy_helper.from_array(arr, value))
        node.attribute.remove(attrs["bits"])
        node.attribute.append(onnx.helper.make_attribute("bits", grid.bits))


__all__ = ["Grid", "block_grid", "gptq", "gptq_model_", "grids_file", "inverse_hessian_factor",
           "load_grids", "output_error", "pack_matmul_nbits", "rtn", "save_grids",
           "unpack_matmul_nbits", "write_grids_"]
