"""Quantizing an ONNX graph with ONNX Runtime's quantizers: INT8 (blockwise, dynamic, static,
SmoothQuant) and INT4 (RTN, HQQ), with their calibration feeds."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minitron.config import BLOCKWISE_MAX_BLOCK
from minitron.cpu import Int8Settings, int8_target
from minitron.export.variants import QuantVariant
from minitron.export.graph import remove_onnx, rename_onnx, set_accuracy_level_, uses_external_data


def _past_shapes(path: Path) -> dict[str, list[int]]:
    """Empty-cache shapes [1, kv_heads, 0, head_dim] of the graph's past_key_values inputs."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    shapes = {}
    for inp in proto.graph.input:
        if inp.name.startswith("past_key_values"):
            dims = [d.dim_value if d.HasField("dim_value") else None
                    for d in inp.type.tensor_type.shape.dim]
            shapes[inp.name] = [1, dims[1], 0, dims[3]]
    return shapes


def _prefill_feeds(path: Path, blocks: torch.Tensor) -> list[dict[str, Any]]:
    """ONNX input dicts for a no-cache forward over each block (calibration)."""
    import numpy as np

    past = {k: np.zeros(s, dtype=np.float32) for k, s in _past_shapes(path).items()}
    feeds = []
    for block in blocks:
        ids = block[None].numpy().astype(np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids),
                      "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None], **past})
    return feeds


def _calibration_reader(path: Path, blocks: torch.Tensor):
    """An ORT CalibrationDataReader over the blocks (static INT8's activation ranges)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds, self.i = _prefill_feeds(path, blocks), 0

        def get_next(self):
            self.i += 1
            return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    return Reader()


@contextlib.contextmanager
def _quiet_logs(*names: str):
    """Raise the given loggers to ERROR for a while (ORT's quantizers log every node at INFO and
    advise pre-processing on the root logger; bitsandbytes warns on every CPU int8 matmul)."""
    loggers = [logging.getLogger(name or None) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _matmul_nbits_quantizer():
    """ORT's MatMulNBitsQuantizer, imported without the root-logger setup its module does on import
    (`logging.basicConfig(level=INFO)`, which would print every library's INFO logs afterwards)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    return MatMulNBitsQuantizer


def quantize(src: Path, dst: Path, variant: QuantVariant, calib_blocks: torch.Tensor | None = None,
             cpu: Int8Settings | None = None) -> None:
    """Write a quantized copy of the FP32 graph `src` (transposes folded) to `dst` with ORT's quantizers.

    `cpu`: the types and weight range for the CPU that will run it (`minitron.cpu`); this machine's
    by default. Only `dynamic` and `static` use it: MatMulNBits quantizes activations to int8 per
    block and multiplies int8 x int8, whose pair sums (2 x 127 x 127) fit int16 on any x86 CPU.
    """
    cpu = cpu or int8_target("auto")
    _matmul_nbits_quantizer()
    # np.errstate: ORT's block quantizer divides by the scale of all-zero blocks, then masks them.
    with _quiet_logs("", "onnxruntime.quantization.matmul_nbits_quantizer"), \
            np.errstate(divide="ignore", invalid="ignore"):
        if variant.bits == 4:
            _quantize_int4(src, dst, variant)
        else:
            _quantize_int8(src, dst, variant, calib_blocks, cpu)
    if uses_external_data(dst):  # the quantizers name external data `<file>.data`; use `<file>_data`
        rename_onnx(dst, dst)


def blockwise_block_size(proto) -> int:
    """The largest power of two <= BLOCKWISE_MAX_BLOCK that divides the input width of every MatMul
    weight: MatMulNBits pads K up to whole blocks, which for SmolLM2's K=576 at 128 would add 11%."""
    inits = {t.name: t for t in proto.graph.initializer}
    ks = [inits[n.input[1]].dims[0] for n in proto.graph.node
          if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    block = BLOCKWISE_MAX_BLOCK
    while block > 16 and any(k % block for k in ks):
        block //= 2
    return block


FP32_LAYERS = ("down_proj", "lm_head")  # and down_proj.N: layer N's down_proj alone


def fp32_matmuls(proto, layers: tuple[str, ...]) -> list[str]:
    """The MatMul nodes of `proto` that play the roles `layers` (FP32_LAYERS, or `down_proj.N`
    for layer N's), found by structure (the exporter's node names carry no module names):
    `lm_head` writes a graph output; `down_proj` reads the widest input (the MLP's intermediate
    width) and writes the hidden width, one per layer in graph order (layer N's is the Nth: each
    layer reads the one before)."""
    indexed = {name for name in layers if name.startswith("down_proj.")
               and name.removeprefix("down_proj.").isdigit()}
    unknown = set(layers) - set(FP32_LAYERS) - indexed
    if unknown:
        raise ValueError(f"fp32_layers: {sorted(unknown)} are not among {FP32_LAYERS} "
                         "or down_proj.N")
    inits = {t.name: t.dims for t in proto.graph.initializer if len(t.dims) == 2}
    outputs = {o.name for o in proto.graph.output}
    mms = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    heads = [n for n in mms if n.output[0] in outputs]
    if not mms or not layers:
        return []
    hidden = inits[heads[0].input[1]][0] if heads else None
    widest = max(inits[n.input[1]][0] for n in mms)
    downs = [n for n in mms if n not in heads and inits[n.input[1]][0] == widest
             and inits[n.input[1]][1] == hidden]
    keep = [n for n in heads] if "lm_head" in layers else []
    if "down_proj" in layers:
        keep += downs
    for name in sorted(indexed):
        i = int(name.removeprefix("down_proj."))
        if i >= len(downs):
            raise ValueError(f"fp32_layers: {name}, but the graph has {len(downs)} down_proj MatMuls")
        keep.append(downs[i])
    return [n.name for n in keep]


def activation_matmuls(proto) -> list[str]:
    """The MatMul nodes of `proto` whose second input is not a weight (attention's q.k^T and p.v).
    Static INT8 leaves them float: ORT's `MatMulConstBOnly` is read by its QOperator MatMul only
    (onnxruntime/quantization/operators/matmul.py, 1.32); its QDQ MatMul quantizes every MatMul."""
    inits = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] not in inits]


