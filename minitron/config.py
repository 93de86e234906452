"""Every stage's settings, each defined once: a dataclass per stage with its documentation, default
and valid range. Recipes (`minitron.recipe`), the stage commands (`minitron.cli`) and torchrun's
child processes all build these same classes. This module imports no torch, so reading and checking
a recipe stays cheap.

A field is declared with `setting(default, doc, valid)`; `valid` is a `Rule` (a predicate and the
words that describe it). `Literal[...]` fields take their valid values from the annotation. Each
class validates itself in `__post_init__` (types, literals, ranges, then the class's own `check()`
for rules that tie several fields together) and names the key, the value and what is valid.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

from minitron.common import MinitronError
from minitron.cpu import INT8_CPUS  # imports no torch
from minitron.precision import PRECISIONS  # imports no torch

EMBEDDED_NAME = "smollm2-135m"


# ----------------------------------------------------------------------------- declaring settings
@dataclass(frozen=True)
class Rule:
    """A valid range: `ok(value)` says whether a value is in it, `text` says it to a person."""

    text: str
    ok: Callable[[Any], bool]


def at_least(n: float) -> Rule:
    return Rule(f">= {n}", lambda v: v >= n)


def between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Rule:
    text = f"{lo} {'<' if lo_open else '<='} x {'<' if hi_open else '<='} {hi}"
    return Rule(text, lambda v: (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))


POSITIVE = Rule("> 0", lambda v: math.isfinite(v) and v > 0)
NON_NEGATIVE = Rule(">= 0", lambda v: math.isfinite(v) and v >= 0)
OFF_OR_ABOVE_1 = Rule("0 (off) or > 1", lambda v: math.isfinite(v) and (v == 0 or v > 1))
# What every random generator involved takes (numpy's seeds are 0 <= seed < 2**32).
SEED = Rule("0 <= x < 2**32", lambda v: 0 <= v < 2**32)


def setting(default: Any, doc: str, valid: Rule | None = None, resumable: bool = False) -> Any:
    """A dataclass field carrying its documentation and valid range (read by `--help`).

    `resumable`: the setting may change between a run and its resumption (it does not change what
    the run computes: how often it logs or saves, how many processes share the work)."""
    return field(default=default, metadata={"doc": doc, "valid": valid, "resumable": resumable})


def resumable(default: Any, doc: str, valid: Rule | None = None) -> Any:
    """A setting that a resumed run may change (see `setting`)."""
    return setting(default, doc, valid, resumable=True)


def resumable_keys(section: type) -> frozenset[str]:
    """The names of `section`'s settings declared with `resumable`."""
    return frozenset(f.name for f in dataclasses.fields(section) if f.metadata.get("resumable"))


def literal_choices(tp: Any) -> tuple[Any, ...]:
    """The values a `Literal[...]` (or an optional one) allows; () for other types."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(c for a in typing.get_args(tp) for c in literal_choices(a))
    return ()


def allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _base_type(tp: Any) -> Any:
    if allows_none(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else None
    return tp


def describe_valid(tp: Any, rule: Rule | None) -> str:
    """What a field accepts, in words: its literal choices or its rule (and `null` if optional)."""
    choices = literal_choices(tp)
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        _base_type(tp), "see the documentation")
    text = ", ".join(map(str, choices)) if choices else (rule.text if rule else kind)
    if rule and not choices and rule.text[:1] in "<>":
        text = f"{kind} {rule.text}"
    return text + (" or null" if allows_none(tp) else "")


def _type_ok(tp: Any, value: Any) -> bool:
    base = _base_type(tp)
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    return True


class Section:
    """Base of the stage configs: validation from the field declarations, plus `check()`."""

    SECTION: ClassVar[str] = ""
    # Keys a section no longer takes -> (the key that replaced it, why): a recipe or command that
    # still gives one is refused with the new name, not with "unknown key".
    RENAMED: ClassVar[dict[str, tuple[str, str]]] = {}

    @classmethod
    def renamed(cls, key: str) -> str | None:
        """The refusal for a renamed key (None if `key` was not renamed)."""
        if key not in cls.RENAMED:
            return None
        new, why = cls.RENAMED[key]
        return f"renamed to '{cls.SECTION}.{new}' ({why})"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, tp = getattr(self, f.name), hints[f.name]
            if value is None and allows_none(tp):
                continue
            rule = f.metadata.get("valid")
            choices = literal_choices(tp)
            try:
                ok = _type_ok(tp, value) and (not choices or value in choices) and (
                    rule is None or rule.ok(value))
            except TypeError:
                ok = False
            if not ok:
                self.invalid(f.name, describe_valid(tp, rule))
        self.check()

    def check(self) -> None:
        """Rules that tie several fields together (each class adds its own)."""

    def invalid(self, name: str, valid: str) -> typing.NoReturn:
        raise MinitronError(f"{self.SECTION}.{name}={getattr(self, name)!r} is invalid; valid: {valid}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def docs(cls: type) -> list[dict[str, Any]]:
    """Every key of a section with its default, valid range and documentation (for `--help`)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append({"key": f.name, "default": default, "doc": f.metadata.get("doc", ""),
                    "valid": describe_valid(hints[f.name], f.metadata.get("valid")),
                    "type": hints[f.name]})
    return out


