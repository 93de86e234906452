"""Export a causal LM to a deployable ONNX folder: KV-cache graph, INT8, validated against PyTorch.

`python -m minitron.export --model M --output DIR [--int8 blockwise|dynamic|static|none]
 [--per-channel] [--calib-samples N] [--bnb]`

The folder loads and generates with ONNX Runtime and optimum alone:
`ORTModelForCausalLM.from_pretrained(DIR).generate(...)` picks up `model.onnx` (the INT8 model unless
`--int8 none`) with the config, generation config and tokenizer beside it. `report.json` /
`report.md` hold the measurements, `manifest.json` the source, settings and versions.

INT8 schemes (all ONNX Runtime quantizers; MatMuls with constant weights and the embedding Gather):
- `blockwise` (default): MatMulNBits with 8-bit weights in blocks of 128 input channels (fewer when
  128 does not divide the width: 64 for SmolLM2), one scale per block, and `accuracy_level=4`, which
  quantizes activations to int8 per block at run time.
- `dynamic`: `quantize_dynamic`, MatMulInteger; weights per tensor (or per output channel with
  `--per-channel`), activations uint8 with one scale per tensor computed at run time.
- `static`: `quantize_static` in QDQ format, activation ranges calibrated (min/max) on blocks of
  the calibration split; per tensor or per channel.
Why `blockwise` is the default, measured on SmolLM2-135M (16x256 tokens of the stdlib eval split,
2-core x86 CPU with VNNI): it is the only scheme inside the 2% perplexity budget (+0.6%, 3.1x smaller
than the FP32 safetensors, decode ~2x faster than PyTorch FP32, prefill ~1.1x at one thread each).
`dynamic` is the fastest (prefill ~3.4x) but doubles the perplexity (+101% per tensor, +83% per
channel) and `static` QDQ quintuples it (+414% / +395%): one activation scale per tensor cannot cover
the outlier channels of the MLP down-projection inputs (leaving the down projections in FP32 still
cost +9%), while blockwise scales activations per block of 64-128 values.
Every variant's numbers are in the report (`--no-compare` measures only the deployed one).

Validation fails the export (nothing is written) when the FP32 graph's logits differ from PyTorch's
by more than `atol`, its top-1 agreement is below `fp32_min_top1`, or its greedy continuation of a
held-out prompt differs by a token; or when the deployed INT8 model's perplexity exceeds FP32's by
more than `ppl_budget` (relative) or its top-1 agreement is below `int8_min_top1`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from minitron.common import (MinitronError, StageTimer, atomic_dir, format_table, run_cli,
                             write_json_atomic, write_text_atomic)
from minitron.data import SOURCES_HELP, load_blocks
from minitron.evaluate import speed as torch_speed
from minitron.evaluate import weights_size_mb
from minitron.models import (ARCHS, EMBEDDED_NAME, arch_of, count_params, head_layout, load_model,
                             resolve_model)

Int8Scheme = Literal["blockwise", "dynamic", "static", "none"]
INT8_SCHEMES: tuple[str, ...] = ("blockwise", "dynamic", "static", "none")
MANIFEST_KIND = "minitron-export"
DEPLOY_FILE = "model.onnx"  # the name ORTModelForCausalLM looks for first
FP32_FILE = "model_fp32.onnx"  # a distinct name, so from_pretrained(folder) never picks it by accident
TASK = "text-generation-with-past"
BLOCKWISE_MAX_BLOCK = 128
_DIFF_BLOCKS = 4  # blocks whose full reference logits are kept for the max-difference check
REPORT_COLUMNS = ["model", "size_mb", "x_smaller", "perplexity", "ppl_change_pct", "top1_vs_fp32",
                   "max_logit_diff", "greedy_match", "prefill_tok_s", "decode_ms_tok",
                   "prefill_speedup", "decode_speedup"]


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ExportSettings:
    """Everything that shapes an export; stored in manifest.json. Validates itself."""

    int8: str = "blockwise"
    per_channel: bool = False
    calib_samples: int = 16
    bnb: bool = False
    source: str = "stdlib"
    eval_blocks: int = 16
    block_size: int = 256
    ppl_budget: float = 0.02
    atol: float = 1e-3
    fp32_min_top1: float = 0.99
    int8_min_top1: float = 0.80
    gen_tokens: int = 16
    keep_fp32: bool = False
    compare: bool = True
    measure_speed: bool = True

    def __post_init__(self):
        if self.int8 not in INT8_SCHEMES:
            raise MinitronError(f"--int8 '{self.int8}' is not a scheme; valid: {', '.join(INT8_SCHEMES)}")
        if self.per_channel and self.int8 == "blockwise":
            raise MinitronError("--per-channel applies to --int8 dynamic or static; blockwise already "
                                f"has one scale per block of at most {BLOCKWISE_MAX_BLOCK} weights")
        for name in ("calib_samples", "eval_blocks", "gen_tokens"):
            if getattr(self, name) < 1:
                raise MinitronError(f"{name}={getattr(self, name)} must be at least 1")
        if self.block_size < 2:
            raise MinitronError(f"block_size={self.block_size} must be at least 2")
        for name in ("ppl_budget", "atol"):
            if not getattr(self, name) >= 0:
                raise MinitronError(f"{name}={getattr(self, name)} must be a number >= 0")
        for name in ("fp32_min_top1", "int8_min_top1"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise MinitronError(f"{name}={getattr(self, name)} must be between 0 and 1")


@dataclass(frozen=True)
class Int8Variant:
    scheme: str
    per_channel: bool = False

    @property
    def name(self) -> str:
        return self.scheme + ("-per-channel" if self.per_channel else "")

    @property
    def file(self) -> str:
        return f"model_int8_{self.name.replace('-', '_')}.onnx"


def variants_to_measure(settings: ExportSettings) -> list[Int8Variant]:
    """The deployed variant first, then (with `compare`) every other scheme x granularity."""
    out: list[Int8Variant] = []
    if settings.int8 != "none":
        out.append(Int8Variant(settings.int8, settings.per_channel))
    if settings.compare:
        for v in (Int8Variant("blockwise"), Int8Variant("dynamic"), Int8Variant("dynamic", True),
                  Int8Variant("static"), Int8Variant("static", True)):
            if v not in out:
                out.append(v)
    return out


# ----------------------------------------------------------------------------- checks before work
def ort_cache_problem(config: Any) -> str | None:
    """Why ORTModelForCausalLM cannot run this shape with a KV cache, or None.

    optimum-onnx 0.1 builds the empty KV cache of the first step from the config by model type
    (the family's `ort_head_dim` / `ort_kv_heads` in minitron.models): Llama, Mistral, Qwen2/3,
    Gemma 2 and Phi-3 size a head as hidden_size // num_attention_heads, ignoring config.head_dim,
    so a model pruned in hidden size but not in heads (e.g. Llama-3.1-Minitron-4B-Width: 3072 =
    32 x 96, head_dim 128) fails at the first generate step; Gemma 2 and Phi-3 also take
    num_attention_heads as the number of KV heads, so only their multi-head-attention shapes run.
    """
    spec = arch_of(config)
    hl = head_layout(config)
    if spec.ort_kv_heads == "heads" and hl.num_kv_heads != hl.num_heads:
        return (f"num_key_value_heads={hl.num_kv_heads} differs from num_attention_heads="
                f"{hl.num_heads}; ONNX Runtime's ORTModelForCausalLM (optimum-onnx 0.1) sizes the "
                f"{spec.family} KV cache with num_attention_heads KV heads, so it runs only "
                f"{spec.family} models with plain multi-head attention (num_key_value_heads = "
                f"num_attention_heads). Serve this model from PyTorch")
    if spec.ort_head_dim == "config" or config.hidden_size == hl.num_heads * hl.head_dim:
        return None
    fits = config.hidden_size // hl.head_dim
    hint = (f"num_attention_heads={fits} (a multiple of num_key_value_heads={hl.num_kv_heads})"
            if config.hidden_size % hl.head_dim == 0 and fits % hl.num_kv_heads == 0
            else f"hidden_size={hl.num_heads * hl.head_dim}")
    return (f"hidden_size={config.hidden_size} is not num_attention_heads x head_dim "
            f"({hl.num_heads} x {hl.head_dim} = {hl.num_heads * hl.head_dim}); ONNX Runtime's "
            f"ORTModelForCausalLM derives the KV-cache head size as hidden_size / heads and cannot "
            f"run this model. Prune to a shape where they match, e.g. {hint}")


def check_model(model: str | os.PathLike):
    """The model's local folder (or hub id) and config; refuses non-causal-LM and unsupported ones."""
    from transformers import AutoConfig

    where = resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise MinitronError(f"could not read the config of model '{model}': {e}") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = list(getattr(config, "architectures", None) or [])
    if names and not set(names) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise MinitronError(
            f"model '{model}' is not a causal LM (architectures: {names}); --model needs a "
            f"causal-LM checkpoint, one of: {', '.join(ARCHS)}"
        )
    arch_of(config)  # refuses unsupported families by name
    problem = ort_cache_problem(config)
    if problem:
        raise MinitronError(f"model '{model}' cannot be exported for ONNX Runtime: {problem}")
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers them with TasksManager)
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(config.model_type, "onnx",
                                                                library_name="transformers")
    except KeyError:
        tasks = {}
    if TASK not in tasks:
        raise MinitronError(f"optimum's ONNX exporter has no '{TASK}' for model type "
                            f"'{config.model_type}'; supported: {', '.join(tasks)}")
    return where, config


