"""Per-GPU memory of a distillation before any of it is spent: the terms, their peak, and a refusal
that names the biggest term when the plan does not fit.

Model of one training step under the precision policy (bf16 compute, fp32 master weights) on
`world` GPUs, each taking batch_size / world sequences of block_size tokens per micro-batch:
  teacher            replicated, frozen, in its own dtype
  student params     fp32 shards (FSDP) or whole (DDP / one process)
  student grads      fp32, sharded like the parameters; unsynced FSDP accumulation adds whole ones
  optimizer          AdamW's two fp32 moments, sharded like the parameters
  gathered params    bf16 copies FSDP gathers: the root (embeddings, LM head) for the whole step,
                     plus the all-gather buffer of one unit at a time; DDP/one process: the autocast
                     bf16 copies of the weights (cached for the step)
  reduce-scatter     the fp32 buffer FSDP reduces the largest unit's gradient through
  activations        saved per layer (checkpointing: each layer's input only, then one layer's
                     full set while it is recomputed), plus the gradients of one layer's activations
  loss               fused linear+KL: the LM-head gradient held from forward to backward and three
                     [chunk, V] bf16 tensors; logits form: student and teacher [T, V] bf16 logits and
                     their gradient
  eval               a separate peak: a no-grad forward and 512-token logit chunks (fp32 temporaries)
`plan_evaluate` and `plan_prune` model the evaluate stage and the prune stage's importance pass
(one device, no grad: weights, one layer's forward transients, logit chunks, scoring hooks).
The step's peak is the fixed terms plus the larger of the forward/backward working set and the
reduce-scatter moment; eval and teacher correction are their own phases. Activation bytes per token
per layer follow the Llama block as PyTorch saves it under autocast (norms keep their fp32 input,
the attention keeps q, k, v and its output, the gated MLP four [T, I] tensors). The tests hold the
total to PyTorch's FSDP2 memory tracker on fake tensors at the real 8B shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from minitron.common import MinitronError

GIB = 2**30
FUSED_CHUNK = 1024  # kernels.fused_linear.DEFAULT_CHUNK_SIZE
EVAL_CHUNK = 512  # scoring.EVAL_CHUNK_TOKENS
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, None: 4}


@dataclass
class Shape:
    """What the plan needs of a decoder config (HF field names)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config: Any) -> "Shape":
        get = (config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d))
        heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // heads
        return cls(get("hidden_size"), get("intermediate_size"), get("num_hidden_layers"), heads,
                   get("num_key_value_heads") or heads, head_dim, get("vocab_size"),
                   bool(get("tie_word_embeddings", False)))

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * (2 * q + 2 * kv) + 3 * h * self.intermediate + 2 * h

    @property
    def root_params(self) -> int:
        """Embeddings, LM head (unless tied) and the final norm: FSDP's root unit."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def layer_activation_bytes(self, tokens: int) -> int:
        """Bytes one layer saves for backward at bf16 compute (see the module docstring)."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return tokens * (12 * h + 8 * i + 6 * q + 4 * kv)


@dataclass
class Plan:
    world: int
    terms: dict[str, int] = field(default_factory=dict)  # the step's terms, bytes
    peak: int = 0  # bytes: the largest phase
    phases: dict[str, int] = field(default_factory=dict)

    def biggest(self) -> tuple[str, int]:
        return max(self.terms.items(), key=lambda kv: kv[1])

    def rows(self) -> list[dict[str, Any]]:
        rows = [{"term": k, "GiB": round(v / GIB, 2)} for k, v in self.terms.items()]
        rows += [{"term": f"peak: {k}", "GiB": round(v / GIB, 2)} for k, v in self.phases.items()]
        return rows