# ----------------------------------------------------------------------------- model and data
Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class ModelConfig(Section):
    """The source model (the teacher of distillation) and how models are loaded."""

    SECTION: ClassVar[str] = "model"

    name: str = setting(EMBEDDED_NAME, "Local folder, hub id, or the embedded 'smollm2-135m'.")
    config: str | None = setting(None, "A config.json for dry runs of models that are not on this "
                                       "machine (relative to the recipe).")
    dtype: Dtype = setting("float32", "Dtype models are loaded in for importance and evaluation, "
                                      "and the teacher's in distillation (the student trains in "
                                      "float32; export works in float32, what ONNX Runtime takes).")
    device: str | None = setting(None, "cpu, cuda, cuda:N; null picks CUDA when available.")
    trust_remote_code: bool = setting(False, "Run Python code that a model folder ships (its "
                                             "config.json auto_map) to load it. Off: such a model "
                                             "is refused by every stage. Only for models you "
                                             "trust.")


@dataclass
class DataConfig(Section):
    """Where the text comes from and how it is cut into blocks."""

    SECTION: ClassVar[str] = "data"

    source: str = setting("stdlib", "stdlib (Python source), python-docs (English prose), a text "
                                    "file, a folder, a glob, a .jsonl file, hf:NAME / a saved "
                                    "datasets folder, a prepared folder, or a mixture 'A + B' "
                                    "('A@3 + B@1': 3:1 shares of the training tokens).")
    text_field: str = setting("text", "The field holding the text in .jsonl and datasets sources.")
    block_size: int = setting(256, "Tokens per block for importance, export and evaluation. "
                                   "When the model's tokenizer prepends BOS (Gemma, Llama 3, "
                                   "Mistral) every block is BOS + block_size - 1 stream tokens, "
                                   "in every stage; else blocks are cut from the stream as is.",
                              at_least(2))
    seed: int = setting(0, "Seed of the calibration blocks' order.", SEED)
    calibration_blocks: int = setting(1024, "Blocks that importance is scored on (the papers: "
                                            "1024).", at_least(1))
    eval_blocks: int = setting(32, "Held-out blocks for export validation and evaluation.",
                               at_least(1))
    workers: int | None = setting(None, "Tokenizing processes of the data stage (null: the CPU "
                                        "count, at most 8); no effect on the shards' content.",
                                  at_least(1))



SHARD_TOKENS = 1 << 27  # tokens per shard file of a prepared folder (256 MiB of uint16)


@dataclass
class PrepareConfig(Section):
    """How `python -m minitron.data prepare` tokenizes a corpus into shards. The prepared folder's
    content depends on text_field, seed, block_size and the two fractions (and on its sources and
    tokenizer); the other keys only change how it is made. Not a recipe section: a recipe's data
    stage prepares with the data section's text_field, seed, block_size and workers."""

    SECTION: ClassVar[str] = "prepare"

    text_field: str = setting("text", "The field holding the text in .jsonl and datasets sources.")
    block_size: int = setting(256, "Default block size of readers (any size reads the same "
                                   "shards).", at_least(2))
    seed: int = setting(0, "Seed of the documents' order within each split.", SEED)
    eval_fraction: float = setting(0.05, "Share of the documents (by a stable hash of each one's "
                                         "key) in the eval split.", between(0, 1, hi_open=True))
    calibration_fraction: float = setting(0.10, "Share of the documents in the calibration split "
                                                "(the rest is train).",
                                          between(0, 1, hi_open=True))
    workers: int | None = setting(None, "Tokenizing processes (null: the CPU count, at most 8).",
                                  at_least(1))
    shard_tokens: int = setting(SHARD_TOKENS, "Tokens per shard file.", at_least(1))
    progress: bool = setting(True, "Show a progress bar with tokens/s.")

    CONTENT: ClassVar[tuple[str, ...]] = ("text_field", "seed", "block_size", "eval_fraction",
                                          "calibration_fraction")

    def check(self) -> None:
        if self.eval_fraction + self.calibration_fraction >= 1:
            raise MinitronError(
                f"prepare.eval_fraction + prepare.calibration_fraction = "
                f"{self.eval_fraction + self.calibration_fraction:g} leaves no training data; "
                f"valid: a sum < 1")

    @property
    def split_edges(self) -> dict[str, tuple[float, float]]:
        """split -> [lo, hi) of a document's hash bucket (`corpus.split_of`)."""
        e, c = self.eval_fraction, self.calibration_fraction
        return {"eval": (0.0, e), "calibration": (e, e + c), "train": (e + c, 1.0)}

# ----------------------------------------------------------------------------- importance and prune
Aggregation = Literal["mean", "l2", "var"]
DepthMethod = Literal["block_importance", "lm_loss"]
HeadScore = Literal["attention_output", "o_proj_contribution"]
DepthMode = Literal["importance", "contiguous"]
AGGREGATIONS: tuple[str, ...] = typing.get_args(Aggregation)
DEPTH_METHODS: tuple[str, ...] = typing.get_args(DepthMethod)
HEAD_SCORES: tuple[str, ...] = typing.get_args(HeadScore)
DEPTH_MODES: tuple[str, ...] = typing.get_args(DepthMode)


@dataclass
class ImportanceConfig(Section):
    """How activations become scores (see minitron/importance.py).

    `head_score`: "attention_output" (the papers': the norm of each head's slice of the o_proj
    input) or "o_proj_contribution" (the norm of what each head adds to the residual stream,
    W_o[:, head] @ x_head, which also weighs the head by its output projection).
    """

    SECTION: ClassVar[str] = "importance"

    aggregation_seq: Aggregation = setting("mean", "Reduction over the sequence per sample.")
    aggregation_batch: Aggregation = setting("l2", "Reduction over samples (the papers: mean, "
                                                   "then l2).")
    depth_method: DepthMethod = setting("block_importance", "Layer scores: Block Importance "
                                        "(1 - cos) or the LM-loss increase when a layer is skipped.")
    lm_loss_blocks: int = setting(32, "Calibration blocks used by the (costly) lm_loss method.",
                                  at_least(1))
    head_score: HeadScore = setting("attention_output", "How heads are scored (see above).")
    batch_size: int = setting(8, "Calibration blocks per forward pass.", at_least(1))


