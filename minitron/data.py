"""Text sources -> tokenized, packed blocks, in disjoint calibration / train / eval splits.

Every document lands in exactly one split, chosen by a stable hash of its key (a file's path
relative to its source, or a record's text), so splits never overlap and never move between runs
or machines. Within a split, documents are shuffled by `seed`, tokenized with an EOS after each,
concatenated and cut into fixed-length blocks; the tail shorter than a block is dropped. When
the tokenizer prepends a BOS token to text (Gemma, Llama 3, Mistral), every block is that BOS
followed by block_size - 1 stream tokens, as the model is run in use (`corpus.block_bos`: the one
rule every stage reads its blocks by).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from minitron.common import MinitronError, check_writable, run_cli
# The documents layer lives in minitron.corpus (shards.py builds on it too); its names are
# re-exported here, where the stages have always found them.
from minitron.corpus import (Document, SOURCES_HELP, SPLITS, batches, block_bos, describe_bos,  # noqa: F401
                             encode_chat, encode_documents, iter_documents, pack, parse_mixture,
                             split_documents, split_of, stdlib_root, token_stream, _SPLIT_EDGES)
from minitron.shards import Prepared, is_prepared, prepare

def load_blocks(
    tokenizer,
    split: str = "train",
    num_blocks: int | None = None,
    *,
    source: str = "stdlib",
    block_size: int = 256,
    seed: int = 0,
    text_field: str = "text",
    max_positions: int | None = None,
) -> torch.Tensor:
    """Token blocks [n, block_size] (int64) of one split; the same arguments give the same blocks.

    `num_blocks=None` packs the whole split. `max_positions` (the model's context length) refuses
    blocks the model cannot attend over. A prepared folder (`python -m minitron.data prepare`) as
    `source` reads the blocks from its shards; its document order was fixed by the `seed` it was
    prepared with, so `seed` applies to raw sources only. Blocks start with BOS exactly when the
    tokenizer adds one (`block_bos`).
    """
    if block_size < 2:
        raise MinitronError(f"block_size={block_size} is too small; it must be at least 2")
    if max_positions is not None and block_size > max_positions:
        raise MinitronError(
            f"block_size={block_size} is longer than the model's context ({max_positions} "
            f"positions); choose block_size <= {max_positions}"
        )
    if num_blocks is not None and num_blocks < 1:
        raise MinitronError(f"num_blocks={num_blocks} must be at least 1")
    if is_prepared(source):
        return _prepared_blocks(tokenizer, split, num_blocks, source, block_size)
    docs = split_documents(source, split, text_field)
    if not docs:
        raise MinitronError(
            f"the '{split}' split of data source '{source}' is empty (no non-empty documents); "
            f"give a source with more documents ({SOURCES_HELP})"
        )
    random.Random(seed).shuffle(docs)
    blocks = pack(token_stream(docs, tokenizer), block_size, num_blocks, bos=block_bos(tokenizer))
    if len(blocks) == 0:
        raise MinitronError(
            f"the '{split}' split of data source '{source}' has fewer than block_size={block_size} "
            f"tokens; give more text or a smaller block_size"
        )
    if num_blocks is not None and len(blocks) < num_blocks:
        print(f"[minitron] note: the '{split}' split of '{source}' holds only {len(blocks)} blocks "
              f"of {block_size} tokens ({num_blocks} asked for); using {len(blocks)}")
    return blocks


def block_rule(tokenizer) -> str:
    """The block rule `tokenizer` implies, in words, for the reports of every stage."""
    return describe_bos(block_bos(tokenizer), tokenizer)


def _prepared_blocks(tokenizer, split: str, num_blocks: int | None, source: str,
                     block_size: int) -> torch.Tensor:
    if split not in SPLITS:
        raise MinitronError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    prepared = Prepared(source)
    bos = block_bos(tokenizer)
    prepared.check_bos(bos)  # before the tokenizer hash, so a rule mismatch is named as one
    prepared.check_tokenizer(tokenizer)
    view = prepared.blocks(split, block_size, num_blocks, bos=bos)
    if len(view) == 0:
        raise MinitronError(
            f"the '{split}' split of prepared data '{source}' has fewer than block_size="
            f"{block_size} tokens; give more text or a smaller block_size")
    if num_blocks is not None and len(view) < num_blocks:
        print(f"[minitron] note: the '{split}' split of '{source}' holds only {len(view)} blocks "
              f"of {block_size} tokens ({num_blocks} asked for); using {len(view)}")
    return view.tensor()


def open_blocks(tokenizer, split: str, num_blocks: int | None, *, source: str, block_size: int,
                seed: int = 0, text_field: str = "text", max_positions: int | None = None):
    """Like `load_blocks`, but a prepared `source` gives a `BlockView` that reads rows from the
    shards on demand (training data at corpus scale), never the whole split in memory."""
    if not is_prepared(source):
        return load_blocks(tokenizer, split, num_blocks, source=source, block_size=block_size,
                           seed=seed, text_field=text_field, max_positions=max_positions)
    load_blocks(tokenizer, split, 1, source=source, block_size=block_size,
                max_positions=max_positions)  # the same checks and errors, on one block
    return Prepared(source).blocks(split, block_size, num_blocks, bos=block_bos(tokenizer))


# ----------------------------------------------------------------------------- CLI
# The command's settings: the prepare section, and whether a tokenizer folder's own code may run.
CLI_KEYS = {"prepare": None, "model": ("trust_remote_code",)}
USAGE = ("python -m minitron.data prepare SOURCE [SOURCE ...] --output DIR [--weights W ...] "
         "[--tokenizer M] [--shard I/N] [--merge] [prepare.key=value ...]")


def build_parser():
    from minitron import cli

    p = cli.stage_parser("python -m minitron.data prepare",
                         f"Tokenize a corpus once into memory-mapped shards + manifest.json. "
                         f"SOURCE: {SOURCES_HELP}; several with --weights make a weighted "
                         f"mixture.", CLI_KEYS)
    p.usage = USAGE  # the positional arguments are the sources, then the settings
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one per source: its share of the train split's tokens")
    p.add_argument("--output", required=True, help="folder for the shards and manifest.json")
    p.add_argument("--tokenizer", default="smollm2-135m",
                   help="model folder, hub id or 'smollm2-135m' whose tokenizer to use")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="one machine's part: tokenize chunks I, I+N, ... into DIR/.work only")
    p.add_argument("--merge", action="store_true",
                   help="after the N parts (their .work files in DIR/.work): write the shards "
                        "and manifest")
    return p


def _sources_and_settings(positional: list[str]) -> tuple[list[str], list[str]]:
    """The command's positional arguments: `section.key=value` settings, the rest sources."""
    import re

    setting = re.compile(r"^[a-z_]+\.[a-z_0-9]+=")
    return ([a for a in positional if not setting.match(a)],
            [a for a in positional if setting.match(a)])


def _part(text: str | None) -> tuple[int, int] | None:
    """--shard I/N as (I, N)."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise MinitronError(f"--shard {text} is invalid; valid: I/N, two integers with "
                            f"0 <= I < N") from None
    if not 0 <= i < n:
        raise MinitronError(f"--shard {text} is invalid; valid: I/N with 0 <= I < N")
    return i, n


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from minitron.models import resolve_model

    # A tokenizer folder needs no model config; anything else resolves like a model name.
    path = Path(name).expanduser()
    tokenizer_only = path.is_dir() and not (path / "config.json").exists()
    where = name if tokenizer_only else resolve_model(name, trust_remote_code, need_weights=False)
    try:
        # trust_remote_code is always given: None would make transformers ask on the terminal
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise MinitronError(f"--tokenizer {name}: could not load a tokenizer ({e})") from None


def check_source(source: str, text_field: str = "text", tokenizer=None,
                 where: str = "data source") -> None:
    """Refuse, before any work, a data source no stage could read: missing, unreadable, without
    a single non-empty document, a prepared folder of another format (or, given the model's
    `tokenizer`, another tokenizer), an unfinished preparation. Reads documents only until the
    first non-empty one; a hub dataset (hf:) is checked when it is streamed."""
    if is_prepared(source):
        prepared = Prepared(source)
        if tokenizer is not None:
            prepared.check_bos(block_bos(tokenizer))
            prepared.check_tokenizer(tokenizer)
        return
    parts = parse_mixture(source)
    if parts is not None:
        for part, _ in parts:
            check_source(part, text_field, tokenizer, where=f"{where} part")
        return
    if source.startswith("hf:"):
        return
    for doc in iter_documents(source, text_field):
        if doc.text.strip():
            return
    raise MinitronError(f"{where} '{source}' holds no non-empty documents; give a source with "
                        f"text ({SOURCES_HELP})")


def main(argv: list[str] | None = None) -> int:
    import sys

    from minitron import cli
    from minitron.common import format_table

    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not argv or argv[0] != "prepare":
        raise MinitronError(f"usage: {USAGE} (see prepare --help)")
    args = cli.parse(build_parser(), argv[1:])
    sources, args.overrides = _sources_and_settings(args.overrides)
    c = cli.configs(args)
    if not sources:
        raise MinitronError(f"no data source given; usage: {USAGE}")
    if args.weights is not None:
        bad = [w for w in args.weights if not (math.isfinite(w) and w > 0)]
        if bad:
            raise MinitronError(f"--weights {bad[0]} is invalid; valid: a number > 0")
    part = _part(args.shard)
    check_writable(args.output, "--output")
    source = sources[0] if len(sources) == 1 and not args.weights else None
    if source is None:
        weights = args.weights or []
        if len(weights) != len(sources):
            raise MinitronError(f"--weights {' '.join(map(str, weights)) or '(none)'}: give one "
                                f"weight per source ({len(sources)} sources)")
        source = list(zip(sources, weights))
    trust = c["model"].trust_remote_code
    manifest = prepare(source, args.output, load_tokenizer(args.tokenizer, trust), c["prepare"],
                       tokenizer_name=args.tokenizer, part=part, merge=args.merge)
    if "part" in manifest:
        i, n = manifest["part"]
        print(f"part {i}/{n} of {args.output}: {manifest['chunks']} chunks in .work "
              f"({manifest['tokens_tokenized']} tokens tokenized, {manifest['tokens_reused']} "
              f"reused); when all {n} parts are there: prepare ... --merge")
        return 0
    rows = [{"split": s, "documents": v["documents"], "tokens": v["tokens"],
             "shards": len(v["shards"])} for s, v in manifest["splits"].items()]
    print(format_table(rows))
    st = manifest["stats"]
    rate = st["tokens_tokenized"] / max(st["tokenize_s"], 1e-9)
    print(f"wrote {args.output} (fingerprint {manifest['fingerprint']}; tokenized "
          f"{st['tokens_tokenized']} tokens in {st['tokenize_s']:.1f}s = {rate:,.0f} tokens/s "
          f"with {st['workers']} workers)")
    return 0


if __name__ == "__main__":
    run_cli(main)
