"""One gloo rank of test_scale_runs' streamed-write memory check (run as a script)."""

import json
import re
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from minitron import distributed


def main(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    with torch.device("meta"):
        model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(16)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.to_local().fill_(float(i))  # every rank only ever allocates its shards

    def status_mb(key: str) -> float:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) / 1024

    def growth_mb(action):
        """Peak RSS during `action` above the RSS before it. The lifetime peak (ru_maxrss) cannot
        be used: an earlier, higher moment (imports, set-up) hides the growth; Linux resets the
        peak (VmHWM) on writing 5 to clear_refs."""
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status_mb("VmRSS")
        result = action()
        return status_mb("VmHWM") - before, result

    streamed, _ = growth_mb(lambda: distributed.write_streamed_safetensors(
        f"{out}/streamed.safetensors", model))
    # today's final-model path: all of it on rank 0
    gathered, whole = growth_mb(lambda: distributed.full_state_dict(model))
    if rank == 0:
        json.dump({"streamed_mb": streamed, "gathered_mb": gathered,
                   "model_mb": sum(v.numel() * 4 for v in whole.values()) / 2**20},
                  open(f"{out}/peak.json", "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
