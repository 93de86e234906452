"""The compression sweep: one recipe's student at several parameter budgets x deployment formats,
every point measured the same way, and the Pareto frontier of quality against size and latency.

`python -m minitron.sweep RECIPE [section.key=value ...]`

One importance pass (and, with sweep.teacher_cache, one teacher cache) serves every budget. Each
budget's student is pruned from those scores by the budget rule (prune.target_params's), distilled
on the same tokens and evaluated against the teacher (KL, top-1, perplexity, tasks). With
sweep.iterative the budgets run in turn instead, largest first: each student is pruned from the one
before it once distilled (scored again), on the next tokens of the stream (`schedule`). Each format is
one export of it, whose report measures the artifact in its runtime against PyTorch FP32 (held-out
perplexity, top-1, size, prefill and decode speed); the teacher is measured once on the same held-
out blocks. Every stage is recorded as `minitron.run` records its stages (stage.json with a
fingerprint), so a rerun skips what finished and redoes what was interrupted.

Folder <output_dir>/<name>/: shared/ (data, importance, teacher, teacher cache), one budget-<b>/
per budget (iterative: its importance, then prune, distill, evaluate, and export-<format>/onnx/ per
format, each a deployable folder), then sweep.json, sweep.md and the frontier plots.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from minitron.common import (MinitronError, StageTimer, format_table, run_cli,
                             write_json_atomic, write_text_atomic)
from minitron.config import export_for_format
from minitron.pipeline import (Context, _data_stage, _distill_stage, _export_stage, _settings,
                               check_plan, run_stage, source_config)
from minitron.recipe import Recipe, dump_recipe, fingerprint, load_recipe

SCORES = "scores.safetensors"
STATS = "calibration.safetensors"
QUALITY = "perplexity"  # of each artifact on the export's held-out blocks; lower is better
# The cost axes of the frontiers (lower is better): the artifact's size, and prefill latency.
COSTS = {"size": "size_mb", "prefill": "prefill_ms_per_token"}
COLUMNS = ["point", "parameters", "distill_tokens", "size_mb", "perplexity", "ppl_x_teacher", "top1_vs_fp32",
           "kl_to_teacher", "top1_agreement", "prefill_tok_s", "decode_ms_tok", "prefill_x_teacher",
           "decode_x_teacher", "frontier"]


# ----------------------------------------------------------------------------- the Pareto frontier
def dominates(a: dict[str, Any], b: dict[str, Any], keys: Sequence[str]) -> bool:
    """`a` is no worse than `b` on every key and better on one (all keys: lower is better)."""
    return all(a[k] <= b[k] for k in keys) and any(a[k] < b[k] for k in keys)


def frontier(points: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """The non-dominated points among those measured on every key (a point without a speed, e.g.
    a GGUF file, is on no latency frontier), in their input order."""
    measured = [p for p in points if all(isinstance(p.get(k), (int, float)) and math.isfinite(p[k])
                                         for k in keys)]
    return [p for p in measured if not any(dominates(q, p, keys) for q in measured)]


# ----------------------------------------------------------------------------- checks and plan
def check_sweep(recipe: Recipe) -> None:
    """Refuse, before any work, a recipe the sweep cannot run as asked."""
    r = recipe
    given = {**r.prune.target(), **({"target_params": r.prune.target_params}
                                    if r.prune.target_params is not None else {})}
    problems = [
        (not r.prune.enabled, "prune.enabled=false: the sweep prunes the model to each of "
                              "sweep.budgets; set prune.enabled=true"),
        (bool(r.prune.target()) or r.prune.target_params is not None,
         f"{', '.join(f'prune.{k}={v}' for k, v in given.items())}: the sweep prunes to each of "
         f"sweep.budgets={list(r.sweep.budgets)} by the budget rule; remove "
         f"{'it' if len(given) == 1 else 'them'} from the prune section"),
        (r.search.candidates > 0, f"search.candidates={r.search.candidates}: the sweep shapes each "
                                  f"budget by the budget rule; set search.candidates=0"),
        (not r.export.enabled, "export.enabled=false: each of sweep.formats is an export; set "
                               "export.enabled=true"),
        (r.distill.nnodes > 1, f"distill.nnodes={r.distill.nnodes}: the sweep runs on one node"),
        (r.sweep.teacher_cache and r.distill.teacher_cache is not None,
         f"sweep.teacher_cache=true builds the cache that distill.teacher_cache="
         f"{r.distill.teacher_cache!r} already names: drop one of them"),
        (r.sweep.iterative and len(r.sweep.budgets) < 2,
         f"sweep.iterative=true prunes from one budget to the next, but sweep.budgets="
         f"{list(r.sweep.budgets)} has one: give two or more, or set sweep.iterative=false"),
        (r.sweep.iterative and not r.distill.enabled,
         "sweep.iterative=true distills each student before pruning it again; set "
         "distill.enabled=true"),
    ]
    for bad, message in problems:
        if bad:
            raise MinitronError(message)


@dataclasses.dataclass(frozen=True)
class Step:
    """One budget of the sweep: its pruning target, and what its student is pruned from."""

    budget: float
    target: dict[str, int]  # the pruner's target (HF config names)
    candidates: list[dict[str, Any]]  # what the budget rule considered
    parent: float | None = None  # iterative: the budget whose distilled student it is cut from
    skip_tokens: int = 0  # distill.skip_tokens: the tokens the steps before it trained on


def schedule(recipe: Recipe, config) -> list[Step]:
    """The budgets in the order the sweep runs them, each with its target.

    One shot: each budget is pruned from the source by the budget rule. Iterative: largest first,
    each from the previous one's distilled student, on the next distill.tokens. The shapes are
    planned smallest first, each larger one with the next smaller as its floor, so every step only
    removes and the last one lands on the one-shot shape of its budget (a fair comparison).
    """
    from minitron.prune import budget_limit, target_for_budget

    s, d, multiple = recipe.sweep, recipe.distill, recipe.prune.width_multiple
    if not s.iterative:
        return [Step(b, *target_for_budget(config, b, multiple), skip_tokens=d.skip_tokens)
                for b in s.budgets]
    planned, floor = [], None
    for b in sorted(s.budgets, key=lambda b: budget_limit(config, b)):
        target, candidates = target_for_budget(config, b, multiple, floor)
        planned.insert(0, (b, target, candidates))
        floor = target
    return [Step(b, t, c, planned[i - 1][0] if i else None, d.skip_tokens + i * d.train_tokens)
            for i, (b, t, c) in enumerate(planned)]


def budget_recipe(recipe: Recipe, step: Step, cache_dir: str | None) -> Recipe:
    """The recipe of one budget's student (and the shared teacher cache, if there is one)."""
    prune = dataclasses.replace(recipe.prune, target_params=step.budget)
    distill = dataclasses.replace(recipe.distill, skip_tokens=step.skip_tokens)
    if cache_dir is not None:
        distill = dataclasses.replace(distill, teacher_cache=cache_dir)
    return dataclasses.replace(recipe, prune=prune, distill=distill)


