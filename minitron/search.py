"""Architecture search within a parameter budget, the Minitron papers' way: enumerate the shapes that
fit, prune each from one set of importance scores, score every one without training (KL to the
teacher on calibration blocks), distill the best K briefly on the same tokens, rank them by held-out
KL (then perplexity), keep the best.

`python -m minitron.prune --target-params 0.5 --search K --output DIR [search.tokens=N ...]`, or a
recipe's `search:` section (with `prune.target_params`). The work lives in one folder (the prune
command's `DIR.search/`, the pipeline's `1-prune/search/`):

  scores.safetensors     importance, computed once for every candidate (or reused from --scores)
  shapes.json            every enumerated shape with its zero-shot KL (done-marker of that phase)
  NN-<shape>/            one folder per distilled candidate: model/ (the pruned checkpoint),
                         distill/ (the short run: checkpoint, metrics, the distilled model) and
                         result.json, written last: the candidate's done-marker
  ranking.json           the ranking, the choice and why; search.png (KL before and after)

A rerun skips a finished candidate whose result.json matches its settings, resumes an interrupted
one from its distillation checkpoint, and redoes one whose settings changed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from minitron.common import MinitronError, format_table, write_json_atomic
from minitron.config import TARGET_KEYS, DistillConfig, SearchConfig
from minitron.importance import Scores
from minitron.recipe import fingerprint

# The pruner a search is given (minitron.prune, which calls the search, supplies it): `prune(shape)`
# prunes the teacher in memory, `save(model, folder)` writes a pruned checkpoint.
Prune = Callable[[dict[str, int]], nn.Module]
Save = Callable[[nn.Module, Path], None]
# Builds (or finds) a teacher cache over the train blocks of a distill config in a folder.
BuildCache = Callable[[Path, DistillConfig], None]

RESULT = "result.json"
SHAPES = "shapes.json"
RANKING = "ranking.json"
PLOT = "search.png"
SCORES = "scores.safetensors"
RANKING_COLUMNS = ["rank", "shape", "params", "fraction", "zero_shot_rank", "zero_shot_kl",
                   "kl_after", "ppl_after", "top1_after", "time_s", "chosen"]


# ----------------------------------------------------------------------------- shapes
def target_of(shape: dict[str, Any]) -> dict[str, int]:
    return {k: int(shape[k]) for k in TARGET_KEYS}


# ----------------------------------------------------------------------------- zero-shot scoring
@torch.no_grad()
def zero_shot_kl(teacher: nn.Module, prune: Prune, shapes: list[dict], blocks: torch.Tensor,
                 batch_size: int = 8) -> list[float]:
    """Mean per-token KL(teacher || pruned) over `blocks` for each shape, without training. The
    teacher's hidden states are computed once; each shape is pruned in memory and dropped."""
    from minitron.scoring import final_hidden, metric_sums
    from minitron.models import logit_softcap

    device = next(teacher.parameters()).device
    batches = [blocks[i:i + batch_size].to(device) for i in range(0, len(blocks), batch_size)]
    t_hidden = [final_hidden(teacher, ids) for ids in batches]
    t_head, t_cap = teacher.get_output_embeddings().weight, logit_softcap(teacher.config)
    out, t0 = [], time.perf_counter()
    for i, shape in enumerate(shapes, 1):
        student = prune(target_of(shape))
        sums = torch.zeros(5, dtype=torch.float64)
        for ids, th in zip(batches, t_hidden):
            sums += metric_sums(final_hidden(student, ids), student.get_output_embeddings().weight,
                                ids, th, t_head, s_softcap=logit_softcap(student.config),
                                t_softcap=t_cap).cpu()
        out.append(float(sums[2] / sums[4]))
        del student
        print(f"[search] zero-shot {i}/{len(shapes)} {shape['name']}: KL {out[-1]:.4f} "
              f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    return out


def score_shapes(work: Path, teacher: nn.Module, prune: Prune, shapes: list[dict],
                 blocks: torch.Tensor, key: str) -> list[dict]:
    """`shapes` with their zero-shot KL and rank, from work/shapes.json when it was written for
    the same `key` (a fingerprint of the scores, shapes and blocks)."""
    path = work / SHAPES
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            print(f"[search] zero-shot scores of {len(saved['shapes'])} shapes: reused ({path})")
            return saved["shapes"]
    t0 = time.perf_counter()
    kls = zero_shot_kl(teacher, prune, shapes, blocks)
    order = sorted(range(len(shapes)), key=lambda i: (kls[i], -shapes[i]["params"]))
    scored = [dict(s, zero_shot_kl=kls[i]) for i, s in enumerate(shapes)]
    for rank, i in enumerate(order, 1):
        scored[i]["zero_shot_rank"] = rank
    scored.sort(key=lambda s: s["zero_shot_rank"])
    write_json_atomic(path, {"key": key, "wall_s": round(time.perf_counter() - t0, 2),
                             "blocks": list(blocks.shape), "shapes": scored})
    print(f"[search] zero-shot KL of {len(shapes)} shapes on {len(blocks)} calibration blocks in "
          f"{time.perf_counter() - t0:.1f}s")
    return scored


# ----------------------------------------------------------------------------- candidates
def short_config(distill: DistillConfig, settings: SearchConfig) -> DistillConfig:
    """The short runs' settings: the distill section's, with the search's tokens and eval set, and
    a checkpoint at least every quarter of the run (an interrupted candidate resumes from it)."""
    steps = max(1, settings.tokens // distill.tokens_per_step)
    return dataclasses.replace(distill, tokens=settings.tokens, eval_blocks=settings.eval_blocks,
                               keep_checkpoint=False,
                               checkpoint_every=min(distill.checkpoint_every, max(1, steps // 4)))


def with_cache(config: DistillConfig, folder: Path, build: BuildCache) -> DistillConfig:
    """`config` reading its teacher from a cache in `folder`, built once over its train blocks (the
    same for every candidate); `config` itself, with a note, when a cache cannot serve it."""
    try:
        cached = dataclasses.replace(config, teacher_cache=str(folder))
    except MinitronError as e:
        print(f"[search] the teacher runs online in each short run: {e}")
        return config
    build(folder, config)
    print(f"[search] every short run reads the teacher from {folder}")
    return cached


def run_candidate(folder: Path, shape: dict, key: str, inputs: "SearchInputs",
                  config: DistillConfig, device: str | None) -> dict[str, Any]:
    """Prune `shape`, distill it briefly from `teacher` and return its result, which result.json
    keeps (written last). A finished candidate with the same `key` is returned as it was."""
    from minitron.distill import distill
    from minitron.models import load_model

    done = folder / RESULT
    if done.exists():
        result = json.loads(done.read_text())
        if result.get("key") == key:
            print(f"[search] {folder.name}: finished earlier, skipped")
            return result
        shutil.rmtree(folder)  # another search's candidate: nothing in it is valid here
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir, run_dir = folder / "model", folder / "distill"
    if not (model_dir / "minitron.json").exists():
        inputs.save(inputs.prune(target_of(shape)), model_dir)
    student, _ = load_model(model_dir, dtype="float32", device=device)
    print(f"[search] {folder.name}: distilling {config.tokens} tokens")
    metrics = distill(inputs.teacher, student, inputs.train_blocks, inputs.eval_blocks, config,
                      run_dir, info={"search_candidate": shape["name"]})
    del student
    result = {"key": key, "name": shape["name"], "shape": target_of(shape),
              "params": shape["params"], "zero_shot_kl": shape["zero_shot_kl"],
              "zero_shot_rank": shape["zero_shot_rank"], "kl_before": metrics["start"].get(
                  "kl_to_teacher"), "ppl_before": metrics["start"].get("eval_perplexity"),
              "kl_after": metrics["kl_to_teacher"], "ppl_after": metrics["eval_perplexity"],
              "top1_after": metrics["top1_agreement"], "tokens": metrics["train_tokens"],
              "model_dir": str(model_dir), "distilled_dir": str(run_dir),
              "time_s": round(time.perf_counter() - t0, 2)}
    write_json_atomic(done, result)
    return result


# ----------------------------------------------------------------------------- ranking
def rank(results: list[dict]) -> list[dict]:
    """Best first: the lowest held-out KL after the short distillation, then the lowest
    perplexity, then the smaller model."""
    ordered = sorted(results, key=lambda r: (r["kl_after"], r["ppl_after"], r["params"]))
    return [dict(r, rank=i, chosen=i == 1) for i, r in enumerate(ordered, 1)]


def why(ranked: list[dict]) -> str:
    """Why the first candidate won, in a sentence or three (for the report)."""
    best = ranked[0]
    text = (f"{best['name']} ({best['params']:,} parameters) had the lowest held-out KL to the "
            f"teacher after the short distillation: {best['kl_after']:.4f} (perplexity "
            f"{best['ppl_after']:.2f})")
    if len(ranked) > 1:
        runner = ranked[1]
        text += (f", against {runner['kl_after']:.4f} (perplexity {runner['ppl_after']:.2f}) for the "
                 f"runner-up {runner['name']}")
    text += ". "
    zs = best["zero_shot_rank"]
    before = sorted(ranked, key=lambda r: r["kl_before"]).index(best) + 1
    text += (f"Before training it was number {zs} of all shapes by zero-shot KL on the calibration "
             f"blocks ({best['zero_shot_kl']:.4f}) and number {before} of the {len(ranked)} "
             f"candidates by held-out KL ({best['kl_before']:.4f}): ")
    if before == 1 and zs == 1:
        text += "the short distillation confirmed the order the pruned models already had."
    elif before == 1:
        text += ("the held-out set already preferred it; the short distillation kept that order "
                 "and overruled the cheaper zero-shot score.")
    else:
        text += ("the short distillation changed the order: how well a shape recovers is not how "
                 "well it does untrained, as the Minitron papers found.")
    return text


def plot(ranked: list[dict], path: Path, tokens: int) -> None:
    """Each candidate's held-out KL before and after the short distillation (one line each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in ranked:
        style = dict(lw=2.4, marker="o") if r["chosen"] else dict(lw=1.2, marker="o", alpha=0.8)
        ax.plot([0, 1], [r["kl_before"], r["kl_after"]], label=f"{r['rank']}. {r['name']}", **style)
    ax.set_xticks([0, 1], ["pruned (no training)", f"after {tokens:,} tokens"])
    ax.set_yscale("log")
    ax.set_ylabel("held-out KL to the teacher")
    ax.set_title("shape search: candidates before and after the short distillation")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ranking_rows(ranked: list[dict]) -> list[dict]:
    """The ranking as table rows (RANKING_COLUMNS)."""
    return [{"rank": r["rank"], "shape": r["name"], "params": f"{r['params']:,}",
             "fraction": r.get("fraction"), "zero_shot_rank": r["zero_shot_rank"],
             "zero_shot_kl": round(r["zero_shot_kl"], 4), "kl_after": round(r["kl_after"], 4),
             "ppl_after": round(r["ppl_after"], 2), "top1_after": round(r["top1_after"], 3),
             "time_s": r["time_s"], "chosen": "yes" if r["chosen"] else ""} for r in ranked]


# ----------------------------------------------------------------------------- the search
@dataclasses.dataclass
class SearchInputs:
    """What a search reads: the teacher (loaded), the pruner (from one set of importance scores,
    `scores_key` names them), the calibration blocks the zero-shot KL is measured on, and the short
    runs' train and eval blocks (the same for every candidate)."""

    teacher: nn.Module
    prune: Prune
    save: Save
    scores_key: str
    calibration: torch.Tensor
    train_blocks: Any
    eval_blocks: torch.Tensor
    build_cache: BuildCache | None = None  # None: the teacher runs online in every short run


def search(work: str | Path, inputs: SearchInputs, shapes: list[dict], budget: float | int,
           settings: SearchConfig, distill: DistillConfig,
           device: str | None = None) -> dict[str, Any]:
    """Run (or resume) the search over `shapes` (`minitron.prune.enumerate_shapes`) in `work`;
    returns the ranking.json record: `chosen` (its `model_dir` is the pruned checkpoint to keep),
    `ranking`, `shapes`, `why` and phase times."""
    from minitron.distill import RESUMABLE_SETTINGS, blocks_fingerprint

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if settings.candidates < 1:
        raise MinitronError("search.candidates must be at least 1 to search")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    calib = inputs.calibration[:settings.score_blocks]
    shapes = score_shapes(work, inputs.teacher, inputs.prune, shapes, calib,
                          fingerprint(inputs.scores_key, shapes, blocks_fingerprint(calib)))
    times["zero_shot_s"] = round(time.perf_counter() - t0, 2)
    print(format_table([{k: s[k] for k in ("zero_shot_rank", "name", "params", "fraction",
                                           "zero_shot_kl")} for s in shapes]))
    config = short_config(distill, settings)
    if settings.teacher_cache and inputs.build_cache is not None:
        t_cache = time.perf_counter()
        config = with_cache(config, work / "teacher_cache", inputs.build_cache)
        times["teacher_cache_s"] = round(time.perf_counter() - t_cache, 2)
    top = shapes[:settings.candidates]
    data_key = (blocks_fingerprint(inputs.train_blocks), blocks_fingerprint(inputs.eval_blocks))
    # What a candidate's result depends on: not the settings a run may change when it resumes.
    run_key = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_SETTINGS}
    t1 = time.perf_counter()
    results = []
    for i, shape in enumerate(top, 1):
        key = fingerprint(inputs.scores_key, target_of(shape), run_key, data_key)
        results.append(dict(run_candidate(work / f"{i:02d}-{shape['name']}", shape, key, inputs,
                                          config, device), fraction=shape["fraction"]))
    times["short_distill_s"] = round(time.perf_counter() - t1, 2)
    ranked = rank(results)
    plot(ranked, work / PLOT, config.tokens)
    record = {"budget": budget, "settings": settings.to_dict(), "tokens": config.tokens,
              "teacher": "cache " + config.teacher_cache if config.teacher_cache else "online",
              "enumerated": len(shapes), "candidates": len(top), "times": times,
              "chosen": ranked[0], "why": why(ranked), "ranking": ranked, "shapes": shapes,
              "plot": str(work / PLOT)}
    write_json_atomic(work / RANKING, record)
    print(format_table(ranking_rows(ranked), RANKING_COLUMNS))
    print(f"[search] chose {ranked[0]['name']}: {record['why']}")
    return record


def short_run_blocks(tokenizer, data, distill: DistillConfig, settings: SearchConfig,
                     max_positions: int | None):
    """The short runs' train blocks (the first ones of the train split, exactly what
    `minitron.distill` reads for this many tokens) and held-out eval blocks."""
    from minitron.distill.schedule import run_blocks

    return run_blocks(tokenizer, data, short_config(distill, settings), max_positions)


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """What reports keep of a search: the ranking table, why, times, the plot and counts."""
    return {"chosen": record["chosen"]["name"], "why": record["why"],
            "rows": ranking_rows(record["ranking"]), "times": record["times"],
            "enumerated": record["enumerated"], "candidates": record["candidates"],
            "tokens": record["tokens"], "budget": record["budget"], "plot": record["plot"],
            "teacher": record["teacher"]}


def scores_digest(scores: Scores) -> str:
    """A short hash of importance scores (what every candidate was pruned from)."""
    import hashlib

    h = hashlib.sha256()
    for t in (scores.neurons, scores.heads, scores.hidden, scores.layers_bi, scores.layers_lm_loss):
        if t is not None:
            h.update(t.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


__all__ = ["SearchInputs", "rank", "run_candidate", "scores_digest", "search", "short_run_blocks",
           "summary", "zero_shot_kl"]
