"""Trace a transformers causal LM into an ONNX graph with a KV cache, and describe it for ONNX
Runtime GenAI.

The graph comes from PyTorch's own exporter (`torch.onnx.export(..., dynamo=True)`): it traces the
model's transformers forward, so rotary variants (llama3, longrope, Gemma 3's per-layer-type
bases), soft-capping, sliding windows and any pruned shape (hidden_size != heads x head_dim,
grouped-query attention) are exported exactly as transformers computes them. No family table and no
fused attention kernel with its own shape rules sit in between.

Graph interface (what `genai_config.json` declares, and what `minitron.onnx_lm` and lm-eval's
`onnxruntime` model feed):
    inputs   input_ids [batch_size, sequence_length] int64
             attention_mask [batch_size, total_sequence_length] int64
             position_ids [batch_size, sequence_length] int64
             past_key_values.{i}.key / .value [batch_size, kv_heads, past_sequence_length, head_dim]
    outputs  logits [batch_size, sequence_length, vocab]
             present.{i}.key / .value [batch_size, kv_heads, total_sequence_length, head_dim]
The cache is the full history for every layer (sliding-window layers mask it, as transformers'
DynamicCache does without a config), so one past/present layout serves every family.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minitron.models import cache_kwarg, head_layout

GENAI_CONFIG = "genai_config.json"
# Graphs whose weights pass this size are written with external data (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 2**31 - 2**27
# Dimension names: lm-eval's onnxruntime model binds symbolic axes by these words (batch -> 1,
# past -> 0, total / sequence -> the prompt length).
BATCH, SEQUENCE, PAST, TOTAL = ("batch_size", "sequence_length", "past_sequence_length",
                                "total_sequence_length")


def cache_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The graph's past-input and present-output names, key then value per layer."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return past, [n.replace("past_key_values", "present") for n in past]


class CachedForward(nn.Module):
    """The model's forward with the KV cache as flat tensors in and out (the graph's interface)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.cache_arg = cache_kwarg(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()  # without a config: full-history layers, sliding ones masked
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True, **{self.cache_arg: cache})
        present = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


@contextlib.contextmanager
def traceable_rope(model: nn.Module):
    """Rotary modules whose frequencies depend on the positions, rewritten so the exporter keeps
    that dependence.

    transformers' longrope (Phi-3-128k, Phi-3.5-mini, Phi-4-mini) picks the long or the short
    factors per forward from max(position_ids) and writes the choice into its `inv_freq` buffer
    in place; torch.export drops that write, and the graph would keep the short factors past
    original_max_position_embeddings. Here the choice goes into the forward as a value (the same
    torch.where), and the module's own undecorated forward computes cos/sin from it. "dynamic" RoPE
    (recomputed by Python control flow on the sequence length) cannot be traced and is refused.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from minitron.common import MinitronError

    patched = []
    for module in model.modules():
        rope_type = getattr(module, "rope_type", None)
        kinds = set(rope_type.values()) if isinstance(rope_type, dict) else {rope_type}
        if any(isinstance(k, str) and "dynamic" in k for k in kinds):
            raise MinitronError(f"ONNX export: rope_type {rope_type!r} recomputes its frequencies "
                                "by Python control flow on the sequence length; it cannot be traced")
        if rope_type != "longrope" or not hasattr(module, "original_inv_freq"):
            continue
        original = module.config.rope_parameters["original_max_position_embeddings"]
        long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](module.config, None, seq_len=original + 1)
        plain = type(module).forward.__wrapped__  # the forward without dynamic_rope_update

        def forward(x, position_ids, module=module, plain=plain, original=original,
                    long_inv_freq=long_inv_freq.to(module.original_inv_freq)):
            inv_freq = torch.where(position_ids.max() + 1 > original, long_inv_freq,
                                   module.original_inv_freq)
            saved = module._buffers["inv_freq"]
            module._buffers["inv_freq"] = inv_freq
            try:
                return plain(module, x, position_ids)
            finally:
                module._buffers["inv_freq"] = saved

        module.forward = forward
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _example_inputs(config: Any) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: sizes distinct from each other and from 0 / 1, so that no axis is
    specialized to a constant (the exported graph is then checked at past length 0 and 1)."""
    hl = head_layout(config)
    batch, seq, past = 2, 3, 5
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = [torch.zeros(batch, hl.num_kv_heads, past, hl.head_dim)
             for _ in range(2 * config.num_hidden_layers)]
    return (ids, mask, positions, *cache)


