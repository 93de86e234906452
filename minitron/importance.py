"""Activation importance: one streaming, gradient-free pass of forward hooks over calibration blocks.

Scores every prunable unit the way the Minitron papers do (arXiv 2407.14679, 2408.11796):
- MLP neurons: the input of the down projection, per neuron;
- attention heads: the input of the output projection, per head (its L2 norm over head_dim per
  token); a KV group scores as the sum of its query heads;
- hidden channels: the outputs of every norm that reads the residual stream (each layer's two
  pre-norms and the final norm; the family's `scored_norms`), summed over norms;
- layers: Block Importance, 1 - cos(layer input, layer output) averaged over tokens, and, as a second
  method, the LM-loss increase when that one layer is skipped (extra forwards on a small subset).

Per sample, activations [T, D] are first reduced over the sequence ("mean" of magnitudes, "l2" norm,
or "var"), then over samples ("mean", "l2" norm or "var"), streaming, in fp32; the papers' default
is mean over the sequence, then L2 over the batch. Memory stays at the model plus one batch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minitron.common import MinitronError, write_json_atomic
from minitron.config import AGGREGATIONS, DEPTH_METHODS, ImportanceConfig
from minitron.data import batches
from minitron.models import arch_of, decoder_layers, head_layout

@dataclass
class Scores:
    """Importance of every prunable unit; higher means more important. Shapes use the source model's
    sizes: L layers, I MLP neurons, H query heads, KV groups, `hidden` channels."""

    neurons: torch.Tensor            # [L, I]
    heads: torch.Tensor              # [L, H]
    kv_groups: torch.Tensor          # [L, KV]  sum of each group's query-head scores
    hidden: torch.Tensor             # [hidden]
    layers_bi: torch.Tensor          # [L]  1 - cos(input, output), token-averaged
    layers_lm_loss: torch.Tensor | None = None  # [L]  loss(layer skipped) - loss(full)
    config: ImportanceConfig = field(default_factory=ImportanceConfig)
    meta: dict[str, Any] = field(default_factory=dict)

    def layer_scores(self, method: str | None = None) -> torch.Tensor:
        """Per-layer importance by `method` (default: the one the scores were computed for)."""
        method = method or self.config.depth_method
        if method == "block_importance":
            return self.layers_bi
        if method == "lm_loss":
            if self.layers_lm_loss is None:
                raise MinitronError("depth method 'lm_loss' needs LM-loss layer scores, and these "
                                    "scores have none; recompute them with --depth-method lm_loss")
            return self.layers_lm_loss
        raise MinitronError(f"depth method '{method}' is unknown; valid: {', '.join(DEPTH_METHODS)}")

    def check_matches(self, config: Any) -> None:
        """Refuse scores computed for a model of another shape."""
        hl = head_layout(config)
        want = {"num_hidden_layers": config.num_hidden_layers,
                "intermediate_size": config.intermediate_size, "num_attention_heads": hl.num_heads,
                "num_key_value_heads": hl.num_kv_heads, "hidden_size": config.hidden_size}
        have = {"num_hidden_layers": self.neurons.shape[0], "intermediate_size": self.neurons.shape[1],
                "num_attention_heads": self.heads.shape[1],
                "num_key_value_heads": self.kv_groups.shape[1], "hidden_size": self.hidden.shape[0]}
        bad = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        if bad:
            detail = ", ".join(f"{k}: scores {a} vs model {b}" for k, (a, b) in bad.items())
            raise MinitronError(f"the importance scores (--scores) do not fit this model ({detail}); "
                                f"compute scores for this model instead")


# ----------------------------------------------------------------------------- aggregation
def reduce_seq(x: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, D] -> [B, D]: one value per sample and unit."""
    if how == "mean":
        return x.abs().mean(dim=1)
    if how == "l2":
        return x.norm(dim=1)
    if how == "var":
        return x.var(dim=1, unbiased=False)
    raise MinitronError(f"aggregation '{how}' is unknown; valid: {', '.join(AGGREGATIONS)}")


