"""The quantized variants an export measures and may deploy (`QuantVariant`), from the export
settings, and the shape of the validation blocks."""

from __future__ import annotations

from dataclasses import dataclass

from minitron.config import INT4_SCHEMES, DataConfig, ExportConfig

MAX_EVAL_BLOCK = 512  # validation block length cap (tokens): 8k-context recipes validate on 512
SMOOTHQUANT_FP32 = ("down_proj", "lm_head")  # left in FP32 by int8=smoothquant's first candidate
# int8=smoothquant's candidates (FP32 layers, see fp32_matmuls), most FP32 first: each step makes the
# next INT8 MatMul (prefill time is mostly the FP32 MatMuls left) at a perplexity cost; the export
# deploys the fastest within the gates (with export.ppl_budget, the user picks the trade-off)
SENSITIVE_DOWN = "sensitive_down_proj"  # the down_proj MatMuls of SENSITIVE_FRACTION of the layers
SENSITIVE_FRACTION = 1 / 4  # whose lone INT8 changes the calibration logits most (int8_sensitivity)
SENSITIVE_BLOCKS = 2  # calibration blocks that ranking is measured on
SMOOTHQUANT_CANDIDATES = (SMOOTHQUANT_FP32, ("down_proj",), (SENSITIVE_DOWN,), ())


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


GPTQ_SCHEMES = ("gptq", "awq_gptq")
