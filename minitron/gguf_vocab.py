"""The tokenizer of a GGUF file, with the pre-tokenizer named the way llama.cpp names it.

llama.cpp splits text before BPE with one of its own built-in regex sets, chosen by the string
`tokenizer.ggml.pre`; a wrong name tokenizes text differently from the source tokenizer (Llama 3
splits digits in threes, Qwen2 one by one, GPT-2 not at all) while ids fed straight in still match.
llama.cpp's converter picks the name by hashing the source tokenizer's encoding of a fixed text
(`get_vocab_base_pre`); we do the same for the tokenizers of the families minitron prunes, and for a
tokenizer not in that list (a custom or retrained vocabulary) recognise its pre-tokenizer by its
structure in tokenizer.json. One matching neither is refused with what was found.
"""

from __future__ import annotations

import json
import os
from hashlib import sha256
from typing import Any

from minitron.common import MinitronError

# The text llama.cpp's convert_hf_to_gguf.py hashes (its `chktxt`), verbatim.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of str(tokenizer.encode(CHECK_TEXT)) -> llama.cpp's name, for the tokenizers of the
# families minitron prunes (values from llama.cpp's converter, where each hash names its model).
KNOWN_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3 / 3.1
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral NeMo
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / 2 / 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# The split regexes of the pre-tokenizers llama.cpp implements, as tokenizer.json writes them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def check_hash(tokenizer) -> str:
    return sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer (see the module docstring)."""
    digest = check_hash(tokenizer)
    if digest in KNOWN_HASHES:
        return KNOWN_HASHES[digest]
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    name = _by_structure(pre)
    if name is None:
        raise MinitronError(
            f"GGUF export: unknown pre-tokenizer (llama.cpp check hash {digest}; tokenizer.json "
            f"pre_tokenizer {json.dumps(pre)[:300]}); llama.cpp would split text differently from "
            f"this tokenizer. Known: the tokenizers of {', '.join(sorted(set(KNOWN_HASHES.values())))}, "
            f"or a byte-level BPE whose pre-tokenizer is GPT-2's, Llama 3's or Qwen2's")
    return name


def _by_structure(pre: dict[str, Any]) -> str | None:
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True):
        return None
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    return SPLITS.get((split.get("pattern") or {}).get("Regex"))


def _is_byte_level(spec: dict[str, Any]) -> bool:
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    return (model.get("type") == "BPE" and not model.get("byte_fallback")
            and decoder.get("type") == "ByteLevel")


def add_tokenizer(writer, tokenizer, model_dir: str | os.PathLike, vocab_size: int) -> str:
    """A byte-level BPE ('gpt2' in llama.cpp's terms): tokens, types, merges, special ids and the
    pre-tokenizer's name (returned). SentencePiece-style vocabularies (Gemma's, Llama 2's, Phi-3's
    original tokenizers) are refused: minitron does not write their scores yet."""
    import gguf

    if not getattr(tokenizer, "is_fast", False):
        raise MinitronError("GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if not _is_byte_level(spec):
        raise MinitronError(
            f"GGUF export writes byte-level BPE tokenizers; this one is {spec.get('model', {}).get('type')} "
            f"with decoder {(spec.get('decoder') or {}).get('type')} (a SentencePiece-style vocabulary, "
            f"as Gemma's and Phi-3's originals, is not written by minitron yet)")
    pre = pre_tokenizer_name(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if not t.special}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special
                     else gguf.TokenType.USER_DEFINED if i in added
                     else gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)
    return pre


def gguf_tokenizer(path: os.PathLike):
    """The GGUF file's tokenizer as transformers' GGUF loader builds it (its own implementation)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path).parent, gguf_file=Path(path).name)


def text_mismatch(source, path: os.PathLike, texts: list[str]) -> str | None:
    """The first text whose ids differ between the source tokenizer and the GGUF file's tokenizer
    (as transformers' GGUF loader reads it), or None."""
    back = gguf_tokenizer(path)
    for text in texts:
        a = source.encode(text, add_special_tokens=False)
        b = back.encode(text, add_special_tokens=False)
        if a != b:
            return f"{text[:40]!r}: source {a[:12]}... vs GGUF {b[:12]}..."
    return None
