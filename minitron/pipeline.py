"""Run a recipe's stages in order in a run folder, with timing, resume and a report.

`python -m minitron.run RECIPE [section.key=value ...] [--dry-run]`

Each stage writes into its own subfolder and records a fingerprint of its settings and of every
stage before it. A rerun skips a stage whose fingerprint is unchanged and that finished; a stage
that was interrupted runs again (distillation continues from its checkpoint); a changed setting
reruns that stage and everything after it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from minitron.config import TARGET_KEYS, DataConfig
from minitron.common import (MinitronError, StageTimer, check_writable, format_table,
                             free_accelerator_memory, run_cli, write_json_atomic,
                             write_text_atomic)
from minitron.models import load_config, param_count_from_config, resolve_model
from minitron.recipe import Recipe, dump_recipe, fingerprint, load_recipe


# ----------------------------------------------------------------------------- planning
def source_config(recipe: Recipe, need_weights: bool = True):
    """The source model's config: from the recipe's shipped config.json when given (offline dry
    runs of large models), else from the model itself (whose weights a dry run does not need)."""
    if recipe.model.config is not None:
        from transformers import AutoConfig

        path = Path(recipe.model.config)
        if not path.is_file():
            raise MinitronError(f"model.config: '{path}' not found")
        return AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path,
                                          trust_remote_code=False)
    return load_config(recipe.model.name, recipe.model.trust_remote_code, need_weights)


def prune_target(recipe: Recipe, config) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The pruning target (HF config names) and, for a parameter budget, the candidates considered."""
    from minitron.prune import check_widths, target_for_budget

    if recipe.prune.target_params is not None:
        return target_for_budget(config, recipe.prune.target_params, recipe.prune.width_multiple)
    check_widths(config, recipe.prune.target(), recipe.prune.width_multiple)
    return recipe.prune.target(), []


def stage_names(recipe: Recipe) -> list[str]:
    from minitron.shards import is_prepared

    # A raw source is tokenized once into shards (stage "data"); a prepared folder is read as is.
    names = [] if is_prepared(recipe.data.source) else ["data"]
    if recipe.prune.enabled:
        names.append("prune")
    if recipe.distill.enabled:
        names.append("distill")
    if recipe.export.enabled:
        names.append("export")
    if recipe.evaluate.enabled:
        names.append("evaluate")
    return names


