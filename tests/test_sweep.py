"""The compression sweep on a tiny config-built model: 2 budgets x 2 formats end to end, resume
after a real interrupt, the frontier against a brute-force reference, every artifact reloaded in a
fresh process in its runtime, and bad sweep keys refused."""

import json
import math
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from minitron.common import MinitronError
from minitron.recipe import load_recipe
from minitron.sweep import frontier
from tiny import make_tiny_model

RECIPE = """\
name: tiny-sweep
output_dir: {out}
model:
  name: {model}
data:
  source: {source}
  block_size: 32
  calibration_blocks: 8
  eval_blocks: 4
prune:
  width_multiple: 1
distill:
  tokens: 256                # 4 steps of 2 x 32 tokens
  batch_size: 2
  block_size: 32
  eval_every: 4
  eval_blocks: 2
  checkpoint_every: 4
  progress: false
export:
  ppl_budget: 10.0           # a random tiny model: the INT8 budget is not what this test checks
  accuracy_level: 0
  gen_tokens: 8
evaluate:
  batch_size: 4
sweep:
  budgets: [0.8, 0.6]
  formats: [fp32, int8-blockwise]
"""
STAGES_PER_BUDGET = 5  # prune, distill, evaluate, 2 exports


def sweep_cmd(recipe, *overrides):
    return [sys.executable, "-m", "minitron.sweep", str(recipe), *overrides]


def corpus(path: Path) -> Path:
    """~30 kB of stdlib source as JSONL records (enough records for every split to get blocks;
    small, so that the data stage tokenizes it in seconds)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((stdlib / n).read_text() for n in ("textwrap.py", "shlex.py", "string.py"))
    text = text[:30_000]
    path.write_text("".join(json.dumps({"text": text[i:i + 600]}) + "\n"
                            for i in range(0, len(text), 600)))
    return path


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    make_tiny_model("llama", path=root / "teacher")
    recipe = root / "tiny.yaml"
    source = corpus(root / "corpus.jsonl")
    recipe.write_text(RECIPE.format(out=root / "runs", model=root / "teacher", source=source))
    return recipe, root / "runs" / "tiny-sweep"


def records(folder: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(folder)): json.loads(p.read_text())
            for p in folder.rglob("stage.json")}


@pytest.fixture(scope="module")
def interrupted_then_finished(tiny_recipe):
    """The sweep killed (SIGKILL) as soon as its first point is exported, then run again."""
    recipe, folder = tiny_recipe
    proc = subprocess.Popen(sweep_cmd(recipe), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    first = folder / "budget-0.8" / "export-fp32" / "stage.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if first.exists() and json.loads(first.read_text())["status"] == "done":
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    before = records(folder)
    done_before = {k for k, v in before.items() if v["status"] == "done"}
    result = subprocess.run(sweep_cmd(recipe), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return folder, before, done_before, result.stdout


def test_sweep_runs_end_to_end(interrupted_then_finished):
    folder, _, _, _ = interrupted_then_finished
    record = json.loads((folder / "sweep.json").read_text())
    assert [p["point"] for p in record["points"]] == ["0.8/fp32", "0.8/int8-blockwise",
                                                      "0.6/fp32", "0.6/int8-blockwise"]
    teacher = record["teacher"]
    for p in record["points"]:
        assert p["parameters"] <= p["budget"] * teacher["parameters"]
        assert Path(p["artifact"], "model.onnx").is_file()
        for key in ("perplexity", "size_mb", "prefill_ms_per_token", "kl_to_teacher"):
            assert math.isfinite(p[key]) and p[key] > 0, (p["point"], key)
        # The ratio is to the teacher measured on the same blocks by the same code.
        assert p["ppl_x_teacher"] == pytest.approx(p["perplexity"] / teacher["perplexity"])
    by = {p["point"]: p for p in record["points"]}
    assert by["0.6/fp32"]["parameters"] < by["0.8/fp32"]["parameters"]
    assert by["0.8/int8-blockwise"]["size_mb"] < by["0.8/fp32"]["size_mb"]
    # Each point's numbers are its own export report's row: reused, not measured again.
    report = json.loads(Path(by["0.6/int8-blockwise"]["artifact"], "report.json").read_text())
    row = next(r for r in report["rows"] if r.get("deployed"))
    assert row["perplexity"] == by["0.6/int8-blockwise"]["perplexity"]
    assert by["0.6/int8-blockwise"]["within_budget"] is row["within_budget"] is (not row["problems"])
    assert by["0.6/fp32"]["within_budget"] is None  # the reference: no gate
    for name in ("sweep.md", "frontier_size.png", "frontier_prefill.png", "recipe.yaml"):
        assert (folder / name).stat().st_size > 0
    md = (folder / "sweep.md").read_text()
    assert all(p in md for p in by) and "Pareto frontier" in md


def test_resume_redoes_no_finished_stage(interrupted_then_finished):
    folder, before, done_before, stdout = interrupted_then_finished
    after = records(folder)
    # Shared: data, importance, teacher; then 5 stages per budget.
    assert len(after) == 3 + 2 * STAGES_PER_BUDGET and all(v["status"] == "done" for v in after.values())
    assert "budget-0.8/export-fp32" in done_before and len(done_before) < len(after)
    for key in done_before:  # untouched: same record, same timing
        assert after[key] == before[key], key
    skipped = stdout.count("unchanged since the last run: skipped")
    assert skipped == len(done_before)
    assert stdout.count("] running in ") == len(after) - len(done_before)


def staircase(points, quality, cost):
    """Brute-force reference: sort by (cost, quality); a point is on the frontier when its quality
    is strictly below every earlier point's (ties on both keys: every copy stays)."""
    best, out = math.inf, []
    ordered = sorted(points, key=lambda p: (p[cost], p[quality]))
    for i, p in enumerate(ordered):
        twins = [q for q in ordered[:i] if q[cost] == p[cost] and q[quality] == p[quality]]
        if p[quality] < best or (twins and twins[0] in out):
            out.append(p)
        best = min(best, p[quality])
    return sorted(out, key=points.index)


