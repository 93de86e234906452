"""Tokenized corpora on disk: `prepare` tokenizes a source once into memory-mapped shards plus a
manifest; `Prepared` reads blocks from them by index, so no stage holds the corpus in memory.

Layout of a prepared folder (the nanoGPT `train.bin` idea, with splits and fingerprints):

    manifest.json            tokenizer hash and BOS rule, source fingerprint, split edges, seed,
                             counts, shards
    train-00000.bin ...      the split's packed token stream, uint16 (vocab <= 65536) or uint32
    train-00000.mask ...     (chat sources) uint8 per token: 1 = the loss counts this token

Each split's stream is what `minitron.data.load_blocks` builds in memory: the split's documents
(chosen by the same key hash), shuffled by `seed`, each followed by EOS, concatenated. Block i of
size B is tokens [i*B, (i+1)*B) of that stream, so any block size reads the same folder; under
the BOS rule (a tokenizer that prepends BOS) it is BOS + tokens [i*(B-1), (i+1)*(B-1)).

Preparing runs in two passes, both resumable. Pass 1 tokenizes chunks of documents in parallel
worker processes, in source order; each chunk's files land atomically in `.work/` with a marker
written last. Pass 2 writes the shards in shuffled document order (each shard atomically, by
rename), then the manifest (the commit), then removes `.work/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from minitron.common import MinitronError, read_exactly, write_json_atomic
from minitron.config import PrepareConfig

MANIFEST = "manifest.json"
FORMAT = 1
DEFAULT_CHUNK_CHARS = 4_000_000    # characters of text per tokenizing task
_TOKENIZE_BATCH = 64               # documents per tokenizer call (as data.token_stream)


# ----------------------------------------------------------------------------- fingerprints
def tokenizer_hash(tokenizer) -> str:
    """A content hash of the tokenizer: vocabulary, merges, normalizer and the EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    chat = getattr(tokenizer, "chat_template", None) or ""
    blob = f"{text}\0{tokenizer.eos_token_id}\0{chat}".encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------- reading
class TokenStream:
    """One split's token stream (and loss mask, when stored) over its memory-mapped shards."""

    def __init__(self, folder: Path, split: str, info: dict[str, Any], dtype: np.dtype):
        self.split = split
        self.tokens = int(info["tokens"])
        self.shard_tokens = int(info["shard_tokens"])
        names = [s["file"] for s in info["shards"]]
        self._shards = [np.memmap(folder / n, dtype=dtype, mode="r") for n in names]
        self.has_mask = bool(info.get("mask"))
        self._masks = ([np.memmap(folder / Path(n).with_suffix(".mask"), dtype=np.uint8, mode="r")
                        for n in names] if self.has_mask else [])

    def read(self, start: int, length: int, mask: bool = False) -> np.ndarray:
        """Tokens [start, start + length) (or their mask) as one array, across shard edges."""
        parts, end = [], start + length
        if start < 0 or end > self.tokens:
            raise IndexError(f"tokens [{start}, {end}) outside the '{self.split}' split "
                             f"({self.tokens} tokens)")
        source = self._masks if mask else self._shards
        while start < end:
            k, off = divmod(start, self.shard_tokens)
            take = min(end - start, self.shard_tokens - off)
            parts.append(source[k][off:off + take])
            start += take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class BlockView:
    """Blocks [n, block_size] of one split, read from the shards on indexing (int64 tensors).

    Quacks like the 2-D LongTensor the stages used to receive: `len`, `shape`, `ndim`, `size()`,
    and `view[rows]` with an int, a slice, a list or a tensor of indices. With `bos` every row is
    BOS followed by block_size - 1 stream tokens (`minitron.corpus.pack`'s rule, read from disk).
    """

    def __init__(self, stream: TokenStream, block_size: int, num_blocks: int, fingerprint: str,
                 vocab_size: int, bos: int | None = None):
        self.stream, self.block_size, self.num_blocks = stream, block_size, num_blocks
        self.fingerprint, self.vocab_size = fingerprint, vocab_size  # every id < vocab_size
        self.bos = bos
        self.ndim = 2

    def __len__(self) -> int:
        return self.num_blocks

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_blocks, self.block_size)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def has_mask(self) -> bool:
        return self.stream.has_mask

    def _rows(self, index) -> list[int]:
        if isinstance(index, slice):
            return list(range(*index.indices(self.num_blocks)))
        if isinstance(index, int):
            return [index]
        rows = [int(i) for i in (index.tolist() if hasattr(index, "tolist") else index)]
        for r in rows:
            if not 0 <= r < self.num_blocks:
                raise IndexError(f"block {r} outside 0..{self.num_blocks - 1}")
        return rows

    def _gather(self, index, mask: bool):
        import torch

        rows = self._rows(index)
        lead = int(self.bos is not None)
        body = self.block_size - lead
        out = np.empty((len(rows), self.block_size), dtype=np.int64 if not mask else np.bool_)
        if lead:  # BOS is never a target: its mask is False
            out[:, 0] = False if mask else self.bos
        for i, r in enumerate(rows):
            out[i, lead:] = self.stream.read(r * body, body, mask=mask)
        t = torch.from_numpy(out)
        return t[0] if isinstance(index, int) else t

    def __getitem__(self, index):
        return self._gather(index, mask=False)

    def mask(self, index):
        """The loss mask of the same rows (bool; True = counts); all True without a stored mask."""
        if not self.has_mask:
            import torch

            ids = self[index]
            return torch.ones(ids.shape, dtype=torch.bool)
        return self._gather(index, mask=True)

    def tensor(self):
        """All blocks as one LongTensor (for the small splits: calibration, evaluation)."""
        return self[:]


