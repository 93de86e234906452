"""The whole recipe on a tiny config-built model: every stage, the report, resume and reruns."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tiny import make_tiny_model

RECIPE = """\
name: tiny
output_dir: {out}
model:
  name: {model}
data:
  source: {source}           # a slice of the stdlib: the data stage tokenizes all of it
  block_size: 32
  calibration_blocks: 8
  eval_blocks: 4
prune:
  hidden_size: 32            # 4 heads x head_dim 8
  num_attention_heads: 4
  intermediate_size: 48
distill:
  tokens: 512                # 8 steps of 2 x 32 tokens
  batch_size: 2
  block_size: 32
  lr: 1.0e-3
  eval_every: 4
  eval_blocks: 2
  checkpoint_every: 4
  progress: false
export:
  int8: blockwise
  compare: false
  ppl_budget: 10.0           # a random tiny model: the INT8 budget is not what this test checks
  speed: false
evaluate:
  speed: false
  tasks: [minitron_words_and_code]   # shipped with minitron: offline
  limit: 8
"""


def run_recipe(path, *overrides):
    return subprocess.run([sys.executable, "-m", "minitron.run", str(path), *overrides],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    make_tiny_model("llama", path=root / "teacher")
    recipe = root / "tiny.yaml"
    source = Path(sysconfig.get_paths()["stdlib"]) / "email"
    recipe.write_text(RECIPE.format(out=root / "runs", model=root / "teacher", source=source))
    result = run_recipe(recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    return recipe, root / "runs" / "tiny", result


def test_every_stage_runs_and_is_reported(finished_run):
    _, run_dir, result = finished_run
    report = json.loads((run_dir / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["data", "prune", "distill", "export",
                                                      "evaluate"]
    # Every later stage read the shards the data stage wrote.
    manifest = json.loads((run_dir / "0-data" / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["calibration"]["tokens"] >= 8 * 32
    assert all(s["wall_s"] > 0 and s["peak_rss_mb"] > 0 for s in report["stages"])
    distill_run = json.loads((run_dir / "2-distill" / "model" / "distill_run.json").read_text())
    assert distill_run["train_data"].startswith(manifest["fingerprint"] + ":train:")
    assert {m["model"] for m in report["models"]} == {"teacher", "pruned", "distilled", "deployed"}
    pruned = next(m for m in report["models"] if m["model"] == "pruned")
    teacher = next(m for m in report["models"] if m["model"] == "teacher")
    assert pruned["parameters"] < teacher["parameters"]
    for name in ("report.md", "stage_times.png", "distill_loss.png", "recipe.yaml"):
        assert (run_dir / name).stat().st_size > 0, name
    assert "| prune |" in (run_dir / "report.md").read_text()
    assert "report.md" in result.stdout


def test_task_accuracy_of_all_four_models_is_reported(finished_run):
    recipe, run_dir, _ = finished_run
    report = json.loads((run_dir / "report.json").read_text())
    for m in report["models"]:
        task = m["tasks"]["minitron_words_and_code"]
        assert task["items"] == 8 and task["acc_stderr"] > 0, m["model"]
    # The teacher's and the distilled model's rows are those models' own scores: each folder
    # loaded afresh and scored on the same items.
    from minitron.models import load_model
    from minitron.tasks import score_torch

    for label, folder in (("teacher", recipe.parent / "teacher"),
                          ("distilled", run_dir / "2-distill" / "model")):
        row = next(m for m in report["models"] if m["model"] == label)
        task = row["tasks"]["minitron_words_and_code"]
        model, tokenizer = load_model(str(folder))
        expected = score_torch(model, tokenizer, ["minitron_words_and_code"], limit=8,
                               num_fewshot=task["num_fewshot"])["minitron_words_and_code"]
        assert task["acc"] == expected["acc"], label
    md = (run_dir / "report.md").read_text()
    table = md.split("## Task accuracy")[1].split("##")[0]
    for label in ("teacher", "pruned", "distilled", "deployed"):
        assert f"| {label} | minitron_words_and_code |" in table


def test_the_exported_folder_generates_without_minitron(finished_run):
    """ONNX Runtime GenAI alone (no minitron, no torch) generates from the deployed folder the
    greedy tokens the export measured for its deployed graph."""
    _, run_dir, _ = finished_run
    onnx_dir = run_dir / "3-export" / "onnx"
    report = json.loads((onnx_dir / "report.json").read_text())
    deployed = next(r for r in report["rows"] if r.get("deployed"))
    code = (
        "import sys, json\n"
        "import onnxruntime_genai as og\n"
        f"m = og.Model({str(onnx_dir)!r})\n"
        "p = og.GeneratorParams(m)\n"
        f"prompt = {report['prompt_tokens']!r}\n"
        f"p.set_search_options(do_sample=False, max_length=len(prompt) + {len(deployed['greedy_tokens'])})\n"
        "g = og.Generator(m, p)\n"
        "g.append_tokens(prompt)\n"
        "new = []\n"
        "while not g.is_done():\n"
        "    g.generate_next_token()\n"
        "    new.append(int(g.get_next_tokens()[0]))\n"
        "assert not any(k.split('.')[0] in ('minitron', 'torch') for k in sys.modules)\n"
        "print(json.dumps(new))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    new = json.loads(proc.stdout.strip().splitlines()[-1])
    assert new and new == deployed["greedy_tokens"]


def test_rerun_skips_finished_stages(finished_run):
    recipe, run_dir, _ = finished_run
    result = run_recipe(recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("data", "prune", "distill", "export", "evaluate"):
        assert f"[{stage}] unchanged since the last run: skipped" in result.stdout


def test_interrupted_stage_reruns_and_finished_ones_do_not(finished_run):
    recipe, run_dir, _ = finished_run
    state_file = run_dir / "3-export" / "stage.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({"fingerprint": state["fingerprint"], "status": "running"}))
    result = run_recipe(recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[prune] unchanged since the last run: skipped" in result.stdout
    assert "[distill] unchanged since the last run: skipped" in result.stdout
    assert "[export] running" in result.stdout


def test_changed_setting_reruns_that_stage_and_later_ones(finished_run):
    recipe, run_dir, _ = finished_run
    result = run_recipe(recipe, "export.ppl_budget=11")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[distill] unchanged since the last run: skipped" in result.stdout
    assert "[export] running" in result.stdout
    assert "[evaluate] running" in result.stdout


def test_bad_recipe_exits_2_with_a_message_and_keeps_the_run(finished_run):
    recipe, run_dir, _ = finished_run
    before = sorted(p.name for p in run_dir.iterdir())
    result = run_recipe(recipe, "distill.temperature=0")
    assert result.returncode == 2
    assert "distill.temperature=0.0 is invalid; valid: a number > 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_resumable_distill_settings_do_not_discard_the_stage(finished_run):
    recipe, run_dir, _ = finished_run
    result = run_recipe(recipe, "distill.checkpoint_every=2", "distill.nproc_per_node=1",
                        "distill.strategy=ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[distill] unchanged since the last run: skipped" in result.stdout