def budget_label(budget: float) -> str:
    return f"budget-{budget:g}"


def cache_settings(recipe: Recipe):
    """The shared teacher cache: the distillation's train tokens (every step's, iterative), blocks
    and order."""
    d = recipe.distill
    steps = len(recipe.sweep.budgets) if recipe.sweep.iterative else 1
    last = dataclasses.replace(d, skip_tokens=d.skip_tokens + (steps - 1) * d.train_tokens)
    return dataclasses.replace(recipe.teacher_cache, split="train",
                               tokens=last.blocks_read * d.block_size, block_size=d.block_size,
                               seed=d.seed)


# ----------------------------------------------------------------------------- shared stages
def _importance_stage(ctx: Context, out: Path, timer: StageTimer) -> dict[str, Any]:
    """The importance scores and calibration statistics (minitron.calibration: what the
    activation-aware export formats read) of `ctx.teacher`: the source, in one pass for every
    budget (iterative: also each distilled student that the next budget is cut from)."""
    from minitron import calibration
    from minitron.importance import compute_scores, save_scores
    from minitron.models import load_model, resolve_device
    from minitron.prune import calibration_blocks

    r = ctx.recipe
    model, tokenizer = load_model(ctx.teacher, dtype=r.model.dtype,
                                  device=resolve_device(r.model.device),
                                  trust_remote_code=r.model.trust_remote_code)
    blocks = calibration_blocks(tokenizer, ctx.data, model.config)
    collector = calibration.Collector()
    scores = compute_scores(model, blocks, config=r.importance, progress=True, collector=collector)
    timer.tokens = blocks.numel()
    save_scores(scores, out / SCORES)
    calibration.save(collector.stats, out / STATS)
    return {"scores": str(out / SCORES), "stats": str(out / STATS), "calibration_blocks": len(blocks)}