class Prepared:
    """A prepared folder: its manifest and its splits."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.exists():
            raise MinitronError(f"{self.folder} is not a prepared data folder (no {MANIFEST}); "
                                f"make one with: python -m minitron.data prepare SOURCE --output DIR")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise MinitronError(f"{path}: format {self.manifest.get('format')!r}; this minitron "
                                f"reads format {FORMAT}: prepare the folder again")
        self.dtype = np.dtype(self.manifest["dtype"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def check_tokenizer(self, tokenizer) -> None:
        want, have = self.manifest["tokenizer"]["hash"], tokenizer_hash(tokenizer)
        if want != have:
            raise MinitronError(
                f"data folder {self.folder} was tokenized with another tokenizer (hash {want}, "
                f"from '{self.manifest['tokenizer'].get('name')}') than the model's (hash {have}); "
                f"prepare it again with this model's tokenizer (--tokenizer)")

    def stream(self, split: str) -> TokenStream:
        if split not in self.manifest["splits"]:
            raise MinitronError(f"unknown split '{split}'; valid: {', '.join(self.manifest['splits'])}")
        return TokenStream(self.folder, split, self.manifest["splits"][split], self.dtype)

    def check_bos(self, bos: int | None) -> None:
        """Refuse to read blocks by another BOS rule than the one this folder was prepared for.

        The shards hold the stream either way; the rule is fixed with the tokenizer, and a run
        reading by the other one (a tokenizer with BOS switched on or off, which a vocabulary
        hash of a SentencePiece tokenizer does not see) would train and score on other blocks
        than those its teacher cache and reports name. Folders prepared before the rule was
        recorded say nothing and are read by the run's rule.
        """
        from minitron.corpus import describe_bos

        info = self.manifest["tokenizer"]
        if "block_bos" not in info or info["block_bos"] == bos:
            return
        raise MinitronError(
            f"prepared data {self.folder} was prepared for blocks led by "
            f"{describe_bos(info['block_bos'])}; this run's tokenizer reads blocks as "
            f"{describe_bos(bos)}: prepare the data again with this model's tokenizer "
            f"(python -m minitron.data prepare SOURCE --tokenizer MODEL)")

    def blocks(self, split: str, block_size: int, num_blocks: int | None = None,
               bos: int | None = None) -> BlockView:
        """The first `num_blocks` (all when None) blocks of `block_size` tokens of a split; with
        `bos` (the tokenizer's rule, `minitron.corpus.block_bos`) each is BOS + block_size - 1
        stream tokens."""
        self.check_bos(bos)
        stream = self.stream(split)
        n = stream.tokens // (block_size - (bos is not None))
        if num_blocks is not None:
            n = min(n, num_blocks)
        fp = f"{self.fingerprint}:{split}:{block_size}:{n}" + ("" if bos is None else f":bos{bos}")
        return BlockView(stream, block_size, n, fp, self.manifest["tokenizer"]["vocab_size"], bos)


def is_prepared(source: str | os.PathLike) -> bool:
    return (Path(str(source)).expanduser() / MANIFEST).is_file()


# ----------------------------------------------------------------------------- pass 1: tokenize
_WORKER_TOKENIZER = None


def _init_worker(tokenizer_blob: bytes) -> None:
    global _WORKER_TOKENIZER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER_TOKENIZER = pickle.loads(tokenizer_blob)


def _chunk_files(work: Path, cid: str, split: str) -> tuple[Path, Path, Path]:
    """A chunk's files for one split; `cid` names the chunk (`_cid`, or a producer's `_stream_cid`)."""
    stem = work / f"{split}-{cid}"
    return stem.with_suffix(".bin"), stem.with_suffix(".len.npy"), stem.with_suffix(".mask")


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        if path.suffix == ".npy":
            np.save(f, array)
        else:
            array.tofile(f)
    os.replace(tmp, path)


def _cid(index: int) -> str:
    return f"{index:06d}"


def _tokenize_chunk(work: str, cid: str, digest: str, docs: list[tuple[str, Any]],
                    dtype: str, source_index: int = 0, extra: dict | None = None) -> dict[str, Any]:
    """Tokenize one chunk of (split, Document) into `.work`; the marker (with `extra`) goes last."""
    from minitron.corpus import encode_documents

    work_dir, dt = Path(work), np.dtype(dtype)
    per_split: dict[str, tuple[list, list, list]] = {}
    encoded = encode_documents([d for _, d in docs], _WORKER_TOKENIZER, _TOKENIZE_BATCH)
    for (split, _), (ids, mask) in zip(docs, encoded):
        arrays, lengths, masks = per_split.setdefault(split, ([], [], []))
        arrays.append(np.asarray(ids, dtype=dt))
        lengths.append(len(ids))
        masks.append(mask)
    marker = {"id": cid, "digest": digest, "source": source_index, "splits": {}, **(extra or {})}
    for split, (arrays, lengths, masks) in per_split.items():
        tok_path, len_path, mask_path = _chunk_files(work_dir, cid, split)
        _save(tok_path, np.concatenate(arrays))
        _save(len_path, np.asarray(lengths, dtype=np.int64))
        has_mask = any(m is not None for m in masks)
        if has_mask:  # plain documents in a chat chunk: every token counts
            _save(mask_path, np.concatenate([np.asarray(m if m is not None else [1] * n, np.uint8)
                                             for m, n in zip(masks, lengths)]))
        marker["splits"][split] = {"documents": len(lengths), "tokens": int(sum(lengths)),
                                   "mask": has_mask}
    write_json_atomic(work_dir / f"chunk-{cid}.json", marker)
    return marker


def _source_chunks(source: str, text_field: str, edges, chunk_chars: int,
                   fingerprint) -> Iterator[list]:
    """[(split, Document)] chunks of about `chunk_chars` characters of one source, in source
    order; `fingerprint` (a hashlib object) absorbs every document's key and content on the way."""
    from minitron.corpus import iter_documents, split_of

    chunk, size = [], 0
    for doc in iter_documents(source, text_field):
        if not doc.text:
            continue
        digest = hashlib.sha1(doc.text.encode()).hexdigest()
        fingerprint.update(f"{doc.key}\0{digest}\n".encode())
        chunk.append((split_of(doc.key, edges), doc))
        size += len(doc.text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _chunk_digest(chunk: list) -> str:
    h = hashlib.sha1()
    for split, doc in chunk:
        h.update(f"{split}\0{doc.key}\0{len(doc.text)}\0{doc.messages is not None}\0".encode())
        h.update(doc.text.encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- streamed sources
# An `hf:` source streams: reading it again is downloading it again. So it is read by several
# producers (each a contiguous share of the stream's files, `IterableDataset.shard`, whose
# concatenation in producer order is the stream's own order), each chunking and tokenizing its
# share. A chunk's marker holds the stream's state after it (`state_dict`), so a resumed producer
# continues from its last finished chunk (`load_state_dict`: finished files are not opened again)
# instead of streaming what was done; each chunk keeps its documents' hashes (`.sha`), from which
# the source fingerprint is rebuilt in order without the text.
def _streams(source: str) -> bool:
    return source.startswith("hf:")


def _stream_cid(src: int, producer: int, local: int) -> str:
    return f"s{src}-p{producer:03d}-{local:06d}"


def _producer_count(work: Path, source: str, text_field: str, src: int, workers: int) -> int:
    """How many producers read source `src`: at most `workers` and the stream's file count;
    fixed by the first run (a resume finds its producers' chunks under the same names)."""
    from minitron.corpus import open_stream

    path = work / f"producers-s{src}.json"
    if path.exists():
        return int(json.loads(path.read_text())["producers"])
    n = max(1, min(workers, open_stream(source, text_field).num_shards))
    write_json_atomic(path, {"producers": n})
    return n


def _finished_chunks(work: Path, src: int, producer: int) -> list[dict]:
    """A producer's chunks an earlier run finished (markers are written last: a prefix)."""
    markers = []
    while (path := work / f"chunk-{_stream_cid(src, producer, len(markers))}.json").exists():
        markers.append(json.loads(path.read_text()))
    return markers


def _produce(work: str, source: str, text_field: str, edges, src: int, producers: int,
             producer: int, chunk_chars: int, dtype: str) -> dict[str, Any]:
    """Producer `producer` of `producers` for streaming source `src`: its share of the stream,
    chunked and tokenized into `work`, resumed after its last finished chunk. Returns its
    markers, how many of them were there already, and how many records it read this time."""
    from minitron.corpus import open_stream, record_document, split_of

    work_dir = Path(work)
    markers = _finished_chunks(work_dir, src, producer)
    reused, finished = len(markers), work_dir / f"producer-{_stream_cid(src, producer, 0)}.json"
    if finished.exists():
        return {"markers": markers, "reused": reused, "read": 0}
    ds = open_stream(source, text_field)
    if producers > 1:
        ds = ds.shard(num_shards=producers, index=producer)
    if markers:
        ds.load_state_dict(markers[-1]["state"])
    chunk, size, read = [], 0, 0

    def flush() -> None:
        cid = _stream_cid(src, producer, len(markers))
        hashes = b"".join(bytes.fromhex(doc.key) for _, doc in chunk)
        _save(work_dir / f"{cid}.sha", np.frombuffer(hashes, dtype=np.uint8))
        markers.append(_tokenize_chunk(work, cid, f"{src}:{_chunk_digest(chunk)}", chunk, dtype,
                                       src, {"state": ds.state_dict()}))

    for record in ds:
        read += 1
        doc = record_document(record, text_field)
        if not doc.text:
            continue
        chunk.append((split_of(doc.key, edges), doc))
        size += len(doc.text)
        if size >= chunk_chars:
            flush()
            chunk, size = [], 0
    if chunk:
        flush()
    write_json_atomic(finished, {"chunks": len(markers), "read": read})
    return {"markers": markers, "reused": reused, "read": read}


def _absorb_hashes(fingerprint, work: Path, marker: dict) -> None:
    """The fingerprint lines `_source_chunks` writes, from a streamed chunk's stored hashes
    (a streamed document's key is its text's hash)."""
    raw = (work / f"{marker['id']}.sha").read_bytes()
    hexes = (raw[i:i + 20].hex() for i in range(0, len(raw), 20))
    fingerprint.update(b"".join(f"{h}\0{h}\n".encode() for h in hexes))


# ----------------------------------------------------------------------------- pass 1: all sources
def _tokenize_all(sources: tuple[tuple[str, float], ...], config: PrepareConfig, work: Path,
                  tokenizer, dtype: np.dtype, workers: int, chunk_chars: int,
                  part: tuple[int, int] | None = None,
                  merge: bool = False) -> tuple[list[dict], str, dict[str, float]]:
    """Pass 1: every chunk tokenized into `work` (reusing chunks a previous run finished), in
    source order.

    `part` (i, n): only the chunks whose index is i modulo n (one machine's share); the others
    are streamed past (their text feeds the fingerprint) and left out of the markers. `merge`:
    tokenize nothing; every chunk must be there (the parts' `.work` files, gathered). Without
    either, an `hf:` source is read by producers (`_produce`)."""
    from tqdm import tqdm

    source_fp = hashlib.sha1()
    markers: dict[tuple[int, int, int], dict] = {}  # (source, producer, index) -> marker
    bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not config.progress,
               file=sys.stderr, dynamic_ncols=True)
    stats = {"tokenized": 0, "reused": 0, "seconds": 0.0, "streamed": 0}
    t0 = time.perf_counter()

    def done(key: tuple[int, int, int], marker: dict, fresh: bool) -> None:
        markers[key] = marker
        n = sum(s["tokens"] for s in marker["splits"].values())
        stats["tokenized" if fresh else "reused"] += n
        bar.update(n)

    pool, pending, missing, index = None, {}, [], 0
    if workers > 1 and not merge:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                   initializer=_init_worker, initargs=(pickle.dumps(tokenizer),))
    else:
        _init_worker(pickle.dumps(tokenizer))
    try:
        for src, (source, _) in enumerate(sources):
            source_fp.update(f"source {src}: {source}\n".encode())
            if _streams(source) and part is None and not merge:
                n = _producer_count(work, source, config.text_field, src, workers)
                args = [(str(work), source, config.text_field, config.split_edges, src, n, p,
                         chunk_chars, dtype.str) for p in range(n)]
                results = ([f.result() for f in [pool.submit(_produce, *a) for a in args]]
                           if pool is not None else [_produce(*a) for a in args])
                for p, result in enumerate(results):
                    stats["streamed"] += result["read"]
                    for k, marker in enumerate(result["markers"]):
                        done((src, p, k), marker, fresh=k >= result["reused"])
                        _absorb_hashes(source_fp, work, marker)
                continue
            for chunk in _source_chunks(source, config.text_field, config.split_edges, chunk_chars,
                                        source_fp):
                key, cid, index = (src, 0, index), _cid(index), index + 1
                digest = f"{src}:{_chunk_digest(chunk)}"
                marker_path = work / f"chunk-{cid}.json"
                if marker_path.exists() and json.loads(marker_path.read_text())["digest"] == digest:
                    done(key, {"id": cid, **json.loads(marker_path.read_text())}, fresh=False)
                    continue
                if merge:
                    missing.append(key[2])
                    continue
                if part is not None and key[2] % part[1] != part[0]:
                    continue
                if pool is None:
                    done(key, _tokenize_chunk(str(work), cid, digest, chunk, dtype.str, src), True)
                    continue
                pending[key] = pool.submit(_tokenize_chunk, str(work), cid, digest, chunk,
                                           dtype.str, src)
                while len(pending) >= 2 * workers:  # bounded: chunks of text wait in memory
                    first = min(pending)
                    done(first, pending.pop(first).result(), True)
        for key in sorted(pending):
            done(key, pending.pop(key).result(), True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    stats["seconds"] = time.perf_counter() - t0
    if missing:
        shown = f"{missing[:8]}{' ...' if len(missing) > 8 else ''}"
        raise MinitronError(f"merge: {len(missing)} of {len(missing) + len(markers)} chunks are "
                            f"not in {work} (chunks {shown}); run the missing --shard I/N parts, "
                            f"or gather their .work files here")
    return [markers[k] for k in sorted(markers)], source_fp.hexdigest()[:16], stats


# ----------------------------------------------------------------------------- pass 2: shards
def _split_documents(work: Path, markers: list[dict], split: str):
    """Per document of the split, in source order: its chunk, its offset in the chunk file, its
    length (int64 arrays: the only per-document state, a few bytes per document)."""
    chunk_ids, offsets, lengths = [], [], []
    for index, marker in enumerate(markers):
        if split not in marker["splits"]:
            continue
        lens = np.load(_chunk_files(work, marker["id"], split)[1])
        chunk_ids.append(np.full(len(lens), index, dtype=np.int64))
        offsets.append(np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64))
        lengths.append(lens)
    if not lengths:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(chunk_ids), np.concatenate(offsets), np.concatenate(lengths)


