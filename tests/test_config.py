"""One definition per setting: every key of every stage config reaches the stage's command and the
recipe with the same default; the installed commands fail in one line; no torch to read a recipe."""

import dataclasses
import json
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest

from minitron import cli
from minitron.common import MinitronError
from minitron.config import COMMAND_SECTIONS, SECTIONS, Section, docs, literal_choices
from minitron.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
# The stage commands, the settings they take, and the path flags they need to parse.
STAGES = {
    "prune": ([],),
    "distill": (["--student", "s", "--output", "o"],),
    "export": (["--output", "o"],),
    "evaluate": ([],),
    "teacher_cache": (["--model", "m", "--output", "o"],),
}
# Keys that only a recipe sets: whether a stage runs, and the model that the stage commands take
# as a path flag (--model, --teacher) or a dry run reads.
# Settings that need another one set with them (per-channel scales exist for dynamic/static INT8).
COMPANIONS = {("export", "per_channel"): {"int8": "dynamic"},
              ("distill", "nnodes"): {"rdzv_endpoint": "127.0.0.1:29500"}}
# data.workers: the data stage of a recipe; `minitron.data prepare` has its own --workers.
# The sweep section: `minitron.sweep` takes a recipe (and its overrides), like `minitron.run`.
RECIPE_ONLY = {"model.name", "model.config", "data.workers"} | {
    f"{s}.enabled" for s, cls in SECTIONS.items() if "enabled" in {f.name for f in dataclasses.fields(cls)}} | {
    f"sweep.{f.name}" for f in dataclasses.fields(SECTIONS["sweep"])}


def _stage(name):
    import importlib

    return importlib.import_module(f"minitron.{name}")


def _parser(name):
    return _stage(name).build_parser()


def _other_value(cls: type[Section], key: str):
    """A valid value of `cls.key` that is not its default (checked by constructing the class)."""
    hint = typing.get_type_hints(cls)[key]
    default = getattr(cls(), key)
    kinds = {hint, *typing.get_args(hint)}
    candidates = list(literal_choices(hint))
    if bool in kinds:
        candidates.append(not default)
    if str in kinds:
        candidates += ["cpu", f"{default}_x"]
    if int in kinds:
        candidates += [2, 3, (default or 0) + 1, (default or 1) * 2]
    if float in kinds:
        candidates += [0.5, 0.25, 2.0, (default or 1.0) * 2]
    if key == "intermediate":
        candidates.append(((1, 0),))
    if key == "tasks":
        candidates.append(("minitron_words_and_code",))
    for value in candidates:
        if value == default or value is None:
            continue
        try:
            cls(**{**COMPANIONS.get((cls.SECTION, key), {}), key: value})
        except MinitronError:
            continue
        return value
    raise AssertionError(f"no valid non-default value found for {cls.SECTION}.{key}")


def _cases():
    for stage in STAGES:
        for section, d in cli.exposed(_stage(stage).CLI_KEYS):
            yield pytest.param(stage, section, d["key"], id=f"{stage}:{section}.{d['key']}")