def _teacher_stage(ctx: Context, out: Path, timer: StageTimer) -> dict[str, Any]:
    """The teacher, measured once: in PyTorch FP32 on the export's held-out blocks as every
    export measures its student (the reference of the perplexity ratio and the speed-ups), and by
    evaluate on its blocks and tasks (the students' evaluation is comparable to it)."""
    from minitron.evaluate import evaluate
    from minitron.export import check_model, load_job, measure_pytorch

    r = ctx.recipe
    where, config = check_model(ctx.teacher, r.model.trust_remote_code)
    job = load_job(ctx.teacher, where, config, r.export, ctx.data, r.model.trust_remote_code)
    row = measure_pytorch(job)
    del job
    result = {"pytorch_fp32": {k: v for k, v in row.items() if k != "greedy_tokens"}}
    if r.evaluate.enabled:
        settings = dataclasses.replace(r.evaluate, speed=False)  # the row above has its speed
        evaluation = evaluate(ctx.teacher, None, settings, ctx.data, r.model)
        timer.tokens = evaluation["tokens"]
        result["evaluate"] = {k: v for k, v in evaluation.items() if k != "timing"}
    return result


def _cache_stage(ctx: Context, out: Path, timer: StageTimer) -> dict[str, Any]:
    from minitron.teacher_cache import build_cache

    settings = cache_settings(ctx.recipe)
    manifest = build_cache(ctx.teacher, out / "cache", settings, data=ctx.data, model=ctx.recipe.model)
    timer.tokens = manifest["tokens"]
    return {"cache_dir": str(out / "cache"), "tokens": manifest["tokens"]}


# ----------------------------------------------------------------------------- per-budget stages
def _prune_stage(ctx: Context, out: Path, timer: StageTimer, step: Step, source: str,
                 importance: dict[str, Any]) -> dict[str, Any]:
    """The budget's student: `source` (the teacher, or iterative the previous budget's distilled
    student) pruned to the step's target by its scores (the statistics follow the kept channels
    into its folder, as minitron.run's prune stage leaves them)."""
    from minitron import calibration
    from minitron.importance import load_scores
    from minitron.models import count_params, load_model, resolve_device
    from minitron.prune import prune, save_pruned

    r = ctx.recipe
    model, tokenizer = load_model(source, dtype=r.model.dtype,
                                  device=resolve_device(r.model.device),
                                  trust_remote_code=r.model.trust_remote_code)
    scores = load_scores(importance["scores"])
    scores.check_matches(model.config)
    pruned = prune(model, scores, step.target, depth=r.prune.depth,
                   stats=calibration.load(importance["stats"]))
    info = {"recipe": r.source_file, "target_params": r.prune.target_params,
            "pruned_from": source, "scores_from": importance["scores"],
            "candidates": step.candidates}
    save_pruned(pruned, tokenizer, out / "model", info)
    return {"model_dir": str(out / "model"), "parameters": count_params(pruned),
            "shape": {k: getattr(pruned.config, k) for k in step.target}}


def _evaluate_stage(ctx: Context, out: Path, timer: StageTimer) -> dict[str, Any]:
    """The budget's student (PyTorch, before any format) against the teacher: KL, top-1,
    perplexity and tasks on evaluate's blocks; the export measures its speed."""
    from minitron.evaluate import evaluate

    r = ctx.recipe
    result = evaluate(ctx.student, ctx.teacher, dataclasses.replace(r.evaluate, speed=False),
                      ctx.data, r.model)
    timer.tokens = result["tokens"]
    return {k: v for k, v in result.items() if k != "timing"}


