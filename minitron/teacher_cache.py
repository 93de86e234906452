"""The teacher cache: the teacher's top-k log-probabilities per training token, computed once.

The teacher runs once over the training tokens; per token its top-k log-probabilities, their
indices and the tail mass are stored, so that many distillations (the students of an architecture
search, reruns with other settings) read them instead of running the teacher, and the teacher need
not sit in memory.

`python -m minitron.teacher_cache build --model TEACHER --data SOURCE --output DIR
 [teacher_cache.k=64] [teacher_cache.tokens=N] [teacher_cache.block_size=256] ...`
(`--help` lists every setting), then `python -m minitron.distill --student S --output RUN
 distill.teacher_cache=DIR [--teacher TEACHER]`.

Contract (what a cache folder holds and what a reader may rely on):
- Blocks: the first `num_blocks` blocks of `block_size` tokens of the train split of the data, the
  very blocks `minitron.distill` reads (`minitron.data.open_blocks(tokenizer, "train", n, ...)`),
  block i at row i. A distillation whose train blocks are rows [0, n) of the cache reads them by
  the same row indices as its batches (`distill.batch_indices`). `teacher_cache.split=eval` caches
  held-out blocks instead, for `evaluate_from_cache` (held-out perplexity, sparse KL and top-1
  agreement of a student with no teacher loaded).
- Per token t of block i (T = 1, the teacher's own distribution p = softmax(logits)):
  `logp` [k] the k largest log p (descending; `dtype`: float16 or float32), `idx` [k] their token
  ids (int32), `tail` log(1 - sum of the kept p) computed as logsumexp over the other logits minus
  the full logsumexp (float32; -inf when k = V), and `ids` the token id itself (int32), which
  every read checks against the distillation's batch.
- Shards: `shard-NNNNN/{logp,idx,tail,ids}.bin`, raw little-endian C-order arrays of
  [blocks, block_size, k] / [blocks, block_size]; a shard folder appears by rename when complete,
  so a killed build leaves whole shards (reused by the rerun, which produces identical bytes) and
  at most a `.tmp-*` folder (removed).
- `manifest.json` is written last (the commit): format, `plan` (everything the bytes depend on),
  `data` (kind "prepared": the prepared folder's manifest fingerprint, or kind "tokens": a hash of
  the cached blocks' token ids; split, block_size, blocks; `bos` when every block is led by the
  tokenizer's BOS, see `minitron.corpus.block_bos`), `teacher` (name and `teacher_hash`),
  k, vocab_size, shards, `fingerprint` (of the plan) and timing stats.
- Refusals (MinitronError, exit 2, naming both fingerprints): a distillation whose data is not the
  cache's (another prepared fingerprint, other tokens, another BOS rule, another block size, more
  blocks than cached)
  or whose named --teacher hashes differently; a build into a folder holding another cache.
- The loss (minitron/kernels/sparse_kl.py): forward KL, exact over the kept tokens, with the tail
  as one bucket whose student mass is the student's probability outside the kept ids; with k = V it
  is the online full-vocabulary KL. Temperature 1 only (T != 1 needs the teacher's whole
  distribution), so distillation refuses other temperatures, other divergences, intermediate
  losses and teacher correction with a cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from minitron.common import (LOCK_SUFFIX, MinitronError, atomic_dir, check_writable, read_exactly,
                             remove_unheld, run_cli, write_json_atomic)
from minitron.config import CacheConfig, DataConfig, ModelConfig

FORMAT = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
# Tokens of logits formed at once from the teacher's hidden states (bounds the [rows, V] temporaries).
CHUNK_TOKENS = 1024
# Teacher weight files are hashed from this many evenly spaced 1 MiB samples (whole when smaller):
# a different or fine-tuned checkpoint changes them, and an 8B teacher is not read in full.
HASH_SAMPLES = 64
_MIB = 1 << 20
CLI_KEYS = {"teacher_cache": None, "model": ("dtype", "device", "trust_remote_code"),
            "data": ("source", "text_field")}


# ----------------------------------------------------------------------------- identities
def teacher_hash(name_or_path: str | os.PathLike) -> str:
    """A content hash of a teacher checkpoint: its config (minus the fields that saving rewrites)
    and its safetensors files (size and sampled content). A hub id that is not local hashes its
    name."""
    from minitron.models import resolve_model

    # Hashing reads files and runs none of their code; the stage's own load decides on remote code.
    where = Path(resolve_model(name_or_path, trust_remote_code=True, need_weights=False))
    h = hashlib.sha1()
    if not where.is_dir():
        h.update(f"hub:{where}".encode())
        return h.hexdigest()[:16]
    config = json.loads((where / "config.json").read_text())
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True).encode())
    for f in sorted(where.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= HASH_SAMPLES * _MIB:
                h.update(fh.read())
                continue
            for i in range(HASH_SAMPLES):
                fh.seek(i * (size - _MIB) // (HASH_SAMPLES - 1))
                h.update(fh.read(_MIB))
    return h.hexdigest()[:16]


def _tokens_hash(blocks: torch.Tensor) -> str:
    return hashlib.sha1(blocks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def data_identity(blocks, split: str = "train", bos: int | None = None) -> dict[str, Any]:
    """What the train blocks are: a prepared folder's fingerprint (its BlockView names it as
    'fingerprint:split:block_size:n'), or for in-memory blocks a hash of their token ids; and
    `bos`, the BOS id every block starts with (a BlockView knows it; in-memory blocks are told),
    recorded only under the BOS rule so caches of BOS-less blocks keep their fingerprints."""
    if hasattr(blocks, "stream"):
        fp, split = blocks.fingerprint.split(":")[:2]
        kind, bos = "prepared", blocks.bos
    else:
        fp, split, kind = _tokens_hash(blocks), split, "tokens"
    identity = {"kind": kind, "fingerprint": fp, "split": split,
                "block_size": int(blocks.shape[1]), "blocks": int(blocks.shape[0])}
    return identity if bos is None else {**identity, "bos": int(bos)}


# ----------------------------------------------------------------------------- reading
class CachedTargets(NamedTuple):
    """The cached teacher of one batch of rows: top_logp [b, T, k] (float16/32), top_idx [b, T, k]
    (int32), log_tail [b, T] (float32), ids [b, T] (int64)."""

    top_logp: torch.Tensor
    top_idx: torch.Tensor
    log_tail: torch.Tensor
    ids: torch.Tensor

    def to(self, device) -> "CachedTargets":
        return CachedTargets(*(t.to(device, non_blocking=True) for t in self))


_FILES = ("logp", "idx", "tail", "ids")


def _max_open() -> int:
    """Files a reader keeps open: 64, or a quarter of a lower open-file limit."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError):  # no resource module (Windows)
        return 64
    return 64 if soft == resource.RLIM_INFINITY else max(4, min(64, soft // 4))


def bytes_per_token(k: int, dtype: str) -> int:
    """Stored bytes per cached token: k log-probs (`dtype`) and k int32 ids, the float32 tail and
    the int32 token id (392 at k = 64 in float16)."""
    return k * (np.dtype(dtype).itemsize + 4) + 8


def size_line(tokens: int, k: int, dtype: str) -> str:
    """The cache's size on disk, said before a build starts."""
    b = bytes_per_token(k, dtype)
    return (f"teacher cache: {tokens:,} tokens x {b} bytes/token (top-{k}, {dtype}) = "
            f"{tokens * b / 1e9:,.2f} GB ({tokens * b / 1e12:,.3f} TB) on disk")


class TeacherCache:
    """A finished cache folder, read by block rows through memory maps."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        path = self.folder / MANIFEST
        if not path.is_file():
            what = ("an unfinished build (rerun the same build command to finish it)"
                    if (self.folder / PLAN).exists() else "no teacher cache")
            raise MinitronError(f"distill.teacher_cache={str(folder)!r}: {self.folder} holds {what}; "
                                f"build one with: python -m minitron.teacher_cache build --model "
                                f"TEACHER --data SOURCE --output {self.folder}")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise MinitronError(f"{path}: format {self.manifest.get('format')!r}; this minitron "
                                f"reads format {FORMAT}: build the cache again")
        m = self.manifest
        self.k, self.vocab_size = int(m["k"]), int(m["vocab_size"])
        self.block_size, self.num_blocks = int(m["block_size"]), int(m["num_blocks"])
        self.shard_blocks = int(m["plan"]["shard_blocks"])
        self.dtype = np.dtype(m["dtype"])
        # (shard, file) -> open file; at most `_max_open()`, least recently used closed first: a
        # 94B-token cache has ~360k shards, past any open-file or memory-map limit.
        self._files: OrderedDict[tuple[int, str], Any] = OrderedDict()
        self._max_open = _max_open()

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def _row_layout(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        t, k = self.block_size, self.k
        return {"logp": (self.dtype, (t, k)), "idx": (np.dtype(np.int32), (t, k)),
                "tail": (np.dtype(np.float32), (t,)), "ids": (np.dtype(np.int32), (t,))}[name]

    def _file(self, s: int, name: str):
        key = (s, name)
        if key in self._files:
            self._files.move_to_end(key)
            return self._files[key]
        f = open(self.folder / self.manifest["shards"][s]["dir"] / f"{name}.bin", "rb", buffering=0)
        self._files[key] = f
        while len(self._files) > self._max_open:
            self._files.popitem(last=False)[1].close()
        return f

    def _read_row(self, name: str, r: int, out: np.ndarray) -> None:
        """Block row `r` of file `name` into `out`, read by offset (no memory map)."""
        s, local = divmod(r, self.shard_blocks)
        f = self._file(s, name)
        read_exactly(f, local * out.nbytes, out, f"{f.name} ends before block {r}: the teacher "
                     f"cache {self.folder} is damaged; build it again")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def read(self, name: str, rows) -> torch.Tensor:
        """One stored array ('logp', 'idx', 'tail' or 'ids') at block `rows`, as a CPU tensor."""
        rows = [int(r) for r in (rows.tolist() if hasattr(rows, "tolist") else rows)]
        for r in rows:
            if not 0 <= r < self.num_blocks:
                raise MinitronError(f"block {r} is outside the teacher cache {self.folder} "
                                    f"({self.num_blocks} blocks)")
        dtype, shape = self._row_layout(name)
        out = np.empty((len(rows), *shape), dtype=dtype)
        for i, r in enumerate(rows):
            self._read_row(name, r, out[i])
        return torch.from_numpy(out)

    def targets(self, rows) -> CachedTargets:
        """The teacher's top-k, indices and tail (and the tokens) at block `rows`."""
        return CachedTargets(self.read("logp", rows), self.read("idx", rows),
                             self.read("tail", rows), self.read("ids", rows).to(torch.int64))

    def check_ids(self, rows, ids: torch.Tensor) -> None:
        """Refuse a batch (`ids`, on the host) whose tokens are not the cached ones at `rows`: a
        guard against reading another data order than the cache's."""
        if not torch.equal(self.read("ids", rows).to(torch.int64), ids.to(torch.int64)):
            raise MinitronError(f"the training batch's tokens differ from those the teacher cache "
                                f"{self.folder} holds at the same rows: the data or its order is "
                                f"not the cache's")

    # -------------------------------------------------------------------- checks before a run
    def check_data(self, blocks) -> None:
        """Refuse train blocks that are not rows [0, n) of the cached blocks."""
        mine, theirs = self.manifest["data"], data_identity(blocks)
        where = f"teacher cache {self.folder}"
        if theirs["kind"] == "prepared" and mine.get("bos") != theirs.get("bos"):
            from minitron.corpus import describe_bos

            raise MinitronError(f"{where} holds blocks led by {describe_bos(mine.get('bos'))}; "
                                f"this run reads blocks as {describe_bos(theirs.get('bos'))} (its "
                                f"tokenizer's rule): build the cache with this run's tokenizer")
        if mine["split"] != "train":
            raise MinitronError(f"{where} holds the '{mine['split']}' split; distillation trains "
                                f"on the train split: build it with teacher_cache.split=train")
        if theirs["block_size"] != self.block_size:
            raise MinitronError(f"{where} holds blocks of {self.block_size} tokens; this run reads "
                                f"blocks of {theirs['block_size']} (distill.block_size): build the "
                                f"cache with teacher_cache.block_size={theirs['block_size']}")
        if theirs["blocks"] > self.num_blocks:
            raise MinitronError(f"{where} holds {self.num_blocks} blocks of training data; this "
                                f"run reads {theirs['blocks']}: build it with teacher_cache.tokens "
                                f">= {theirs['blocks'] * self.block_size} (distill.skip_tokens + "
                                f"distill.tokens)")
        if theirs["kind"] == "prepared" or mine["kind"] == "prepared":
            same = (theirs["kind"], theirs["fingerprint"], theirs["split"]) == (
                mine["kind"], mine["fingerprint"], mine["split"])
            have, want = theirs["fingerprint"], mine["fingerprint"]
        else:  # in-memory blocks: their tokens against the cached prefix of the same length
            want = _tokens_hash(self.read("ids", range(theirs["blocks"])))
            have = theirs["fingerprint"]
            same = have == want
            if not same and mine.get("bos") is not None:
                want += f", blocks led by BOS id {mine['bos']}"
        if not same:
            raise MinitronError(
                f"{where} was built from other data (fingerprint {want}, {mine['kind']}) than this "
                f"run's training data (fingerprint {have}, {theirs['kind']}): build the cache from "
                f"this run's data, or distill from the data the cache was built from")

    def check_teacher(self, name_or_path: str | os.PathLike) -> None:
        """Refuse a named teacher whose checkpoint is not the one the cache was built from."""
        have, info = teacher_hash(name_or_path), self.manifest["teacher"]
        if have != info["hash"]:
            raise MinitronError(
                f"teacher cache {self.folder} was built from teacher '{info['name']}' (hash "
                f"{info['hash']}); --teacher {name_or_path} hashes to {have}: build the cache from "
                f"this teacher, or name the cache's teacher")

    def check_student(self, vocab_size: int) -> None:
        if vocab_size != self.vocab_size:
            raise MinitronError(f"teacher cache {self.folder} holds a vocabulary of "
                                f"{self.vocab_size} entries; the student's has {vocab_size}: "
                                f"distillation needs the same tokenizer")


def open_cache(folder: str | os.PathLike) -> TeacherCache:
    return TeacherCache(folder)


@torch.no_grad()
def evaluate_from_cache(student: torch.nn.Module, cache: TeacherCache, rows=None,
                        batch_size: int = 8, chunk_tokens: int = CHUNK_TOKENS) -> dict[str, float]:
    """Held-out metrics of `student` on the cached blocks `rows` (all by default) with no teacher
    loaded: `eval_loss` / `eval_perplexity` (next-token cross-entropy on the cached tokens),
    `kl_to_teacher_topk` (the sparse KL over the kept tokens + tail bucket: never above the full
    KL, equal to it at k = V) and `top1_agreement` (student argmax = the teacher's top-1). From
    the student's hidden states, `chunk_tokens` rows of logits at a time."""
    from minitron.kernels.sparse_kl import sparse_rows
    from minitron.models import logit_softcap

    rows = list(range(cache.num_blocks)) if rows is None else [int(r) for r in rows]
    device = next(student.parameters()).device
    weight, cap = student.get_output_embeddings().weight, logit_softcap(student.config)
    kl = ce = agree = tokens = ce_count = 0.0
    was_training = student.training
    student.eval()
    for lo in range(0, len(rows), batch_size):
        t = cache.targets(rows[lo:lo + batch_size]).to(device)
        hidden = student.get_decoder()(t.ids, use_cache=False).last_hidden_state
        h = hidden.reshape(-1, hidden.size(-1))
        labels = torch.full_like(t.ids, -100)
        labels[:, :-1] = t.ids[:, 1:]
        labels, k = labels.reshape(-1), cache.k
        logp, idx, tail = t.top_logp.reshape(-1, k), t.top_idx.reshape(-1, k), t.log_tail.reshape(-1)
        for s in range(0, h.size(0), chunk_tokens):
            sl = slice(s, min(s + chunk_tokens, h.size(0)))
            logits = (h[sl] @ weight.T).float()
            if cap is not None:
                logits = cap * torch.tanh(logits / cap)
            loss, _ = sparse_rows(logits, logp[sl], idx[sl], tail[sl], None, 0.0, -100, False)
            kl += loss.sum().item()
            agree += (logits.argmax(-1) == idx[sl, 0].long()).sum().item()
            keep = labels[sl] != -100
            lse = torch.logsumexp(logits, -1)
            ce += (lse - logits.gather(1, labels[sl].clamp_min(0)[:, None]).squeeze(1))[keep].sum().item()
            ce_count += keep.sum().item()
            tokens += logits.size(0)
    student.train(was_training)
    loss = ce / max(ce_count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)),
            "kl_to_teacher_topk": kl / max(tokens, 1), "top1_agreement": agree / max(tokens, 1)}