TARGET_KEYS: tuple[str, ...] = ("hidden_size", "intermediate_size", "num_attention_heads",
                                "num_key_value_heads", "num_hidden_layers")


@dataclass
class PruneConfig(Section):
    """The target architecture, in Hugging Face config names (any subset), or a parameter budget."""

    SECTION: ClassVar[str] = "prune"

    enabled: bool = setting(True, "Run this stage in a recipe.")
    hidden_size: int | None = setting(None, "Embedding / hidden channels to keep.", at_least(1))
    intermediate_size: int | None = setting(None, "MLP neurons to keep per layer.", at_least(1))
    num_attention_heads: int | None = setting(None, "Query heads to keep per layer.", at_least(1))
    num_key_value_heads: int | None = setting(None, "KV groups to keep per layer.", at_least(1))
    num_hidden_layers: int | None = setting(None, "Layers to keep.", at_least(1))
    target_params: float | None = setting(None, "A parameter budget instead of a shape: a fraction "
                                                "of the source (<= 1) or a count (> 1).", POSITIVE)
    depth: DepthMode = setting("importance", "Drop the lowest-scoring layers, or the "
                                             "lowest-scoring contiguous block.")
    width_multiple: int = setting(64, "Keep hidden and MLP widths at multiples of this (64: "
                                      "MatMulNBits / Q8_0 blocks; 256 for GGUF k-quants; 1: any): "
                                      "the budget rule and the search round to it, an explicit "
                                      "width that is not one is refused. Applies to a width whose "
                                      "source is at least 2x it.", at_least(1))

    def target(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in TARGET_KEYS if getattr(self, k) is not None}

    def check(self) -> None:
        if self.target_params is not None and self.target():
            raise MinitronError(f"prune.target_params={self.target_params} cannot be combined with "
                                f"a shape ({', '.join('prune.' + k for k in self.target())}); give one")


@dataclass
class SearchConfig(Section):
    """Architecture search within prune.target_params (see minitron/search.py): enumerate the
    shapes that fit, prune each from one set of importance scores, score all of them without
    training (KL to the teacher on calibration blocks), distill the best `candidates` briefly on the
    same `tokens`, keep the one with the lowest held-out KL. 0 candidates: off (the budget's fixed
    rule picks the shape). The short runs take the distill section's settings but its tokens."""

    SECTION: ClassVar[str] = "search"

    candidates: int = setting(0, "K: shapes distilled briefly and ranked (0: no search).",
                              at_least(0))
    tokens: int = setting(16384, "Short-distillation tokens per candidate (the same tokens for "
                                 "each).", at_least(1))
    band: float = setting(0.05, "Shapes enumerated: from (1 - band) x the budget up to the "
                                "budget (a shape that leaves much of it unused is not a "
                                "contender).", between(0, 1, lo_open=True))
    depth: bool = setting(True, "Also enumerate depth (fewer layers), not only widths and heads.")
    max_shapes: int = setting(96, "At most this many shapes are scored without training (the "
                                  "largest first).", at_least(1))
    score_blocks: int = setting(8, "Calibration blocks the zero-shot KL is measured on.",
                                at_least(1))
    eval_blocks: int = setting(16, "Held-out blocks each short run is ranked on.", at_least(1))
    teacher_cache: bool = setting(True, "Run the teacher once over the short runs' tokens into a "
                                        "teacher cache (the teacher_cache section's k and dtype) "
                                        "that every candidate reads; false, or distill settings a "
                                        "cache cannot serve (temperature != 1, ...): the teacher "
                                        "runs online in each short run.")


def check_search(prune: PruneConfig, search: SearchConfig) -> None:
    """The rule that ties the two sections: a search needs a budget to search within."""
    if search.candidates and prune.target_params is None:
        raise MinitronError(f"search.candidates={search.candidates} searches within a parameter "
                            f"budget: give prune.target_params (e.g. 0.5) instead of a shape, or "
                            f"set search.candidates=0")


# ----------------------------------------------------------------------------- distillation
Divergence = Literal["kl", "reverse_kl", "jsd"]
Baseline = Literal["ce", "scratch"]
IntermediateLoss = Literal["cosine", "mse"]
LossImpl = Literal["auto", "logits", "fused"]
Strategy = Literal["auto", "ddp", "fsdp", "hsdp"]
DIVERGENCES: tuple[str, ...] = typing.get_args(Divergence)
Precision = Literal[PRECISIONS]  # the names minitron.precision defines


@dataclass
class TeacherCorrectionConfig(Section):
    """Fine-tune the teacher on the distillation data first (the papers' remedy when the original
    pretraining data is not available). 0 tokens: off."""

    SECTION: ClassVar[str] = "teacher_correction"

    tokens: int = setting(0, "Teacher training tokens (0: no teacher correction).", at_least(0))
    lr: float | None = setting(None, "Its peak learning rate (null: distill.lr).", POSITIVE)


def _intermediate_pairs(value: Any) -> bool:
    return all(len(p) == 2 and all(isinstance(i, int) and i >= 0 for i in p) for p in value)


