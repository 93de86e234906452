"""compressed-tensors checkpoints of SmolLM2-135M: activation-aware scales vs plain rounding.

    OMP_NUM_THREADS=1 python benchmarks/bench_compressed.py   # ~10 min on a loaded 2-core box

W8A8 and W4A16 written by minitron.compressed with the calibration statistics (SmoothQuant / AWQ
scales folded in, what `export.compressed` writes) and without (plain round-to-nearest), each
reloaded through plain transformers and scored on the export's own validation data (8192 tokens)
against PyTorch FP32. Writes benchmarks/results/compressed-cpu-<time>.json / .md.
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).parent))
from bench_data import commit  # noqa: E402

COLUMNS = ["scheme", "scales", "size_mb", "x_smaller", "perplexity", "ppl_change_pct",
           "top1_vs_fp32", "group_size"]


def main() -> None:
    from minitron import calibration, compressed
    from minitron import export as ex
    from minitron.common import format_table
    from minitron.export.report import _device, _versions
    from minitron.config import DataConfig, ExportConfig
    from minitron.data import load_blocks
    from minitron.measure import weights_size_mb
    from minitron.models import load_model, resolve_model

    torch.set_num_threads(1)
    settings, data = ExportConfig(), DataConfig()
    n, length = ex.eval_shape(settings, data)
    where = resolve_model("smollm2-135m")
    model, tok = load_model(where, dtype="float32")
    read = dict(source=data.source, block_size=length, text_field=data.text_field,
                max_positions=model.config.max_position_embeddings)
    blocks = load_blocks(tok, "eval", n, **read)
    calib = load_blocks(tok, "calibration", settings.calib_samples, **read)
    base, ref = ex.score(lambda b: model(b).logits, blocks)
    stats, source = calibration.for_model(model, where, calib, gram=True)
    fp32_mb = weights_size_mb(where)
    rows = [{"scheme": "pytorch-fp32", "scales": "-", "size_mb": round(fp32_mb, 1), "x_smaller": 1.0,
             "perplexity": round(base["perplexity"], 4), "ppl_change_pct": 0.0, "top1_vs_fp32": 1.0}]
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in compressed.SCHEMES:
            for aware in (True, False):
                folder = Path(tmp) / f"{scheme}-{aware}"
                info = compressed.write(model, tok, folder, scheme, stats if aware else None)
                reloaded = compressed.load(folder)
                row, _ = ex.score(lambda b: reloaded(b).logits, blocks, ref)
                del reloaded
                rows.append({"scheme": scheme, "scales": info["transform"] or "none (RTN)",
                             "size_mb": round(info["size_mb"], 1),
                             "x_smaller": round(fp32_mb / info["size_mb"], 2),
                             "perplexity": round(row["perplexity"], 4),
                             "ppl_change_pct": round(100 * (row["perplexity"] / base["perplexity"] - 1), 2),
                             "top1_vs_fp32": round(row["top1_vs_fp32"], 4),
                             "group_size": info["group_size"], "alpha_mean": info.get("alpha_mean")})
                print(rows[-1], flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"model": "smollm2-135m", "eval": f"{n}x{length} tokens of the '{data.source}' eval split",
              "calibration": source, "rows": rows, "versions": _versions(), "device": _device(),
              "git": commit()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"compressed-cpu-{stamp}.json").write_text(json.dumps(result, indent=1, default=str))
    d = result["device"]
    md = ["# compressed-tensors checkpoints: smollm2-135m, reloaded through transformers\n",
          f"{d['cpu']} ({d['cpu_count']} cores); git {result['git']}; {result['eval']}; "
          f"calibration statistics {source}. Sizes: the safetensors files (bfloat16 embeddings, "
          "norms and scales) against the FP32 source weights.\n",
          format_table(rows, COLUMNS), "",
          "Command: `OMP_NUM_THREADS=1 python benchmarks/bench_compressed.py`"]
    (RESULTS / f"compressed-cpu-{stamp}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