# ----------------------------------------------------------------------------- computing
@torch.no_grad()
def teacher_targets(teacher: torch.nn.Module, ids: torch.Tensor, k: int,
                    chunk_tokens: int = CHUNK_TOKENS):
    """(top log-probs [b, T, k] fp32, indices [b, T, k] int32, log tail [b, T] fp32) of the
    teacher at temperature 1, from its final hidden states through its LM head, `chunk_tokens`
    rows of logits at a time (never [b, T, V] at once)."""
    from minitron.models import logit_softcap

    hidden = teacher.get_decoder()(ids, use_cache=False).last_hidden_state
    head = teacher.get_output_embeddings()
    cap = logit_softcap(teacher.config)
    h = hidden.reshape(-1, hidden.size(-1))
    n = h.size(0)
    top_logp = torch.empty(n, k, dtype=torch.float32, device=h.device)
    top_idx = torch.empty(n, k, dtype=torch.int32, device=h.device)
    log_tail = torch.empty(n, dtype=torch.float32, device=h.device)
    for start in range(0, n, chunk_tokens):
        sl = slice(start, min(start + chunk_tokens, n))
        logits = head(h[sl]).float()
        if cap is not None:  # as the model's own forward applies it (Gemma 2)
            logits = cap * torch.tanh(logits / cap)
        lse = torch.logsumexp(logits, dim=-1)
        top = logits.topk(k, dim=-1)
        top_logp[sl] = top.values - lse[:, None]
        top_idx[sl] = top.indices.to(torch.int32)
        rest = logits.scatter_(1, top.indices, float("-inf"))
        log_tail[sl] = torch.logsumexp(rest, dim=-1) - lse
    b, t = ids.shape
    return top_logp.view(b, t, k), top_idx.view(b, t, k), log_tail.view(b, t)


