"""The memory plan against PyTorch's FSDP2 memory tracker on fake tensors, at the real 8B / 12B widths.

The simulation is one rank of 8 (a fake process group): the student under fully_shard with the
bf16 MixedPrecisionPolicy, activation checkpointing, a bf16 teacher, the fused linear+KL loss at
8192 tokens x the real vocabulary, backward and two AdamW steps (the second one is measured, with
the optimizer state in place). To stay fast (a few seconds each) the models keep their real width,
vocabulary and heads but only 1-2 decoder layers, and the plan is computed for the same depth: what
is checked is the composition (sharding, gathered root, loss chunks, activations per layer), which
the full depth only repeats. The Triton launches are the one thing replaced: Triton cannot run on
fake tensors, so the launch is a no-op and every allocation is the launcher's own. The tracker does
not count the (external, replicated) teacher's weights; the plan's exact teacher term is left out of
the comparison.
"""

import importlib
from types import SimpleNamespace

import pytest
import torch

from minitron.common import MinitronError
from minitron.memory_plan import GIB, Shape, check_fits, plan_distill

TOKENS = 8192
TOLERANCE = 0.15


def _config(h, i, layers, vocab):
    return dict(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=vocab, tie_word_embeddings=False,
                max_position_embeddings=8192)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _tracked_peak(teacher_cfg: dict, student_cfg: dict, world: int, monkeypatch) -> float:
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron import kernels

    skl = importlib.import_module("minitron.kernels.softmax_kl")
    monkeypatch.setattr(skl, "_softmax_kl_loss_kernel", _NoLaunch())
    monkeypatch.setattr(skl, "_softmax_kl_grad_kernel", _NoLaunch())
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with fake:
            default = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            teacher = LlamaForCausalLM(LlamaConfig(**teacher_cfg)).eval().requires_grad_(False)
            torch.set_default_dtype(default)
        with torch.device("meta"):
            student = LlamaForCausalLM(LlamaConfig(**student_cfg))
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.train()

        class Trainee(torch.nn.Module):  # as distill._Trainee: the loss inside the root's forward
            def __init__(self):
                super().__init__()
                self.student, self.teacher = student, [teacher]

            def forward(self, ids):
                with torch.no_grad():
                    th = self.teacher[0].model(ids).last_hidden_state
                sh = self.student.model(ids).last_hidden_state
                return kernels.fused_linear_softmax_kl(
                    sh.reshape(TOKENS, -1), self.student.lm_head.weight, th.reshape(TOKENS, -1),
                    self.teacher[0].lm_head.weight, backend="triton")

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        trainee = Trainee()
        for layer in student.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(trainee, mesh=mesh, mp_policy=mp)
        with fake:
            trainee.to_empty(device="cpu")
            opt = torch.optim.AdamW(trainee.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
            ids = torch.zeros(1, TOKENS, dtype=torch.long)
            tracker = FSDPMemTracker(trainee, opt)
            tracker.track_inputs((ids,))
            with tracker:
                for step in range(2):
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = trainee(ids)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if step == 0:
                        tracker.reset_mod_stats()
            # The peaks of the second step's forward and backward, at the root's hooks. (Its
            # optimizer step's snapshot counts DTensor temporaries the caching allocator would
            # reuse; the optimizer state itself is in every snapshot above.)
            snaps = tracker.memory_tracking[trainee].snapshots
            return max(s[torch.device("cpu")]["Total"] for v in snaps.values() for s in v) / GIB
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("recipe", ["llama-3.1-8b-to-4b-width", "mistral-nemo-12b-to-8b"])
def test_plan_matches_fsdp_memory_tracker(recipe, layers, monkeypatch):
    teacher, student = {
        "llama-3.1-8b-to-4b-width": (_config(4096, 14336, layers, 128256), _config(3072, 9216, layers, 128256)),
        "mistral-nemo-12b-to-8b": (_config(5120, 14336, layers, 131072), _config(4096, 11520, layers, 131072)),
    }[recipe]
    tracked = _tracked_peak(teacher, student, 8, monkeypatch)
    config = SimpleNamespace(batch_size=8, block_size=TOKENS, grad_accum=1, gradient_checkpointing=True,
                             loss_impl="fused", eval_batch_size=8, fsdp_unsynced_accum=False,
                             teacher_correction_tokens=0)
    plan = plan_distill(teacher, student, config, world=8)
    planned = (plan.phases["train step"] - plan.terms["teacher weights"]) / GIB
    print(f"{recipe} x{layers} layers: plan {planned:.2f} GiB, tracker {tracked:.2f} GiB")
    assert abs(planned - tracked) <= TOLERANCE * tracked


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
    plan = dry_run(recipe)["memory_plan"]
    assert plan["peak_gib"] <= 79
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