@dataclass
class DistillConfig(Section):
    """Everything that shapes a distillation run (the teacher -> student training loop)."""

    SECTION: ClassVar[str] = "distill"

    enabled: bool = resumable(True, "Run this stage in a recipe.")
    tokens: int = setting(1_000_000, "Student training tokens (the budget).", at_least(1))
    skip_tokens: int = setting(
        0, "Training tokens an earlier stage already read (the sweep's iterative pruning): the run "
           "trains on the train split's blocks after the first skip_tokens // block_size, so a "
           "staged schedule reads fresh tokens at every stage.", at_least(0))
    batch_size: int = setting(8, "Sequences per micro-batch (global: split over processes).",
                              at_least(1))
    block_size: int = setting(256, "Tokens per training sequence (BOS-led when the tokenizer "
                                   "prepends BOS, as data.block_size).", at_least(2))
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", at_least(1))
    micro_batch_size: int | None = resumable(
        None, "Sequences per process per forward. null: each micro-batch of batch_size is split "
              "over the processes. Set: the global batch stays batch_size x grad_accum and each "
              "process runs global / (micro_batch_size x processes) micro-steps per optimizer "
              "step, so any process count that divides it works.", at_least(1))
    lr: float = setting(1e-4, "Peak learning rate (AdamW).", POSITIVE)
    min_lr_ratio: float = setting(0.1, "The cosine decays to lr * min_lr_ratio.", between(0, 1))
    warmup_fraction: float = setting(0.05, "Share of the optimizer steps in linear warmup.",
                                     between(0, 1, hi_open=True))
    weight_decay: float = setting(0.1, "On matrices only (not norms or biases).", NON_NEGATIVE)
    clip_grad: float = setting(1.0, "Max global gradient norm; 0 turns clipping off.", NON_NEGATIVE)
    temperature: float = setting(1.0, "Softmax temperature of the divergence.", POSITIVE)
    alpha: float = setting(0.0, "Cross-entropy share: loss = (1 - alpha) * divergence + alpha * CE"
                                " (1 only with baseline ce).", between(0, 1))
    divergence: Divergence = setting("kl", "Forward KL (the papers'), reverse KL or JSD.")
    beta: float = setting(0.5, "JSD mixture weight.", between(0, 1, True, True))
    intermediate: tuple[tuple[int, int], ...] = setting(
        (), "(teacher layer, student layer) pairs for an intermediate-state loss, e.g. "
            "[[29, 14], [14, 7]].", Rule("pairs of non-negative layer indices [[teacher, student], "
                                         "...]", _intermediate_pairs))
    intermediate_loss: IntermediateLoss = setting("cosine", "cosine, or mse normalized by the "
                                                            "teacher's mean square.")
    intermediate_weight: float = setting(1.0, "Weight of the intermediate loss.", NON_NEGATIVE)
    baseline: Baseline | None = setting(None, "null: distill; ce: retrain on the data without a "
                                              "teacher; scratch: random init of the student's shape.")
    loss_impl: LossImpl = setting("auto", "auto takes the fused linear+KL form for vocabularies "
                                          ">= 32768.")
    gradient_checkpointing: bool | None = setting(
        None, "Recompute activations in backward: true (every decoder layer), false, or null: "
              "the memory plan chooses (off when the step fits the GPU without it, on the fewest "
              "layers that make it fit when it nearly does, every layer otherwise; off without "
              "a GPU).")
    precision: Precision = setting("auto", "bf16 (bf16 compute, fp32 master weights and "
                                            "gradient reduction), fp32, or auto (bf16 on CUDA, "
                                            "fp32 on CPU); see minitron/precision.py.")
    fsdp_unsynced_accum: bool = setting(False, "Under FSDP, reduce-scatter gradients on the last "
                                               "micro-batch only (less communication; unsharded "
                                               "fp32 gradients held between micro-batches).")
    checkpoint_every: int = resumable(100, "Optimizer steps between checkpoints (also at the end). "
                                           "A checkpoint is written once the next step's loss and "
                                           "gradient norm show its weights healthy (see spike_*).",
                                      at_least(1))
    async_checkpoint: bool = resumable(False, "Write checkpoints in the background "
                                              "(torch.distributed.checkpoint.async_save on a gloo "
                                              "group of their own): training waits only while the "
                                              "state is copied to host memory (a second host copy "
                                              "of each rank's shard while it is written); the "
                                              "checkpoint takes its place once every rank's write "
                                              "is done.")
    # Divergence guard: a non-finite loss or gradient norm always stops the run; these catch a
    # run that is blowing up while its numbers are still finite (a too-high learning rate).
    spike_grad_factor: float = resumable(
        0.0, "Stop when the gradient norm (before clipping) exceeds this many times its median "
             "over the last spike_window healthy steps; 0 (the default) turns the check off: "
             "healthy runs have single-step gradient spikes far above the median that clipping "
             "absorbs (docs/commands.md: the divergence guard).", OFF_OR_ABOVE_1)
    spike_loss_factor: float = resumable(
        3.0, "Stop when the training loss exceeds this many times its median over the last "
             "spike_window healthy steps (a median below 0.5 counts as 0.5, so that near-zero "
             "losses do not stop on noise); 0 turns the check off.", OFF_OR_ABOVE_1)
    spike_window: int = resumable(50, "Healthy steps the running medians of the spike checks are "
                                      "taken over (the first step's values included).", at_least(1))
    eval_every: int = resumable(50, "Optimizer steps between evaluations (also at 0 and the end).",
                                at_least(1))
    eval_blocks: int = setting(16, "Held-out blocks per evaluation.", at_least(1))
    eval_batch_size: int = setting(8, "Sequences per evaluation forward.", at_least(1))
    log_every: int = resumable(1, "Optimizer steps between metrics.jsonl records.", at_least(1))
    seed: int = setting(0, "Seed of the batch order and initializations.", SEED)
    progress: bool = resumable(True, "Show a progress bar.")
    keep_checkpoint: bool = resumable(True, "Keep checkpoint/ after the final model is written.")
    strategy: Strategy = resumable("auto", "With several processes: fsdp (sharded student), ddp "
                                           "(replicated), hsdp (sharded inside a node, replicated "
                                           "across nodes: a 2-D mesh), auto (fsdp on the GPUs of "
                                           "one node, hsdp across nodes, ddp on CPU).")
    nproc_per_node: int = resumable(1, "> 1 outside torchrun: start torchrun with that many "
                                       "processes on this node.", at_least(1))
    nnodes: int = resumable(1, "> 1: this node joins the others through a c10d rendezvous at "
                               "rdzv_endpoint (every node runs the same command).", at_least(1))
    rdzv_endpoint: str | None = resumable(None, "host:port of the rendezvous store (on the first "
                                                "node), the same on every node.")
    hsdp_shard_size: int | None = resumable(None, "strategy hsdp: ranks per shard group (null: the "
                                                  "ranks of one node).", at_least(1))
    max_restarts: int = resumable(0, "Times the launcher restarts every rank after one fails "
                                     "(torchrun's --max-restarts); each restart resumes from the "
                                     "last checkpoint.", at_least(0))
    process_group_timeout_s: float = resumable(1800.0, "Seconds a collective waits for a missing "
                                                       "rank before failing.", POSITIVE)
    teacher_device: str | None = resumable(None, "The teacher's device (null: the student's).")
    teacher_cache: str | None = setting(
        None, "A teacher cache folder (python -m minitron.teacher_cache build): the KD loss reads "
              "the teacher's stored top-k log-probabilities instead of running the teacher, which "
              "is then not loaded (--teacher, if given, is only checked against the cache). "
              "Forward KL at temperature 1 only; see minitron/teacher_cache.py.")
    gpu_memory_gib: float | None = resumable(None, "Per-GPU memory the memory plan must fit (null: "
                                                   "the detected GPU's; no check without a GPU).",
                                             POSITIVE)

    def __post_init__(self) -> None:
        if isinstance(self.intermediate, (list, tuple)):  # lists from YAML / JSON
            self.intermediate = tuple(tuple(p) if isinstance(p, (list, tuple)) else p
                                      for p in self.intermediate)
        super().__post_init__()

    def check(self) -> None:
        if self.alpha == 1 and self.baseline is None:
            raise MinitronError("distill.alpha=1.0 is pure cross-entropy: no distillation is left;"
                                " use distill.baseline=ce, or 0 <= alpha < 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise MinitronError(f"distill.nnodes={self.nnodes} needs distill.rdzv_endpoint "
                                f"(host:port on the first node, the same on every node), e.g. "
                                f"--rdzv-endpoint node0:29500")
        check_world(self, self.nproc_per_node * self.nnodes,
                    "nproc_per_node" if self.nnodes == 1 else "nproc_per_node x nnodes")
        if self.baseline is not None and self.intermediate:
            raise MinitronError(f"distill.intermediate={[list(p) for p in self.intermediate]} "
                                f"needs a teacher; the '{self.baseline}' baseline trains without "
                                f"one: drop one of them")
        if self.teacher_cache is not None:
            self._check_cache()
        if self.tokens < self.tokens_per_step:
            raise MinitronError(
                f"distill.tokens={self.tokens} is less than one optimizer step (batch_size "
                f"{self.batch_size} x grad_accum {self.grad_accum} x block_size {self.block_size} "
                f"= {self.tokens_per_step} tokens); give tokens >= {self.tokens_per_step}")

    def _check_cache(self) -> None:
        """A teacher cache holds T = 1 top-k log-probabilities: enough for the forward KL at T = 1
        (see minitron/kernels/sparse_kl.py), not for what needs the teacher itself."""
        problems = [(name, why) for name, bad, why in (
            ("temperature", self.temperature != 1.0, "the cache stores T = 1 log-probabilities; "
             "softening needs the teacher's whole distribution (valid with a cache: 1.0)"),
            ("divergence", self.divergence != "kl", "only the forward KL is defined on the "
             "top-k + tail buckets (valid with a cache: kl)"),
            ("intermediate", bool(self.intermediate), "intermediate states need the teacher "
             "model (valid with a cache: [])"),
            ("baseline", self.baseline is not None, "a baseline trains without a teacher "
             "(valid with a cache: null)")) if bad]
        if problems:
            name, why = problems[0]
            raise MinitronError(f"distill.{name}={getattr(self, name)!r} cannot be used with "
                                f"distill.teacher_cache={self.teacher_cache!r}: {why}")

    @property
    def uses_cache(self) -> bool:
        return self.teacher_cache is not None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size

    @property
    def steps(self) -> int:
        return self.tokens // self.tokens_per_step

    @property
    def train_tokens(self) -> int:
        """The tokens the run trains on: whole optimizer steps of `tokens` (the rest is dropped)."""
        return self.steps * self.tokens_per_step

    @property
    def skip_blocks(self) -> int:
        return self.skip_tokens // self.block_size

    @property
    def blocks_read(self) -> int:
        """Train blocks the run opens: the skipped ones, then its own (one per sample)."""
        return self.skip_blocks + self.train_tokens // self.block_size

    @property
    def uses_teacher(self) -> bool:
        return self.baseline is None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["intermediate"] = [list(p) for p in self.intermediate]
        return d