def is_previous_export(path: Path) -> bool:
    try:
        return json.loads((path / "manifest.json").read_text()).get("kind") == MANIFEST_KIND
    except (OSError, ValueError, AttributeError):
        return False


def check_output(output: str | os.PathLike) -> Path:
    """An output folder may be new, empty, or a previous export (which is replaced at the end)."""
    output = Path(output)
    if output.exists():
        if not output.is_dir():
            raise MinitronError(f"--output {output} exists and is a file; give a folder path")
        if any(output.iterdir()) and not is_previous_export(output):
            raise MinitronError(
                f"--output {output} exists and is not a previous minitron export (no manifest.json "
                f"of kind '{MANIFEST_KIND}'); choose a new folder or remove it"
            )
    return output


def _check_bnb() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MinitronError("--bnb needs bitsandbytes: pip install 'minitron[bnb]'") from None


# ----------------------------------------------------------------------------- ONNX files
def onnx_files(path: Path) -> list[Path]:
    """The .onnx file and the external-data files it references."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    proto = onnx.load(str(path), load_external_data=False)
    locations = {dict((e.key, e.value) for e in t.external_data)["location"]
                 for t in _get_all_tensors(proto) if uses_external_data(t)}
    return [path] + [path.parent / loc for loc in sorted(locations)]


def onnx_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in onnx_files(path)) / 2**20


def uses_external_data(path: Path) -> bool:
    return len(onnx_files(path)) > 1


def rename_onnx(src: Path, dst: Path) -> None:
    """Rename an ONNX model and its external data (to `<dst name>_data`, optimum's convention)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors
    from onnx.external_data_helper import uses_external_data as tensor_external

    files = onnx_files(src)
    if len(files) == 1:
        os.replace(src, dst)
        return
    if len(files) > 2:
        raise MinitronError(f"{src} spreads its weights over {len(files) - 1} files; expected one")
    proto = onnx.load(str(src), load_external_data=False)
    data_name = dst.name + "_data"
    for t in _get_all_tensors(proto):
        if tensor_external(t):
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = data_name
    os.replace(files[1], dst.parent / data_name)
    onnx.save(proto, str(dst))
    if src != dst:
        src.unlink()


def remove_onnx(path: Path) -> None:
    if path.exists():
        for f in onnx_files(path):
            f.unlink(missing_ok=True)


def fold_initializer_transposes(src: Path, dst: Path) -> list[str]:
    """Copy of `src` where each Transpose of a weight becomes a transposed weight.

    optimum's exporter keeps one copy of tied embeddings and feeds the LM head through a run-time
    Transpose; the quantizers only quantize MatMuls whose weight is an initializer, so without this
    the LM head (a quarter of SmolLM2's weights) would stay FP32.
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


def _prefill_feeds(path: Path, blocks: torch.Tensor):
    """ONNX input dicts for a no-cache forward over each block (calibration)."""
    import numpy as np

    past = {k: np.zeros(s, dtype=np.float32) for k, s in _past_shapes(path).items()}
    for block in blocks:
        ids = block[None].numpy().astype(np.int64)
        yield {"input_ids": ids, "attention_mask": np.ones_like(ids),
               "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None], **past}


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


def quantize_int8(src: Path, dst: Path, variant: Int8Variant,
                  calib_blocks: torch.Tensor | None = None) -> None:
    """Write an INT8 copy of the FP32 graph `src` (transposes folded) to `dst` with ORT's quantizers."""
    _matmul_nbits_quantizer()
    with _quiet_logs("", "onnxruntime.quantization.matmul_nbits_quantizer"):
        _quantize_int8(src, dst, variant, calib_blocks)


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


def _quantize_int8(src: Path, dst: Path, variant: Int8Variant, calib_blocks: torch.Tensor | None) -> None:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_dynamic, quantize_static)

    external = uses_external_data(src)
    if variant.scheme == "blockwise":
        proto = onnx.load(str(src))
        quantizer = _matmul_nbits_quantizer()(proto, bits=8, block_size=blockwise_block_size(proto),
                                         is_symmetric=True, accuracy_level=4,
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
        mid = dst.with_name(dst.stem + "_matmul.onnx")
        quantizer.model.save_model_to_file(str(mid), external)
        # MatMulNBits has no Gather counterpart at 8 bits: the embedding gets ORT's dynamic INT8.
        quantize_dynamic(str(mid), str(dst), op_types_to_quantize=["Gather"],
                         weight_type=QuantType.QInt8, use_external_data_format=external)
        remove_onnx(mid)
    elif variant.scheme == "dynamic":
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gather"],
                         per_channel=variant.per_channel, weight_type=QuantType.QInt8,
                         use_external_data_format=external)
    elif variant.scheme == "static":
        if calib_blocks is None:
            raise ValueError("static quantization needs calibration blocks")

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = _prefill_feeds(src, calib_blocks)

            def get_next(self):
                return next(self.feeds, None)

        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gather"], per_channel=variant.per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=external,
                        extra_options={"MatMulConstBOnly": True})
    else:
        raise ValueError(f"unknown INT8 scheme {variant.scheme}")
    if external:  # the quantizers name external data `<file>.data`; use optimum's `<file>_data`
        rename_onnx(dst, dst)


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
          ref: Reference | None = None, batch_size: int = 4) -> tuple[dict[str, Any], Reference]:
    """Perplexity of `forward` (ids [b, L] -> logits [b, L, V]) on blocks; agreement with `ref`."""
    total, count, agree, max_diff = 0.0, 0, 0, 0.0
    top1, kept = [], []
    for start, batch in _batches(blocks, batch_size):
        logits = forward(batch).float()
        v = logits.size(-1)
        total += F.cross_entropy(logits[:, :-1].reshape(-1, v), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
        ids = logits.argmax(-1)
        top1.append(ids)
        n_keep = max(0, min(len(batch), _DIFF_BLOCKS - start))
        if ref is not None:
            agree += (ids == ref.top1[start:start + len(batch)]).sum().item()
            if n_keep:
                diff = (logits[:n_keep] - ref.logits[start:start + n_keep]).abs().max().item()
                max_diff = max(max_diff, diff)
        elif n_keep:
            kept.append(logits[:n_keep].clone())
    loss = total / count
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
    if ref is not None:
        result["top1_vs_fp32"] = agree / blocks.numel()
        result["max_logit_diff"] = max_diff
    return result, Reference(torch.cat(top1), torch.cat(kept) if kept else torch.empty(0), [], loss)


def _generate(model, prompt: torch.Tensor, new_tokens: int, pad_id: int | None) -> list[int]:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         do_sample=False, num_beams=1, pad_token_id=pad_id)
    return out[0, prompt.size(1):].tolist()


