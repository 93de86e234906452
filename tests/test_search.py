"""Shape search within a parameter budget: only shapes that fit are enumerated (parameters counted
on models built from their configs), the kept shape is the one with the best held-out KL after the
short distillation (recomputed here in float64 from its saved model), and a rerun skips finished
candidates while an interrupted one resumes from its checkpoint."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from minitron.common import MinitronError
from minitron.config import (CacheConfig, DataConfig, DistillConfig, ImportanceConfig, ModelConfig,
                             PruneConfig, SearchConfig)
from minitron.importance import compute_scores
from minitron.prune import enumerate_shapes, main, pruner_inputs, save_searched, search_inputs
from minitron.search import RESULT, search
from tiny import VOCAB, make_tiny_model, tiny_config, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 16
# Small enough for the Triton interpreter: every loss and eval runs the real kernels on CPU.
SETTINGS = dict(tokens=64, band=0.25, max_shapes=3, score_blocks=1, eval_blocks=1)
DISTILL = DistillConfig(tokens=64, batch_size=2, block_size=BLOCK, lr=2e-3, warmup_fraction=0.0,
                        eval_every=2, eval_blocks=1, checkpoint_every=1, progress=False)


def blocks(n, seed):
    return torch.randint(0, VOCAB, (n, BLOCK), generator=torch.Generator().manual_seed(seed))


def make_inputs(teacher):
    scores = compute_scores(teacher, blocks(4, 1), 4)
    return pruner_inputs(teacher, tiny_tokenizer(), scores, blocks(2, 2), blocks(4, 3),
                         blocks(2, 4)), scores


def run_search(work, teacher, inputs, candidates):
    settings = SearchConfig(candidates=candidates, **SETTINGS)
    shapes = enumerate_shapes(teacher.config, 0.6, settings)
    return search(work, inputs, shapes, 0.6, settings, DISTILL)


@torch.no_grad()
def kl_float64(student, teacher, ids):
    """Mean over every position of KL(teacher || student), from the two models' logits in float64."""
    s = torch.log_softmax(student(ids).logits.double(), -1)
    t = torch.log_softmax(teacher(ids).logits.double(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


# ----------------------------------------------------------------------------- enumeration
def test_every_enumerated_shape_fits_the_budget_counted_on_a_built_model():
    from transformers import AutoModelForCausalLM

    config = tiny_config()
    source = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    settings = SearchConfig(candidates=1, band=0.3, max_shapes=1000)
    shapes = enumerate_shapes(config, 0.6, settings)
    assert len(shapes) > 10
    for shape in shapes:
        fields = {k: shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                        "num_key_value_heads", "num_hidden_layers")}
        model = AutoModelForCausalLM.from_config(tiny_config(**fields))
        n = sum(p.numel() for p in model.parameters())  # untied: every tensor once
        assert 0.7 * 0.6 * source <= n <= 0.6 * source, shape
        assert n == shape["params"], shape
        assert fields["num_attention_heads"] % fields["num_key_value_heads"] == 0
    # Every axis is searched: widths, MLP, heads, KV groups and depth all vary.
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers"):
        assert len({s[key] for s in shapes}) > 1, key
    assert len({s["name"] for s in shapes}) == len(shapes)
    # Without depth, every shape keeps all layers; a cap keeps the largest shapes.
    wide = enumerate_shapes(config, 0.6, SearchConfig(candidates=1, band=0.3, depth=False))
    assert {s["num_hidden_layers"] for s in wide} == {4}
    top = enumerate_shapes(config, 0.6, SearchConfig(candidates=1, band=0.3, max_shapes=5))
    assert [s["params"] for s in top] == sorted((s["params"] for s in shapes), reverse=True)[:5]


def test_a_band_with_no_shape_is_refused_naming_the_key():
    with pytest.raises(MinitronError, match=r"search.band=0.0001: no shape lies between .*widen "
                                            r"search.band"):
        enumerate_shapes(tiny_config(), 0.6, SearchConfig(candidates=1, band=0.0001))


def test_search_without_a_budget_is_refused(tmp_path):
    make_tiny_model(path=tmp_path / "teacher")
    with pytest.raises(MinitronError, match=r"search.candidates=2 searches within a parameter "
                                            r"budget: give prune.target_params"):
        main(["--model", str(tmp_path / "teacher"), "--search", "2", "--output",
              str(tmp_path / "out"), "prune.hidden_size=32"])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the choice
@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    teacher = make_tiny_model()
    inputs, scores = make_inputs(teacher)
    record = run_search(root / "work", teacher, inputs, candidates=3)
    save_searched(record, root / "pruned", scores)
    return root, teacher, inputs, record


def test_the_kept_shape_has_the_best_held_out_kl_after_the_short_distillation(searched):
    from transformers import AutoModelForCausalLM

    root, teacher, inputs, record = searched
    results = [json.loads(p.read_text()) for p in sorted((root / "work").glob(f"*/{RESULT}"))]
    assert len(results) == 3 and all(r["tokens"] == 64 for r in results)
    best = min(results, key=lambda r: r["kl_after"])
    assert record["chosen"]["name"] == best["name"]
    assert [r["name"] for r in record["ranking"]][0] == best["name"]
    # Its held-out KL, recomputed in float64 from the distilled model reloaded by transformers.
    distilled = AutoModelForCausalLM.from_pretrained(best["distilled_dir"]).eval()
    assert kl_float64(distilled, teacher, inputs.eval_blocks) == pytest.approx(best["kl_after"],
                                                                               rel=1e-4)
    # The kept checkpoint is the chosen candidate's pruned (not distilled) model, with the ranking.
    kept = AutoModelForCausalLM.from_pretrained(root / "pruned")
    pruned = AutoModelForCausalLM.from_pretrained(best["model_dir"])
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(),
                                                 pruned.state_dict().values()))
    meta = json.loads((root / "pruned" / "minitron.json").read_text())
    assert meta["search"]["chosen"] == best["name"] and len(meta["search"]["rows"]) == 3
    assert (root / "work" / "search.png").stat().st_size > 0


