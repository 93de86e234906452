"""Benchmark the teacher cache: the teacher compute saved when K short distillations (the candidates
of an architecture search, or reruns) read one cache instead of each running the teacher.

    python benchmarks/bench_teacher_cache.py                  # K=3 runs of 8 steps (~30 min on a busy 2-core box)
    python benchmarks/bench_teacher_cache.py --runs 5 --steps 48 --k 64

The CPU demo shapes: the embedded SmolLM2-135M as the teacher (fp32), the demo's pruned student
(recipes/demo.yaml: hidden 384, 6 heads, intermediate 1024; importance on a few calibration blocks),
the demo's distillation batch (4 x 128 tokens), the stdlib corpus. "online" runs `run_distill` with
--teacher K times (each run loads the teacher and runs it every step); "cached" builds the cache once
(`build_cache`, k = --k) and runs `run_distill` with distill.teacher_cache K times (no teacher
loaded). Both arms take the fused hidden-state form (vocabulary 49152) and the same tokens.

Correctness before the timings are kept: the first optimizer step's loss of the first cached run
against the first online run's (the same student, batch and seed; the cached loss is the KL over
the top-k + tail buckets, never above the full KL; the check asks for it within --margin below it,
relative).

Writes benchmarks/results/teacher_cache-cpu-<time>.json and a .md table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).parent))
from bench_data import commit  # noqa: E402
from bench_softmax_kl import versions  # noqa: E402

TEACHER = "smollm2-135m"
SHAPE = {"hidden_size": 384, "num_attention_heads": 6, "intermediate_size": 1024}  # demo.yaml
BATCH, BLOCK = 4, 128  # demo.yaml's distill.batch_size, distill.block_size


def make_student(root: Path) -> Path:
    """The demo's pruned shape, from importance on 16 calibration blocks (the demo uses 128)."""
    from minitron.config import ImportanceConfig
    from minitron.data import load_blocks
    from minitron.importance import compute_scores
    from minitron.models import load_model
    from minitron.prune import prune, save_pruned

    teacher, tok = load_model(TEACHER, dtype="float32", device="cpu")
    calib = load_blocks(tok, "calibration", 16, source="stdlib", block_size=BLOCK)
    scores = compute_scores(teacher, calib, batch_size=8,
                            config=ImportanceConfig(head_score="o_proj_contribution"))
    student = prune(teacher, scores, SHAPE)
    return save_pruned(student, tok, root / "student")


def distill_config(steps: int, cache: Path | None, seed: int):
    from minitron.config import DistillConfig

    return DistillConfig(tokens=steps * BATCH * BLOCK, batch_size=BATCH, block_size=BLOCK,
                         lr=3e-4, warmup_fraction=0.05, eval_every=10**6, eval_blocks=2,
                         eval_batch_size=2, checkpoint_every=10**6, keep_checkpoint=False,
                         progress=False, seed=seed, teacher_cache=str(cache) if cache else None)


def one_run(student: Path, out: Path, steps: int, cache: Path | None) -> dict:
    """One distillation through `run_distill` (as the command runs it); its wall time and the
    loop's own training time (optimizer steps only; the step-0 and final evaluations excluded)."""
    from minitron.config import DataConfig, ModelConfig
    from minitron.distill import run_distill

    t0 = time.perf_counter()
    m = run_distill(None if cache else TEACHER, student, out, distill_config(steps, cache, 0),
                    data=DataConfig(source="stdlib"), model=ModelConfig(device="cpu"))
    wall = time.perf_counter() - t0
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "train"]
    return {"wall_s": wall, "train_s": m["train_time_s"],
            "train_tokens_per_s": m["train_tokens_per_s"], "first_loss": losses[0],
            "last_loss": losses[-1], "eval_loss": m.get("eval_loss")}


def build(cache: Path, steps: int, k: int) -> dict:
    from minitron.config import CacheConfig, DataConfig, ModelConfig
    from minitron.teacher_cache import build_cache

    t0 = time.perf_counter()
    m = build_cache(TEACHER, cache, CacheConfig(k=k, tokens=steps * BATCH * BLOCK, block_size=BLOCK,
                                                batch_size=BATCH, progress=False),
                    data=DataConfig(source="stdlib"), model=ModelConfig(device="cpu"))
    size = sum(p.stat().st_size for p in cache.rglob("*.bin"))
    return {"wall_s": time.perf_counter() - t0, "teacher_s": m["stats"]["seconds"],
            "tokens": m["tokens"], "tokens_per_s": m["stats"]["tokens_per_s"],
            "size_mb": size / 2**20, "bytes_per_token": size / m["tokens"]}