def check_plan(recipe: Recipe, config) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Refuse, before any work, a plan whose later stages cannot succeed.

    Returns the pruned shape (all HF config fields the pruner sets) and the budget candidates.
    """
    from minitron.config import check_search
    from minitron.data import check_source
    from minitron.prune import plan

    shape, candidates = {}, []
    if recipe.prune.enabled:
        check_search(recipe.prune, recipe.search)
    check_writable(recipe.run_dir, "the run folder (output_dir/name)")
    tokenizer = None
    if recipe.model.config is None:  # the model is on this machine: a prepared folder must match it
        from minitron.models import load_tokenizer

        tokenizer = load_tokenizer(recipe.model.name, recipe.model.trust_remote_code)
    check_source(recipe.data.source, recipe.data.text_field, tokenizer, where="data.source")
    if recipe.evaluate.enabled and recipe.evaluate.tasks:
        from minitron.tasks import require_lm_eval

        require_lm_eval()
    if recipe.prune.enabled and recipe.search.candidates:
        from minitron.prune import enumerate_shapes
        from minitron.search import target_of

        # The searched shape is not known yet: plan (memory) for the largest one it may choose.
        candidates = enumerate_shapes(config, recipe.prune.target_params, recipe.search,
                                      recipe.prune.width_multiple)
        shape = plan(config, target_of(candidates[0]))
    elif recipe.prune.enabled:
        target, candidates = prune_target(recipe, config)
        shape = plan(config, target)
    return shape, candidates


def _cache_size(recipe: Recipe) -> dict[str, Any] | None:
    """The size of the teacher cache the run builds (the search's, over a short run's tokens) or
    reads (distill.teacher_cache, when it exists): said before any build starts."""
    from minitron import teacher_cache as tc

    r = recipe
    if r.prune.enabled and r.search.candidates and r.search.teacher_cache:
        from minitron.search import short_config

        short = short_config(r.distill, r.search)
        tokens, k, dtype = short.train_tokens, r.teacher_cache.k, r.teacher_cache.dtype
        where = "the search builds"
    elif (r.distill.enabled and r.distill.teacher_cache
          and Path(r.distill.teacher_cache, tc.MANIFEST).is_file()):
        m = tc.open_cache(r.distill.teacher_cache).manifest
        tokens, k, dtype, where = m["tokens"], m["k"], m["dtype"], "distillation reads"
    else:
        return None
    return {"tokens": tokens, "bytes_per_token": tc.bytes_per_token(k, dtype),
            "gb": round(tokens * tc.bytes_per_token(k, dtype) / 1e9, 3),
            "line": f"{tc.size_line(tokens, k, dtype)} ({where})"}


def _stage_memory(recipe: Recipe, config, shape: dict[str, int]) -> dict[str, float]:
    """The memory plans of the prune stage (its importance pass) and the evaluate stage (the
    pruned student beside the teacher), GiB."""
    from minitron.memory_plan import GIB, plan_evaluate, plan_prune

    r, source, out = recipe, config.to_dict(), {}
    if r.prune.enabled:
        imp = r.importance
        out["prune"] = plan_prune(source, imp.batch_size, r.data.block_size, r.model.dtype,
                                  imp.head_score, imp.depth_method).peak / GIB
    if r.evaluate.enabled:
        out["evaluate"] = plan_evaluate({**source, **shape}, source, r.evaluate.batch_size,
                                        r.data.block_size, r.model.dtype).peak / GIB
    return {k: round(v, 2) for k, v in out.items()}


def dry_run(recipe: Recipe) -> dict[str, Any]:
    """Validate, print the plan, shapes and parameter counts; touch no weights."""
    config = source_config(recipe, need_weights=False)
    source = {k: getattr(config, k) for k in TARGET_KEYS}
    before = param_count_from_config(config)
    plan_info: dict[str, Any] = {"stages": stage_names(recipe), "source_shape": source,
                                 "source_params": before}
    print(f"recipe {recipe.source_file}: run folder {recipe.run_dir}")
    print(f"stages: {' -> '.join(plan_info['stages']) or '(none enabled)'}")
    print(f"source {recipe.model.name}: {source}, {before:,} parameters")
    shape, candidates = check_plan(recipe, config)
    if recipe.prune.enabled:
        after = param_count_from_config({**config.to_dict(), **shape})
        if candidates:
            print(format_table(candidates))
        if recipe.search.candidates:
            print(f"search: the {len(candidates)} shapes above are scored without training, the "
                  f"best {recipe.search.candidates} distilled for {recipe.search.tokens:,} tokens "
                  f"each; the best of those is kept")
        print(f"pruned{' (at most)' if recipe.search.candidates else ''}: {shape}, {after:,} "
              f"parameters ({after / before:.1%} of the source)")
        plan_info.update(pruned_shape=shape, pruned_params=after, candidates=candidates)
    cache = _cache_size(recipe)
    if cache is not None:
        print(cache["line"])
        plan_info["teacher_cache"] = {k: v for k, v in cache.items() if k != "line"}
    stages = _stage_memory(recipe, config, shape)
    for name, gib in stages.items():
        print(f"{name} stage memory per device: {gib:.2f} GiB (one process)")
    plan_info["stage_memory_gib"] = stages
    if recipe.distill.enabled:
        from minitron.distill import memory_plan_

        dc = recipe.distill
        print(f"distillation memory per GPU (nproc_per_node={dc.nproc_per_node}, "
              f"nnodes={dc.nnodes}):")
        plan = memory_plan_(config.to_dict(), {**config.to_dict(), **shape}, dc,
                            recipe.teacher_correction, dc.nproc_per_node * dc.nnodes, recipe.model)
        plan_info["memory_plan"] = {"terms_gib": {k: round(v / 2**30, 2) for k, v in plan.terms.items()},
                                    "peak_gib": round(plan.peak / 2**30, 2)}
        if dc.nnodes > 1:
            print(f"distill.nnodes={dc.nnodes}: minitron.run runs on one node; the commands:")
            print("\n".join(node_commands(recipe)))
    return plan_info


# ----------------------------------------------------------------------------- stages
@dataclasses.dataclass
class Context:
    recipe: Recipe
    run_dir: Path
    teacher: str  # resolved path (or hub id) of the source model
    outputs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def data(self) -> DataConfig:
        """The recipe's data settings, reading from the prepared folder when the data stage made
        one (every later stage reads its blocks from it)."""
        if "data" in self.outputs:
            return dataclasses.replace(self.recipe.data, source=self.outputs["data"]["data_dir"])
        return self.recipe.data

    @property
    def student(self) -> str:
        """The newest model folder the stages so far produced."""
        for name in ("distill", "prune"):
            if name in self.outputs and "model_dir" in self.outputs[name]:
                return self.outputs[name]["model_dir"]
        return self.teacher


def _data_stage(ctx: Context, out: Path, timer: StageTimer) -> dict[str, Any]:
    from minitron.data import load_tokenizer
    from minitron.shards import prepare

    r = ctx.recipe
    manifest = prepare(r.data.source, out / "shards",
                       load_tokenizer(ctx.teacher, r.model.trust_remote_code),
                       tokenizer_name=r.model.name, text_field=r.data.text_field,
                       seed=r.data.seed, block_size=r.data.block_size, workers=r.data.workers)
    timer.tokens = manifest["stats"]["tokens_tokenized"]
    return {"data_dir": str(out / "shards"), "fingerprint": manifest["fingerprint"],
            "tokens": {s: v["tokens"] for s, v in manifest["splits"].items()}}


def _prune_stage(ctx: Context, out: Path, timer: StageTimer) -> dict[str, Any]:
    from minitron.calibration import Collector
    from minitron.importance import compute_scores
    from minitron.models import load_model, resolve_device
    from minitron.prune import calibration_blocks, prune, save_pruned

    r = ctx.recipe
    model, tokenizer = load_model(ctx.teacher, dtype=r.model.dtype,
                                  device=resolve_device(r.model.device),
                                  trust_remote_code=r.model.trust_remote_code)
    if r.search.candidates:
        return _searched_prune(ctx, out, timer, model, tokenizer)
    blocks = calibration_blocks(tokenizer, ctx.data, model.config)
    collector = Collector()
    scores = compute_scores(model, blocks, config=r.importance, progress=True, collector=collector)
    timer.tokens = blocks.numel()
    target, candidates = prune_target(r, model.config)
    pruned = prune(model, scores, target, depth=r.prune.depth, stats=collector.stats)
    info = {"recipe": r.source_file, "candidates": candidates}
    save_pruned(pruned, tokenizer, out / "model", info, scores=scores)
    shape = {k: getattr(pruned.config, k) for k in (*TARGET_KEYS, "head_dim")}
    return {"model_dir": str(out / "model"), "shape": shape}


def _searched_prune(ctx: Context, out: Path, timer: StageTimer, model, tokenizer) -> dict[str, Any]:
    """The prune stage by search (recipe key `search.candidates`): its work folder is
    out/search (resumed when the stage reruns), the chosen candidate's checkpoint out/model."""
    from minitron import search
    from minitron.models import resolve_device
    from minitron.prune import enumerate_shapes, save_searched, search_inputs

    r = ctx.recipe
    shapes = enumerate_shapes(model.config, r.prune.target_params, r.search,
                              r.prune.width_multiple)
    sections = {"data": ctx.data, "importance": r.importance, "prune": r.prune, "search": r.search,
                "distill": r.distill, "model": r.model, "teacher_cache": r.teacher_cache}
    inputs, scores, scores_info = search_inputs(model, tokenizer, ctx.teacher, sections,
                                                out / "search")
    timer.tokens = inputs.calibration.numel()
    found = search.search(out / "search", inputs, shapes, r.prune.target_params, r.search,
                          r.distill, device=resolve_device(r.model.device))
    info = {"recipe": r.source_file, "target_params": r.prune.target_params,
            "method": {"depth": r.prune.depth, "depth_method": r.importance.depth_method,
                       **scores_info}}
    save_searched(found, out / "model", scores, info, overwrite=True)
    return {"model_dir": str(out / "model"), "shape": found["chosen"]["shape"],
            "search": search.summary(found)}