def _mixture_order(markers: list[dict], chunk_ids: np.ndarray, lengths: np.ndarray,
                   weights: list[float], seed: int) -> tuple[list[int], list[dict]]:
    """The train documents with each source repeated (or subsampled) so that its share of the
    split's tokens is its weight, the total staying the sources' own: source i's documents are
    taken r_i = w_i * total / tokens_i times, whole copies plus a seeded sample for the rest."""
    source_of = np.asarray([markers[c]["source"] for c in chunk_ids], dtype=np.int64)
    total, share = int(lengths.sum()), [w / sum(weights) for w in weights]
    rng, order, summary = random.Random(seed), [], []
    for i, w in enumerate(share):
        docs = np.flatnonzero(source_of == i).tolist()
        tokens = int(lengths[docs].sum()) if docs else 0
        if not tokens:
            raise MinitronError(f"mixture source {i} has no train documents; drop it or give it "
                                f"more text")
        repeat = w * total / tokens
        whole, rest = int(repeat), round((repeat - int(repeat)) * len(docs))
        order += docs * whole + sorted(rng.sample(docs, rest))
        summary.append({"weight": w, "documents": len(docs), "tokens": tokens,
                        "repeat": round(repeat, 4)})
    return order, summary


def _max_open() -> int:
    """Chunk files a reader keeps open: 64, or a quarter of a lower open-file limit (two readers,
    tokens and mask, stay within half of it)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError):  # no resource module (Windows)
        return 64
    return 64 if soft == resource.RLIM_INFINITY else max(2, min(64, soft // 4))


class _ChunkReader:
    """Reads a document's tokens (or mask) from the pass-1 chunk files by offset.

    A corpus has ~120k chunks at 111B tokens; one map (or descriptor) per chunk would exceed the
    open-file limit and `vm.max_map_count`. So files are read with seek + readinto (no mapping),
    and at most `max_open` stay open, least recently used closed first."""

    def __init__(self, work: Path, split: str, dtype: np.dtype, mask: bool, ids: list[str]):
        self.work, self.split, self.mask, self.max_open = work, split, mask, _max_open()
        self.ids = ids  # chunk position -> its name
        self.dtype = np.dtype(np.uint8) if mask else np.dtype(dtype)
        self.files: OrderedDict[int, Any] = OrderedDict()  # chunk -> open file, or None

    def _file(self, chunk: int):
        if chunk in self.files:
            self.files.move_to_end(chunk)
            return self.files[chunk]
        tok, _, mask = _chunk_files(self.work, self.ids[chunk], self.split)
        path = mask if self.mask else tok
        f = open(path, "rb", buffering=0) if path.exists() else None
        self.files[chunk] = f
        while len(self.files) > self.max_open:
            old = self.files.popitem(last=False)[1]
            if old is not None:
                old.close()
        return f

    def get(self, chunk: int, lo: int, hi: int) -> np.ndarray:
        f = self._file(chunk)
        if f is None:  # a chunk of plain documents in a split with conversations
            return np.ones(hi - lo, dtype=np.uint8)
        out = np.empty(hi - lo, dtype=self.dtype)
        read_exactly(f, lo * self.dtype.itemsize, out,
                     f"{f.name}: ends before token {hi}; the preparation's .work folder is "
                     f"damaged: delete it and prepare again")
        return out

    def close(self) -> None:
        for f in self.files.values():
            if f is not None:
                f.close()
        self.files.clear()


def _fill(buf: np.ndarray, lo: int, reader: _ChunkReader, order, ends, lengths, chunk_ids,
          offsets) -> None:
    """Stream positions [lo, lo + len(buf)) of the shuffled split, copied document by document."""
    hi, pos = lo + len(buf), lo
    d = int(np.searchsorted(ends, lo, side="right"))  # the first document ending after lo
    while pos < hi:
        doc = order[d]
        start = int(ends[d] - lengths[doc])  # the document's place in the stream
        a, b = pos - start, min(hi, int(ends[d])) - start
        base = int(offsets[doc])
        buf[pos - lo:pos - lo + b - a] = reader.get(int(chunk_ids[doc]), base + a, base + b)
        pos += b - a
        d += 1


def _write_split(out: Path, work: Path, markers: list[dict], split: str, seed: int,
                 dtype: np.dtype, shard_tokens: int, weights: list[float]) -> dict[str, Any]:
    """Pass 2 for one split: the seeded document order written as shards (each by rename)."""
    chunk_ids, offsets, lengths = _split_documents(work, markers, split)
    mixture = None
    if split == "train" and len(weights) > 1:
        order, mixture = _mixture_order(markers, chunk_ids, lengths, weights, seed)
    else:
        order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)  # the permutation data.load_blocks applies to the docs
    order = np.asarray(order, dtype=np.int64)
    ends = np.cumsum(lengths[order]) if len(order) else np.zeros(0, dtype=np.int64)
    total = int(ends[-1]) if len(ends) else 0
    with_mask = any(m["splits"].get(split, {}).get("mask") for m in markers)
    kinds = [(".bin", dtype, False)] + ([(".mask", np.dtype(np.uint8), True)] if with_mask else [])
    ids = [m["id"] for m in markers]
    readers = {mask: _ChunkReader(work, split, dtype, mask, ids) for _, _, mask in kinds}
    try:
        shards = _write_shards(out, split, kinds, readers, total, shard_tokens,
                               (order, ends, lengths, chunk_ids, offsets))
    finally:
        for reader in readers.values():
            reader.close()
    info = {"documents": len(lengths), "tokens": total, "shard_tokens": shard_tokens,
            "mask": with_mask, "shards": shards}
    if mixture is not None:
        info["mixture"] = mixture
    return info


def _write_shards(out: Path, split: str, kinds, readers, total: int, shard_tokens: int,
                  layout) -> list[dict]:
    """The split's shards, each written by rename (one an interrupted run wrote is kept)."""
    shards = []
    for k in range(math.ceil(total / shard_tokens)):
        lo, hi = k * shard_tokens, min((k + 1) * shard_tokens, total)
        shards.append({"file": f"{split}-{k:05d}.bin", "tokens": hi - lo})
        for suffix, dt, mask in kinds:
            path = out / f"{split}-{k:05d}{suffix}"
            if path.exists() and path.stat().st_size == (hi - lo) * dt.itemsize:
                continue  # written by an interrupted run (shards appear only by rename)
            buf = np.empty(hi - lo, dtype=dt)
            _fill(buf, lo, readers[mask], *layout)
            _save(path, buf)
    return shards


