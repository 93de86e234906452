"""GPTQ (minitron.gptq) against a float64 reference of its defining equations on a tiny layer, and
its integers in ONNX Runtime's MatMulNBits: the packing ORT's own quantizer writes, and the node
run by ORT against torch's matmul with the decoded weights."""

import numpy as np
import pytest
import torch

from minitron import gptq, quantize


def layer(seed=0, n=1500, d_in=96, d_out=24):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in, dtype=torch.float64) + 0.3 * torch.randn(d_in, d_in, generator=g,
                                                                  dtype=torch.float64)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    x[:, 5] *= 30  # an outlier channel
    x[:, 7] = 0  # a channel that never fires
    return x, torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / 8


def reference_gptq(w, gram, bits, block, damp, order, static):
    """The OBS update written out: round column i, spread its error over the later columns by the
    inverse Hessian's row, then eliminate i from that inverse (no Cholesky, no lazy batches)."""
    w = w.clone()
    h = gram.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diagonal(h).mean() * torch.eye(len(h), dtype=torch.float64)
    w, hinv = w[:, order], torch.linalg.inv(h[order][:, order])
    start = gptq.rtn(w[:, torch.argsort(order)], bits, block)
    codes = torch.empty(w.shape, dtype=torch.int16)
    scales, zeros = start.scales.double().clone(), start.zeros.double().clone()
    for i, col in enumerate(order.tolist()):
        b = col // block
        if not static and col % block == 0:
            scales[:, b], zeros[:, b] = gptq.block_grid(w[:, i:i + block], bits)
        q = ((w[:, i] / scales[:, b]).round() + zeros[:, b]).clamp(0, 2 ** bits - 1)
        codes[:, col] = q.to(torch.int16)
        err = (w[:, i] - (q - zeros[:, b]) * scales[:, b]) / hinv[i, i]
        w[:, i + 1:] -= err[:, None] * hinv[i, i + 1:][None, :]
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return codes


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_follows_the_obs_update_and_beats_rtn_on_the_same_grid(act_order):
    x, w = layer()
    gram = x.T @ x
    out = gptq.gptq(w, gram, bits=4, block=32, damp=0.01, act_order=act_order, batch=64)
    order = (torch.argsort(torch.diagonal(gram), descending=True) if act_order
             else torch.arange(w.shape[1]))
    ref = reference_gptq(w, gram, 4, 32, 0.01, order, static=act_order)
    assert (out.codes == ref).double().mean() > 0.999  # equal up to rare ties at .5
    assert out.codes.min() >= 0 and out.codes.max() <= 15
    rtn = gptq.rtn(w, 4, 32)
    torch.testing.assert_close(rtn.dequantize().double(), quantize.fake_quant_blockwise(w, 4, 32),
                               rtol=0, atol=1e-6)
    e_rtn = gptq.output_error(w, rtn.dequantize(), gram)
    e_gptq = gptq.output_error(w, out.dequantize(), gram)
    # tr(dW G dW^T) is the layer's squared output change over the tokens
    assert e_gptq == pytest.approx(float(((x @ (out.dequantize().double() - w).T) ** 2).sum()), rel=1e-9)
    assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)


def _matmul_nbits_session(grid, k, n):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    b, scales, zp = gptq.pack_matmul_nbits(grid)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zp"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=grid.bits, block_size=grid.block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales"),
                               numpy_helper.from_array(zp, "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits,k", [(4, 96), (4, 80), (8, 96)])
def test_matmul_nbits_node_computes_with_the_decoded_grid(bits, k):
    """The packed codes, scales and zero points (an odd block count pads a zero-point byte; K not
    a multiple of the block pads B) run in ORT's MatMulNBits as x @ dequantized^T."""
    x, w = layer(1, n=300, d_in=k, d_out=20)
    grid = gptq.gptq(w, x.T @ x, bits=bits, block=32, act_order=True)
    y = _matmul_nbits_session(grid, k, 20).run(None, {"x": x.float().numpy()})[0]
    ref = x.float() @ grid.dequantize().T
    torch.testing.assert_close(torch.from_numpy(y), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    back = gptq.unpack_matmul_nbits(*gptq.pack_matmul_nbits(grid), k, bits, 32)
    assert torch.equal(back.codes, grid.codes) and torch.equal(back.zeros, grid.zeros)


def test_rtn_grid_is_the_one_ort_quantizer_writes():
    """ORT's MatMulNBits quantizer (asymmetric 4-bit RTN) on a MatMul weight, unpacked, is
    gptq.rtn's grid: the packing layout and the grid GPTQ rounds on are ORT's."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from minitron.export.quantizers import _matmul_nbits_quantizer
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    _, w = layer(2, n=10, d_in=96, d_out=40)
    w = w.float()
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 40])],
                              [numpy_helper.from_array(w.T.contiguous().numpy(), "W")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, bits=4,
                                          op_types_to_quantize=("MatMul",))
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _matmul_nbits_quantizer()(proto, bits=4, block_size=32, algo_config=config)
        q.process()
    inits = {t.name: numpy_helper.to_array(t) for t in q.model.model.graph.initializer}
    node = next(n for n in q.model.model.graph.node if n.op_type == "MatMulNBits")
    ort_grid = gptq.unpack_matmul_nbits(*(inits[i] for i in node.input[1:4]), 96, 4, 32)
    ours = gptq.rtn(w, 4, 32)
    assert (ort_grid.codes == ours.codes).double().mean() > 0.999
    torch.testing.assert_close(ort_grid.scales, ours.scales, rtol=1e-6, atol=0)
    torch.testing.assert_close(ort_grid.dequantize(), ours.dequantize(), rtol=0, atol=1e-5)
    gptq.write_grids_(q.model.model, {"W": gptq.gptq(w, torch.eye(96, dtype=torch.float64), 4, 32)})
    assert onnx.checker.check_model(q.model.model) is None
