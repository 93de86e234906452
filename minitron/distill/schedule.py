"""The schedule and the data order of a distillation: micro-steps per optimizer step, the
learning-rate factor, and which train blocks each rank reads at each step (`batch_indices`)."""

from __future__ import annotations

import hashlib
import math

import torch

from minitron.config import DistillConfig


def micro_steps(config: DistillConfig, world: int) -> int:
    """Forward/backward passes per process per optimizer step."""
    if config.micro_batch_size is None:
        return config.grad_accum
    return config.batch_size * config.grad_accum // (config.micro_batch_size * world)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step`: linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, micro: int, n_blocks: int, config: DistillConfig,
                  rank: int = 0, world: int = 1) -> torch.Tensor:
    """Block indices of one rank's micro-batch: a pure function of (seed, step, micro).

    Global sample g = (step * grad_accum + micro) * batch_size + j walks a fresh seeded permutation
    of the train blocks each epoch; rank r of `world` takes the samples with j % world == r, so ranks
    read disjoint shares and the global order does not depend on the process count. With a
    per-process `micro_batch_size` m, the step's samples are cut into runs of m and run
    micro * world + r goes to rank r: the same samples per step, whatever the process count.

    With `config.skip_blocks` = s (blocks an earlier stage read), the run's own blocks are rows
    [s, n_blocks) and the permutation walks those only, so a later stage never repeats one.
    """
    if config.micro_batch_size is not None:
        m = config.micro_batch_size
        start = step * config.batch_size * config.grad_accum + (micro * world + rank) * m
        samples = range(start, start + m)
    else:
        start = (step * config.grad_accum + micro) * config.batch_size
        samples = range(start + rank, start + config.batch_size, world)
    skip = config.skip_blocks
    own = n_blocks - skip
    out = []
    for g in samples:
        epoch, pos = divmod(g, own)
        out.append(skip + int(_permutation(own, config.seed, epoch)[pos]))
    return torch.tensor(out, dtype=torch.long)


_PERM_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 8:
            _PERM_CACHE.clear()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _PERM_CACHE[key] = torch.randperm(n, generator=gen)
    return _PERM_CACHE[key]


def blocks_fingerprint(blocks) -> str:
    """Shards' blocks (`minitron.shards.BlockView`) name their manifest's fingerprint, so nothing
    hashes a corpus; an in-memory tensor is hashed."""
    if hasattr(blocks, "fingerprint"):
        return blocks.fingerprint
    return hashlib.sha1(blocks.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def run_blocks(tokenizer, data, config: DistillConfig, max_positions: int | None):
    """A run's train blocks (the first `config.blocks_read` of the train split, in the order
    `batch_indices` walks; from a prepared folder they stay on disk, read by index per micro-batch)
    and its held-out eval blocks (seed 0: the same for every run)."""
    from minitron.data import load_blocks, open_blocks

    train = open_blocks(tokenizer, "train", config.blocks_read, source=data.source,
                        block_size=config.block_size, seed=config.seed,
                        text_field=data.text_field, max_positions=max_positions)
    evals = load_blocks(tokenizer, "eval", config.eval_blocks, source=data.source,
                        block_size=config.block_size, seed=0, text_field=data.text_field,
                        max_positions=max_positions)
    return train, evals