def _write_shard(out: Path, index: int, teacher, blocks, first: int, count: int,
                 config: CacheConfig, bar) -> None:
    """Shard `index`: blocks [first, first + count), written into a temporary folder that is
    renamed into place when complete."""
    t, k = config.block_size, config.k
    device = next(teacher.parameters()).device
    with atomic_dir(out / f"shard-{index:05d}") as tmp:
        maps = {
            "logp": np.memmap(tmp / "logp.bin", dtype=np.dtype(config.dtype), mode="w+",
                              shape=(count, t, k)),
            "idx": np.memmap(tmp / "idx.bin", dtype=np.int32, mode="w+", shape=(count, t, k)),
            "tail": np.memmap(tmp / "tail.bin", dtype=np.float32, mode="w+", shape=(count, t)),
            "ids": np.memmap(tmp / "ids.bin", dtype=np.int32, mode="w+", shape=(count, t)),
        }
        torch_dtype = getattr(torch, config.dtype)
        for lo in range(0, count, config.batch_size):
            hi = min(lo + config.batch_size, count)
            ids = blocks[list(range(first + lo, first + hi))]
            logp, idx, tail = teacher_targets(teacher, ids.to(device), k)
            maps["logp"][lo:hi] = logp.to(torch_dtype).cpu().numpy()
            maps["idx"][lo:hi] = idx.cpu().numpy()
            maps["tail"][lo:hi] = tail.cpu().numpy()
            maps["ids"][lo:hi] = ids.numpy().astype(np.int32)
            if bar is not None:
                bar.update((hi - lo) * t)
        for m in maps.values():
            m.flush()
        del maps


