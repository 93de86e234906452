"""SmoothQuant and AWQ (minitron.quantize) against float64 references of their defining equations:
on a tiny layer (the scales, the migrated maxima, the rounding and its output error), and on tiny
models of every layout (the rescaled model computes the same logits before any rounding)."""

import copy

import pytest
import torch

from minitron import calibration, quantize
from test_importance import blocks
from tiny import make_tiny_model


def layer(seed=0, n=200, d_in=64, d_out=24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    x[:, 5] *= 40  # an outlier channel
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / 8
    return x, w


def test_smoothquant_scales_balance_the_maxima_and_keep_the_product():
    x, w = layer()
    s = quantize.smooth_scales(x.abs().amax(0), w.abs().amax(0), 0.5)
    torch.testing.assert_close(s, (x.abs().amax(0) / w.abs().amax(0)).sqrt(), rtol=1e-12, atol=0)
    # at a = 0.5 the migrated activation and weight maxima are equal per channel
    torch.testing.assert_close((x / s).abs().amax(0), (w * s).abs().amax(0), rtol=1e-12, atol=0)
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-12, atol=1e-12)
    # the outlier channel no longer sets the activation step: the expected W8A8 error drops
    one = torch.ones(64, dtype=torch.float64)
    msq = x.pow(2).mean(0)
    assert quantize.w8a8_error([w], x.abs().amax(0), msq, s) < \
        0.5 * quantize.w8a8_error([w], x.abs().amax(0), msq, one)


def test_w8a8_error_model_matches_simulated_rounding():
    """The noise model (uniform rounding, step^2 / 12) against actual W8A8 rounding of the layer."""
    x, w = layer(1, n=4000)
    one = torch.ones(64, dtype=torch.float64)
    step_x = x.abs().max() / 127
    step_w = w.abs().amax(1, keepdim=True) / 127
    xq, wq = (x / step_x).round() * step_x, (w / step_w).round() * step_w
    simulated = (xq @ wq.T - x @ w.T).pow(2).sum(1).mean()
    model = quantize.w8a8_error([w], x.abs().amax(0), x.pow(2).mean(0), one)
    assert 0.7 < model / float(simulated) < 1.4


def test_measured_w8a8_error_equals_a_plain_rounding_loop():
    """Static uint8 activations (one asymmetric step over the calibration range) and per-row
    int8 weights, rounded element by element in float64, against the vectorised measurement."""
    x, w = layer(3, n=30, d_in=8, d_out=5)
    x[:, 2] += 3.0  # an asymmetric range
    s = x.abs().amax(0).pow(0.5)
    xs, ws = x / s, w * s
    lo, hi = min(0.0, xs.min().item()), max(0.0, xs.max().item())
    step = (hi - lo) / 255
    zero = round(-lo / step)
    xq = torch.tensor([[(min(max(round(v / step) + zero, 0), 255) - zero) * step for v in row]
                       for row in xs.tolist()], dtype=torch.float64)
    wq = torch.tensor([[round(v / (max(map(abs, row)) / 127)) * (max(map(abs, row)) / 127)
                        for v in row] for row in ws.tolist()], dtype=torch.float64)
    want = (xq @ wq.T - x @ w.T).pow(2).sum()
    got = torch.tensor(quantize.w8a8_measured_error([w], x, s), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)


def test_measured_strength_is_the_least_measured_error():
    model = make_tiny_model("llama", seed=8)
    with torch.no_grad():  # an outlier input channel of the MLP
        model.model.layers[0].post_attention_layernorm.weight[3] = 30.0
    data = blocks(n=3, t=12)
    stats = calibration.collect(model, data)
    inputs = quantize.group_inputs(model, data)
    key = "model.layers.0.mlp.gate_proj"
    assert inputs[key].shape == (3 * 12, model.config.hidden_size)
    m = copy.deepcopy(model)
    info = quantize.smoothquant_(m, stats, alphas=(0.2, 0.5, 0.8), inputs=inputs)
    g = next(g for g in quantize.groups(model) if g.name == "model.layers.0.mlp_in")
    ws = [w.double() for w in quantize._weights(g)]
    w_max = torch.stack([w.abs().amax(0) for w in ws]).amax(0)
    x_max = stats.get(key, "abs_max")
    errors = {a: quantize.w8a8_measured_error(ws, inputs[key], quantize.smooth_scales(x_max, w_max, a))
              for a in (0.2, 0.5, 0.8)}
    errors[None] = quantize.w8a8_measured_error(ws, inputs[key], torch.ones_like(x_max))
    assert info["alpha"]["model.layers.0.mlp_in"] == min(errors, key=errors.get) is not None
    assert info["error_ratio"]["model.layers.0.mlp_in"] == pytest.approx(
        min(errors.values()) / errors[None], rel=1e-6)