# ----------------------------------------------------------------------------- prepare
def _begin(out: Path, plan: dict[str, Any]) -> dict[str, Any] | None:
    """The finished manifest if `out` holds this very preparation; else set up `out/.work` to
    start or resume it (an interrupted preparation with other settings starts over). Refuses a
    folder that holds another preparation or anything else."""
    if (out / MANIFEST).exists():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("plan") == plan:
            return manifest
        raise MinitronError(f"{out} holds another preparation (other source, tokenizer or "
                            f"settings); choose another --output or delete it")
    if out.exists() and not (out / ".work").exists() and any(out.iterdir()):
        raise MinitronError(f"--output {out} is not empty and holds no preparation; choose a "
                            f"new or empty folder")
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    if (work / "plan.json").exists() and json.loads((work / "plan.json").read_text()) != plan:
        shutil.rmtree(work)
        for stale in [*out.glob("*.bin"), *out.glob("*.mask")]:
            stale.unlink()
        work.mkdir()
    write_json_atomic(work / "plan.json", plan)
    return None


def prepare(
    source: str | list[tuple[str, float]],
    output: str | os.PathLike,
    tokenizer,
    config: PrepareConfig | None = None,
    *,
    tokenizer_name: str | None = None,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    part: tuple[int, int] | None = None,
    merge: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Tokenize `source` once into shards + manifest in `output`; returns the manifest.

    A folder that already holds the same preparation is returned as is; an interrupted one is
    resumed (finished chunks and shards are kept); a folder holding anything else is refused.

    Across machines: `part=(i, n)` tokenizes chunk i, i + n, ... into `output/.work` and returns
    {"part": ...} (no shards, no manifest); `merge=True`, once the n parts' `.work` files are in
    one `output/.work` (a shared folder, or copied: the file names are the chunks' global
    indices), writes the shards and the manifest, the same as one machine's preparation.

    `config` holds the settings (`PrepareConfig`: text field, seed, block size, split fractions,
    workers, shard size, progress); keyword `settings` replace its keys.
    """
    from minitron.corpus import block_bos, parse_mixture

    config = dataclasses.replace(config or PrepareConfig(), **settings)
    if isinstance(source, str):  # one source, or a mixture spec 'A@3 + B@1'
        source = parse_mixture(source) or source
    sources = ((source, 1.0),) if isinstance(source, str) else tuple(
        (str(s), float(w)) for s, w in source)
    if not sources:
        raise MinitronError("no data source given")
    for name, weight in sources:
        if not (math.isfinite(weight) and weight > 0):
            raise MinitronError(f"weight {weight!r} of source '{name}' is invalid; valid: a "
                                f"number > 0")
    if tokenizer.eos_token_id is None:
        raise MinitronError("the tokenizer has no EOS token; documents cannot be separated")
    workers = config.workers or min(os.cpu_count() or 1, 8)
    if part is not None and (merge or not 0 <= part[0] < part[1]):
        raise MinitronError(f"--shard {part[0]}/{part[1]} is invalid; valid: I/N with 0 <= I < N, "
                            f"without --merge")
    if chunk_chars < 1:
        raise MinitronError(f"chunk_chars={chunk_chars} is invalid; valid: an integer >= 1")
    out = Path(output).expanduser()
    vocab = len(tokenizer)
    dtype = token_dtype(vocab)
    content = {"sources": sources, **{k: getattr(config, k) for k in PrepareConfig.CONTENT}}
    plan = {"format": FORMAT, "settings": content, "tokenizer_hash": tokenizer_hash(tokenizer),
            "dtype": dtype.str, "shard_tokens": config.shard_tokens, "chunk_chars": chunk_chars}
    plan = json.loads(json.dumps(plan))  # as it reads back from JSON (tuples become lists)
    done = _begin(out, plan)
    if done is not None:
        return done
    work = out / ".work"
    markers, source_fp, stats = _tokenize_all(sources, config, work, tokenizer, dtype, workers,
                                              chunk_chars, part, merge)
    if part is not None:
        return {"part": list(part), "chunks": len(markers), "tokens_tokenized": stats["tokenized"],
                "tokens_reused": stats["reused"], "tokenize_s": round(stats["seconds"], 3)}
    t0 = time.perf_counter()
    weights = [w for _, w in sources]
    splits = {s: _write_split(out, work, markers, s, config.seed, dtype, config.shard_tokens,
                              weights)
              for s in ("train", "calibration", "eval")}
    if not any(s["tokens"] for s in splits.values()):
        raise MinitronError(f"data source '{source}' holds no non-empty documents")
    manifest = {
        "format": FORMAT, "plan": plan,
        "source": {"spec": source if isinstance(source, str) else [list(x) for x in sources],
                   "fingerprint": source_fp},
        "tokenizer": {"name": tokenizer_name or getattr(tokenizer, "name_or_path", None),
                      "hash": plan["tokenizer_hash"], "vocab_size": vocab,
                      "eos_token_id": tokenizer.eos_token_id,
                      "block_bos": block_bos(tokenizer)},
        "dtype": dtype.str, "seed": config.seed, "block_size": config.block_size,
        "split_edges": config.split_edges,
        "splits": splits,
        "stats": {"workers": workers, "tokenize_s": round(stats["seconds"], 3),
                  "tokens_tokenized": stats["tokenized"], "tokens_reused": stats["reused"],
                  "documents_streamed": stats["streamed"],
                  "write_s": round(time.perf_counter() - t0, 3)},
    }
    content = json.dumps({k: manifest[k] for k in ("plan", "source", "splits")}, sort_keys=True)
    manifest["fingerprint"] = hashlib.sha1(content.encode()).hexdigest()[:16]
    write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return manifest
