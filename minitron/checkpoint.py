"""What a distillation run keeps in its output folder so that a rerun resumes it: the latest
checkpoint (sharded by torch.distributed.checkpoint, resharded on load, so it resumes on any
process count), `metrics.jsonl` and its plot."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from minitron import distributed
from minitron.common import (LOCK_SUFFIX, claim, clean_stale, release, write_json_atomic,
                             write_text_atomic)

CKPT = "checkpoint"


# ----------------------------------------------------------------------------- checkpoints
def find_checkpoint(run_dir: Path) -> Path | None:
    """The latest complete checkpoint; `.old-checkpoint-*` covers a kill between save's renames."""
    ckpt = run_dir / CKPT
    if (ckpt / "state.json").exists():
        return ckpt
    olds = sorted(run_dir.glob(f".old-{CKPT}-*"), key=lambda p: p.stat().st_mtime)
    olds = [p for p in olds if (p / "state.json").exists()]
    return olds[-1] if olds else None


def _tensor_state(trainee: nn.Module, optimizer, aliases: dict[str, str]) -> tuple[dict, dict]:
    """What the shards hold: the model's and the optimizer's tensors, as this process holds them
    (DTensor shards under FSDP2, whole tensors otherwise), tied aliases dropped (loading the first
    name fills both); and the optimizer's param_groups (plain numbers, saved as JSON)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(trainee, optimizer)
    model = {k: v for k, v in model.items() if k not in aliases}
    return {"model": model, "optim": optim["state"]}, optim["param_groups"]


def save_checkpoint(run_dir: Path, trainee: nn.Module, optimizer, scheduler, state: dict[str, Any],
                    aliases: dict[str, str], rng: dict[str, Any] | None = None) -> Path:
    """A sharded checkpoint (torch.distributed.checkpoint): every rank writes its own shard of the
    weights and optimizer state as safetensors (no rank gathers the whole state), rank 0 the
    scheduler, RNG states, param groups and the data position (`state`). All of it goes into a
    temporary folder that rank 0 renames into place once every rank is done: a killed run leaves
    the previous checkpoint intact. It resumes on any number of processes (resharded on load).

    Collective: every rank calls it. `trainee` is the loop's student + projections module (state
    names `student.*`, `projections.*`); `aliases` names its tied parameters; `rng`: the RNG
    states to store (taken earlier, `rng_state()`), else the current ones.
    """
    import torch.distributed.checkpoint as dcp

    tmp, lock = _open_tmp(run_dir, state["step"])
    tensors, groups = _tensor_state(trainee, optimizer, aliases)
    with _one_process_quiet():
        dcp.save(tensors, storage_writer=_writer(tmp))
    _write_trainer_files(tmp, scheduler, groups, state, rng)
    _barrier()  # every shard is on disk before the folder becomes the checkpoint
    _commit(run_dir, tmp, lock)
    _barrier()  # nobody goes on (or is killed) before the checkpoint is complete
    return run_dir / CKPT


class PendingCheckpoint:
    """A checkpoint that `save_checkpoint_async` is writing in the background. It becomes the
    run's checkpoint (the rename) only once every rank's shards are on disk: `wait()` (collective)
    blocks until then (and raises a failed write's error); `commit_if_written()` (no collective;
    a failed write is left for `wait()` to raise) commits it early when it is."""

    def __init__(self, run_dir: Path, tmp: Path, lock: int | None, step: int, future: Future):
        self.run_dir, self.tmp, self.lock, self.step = run_dir, tmp, lock, step
        self.future = future
        self.committed = False

    def commit_if_written(self) -> None:
        if self.future.done() and self.future.exception() is None:
            self._commit()

    def wait(self) -> Path:
        """Collective: every rank calls it, in the main thread, at the same point of the loop."""
        self._commit()
        _barrier()  # as in save_checkpoint: nobody goes on before the checkpoint is complete
        return self.run_dir / CKPT

    def _commit(self) -> None:
        if self.committed:
            return
        # DCP's last step gathers every rank's write results on rank 0 and runs the writer's
        # `finish` there before any rank's future completes: when rank 0's future is done, every
        # shard is written (and fsynced: the writer's sync_files). It raises a rank's write error.
        self.future.result()
        _commit(self.run_dir, self.tmp, self.lock)
        self.committed = True


def save_checkpoint_async(run_dir: Path, trainee: nn.Module, optimizer, scheduler,
                          state: dict[str, Any], aliases: dict[str, str], rng: dict[str, Any],
                          group: dist.ProcessGroup | None) -> PendingCheckpoint:
    """`save_checkpoint`'s checkpoint, written in a background thread (`dcp.async_save`); training
    goes on once each rank's tensors are copied to host memory, so the next optimizer step cannot
    change what is written. Rank 0 writes the small files at once; the folder is renamed into place
    by the returned handle's `wait()` (or earlier, `commit_if_written()`), only when every rank's
    shards are written, so a run killed meanwhile resumes from the previous checkpoint.

    Collective: every rank calls it. `group`: a gloo process group of all ranks used by nothing
    else (None in one process): the background thread's collectives (DCP's plan and result
    exchanges) must not interleave with the training's on the default group.
    """
    import torch.distributed.checkpoint as dcp

    tmp, lock = _open_tmp(run_dir, state["step"])
    tensors, groups = _tensor_state(trainee, optimizer, aliases)
    _write_trainer_files(tmp, scheduler, groups, state, rng)
    if group is None:
        _ignore_one_process_warning()
    # The safetensors writer is a BlockingAsyncStager: async_save copies the state into fresh
    # host tensors (also tensors already on the CPU) before it returns, and returns the write's
    # future.
    future = dcp.async_save(tensors, storage_writer=_writer(tmp), process_group=group)
    return PendingCheckpoint(run_dir, tmp, lock, state["step"], future)


def _open_tmp(run_dir: Path, step: int) -> tuple[Path, int | None]:
    """The checkpoint's temporary folder, made by rank 0 under its lock (the lock first: a later
    start removes the folder if this process dies); returns it and rank 0's lock."""
    tmp = run_dir / f".tmp-{CKPT}-{step}"
    lock = None
    if distributed.rank() == 0:
        clean_stale(run_dir / CKPT)  # left by a run killed while saving
        for stale in run_dir.glob(f".tmp-{CKPT}-*"):  # ... by an older version (no lock file)
            if stale.is_dir() and not stale.with_name(stale.name + LOCK_SUFFIX).exists():
                shutil.rmtree(stale, ignore_errors=True)
        lock = claim(tmp, run_dir / CKPT)
        tmp.mkdir(parents=True)
    _barrier()
    return tmp, lock


