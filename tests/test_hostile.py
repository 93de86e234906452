"""Hostile inputs: every bad file, path, tokenizer and number is refused before any work, with one
line naming the offending thing, exit code 2, no traceback, and earlier artifacts untouched.

Most cases run the stage's real `main` through `run_cli` (the installed commands' wrapper) in this
process; a few run `python -m ...` in a fresh process, where the exit code and the absence of a
traceback (or of an interactive prompt) can only be seen from outside.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minitron import data as data_cli
from minitron import distill, evaluate, export, pipeline, prune
from minitron.common import MinitronError, run_cli
from minitron.config import COMMAND_SECTIONS, SECTIONS, _base_type, literal_choices
from tiny import VOCAB, make_tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def refused(main, argv, capsys) -> str:
    """Run a stage command; assert it refused with one line, exit 2 and no traceback; the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    assert e.value.code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def cli(module: str, *args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """`python -m module args` in a fresh process, offline, with no terminal to answer a prompt."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd or ROOT, stdin=subprocess.DEVNULL,
                          timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "src"
    make_tiny_model("llama", path=path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _recipe(tmp_path: Path, **sections) -> Path:
    body = {"name": "r", "output_dir": str(tmp_path / "runs"),
            "distill": {"tokens": 512, "batch_size": 1, "block_size": 16}, **sections}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


# ----------------------------------------------------------------------------- 1. broken weights
def test_truncated_or_corrupt_weights_are_refused_by_every_stage(src, tmp_path, capsys):
    broken = _copy(src, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted copy
    before = snapshot(broken)
    runs = tmp_path / "runs"
    recipe = _recipe(tmp_path, model={"name": str(broken)}, data={"source": str(ROOT / "README.md")})
    for main, argv in [
        (prune.main, ["--model", broken, "--output", tmp_path / "p", "prune.num_hidden_layers=2"]),
        (distill.main, ["--teacher", src, "--student", broken, "--output", tmp_path / "d"]),
        (export.main, ["--model", broken, "--output", tmp_path / "e"]),
        (evaluate.main, ["--model", broken, "--json", tmp_path / "r.json"]),
        (pipeline.main, [recipe]),
    ]:
        line = refused(main, argv, capsys)
        assert f"weights file {weights} is truncated" in line, line
        assert "header describes" in line and "the file holds" in line
    assert not any((tmp_path / n).exists() for n in ("p", "d", "e", "r.json")) and not runs.exists()
    assert snapshot(broken) == before

    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    line = refused(prune.main, ["--model", broken, "--dry-run", "prune.num_hidden_layers=2"], capsys)
    assert f"weights file {weights} has a corrupt header" in line

    # A sharded checkpoint: a shard the index lists is missing, another is truncated.
    sharded = tmp_path / "sharded"
    make_tiny_model("llama", seed=1).save_pretrained(sharded, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(sharded)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3
    whole = shards[0].read_bytes()
    shards[0].write_bytes(whole[:1000])
    line = refused(evaluate.main, ["--model", sharded], capsys)
    assert f"weights file {shards[0]} is truncated" in line
    shards[0].write_bytes(whole)
    shards[1].unlink()
    line = refused(evaluate.main, ["--model", sharded], capsys)
    assert f"weights file {shards[1]} is missing (listed in model.safetensors.index.json)" in line

    # A truncated tokenizer.json (the tokenizers library would raise a bare Exception).
    tok = _copy(src, tmp_path / "badtok") / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:500])
    line = refused(evaluate.main, ["--model", tok.parent], capsys)
    assert f"tokenizer file {tok} cannot be read as JSON" in line

    # The installed command, in a fresh process: one line, exit 2, no traceback.
    weights.write_bytes(src.joinpath("model.safetensors").read_bytes()[:-1])
    r = cli("minitron.prune", "--model", broken, "--dry-run", "prune.num_hidden_layers=2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: model '{broken}': weights file {weights} is truncated: its header describes "
        f"{weights.stat().st_size + 1} bytes, the file holds {weights.stat().st_size} (an "
        f"interrupted download or copy?)"]


# ----------------------------------------------------------------------------- 2. tokenizers
def _other_tokenizer():
    """A byte-level BPE of the same size as tiny_tokenizer's, trained on other text: the same
    vocabulary size, other ids."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / n).read_text() for n in ("argparse.py", "shutil.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|endoftext|>")


def test_tokenizers_must_match_beyond_their_size(src, tmp_path, capsys):
    other_ids = tmp_path / "other_ids"
    make_tiny_model("llama", path=other_ids, seed=1)
    other = _other_tokenizer()
    assert len(other) == len(tiny_tokenizer())  # the old size check would let it through
    other.save_pretrained(other_ids)
    line = refused(distill.main, ["--teacher", src, "--student", other_ids,
                                  "--output", tmp_path / "d"], capsys)
    assert f"the tokenizers of teacher '{src}' and student '{other_ids}' differ: the probe text" in line
    assert "tokenizes differently" in line and "distillation needs the same tokenizer" in line
    assert not (tmp_path / "d").exists()

    other_bos = tmp_path / "other_bos"  # the same ids for text, another bos token
    make_tiny_model("llama", path=other_bos, seed=1)
    tok = tiny_tokenizer()
    tok.save_pretrained(other_bos)
    cfg = json.loads((other_bos / "tokenizer_config.json").read_text())
    cfg["bos_token"] = "Ġ"
    (other_bos / "tokenizer_config.json").write_text(json.dumps(cfg))
    (other_bos / "special_tokens_map.json").unlink(missing_ok=True)
    line = refused(evaluate.main, ["--model", other_bos, "--teacher", src], capsys)
    assert "the bos tokens differ ('<|endoftext|>' id 0 vs 'Ġ' id" in line, line

    bigger = tmp_path / "bigger"  # evaluate --teacher with another vocabulary size: no KL printed
    make_tiny_model("llama", path=bigger, vocab_size=500)
    line = refused(evaluate.main, ["--model", src, "--teacher", bigger], capsys)
    assert f"the teacher '{bigger}' has a vocabulary of 500 entries, the student '{src}' " \
           f"{VOCAB}; agreement with a teacher needs the same tokenizer" in line


# ----------------------------------------------------------------------------- 3. number ranges
def _out_of_range(tp, rule) -> list:
    """Values of the field's type that its rule refuses (ints for ints)."""
    candidates = [-1, 0, 2**32, -(2**40)] if _base_type(tp) is int else [-1.0, 0.0, 1.5, math.nan,
                                                                          math.inf]
    bad = []
    for v in candidates:
        try:
            if not rule.ok(v):
                bad.append(v)
        except TypeError:
            pass
    return bad


def _numeric_keys(keys: dict) -> list[tuple[str, str, object]]:
    from minitron.cli import exposed

    out = []
    for section, d in exposed(keys):
        tp = d["type"]
        if _base_type(tp) in (int, float) and not literal_choices(tp):
            field = next(f for f in dataclasses.fields(COMMAND_SECTIONS[section])
                         if f.name == d["key"])
            rule = field.metadata.get("valid")
            assert rule is not None, f"{section}.{d['key']} has no valid range"
            bad = _out_of_range(tp, rule)
            assert bad, f"{section}.{d['key']}: its rule {rule.text!r} refuses no value"
            out.append((section, d["key"], bad[0]))
    return out


def test_every_number_of_every_command_is_range_checked(src, tmp_path, capsys):
    every = {s: tuple(f.name for f in dataclasses.fields(c)) for s, c in SECTIONS.items()}
    assert len(_numeric_keys(every)) >= 40  # the walk sees every section's numbers
    commands = {prune: ["--model", src, "--dry-run"],
                distill: ["--student", src, "--output", tmp_path / "d"],
                export: ["--output", tmp_path / "e"], evaluate: ["--model", src],
                data_cli: ["prepare", "stdlib", "--output", tmp_path / "s", "--tokenizer", src]}
    for module, argv in commands.items():
        for section, key, bad in _numeric_keys(module.CLI_KEYS):
            line = refused(module.main, [*argv, f"{section}.{key}={bad}"], capsys)
            assert f"{section}.{key}" in line and "valid" in line, line
    recipe = _recipe(tmp_path, model={"name": str(src)})
    for section, key, bad in _numeric_keys(every):
        line = refused(pipeline.main, [recipe, f"{section}.{key}={bad}", "--dry-run"], capsys)
        assert f"{section}.{key}" in line, line
    line = refused(data_cli.main, ["prepare", "stdlib", "--output", tmp_path / "s", "--tokenizer",
                                   src, "--eval-fraction", "0.6", "--calibration-fraction", "0.4"],
                   capsys)
    assert "prepare.eval_fraction + prepare.calibration_fraction = 1 leaves no training" in line
    assert not any((tmp_path / n).exists() for n in ("d", "e", "s", "runs"))

    r = cli("minitron.evaluate", "--batch-size", "-1")  # the example, as a user types it
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: command line: evaluate.batch_size=-1 is invalid; valid: an integer >= 1"]


# ----------------------------------------------------------------------------- 4. write probes
def test_unwritable_outputs_are_refused_before_the_work(src, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    recipe = _recipe(tmp_path, model={"name": str(src)}, output_dir=str(blocker / "runs"))
    cases = [
        (prune.main, ["--model", src, "--output", blocker / "p", "prune.num_hidden_layers=2"]),
        (distill.main, ["--teacher", src, "--student", src, "--output", blocker / "d"]),
        (export.main, ["--model", src, "--output", blocker / "e"]),
        (evaluate.main, ["--model", src, "--json", blocker / "r.json"]),
        (data_cli.main, ["prepare", "stdlib", "--tokenizer", src, "--output", blocker / "s"]),
        (pipeline.main, [recipe]),
    ]
    for main, argv in cases:
        line = refused(main, argv, capsys)
        assert f"cannot be written: {blocker} is a file, not a folder" in line, line
    assert blocker.read_text() == "mine"

    if os.geteuid() == 0:  # root writes into read-only folders: the file case above holds for all
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = refused(evaluate.main, ["--model", src, "--json", locked / "r.json"], capsys)
        assert f"folder {locked} is not writable" in line
        line = refused(prune.main, ["--model", src, "--output", locked / "p",
                                    "prune.num_hidden_layers=2"], capsys)
        assert f"--output {locked / 'p'} cannot be written: folder {locked} is not writable" in line
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


# ----------------------------------------------------------------------------- 5. path or hub id
def test_relative_path_that_looks_like_a_hub_id_gets_both_readings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    line = refused(prune.main, ["--model", "models/no-such-model", "--dry-run",
                                "prune.num_hidden_layers=2"], capsys)
    assert line == (
        f"error: model 'models/no-such-model' not found: as a path, there is no folder "
        f"'models/no-such-model' relative to the current folder ({tmp_path}); as a hub id, it is "
        f"not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE or "
        f"TRANSFORMERS_OFFLINE). Give an existing model folder, a hub id you can reach, or "
        f"'smollm2-135m'")


# ----------------------------------------------------------------------------- 6. dry-run data
def test_dry_run_checks_every_data_source_like_the_real_run(src, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n")
    unfinished = tmp_path / "unfinished"
    (unfinished / ".work").mkdir(parents=True)
    (unfinished / "train-00000.bin").write_bytes(b"\0" * 64)
    cases = [(tmp_path / "no-such.txt", f"data source '{tmp_path / 'no-such.txt'}' not found"),
             (empty, f"data.source '{empty}' holds no non-empty documents"),
             (unfinished, f"data source '{unfinished}' is an unfinished prepared folder")]
    for source, says in cases:
        recipe = _recipe(tmp_path, model={"name": str(src)}, data={"source": str(source)})
        dry = refused(pipeline.main, [recipe, "--dry-run"], capsys)
        assert says in dry, dry
        assert refused(pipeline.main, [recipe], capsys) == dry  # the real run says the same
        assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in unfinished.iterdir()) == [".work", "train-00000.bin"]


# ----------------------------------------------------------------------------- 7. remote code
CUSTOM_CODE = '''
from transformers import LlamaConfig, LlamaForCausalLM

class CustomConfig(LlamaConfig):
    model_type = "minitron_custom"

class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


def test_remote_code_is_refused_the_same_way_everywhere_unless_asked(src, tmp_path, capsys):
    custom = _copy(src, tmp_path / "custom")
    cfg = json.loads((custom / "config.json").read_text())
    cfg.update(model_type="minitron_custom", auto_map={
        "AutoConfig": "custom_model.CustomConfig",
        "AutoModelForCausalLM": "custom_model.CustomForCausalLM"})
    (custom / "config.json").write_text(json.dumps(cfg))
    (custom / "custom_model.py").write_text(CUSTOM_CODE)
    before = snapshot(custom)
    recipe = _recipe(tmp_path, model={"name": str(custom)})
    lines = {refused(main, argv, capsys) for main, argv in [
        (prune.main, ["--model", custom, "--dry-run", "prune.num_hidden_layers=2"]),
        (distill.main, ["--teacher", custom, "--student", src, "--output", tmp_path / "d"]),
        (export.main, ["--model", custom, "--output", tmp_path / "e"]),
        (evaluate.main, ["--model", custom]),
        (pipeline.main, [recipe, "--dry-run"]),
        (data_cli.main, ["prepare", "stdlib", "--tokenizer", custom, "--output", tmp_path / "s"]),
    ]}
    assert lines == {
        f"error: model '{custom}' needs remote code (config.json auto_map: AutoConfig -> "
        f"custom_model.CustomConfig, AutoModelForCausalLM -> custom_model.CustomForCausalLM; "
        f"model_type 'minitron_custom' is not one transformers knows); minitron runs no code from "
        f"a model folder unless asked: pass --trust-remote-code (recipe: model.trust_remote_code: "
        f"true) if you trust it"}

    # Export used to stop at transformers' "run the custom code? [y/N]" prompt: no terminal here.
    r = cli("minitron.export", "--model", custom, "--output", tmp_path / "e", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "[y/N]" not in r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == list(lines)
    assert snapshot(custom) == before and not (tmp_path / "e").exists()

    # The opt-in runs the folder's code (its own config class) and gets past the refusal.
    from minitron.models import load_config

    assert type(load_config(custom, trust_remote_code=True)).__name__ == "CustomConfig"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(prune.main, ["--model", str(custom), "--dry-run", "--trust-remote-code",
                             "prune.num_hidden_layers=2"])
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    assert "| num_hidden_layers | 4 | 2 |" in out
    with pytest.raises(MinitronError, match="needs remote code"):
        load_config(custom)
