"""The memory plan of the large recipes against PyTorch's FSDP2 memory tracker, at full depth.

    python benchmarks/memory_plan_check.py                    # the three large recipes, full depth
    python benchmarks/memory_plan_check.py --depth-divisor 8  # the depth tests/test_memory_plan.py uses

For each recipe: the dry run's per-GPU training-step peak (`minitron.memory_plan.plan_distill`, the
teacher included) and the tracker's peak of one simulated rank of `nproc_per_node` (fake process
group, fake tensors, real widths; see tests/fsdp_tracker.py), with the tracker's categories at its
peak. Minutes on 2 CPU cores (one full-depth simulation takes 30-90 s).

Writes benchmarks/results/memory_plan-tracker-cpu-<time>.json and a .md table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
if "TRITON_INTERPRET" not in os.environ:  # before minitron.kernels is imported (no GPU here)
    os.environ["TRITON_INTERPRET"] = "1"
from bench_data import commit  # noqa: E402
from bench_softmax_kl import versions  # noqa: E402
from fsdp_tracker import GIB, recipe_configs, tracked_step_peak  # noqa: E402

RECIPES = ["llama-3.1-8b-to-4b-width", "llama-3.1-8b-to-4b-depth", "mistral-nemo-12b-to-8b"]
# The tracker's categories, in the order the table shows them.
CATEGORIES = ["Inputs", "Sharded Param", "Sharded Grad", "OptState", "Unsharded Param", "All Gather",
              "Reduce Scatter", "Activation", "Temp"]


def measure(name: str, depth_divisor: int) -> dict:
    from minitron.memory_plan import plan_distill

    teacher, student, recipe = recipe_configs(str(ROOT / "recipes" / f"{name}.yaml"), depth_divisor)
    world = recipe.distill.nproc_per_node
    plan = plan_distill(teacher, student, recipe.distill, world, recipe.model.dtype, "fsdp")
    t0 = time.perf_counter()
    snap = tracked_step_peak(teacher, student, recipe.distill, world)
    return {"recipe": name, "world": world, "teacher_layers": teacher["num_hidden_layers"],
            "student_layers": student["num_hidden_layers"], "simulate_s": time.perf_counter() - t0,
            "plan_gib": plan.phases["train step"] / GIB, "tracker_gib": snap["Total"] / GIB,
            "plan_terms_gib": {k: v / GIB for k, v in plan.terms.items()},
            "tracker_gib_by_category": {k: v / GIB for k, v in snap.items() if k != "Total"}}


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"Plan vs FSDP2 memory tracker (training step, per GPU, GiB); torch "
             f"{meta['versions']['torch']}, git {meta['git_sha']}, {meta['timestamp']}", "",
             "| recipe | layers (teacher/student) | plan | tracker | plan / tracker | "
             + " | ".join(f"tracker: {c}" for c in CATEGORIES) + " |",
             "|---|---|---|---|---|" + "---|" * len(CATEGORIES)]
    for r in rows:
        cats = r["tracker_gib_by_category"]
        lines.append(f"| {r['recipe']} | {r['teacher_layers']}/{r['student_layers']} | "
                     f"{r['plan_gib']:.2f} | {r['tracker_gib']:.2f} | "
                     f"{r['plan_gib'] / r['tracker_gib']:.3f} | "
                     + " | ".join(f"{cats.get(c, 0.0):.2f}" for c in CATEGORIES) + " |")
    return "\n".join(lines + ["", meta["note"], ""])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--depth-divisor", type=int, default=1,
                    help="simulate (and plan) depth // this many layers (1: the recipe's depth)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    stamp, sha = datetime.now(timezone.utc), commit()
    rows = []
    for name in args.recipes:
        rows.append(measure(name, args.depth_divisor))
        print(json.dumps({k: v for k, v in rows[-1].items() if not isinstance(v, dict)}),
              file=sys.stderr)
    meta = dict(device="cpu", device_name=f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
                versions=versions(), git_sha=sha, timestamp=stamp.isoformat(timespec="seconds"),
                depth_divisor=args.depth_divisor,
                note=("Tracker: torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker on rank 0 "
                      "of a fake process group, fake tensors, the recipe's widths and batch, "
                      "minitron's own trainee, wrapping, autocast and fused loss (Triton launches "
                      "no-ops), the second step's forward/backward peak. The teacher's weights are "
                      "registered with it (category Inputs); the plan's 'train step' phase includes "
                      "them too."))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"memory_plan-tracker-cpu-{stamp.strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, results=rows), indent=1) + "\n")
    table = markdown(meta, rows)
    stem.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
