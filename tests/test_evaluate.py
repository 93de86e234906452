"""Evaluation metrics against naive float64 computations."""

import json
import math

import pytest
import torch

from minitron.data import load_blocks
from minitron.evaluate import main as evaluate_main
from minitron.measure import speed
from minitron.scoring import perplexity, teacher_agreement
from minitron.models import load_model
from tiny import make_tiny_model


def naive_nll(model, blocks):
    """Mean negative log-likelihood, one token at a time, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in blocks:
            logp = model(row[None]).logits[0].double().log_softmax(-1)
            for pos in range(len(row) - 1):
                total -= logp[pos, row[pos + 1]].item()
                count += 1
    return total / count, count


def test_perplexity_matches_naive_loop(tokenizer):
    model = make_tiny_model("llama")
    blocks = load_blocks(tokenizer, "eval", 5, block_size=24)
    result = perplexity(model, blocks, batch_size=2)
    nll, count = naive_nll(model, blocks)
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_teacher_agreement(tokenizer):
    teacher = make_tiny_model("llama", seed=0)
    student = make_tiny_model("llama", seed=1)
    blocks = load_blocks(tokenizer, "eval", 3, block_size=16)
    same = teacher_agreement(teacher, teacher, blocks)
    assert same["top1_agreement"] == 1.0 and same["kl_to_teacher"] == pytest.approx(0, abs=1e-6)

    other = teacher_agreement(student, teacher, blocks)
    with torch.no_grad():
        s = student(blocks).logits.double().log_softmax(-1)
        t = teacher(blocks).logits.double().log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1).mean().item()
    top1 = (s.argmax(-1) == t.argmax(-1)).double().mean().item()
    assert other["kl_to_teacher"] == pytest.approx(kl, rel=1e-4)
    assert other["top1_agreement"] == pytest.approx(top1)


def test_speed_reports_positive_rates():
    result = speed(make_tiny_model("qwen2"), prompt_len=16, new_tokens=4, repeats=1)
    assert result["prefill_tokens_per_s"] > 0 and result["decode_ms_per_token"] > 0


@torch.no_grad()
def test_decoding_through_the_kv_cache_gives_the_full_forwards_logits():
    """What speed()'s decode loop relies on: the cache handed back under the name this
    transformers uses (`cache` from 5.24, `past_key_values` before) is the one the next step
    reads; without it the last token would see no context."""
    from minitron.models import cache_kwarg, cache_of

    model = make_tiny_model("qwen2")
    ids = torch.randint(0, 384, (1, 10), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits[:, -1]
    prefix = model(ids[:, :-1], use_cache=True)
    step = model(ids[:, -1:], use_cache=True, **{cache_kwarg(model): cache_of(prefix)}).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(ids[:, -1:]).logits[:, -1], full, rtol=1e-3, atol=1e-3)


def test_cli_writes_json(tmp_path, capsys):
    make_tiny_model("mistral", path=tmp_path / "m")
    out = tmp_path / "eval.json"
    evaluate_main(["--model", str(tmp_path / "m"), "data.eval_blocks=2", "--block-size", "16",
                   "--no-speed", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["parameters"] == 164416
    # The same two blocks, one token at a time in float64.
    model, tokenizer = load_model(str(tmp_path / "m"))
    nll, count = naive_nll(model, load_blocks(tokenizer, "eval", 2, block_size=16))
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    assert f"| perplexity | {result['perplexity']:.1f} |" in capsys.readouterr().out


@pytest.mark.slow
def test_embedded_model_perplexity_is_sane():
    model, tokenizer = load_model("smollm2-135m")
    blocks = load_blocks(tokenizer, "eval", 4, block_size=256)
    ppl = perplexity(model, blocks, batch_size=4)["perplexity"]
    nll, _ = naive_nll(model, blocks)
    assert ppl == pytest.approx(math.exp(nll), rel=1e-4)
    # SmolLM2-135M on Python source: ~7 on json/decoder.py (environment note), 8.77 on the demo's
    # eval split; the eval files come from this Python's stdlib, so the value moves a little.
    assert 5 < ppl < 12, ppl
