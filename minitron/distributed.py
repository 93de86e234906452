"""The distillation loop on K processes: starting torchrun, the process group, work that rank 0 does
alone, DDP or FSDP2 around the student, and its gathered full state. One plain process is K=1: no
group and no wrapper."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from minitron.common import MinitronError

if TYPE_CHECKING:
    from minitron.distill import DistillConfig


# ----------------------------------------------------------------------------- processes
def check_divisible(batch_size: int, world: int, name: str) -> None:
    if batch_size % world:
        raise MinitronError(
            f"batch_size={batch_size} does not split over {name}={world} processes: each process "
            f"takes batch_size / {world} sequences of every micro-batch; choose a batch_size that "
            f"is a multiple of {world}")


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist_on() else 0


def world() -> int:
    return dist.get_world_size() if dist_on() else 1


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 alone (file checks and writes); every rank gets its result, or its
    MinitronError, so all ranks go on, or stop, together."""
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except MinitronError as e:
            error = str(e)
    if dist_on():
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise MinitronError(error)
    return result


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist_on():
        t = t.clone()
        dist.all_reduce(t)  # SUM: gloo has no AVG
        t /= world()
    return t


def strategy(config: DistillConfig, device: torch.device) -> str:
    """ddp (replicated), fsdp (sharded over all ranks) or hsdp (a 2-D mesh: sharded inside a
    group of ranks, replicated across groups: shard inside a node, replicate across nodes)."""
    if config.strategy != "auto":
        return config.strategy
    return "fsdp" if device.type == "cuda" else "ddp"


@contextlib.contextmanager
def process_group(device: str | None, timeout_s: float = 1800.0):
    """Under torchrun: join the process group (NCCL on CUDA, gloo on CPU), bind this rank's GPU,
    yield the student's device, leave the group at the end. Outside torchrun: yield `device`.

    `timeout_s` bounds every collective: a rank that never arrives (a dead node) fails the others
    after that long instead of hanging them."""
    from minitron.models import default_device

    device = device or default_device()
    if not under_torchrun() or dist_on():
        yield device
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise MinitronError(f"local rank {local_rank} has no GPU: this node has "
                                f"{torch.cuda.device_count()}; start at most that many processes "
                                f"per node (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    from datetime import timedelta

    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            timeout=timedelta(seconds=timeout_s))
    try:
        yield device
    finally:
        dist.destroy_process_group()


def rendezvous_args(nnodes: int, endpoint: str | None, run_id: str) -> list[str]:
    """torchrun's rendezvous flags: one node alone (--standalone), or `nnodes` nodes meeting at
    `endpoint` (host:port of the c10d store, on the first node) under `run_id`; every node runs
    the same command and the rendezvous gives out the ranks."""
    if nnodes == 1 and endpoint is None:
        return ["--standalone"]
    if endpoint is None:
        raise MinitronError(f"nnodes={nnodes} needs rdzv_endpoint (host:port on the first node, "
                            f"the same on every node), e.g. --rdzv-endpoint node0:29500")
    return [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={run_id}"]


def launch_torchrun(module: str, argv: list[str], nproc: int, nnodes: int = 1,
                    rdzv_endpoint: str | None = None, rdzv_id: str = "minitron") -> None:
    """`python -m module argv` on `nproc` processes of this node under torchrun; wait for them.
    With `nnodes` > 1 this node joins the others through a c10d rendezvous at `rdzv_endpoint`.

    Their output streams through; when one fails (torchrun then stops the others) the first
    `error: ...` line a rank printed becomes this process's MinitronError.
    """
    import codecs

    cmd = [sys.executable, "-m", "torch.distributed.run",
           *rendezvous_args(nnodes, rdzv_endpoint, rdzv_id), f"--nproc-per-node={nproc}", "-m",
           module, *argv]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    print(f"[minitron] starting {nproc} processes: {' '.join(cmd[1:])}", file=sys.stderr)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env)
    decoder, tail = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    try:
        while chunk := proc.stderr.read1(1 << 16):
            text = decoder.decode(chunk)
            sys.stderr.write(text)
            sys.stderr.flush()
            tail = (tail + text)[-(1 << 20):]
        rc = proc.wait()
    except BaseException:
        proc.terminate()  # torchrun passes it on to its workers
        proc.wait()
        raise
    if rc:
        errors = re.findall(r"^(?:\[rank\d+\]:\s*)?error: (.+)$", tail, re.M)
        if errors:
            raise MinitronError(errors[0])
        # No message (killed, crashed): name the rank torchrun saw fail first.
        cause = re.search(r"Root Cause[^\n]*\n(?:.*\n)*?\s*rank\s*: (\d+).*\n"
                          r"\s*exitcode\s*: (-?\d+)(?:[^\n]*\((SIG\w+)\))?", tail)
        what = (f"rank {cause[1]} failed first (exit code {cause[2]}"
                f"{', ' + cause[3] if cause[3] else ''}); torchrun stopped the others"
                if cause else f"torchrun with {nproc} processes exited with code {rc}")
        raise MinitronError(f"{what}; the log is above")