def greedy_match(tokens: list[int], reference: list[int]) -> int:
    """Leading tokens that agree with the reference continuation."""
    n = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        n += 1
    return n


@torch.no_grad()
def ort_speed(model, prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3,
              vocab_size: int | None = None) -> dict[str, float]:
    """`minitron.evaluate.speed` for an ORTModelForCausalLM: same prompt, same protocol, medians."""
    vocab = vocab_size or model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen).to(model.device)
    prefill, decode = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True)
        prefill.append(time.perf_counter() - t0)
        cache, token, length = out.past_key_values, out.logits[:, -1:].argmax(-1), prompt_len
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            length += 1
            mask = torch.ones(1, length, dtype=torch.long, device=model.device)
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode.append((time.perf_counter() - t0) / new_tokens)
    return {"prefill_tokens_per_s": prompt_len / statistics.median(prefill),
            "decode_ms_per_token": 1000 * statistics.median(decode)}


def load_ort(folder: Path, file_name: str, provider: str = "CPUExecutionProvider"):
    from optimum.onnxruntime import ORTModelForCausalLM

    return ORTModelForCausalLM.from_pretrained(folder, file_name=file_name, use_cache=True,
                                               provider=provider, local_files_only=True)


def _cuda_ort_available() -> bool:
    import onnxruntime as ort

    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


