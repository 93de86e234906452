"""The memory plan against PyTorch's FSDP2 memory tracker on fake tensors, at the real 8B / 12B widths.

The reference is `FSDPMemTracker` on one simulated rank of 8 (fake process group, fake tensors) running
minitron's own training step: the student wrapped by `distributed.wrap_model` (bf16
MixedPrecisionPolicy), activation checkpointing, the bf16 teacher, the fused linear+KL loss at 8192
tokens x the real vocabulary, backward and AdamW (tests/fsdp_tracker.py has the details and the
two departures from a GPU run: no Triton launches, the teacher's weights registered by hand). Each
large recipe runs at its real widths, heads, vocabulary and batch and an eighth of its depth (4/4,
4/2 and 5/5 decoder layers), the plan is computed for the same models, and the whole training-step
peak is compared, teacher included; the 8B width recipe also runs at a quarter of its depth, so that
the plan's increment per decoder layer is checked against the tracker's (full depth only repeats the
layer). The recipes' full depth is measured by benchmarks/memory_plan_check.py (results in
benchmarks/results/memory_plan-recipes.md).

The teacher must be registered with the tracker: left out, it is counted in part (the weights some
op views, as "activations"; not the embedding table), which looks like a per-layer growth the plan
lacks (the first test shows the mechanism on real tensors).
"""

import dataclasses
import functools
from types import SimpleNamespace

import pytest
import torch

from fsdp_tracker import GIB, recipe_configs, tracked_step_peak
from minitron.common import MinitronError
from minitron.memory_plan import Shape, check_fits, plan_distill

TOLERANCE = 0.15
pytestmark = pytest.mark.usefixtures("one_thread")


def _config(h, i, layers, vocab):
    return dict(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=vocab, tie_word_embeddings=False,
                max_position_embeddings=8192)