def test_frontier_of_recorded_points_is_the_non_dominated_set(interrupted_then_finished):
    folder, *_ = interrupted_then_finished
    record = json.loads((folder / "sweep.json").read_text())
    for key, cost in record["costs"].items():
        expected = staircase(record["points"], "perplexity", cost)
        assert record["frontier"][key] == [p["point"] for p in expected], key
        assert record["frontier"][key]  # at least one point is measured on both axes


def test_frontier_on_hand_made_points():
    pts = [{"n": "a", "q": 1.0, "c": 9.0}, {"n": "b", "q": 2.0, "c": 5.0},
           {"n": "c", "q": 2.5, "c": 5.0},    # dominated by b (same cost, worse quality)
           {"n": "d", "q": 3.0, "c": 1.0}, {"n": "e", "q": 3.0, "c": 2.0},   # e dominated by d
           {"n": "f", "q": 1.0, "c": 9.0},    # a twin of a: neither dominates the other
           {"n": "g", "q": 0.5, "c": math.nan}]  # not measured on the cost: on no frontier
    assert [p["n"] for p in frontier(pts, ("q", "c"))] == ["a", "b", "d", "f"]
    assert frontier(pts, ("q", "c")) == staircase(pts[:-1], "q", "c")


def test_every_artifact_reloads_in_a_fresh_process(interrupted_then_finished):
    """Each ONNX folder in ONNX Runtime GenAI (its deployment runtime) generates the greedy tokens
    its report recorded; each budget's student checkpoint loads in plain transformers. One fresh
    process per runtime, with no minitron import."""
    folder, *_ = interrupted_then_finished
    record = json.loads((folder / "sweep.json").read_text())
    genai = """if True:
        import json, sys
        import onnxruntime_genai as og
        for folder in sys.argv[1:]:
            report = json.load(open(folder + "/report.json"))
            row = next(r for r in report["rows"] if r.get("deployed"))
            model = og.Model(folder)
            params = og.GeneratorParams(model)
            n = len(row["greedy_tokens"])
            params.set_search_options(do_sample=False, max_length=len(report["prompt_tokens"]) + n)
            gen = og.Generator(model, params)
            gen.append_tokens(report["prompt_tokens"])
            out = []
            while len(out) < n:
                gen.generate_next_token()
                out.append(int(gen.get_next_tokens()[0]))
            assert out == row["greedy_tokens"], (folder, out, row["greedy_tokens"])
            print("ok", folder)
        assert "minitron" not in sys.modules
    """
    artifacts = [p["artifact"] for p in record["points"]]
    r = subprocess.run([sys.executable, "-c", genai, *artifacts], capture_output=True, text=True,
                       timeout=300, cwd=folder)
    assert r.returncode == 0 and r.stdout.count("ok ") == 4, r.stderr[-2000:]
    students = sorted(str(p) for p in folder.glob("budget-*/2-distill/model"))
    assert len(students) == 2
    hf = """if True:
        import sys, torch
        from transformers import AutoModelForCausalLM
        for folder in sys.argv[1:]:
            m = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
            assert torch.isfinite(m(torch.tensor([[1, 2, 3]])).logits).all()
        assert "minitron" not in sys.modules
    """
    r = subprocess.run([sys.executable, "-c", hf, *students], capture_output=True, text=True,
                       timeout=300, cwd=folder)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("override, words", [
    ("sweep.formats=[fp32,int9]", ["sweep.formats", "int9", "int8-blockwise", "gguf-q8_0"]),
    ("sweep.budgets=[0.5,0.5]", ["sweep.budgets", "distinct"]),
    ("sweep.budgets=[]", ["sweep.budgets", "non-empty"]),
    ("sweep.budget=[0.5]", ["sweep.budget"]),
])
def test_bad_sweep_key_is_a_clear_error(tiny_recipe, override, words):
    recipe, _ = tiny_recipe
    with pytest.raises(MinitronError) as e:
        load_recipe(recipe, [override])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_sweep_refuses_a_fixed_shape_before_any_work(tiny_recipe, tmp_path):
    recipe, _ = tiny_recipe
    r = subprocess.run(sweep_cmd(recipe, "prune.hidden_size=32", f"output_dir={tmp_path}"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "sweep.budgets" in r.stderr and "prune.hidden_size=32" in r.stderr
    assert not (tmp_path / "tiny-sweep").exists()


def test_dry_run_prints_each_budgets_shape_within_its_budget(tiny_recipe, tmp_path, capsys):
    from minitron.models import param_count_from_config
    from minitron.sweep import main
    from tiny import tiny_config

    recipe, _ = tiny_recipe
    assert main([str(recipe), f"output_dir={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    source = param_count_from_config(tiny_config("llama"))
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 0.")]
    assert [float(r[1]) for r in rows] == [0.8, 0.6]
    header = [c.strip() for c in out.splitlines()[0].split("|")]
    for r in rows:
        assert int(r[header.index("parameters")]) <= float(r[1]) * source
    assert "2 budgets x 2 formats" in out and not (tmp_path / "tiny-sweep").exists()


def test_iterative_schedule_nests_its_shapes_and_ends_on_the_one_shot_shape(tiny_recipe):
    """sweep.iterative: the budgets largest first, each shape within its budget and at least the
    next one's in every dimension (so it can be pruned from it), the smallest the one-shot shape,
    and each step's distillation on the tokens after the ones before it."""
    from minitron.models import param_count_from_config
    from minitron.prune import target_for_budget
    from minitron.sweep import schedule
    from tiny import tiny_config

    recipe, _ = tiny_recipe
    config = tiny_config("llama")
    source = param_count_from_config(config)
    r = load_recipe(recipe, ["sweep.iterative=true", "sweep.budgets=[0.6,0.9,0.75]"])
    steps = schedule(r, config)
    assert [s.budget for s in steps] == [0.9, 0.75, 0.6]
    assert [s.parent for s in steps] == [None, 0.9, 0.75]
    assert [s.skip_tokens for s in steps] == [0, 256, 512]
    for big, small in zip(steps, steps[1:]):
        assert all(big.target[k] >= v for k, v in small.target.items()), (big, small)
    for s in steps:
        shape = {**config.to_dict(), **s.target}
        assert param_count_from_config(shape) <= s.budget * source
    assert steps[-1].target == target_for_budget(config, 0.6, r.prune.width_multiple)[0]
    whole = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
    with pytest.raises(MinitronError, match=r"prune.target_params 0.9 .* no shape of the grid fits "
                                            r"it and keeps at least hidden_size="):
        target_for_budget(config, 0.9, r.prune.width_multiple, floor=whole)
    one_shot = schedule(load_recipe(recipe), config)
    assert [(s.budget, s.parent, s.skip_tokens) for s in one_shot] == [(0.8, None, 0), (0.6, None, 0)]


def test_iterative_sweep_prunes_each_student_from_the_last_on_fresh_tokens(tiny_recipe, tmp_path):
    """Two budgets pruned in turn, with one teacher cache over both steps' tokens: the second
    student is cut from the first one's distilled student by scores taken on it, and trained on the
    train blocks after the first step's (the cache checks each batch's tokens at its rows)."""
    from safetensors.torch import load_file

    recipe, _ = tiny_recipe
    r = subprocess.run(sweep_cmd(recipe, f"output_dir={tmp_path}", "sweep.iterative=true",
                                 "sweep.teacher_cache=true", "sweep.formats=[fp32]",
                                 "evaluate.enabled=false"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    folder = tmp_path / "tiny-sweep"
    record = json.loads((folder / "sweep.json").read_text())
    first, second = record["points"]
    assert (first["point"], second["point"]) == ("0.8/fp32", "0.6/fp32")
    assert (first["pruned_from"], second["pruned_from"]) == ("source", "budget-0.8")
    assert (first["distill_tokens"], second["distill_tokens"]) == (256, 512)
    assert all(first["shape"][k] >= v for k, v in second["shape"].items())
    prune_out = json.loads((folder / "budget-0.6" / "1-prune" / "stage.json").read_text())
    parent = folder / "budget-0.8" / "2-distill" / "model"
    assert Path(prune_out["result"]["model_dir"]).is_dir()
    info = json.loads((folder / "budget-0.6" / "1-prune" / "model" / "minitron.json").read_text())
    assert Path(info["pruned_from"]) == parent
    # The second step's scores were taken on the first step's distilled student (its shape).
    scores = load_file(str(folder / "budget-0.6" / "0-importance" / "scores.safetensors"))
    parent_config = json.loads((parent / "config.json").read_text())
    assert tuple(scores["neurons"].shape) == (parent_config["num_hidden_layers"],
                                              parent_config["intermediate_size"])
    cache = json.loads((folder / "shared" / "3-teacher-cache" / "cache" / "manifest.json").read_text())
    assert cache["tokens"] == 512
    run = json.loads((folder / "budget-0.6" / "2-distill" / "model" / "minitron.json").read_text())
    assert run["distillation"]["config"]["skip_tokens"] == 256
    assert run["data"]["train_blocks"] == 16  # the 8 blocks the first step read, then its own 8


def test_iterative_sweep_refuses_one_budget(tiny_recipe, tmp_path):
    from minitron.sweep import main

    recipe, _ = tiny_recipe
    with pytest.raises(MinitronError, match=r"sweep.iterative=true prunes from one budget to the "
                                            r"next, but sweep.budgets=\[0.6\] has one"):
        main([str(recipe), f"output_dir={tmp_path}", "sweep.iterative=true", "sweep.budgets=[0.6]",
              "--dry-run"])
