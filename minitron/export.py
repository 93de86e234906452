"""Export a causal LM to a deployable ONNX folder: KV-cache graph, INT8/INT4, GGUF, validated.

`python -m minitron.export --model M --output DIR [export.int8=blockwise|dynamic|static|none]
 [export.per_channel=true] [export.int8_cpu=auto|vnni|no-vnni|arm] [export.int4=rtn|hqq|awq|gptq|awq_gptq|none]
 [export.accuracy_level=auto|0..4] [export.gguf=none|f16|q8_0|q4_k_m|q5_k_m|q6_k|all] [export.compare=true]
 [export.compressed=none|w8a8|w4a16|all] [export.bnb=true]` (`--help` lists every setting)

The folder is an ONNX Runtime GenAI model folder: `onnxruntime_genai.Model(DIR)` generates and
streams from `model.onnx` (the quantized model unless `int8=none`) with `genai_config.json` and the
tokenizer beside it; a plain `onnxruntime.InferenceSession` runs the same graph (lm-eval's
`onnxruntime` model scores tasks on it). The graph is traced from the model's transformers forward
by PyTorch's exporter (`minitron.onnx_graph`), so every family and every shape the pruner makes
serves, including hidden_size != heads x head_dim. `report.json` / `report.md` hold the
measurements, `manifest.json` the source, settings and versions.

Weight schemes (all ONNX Runtime quantizers; MatMuls with constant weights and the embedding):
- `blockwise` INT8 (default): MatMulNBits with 8-bit weights in blocks of 128 input channels (fewer
  when 128 does not divide the width: 64 for SmolLM2), one scale per block.
- `dynamic`: `quantize_dynamic`, MatMulInteger; weights per tensor (or per output channel with
  `per_channel`), activations uint8 with one scale per tensor computed at run time.
- `static`: `quantize_static` in QDQ format, activation ranges calibrated (min/max) on blocks of
  the calibration split; per tensor or per channel; attention's MatMuls of two activations stay float.
- `smoothquant`: SmoothQuant's scales folded into the weights (the LM head's input included), then
  `static` per channel with float MatMul outputs (ORT runs those MatMuls as MatMulIntegerToFloat);
  its candidates keep fewer and fewer MatMuls FP32 (SMOOTHQUANT_CANDIDATES: down_proj and lm_head,
  down_proj, the down_proj of the layers whose INT8 costs most, none) and the fastest within the
  gates is deployed.
- `int4=rtn|hqq`: MatMulNBits with 4-bit weights (and a 4-bit GatherBlockQuantized embedding).
  `awq` folds activation-aware scales in first; `gptq` (and `awq_gptq`, after AWQ's scales) writes
  GPTQ's integers (minitron.gptq) into the MatMulNBits nodes, the LM head at `int4_head_bits`.
`dynamic` and `static` take their types and weight range from the CPU they are made for
(`minitron.cpu`: reduced-range weights without VNNI, per ONNX Runtime's guidance). MatMulNBits
models run at `accuracy_level` 0 (float activations) or 4 (int8 activations per block, faster, but
onnxruntime issue #29849 reports flipped greedy tokens on outlier-heavy LLMs): `auto` measures both
and deploys the faster one that passes the gates. The measured comparison of the schemes on
SmolLM2-135M is in docs/results.md; `compare=true` puts every variant's numbers in the report.

Validation reads a bounded number of tokens at batch 1 (`max_eval_tokens`, blocks of at most 512)
whatever the model's context. It fails the export (nothing is written) when the FP32 graph's
largest logit difference from PyTorch's, relative to the largest |logit|, is over `fp32_rtol`, its
top-1 agreement is below `fp32_min_top1`, or its greedy continuation of a held-out prompt differs
by a token; or when no deployment candidate's perplexity is within `ppl_budget` (relative) of
FP32's with top-1 agreement at least `int8_min_top1` (the same gates for INT4 and GGUF); or when
ONNX Runtime GenAI, run on the finished folder, does not generate the tokens plain ONNX Runtime
generates from the deployed graph.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import shutil
import sys
import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from minitron.common import (MinitronError, StageTimer, atomic_dir, check_replaceable,
                             check_writable, clean_stale, format_table, run_cli, write_json_atomic,
                             write_text_atomic)
from minitron.config import (BLOCKWISE_MAX_BLOCK, INT4_SCHEMES, DataConfig, ExportConfig,
                             ModelConfig)
from minitron.cpu import Int8Settings, describe_cpu, int8_settings, int8_target
from minitron.data import block_rule, load_blocks
from minitron.gguf_vocab import CHECK_TEXT as GGUF_CHECK_TEXT
from minitron.measure import speed as torch_speed
from minitron.measure import weights_size_mb
from minitron.models import count_params, load_config, load_model, resolve_model
from minitron.onnx_graph import export_graph, write_genai_config
from minitron.to_gguf import K_QUANT_TYPES as GGUF_KQUANTS
from minitron.onnx_lm import OnnxLM, genai_generate, until_eos

MAX_EVAL_BLOCK = 512  # validation block length cap (tokens): 8k-context recipes validate on 512
MANIFEST_KIND = "minitron-export"
MANIFEST = "manifest.json"  # lists every file the export wrote: only those may be replaced
DEPLOY_FILE = "model.onnx"  # the graph genai_config.json names
SMOOTHQUANT_FP32 = ("down_proj", "lm_head")  # left in FP32 by int8=smoothquant's first candidate
# int8=smoothquant's candidates (FP32 layers, see fp32_matmuls), most FP32 first: each step makes the
# next INT8 MatMul (prefill time is mostly the FP32 MatMuls left) at a perplexity cost; the export
# deploys the fastest within the gates (with export.ppl_budget, the user picks the trade-off)
SENSITIVE_DOWN = "sensitive_down_proj"  # the down_proj MatMuls of SENSITIVE_FRACTION of the layers
SENSITIVE_FRACTION = 1 / 4  # whose lone INT8 changes the calibration logits most (int8_sensitivity)
SENSITIVE_BLOCKS = 2  # calibration blocks that ranking is measured on
SMOOTHQUANT_CANDIDATES = (SMOOTHQUANT_FP32, ("down_proj",), (SENSITIVE_DOWN,), ())
FP32_FILE = "model_fp32.onnx"  # kept beside it with export.keep_fp32
_DIFF_BLOCKS = 4  # blocks whose full reference logits are kept for the max-difference check
_DIFF_MAX_LOGITS = 2**26  # ... but at most 256 MB of them (a 128k vocabulary keeps one 512-token block)
REPORT_COLUMNS = ["model", "size_mb", "x_smaller", "perplexity", "ppl_change_pct", "top1_vs_fp32",
                   "max_logit_diff", "greedy_match", "prefill_tok_s", "decode_ms_tok",
                   "prefill_speedup", "decode_speedup"]


# ----------------------------------------------------------------------------- settings
def eval_shape(settings: ExportConfig, data: DataConfig) -> tuple[int, int]:
    """(blocks, block length) of the validation data: bounded whatever the recipe asks."""
    length = min(data.block_size, MAX_EVAL_BLOCK)
    return max(1, min(data.eval_blocks, settings.max_eval_tokens // length)), length


@dataclass(frozen=True)
class QuantVariant:
    """One quantized graph: 8-bit `blockwise|dynamic|static` or 4-bit `rtn|hqq`."""

    scheme: str
    per_channel: bool = False
    bits: int = 8
    accuracy_level: int | None = None  # MatMulNBits only
    fp32_layers: tuple[str, ...] = ()  # static only: MatMuls left in FP32 (see fp32_matmuls)
    head_bits: int = 4  # int4 gptq / awq_gptq only: the LM head's MatMulNBits bits (4 or 8)
    float_outputs: bool = False  # static only: MatMul outputs stay float (no Q/DQ after them)

    @property
    def name(self) -> str:
        return (f"int{self.bits}-{self.scheme}" + ("-per-channel" if self.per_channel else "")
                + (f"-acc{self.accuracy_level}" if self.accuracy_level is not None else "")
                + ("-fp32-" + "-".join(self.fp32_layers) if self.fp32_layers else "")
                + (f"-head{self.head_bits}" if self.head_bits != 4 else ""))

    @property
    def file(self) -> str:
        return f"model_{self.name.replace('-', '_')}.onnx"

    @property
    def matmul_nbits(self) -> bool:
        return self.bits == 4 or self.scheme == "blockwise"


def deploy_candidates(settings: ExportConfig) -> list[QuantVariant]:
    """The variants the deployed model.onnx is chosen from (one per accuracy level measured)."""
    if settings.int4 != "none":
        head = settings.int4_head_bits if settings.int4 in GPTQ_SCHEMES else 4
        return [QuantVariant(settings.int4, bits=4, accuracy_level=lv, head_bits=head)
                for lv in settings.levels]
    if settings.int8 == "blockwise":
        return [QuantVariant("blockwise", accuracy_level=lv) for lv in settings.levels]
    if settings.int8 == "smoothquant":  # per-channel weights always (the scales migrate into them)
        # without speed numbers the first (most FP32) passing candidate is deployed: only it is made
        ladder = SMOOTHQUANT_CANDIDATES if settings.speed else SMOOTHQUANT_CANDIDATES[:1]
        return [QuantVariant("smoothquant", True, fp32_layers=fp32) for fp32 in ladder]
    if settings.int8 != "none":
        return [QuantVariant(settings.int8, settings.per_channel)]
    return []


def variants_to_measure(settings: ExportConfig) -> list[QuantVariant]:
    """The deployment candidates first, then (with `compare`) every other scheme and level."""
    out = deploy_candidates(settings)
    if settings.compare:
        others = [QuantVariant("blockwise", accuracy_level=lv) for lv in settings.levels]
        others += [QuantVariant("dynamic"), QuantVariant("dynamic", True), QuantVariant("static"),
                   QuantVariant("static", True), QuantVariant("smoothquant", True)]
        others += [QuantVariant(s, bits=4, accuracy_level=lv) for s in INT4_SCHEMES[:-1]
                   if s not in GPTQ_SCHEMES for lv in settings.levels]  # GPTQ: minutes, on demand
        out += [v for v in others if v not in out]
    return out


# ----------------------------------------------------------------------------- checks before work
def check_model(model: str | os.PathLike, trust_remote_code: bool = False):
    """The model's local folder (or hub id) and config; refuses non-causal-LM and unsupported
    families by name (and, through `load_config`, broken weights files and remote code not asked for)."""
    config = load_config(model, trust_remote_code)  # refuses unsupported families by name
    return resolve_model(model, trust_remote_code), config


def check_output(output: str | os.PathLike) -> Path:
    """An output folder may be new, empty, or a previous export that holds nothing but the files
    its manifest lists (it is replaced at the end; anything else in it would be lost); it must be
    writable. What a killed export left beside it goes first."""
    output = Path(output)
    check_writable(output, "--output")
    check_replaceable(output, MANIFEST, "export", kind=MANIFEST_KIND)
    for leftover in clean_stale(output):
        print(f"[minitron] removed {leftover.name}, left by an interrupted export", file=sys.stderr)
    return output


def _check_bnb() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MinitronError("--bnb needs bitsandbytes: pip install 'minitron[bnb]'") from None


# ----------------------------------------------------------------------------- ONNX files
def onnx_files(path: Path) -> list[Path]:
    """The .onnx file and the external-data files it references."""
    stat = path.stat()
    return [path] + [path.parent / loc for loc in _data_locations(str(path), stat.st_mtime_ns,
                                                                   stat.st_size)]


@functools.lru_cache(maxsize=64)
def _data_locations(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    """The external-data files a graph names, read once per version of the file (keyed by its
    modification time and size): sizes, renames and the quantizers ask it many times, and a
    graph below 2 GB holds its weights inline, so reading its structure reads all of them."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    proto = onnx.load(path, load_external_data=False)
    return tuple(sorted({dict((e.key, e.value) for e in t.external_data)["location"]
                         for t in _get_all_tensors(proto) if uses_external_data(t)}))


