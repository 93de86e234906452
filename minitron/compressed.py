"""compressed-tensors checkpoints: the safetensors + `quantization_config` folders that
llm-compressor writes and vLLM serves, written with the `compressed-tensors` library itself.

Two schemes, each compressed-tensors' own preset (`preset_name_to_scheme`) on every nn.Linear but
`lm_head` (vLLM's usual ignore list; a tied head stays the embedding):

- `w8a8`: INT8 weights, one symmetric scale per output channel, and INT8 activations with one
  scale per token computed at run time (`W8A8`; format `int-quantized`, vLLM's CUTLASS INT8 GEMM).
  SmoothQuant scales from the calibration statistics are folded in first (minitron.quantize),
  which is what llm-compressor's W8A8 recipe does before it rounds.
- `w4a16`: 4-bit weights with one symmetric scale per group of input channels, activations
  unquantized (`W4A16`; format `pack-quantized`, 8 values per int32, vLLM's Marlin / Machete
  kernels). The group is 128 input channels, or 64 / 32 where 128 does not divide every width
  (SmolLM2's 576), else one per output channel. AWQ scales searched for that rounding on the
  calibration tokens are folded in first. Not the asymmetric `W4A16_ASYM` (AWQ's usual form, which
  vLLM also serves): transformers cannot load its packed zero points (compressed-tensors 0.20.1
  gives them the unpacked shape when it builds the model to load into; llm-compressor #1618).

Weights are rounded to nearest from their min/max (llm-compressor's default weight observer) in
float32; the folder stores the unquantized tensors (embeddings, norms, lm_head) and the scales in
bfloat16, the 16-bit type vLLM's INT8 and 4-bit kernels compute in (scales are rounded to it
before the weights are, so the stored integers are exact for the stored scales).
`AutoModelForCausalLM.from_pretrained(folder)` loads it on a CPU with no minitron import:
transformers' compressed-tensors integration dequantizes the weights and fake-quantizes W8A8's
activations per token, so perplexity measured there is the scheme's.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minitron.calibration import Stats
from minitron.common import MinitronError, atomic_dir

SCHEMES = {"w8a8": "W8A8", "w4a16": "W4A16"}  # ours -> compressed-tensors' preset name
IGNORE = ["lm_head"]
GROUP_SIZES = (128, 64, 32)  # the 4-bit groups vLLM's Marlin kernel takes (besides per channel)
DTYPE = torch.bfloat16


def folder_name(scheme: str) -> str:
    """The subfolder of an export that holds `scheme`'s checkpoint."""
    return f"compressed-{scheme}"


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise MinitronError(f"compressed-tensors scheme '{scheme}' is not one minitron writes; "
                            f"valid: {', '.join(SCHEMES)}")
    return scheme


def check_library() -> None:
    """compressed-tensors is the optional extra minitron[compressed]: say so, not ImportError."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as e:
        raise MinitronError("compressed-tensors checkpoints need the compressed-tensors package: "
                            "pip install 'minitron[compressed]'") from e


def _quantized_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[-1] not in IGNORE]


def group_size(model: nn.Module) -> int | None:
    """The largest vLLM 4-bit group dividing every quantized linear's input width; None (one
    scale per output channel) if none does."""
    widths = {m.in_features for _, m in _quantized_linears(model)}
    return next((g for g in GROUP_SIZES if all(w % g == 0 for w in widths)), None)


def quant_scheme(scheme: str, model: nn.Module):
    """compressed-tensors' preset for `scheme`, its weight group fitted to `model`'s widths."""
    from compressed_tensors.quantization import QuantizationStrategy, preset_name_to_scheme

    qs = preset_name_to_scheme(SCHEMES[check_scheme(scheme)], ["Linear"])
    if qs.weights.strategy == QuantizationStrategy.GROUP:
        group = group_size(model)
        if group is None:
            qs.weights.strategy, qs.weights.group_size = QuantizationStrategy.CHANNEL, None
        else:
            qs.weights.group_size = group
    return qs


def transform_(model: nn.Module, scheme: str, stats: Stats) -> dict[str, Any]:
    """Fold the activation-aware scales of `scheme` into `model` (in place; the product of every
    layer is unchanged before rounding): SmoothQuant for W8A8, AWQ at the scheme's group for W4A16."""
    from minitron import quantize as aq

    if scheme == "w8a8":
        info = aq.smoothquant_(model, stats)
    else:
        block = group_size(model) or max(m.in_features for _, m in _quantized_linears(model))
        info = aq.awq_(model, stats, bits=4, block=block, symmetric=True)
    alphas = [a for a in info["alpha"].values() if a is not None]
    return {"transform": "smoothquant" if scheme == "w8a8" else "awq",
            "alpha_mean": round(sum(alphas) / len(alphas), 3) if alphas else None,
            "groups_scaled": f"{len(alphas)}/{len(info['alpha'])}"}