def _frozen_step_memory(register: bool) -> dict[str, int]:
    """What FSDPMemTracker holds after one step of an FSDP root that runs a frozen, unwrapped
    Embedding + Linear (the teacher's pattern), on real tensors; `register`: told about it first."""
    import torch.distributed as dist
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    frozen = torch.nn.Sequential(torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 512, bias=False))
    frozen.requires_grad_(False)

    class Root(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.frozen = torch.nn.Linear(512, 1, bias=False), [frozen]

        def forward(self, ids):
            with torch.no_grad():
                h = self.frozen[0](ids)
            return self.head(h).sum()

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        root = fully_shard(Root())
        tracker = FSDPMemTracker(root)
        if register:
            tracker.track_inputs(tuple(frozen.parameters()))
        with tracker:
            root(torch.zeros(4, dtype=torch.long)).backward()
            snap = tracker.get_tracker_snapshot("current")[torch.device("cpu")]
        return {getattr(k, "value", k): v for k, v in snap.items() if v}
    finally:
        dist.destroy_process_group()


def test_tracker_counts_an_unregistered_frozen_model_only_where_an_op_views_its_weights():
    # Why the teacher is registered by hand: unregistered, the Linear's weight (viewed by the
    # transpose inside linear) is counted, as an activation that outlives the step, and the
    # embedding table (never viewed) is not counted at all.
    linear, embedding = 512 * 64 * 4, 1000 * 64 * 4
    seen = _frozen_step_memory(register=False)
    assert seen["Activation"] == linear
    registered = _frozen_step_memory(register=True)
    assert "Activation" not in registered and registered["Inputs"] == linear + embedding
    assert registered["Total"] - seen["Total"] == embedding


LARGE = ["llama-3.1-8b-to-4b-width", "llama-3.1-8b-to-4b-depth", "mistral-nemo-12b-to-8b"]


@functools.lru_cache(maxsize=None)
def _plan_and_tracker(recipe: str, depth_divisor: int) -> tuple[int, int, int, dict[str, int]]:
    """(teacher layers, planned train-step peak, tracked peak, tracker categories), bytes."""
    teacher, student, r = recipe_configs(f"recipes/{recipe}.yaml", depth_divisor)
    world = r.distill.nproc_per_node
    # Every layer checkpointed (what the plan chooses for these recipes at full depth on 80 GB).
    config = dataclasses.replace(r.distill, gradient_checkpointing=True)
    tracked = tracked_step_peak(teacher, student, config, world)
    plan = plan_distill(teacher, student, config, world, r.model.dtype, "fsdp")
    assert tracked["Inputs"] >= plan.terms["teacher weights"]  # the teacher is counted, whole
    print(f"{recipe} {teacher['num_hidden_layers']}/{student['num_hidden_layers']} layers: "
          f"plan {plan.phases['train step'] / GIB:.2f} GiB, tracker {tracked['Total'] / GIB:.2f} GiB")
    return teacher["num_hidden_layers"], plan.phases["train step"], tracked["Total"], tracked


@pytest.mark.parametrize("recipe", LARGE)
def test_plan_matches_fsdp_memory_tracker(recipe):
    _, planned, tracked, _ = _plan_and_tracker(recipe, 8)
    assert abs(planned - tracked) <= TOLERANCE * tracked


def test_plan_grows_per_layer_as_the_tracker_does():
    # Full depth repeats the decoder layer: the plan's increment per added layer (teacher and
    # student) must be the tracker's, or the full-depth totals drift apart.
    (l1, p1, t1, _), (l2, p2, t2, _) = (_plan_and_tracker("llama-3.1-8b-to-4b-width", d) for d in (8, 4))
    plan_slope, tracker_slope = (p2 - p1) / (l2 - l1), (t2 - t1) / (l2 - l1)
    print(f"per layer: plan {plan_slope / GIB:.3f} GiB, tracker {tracker_slope / GIB:.3f} GiB")
    assert abs(plan_slope - tracker_slope) <= TOLERANCE * tracker_slope


def test_plan_refuses_naming_the_biggest_term():
    llama = _config(4096, 14336, 32, 128256)
    config = SimpleNamespace(batch_size=8, block_size=8192, grad_accum=144, gradient_checkpointing=False,
                             loss_impl="logits", eval_batch_size=8, fsdp_unsynced_accum=False,
                             teacher_correction_tokens=0)
    plan = plan_distill(llama, _config(3072, 9216, 32, 128256), config, world=1)
    with pytest.raises(MinitronError, match=r"biggest term is activations \("):
        check_fits(plan, 80 * 10**9)
    assert Shape.of(llama).params == 8_030_261_248  # Llama-3.1-8B's published count


LARGE_RECIPES = ["llama-3.1-8b-to-4b-width.yaml", "llama-3.1-8b-to-4b-depth.yaml",
                 "mistral-nemo-12b-to-8b.yaml", "qwen3-8b-to-4b-width.yaml"]


@pytest.mark.parametrize("name", LARGE_RECIPES)
def test_shipped_large_recipes_fit_80gb_gpus(name, capsys):
    from minitron.pipeline import dry_run
    from minitron.recipe import load_recipe

    recipe = load_recipe(f"recipes/{name}")
    assert recipe.distill.nproc_per_node == 8 and recipe.distill.gpu_memory_gib == 79
    info = dry_run(recipe)
    plan = info["memory_plan"]
    assert plan["peak_gib"] <= 79
    # The prune (importance) and evaluate stages' own plans, on one device.
    assert set(info["stage_memory_gib"]) == {"prune", "evaluate"}
    assert all(0 < v <= 79 for v in info["stage_memory_gib"].values()), info["stage_memory_gib"]
    assert "estimated peak per GPU" in capsys.readouterr().out
    # The same recipe on one process does not fit, and says why.
    with pytest.raises(MinitronError, match=r"biggest term is optimizer \(AdamW fp32\)"):
        dry_run(load_recipe(f"recipes/{name}", ["distill.nproc_per_node=1"]))


def test_distill_cli_dry_run_prints_the_plan(tmp_path, capsys):
    from minitron.distill import main
    from tiny import make_tiny_model

    make_tiny_model("llama", path=tmp_path / "t")
    assert main(["--teacher", str(tmp_path / "t"), "--student", str(tmp_path / "t"),
                 "--output", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "peak: train step" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()
    with pytest.raises(MinitronError, match="more than the 0.0 GiB available; the biggest term"):
        main(["--teacher", str(tmp_path / "t"), "--student", str(tmp_path / "t"),
              "--output", str(tmp_path / "o"), "--dry-run", "--gpu-memory-gib", "0.001"])
