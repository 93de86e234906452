"""Qwen3, Gemma 2, Gemma 3 (text) and Phi-3 through importance, pruning, distillation and export.

References are independent of minitron: a float64 forward written out by hand per family, the
family's own transformers model before pruning, a fresh interpreter that reloads the pruned folder
with plain transformers, PyTorch models built on the meta device, and onnxruntime.
"""

import copy
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from minitron.common import MinitronError
from minitron.importance import compute_scores
from minitron.models import ARCHS, arch_of, count_params, param_count_from_config
from minitron.prune import plan, prune, save_pruned, target_for_budget
from tiny import (NEW_FAMILIES, make_tiny_model, prune_inert_layers, tiny_config,
                  tiny_tokenizer)

IDS = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(3))
TIED = {"qwen3": False, "gemma2": True, "gemma3_text": True, "phi3": True}  # as they ship (Phi-4-mini)
SMALLER = {"hidden_size": 48, "intermediate_size": 40, "num_attention_heads": 4,
           "num_key_value_heads": 1, "num_hidden_layers": 3}


pytestmark = pytest.mark.usefixtures("one_thread")


def calib(n=6, t=24):
    return torch.randint(0, 384, (n, t), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, ids=IDS):
    return model(ids).logits


# ----------------------------------------------------------------------------- the table
@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_closed_form_parameter_count(family, tied):
    model = make_tiny_model(family, tie_word_embeddings=tied)
    assert param_count_from_config(model.config) == count_params(model)
    assert param_count_from_config(model.config.to_dict()) == count_params(model)


def test_qwen3_attention_bias_is_counted():
    model = make_tiny_model("qwen3", attention_bias=True)
    assert param_count_from_config(model.config) == count_params(model)


def test_other_families_are_refused_before_weights_load_with_the_supported_list(tmp_path):
    from transformers import Gemma3Config

    from minitron.models import load_model

    config = Gemma3Config()  # the multimodal Gemma 3: config only, no weights
    config.architectures = ["Gemma3ForConditionalGeneration"]
    config.save_pretrained(tmp_path)
    with pytest.raises(MinitronError) as e:
        load_model(tmp_path)
    assert "Gemma3ForConditionalGeneration" in str(e.value)
    for name in ("Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"):
        assert name in ARCHS and name in str(e.value)


# ----------------------------------------------------------------------------- importance by hand
def _rms(x, w, offset, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w)