def _save_quantizer(quantizer, dst: Path, external: bool) -> None:
    quantizer.model.save_model_to_file(str(dst), external)  # ORT's ONNXModel wrapper


def _quantize_int8(src: Path, dst: Path, variant: QuantVariant, calib_blocks: torch.Tensor | None,
                   cpu: Int8Settings) -> None:
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    external = uses_external_data(src)
    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    if variant.scheme == "blockwise":
        proto = onnx.load(str(src))
        quantizer = _matmul_nbits_quantizer()(proto, bits=8, block_size=blockwise_block_size(proto),
                                              is_symmetric=True, accuracy_level=variant.accuracy_level,
                                              op_types_to_quantize=("MatMul",))
        quantizer.process()
        mid = dst.with_name(dst.stem + "_matmul.onnx")
        _save_quantizer(quantizer, mid, external)
        # MatMulNBits has no Gather counterpart at 8 bits: the embedding gets ORT's dynamic INT8.
        quantize_dynamic(str(mid), str(dst), op_types_to_quantize=["Gather"],
                         weight_type=QuantType.QInt8, use_external_data_format=external)
        remove_onnx(mid)
    elif variant.scheme == "dynamic":
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gather"],
                         per_channel=variant.per_channel, weight_type=qtype[cpu.weight_type],
                         reduce_range=cpu.reduce_range, use_external_data_format=external)
    elif variant.scheme == "static":
        if calib_blocks is None:
            raise ValueError("static quantization needs calibration blocks")
        graph = onnx.load(str(src), load_external_data=False)
        quantize_static(str(src), str(dst), _calibration_reader(src, calib_blocks),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gather"],
                        nodes_to_exclude=(fp32_matmuls(graph, variant.fp32_layers)
                                          + activation_matmuls(graph)),
                        per_channel=variant.per_channel, activation_type=qtype[cpu.activation_type],
                        weight_type=qtype[cpu.weight_type], reduce_range=cpu.reduce_range,
                        calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=external, extra_options={
                            "MatMulConstBOnly": True,
                            "OpTypesToExcludeOutputQuantization": ["MatMul"] if variant.float_outputs else []})
    else:
        raise ValueError(f"unknown INT8 scheme {variant.scheme}")


def _quantize_int4(src: Path, dst: Path, variant: QuantVariant) -> None:
    """4-bit MatMulNBits (one scale and zero point per block) for every MatMul weight, and
    GatherBlockQuantized for the embedding, so no FP32 matrix is left to dominate the file.
    `rtn` rounds to nearest; `hqq` (ORT's half-quadratic quantizer) optimizes each block's scale and
    zero point against the weights' rounding error, with no calibration data. ORT 1.32's other
    4-bit algorithm, its bundled GPTQ, left a larger logit error than plain RTN on a model with
    outlier channels (MSE 0.016 vs 0.010), so it is not offered; `grid` (minitron.gptq's GPTQ) is
    RTN whose MatMulNBits nodes are then given the integers saved beside `src`."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig)

    external = uses_external_data(src)
    proto = onnx.load(str(src))
    block = blockwise_block_size(proto)
    level = variant.accuracy_level
    quantizer_cls = _matmul_nbits_quantizer()
    if variant.scheme in ("rtn", "grid"):
        ops = ("MatMul", "Gather")
    elif variant.scheme == "hqq":
        hqq = HQQWeightOnlyQuantConfig(block_size=block, bits=4, op_types_to_quantize=("MatMul",))
        quantizer = quantizer_cls(proto, bits=4, block_size=block, algo_config=hqq)
        quantizer.process()
        proto = quantizer.model.model
        set_accuracy_level_(proto, level)  # ORT's HQQ path does not write the attribute
        ops = ("Gather",)  # HQQ covers MatMuls only (float zero points); the embedding gets RTN
    else:
        raise ValueError(f"unknown INT4 scheme {variant.scheme}")
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, accuracy_level=level,
                                          op_types_to_quantize=ops, bits=4)
    quantizer = quantizer_cls(proto, bits=4, block_size=block, algo_config=config)
    quantizer.process()
    if variant.scheme == "grid":
        from minitron import gptq

        gptq.write_grids_(quantizer.model.model, gptq.load_grids(gptq.grids_file(src)))
    _save_quantizer(quantizer, dst, external)