def _begin(out: Path, plan: dict[str, Any]) -> dict[str, Any] | None:
    """The finished manifest when `out` holds this very cache; else prepare `out` to build or
    resume it. Refuses a folder holding another cache or anything else."""
    if (out / MANIFEST).exists():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("plan") == plan:
            return manifest
        raise MinitronError(f"--output {out} holds another teacher cache (fingerprint "
                            f"{manifest.get('fingerprint')}: other teacher, data or settings); "
                            f"choose another --output or delete it")
    if (out / PLAN).exists():
        if json.loads((out / PLAN).read_text()) != plan:
            raise MinitronError(f"--output {out} holds an unfinished teacher cache with other "
                                f"settings (teacher, data, k, block size, dtype or batch size); "
                                f"rerun its own command to finish it, or choose another --output")
    elif out.exists() and any(out.iterdir()):
        raise MinitronError(f"--output {out} is not empty and holds no teacher cache; choose a "
                            f"new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".tmp-shard-*"):  # left by a build that was killed mid-shard
        if not stale.name.endswith(LOCK_SUFFIX):
            remove_unheld(stale)  # with its lock file (atomic_dir's), unless a live build holds it
    write_json_atomic(out / PLAN, plan)
    return None


def _load_data(teacher_name: str, data: DataConfig, config: CacheConfig, trust: bool = False):
    """The teacher's config and the blocks to cache (its tokenizer, no weights yet: a finished
    cache is recognized without loading the model)."""
    from minitron.data import block_bos, load_tokenizer, open_blocks
    from minitron.models import load_config

    t_cfg = load_config(teacher_name, trust)
    if config.k > t_cfg.vocab_size:
        raise MinitronError(f"teacher_cache.k={config.k} is larger than the teacher's vocabulary "
                            f"({t_cfg.vocab_size}); valid: 1 <= k <= {t_cfg.vocab_size}")
    tokenizer = load_tokenizer(teacher_name, trust)
    blocks = open_blocks(tokenizer, config.split,
                         max(1, config.tokens // config.block_size), source=data.source,
                         block_size=config.block_size, seed=config.seed,
                         text_field=data.text_field, max_positions=t_cfg.max_position_embeddings)
    return t_cfg, blocks, block_bos(tokenizer)


def build_cache(teacher_name: str | os.PathLike, output: str | os.PathLike,
                config: CacheConfig | None = None, *, data: DataConfig | None = None,
                model: ModelConfig | None = None) -> dict[str, Any]:
    """Run the teacher over the first `config.tokens` training tokens of `data` and write the cache
    to `output`; returns its manifest. A folder holding this very cache is returned as it is; an
    interrupted build is resumed (finished shards are kept, not recomputed).

    Under torchrun each rank builds every world-th of the shards still missing (on its own GPU),
    and rank 0 writes the manifest when all are done: the same bytes as one process."""
    from minitron.distributed import process_group

    config, data, model = config or CacheConfig(), data or DataConfig(), model or ModelConfig()
    with process_group(model.device) as device:
        return _build(teacher_name, Path(output).expanduser(), config, data, model, device)


def _build(teacher_name, out: Path, config: CacheConfig, data: DataConfig, model: ModelConfig,
           device: str) -> dict[str, Any]:
    from tqdm import tqdm

    from minitron import distributed as d

    d.on_rank0(lambda: check_writable(out, "--output"))
    t_cfg, blocks, bos = _load_data(str(teacher_name), data, config, model.trust_remote_code)
    n = len(blocks)
    shard_blocks = max(1, config.shard_tokens // config.block_size)
    identity = data_identity(blocks, config.split, bos)
    t_hash = teacher_hash(teacher_name)
    plan = {"format": FORMAT, "data": identity, "teacher_hash": t_hash, "k": config.k,
            "block_size": config.block_size, "num_blocks": n, "shard_blocks": shard_blocks,
            "dtype": config.dtype, "batch_size": config.batch_size, "model_dtype": model.dtype}
    done = d.on_rank0(lambda: _begin(out, plan))
    if done is not None:
        if d.rank() == 0:
            print(f"[minitron] {out} already holds this teacher cache; not rebuilding it")
        return done
    if d.rank() == 0:
        print(f"[minitron] {size_line(n * config.block_size, config.k, config.dtype)}",
              file=sys.stderr)
    from minitron.models import load_model

    teacher = load_model(teacher_name, dtype=model.dtype, device=device,
                         trust_remote_code=model.trust_remote_code)[0].eval()
    spans = [(i, lo, min(lo + shard_blocks, n)) for i, lo in enumerate(range(0, n, shard_blocks))]
    # Listed by rank 0 for all, before any rank writes one: every rank splits the same list.
    todo = d.on_rank0(lambda: [s for s in spans if not (out / f"shard-{s[0]:05d}").is_dir()])
    reused = sum(hi - lo for i, lo, hi in spans if (i, lo, hi) not in todo) * config.block_size
    mine = todo[d.rank()::d.world()]
    bar = tqdm(total=n * config.block_size, initial=reused, desc="teacher cache", unit="tok",
               unit_scale=True, disable=not config.progress or d.rank() != 0, file=sys.stderr,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for i, lo, hi in mine:
            _write_shard(out, i, teacher, blocks, lo, hi - lo, config, bar)
    finally:
        bar.close()
    if d.dist_on():
        torch.distributed.barrier()  # every rank's shards are in place
    seconds = time.perf_counter() - t0
    computed = n * config.block_size - reused
    manifest = {
        "format": FORMAT, "plan": plan, "fingerprint": hashlib.sha1(
            json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16],
        "data": {**identity, "source": data.source},
        "teacher": {"name": str(teacher_name), "hash": t_hash, "dtype": model.dtype},
        "k": config.k, "vocab_size": int(t_cfg.vocab_size),
        "block_size": config.block_size, "num_blocks": n, "tokens": n * config.block_size,
        "dtype": config.dtype,
        "shards": [{"dir": f"shard-{i:05d}", "first_block": lo, "blocks": hi - lo}
                   for i, lo, hi in spans],
        "stats": {"seconds": round(seconds, 3), "tokens_computed": computed,
                  "tokens_reused": reused, "processes": d.world(),
                  "tokens_per_s": round(computed / seconds, 1) if computed and seconds else None},
    }
    d.on_rank0(lambda: write_json_atomic(out / MANIFEST, manifest))
    return manifest


# ----------------------------------------------------------------------------- CLI
def build_parser():
    from minitron import cli

    p = cli.stage_parser("python -m minitron.teacher_cache build", __doc__.splitlines()[0],
                         CLI_KEYS)
    p.add_argument("--model", required=True, help="the teacher: folder, hub id or 'smollm2-135m'")
    p.add_argument("--data", dest="data.source", default=argparse.SUPPRESS, metavar="SOURCE",
                   help="a prepared data folder (python -m minitron.data prepare) or any data "
                        "source the stages accept (same as data.source)")
    p.add_argument("--output", required=True, help="the cache folder")
    p.add_argument("--dry-run", action="store_true",
                   help="print the cache's size (tokens x bytes per token) and build nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    from minitron import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "build":
        raise MinitronError("usage: python -m minitron.teacher_cache build --model TEACHER --data "
                            "SOURCE --output DIR [teacher_cache.k=64 ...] (see build --help)")
    args = cli.parse(build_parser(), argv[1:])
    c = cli.configs(args)
    if args.dry_run:
        cc = c["teacher_cache"]
        tokens = max(1, cc.tokens // cc.block_size) * cc.block_size
        print(f"{size_line(tokens, cc.k, cc.dtype)} (at most: a smaller data split caches fewer "
              f"blocks); would write {args.output}")
        return 0
    m = build_cache(args.model, args.output, c["teacher_cache"], data=c["data"], model=c["model"])
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports
        return 0
    st = m["stats"]
    size = sum(f.stat().st_size for f in Path(args.output).rglob("*.bin"))
    print(f"wrote {args.output}: {m['tokens']} tokens x top-{m['k']} of {m['vocab_size']} "
          f"({size / 2**20:.1f} MiB; fingerprint {m['fingerprint']}; data {m['data']['fingerprint']}, "
          f"teacher {m['teacher']['hash']}); {st['tokens_computed']} tokens computed in "
          f"{st['seconds']:.1f} s ({st['tokens_per_s']} tokens/s), {st['tokens_reused']} reused")
    return 0


if __name__ == "__main__":
    run_cli(main)