def measure_onnx(folder: Path, file_name: str, blocks: torch.Tensor, ref: Reference,
                 prompt: torch.Tensor, settings: ExportSettings, pad_id: int | None) -> dict[str, Any]:
    model = load_ort(folder, file_name)
    row, _ = score(lambda b: model(input_ids=b, attention_mask=torch.ones_like(b),
                                   use_cache=False).logits, blocks, ref)
    tokens = _generate(model, prompt, settings.gen_tokens, pad_id)
    row["greedy_match"] = greedy_match(tokens, ref.generation)
    row["greedy_tokens"] = tokens
    row["size_mb"] = onnx_size_mb(folder / file_name)
    if settings.measure_speed:
        row.update(ort_speed(model))
        if _cuda_ort_available():
            gpu = ort_speed(load_ort(folder, file_name, "CUDAExecutionProvider"))
            row.update({f"cuda_{k}": v for k, v in gpu.items()})
    return row


def measure_torch(model, blocks: torch.Tensor, ref: Reference, prompt: torch.Tensor,
                  settings: ExportSettings, pad_id: int | None) -> dict[str, Any]:
    device = model.device
    row, _ = score(lambda b: model(b.to(device)).logits.cpu(), blocks, ref)
    tokens = _generate(model, prompt.to(device), settings.gen_tokens, pad_id)
    row["greedy_match"] = greedy_match(tokens, ref.generation)
    row["greedy_tokens"] = tokens
    if settings.measure_speed:
        row.update(torch_speed(model))
    return row