def test_zero_shot_scores_are_the_pruned_models_kl_on_calibration_blocks(searched):
    root, teacher, inputs, record = searched
    shape = record["shapes"][0]
    target = {k: shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                    "num_key_value_heads", "num_hidden_layers")}
    expected = kl_float64(inputs.prune(target), teacher, inputs.calibration[:1])
    assert shape["zero_shot_kl"] == pytest.approx(expected, rel=1e-4)
    assert [s["zero_shot_rank"] for s in record["shapes"]] == [1, 2, 3]
    assert record["shapes"] == sorted(record["shapes"], key=lambda s: s["zero_shot_kl"])


# ----------------------------------------------------------------------------- resume
class Interrupted(Exception):
    pass


def test_rerun_skips_finished_candidates_and_resumes_an_interrupted_one(tmp_path, monkeypatch,
                                                                        capsys):
    import minitron.distill

    teacher = make_tiny_model(seed=1)
    inputs, _ = make_inputs(teacher)
    real, calls = minitron.distill.distill, []

    def counting(*args, **kwargs):
        calls.append(Path(args[5]).parent.name)
        if interrupt and len(calls) == 2:  # the second candidate stops after its last step, before
            def stop(step):  # its result is written (a checkpoint waits for the next step's checks)
                if step == 2:
                    raise Interrupted(step)
            kwargs["on_step"] = stop
        return real(*args, **kwargs)

    monkeypatch.setattr(minitron.distill, "distill", counting)
    interrupt = True
    with pytest.raises(Interrupted):
        run_search(tmp_path, teacher, inputs, candidates=2)
    first, second = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert (first / RESULT).exists() and not (second / RESULT).exists()
    saved = json.loads((second / "distill" / "checkpoint" / "state.json").read_text())["step"]
    assert saved >= 1
    stamp = (first / RESULT).stat().st_mtime_ns

    interrupt, calls[:] = False, []
    capsys.readouterr()
    record = run_search(tmp_path, teacher, inputs, candidates=2)
    out = capsys.readouterr().out
    assert calls == [second.name]  # the finished candidate was not distilled again
    assert (first / RESULT).stat().st_mtime_ns == stamp
    assert f"resuming from step {saved}/2" in out and "zero-shot scores of 3 shapes: reused" in out
    assert len(record["ranking"]) == 2 and (second / RESULT).exists()

    calls[:] = []
    again = run_search(tmp_path, teacher, inputs, candidates=2)
    assert calls == [] and again["chosen"]["name"] == record["chosen"]["name"]