class _BatchAccumulator:
    """Streams per-sample values [B, D] into one [D] aggregate (fp32) without keeping samples."""

    def __init__(self, how: str):
        self.how, self.n = how, 0
        self.a: torch.Tensor | None = None  # sum | sum of squares | running mean
        self.m2: torch.Tensor | None = None  # var only: sum of squared deviations (Chan et al.)

    def update(self, v: torch.Tensor) -> None:
        v = v.float()
        nb = v.shape[0]
        if self.how == "mean":
            s = v.sum(0)
        elif self.how == "l2":
            s = v.pow(2).sum(0)
        else:
            mb = v.mean(0)
            m2b = (v - mb).pow(2).sum(0)
            if self.a is None:
                self.a, self.m2 = mb, m2b
            else:
                n = self.n + nb
                delta = mb - self.a
                self.a = self.a + delta * (nb / n)
                self.m2 = self.m2 + m2b + delta.pow(2) * (self.n * nb / n)
            self.n += nb
            return
        self.a = s if self.a is None else self.a + s
        self.n += nb

    def result(self) -> torch.Tensor:
        if self.a is None:
            raise MinitronError("no calibration samples reached the importance hooks")
        if self.how == "mean":
            return self.a / self.n
        if self.how == "l2":
            return self.a.sqrt()
        return self.m2 / self.n


# ----------------------------------------------------------------------------- the pass
def _layers_parent(model: nn.Module) -> tuple[nn.Module, str]:
    spec = arch_of(model)
    parent_path, _, attr = spec.layers.rpartition(".")
    return spec.get(model, parent_path) if parent_path else model, attr



@torch.no_grad()
def _mean_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss from the final hidden states, in logit chunks (never [B, T, V])."""
    from minitron.scoring import batch_metric_sums

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches(blocks, batch_size):
        sums = batch_metric_sums(model, None, batch.to(device))
        total, count = total + sums[0].item(), count + sums[1].item()
    return total / count


def _o_proj_norms(x: torch.Tensor, weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[B, T, H]: the norm of each head's contribution to o_proj's output, ||W_h x_h||, as
    sqrt(x_h^T (W_h^T W_h) x_h) through the per-head Gram matrices [H, d, d]: the [B, T, H, hidden]
    contributions never exist (34 GB in fp32 at 8 x 8192 tokens of Llama-3.1-8B)."""
    w = weight.float().view(-1, heads, head_dim)  # [hidden, H, d]
    gram = torch.einsum("ohd,ohe->hde", w, w)  # [H, d, d]
    sq = (torch.einsum("bthd,hde->bthe", x, gram) * x).sum(-1)
    return sq.clamp_min(0).sqrt()