def load_bnb(where: str, scheme: Literal["int8", "nf4"]):
    """The checkpoint through bitsandbytes (LLM.int8 or NF4), on the GPU if there is one, else CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if scheme == "int8":
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_compute_dtype=torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(where, quantization_config=qconfig, device_map=device,
                                                 dtype=torch.float32, use_safetensors=True)
    return model.eval()


# ----------------------------------------------------------------------------- validation gates
def check_fp32(row: dict[str, Any], settings: ExportSettings, gen_tokens: int) -> list[str]:
    problems = []
    if row["max_logit_diff"] > settings.atol:
        problems.append(f"max |logit difference| {row['max_logit_diff']:.3g} > atol {settings.atol:g}")
    if row["top1_vs_fp32"] < settings.fp32_min_top1:
        problems.append(f"top-1 agreement {row['top1_vs_fp32']:.4f} < {settings.fp32_min_top1}")
    if row["greedy_match"] < gen_tokens:
        problems.append(f"greedy generation matches only {row['greedy_match']}/{gen_tokens} tokens")
    return problems


def check_int8(row: dict[str, Any], fp32_ppl: float, settings: ExportSettings) -> list[str]:
    problems = []
    change = row["perplexity"] / fp32_ppl - 1
    if change > settings.ppl_budget:
        problems.append(f"perplexity {row['perplexity']:.4g} vs FP32 {fp32_ppl:.4g} (+{100 * change:.2f}%) "
                        f"exceeds the budget of +{100 * settings.ppl_budget:.2f}% (--ppl-budget)")
    if row["top1_vs_fp32"] < settings.int8_min_top1:
        problems.append(f"top-1 agreement with FP32 {row['top1_vs_fp32']:.4f} < {settings.int8_min_top1}")
    return problems


# ----------------------------------------------------------------------------- report
def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("minitron", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime",
                "onnxruntime-gpu", "bitsandbytes"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _device() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    d: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
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
             f"Deployed: `{DEPLOY_FILE}` = {report['deployed']}. Load it with "
             "`ORTModelForCausalLM.from_pretrained(<this folder>)`.", "",
             f"Held-out data: {report['eval']}. Perplexity change, top-1 agreement and the speed-ups "
             "are relative to PyTorch FP32; max_logit_diff is over the first "
             f"{_DIFF_BLOCKS} blocks; greedy_match counts leading tokens of a greedy continuation that "
             "equal PyTorch FP32's. Speeds: batch 1, 128-token prompt, 32 decoded tokens with the KV "
             f"cache, median of 3, on {report['device']['cpu']} ({report['device']['cpu_count']} cores, "
             f"load average {report['device']['load_average_1m']} when the report was written).",
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
    if any(r["model"].startswith("bnb") for r in report["rows"]):
        lines += ["bitsandbytes sizes are the in-memory footprint of the loaded model.", ""]
    lines += [f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the stage
def export(
    model: str | os.PathLike = EMBEDDED_NAME,
    output_dir: str | os.PathLike = "export",
    *,
    int8: Int8Scheme = "blockwise",
    per_channel: bool = False,
    calib_samples: int = 16,
    bnb: bool = False,
    source: str = "stdlib",
    eval_blocks: int = 16,
    block_size: int = 256,
    ppl_budget: float = 0.02,
    atol: float = 1e-3,
    fp32_min_top1: float = 0.99,
    int8_min_top1: float = 0.80,
    gen_tokens: int = 16,
    keep_fp32: bool = False,
    compare: bool = True,
    measure_speed: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Export `model` (folder, hub id or 'smollm2-135m') to a deployable ONNX folder; returns the report.

    Raises MinitronError, leaving no output folder, when validation fails; see the module docstring.
    """
    settings = ExportSettings(int8=int8, per_channel=per_channel, calib_samples=calib_samples, bnb=bnb,
                              source=source, eval_blocks=eval_blocks, block_size=block_size,
                              ppl_budget=ppl_budget, atol=atol, fp32_min_top1=fp32_min_top1,
                              int8_min_top1=int8_min_top1, gen_tokens=gen_tokens, keep_fp32=keep_fp32,
                              compare=compare, measure_speed=measure_speed)
    output = check_output(output_dir)
    where, config = check_model(model)
    if bnb:
        _check_bnb()
    variants = variants_to_measure(settings)
    deploy = Int8Variant(int8, per_channel) if int8 != "none" else None
    timings: list[dict[str, Any]] = []

    with StageTimer("load") as t:
        pt_model, tokenizer = load_model(where)
        blocks = load_blocks(tokenizer, "eval", eval_blocks, source=source, block_size=block_size,
                             max_positions=config.max_position_embeddings)
        calib = None
        if any(v.scheme == "static" for v in variants):
            calib = load_blocks(tokenizer, "calibration", calib_samples, source=source,
                                block_size=block_size, max_positions=config.max_position_embeddings)
    timings.append(t.as_dict())
    prompt = blocks[:1, :min(16, block_size - 1)]
    pad_id = tokenizer.pad_token_id

    with StageTimer("pytorch_fp32") as t:
        fp32_row, ref = score(lambda b: pt_model(b).logits, blocks)
        ref.generation = _generate(pt_model, prompt, gen_tokens, pad_id)
        fp32_row.update(top1_vs_fp32=1.0, max_logit_diff=0.0, greedy_match=len(ref.generation),
                        greedy_tokens=ref.generation)
        fp32_row["size_mb"] = weights_size_mb(where) or count_params(pt_model) * 4 / 2**20
        if measure_speed:
            fp32_row.update(torch_speed(pt_model))
            if torch.cuda.is_available():
                gpu = torch_speed(pt_model.to("cuda"))
                fp32_row.update({f"cuda_{k}": v for k, v in gpu.items()})
                pt_model.to("cpu")
    timings.append(t.as_dict())
    rows = [{"model": "pytorch-fp32", **fp32_row}]

    with atomic_dir(output, overwrite=True) as tmp:
        with StageTimer("onnx_export") as t, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from optimum.exporters.onnx import onnx_export_from_model

            onnx_export_from_model(pt_model, tmp, task=TASK, do_validation=False)
            if not (tmp / "tokenizer_config.json").exists():
                tokenizer.save_pretrained(tmp)
        timings.append(t.as_dict())
        fp32_file = FP32_FILE if int8 != "none" else DEPLOY_FILE
        if fp32_file != DEPLOY_FILE:
            rename_onnx(tmp / DEPLOY_FILE, tmp / fp32_file)

        with StageTimer("validate_fp32") as t:
            row = measure_onnx(tmp, fp32_file, blocks, ref, prompt, settings, pad_id)
        timings.append(t.as_dict())
        rows.append({"model": "onnx-fp32", "deployed": int8 == "none", **row})
        problems = check_fp32(row, settings, len(ref.generation))
        if problems:
            raise MinitronError("the FP32 ONNX export does not match PyTorch: " + "; ".join(problems))

        if variants:
            folded = tmp / "model_fp32_folded.onnx"
            fold_initializer_transposes(tmp / fp32_file, folded)
        for v in variants:
            with StageTimer(f"int8_{v.name}") as t:
                quantize_int8(folded, tmp / v.file, v, calib)
                row = measure_onnx(tmp, v.file, blocks, ref, prompt, settings, pad_id)
            timings.append(t.as_dict())
            row["within_budget"] = not check_int8(row, fp32_row["perplexity"], settings)
            rows.append({"model": f"onnx-int8-{v.name}", "deployed": v == deploy, **row})
            if v == deploy and not row["within_budget"]:
                raise MinitronError(f"the INT8 ({v.name}) model fails validation: "
                                    + "; ".join(check_int8(row, fp32_row["perplexity"], settings))
                                    + "; try another --int8 scheme, or raise --ppl-budget to accept it")
        if variants:
            remove_onnx(folded)
        for v in variants:
            if v != deploy:
                remove_onnx(tmp / v.file)
        if deploy is not None:
            rename_onnx(tmp / deploy.file, tmp / DEPLOY_FILE)
            if not keep_fp32:
                remove_onnx(tmp / fp32_file)

        if bnb:
            for scheme in ("int8", "nf4"):
                with StageTimer(f"bnb_{scheme}") as t, _quiet_logs("bitsandbytes"):
                    # A side measurement for PyTorch users: a kernel bitsandbytes lacks for this
                    # shape or device is reported in the row, not fatal to the ONNX export.
                    try:
                        qmodel = load_bnb(where, scheme)
                        row = measure_torch(qmodel, blocks, ref, prompt, settings, pad_id)
                        row["size_mb"] = qmodel.get_memory_footprint() / 2**20
                        del qmodel
                    except Exception as e:  # noqa: BLE001
                        row = {"error": f"{type(e).__name__}: {e}".strip()}
                        print(f"[minitron] bitsandbytes {scheme} failed: {row['error']}")
                timings.append(t.as_dict())
                rows.append({"model": f"bnb-{scheme}", **row})

        deployed = f"INT8 ({deploy.name})" if deploy else "FP32"
        report = {
            "kind": "minitron-export-report",
            "source": {"model": str(model), "path": where, "architecture": config.architectures,
                       "parameters": count_params(pt_model)},
            "deployed": deployed,
            "eval": f"{len(blocks)}x{block_size} tokens of the '{source}' eval split",
            "settings": asdict(settings),
            "rows": rows,
            "table": table_rows(rows),
            "device": _device(),
            "versions": _versions(),
            "timing": timings,
            "command": command or f"minitron.export.export({str(model)!r}, {str(output)!r}, ...)",
        }
        source_info = Path(where) / "minitron.json"
        manifest = {
            "kind": MANIFEST_KIND,
            "format_version": 1,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {**report["source"],
                       "minitron": json.loads(source_info.read_text()) if source_info.exists() else None},
            "deployed": {"file": DEPLOY_FILE, "precision": deployed,
                         "loader": "optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(folder)"},
            "files": sorted([p.name for p in tmp.iterdir()] + ["report.json", "report.md", "manifest.json"]),
            "settings": asdict(settings),
            "versions": report["versions"],
            "command": report["command"],
        }
        write_json_atomic(tmp / "report.json", report)
        write_text_atomic(tmp / "report.md", render_report(report))
        write_json_atomic(tmp / "manifest.json", manifest)
    return report


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minitron.export", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=EMBEDDED_NAME, help=f"model folder, hub id or '{EMBEDDED_NAME}'")
    p.add_argument("--output", required=True, help="output folder (new, empty, or a previous export)")
    p.add_argument("--int8", default="blockwise", choices=INT8_SCHEMES,
                   help="INT8 scheme of the deployed model.onnx (default: blockwise; see the module doc)")
    p.add_argument("--per-channel", action="store_true", help="per-channel weight scales (dynamic/static)")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration blocks for --int8 static")
    p.add_argument("--bnb", action="store_true", help="also measure bitsandbytes INT8 and NF4 loading")
    p.add_argument("--data", default="stdlib", help=f"data source: {SOURCES_HELP}")
    p.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks for validation")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--ppl-budget", type=float, default=0.02,
                   help="largest relative perplexity increase of the deployed INT8 model (0.02 = 2%%)")
    p.add_argument("--atol", type=float, default=1e-3, help="largest |logit difference| ONNX FP32 vs PyTorch")
    p.add_argument("--keep-fp32", action="store_true", help=f"keep the FP32 graph as {FP32_FILE}")
    p.add_argument("--no-compare", action="store_true",
                   help="measure only the deployed INT8 variant, not every scheme")
    p.add_argument("--no-speed", action="store_true", help="skip the latency measurements")
    args = p.parse_args(argv)
    import shlex
    import sys

    command = "python -m minitron.export " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = export(args.model, args.output, int8=args.int8, per_channel=args.per_channel,
                    calib_samples=args.calib_samples, bnb=args.bnb, source=args.data,
                    eval_blocks=args.eval_blocks, block_size=args.block_size, ppl_budget=args.ppl_budget,
                    atol=args.atol, keep_fp32=args.keep_fp32, compare=not args.no_compare,
                    measure_speed=not args.no_speed, command=command)
    print(format_table(report["table"], REPORT_COLUMNS))
    total = sum(t["wall_s"] for t in report["timing"])
    print(f"exported {report['deployed']} to {args.output} in {total:.0f}s "
          "(report.md, report.json, manifest.json)")
    return 0


if __name__ == "__main__":
    run_cli(main)
