"""Write a Llama-family checkpoint as GGUF (F16 or Q8_0) for llama.cpp and ollama, and check it.

Through the `gguf` package (llama.cpp's own writer and quantizer). Tensor names, the rotary
permutation of q/k and the metadata keys follow llama.cpp's converter; `head_dim` is written
explicitly (`rope.dimension_count`, `attention.key_length` / `value_length`), so a model pruned in
width but not in heads (hidden_size != heads x head_dim) keeps its geometry. The check loads the
file back with transformers' own GGUF loader, an implementation independent of this writer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minitron.common import MinitronError
from minitron.models import head_layout, rope_parameters

GGUF_TYPES = ("f16", "q8_0")
GGUF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
# HF module name -> llama.cpp tensor name (per layer)
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_arch(config: Any) -> str:
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in GGUF_ARCHS:
            return GGUF_ARCHS[name]
    raise MinitronError(f"GGUF export supports {', '.join(GGUF_ARCHS)}; this model is {names}")


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (what its converter does)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tensors(model) -> list[tuple[str, np.ndarray]]:
    cfg = model.config
    hl = head_layout(cfg)
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    out = [("token_embd.weight", state["model.embed_tokens.weight"])]
    for i in range(cfg.num_hidden_layers):
        for hf, name in LAYER_TENSORS.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if name == "attn_q":
                w = _rope_permute(w, hl.num_heads)
            elif name == "attn_k":
                w = _rope_permute(w, hl.num_kv_heads)
            out.append((f"blk.{i}.{name}.weight", w))
    out.append(("output_norm.weight", state["model.norm.weight"]))
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", state["lm_head.weight"]))
    return out


def _add_metadata(writer, model, arch: str, name: str) -> None:
    cfg = model.config
    hl = head_layout(cfg)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(hl.num_heads)
    writer.add_head_count_kv(hl.num_kv_heads)
    writer.add_key_length(hl.head_dim)  # explicit: hidden_size may not be heads x head_dim
    writer.add_value_length(hl.head_dim)
    # transformers 5 keeps rope_theta and the scaling inside rope_parameters (config.rope_theta is
    # gone: reading it would silently write the default base 10000).
    rope = rope_parameters(cfg)
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1) != 1:
        raise MinitronError(f"GGUF export: rotary settings {rope} (rope_parameters) are not "
                            f"written by minitron yet; only plain RoPE (rope_type 'default')")
    writer.add_rope_dimension_count(hl.head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)


def _add_tokenizer(writer, tokenizer, model_dir: str | os.PathLike, vocab_size: int) -> None:
    """A byte-level BPE ('gpt2' in llama.cpp's terms): tokens, types, merges, special ids."""
    import gguf

    if not getattr(tokenizer, "is_fast", False):
        raise MinitronError("GGUF export needs a fast (tokenizer.json) BPE tokenizer")
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise MinitronError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')}")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special
                     else gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)


def write_gguf(model, tokenizer, model_dir: str | os.PathLike, path: Path, qtype: str) -> Path:
    """Write `model` (a loaded HF Llama/Mistral) to `path` with 2-D weights in `qtype`."""
    import gguf

    if qtype not in GGUF_TYPES:
        raise MinitronError(f"GGUF type '{qtype}' is not supported; valid: {', '.join(GGUF_TYPES)}")
    arch = gguf_arch(model.config)
    writer = gguf.GGUFWriter(str(path), arch)
    _add_metadata(writer, model, arch, Path(model_dir).name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    _add_tokenizer(writer, tokenizer, model_dir, model.config.vocab_size)
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    for name, w in _tensors(model):
        if w.ndim == 1:  # norms stay F32, as llama.cpp's converter keeps them
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
    return path


def load_gguf(path: Path):
    """The GGUF file through transformers' own loader (dequantized to fp32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32, trust_remote_code=False).eval()