def check_divisible(batch_size: int, world: int, name: str) -> None:
    if batch_size % world:
        raise MinitronError(
            f"batch_size={batch_size} does not split over {name}={world} processes: each process "
            f"takes batch_size / {world} sequences of every micro-batch; choose a batch_size that "
            f"is a multiple of {world}")


def check_world(config: DistillConfig, world: int, name: str) -> None:
    """Refuse a process count the batch does not split over."""
    if config.micro_batch_size is None:
        check_divisible(config.batch_size, world, name)
        return
    per_step = config.batch_size * config.grad_accum
    if per_step % (config.micro_batch_size * world):
        raise MinitronError(
            f"the global batch (batch_size {config.batch_size} x grad_accum {config.grad_accum} = "
            f"{per_step} sequences) does not split into micro_batch_size={config.micro_batch_size}"
            f" x {name}={world} processes; choose a micro_batch_size and process count whose "
            f"product divides {per_step}")


def check_correction(distill: DistillConfig, correction: TeacherCorrectionConfig) -> None:
    """The rule that ties the two sections: a baseline has no teacher to correct."""
    if distill.teacher_cache is not None and correction.tokens:
        raise MinitronError(f"teacher_correction.tokens={correction.tokens} fine-tunes the teacher, "
                            f"which distill.teacher_cache={distill.teacher_cache!r} replaces: build "
                            f"the cache from the corrected teacher instead, or drop one of them")
    if distill.baseline is not None and correction.tokens:
        raise MinitronError(f"teacher_correction.tokens={correction.tokens} corrects a teacher that "
                            f"the '{distill.baseline}' baseline does not use: drop one of them")