def plan_distill(teacher: Any, student: Any, config: Any, world: int,
                 teacher_dtype: str | None = "bfloat16", strategy: str = "fsdp",
                 correction_tokens: int = 0, per_node: int | None = None,
                 checkpointed: int | None = None) -> Plan:
    """The per-GPU plan of `minitron.distill` with DistillConfig `config` on `world` GPUs
    (`per_node` of them on each node: HSDP's default shard group), after a teacher correction of
    `correction_tokens` tokens (0: none). `checkpointed`: how many decoder layers recompute
    their activations (default: all of them when `config.gradient_checkpointing` is true, else
    none; `choose_checkpointing` picks it when that is null)."""
    t, s = Shape.of(teacher), Shape.of(student)
    shard = world if (strategy == "fsdp" and world > 1) else 1
    if strategy == "hsdp" and world > 1:
        # Sharded inside a group (hsdp_shard_size ranks, else one node's), replicated across
        # groups: each GPU holds 1/group of the state, not 1/world.
        shard = getattr(config, "hsdp_shard_size", None) or per_node or world
    # Sequences per rank per forward: the per-process micro-batch when one is set.
    micro = getattr(config, "micro_batch_size", None) or max(config.batch_size // world, 1)
    tokens = micro * config.block_size
    p_s = s.params
    terms: dict[str, int] = {}
    if getattr(config, "teacher_cache", None):  # the cache stands in for the teacher: not loaded
        terms["teacher weights"] = 0
    else:
        terms["teacher weights"] = t.params * DTYPE_BYTES.get(teacher_dtype, 2)
    terms["student params (fp32)"] = 4 * p_s // shard
    terms["student grads (fp32)"] = 4 * p_s // shard
    if shard > 1 and getattr(config, "fsdp_unsynced_accum", False) and config.grad_accum > 1:
        terms["unsynced accumulation grads (fp32)"] = 4 * p_s
    terms["optimizer (AdamW fp32)"] = 8 * p_s // shard
    if shard > 1:
        terms["gathered params (bf16)"] = 2 * s.root_params + 2 * 2 * s.layer_params
        terms["reduce-scatter buffer (fp32)"] = 4 * max(s.root_params, s.layer_params)
    else:
        terms["bf16 weight copies (autocast)"] = 2 * p_s
    layer_act = s.layer_activation_bytes(tokens)
    k = checkpointed if checkpointed is not None else (s.layers if config.gradient_checkpointing
                                                       else 0)
    k = min(max(k, 0), s.layers)
    if k == s.layers:
        terms["activations (checkpointed)"] = s.layers * tokens * s.hidden * 2 + layer_act
    elif k:  # selective: the first k layers keep their input only, the others everything
        terms[f"activations ({k}/{s.layers} layers checkpointed)"] = (
            k * tokens * s.hidden * 2 + layer_act + (s.layers - k) * layer_act)
    else:
        terms["activations"] = s.layers * layer_act
    terms["activation grads (one layer)"] = layer_act // 2
    if _fused(config, s.vocab):
        terms["loss (fused, chunked)"] = (2 * s.vocab * s.hidden + 3 * FUSED_CHUNK * s.vocab * 2
                                          + tokens * (s.hidden + t.hidden) * 2)
    else:
        terms["loss (full logits)"] = 3 * tokens * s.vocab * 2
    fixed = sum(v for k, v in terms.items() if k in _FIXED)
    working = sum(v for k, v in terms.items() if k not in _FIXED and "reduce-scatter" not in k)
    rs_moment = terms.get("reduce-scatter buffer (fp32)", 0) + 2 * s.root_params
    phases = {"train step": fixed + max(working, rs_moment)}
    eval_tokens = max(config.eval_batch_size // world, 1) * config.block_size
    phases["eval"] = (terms["teacher weights"] + terms["student params (fp32)"]
                      + terms["optimizer (AdamW fp32)"]
                      + terms.get("gathered params (bf16)", terms.get("bf16 weight copies (autocast)", 0))
                      + s.layer_activation_bytes(eval_tokens)
                      + EVAL_CHUNK * s.vocab * (2 + 2 + 3 * 4))
    if correction_tokens:
        tshard = shard
        # The teacher stays loaded in its dtype while an fp32 copy trains (sharded under FSDP); the
        # copy is whole for a moment before fully_shard splits it.
        phases["teacher correction"] = terms["teacher weights"] + max(
            4 * t.params,
            16 * t.params // tshard + 2 * t.root_params + 4 * t.root_params
            + t.layers * tokens * t.hidden * 2 + t.layer_activation_bytes(tokens) * 3 // 2
            + 3 * tokens * t.vocab * 2)
    plan = Plan(world=world, terms=terms, phases=phases)
    plan.peak = max(phases.values())
    return plan


def _forward_working_set(s: Shape, tokens: int, nbytes: int) -> int:
    """A no-grad forward's largest moment: one decoder layer's transients (the gated MLP's three
    [T, I] tensors, the attention's q, k, v and output, a few [T, H] residual and norm tensors)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return tokens * (3 * s.intermediate + 4 * s.hidden + 2 * q + 2 * kv) * nbytes


def plan_evaluate(student: Any, teacher: Any | None, batch_size: int, block_size: int,
                  dtype: str | None = "bfloat16") -> Plan:
    """The evaluate stage (minitron.evaluate): both models in `dtype`, one batch's no-grad forward
    through each, then metrics from the final hidden states in `EVAL_CHUNK`-token logit chunks:
    the model's [C, V] logits and their fp32 copy (student alone), plus the teacher's logits and
    the KL's fp32 temporaries with a teacher. No [B, T, V] tensor."""
    s, nbytes, tokens = Shape.of(student), DTYPE_BYTES.get(dtype, 2), batch_size * block_size
    t = Shape.of(teacher) if teacher is not None else None
    terms = {"student weights": s.params * nbytes}
    if t is not None:
        terms["teacher weights"] = t.params * nbytes
    hidden = tokens * (s.hidden + (t.hidden if t else 0)) * nbytes
    per_element = nbytes + 4 if t is None else 2 * nbytes + 3 * 4
    forward = max(_forward_working_set(m, tokens, nbytes) for m in (s, t) if m is not None)
    terms["forward (one layer)"] = forward + tokens * s.hidden * nbytes
    terms["logit chunks"] = hidden + EVAL_CHUNK * max(s.vocab, t.vocab if t else 0) * per_element
    weights = terms["student weights"] + terms.get("teacher weights", 0)
    plan = Plan(world=1, terms=terms, phases={
        "evaluate": weights + max(terms["forward (one layer)"], terms["logit chunks"])})
    plan.peak = max(plan.phases.values())
    return plan


def plan_prune(model: Any, batch_size: int, block_size: int, dtype: str | None = "bfloat16",
               head_score: str = "attention_output",
               depth_method: str = "block_importance") -> Plan:
    """The prune stage's importance pass (minitron.importance): the model in `dtype`, a no-grad
    forward of one calibration batch with the scoring hooks' fp32 temporaries (the MLP input, the
    attention output per head, with o_proj_contribution its per-head Gram products [T, H, d]),
    and for depth_method lm_loss the evaluation's logit chunks. Pruning itself copies slices of
    one weight at a time."""
    s, nbytes, tokens = Shape.of(model), DTYPE_BYTES.get(dtype, 2), batch_size * block_size
    q = s.heads * s.head_dim
    hooks = tokens * max(s.intermediate, q * (3 if head_score == "o_proj_contribution" else 1)) * 4
    terms = {"weights": s.params * nbytes,
             "forward (one layer)": _forward_working_set(s, tokens, nbytes),
             "scoring hooks (fp32)": hooks}
    phases = {"importance": terms["weights"] + terms["forward (one layer)"] + hooks}
    if depth_method == "lm_loss":
        lm = plan_evaluate(model, None, batch_size, block_size, dtype)
        terms["lm_loss logit chunks"] = lm.terms["logit chunks"]
        phases["lm_loss"] = lm.peak
    plan = Plan(world=1, terms=terms, phases=phases)
    plan.peak = max(phases.values())
    return plan


CHECKPOINT_HEADROOM = 0.9  # the plan is within 15% of the tracker: leave a margin when choosing


def choose_checkpointing(teacher: Any, student: Any, config: Any, world: int,
                         teacher_dtype: str | None, strategy: str, gpu_bytes: int | None,
                         per_node: int | None = None) -> int:
    """How many decoder layers recompute their activations when `gradient_checkpointing` is null:
    none when the training step fits in `CHECKPOINT_HEADROOM` of `gpu_bytes` without it (the
    recompute costs about a third more compute), the fewest that make it fit when it nearly does
    (selective), all of them otherwise. No GPU (`gpu_bytes` None): none."""
    layers = Shape.of(student).layers
    if gpu_bytes is None:
        return 0
    budget = CHECKPOINT_HEADROOM * gpu_bytes
    for k in range(layers + 1):
        step = plan_distill(teacher, student, config, world, teacher_dtype, strategy,
                            per_node=per_node, checkpointed=k).phases["train step"]
        if step <= budget:
            return k
    return layers


_FIXED = {"teacher weights", "student params (fp32)", "student grads (fp32)",
          "optimizer (AdamW fp32)", "unsynced accumulation grads (fp32)"}


def _fused(config: Any, vocab: int) -> bool:
    impl = getattr(config, "loss_impl", "auto")
    return impl == "fused" or (impl == "auto" and vocab >= 32_768)


def check_fits(plan: Plan, gpu_bytes: int | None, where: str = "distill") -> None:
    """Refuse a plan over `gpu_bytes` per GPU, naming the biggest term (None: nothing to check)."""
    if gpu_bytes is None or plan.peak <= gpu_bytes:
        return
    name, size = plan.biggest()
    phase = max(plan.phases, key=plan.phases.get)
    raise MinitronError(
        f"{where}: the memory plan needs {plan.peak / GIB:.1f} GiB per GPU ({phase}) on "
        f"{plan.world} GPU(s), more than the {gpu_bytes / GIB:.1f} GiB available; the biggest term "
        f"is {name} ({size / GIB:.1f} GiB). Use more GPUs (nproc_per_node), a smaller batch_size, "
        f"gradient_checkpointing, or a bf16 teacher")


def detected_gpu_bytes() -> int | None:
    """The current CUDA device's total memory, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