def _writer(tmp: Path):
    """The shards' storage: every rank writes its own safetensors file."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    return HuggingFaceStorageWriter(str(tmp), save_distributed=True)


def _write_trainer_files(tmp: Path, scheduler, groups: list[dict], state: dict[str, Any],
                         rng: dict[str, Any] | None) -> None:
    """Rank 0: the scheduler and RNG states, the param groups and the data position."""
    if distributed.rank() != 0:
        return
    torch.save({"scheduler": scheduler.state_dict(), "rng": rng or rng_state()}, tmp / "trainer.pt")
    write_json_atomic(tmp / "param_groups.json", groups)
    write_json_atomic(tmp / "state.json", {**state, "world_size": distributed.world()})


def _commit(run_dir: Path, tmp: Path, lock: int | None) -> None:
    """Rank 0: the complete folder becomes `checkpoint/`; the previous one is removed only after
    (`find_checkpoint` takes `.old-checkpoint-*` if a kill comes between the renames)."""
    if distributed.rank() != 0:
        return
    final = run_dir / CKPT
    if final.exists():
        final.rename(run_dir / f".old-{CKPT}-{os.getpid()}")
    tmp.rename(final)
    release(tmp, lock)
    for old in run_dir.glob(f".old-{CKPT}-*"):
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: Path, trainee: nn.Module, optimizer, scheduler,
                    aliases: dict[str, str]) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote, on any process count: each rank reads the parts of
    the shards it now holds (safetensors only: nothing is unpickled but plain tensors and
    numbers). Collective; returns the state (the data position)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    tensors, _ = _tensor_state(trainee, optimizer, aliases)
    with _one_process_quiet():
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(ckpt)))
    groups = json.loads((ckpt / "param_groups.json").read_text())
    for group in groups:  # JSON made the tuples lists
        group.update({k: tuple(v) for k, v in group.items() if k == "betas"})
    model = dict(tensors["model"])
    model.update({alias: model[first] for alias, first in aliases.items() if first in model})
    set_state_dict(trainee, optimizer, model_state_dict=model,
                   optim_state_dict={"state": tensors["optim"], "param_groups": groups})
    extra = torch.load(ckpt / "trainer.pt", weights_only=True, map_location="cpu")
    scheduler.load_state_dict(extra["scheduler"])
    rng = extra["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(rng["python"]), rng["python_pos"]))
    if "cuda" in rng and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((ckpt / "state.json").read_text())


def rng_state() -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
           "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


# DCP warns that it assumes one process when there is no process group: that is the K=1 case.
ONE_PROCESS_WARNING = "torch.distributed is disabled"


def _ignore_one_process_warning() -> None:
    """`_one_process_quiet` for a save in a background thread, which a `catch_warnings` around
    the call does not cover (the warning comes later): this one message, for the process. Set at
    every save: a caller's `catch_warnings` may have restored the filters since the last one
    (`filterwarnings` replaces an identical filter, so the list does not grow)."""
    import warnings

    warnings.filterwarnings("ignore", message=ONE_PROCESS_WARNING)


@contextlib.contextmanager
def _one_process_quiet():
    """No ONE_PROCESS_WARNING from the DCP call inside."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ONE_PROCESS_WARNING)
        yield


def _barrier() -> None:
    if distributed.dist_on():
        dist.barrier()


# ----------------------------------------------------------------------------- logging
class NullLog:
    """What ranks other than 0 log to."""

    records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        pass


class MetricsLog:
    """Append-only JSONL of train and eval records; on resume, records past the checkpoint go."""

    def __init__(self, path: Path, keep_up_to: int | None = None):
        """Read `path`; with `keep_up_to`, drop (and rewrite without) records of later steps."""
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    self.records.append(json.loads(line))
        if keep_up_to is not None:
            self.records = [r for r in self.records if r.get("step", 0) <= keep_up_to]
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Train and held-out loss against training tokens, as a PNG (matplotlib Agg)."""
    # An Agg canvas of our own: no pyplot, so no global backend switch and no GUI in the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=0.8, label="train loss")
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                label="held-out CE loss")
        if any("kl_to_teacher" in r for r in evals):
            ax.plot([r["tokens"] for r in evals], [r.get("kl_to_teacher") for r in evals], "s--",
                    label="held-out KL to teacher")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
