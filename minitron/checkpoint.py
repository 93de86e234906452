"""What a distillation run keeps in its output folder so that a rerun resumes it: the latest
checkpoint (gathered full state, so it resumes on any process count), `metrics.jsonl` and its plot."""

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
from minitron.common import atomic_dir, write_json_atomic, write_text_atomic

CKPT = "checkpoint"


# ----------------------------------------------------------------------------- checkpoints
def find_checkpoint(run_dir: Path) -> Path | None:
    """The latest complete checkpoint; `.old-checkpoint-*` covers a kill between atomic_dir's renames."""
    ckpt = run_dir / CKPT
    if (ckpt / "state.json").exists():
        return ckpt
    olds = sorted(run_dir.glob(f".old-{CKPT}-*"), key=lambda p: p.stat().st_mtime)
    olds = [p for p in olds if (p / "state.json").exists()]
    return olds[-1] if olds else None


def save_checkpoint(run_dir: Path, trainee: nn.Module, optimizer, scheduler, state: dict[str, Any],
                    aliases: dict[str, str]) -> Path:
    """Gathered full weights (safetensors), optimizer (by parameter name) + scheduler, RNG states and
    the data position, atomically, by rank 0: a checkpoint resumes on any number of processes.

    Collective: every rank calls it. `trainee` is the loop's student + projections module (state
    names `student.*`, `projections.*`); `aliases` names its tied parameters.
    """
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    weights = distributed.full_state_dict(trainee, aliases)
    optim = get_optimizer_state_dict(trainee, optimizer, options=distributed.full_state_options())
    if distributed.rank() == 0:
        student = {k[len("student."):]: v for k, v in weights.items() if k.startswith("student.")}
        proj = {k[len("projections."):]: v for k, v in weights.items()
                if k.startswith("projections.")}
        with atomic_dir(run_dir / CKPT, overwrite=True) as tmp:
            save_file(student, str(tmp / "model.safetensors"))
            if proj:
                save_file(proj, str(tmp / "projections.safetensors"))
            torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()},
                       tmp / "optimizer.pt")
            rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                   "python_pos": random.getstate()[2]}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng.pt")
            write_json_atomic(tmp / "state.json", state)
        for old in run_dir.glob(f".old-{CKPT}-*"):
            shutil.rmtree(old, ignore_errors=True)
    if distributed.dist_on():
        dist.barrier()  # nobody goes on (or is killed) before the checkpoint is complete
    return run_dir / CKPT


def load_checkpoint(ckpt: Path, trainee: nn.Module, optimizer, scheduler,
                    aliases: dict[str, str]) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote, on any process count: rank 0 reads the files (tensors
    only: nothing is unpickled) and the engine scatters them. Collective; returns the state."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)

    weights, optim, rest = {}, {}, None
    if distributed.rank() == 0:
        student = load_file(ckpt / "model.safetensors")
        for alias, first in aliases.items():  # put tied names back, whichever one was written
            a, f = alias[len("student."):], first[len("student."):]
            if f in student or a in student:
                student.setdefault(a, student.get(f))
                student.setdefault(f, student[a])
        weights = {f"student.{k}": v for k, v in student.items()}
        if (ckpt / "projections.safetensors").exists():
            weights.update({f"projections.{k}": v for k, v in
                            load_file(ckpt / "projections.safetensors").items()})
        opt = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        optim = opt["optimizer"]
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
        rest = (opt["scheduler"], rng, json.loads((ckpt / "state.json").read_text()))
    options = distributed.full_state_options(broadcast_from_rank0=distributed.dist_on())
    set_model_state_dict(trainee, weights, options=options)
    set_optimizer_state_dict(trainee, optimizer, optim, options=options)
    if distributed.dist_on():
        box = [rest]
        dist.broadcast_object_list(box, src=0)
        rest = box[0]
    sched, rng, state = rest
    scheduler.load_state_dict(sched)
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(rng["python"]), rng["python_pos"]))
    if "cuda" in rng and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


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