# ----------------------------------------------------------------------------- teacher cache
CacheDtype = Literal["float16", "float32"]
CacheSplit = Literal["train", "eval", "calibration"]


@dataclass
class CacheConfig(Section):
    """A teacher cache: the teacher's top-k log-probabilities per training token, computed once and
    read by any number of distillations (distill.teacher_cache); see minitron/teacher_cache.py."""

    SECTION: ClassVar[str] = "teacher_cache"

    k: int = setting(64, "Teacher tokens kept per position (the rest is one tail bucket); the "
                         "vocabulary size keeps all of them (the exact KL).", at_least(1))
    tokens: int = setting(1_000_000, "Training tokens to cache (whole blocks, from the start of "
                                     "the train split): at least the distillation's distill.tokens.",
                          at_least(2))
    block_size: int = setting(256, "Tokens per block: the distillation's distill.block_size.",
                              at_least(2))
    batch_size: int = setting(8, "Blocks per teacher forward.", at_least(1))
    split: CacheSplit = setting("train", "The data split: train (what distillation reads), or "
                                         "eval for held-out scoring without the teacher "
                                         "(minitron.teacher_cache.evaluate_from_cache).")
    seed: int = setting(0, "Block order of raw (not prepared) sources: the distillation's "
                           "distill.seed for the train split; 0 for the eval split as "
                           "distillation evaluates it.", SEED)
    dtype: CacheDtype = setting("float16", "Storage of the log-probabilities (float32 doubles "
                                           "their size; the indices are int32, the tail float32).")
    shard_tokens: int = setting(262_144, "Tokens per shard (whole blocks); each shard is written "
                                         "atomically and skipped when a rerun finds it.",
                                at_least(1))
    progress: bool = setting(True, "Show a progress bar (tokens/s, ETA).")


# ----------------------------------------------------------------------------- export and evaluate
Int8Scheme = Literal["blockwise", "dynamic", "static", "smoothquant", "none"]
INT8_SCHEMES: tuple[str, ...] = typing.get_args(Int8Scheme)
Int4Scheme = Literal["rtn", "hqq", "awq", "gptq", "awq_gptq", "none"]
INT4_SCHEMES: tuple[str, ...] = typing.get_args(Int4Scheme)
# 'auto' measures levels 0 and 4; YAML and `key=value` read a bare 4 as a number.
AccuracyLevel = Literal["auto", 0, 1, 2, 3, 4]
GgufChoice = Literal["none", "f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k", "all"]
# A Literal (so --help and recipes list the kinds); minitron.cpu's targets are the same names.
Int8Cpu = Literal["auto", "vnni", "no-vnni", "arm"]
CompressedChoice = Literal["none", "w8a8", "w4a16", "all"]
assert typing.get_args(Int8Cpu) == INT8_CPUS, "config.Int8Cpu and cpu.CPU_TARGETS disagree"
BLOCKWISE_MAX_BLOCK = 128


