"""One gloo rank of test_distributed's background-checkpoint check (run as a script): the write
of an FSDP2 model's checkpoint is held open while the training's optimizer steps and collectives
run."""

import json
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.fsdp import fully_shard

from minitron import checkpoint

RELEASE = threading.Event()


class HeldWriter(HuggingFaceStorageWriter):
    """The real safetensors writer, whose shard writes start only when the rank lets them."""

    def write_data(self, plan, planner):
        if not RELEASE.wait(120):
            raise TimeoutError("the held write was never released")
        return super().write_data(plan, planner)


def main(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    group = dist.new_group(backend="gloo")  # as distill._checkpoint_group
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(24, 24) for _ in range(3)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))

    def train_step() -> None:  # FSDP2's all-gathers and reduce-scatters on the default group
        model(torch.randn(4, 24)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    train_step()
    runs = {name: Path(out) / name for name in ("sync", "async")}
    if rank == 0:
        for run in runs.values():
            run.mkdir()
    dist.barrier()
    state, rng = {"step": 1}, checkpoint.rng_state()
    checkpoint.save_checkpoint(runs["sync"], model, opt, sched, state, {}, rng=rng)
    checkpoint._writer = lambda tmp: HeldWriter(str(tmp), save_distributed=True)
    pending = checkpoint.save_checkpoint_async(runs["async"], model, opt, sched, state, {}, rng,
                                               group)
    for _ in range(3):
        train_step()
    total = torch.tensor([1.0])
    dist.all_reduce(total)
    in_flight = not pending.future.done() and not (runs["async"] / "checkpoint").exists()
    RELEASE.set()
    pending.wait()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(
        {"in_flight": in_flight, "all_reduce": total.item(),
         "committed": (runs["async"] / "checkpoint" / "state.json").exists()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
