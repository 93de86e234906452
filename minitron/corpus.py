"""Text sources -> documents -> token streams: the layer under both ways of reading data
(`minitron.data` packs blocks in memory, `minitron.shards` writes them to disk once).

Every document lands in exactly one split, chosen by a stable hash of its key (a file's path
relative to its source, or a record's text), so splits never overlap and never move between runs
or machines.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import torch

from minitron.common import MinitronError
from minitron.config import PrepareConfig

Split = Literal["train", "calibration", "eval"]
SPLITS: tuple[str, ...] = ("train", "calibration", "eval")
# Fractions of documents per split, by hash bucket: the prepare defaults (5% eval, 10%
# calibration: enough of the stdlib corpus, ~10% of ~8M tokens, for the papers' 1024 blocks at
# 256 tokens).
_SPLIT_EDGES = PrepareConfig().split_edges
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".yaml", ".yml", ".c", ".h", ".cpp",
                  ".js", ".ts", ".java", ".go", ".rs", ".html", ".tex", ".csv", ".toml"}
_SINGLE_FILE_CHUNK = 16_384  # characters: one big text file is split at paragraphs into documents
# characters: the Python documentation's sections are cut finer, so that its ~470k characters
# spread over the three splits (~120 documents rather than 79 sections)
_DOCS_CHUNK = 4_096
STDLIB, PYTHON_DOCS = "stdlib", "python-docs"
MIXTURE_SEP, WEIGHT_SEP = "+", "@"

SOURCES_HELP = ("'stdlib' (the Python standard library source, embedded), 'python-docs' (English: "
                "the Python language reference's prose, embedded), a text file, a folder, a glob, "
                "a .jsonl file (with text_field), 'hf:NAME' / a saved `datasets` folder, a folder "
                "made by `python -m minitron.data prepare`, or a mixture 'A + B' ('A@3 + B@1': "
                "shares 3:1 of the training tokens; equal without @)")


@dataclass(frozen=True)
class Document:
    key: str
    text: str
    messages: tuple[dict[str, str], ...] | None = None  # a conversation (chat JSONL); text is its JSON


def split_of(key: str, edges: dict[str, tuple[float, float]] | None = None) -> str:
    """The split a document key belongs to; stable across runs, machines and Python versions.

    `edges` (split -> [lo, hi) of the hash bucket) defaults to today's 5% eval, 10% calibration.
    """
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64
    for split, (lo, hi) in (edges or _SPLIT_EDGES).items():
        if lo <= bucket < hi:
            return split
    return "train"


# ----------------------------------------------------------------------------- sources
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_documents() -> Iterator[Document]:
    root = stdlib_root()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")):
            continue
        yield Document(rel, path.read_bytes().decode("utf-8", errors="replace"))


def _python_docs_documents() -> Iterator[Document]:
    """The Python language reference's sections as plain English text: `pydoc_data.topics`, which
    CPython ships for `help()` (PSF license), cut at paragraphs into ~4k-character documents."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without its documentation data
        raise MinitronError(f"data source '{PYTHON_DOCS}' needs the `pydoc_data` module of the "
                            f"standard library, which this Python lacks; valid sources: "
                            f"{SOURCES_HELP}") from None
    for name in sorted(topics):
        yield from _chunk_paragraphs(Document(f"{PYTHON_DOCS}/{name}", topics[name]), _DOCS_CHUNK)


def parse_mixture(source: str) -> list[tuple[str, float]] | None:
    """The (source, weight) parts of a mixture spec 'A + B' / 'A@3 + B@1' (weights: shares of the
    training tokens, 1 where not given); None for a single source (an existing path is one source
    even when its name holds a '+')."""
    if MIXTURE_SEP not in source or Path(source).expanduser().exists():
        return None
    parts = []
    for part in source.split(MIXTURE_SEP):
        name, at, weight = part.strip().rpartition(WEIGHT_SEP)
        if not at:  # no weight given
            name, weight = weight, "1"
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not name or not (math.isfinite(w) and w > 0):  # the rule shards.prepare keeps
            raise MinitronError(f"data source '{source}': part '{part.strip()}' is invalid; valid: "
                                f"SOURCE or SOURCE@WEIGHT with a weight > 0, parts joined by "
                                f"'{MIXTURE_SEP}'")
        parts.append((name, w))
    return parts


def _file_documents(paths: list[Path], base: Path) -> Iterator[Document]:
    for path in sorted(paths):
        raw = path.read_bytes()
        if b"\0" in raw[:4096]:  # binary
            continue
        rel = path.relative_to(base).as_posix() if base in path.parents else path.name
        yield Document(rel, raw.decode("utf-8", errors="replace"))


