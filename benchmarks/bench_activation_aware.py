"""SmolLM2-135M through minitron.export with the activation-aware candidates side by side.

    OMP_NUM_THREADS=1 python benchmarks/bench_activation_aware.py   # ~12 min on a 2-core box
    OMP_NUM_THREADS=1 python benchmarks/bench_activation_aware.py --int8-only   # the deployed W8A8 row

One export (the export's own validation data, 8192 tokens; one thread) measuring int8=smoothquant
(FP32 down_proj and lm_head; without --int8-only also FP32 down_proj only, and all INT8) and
int4=awq at accuracy levels 0 and 4 against PyTorch FP32, with the perplexity gates relaxed so
that the report is written whatever the numbers. Copies the export's report to
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
    variants = [ex.QuantVariant("smoothquant", True, fp32_layers=ex.SMOOTHQUANT_FP32)]
    if "--int8-only" not in sys.argv[1:]:
        variants += [ex.QuantVariant("smoothquant", True, fp32_layers=("down_proj",)),
                     ex.QuantVariant("smoothquant", True),
                     ex.QuantVariant("awq", bits=4, accuracy_level=0),
                     ex.QuantVariant("awq", bits=4, accuracy_level=4)]
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
          "Command: `OMP_NUM_THREADS=1 python benchmarks/bench_activation_aware.py"
          + "".join(" " + a for a in sys.argv[1:]) + "`"]
    (RESULTS / f"activation_aware-cpu-{stamp}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
