"""Evaluation from hidden states (chunked logits): the same numbers as the full-logits evaluation,
at a bounded memory that fake tensors measure at the real Llama-3.1 shape."""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from minitron.data import load_blocks
from minitron.distill import evaluate_student
from minitron.scoring import metric_sums, perplexity, teacher_agreement
from tiny import make_tiny_model


@pytest.fixture(autouse=True)
def _torch_loss_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU path, as distillation runs it


@pytest.mark.parametrize("family,chunk", [("llama", 7), ("llama", 512), ("gemma2", 7)])
def test_hidden_state_eval_equals_full_logits_eval(tokenizer, monkeypatch, family, chunk):
    # gemma2: its final-logit soft-cap is applied to each chunk, as its own head does.
    monkeypatch.setattr("minitron.scoring.EVAL_CHUNK_TOKENS", chunk)
    teacher = make_tiny_model(family, seed=0)
    student = (make_tiny_model("llama", seed=1, hidden_size=32, num_attention_heads=4,
                               intermediate_size=48, tie_word_embeddings=True)
               if family == "llama" else make_tiny_model(family, seed=1))
    blocks = load_blocks(tokenizer, "eval", 5, block_size=24)
    got = evaluate_student(student, teacher, blocks, batch_size=2)
    # The reference: full [B, T, V] logits through the models' own heads, in float64.
    ref = _full_logits_float64(student, teacher, blocks)
    # minitron.evaluate's own functions (the evaluate stage) take the same chunked path.
    ppl = perplexity(student, blocks, batch_size=2)
    agree = teacher_agreement(student, teacher, blocks, batch_size=2)
    for loss in (got["eval_loss"], ppl["loss"]):
        assert loss == pytest.approx(ref["loss"], rel=1e-5)
    assert got["eval_perplexity"] == pytest.approx(math.exp(ref["loss"]), rel=1e-5)
    for kl in (got["kl_to_teacher"], agree["kl_to_teacher"]):
        assert kl == pytest.approx(ref["kl"], rel=1e-4)
    assert got["top1_agreement"] == agree["top1_agreement"] == pytest.approx(ref["top1"])
    alone = evaluate_student(student, None, blocks, batch_size=3)
    assert alone.keys() == {"eval_loss", "eval_perplexity"}
    assert alone["eval_loss"] == pytest.approx(ref["loss"], rel=1e-5)


@torch.no_grad()
def _full_logits_float64(student, teacher, blocks) -> dict[str, float]:
    s = student(blocks).logits.double().log_softmax(-1)
    t = teacher(blocks).logits.double().log_softmax(-1)
    nll = -s[:, :-1].gather(-1, blocks[:, 1:, None]).mean().item()
    kl = (t.exp() * (t - s)).sum(-1).mean().item()
    top1 = (s.argmax(-1) == t.argmax(-1)).double().mean().item()
    return {"loss": nll, "kl": kl, "top1": top1}


def _peak_bytes(fn, *inputs) -> int:
    """Peak bytes allocated while `fn(*inputs)` runs, above what the inputs already hold."""
    tracker = MemTracker()
    tracker.track_external(*inputs)
    with tracker:
        before = tracker.get_tracker_snapshot("current")
        fn(*inputs)
        peak = tracker.get_tracker_snapshot("peak")
    dev = torch.device("cpu")
    return peak[dev]["Total"] - before[dev]["Total"]


def test_eval_memory_at_8192_tokens_and_llama3_vocab(monkeypatch):
    # Llama-3.1-8B's head and width (V = 128256, H = 4096), 8 x 1024 tokens, bf16 (the policy's
    # compute dtype): fake tensors, so no byte is allocated, but every op's output is accounted.
    # The KL runs on the torch path (on a GPU the Triton kernel allocates only [N] vectors, so this
    # is the upper bound), with its GPU-sized row chunks: the CPU's cache-sized ones would cost
    # thousands of fake ops (40 s) for a smaller peak.
    from minitron.kernels import reference

    monkeypatch.setattr(reference, "CHUNK_ELEMENTS_CPU", reference.CHUNK_ELEMENTS_GPU)
    b, t, h, v = 8, 1024, 4096, 128256
    with FakeTensorMode():
        hs = torch.empty(b, t, h, dtype=torch.bfloat16)
        ht = torch.empty(b, t, h, dtype=torch.bfloat16)
        ws = torch.empty(v, h, dtype=torch.bfloat16)
        wt = torch.empty(v, h, dtype=torch.bfloat16)
        ids = torch.zeros(b, t, dtype=torch.long)

        def chunked(hs, ht, ws, wt, ids):
            metric_sums(hs, ws, ids, ht, wt)

        def full_logits(hs, ht, ws, wt, ids):  # what evaluation did before: [B, T, V] fp32 logits
            s = (hs @ ws.T).float()
            tl = (ht @ wt.T).float()
            torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))

        peak = _peak_bytes(chunked, hs, ht, ws, wt, ids)
        old = _peak_bytes(full_logits, hs, ht, ws, wt, ids)
    print(f"eval peak above inputs: chunked {peak / 2**30:.2f} GiB, full logits {old / 2**30:.2f} GiB")
    assert peak < 3 * 2**30, f"{peak / 2**30:.2f} GiB"
    assert old > 3 * peak  # the tracker sees the full-logits form's tensors (it can fail)