def _chunk_paragraphs(doc: Document, chunk: int = _SINGLE_FILE_CHUNK) -> Iterator[Document]:
    pieces, size, index = [], 0, 0
    for para in doc.text.split("\n\n"):
        pieces.append(para)
        size += len(para) + 2
        if size >= chunk:
            yield Document(f"{doc.key}#{index}", "\n\n".join(pieces))
            pieces, size, index = [], 0, index + 1
    if pieces:
        yield Document(f"{doc.key}#{index}", "\n\n".join(pieces))


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise MinitronError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if isinstance(record, dict) and text_field not in record and "messages" in record:
                messages = _check_messages(record["messages"], f"{path}:{line_no}")
                blob = json.dumps(messages, sort_keys=True)
                yield Document(hashlib.sha1(blob.encode()).hexdigest(), blob, messages)
                continue
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise MinitronError(
                    f"{path}:{line_no}: no field '{text_field}' (text_field); fields there: {keys}"
                )
            text = str(record[text_field])
            yield Document(hashlib.sha1(text.encode()).hexdigest(), text)


def _check_messages(messages: Any, where: str) -> tuple[dict[str, str], ...]:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        raise MinitronError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., "
                            f"\"content\": ...}} objects (strings); got {str(messages)[:80]!r}")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def encode_chat(tokenizer, messages: tuple[dict[str, str], ...]) -> tuple[list[int], list[int]]:
    """A conversation rendered with the tokenizer's chat template, and its loss mask (1 on the
    tokens of assistant replies, 0 on everything the model is prompted with).

    A reply's span starts after the generation prompt (`<|im_start|>assistant\\n` in ChatML)
    and runs to the end of the message's rendering (its end-of-turn marker included); spans come
    from rendering each prefix of the conversation, which the template must render as a prefix.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise MinitronError("a chat source ('messages' records) needs a tokenizer with a chat "
                            "template; this tokenizer has none")

    def render(msgs, prompt=False) -> list[int]:
        if not msgs and not prompt:
            return []
        # return_dict=False: transformers 5 returns a BatchEncoding by default, whose list is its keys
        return list(tokenizer.apply_chat_template(list(msgs), tokenize=True, return_dict=False,
                                                  add_generation_prompt=prompt))

    ids = render(messages)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head, upto = render(messages[:i], prompt=True), render(messages[:i + 1])
        if ids[:len(head)] != head or ids[:len(upto)] != upto:
            raise MinitronError("the tokenizer's chat template renders a conversation's beginning "
                                "differently from the whole conversation; the prompt tokens cannot "
                                "be told from the reply tokens")
        mask[len(head):len(upto)] = [1] * (len(upto) - len(head))
    return ids, mask


def _datasets(source: str):
    try:
        import datasets
    except ImportError:
        raise MinitronError(
            f"data source '{source}' needs the `datasets` package: pip install 'minitron[data]'"
        ) from None
    return datasets


def _check_column(ds, source: str, text_field: str) -> None:
    columns = ds.column_names or []
    if columns and text_field not in columns:
        raise MinitronError(
            f"dataset '{source}' has no column '{text_field}' (text_field); columns: {columns}"
        )


def open_stream(source: str, text_field: str):
    """The train split of an `hf:NAME[:CONFIG]` source as a streaming `datasets.IterableDataset`
    (nothing is downloaded whole or held in memory), checked to hold `text_field`."""
    name, _, config = source[3:].partition(":")
    ds = _datasets(source).load_dataset(name, config or None, split="train", streaming=True)
    _check_column(ds, source, text_field)
    return ds


def record_document(record: dict[str, Any], text_field: str) -> Document:
    """A `datasets` record as a document (keyed by its text's hash, as JSONL records are)."""
    if text_field not in record:  # a stream whose columns were not known in advance
        raise MinitronError(f"a record has no field '{text_field}' (text_field); its fields: "
                            f"{sorted(record)}")
    text = str(record[text_field])
    return Document(hashlib.sha1(text.encode()).hexdigest(), text)


def _hf_documents(source: str, text_field: str) -> Iterator[Document]:
    """A `datasets` source, record by record: `hf:NAME[:CONFIG]` streams, a saved dataset folder
    is memory-mapped Arrow read in batches."""
    if source.startswith("hf:"):
        ds = open_stream(source, text_field)
    else:
        datasets = _datasets(source)
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        _check_column(ds, source, text_field)
    for batch in ds.iter(batch_size=1000):
        for text in batch[text_field]:
            yield record_document({text_field: text}, text_field)


def iter_documents(source: str = "stdlib", text_field: str = "text") -> Iterator[Document]:
    """All documents of a source, in a fixed order, before splitting. A mixture is refused: read
    as one stream its weights would be lost; `minitron.shards.prepare` reads its parts one by one
    and orders the training split by the weights."""
    if parse_mixture(source) is not None:
        raise MinitronError(
            f"data source '{source}' is a mixture, which is read from prepared shards: run "
            f"`python -m minitron.data prepare '{source}' --output DIR` and give DIR as the source "
            f"(a recipe's data stage does this itself)")
    if source == STDLIB:
        yield from _stdlib_documents()
        return
    if source == PYTHON_DOCS:
        yield from _python_docs_documents()
        return
    if source.startswith("hf:"):
        yield from _hf_documents(source, text_field)
        return
    path = Path(source).expanduser()
    if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
        yield from _hf_documents(str(path), text_field)
    elif path.is_dir():
        _refuse_unfinished_preparation(path)
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES]
        yield from _file_documents(files, path)
    elif path.is_file() and path.suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field)
    elif path.is_file():
        for doc in _file_documents([path], path.parent):
            yield from _chunk_paragraphs(doc)
    elif glob.has_magic(source):
        files = [Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file()]
        if not files:
            raise MinitronError(f"data source glob '{source}' matches no files")
        yield from _file_documents(files, Path(glob.escape(source).split("*")[0]).parent)
    else:
        raise MinitronError(f"data source '{source}' not found; valid sources: {SOURCES_HELP}")


