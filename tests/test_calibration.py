"""Activation statistics (minitron.calibration) against a float64 reference computed directly on
the hand-derived activations of every linear's input (no hooks), and through pruning."""

import copy

import pytest
import torch
from test_importance import blocks, naive_sample
from tiny import make_tiny_model, tiny_tokenizer

from minitron import calibration
from minitron.common import MinitronError
from minitron.config import ImportanceConfig
from minitron.importance import compute_scores
from minitron.prune import prune, save_pruned


def reference(model, data):
    """Module name -> [N, D] float64 inputs of every decoder linear, derived by hand."""
    m = copy.deepcopy(model).double()
    rows: dict[str, list[torch.Tensor]] = {}
    for ids in data:
        acts = naive_sample(m, ids)
        for i in range(model.config.num_hidden_layers):
            p = f"model.layers.{i}."
            n1, n2 = acts["norms"][2 * i], acts["norms"][2 * i + 1]
            o = acts["o_in"][i].reshape(n1.shape[0], -1)
            for name, x in (("self_attn.q_proj", n1), ("self_attn.k_proj", n1),
                            ("self_attn.v_proj", n1), ("self_attn.o_proj", o),
                            ("mlp.gate_proj", n2), ("mlp.up_proj", n2),
                            ("mlp.down_proj", acts["down_in"][i])):
                rows.setdefault(p + name, []).append(x)
    return {k: torch.cat(v) for k, v in rows.items()}


@pytest.fixture(scope="module")
def tiny():
    model = make_tiny_model("llama", seed=3)
    data = blocks(n=5, t=16)
    return model, data, reference(model, data)


def test_statistics_from_the_importance_pass_equal_the_float64_reference(tiny):
    model, data, ref = tiny
    c = calibration.Collector(gram=True)
    compute_scores(model, data, batch_size=2, config=ImportanceConfig(), collector=c)
    stats = c.stats
    assert set(stats.modules) == set(ref)
    for name, x in ref.items():
        assert stats.tokens[name] == data.numel()
        torch.testing.assert_close(stats.get(name, "sq_sum"), x.pow(2).sum(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.get(name, "abs_max"), x.abs().amax(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.mean_abs(name), x.abs().mean(0), rtol=1e-5, atol=1e-6)
        gram = x.T @ x  # off-diagonal sums cancel: compare on the scale of the diagonal
        torch.testing.assert_close(stats.get(name, "gram"), gram, rtol=1e-5,
                                   atol=1e-6 * gram.diagonal().max().item())
    # the hooks are gone: a second pass adds nothing
    model.base_model(input_ids=data[:1], use_cache=False)
    assert stats.tokens["model.layers.0.mlp.down_proj"] == data.numel()


def test_a_pass_of_its_own_equals_the_importance_pass_and_round_trips(tiny, tmp_path):
    model, data, ref = tiny
    stats = calibration.collect(model, data, batch_size=3)
    name = "model.layers.2.mlp.down_proj"
    torch.testing.assert_close(stats.mean_sq(name), ref[name].pow(2).mean(0), rtol=1e-5, atol=1e-6)
    assert "gram" not in stats.modules[name]
    path = calibration.save(stats, tmp_path)
    assert path == tmp_path / calibration.FILE
    back = calibration.load(tmp_path)
    assert back.tokens == stats.tokens
    for n in stats.modules:
        for k in calibration.KINDS:
            assert torch.equal(back.get(n, k), stats.get(n, k))
    with pytest.raises(MinitronError, match="do not exist"):
        calibration.load(tmp_path / "elsewhere.safetensors")
    assert calibration.load(tmp_path / "importance") is None  # a folder without the file
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(MinitronError, match="not readable"):
        calibration.load(tmp_path / "bad.safetensors")
    with pytest.raises(MinitronError, match="'sq_sum' of 'lm_head' was not collected|no calibration"):
        stats.get("lm_head", "sq_sum")


def test_pruning_slices_the_statistics_to_the_kept_channels(tiny, tmp_path):
    """Layer 0 of a pruned model sees exactly the teacher's activations on the kept channels up to
    the first pruned unit (its attention inputs with heads pruned; all its inputs with only MLP
    neurons pruned), so the statistics pruning carries over must equal a fresh pass there."""
    model, data, _ = tiny
    c = calibration.Collector()
    scores = compute_scores(model, data, batch_size=5, collector=c)
    for target, exact in (({"intermediate_size": 48}, ""),
                          ({"num_attention_heads": 4, "num_key_value_heads": 1}, "self_attn")):
        pruned = prune(model, scores, target, stats=c.stats)
        carried = pruned.minitron_calibration
        assert carried.check_matches(pruned) == []
        fresh = calibration.collect(pruned, data)
        assert set(carried.modules) == set(fresh.modules)
        layer0 = [n for n in fresh.modules if n.startswith("model.layers.0." + exact)]
        assert len(layer0) == (4 if exact else 7)
        for n in layer0:
            for k in calibration.KINDS:
                torch.testing.assert_close(carried.get(n, k), fresh.get(n, k), rtol=1e-4,
                                           atol=1e-5)
    # a dropped layer's statistics go, a kept one's are renamed to its new index
    moved = c.stats.remap({"model.layers.3.mlp.up_proj": ("model.layers.1.mlp.up_proj", None)})
    assert list(moved.modules) == ["model.layers.1.mlp.up_proj"]
    assert torch.equal(moved.get("model.layers.1.mlp.up_proj", "sq_sum"),
                       c.stats.get("model.layers.3.mlp.up_proj", "sq_sum"))
    pruned = prune(model, scores, {"num_hidden_layers": 3, "intermediate_size": 48},
                   stats=c.stats)
    carried = pruned.minitron_calibration
    assert carried.check_matches(pruned) == [] and len(carried.modules) == 21
    save_pruned(pruned, tiny_tokenizer(), tmp_path / "p", scores=scores)
    saved = calibration.load(tmp_path / "p")
    assert torch.equal(saved.get("model.layers.1.mlp.down_proj", "abs_max"),
                       carried.get("model.layers.1.mlp.down_proj", "abs_max"))
    stats, where = calibration.for_model(pruned, tmp_path / "p", None)
    assert where.startswith("saved") and stats is not None
    # statistics that do not fit the model are not used: a pass over the blocks instead
    stats, where = calibration.for_model(model, tmp_path / "p", data[:2])
    assert where.startswith("computed") and stats.check_matches(model) == []
