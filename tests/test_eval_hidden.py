"""Evaluation from hidden states (chunked logits): the same numbers as the full-logits evaluation,
at a bounded memory that fake tensors measure at the real Llama-3.1 shape."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from minitron.data import load_blocks
from minitron.distill import evaluate_student
from minitron.evaluate import metric_sums, perplexity, teacher_agreement
from tiny import make_tiny_model


@pytest.fixture(autouse=True)
def _torch_loss_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU path, as distillation runs it


@pytest.mark.parametrize("family,chunk", [("llama", 7), ("llama", 512), ("gemma2", 7)])
def test_hidden_state_eval_equals_full_logits_eval(tokenizer, monkeypatch, family, chunk):
    # gemma2: its final-logit soft-cap is applied to each chunk, as its own head does.
    monkeypatch.setattr("minitron.evaluate.EVAL_CHUNK_TOKENS", chunk)
    teacher = make_tiny_model(family, seed=0)
    student = (make_tiny_model("llama", seed=1, hidden_size=32, num_attention_heads=4,
                               intermediate_size=48, tie_word_embeddings=True)
               if family == "llama" else make_tiny_model(family, seed=1))
    blocks = load_blocks(tokenizer, "eval", 5, block_size=24)
    got = evaluate_student(student, teacher, blocks, batch_size=2)
    # Today's evaluation: full [B, T, V] fp32 logits through the model's own head.
    ppl = perplexity(student, blocks, batch_size=2)
    agree = teacher_agreement(student, teacher, blocks, batch_size=2)
    assert got["eval_loss"] == pytest.approx(ppl["loss"], rel=1e-5)
    assert got["eval_perplexity"] == pytest.approx(ppl["perplexity"], rel=1e-5)
    assert got["kl_to_teacher"] == pytest.approx(agree["kl_to_teacher"], rel=1e-5)
    assert got["top1_agreement"] == agree["top1_agreement"]
    alone = evaluate_student(student, None, blocks, batch_size=3)
    assert alone.keys() == {"eval_loss", "eval_perplexity"}
    assert alone["eval_loss"] == pytest.approx(ppl["loss"], rel=1e-5)


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