def _refuse_unfinished_preparation(path: Path) -> None:
    """A folder that `minitron.data prepare` began but did not finish (its manifest is written
    last) holds token shards, not text: reading its few .json files as a corpus would be wrong."""
    if (path / ".work").is_dir() or any(path.glob("*-[0-9][0-9][0-9][0-9][0-9].bin")):
        raise MinitronError(
            f"data source '{path}' is an unfinished prepared folder (token shards or .work/, but "
            f"no manifest.json): finish it by running the same `python -m minitron.data prepare "
            f"... --output {path}` again, or give the raw text source")


def split_documents(source: str, split: str, text_field: str = "text") -> list[Document]:
    if split not in SPLITS:
        raise MinitronError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    return [d for d in iter_documents(source, text_field) if split_of(d.key) == split and d.text]


# ----------------------------------------------------------------------------- packing
def encode_documents(docs: Iterable[Document], tokenizer, batch: int = 64
                     ) -> Iterator[tuple[list[int], list[int] | None]]:
    """(token ids + EOS, loss mask or None) per document, texts tokenized `batch` at a time;
    conversations rendered with the chat template (their mask: 1 on reply tokens, 0 on EOS)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MinitronError("the tokenizer has no EOS token; documents cannot be separated")
    docs = list(docs)
    for i in range(0, len(docs), batch):
        chunk = docs[i:i + batch]
        plain = [d.text for d in chunk if d.messages is None]
        encoded = iter(tokenizer(plain, add_special_tokens=False)["input_ids"] if plain else [])
        for doc in chunk:
            if doc.messages is None:
                yield next(encoded) + [eos], None
            else:
                ids, mask = encode_chat(tokenizer, doc.messages)
                yield ids + [eos], mask + [0]


def token_stream(docs: Iterable[Document], tokenizer, batch: int = 64) -> Iterator[list[int]]:
    """Token ids of each document followed by EOS, tokenized `batch` documents at a time."""
    for ids, _ in encode_documents(docs, tokenizer, batch):
        yield ids


# ----------------------------------------------------------------------------- blocks
_BOS_PROBE = "Blocks as the model expects them."


def block_bos(tokenizer) -> int | None:
    """The token every block starts with: the tokenizer's BOS id when encoding plain text prepends
    it (`add_bos_token`, or a post-processor that adds one: Llama 2/3, Mistral, Gemma), else None
    (Qwen, SmolLM2, Phi-3: blocks are cut from the stream as they are).

    The one rule of block layout, asked of the tokenizer itself rather than of a list of families,
    so a checkpoint whose tokenizer was changed (BOS switched on or off) is read as it will be run.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    special = tokenizer(_BOS_PROBE, add_special_tokens=True)["input_ids"]
    plain = tokenizer(_BOS_PROBE, add_special_tokens=False)["input_ids"]
    return int(bos) if special[:1] == [bos] and special[1:len(plain) + 1] == plain else None


def describe_bos(bos: int | None, tokenizer=None) -> str:
    """The rule in words, for reports and errors: "BOS '<s>' (id 1) + block_size - 1 stream tokens";
    given only a tokenizer (bos=None), the rule that tokenizer implies."""
    if bos is None:
        return "no BOS (blocks cut from the stream)"
    name = tokenizer.convert_ids_to_tokens(bos) if tokenizer is not None else None
    return f"BOS {name!r} (id {bos}) + block_size - 1 stream tokens" if name else \
        f"BOS (id {bos}) + block_size - 1 stream tokens"


def pack(streams: Iterable[list[int]], block_size: int, num_blocks: int | None = None,
         bos: int | None = None) -> torch.Tensor:
    """Concatenate token lists and cut them into [n, block_size] blocks; the short tail is dropped.

    With `bos` (see `block_bos`) each block is BOS followed by the next block_size - 1 tokens of
    the stream, so every block predicts block_size - 1 stream tokens under either rule.
    """
    lead = [] if bos is None else [bos]
    body = block_size - len(lead)
    blocks, buf = [], []
    for ids in streams:
        buf.extend(ids)
        while len(buf) >= body:
            blocks.append(lead + buf[:body])
            buf = buf[body:]
            if num_blocks is not None and len(blocks) >= num_blocks:
                return torch.tensor(blocks, dtype=torch.long)
    return torch.tensor(blocks, dtype=torch.long).reshape(-1, block_size)


def batches(blocks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of `batch_size` blocks (the last may be shorter)."""
    for i in range(0, len(blocks), batch_size):
        yield blocks[i:i + batch_size]