def test_config_and_recipe_import_no_torch():
    code = ("import sys, minitron.config, minitron.recipe, minitron.cli; "
            "sys.exit(int('torch' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_every_key_is_reachable_from_some_stage_or_is_recipe_only():
    exposed = {f"{s}.{d['key']}" for stage in STAGES for s, d in cli.exposed(_stage(stage).CLI_KEYS)}
    every = {f"{s}.{d['key']}" for s, cls in SECTIONS.items() for d in docs(cls)}
    assert every - exposed == RECIPE_ONLY
    # and every key of every section is a recipe key with the same class
    recipe = {f.name: f.type for f in dataclasses.fields(Recipe)}
    assert {s: typing.get_type_hints(Recipe)[s] for s in SECTIONS} == SECTIONS and set(SECTIONS) <= set(recipe)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_defaults_are_the_recipe_defaults(stage):
    args = cli.parse(_parser(stage), STAGES[stage][0])
    configs = cli.configs(args)
    for section, config in configs.items():
        assert config == getattr(Recipe(), section), section


@pytest.mark.parametrize("stage, section, key", list(_cases()))
def test_every_key_is_settable_from_the_command_and_the_recipe(stage, section, key, tmp_path):
    cls = SECTIONS[section]
    value = _other_value(cls, key)
    text = cli._show(value)
    with_it = [f"{section}.{k}={v}" for k, v in COMPANIONS.get((section, key), {}).items()]
    parser = _parser(stage)
    assert f"  {section}.{key}={cli._show(getattr(cls(), key))}" in parser.format_help()
    got = cli.configs(cli.parse(parser, [*STAGES[stage][0], *with_it, f"{section}.{key}={text}"]))
    assert getattr(got[section], key) == value
    alias = cli._aliases(_stage(stage).CLI_KEYS).get(f"{section}.{key}")
    if alias:
        argv = [alias if value else f"--no-{alias[2:]}"] if isinstance(value, bool) else [alias, text]
        got = cli.configs(cli.parse(_parser(stage), [*STAGES[stage][0], *with_it, *argv]))
        assert getattr(got[section], key) == value
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\n")
    loaded = load_recipe(recipe, [*with_it, f"{section}.{key}={text}"])
    assert getattr(getattr(loaded, section), key) == value


@pytest.mark.parametrize("stage", STAGES)
def test_command_refuses_a_key_it_does_not_take(stage):
    with pytest.raises(MinitronError, match=r"command line: model.name: unknown key"):
        cli.configs(cli.parse(_parser(stage), [*STAGES[stage][0], "model.name=x"]))


def test_torchrun_children_rebuild_the_same_settings():
    from minitron.config import DataConfig, DistillConfig, ModelConfig, TeacherCorrectionConfig
    from minitron.distill import CLI_KEYS, build_parser

    sections = {"distill": DistillConfig(tokens=4096, intermediate=((3, 1),), baseline=None,
                                         teacher_device="cpu", lr=3e-4, progress=False),
                "teacher_correction": TeacherCorrectionConfig(tokens=512, lr=1e-5),
                "data": DataConfig(source="a folder/with: colon", text_field="body"),
                "model": ModelConfig(dtype="bfloat16", device="cpu")}
    argv = ["--student", "s", "--output", "o", *cli.as_overrides(sections, CLI_KEYS)]
    got = cli.configs(cli.parse(build_parser(), argv))
    for name in CLI_KEYS:
        keys = [d["key"] for s, d in cli.exposed({name: CLI_KEYS[name]})]
        assert {k: getattr(got[name], k) for k in keys} == {k: getattr(sections[name], k) for k in keys}


# ----------------------------------------------------------------------------- installed commands
def _scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(_scripts()))
def test_console_script_bad_key_is_one_line_and_exit_2(name, tmp_path):
    """Through the installed entry point (the function pyproject names), in a fresh process."""
    args = {"minitron": [str(ROOT / "recipes" / "demo.yaml"), "nosuch.key=1"],
            "minitron-distill": ["--student", "s", "--output", "o", "nosuch.key=1"],
            "minitron-export": ["--output", "o", "nosuch.key=1"]}.get(name, ["nosuch.key=1"])
    code = ("import sys; from importlib.metadata import entry_points; "
            f"(ep,) = [e for e in entry_points(group='console_scripts') if e.name == {name!r}]; "
            f"assert ep.value == {_scripts()[name]!r}, 'stale install: pip install -e . again'; "
            f"sys.argv = [{name!r}, *{args!r}]; sys.exit(ep.load()())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nosuch.key" in lines[0], lines


def test_readme_command_table_matches_help():
    """Every `section.key` and flag the README's command table names is in that command's --help."""
    import re

    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Commands")
    table = readme[start:readme.index("\n## ", start)]
    rows = re.findall(r"^\| `python -m (minitron\.\w+) ([^`]*)`", table, re.M)
    assert {m for m, _ in rows} == {"minitron.run", "minitron.data", "minitron.prune",
                                    "minitron.distill", "minitron.export", "minitron.evaluate",
                                    "minitron.teacher_cache", "minitron.sweep"}
    for module, usage in rows:
        first = usage.split()[0]
        sub = [first] if first.islower() and not first.startswith("-") else []  # `data prepare`
        helptext = subprocess.run([sys.executable, "-m", module, *sub, "--help"], capture_output=True,
                                  text=True, cwd=ROOT, timeout=120).stdout
        for word in re.findall(r"--[a-z][\w-]*|\b[a-z_]+\.[a-z_]+(?==)", usage):
            assert word in helptext, (module, word)



DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# What `name.suffix` also is in the pages: files, and the placeholder of `prepare.key=value`.
NOT_KEYS = {"md", "json", "jsonl", "png", "onnx", "yaml", "safetensors", "gguf", "bin", "key"}


def test_every_setting_the_docs_name_exists():
    """A `section.key` named in the README or docs/ is a field of that section's dataclass (a
    renamed or removed setting fails here, not in a reader's first run)."""
    import re

    fields = {name: {f.name for f in dataclasses.fields(cls)}
              for name, cls in COMMAND_SECTIONS.items()}
    key = re.compile(rf"(?<![\w./-])({'|'.join(COMMAND_SECTIONS)})\.([a-z_][a-z0-9_]*)(?![\w(/])")
    unknown = [(page.name, f"{section}.{name}") for page in DOCS
               for span in re.findall(r"`([^`]+)`", page.read_text())
               for section, name in key.findall(span)
               if name not in fields[section] and name not in NOT_KEYS]
    assert not unknown


def test_docs_links_reach_their_files_and_headings():
    """Every relative link in the README and docs/ names a file that exists, and its #anchor a
    heading of that file (GitHub's slugs: lower case, punctuation dropped, spaces to dashes)."""
    import re

    def slugs(page: Path) -> set[str]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", text, re.M)}

    broken = []
    for page in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (anchor and anchor not in slugs(dest)):
                broken.append((page.name, target))
    assert not broken


# ----------------------------------------------------------------------------- reaching the stages
@pytest.fixture(scope="module")
def body_corpus(tmp_path_factory):
    """A JSONL corpus whose text is under "body": a stage that drops data.text_field finds no "text"."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((stdlib / n).read_text() for n in ("json/decoder.py", "textwrap.py",
                                                           "string.py", "shlex.py", "csv.py"))
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": text[i:i + 1500]}) + "\n"
                            for i in range(0, len(text), 1500)))
    return path


@pytest.fixture
def loaded(monkeypatch):
    """The parameter dtype of every model a stage loads (the real loader runs; this only looks)."""
    import minitron.evaluate
    import minitron.models

    seen: list[tuple[str, object]] = []
    real = minitron.models.load_model

    def look(name, *a, **k):
        model, tokenizer = real(name, *a, **k)
        seen.append((Path(str(name)).name, next(model.parameters()).dtype))
        return model, tokenizer

    monkeypatch.setattr(minitron.models, "load_model", look)
    monkeypatch.setattr(minitron.evaluate, "load_model", look)
    return seen


def test_text_field_and_dtype_reach_prune_distill_and_evaluate(body_corpus, loaded, tmp_path):
    import torch
    from tiny import make_tiny_model

    from minitron.distill import main as distill_main
    from minitron.evaluate import main as evaluate_main
    from minitron.prune import main as prune_main

    make_tiny_model("llama", path=tmp_path / "teacher")
    data = [f"data.source={body_corpus}", "data.text_field=body"]
    with pytest.raises(MinitronError, match=r"no field 'text' \(text_field\)"):  # the control
        prune_main(["--model", str(tmp_path / "teacher"), "--output", str(tmp_path / "x"),
                    "prune.num_hidden_layers=2", f"data.source={body_corpus}"])
    assert prune_main(["--model", str(tmp_path / "teacher"), "--output", str(tmp_path / "pruned"),
                       "prune.num_hidden_layers=2", "data.calibration_blocks=2", "--block-size",
                       "16", "--dtype", "bfloat16", *data]) == 0
    assert loaded[-1] == ("teacher", torch.bfloat16)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "pruned" / "model.safetensors").values()} == {
        torch.bfloat16}

    assert distill_main(["--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "pruned"),
                         "--output", str(tmp_path / "distilled"), "--tokens", "64", "--batch-size",
                         "2", "--block-size", "16", "distill.eval_blocks=2", "--no-progress",
                         "--dtype", "bfloat16", "--device", "cpu", *data]) == 0
    # the student trains in float32; the teacher is loaded in model.dtype
    assert loaded[-2:] == [("teacher", torch.bfloat16), ("pruned", torch.float32)]
    info = json.loads((tmp_path / "distilled" / "minitron.json").read_text())
    assert info["data"]["source"] == str(body_corpus)

    out = tmp_path / "eval.json"
    assert evaluate_main(["--model", str(tmp_path / "distilled"), "--teacher",
                          str(tmp_path / "teacher"), "data.eval_blocks=2", "--block-size", "16",
                          "--no-speed", "--dtype", "bfloat16", "--json", str(out), *data]) == 0
    assert loaded[-2:] == [("distilled", torch.bfloat16), ("teacher", torch.bfloat16)]
    assert json.loads(out.read_text())["tokens"] == 2 * 15


def test_text_field_reaches_export(body_corpus, tmp_path):
    from tiny import make_tiny_model

    from minitron.export import main as export_main

    make_tiny_model("llama", path=tmp_path / "m")
    argv = ["--model", str(tmp_path / "m"), "--output", str(tmp_path / "onnx"), "--int8", "none",
            "--no-compare", "--no-speed", "--eval-blocks", "2", "--block-size", "16",
            "--gen-tokens", "4", f"data.source={body_corpus}"]
    with pytest.raises(MinitronError, match=r"no field 'text' \(text_field\)"):  # the control
        export_main(argv)
    assert export_main([*argv, "--text-field", "body"]) == 0
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["settings"]["data"]["text_field"] == "body"


def test_no_import_cycle_anywhere():
    """No minitron module imports, at any level (top or inside a function), one that leads back."""
    import ast

    graph = {}
    for path in [*(ROOT / "minitron").glob("*.py"), *(ROOT / "minitron" / "kernels").glob("*.py")]:
        package = "minitron" if path.parent.name == "minitron" else "minitron.kernels"
        name = package if path.stem == "__init__" else f"{package}.{path.stem}"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minitron"):
                deps |= ({f"minitron.{a.name}" for a in node.names} if node.module == "minitron"
                         else {node.module})
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("minitron")}
        graph[name] = deps - {name}

    def reaches(start, node, seen):
        for dep in graph.get(node, ()):
            if dep == start:
                return [node]
            if dep not in seen:
                seen.add(dep)
                path = reaches(start, dep, seen)
                if path:
                    return [node, *path]
        return None

    for module in graph:
        cycle = reaches(module, module, set())
        assert cycle is None, " -> ".join([*cycle, module])


def test_repository_root_does_not_shadow_installed_packages():
    """Python started in the repository root puts it first on sys.path: no top-level folder there
    may take the name of a package others import (transformers 5 probes Hugging Face's `kernels`)."""
    proc = subprocess.run([sys.executable, "-c", "import transformers, minitron.kernels; "
                           "import importlib.util as u; print(u.find_spec('kernels') is None or "
                           "'minitron' not in (u.find_spec('kernels').origin or ''))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "True"
    assert not (ROOT / "kernels").exists()
