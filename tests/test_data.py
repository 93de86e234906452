"""Corpus sources, stable disjoint splits and packing invariants."""

import json
import os
import subprocess
import sys

import pytest
import torch

from minitron.common import MinitronError
from minitron.data import (iter_documents, load_blocks, pack, split_documents, split_of,
                           token_stream)


def test_pack_loses_and_duplicates_nothing():
    streams = [list(range(i * 100, i * 100 + n)) for i, n in enumerate([7, 1, 30, 12, 5])]
    flat = [t for s in streams for t in s]
    blocks = pack(streams, block_size=8)
    assert blocks.shape == (len(flat) // 8, 8)
    assert blocks.flatten().tolist() == flat[: blocks.numel()]
    assert len(flat) - blocks.numel() < 8
    assert pack(streams, block_size=8, num_blocks=2).flatten().tolist() == flat[:16]


def test_token_stream_puts_eos_after_each_document(tokenizer):
    docs = split_documents("stdlib", "eval")[:3]
    streams = list(token_stream(docs, tokenizer))
    assert len(streams) == 3
    for doc, ids in zip(docs, streams):
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[:-1]) == doc.text


def test_stdlib_splits_are_disjoint_and_cover_everything():
    keys = {s: {d.key for d in split_documents("stdlib", s)} for s in ("train", "calibration", "eval")}
    assert all(keys.values())
    assert not keys["train"] & keys["eval"]
    assert not keys["train"] & keys["calibration"]
    assert not keys["calibration"] & keys["eval"]
    all_keys = {d.key for d in iter_documents("stdlib") if d.text}
    assert set().union(*keys.values()) == all_keys
    assert not any(k.startswith("site-packages/") for k in all_keys)


def test_split_assignment_is_stable_across_processes():
    keys = ["json/decoder.py", "asyncio/tasks.py", "a/b/c.txt", "0123abcd"]
    code = f"from minitron.data import split_of; print([split_of(k) for k in {keys!r}])"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert outs == {f"{[split_of(k) for k in keys]}\n"}