def onnx_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in onnx_files(path)) / 2**20


def uses_external_data(path: Path) -> bool:
    return len(onnx_files(path)) > 1


def rename_onnx(src: Path, dst: Path) -> None:
    """Rename an ONNX model and its external data (to `<dst name>_data`)."""
    import onnx

    files = onnx_files(src)
    if len(files) == 1:
        os.replace(src, dst)
        return
    if len(files) > 2:
        raise MinitronError(f"{src} spreads its weights over {len(files) - 1} files; expected one")
    proto = onnx.load(str(src), load_external_data=False)
    _point_data_at_(proto, dst.name + "_data")
    os.replace(files[1], dst.parent / (dst.name + "_data"))
    onnx.save(proto, str(dst))
    if src != dst:
        src.unlink()


def _point_data_at_(proto, data_name: str) -> None:
    """Name `data_name` as the external-data file of every external tensor of `proto`."""
    from onnx.external_data_helper import _get_all_tensors
    from onnx.external_data_helper import uses_external_data as tensor_external

    for t in _get_all_tensors(proto):
        if tensor_external(t):
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = data_name


def relevel_onnx(src: Path, dst: Path, level: int | None) -> None:
    """A copy of the MatMulNBits graph `src` at another accuracy_level, written to `dst`.

    The level is an attribute of each MatMulNBits node and changes nothing in the weights (ORT's
    quantizers only write it onto the nodes), so the second level of a scheme costs a copy of
    the quantized graph (its external data copied as bytes, never parsed) instead of a second
    quantization, which would read and parse every FP32 weight again."""
    import onnx

    files = onnx_files(src)
    proto = onnx.load(str(src), load_external_data=False)
    set_accuracy_level_(proto, level)
    if len(files) > 1:
        data = dst.with_name(dst.name + "_data")
        _point_data_at_(proto, data.name)
        # A copy, not a hard link: onnx refuses to read external data with several links.
        shutil.copyfile(files[1], data)
    onnx.save(proto, str(dst))


