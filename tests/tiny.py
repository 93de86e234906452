"""Tiny, real Hugging Face models and a real (small, trained-here) tokenizer for unit tests."""

from __future__ import annotations

import copy
import functools
import sysconfig
from pathlib import Path

import torch

VOCAB = 384


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    """A byte-level BPE with VOCAB entries, trained in a second on a few stdlib files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("json/decoder.py", "textwrap.py", "string.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   model_input_names=["input_ids", "attention_mask"])


@functools.lru_cache(maxsize=None)
def bos_tokenizer(adds_bos: bool = True):
    """Like `tiny_tokenizer`, with a `<bos>` token (id 1) that its post-processor prepends to
    every text, as Gemma's, Llama 3's and Mistral's tokenizers do; `adds_bos=False`: the same
    vocabulary, adding nothing (so the two encode text to the same ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("json/decoder.py", "textwrap.py", "string.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<bos>",
                                   model_input_names=["input_ids", "attention_mask"])


# What makes each newer family itself in a tiny model: Qwen3's head_dim independent of the hidden
# size; Gemma's soft-capping, query_pre_attn_scalar != head_dim and a sliding window shorter than
# the test sequences (so sliding and global layers differ); Gemma 3's own layer pattern and local
# RoPE base; Phi-3's partial rotary embedding (Phi-4-mini uses 0.75). Rotary settings are written
# as transformers 5 writes them: `rope_parameters`, per layer type for Gemma 3 (its global base
# is Gemma 3's default, 1e6).
FAMILY_OVERRIDES = {
    "qwen3": dict(head_dim=12),
    "gemma2": dict(query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
                   final_logit_softcapping=5.0, sliding_window=6, hidden_activation="gelu_pytorch_tanh",
                   initializer_range=0.1),
    "gemma3_text": dict(head_dim=12, query_pre_attn_scalar=10, sliding_window=6,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                     "sliding_attention"],
                        rope_parameters={
                            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
                        final_logit_softcapping=4.0, initializer_range=0.1),
    "phi3": dict(rope_parameters={"rope_type": "default", "rope_theta": 10_000.0,
                                  "partial_rotary_factor": 0.75}),
}
NEW_FAMILIES = tuple(FAMILY_OVERRIDES)


def tiny_config(family: str = "llama", **overrides):
    """A 4-layer GQA model of the given family (8 query heads in 2 KV groups, head_dim 8)."""
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig,
                              Phi3Config, Qwen2Config, Qwen3Config)

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config,
           "qwen3": Qwen3Config, "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig,
           "phi3": Phi3Config}[family]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
              tie_word_embeddings=False, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    # deep copies: configs normalize their rope_parameters dict in place
    kw.update(copy.deepcopy(FAMILY_OVERRIDES.get(family, {})))
    kw.update(copy.deepcopy(overrides))
    config = cls(**kw)
    config.architectures = [cls.__name__.replace("TextConfig", "Config").replace("Config", "ForCausalLM")]
    return config


def make_tiny_model(family: str = "llama", path: str | Path | None = None, seed: int = 0, **overrides):
    """A randomly initialised tiny model (fp32, eval mode); saved with the tokenizer if `path`."""
    from transformers import AutoModelForCausalLM

    from minitron.models import arch_of

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    attn = arch_of(config).attn_implementation(config)  # as load_model loads it
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             **({"attn_implementation": attn} if attn else {}))
    model.eval()
    if path is not None:
        model.save_pretrained(path, safe_serialization=True)
        tiny_tokenizer().save_pretrained(path)
    return model


def prune_inert_layers(model, calib_blocks: torch.Tensor, logits):
    """Make layers 1 and 2 of `model` inert (zero o_proj and down_proj: each returns its input),
    check both depth scores rank them lowest, and prune them away by block importance.
    Returns (the inert model's logits before pruning, the pruned model)."""
    from minitron.config import ImportanceConfig
    from minitron.importance import compute_scores
    from minitron.prune import prune

    for i in (1, 2):
        layer = model.model.layers[i]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    ref = logits(model)
    scores = compute_scores(model, calib_blocks, 4, ImportanceConfig(depth_method="lm_loss"))
    assert sorted(torch.argsort(scores.layers_bi)[:2].tolist()) == [1, 2]
    assert scores.layers_lm_loss[[1, 2]].abs().max() == 0
    pruned = prune(model, scores, {"num_hidden_layers": 2}, depth_method="block_importance")
    assert pruned.minitron_record["kept_layers"] == [0, 3]
    return ref, pruned