def test_blockwise_rounding_and_awq_error_equal_their_definitions():
    x, w = layer(2, d_in=40)
    q = quantize.fake_quant_blockwise(w, 4, 16)
    for r in range(w.shape[0]):  # a plain loop over blocks: asymmetric, integer zero point
        for b0 in range(0, 40, 16):
            blk = w[r, b0:b0 + 16]
            lo, hi = min(blk.min(), 0), max(blk.max(), 0)
            scale = (hi - lo) / 15
            zero = torch.clamp(torch.round(-lo / scale), 0, 15)
            ref = (torch.clamp(torch.round(blk / scale) + zero, 0, 15) - zero) * scale
            torch.testing.assert_close(q[r, b0:b0 + 16], ref, rtol=0, atol=1e-12)
    s = x.abs().mean(0).pow(0.5)
    direct = ((quantize.fake_quant_blockwise(w * s, 4, 16) / s - w) @ x.T).pow(2).sum()
    torch.testing.assert_close(torch.tensor(quantize.awq_error([w], x.T @ x, s, 4, 16),
                                            dtype=torch.float64),
                               direct, rtol=1e-9, atol=0)


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("qwen2", {}), ("phi3", {}),
                                              ("gemma2", {}), ("llama", {"mlp_bias": True})])
def test_rescaled_models_compute_the_same_logits(family, overrides):
    model = make_tiny_model(family, seed=5, **overrides)
    data = blocks(n=3, t=12)
    stats = calibration.collect(model, data, gram=True)
    ids = blocks(n=2, t=10, seed=7)
    ref_model = copy.deepcopy(model).double()
    want = ref_model(ids).logits
    for method in ("smooth", "awq"):
        m = copy.deepcopy(model).double()
        if method == "smooth":  # the LM head's input too (untied from the embedding if tied)
            info = quantize.smoothquant_(m, stats, inputs=quantize.group_inputs(m, data), head=True)
            assert info["alpha"].pop(quantize.HEAD_GROUP, "absent") != "absent"
            torch.testing.assert_close(m.model.embed_tokens.weight, ref_model.model.embed_tokens.weight,
                                       rtol=0, atol=0)
        else:
            info = quantize.awq_(m, stats, block=16)
        assert len(info["alpha"]) == 4 * model.config.num_hidden_layers
        changed = [n for n, p in m.named_parameters()
                   if not torch.equal(p, dict(ref_model.named_parameters())[n])]
        assert any("down_proj" in n for n in changed) and any("o_proj" in n for n in changed)
        # Gemma's norms compute in float32 whatever the model's dtype
        tol = 1e-5 if family.startswith("gemma") else 1e-9
        torch.testing.assert_close(m(ids).logits, want, rtol=tol, atol=tol)


def test_awq_lowers_the_4bit_output_error_on_calibration_tokens():
    model = make_tiny_model("llama", seed=6)
    with torch.no_grad():  # an outlier input channel of the MLP, as in real models
        model.model.layers[1].post_attention_layernorm.weight[3] = 30.0
    data = blocks(n=4, t=16)
    stats = calibration.collect(model, data, gram=True)
    x = stats.get("model.layers.1.mlp.gate_proj", "gram")
    m = copy.deepcopy(model).double()
    info = quantize.awq_(m, stats, block=16)
    assert info["alpha"]["model.layers.1.mlp_in"] > 0
    # gate_proj (up_proj's rows also carry down_proj's input scales)
    w = model.model.layers[1].mlp.gate_proj.weight.detach().double()
    ws = m.model.layers[1].mlp.gate_proj.weight.detach()
    s = ws[0] / w[0]  # the scale AWQ folded into the weight's columns
    err = {key: float(((dw @ x) * dw).sum()) for key, dw in (
        ("rtn", quantize.fake_quant_blockwise(w, 4, 16) - w),
        ("awq", quantize.fake_quant_blockwise(ws, 4, 16) / s - w))}
    assert err["awq"] < 0.9 * err["rtn"]