def _rope(x, cos, sin):
    """Rotary embedding on the first cos.shape[-1] dims of each head (partial rotary: Phi-3)."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = torch.cat([-rot[..., r // 2:], rot[..., :r // 2]], dim=-1)
    return torch.cat([rot * cos + half * sin, rest], dim=-1)


def _cos_sin(cfg, layer_type, t):
    """Plain RoPE's cos/sin for positions 0..t-1 in float64 from the config's rotary settings
    (transformers 5: `rope_parameters`, nested by layer type for Gemma 3: local and global bases)."""
    rope = cfg.rope_parameters
    rope = rope.get(layer_type, rope) if layer_type in rope else rope
    assert rope["rope_type"] == "default", rope
    dim = int(cfg.head_dim * rope.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def hand_forward(m, family, ids):
    """A one-layer model's activations, written out from the papers/model cards (float64 `m`)."""
    cfg, t = m.config, ids.numel()
    gemma, layer = family.startswith("gemma"), m.model.layers[0]
    att, mlp, off, eps = layer.self_attn, layer.mlp, (1.0 if gemma else 0.0), cfg.rms_norm_eps
    H, KV, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = m.model.embed_tokens.weight[ids]
    if gemma:  # embeddings times sqrt(hidden_size)
        x = x * math.sqrt(cfg.hidden_size)
    layer_in = x
    n1 = _rms(x, layer.input_layernorm.weight, off, eps)
    if family == "phi3":
        qkv = n1 @ att.qkv_proj.weight.T
        q, k, v = qkv.split([H * d, KV * d, KV * d], dim=-1)
    else:
        q, k, v = n1 @ att.q_proj.weight.T, n1 @ att.k_proj.weight.T, n1 @ att.v_proj.weight.T
    q, k, v = q.view(t, H, d), k.view(t, KV, d), v.view(t, KV, d)
    if family in ("qwen3", "gemma3_text"):  # per-head norms over head_dim
        q, k = _rms(q, att.q_norm.weight, off, eps), _rms(k, att.k_norm.weight, off, eps)
    layer_type = getattr(cfg, "layer_types", None) or ["full_attention"]
    sliding = layer_type[0] == "sliding_attention"
    cos, sin = _cos_sin(cfg, layer_type[0], t)
    q, k = _rope(q, cos[:, None], sin[:, None]), _rope(k, cos[:, None], sin[:, None])
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
    scale = cfg.query_pre_attn_scalar ** -0.5 if gemma else d ** -0.5
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    cap = getattr(cfg, "attn_logit_softcapping", None)
    if cap:
        s = cap * torch.tanh(s / cap)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    allowed = (j <= i) & ((i - j < cfg.sliding_window) if sliding else True)
    s = s.masked_fill(~allowed, -math.inf)
    o = torch.einsum("hij,jhd->ihd", s.softmax(-1), v)  # [T, H, d]: the o_proj input per head
    a_out = o.reshape(t, H * d) @ att.o_proj.weight.T
    if gemma:
        a_out = _rms(a_out, layer.post_attention_layernorm.weight, off, eps)
    x = x + a_out
    n2 = _rms(x, (layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm)
              .weight, off, eps)
    if family == "phi3":
        gate, up = (n2 @ mlp.gate_up_proj.weight.T).chunk(2, dim=-1)
    else:
        gate, up = n2 @ mlp.gate_proj.weight.T, n2 @ mlp.up_proj.weight.T
    act = F.gelu(gate, approximate="tanh") if gemma else F.silu(gate)
    down_in = act * up
    m_out = down_in @ mlp.down_proj.weight.T
    if gemma:
        m_out = _rms(m_out, layer.post_feedforward_layernorm.weight, off, eps)
    x = x + m_out
    final = _rms(x, m.model.norm.weight, off, eps)
    out = final @ m.lm_head.weight.T
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        out = cap * torch.tanh(out / cap)
    return {"down_in": down_in, "o_in": o, "norms": [n1, n2, final], "logits": out,
            "bi": 1 - F.cosine_similarity(layer_in, x, dim=-1)}


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_one_layer_importance_matches_a_float64_computation_by_hand(family):
    overrides = {"num_hidden_layers": 1}
    if family.startswith("gemma"):
        overrides["layer_types"] = ["sliding_attention"]  # window 6 < 24 tokens: it slides
    model = make_tiny_model(family, **overrides)
    data = calib(5)
    scores = compute_scores(model, data, 2)
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        acts = [hand_forward(m, family, ids) for ids in data]
        # The hand-written forward is the model: its logits agree.
        torch.testing.assert_close(acts[0]["logits"].float(), model(data[:1]).logits[0],
                                   rtol=1e-4, atol=1e-4)

    def agg(values):  # mean |.| over the sequence, then L2 over the samples
        return torch.stack([v.abs().mean(0) for v in values]).pow(2).sum(0).sqrt()

    tol = dict(rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(scores.neurons[0], agg([a["down_in"] for a in acts]).float(), **tol)
    torch.testing.assert_close(scores.heads[0], agg([a["o_in"].norm(dim=-1) for a in acts]).float(),
                               **tol)
    hidden = sum(agg([a["norms"][j] for a in acts]) for j in range(3))
    torch.testing.assert_close(scores.hidden, hidden.float(), **tol)
    bi = torch.cat([a["bi"] for a in acts]).mean()
    torch.testing.assert_close(scores.layers_bi[0], bi.float(), rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_pruning_to_the_source_shape_reproduces_its_logits_exactly(family):
    model = make_tiny_model(family, tie_word_embeddings=TIED[family])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune(model, compute_scores(model, calib(), 4), {"hidden_size": 64,
                                                              "num_hidden_layers": 4})
    assert torch.equal(logits(pruned), logits(model))
    assert count_params(pruned) == count_params(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@torch.no_grad()
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("tied", [True, False])
def test_gemma_student_sees_the_teachers_hidden_state_scale(family, tied):
    """Inert hidden channels pruned away: the embedding factor sqrt(h) changes from 8 to sqrt(56),
    and the student still computes the teacher's logits once the RMS norms' mean over 56 instead
    of 64 channels is undone (their gain, 1 + w, scaled by sqrt(64/56))."""
    model = make_tiny_model(family, tie_word_embeddings=tied, rms_norm_eps=1e-30)
    planted = [2, 9, 17, 30, 31, 44, 50, 63]
    kept = [c for c in range(64) if c not in planted]
    model.model.embed_tokens.weight[:, planted] = 0
    for layer in model.model.layers:  # nothing ever writes into the planted channels
        layer.self_attn.o_proj.weight[planted] = 0
        layer.mlp.down_proj.weight[planted] = 0
    ref = model(IDS, output_hidden_states=True)
    scores = compute_scores(model, calib(), 4)
    assert sorted(torch.argsort(scores.hidden)[:8].tolist()) == planted
    pruned = prune(model, scores, {"hidden_size": 56})
    # The stream the first layer reads is the teacher's, channel for channel.
    got = pruned(IDS, output_hidden_states=True)
    torch.testing.assert_close(got.hidden_states[0], ref.hidden_states[0][..., kept],
                               rtol=1e-6, atol=1e-6)
    spec = arch_of(pruned)
    for name, mod in pruned.named_modules():
        if name.endswith("norm") and mod.weight.numel() == 56:  # not q_norm / k_norm (head_dim)
            spec.set_norm_gain_(mod, spec.norm_gain(mod.weight) * math.sqrt(64 / 56))
    torch.testing.assert_close(pruned(IDS).logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == tied


@torch.no_grad()
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_embedding_scale_in_bfloat16(family):
    """In bf16 the model rounds sqrt(h) to bf16 (sqrt(64) = 8 exactly, sqrt(48) = 6.9375); the
    folded factor uses those rounded values, so the student's first hidden states are the
    teacher's to bf16 rounding of the stored embedding."""
    model = make_tiny_model(family).to(torch.bfloat16)
    ref = model(IDS, output_hidden_states=True).hidden_states[0]
    scores = compute_scores(model, calib(), 4)
    pruned = prune(model, scores, {"hidden_size": 48})
    kept = torch.argsort(scores.hidden, descending=True, stable=True)[:48].sort().values
    got = pruned(IDS, output_hidden_states=True).hidden_states[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref[..., kept].float(), rtol=2 ** -7, atol=0)
    # Without the fold the stream would be sqrt(48/64) = 0.87 times the teacher's.
    assert not torch.allclose(got.float() * (6.9375 / 8), ref[..., kept].float(), rtol=2 ** -7)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_depth_pruning_keeps_each_layers_attention_type(family):
    model = make_tiny_model(family)
    types = model.config.layer_types
    scores = compute_scores(model, calib(2), 2)
    scores.layers_bi = torch.tensor([1.0, 0.1, 2.0, 3.0])  # drop layer 1
    pruned = prune(model, scores, {"num_hidden_layers": 3})
    assert pruned.config.layer_types == [types[0], types[2], types[3]]
    attn = [layer.self_attn for layer in pruned.model.layers]
    assert [a.layer_type for a in attn] == pruned.config.layer_types
    assert [a.sliding_window for a in attn] == [6 if t == "sliding_attention" else None
                                                for t in pruned.config.layer_types]


@torch.no_grad()
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_inert_layers_prune_away_with_a_working_kv_cache(family):
    """Layers whose attention and MLP write nothing (for Gemma, the post-norm of zero is zero) rank
    lowest by both depth methods; without them the logits and greedy generation through the KV
    cache (Gemma's sliding/global layers, renumbered) are the teacher's."""
    model = make_tiny_model(family, tie_word_embeddings=TIED[family])
    ref, pruned = prune_inert_layers(model, calib(), logits)
    types = getattr(model.config, "layer_types", None)
    if types:
        assert pruned.config.layer_types == [types[0], types[3]]
    assert torch.equal(logits(pruned), ref)
    prompt = IDS[:1, :8]  # 8 prompt + 6 new tokens: past Gemma's sliding window of 6
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(pruned.generate(prompt, **gen), model.generate(prompt, **gen))


@pytest.fixture(scope="module")
def pruned_dirs(tmp_path_factory):
    """Each family pruned smaller (GQA, heads, KV groups, hidden, MLP and depth) and saved."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in NEW_FAMILIES:
        model = make_tiny_model(family, tie_word_embeddings=TIED[family])
        pruned = prune(model, compute_scores(model, calib(), 4), SMALLER, depth="contiguous")
        save_pruned(pruned, tiny_tokenizer(), root / family, {"source": "tiny"})
        out[family] = (root / family, pruned, model)
    return out


def test_pruned_models_reload_in_plain_transformers_in_a_fresh_process(pruned_dirs, tmp_path):
    torch.save(IDS, tmp_path / "ids.pt")
    dirs = {f: str(d) for f, (d, _, _) in pruned_dirs.items()}
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        out = {{}}
        for family, path in {dirs!r}.items():
            # Gemma 2 soft-caps attention scores, which transformers' SDPA path drops: eager.
            kw = {{"attn_implementation": "eager"}} if family == "gemma2" else {{}}
            m = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
            AutoTokenizer.from_pretrained(path)
            with torch.no_grad():
                torch.save(m(ids).logits, path + "/fresh_logits.pt")
            n = sum(p.numel() for p in {{id(p): p for p in m.parameters()}}.values())
            out[family] = {{"params": n, "layer_types": getattr(m.config, "layer_types", None),
                           "head_dim": m.config.head_dim}}
        assert not any(k.startswith("minitron") for k in sys.modules), "minitron was imported"
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for family, (path, pruned, source) in pruned_dirs.items():
        fresh = torch.load(path / "fresh_logits.pt")
        torch.testing.assert_close(fresh, logits(pruned), rtol=0, atol=0)
        config = tiny_config(family, tie_word_embeddings=TIED[family])
        expected = param_count_from_config({**config.to_dict(), **SMALLER})
        assert got[family]["params"] == expected, family
        assert got[family]["head_dim"] == source.config.head_dim  # never pruned
        kept = pruned.minitron_record["kept_layers"]
        types = getattr(source.config, "layer_types", None)
        assert got[family]["layer_types"] == ([types[i] for i in kept] if types else None)
        record = json.loads((path / "minitron.json").read_text())
        assert record["parameters"]["after"] == expected


def _v_rows(model, layer, rows):
    """The value-projection weight rows of `layer` (a row block of qkv_proj in Phi-3)."""
    att = model.model.layers[layer].self_attn
    if hasattr(att, "qkv_proj"):
        hl = model.config
        start = (hl.num_attention_heads + hl.num_key_value_heads) * hl.head_dim
        return att.qkv_proj.weight, [start + r for r in rows]
    return att.v_proj.weight, list(rows)


def _gate_rows(model, layer):
    mlp = model.model.layers[layer].mlp
    return mlp.gate_up_proj.weight if hasattr(mlp, "gate_up_proj") else mlp.gate_proj.weight


@torch.no_grad()
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_inert_kv_groups_and_neurons_rank_lowest_and_prune_away(family):
    """A KV group whose values are zero and MLP neurons whose gate is zero contribute nothing (for
    Phi-3 they are row blocks of the fused qkv_proj / gate_up_proj). Pruning them away (with every
    query head of the group; Qwen3 / Gemma 3 keep their per-head q/k norms whole) leaves the logits
    as they were."""
    model = make_tiny_model(family, tie_word_embeddings=TIED[family])
    d = model.config.head_dim
    groups = {0: 1, 1: 0, 2: 0, 3: 1}
    neurons = {0: [3, 50, 95], 1: [0, 1, 2], 2: [40, 41, 77], 3: [10, 60, 94]}
    for i, g in groups.items():
        w, rows = _v_rows(model, i, range(g * d, (g + 1) * d))
        w[rows] = 0
        _gate_rows(model, i)[neurons[i]] = 0  # act(0) * up = 0 for SiLU and GELU
    ref = logits(model)
    scores = compute_scores(model, calib(), 4)
    for i, g in groups.items():
        assert int(torch.argmin(scores.kv_groups[i])) == g
        assert sorted(torch.argsort(scores.neurons[i])[:3].tolist()) == neurons[i]
    pruned = prune(model, scores, {"num_key_value_heads": 1, "intermediate_size": 93})
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (4, 1)
    torch.testing.assert_close(logits(pruned), ref, rtol=1e-5, atol=1e-5)
    # Every kept weight is the source's, block by block: the surviving group and neurons.
    for i, g in groups.items():
        keep_g = 1 - g
        w, rows = _v_rows(model, i, range(keep_g * d, (keep_g + 1) * d))
        w_new, rows_new = _v_rows(pruned, i, range(d))
        assert torch.equal(w_new[rows_new], w[rows])
        kept = [n for n in range(96) if n not in neurons[i]]
        if family == "phi3":  # [gate; up]: the same neurons kept in both halves
            gate_up = model.model.layers[i].mlp.gate_up_proj.weight
            expected = torch.cat([gate_up[kept], gate_up[[96 + n for n in kept]]])
            assert torch.equal(pruned.model.layers[i].mlp.gate_up_proj.weight, expected)
        if family in ("qwen3", "gemma3_text"):
            for norm in ("q_norm", "k_norm"):
                assert torch.equal(getattr(pruned.model.layers[i].self_attn, norm).weight,
                                   getattr(model.model.layers[i].self_attn, norm).weight)


def test_phi3_longrope_shapes_that_would_not_reload_are_refused():
    """Phi3Config checks longrope's factors (rope_parameters) against hidden_size //
    num_attention_heads: 3 factors = int(8 x 0.75) // 2 for head_dim 8."""
    rope = {"rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0] * 3, "long_factor": [2.0] * 3}
    config = tiny_config("phi3", rope_parameters=rope, original_max_position_embeddings=64)
    with pytest.raises(MinitronError, match=r"hidden_size \(prune.hidden_size\) = 48 with "
                                            r"num_attention_heads = 8: .*hidden_size = "
                                            r"num_attention_heads x 8 \(= 64 for 8 heads\)"):
        plan(config, {"hidden_size": 48})
    fields = plan(config, {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2})
    from transformers import Phi3Config

    Phi3Config(**{**config.to_dict(), **fields})  # the reload check passes
    # A parameter budget skips the hidden sizes this config cannot take (heads are kept there).
    target, candidates = target_for_budget(config, 0.8)
    assert target["hidden_size"] == 64 and all(c["hidden_size"] == 64 for c in candidates)


# ----------------------------------------------------------------------------- distillation
def _naive_kl(student, teacher, blocks) -> float:
    with torch.no_grad():
        s = student(blocks).logits.double().log_softmax(-1)
        t = teacher(blocks).logits.double().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_a_short_distillation_lowers_the_kl_of_a_pruned_model(family, tmp_path, monkeypatch):
    """24 steps of 8 x 24 tokens. The teacher's weights are drawn wider (std 0.1) than the default
    0.02 so that its next-token distributions are far from uniform and there is something to learn;
    measured KL ratios after/before: 0.51 (Qwen3) to 0.73 (Gemma 3)."""
    from minitron.config import DistillConfig
    from minitron.distill import distill

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU: the kernel's torch reference
    teacher = make_tiny_model(family, tie_word_embeddings=TIED[family], initializer_range=0.1)
    student = prune(teacher, compute_scores(teacher, calib(), 4),
                    {"hidden_size": 48, "intermediate_size": 48, "num_attention_heads": 4})
    gen = torch.Generator().manual_seed(5)
    train, evalb = torch.randint(0, 384, (64, 24), generator=gen), calib(4)
    before = _naive_kl(student, teacher, evalb)
    config = DistillConfig(tokens=24 * 8 * 24, batch_size=8, block_size=24, lr=5e-3,
                           warmup_fraction=0.0, checkpoint_every=1000, eval_every=1000,
                           eval_blocks=4, progress=False, seed=0)
    distill(copy.deepcopy(teacher), student, train, evalb, config, tmp_path / "run",
            tokenizer=tiny_tokenizer())
    after = _naive_kl(student.eval(), teacher, evalb)
    assert after < 0.85 * before, (before, after)


def test_fused_kd_refuses_final_logit_softcapping():
    from minitron.config import DistillConfig
    from minitron.distill.losses import _use_fused

    gemma2 = tiny_config("gemma2")
    assert not _use_fused(DistillConfig(loss_impl="auto"), 300_000, gemma2)  # logits path
    with pytest.raises(MinitronError, match=r"final_logit_softcapping=5.0"):
        _use_fused(DistillConfig(loss_impl="fused"), 384, gemma2)
    assert _use_fused(DistillConfig(loss_impl="fused"), 384, tiny_config("qwen3"))


def test_qwen3_8b_to_4b_recipe_dry_runs_offline_with_counts_of_the_real_architecture(capsys):
    """The closed form against Qwen3ForCausalLM built on the meta device (no memory) at both
    shapes; 8.19B is Qwen's published 8.2B."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    from minitron.pipeline import dry_run
    from minitron.recipe import load_recipe

    root = Path(__file__).parent.parent / "recipes"
    plan_info = dry_run(load_recipe(root / "qwen3-8b-to-4b-width.yaml"))
    assert plan_info["pruned_shape"] == {"hidden_size": 2560, "intermediate_size": 8192,
                                         "num_attention_heads": 32, "num_key_value_heads": 8,
                                         "num_hidden_layers": 36, "head_dim": 128}
    config = AutoConfig.from_pretrained(root / "configs" / "qwen3-8b.json")
    for fields, want in ((plan_info["source_shape"], plan_info["source_params"]),
                         (plan_info["pruned_shape"], plan_info["pruned_params"])):
        c = copy.deepcopy(config)
        for k, v in fields.items():
            setattr(c, k, v)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(c)
        assert count_params(model) == want
    assert plan_info["source_params"] == 8_190_735_360
    assert plan_info["pruned_params"] == 3_986_750_976
    assert "3,986,750,976 parameters" in capsys.readouterr().out


@pytest.mark.parametrize("family,facts", [
    ("gemma2", dict(vocab_size=256_000, hidden_size=2304, intermediate_size=9216,
                    num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                    head_dim=256, query_pre_attn_scalar=256, tie_word_embeddings=True)),
    ("gemma3_text", dict(vocab_size=262_144, hidden_size=1152, intermediate_size=6912,
                         num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=256, query_pre_attn_scalar=256, tie_word_embeddings=True,
                         layer_types=None)),
    ("phi3", dict(vocab_size=200_064, hidden_size=3072, intermediate_size=8192,
                  num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
                  head_dim=128, tie_word_embeddings=True)),
])
def test_closed_form_at_published_shapes_with_large_tied_vocabularies(family, facts):
    """Gemma 2 2B, Gemma 3 1B and Phi-4-mini shapes (tied 200k-262k vocabularies), and each pruned
    to 3/4 of its hidden size and half its MLP, against the model built on the meta device."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **facts)
    heads = config.num_attention_heads
    for fields in ({}, {"hidden_size": config.hidden_size * 3 // 4 // heads * heads,
                        "intermediate_size": config.intermediate_size // 2}):
        c = copy.deepcopy(config)
        for k, v in plan(config, fields).items():
            setattr(c, k, v)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(c)
        assert param_count_from_config(c) == count_params(model)


def test_gemma2_loads_with_eager_attention_because_sdpa_drops_the_soft_cap(tmp_path):
    from transformers import AutoModelForCausalLM

    from minitron.models import load_model

    make_tiny_model("gemma2", path=tmp_path)
    ours, _ = load_model(tmp_path)
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert ours.config._attn_implementation == "eager"
    assert torch.equal(logits(ours), logits(eager))
    try:  # transformers 5.17 still serves Gemma 2 through SDPA, which drops the cap
        sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    except ValueError as e:  # transformers 5.24 refuses it (Gemma2PreTrainedModel._supports_sdpa)
        assert "scaled_dot_product_attention" in str(e)
    else:
        assert (logits(sdpa) - logits(eager)).abs().max() > 1e-2  # the cap (2.0) is not applied
    qwen3_dir = tmp_path / "qwen3"
    make_tiny_model("qwen3", path=qwen3_dir)
    assert load_model(qwen3_dir)[0].config._attn_implementation == "sdpa"  # nothing to cap