def record_for_torchrun(error: Exception) -> None:
    """Put the message into torchrun's failure summary (its error file), not only into the log."""
    with contextlib.suppress(Exception):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(error)


# ----------------------------------------------------------------------------- DDP and FSDP2
def wrap_model(model: nn.Module, config: DistillConfig) -> nn.Module:
    """The module the loop calls: with one process `model` itself, else DDP or FSDP2 around it.
    `model` is the loop's trainee (FSDP2 shards each decoder layer of `model.student`, then the
    rest)."""
    if not dist_on():
        return model
    device = next(model.parameters()).device
    if strategy(config, device) == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # no trained buffers; a broadcast would tie eval to lockstep
    from torch.distributed.fsdp import fully_shard

    from minitron import precision
    from minitron.models import decoder_layers

    # bf16 all-gathers and compute, fp32 reduce-scatters; the sharded parameters (the optimizer's
    # master weights) stay fp32.
    kw = {"mp_policy": p} if (p := precision.fsdp_policy(config.precision, device)) else {}
    if strategy(config, device) == "hsdp":
        kw["mesh"] = hybrid_mesh(device.type, config.hsdp_shard_size)
    for layer in decoder_layers(model.student):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)  # the root: embeddings, final norm, LM head, projections
    return model


def hybrid_mesh(device_type: str, shard_size: int | None):
    """The 2-D device mesh of hybrid sharding: ("replicate", "shard"), shard groups of
    `shard_size` consecutive ranks (default: the ranks of one node, LOCAL_WORLD_SIZE)."""
    from torch.distributed.device_mesh import init_device_mesh

    size = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world()))
    if size < 1 or world() % size:
        raise MinitronError(f"hsdp_shard_size={size} does not divide the {world()} processes; "
                            f"choose a divisor of {world()} (the processes of one node by default)")
    return init_device_mesh(device_type, (world() // size, size),
                            mesh_dim_names=("replicate", "shard"))


def grad_sync(model: nn.Module, last: bool, fsdp_unsynced: bool = False):
    """DDP: all-reduce on the last micro-batch of an optimizer step only (its gradients are whole
    either way). FSDP2: reduce-scatter every micro-batch, so each rank holds only its shard of the
    gradients between micro-batches; `fsdp_unsynced` defers it to the last one instead (less
    communication, but every rank keeps whole unsharded fp32 gradients in between)."""
    if not dist_on():
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if last else model.no_sync()
    model.set_requires_gradient_sync(last or not fsdp_unsynced)  # FSDP2
    return contextlib.nullcontext()


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """{second name: first name} of parameters registered twice (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def full_state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Gathered to rank 0's CPU when distributed; the K=1 case is the plain state dict.
    return StateDictOptions(full_state_dict=True, cpu_offload=dist_on(), **kw)


def full_state_dict(module: nn.Module, aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The whole, unsharded state of `module` (plain, DDP or FSDP2-sharded) on rank 0, tied aliases
    dropped; other ranks get {}. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(module, options=full_state_options())
    if rank() != 0:
        return {}
    drop = set(aliases if aliases is not None else tied_aliases(module))
    return {k: v.detach().cpu().contiguous() for k, v in sd.items() if k not in drop}
