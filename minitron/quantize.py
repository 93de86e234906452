"""Activation-aware weight transforms before ONNX quantization: SmoothQuant (W8A8) and AWQ (INT4).

Both rescale each input channel j of a linear layer's input: x_j -> x_j / s_j and W[:, j] ->
W[:, j] * s_j, which leaves the product unchanged (W x = (W diag(s)) (diag(1/s) x)). The division
of x is folded into whatever produces x, so the graph gains no operation:

- the inputs of q/k/v (and gate/up) are a norm's output: its gain g_j -> g_j / s_j;
- the input of o_proj is the attention output, a per-head mix of v_proj's rows: v_proj's row
  (and bias) for channel j -> / s_j. Query heads of one KV group read the same v rows, so their
  channels share one scale (the group's);
- the input of down_proj is act(gate) * up, linear in up: up_proj's row (and bias) j -> / s_j;
- the LM head's input is the final norm's output (its gain, as above); a head tied to the
  embedding is untied first, so the embedding lookup keeps its values (the ONNX graph holds the
  head's own transposed copy anyway). SmoothQuant only: the head's static INT8 input is where
  SmolLM2-135M's largest outliers are (max |x| 57 over a median of ~5), +3.3% perplexity unscaled.

SmoothQuant (Xiao et al., arXiv 2211.10438) makes the activations easy to quantize per tensor:
s_j = max|X_j|^a / max|W_:,j|^(1-a). The strength a is chosen per group of linears sharing an
input, from {none, 0.3, 0.4, 0.5}, by the expected output error of W8A8 rounding (per-tensor
activation step, per-row weight steps; uniform rounding noise step^2 / 12) computed from the
calibration statistics (max |x_j| and E[x_j^2]).

AWQ (Lin et al., arXiv 2306.00978) protects the weights of salient channels at 4 bits:
s_j = mean|X_j|^a, a from a grid, chosen per group by the layer output error of 4-bit blockwise
rounding, measured exactly on the calibration tokens through their Gram matrix G = X^T X:
||(Q(W diag(s)) diag(1/s) - W) X^T||^2 = tr(dW G dW^T).

The statistics are minitron.calibration's (the importance pass, or a short pass at export).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from minitron.calibration import Stats
from minitron.common import MinitronError
from minitron.models import ArchSpec, arch_of, decoder_layers, head_layout

# For the error model (smoothquant_ without measured inputs), capped at 0.5: it prefers the
# strongest migration (0.8-0.9 on SmolLM2-135M), but measured through ORT's static W8A8 that cost
# +25% perplexity against +6% at 0.5 (its uniform-noise estimate misses how outlier-scaled weight
# columns coarsen each row). The measured choice (export's) searches the whole range.
SMOOTH_ALPHAS = (0.3, 0.4, 0.5)
MEASURED_ALPHAS = tuple(i / 10 for i in range(1, 10))
MEASURE_BLOCKS = 1  # calibration blocks whose activations the strengths are measured on
AWQ_ALPHAS = tuple(i / 10 for i in range(11))
HEAD_GROUP = "lm_head_in"  # groups(head=True)'s last group: the LM head's input


@dataclass
class Group:
    """Linears that read one input, and what produces that input (where 1/s is folded)."""

    name: str                       # e.g. "model.layers.0.mlp_in"
    consumers: list[tuple[str, nn.Linear, slice | None]]  # (HF name, module, input columns)
    fold: Callable[[torch.Tensor], None]  # divides the producer by s (s over the input channels)
    stats_key: str                  # the module whose input statistics describe this input
    tie: Callable[[torch.Tensor], torch.Tensor] | None = None  # makes s share within KV groups


def _norm_fold(spec: ArchSpec, norm: nn.Module):
    def fold(s: torch.Tensor) -> None:
        gain = spec.norm_gain(norm.weight.data.double()) / s
        spec.set_norm_gain_(norm, gain.to(norm.weight.dtype))
    return fold


def _rows_fold(linear: nn.Linear, rows: torch.Tensor):
    """Divide rows `rows` of `linear` (and its bias) by s (s[k] for rows[k])."""
    def fold(s: torch.Tensor) -> None:
        w = linear.weight.data
        w[rows] = (w[rows].double() / s[:, None]).to(w.dtype)
        if linear.bias is not None:
            b = linear.bias.data
            b[rows] = (b[rows].double() / s).to(b.dtype)
    return fold


def _o_rows(hl) -> torch.Tensor:
    """The v row feeding each o_proj input channel: (head h, dim d) reads KV head h // group_size."""
    heads = torch.arange(hl.num_heads).repeat_interleave(hl.head_dim)
    dims = torch.arange(hl.head_dim).repeat(hl.num_heads)
    return (heads // hl.group_size) * hl.head_dim + dims


def groups(model: nn.Module, head: bool = False) -> list[Group]:
    """The rescalable input groups of every decoder layer (four per layer), then (with `head`)
    the LM head's input (HEAD_GROUP)."""
    spec = arch_of(model)
    hl = head_layout(model.config)
    out = []
    inter = model.config.intermediate_size
    for i, layer in enumerate(decoder_layers(model)):
        p = f"{spec.layers}.{i}."

        def lin(path, p=p, layer=layer):
            return (p + path, spec.get(layer, path), None)

        attn = [lin(spec.qkv_proj)] if spec.qkv_proj else [lin(spec.q_proj), lin(spec.k_proj),
                                                            lin(spec.v_proj)]
        mlp = [lin(spec.gate_up_proj)] if spec.gate_up_proj else [lin(spec.gate_proj),
                                                                   lin(spec.up_proj)]
        norm_attn, norm_mlp = (spec.get(layer, n) for n in spec.scored_norms)
        out.append(Group(p + "attn_in", attn, _norm_fold(spec, norm_attn), attn[0][0]))
        out.append(Group(p + "mlp_in", mlp, _norm_fold(spec, norm_mlp), mlp[0][0]))
        # o_proj input: v rows; the scale of channel c is its KV row's (shared by the group's heads)
        kv_rows = _o_rows(hl)
        if spec.qkv_proj:
            v_lin, v_off = spec.get(layer, spec.qkv_proj), (hl.num_heads + hl.num_kv_heads) * hl.head_dim
        else:
            v_lin, v_off = spec.get(layer, spec.v_proj), 0
        o = lin(spec.o_proj)
        n_kv = hl.num_kv_heads * hl.head_dim
        v_fold = _rows_fold(v_lin, torch.arange(n_kv) + v_off)

        def tie(s, kv_rows=kv_rows, n_kv=n_kv):
            total = torch.zeros(n_kv, dtype=s.dtype).index_add_(0, kv_rows, s)
            count = torch.zeros(n_kv, dtype=s.dtype).index_add_(0, kv_rows, torch.ones_like(s))
            return (total / count)[kv_rows]

        def o_fold(s, kv_rows=kv_rows, n_kv=n_kv, v_fold=v_fold):
            v_fold(torch.zeros(n_kv, dtype=s.dtype).index_copy_(0, kv_rows, s))
        out.append(Group(p + "o_in", [o], o_fold, o[0], tie))
        # down_proj input: act(gate) * up is linear in up's rows
        up = spec.get(layer, spec.gate_up_proj or spec.up_proj)
        up_rows = torch.arange(inter) + (inter if spec.gate_up_proj else 0)
        d = lin(spec.down_proj)
        out.append(Group(p + "down_in", [d], _rows_fold(up, up_rows), d[0]))
    if head:
        out.append(head_group(model))
    return out


def head_group(model: nn.Module) -> Group:
    """The LM head's input (HEAD_GROUP): the final norm's output."""
    spec = arch_of(model)
    return Group(HEAD_GROUP, [(spec.lm_head, spec.get(model, spec.lm_head), None)],
                 _norm_fold(spec, spec.get(model, spec.final_norm)), spec.lm_head)


def untie_head_(model: nn.Module) -> None:
    """Give the LM head weights of its own if it shares the embedding's (so that rescaling its
    input channels leaves the embedding lookup as it was)."""
    spec = arch_of(model)
    head, embed = spec.get(model, spec.lm_head), spec.get(model, spec.embed)
    if head.weight is embed.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False


@torch.no_grad()
def apply_scales_(group: Group, s: torch.Tensor) -> None:
    """x -> x / s folded into the producer, W[:, j] -> W[:, j] * s_j in every consumer."""
    s = s.double()
    if group.tie is not None:
        s = group.tie(s)
    group.fold(s)
    for _, m, _ in group.consumers:
        m.weight.data = (m.weight.data.double() * s[None, :]).to(m.weight.dtype)


def matmul_block(model: nn.Module, largest: int = 128) -> int:
    """The MatMulNBits block export uses for `model` (export.blockwise_block_size on its graph):
    the largest power of two <= `largest` dividing the input width of every linear layer."""
    ks = {m.in_features for m in model.modules() if isinstance(m, nn.Linear)}
    block = largest
    while block > 16 and any(k % block for k in ks):
        block //= 2
    return block


def _clean(s: torch.Tensor) -> torch.Tensor:
    """Scales that are finite and positive (a channel that never fired keeps scale 1)."""
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s.clamp(min=1e-5)


def smooth_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^a / max|W_j|^(1 - a)."""
    return _clean(x_max.double().clamp(min=1e-5).pow(alpha)
                  / w_max.double().clamp(min=1e-5).pow(1 - alpha))


def w8a8_error(weights: list[torch.Tensor], x_max: torch.Tensor, x_msq: torch.Tensor,
               s: torch.Tensor) -> float:
    """Expected squared output error per token of W8A8 after scaling by s: per-tensor symmetric
    activation step max_j(|x_j| / s_j) / 127 and per-row weight steps max_j |W_ij s_j| / 127, each
    rounding adding uniform noise of variance step^2 / 12."""
    s = s.double()
    step_x = (x_max.double() / s).max() / 127
    err = 0.0
    for w in weights:
        ws = w.double() * s[None, :]
        step_w = ws.abs().amax(1) / 127  # [out]
        err += float(step_x ** 2 / 12 * ws.pow(2).sum())
        err += float((step_w ** 2 / 12).sum() * (x_msq.double() / s ** 2).sum())
    return err


def fake_quant_activations(x: torch.Tensor, lo: float | None = None,
                           hi: float | None = None) -> torch.Tensor:
    """ORT's static uint8 activations over `x` [T, K]: one asymmetric step over the range
    [min(0, lo), max(0, hi)] (MinMax calibration; by default x's own min and max), zero point
    rounded to an integer."""
    lo = min(0.0, float(x.min()) if lo is None else lo)
    hi = max(0.0, float(x.max()) if hi is None else hi)
    step = max(hi - lo, 1e-12) / 255
    zero = round(-lo / step)
    return ((x / step).round() + zero).clamp(0, 255).sub(zero) * step


def fake_quant_rows(w: torch.Tensor) -> torch.Tensor:
    """ORT's per-channel int8 weights: each output row symmetric, step max|row| / 127."""
    step = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    return (w / step).round().clamp(-127, 127) * step


def w8a8_measured_error(weights: list[torch.Tensor], x: torch.Tensor, s: torch.Tensor) -> float:
    """Squared output error, summed over the tokens of `x` [T, K] and the group's `weights`, of
    static W8A8 after scaling by s: Q_a(x / s) Q_w(W diag(s))^T against x W^T (fake_quant_*).
    Computed in x's dtype (export passes float32 activations: a float64 pass over every group and
    strength is several times slower)."""
    s = s.to(x.dtype)
    xs = x / s
    xq = fake_quant_activations(xs)
    err = 0.0
    for w in weights:
        ws = w.to(x.dtype) * s[None, :]
        err += float((xq @ fake_quant_rows(ws).T - xs @ ws.T).pow(2).sum())
    return err


def _forward_hooked(model: nn.Module, blocks: torch.Tensor, handles: list, batch_size: int) -> None:
    """Run the base model over `blocks` for what its hooks record, then remove the hooks."""
    try:
        for i in range(0, len(blocks), batch_size):
            model.base_model(input_ids=blocks[i:i + batch_size].to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def input_ranges(model: nn.Module, blocks: torch.Tensor, names: list[str],
                 batch_size: int = 4) -> dict[str, tuple[float, float]]:
    """(min, max) of each named linear layer's input over `blocks`: the range ORT's MinMax
    calibration gives its static activation quantizer when `blocks` are the calibration blocks."""
    mods = dict(model.named_modules())
    seen: dict[str, tuple[float, float]] = {}

    def keep(name, x):
        lo, hi = seen.get(name, (math.inf, -math.inf))
        seen[name] = (min(lo, float(x.min())), max(hi, float(x.max())))
    handles = [mods[n].register_forward_pre_hook(lambda m, a, n=n: keep(n, a[0])) for n in names]
    _forward_hooked(model, blocks, handles, batch_size)
    return seen


@torch.no_grad()
def int8_sensitivity(model: nn.Module, blocks: torch.Tensor, names: list[str],
                     ranges: dict[str, tuple[float, float]] | None = None) -> dict[str, float]:
    """Per linear layer in `names`: the mean KL divergence per token (nats) from the model's
    next-token distributions over `blocks` to those of the model with that layer alone in
    static W8A8: fake_quant_rows of its weight, fake_quant_activations of its input over its
    range in `ranges` (input_ranges over the calibration blocks: a rare outlier there widens
    the step for every token) or by default over `blocks`. Run on the SmoothQuant-scaled model,
    it ranks which layers are worth leaving in float (export's sensitive_down_proj candidate)."""
    mods = dict(model.named_modules())
    if ranges is None:
        ranges = input_ranges(model, blocks, names)

    def log_probs(ids):  # float32 at least (a float32 softmax over 128k logits is exact enough)
        logits = model(input_ids=ids.to(model.device)).logits
        return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    refs = [log_probs(b[None]) for b in blocks]  # one block at a time: the logits are the memory
    out = {}
    for name in names:
        linear = mods[name]
        w = linear.weight.data.clone()
        linear.weight.data.copy_(fake_quant_rows(w))
        lo, hi = ranges[name]
        hook = linear.register_forward_pre_hook(
            lambda m, a, lo=lo, hi=hi: (fake_quant_activations(a[0], lo, hi),))
        try:
            kl = sum(float((ref.exp() * (ref - log_probs(b[None]))).sum(-1).sum())
                     for b, ref in zip(blocks, refs))
        finally:
            hook.remove()
            linear.weight.data.copy_(w)
        out[name] = kl / blocks.numel()
    return out


@torch.no_grad()
def group_inputs(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """The input activations [T, K] (float32) of every group's first consumer (the LM head's
    included) over `blocks` (the calibration tokens that `smoothquant_` measures its candidate
    strengths on)."""
    spec = arch_of(model)
    keys = {g.stats_key for g in groups(model)}
    mods = dict(model.named_modules())
    got: dict[str, list[torch.Tensor]] = {k: [] for k in keys | {spec.lm_head}}

    def keep(k, x):
        got[k].append(x.detach().reshape(-1, x.shape[-1]).float().cpu())
    handles = [mods[k].register_forward_pre_hook(lambda m, a, k=k: keep(k, a[0])) for k in keys]
    # the head's input is the final norm's output (the base model stops there)
    handles.append(mods[spec.final_norm].register_forward_hook(
        lambda m, a, out: keep(spec.lm_head, out)))
    _forward_hooked(model, blocks, handles, batch_size)
    return {k: torch.cat(v) for k, v in got.items()}


def _weights(group: Group) -> list[torch.Tensor]:
    return [m.weight.data for _, m, _ in group.consumers]


@torch.no_grad()
def smoothquant_(model: nn.Module, stats: Stats, alphas=SMOOTH_ALPHAS,
                 inputs: dict[str, torch.Tensor] | None = None, head: bool = False) -> dict[str, Any]:
    """SmoothQuant `model` in place (a float copy: the caller keeps the original); returns the
    strength chosen per group (None: left unscaled) and its error relative to the unscaled one.

    With `inputs` (group_inputs on calibration blocks) each group's strength is the one whose
    W8A8 output error, measured on those activations, is least; without, the error model
    `w8a8_error` on the statistics chooses (from SMOOTH_ALPHAS, which it overrates).

    `head` (with `inputs`; the calibration statistics do not cover the head) also rescales the
    LM head's input, untying the head from the embedding if they share weights and a strength
    is chosen."""
    if head and inputs is None:
        raise ValueError("smoothquant_(head=True) measures the head's input: pass inputs")
    chosen, gain = {}, {}
    for g in groups(model, head):
        if g.name == HEAD_GROUP:
            x = inputs[g.stats_key].double()
            x_max, x_msq = x.abs().amax(0), x.pow(2).mean(0)
        else:
            x_max, x_msq = stats.get(g.stats_key, "abs_max"), stats.mean_sq(g.stats_key)
        if g.tie is not None:  # the choice is made on the scales that will be applied
            x_max, x_msq = g.tie(x_max.double()), g.tie(x_msq.double())
        ws = _weights(g)
        w_max = torch.stack([w.abs().amax(0) for w in ws]).amax(0)
        if inputs is None:
            def error(s, ws=ws, x_max=x_max, x_msq=x_msq):
                return w8a8_error(ws, x_max, x_msq, s)
        else:
            def error(s, ws=ws, x=inputs[g.stats_key]):
                return w8a8_measured_error(ws, x, s)
        best = none = (error(torch.ones_like(x_max, dtype=torch.float64)), None)
        for a in alphas:
            s = smooth_scales(x_max, w_max, a)
            if g.tie is not None:
                s = g.tie(s)
            best = min(best, (error(s), a), key=lambda t: t[0])
        if best[1] is not None:
            s = smooth_scales(x_max, w_max, best[1])
            if g.name == HEAD_GROUP:
                untie_head_(model)
                g = head_group(model)  # the untied weight
            apply_scales_(g, s)
        chosen[g.name] = best[1]
        gain[g.name] = best[0] / none[0] if none[0] > 0 else 1.0
    return {"alpha": chosen, "error_ratio": gain}


def fake_quant_blockwise(w: torch.Tensor, bits: int, block: int,
                         symmetric: bool = False) -> torch.Tensor:
    """Asymmetric round-to-nearest in blocks of `block` input channels (MatMulNBits' RTN scheme:
    one scale and zero point per block, zero point rounded to an integer). `symmetric`: no zero
    point, scale max|w| / ((2^bits - 1) / 2), integers clamped to [-2^(bits-1), 2^(bits-1) - 1]
    (compressed-tensors' symmetric INT scheme)."""
    out_f, in_f = w.shape
    pad = (-in_f) % block
    x = torch.nn.functional.pad(w.double(), (0, pad)).view(out_f, -1, block)
    if symmetric:
        scale = (x.abs().amax(-1, keepdim=True) / ((2 ** bits - 1) / 2)).clamp(min=1e-12)
        q = (x / scale).round().clamp(-2 ** (bits - 1), 2 ** (bits - 1) - 1)
        return (q * scale).view(out_f, -1)[:, :in_f]
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    qmax = 2 ** bits - 1
    scale = ((hi - lo) / qmax).clamp(min=1e-12)
    zero = (-lo / scale).round().clamp(0, qmax)
    q = ((x / scale).round() + zero).clamp(0, qmax)
    return ((q - zero) * scale).view(out_f, -1)[:, :in_f]


def awq_error(weights: list[torch.Tensor], gram: torch.Tensor, s: torch.Tensor, bits: int,
              block: int, symmetric: bool = False) -> float:
    """tr(dW G dW^T) summed over the group: the squared output error over the calibration tokens
    of quantizing W diag(s) and undoing s."""
    err = 0.0
    g = gram.double()
    for w in weights:
        w = w.double()
        dw = fake_quant_blockwise(w * s[None, :], bits, block, symmetric) / s[None, :] - w
        err += float(((dw @ g) * dw).sum())
    return err


@torch.no_grad()
def awq_(model: nn.Module, stats: Stats, bits: int = 4, block: int = 32,
         alphas=AWQ_ALPHAS, symmetric: bool = False) -> dict[str, Any]:
    """AWQ-scale `model` in place for `bits`-bit blocks of `block` (`symmetric`: scored for
    symmetric rounding); needs X^T X in `stats` (calibration.collect(..., gram=True)). Returns the
    strength chosen per group."""
    chosen = {}
    for g in groups(model):
        if "gram" not in stats.modules.get(g.stats_key, {}):
            raise MinitronError(f"AWQ needs the Gram matrix X^T X of '{g.stats_key}' "
                                f"(calibration.collect(..., gram=True))")
        gram, mean_abs = stats.get(g.stats_key, "gram"), stats.mean_abs(g.stats_key).double()
        if g.tie is not None:
            mean_abs = g.tie(mean_abs)
        ws = _weights(g)
        best = (float("inf"), 0.0, None)
        for a in alphas:
            s = _clean(mean_abs.clamp(min=1e-5).pow(a))
            s = s / (s.max() * s.min()).sqrt()
            if g.tie is not None:
                s = g.tie(s)
            e = awq_error(ws, gram, s, bits, block, symmetric)
            if e < best[0]:
                best = (e, a, s)
        apply_scales_(g, best[2])
        chosen[g.name] = best[1]
    return {"alpha": chosen}


def patch_weights(src: Path, dst: Path, before: nn.Module, after: nn.Module,
                  found: dict[str, str] | None = None) -> bool:
    """Write `src` to `dst` with the weights of model `before` replaced by those of `after`
    (same architecture): each changed parameter is looked up by its exact values (the exporter
    stores a linear's weight transposed, a norm's as is). Tied parameters are compared under
    each of their names, so a head untied in `after` is found as the graph's head weight. False,
    writing nothing, if any changed parameter is not found exactly once (e.g. constant-folded
    into another value, or equal to another weight). `found` receives {parameter name:
    initializer name} of the replaced ones.

    Only the graph's structure is loaded, and only the float tensors of a changed parameter's
    shape are read, one at a time. External data is copied as bytes and each changed tensor is
    written over its own bytes (same shape and type), so a graph of many GB is never held whole."""
    import contextlib
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    proto = onnx.load(str(src), load_external_data=False)
    new = dict(after.named_parameters(remove_duplicate=False))
    changed = []  # (parameter name, its old values as the graph stores them)
    for name, p in before.named_parameters(remove_duplicate=False):
        if not torch.equal(p, new[name]):
            old = p.detach().float().numpy()
            changed.append((name, np.ascontiguousarray(old.T if old.ndim == 2 else old)))
    shapes = {old.shape for _, old in changed}

    def read(t):
        return numpy_helper.to_array(t, str(src.parent))

    by_key: dict[tuple, list] = {}
    for t in proto.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and tuple(t.dims) in shapes:
            by_key.setdefault((tuple(t.dims), hash(read(t).tobytes())), []).append(t)
    todo = []
    for name, old in changed:
        hits = [t for t in by_key.get((old.shape, hash(old.tobytes())), [])
                if np.array_equal(read(t), old)]
        if len(hits) != 1:
            return False
        val = new[name].detach().float().numpy()
        todo.append((hits[0], np.ascontiguousarray(val.T if val.ndim == 2 else val)))
        if found is not None:
            found[name] = hits[0].name
    locations = {ExternalDataInfo(t).location for t in proto.graph.initializer
                 if uses_external_data(t)}
    if len({id(t) for t, _ in todo}) != len(todo) or len(locations) > 1:
        return False
    data = dst.with_name(dst.name + "_data")
    if locations:
        shutil.copyfile(src.parent / next(iter(locations)), data)
    with open(data, "r+b") if locations else contextlib.nullcontext() as f:
        for t, val in todo:
            if uses_external_data(t):
                f.seek(ExternalDataInfo(t).offset or 0)
                f.write(val.tobytes())
            else:
                t.CopyFrom(numpy_helper.from_array(val, t.name))
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = data.name
    onnx.save(proto, str(dst))
    return True


__all__ = ["AWQ_ALPHAS", "HEAD_GROUP", "MEASURED_ALPHAS", "MEASURE_BLOCKS", "SMOOTH_ALPHAS",
           "Group", "apply_scales_", "awq_", "awq_error", "fake_quant_activations",
           "fake_quant_blockwise", "fake_quant_rows", "group_inputs", "groups", "head_group",
           "input_ranges", "int8_sensitivity", "matmul_block", "patch_weights", "smooth_scales",
           "smoothquant_", "untie_head_", "w8a8_error", "w8a8_measured_error"]
