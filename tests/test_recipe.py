"""Recipe schema: every shipped recipe validates and dry-runs offline; mistakes are named precisely."""

from pathlib import Path

import pytest

from minitron.common import MinitronError
from minitron.pipeline import dry_run
from minitron.recipe import RecipeError, load_recipe

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))

# Published sizes (arXiv:2408.11796): Llama-3.1-8B 8.0B -> 4.5B (width and depth),
# Mistral-NeMo 12.2B -> MN-Minitron 8.4B.
EXPECTED = {
    "llama-3.1-8b-to-4b-width.yaml": (8_030_261_248, 4_512_746_496,
                                      {"hidden_size": 3072, "intermediate_size": 9216,
                                       "num_hidden_layers": 32, "num_attention_heads": 32}),
    "llama-3.1-8b-to-4b-depth.yaml": (8_030_261_248, 4_540_469_248,
                                      {"hidden_size": 4096, "num_hidden_layers": 16}),
    "mistral-nemo-12b-to-8b.yaml": (12_247_782_400, 8_414_105_600,
                                    {"hidden_size": 4096, "intermediate_size": 11520,
                                     "num_hidden_layers": 40}),
}


def test_recipes_are_shipped():
    assert {p.name for p in RECIPES} >= {"demo.yaml", *EXPECTED}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_starts_with_the_command_that_runs_it(path):
    text = path.read_text()
    runner = "sweep" if "\nsweep:" in text else "run"  # a sweep section is minitron.sweep's
    head = text.splitlines()[:8]
    assert any(f"minitron.{runner} recipes/{path.name}" in line or "make demo" in line
               for line in head)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_shapes_dry_run_offline(name, capsys):
    before, after, shape = EXPECTED[name]
    plan = dry_run(load_recipe(Path("recipes") / name))
    assert plan["source_params"] == before
    assert plan["pruned_params"] == after
    assert shape.items() <= plan["pruned_shape"].items()
    assert f"{after:,} parameters" in capsys.readouterr().out


def test_demo_dry_run_halves_the_embedded_model():
    plan = dry_run(load_recipe("recipes/demo.yaml"))
    assert plan["source_params"] == 134_515_008
    assert 0.45 < plan["pruned_params"] / plan["source_params"] < 0.55
    assert plan["stages"] == ["data", "prune", "distill", "export", "evaluate"]  # stdlib: prepared first


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_typo_gets_a_suggestion(tmp_path):
    path = write(tmp_path, "distill:\n  temprature: 2\n")
    with pytest.raises(RecipeError, match=r"r.yaml: distill.temprature: unknown key; did you mean 'temperature'\?"):
        load_recipe(path)


def test_renamed_key_is_refused_with_its_new_name(tmp_path):
    from minitron import cli, export

    with pytest.raises(RecipeError, match=r"r.yaml: export.atol: renamed to 'export.fp32_rtol' "
                                          r"\(the FP32 graph's logit bound is now relative"):
        load_recipe(write(tmp_path, "export:\n  atol: 0.001\n"))
    with pytest.raises(RecipeError, match=r"command line: export.atol: renamed to 'export.fp32_rtol'"):
        cli.configs(cli.parse(export.build_parser(), ["--output", "o", "export.atol=0.001"]))


