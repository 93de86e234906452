"""The memory plan of the large recipes against PyTorch's FSDP2 memory tracker, at full depth.

    python benchmarks/memory_plan_check.py                    # the three large recipes, full depth
    python benchmarks/memory_plan_check.py --depth-divisor 8  # the depth tests/test_memory_plan.py uses
    python benchmarks/memory_plan_check.py --gloo-check 1 2 4 8  # fake vs real, small width only

For each recipe: the dry run's per-GPU training-step peak (`minitron.memory_plan.plan_distill`, the
teacher included) and the tracker's peak of one simulated rank of `nproc_per_node` (fake process
group, fake tensors, real widths; see tests/fsdp_tracker.py), with the tracker's categories at its
peak. Minutes on 2 CPU cores (one full-depth simulation takes 30-90 s).

`--gloo-check LAYERS...` checks the reference itself instead: the same tracked step at a small
width (hidden 256, vocabulary 4096, 512 tokens per rank), once on fake tensors with a fake 2-rank
process group and once on real tensors in 2 gloo processes, with and without the teacher
registered; it prints both totals and where their categories differ.

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


SMALL = dict(model_type="llama", hidden_size=256, intermediate_size=1024, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=4096, tie_word_embeddings=False,
             max_position_embeddings=512)


def _small(layers: int):
    from minitron.config import DistillConfig

    teacher = {**SMALL, "num_hidden_layers": layers}
    student = {**teacher, "hidden_size": 192, "intermediate_size": 768}
    return teacher, student, DistillConfig(batch_size=2, block_size=512, gradient_checkpointing=True)


def _gloo_rank(rank: int, port: int, layers: int, register: bool, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        teacher, student, config = _small(layers)
        snap = tracked_step_peak(teacher, student, config, 2, register_teacher=register, fake=False)
        if rank == 0:
            results.put(snap)
    finally:
        dist.destroy_process_group()


def gloo_check(depths: list[int]) -> None:
    import socket

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    for register in (True, False):
        for layers in depths:
            fake = tracked_step_peak(*_small(layers), 2, register_teacher=register)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            results = ctx.Queue()
            procs = [ctx.Process(target=_gloo_rank, args=(r, port, layers, register, results))
                     for r in range(2)]
            for p in procs:
                p.start()
            real = results.get(timeout=600)
            for p in procs:
                p.join()
            diff = {k: round((real.get(k, 0) - fake.get(k, 0)) / 2**20, 2)
                    for k in sorted(set(fake) | set(real)) if real.get(k, 0) != fake.get(k, 0)}
            print(f"teacher registered={register} layers={layers}: fake {fake['Total'] / 2**20:.2f} "
                  f"MiB, real gloo {real['Total'] / 2**20:.2f} MiB"
                  + (f"; real - fake by category (MiB): {diff}" if diff else ""))


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
    ap.add_argument("--gloo-check", type=int, nargs="+", metavar="LAYERS",
                    help="only cross-check the fake run against 2 real gloo processes at these depths")
    args = ap.parse_args(argv)
    if args.gloo_check:
        return gloo_check(args.gloo_check)

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