# ----------------------------------------------------------------------------- from prepared data
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A few stdlib files tokenized once into prepared shards, and a tiny teacher saved beside."""
    from minitron.shards import prepare

    root = tmp_path_factory.mktemp("shards")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((stdlib / n).read_text() for n in ("textwrap.py", "string.py", "shlex.py",
                                                          "fnmatch.py", "bisect.py", "heapq.py"))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text[i:i + 1000]}) + "\n"
                              for i in range(0, len(text), 1000)))
    prepare(str(corpus), root / "shards", tiny_tokenizer(), workers=1, progress=False)
    make_tiny_model(path=root / "teacher")
    return root / "shards", root / "teacher"


def test_short_runs_from_a_full_teacher_cache_match_the_online_teacher(shards, tmp_path):
    """With k = V the cache holds the teacher's whole distribution: the search built on it (one
    cache for every candidate) trains and ranks as the online teacher does."""
    data, teacher_dir = shards
    teacher = make_tiny_model()  # the same weights as the saved one
    sections = {"data": DataConfig(source=str(data), block_size=BLOCK, calibration_blocks=4),
                "importance": ImportanceConfig(batch_size=4), "prune": PruneConfig(target_params=0.6),
                "search": SearchConfig(candidates=1, **{**SETTINGS, "max_shapes": 1}),
                "distill": DISTILL, "model": ModelConfig(),
                "teacher_cache": CacheConfig(k=VOCAB, dtype="float32", progress=False)}
    inputs, _, _ = search_inputs(teacher, tiny_tokenizer(), str(teacher_dir), sections,
                                 tmp_path / "work")
    shapes = enumerate_shapes(teacher.config, 0.6, sections["search"])
    cached = search(tmp_path / "work", inputs, shapes, 0.6, sections["search"], DISTILL)
    online_settings = SearchConfig(candidates=1, teacher_cache=False,
                                   **{**SETTINGS, "max_shapes": 1})
    online = search(tmp_path / "online", inputs, shapes, 0.6, online_settings, DISTILL)
    assert cached["teacher"] == f"cache {tmp_path / 'work' / 'teacher_cache'}"
    assert online["teacher"] == "online"
    manifest = json.loads((tmp_path / "work" / "teacher_cache" / "manifest.json").read_text())
    assert manifest["k"] == VOCAB and manifest["tokens"] == 64
    a, b = cached["chosen"], online["chosen"]
    assert a["name"] == b["name"]
    assert a["kl_before"] == pytest.approx(b["kl_before"], rel=1e-6)
    assert a["kl_after"] == pytest.approx(b["kl_after"], rel=1e-4)
    assert a["kl_after"] != a["kl_before"]  # the short run trained


RECIPE = """\
name: searched
output_dir: {out}
model: {{name: {teacher}}}
data: {{source: {data}, block_size: 16, calibration_blocks: 4, eval_blocks: 2}}
importance: {{batch_size: 4}}
prune: {{target_params: 0.6}}
search: {{candidates: 2, tokens: 64, band: 0.25, max_shapes: 2, score_blocks: 1, eval_blocks: 1}}
distill: {{tokens: 64, batch_size: 2, block_size: 16, eval_every: 2, eval_blocks: 1,
          checkpoint_every: 2, progress: false}}
teacher_cache: {{progress: false}}
export: {{enabled: false}}
evaluate: {{speed: false}}
"""


def test_a_recipe_chooses_its_shape_by_search_and_the_report_says_why(shards, tmp_path):
    from minitron.pipeline import run
    from minitron.recipe import load_recipe

    data, teacher_dir = shards
    path = tmp_path / "searched.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "runs", teacher=teacher_dir, data=data))
    report = run(load_recipe(path))
    run_dir = tmp_path / "runs" / "searched"
    ranking = json.loads((run_dir / "1-prune" / "search" / "ranking.json").read_text())
    chosen = ranking["chosen"]
    assert chosen["kl_after"] == min(r["kl_after"] for r in ranking["ranking"])
    assert ranking["teacher"].startswith("cache ")
    # The chosen candidate's checkpoint is what the later stages trained and measured.
    pruned = next(m for m in report["models"] if m["model"] == "pruned")
    assert pruned["parameters"] == chosen["params"]
    config = json.loads((run_dir / "1-prune" / "model" / "config.json").read_text())
    assert {k: config[k] for k in chosen["shape"]} == chosen["shape"]
    md = (run_dir / "report.md").read_text()
    assert "## Shape search" in md and f"**Why {chosen['name']} won:**" in md
    assert f"| 1 | {chosen['name']} |" in md and "![candidates" in md
    assert (run_dir / "search.png").stat().st_size > 0
