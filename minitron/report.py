"""The run report: report.json, report.md and PNG plots (time per stage, distillation loss, the
shape search's candidates before and after their short distillation)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from minitron.common import format_table, write_json_atomic, write_text_atomic

_MODEL_COLUMNS = ["model", "parameters", "weights_mb", "perplexity", "kl_to_teacher",
                  "top1_agreement", "prefill_tokens_per_s", "decode_ms_per_token"]
_STAGE_COLUMNS = ["stage", "wall_s", "cuda_s", "peak_rss_mb", "peak_gpu_mb", "tokens_per_s", "skipped"]


def _plot_stage_times(timings: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t["stage"] for t in timings]
    seconds = [t["wall_s"] for t in timings]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(names)))
    bars = ax.barh(names[::-1], seconds[::-1], color="#4878a8")
    ax.bar_label(bars, labels=[f"{s:.1f}s" for s in seconds[::-1]], padding=3)
    ax.set_xlabel("wall time (s)")
    ax.set_title("time per stage")
    ax.set_xlim(0, max(seconds + [1]) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _task_table(models: list[dict[str, Any]]) -> str:
    from minitron.tasks import TASK_COLUMNS, task_rows

    rows = task_rows(models)
    return format_table(rows, [c for c in TASK_COLUMNS if any(c in r for r in rows)]) if rows else ""


def _search_section(found: dict[str, Any], run_dir: Path) -> list[str]:
    """The shape search: the ranking table, why the chosen shape won, the before/after plot."""
    from minitron.search import RANKING_COLUMNS

    plot = Path(found["plot"])
    if plot.exists():
        shutil.copyfile(plot, run_dir / "search.png")
    times = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f}s"
                      for k, v in found["times"].items())
    md = ["## Shape search", "",
          f"{found['enumerated']} shapes within the budget (prune.target_params={found['budget']}) "
          f"were pruned from one set of importance scores and scored without training (KL to the "
          f"teacher on calibration blocks); the best {found['candidates']} were distilled for "
          f"{found['tokens']:,} tokens each, on the same tokens (teacher: "
          f"{found.get('teacher', 'online')}), and ranked by held-out KL, then perplexity "
          f"({times}).", "",
          format_table(found["rows"], RANKING_COLUMNS), "",
          f"**Why {found['chosen']} won:** {found['why']}", ""]
    if plot.exists():
        md += ["![candidates before and after the short distillation](search.png)", ""]
    return md


def write_report(run_dir: Path, name: str, recipe_file: str | None,
                 outputs: dict[str, dict[str, Any]], timings: list[dict[str, Any]],
                 total_s: float) -> dict[str, Any]:
    """report.json, report.md and the plots in `run_dir`, from each stage's result (`outputs`,
    by stage name) and timing."""
    models = outputs.get("evaluate", {}).get("models", [])
    # The deployed ONNX model's row carries task accuracy only; its other numbers are in Export.
    measured = [m for m in models if "parameters" in m]
    export_rows = outputs.get("export", {}).get("report", {}).get("rows", [])
    report = {
        "recipe": recipe_file,
        "run_dir": str(run_dir),
        "total_wall_s": round(total_s, 2),
        "stages": timings,
        "models": models,
        "export": export_rows,
        "outputs": {f"{stage} {key}": value for stage, out in outputs.items()
                    for key, value in out.items() if key.endswith("_dir")},
    }
    write_json_atomic(run_dir / "report.json", report)

    _plot_stage_times(timings, run_dir / "stage_times.png")
    # The distillation stage draws its own loss curves; the report shows that picture.
    distill_dir = outputs.get("distill", {}).get("model_dir")
    loss_png = Path(distill_dir) / "loss.png" if distill_dir else None
    has_loss = bool(loss_png and loss_png.exists())
    if has_loss:
        shutil.copyfile(loss_png, run_dir / "distill_loss.png")

    stages_s = sum(t["wall_s"] for t in timings)
    stage_table = format_table(timings, [c for c in _STAGE_COLUMNS if any(c in t for t in timings)])
    md = [f"# minitron run: {name}", "",
          f"Recipe `{recipe_file}`. Stage times add up to {stages_s:.1f}s; this "
          f"invocation took {total_s:.1f}s (stages marked skipped were reused from an earlier one).",
          "",
          "## Stages", "", stage_table, "", "![time per stage](stage_times.png)", ""]
    found = outputs.get("prune", {}).get("search")
    if found:
        md += _search_section(found, run_dir)
    if measured:
        md += ["## Models (held-out eval split)", "",
               format_table(measured, [c for c in _MODEL_COLUMNS if any(c in m for m in measured)]),
               ""]
    task_table = _task_table(models)
    if task_table:
        md += ["## Task accuracy (lm-evaluation-harness)", "",
               "Accuracy on each task with its standard error; `acc_norm` divides each choice's "
               "log-likelihood by its length in bytes.", "", task_table, ""]
    if export_rows:
        from minitron.export import REPORT_COLUMNS, table_rows

        rows = table_rows(export_rows)
        md += ["## Export (ONNX Runtime, CPU)", "",
               format_table(rows, [c for c in REPORT_COLUMNS if any(c in r for r in rows)]), ""]
    if has_loss:
        md += ["## Distillation", "", "![distillation loss](distill_loss.png)", ""]
    md += ["## Artifacts", ""] + [f"- {k}: `{v}`" for k, v in report["outputs"].items()]
    write_text_atomic(run_dir / "report.md", "\n".join(md) + "\n")

    print()
    print(stage_table)
    if measured:
        print()
        print(format_table(measured, [c for c in _MODEL_COLUMNS if any(c in m for m in measured)]))
    if task_table:
        print()
        print(task_table)
    print(f"\nreport: {run_dir / 'report.md'} (plots and report.json beside it); total {total_s:.1f}s")
    return report