def _distill_stage(ctx: Context, out: Path, timer: StageTimer) -> dict[str, Any]:
    from minitron.distill import run_distill

    r = ctx.recipe
    result = run_distill(ctx.teacher, ctx.student, out / "model", r.distill,
                         correction=r.teacher_correction, data=ctx.data, model=r.model)
    timer.tokens = result.get("this_session_tokens", 0)
    return {"model_dir": str(out / "model"), **{k: v for k, v in result.items() if k != "history"}}


def _export_stage(ctx: Context, out: Path, timer: StageTimer) -> dict[str, Any]:
    from minitron.export import export

    r = ctx.recipe
    report = export(ctx.student, out / "onnx", r.export, ctx.data,  # float32: see export()
                    trust_remote_code=r.model.trust_remote_code)
    return {"onnx_dir": str(out / "onnx"), "report": report}


def _evaluate_stage(ctx: Context, out: Path, timer: StageTimer) -> dict[str, Any]:
    from minitron.evaluate import evaluate

    r = ctx.recipe
    models = {"teacher": ctx.teacher}
    if "prune" in ctx.outputs:
        models["pruned"] = ctx.outputs["prune"]["model_dir"]
    if "distill" in ctx.outputs:
        models["distilled"] = ctx.outputs["distill"]["model_dir"]
    rows = []
    for label, path in models.items():
        result = evaluate(path, None if label == "teacher" else ctx.teacher, r.evaluate, ctx.data,
                          r.model)
        timer.tokens += result["tokens"]
        rows.append({**{k: v for k, v in result.items() if k != "timing"}, "model": label,
                     "path": str(path)})
    if r.evaluate.tasks and "export" in ctx.outputs:
        # The deployed model: task accuracy only (the export stage measured the rest).
        path = ctx.outputs["export"]["onnx_dir"]
        result = evaluate(path, settings=r.evaluate)
        rows.append({"model": "deployed", "path": path, "tasks": result["tasks"]})
    write_json_atomic(out / "models.json", rows)
    return {"models": rows}