@torch.no_grad()
def set_weight_qparams_(model: nn.Module) -> None:
    """Each quantized module's weight scale (and zero point) from the min/max of its row or group,
    through the library's `calculate_qparams`; scales rounded to the stored dtype first."""
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams

    for _, m in model.named_modules():
        args = getattr(getattr(m, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        w = m.weight.data.float()
        if args.strategy == QuantizationStrategy.GROUP:
            w = w.view(w.shape[0], -1, args.group_size)
            lo, hi = w.amin(-1), w.amax(-1)  # [out, groups]
        else:
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)  # [out, 1]
        scale, zero = calculate_qparams(lo, hi, args)
        m.weight_scale.data = scale.to(DTYPE).to(m.weight_scale.dtype)
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data = zero.to(m.weight_zero_point.dtype)


def quantize_(model: nn.Module, scheme: str):
    """Attach `scheme` to `model`'s linears, set their weight parameters and compress them in
    place (INT8 or packed INT4 tensors); returns the library's ModelCompressor for the config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus,
                                                 apply_quantization_config)

    config = QuantizationConfig(config_groups={"group_0": quant_scheme(scheme, model)},
                                ignore=IGNORE, quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config, show_progress=False)
    set_weight_qparams_(model)
    for _, m in model.named_modules():
        if hasattr(m, "quantization_scheme"):
            m.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    return compressor


def _save(model: nn.Module, tokenizer, compressor, folder: Path) -> None:
    model.to(DTYPE)  # floating tensors only: the INT8 / packed INT32 weights stay as they are
    model.config.dtype = DTYPE
    model.save_pretrained(folder, safe_serialization=True)
    compressor.update_config(str(folder))  # writes quantization_config into config.json
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write(model: nn.Module, tokenizer, folder: str | os.PathLike, scheme: str,
          stats: Stats | None = None) -> dict[str, Any]:
    """Write `model` (left untouched) as a compressed-tensors `scheme` checkpoint to `folder`
    (atomically); with calibration `stats` the activation-aware scales are folded in first.
    Returns what was done: scheme, format, weight group, transform and size."""
    check_scheme(scheme)
    check_library()
    if Path(folder).exists() and any(Path(folder).iterdir()):
        raise MinitronError(f"compressed-tensors output folder {folder} exists and is not empty; "
                            "choose a new or empty folder")
    work = copy.deepcopy(model).float().eval()
    info: dict[str, Any] = {"scheme": scheme, "transform": None}
    if stats is not None:
        info.update(transform_(work, scheme, stats))
    compressor = quantize_(work, scheme)
    with atomic_dir(folder, overwrite=True) as tmp:  # an empty folder may be replaced
        _save(work, tokenizer, compressor, tmp)
    qc = compressor.quantization_config
    weights = qc.config_groups["group_0"].weights
    info.update(format=_value(qc.format), weight_strategy=_value(weights.strategy),
                group_size=weights.group_size,
                size_mb=folder_size_mb(Path(folder)))
    return info


def _value(x) -> str:
    return str(getattr(x, "value", x))  # the library's enums, or their values where it keeps those


def folder_size_mb(folder: Path) -> float:
    """The checkpoint's weights on disk (its safetensors files)."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


def load(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The checkpoint through plain transformers (as a user loads it), weights dequantized."""
    from transformers import AutoModelForCausalLM

    check_library()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


__all__ = ["DTYPE", "GROUP_SIZES", "IGNORE", "SCHEMES", "check_library", "check_scheme", "folder_name",
           "folder_size_mb", "group_size", "load", "quant_scheme", "quantize_",
           "set_weight_qparams_", "transform_", "write"]
