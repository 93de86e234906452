"""Structured pruning: importance scores + a target architecture -> a smaller Hugging Face model.

`python -m minitron.prune --model M --output DIR [prune.hidden_size=N ...] | [prune.target_params=X]`
(`--help` lists every setting; `--hidden-size N` and the like are aliases.)
`python -m minitron.prune --target-params X --search K --output DIR` searches the shapes within the
budget instead of picking one by a fixed rule (minitron/search.py; its work folder is DIR.search).

The target is a plain dict in Hugging Face config names (any subset). Width pruning keeps, per
layer, the highest-scoring MLP neurons and attention heads (query heads ranked within their KV
group, the same number kept in every group; whole KV groups dropped by their summed score) and,
globally, the highest-scoring hidden channels, which are removed from the embeddings, every norm,
every projection and the LM head. Depth pruning drops the lowest-scoring layers, or the contiguous
block of layers with the lowest summed score. Kept units stay in their original order, so pruning to
the source's own shape reproduces it exactly. The output is a plain checkpoint + tokenizer +
minitron.json, which stock `transformers` loads without minitron.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from minitron.common import (MinitronError, StageTimer, atomic_dir, check_replaceable,
                             check_writable, clean_stale, format_table, run_cli, write_json_atomic)
from minitron.config import (DEPTH_MODES, TARGET_KEYS, DataConfig, DepthMode, DistillConfig,
                             ImportanceConfig, ModelConfig, PruneConfig, SearchConfig)
from minitron import calibration
from minitron.importance import Scores, compute_scores, describe, load_scores, save_scores
from minitron.models import (ArchSpec, HeadLayout, arch_of, count_params, head_layout,
                             param_count_from_config, shape_problem)

INFO_FILE = "minitron.json"  # the record of the pruning; its "files" list is what it wrote
SCORES_FILE = "importance/scores.safetensors"  # inside the output folder (not globbed as weights)

# Candidate grid for prune.target_params: the Minitron papers' width search prunes the hidden size
# and the MLP by these kinds of ratios, heads and depth kept (width prunes better than depth).
HIDDEN_RATIOS = (1.0, 0.875, 0.75, 0.625, 0.5)
MLP_RATIOS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)
DEPTH_RATIOS = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25)
BUDGET_SLACK = 0.02  # of the source's parameters: candidates this close to the best count as equal


def _flag(key: str) -> str:
    return f"{key} (prune.{key})"


# ----------------------------------------------------------------------------- targets
def plan(config: Any, target: Mapping[str, int]) -> dict[str, int]:
    """The pruned model's architecture fields for `target` (any subset of TARGET_KEYS), validated.

    Returns all of TARGET_KEYS plus `head_dim` (kept from the source and written explicitly, since
    Llama would otherwise derive it as hidden_size // num_attention_heads). Raises MinitronError,
    naming the key, its flag and the valid values, for an impossible target.
    """
    unknown = sorted(set(target) - set(TARGET_KEYS))
    if unknown:
        raise MinitronError(f"unknown target key(s) {', '.join(unknown)}; valid keys: "
                            f"{', '.join(TARGET_KEYS)}")
    hl = head_layout(config)
    src = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
           "num_attention_heads": hl.num_heads, "num_key_value_heads": hl.num_kv_heads,
           "num_hidden_layers": config.num_hidden_layers}
    for key, value in target.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise MinitronError(f"{_flag(key)} = {value!r} must be a whole number")
        if value < 1:
            raise MinitronError(f"{_flag(key)} = {value} must be at least 1; valid values: "
                                f"1 to {src[key]}")
        if value > src[key]:
            raise MinitronError(f"{_flag(key)} = {value} is larger than the source model's "
                                f"{src[key]}; pruning only shrinks: valid values 1 to {src[key]}")
    out = {k: int(target.get(k, src[k])) for k in TARGET_KEYS}
    g = hl.group_size
    if "num_key_value_heads" in target and "num_attention_heads" not in target:
        out["num_attention_heads"] = out["num_key_value_heads"] * g  # whole KV groups dropped
    if g == 1 and "num_attention_heads" in target and "num_key_value_heads" not in target:
        out["num_key_value_heads"] = out["num_attention_heads"]  # plain multi-head attention
    heads, kv = out["num_attention_heads"], out["num_key_value_heads"]
    if heads % kv or heads // kv > g:
        valid = [kv * m for m in range(1, g + 1)]
        raise MinitronError(
            f"{_flag('num_attention_heads')} = {heads} cannot be spread evenly over "
            f"{kv} KV groups of at most {g} query heads each (num_key_value_heads={kv}); "
            f"valid values: {', '.join(map(str, valid))}")
    # hidden_size need not be heads x head_dim: head_dim is explicit in the config, stock
    # transformers serves such a model, and so does the ONNX export (minitron.export.onnx_config).
    out["head_dim"] = hl.head_dim
    problem = shape_problem(config, out)
    if problem:
        raise MinitronError(f"{_flag('hidden_size')} = {out['hidden_size']} with "
                            f"num_attention_heads = {heads}: {problem}")
    return out


def pruned_config(config: Any, fields: Mapping[str, int], kept_layers: list[int] | None = None):
    """A copy of `config` with the planned fields; per-layer lists (layer_types) follow the kept
    layers (the first ones when `kept_layers` is not given)."""
    new = copy.deepcopy(config)
    for k, v in fields.items():
        setattr(new, k, int(v))
    kept = kept_layers if kept_layers is not None else list(range(fields["num_hidden_layers"]))
    if isinstance(getattr(new, "layer_types", None), list):
        new.layer_types = [config.layer_types[i] for i in kept]
    return new


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def budget_limit(config: Any, budget: float | int) -> int:
    """The largest parameter count a budget allows: a fraction (<= 1) of the source's parameters
    or an absolute count (> 1)."""
    source = param_count_from_config(config)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise MinitronError(f"prune.target_params {budget!r} must be a fraction in (0, 1] of the source "
                            f"or an absolute parameter count")
    limit = int(budget * source) if budget <= 1 else int(budget)
    if limit > source:
        raise MinitronError(f"prune.target_params {budget} ({limit:,} parameters) is larger than the "
                            f"source model ({source:,}); give a fraction <= 1 or a count <= {source}")
    return limit


def head_options(config: Any) -> list[tuple[int, int]]:
    """Every (num_attention_heads, num_key_value_heads) the pruner can make: k of the KV groups,
    each keeping the same number m of its query heads (heads = k x m)."""
    hl = head_layout(config)
    return [(kv * m, kv) for kv in range(hl.num_kv_heads, 0, -1)
            for m in range(hl.group_size, 0, -1)]


def width_multiples(config: Any, multiple: int) -> dict[str, int]:
    """The multiple each width is kept at (prune.width_multiple): `multiple` where the source is at
    least 2x it, else 1 (a smaller model keeps the grid's own granularity)."""
    return {k: multiple if getattr(config, k) >= 2 * multiple else 1
            for k in ("hidden_size", "intermediate_size")}


def check_widths(config: Any, target: Mapping[str, int], multiple: int) -> None:
    """Refuse explicit widths off the deployment block (the source's own width is always fine)."""
    for key, m in width_multiples(config, multiple).items():
        v = target.get(key)
        if v is None or m == 1 or v % m == 0 or v == getattr(config, key):
            continue
        lo, hi = v // m * m, (v // m + 1) * m
        raise MinitronError(f"{_flag(key)}={v} is not a multiple of prune.width_multiple={multiple}"
                            f" (the quantized blocks of MatMulNBits / GGUF; valid near it: "
                            f"{', '.join(str(x) for x in (lo, hi) if 0 < x <= getattr(config, key))}"
                            f"); or set prune.width_multiple=1 to allow any width")


def shape_grid(config: Any, limit: int, layer_ratios=(1.0,),
               heads: list[tuple[int, int]] | None = None, multiple: int = 1) -> list[dict]:
    """The candidate shapes of the grid HIDDEN_RATIOS x MLP_RATIOS x `layer_ratios` x `heads`
    ((query heads, KV groups) pairs; default: the source's), each with its parameter count (closed
    form), its fraction of the source, the fraction its most-pruned dimension keeps ("least_kept")
    and whether it fits `limit`. Hidden sizes are rounded to a multiple of num_attention_heads and
    of 8 where possible, MLP sizes to a multiple of 8, both also to `multiple`
    (prune.width_multiple, see `width_multiples`). Shapes the family cannot take (`plan`
    refuses them) are left out; every other shape exports (see minitron.export.onnx_config: any
    width, any head layout with one KV-head count for all layers, which pruning keeps)."""
    source = param_count_from_config(config)
    hl = head_layout(config)
    h_mult = math.lcm(hl.num_heads, 8) if math.lcm(hl.num_heads, 8) <= config.hidden_size // 8 \
        else hl.num_heads
    heads = heads or [(hl.num_heads, hl.num_kv_heads)]
    mult = width_multiples(config, multiple)
    i_mult = math.lcm(8, mult["intermediate_size"])
    seen, out = set(), []
    for lr, hr, mr, (n_heads, n_kv) in itertools.product(layer_ratios, HIDDEN_RATIOS, MLP_RATIOS,
                                                         heads):
        # with a block: a multiple of it and of the heads (transformers checks hidden % heads)
        hm = math.lcm(mult["hidden_size"], n_heads) if mult["hidden_size"] > 1 else h_mult
        t = dict(hidden_size=min(config.hidden_size, _round_to(config.hidden_size * hr, hm)),
                 intermediate_size=min(config.intermediate_size,
                                       _round_to(config.intermediate_size * mr, i_mult)),
                 num_attention_heads=n_heads, num_key_value_heads=n_kv,
                 num_hidden_layers=max(1, round(config.num_hidden_layers * lr)))
        key = tuple(sorted(t.items()))
        if key in seen:
            continue
        seen.add(key)
        try:
            fields = plan(config, t)
        except MinitronError:  # a shape the family cannot take (Phi-3 longrope)
            continue
        n = param_count_from_config(_config_dict(config, fields))
        least = min(t["hidden_size"] / config.hidden_size,
                    t["intermediate_size"] / config.intermediate_size,
                    t["num_hidden_layers"] / config.num_hidden_layers,
                    t["num_attention_heads"] / hl.num_heads)
        out.append({**t, "params": n, "fraction": round(n / source, 4),
                    "least_kept": round(least, 4), "fits": n <= limit})
    return out


def target_for_budget(config: Any, budget: float | int, multiple: int = 1,
                      floor: Mapping[str, int] | None = None) -> tuple[dict[str, int], list[dict]]:
    """Choose a target shape for a parameter budget: a fraction (<= 1) of the source's parameters
    or an absolute count (> 1).

    Rule: enumerate the width grid HIDDEN_RATIOS x MLP_RATIOS (`shape_grid`; heads and layers
    kept). Among the candidates that fit the budget and lie within BUDGET_SLACK (2% of the source)
    of the largest one that fits, pick the most balanced: the one whose most-pruned dimension
    keeps the largest fraction ("least_kept"), then the larger. Only if no width candidate fits is
    depth added (DEPTH_RATIOS of the layers, same grid, same rule). Returns (target, candidates)
    with every candidate considered. (`minitron.search` ranks such shapes by distillation instead.)
    A `floor` (a smaller shape planned first: the sweep's iterative pruning) leaves out every
    candidate below it in any dimension, so that shape can be pruned from the chosen one.
    """
    def grid(layer_ratios=(1.0,)):
        shapes = shape_grid(config, limit, layer_ratios, multiple=multiple)
        return [c for c in shapes if all(c[k] >= v for k, v in (floor or {}).items())]

    source = param_count_from_config(config)
    limit = budget_limit(config, budget)
    candidates = grid()
    fitting = [c for c in candidates if c["fits"]]
    if not fitting:
        candidates += grid(DEPTH_RATIOS)
        fitting = [c for c in candidates if c["fits"]]
    if not fitting and floor:
        raise MinitronError(f"prune.target_params {budget} ({limit:,} parameters): no shape of the "
                            f"grid fits it and keeps at least "
                            f"{', '.join(f'{k}={v}' for k, v in floor.items())} (the next "
                            f"budget's shape, which is pruned from it)")
    if not fitting:
        smallest = min(c["params"] for c in candidates)
        raise MinitronError(f"prune.target_params {budget} ({limit:,} parameters) is below every "
                            f"candidate shape (the smallest has {smallest:,}); give at least "
                            f"{smallest / source:.3f} of the source or set the shape explicitly")
    top = max(c["params"] for c in fitting)
    near = [c for c in fitting if c["params"] >= top - BUDGET_SLACK * source]
    best = max(near, key=lambda c: (c["least_kept"], c["params"]))
    for c in candidates:
        c["chosen"] = c is best
    target = {k: best[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
    return target, candidates


def shape_name(shape: Mapping[str, int]) -> str:
    """A short name of a shape: h<hidden>-i<MLP>-a<heads>-kv<KV groups>-l<layers>."""
    return (f"h{shape['hidden_size']}-i{shape['intermediate_size']}-a{shape['num_attention_heads']}"
            f"-kv{shape['num_key_value_heads']}-l{shape['num_hidden_layers']}")


def enumerate_shapes(config: Any, budget: float | int, settings: SearchConfig,
                     multiple: int = 1) -> list[dict]:
    """The shapes a search considers (`minitron.search`): the grid of `shape_grid` over hidden
    size, MLP width, every head layout (`head_options`) and, if `settings.depth`, DEPTH_RATIOS of
    the layers, whose parameter count lies in [(1 - band) x limit, limit]; the largest first, at
    most `settings.max_shapes`, each named (`shape_name`)."""
    limit = budget_limit(config, budget)
    ratios = (1.0, *DEPTH_RATIOS) if settings.depth else (1.0,)
    grid = shape_grid(config, limit, ratios, head_options(config), multiple)
    floor = (1 - settings.band) * limit
    shapes = [c for c in grid if c["fits"] and c["params"] >= floor]
    if not shapes:
        below = [c["params"] for c in grid if c["fits"]]
        hint = (f"the largest that fits has {max(below):,} ({max(below) / limit:.1%} of it): "
                f"widen search.band to at least {1 - max(below) / limit:.3f}" if below else
                "no grid shape fits: give a larger prune.target_params")
        raise MinitronError(f"search.band={settings.band}: no shape lies between {int(floor):,} and "
                            f"{limit:,} parameters; {hint}")
    shapes.sort(key=lambda c: (-c["params"], shape_name(c)))
    return [{"name": shape_name(c), **{k: c[k] for k in (*TARGET_KEYS, "params", "fraction",
                                                        "least_kept")}}
            for c in shapes[:settings.max_shapes]]


def _config_dict(config: Any, fields: Mapping[str, int]) -> dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    d.update(fields)
    return d


# ----------------------------------------------------------------------------- selection
def _top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order (ties: lower index kept)."""
    if k >= scores.numel():
        return torch.arange(scores.numel())
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return order[:k].sort().values


def select_layers(layer_scores: torch.Tensor, keep: int, depth: str = "importance") -> list[int]:
    """Layers to keep: the `keep` highest-scoring, or all but the contiguous block of
    len - keep layers with the lowest summed score."""
    n = layer_scores.numel()
    if depth not in DEPTH_MODES:
        raise MinitronError(f"depth='{depth}' is unknown; valid: {', '.join(DEPTH_MODES)}")
    if keep >= n:
        return list(range(n))
    if depth == "importance":
        return _top_sorted(layer_scores, keep).tolist()
    drop = n - keep
    sums = [float(layer_scores[s:s + drop].sum()) for s in range(n - drop + 1)]
    start = min(range(len(sums)), key=lambda s: sums[s])
    return [i for i in range(n) if not start <= i < start + drop]


def select_heads(head_scores: torch.Tensor, num_kv: int, heads_per_group: int,
                 group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept KV groups, kept query heads) of one layer: whole groups by their summed score, then
    the best `heads_per_group` query heads within each kept group. Query head h belongs to KV
    group h // group_size (transformers' repeat_kv)."""
    by_group = head_scores.view(-1, group_size)
    groups = _top_sorted(by_group.sum(-1), num_kv)
    heads = [g * group_size + _top_sorted(by_group[g], heads_per_group) for g in groups.tolist()]
    return groups, torch.cat(heads)


def _rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """Weight rows of `units` (heads) that are `width` rows each."""
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


Rule = tuple[str, "torch.Tensor | None", "torch.Tensor | None"]  # (path, rows, columns)


def layer_rules(spec: ArchSpec, hl: HeadLayout, intermediate: int, heads: torch.Tensor,
                groups: torch.Tensor, neurons: torch.Tensor, hidden: torch.Tensor) -> list[Rule]:
    """Which rows and columns of each weight of one decoder layer are kept (None: all of them).

    Fused projections (Phi-3) keep the same units in each of their row blocks: qkv_proj is
    [q (H*d); k (KV*d); v (KV*d)] and gate_up_proj is [gate (I); up (I)].
    """
    q_rows, kv_rows = _rows(heads, hl.head_dim), _rows(groups, hl.head_dim)
    q_out, kv_out = hl.num_heads * hl.head_dim, hl.num_kv_heads * hl.head_dim
    rules: list[Rule] = [(spec.o_proj, hidden, q_rows), (spec.down_proj, hidden, neurons)]
    if spec.qkv_proj:
        rules.append((spec.qkv_proj, torch.cat([q_rows, q_out + kv_rows, q_out + kv_out + kv_rows]),
                      hidden))
    else:
        rules += [(spec.q_proj, q_rows, hidden), (spec.k_proj, kv_rows, hidden),
                  (spec.v_proj, kv_rows, hidden)]
    if spec.gate_up_proj:
        rules.append((spec.gate_up_proj, torch.cat([neurons, intermediate + neurons]), hidden))
    else:
        rules += [(spec.gate_proj, neurons, hidden), (spec.up_proj, neurons, hidden)]
    rules += [(norm, hidden, None) for norm in spec.norms]
    rules += [(norm, None, None) for norm in spec.head_norms]  # over head_dim: kept whole
    return rules


def embed_scale(hidden_size: int, dtype: torch.dtype) -> float:
    """Gemma's embedding factor sqrt(hidden_size), rounded to `dtype` as the model rounds it."""
    return float(torch.tensor(hidden_size ** 0.5, dtype=dtype))


def fold_embed_scale_(state: dict[str, torch.Tensor], spec: ArchSpec, config: Any,
                      hidden_before: int, hidden_after: int, dtype: torch.dtype) -> None:
    """Keep a Gemma student's residual stream at the teacher's scale after hidden pruning.

    The teacher's stream starts as E[:, c] * s(h) for each kept channel c; the student, built for
    h' channels, computes E'[:, c] * s(h'). Storing E' = E[:, kept] * s(h) / s(h') makes the two
    equal, so every layer sees the hidden states the teacher's layer saw (up to the RMS norms now
    averaging over h' channels). With tied embeddings the LM head is that same matrix, so its
    logits would grow by the same factor c = s(h) / s(h'); the final norm feeds only the LM head
    and its output does not depend on its input's scale, so dividing its gain (norm_offset +
    weight, i.e. 1 + w for Gemma) by c gives back exactly the teacher's logits. Untied, the LM
    head keeps its own rows and the final norm is left alone. (Untying instead would cost
    vocab x h' new parameters, ~0.6B for a 262k vocabulary.)
    """
    if not spec.embed_scaled or hidden_before == hidden_after:
        return
    c = embed_scale(hidden_before, dtype) / embed_scale(hidden_after, dtype)
    key = spec.embed + ".weight"
    state[key].mul_(c)  # a fresh copy (index_select); no fp64 temporary of a 262k x h' matrix
    if getattr(config, "tie_word_embeddings", False):
        state.pop(spec.lm_head + ".weight", None)  # tied: the embedding is the head
        norm = spec.final_norm + ".weight"
        gain = spec.norm_gain(state[norm].double()) / c
        state[norm] = (gain - spec.norm_offset).to(dtype)


# ----------------------------------------------------------------------------- pruning
@torch.no_grad()
def prune(model: nn.Module, scores: Scores, target: Mapping[str, int],
          depth: DepthMode = "importance", depth_method: str | None = None,
          stats: calibration.Stats | None = None) -> nn.Module:
    """A new, smaller model; `model` (the teacher) is left untouched (weights are copied by index).

    The teacher's activation statistics `stats` (minitron.calibration), if given, follow the kept
    layers and channels onto the result as `minitron_calibration`; `save_pruned` writes them.

    `depth_method` picks the layer scores ("block_importance" or "lm_loss"; default: the one the
    scores were computed for). The result carries `minitron_record` (kept layers, parameter counts,
    settings), which `save_pruned` writes into minitron.json.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights  # transformers 5 moved it here

    config = model.config
    spec = arch_of(model)
    scores.check_matches(config)
    fields = plan(config, target)
    hl = head_layout(config)
    depth_method = depth_method or scores.config.depth_method
    kept_layers = select_layers(scores.layer_scores(depth_method), fields["num_hidden_layers"], depth)
    hidden = _top_sorted(scores.hidden, fields["hidden_size"])
    per_group = fields["num_attention_heads"] // fields["num_key_value_heads"]

    # old module path -> (new module path, row index, column index); None keeps a whole dimension.
    rules: dict[str, tuple[str, torch.Tensor | None, torch.Tensor | None]] = {
        spec.embed: (spec.embed, None, hidden),
        spec.lm_head: (spec.lm_head, None, hidden),
        spec.final_norm: (spec.final_norm, hidden, None),
    }
    for new_i, old_i in enumerate(kept_layers):
        groups, heads = select_heads(scores.heads[old_i], fields["num_key_value_heads"], per_group,
                                     hl.group_size)
        neurons = _top_sorted(scores.neurons[old_i], fields["intermediate_size"])
        old, new = f"{spec.layers}.{old_i}.", f"{spec.layers}.{new_i}."
        for path, rows, cols in layer_rules(spec, hl, config.intermediate_size, heads, groups,
                                            neurons, hidden):
            rules[old + path] = (new + path, rows, cols)
    dropped = tuple(f"{spec.layers}.{i}." for i in sorted(set(range(config.num_hidden_layers))
                                                           - set(kept_layers)))

    state = {}
    for name, tensor in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if prefix not in rules:
            if name.startswith(dropped):
                continue
            raise MinitronError(f"parameter '{name}' is not covered by the {spec.family} layout; "
                                f"minitron cannot prune this model")
        new_prefix, rows, cols = rules[prefix]
        t = tensor
        if rows is not None:
            t = t.index_select(0, rows.to(t.device))
        if cols is not None and t.dim() == 2:
            t = t.index_select(1, cols.to(t.device))
        state[f"{new_prefix}.{leaf}"] = t.clone() if t is tensor else t

    dtype = next(model.parameters()).dtype
    fold_embed_scale_(state, spec, config, config.hidden_size, fields["hidden_size"], dtype)
    new_config = pruned_config(config, fields, kept_layers)
    with no_init_weights():
        pruned = AutoModelForCausalLM.from_config(new_config, dtype=dtype)
    device = next(model.parameters()).device
    pruned.to(device)
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    tied = {spec.lm_head + ".weight"} if getattr(new_config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise MinitronError(f"pruned weights do not fit the pruned architecture (missing "
                            f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")
    pruned.tie_weights()
    if stats is not None:
        pruned.minitron_calibration = stats.remap(calibration.prune_mapping(rules, stats.modules))
    pruned.generation_config = copy.deepcopy(model.generation_config)
    pruned.eval()
    pruned.minitron_record = {
        "kept_layers": kept_layers,
        "depth": depth,
        "depth_method": depth_method,
        "shape": fields,
        "source_shape": plan(config, {}),
        "parameters_before": count_params(model),
        "importance": {"config": asdict(scores.config), "meta": dict(scores.meta)},
    }
    return pruned


def save_pruned(model: nn.Module, tokenizer, output_dir: str | os.PathLike,
                info: Mapping[str, Any] | None = None, scores: Scores | None = None,
                overwrite: bool = False) -> Path:
    """Write a plain Hugging Face checkpoint + tokenizer + minitron.json (and the scores, if given,
    under importance/) into `output_dir`, atomically."""
    record = {**dict(info or {}), **getattr(model, "minitron_record", {})}
    after = count_params(model)
    params = {"after": after, "after_closed_form": param_count_from_config(model.config)}
    if "parameters_before" in record:
        before = record.pop("parameters_before")
        params = {"before": before, **params, "ratio": round(after / before, 4)}
    record["parameters"] = params
    with atomic_dir(output_dir, overwrite=overwrite, manifest=INFO_FILE,
                    what="pruned model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            from minitron.data import block_rule

            record.setdefault("blocks", block_rule(tokenizer))  # how calibration was read
        if scores is not None:
            save_scores(scores, tmp / SCORES_FILE)
            record["scores_file"] = SCORES_FILE
        if getattr(model, "minitron_calibration", None) is not None:
            calibration.save(model.minitron_calibration, tmp / calibration.FILE)
            record["calibration_file"] = calibration.FILE
        # What --overwrite may replace later: these files and nothing else (check_replaceable).
        record["files"] = sorted([p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                                  if not p.is_dir()] + [INFO_FILE])
        write_json_atomic(tmp / INFO_FILE, record)
    return Path(output_dir)


# ----------------------------------------------------------------------------- CLI
# The settings the command takes (minitron.cli): the source model is --model.
CLI_KEYS = {"model": ("dtype", "device", "trust_remote_code"),
            "data": ("source", "text_field", "block_size", "seed", "calibration_blocks"),
            "importance": None, "prune": None, "search": None,
            # the search's short distillations (the rest of the distill section keeps its defaults)
            "distill": ("batch_size", "block_size", "grad_accum", "lr", "min_lr_ratio",
                        "warmup_fraction", "weight_decay", "temperature", "alpha", "loss_impl",
                        "precision", "eval_every", "checkpoint_every", "eval_batch_size", "seed",
                        "progress"),
            # and their teacher cache (search.teacher_cache)
            "teacher_cache": ("k", "dtype", "batch_size", "progress")}


def _shape_rows(config: Any, fields: Mapping[str, int]) -> list[dict]:
    src = plan(config, {})
    rows = [{"field": k, "source": src[k], "pruned": fields[k]} for k in (*TARGET_KEYS, "head_dim")]
    before = param_count_from_config(config)
    after = param_count_from_config(_config_dict(config, fields))
    rows.append({"field": "parameters", "source": f"{before:,}",
                 "pruned": f"{after:,} ({after / before:.1%})"})
    return rows


def build_parser():
    from minitron import cli

    p = cli.stage_parser("python -m minitron.prune", __doc__.splitlines()[0], CLI_KEYS)
    p.add_argument("--model", default=ModelConfig.name, help="folder, hub id or 'smollm2-135m'")
    p.add_argument("--output", help="folder for the pruned checkpoint (required unless --dry-run)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--scores", help="reuse scores saved by an earlier run (.safetensors)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the pruned shape and parameter count; load no weights")
    p.add_argument("--search", dest="search.candidates", metavar="K", default=argparse.SUPPRESS,
                   help="search the shapes within --target-params; distill the K best briefly "
                        "(search.candidates)")
    p.add_argument("--search-dir", help="the search's work folder (default: OUTPUT.search); a "
                                        "rerun resumes it")
    return p


def _target(config: Any, settings: PruneConfig) -> dict[str, int]:
    if settings.target_params is None and not settings.target():
        raise MinitronError("no target: give at least one of "
                            + ", ".join("prune." + k for k in TARGET_KEYS)
                            + ", or prune.target_params")
    if settings.target_params is None:
        check_widths(config, settings.target(), settings.width_multiple)
        return settings.target()
    target, candidates = target_for_budget(config, settings.target_params, settings.width_multiple)
    print("candidates for prune.target_params (width grid; depth only if no width shape fits):")
    print(format_table(candidates))
    return target


def main(argv: list[str] | None = None) -> int:
    from minitron import cli
    from minitron.config import check_search
    from minitron.models import load_config, load_model, resolve_device

    args = cli.parse(build_parser(), argv)
    c = cli.configs(args)
    model_cfg, data, importance, settings = c["model"], c["data"], c["importance"], c["prune"]
    # ---- everything that can be refused is refused before any weights or data load
    trust = model_cfg.trust_remote_code
    config = load_config(args.model, trust, need_weights=not args.dry_run)
    check_search(settings, c["search"])
    if c["search"].candidates:
        return _search_main(args, c, config)
    target = _target(config, settings)
    fields = plan(config, target)
    print(format_table(_shape_rows(config, fields)))
    if args.dry_run:
        return 0
    _check_output(args)
    for leftover in clean_stale(args.output):
        print(f"[minitron] removed {leftover.name}, left by an interrupted prune", file=sys.stderr)
    scores = load_scores(args.scores) if args.scores else None
    if scores is not None:
        scores.check_matches(config)
        scores.layer_scores(importance.depth_method)
        print(f"reusing scores from {args.scores} (their aggregation: seq="
              f"{scores.config.aggregation_seq}, batch={scores.config.aggregation_batch})")

    with StageTimer("prune") as timer:
        model, tokenizer = load_model(args.model, dtype=model_cfg.dtype,
                                      device=resolve_device(model_cfg.device),
                                      trust_remote_code=trust)
        calib_info, stats = None, None
        if scores is None:
            blocks = calibration_blocks(tokenizer, data, model.config)
            t0 = time.perf_counter()
            collector = calibration.Collector()
            scores = compute_scores(model, blocks, config=importance, progress=True,
                                    collector=collector)
            stats = collector.stats
            calib_info = {"data": data.source, "split": "calibration", "blocks": len(blocks),
                          "block_size": data.block_size}
            print(f"importance computed in {time.perf_counter() - t0:.1f}s")
        print(describe(scores))
        pruned = prune(model, scores, target, depth=settings.depth,
                       depth_method=importance.depth_method, stats=stats)
    info = {"source": str(args.model), "target": target, "method": {
        "width": "activation importance (Minitron)", "depth": settings.depth,
        "depth_method": importance.depth_method,
        "scores_from": args.scores or "computed in this run", "calibration": calib_info},
        "timing": timer.as_dict()}
    if settings.target_params is not None:
        info["target_params"] = settings.target_params
    save_pruned(pruned, tokenizer, args.output, info, scores=scores, overwrite=args.overwrite)
    before, after = count_params(model), count_params(pruned)
    print(f"kept layers: {pruned.minitron_record['kept_layers']}")
    print(f"parameters: {before:,} -> {after:,} ({after / before:.1%}); wrote {args.output} "
          f"in {timer.wall_s:.1f}s")
    return 0


def _check_output(args) -> None:
    """--output must be given, and new, or (with --overwrite) a pruned model holding only its own
    files; it must be writable. Checked before any work."""
    if not args.output:
        raise MinitronError("--output DIR is required (or use --dry-run)")
    if Path(args.output).exists() and not args.overwrite:
        raise MinitronError(f"--output {args.output} already exists; choose another folder or "
                            f"pass --overwrite")
    check_writable(args.output, "--output")
    if args.overwrite:
        check_replaceable(args.output, INFO_FILE, "pruned model")


def _search_main(args, c: dict[str, Any], config: Any) -> int:
    """`--search K`: enumerate, score, distill the K best briefly, keep the best as --output."""
    from minitron import search
    from minitron.models import load_model, resolve_device

    settings, budget = c["search"], c["prune"].target_params
    shapes = enumerate_shapes(config, budget, settings, c["prune"].width_multiple)
    print(f"{len(shapes)} shapes within prune.target_params={budget} (search.band={settings.band}):")
    print(format_table(shapes))
    if args.dry_run:
        return 0
    _check_output(args)
    work = Path(args.search_dir or f"{args.output}.search")
    check_writable(work, "--search-dir")
    with StageTimer("prune") as timer:
        model, tokenizer = load_model(args.model, dtype=c["model"].dtype,
                                      device=resolve_device(c["model"].device),
                                      trust_remote_code=c["model"].trust_remote_code)
        inputs, scores, scores_info = search_inputs(model, tokenizer, args.model, c, work,
                                                    args.scores)
        found = search.search(work, inputs, shapes, budget, settings, c["distill"],
                              device=resolve_device(c["model"].device))
    info = {"source": str(args.model), "target_params": budget,
            "method": {"width": "activation importance (Minitron)", "depth": c["prune"].depth,
                       "depth_method": c["importance"].depth_method, **scores_info},
            "timing": timer.as_dict()}
    save_searched(found, args.output, scores, info, overwrite=args.overwrite)
    print(f"kept {found['chosen']['name']} ({found['chosen']['params']:,} parameters); wrote "
          f"{args.output} in {timer.wall_s:.1f}s (search work: {work})")
    return 0


def search_inputs(model: nn.Module, tokenizer, teacher_name: str, sections: Mapping[str, Any],
                  work: Path, scores_path: str | None = None):
    """(SearchInputs, scores, where the scores came from) for the teacher `model` loaded from
    `teacher_name`, from the settings `sections` (data, importance, prune, search, distill, model,
    teacher_cache). The importance scores are given, found in `work` from an earlier run, or
    computed now and saved there, so that every candidate and every rerun prunes from the same
    ones."""
    from minitron import search

    data, importance = sections["data"], sections["importance"]
    blocks = calibration_blocks(tokenizer, data, model.config)
    saved = work / search.SCORES
    where = scores_path or (saved if saved.exists() else None)
    if where is not None:
        scores = load_scores(where)
        scores.check_matches(model.config)
        info = {"scores_from": str(where)}
        print(f"[search] importance scores: reused {where}")
    else:
        t0 = time.perf_counter()
        scores = compute_scores(model, blocks, config=importance, progress=True)
        work.mkdir(parents=True, exist_ok=True)
        save_scores(scores, saved)
        print(f"[search] importance computed once in {time.perf_counter() - t0:.1f}s ({saved})")
        info = {"scores_from": "computed in this run",
                "calibration": {"data": data.source, "split": "calibration", "blocks": len(blocks),
                                "block_size": data.block_size}}
    train, evals = search.short_run_blocks(tokenizer, data, sections["distill"], sections["search"],
                                           getattr(model.config, "max_position_embeddings", None))
    inputs = pruner_inputs(model, tokenizer, scores, blocks, train, evals, sections["prune"].depth,
                           importance.depth_method)
    inputs.build_cache = _cache_builder(teacher_name, sections)
    return inputs, scores, info


def _cache_builder(teacher_name: str, sections: Mapping[str, Any]):
    """Builds the search's teacher cache over a short run's train blocks (minitron.teacher_cache),
    with the teacher_cache section's k, dtype and batch size."""
    import dataclasses

    def build(folder: Path, config: DistillConfig) -> None:
        from minitron.teacher_cache import build_cache

        settings = dataclasses.replace(
            sections["teacher_cache"], split="train", tokens=config.blocks_read * config.block_size,
            block_size=config.block_size, seed=config.seed)
        build_cache(teacher_name, folder, settings, data=sections["data"], model=sections["model"])
    return build


def pruner_inputs(model: nn.Module, tokenizer, scores: Scores, calibration: torch.Tensor,
                  train_blocks, eval_blocks: torch.Tensor, depth: DepthMode = "importance",
                  depth_method: str | None = None):
    """A search's inputs around `model` (the teacher): every candidate is pruned from `scores`
    with these depth settings and saved with `tokenizer`."""
    from minitron.search import SearchInputs, scores_digest

    method = depth_method or scores.config.depth_method
    return SearchInputs(
        teacher=model,
        prune=lambda target: prune(model, scores, target, depth=depth, depth_method=method),
        save=lambda pruned, folder: save_pruned(pruned, tokenizer, folder, overwrite=True),
        scores_key=f"{scores_digest(scores)}:{depth}:{method}",
        calibration=calibration, train_blocks=train_blocks, eval_blocks=eval_blocks)


def save_searched(found: dict[str, Any], output: str | os.PathLike, scores: Scores | None = None,
                  info: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """The search's chosen candidate (its pruned checkpoint) as `output`, atomically, its
    minitron.json extended with `info` and the search's summary (ranking, why), the scores beside
    it: the prune command's output, the same as a plain prune's."""
    import json
    import shutil

    from minitron.search import summary

    with atomic_dir(output, overwrite=overwrite, manifest=INFO_FILE, what="pruned model") as tmp:
        for f in Path(found["chosen"]["model_dir"]).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        record = json.loads((tmp / INFO_FILE).read_text())
        record.update(info or {})
        record["search"] = summary(found)
        if scores is not None:
            save_scores(scores, tmp / SCORES_FILE)
            record["scores_file"] = SCORES_FILE
        record["files"] = sorted([p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                                  if not p.is_dir() and p.name != INFO_FILE] + [INFO_FILE])
        write_json_atomic(tmp / INFO_FILE, record)
    return Path(output)


def calibration_blocks(tokenizer, data: DataConfig, config: Any) -> torch.Tensor:
    """The calibration split's blocks as the data settings say (the command and the pipeline)."""
    from minitron.data import load_blocks

    return load_blocks(tokenizer, "calibration", data.calibration_blocks, source=data.source,
                       block_size=data.block_size, seed=data.seed, text_field=data.text_field,
                       max_positions=getattr(config, "max_position_embeddings", None))


__all__ = ["TARGET_KEYS", "enumerate_shapes", "plan", "pruned_config", "prune", "save_pruned",
           "pruner_inputs", "save_searched", "search_inputs", "select_heads", "select_layers", "shape_grid",
           "target_for_budget", "main"]

if __name__ == "__main__":
    run_cli(main)
