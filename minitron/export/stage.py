"""The export stage: checks before work, the FP32 graph, the quantized variants, the deployed
choice, GGUF / compressed-tensors / bitsandbytes extras, and the report, written atomically."""

from __future__ import annotations

import json
import math
import os
import sys
import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from minitron.common import (MinitronError, StageTimer, atomic_dir, check_replaceable,
                             check_writable, clean_stale, write_json_atomic, write_text_atomic)
from minitron.config import DataConfig, ExportConfig
from minitron.cpu import Int8Settings, int8_target
from minitron.data import block_rule, load_blocks
from minitron.gguf_vocab import CHECK_TEXT as GGUF_CHECK_TEXT
from minitron.measure import speed as torch_speed
from minitron.measure import weights_size_mb
from minitron.models import count_params, load_config, load_model, resolve_model
from minitron.onnx_graph import export_graph, write_genai_config
from minitron.to_gguf import K_QUANT_TYPES as GGUF_KQUANTS
from minitron.onnx_lm import genai_generate
from minitron.export.variants import (GPTQ_SCHEMES, QuantVariant, SENSITIVE_BLOCKS, SENSITIVE_DOWN,
                                      SENSITIVE_FRACTION, deploy_candidates, eval_shape,
                                      variants_to_measure)
from minitron.export.graph import (DEPLOY_FILE, fold_initializer_transposes, quantizable_graph,
                                   relevel_onnx, remove_onnx, rename_onnx)
from minitron.export.quantizers import _quiet_logs, quantize
from minitron.export.validate import (Reference, _generate, check_fp32, check_quantized, load_bnb,
                                      measure_onnx, measure_torch, score)
from minitron.export.report import _device, _versions, render_report, table_rows

MANIFEST_KIND = "minitron-export"
MANIFEST = "manifest.json"  # lists every file the export wrote: only those may be replaced
FP32_FILE = "model_fp32.onnx"  # kept beside it with export.keep_fp32


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