def test_head_smoothing_unties_a_tied_head_and_keeps_the_logits():
    """A head tied to the embedding, its input given an outlier channel: smoothquant_(head=True)
    scales the head's columns (untied: the embedding keeps its values, config says untied), folds
    1/s into the final norm, and the logits are those of the original model."""
    model = make_tiny_model("llama", seed=3, tie_word_embeddings=True).double()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        model.model.norm.weight[2] = 40.0
    data = blocks(n=3, t=12)
    stats = calibration.collect(model, data)
    m = copy.deepcopy(model)
    inputs = quantize.group_inputs(m, data)
    assert inputs["lm_head"].shape == (3 * 12, model.config.hidden_size)
    info = quantize.smoothquant_(m, stats, alphas=(0.5,), inputs=inputs, head=True)
    assert info["alpha"][quantize.HEAD_GROUP] == 0.5
    assert m.lm_head.weight is not m.model.embed_tokens.weight and not m.config.tie_word_embeddings
    torch.testing.assert_close(m.model.embed_tokens.weight, model.model.embed_tokens.weight,
                               rtol=0, atol=0)
    x_max, w_max = inputs["lm_head"].double().abs().amax(0), model.lm_head.weight.abs().amax(0)
    s = quantize.smooth_scales(x_max, w_max, 0.5)
    torch.testing.assert_close(m.lm_head.weight, model.lm_head.weight * s[None, :])
    torch.testing.assert_close(m.model.norm.weight, model.model.norm.weight / s)
    ids = blocks(n=2, t=10, seed=7)
    torch.testing.assert_close(m(ids).logits, model(ids).logits, rtol=1e-9, atol=1e-9)


@torch.no_grad()
def test_int8_sensitivity_is_the_kl_of_that_layer_alone_in_w8a8():
    """int8_sensitivity against a float64 reference written out here: the layer's weight rounded
    per row to 127 steps of its max, its input to 255 asymmetric steps of [min(0, lo), max(0, hi)]
    (lo, hi: the input's range over the blocks themselves, or over other blocks given by
    input_ranges), KL(float || that model) per token, averaged."""
    model = make_tiny_model("llama", seed=4).double()
    with torch.no_grad():  # layer 1's down_proj input gets an outlier channel: it costs most
        model.model.layers[1].mlp.up_proj.weight[7] *= 50
    ids, calib = blocks(n=2, t=16, seed=2), blocks(n=5, t=16, seed=3)
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(model.config.num_hidden_layers)]
    ranges = quantize.input_ranges(model, calib, names)
    ref = torch.log_softmax(model(ids).logits, -1)

    def reference(name, over):
        m = copy.deepcopy(model)
        lin = m.get_submodule(name)
        seen = []
        hook = lin.register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
        m(over)
        hook.remove()
        lo = min(0.0, min(float(x.min()) for x in seen))
        hi = max(0.0, max(float(x.max()) for x in seen))
        w = lin.weight.data
        step_w = w.abs().amax(1, keepdim=True) / 127
        lin.weight.data = torch.round(w / step_w) * step_w
        step = (hi - lo) / 255
        zero = round(-lo / step)
        lin.register_forward_pre_hook(
            lambda mod, a: ((torch.clamp(torch.round(a[0] / step) + zero, 0, 255) - zero) * step,))
        logq = torch.log_softmax(m(ids).logits, -1)
        return float((ref.exp() * (ref - logq)).sum(-1).mean())

    own, calibrated = (quantize.int8_sensitivity(model, ids, names),
                       quantize.int8_sensitivity(model, ids, names, ranges))
    for name in names:
        assert own[name] == pytest.approx(reference(name, ids), rel=1e-6, abs=1e-12)
        assert calibrated[name] == pytest.approx(reference(name, calib), rel=1e-6, abs=1e-12)
    assert max(own, key=own.get) == names[1] and own[names[0]] > 0
