"""What a distillation run keeps in its output folder so that a rerun resumes it: the latest
checkpoint (sharded by torch.distributed.checkpoint, resharded on load, so it resumes on any
process count), `metrics.jsonl` and its plot."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
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
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    tmp = run_dir / f".tmp-{CKPT}-{state['step']}"
    lock = None
    if distributed.rank() == 0:
        clean_stale(run_dir / CKPT)  # left by a run killed while saving
        for stale in run_dir.glob(f".tmp-{CKPT}-*"):  # ... by an older version (no lock file)
            if stale.is_dir() and not stale.with_name(stale.name + LOCK_SUFFIX).exists():
                shutil.rmtree(stale, ignore_errors=True)
        lock = claim(tmp, run_dir / CKPT)  # first: a later start removes it if this process dies
        tmp.mkdir(parents=True)
    _barrier()
    tensors, groups = _tensor_state(trainee, optimizer, aliases)
    with _one_process_quiet():
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    if distributed.rank() == 0:
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng or rng_state()},
                   tmp / "trainer.pt")
        write_json_atomic(tmp / "param_groups.json", groups)
        write_json_atomic(tmp / "state.json", {**state, "world_size": distributed.world()})
    _barrier()  # every shard is on disk before the folder becomes the checkpoint
    if distributed.rank() == 0:
        final = run_dir / CKPT
        if final.exists():
            old = run_dir / f".old-{CKPT}-{os.getpid()}"
            final.rename(old)
        tmp.rename(final)
        release(tmp, lock)
        for old in run_dir.glob(f".old-{CKPT}-*"):
            shutil.rmtree(old, ignore_errors=True)
    _barrier()  # nobody goes on (or is killed) before the checkpoint is complete
    return run_dir / CKPT


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


@contextlib.contextmanager
def _one_process_quiet():
    """DCP warns that it assumes one process when there is no process group: that is the K=1 case."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
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
