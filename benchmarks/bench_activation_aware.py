"""SmolLM2-135M through minitron.export with the activation-aware candidates side by side.

    OMP_NUM_THREADS=1 python benchmarks/bench_activation_aware.py [--int8-only | --int4-only] [--with-awq]

One export (the export's own validation data, 8192 tokens; one thread) measuring int8=smoothquant
and the INT4 variants side by side against PyTorch FP32, with the perplexity gates relaxed so that
the report is written whatever the numbers. SmoothQuant: FP32 down_proj and lm_head (the deployed
row), FP32 down_proj only, and all INT8. INT4: RTN and GPTQ with the LM head at 4 and at 8 bits
(one GPTQ pass for both), at accuracy level 0; `--with-awq` adds AWQ and AWQ + GPTQ (each head
width). `--int8-only` runs the deployed SmoothQuant row alone, `--int4-only` the INT4 rows alone:
on a shared, loaded 2-core box each GPTQ or AWQ pass and each measured variant costs minutes.
Copies the export's report to
benchmarks/results/activation_aware-cpu-<time>.json / .md (device, versions, git sha).
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


def main() -> None:
    from minitron import export as ex
    from minitron.config import DataConfig, ExportConfig

    torch.set_num_threads(1)
    args = sys.argv[1:]
    int4 = [ex.QuantVariant("rtn", bits=4, accuracy_level=0)]
    if "--with-awq" in args:
        int4 += [ex.QuantVariant("awq", bits=4, accuracy_level=0)]
        int4 += [ex.QuantVariant("awq_gptq", bits=4, accuracy_level=0, head_bits=h) for h in (4, 8)]
    int4 += [ex.QuantVariant("gptq", bits=4, accuracy_level=0, head_bits=h) for h in (4, 8)]
    int8 = [ex.QuantVariant("smoothquant", True, fp32_layers=ex.SMOOTHQUANT_FP32)]
    if "--int8-only" not in args:
        int8 += [ex.QuantVariant("smoothquant", True, fp32_layers=("down_proj",)),
                 ex.QuantVariant("smoothquant", True)]
    variants = int8 if "--int8-only" in args else int4 if "--int4-only" in args else int8 + int4
    ex.variants_to_measure = lambda settings: list(variants)  # these, and only these
    ex.deploy_candidates = lambda settings: list(variants)
    with tempfile.TemporaryDirectory() as tmp:
        report = ex.export("smollm2-135m", Path(tmp) / "out",
                           ExportConfig(ppl_budget=10.0, int8_min_top1=0.0), DataConfig())
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report["git"] = commit()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"activation_aware-cpu-{stamp}.json").write_text(json.dumps(report, indent=1,
                                                                            default=str))
    d = report["device"]
    md = [f"# Activation-aware quantization: smollm2-135m, one thread\n",
          f"{d['cpu']} ({d['cpu_count']} cores, load {d['load_average_1m']}); git {report['git']}; "
          f"{report['eval']}; ratios against PyTorch FP32 in the same run.\n",
          ex.format_table(report["table"], ex.REPORT_COLUMNS), "",
          "Precision of the GPTQ variants' tensors:", ""]
    md += [f"- {r['model']}: {r['precision']}" for r in report["rows"] if r.get("precision")]
    md += ["", "Command: `OMP_NUM_THREADS=1 python benchmarks/bench_activation_aware.py"
           + "".join(" " + a for a in sys.argv[1:]) + "`"]
    (RESULTS / f"activation_aware-cpu-{stamp}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