@dataclass(frozen=True)
class ExportConfig(Section):
    """Everything that shapes an export; stored in its manifest.json with the data settings.

    See minitron/export/ (its __init__) for the INT8 schemes and the validation rules."""

    SECTION: ClassVar[str] = "export"
    RENAMED: ClassVar[dict[str, tuple[str, str]]] = {
        "atol": ("fp32_rtol", "the FP32 graph's logit bound is now relative to the largest |logit|, "
                              "so that it holds at any depth and logit scale; the old absolute "
                              "1e-3 was 2.3e-5 of SmolLM2-135M's largest logit")}

    enabled: bool = setting(True, "Run this stage in a recipe.")
    int8: Int8Scheme = setting("blockwise", "INT8 scheme of the deployed model.onnx.")
    per_channel: bool = setting(False, "Per-channel weight scales (dynamic / static).")
    # One default for the recipe and the command (they were 32 and 16): 32 calibration blocks.
    int8_cpu: Int8Cpu = setting("auto", "The CPU kind the dynamic/static INT8 models are made "
                                        "for: 'auto' (this one) or a kind (minitron.cpu); it picks "
                                        "ONNX Runtime's activation/weight types and weight range.")
    int4: Int4Scheme = setting("none", "'rtn', 'hqq', 'awq' (activation-aware scales from "
                                       "the calibration statistics), 'gptq' (second-order "
                                       "rounding over the calibration X^T X) or 'awq_gptq' (both) "
                                       "deploys 4-bit MatMulNBits weights (embedding too) "
                                       "instead of INT8.")
    int4_head_bits: Literal[4, 8] = setting(4, "MatMulNBits bits of the LM head under "
                                               "int4=gptq|awq_gptq (8 keeps the tied "
                                               "head/embedding's output side finer).")
    accuracy_level: AccuracyLevel = setting(
        "auto", "MatMulNBits accuracy_level (blockwise INT8, INT4): 'auto' measures 0 (float "
                "activations) and 4 (int8 activations) and deploys the faster one that passes the "
                "gates; or 0..4.")
    gguf: GgufChoice = setting("none", "Also write GGUF for llama.cpp/ollama (every family): F16, "
                                       "Q8_0, or llama.cpp's k-quants Q4_K_M/Q5_K_M/Q6_K (optional "
                                       "extra minitron[gguf]), or all (the k-quants where that "
                                       "extra is installed); each file validated through "
                                       "transformers' GGUF loader (logits and text tokenization).")
    gguf_imatrix: bool = setting(True, "k-quants weigh rounding errors by the importance matrix "
                                       "(mean squared input activations from the calibration pass).")
    compressed: CompressedChoice = setting(
        "none", "Also write compressed-tensors checkpoints for vLLM (extra minitron[compressed]): "
                "compressed-w8a8/ (INT8 weights per channel, INT8 activations per token, "
                "SmoothQuant scales folded in) and/or compressed-w4a16/ (4-bit weights in groups "
                "of 128, or 64/32 where 128 does not divide the widths, AWQ scales folded in); "
                "each reloaded through transformers and measured.")
    # One default for the recipe and the command (they were 32 and 16): 32 calibration blocks.
    calib_samples: int = setting(32, "Calibration blocks for int8=static|smoothquant, "
                                     "int4=awq and compressed.", at_least(1))
    max_eval_tokens: int = setting(8192, "Validation reads at most this many tokens (blocks of at "
                                         "most 512, batch 1), whatever the model's context.",
                                   at_least(2))
    bnb: bool = setting(False, "Also measure bitsandbytes INT8 / NF4 loading (PyTorch side).")
    ppl_budget: float = setting(0.02, "Largest relative perplexity increase of the deployed INT8 "
                                      "model (0.02 = 2%).", NON_NEGATIVE)
    require_budget: bool = setting(
        True, "Refuse a quantized model that no variant keeps within export.ppl_budget and "
              "int8_min_top1. false: write the most accurate variant anyway, its report row marked "
              "outside the budget (the sweep measures every format so: its cost is the answer).")
    # Measured as the export measures it (its first 1024 validation tokens, ORT CPU vs PyTorch CPU):
    # 3.6e-7 on a 2-layer tiny Llama, 4.7e-7 on the 4-layer one; SmolLM2-135M cut to its first 2
    # layers 6.8e-7, to 10 layers 8.7e-7, whole (30 layers) 2.9e-6 (max |d| 1.3e-4 against a
    # largest logit of 43.9). Float32 rounding grows with depth and
    # with the reduction widths, ~sqrt(K): an 8B-class model (K = 4096 / 14336) should land near
    # 1e-5. 1e-4 leaves 35x over SmolLM2 and ~10x over that estimate, and sits 9x below the 8.9e-4
    # of one layer's down_proj scaled by 1.01 in the 4-layer model (whose top-1 stays 100%,
    # and whose absolute 5.6e-4 the old atol=1e-3 let through).
    fp32_rtol: float = setting(1e-4, "Largest |logit difference| of the FP32 graph vs PyTorch, "
                                      "relative to the largest |PyTorch logit| on the same tokens.",
                               NON_NEGATIVE)
    fp32_min_top1: float = setting(0.99, "Least top-1 agreement of the FP32 graph with PyTorch.",
                                   between(0, 1))
    int8_min_top1: float = setting(0.80, "Least top-1 agreement of INT8 with FP32.", between(0, 1))
    gen_tokens: int = setting(16, "Greedy tokens that must match PyTorch's.", at_least(1))
    keep_fp32: bool = setting(False, "Keep the FP32 graph as model_fp32.onnx.")
    compare: bool = setting(False, "Also measure every variant that is not a deployment "
                                   "candidate (a report for choosing).")
    speed: bool = setting(True, "Measure latency.")

    @property
    def levels(self) -> tuple[int, ...]:
        """The MatMulNBits accuracy levels to measure."""
        return (0, 4) if self.accuracy_level == "auto" else (int(self.accuracy_level),)

    def check(self) -> None:
        if self.per_channel and self.int8 == "blockwise":
            raise MinitronError("export.per_channel=True applies to int8 dynamic or static; "
                                f"blockwise already has one scale per block of at most "
                                f"{BLOCKWISE_MAX_BLOCK} weights")


