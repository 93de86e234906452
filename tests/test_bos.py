"""BOS-led blocks: every stage reads blocks as the model is run, BOS first when its tokenizer adds one.

Two tokenizers with the same vocabulary, one whose post-processor prepends `<bos>` (as Gemma's,
Llama 3's and Mistral's do) and one that adds nothing (as SmolLM2's, Qwen's): the text tokens of
both are identical, so the blocks of the two rules can be compared token for token.
"""

import math

import pytest
import torch

from minitron.common import MinitronError
from minitron.config import DataConfig, EvaluateConfig
from minitron.data import block_bos, block_rule, load_blocks, split_documents, stdlib_root
from minitron.shards import Prepared, prepare
from tiny import bos_tokenizer, make_tiny_model

SLICE = str(stdlib_root() / "email")
BLOCK = 32


@pytest.fixture(scope="module")
def toks():
    return {"bos": bos_tokenizer(True), "plain": bos_tokenizer(False)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, toks):
    root = tmp_path_factory.mktemp("bos")
    for rule, tok in toks.items():
        prepare(SLICE, root / rule, tok, workers=1, shard_tokens=4099, chunk_chars=50_000,
                progress=False)
    return root


def _stream(tok, split: str) -> list[int]:
    """The split's token stream (documents + EOS, shuffled by seed 0), built here by hand."""
    import random

    docs = split_documents(SLICE, split)
    random.Random(0).shuffle(docs)
    ids = tok([d.text for d in docs], add_special_tokens=False)["input_ids"]
    return [t for doc in ids for t in doc + [tok.eos_token_id]]


def test_the_rule_is_what_the_tokenizer_does(toks):
    assert block_bos(toks["bos"]) == 1 == toks["bos"].bos_token_id
    # A bos_token that the tokenizer never adds (SmolLM2's '<|endoftext|>') is no rule.
    assert toks["plain"].bos_token_id == 1 and block_bos(toks["plain"]) is None
    assert block_rule(toks["bos"]) == "BOS '<bos>' (id 1) + block_size - 1 stream tokens"
    assert block_rule(toks["plain"]) == "no BOS (blocks cut from the stream)"


@pytest.mark.parametrize("split", ["calibration", "eval"])
def test_blocks_start_with_bos_exactly_when_the_tokenizer_adds_it(toks, prepared, split):
    stream = _stream(toks["plain"], split)
    assert stream == _stream(toks["bos"], split)  # same text tokens under both tokenizers
    for rule, tok in toks.items():
        memory = load_blocks(tok, split, None, source=SLICE, block_size=BLOCK)
        shards = load_blocks(tok, split, None, source=str(prepared / rule), block_size=BLOCK)
        assert torch.equal(memory, shards)
        body = BLOCK - (rule == "bos")
        assert memory.shape == (len(stream) // body, BLOCK)
        if rule == "bos":
            assert (memory[:, 0] == 1).all()
            assert memory[:, 1:].flatten().tolist() == stream[:memory.shape[0] * body]
        else:
            assert memory.flatten().tolist() == stream[:memory.numel()]
    view = Prepared(prepared / "bos").blocks(split, BLOCK, bos=1)
    rows = torch.tensor([len(view) - 1, 0, 2])  # by index, in any order
    assert torch.equal(view[rows], memory[rows] if rule == "bos" else
                       load_blocks(toks["bos"], split, None, source=SLICE, block_size=BLOCK)[rows])


@pytest.mark.parametrize("prepared_by, read_by", [("bos", "plain"), ("plain", "bos")])
def test_shards_prepared_under_one_rule_are_refused_under_the_other(toks, prepared, prepared_by,
                                                                     read_by):
    with pytest.raises(MinitronError) as e:
        load_blocks(toks[read_by], "eval", 2, source=str(prepared / prepared_by), block_size=BLOCK)
    rules = {"bos": "BOS (id 1) + block_size - 1 stream tokens",
             "plain": "no BOS (blocks cut from the stream)"}
    assert f"prepared for blocks led by {rules[prepared_by]}" in str(e.value)
    assert f"this run's tokenizer reads blocks as {rules[read_by]}" in str(e.value)
    assert Prepared(prepared / prepared_by).manifest["tokenizer"]["block_bos"] == block_bos(
        toks[prepared_by])


def test_the_teacher_cache_records_the_rule_and_refuses_the_other(toks, prepared, tmp_path):
    from minitron.config import CacheConfig
    from minitron.teacher_cache import build_cache, data_identity, open_cache

    teacher = tmp_path / "teacher"
    make_tiny_model("llama", path=teacher)
    toks["bos"].save_pretrained(teacher)
    cache = tmp_path / "cache"
    m = build_cache(teacher, cache, CacheConfig(k=4, tokens=4 * BLOCK, block_size=BLOCK,
                                               progress=False),
                    data=DataConfig(source=str(prepared / "bos")))
    assert m["data"]["bos"] == 1
    bos_view = load_blocks(toks["bos"], "train", 4, source=str(prepared / "bos"), block_size=BLOCK)
    assert data_identity(Prepared(prepared / "bos").blocks("train", BLOCK, 4, bos=1))["bos"] == 1
    assert torch.equal(open_cache(cache).read("ids", range(4)), bos_view)
    plain_view = Prepared(prepared / "plain").blocks("train", BLOCK, 4)  # the other rule
    with pytest.raises(MinitronError, match=r"holds blocks led by BOS \(id 1\).*reads blocks as "
                                            r"no BOS"):
        open_cache(cache).check_data(plain_view)


def _reference_perplexity(model, blocks: torch.Tensor) -> float:
    """Float64 next-token perplexity over positions 1.. of each block (never the BOS itself)."""
    with torch.no_grad():
        logits = model.double()(blocks).logits[:, :-1]
    model.float()
    logp = torch.log_softmax(logits, -1).gather(-1, blocks[:, 1:, None]).squeeze(-1)
    return math.exp(-logp.mean().item())


def test_a_model_that_leans_on_bos_is_evaluated_with_it(toks, tmp_path):
    """A tiny Llama trained on BOS-led blocks scores better with BOS than without; `evaluate` of
    its folder uses the rule its tokenizer implies (each number equals a float64 reference on
    blocks built here by hand), so the same weights score differently under the two tokenizers."""
    from minitron.evaluate import evaluate

    model = make_tiny_model("llama", seed=3)
    bos = toks["bos"]
    train = load_blocks(bos, "train", 16, source=SLICE, block_size=BLOCK)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        batch = train[(step * 4) % 16:(step * 4) % 16 + 4]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    stream = _stream(toks["plain"], "eval")
    n = 6
    ref = {"bos": torch.tensor([[1] + stream[i * (BLOCK - 1):(i + 1) * (BLOCK - 1)]
                                for i in range(n)]),
           "plain": torch.tensor([stream[i * BLOCK:(i + 1) * BLOCK] for i in range(n)])}
    measured = {}
    for rule, tok in toks.items():
        folder = tmp_path / rule
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        result = evaluate(str(folder), settings=EvaluateConfig(speed=False),
                          data=DataConfig(source=SLICE, block_size=BLOCK, eval_blocks=n))
        assert result["blocks"] == block_rule(tok)
        assert result["tokens"] == n * (BLOCK - 1)  # the same count of predicted tokens
        measured[rule] = result["perplexity"]
        assert measured[rule] == pytest.approx(_reference_perplexity(model, ref[rule]), rel=1e-4)
    # Trained on BOS-led blocks, it predicts the same tokens better after BOS (74 vs 76 here).
    assert measured["bos"] < measured["plain"], measured