STAGES: dict[str, Callable[[Context, Path, StageTimer], dict[str, Any]]] = {
    "data": _data_stage,
    "prune": _prune_stage,
    "distill": _distill_stage,
    "export": _export_stage,
    "evaluate": _evaluate_stage,
}


def _settings(recipe: Recipe, name: str) -> list[Any]:
    """What a stage's result depends on (besides the stages before it)."""
    from minitron.distill import RESUMABLE_SETTINGS

    from minitron.shards import Prepared, is_prepared

    r = recipe
    # A prepared folder counts by its content (the manifest's fingerprint), not its path.
    data = [Prepared(r.data.source).fingerprint] if is_prepared(r.data.source) else []
    # Settings a distillation may change on resume (process count, checkpoint interval, ...) must
    # not make the pipeline throw its checkpoint away.
    distill = {k: v for k, v in dataclasses.asdict(r.distill).items() if k not in RESUMABLE_SETTINGS}
    # A search's short runs take the distill section's settings but their own tokens and eval set.
    short = {k: v for k, v in distill.items() if k not in ("tokens", "eval_blocks")}
    # The tokenizing process count does not change the shards.
    d = dataclasses.replace(r.data, workers=None)
    return {
        "data": [r.data.source, r.data.text_field, r.data.seed, r.data.block_size],
        "prune": [r.model, d, r.importance, r.prune, *data,
                  *([r.search, short, r.teacher_cache] if r.search.candidates else [])],
        "distill": [r.data.source, r.data.text_field, r.model.dtype, r.teacher_correction, distill,
                    *data],
        "export": [d, r.export, *data],
        "evaluate": [d, r.model.dtype, r.model.device, r.evaluate, *data],
    }[name]


# ----------------------------------------------------------------------------- several nodes
NODES_RECIPE = "recipe-nodes.yaml"  # the resolved recipe the commands of `node_commands` read


def node_commands(recipe: Recipe) -> list[str]:
    """What to run instead of `minitron.run` when distillation spans several nodes: the
    single-process stages on the first node, the distillation on every node, then export and
    evaluation on the first node. Each command resumes or skips what it finished, as the stages
    do under `minitron.run`; the settings are the recipe's own (its resolved copy in the run
    folder, and `section.key=value` arguments)."""
    import shlex

    from minitron import cli
    from minitron import distill, evaluate, export
    from minitron.shards import is_prepared

    r, run_dir = recipe, recipe.run_dir
    names = stage_names(r)
    folder = {n: run_dir / f"{i}-{n}" for i, n in enumerate(names, 0 if names[:1] == ["data"] else 1)}
    data = r.data
    if "data" in folder:
        data = dataclasses.replace(r.data, source=str(folder["data"] / "shards"))
    teacher = r.model.name
    student = str(folder["prune"] / "model") if "prune" in folder else teacher
    distilled = str(folder["distill"] / "model")
    sections = {"distill": r.distill, "teacher_correction": r.teacher_correction, "model": r.model,
                "data": data, "export": r.export, "evaluate": r.evaluate}
    commands = []
    if not is_prepared(r.data.source) or r.prune.enabled:
        commands.append("# on the first node: " + " ".join(n for n in names if n in ("data", "prune")))
        commands.append(shlex.join(["python", "-m", "minitron.run", str(run_dir / NODES_RECIPE),
                                    "distill.enabled=false", "export.enabled=false",
                                    "evaluate.enabled=false"]))
    commands.append(f"# on every node (each joins the rendezvous at {r.distill.rdzv_endpoint}):")
    commands.append(shlex.join(["python", "-m", "minitron.distill", "--teacher", teacher,
                                "--student", student, "--output", distilled,
                                *cli.as_overrides(sections, distill.CLI_KEYS)]))
    if r.export.enabled or r.evaluate.enabled:
        commands.append("# then on the first node:")
    if r.export.enabled:
        commands.append(shlex.join(["python", "-m", "minitron.export", "--model", distilled,
                                    "--output", str(folder["export"] / "onnx"),
                                    *cli.as_overrides(sections, export.CLI_KEYS)]))
    if r.evaluate.enabled:
        commands.append(shlex.join(["python", "-m", "minitron.evaluate", "--model", distilled,
                                    "--teacher", teacher,
                                    "--json", str(folder["evaluate"] / "distilled.json"),
                                    *cli.as_overrides(sections, evaluate.CLI_KEYS)]))
    return commands


