"""Tiny, real Hugging Face models and a real (small, trained-here) tokenizer for unit tests."""

from __future__ import annotations

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


def tiny_config(family: str = "llama", **overrides):
    """A 4-layer GQA model of the given family (8 query heads in 2 KV groups, head_dim 8)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
              tie_word_embeddings=False, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    kw.update(overrides)
    config = cls(**kw)
    config.architectures = [cls.__name__.replace("Config", "ForCausalLM")]
    return config


def make_tiny_model(family: str = "llama", path: str | Path | None = None, seed: int = 0, **overrides):
    """A randomly initialised tiny model (fp32, eval mode); saved with the tokenizer if `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    model.eval()
    if path is not None:
        model.save_pretrained(path, safe_serialization=True)
        tiny_tokenizer().save_pretrained(path)
    return model