def markdown(meta: dict, res: dict) -> str:
    o, c, b = res["online"], res["cached"], res["build"]
    k_runs = meta["runs"]
    lines = [f"# Teacher cache: K short distillations with and without it ({meta['device_name']})",
             "", f"git {meta['git_sha']}, {meta['timestamp']}; teacher {TEACHER} (fp32), student "
             f"hidden 384 / 6 heads / MLP 1024 (demo shape), {meta['steps']} optimizer steps of "
             f"{BATCH} x {BLOCK} tokens per run, K = {k_runs}, cache k = {meta['k']} "
             f"(fp16 log-probs), {meta['threads']} torch threads.", "",
             "| arm | teacher passes over the tokens | cache build s | train s per run (mean) | "
             "student tokens/s in training (mean) | wall s per run (mean) | total wall s (K runs "
             "+ build) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, arm, passes, build_s in (("online", o, k_runs, None), ("cached", c, 1, b["wall_s"])):
        lines.append(f"| {name} | {passes} | {'-' if build_s is None else f'{build_s:.1f}'} | "
                     f"{arm['mean_train_s']:.1f} | {arm['mean_tokens_per_s']:.0f} | "
                     f"{arm['mean_wall_s']:.1f} | {arm['total_s']:.1f} |")
    lines += ["", f"Speedup of the cached arm: training {res['train_speedup']:.2f}x per run "
              f"(student tokens/s), total {res['total_speedup']:.2f}x for K = {k_runs} (build "
              f"included). Cache: {b['tokens']} tokens, {b['size_mb']:.1f} MiB "
              f"({b['bytes_per_token']:.0f} bytes/token), built at {b['tokens_per_s']:.0f} "
              f"tokens/s.", "",
              f"Correctness (before timing): first-step loss cached {res['check']['cached']:.4f} "
              f"vs online {res['check']['online']:.4f} (relative gap {res['check']['gap']:.4f}, "
              f"margin {res['check']['margin']}).", "", meta["note"], ""]
    return "\n".join(lines)


def summarize(runs: list[dict], extra_s: float = 0.0) -> dict:
    n = len(runs)
    return {"runs": runs, "mean_train_s": sum(r["train_s"] for r in runs) / n,
            "mean_tokens_per_s": sum(r["train_tokens_per_s"] for r in runs) / n,
            "mean_wall_s": sum(r["wall_s"] for r in runs) / n,
            "total_s": sum(r["wall_s"] for r in runs) + extra_s}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="K: distillations per arm")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per distillation")
    ap.add_argument("--k", type=int, default=64, help="teacher tokens kept per position")
    ap.add_argument("--margin", type=float, default=0.10,
                    help="largest relative gap of the first-step losses (cached below online); "
                         "the freshly pruned student is far from the teacher, so the KL inside the "
                         "tail bucket that k = 64 drops is largest at the first step")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # CPU: the torch paths, as in production
    import torch

    torch.set_num_threads(args.threads)
    stamp, sha = datetime.now(timezone.utc), commit()
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        root = Path(tmp)
        student = make_student(root)
        b = build(root / "cache", args.steps, args.k)
        print(json.dumps({"build": b}), file=sys.stderr)
        online, cached = [], []
        # Interleaved, so that the load of the shared machine falls on both arms alike.
        for i in range(args.runs):
            online.append(one_run(student, root / f"online-{i}", args.steps, None))
            cached.append(one_run(student, root / f"cached-{i}", args.steps, root / "cache"))
            print(json.dumps({"online": online[-1], "cached": cached[-1]}), file=sys.stderr)
            if i == 0:
                a, c = online[0]["first_loss"], cached[0]["first_loss"]
                gap = (a - c) / a
                check = {"online": a, "cached": c, "gap": gap, "margin": args.margin}
                if not -1e-4 <= gap <= args.margin:
                    raise SystemExit(f"cached first-step loss {c} is not within {args.margin} "
                                     f"below the online {a}: not timing")
    res = {"build": b, "online": summarize(online), "cached": summarize(cached, b["wall_s"]),
           "check": check}
    res["train_speedup"] = res["cached"]["mean_tokens_per_s"] / res["online"]["mean_tokens_per_s"]
    res["total_speedup"] = res["online"]["total_s"] / res["cached"]["total_s"]
    meta = dict(device="cpu", device_name=f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
                versions=versions(), git_sha=sha, timestamp=stamp.isoformat(timespec="seconds"),
                runs=args.runs, steps=args.steps, k=args.k, threads=args.threads,
                batch=BATCH, block=BLOCK, command=" ".join(["python", *sys.argv]),
                note="Train s counts optimizer steps only (teacher forward included for the online "
                     "arm); wall s adds loading models and data and the step-0 and final "
                     "evaluations (with a teacher those also score KL to it). The machine is "
                     "shared with other jobs: compare the arms within this run, not across runs.")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"teacher_cache-cpu-{stamp.strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, results=res), indent=1) + "\n")
    table = markdown(meta, res)
    stem.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