def export_graph(model: nn.Module, path: Path, external_data: bool | None = None) -> Path:
    """Write `model` (float32, eval) as an ONNX graph with a KV cache to `path`; returns `path`.

    `external_data`: weights beside the graph in `<name>_data` (None: when they pass ~2 GB)."""
    from torch.export import Dim

    wrapper = CachedForward(model).eval()
    batch, seq, past, total = Dim(BATCH), Dim(SEQUENCE), Dim(PAST), Dim(TOTAL)
    cache_axes = tuple({0: batch, 2: past} for _ in range(2 * wrapper.num_layers))
    past_names, present_names = cache_names(wrapper.num_layers)
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    # The exporter prints its progress and warns about every traced transformers quirk; the graph is
    # checked against PyTorch right after (minitron.export), so neither says anything we act on.
    # optimize=False: onnxscript's pattern rewriter takes many minutes on a 30-layer graph of ~7k
    # nodes; ONNX Runtime's own basic optimizer does the folding that matters in seconds (below).
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), \
            traceable_rope(model), _quiet_logger("torch.onnx._internal.exporter._registration"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, _example_inputs(model.config), dynamo=True, optimize=False, verbose=False,
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, cache_axes))
        program.save(str(path), external_data=external_data)
    _fold_constants_(path, external_data)
    _finish_graph_(path)
    return path


@contextlib.contextmanager
def _quiet_logger(name: str):
    """A logger raised to ERROR for a while (the exporter's registry warns on every export that
    torchvision's operators are not installed; nothing here uses them)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fold_constants_(path: Path, external_data: bool) -> None:
    """ONNX Runtime's basic (portable: standard ONNX ops only) graph optimizations, saved in place:
    constant folding turns each `Transpose(weight)` into a weight initializer (what the quantizers
    look for) and drops the exporter's thousands of shape Constants. With tied embeddings the LM
    head becomes its own transposed copy of the embedding (a MatMul needs [hidden, vocab])."""
    import onnxruntime as ort

    raw_data = [f for f in path.parent.iterdir() if f.name.startswith(path.name) and f != path]
    folded = path.with_name("folded-" + path.name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    if external_data:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         path.name + "_data")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for f in raw_data:
        if f.name != path.name + "_data":
            f.unlink()
    folded.replace(path)


def _finish_graph_(path: Path) -> None:
    """Drop the exporter's per-node debug records (Python stack traces with this machine's paths:
    half the file of a small model) and give the present outputs' length axis its name (the exporter
    writes the expression `past_sequence_length + sequence_length`)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for node in proto.graph.node:
        del node.metadata_props[:]
    for out in proto.graph.output:
        if out.name.startswith("present."):
            out.type.tensor_type.shape.dim[2].dim_param = TOTAL
    onnx.save(proto, str(path))


# ----------------------------------------------------------------------------- ONNX Runtime GenAI
def genai_config(config: Any, tokenizer: Any, file_name: str, generation: Any = None) -> dict[str, Any]:
    """The `genai_config.json` that lets ONNX Runtime GenAI run the graph `file_name` (see the module
    docstring for its interface). Greedy decoding by default, up to the model's context."""
    hl = head_layout(config)
    layers = config.num_hidden_layers
    context = int(getattr(config, "max_position_embeddings", 0) or 2048)
    eos = getattr(generation, "eos_token_id", None) if generation is not None else None
    if eos is None:
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        eos[0] if isinstance(eos, list) else eos)
    bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
    return {
        "model": {
            "type": config.model_type,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "vocab_size": config.vocab_size,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": file_name,
                "head_size": hl.head_dim,
                "hidden_size": config.hidden_size,
                "num_attention_heads": hl.num_heads,
                "num_key_value_heads": hl.num_kv_heads,
                "num_hidden_layers": layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context,
            "min_length": 0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
            "repetition_penalty": 1.0, "length_penalty": 1.0, "diversity_penalty": 0.0,
            "no_repeat_ngram_size": 0, "early_stopping": True,
            # The graph concatenates the cache (it grows each step), so no shared fixed-size buffer.
            "past_present_share_buffer": False,
        },
    }


def write_genai_config(folder: Path, config: Any, tokenizer: Any, file_name: str,
                       generation: Any = None) -> Path:
    path = folder / GENAI_CONFIG
    path.write_text(json.dumps(genai_config(config, tokenizer, file_name, generation), indent=2) + "\n")
    return path


def set_genai_file(folder: Path, file_name: str) -> None:
    """Point an existing genai_config.json at another graph file of the folder."""
    path = folder / GENAI_CONFIG
    cfg = json.loads(path.read_text())
    cfg["model"]["decoder"]["filename"] = file_name
    path.write_text(json.dumps(cfg, indent=2) + "\n")