def remove_onnx(path: Path) -> None:
    if path.exists():
        for f in onnx_files(path):
            f.unlink(missing_ok=True)


def quantizable_graph(src: Path, dst: Path) -> Path:
    """The graph the quantizers read: `src` itself when no Transpose reads a weight (what torch's
    exporter writes; checked on the structure, without reading the weights), else a copy at `dst`
    with those transposes folded (`fold_initializer_transposes`)."""
    import onnx

    proto = onnx.load(str(src), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    if not any(n.op_type == "Transpose" and n.input[0] in inits for n in proto.graph.node):
        return src
    del proto  # the fold loads the weights too
    fold_initializer_transposes(src, dst)
    return dst


def fold_initializer_transposes(src: Path, dst: Path) -> list[str]:
    """Copy of `src` where each Transpose of a weight becomes a transposed weight.

    An exporter may keep one copy of tied embeddings and feed the LM head through a run-time
    Transpose; the quantizers only quantize MatMuls whose weight is an initializer, so without this
    the LM head (a quarter of SmolLM2's weights) would stay FP32. (torch's exporter folds those
    transposes itself; this keeps any graph it is given quantizable.)
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    inits = {t.name: t for t in proto.graph.initializer}
    folded = []
    for node in list(proto.graph.node):
        if node.op_type == "Transpose" and node.input[0] in inits:
            w = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            t = numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)), node.output[0])
            proto.graph.initializer.append(t)
            proto.graph.node.remove(node)
            folded.append(node.output[0])
    external = uses_external_data(src)
    onnx.save(proto, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
              location=dst.name + "_data")
    return folded


# ----------------------------------------------------------------------------- quantization
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


def set_accuracy_level_(proto, level: int | None) -> None:
    """Set accuracy_level on every MatMulNBits node of `proto` (0 or None: remove it)."""
    import onnx

    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        for attr in [a for a in node.attribute if a.name == "accuracy_level"]:
            node.attribute.remove(attr)
        if level:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))


# ----------------------------------------------------------------------------- measurement
@dataclass
class Reference:
    """PyTorch FP32 outputs on the eval blocks that every other model is compared with."""

    top1: torch.Tensor  # [n, L] argmax ids
    logits: torch.Tensor  # [min(n, _DIFF_BLOCKS), L, V]
    generation: list[int]
    loss: float


def _batches(blocks: torch.Tensor, size: int):
    for i in range(0, len(blocks), size):
        yield i, blocks[i:i + size]


@torch.no_grad()
def score(forward: Callable[[torch.Tensor], torch.Tensor], blocks: torch.Tensor,
          ref: Reference | None = None, batch_size: int = 1) -> tuple[dict[str, Any], Reference]:
    """Perplexity of `forward` (ids [b, L] -> logits [b, L, V]) on blocks; agreement with `ref`."""
    total, count, agree, max_diff, max_ref = 0.0, 0, 0, 0.0, 0.0
    top1, kept = [], []
    for start, batch in _batches(blocks, batch_size):
        logits = forward(batch).float()
        v = logits.size(-1)
        total += F.cross_entropy(logits[:, :-1].reshape(-1, v), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
        ids = logits.argmax(-1)
        top1.append(ids)
        n_diff = max(1, min(_DIFF_BLOCKS, _DIFF_MAX_LOGITS // max(1, logits[0].numel())))
        n_keep = max(0, min(len(batch), n_diff - start))
        if ref is not None:
            agree += (ids == ref.top1[start:start + len(batch)]).sum().item()
            if n_keep:
                expected = ref.logits[start:start + n_keep]
                max_diff = max(max_diff, (logits[:n_keep] - expected).abs().max().item())
                max_ref = max(max_ref, expected.abs().max().item())
        elif n_keep:
            kept.append(logits[:n_keep].clone())
    loss = total / count
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
    if ref is not None:
        result["top1_vs_fp32"] = agree / blocks.numel()
        result["max_logit_diff"] = max_diff
        result["rel_logit_diff"] = (max_diff / max_ref if max_ref
                                     else math.inf if max_diff else 0.0)
    return result, Reference(torch.cat(top1), torch.cat(kept) if kept else torch.empty(0), [], loss)


def _generate(model, prompt: torch.Tensor, new_tokens: int, pad_id: int | None) -> list[int]:
    """PyTorch's greedy continuation, up to and including its first EOS (where ONNX Runtime GenAI
    and `OnnxLM.generate` stop too)."""
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         do_sample=False, num_beams=1, pad_token_id=pad_id)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return until_eos(out[0, prompt.size(1):].tolist(), eos)


def greedy_match(tokens: list[int], reference: list[int]) -> int:
    """Leading tokens that agree with the reference continuation."""
    n = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        n += 1
    return n


def _cuda_ort_available() -> bool:
    import onnxruntime as ort

    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


def measure_onnx(folder: Path, file_name: str, blocks: torch.Tensor, ref: Reference,
                 prompt: torch.Tensor, settings: ExportConfig) -> dict[str, Any]:
    """A graph of the folder through plain ONNX Runtime: the same scores, generation and speed
    protocol as the PyTorch row."""
    model = OnnxLM(folder, file_name)
    row, _ = score(model.logits, blocks, ref)
    tokens = model.generate(prompt, settings.gen_tokens)
    row["greedy_match"] = greedy_match(tokens, ref.generation)
    row["greedy_tokens"] = tokens
    row["size_mb"] = onnx_size_mb(folder / file_name)
    if settings.speed:
        row.update(model.speed())
        if _cuda_ort_available():
            gpu = OnnxLM(folder, file_name, "CUDAExecutionProvider").speed()
            row.update({f"cuda_{k}": v for k, v in gpu.items()})
    return row


def measure_torch(model, blocks: torch.Tensor, ref: Reference, prompt: torch.Tensor,
                  settings: ExportConfig, pad_id: int | None) -> dict[str, Any]:
    device = model.device
    row, _ = score(lambda b: model(b.to(device)).logits.cpu(), blocks, ref)
    tokens = _generate(model, prompt.to(device), settings.gen_tokens, pad_id)
    row["greedy_match"] = greedy_match(tokens, ref.generation)
    row["greedy_tokens"] = tokens
    if settings.speed:
        row.update(torch_speed(model))
    return row


def load_bnb(where: str, scheme: Literal["int8", "nf4"], trust_remote_code: bool = False):
    """The checkpoint through bitsandbytes (LLM.int8 or NF4), on the GPU if there is one, else CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if scheme == "int8":
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_compute_dtype=torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(where, quantization_config=qconfig, device_map=device,
                                                 dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    return model.eval()


# ----------------------------------------------------------------------------- validation gates
def check_fp32(row: dict[str, Any], settings: ExportConfig, gen_tokens: int) -> list[str]:
    """The FP32 graph against PyTorch. The logit bound is relative to the largest |logit| on the
    same tokens (`fp32_rtol`): float32 rounding in a graph that sums in another order grows with
    the logits' scale and the model's depth, which an absolute bound ignores (see ExportConfig)."""
    problems = []
    if row["rel_logit_diff"] > settings.fp32_rtol:
        problems.append(f"max |logit difference| {row['max_logit_diff']:.3g} is "
                        f"{row['rel_logit_diff']:.3g} of the largest |logit|, > export.fp32_rtol "
                        f"{settings.fp32_rtol:g}")
    if row["top1_vs_fp32"] < settings.fp32_min_top1:
        problems.append(f"top-1 agreement {row['top1_vs_fp32']:.4f} < {settings.fp32_min_top1}")
    if row["greedy_match"] < gen_tokens:
        problems.append(f"greedy generation matches only {row['greedy_match']}/{gen_tokens} tokens")
    return problems


def check_quantized(row: dict[str, Any], fp32_ppl: float, settings: ExportConfig) -> list[str]:
    problems = []
    change = row["perplexity"] / fp32_ppl - 1
    if change > settings.ppl_budget:
        problems.append(f"perplexity {row['perplexity']:.4g} vs FP32 {fp32_ppl:.4g} (+{100 * change:.2f}%) "
                        f"exceeds the budget of +{100 * settings.ppl_budget:.2f}% (export.ppl_budget)")
    if row["top1_vs_fp32"] < settings.int8_min_top1:
        problems.append(f"top-1 agreement with FP32 {row['top1_vs_fp32']:.4f} < {settings.int8_min_top1}")
    return problems


# ----------------------------------------------------------------------------- report
def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("minitron", "torch", "transformers", "onnx", "onnxscript", "onnxruntime",
                "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda", "bitsandbytes",
                "compressed-tensors"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _device() -> dict[str, Any]:
    cpu = describe_cpu()
    d: dict[str, Any] = {"cpu": cpu.model, "isa": int8_settings(cpu).isa, "cpu_count": os.cpu_count(),
                         "torch_threads": torch.get_num_threads(),
                         "load_average_1m": round(os.getloadavg()[0], 2)}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's rows with ratios against PyTorch FP32, rounded for the markdown table."""
    base = rows[0]
    out = []
    for r in rows:
        if "error" in r:
            out.append({"model": r["model"], "perplexity": None, "greedy_match": "failed (see report.json)"})
            continue
        t = {"model": r["model"] + (" (deployed)" if r.get("deployed") else ""),
             "size_mb": round(r["size_mb"], 1) if r.get("size_mb") is not None else None,
             "x_smaller": round(base["size_mb"] / r["size_mb"], 2) if r.get("size_mb") else None,
             "perplexity": round(r["perplexity"], 4),
             "ppl_change_pct": round(100 * (r["perplexity"] / base["perplexity"] - 1), 2),
             "top1_vs_fp32": round(r["top1_vs_fp32"], 4) if "top1_vs_fp32" in r else None,
             "max_logit_diff": float(f"{r['max_logit_diff']:.3g}") if "max_logit_diff" in r else None,
             "greedy_match": (f"{r['greedy_match']}/{len(r['greedy_tokens'])}"
                              if "greedy_match" in r else None)}
        if "prefill_tokens_per_s" in r:
            t["prefill_tok_s"] = round(r["prefill_tokens_per_s"], 1)
            t["decode_ms_tok"] = round(r["decode_ms_per_token"], 2)
            t["prefill_speedup"] = round(r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"], 2)
            t["decode_speedup"] = round(base["decode_ms_per_token"] / r["decode_ms_per_token"], 2)
        out.append(t)
    return out


def render_report(report: dict[str, Any]) -> str:
    lines = [f"# Export report: {report['source']['model']}", "",
             f"Deployed: `{DEPLOY_FILE}` = {report['deployed']}. Generate with "
             "`onnxruntime_genai.Model(<this folder>)` (it reads `genai_config.json`); "
             "a plain `onnxruntime.InferenceSession` runs the same graph.", "",
             f"Held-out data: {report['eval']}; blocks: {report.get('blocks', 'no BOS')}. "
             "Perplexity change, top-1 agreement and the speed-ups are relative to PyTorch FP32; "
             f"max_logit_diff is over the first {_DIFF_BLOCKS} blocks (fewer where their logits pass 256 MB); greedy_match counts "
             "leading tokens of a greedy continuation that "
             "equal PyTorch FP32's. Speeds: batch 1, 128-token prompt, 32 decoded tokens with the KV "
             f"cache, median of 3, on {report['device']['cpu']} ({report['device']['cpu_count']} cores, "
             f"load average {report['device']['load_average_1m']} when the report was written).",
             "", f"CPU ISA: {report['device']['isa']}. Dynamic/static INT8 made for "
             f"{report['int8_cpu']['isa']}: {report['int8_cpu']['activation_type']} activations, "
             f"{report['int8_cpu']['weight_type']} weights, reduce_range={report['int8_cpu']['reduce_range']} "
             f"({report['int8_cpu']['reason']}).",
             "", format_table(table_rows(report["rows"]), REPORT_COLUMNS), ""]
    gpu_rows = [r for r in report["rows"] if "cuda_prefill_tokens_per_s" in r]
    if gpu_rows:
        lines += ["CUDA execution provider:", "", format_table(
            [{"model": r["model"], "prefill_tok_s": round(r["cuda_prefill_tokens_per_s"], 1),
              "decode_ms_tok": round(r["cuda_decode_ms_per_token"], 2)} for r in gpu_rows]), ""]
    over = [r["model"] for r in report["rows"][2:] if r.get("within_budget") is False]
    if over:
        lines += [f"Outside the perplexity budget (+{100 * report['settings']['ppl_budget']:.1f}%): "
                  + ", ".join(over) + ".", ""]
    lines += _gguf_notes(report["rows"])
    if any(r["model"].startswith("bnb") for r in report["rows"]):
        lines += ["bitsandbytes sizes are the in-memory footprint of the loaded model.", ""]
    lines += [f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def _gguf_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Per k-quant GGUF row: its importance matrix, and the tensors llama.cpp could not make
    k-quants (rows not whole 256-value blocks) with the type it chose instead."""
    out = []
    for r in rows:
        if not r["model"].startswith("gguf-") or r["model"] in ("gguf-f16", "gguf-q8_0"):
            continue
        fell = r.get("fallbacks") or []
        listed = ", ".join(f"{f['tensor']} ({f['row_width']} -> {f['type']})" for f in fell[:12])
        more = f" and {len(fell) - 12} more" if len(fell) > 12 else ""
        out += [f"{r['model']}: importance matrix {r.get('imatrix', 'none')}; "
                + (f"{len(fell)} tensors fell back from k-quants (row width not a multiple of "
                   f"256): {listed}{more}." if fell else "every 2-D tensor is a k-quant."), ""]
    return out


# ----------------------------------------------------------------------------- the stage
@dataclass
class Job:
    """What every step of one export reads: the source, its held-out data and the reference."""

    model: str
    where: str
    config: Any
    settings: ExportConfig
    data: DataConfig
    pt_model: Any
    tokenizer: Any
    blocks: torch.Tensor
    calib: torch.Tensor | None
    prompt: torch.Tensor
    ref: Reference | None = None
    ref_perplexity: float = math.nan
    stats: Any = None  # minitron.calibration.Stats, once a transform needs them
    stats_from: str = ""
    gptq_cache: dict[str, dict] = field(default_factory=dict)  # transform -> minitron.gptq's cache
    timings: list[dict[str, Any]] = field(default_factory=list)
    trust_remote_code: bool = False

    @property
    def pad_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    def timed(self, name: str) -> StageTimer:
        timer = StageTimer(name)
        self.timings.append(timer)  # as_dict() once the block has run (see _timings)
        return timer


def _timings(job: Job) -> list[dict[str, Any]]:
    return [t.as_dict() for t in job.timings]


def load_job(model, where: str, config, settings: ExportConfig, data: DataConfig,
             trust_remote_code: bool = False) -> Job:
    """Load the PyTorch model and the bounded validation (and calibration) blocks.

    The model loads in float32 whatever the recipe's model.dtype: the graph is traced in float32,
    ONNX Runtime's quantizers take float32 weights, and on a CPU ORT runs float32 fastest."""
    n_blocks, length = eval_shape(settings, data)
    pt_model, tokenizer = load_model(where, dtype="float32", trust_remote_code=trust_remote_code)
    read = dict(source=data.source, block_size=length, text_field=data.text_field,
                max_positions=config.max_position_embeddings)
    blocks = load_blocks(tokenizer, "eval", n_blocks, **read)
    calib = None
    kquants = settings.gguf_imatrix and any(t in GGUF_KQUANTS for t in gguf_types(settings.gguf))
    if kquants or settings.compressed != "none" or any(
            v.scheme in ("static", *TRANSFORMS) for v in variants_to_measure(settings)):
        calib = load_blocks(tokenizer, "calibration", settings.calib_samples, **read)
    return Job(str(model), where, config, settings, data, pt_model, tokenizer, blocks, calib,
               prompt=blocks[:1, :min(16, length - 1)], trust_remote_code=trust_remote_code)


def measure_pytorch(job: Job) -> dict[str, Any]:
    """The PyTorch FP32 row; sets the reference every other row is compared with."""
    row, job.ref = score(lambda b: job.pt_model(b).logits, job.blocks)
    job.ref.generation = _generate(job.pt_model, job.prompt, job.settings.gen_tokens, job.pad_id)
    row.update(top1_vs_fp32=1.0, max_logit_diff=0.0, rel_logit_diff=0.0,
               greedy_match=len(job.ref.generation), greedy_tokens=job.ref.generation)
    row["size_mb"] = weights_size_mb(job.where) or count_params(job.pt_model) * 4 / 2**20
    if job.settings.speed:
        row.update(torch_speed(job.pt_model))
        if torch.cuda.is_available():
            gpu = torch_speed(job.pt_model.to("cuda"))
            row.update({f"cuda_{k}": v for k, v in gpu.items()})
            job.pt_model.to("cpu")
    job.ref_perplexity = row["perplexity"]
    return {"model": "pytorch-fp32", **row}


def export_fp32(job: Job, tmp: Path, file_name: str) -> dict[str, Any]:
    """The graph with a KV cache (torch's exporter), the files a runtime needs beside it, and its
    validation against PyTorch (raises if off)."""
    with job.timed("onnx_export"):
        export_graph(job.pt_model, tmp / file_name)
        job.pt_model.config.save_pretrained(tmp)
        job.pt_model.generation_config.save_pretrained(tmp)
        job.tokenizer.save_pretrained(tmp)
        write_genai_config(tmp, job.pt_model.config, job.tokenizer, DEPLOY_FILE,
                           job.pt_model.generation_config)
    with job.timed("validate_fp32"):
        row = measure_onnx(tmp, file_name, job.blocks, job.ref, job.prompt, job.settings)
    problems = check_fp32(row, job.settings, len(job.ref.generation))
    if problems:
        raise MinitronError("the FP32 ONNX export does not match PyTorch: " + "; ".join(problems))
    return {"model": "onnx-fp32", **row}


def quantize_variants(job: Job, tmp: Path, fp32_file: str, fp32_ppl: float,
                      cpu: Int8Settings) -> list[dict[str, Any]]:
    """Quantize and measure each variant; every file is kept until the deployed one is chosen."""
    variants = variants_to_measure(job.settings)
    if not variants:
        return []
    base = quantizable_graph(tmp / fp32_file, tmp / "model_fp32_folded.onnx")
    sources = {(None, 4): (base, {})}  # (transform, head bits) -> (its FP32 graph, what it did)
    quantized: dict[QuantVariant, QuantVariant] = {}  # variant at no level -> the one quantized
    rows = []
    for v in variants:
        transform = v.scheme if v.scheme in TRANSFORMS else None
        key = (transform, v.head_bits)
        if key not in sources:
            with job.timed(f"{transform}_transform"):
                sources[key] = transformed_graph(job, tmp, transform, base, v.head_bits)
        src, info = sources[key]
        twin = quantized.get(dataclasses.replace(v, accuracy_level=None)) if v.matmul_nbits else None
        with job.timed(v.name.replace("-", "_")):
            if twin is None:
                quantize(src, tmp / v.file, TRANSFORMS.get(v.scheme, lambda v: v)(
                    resolve_fp32_layers(v, info)), job.calib, cpu)
                quantized[dataclasses.replace(v, accuracy_level=None)] = v
            else:  # the same weights at another accuracy level
                relevel_onnx(tmp / twin.file, tmp / v.file, v.accuracy_level)
            row = measure_onnx(tmp, v.file, job.blocks, job.ref, job.prompt, job.settings)
        problems = check_quantized(row, fp32_ppl, job.settings)
        measured = {k: x for k, x in info.items()  # the ranking where this variant used it
                    if k != "fp32_down_proj" or SENSITIVE_DOWN in v.fp32_layers}
        rows.append({"model": f"onnx-{v.name}", "variant": v, "within_budget": not problems,
                     "problems": problems, **measured, **row})
    for src, _ in sources.values():
        src.with_suffix(".grids.safetensors").unlink(missing_ok=True)  # minitron.gptq.grids_file
        if src != tmp / fp32_file:
            remove_onnx(src)
    return rows


# A weight transform (minitron.quantize) -> the ORT quantization of the transformed FP32 graph.
TRANSFORMS: dict[str, Callable[[QuantVariant], QuantVariant]] = {
    # MatMul outputs float (a Q/DQ pair after q/k/v, gate/up and o_proj, into the residual, costs
    # several times the perplexity); ORT still runs them on integers (MatMulIntegerToFloat)
    "smoothquant": lambda v: QuantVariant("static", per_channel=True, fp32_layers=v.fp32_layers,
                                          float_outputs=True),
    "awq": lambda v: QuantVariant("rtn", bits=4, accuracy_level=v.accuracy_level),
    "gptq": lambda v: QuantVariant("grid", bits=4, accuracy_level=v.accuracy_level),
    "awq_gptq": lambda v: QuantVariant("grid", bits=4, accuracy_level=v.accuracy_level),
}
GPTQ_SCHEMES = ("gptq", "awq_gptq")


def sensitive_down_proj(model, calib: torch.Tensor) -> list[int]:
    """The layers (ascending) whose down_proj, alone in static W8A8 with its input's range over
    the calibration blocks `calib` (as ORT calibrates it), changes the next-token distributions
    over the first SENSITIVE_BLOCKS of them most (quantize.int8_sensitivity's KL):
    SENSITIVE_FRACTION of them, at least one. On SmolLM2-135M after SmoothQuant the cost is
    uneven (KL 4.9e-3 for layer 11's alone, at most 0.37e-3 for 22 of the 30): keeping the
    quarter FP32 takes the all-INT8 perplexity change from +5.5% to +2.9%."""
    from minitron import quantize as aq
    from minitron.models import arch_of, decoder_layers

    spec = arch_of(model)
    names = [f"{spec.layers}.{i}.{spec.down_proj}" for i in range(len(decoder_layers(model)))]
    kl = aq.int8_sensitivity(model, calib[:SENSITIVE_BLOCKS], names,
                             aq.input_ranges(model, calib, names))
    k = max(1, math.ceil(len(names) * SENSITIVE_FRACTION))
    return sorted(sorted(range(len(names)), key=lambda i: -kl[names[i]])[:k])


def resolve_fp32_layers(v: QuantVariant, info: dict[str, Any]) -> QuantVariant:
    """`v` with SENSITIVE_DOWN replaced by the down_proj.N its transform measured."""
    if SENSITIVE_DOWN not in v.fp32_layers:
        return v
    rest = tuple(name for name in v.fp32_layers if name != SENSITIVE_DOWN)
    return dataclasses.replace(v, fp32_layers=rest + tuple(f"down_proj.{i}"
                                                           for i in info["fp32_down_proj"]))


def transformed_graph(job: Job, tmp: Path, transform: str, base: Path,
                      head_bits: int = 4) -> tuple[Path, dict[str, Any]]:
    """The FP32 graph of a rescaled copy of the model (SmoothQuant or AWQ scales folded in; the
    same function, so the FP32 gates need not be rerun), transposes folded, and a summary: the
    validated graph `base` with its weights replaced where each changed parameter is found there
    unambiguously, else traced anew."""
    import copy

    from minitron import calibration, quantize as aq

    if job.stats is None and transform != "gptq":  # one pass (or the pruned folder's saved
        gram = any(v.scheme in ("awq", "awq_gptq") for v in variants_to_measure(job.settings))
        job.stats, job.stats_from = calibration.for_model(job.pt_model, job.where, job.calib, gram)
    model = copy.deepcopy(job.pt_model)
    if transform == "smoothquant":  # strengths measured on the first calibration blocks' activations
        inputs = aq.group_inputs(model, job.calib[:aq.MEASURE_BLOCKS])
        info = aq.smoothquant_(model, job.stats, aq.MEASURED_ALPHAS, inputs, head=True)
        if any(SENSITIVE_DOWN in v.fp32_layers for v in variants_to_measure(job.settings)):
            info["fp32_down_proj"] = sensitive_down_proj(model, job.calib)
    elif transform != "gptq":
        info = aq.awq_(model, job.stats, bits=4, block=aq.matmul_block(model))
    else:
        info = {"alpha": {}}
    grids = _gptq_(job, model, transform, head_bits) if transform in GPTQ_SCHEMES else {}
    folded = tmp / f"model_fp32_{transform}{'' if head_bits == 4 else f'_head{head_bits}'}.onnx"
    found: dict[str, str] = {}
    patched = aq.patch_weights(base, folded, job.pt_model, model, found)
    if grids:
        from minitron import gptq

        if not patched:
            raise MinitronError(f"export.int4={transform}: a GPTQ weight is not found in the "
                                "FP32 graph, so its integers cannot be written into it")
        gptq.save_grids({found[f"{name}.weight"]: g for name, g in grids.items()},
                        gptq.grids_file(folded))
        info["precision"] = _grid_precision(grids, model)
    if not patched:  # a weight the graph hides (folded into another constant): trace anew
        raw = tmp / f"model_fp32_{transform}_raw.onnx"
        export_graph(model, raw)
        fold_initializer_transposes(raw, folded)
        remove_onnx(raw)
    alphas = [a for a in info["alpha"].values() if a is not None]
    summary = {"calibration_stats": job.stats_from, "alpha_mean": round(sum(alphas) / len(alphas), 3)
               if alphas else None, "groups_scaled": f"{len(alphas)}/{len(info['alpha'])}",
               "graph": "weights patched" if patched else "traced anew"}
    if aq.HEAD_GROUP in info["alpha"]:
        summary["head_alpha"] = info["alpha"][aq.HEAD_GROUP]
    for key in ("precision", "fp32_down_proj"):
        if key in info:
            summary[key] = info[key]
    return folded, summary


def _gptq_(job: Job, model, transform: str, head_bits: int) -> dict:
    """GPTQ every linear of `model` in place (one calibration pass of its own, on the model as
    transformed so far, shared by the transform's head widths), the LM head at `head_bits`."""
    from minitron import gptq, quantize as aq

    if job.calib is None:
        raise MinitronError("export.int4=gptq|awq_gptq needs calibration blocks")
    return gptq.gptq_model_(model, job.calib, bits=4, block=aq.matmul_block(model),
                            head_bits=head_bits, cache=job.gptq_cache.setdefault(transform, {}))


def _grid_precision(grids: dict, model) -> str:
    """Which tensors got which precision, for the report row."""
    from minitron.models import arch_of

    head = arch_of(model).lm_head
    body = [g for n, g in grids.items() if n != head]
    parts = [f"{len(body)} linears GPTQ {body[0].bits}-bit block {body[0].block}"] if body else []
    if head in grids:
        parts.append(f"lm_head GPTQ {grids[head].bits}-bit block {grids[head].block}")
    return "; ".join(parts + ["embedding RTN 4-bit (GatherBlockQuantized)"])


def choose_deployed(rows: list[dict[str, Any]], candidates: list[QuantVariant],
                    require_budget: bool = True) -> QuantVariant | None:
    """The fastest candidate (decode, then prefill) that passes the gates; without speed numbers the
    lowest accuracy level (exact float activations). When none passes: raises with every
    candidate's problems, or (`require_budget` false) takes the one with the lowest perplexity."""
    measured = [r for r in rows if r["variant"] in candidates]
    if not measured:
        return None
    passing = [r for r in measured if r["within_budget"]]
    if not passing and not require_budget:
        return min(measured, key=lambda r: r["perplexity"])["variant"]
    if not passing:
        detail = "; ".join(f"{r['variant'].name}: " + "; ".join(r["problems"]) for r in measured)
        raise MinitronError(f"the quantized model fails validation: {detail}; try another export.int8 / "
                            "export.int4 scheme, or raise export.ppl_budget to accept it")
    if all("decode_ms_per_token" in r for r in passing):
        best = min(passing, key=lambda r: (r["decode_ms_per_token"], -r["prefill_tokens_per_s"]))
    else:
        best = min(passing, key=lambda r: r["variant"].accuracy_level or 0)
    return best["variant"]


def _deployed_name(deploy: QuantVariant | None) -> str:
    if deploy is None:
        return "FP32"
    level = f", accuracy_level {deploy.accuracy_level}" if deploy.accuracy_level is not None else ""
    return f"INT{deploy.bits} ({deploy.scheme}{'-per-channel' if deploy.per_channel else ''}{level})"


def keep_deployed(tmp: Path, rows: list[dict[str, Any]], deploy: QuantVariant | None, fp32_file: str,
                  keep_fp32: bool) -> None:
    """Rename the deployed variant to model.onnx and remove the others (and FP32 unless kept)."""
    for r in rows:
        r["deployed"] = r["variant"] == deploy
        if r["variant"] != deploy:
            remove_onnx(tmp / r["variant"].file)
        r["variant"] = r["variant"].name
    if deploy is not None:
        rename_onnx(tmp / deploy.file, tmp / DEPLOY_FILE)
        if not keep_fp32:
            remove_onnx(tmp / fp32_file)


def check_genai(job: Job, folder: Path, deployed: dict[str, Any]) -> None:
    """The finished folder in its deployment runtime: ONNX Runtime GenAI must generate, from the
    held-out prompt, the tokens plain ONNX Runtime generated from the same graph (`genai_config.json`
    describes the graph's interface; a wrong field shows here, not in a user's first run)."""
    tokens = genai_generate(folder, job.prompt[0].tolist(), job.settings.gen_tokens)
    deployed["genai_tokens"] = tokens
    if tokens != deployed["greedy_tokens"]:
        raise MinitronError(f"ONNX Runtime GenAI generates {tokens} from the deployed graph where plain "
                            f"ONNX Runtime generates {deployed['greedy_tokens']}")


def measure_bnb(job: Job) -> list[dict[str, Any]]:
    rows = []
    for scheme in ("int8", "nf4"):
        with job.timed(f"bnb_{scheme}"), _quiet_logs("bitsandbytes"):
            # A side measurement for PyTorch users: a kernel bitsandbytes lacks for this shape or
            # device is reported in the row, not fatal to the ONNX export.
            try:
                qmodel = load_bnb(job.where, scheme, job.trust_remote_code)
                row = measure_torch(qmodel, job.blocks, job.ref, job.prompt, job.settings, job.pad_id)
                row["size_mb"] = qmodel.get_memory_footprint() / 2**20
                del qmodel
            except Exception as e:  # noqa: BLE001
                row = {"error": f"{type(e).__name__}: {e}".strip()}
                print(f"[minitron] bitsandbytes {scheme} failed: {row['error']}")
        rows.append({"model": f"bnb-{scheme}", **row})
    return rows


def gguf_types(choice: str) -> tuple[str, ...]:
    """The GGUF types of `export.gguf`: 'all' is F16 and Q8_0, plus the k-quants where their
    encoder (llama-cpp-python, the extra minitron[gguf]) is installed."""
    from minitron.gguf_quant import has_llama_cpp
    from minitron.to_gguf import FLOAT_TYPES

    if choice == "all":
        if not has_llama_cpp():
            print("[minitron] export.gguf=all: no k-quants (Q4_K_M/Q5_K_M/Q6_K): their encoder, "
                  "llama-cpp-python, is not installed (pip install 'minitron[gguf]')")
            return FLOAT_TYPES
        return FLOAT_TYPES + GGUF_KQUANTS
    return () if choice == "none" else (choice,)


def export_gguf(job: Job, tmp: Path) -> list[dict[str, Any]]:
    """GGUF files beside the ONNX ones, each validated through transformers' GGUF loader: logits on
    the held-out blocks and the tokenization of text. F16 / Q8_0 must pass the INT8 gates; the
    k-quants are reported against them (a 4-6 bit model is not expected to keep +2%)."""
    from minitron import calibration
    from minitron.gguf_quant import FTYPES, write_all
    from minitron.gguf_vocab import text_mismatch
    from minitron.to_gguf import load_gguf, reference_config

    types = gguf_types(job.settings.gguf)
    stats, source = None, "none"
    if job.settings.gguf_imatrix and any(t in FTYPES for t in types):
        stats, source = calibration.for_model(job.pt_model, job.where, job.calib)
    with job.timed("gguf_write"):
        files = write_all(job.pt_model, job.tokenizer, job.where, tmp, types, stats)
    texts = [job.tokenizer.decode(b) for b in job.blocks[:2]] + [GGUF_CHECK_TEXT]
    rows = []
    for f in files:
        qtype, path = f["type"], f["path"]
        with job.timed(f"gguf_{qtype}"):
            bad_text = text_mismatch(job.tokenizer, path, texts)
            reloaded = load_gguf(path, reference_config(job.config))
            row = measure_torch(reloaded, job.blocks, job.ref, job.prompt,
                                dataclasses.replace(job.settings, speed=False), job.pad_id)
            del reloaded
        row.update(size_mb=path.stat().st_size / 2**20, imatrix=source if f["imatrix"] else "none",
                   fallbacks=f["fallbacks"])
        problems = check_quantized(row, job.ref_perplexity, job.settings)
        if qtype == "f16" and row["greedy_match"] < len(job.ref.generation):
            problems.append(f"greedy generation matches only {row['greedy_match']}/"
                            f"{len(job.ref.generation)} tokens")
        if bad_text or (problems and qtype not in FTYPES) or not math.isfinite(row["perplexity"]):
            raise MinitronError(f"the GGUF {qtype} file fails validation: " + "; ".join(
                problems + ([f"text tokenizes differently: {bad_text}"] if bad_text else [])))
        rows.append({"model": f"gguf-{qtype}", "within_budget": not problems, **row})
    return rows


def export_compressed(job: Job, tmp: Path) -> list[dict[str, Any]]:
    """compressed-tensors checkpoints for vLLM (minitron.compressed) in subfolders, each reloaded
    through plain transformers and measured like the GGUF rows: reported against the gates, not
    failed by them (4-bit weights are not expected to keep +2%), but a checkpoint that does not
    reload or yields a non-finite perplexity fails the export."""
    from minitron import calibration, compressed

    schemes = tuple(compressed.SCHEMES) if job.settings.compressed == "all" else (job.settings.compressed,)
    stats, source = calibration.for_model(job.pt_model, job.where, job.calib, gram="w4a16" in schemes)
    rows = []
    for scheme in schemes:
        folder = tmp / compressed.folder_name(scheme)
        with job.timed(f"compressed_{scheme}"):
            info = compressed.write(job.pt_model, job.tokenizer, folder, scheme, stats)
            reloaded = compressed.load(folder)
            row = measure_torch(reloaded, job.blocks, job.ref, job.prompt,
                                dataclasses.replace(job.settings, speed=False), job.pad_id)
            del reloaded
        if not math.isfinite(row["perplexity"]):
            raise MinitronError(f"the compressed-tensors {scheme} checkpoint reloads with perplexity "
                                f"{row['perplexity']}")
        problems = check_quantized(row, job.ref_perplexity, job.settings)
        rows.append({"model": folder.name, "within_budget": not problems, "problems": problems,
                     "calibration_stats": source, **info, **row})
    return rows


def _record(job: Job) -> dict[str, Any]:
    """What manifest.json and the report record: the export's settings and the data it measured."""
    return {**job.settings.to_dict(), "data": job.data.to_dict()}


def write_report(job: Job, tmp: Path, rows: list[dict[str, Any]], deployed: str, cpu: Int8Settings,
                 command: str) -> dict[str, Any]:
    """report.json, report.md and manifest.json in the (temporary) output folder."""
    report = {
        "kind": "minitron-export-report",
        "source": {"model": job.model, "path": job.where, "architecture": job.config.architectures,
                   "parameters": count_params(job.pt_model)},
        "deployed": deployed,
        "eval": f"{len(job.blocks)}x{job.blocks.shape[1]} tokens of the '{job.data.source}' eval split",
        "blocks": block_rule(job.tokenizer),
        "prompt_tokens": job.prompt[0].tolist(),  # greedy_tokens / genai_tokens continue this
        "settings": _record(job),
        "int8_cpu": cpu.as_dict(),
        "rows": rows,
        "table": table_rows(rows),
        "device": _device(),
        "versions": _versions(),
        "timing": _timings(job),
        "command": command,
    }
    source_info = Path(job.where) / "minitron.json"
    manifest = {
        "kind": MANIFEST_KIND,
        "format_version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {**report["source"],
                   "minitron": json.loads(source_info.read_text()) if source_info.exists() else None},
        "deployed": {"file": DEPLOY_FILE, "precision": deployed,
                     "loader": "onnxruntime_genai.Model(folder)",
                     "runtime_check": "onnxruntime-genai generated the deployed row's greedy tokens"},
        "files": sorted([p.name for p in tmp.iterdir()] + ["report.json", "report.md", MANIFEST]),
        "settings": _record(job),
        "int8_cpu": report["int8_cpu"],
        "versions": report["versions"],
        "command": report["command"],
    }
    write_json_atomic(tmp / "report.json", report)
    write_text_atomic(tmp / "report.md", render_report(report))
    write_json_atomic(tmp / MANIFEST, manifest)
    return report


def export(model: str | os.PathLike, output_dir: str | os.PathLike,
           settings: ExportConfig | None = None, data: DataConfig | None = None, *,
           command: str | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """Export `model` (folder, hub id or 'smollm2-135m') to a deployable ONNX folder; returns the report.

    `data` gives the held-out (and, for int8=static, calibration) blocks. Raises MinitronError,
    leaving no output folder, when validation fails; see the module docstring.
    """
    settings = settings or ExportConfig()
    data = data or DataConfig()
    output = check_output(output_dir)
    where, config = check_model(model, trust_remote_code)
    if settings.gguf != "none":
        from minitron.to_gguf import gguf_arch

        gguf_arch(config)  # refuses other families and shapes llama.cpp cannot hold, before any work
        if any(t in GGUF_KQUANTS for t in gguf_types(settings.gguf)):
            from minitron.gguf_quant import llama_cpp

            llama_cpp()  # the k-quant encoder is an optional extra: say so before any work
    if settings.bnb:
        _check_bnb()
    if settings.compressed != "none":
        from minitron.compressed import check_library

        check_library()  # an optional extra: say so before any work
    cpu = int8_target(settings.int8_cpu)
    candidates = deploy_candidates(settings)
    fp32_file = FP32_FILE if candidates else DEPLOY_FILE
    with StageTimer("load") as t:
        job = load_job(model, where, config, settings, data, trust_remote_code)
    job.timings.append(t)
    with job.timed("pytorch_fp32"):
        rows = [measure_pytorch(job)]
    with atomic_dir(output, overwrite=True, manifest=MANIFEST, what="export",
                    kind=MANIFEST_KIND) as tmp:
        rows.append({**export_fp32(job, tmp, fp32_file), "deployed": not candidates})
        quantized = quantize_variants(job, tmp, fp32_file, rows[0]["perplexity"], cpu)
        deploy = choose_deployed(quantized, candidates, settings.require_budget)
        keep_deployed(tmp, quantized, deploy, fp32_file, settings.keep_fp32)
        rows += quantized
        with job.timed("genai_check"):
            check_genai(job, tmp, next(r for r in rows if r.get("deployed")))
        if settings.gguf != "none":
            rows += export_gguf(job, tmp)
        if settings.compressed != "none":
            rows += export_compressed(job, tmp)
        if settings.bnb:
            rows += measure_bnb(job)
        report = write_report(job, tmp, rows, _deployed_name(deploy), cpu,
                              command or f"minitron.export.export({str(model)!r}, {str(output)!r}, ...)")
    return report


# ----------------------------------------------------------------------------- CLI
# The settings the command takes (minitron.cli): the model is --model.
CLI_KEYS = {"model": ("trust_remote_code",),
            "data": ("source", "text_field", "block_size", "eval_blocks"), "export": None}


def build_parser():
    from minitron import cli

    p = cli.stage_parser("python -m minitron.export", __doc__.splitlines()[0], CLI_KEYS)
    p.add_argument("--model", default=ModelConfig.name, help="model folder, hub id or 'smollm2-135m'")
    p.add_argument("--output", required=True, help="output folder (new, empty, or a previous export)")
    return p


def main(argv: list[str] | None = None) -> int:
    import shlex
    import sys

    from minitron import cli

    args = cli.parse(build_parser(), argv)
    c = cli.configs(args)
    command = "python -m minitron.export " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = export(args.model, args.output, c["export"], c["data"], command=command,
                    trust_remote_code=c["model"].trust_remote_code)
    print(format_table(report["table"], REPORT_COLUMNS))
    total = sum(t["wall_s"] for t in report["timing"])
    print(f"exported {report['deployed']} to {args.output} in {total:.0f}s "
          "(report.md, report.json, manifest.json)")
    return 0


if __name__ == "__main__":
    run_cli(main)
