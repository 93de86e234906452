"""PyTorch's FSDP2 memory tracker on one simulated rank of a distillation step: the reference the
memory plan (`minitron.memory_plan`) is checked against (tests/test_memory_plan.py) and measured at
full depth with (benchmarks/memory_plan_check.py).

One rank of `world` under a fake process group, every tensor a fake tensor, so real 8B-12B shapes
cost no memory. The step is minitron's own: `distill.losses._Trainee` with its `LossSetup` (teacher forward
under no_grad, the fused linear+KL loss), wrapped by `distributed.wrap_model` (fully_shard per
decoder layer, then the root, bf16 MixedPrecisionPolicy), under `precision.autocast`, then backward
and AdamW. Two steps run; the second is measured, with the optimizer state in place.

Two things differ from a GPU run, both on purpose:
- The Triton launches are no-ops: Triton cannot run on fake tensors. Every allocation of the fused
  loss is its launcher's own (torch.empty and friends), so the memory is still the real one.
- The teacher's weights are registered with the tracker by hand (`track_inputs`; FSDPMemTracker's
  `track_external` is a no-op). The tracker only sees tensors that come out of an op inside its
  context. A frozen module built outside it is picked up piecemeal: a weight whose view an op
  returns (the transpose inside every linear, the loss chunks' slices of the LM head) is counted
  the first time that happens, as an "activation", and one that no op views (the embedding table,
  the norms) is never counted. That is what made the tracker's total seem to grow by one teacher
  layer per layer (tests/test_memory_plan.py shows the mechanism on a plain Linear).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

GIB = 2**30


class _NoLaunch:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _no_triton_launches():
    import importlib

    skl = importlib.import_module("minitron.kernels.softmax_kl")
    with mock.patch.object(skl, "_softmax_kl_loss_kernel", _NoLaunch()), \
            mock.patch.object(skl, "_softmax_kl_grad_kernel", _NoLaunch()):
        yield


@contextlib.contextmanager
def _fake_process_group(world: int):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _models(teacher_cfg: dict, student_cfg: dict, teacher_dtype: torch.dtype, fake):
    """The teacher as fake tensors in its dtype; the student on the meta device (fp32), as the loop
    loads it before wrapping."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def config(d):
        return AutoConfig.for_model(**{**d, "use_cache": False})

    with fake:
        teacher = AutoModelForCausalLM.from_config(config(teacher_cfg), dtype=teacher_dtype)
        teacher.eval().requires_grad_(False)
    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(config(student_cfg), dtype=torch.float32)
    return teacher, student


def tracked_step_peak(teacher_cfg: dict, student_cfg: dict, config, world: int,
                      teacher_dtype: torch.dtype = torch.bfloat16,
                      register_teacher: bool = True, fake: bool = True,
                      strategy: str = "fsdp", hsdp_shard_size: int | None = None) -> dict[str, int]:
    """The tracker's snapshot (bytes per category, and "Total") at the root module's peak of the
    second training step's forward or backward, on rank 0 of `world`, with DistillConfig-like
    `config` (batch_size, micro_batch_size, block_size, gradient_checkpointing). `fake=False`: real
    tensors in the process group this process has joined (small shapes; a cross-check of the fake
    run). `strategy` "hsdp": shard groups of `hsdp_shard_size` ranks on the fake group's mesh."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from minitron import distributed, precision
    from minitron.distill.losses import LossSetup, _Trainee

    micro = getattr(config, "micro_batch_size", None) or max(config.batch_size // world, 1)
    group = _fake_process_group(world) if fake else contextlib.nullcontext()
    fake = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with _no_triton_launches(), group:
        teacher, student = _models(teacher_cfg, student_cfg, teacher_dtype, fake)
        if config.gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.train()
        trainee = distributed.wrap_model(_Trainee(student, None), strategy, "bf16",
                                         hsdp_shard_size)
        with fake:
            trainee.to_empty(device="cpu")
            head = teacher.get_output_embeddings().weight.detach()
            trainee.setup = LossSetup(teacher, config, head, fused=True)
            opt = torch.optim.AdamW(trainee.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
            ids = torch.zeros(micro, config.block_size, dtype=torch.long)
            tracker = FSDPMemTracker(trainee, opt)
            tracker.track_inputs((ids,))
            if register_teacher:
                tracker.track_inputs(tuple(teacher.parameters()) + tuple(teacher.buffers()))
            with tracker:
                for step in range(2):
                    with precision.autocast("bf16", "cpu"):
                        loss, _ = trainee(ids, loss=True)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if step == 0:
                        tracker.reset_mod_stats()
            # The root's forward and backward snapshots of the second step. (Its optimizer step's
            # snapshot counts DTensor temporaries the caching allocator would reuse; the optimizer
            # state itself is in every snapshot here.)
            snaps = tracker.memory_tracking[trainee].snapshots
            peak = max((s[torch.device("cpu")] for v in snaps.values() for s in v),
                       key=lambda s: s["Total"])
            return {getattr(k, "value", k): v for k, v in peak.items()}


def recipe_configs(path: str, depth_divisor: int = 1):
    """A recipe's teacher and student configs (dicts; the student is its pruned shape), their
    depths divided by `depth_divisor` (the widths, heads and vocabulary stay real), and the recipe."""
    from minitron.pipeline import check_plan, source_config
    from minitron.recipe import load_recipe

    recipe = load_recipe(path)
    source = source_config(recipe)
    shape, _ = check_plan(recipe, source)
    teacher = source.to_dict()
    student = {**teacher, **shape}
    for cfg in (teacher, student):
        cfg["num_hidden_layers"] = max(cfg["num_hidden_layers"] // depth_divisor, 1)
    return teacher, student, recipe
