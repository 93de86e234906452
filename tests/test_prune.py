"""Pruning: identity prunes are exact, planted inert structure is found and removed without changing
the logits, saved checkpoints reload in plain transformers, and impossible targets are refused."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from minitron.common import MinitronError
from minitron.importance import Scores, compute_scores
from minitron.models import count_params, param_count_from_config
from minitron.prune import (main, plan, prune, save_pruned, select_heads, select_layers,
                            target_for_budget)
from tiny import make_tiny_model, prune_inert_layers, tiny_config, tiny_tokenizer

IDS = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(3))


def calib(n=6, t=24):
    return torch.randint(0, 384, (n, t), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, ids=IDS):
    return model(ids).logits


# ----------------------------------------------------------------------------- identity
@pytest.mark.parametrize("tied", [False, True])
def test_pruning_to_the_source_shape_reproduces_its_logits_exactly(family, tied):
    model = make_tiny_model(family, tie_word_embeddings=tied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune(model, compute_scores(model, calib(), 4), {"hidden_size": 64,
                                                              "num_hidden_layers": 4})
    assert pruned is not model
    assert torch.equal(logits(pruned), logits(model))
    assert count_params(pruned) == count_params(model)
    # The teacher is not mutated.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- planted structure
@torch.no_grad()
def test_inert_mlp_neurons_rank_lowest_and_prune_away(family):
    model = make_tiny_model(family)
    planted = {0: [3, 50, 95], 1: [0, 1, 2], 2: [40, 41, 77], 3: [10, 60, 94]}
    for i, neurons in planted.items():
        mlp = model.model.layers[i].mlp
        mlp.gate_proj.weight[neurons] = 0  # silu(0) * up = 0: the down projection sees zeros
    ref = logits(model)
    scores = compute_scores(model, calib(), 4)
    for i, neurons in planted.items():
        assert sorted(torch.argsort(scores.neurons[i])[:3].tolist()) == neurons
    pruned = prune(model, scores, {"intermediate_size": 93})
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (64, 93)
    torch.testing.assert_close(logits(pruned), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_inert_heads_without_gqa_rank_lowest_and_prune_away(family):
    model = make_tiny_model(family, num_key_value_heads=8)  # plain multi-head attention
    planted = {0: [1, 3, 4, 6], 1: [0, 1, 2, 7], 2: [2, 3, 4, 5], 3: [4, 5, 6, 7]}
    for i, heads in planted.items():
        v = model.model.layers[i].self_attn.v_proj
        for h in heads:
            v.weight[h * 8:(h + 1) * 8] = 0
            if v.bias is not None:
                v.bias[h * 8:(h + 1) * 8] = 0
    ref = logits(model)
    scores = compute_scores(model, calib(), 4)
    for i, heads in planted.items():
        assert sorted(torch.argsort(scores.heads[i])[:4].tolist()) == heads
    pruned = prune(model, scores, {"num_attention_heads": 4})
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (4, 4)
    assert pruned.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    torch.testing.assert_close(logits(pruned), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_inert_kv_groups_with_gqa_rank_lowest_and_prune_away(family):
    model = make_tiny_model(family)  # 8 query heads in 2 KV groups of 4
    planted = {0: 1, 1: 0, 2: 0, 3: 1}
    for i, group in planted.items():
        v = model.model.layers[i].self_attn.v_proj
        v.weight[group * 8:(group + 1) * 8] = 0  # every query head of the group outputs zeros
        if v.bias is not None:
            v.bias[group * 8:(group + 1) * 8] = 0
    ref = logits(model)
    scores = compute_scores(model, calib(), 4)
    for i, group in planted.items():
        assert int(torch.argmin(scores.kv_groups[i])) == group
        assert scores.heads[i, group * 4:(group + 1) * 4].max() == 0
    pruned = prune(model, scores, {"num_key_value_heads": 1})
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (4, 1)
    torch.testing.assert_close(logits(pruned), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_gqa_keeps_the_best_heads_within_each_group_in_every_layer(family):
    """In GQA a single query head cannot be silenced at the o_proj input (its values are shared),
    so here the heads are made inert at o_proj and the scores are given."""
    model = make_tiny_model(family)
    planted = {0: [1, 2, 5, 7], 1: [0, 3, 4, 5], 2: [2, 3, 6, 7], 3: [0, 1, 4, 6]}
    head_scores = torch.rand(4, 8) + 1
    for i, heads in planted.items():
        o = model.model.layers[i].self_attn.o_proj
        for h in heads:
            o.weight[:, h * 8:(h + 1) * 8] = 0
            head_scores[i, h] = 0.1 * h / 8
    ref = logits(model)
    base = compute_scores(model, calib(2), 2)
    scores = Scores(base.neurons, head_scores, head_scores.view(4, 2, 4).sum(-1), base.hidden,
                    base.layers_bi)
    pruned = prune(model, scores, {"num_attention_heads": 4})
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (4, 2)
    for i, heads in planted.items():
        kept = [h for h in range(8) if h not in heads]
        rows = torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in kept])
        assert torch.equal(pruned.model.layers[i].self_attn.q_proj.weight,
                           model.model.layers[i].self_attn.q_proj.weight[rows])
    torch.testing.assert_close(logits(pruned), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_inert_layers_rank_lowest_and_prune_away_with_a_working_kv_cache(family):
    model = make_tiny_model(family)
    ref, pruned = prune_inert_layers(model, calib(), logits)
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    assert torch.equal(logits(pruned), ref)
    prompt = IDS[:1, :8]
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(pruned.generate(prompt, **gen), model.generate(prompt, **gen))


@torch.no_grad()
def test_inert_hidden_channels_rank_lowest_and_prune_away(family):
    model = make_tiny_model(family, rms_norm_eps=1e-30)
    planted = [2, 9, 17, 30, 31, 44, 50, 63]
    model.model.embed_tokens.weight[:, planted] = 0
    for layer in model.model.layers:  # nothing ever writes into the planted channels
        layer.self_attn.o_proj.weight[planted] = 0
        layer.mlp.down_proj.weight[planted] = 0
    ref = logits(model)
    scores = compute_scores(model, calib(), 4)
    assert sorted(torch.argsort(scores.hidden)[:8].tolist()) == planted
    assert scores.hidden[planted].max() == 0
    pruned = prune(model, scores, {"hidden_size": 56})
    # RMSNorm now averages over 56 channels instead of 64: undo that scale, then nothing changed.
    for name, p in pruned.named_parameters():
        if "norm" in name:
            p.mul_(math.sqrt(64 / 56))
    torch.testing.assert_close(logits(pruned), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- selection rules
def test_layer_selection_by_importance_and_by_contiguous_block():
    s = torch.tensor([5.0, 1.0, 2.0, 9.0, 0.5, 8.0])
    assert select_layers(s, 4, "importance") == [0, 2, 3, 5]
    # windows of two: (0,1)=6 (1,2)=3 (2,3)=11 (3,4)=9.5 (4,5)=8.5 -> drop 1 and 2
    assert select_layers(s, 4, "contiguous") == [0, 3, 4, 5]
    assert select_layers(s, 6, "contiguous") == list(range(6))


def test_head_selection_keeps_whole_groups_then_heads_within_them():
    s = torch.tensor([1.0, 9.0, 2.0, 3.0, 4.0, 4.0, 0.0, 5.0, 8.0])  # 3 groups of 3
    groups, heads = select_heads(s, 2, 2, 3)  # group sums 12, 8, 13 -> keep groups 0 and 2
    assert groups.tolist() == [0, 2]
    assert heads.tolist() == [1, 2, 7, 8]


# ----------------------------------------------------------------------------- checkpoints
def test_saved_checkpoint_reloads_in_plain_transformers(tmp_path):
    model = make_tiny_model("qwen2", tie_word_embeddings=True)
    target = {"hidden_size": 48, "intermediate_size": 40, "num_attention_heads": 3,
              "num_key_value_heads": 1, "num_hidden_layers": 3}
    pruned = prune(model, compute_scores(model, calib(), 4), target, depth="contiguous")
    out = tmp_path / "pruned"
    save_pruned(pruned, tiny_tokenizer(), out, {"source": "tiny"})
    torch.save(IDS, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        AutoTokenizer.from_pretrained({str(out)!r})
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        with torch.no_grad():
            torch.save(m(ids).logits, {str(tmp_path / 'logits.pt')!r})
        n = sum(p.numel() for p in {{id(p): p for p in m.parameters()}}.values())
        assert not any(k.startswith("minitron") for k in sys.modules), "minitron was imported"
        print(json.dumps({{"params": n, "heads": m.config.num_attention_heads,
                          "head_dim": m.config.head_dim}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits(pruned), rtol=0, atol=0)
    expected = param_count_from_config({**tiny_config("qwen2", tie_word_embeddings=True).to_dict(),
                                        **target})
    assert got == {"params": expected, "heads": 3, "head_dim": 8}
    record = json.loads((out / "minitron.json").read_text())
    assert record["parameters"]["after"] == expected
    assert record["parameters"]["before"] == count_params(model)
    assert record["source"] == "tiny" and record["depth"] == "contiguous"


# ----------------------------------------------------------------------------- budgets
def test_parameter_budget_picks_the_largest_candidate_that_fits():
    model = make_tiny_model()
    source = count_params(model)
    target, candidates = target_for_budget(model.config, 0.6)
    chosen = [c for c in candidates if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["params"] <= 0.6 * source
    fitting = [c for c in candidates if c["params"] <= 0.6 * source]
    best = max(c["params"] for c in fitting)
    assert chosen[0]["params"] >= best - 0.02 * source  # within the documented slack
    near = [c for c in fitting if c["params"] >= best - 0.02 * source]
    least = lambda c: min(c["hidden_size"] / 64, c["intermediate_size"] / 96)  # noqa: E731
    assert least(chosen[0]) == max(least(c) for c in near)
    pruned = prune(model, compute_scores(model, calib(2), 2), target)
    assert count_params(pruned) == chosen[0]["params"]
    absolute, _ = target_for_budget(model.config, int(0.6 * source))
    assert absolute == target
    # Below every width shape, depth is added.
    deep, _ = target_for_budget(model.config, 0.2)
    assert deep["num_hidden_layers"] < 4


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("target,message", [
    ({"hidden_size": 128}, r"hidden_size \(prune.hidden_size\) = 128 is larger than the source "
                           r"model's 64; .* valid values 1 to 64"),
    ({"intermediate_size": 97}, r"intermediate_size \(prune.intermediate_size\) = 97 is larger.*1 to 96"),
    ({"num_attention_heads": 16}, r"num_attention_heads \(prune.num_attention_heads\) = 16 is larger"),
    ({"num_key_value_heads": 3}, r"num_key_value_heads \(prune.num_key_value_heads\) = 3 is larger"),
    ({"num_hidden_layers": 5}, r"num_hidden_layers \(prune.num_hidden_layers\) = 5 is larger.*1 to 4"),
    ({"num_hidden_layers": 0}, r"num_hidden_layers \(prune.num_hidden_layers\) = 0 must be at least "
                               r"1; valid values: 1 to 4"),
    ({"num_attention_heads": 5}, r"num_attention_heads \(prune.num_attention_heads\) = 5 cannot be "
                                 r"spread evenly over 2 KV groups.*valid values: 2, 4, 6, 8"),
    ({"num_attention_heads": 6, "num_key_value_heads": 1},
     r"= 6 cannot be spread evenly over 1 KV groups of at most 4.*valid values: 1, 2, 3, 4"),
    ({"num_layers": 2}, r"unknown target key\(s\) num_layers; valid keys: hidden_size, "),
    ({"hidden_size": 32.0}, r"hidden_size \(prune.hidden_size\) = 32.0 must be a whole number"),
])
def test_impossible_targets_are_refused_with_the_valid_values(target, message):
    with pytest.raises(MinitronError, match=message):
        plan(tiny_config(), target)


def test_hidden_size_need_not_be_heads_times_head_dim():
    """Width pruning keeps every head of head_dim 8 while the hidden size becomes 56 (not 8 x 8)."""
    shape = plan(tiny_config(), {"hidden_size": 56})
    assert (shape["hidden_size"], shape["num_attention_heads"], shape["head_dim"]) == (56, 8, 8)


def test_hidden_sizes_that_transformers_would_not_load_are_refused_in_its_words():
    """transformers 5 refuses a Llama config (Gemma's too) whose hidden size is not a multiple of
    num_attention_heads, on save and on load; Qwen3's config has no such check."""
    from transformers import LlamaConfig, Qwen3Config

    llama, qwen3 = tiny_config(), tiny_config("qwen3")
    with pytest.raises(Exception, match=r"not a multiple of the number of attention heads"):
        LlamaConfig(**{**llama.to_dict(), "hidden_size": 60})  # transformers itself, no minitron
    with pytest.raises(MinitronError, match=r"hidden_size \(prune.hidden_size\) = 60 with "
                                            r"num_attention_heads = 8: transformers .* refuses this "
                                            r"config: The hidden size \(60\) is not a multiple"):
        plan(llama, {"hidden_size": 60})
    assert plan(llama, {"hidden_size": 60, "num_attention_heads": 6})["hidden_size"] == 60
    Qwen3Config(**{**qwen3.to_dict(), "hidden_size": 60})
    assert plan(qwen3, {"hidden_size": 60})["hidden_size"] == 60


def test_budget_refusals():
    config = tiny_config()
    with pytest.raises(MinitronError, match=r"prune.target_params 2000000 .* is larger than the source"):
        target_for_budget(config, 2_000_000)
    with pytest.raises(MinitronError, match=r"prune.target_params 0.01 .* below every candidate shape"):
        target_for_budget(config, 0.01)
    with pytest.raises(MinitronError, match=r"prune.target_params -1 must be a fraction"):
        target_for_budget(config, -1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model(path=path)
    return path


@pytest.mark.parametrize("argv,message", [
    ([], r"no target: give at least one of prune.hidden_size, .* or prune.target_params"),
    (["--hidden-size", "48", "prune.target_params=0.5"],
     r"prune.target_params=0.5 cannot be combined with a shape \(prune.hidden_size\)"),
    (["prune.num_hidden_layers=9"], r"num_hidden_layers \(prune.num_hidden_layers\) = 9 is larger"),
    (["--target-params", "half"], r"prune.target_params: 'half' is not valid \(expected a number"),
    (["prune.hidden_sise=8"], r"command line: prune.hidden_sise: unknown key; did you mean "
                              r"'prune.hidden_size'\?"),
    (["--num-hidden-layers", "2"], r"--output DIR is required"),
    (["--num-hidden-layers", "2", "--output", "{tmp}"], r"--output .* already exists"),
    (["--num-hidden-layers", "2", "--output", "{tmp}/new", "--scores", "{tmp}/none.safetensors"],
     r"scores file .*none.safetensors' \(--scores\) does not exist"),
    (["--num-hidden-layers", "2", "--lm-loss-blocks", "0"], r"lm_loss_blocks=0"),
    (["--num-hidden-layers", "2", "--dtype", "int4", "--dry-run"],
     r"model.dtype: 'int4' is not one of 'float32', 'bfloat16', 'float16'"),
    (["--num-hidden-layers", "2", "data.calibration_blocks=0", "--dry-run"],
     r"data.calibration_blocks=0 is invalid; valid: an integer >= 1"),
])
def test_cli_refusals_happen_before_any_work(tiny_dir, tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(MinitronError, match=message):
        main(["--model", str(tiny_dir), *argv])


def test_cli_refuses_scores_of_another_model(tiny_dir, tmp_path):
    from minitron.importance import save_scores

    other = make_tiny_model(num_hidden_layers=3)
    save_scores(compute_scores(other, calib(2), 2), tmp_path / "s.safetensors")
    with pytest.raises(MinitronError, match="num_hidden_layers: scores 3 vs model 4"):
        main(["--model", str(tiny_dir), "--output", str(tmp_path / "o"), "--num-hidden-layers",
              "2", "--scores", str(tmp_path / "s.safetensors")])


def test_cli_dry_run_reads_no_weights(tiny_dir, tmp_path, capsys):
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text((tiny_dir / "config.json").read_text())
    assert main(["--model", str(config_only), "--target-params", "0.5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "candidates for prune.target_params" in out and "| parameters |" in out
    assert "| True |" in out  # the chosen candidate is marked


def test_cli_prunes_computes_and_reuses_scores(tiny_dir, tmp_path, capsys):
    out1 = tmp_path / "a"
    assert main(["--model", str(tiny_dir), "--output", str(out1), "--hidden-size", "48",
                 "--intermediate-size", "64", "--num-hidden-layers", "3", "--calibration-blocks", "4",
                 "--block-size", "32", "--depth-method", "lm_loss", "--lm-loss-blocks", "2"]) == 0
    record = json.loads((out1 / "minitron.json").read_text())
    assert record["shape"]["hidden_size"] == 48 and len(record["kept_layers"]) == 3
    assert record["method"]["calibration"]["blocks"] == 4
    scores_file = out1 / record["scores_file"]
    out2 = tmp_path / "b"
    assert main(["--model", str(tiny_dir), "--output", str(out2), "--num-hidden-layers", "3",
                 "--scores", str(scores_file), "--depth-method", "lm_loss"]) == 0
    assert json.loads((out2 / "minitron.json").read_text())["kept_layers"] == record["kept_layers"]
    assert "parameters:" in capsys.readouterr().out


def test_cli_module_exits_2_with_one_line(tiny_dir):
    res = subprocess.run([sys.executable, "-m", "minitron.prune", "--model", str(tiny_dir),
                          "--num-attention-heads", "3"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: num_attention_heads (prune.num_attention_heads) = 3 cannot be spread evenly over 2 KV "
        "groups of at most 4 query heads each (num_key_value_heads=2); valid values: 2, 4, 6, 8"]


def test_widths_stay_at_multiples_of_the_deployment_block():
    """prune.width_multiple: the budget rule and the search keep SmolLM2-sized widths at multiples
    of 64 (256 for k-quant targets); explicit widths off the block are refused with the valid ones."""
    from minitron.config import SearchConfig
    from minitron.prune import check_widths, enumerate_shapes, target_for_budget
    from tiny import tiny_config

    cfg = tiny_config("llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, num_hidden_layers=30, vocab_size=49152)
    free = enumerate_shapes(cfg, 0.7, SearchConfig(band=0.2))
    assert any(s["hidden_size"] % 64 for s in free)  # the plain grid has h504 (as the demo found)
    for m in (64, 256):
        target, _ = target_for_budget(cfg, 0.7, m)  # the source's own width is always allowed
        assert target["hidden_size"] in (576, *range(m, 577, m))
        assert target["intermediate_size"] % m == 0
        shapes = enumerate_shapes(cfg, 0.7, SearchConfig(band=0.2), m)
        assert shapes and all(s["hidden_size"] in (576, *range(m, 577, m))
                              and s["intermediate_size"] % m == 0 for s in shapes)
    check_widths(cfg, {"hidden_size": 512, "intermediate_size": 1536}, 64)
    check_widths(cfg, {"hidden_size": 504}, 1)
    with pytest.raises(MinitronError, match=r"prune.hidden_size\)=504 is not a multiple of "
                                            r"prune.width_multiple=64.*448, 512"):
        check_widths(cfg, {"hidden_size": 504}, 64)
