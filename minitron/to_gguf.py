"""Write any family minitron prunes as GGUF for llama.cpp and ollama, and read it back.

Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3, pruned shapes included, through the
`gguf` package (llama.cpp's own writer). Tensor names, the rotary permutation of q/k (only for the
archs llama.cpp runs with interleaved-pair RoPE), Gemma's `1 + weight` norms, soft-capping, sliding
windows and rotary factors follow llama.cpp's converter (convert_hf_to_gguf.py), which is what its
loader expects. F16 and Q8_0 are encoded by `gguf.quants`; the k-quants (Q4_K_M, Q5_K_M, Q6_K) by
llama.cpp's own quantizer, in `minitron.gguf_quant`.

Geometry is written explicitly (`attention.key_length`, `rope.dimension_count`), so a model pruned in
width but not in heads (hidden_size != heads x head_dim) keeps it, where the arch allows it: llama.cpp
sizes Qwen2's and Phi-3's attention by the hidden size, so those two are refused in that shape.
What llama.cpp derives rather than reads is folded into the weights: Gemma's attention scale
(`query_pre_attn_scalar`, which llama.cpp takes from head_dim or, at 27B depth, hidden / heads).
The tokenizer's pre-tokenizer is named as llama.cpp names it (`minitron.gguf_vocab`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minitron.common import MinitronError
from minitron.models import head_layout, rope_parameters

FLOAT_TYPES = ("f16", "q8_0")
K_QUANT_TYPES = ("q4_k_m", "q5_k_m", "q6_k")
GGUF_TYPES = FLOAT_TYPES + K_QUANT_TYPES

_ATTN = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output"}
_MLP = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_QK_NORM = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_LLAMA = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", **_ATTN, **_MLP}
_GEMMA = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
          "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
          **_ATTN, **_MLP}
_PHI3 = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
         "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


@dataclass(frozen=True)
class GgufArch:
    """How llama.cpp holds one HF family."""

    name: str  # llama.cpp's arch
    layer: dict[str, str]  # HF module (relative to a decoder layer) -> llama.cpp tensor base name
    permute_qk: bool = False  # llama.cpp rotates interleaved pairs (LLAMA_ROPE_TYPE_NORM)
    q_is_hidden: bool = False  # llama.cpp sizes q / o by n_embd: needs heads x head_dim == hidden
    norm_shift: float = 0.0  # Gemma's norms multiply by (1 + weight): llama.cpp stores 1 + weight
    big_depth: int | None = None  # the depth llama.cpp takes for the 27B (its own attention scale)
    tied_only: bool = False  # llama.cpp reads no output.weight (the embedding is the head)


GGUF_ARCHS = {
    "LlamaForCausalLM": GgufArch("llama", _LLAMA, permute_qk=True),
    "MistralForCausalLM": GgufArch("llama", _LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": GgufArch("qwen2", _LLAMA, q_is_hidden=True),
    "Qwen3ForCausalLM": GgufArch("qwen3", {**_LLAMA, **_QK_NORM}),
    "Gemma2ForCausalLM": GgufArch("gemma2", _GEMMA, norm_shift=1.0, big_depth=46, tied_only=True),
    "Gemma3ForCausalLM": GgufArch("gemma3", {**_GEMMA, **_QK_NORM}, norm_shift=1.0, big_depth=62),
    "Phi3ForCausalLM": GgufArch("phi3", _PHI3, q_is_hidden=True),
}


def gguf_arch(config: Any) -> GgufArch:
    """The llama.cpp arch of a config, or a MinitronError naming what is supported and why not."""
    names = list(getattr(config, "architectures", None) or [])
    arch = next((GGUF_ARCHS[n] for n in names if n in GGUF_ARCHS), None)
    if arch is None:
        raise MinitronError(f"GGUF export supports {', '.join(GGUF_ARCHS)}; this model is {names}")
    hl = head_layout(config)
    if arch.q_is_hidden and hl.num_heads * hl.head_dim != config.hidden_size:
        raise MinitronError(
            f"GGUF export: llama.cpp's {arch.name} sizes attention by the hidden size, but this model "
            f"has num_attention_heads x head_dim = {hl.num_heads} x {hl.head_dim} != hidden_size "
            f"{config.hidden_size}; prune {names[0]} with hidden_size = heads x head_dim for GGUF")
    if arch.tied_only and not getattr(config, "tie_word_embeddings", True):
        raise MinitronError(f"GGUF export: llama.cpp's {arch.name} uses the token embedding as the "
                            f"output layer; this model has tie_word_embeddings=false")
    _rope_plan(config, arch)  # refuses rotary settings llama.cpp cannot take
    return arch


# ----------------------------------------------------------------------------- rotary
def _rope_plan(config: Any, arch: GgufArch) -> dict[str, Any]:
    """What llama.cpp needs of the rotary settings: base(s), rotary dims and extra tensors."""
    hl = head_layout(config)
    types = list(getattr(config, "layer_types", None) or ())
    nested = isinstance(getattr(config, "rope_parameters", None), dict) and any(
        t in config.rope_parameters for t in types)
    rope = rope_parameters(config, "full_attention" if nested else None)
    plan: dict[str, Any] = {"base": float(rope["rope_theta"]), "tensors": {}}
    if nested and "sliding_attention" in config.rope_parameters:
        local = rope_parameters(config, "sliding_attention")
        if local.get("rope_type", "default") != "default":
            raise MinitronError(f"GGUF export: sliding-layer rotary settings {local} are not written")
        plan["base_swa"] = float(local["rope_theta"])
    plan["dims"] = int(hl.head_dim * rope.get("partial_rotary_factor", 1.0))
    kind = rope.get("rope_type", "default")
    if kind == "llama3" and arch.name == "llama":
        plan["tensors"]["rope_freqs.weight"] = _llama3_factors(rope, plan["dims"])
    elif kind == "longrope" and arch.name == "phi3":
        plan.update(_longrope(config, rope, plan["dims"]))
    elif kind != "default":
        raise MinitronError(f"GGUF export: rope_type '{kind}' (rope_parameters {rope}) is not written "
                            f"for {arch.name}; supported: default, llama3 (Llama), longrope (Phi-3)")
    return plan


def _llama3_factors(rope: dict[str, Any], dims: int) -> np.ndarray:
    """Llama 3.1's per-frequency divisors, as llama.cpp's converter computes `rope_freqs`."""
    base, factor = float(rope["rope_theta"]), float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, dims, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (i / dims))
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _longrope(config: Any, rope: dict[str, Any], dims: int) -> dict[str, Any]:
    orig = int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
    long_f, short_f = rope.get("long_factor"), rope.get("short_factor")
    if not long_f or not short_f or len(long_f) != dims // 2 or len(short_f) != dims // 2:
        raise MinitronError(f"GGUF export: longrope needs long_factor and short_factor of {dims // 2} "
                            f"values each (rotary dims {dims}); got {rope}")
    scale = config.max_position_embeddings / orig
    attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    return {"orig_ctx": orig, "attn_factor": attn,
            "tensors": {"rope_factors_long.weight": np.asarray(long_f, np.float32),
                        "rope_factors_short.weight": np.asarray(short_f, np.float32)}}


# ----------------------------------------------------------------------------- tensors
def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (what its converter does)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def attention_fold(config: Any, arch: GgufArch) -> float:
    """The factor folded into Gemma's queries so llama.cpp's fixed attention scale gives the model's
    `query_pre_attn_scalar ** -0.5` (1.0 where they agree, and for every other family)."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if arch.norm_shift == 0.0 or scalar is None:
        return 1.0
    hl = head_layout(config)
    if config.num_hidden_layers == arch.big_depth:
        llama_cpp = 1 / math.sqrt(config.hidden_size // hl.num_heads)
    else:
        llama_cpp = 1 / math.sqrt(hl.head_dim)
    return (1 / math.sqrt(scalar)) / llama_cpp


def hf_to_gguf_names(config: Any) -> dict[str, str]:
    """HF linear-module name -> GGUF tensor name (weights), for the importance matrix."""
    arch = gguf_arch(config)
    out = {}
    for i in range(config.num_hidden_layers):
        for hf, name in arch.layer.items():
            if "norm" not in hf:
                out[f"model.layers.{i}.{hf}"] = f"blk.{i}.{name}.weight"
    if not config.tie_word_embeddings:
        out["lm_head"] = "output.weight"
    return out


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight llama.cpp reads, converted as its converter does.
    A weight this mapping does not know is an error, never silently dropped."""
    cfg = model.config
    arch = gguf_arch(cfg)
    hl = head_layout(cfg)
    fold = attention_fold(cfg, arch)
    q_norm = "self_attn.q_norm" in arch.layer
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    named: dict[str, np.ndarray] = {}
    for key, tensor in model.state_dict().items():
        if "rotary_emb" in key:
            continue
        w = tensor.detach().float().cpu().numpy()
        name = top.get(key) or _layer_name(key, arch)
        if name == "output.weight" and cfg.tie_word_embeddings:
            continue
        if arch.norm_shift and name.endswith("norm.weight"):
            w = w + arch.norm_shift
        # Gemma 2 has no q norm: the scale goes into the projection; Gemma 3's q norm would undo
        # that, so its gain (1 + weight, already shifted) carries it
        if fold != 1.0 and (".attn_q_norm." in name or (not q_norm and ".attn_q." in name)):
            w = w * fold
        if arch.permute_qk and ".attn_q." in name:
            w = _rope_permute(w, hl.num_heads)
        elif arch.permute_qk and ".attn_k." in name:
            w = _rope_permute(w, hl.num_kv_heads)
        named[name] = w
    out = [(n, named.pop(n)) for n in ("token_embd.weight",)]
    out += sorted(((n, w) for n, w in named.items() if n.startswith("blk.")),
                  key=lambda t: (int(t[0].split(".")[1]), t[0]))
    out += [(n, w) for n, w in named.items() if not n.startswith("blk.")]
    out += list(_rope_plan(cfg, arch)["tensors"].items())
    return out


def _layer_name(key: str, arch: GgufArch) -> str:
    parts = key.split(".")
    if parts[:2] != ["model", "layers"] or parts[-1] not in ("weight", "bias"):
        raise MinitronError(f"GGUF export: no llama.cpp name for the weight '{key}'")
    module = ".".join(parts[3:-1])
    if module not in arch.layer:
        raise MinitronError(f"GGUF export: no llama.cpp {arch.name} name for the weight '{key}'")
    return f"blk.{parts[2]}.{arch.layer[module]}.{parts[-1]}"


# ----------------------------------------------------------------------------- metadata
def _add_metadata(writer, config: Any, arch: GgufArch, name: str) -> None:
    hl = head_layout(config)
    plan = _rope_plan(config, arch)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(hl.num_heads)
    writer.add_head_count_kv(hl.num_kv_heads)
    writer.add_key_length(hl.head_dim)  # explicit: hidden_size may not be heads x head_dim
    writer.add_value_length(hl.head_dim)
    writer.add_rope_dimension_count(plan["dims"])
    writer.add_rope_freq_base(plan["base"])
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if "base_swa" in plan:
        writer.add_rope_freq_base_swa(plan["base_swa"])
    if "orig_ctx" in plan:
        writer.add_rope_scaling_orig_ctx_len(plan["orig_ctx"])
        writer.add_rope_scaling_attn_factors(plan["attn_factor"])
    if arch.name == "phi3":  # the converter's marker: 0 = no sliding window (Phi-4)
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
    if arch.name.startswith("gemma"):
        _add_gemma(writer, config)


def _add_gemma(writer, config: Any) -> None:
    """Soft-capping, and the sliding window with the exact per-layer pattern (llama.cpp otherwise
    assumes every 2nd / 6th layer is global)."""
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    types = list(getattr(config, "layer_types", None) or ())
    if getattr(config, "sliding_window", None) and "sliding_attention" in types:
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])


# ----------------------------------------------------------------------------- writing
_PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _safe_name(name: str, tokenizer) -> str:
    """general.name, except that llama.cpp's vocabulary loader looks up Phi-3's own special tokens
    by text for any model whose name contains "phi3" / "phi-3" and aborts when one is missing (a
    Phi-4-style vocabulary in a folder named phi3-...): such a name is written as "phi_3"."""
    lowered = name.lower()
    if ("phi3" in lowered or "phi-3" in lowered) and not all(
            t in tokenizer.get_vocab() for t in _PHI3_TOKENS):
        return lowered.replace("phi-3", "phi_3").replace("phi3", "phi_3")
    return name


def write_gguf(model, tokenizer, model_dir: str | os.PathLike, path: Path, qtype: str) -> Path:
    """Write `model` (a loaded HF model of a supported family) to `path` in F16 or Q8_0 (2-D weights;
    norms and rotary factors stay F32, as llama.cpp's converter keeps them). The k-quants start from
    this F16 file (`minitron.gguf_quant.quantize_gguf`)."""
    import gguf

    from minitron.gguf_vocab import add_tokenizer

    if qtype not in FLOAT_TYPES:
        raise MinitronError(f"GGUF type '{qtype}' is not written directly; valid: "
                            f"{', '.join(FLOAT_TYPES)} (k-quants: minitron.gguf_quant)")
    arch = gguf_arch(model.config)
    tmp = Path(path).with_name(Path(path).name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch.name)
    _add_metadata(writer, model.config, arch, _safe_name(Path(model_dir).name, tokenizer))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    add_tokenizer(writer, tokenizer, model_dir, model.config.vocab_size)
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    for name, w in gguf_tensors(model):
        if w.ndim == 1:
            writer.add_tensor(name, w.astype(np.float32))
        elif qtype == "q8_0" and w.shape[-1] % block == 0:
            q = gguf.quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:  # F16 (also Q8_0's fallback for rows that are not whole 32-value blocks)
            writer.add_tensor(name, w.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return Path(path)


# ----------------------------------------------------------------------------- reading back
def reference_config(config: Any):
    """The HF config the GGUF file computes: the source's, with Gemma's attention scale as llama.cpp
    applies it (the rest of query_pre_attn_scalar is folded into the weights). Mistral comes back
    as the Llama it is to llama.cpp (gguf-py has no "mistral" tensor map for transformers to use)."""
    if config.model_type == "mistral":
        from transformers import LlamaConfig

        cfg = LlamaConfig.from_dict({**config.to_dict(), "model_type": "llama",
                                     "architectures": ["LlamaForCausalLM"]})
        return cfg
    cfg = config.__class__.from_dict(config.to_dict())
    arch = gguf_arch(config)
    if attention_fold(config, arch) != 1.0:
        hl = head_layout(config)
        deep = config.num_hidden_layers == arch.big_depth
        cfg.query_pre_attn_scalar = config.hidden_size // hl.num_heads if deep else hl.head_dim
    return cfg


def load_gguf(path: Path, config: Any = None):
    """The GGUF file through transformers' own loader (tensors dequantized to fp32 and converted back
    by transformers' code). With `config` (see `reference_config`), transformers takes the geometry
    from it instead of the file's metadata, which its GGUF config mapping reads only in part for
    Qwen3, Gemma and Phi-3 (no key_length, soft-capping, sliding pattern or partial rotary)."""
    from transformers import AutoModelForCausalLM

    kw = {"config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(Path(path).parent, gguf_file=Path(path).name,
                                                dtype=torch.float32, trust_remote_code=False,
                                                **kw).eval()


def gguf_types(path: Path) -> dict[str, str]:
    """Tensor name -> GGML type name, read back with gguf's reader."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}
