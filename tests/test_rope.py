"""Rotary (RoPE) settings survive every stage exactly: no stage reads a config differently from the
transformers that wrote it.

transformers 5 writes a model's rotary settings as one `rope_parameters` block (rope_type,
rope_theta and the scaling keys; per layer type for Gemma 3) and reads the `rope_theta` /
`rope_scaling` keys of older configs into it. A stage that reads or writes the old keys gets the
default base 10000 and no scaling, which shows only past the positions a short test sequence
reaches, so the logits here are taken with position ids from 6000 on (the scaled families set
max_position_embeddings 8192 and a smaller original_max_position_embeddings, so the scaling is in
force there). References are plain `AutoModelForCausalLM.from_pretrained` reloads of the source
folder, which transformers 5 wrote with save_pretrained.
"""

import copy
import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from minitron.common import MinitronError
from tiny import tiny_config, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

FAR = 6000  # the first position of the probe sequence
IDS = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(11))
POSITIONS = torch.arange(FAR, FAR + IDS.shape[1])[None]
CALIB = torch.randint(0, 384, (4, 16), generator=torch.Generator().manual_seed(12))
LEGACY_KEYS = ("rope_theta", "rope_scaling", "rope_local_base_freq")

# family -> (config overrides as a user would write them for transformers 5, the mutations of the
# pruned config.json that a wrong reader amounts to: each must change the logits at FAR).
CASES = {
    # Llama 3.1's settings, original context scaled down from 8192 to 1024 to fit 8k positions.
    "llama": (dict(max_position_embeddings=8192, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}),
        [("rope_theta", 10_000.0), ("rope_type", "default")]),
    # Qwen3's base, with the YaRN extension its model cards give for long inputs.
    "qwen3": (dict(max_position_embeddings=8192, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 4.0,
        "original_max_position_embeddings": 2048}),
        [("rope_theta", 10_000.0), ("factor", 2.0)]),
    # Gemma 3: sliding layers on a local base, global layers on 1e6 with linear scaling (4B+).
    "gemma3_text": (dict(max_position_embeddings=8192, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0}}),
        [("sliding_attention.rope_theta", 1_000_000.0), ("full_attention.factor", 1.0)]),
    # Phi-3-128k / Phi-4-mini: longrope with partial rotary (0.75 of head_dim 8: 3 factors each);
    # past original_max_position_embeddings the long factors apply.
    "phi3": (dict(max_position_embeddings=8192, original_max_position_embeddings=1024,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10_000.0,
                                   "partial_rotary_factor": 0.75, "long_factor": [1.0, 4.0, 16.0],
                                   "short_factor": [1.0, 1.5, 2.0]}),
             [("rope_theta", 500_000.0), ("long_factor", [1.0, 1.5, 2.0])]),
}


def _make_source(family: str, path: Path, seed: int = 0) -> None:
    """A tiny model of `family` with CASES' rotary settings, saved by transformers 5."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # Weights drawn wide (std 0.2, not 0.02): attention far from uniform, so positions matter.
    config = tiny_config(family, initializer_range=0.2, **copy.deepcopy(CASES[family][0]))
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)


@torch.no_grad()
def far_logits(folder: Path) -> torch.Tensor:
    """Logits at positions FAR.. of a plain transformers reload of `folder`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model(IDS, position_ids=POSITIONS).logits


def _own_shape(folder: Path) -> dict[str, int]:
    from minitron.config import TARGET_KEYS
    from minitron.models import load_config
    from minitron.prune import plan

    shape = plan(load_config(folder), {})
    return {k: shape[k] for k in TARGET_KEYS}


def _prune_to_own_shape(src: Path, out: Path) -> None:
    """minitron's prune path as the command runs it: load, score, prune, save."""
    from minitron.importance import compute_scores
    from minitron.models import load_model
    from minitron.prune import prune, save_pruned

    model, tokenizer = load_model(src)
    pruned = prune(model, compute_scores(model, CALIB, 4), _own_shape(src))
    save_pruned(pruned, tokenizer, out)


