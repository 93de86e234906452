"""The distillation loop on K processes: starting the processes, the process group, work that rank 0 does
alone, DDP or FSDP2 around the student, and its gathered full state. One plain process is K=1: no
group and no wrapper."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import uuid
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from minitron.common import LOG_DIR_ENV, MinitronError  # noqa: F401  (LOG_DIR_ENV: distill sets it)


# ----------------------------------------------------------------------------- processes

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


def nodes() -> int:
    """How many nodes the process group spans (torchrun's LOCAL_WORLD_SIZE ranks on each)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world()) or 1)
    return max(world() // max(local, 1), 1)


def strategy(name: str, device: torch.device, n_nodes: int | None = None) -> str:
    """The wrapper `name` means on `device`: ddp (replicated), fsdp (sharded over all ranks) or
    hsdp (a 2-D mesh: sharded inside a group of ranks, replicated across groups: shard inside a
    node, replicate across nodes); auto is FSDP on the GPUs of one node, HSDP on GPUs across
    `n_nodes` > 1 (default: what the process group spans): its all-gathers and reduce-scatters
    stay on a node's NVLink, only the gradient all-reduce crosses nodes; DDP on CPU."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "ddp"
    return "hsdp" if (n_nodes if n_nodes is not None else nodes()) > 1 else "fsdp"


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
        # FSDP's modules and states hold the group in reference cycles: free them while the
        # group and the interpreter are whole, not during interpreter shutdown (a finished
        # two-rank gloo run once aborted there: "terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def launch_config(nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
                  rdzv_id: str | None = None, max_restarts: int = 0):
    """torch's elastic LaunchConfig: one node alone (a local c10d store on a free port), or
    `nnodes` nodes meeting at `rdzv_endpoint` (host:port of the c10d store, on the first node)
    under `rdzv_id`; every node runs the same command and the rendezvous gives out the ranks.
    `max_restarts`: how often the launcher restarts all ranks after one fails (they resume from
    the last checkpoint), as torchrun's --max-restarts."""
    from torch.distributed.launcher.api import LaunchConfig

    if nnodes > 1 and rdzv_endpoint is None:
        raise MinitronError(f"nnodes={nnodes} needs rdzv_endpoint (host:port on the first node, "
                            f"the same on every node), e.g. --rdzv-endpoint node0:29500")
    return LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc,
                        run_id=rdzv_id or str(uuid.uuid4()), rdzv_backend="c10d",
                        rdzv_endpoint=rdzv_endpoint or "localhost:0", max_restarts=max_restarts,
                        monitor_interval=0.1)  # torchrun's default


def launch_torchrun(module: str, argv: list[str], nproc: int, nnodes: int = 1,
                    rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
                    max_restarts: int = 0) -> None:
    """`python -m module argv` on `nproc` processes of this node under torch's elastic launcher
    (what `torchrun` runs); wait for them. With `nnodes` > 1 this node joins the others through a
    c10d rendezvous at `rdzv_endpoint`.

    Their output streams through. When one fails (the launcher then stops the others), each failed
    rank has one line: a rank that recorded its message (`record_for_torchrun`, `child_failure`:
    its traceback is in its log file) printed it itself; here a line for each other one (its exit
    code or signal), and last the one that caused the stop, as this process's MinitronError. The
    launcher's own log lines are shown with `--debug` only.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    config = launch_config(nproc, nnodes, rdzv_endpoint, rdzv_id, max_restarts)
    print(f"[minitron] starting {nproc} processes"
          + (f" on each of {nnodes} nodes" if nnodes > 1 else "")
          + f": python -m {module} {' '.join(argv)}", file=sys.stderr)
    try:
        with _launcher_quiet():
            elastic_launch(config, entrypoint=sys.executable)("-m", module, *argv)
    except ChildFailedError as e:
        cause, failure = root_failure(e.failures)
        for r, f in sorted(e.failures.items()):
            if r != cause and _recorded(f) is None:  # a rank that recorded a message printed it
                print(f"error: {failure_message(r, f, cause)}", file=sys.stderr)
        raise MinitronError(failure_message(cause, failure)) from None


@contextlib.contextmanager
def _launcher_quiet():
    """torch's elastic agent logs each worker it stops and each failure (with the tracebacks the
    workers recorded); our summary says the same in a line per rank, so its log waits for
    `--debug`."""
    import logging

    from minitron.common import debug_mode

    log = logging.getLogger("torch.distributed.elastic")
    level = log.level
    if not debug_mode():
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _recorded(failure: Any) -> str | None:
    """The message a rank recorded (`record_for_torchrun`) in its error file, if any."""
    data = failure.error_file_data.get("message")
    return str(data.get("message", "")) if isinstance(data, dict) else None


def _blame(failure: Any) -> int:
    """How likely a failed rank caused the stop (lower: likelier)."""
    message = _recorded(failure)
    if message is not None and message.startswith("MinitronError: "):
        return 0  # a rank that knew what went wrong
    if failure.exitcode < 0 and failure.exitcode != -signal.SIGTERM:
        return 1  # killed from outside (SIGKILL, the OOM killer, a segfault)
    if failure.exitcode > 0:
        return 2  # crashed, maybe because a peer's collective broke (`child_failure`)
    return 3  # SIGTERM: what the launcher sends the other ranks when it stops them


def root_failure(failures: dict[int, Any]) -> tuple[int, Any]:
    """The rank that caused the stop. Timestamps have one-second resolution and the ranks that
    fell with it tie, so what each failure record says decides first, then time, then rank."""
    return min(failures.items(), key=lambda kv: (_blame(kv[1]), kv[1].timestamp, kv[0]))


def failure_message(rank: int, failure: Any, cause: int | None = None) -> str:
    """One line from a worker's failure record (torch's ProcessFailure); `cause`: the rank that
    caused the stop, when this is another one."""
    message = _recorded(failure)
    if message is not None:
        message = message.removeprefix("MinitronError: ").removeprefix("RankFailure: ")
        return f"rank {rank}: {message}"
    if cause is not None and cause != rank and failure.exitcode == -signal.SIGTERM:
        return f"rank {rank} was stopped by the launcher (SIGTERM) after rank {cause} failed"
    if failure.exitcode < 0:
        return (f"rank {rank} died ({failure.signal_name()}) with no error message; the "
                f"launcher stopped the others; the log is above")
    return (f"rank {rank} failed first (exit code {failure.exitcode}) with no error message; the "
            f"launcher stopped the others; the log is above")


def record_for_torchrun(error: Exception) -> None:
    """Put the message into torchrun's failure summary (its error file), not only into the log.

    The record torch's `ErrorHandler.record_exception` writes, but atomically: it opens the file
    and then writes it, and the launcher, stopping this rank meanwhile (its peer died), read it
    empty once and crashed on the JSON instead of reporting the failure (a loaded 2-core run)."""
    import time
    import traceback

    from minitron.common import write_json_atomic

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": f"{type(error).__name__}: {error}",
                          "extraInfo": {"py_callstack": traceback.format_exc(),
                                        "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):
        write_json_atomic(path, record)


# ----------------------------------------------------------------------------- DDP and FSDP2
def wrap_model(model: nn.Module, strategy_name: str, precision_name: str = "auto",
               hsdp_shard_size: int | None = None) -> nn.Module:
    """The module the loop calls: with one process `model` itself, else DDP or FSDP2 around it
    (`strategy_name`: auto, ddp, fsdp, hsdp (over groups of `hsdp_shard_size` ranks); `precision_name`: the precision policy's name).
    `model` is the loop's trainee (FSDP2 shards each decoder layer of `model.student`, then the
    rest)."""
    if not dist_on():
        return model
    device = next(model.parameters()).device
    if strategy(strategy_name, device) == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # no trained buffers; a broadcast would tie eval to lockstep
    from torch.distributed.fsdp import fully_shard

    from minitron import precision
    from minitron.models import decoder_layers

    # bf16 all-gathers and compute, fp32 reduce-scatters; the sharded parameters (the optimizer's
    # master weights) stay fp32.
    kw = {"mp_policy": p} if (p := precision.fsdp_policy(precision_name, device)) else {}
    if strategy(strategy_name, device) == "hsdp":
        # a student still on the meta device (built before its weights) shards for the CPU
        kw["mesh"] = hybrid_mesh("cpu" if device.type == "meta" else device.type, hsdp_shard_size)
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


# ----------------------------------------------------------------------------- streamed full state
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL",
                       torch.float64: "F64", torch.uint8: "U8", torch.int8: "I8"}


def full_tensors(module: nn.Module, aliases: dict[str, str] | None = None):
    """(name, whole tensor) for each entry of `module`'s state dict (tied aliases dropped), one at
    a time: a sharded DTensor is all-gathered (`full_tensor()`, a collective, so every rank
    iterates the same names in the same order) and dropped before the next, so no rank ever holds
    more than one whole tensor beside its shards (a whole-model gather holds all of them)."""
    drop = set(aliases if aliases is not None else tied_aliases(module))
    for name, t in module.state_dict().items():
        if name in drop:
            continue
        yield name, (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def write_streamed_safetensors(path, module: nn.Module, aliases: dict[str, str] | None = None,
                               on_tensor: Callable[[str, torch.Tensor], None] | None = None,
                               dtype: torch.dtype | None = None,
                               metadata: dict[str, str] | None = None) -> None:
    """Write `module`'s whole state as one safetensors file at `path` from rank 0, tensor by
    tensor: the header first (names, dtypes and global shapes are known without gathering), then
    each tensor's bytes as it is gathered. Collective; `on_tensor(name, whole)` sees each tensor on
    every rank (to copy it somewhere). The file is what `safetensors.torch.save_file` writes for
    the same tensors (an atomic rename into place). `dtype`: floating tensors are written in it
    (e.g. bf16 for a bf16 source; None: as they are); `metadata`: the header's `__metadata__`."""
    import json
    import struct

    def cast(t_dtype: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and t_dtype.is_floating_point else t_dtype

    drop = set(aliases if aliases is not None else tied_aliases(module))
    specs: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in module.state_dict().items():
        if name in drop:
            continue
        size = t.numel() * cast(t.dtype).itemsize
        specs[name] = {"dtype": _SAFETENSORS_DTYPES[cast(t.dtype)], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    out = None
    if rank() == 0:
        header = json.dumps(specs, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        tmp = f"{path}.tmp-{os.getpid()}"
        out = open(tmp, "wb")
        out.write(struct.pack("<Q", len(header)) + header)
    try:
        for name, whole in full_tensors(module, aliases):
            if on_tensor is not None:
                on_tensor(name, whole)
            if out is not None:
                host = whole.to(cast(whole.dtype)).cpu().contiguous()
                if host.numel():  # its own bytes, no copy
                    out.write(memoryview(host.view(torch.uint8).numpy()))
                del host
            del whole
    finally:
        if out is not None:
            out.close()
    if out is not None:
        os.replace(tmp, path)