def test_unknown_section(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml: distil: unknown key; did you mean 'distill'\?"):
        load_recipe(write(tmp_path, "distil:\n  lr: 1\n"))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml: data.block_size: expected an integer, got 'long'"):
        load_recipe(write(tmp_path, "data:\n  block_size: long\n"))
    with pytest.raises(RecipeError, match=r"r.yaml: distill.async_checkpoint: expected true or "
                                          r"false, got 'yes please'"):
        load_recipe(write(tmp_path, "distill:\n  async_checkpoint: yes please\n"))


def test_bad_choice_lists_the_choices(tmp_path):
    with pytest.raises(RecipeError, match=r"export.int8: 'int4' is not one of 'blockwise', 'dynamic', 'static', 'smoothquant', 'none'"):
        load_recipe(write(tmp_path, "export:\n  int8: int4\n"))


def test_out_of_range_value_is_refused_at_load(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml: distill.temperature=-1.0 is invalid; valid: a number > 0"):
        load_recipe(write(tmp_path, "distill:\n  temperature: -1\n"))
    with pytest.raises(RecipeError, match=r"r.yaml: data.calibration_blocks=0 is invalid; valid: an integer >= 1"):
        load_recipe(write(tmp_path, "data:\n  calibration_blocks: 0\n"))


def test_overrides_are_typed(tmp_path):
    path = write(tmp_path, "name: x\n")
    r = load_recipe(path, ["distill.temperature=2", "distill.tokens=1e6", "export.enabled=false",
                           "prune.hidden_size=32"])
    assert r.distill.temperature == 2.0 and isinstance(r.distill.temperature, float)
    assert r.distill.tokens == 1_000_000 and isinstance(r.distill.tokens, int)
    assert r.export.enabled is False
    assert r.prune.target() == {"hidden_size": 32}
    with pytest.raises(RecipeError, match=r"with overrides distill.lr=fast\): distill.lr: expected a number, got 'fast'"):
        load_recipe(path, ["distill.lr=fast"])
    with pytest.raises(RecipeError, match="not of the form section.key=value"):
        load_recipe(path, ["distill.lr"])


def test_teacher_correction_lives_in_its_own_section(tmp_path):
    r = load_recipe(write(tmp_path, "teacher_correction:\n  tokens: 4096\n"))
    assert r.teacher_correction.tokens == 4096
    with pytest.raises(RecipeError, match="distill.teacher_correction_tokens: unknown key"):
        load_recipe(write(tmp_path, "distill:\n  teacher_correction_tokens: 5\n"))
    with pytest.raises(RecipeError, match=r"teacher_correction.tokens=5 corrects a teacher that the "
                                          r"'ce' baseline does not use"):
        load_recipe(write(tmp_path, "teacher_correction:\n  tokens: 5\ndistill:\n  baseline: ce\n"))


def test_missing_recipe_file_lists_shipped_ones():
    with pytest.raises(RecipeError, match="recipe file 'nope.yaml' not found; shipped recipes: .*demo.yaml"):
        load_recipe("nope.yaml")


def test_invalid_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "distill: [unclosed\n"))


@pytest.mark.parametrize("name", ["llama-3.1-8b-to-4b-width.yaml", "llama-3.1-8b-to-4b-depth.yaml",
                                  "mistral-nemo-12b-to-8b.yaml"])
def test_large_recipes_plan_with_export_on(name):
    """The width recipe's hidden 3072 with 32 heads of 128 is no longer refused by the export."""
    recipe = load_recipe(f"recipes/{name}")
    assert recipe.export.enabled
    assert "export" in dry_run(recipe)["stages"]


def test_evaluate_tasks_settings(tmp_path):
    recipe = load_recipe(write(tmp_path, "evaluate:\n  tasks: [minitron_words_and_code, arc_easy]\n"
                                         "  limit: 10\n  num_fewshot: 0\n"))
    assert (recipe.evaluate.tasks, recipe.evaluate.limit, recipe.evaluate.num_fewshot) == (
        ("minitron_words_and_code", "arc_easy"), 10, 0)
    # a comma-separated string is the same list (what `--tasks a,b` gives)
    assert load_recipe(write(tmp_path, "name: x\n"), ["evaluate.tasks=minitron_words_and_code, "
                       "arc_easy"]).evaluate.tasks == ("minitron_words_and_code", "arc_easy")
    with pytest.raises(RecipeError, match=r"evaluate\.limit=0 is invalid; valid: an integer >= 1"):
        load_recipe(write(tmp_path, "evaluate:\n  limit: 0\n"))
    with pytest.raises(RecipeError, match=r"evaluate\.num_fewshot=-1 is invalid; valid: an integer >= 0"):
        load_recipe(write(tmp_path, "evaluate:\n  num_fewshot: -1\n"))
    with pytest.raises(RecipeError, match=r"evaluate.tasks: expected a list, got 5"):
        load_recipe(write(tmp_path, "evaluate:\n  tasks: 5\n"))