def test_blocks_are_deterministic_per_seed(tokenizer):
    a = load_blocks(tokenizer, "calibration", 6, block_size=32, seed=0)
    b = load_blocks(tokenizer, "calibration", 6, block_size=32, seed=0)
    c = load_blocks(tokenizer, "calibration", 6, block_size=32, seed=1)
    assert a.dtype == torch.long and a.shape == (6, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_jsonl_source(tmp_path, tokenizer):
    path = tmp_path / "corpus.jsonl"
    rows = [{"body": f"record {i}: " + "word " * 40} for i in range(200)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train = load_blocks(tokenizer, "train", None, source=str(path), block_size=16, text_field="body")
    evals = load_blocks(tokenizer, "eval", None, source=str(path), block_size=16, text_field="body")
    assert len(train) > len(evals) > 0
    with pytest.raises(MinitronError, match=r"corpus.jsonl:1: no field 'text' \(text_field\); fields there: \['body'\]"):
        load_blocks(tokenizer, "train", 1, source=str(path), block_size=16)


def test_bad_jsonl_line_is_named(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(MinitronError, match="c.jsonl:2: not valid JSON"):
        load_blocks(tokenizer, "train", 1, source=str(path), block_size=4)


def test_folder_glob_and_single_file_sources(tmp_path, tokenizer):
    for i in range(60):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 30)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\0\0binary")
    folder = {d.key for d in iter_documents(str(tmp_path))}
    assert folder == {f"doc{i}.txt" for i in range(60)}
    assert {d.key for d in iter_documents(str(tmp_path / "doc*.txt"))} == folder
    big = tmp_path / "book.txt"
    big.write_text("\n\n".join(f"paragraph {i} " * 50 for i in range(400)))
    pieces = list(iter_documents(str(big)))
    assert len(pieces) > 10 and "".join(p.text for p in pieces).count("paragraph") == 400 * 50


def test_python_docs_are_the_language_reference_in_english_documents():
    from pydoc_data.topics import topics

    docs = list(iter_documents("python-docs"))
    # Each section is cut at paragraphs into ~4k-character documents, nothing lost or reordered.
    by_topic: dict[str, list[str]] = {}
    for d in docs:
        by_topic.setdefault(d.key.split("#")[0], []).append(d.text)
    assert {k.removeprefix("python-docs/") for k in by_topic} == set(topics)
    assert all("\n\n".join(by_topic[f"python-docs/{k}"]) == v for k, v in topics.items())
    assert max(len(d.text) for d in docs) < 4096 + max(len(p) for v in topics.values()
                                                       for p in v.split("\n\n")) + 2
    assert {split_of(d.key) for d in docs} == {"train", "calibration", "eval"}
    assert "The \"if\" statement is used for conditional execution" in topics["if"]


def test_mixture_spec_parses_and_refuses_by_part(tmp_path, tokenizer):
    from minitron.data import check_source, parse_mixture

    assert parse_mixture("stdlib + python-docs") == [("stdlib", 1.0), ("python-docs", 1.0)]
    assert parse_mixture("stdlib@3+python-docs@0.5") == [("stdlib", 3.0), ("python-docs", 0.5)]
    assert parse_mixture("stdlib") is None
    plus = tmp_path / "c++"  # an existing path is one source, '+' or not
    plus.mkdir()
    assert parse_mixture(str(plus)) is None
    for bad, part in (("stdlib@0 + python-docs", "stdlib@0"), ("stdlib@x+python-docs", "stdlib@x"),
                      ("stdlib + ", ""), ("stdlib@inf + python-docs", "stdlib@inf")):
        with pytest.raises(MinitronError, match=f"part '{part}' is invalid; valid: SOURCE or "
                                                f"SOURCE@WEIGHT"):
            parse_mixture(bad)
    with pytest.raises(MinitronError, match="data source '/no/such' not found; valid sources"):
        check_source("stdlib + /no/such", where="data.source")
    check_source("stdlib@2 + python-docs")
    # Read raw, a mixture would ignore its weights: it is refused with the way to prepare it.
    with pytest.raises(MinitronError, match=r"is a mixture, which is read from prepared shards: "
                                            r"run `python -m minitron.data prepare"):
        load_blocks(tokenizer, "train", 1, source="stdlib + python-docs")


def test_missing_source_lists_valid_sources(tokenizer):
    with pytest.raises(MinitronError, match="data source '/no/such/file.txt' not found; valid sources: 'stdlib'"):
        load_blocks(tokenizer, "train", 1, source="/no/such/file.txt")


def test_glob_matching_nothing(tmp_path, tokenizer):
    with pytest.raises(MinitronError, match="matches no files"):
        load_blocks(tokenizer, "train", 1, source=str(tmp_path / "*.md"))


def test_empty_corpus_is_refused(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MinitronError, match="split of data source .* is empty"):
        load_blocks(tokenizer, "train", 1, source=str(tmp_path))


def test_corpus_shorter_than_a_block(tmp_path, tokenizer):
    for i in range(30):
        (tmp_path / f"{i}.txt").write_text("x")
    with pytest.raises(MinitronError, match="fewer than block_size=512 tokens"):
        load_blocks(tokenizer, "train", 1, source=str(tmp_path), block_size=512)


def test_block_longer_than_context_is_refused(tokenizer):
    with pytest.raises(MinitronError, match=r"block_size=4096 is longer than the model's context \(256 positions\); choose block_size <= 256"):
        load_blocks(tokenizer, "eval", 1, block_size=4096, max_positions=256)


def test_unknown_split(tokenizer):
    with pytest.raises(MinitronError, match="unknown split 'test'; valid: train, calibration, eval"):
        load_blocks(tokenizer, "test", 1)


def test_datasets_sources_stream_record_by_record(tmp_path, tokenizer):
    """`hf:` sources go through `datasets` streaming (here a local folder of JSONL, offline); a
    saved dataset folder is read in batches; both give the same documents as the JSONL itself."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hub_like"
    folder.mkdir()
    rows = [{"text": f"record {i}: " + "word " * 20} for i in range(50)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = [d.text for d in iter_documents(str(folder / "train.jsonl"))]
    assert [d.text for d in iter_documents(f"hf:{folder}")] == want
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert [d.text for d in iter_documents(str(tmp_path / "saved"))] == want
    with pytest.raises(MinitronError, match="has no column 'body'"):
        list(iter_documents(str(tmp_path / "saved"), text_field="body"))