class _SkippedLayer(nn.Module):
    """Stands in a skipped decoder layer's place: passes the hidden states through unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@torch.no_grad()
def layer_skip_losses(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """[L]: mean LM loss with layer i skipped minus the full model's loss, on `blocks`.

    A layer is skipped by putting a pass-through in its place (no KV cache is used), the model is
    restored afterwards. Removing it from the list instead would shift every later layer's index,
    and transformers 5 picks each layer's attention mask (sliding or full) and, for Gemma 3, its
    rotary table by that index (`config.layer_types[i]`).
    """
    parent, attr = _layers_parent(model)
    layers = getattr(parent, attr)
    base = _mean_loss(model, blocks, batch_size)
    out = torch.zeros(len(layers), dtype=torch.float32)
    try:
        for i in range(len(layers)):
            setattr(parent, attr, nn.ModuleList([_SkippedLayer() if j == i else m
                                                 for j, m in enumerate(layers)]))
            out[i] = _mean_loss(model, blocks, batch_size) - base
    finally:
        setattr(parent, attr, layers)
    return out


@torch.no_grad()
def compute_scores(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int | None = None,
    config: ImportanceConfig | None = None,
    progress: bool = False,
    collector: Any = None,
) -> Scores:
    """Score every neuron, head, KV group, hidden channel and layer of `model` on `blocks` [n, T].

    `batch_size` (blocks per forward) defaults to `config.batch_size`.

    One pass over all blocks through the decoder body (the LM head is not needed and not run); with
    `config.depth_method == "lm_loss"`, also L + 1 forwards over the first `lm_loss_blocks` blocks.
    A `minitron.calibration.Collector` given as `collector` is attached to that same pass (the
    quantizers' activation statistics; read them with `collector.stats`).
    """
    config = config or ImportanceConfig()
    batch_size = config.batch_size if batch_size is None else batch_size
    if blocks.ndim != 2 or len(blocks) == 0:
        raise MinitronError(f"calibration blocks must be a non-empty [n, T] tensor, got shape "
                            f"{tuple(blocks.shape)}")
    if batch_size < 1:
        raise MinitronError(f"batch_size={batch_size} must be at least 1")
    spec = arch_of(model)
    layers = decoder_layers(model)
    hl = head_layout(model.config)
    n_layers = len(layers)
    device = next(model.parameters()).device
    seq, bat = config.aggregation_seq, config.aggregation_batch

    neuron_acc = [_BatchAccumulator(bat) for _ in range(n_layers)]
    head_acc = [_BatchAccumulator(bat) for _ in range(n_layers)]
    norm_acc: list[_BatchAccumulator] = []
    bi_sum = torch.zeros(n_layers, dtype=torch.float32)
    bi_tokens = [0]
    handles = []

    def neuron_hook(i):
        def hook(module, args):
            neuron_acc[i].update(reduce_seq(args[0].float(), seq))
        return hook

    def head_hook(i):
        def hook(module, args):
            x = args[0].float().view(*args[0].shape[:-1], hl.num_heads, hl.head_dim)  # [B, T, H, d]
            if config.head_score == "o_proj_contribution":
                per_head = _o_proj_norms(x, module.weight, hl.num_heads, hl.head_dim)
            else:
                per_head = x.norm(dim=-1)  # [B, T, H]
            head_acc[i].update(reduce_seq(per_head, seq))
        return hook

    def norm_hook(acc):
        def hook(module, args, output):
            acc.update(reduce_seq(output.float(), seq))
        return hook

    def block_hook(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)  # [B, T]
            bi_sum[i] += (1 - cos).sum().cpu()
            if i == 0:
                bi_tokens[0] += cos.numel()
        return hook

    def add_norm(module):
        acc = _BatchAccumulator(bat)
        norm_acc.append(acc)
        handles.append(module.register_forward_hook(norm_hook(acc)))

    t0 = time.perf_counter()
    try:
        for i, layer in enumerate(layers):
            handles.append(spec.get(layer, spec.down_proj).register_forward_pre_hook(neuron_hook(i)))
            handles.append(spec.get(layer, spec.o_proj).register_forward_pre_hook(head_hook(i)))
            for norm in spec.scored_norms:
                add_norm(spec.get(layer, norm))
            handles.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
        add_norm(spec.get(model, spec.final_norm))
        if collector is not None:
            collector.attach(model)
        body = model.base_model
        done = 0
        for batch in batches(blocks, batch_size):
            body(input_ids=batch.to(device), use_cache=False)
            done += len(batch)
            if progress and (done // batch_size) % 16 == 0:
                el = time.perf_counter() - t0
                print(f"[minitron] importance: {done}/{len(blocks)} blocks, {el:.0f}s "
                      f"(~{el / done * (len(blocks) - done):.0f}s left)", file=sys.stderr, flush=True)
    finally:
        for h in handles:
            h.remove()
        if collector is not None:
            collector.detach()
    stream_s = time.perf_counter() - t0

    neurons = torch.stack([a.result() for a in neuron_acc]).cpu()
    heads = torch.stack([a.result() for a in head_acc]).cpu()
    hidden = torch.stack([a.result() for a in norm_acc]).sum(0).cpu()
    kv_groups = heads.view(n_layers, hl.num_kv_heads, hl.group_size).sum(-1)
    layers_bi = bi_sum / bi_tokens[0]
    meta: dict[str, Any] = {
        "num_blocks": len(blocks), "block_size": blocks.shape[1], "tokens": blocks.numel(),
        "batch_size": batch_size, "stream_wall_s": round(stream_s, 3),
    }

    layers_lm_loss = None
    if config.depth_method == "lm_loss":
        subset = blocks[:config.lm_loss_blocks]
        t1 = time.perf_counter()
        layers_lm_loss = layer_skip_losses(model, subset, batch_size)
        meta.update(lm_loss_blocks=len(subset), lm_loss_forwards=n_layers + 1,
                    lm_loss_wall_s=round(time.perf_counter() - t1, 3))
    return Scores(neurons, heads, kv_groups, hidden, layers_bi, layers_lm_loss, config, meta)


# ----------------------------------------------------------------------------- persistence
def _summary(scores: Scores) -> dict[str, Any]:
    def order(t):
        return [int(i) for i in torch.argsort(t, stable=True)]

    s: dict[str, Any] = {
        "config": asdict(scores.config),
        "meta": scores.meta,
        "shapes": {k: list(getattr(scores, k).shape) for k in
                   ("neurons", "heads", "kv_groups", "hidden", "layers_bi")},
        "layers_bi": [round(float(v), 6) for v in scores.layers_bi],
        "layers_by_bi_least_first": order(scores.layers_bi),
    }
    if scores.layers_lm_loss is not None:
        s["layers_lm_loss"] = [round(float(v), 6) for v in scores.layers_lm_loss]
        s["layers_by_lm_loss_least_first"] = order(scores.layers_lm_loss)
    return s


def save_scores(scores: Scores, path: str | os.PathLike) -> Path:
    """Write `path` (.safetensors: the tensors, the settings in its metadata) and a readable JSON
    summary beside it (same name, .json). Both writes are atomic."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: getattr(scores, k).contiguous().float() for k in
               ("neurons", "heads", "kv_groups", "hidden", "layers_bi")}
    if scores.layers_lm_loss is not None:
        tensors["layers_lm_loss"] = scores.layers_lm_loss.contiguous().float()
    summary = _summary(scores)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"minitron": json.dumps(
        {"config": summary["config"], "meta": summary["meta"]}, default=str)})
    os.replace(tmp, path)
    write_json_atomic(path.with_suffix(".json"), summary)
    return path


