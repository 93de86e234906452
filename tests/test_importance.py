"""Importance scores against a naive float64 re-computation: an explicit loop over samples that
re-derives every activation by hand (no hooks), then aggregates the whole stack at once."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from minitron.common import MinitronError
from minitron.importance import ImportanceConfig, compute_scores, load_scores, save_scores
from tiny import make_tiny_model


def blocks(n=7, t=24, seed=1):
    return torch.randint(0, 384, (n, t), generator=torch.Generator().manual_seed(seed))


def naive_sample(m, ids):
    """Every activation importance looks at, for one sample [T], recomputed by hand (`m` float64)."""
    cfg = m.config
    n_heads, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    t = ids.numel()
    x = m.model.embed_tokens(ids)[None]  # [1, T, hidden]
    cos, sin = m.model.rotary_emb(x, torch.arange(t)[None])
    causal = torch.full((t, t), -math.inf, dtype=torch.float64).triu(1)
    acts = {"down_in": [], "o_in": [], "norms": [], "layer_in": [], "layer_out": []}
    for layer in m.model.layers:
        att = layer.self_attn
        acts["layer_in"].append(x[0])
        n1 = layer.input_layernorm(x)
        q = att.q_proj(n1).view(1, t, n_heads, d).transpose(1, 2)
        k = att.k_proj(n1).view(1, t, n_kv, d).transpose(1, 2)
        v = att.v_proj(n1).view(1, t, n_kv, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + causal, dim=-1)
        o = (probs @ v).transpose(1, 2)[0]  # [T, H, d]
        x = x + att.o_proj(o.reshape(1, t, n_heads * d))
        n2 = layer.post_attention_layernorm(x)
        a = layer.mlp.act_fn(layer.mlp.gate_proj(n2)) * layer.mlp.up_proj(n2)
        x = x + layer.mlp.down_proj(a)
        acts["layer_out"].append(x[0])
        acts["down_in"].append(a[0])
        acts["o_in"].append(o)
        acts["norms"] += [n1[0], n2[0]]
    final = m.model.norm(x)
    acts["norms"].append(final[0])
    acts["logits"] = m.lm_head(final)[0]
    return acts


SEQ = {"mean": lambda a: a.abs().sum(0) / a.shape[0],
       "l2": lambda a: a.pow(2).sum(0).sqrt(),
       "var": lambda a: (a - a.mean(0)).pow(2).mean(0)}
BATCH = {"mean": lambda s: s.mean(0), "l2": lambda s: s.pow(2).sum(0).sqrt(),
         "var": lambda s: s.var(0, unbiased=False)}


def naive_scores(model, data, seq, bat):
    m = copy.deepcopy(model).double()
    per_sample = [naive_sample(m, ids) for ids in data]  # explicit loop over samples
    n_layers = model.config.num_hidden_layers

    def agg(values):  # one [T, D] activation per sample -> [D]
        return BATCH[bat](torch.stack([SEQ[seq](v) for v in values]))

    neurons = torch.stack([agg([s["down_in"][i] for s in per_sample]) for i in range(n_layers)])
    heads = torch.stack([agg([s["o_in"][i].norm(dim=-1) for s in per_sample])
                         for i in range(n_layers)])
    hidden = sum(agg([s["norms"][j] for s in per_sample]) for j in range(2 * n_layers + 1))
    bi = torch.stack([
        torch.cat([1 - F.cosine_similarity(s["layer_in"][i], s["layer_out"][i], dim=-1)
                   for s in per_sample]).mean() for i in range(n_layers)])
    return neurons, heads, hidden, bi, per_sample


def test_naive_reference_reproduces_the_model(family):
    model = make_tiny_model(family)
    ids = blocks(1)[0]
    ref = naive_sample(copy.deepcopy(model).double(), ids)["logits"]
    torch.testing.assert_close(ref.float(), model(ids[None]).logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,seq,bat,batch_size", [
    ("llama", "mean", "l2", 3), ("mistral", "mean", "l2", 4), ("qwen2", "mean", "l2", 7),
    ("llama", "l2", "mean", 4), ("llama", "var", "var", 3), ("qwen2", "mean", "var", 2)])
def test_scores_equal_naive_computation(family, seq, bat, batch_size):
    """Default aggregation on every family; the others, with uneven last batches, on two."""
    model = make_tiny_model(family)
    data = blocks()
    scores = compute_scores(model, data, batch_size, ImportanceConfig(seq, bat))
    neurons, heads, hidden, bi, _ = naive_scores(model, data, seq, bat)
    tol = dict(rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(scores.neurons, neurons.float(), **tol)
    torch.testing.assert_close(scores.heads, heads.float(), **tol)
    torch.testing.assert_close(scores.kv_groups, heads.view(4, 2, 4).sum(-1).float(), **tol)
    torch.testing.assert_close(scores.hidden, hidden.float(), **tol)
    torch.testing.assert_close(scores.layers_bi, bi.float(), rtol=1e-3, atol=1e-6)
    assert scores.layers_lm_loss is None


def test_o_proj_contribution_head_scores_equal_naive_computation(family):
    model = make_tiny_model(family)
    data = blocks()
    scores = compute_scores(model, data, 3, ImportanceConfig(head_score="o_proj_contribution"))
    _, _, _, _, per_sample = naive_scores(model, data, "mean", "l2")
    m = copy.deepcopy(model).double()
    expected = []
    for i, layer in enumerate(m.model.layers):
        w = layer.self_attn.o_proj.weight  # [hidden, H * d]
        per_head = []
        for h in range(model.config.num_attention_heads):  # each head's own output, head by head
            cols = slice(h * model.config.head_dim, (h + 1) * model.config.head_dim)
            per_head.append(torch.stack([
                (s["o_in"][i][:, h] @ w[:, cols].T).norm(dim=-1).abs().mean() for s in per_sample
            ]).pow(2).sum().sqrt())
        expected.append(torch.stack(per_head))
    torch.testing.assert_close(scores.heads, torch.stack(expected).float(), rtol=2e-4, atol=1e-6)
    default = compute_scores(model, data, 3)
    assert not torch.allclose(scores.heads, default.heads)


# Gemma 2: its sliding and global layers alternate, and each remaining layer keeps its own type.
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2"])
def test_lm_loss_scores_equal_models_built_without_each_layer(family):
    model = make_tiny_model(family)
    data = blocks(6)
    scores = compute_scores(model, data, 4, ImportanceConfig(depth_method="lm_loss",
                                                             lm_loss_blocks=3))
    subset = data[:3]

    def loss(m):
        with torch.no_grad():
            return m(subset, labels=subset, use_cache=False).loss.item()

    base = loss(model)
    expected = []
    for i in range(4):
        m = copy.deepcopy(model)
        del m.model.layers[i]
        m.config.num_hidden_layers = 3
        if isinstance(getattr(m.config, "layer_types", None), list):
            m.config.layer_types = m.config.layer_types[:i] + m.config.layer_types[i + 1:]
        expected.append(loss(m) - base)
    torch.testing.assert_close(scores.layers_lm_loss, torch.tensor(expected), rtol=1e-4, atol=1e-5)
    assert scores.meta["lm_loss_blocks"] == 3
    # The model is restored after the layer-skip passes.
    assert len(model.model.layers) == 4
    torch.testing.assert_close(loss(model), base)


def test_scores_round_trip_through_safetensors_and_json(tmp_path):
    model = make_tiny_model()
    scores = compute_scores(model, blocks(4), 2, ImportanceConfig("l2", "mean", "lm_loss", 2))
    path = save_scores(scores, tmp_path / "s" / "scores.safetensors")
    back = load_scores(path)
    for k in ("neurons", "heads", "kv_groups", "hidden", "layers_bi", "layers_lm_loss"):
        assert torch.equal(getattr(back, k), getattr(scores, k)), k
    assert back.config == scores.config
    import json

    summary = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert summary["config"]["aggregation_seq"] == "l2"
    assert sorted(summary["layers_by_bi_least_first"]) == [0, 1, 2, 3]


def test_bad_settings_are_refused_by_name(tmp_path):
    with pytest.raises(MinitronError, match="aggregation_seq='median'.*valid: mean, l2, var"):
        ImportanceConfig(aggregation_seq="median")
    with pytest.raises(MinitronError, match="depth_method='cosine'.*block_importance, lm_loss"):
        ImportanceConfig(depth_method="cosine")
    with pytest.raises(MinitronError, match="head_score='q_proj'.*attention_output, o_proj_contribution"):
        ImportanceConfig(head_score="q_proj")
    with pytest.raises(MinitronError, match="lm_loss_blocks=0"):
        ImportanceConfig(lm_loss_blocks=0)
    with pytest.raises(MinitronError, match="does not exist"):
        load_scores(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MinitronError, match="not readable"):
        load_scores(tmp_path / "junk.safetensors")
    scores = compute_scores(make_tiny_model(), blocks(2), 2)
    with pytest.raises(MinitronError, match="needs LM-loss layer scores.*have none"):
        scores.layer_scores("lm_loss")
    with pytest.raises(MinitronError, match="intermediate_size: scores 96 vs model 128"):
        scores.check_matches(make_tiny_model(intermediate_size=128).config)