def _prune_cli(src: Path, out: Path) -> None:
    """The prune command (`python -m minitron.prune`'s main, in this process: a fresh one would
    add seconds of imports), to the source's own shape, scoring on calibration blocks of its own."""
    from minitron.prune import main

    texts = Path(sysconfig.get_paths()["stdlib"]) / "email"  # a few dozen files: every split has some
    argv = ["--model", str(src), "--output", str(out), "--calibration-blocks", "4",
            "--block-size", "16", f"data.source={texts}"]
    assert main(argv + [f"prune.{k}={v}" for k, v in _own_shape(src).items()]) == 0


def _config_json(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module", params=list(CASES))
def pruned(request, tmp_path_factory):
    """(family, source folder, pruned folder, the source's plain-reload logits at FAR)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"rope-{family}")
    _make_source(family, root / "source")
    (_prune_cli if family == "phi3" else _prune_to_own_shape)(root / "source", root / "pruned")
    return family, root / "source", root / "pruned", far_logits(root / "source")


def test_the_source_config_holds_the_rotary_settings_as_given(pruned):
    """The reference: transformers 5 wrote our settings as they were given, old keys absent."""
    family, src, _, _ = pruned
    written, want = _config_json(src), dict(CASES[family][0]["rope_parameters"])
    if family == "phi3":  # Phi3Config copies its top-level pretraining length into the block
        want["original_max_position_embeddings"] = 1024
    assert written["rope_parameters"] == want
    assert not set(LEGACY_KEYS) & set(written)


def test_pruned_to_its_own_shape_the_logits_far_out_are_bit_equal(pruned):
    family, _, out, want = pruned
    assert torch.equal(far_logits(out), want), family


def test_the_pruned_config_keeps_rope_parameters_exactly_and_no_stray_legacy_keys(pruned):
    family, src, out, _ = pruned
    written, source = _config_json(out), _config_json(src)
    assert written["rope_parameters"] == source["rope_parameters"]
    assert not set(LEGACY_KEYS) & set(written)
    if family == "phi3":  # Phi-3 also keeps the pretraining length outside the block
        assert written["original_max_position_embeddings"] == 1024
    if family == "gemma3_text":
        assert written["layer_types"] == source["layer_types"]


def _with_setting(folder: Path, to: Path, key: str, value) -> Path:
    """A copy of the model folder whose config.json has rope_parameters[key] = value (a dotted
    key names a layer type's entry)."""
    shutil.copytree(folder, to)
    config = _config_json(to)
    block = config["rope_parameters"]
    *outer, leaf = key.split(".")
    for k in outer:
        block = block[k]
    assert block[leaf] != value
    block[leaf] = value
    (to / "config.json").write_text(json.dumps(config))
    return to


def test_a_changed_rotary_setting_changes_those_logits(pruned, tmp_path):
    """The check above can fail: each setting a wrong reader would get differently (the default
    base, no scaling, Gemma 3's local base taken for the global one, Phi-3's short factors past
    the original length) moves the logits at FAR."""
    family, _, out, want = pruned
    for i, (key, value) in enumerate(CASES[family][1]):
        got = far_logits(_with_setting(out, tmp_path / str(i), key, value))
        assert (got - want).abs().max() > 1e-3 * want.abs().max(), (family, key, value)


# ----------------------------------------------------------------------------- older configs
def test_a_config_written_with_the_old_keys_prunes_to_what_transformers_5_reads(tmp_path):
    """A checkpoint from the hub written by transformers 4 (`rope_theta` and `rope_scaling` at the
    top level): the pruned folder has the rope_parameters transformers 5 reads from it, and the
    same logits far out."""
    from transformers import AutoConfig

    src = tmp_path / "source"
    _make_source("llama", src)
    config = _config_json(src)
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope  # as Llama 3.1's config.json has it
    (src / "config.json").write_text(json.dumps(config))
    assert AutoConfig.from_pretrained(src).rope_parameters == CASES["llama"][0]["rope_parameters"]
    _prune_to_own_shape(src, tmp_path / "pruned")
    written = _config_json(tmp_path / "pruned")
    assert written["rope_parameters"] == CASES["llama"][0]["rope_parameters"]
    assert not set(LEGACY_KEYS) & set(written)
    assert torch.equal(far_logits(tmp_path / "pruned"), far_logits(src))


def test_rope_parameters_reads_one_layer_types_entry_where_they_are_per_layer_type():
    from minitron.models import rope_parameters

    gemma3 = tiny_config("gemma3_text", **copy.deepcopy(CASES["gemma3_text"][0]))
    assert rope_parameters(gemma3, "sliding_attention") == {"rope_type": "default",
                                                            "rope_theta": 10_000.0}
    assert rope_parameters(gemma3, "full_attention")["factor"] == 8.0
    with pytest.raises(MinitronError, match=r"per layer type \(sliding_attention, full_attention"):
        rope_parameters(gemma3)
    llama = tiny_config("llama", **copy.deepcopy(CASES["llama"][0]))
    assert rope_parameters(llama) == CASES["llama"][0]["rope_parameters"]


# ----------------------------------------------------------------------------- other stages
def test_the_teacher_cache_tells_teachers_apart_by_their_rotary_settings(tmp_path):
    """The cache's teacher fingerprint covers rope_parameters: a teacher that differs only in its
    base would otherwise be served another teacher's log-probs."""
    from minitron.teacher_cache import teacher_hash

    _make_source("llama", tmp_path / "a")
    _with_setting(tmp_path / "a", tmp_path / "b", "rope_theta", 10_000.0)
    assert teacher_hash(tmp_path / "a") != teacher_hash(tmp_path / "b")
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    assert teacher_hash(tmp_path / "a") == teacher_hash(tmp_path / "c")


def test_gguf_writes_the_rope_base_of_rope_parameters_and_refuses_scaling(tmp_path):
    """transformers' own GGUF loader reads back the base the config has (500000, not the default
    10000); Llama 3.1's scaling is written (as llama.cpp's rope_freqs, see test_gguf.py), scaling
    llama.cpp's converter does not carry for Llama is refused, not dropped."""
    from transformers import AutoModelForCausalLM

    from minitron.to_gguf import load_gguf, reference_config, write_gguf

    src = tmp_path / "plain"
    torch.manual_seed(0)
    config = tiny_config("llama", rope_parameters={"rope_type": "default", "rope_theta": 500_000.0})
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    back = load_gguf(write_gguf(model, tiny_tokenizer(), src, tmp_path / "m.gguf", "f16"))
    assert back.config.rope_parameters["rope_theta"] == 500_000.0
    with torch.no_grad():  # f16 weights: close to the source far out, not equal
        torch.testing.assert_close(back(IDS, position_ids=POSITIONS).logits,
                                   model(IDS, position_ids=POSITIONS).logits, rtol=0, atol=2e-3)
    _make_source("llama", tmp_path / "scaled")
    scaled = AutoModelForCausalLM.from_pretrained(tmp_path / "scaled").eval()
    path = write_gguf(scaled, tiny_tokenizer(), tmp_path / "scaled", tmp_path / "s.gguf", "f16")
    back = load_gguf(path, reference_config(scaled.config))
    with torch.no_grad():  # wide weights (std 0.2): judged relative to the logits' size
        got, want = back(IDS, position_ids=POSITIONS).logits, scaled(IDS, position_ids=POSITIONS).logits
    # F16 rounds each weight by up to 2^-11 relative; through 4 wide layers that measured 1.2e-3
    assert ((got - want).norm() / want.norm()).item() < 3e-3
    dynamic = tiny_config("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                    "factor": 2.0})
    with pytest.raises(MinitronError, match=r"rope_type 'dynamic'"):
        write_gguf(AutoModelForCausalLM.from_config(dynamic), tiny_tokenizer(), src,
                   tmp_path / "d.gguf", "f16")
