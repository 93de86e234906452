"""SmolLM2-135M through minitron.export with the activation-aware candidates side by side.

    OMP_NUM_THREADS=1 python benchmarks/bench_activation_aware.py [--int8-only | --int4-only] [--with-awq] [--rounds N]

One export (the export's own validation data, 8192 tokens; one thread) measuring int8=smoothquant
and the INT4 variants side by side against PyTorch FP32, with the perplexity gates relaxed so that
the report is written whatever the numbers. SmoothQuant: the export's candidates (FP32 down_proj
and lm_head, FP32 down_proj only, FP32 down_proj of the most sensitive quarter of the layers, all
INT8; export.SMOOTHQUANT_CANDIDATES). INT4: RTN and GPTQ with the LM head at 4 and at 8 bits
(one GPTQ pass for both), at accuracy level 0; `--with-awq` adds AWQ and AWQ + GPTQ (each head
width). `--int8-only` runs the SmoothQuant rows alone, `--int4-only` the INT4 rows alone:
on a shared, loaded 2-core box each GPTQ or AWQ pass and each measured variant costs minutes.
The export times each graph when it measures it, minutes after the PyTorch row: on a shared box
the load changes in between, so its speed ratios are not comparable. This script times again, back
to back: each round runs PyTorch FP32, then every ONNX graph the export made (the deployed one, FP32
and the other measured variants, kept for this), one thread each; a row's ratio is the median over
`--rounds` (default 5) of that round's ratio, and the table's speed columns are those medians (the
1-minute load average of each round is recorded beside them).
Copies the export's report to
benchmarks/results/activation_aware-cpu-<time>.json / .md (device, versions, git sha).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).parent))
from bench_data import commit  # noqa: E402


def keep_every_variant(export_module) -> dict[str, str]:
    """Make the export's `keep_deployed` leave the other variants' files in the folder (hard links
    taken before it removes them) so that they can be timed beside the deployed graph; returns the
    row name -> graph file map it fills."""
    original = export_module.keep_deployed
    kept: dict[str, str] = {}

    def keep(tmp, rows, deploy, fp32_file, keep_fp32):
        side = tmp / "kept"
        side.mkdir()
        for r in rows:
            kept[r["model"]] = export_module.DEPLOY_FILE if r["variant"] == deploy else r["variant"].file
            if r["variant"] != deploy:
                for f in export_module.onnx_files(tmp / r["variant"].file):
                    os.link(f, side / f.name)
        original(tmp, rows, deploy, fp32_file, keep_fp32=True)
        for f in side.iterdir():
            f.rename(tmp / f.name)
        side.rmdir()

    export_module.keep_deployed = keep
    return kept


def interleaved_speeds(folder: Path, files: dict[str, str], rounds: int) -> dict[str, dict]:
    """Per row (name -> graph file in `folder`; "pytorch-fp32" is the PyTorch model): median
    tokens/s and ms/token, and the medians of the per-round ratios against PyTorch FP32."""
    from minitron.measure import speed
    from minitron.models import load_model
    from minitron.onnx_lm import OnnxLM

    model, _ = load_model("smollm2-135m", dtype="float32")
    graphs = {name: OnnxLM(folder, f, threads=1) for name, f in files.items()}
    runs: dict[str, list[dict]] = {"pytorch-fp32": [], **{name: [] for name in graphs}}
    loads = []
    for _ in range(rounds):
        loads.append(round(os.getloadavg()[0], 2))
        with torch.no_grad():
            pt = speed(model.eval())
        runs["pytorch-fp32"].append(pt)
        for name, lm in graphs.items():
            runs[name].append(lm.speed())
    out = {}
    for name, rs in runs.items():
        pairs = list(zip(rs, runs["pytorch-fp32"]))
        out[name] = {"prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in rs),
                     "decode_ms_per_token": statistics.median(r["decode_ms_per_token"] for r in rs),
                     "prefill_x_rounds": [round(r["prefill_tokens_per_s"] / p["prefill_tokens_per_s"], 2)
                                          for r, p in pairs],
                     "decode_x_rounds": [round(p["decode_ms_per_token"] / r["decode_ms_per_token"], 2)
                                         for r, p in pairs],
                     "load_1m_rounds": loads}
    return out


def retime_(report: dict, folder: Path, files: dict[str, str], rounds: int) -> None:
    """Replace the report's speed numbers with interleaved ones (see the module docstring)."""
    from minitron import export as ex

    timed = interleaved_speeds(folder, {"onnx-fp32": ex.FP32_FILE, **files}, rounds)
    for r in report["rows"]:
        if r["model"] in timed:
            r.update(timed[r["model"]])
            r["speed"] = f"interleaved, median of {rounds} rounds"
    table = ex.table_rows(report["rows"])
    for t, r in zip(table, report["rows"]):
        if "prefill_x_rounds" in r:  # the ratio of medians above is not what was measured per round
            t["prefill_speedup"] = statistics.median(r["prefill_x_rounds"])
            t["decode_speedup"] = statistics.median(r["decode_x_rounds"])
    report["table"] = table


def main() -> None:
    from minitron import export as ex
    from minitron.common import format_table
    from minitron.config import DataConfig, ExportConfig

    torch.set_num_threads(1)
    args = sys.argv[1:]
    int4 = [ex.QuantVariant("rtn", bits=4, accuracy_level=0)]
    if "--with-awq" in args:
        int4 += [ex.QuantVariant("awq", bits=4, accuracy_level=0)]
        int4 += [ex.QuantVariant("awq_gptq", bits=4, accuracy_level=0, head_bits=h) for h in (4, 8)]
    int4 += [ex.QuantVariant("gptq", bits=4, accuracy_level=0, head_bits=h) for h in (4, 8)]
    int8 = [ex.QuantVariant("smoothquant", True, fp32_layers=f) for f in ex.SMOOTHQUANT_CANDIDATES]
    variants = int8 if "--int8-only" in args else int4 if "--int4-only" in args else int8 + int4
    ex.variants_to_measure = lambda settings: list(variants)  # these, and only these
    ex.deploy_candidates = lambda settings: list(variants)
    rounds = int(args[args.index("--rounds") + 1]) if "--rounds" in args else 5
    files = keep_every_variant(ex)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        report = ex.export("smollm2-135m", out, ExportConfig(ppl_budget=10.0, int8_min_top1=0.0,
                                                             keep_fp32=True), DataConfig())
        retime_(report, out, files, rounds)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report["git"] = commit()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"activation_aware-cpu-{stamp}.json").write_text(json.dumps(report, indent=1,
                                                                            default=str))
    d = report["device"]
    md = [f"# Activation-aware quantization: smollm2-135m, one thread\n",
          f"{d['cpu']} ({d['cpu_count']} cores, load {d['load_average_1m']}); git {report['git']}; "
          f"{report['eval']}; speeds timed back to back with PyTorch FP32, median of {rounds} "
          f"rounds (1-minute load average per round: {report['rows'][0]['load_1m_rounds']}); "
          "speed-ups are medians of the per-round ratios.\n",
          format_table(report["table"], ex.REPORT_COLUMNS), ""]
    precision = [f"- {r['model']}: {r['precision']}" for r in report["rows"] if r.get("precision")]
    md += ["Precision of the GPTQ variants' tensors:", "", *precision] if precision else []
    md += ["", "Command: `OMP_NUM_THREADS=1 python benchmarks/bench_activation_aware.py"
           + "".join(" " + a for a in sys.argv[1:]) + "`"]
    (RESULTS / f"activation_aware-cpu-{stamp}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
