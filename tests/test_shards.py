"""Prepared shards: the same blocks as the in-memory packing, resumable, refused when mismatched."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minitron.common import MinitronError
from minitron.data import load_blocks, stdlib_root
from minitron.shards import MANIFEST, Prepared, prepare, token_dtype

# A small slice of the stdlib corpus (a folder source keys documents by relative path, as stdlib
# does): about 100 files, enough for every split to hold blocks.
SLICE = str(stdlib_root() / "email")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("shards") / "email"
    # Small shards and chunks, so blocks cross shard edges and several chunks are tokenized.
    prepare(SLICE, out, tokenizer, workers=2, shard_tokens=4099, chunk_chars=50_000,
            progress=False)
    return out


@pytest.mark.parametrize("split", ["train", "calibration", "eval"])
def test_shards_reproduce_in_memory_blocks(prepared, tokenizer, split):
    for block_size in (32, 61):
        expected = load_blocks(tokenizer, split, None, source=SLICE, block_size=block_size)
        view = Prepared(prepared).blocks(split, block_size)
        assert view.shape == tuple(expected.shape)
        assert torch.equal(view.tensor(), expected)
        rows = torch.tensor([len(view) - 1, 0, 3])  # by index, in any order
        assert torch.equal(view[rows], expected[rows])
        # load_blocks on the prepared folder: the first n blocks, read from the shards.
        got = load_blocks(tokenizer, split, 5, source=str(prepared), block_size=block_size)
        assert torch.equal(got, expected[:5])


def test_manifest_counts_and_dtype(prepared, tokenizer):
    m = json.loads((prepared / MANIFEST).read_text())
    assert m["dtype"] == np.dtype(np.uint16).str and token_dtype(200_000) == np.uint32
    docs = {s: 0 for s in m["splits"]}
    from minitron.data import iter_documents, split_of

    for d in iter_documents(SLICE):
        if d.text:
            docs[split_of(d.key)] += 1
    assert {s: v["documents"] for s, v in m["splits"].items()} == docs
    for split, info in m["splits"].items():
        sizes = [os.path.getsize(prepared / s["file"]) // 2 for s in info["shards"]]
        assert sum(sizes) == info["tokens"] and all(n == 4099 for n in sizes[:-1])
    assert not (prepared / ".work").exists()


def test_interrupted_prepare_resumes(tmp_path, tokenizer, prepared):
    """Kill a prepare mid-way (SIGKILL after the first chunk); a rerun finishes with the same
    shards, reusing what the killed run wrote."""
    out = tmp_path / "p"
    code = (
        "import os, sys, signal; sys.path.insert(0, 'tests')\n"
        "from tiny import tiny_tokenizer\n"
        "import minitron.shards as s\n"
        "orig = s._tokenize_chunk\n"
        "def once(*a, **k):\n"
        "    r = orig(*a, **k)\n"
        "    if a[1] == '000002': os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return r\n"
        "s._tokenize_chunk = once\n"
        f"s.prepare({SLICE!r}, {str(out)!r}, tiny_tokenizer(), workers=1, shard_tokens=4099,"
        " chunk_chars=50_000, progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent)
    assert proc.returncode == -9
    assert not (out / MANIFEST).exists() and len(list((out / ".work").glob("chunk-*.json"))) == 3
    m = prepare(SLICE, out, tokenizer, workers=1, shard_tokens=4099, chunk_chars=50_000,
                progress=False)
    assert m["stats"]["tokens_reused"] > 0 and m["stats"]["tokens_tokenized"] > 0
    ref = json.loads((prepared / MANIFEST).read_text())
    assert m["fingerprint"] == ref["fingerprint"]
    for info in ref["splits"].values():
        for shard in info["shards"]:
            assert (out / shard["file"]).read_bytes() == (prepared / shard["file"]).read_bytes()


def test_prepared_folder_refuses_another_tokenizer_and_settings(prepared, tmp_path, tokenizer):
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy, then changed
    variant = tokenizer.__class__(tokenizer_object=backend, eos_token="<|endoftext|>")
    variant.add_tokens(["<extra_token>"])
    with pytest.raises(MinitronError, match="another tokenizer"):
        load_blocks(variant, "eval", 1, source=str(prepared), block_size=16)
    with pytest.raises(MinitronError, match="holds another preparation"):
        prepare(SLICE, prepared, tokenizer, seed=1, workers=1, progress=False)
    with pytest.raises(MinitronError,
                       match=r"prepare.eval_fraction \+ prepare.calibration_fraction = 1 "):
        prepare(SLICE, tmp_path / "x", tokenizer, eval_fraction=0.5, calibration_fraction=0.5)


def test_prepare_cli(tmp_path):
    """The command line: a saved tokenizer folder, one line of error on bad input (exit 2)."""
    from tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i}.txt").write_text(f"text number {i}. " * 40)
    run = [sys.executable, "-m", "minitron.data", "prepare", str(corpus), "--tokenizer",
           str(tmp_path / "tok"), "--workers", "1", "--no-progress"]
    ok = subprocess.run(run + ["--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "tokens/s" in ok.stdout and (tmp_path / "out" / MANIFEST).exists()
    bad = subprocess.run(run + ["--output", str(tmp_path / "o2"), "--eval-fraction", "1.5"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "prepare.eval_fraction=1.5 is invalid" in bad.stderr
    assert "Traceback" not in bad.stderr
    part = subprocess.run(run + ["--output", str(tmp_path / "o3"), "--shard", "2/2"],
                          capture_output=True, text=True)
    assert part.returncode == 2 and "--shard 2/2 is invalid; valid: I/N" in part.stderr


def test_weighted_mixture_gives_each_source_its_share_of_train_tokens(tmp_path, tokenizer):
    """Two sources, 9:1 in size, mixed 1:1: the train stream holds each source's documents in
    proportion to its weight (counted from the stream itself), eval/calibration once each."""
    big, small = tmp_path / "big", tmp_path / "small.jsonl"
    big.mkdir()
    for i in range(90):
        (big / f"{i}.txt").write_text(f"alpha {i} " * 30)
    small.write_text("".join(json.dumps({"text": f"omega {i} " * 30}) + "\n" for i in range(10)))
    m = prepare([(str(big), 1.0), (str(small), 1.0)], tmp_path / "mix", tokenizer, workers=1,
                seed=0, eval_fraction=0.0, calibration_fraction=0.0, progress=False)
    stream = Prepared(tmp_path / "mix").stream("train")
    ids = stream.read(0, stream.tokens).tolist()
    eos, tokens, doc = tokenizer.eos_token_id, {"alpha": 0, "omega": 0}, []
    for t in ids:
        doc.append(t)
        if t == eos:
            tokens["alpha" if "alpha" in tokenizer.decode(doc) else "omega"] += len(doc)
            doc = []
    share = tokens["omega"] / sum(tokens.values())
    assert abs(share - 0.5) < 0.05, (tokens, m["splits"]["train"]["mixture"])
    assert sum(tokens.values()) == pytest.approx(stream.tokens, rel=0) and not doc
    # A recipe's data.source names the same mixture in one string: the same shards.
    spec = prepare(f"{big}@1 + {small}", tmp_path / "spec", tokenizer, workers=1, seed=0,
                   eval_fraction=0.0, calibration_fraction=0.0, progress=False)
    assert spec["fingerprint"] == m["fingerprint"]
    assert (Prepared(tmp_path / "spec").stream("train").read(0, stream.tokens).tolist() == ids)
    with pytest.raises(MinitronError, match="weight -1.0 of source"):
        prepare([(str(big), -1.0), (str(small), 1.0)], tmp_path / "bad", tokenizer, workers=1)


def test_prepare_with_more_chunks_than_the_open_file_limit(tmp_path, tokenizer):
    """One document per chunk (300 chunks) under an open-file limit of 64 (pass 2 of the old code
    kept a memory map, and its descriptor, per chunk): pass 2 keeps a bounded number of chunk
    files open, and writes the same shards as a preparation from one chunk."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(300):
        (corpus / f"{i:03d}.txt").write_text(f"document {i}: " + "word " * (i % 17 + 3))
    ref = prepare(str(corpus), tmp_path / "ref", tokenizer, workers=1, shard_tokens=997,
                  chunk_chars=10**9, progress=False)
    out = tmp_path / "p"
    code = (
        "import json, resource, sys; sys.path.insert(0, 'tests')\n"
        "from tiny import tiny_tokenizer\n"
        "import minitron.shards as s\n"
        "tok = tiny_tokenizer()\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        f"s.prepare({str(corpus)!r}, {str(out)!r}, tok, workers=1, shard_tokens=997, chunk_chars=1,"
        " progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / MANIFEST).read_text())
    assert m["splits"]["train"]["documents"] > 3 * 64  # a chunk per document: past the limit
    assert m["splits"] == ref["splits"]
    for info in ref["splits"].values():
        for shard in info["shards"]:
            want = (tmp_path / "ref" / shard["file"]).read_bytes()
            assert (out / shard["file"]).read_bytes() == want


def test_prepare_in_parts_then_merge_gives_the_one_machine_shards(tmp_path, prepared, tokenizer):
    """Two machines' parts (--shard 0/2 and 1/2, each folder's .work then gathered into one, as a
    copy between machines does), then --merge: the fixture's shards and fingerprint. A merge with
    a part missing is refused, naming what to run."""
    kw = dict(workers=1, shard_tokens=4099, chunk_chars=50_000, progress=False)
    a, b = tmp_path / "a", tmp_path / "b"
    first = prepare(SLICE, a, tokenizer, part=(0, 2), **kw)
    second = prepare(SLICE, b, tokenizer, part=(1, 2), **kw)
    assert first["chunks"] and second["chunks"] and not (a / MANIFEST).exists()
    assert not list(a.glob("*.bin"))  # a part writes no shards
    with pytest.raises(MinitronError, match=r"merge: \d+ of \d+ chunks are not in"):
        prepare(SLICE, a, tokenizer, merge=True, **kw)
    for f in (b / ".work").iterdir():
        if f.name != "plan.json":
            f.rename(a / ".work" / f.name)
    m = prepare(SLICE, a, tokenizer, merge=True, **kw)
    ref = json.loads((prepared / MANIFEST).read_text())
    assert m["fingerprint"] == ref["fingerprint"] and m["stats"]["tokens_tokenized"] == 0
    for info in ref["splits"].values():
        for shard in info["shards"]:
            assert (a / shard["file"]).read_bytes() == (prepared / shard["file"]).read_bytes()


def _stdlib_paragraphs():
    paragraphs = []
    for name in ("textwrap.py", "string.py", "json/decoder.py", "shlex.py"):
        paragraphs += [p for p in (stdlib_root() / name).read_text().split("\n\n") if p.strip()]
    return paragraphs


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_streamed_source_is_read_by_producers_and_resumed_without_reading_it_again(tmp_path,
                                                                                  tokenizer):
    # An `hf:` source (a local folder of 4 JSONL files, streamed through `datasets`, offline):
    # 2 producers, each reading 2 of the files. A first run breaks on the last file (producer 1
    # stops mid-way, producer 0 finishes); the resumed run reads only what no finished chunk
    # holds, and gives the shards of an uninterrupted one-producer run and of the same records
    # as one JSONL file.
    pytest.importorskip("datasets")
    paragraphs = _stdlib_paragraphs()
    files = [paragraphs[i::4] for i in range(4)]
    files[1].insert(3, "")  # an empty record: read, and counted, but no document
    hub, broken = tmp_path / "hub", tmp_path / "broken"
    hub.mkdir(), broken.mkdir()
    for i, texts in enumerate(files):
        _write_jsonl(hub / f"part-{i}.jsonl", texts)
        _write_jsonl(broken / f"part-{i}.jsonl", texts)
    (broken / "part-3.jsonl").write_text('{"text": "a record cut off\n')
    _write_jsonl(tmp_path / "all.jsonl", [t for texts in files for t in texts])
    kw = dict(shard_tokens=1001, chunk_chars=2000, progress=False)

    ref = prepare(str(tmp_path / "all.jsonl"), tmp_path / "ref", tokenizer, workers=1, **kw)
    whole = prepare(f"hf:{hub}", tmp_path / "whole", tokenizer, workers=1, **kw)  # 1 producer
    assert whole["stats"]["documents_streamed"] == sum(map(len, files))
    with pytest.raises(Exception):  # the stream of part-3 fails
        prepare(f"hf:{broken}", tmp_path / "resumed", tokenizer, workers=2, **kw)
    work = tmp_path / "resumed" / ".work"
    assert json.loads((work / "producers-s0.json").read_text()) == {"producers": 2}
    assert (work / "producer-s0-p000-000000.json").exists()  # producer 0 finished its files
    assert not (work / "producer-s0-p001-000000.json").exists()
    _write_jsonl(broken / "part-3.jsonl", files[3])  # mended: the same records as hub's
    # The resume reads part-3, and of part-2 only the records after producer 1's last finished
    # chunk (a chunk is flushed once its documents reach chunk_chars characters).
    size, unflushed = 0, 0
    for text in files[2]:
        size, unflushed = size + len(text), unflushed + 1
        if size >= kw["chunk_chars"]:
            size, unflushed = 0, 0
    resumed = prepare(f"hf:{broken}", tmp_path / "resumed", tokenizer, workers=1, **kw)
    assert resumed["stats"]["documents_streamed"] == unflushed + len(files[3])
    assert 0 < resumed["stats"]["tokens_tokenized"] < whole["stats"]["tokens_tokenized"]

    for m, folder in ((whole, "whole"), (resumed, "resumed")):
        assert m["splits"] == ref["splits"]
        for info in ref["splits"].values():
            for shard in info["shards"]:
                got = (tmp_path / folder / shard["file"]).read_bytes()
                assert got == (tmp_path / "ref" / shard["file"]).read_bytes(), (folder, shard)
    # The source fingerprint: every document's key and hash, in stream order (as a one-producer
    # read feeds it), whatever the producers and the interruption.
    for m, source in ((whole, hub), (resumed, broken)):
        h = hashlib.sha1(f"source 0: hf:{source}\n".encode())
        for text in (t for texts in files for t in texts if t):
            key = hashlib.sha1(text.encode()).hexdigest()
            h.update(f"{key}\0{key}\n".encode())
        assert m["source"]["fingerprint"] == h.hexdigest()[:16]
