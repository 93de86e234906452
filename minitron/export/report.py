"""The export report: versions, device, the table rows and `report.md`."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import torch

from minitron.common import format_table
from minitron.cpu import describe_cpu, int8_settings
from minitron.export.graph import DEPLOY_FILE
from minitron.export.validate import _DIFF_BLOCKS

REPORT_COLUMNS = ["model", "size_mb", "x_smaller", "perplexity", "ppl_change_pct", "top1_vs_fp32",
                   "max_logit_diff", "greedy_match", "prefill_tok_s", "decode_ms_tok",
                   "prefill_speedup", "decode_speedup"]


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