@dataclass
class EvaluateConfig(Section):
    """Measuring a model: held-out perplexity, teacher agreement, parameters, size, latency."""

    SECTION: ClassVar[str] = "evaluate"

    enabled: bool = setting(True, "Run this stage in a recipe.")
    speed: bool = setting(True, "Measure prefill tokens/s and decode ms/token (batch 1).")
    batch_size: int = setting(8, "Sequences per forward (perplexity, agreement, task scoring).",
                              at_least(1))
    tasks: tuple[str, ...] = setting(
        (), "lm-eval tasks scored on every model, the deployed ONNX one included (extra: "
            "minitron[tasks]); minitron_words_and_code ships with minitron and runs offline. A "
            "list, [a,b], or a comma-separated a,b.",
        Rule("a list of task names", lambda v: isinstance(v, (list, tuple)) and all(
            isinstance(t, str) and t.strip() for t in v)))
    # lm-eval reads a limit below 1 as a fraction of the items: only whole counts here.
    limit: int | None = setting(None, "Items scored per task (null: all).", at_least(1))
    num_fewshot: int | None = setting(None, "Few-shot examples per item (null: the task's "
                                            "default).", at_least(0))

    def __post_init__(self) -> None:
        if isinstance(self.tasks, list):  # lists from YAML / JSON / the command line
            self.tasks = tuple(self.tasks)
        super().__post_init__()



# ----------------------------------------------------------------------------- sweep
def _gguf_formats() -> tuple[str, ...]:
    return tuple(f"gguf-{t}" for t in typing.get_args(GgufChoice) if t not in ("none", "all"))


# A sweep's deployment formats: each is one export of a budget's student (the export section's
# other settings kept), named as the export report names its variant's scheme.
SWEEP_FORMATS: tuple[str, ...] = ("fp32", *(f"int8-{s}" for s in INT8_SCHEMES[:-1]),
                                  *(f"int4-{s}" for s in INT4_SCHEMES[:-1]), *_gguf_formats())


def export_for_format(export: ExportConfig, fmt: str) -> ExportConfig:
    """The export settings that deploy format `fmt` (one of SWEEP_FORMATS) and nothing else: no
    comparison variants, no bitsandbytes rows, the FP32 graph kept only as the fp32 format, and
    written even outside the perplexity budget (the point records the verdict)."""
    kind, _, scheme = fmt.partition("-")
    base = dataclasses.replace(export, compare=False, bnb=False, keep_fp32=False, int8="none",
                               int4="none", gguf="none", per_channel=False, require_budget=False)
    if kind == "int8":
        return dataclasses.replace(base, int8=scheme, per_channel=export.per_channel and scheme in (
            "dynamic", "static"))
    if kind == "int4":
        return dataclasses.replace(base, int4=scheme)
    if kind == "gguf":  # written beside the FP32 graph; the GGUF file is the artifact
        return dataclasses.replace(base, gguf=scheme)
    return base


def _distinct_list(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, (list, tuple)) and len(v) > 0 and len(set(v)) == len(v)
                      and all(ok(x) for x in v))


@dataclass
class SweepConfig(Section):
    """The compression sweep (`python -m minitron.sweep RECIPE`, minitron/sweep.py): every
    parameter budget x every deployment format, each budget's student pruned from one importance
    pass by the budget rule (prune.target_params's) and distilled with the same tokens, each format
    exported and measured by the export stage; the report names the Pareto frontier."""

    SECTION: ClassVar[str] = "sweep"

    budgets: tuple[float, ...] = setting(
        (0.9, 0.75, 0.5), "Parameter budgets: fractions of the source (<= 1) or counts (> 1).",
        Rule("a non-empty list of distinct numbers > 0",
             _distinct_list(lambda x: _type_ok(float, x) and math.isfinite(x) and x > 0)))
    formats: tuple[str, ...] = setting(
        ("fp32", "int8-blockwise", "int4-rtn"), "Deployment formats, each one export per budget.",
        Rule("a non-empty list of distinct names from " + ", ".join(SWEEP_FORMATS),
             _distinct_list(lambda x: x in SWEEP_FORMATS)))
    teacher_cache: bool = setting(False, "Run the teacher once over the distillation's tokens "
                                         "into one teacher cache (the teacher_cache section's k "
                                         "and dtype) that every budget's distillation reads.")
    iterative: bool = setting(
        False, "Prune in steps (Model-Optimizer's advice for cuts beyond 50%): the budgets in turn, "
               "largest first, each student pruned from the previous budget's distilled student "
               "(its importance scored again) and distilled on the next distill.tokens of the "
               "train split, so the smallest has read len(budgets) x distill.tokens. The smallest "
               "budget's shape is the one-shot one; each larger one keeps at least the next's.")

    def __post_init__(self) -> None:
        for name in ("budgets", "formats"):  # lists from YAML / the command line
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        super().__post_init__()


SECTIONS: dict[str, type[Section]] = {
    cls.SECTION: cls for cls in (ModelConfig, DataConfig, ImportanceConfig, PruneConfig,
                                 SearchConfig, TeacherCorrectionConfig, DistillConfig,
                                 CacheConfig, ExportConfig, EvaluateConfig, SweepConfig)}
# What the stage commands take: the recipe's sections, and the data command's own.
COMMAND_SECTIONS: dict[str, type[Section]] = {**SECTIONS, PrepareConfig.SECTION: PrepareConfig}