# ----------------------------------------------------------------------------- points
def format_row(report: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The export report's row of the artifact that format `fmt` deploys."""
    rows = report["rows"]
    if fmt == "fp32":
        name = "onnx-fp32"
    elif fmt.startswith("gguf-"):
        name = fmt
    else:
        name = next(r["model"] for r in rows if r.get("deployed") and r["model"] != "onnx-fp32")
    return next(r for r in rows if r["model"] == name)


def artifact_path(export_dir: str, fmt: str) -> str:
    """What a user deploys: the ONNX Runtime GenAI folder, or the GGUF file."""
    if fmt.startswith("gguf-"):
        return str(Path(export_dir) / f"model-{fmt[5:]}.gguf")
    return export_dir


def point_record(step: Step, fmt: str, student: dict[str, Any], distill_tokens: int,
                 export: dict[str, Any], evaluation: dict[str, Any] | None,
                 teacher: dict[str, Any]) -> dict[str, Any]:
    """One point, from the numbers its stages recorded (nothing is measured here)."""
    row, ref = format_row(export["report"], fmt), teacher["pytorch_fp32"]
    point = {"point": f"{step.budget:g}/{fmt}", "budget": step.budget, "format": fmt,
             "parameters": student["parameters"], "shape": student["shape"],
             "pruned_from": "source" if step.parent is None else budget_label(step.parent),
             "distill_tokens": distill_tokens, "artifact": artifact_path(export["onnx_dir"], fmt),
             "export_row": row["model"], "size_mb": row["size_mb"], "perplexity": row["perplexity"],
             "ppl_x_teacher": row["perplexity"] / ref["perplexity"],
             "top1_vs_fp32": row.get("top1_vs_fp32"),
             # The export's gates (export.ppl_budget, int8_min_top1) against the student's FP32:
             # the sweep writes every format (export_for_format) and records the verdict.
             "within_budget": row.get("within_budget")}
    if "prefill_tokens_per_s" in row:
        point.update(prefill_tokens_per_s=row["prefill_tokens_per_s"],
                     prefill_ms_per_token=1000 / row["prefill_tokens_per_s"],
                     decode_ms_per_token=row["decode_ms_per_token"])
        if "prefill_tokens_per_s" in ref:
            point.update(prefill_x_teacher=row["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"],
                         decode_x_teacher=ref["decode_ms_per_token"] / row["decode_ms_per_token"])
    if evaluation is not None:
        point.update({k: evaluation[k] for k in ("kl_to_teacher", "top1_agreement")
                      if k in evaluation})
        point["student_perplexity_evaluate"] = evaluation.get("perplexity")
        if evaluation.get("tasks"):
            point["tasks"] = evaluation["tasks"]
    return point


# ----------------------------------------------------------------------------- running
@dataclasses.dataclass
class Sweep:
    """Where the sweep stands: its folder, the shared stages' results, every stage's timing."""

    recipe: Recipe
    folder: Path
    teacher: str
    shared: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    timings: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Iterative: each budget's distilled student (fingerprint, folder, tokens it has trained on).
    students: dict[float, tuple[str, str, int]] = dataclasses.field(default_factory=dict)

    def stage(self, label: str, out: Path, fp: str,
              work: Callable[[Path, StageTimer], dict[str, Any]]) -> dict[str, Any]:
        result, timing = run_stage(label, out, fp, work)
        self.timings.append({**timing, "stage": label})
        return result


def run_shared(sw: Sweep) -> str:
    """The stages every budget reads (data, importance, teacher, teacher cache) into shared/;
    returns the fingerprint the budgets' stages chain on."""
    from minitron.shards import is_prepared

    r, shared = sw.recipe, sw.folder / "shared"
    ctx = Context(r, shared, sw.teacher, sw.shared)
    upstream = fingerprint(r.model)
    if not is_prepared(r.data.source):
        upstream = fingerprint(upstream, *_settings(r, "data"))
        sw.shared["data"] = sw.stage("data", shared / "0-data", upstream,
                                     lambda o, t: _data_stage(ctx, o, t))
    # What the importance pass reads: the prune stage's settings but the shape and budget.
    imp_fp = fingerprint(upstream, *[s for s in _settings(r, "prune") if s is not r.prune])
    sw.shared["importance"] = sw.stage("importance", shared / "1-importance", imp_fp,
                                       lambda o, t: _importance_stage(ctx, o, t))
    teacher_fp = fingerprint(upstream, r.model, *_settings(r, "export"), *_settings(r, "evaluate"))
    sw.shared["teacher"] = sw.stage("teacher", shared / "2-teacher", teacher_fp,
                                    lambda o, t: _teacher_stage(ctx, o, t))
    if r.sweep.teacher_cache and r.distill.enabled:
        cache_fp = fingerprint(upstream, r.model, cache_settings(r))
        sw.shared["cache"] = sw.stage("teacher_cache", shared / "3-teacher-cache", cache_fp,
                                      lambda o, t: _cache_stage(ctx, o, t))
        imp_fp = fingerprint(imp_fp, cache_fp)
    return imp_fp


def run_budget(sw: Sweep, step: Step, upstream: str) -> list[dict[str, Any]]:
    """One budget's student (iterative: scored again, from the previous budget's; then prune,
    distill, evaluate) and one export per format: its points."""
    cache = sw.shared.get("cache", {}).get("cache_dir")
    r = budget_recipe(sw.recipe, step, cache)
    folder, label = sw.folder / budget_label(step.budget), budget_label(step.budget)
    ctx = Context(r, folder, sw.teacher, {k: v for k, v in sw.shared.items() if k == "data"})
    source, importance, tokens_before = sw.teacher, sw.shared["importance"], 0
    fp = fingerprint(upstream, r.prune)
    if step.parent is not None:  # the previous budget's distilled student, scored again
        parent_fp, source, tokens_before = sw.students[step.parent]
        scored = dataclasses.replace(ctx, teacher=source)
        imp_fp = fingerprint(parent_fp, *[s for s in _settings(r, "prune") if s is not r.prune])
        importance = sw.stage(f"{label}/importance", folder / "0-importance", imp_fp,
                              lambda o, t: _importance_stage(scored, o, t))
        fp = fingerprint(imp_fp, r.prune, step.target)
    ctx.outputs["prune"] = sw.stage(
        f"{label}/prune", folder / "1-prune", fp,
        lambda o, t: _prune_stage(ctx, o, t, step, source, importance))
    student, tokens = ctx.outputs["prune"], tokens_before
    if r.distill.enabled:
        fp = fingerprint(fp, *_settings(r, "distill"))
        ctx.outputs["distill"] = sw.stage(f"{label}/distill", folder / "2-distill", fp,
                                          lambda o, t: _distill_stage(ctx, o, t))
        tokens += ctx.outputs["distill"].get("train_tokens", 0)
    sw.students[step.budget] = (fp, ctx.student, tokens)
    evaluation = None
    if r.evaluate.enabled:
        evaluation = sw.stage(f"{label}/evaluate", folder / "3-evaluate",
                              fingerprint(fp, *_settings(r, "evaluate")),
                              lambda o, t: _evaluate_stage(ctx, o, t))
    points = []
    for fmt in r.sweep.formats:
        rf = dataclasses.replace(r, export=export_for_format(r.export, fmt))
        ctx_f = dataclasses.replace(ctx, recipe=rf)
        export = sw.stage(f"{label}/export-{fmt}", folder / f"export-{fmt}",
                          fingerprint(fp, *_settings(rf, "export")),
                          lambda o, t: _export_stage(ctx_f, o, t))
        points.append(point_record(step, fmt, student, tokens, export, evaluation,
                                   sw.shared["teacher"]))
    return points


def check(recipe: Recipe, config) -> list[Step]:
    """Refuse a sweep that cannot run, before any work; returns its schedule."""
    from minitron.prune import plan

    check_sweep(recipe)
    steps = schedule(recipe, config)
    for step in steps:  # every budget's shape must exist before any work
        check_plan(budget_recipe(recipe, step, None), config)
        plan(config, step.target)
    return steps


def dry_run(recipe: Recipe) -> list[dict[str, Any]]:
    """Validate and print each budget's shape and parameter count, and the points; no weights."""
    from minitron.models import param_count_from_config
    from minitron.prune import plan

    config = source_config(recipe, need_weights=False)
    steps = check(recipe, config)
    before = param_count_from_config(config)
    d, rows = recipe.distill, []
    for step in steps:
        shape = plan(config, step.target)
        params = param_count_from_config({**config.to_dict(), **shape})
        rows.append({"budget": step.budget, **shape, "parameters": params,
                     "of_source": round(params / before, 3),
                     "pruned_from": "source" if step.parent is None else f"{step.parent:g}",
                     "distill_tokens": (step.skip_tokens - d.skip_tokens + d.train_tokens
                                        if d.enabled else 0)})
    print(format_table(rows))
    print(f"{len(rows)} budgets x {len(recipe.sweep.formats)} formats "
          f"({', '.join(recipe.sweep.formats)}): {len(rows)} distillations, "
          f"{len(rows) * len(recipe.sweep.formats)} exports, in {recipe.run_dir}")
    return rows


def sweep(recipe: Recipe) -> dict[str, Any]:
    """Run (or resume) the sweep of `recipe`; returns what sweep.json holds."""
    from minitron.models import resolve_model

    steps = check(recipe, source_config(recipe))
    folder = recipe.run_dir
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "recipe.yaml", dump_recipe(recipe))
    sw = Sweep(recipe, folder, resolve_model(recipe.model.name, recipe.model.trust_remote_code))
    t0 = time.perf_counter()
    upstream = run_shared(sw)
    points = [p for step in steps for p in run_budget(sw, step, upstream)]
    return write_report(sw, points, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the report
def _plot_frontier(points: list[dict[str, Any]], front: list[dict[str, Any]], cost: str,
                   path: Path, teacher: dict[str, Any]) -> None:
    """Perplexity (x the teacher's) against one cost, frontier points joined and named; written
    atomically (an Agg canvas of our own, as minitron.checkpoint's loss plot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measured = [p for p in points if p.get(cost) is not None]
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for fmt in dict.fromkeys(p["format"] for p in measured):
        mine = [p for p in measured if p["format"] == fmt]
        ax.plot([p[cost] for p in mine], [p["ppl_x_teacher"] for p in mine], "o", label=fmt)
    line = sorted(front, key=lambda p: p[cost])
    ax.plot([p[cost] for p in line], [p["ppl_x_teacher"] for p in line], "k--", lw=1,
            label="Pareto frontier")
    for p in front:
        ax.annotate(p["point"], (p[cost], p["ppl_x_teacher"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.axhline(1.0, color="grey", lw=0.8, ls=":", label=f"teacher ({teacher['perplexity']:.3g})")
    ax.set_xlabel({"size_mb": "artifact size (MB)",
                   "prefill_ms_per_token": "prefill latency (ms per token, batch 1)"}[cost])
    ax.set_ylabel("held-out perplexity / teacher's")
    ax.set_title(f"quality against {'size' if cost == 'size_mb' else 'prefill latency'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def table(points: list[dict[str, Any]], fronts: dict[str, list[str]]) -> list[dict[str, Any]]:
    def r(x, n):
        return None if x is None else round(x, n)
    return [{"point": p["point"], "parameters": p["parameters"],
             "distill_tokens": p.get("distill_tokens"), "size_mb": r(p["size_mb"], 2),
             "perplexity": r(p["perplexity"], 3), "ppl_x_teacher": r(p["ppl_x_teacher"], 3),
             "top1_vs_fp32": r(p.get("top1_vs_fp32"), 4), "kl_to_teacher": r(p.get("kl_to_teacher"), 4),
             "top1_agreement": r(p.get("top1_agreement"), 4),
             "prefill_tok_s": r(p.get("prefill_tokens_per_s"), 1),
             "decode_ms_tok": r(p.get("decode_ms_per_token"), 2),
             "prefill_x_teacher": r(p.get("prefill_x_teacher"), 2),
             "decode_x_teacher": r(p.get("decode_x_teacher"), 2),
             "frontier": ", ".join(k for k, names in fronts.items() if p["point"] in names) or "-"}
            for p in points]


def render(record: dict[str, Any]) -> str:
    t = record["teacher"]
    lines = [f"# Compression sweep: {record['name']}", "",
             f"Teacher {record['teacher_model']}: {t['parameters']:,} parameters, "
             f"{t['size_mb']:.1f} MB, perplexity {t['perplexity']:.4g} on the held-out blocks every "
             "artifact is measured on" + (f", prefill {t['prefill_tokens_per_s']:.1f} tok/s, decode "
                                          f"{t['decode_ms_per_token']:.2f} ms/token (PyTorch FP32)"
                                          if "prefill_tokens_per_s" in t else "") + ".", "",
             "Each point is one budget's student in one format. Perplexity, top-1 against the "
             "student's PyTorch FP32, size and speed are the export report's row of the artifact "
             "(ONNX Runtime; a GGUF file through transformers' GGUF loader, without speed); "
             "kl_to_teacher and top1_agreement are the student's PyTorch FP32 against the teacher "
             "(minitron.evaluate). x_teacher ratios are against the teacher's PyTorch FP32 row, "
             "measured in this sweep; speeds are batch 1 (128-token prompt, 32 decoded tokens).", "",
             format_table(record["table"], COLUMNS), ""]
    over = [p["point"] for p in record["points"] if p.get("within_budget") is False]
    if over:
        lines += ["Outside the export's gates (export.ppl_budget, export.int8_min_top1, against the "
                  "student's FP32; written anyway, since the sweep measures every format): "
                  + ", ".join(over) + ".", ""]
    for key, names in record["frontier"].items():
        what = {"size": "perplexity against size", "prefill": "perplexity against prefill latency"}
        lines += [f"Pareto frontier, {what[key]}: " + (", ".join(names) or "(no point measured)")
                  + f" ([plot]({record['plots'][key]}))", ""]
    lines += [f"![perplexity against size]({record['plots']['size']})", "",
              f"![perplexity against prefill latency]({record['plots']['prefill']})", "",
              f"Artifacts: {record['folder']}/budget-<b>/export-<format>/onnx/; stage records in each "
              f"stage's stage.json. Total {record['total_s']:.0f}s this session.", ""]
    return "\n".join(lines)


def write_report(sw: Sweep, points: list[dict[str, Any]], total_s: float) -> dict[str, Any]:
    teacher_row = sw.shared["teacher"]["pytorch_fp32"]
    teacher = {k: teacher_row[k] for k in ("perplexity", "size_mb", "prefill_tokens_per_s",
                                           "decode_ms_per_token") if k in teacher_row}
    from minitron.models import param_count_from_config

    teacher["parameters"] = param_count_from_config(source_config(sw.recipe))
    fronts = {key: [p["point"] for p in frontier(points, (QUALITY, cost))]
              for key, cost in COSTS.items()}
    plots = {key: f"frontier_{key}.png" for key in COSTS}
    record = {"kind": "minitron-sweep", "name": sw.recipe.name, "recipe": sw.recipe.source_file,
              "folder": str(sw.folder), "teacher_model": sw.recipe.model.name, "teacher": teacher,
              "budgets": list(sw.recipe.sweep.budgets), "formats": list(sw.recipe.sweep.formats),
              "quality": QUALITY, "costs": COSTS, "frontier": fronts, "points": points,
              "table": table(points, fronts), "plots": plots, "stages": sw.timings,
              "total_s": total_s}
    for key, cost in COSTS.items():
        front = [p for p in points if p["point"] in fronts[key]]
        _plot_frontier(points, front, cost, sw.folder / plots[key], teacher)
    write_json_atomic(sw.folder / "sweep.json", record)
    write_text_atomic(sw.folder / "sweep.md", render(record))
    return record


def main(argv: list[str] | None = None) -> int:
    from minitron.cli import recipe_parser

    p = recipe_parser("python -m minitron.sweep", __doc__.splitlines()[0],
                      "a YAML recipe with a sweep section (see recipes/)", "print full tracebacks",
                      "validate, print each budget's shape and parameter count; touch no weights")
    args = p.parse_intermixed_args(argv)  # overrides before or after the flags
    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        dry_run(recipe)
        return 0
    record = sweep(recipe)
    print(format_table(record["table"], COLUMNS))
    for key, names in record["frontier"].items():
        print(f"frontier ({key}): {', '.join(names)}")
    print(f"sweep written to {record['folder']} (sweep.md, sweep.json) in {record['total_s']:.0f}s")
    return 0


if __name__ == "__main__":
    run_cli(main)
