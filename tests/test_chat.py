"""Chat JSONL: rendered with the chat template, a loss mask that excludes the prompt, stored in the
shards beside the tokens and used by the distillation losses."""

import json
import random
from pathlib import Path

import pytest
import torch

from minitron.common import MinitronError
from minitron.data import encode_chat, encode_documents, iter_documents
from minitron.shards import Prepared, prepare

CONVERSATIONS = Path(__file__).parent / "data" / "conversations.jsonl"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    from tokenizers import Tokenizer

    from tiny import tiny_tokenizer

    base = tiny_tokenizer()
    tok = base.__class__(tokenizer_object=Tokenizer.from_str(base.backend_tokenizer.to_str()),
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def _records():
    return [json.loads(line) for line in CONVERSATIONS.read_text().splitlines()]


def test_template_and_mask_on_shipped_conversations(chat_tokenizer):
    tok = chat_tokenizer
    for record in _records():
        if "messages" not in record:
            continue
        msgs = tuple(record["messages"])
        ids, mask = encode_chat(tok, msgs)
        # The reference: the ChatML text written out by hand, and the replies it contains.
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
        replies = "".join(f"{m['content']}<|im_end|>\n" for m in msgs if m["role"] == "assistant")
        assert tok.decode(ids) == text
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == replies
        prompt = [i for i, m in zip(ids, mask) if not m]
        assert all(m["content"] in tok.decode(prompt) for m in msgs if m["role"] != "assistant")


def test_chat_shards_hold_tokens_and_mask_in_the_seeded_order(chat_tokenizer, tmp_path):
    out = tmp_path / "chat"
    prepare(str(CONVERSATIONS), out, chat_tokenizer, workers=1, shard_tokens=50, seed=3,
            eval_fraction=0.0, calibration_fraction=0.0, progress=False)
    # Reference: the documents in source order, shuffled with random.Random(seed), concatenated.
    docs = [d for d in iter_documents(str(CONVERSATIONS)) if d.text]
    random.Random(3).shuffle(docs)
    ids, mask = [], []
    for doc_ids, doc_mask in encode_documents(docs, chat_tokenizer):
        ids += doc_ids
        mask += doc_mask if doc_mask is not None else [1] * len(doc_ids)
    view = Prepared(out).blocks("train", 16)
    n = len(ids) // 16
    assert len(view) == n and view.has_mask
    assert view.tensor().flatten().tolist() == ids[:n * 16]
    assert view.mask(slice(None)).flatten().tolist() == [bool(m) for m in mask[:n * 16]]
    # The plain-text record counts everywhere; the unanswered question nowhere.
    assert 0 < sum(mask) < len(mask)


def test_messages_must_be_role_content_pairs(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(MinitronError, match=r"bad.jsonl:1: 'messages' must be"):
        list(iter_documents(str(bad)))


def test_tokenizer_without_template_is_refused(tmp_path):
    from tiny import tiny_tokenizer

    with pytest.raises(MinitronError, match="needs a tokenizer with a chat template"):
        encode_chat(tiny_tokenizer(), ({"role": "user", "content": "hi"},))


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_masked_kd_loss_counts_reply_positions_only(chat_tokenizer, alpha, monkeypatch):
    """The KD (+CE) loss equals a float64 reference over the positions that predict reply tokens;
    a batch of prompts only contributes a zero loss and zero gradients."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the kernel's torch reference on CPU
    from minitron.config import DistillConfig
    from minitron.distill import position_mask
    from minitron.distill.losses import _kd_loss, _micro_loss
    from tiny import make_tiny_model

    teacher = make_tiny_model(seed=0, vocab_size=len(chat_tokenizer))
    student = make_tiny_model(seed=1, vocab_size=len(chat_tokenizer))
    ids = torch.randint(len(chat_tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 5:9] = True
    mask[1, 2:4] = True
    cfg = DistillConfig(tokens=24, batch_size=2, block_size=12, alpha=alpha, loss_impl="logits")
    loss = _kd_loss(student, teacher, ids, cfg, None, False, mask)
    with torch.no_grad():
        s = student(ids).logits.double().log_softmax(-1)
        t = teacher(ids).logits.double().log_softmax(-1)
    pos = position_mask(mask)
    kl = (t.exp() * (t - s)).sum(-1)[pos]
    ce = -s[:, :-1].gather(-1, ids[:, 1:, None])[..., 0][pos[:, :-1]]
    want = (1 - alpha) * (kl.sum() + alpha / (1 - alpha) * ce.sum()) / pos.sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)

    none = torch.zeros_like(mask)
    for fn in (lambda: _kd_loss(student, teacher, ids, cfg, None, False, none),
               lambda: _micro_loss(student, None, ids, cfg, None, False, None, [], none)[0]):
        student.zero_grad()
        zero = fn()
        zero.backward()
        assert zero.item() == 0.0
        assert all(p.grad is None or not p.grad.any() for p in student.parameters())