def _llama3(hidden, intermediate, layers=2):
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=intermediate,
                                num_hidden_layers=layers, num_attention_heads=32,
                                num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                tie_word_embeddings=False, max_position_embeddings=8192,
                                use_cache=False)


def _tracked(fn, *inputs) -> int:
    """The tracker's peak total (weights and inputs included) while `fn(*inputs)` runs."""
    tracker = MemTracker()
    tracker.track_external(*inputs)
    with tracker:
        fn(*inputs)
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.fixture(scope="module")
def fake_llama3():
    """Llama-3.1-8B's widths and an 8B -> 4.5B width-pruned student, 2 layers each, bf16, as fake
    tensors (no byte allocated; every op's output accounted by the tracker)."""
    from transformers import AutoModelForCausalLM

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        teacher = AutoModelForCausalLM.from_config(_llama3(4096, 14336), dtype=torch.bfloat16)
        student = AutoModelForCausalLM.from_config(_llama3(3072, 9216), dtype=torch.bfloat16)
    return fake, teacher.eval(), student.eval()


def test_evaluate_at_llama3_vocab_stays_within_the_memory_plan(fake_llama3, monkeypatch):
    """The evaluate stage's batch (2 x 2048 tokens, V = 128256): its peak, weights included, is
    within the plan (and the plan within 15% of it); the full-logits form it replaced is not."""
    from minitron.scoring import batch_metric_sums
    from minitron.kernels import reference
    from minitron.memory_plan import plan_evaluate

    monkeypatch.setattr(reference, "CHUNK_ELEMENTS_CPU", reference.CHUNK_ELEMENTS_GPU)
    fake, teacher, student = fake_llama3
    with fake:
        ids = torch.zeros(2, 2048, dtype=torch.long)
        alone = _tracked(lambda s, i: batch_metric_sums(s, None, i), student, ids)
        both = _tracked(lambda s, t, i: batch_metric_sums(s, t, i), student, teacher, ids)

        def full_logits(model, ids):  # what the perplexity evaluation did before
            logits = model(ids).logits[:, :-1].float()
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                              ids[:, 1:].reshape(-1), reduction="sum")

        old = _tracked(full_logits, student, ids)
    plan_alone = plan_evaluate(student.config, None, 2, 2048, "bfloat16").peak
    plan_both = plan_evaluate(student.config, teacher.config, 2, 2048, "bfloat16").peak
    print(f"evaluate peak: alone {alone / 2**30:.2f} GiB (plan {plan_alone / 2**30:.2f}), with "
          f"the teacher {both / 2**30:.2f} (plan {plan_both / 2**30:.2f}); full logits "
          f"{old / 2**30:.2f}")
    assert alone <= plan_alone <= 1.15 * alone
    assert both <= plan_both <= 1.15 * both
    assert old > plan_alone + 2**30


def test_importance_pass_stays_within_the_memory_plan(fake_llama3, monkeypatch):
    """The prune stage's calibration batch (2 x 2048 tokens) with o_proj_contribution head scores:
    within the plan; the [B, T, H, hidden] form it replaced is over 1 GiB above it."""
    from minitron import importance
    from minitron.config import ImportanceConfig
    from minitron.memory_plan import plan_prune

    fake, teacher, _ = fake_llama3
    cfg = ImportanceConfig(head_score="o_proj_contribution")

    def scores(model, ids):
        importance.compute_scores(model, ids, 2, cfg, progress=False)

    def contributions(x, weight, heads, head_dim):  # the replaced form
        w = weight.float().view(-1, heads, head_dim)
        return torch.einsum("bthd,ohd->btho", x, w).norm(dim=-1)

    with fake:
        ids = torch.zeros(2, 2048, dtype=torch.long)
        now = _tracked(scores, teacher, ids)
        monkeypatch.setattr(importance, "_o_proj_norms", contributions)
        old = _tracked(scores, teacher, ids)
    plan = plan_prune(teacher.config, 2, 2048, "bfloat16", "o_proj_contribution").peak
    print(f"importance peak {now / 2**30:.2f} GiB (plan {plan / 2**30:.2f}), the replaced form "
          f"{old / 2**30:.2f}")
    assert now <= plan <= 1.15 * now
    assert old > plan + 2**30