def load_scores(path: str | os.PathLike) -> Scores:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MinitronError(f"scores file '{path}' (--scores) does not exist; give a .safetensors "
                            f"file written by save_scores (the prune CLI writes importance/scores."
                            f"safetensors in its output folder)")
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {}).get("minitron", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise MinitronError(f"scores file '{path}' (--scores) is not readable: {e}") from None
    needed = ("neurons", "heads", "kv_groups", "hidden", "layers_bi")
    if info is None or any(k not in tensors for k in needed):
        raise MinitronError(f"'{path}' (--scores) is not a minitron scores file (needs tensors "
                            f"{', '.join(needed)} and minitron metadata)")
    return Scores(*(tensors[k] for k in needed), layers_lm_loss=tensors.get("layers_lm_loss"),
                  config=ImportanceConfig(**info["config"]), meta=info.get("meta", {}))


def describe(scores: Scores) -> str:
    """A few lines for the console: the layer rankings and the timing."""
    lines = [f"importance over {scores.meta.get('num_blocks')} blocks x "
             f"{scores.meta.get('block_size')} tokens in {scores.meta.get('stream_wall_s')}s "
             f"(seq={scores.config.aggregation_seq}, batch={scores.config.aggregation_batch})"]
    lines.append("layers by Block Importance, least important first: "
                 + " ".join(map(str, torch.argsort(scores.layers_bi, stable=True).tolist())))
    if scores.layers_lm_loss is not None:
        lines.append(f"layers by LM-loss increase ({scores.meta.get('lm_loss_blocks')} blocks, "
                     f"{scores.meta.get('lm_loss_wall_s')}s), least important first: "
                     + " ".join(map(str, torch.argsort(scores.layers_lm_loss, stable=True).tolist())))
    return "\n".join(lines)


__all__ = ["AGGREGATIONS", "DEPTH_METHODS", "ImportanceConfig", "Scores", "compute_scores",
           "describe", "layer_skip_losses", "load_scores", "reduce_seq", "save_scores"]