def refuse_several_nodes(recipe: Recipe) -> None:
    """`minitron.run` runs on one node. Several nodes would each run the data, prune, export and
    evaluate stages into the same run folder; having the others wait for the first one would need
    a barrier on a shared filesystem (stage files polled across NFS attribute caches, a dead first
    node leaving the others waiting for hours with no collective timeout). The separate commands
    are explicit, each resumes, and the distillation already joins its nodes by rendezvous."""
    if not (recipe.distill.enabled and recipe.distill.nnodes > 1):
        return
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(recipe.run_dir / NODES_RECIPE, dump_recipe(recipe))
    raise MinitronError(
        f"distill.nnodes={recipe.distill.nnodes}: minitron.run runs on one node; run these "
        f"instead, from this folder (the resolved recipe is {recipe.run_dir / NODES_RECIPE}):\n"
        + "\n".join(node_commands(recipe)))


# ----------------------------------------------------------------------------- running
def run_stage(name: str, out: Path, fp: str,
              work: Callable[[Path, StageTimer], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one stage into `out` and record it in out/stage.json: (its result, its timing).

    A stage whose record says it finished with fingerprint `fp` is skipped (its recorded result
    returned); one recorded as running (interrupted) runs again in its folder, which keeps what it
    saved (distillation continues from its checkpoint); a changed fingerprint empties the folder."""
    state_file = out / "stage.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state.get("fingerprint") == fp and state.get("status") == "done":
        print(f"[{name}] unchanged since the last run: skipped ({out})")
        return state["result"], {**state["timing"], "skipped": "yes"}
    if state.get("fingerprint") != fp and out.exists():
        shutil.rmtree(out)  # settings changed: nothing in there is valid any more
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state_file, {"fingerprint": fp, "status": "running"})
    print(f"[{name}] running in {out}")
    with StageTimer(name) as timer:
        try:
            result = work(out, timer)
        finally:
            free_accelerator_memory()  # its models are unreferenced now: free their GPU memory
    timing = timer.as_dict()
    write_json_atomic(state_file, {"fingerprint": fp, "status": "done", "timing": timing,
                                   "result": result})
    print(f"[{name}] done in {timing['wall_s']:.1f}s")
    return result, timing


def run(recipe: Recipe) -> dict[str, Any]:
    refuse_several_nodes(recipe)
    check_plan(recipe, source_config(recipe))
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))
    ctx = Context(recipe, run_dir, resolve_model(recipe.model.name, recipe.model.trust_remote_code))
    upstream = fingerprint(recipe.model)
    timings = []
    t_start = time.perf_counter()
    names = stage_names(recipe)
    # The data stage is 0-data, so the model stages keep their folder names (1-prune, ...).
    for index, name in enumerate(names, 0 if names[:1] == ["data"] else 1):
        out = run_dir / f"{index}-{name}"
        fp = fingerprint(upstream, *_settings(recipe, name))
        ctx.outputs[name], timing = run_stage(
            name, out, fp, lambda o, t, stage=STAGES[name]: stage(ctx, o, t))
        timings.append(timing)
        upstream = fp
    from minitron.report import write_report

    return write_report(run_dir, recipe.name, recipe.source_file, ctx.outputs, timings,
                        total_s=time.perf_counter() - t_start)


def main(argv: list[str] | None = None) -> int:
    from minitron.cli import recipe_parser

    p = recipe_parser("python -m minitron.run", __doc__.splitlines()[0], "a YAML recipe (see recipes/)",
                      "print full tracebacks (of errors, and of failing torchrun ranks)",
                      "validate, print the plan, shapes and parameter counts; touch no weights")
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        dry_run(recipe)
        return 0
    run(recipe)
    return 0


if __name__ == "__main__":
    run_cli(main)
