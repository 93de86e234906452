"""Q4_K_M of SmolLM2-135M with and without minitron's importance matrix: perplexity on minitron's
held-out eval blocks, both files read back by transformers' GGUF loader and scored by the same
function (minitron.export.score). Needs the extra minitron[gguf] (llama-cpp-python).

    OMP_NUM_THREADS=1 python benchmarks/bench_gguf_imatrix.py [--eval-blocks 32] [--calib-blocks 64]

Writes benchmarks/results/gguf_imatrix.json and .md (device, versions, git sha)."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from minitron import calibration
    from minitron.data import load_blocks
    from minitron.export import score
    from minitron.gguf_quant import fallbacks, imatrix_values, quantize_gguf
    from minitron.models import embedded_model_dir, load_model
    from minitron.to_gguf import hf_to_gguf_names, load_gguf, write_gguf

    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-blocks", type=int, default=32)
    ap.add_argument("--calib-blocks", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=256)
    args = ap.parse_args()
    where = str(embedded_model_dir())
    model, tok = load_model(where, dtype="float32")
    read = dict(block_size=args.block_size, max_positions=model.config.max_position_embeddings)
    evals = load_blocks(tok, "eval", args.eval_blocks, **read)
    calib = load_blocks(tok, "calibration", args.calib_blocks, **read)
    rows = {}
    with torch.no_grad():
        rows["fp32 (PyTorch)"], ref = score(lambda b: model(b).logits, evals)
    t = time.perf_counter()
    stats = calibration.collect(model, calib)
    collect_s = time.perf_counter() - t
    imatrix = imatrix_values(stats, hf_to_gguf_names(model.config))
    with tempfile.TemporaryDirectory() as d:
        f16 = write_gguf(model, tok, where, Path(d) / "f16.gguf", "f16")
        for name, im in (("Q4_K_M", None), ("Q4_K_M + imatrix", imatrix)):
            path = quantize_gguf(f16, Path(d) / "q.gguf", "q4_k_m", im, threads=1)
            back = load_gguf(path)
            with torch.no_grad():
                row, _ = score(lambda b, m=back: m(b).logits, evals, ref)
            row.update(size_mb=path.stat().st_size / 2**20,
                       fallbacks=sorted({f["type"] for f in fallbacks(path)}),
                       n_fallbacks=len(fallbacks(path)))
            rows[name] = row
            del back
    base = rows["fp32 (PyTorch)"]["perplexity"]
    import importlib.metadata as md

    out = {"model": "SmolLM2-135M (embedded)", "eval_blocks": args.eval_blocks,
           "calib_blocks": args.calib_blocks, "block_size": args.block_size,
           "calibration_pass_s": round(collect_s, 1),
           "rows": {k: {kk: v[kk] for kk in ("perplexity", "top1_vs_fp32", "size_mb", "fallbacks",
                                              "n_fallbacks") if kk in v} for k, v in rows.items()},
           "device": platform.processor() or platform.machine(),
           "versions": {p: md.version(p) for p in ("torch", "transformers", "gguf", "llama-cpp-python")},
           "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip()}
    res = Path(__file__).parent / "results"
    res.mkdir(exist_ok=True)
    (res / "gguf_imatrix.json").write_text(json.dumps(out, indent=1))
    lines = ["| variant | perplexity | change | top-1 vs FP32 | size MB |", "|---|---|---|---|---|"]
    for k, v in rows.items():
        lines.append(f"| {k} | {v['perplexity']:.3f} | {100 * (v['perplexity'] / base - 1):+.2f}% | "
                     f"{v.get('top1_vs_fp32', 1.0):.4f} | {v.get('size_mb', float('nan')):.1f} |")
    (res / "gguf_imatrix.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
