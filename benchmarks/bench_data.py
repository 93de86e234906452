"""Benchmark corpus-scale data: `prepare` throughput and the peak memory of a distillation's start-up
as the corpus grows, from prepared shards (minitron now) and from a raw source (the in-memory
packing every stage used before shards; optional, on the smaller sizes).

    python benchmarks/bench_data.py                       # 10M, 30M, 100M tokens (minutes on 2 cores)
    python benchmarks/bench_data.py --sizes 10 30         # skip the largest
    python benchmarks/bench_data.py --baseline-max 10     # raw-source start-up only up to 10M tokens
    python benchmarks/bench_data.py --chunks 125000       # pass 2 over 125k chunks (minutes)

`--chunks N` measures `prepare` at the chunk count of a ~111B-token corpus (120k chunks of 4M
characters) without its text: N one-document chunks (`--chunk-chars`, default 100 characters per
chunk), one worker; a sampler thread records the open files (/proc/self/fd), memory mappings
(/proc/self/maps lines) and RSS during pass 2 (the shard writing), against the open-file limit and
vm.max_map_count. Writes data-chunks-cpu-<time>.json/.md.

The corpus is generated: documents are random 2-8k character slices of this Python's standard
library source (real code, so the tokenizer sees realistic text), as JSONL. The tokenizer is the
embedded SmolLM2-135M's (vocabulary 49152: uint16 shards). The distillation is a tiny config-built
teacher and student with that vocabulary, run through `run_distill` with a token budget of the
whole train split (so the data order spans every block), stopped after its first optimizer step;
its peak RSS is what the table reports. Before anything is timed, the shards' first blocks are
checked against `load_blocks` on the same source.

Writes benchmarks/results/data-cpu-<time>.json and a .md table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).parent))
from bench_softmax_kl import git_sha, versions  # noqa: E402


def commit() -> str | None:
    """The checkout's commit (also in a git worktree, where .git is a file)."""
    sha = git_sha()
    if sha is None:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        sha = proc.stdout.strip() or None
    return sha

BLOCK = 256
CHARS_PER_TOKEN = 3.6  # SmolLM2's tokenizer on stdlib source, measured by the first size's prepare

# The start-up probe, in a fresh process so its peak RSS is its own.
PROBE = r'''
import json, os, resource, sys, time
t0 = time.perf_counter()
import minitron.distill.command as d  # run_distill calls the distill it imported
from minitron.config import DistillConfig
from minitron.distill import run_distill
teacher, student, data, out, tokens = sys.argv[1:6]
class Stop(Exception):
    pass
def stop(step):
    raise Stop
real = d.distill
d.distill = lambda *a, **k: real(*a, on_step=stop, **k)
cfg = DistillConfig(tokens=int(tokens), batch_size=4, block_size=256, eval_blocks=4,
                    eval_batch_size=4, eval_every=10**9, checkpoint_every=10**9, progress=False,
                    lr=1e-4)
try:
    run_distill(teacher, student, out, cfg, data_source=data, device="cpu")
except Stop:
    pass
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "first_step_s": time.perf_counter() - t0}))
'''


def make_corpus(path: Path, tokens: int, seed: int = 0) -> dict:
    """A JSONL of stdlib slices holding about `tokens` tokens."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    text = "\n\n".join(p.read_text(errors="replace") for p in files[:600])
    rng = random.Random(seed)
    target, chars, docs = int(tokens * CHARS_PER_TOKEN), 0, 0
    with path.open("w") as f:
        while chars < target:
            n = rng.randint(2000, 8000)
            start = rng.randrange(0, len(text) - n)
            piece = f"# doc {docs}\n" + text[start:start + n]
            f.write(json.dumps({"text": piece}) + "\n")
            chars += len(piece)
            docs += 1
    return {"documents": docs, "chars": chars, "bytes": path.stat().st_size}


def tiny_models(root: Path, tokenizer) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = []
    for name, layers in (("teacher", 2), ("student", 1)):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=BLOCK, eos_token_id=tokenizer.eos_token_id)
        cfg.architectures = ["LlamaForCausalLM"]
        LlamaForCausalLM(cfg).save_pretrained(root / name, safe_serialization=True)
        tokenizer.save_pretrained(root / name)
        paths.append(root / name)
    return paths[0], paths[1]


def probe(teacher: Path, student: Path, data: str, out: Path, tokens: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM":
           "false"}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(teacher), str(student), data, str(out),
                           str(tokens)], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_blocks(prepared: Path, corpus: Path, tokenizer) -> None:
    """The shards' first train blocks are the in-memory packing's (correctness before timing)."""
    import torch

    from minitron.data import load_blocks

    want = load_blocks(tokenizer, "train", 8, source=str(corpus), block_size=BLOCK)
    got = load_blocks(tokenizer, "train", 8, source=str(prepared), block_size=BLOCK)
    if not torch.equal(want, got):
        raise SystemExit("shards differ from load_blocks: not timing")


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Data at corpus scale ({meta['device_name']})", "",
             f"git {meta['git_sha']}, {meta['timestamp']}; tokenizer {meta['tokenizer']}, "
             f"block {BLOCK}; distillation start-up = load models and data, first eval, first "
             f"optimizer step (batch 4), tiny config-built models.", "",
             "| corpus tokens | workers | prepare s | tokens/s | tokens/s per worker | shards MB "
             "| start-up peak RSS, shards (MB) | first step s | start-up peak RSS, raw source (MB) "
             "| first step s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        raw = r.get("raw")
        base = f"{raw['peak_rss_mb']:.0f} | {raw['first_step_s']:.1f}" if raw else "not run | -"
        lines.append(
            f"| {r['tokens'] / 1e6:.1f}M | {r['workers']} | {r['prepare_s']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_worker']:,.0f} | {r['shards_mb']:.0f} "
            f"| {r['shards']['peak_rss_mb']:.0f} | {r['shards']['first_step_s']:.1f} | {base} |")
    lines += ["", meta["note"], ""]
    return "\n".join(lines)


class Sampler:
    """Max open files, mappings and RSS of this process while `active` (a 20 ms poll thread)."""

    def __init__(self):
        import threading

        self.active, self.peak = False, {"open_files": 0, "maps": 0, "rss_mb": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            if self.active:
                self.sample()

    def sample(self):
        p = self.peak
        p["open_files"] = max(p["open_files"], len(os.listdir("/proc/self/fd")))
        with open("/proc/self/maps") as f:
            p["maps"] = max(p["maps"], sum(1 for _ in f))
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        p["rss_mb"] = max(p["rss_mb"], rss / 1024)

    def stop(self):
        self._stop.set()
        self._thread.join()


def make_chunk_corpus(path: Path, chunks: int, chunk_chars: int, seed: int = 0) -> dict:
    """A JSONL of `chunks` documents of chunk_chars..2*chunk_chars characters (one per chunk)."""
    rng, words = random.Random(seed), "the of and to in is was for on that with as by at".split()
    chars = 0
    with path.open("w") as f:
        for i in range(chunks):
            text = f"doc {i}:"
            while len(text) < chunk_chars + rng.randrange(chunk_chars):
                text += " " + rng.choice(words) + str(rng.randrange(1000))
            f.write(json.dumps({"text": text}) + "\n")
            chars += len(text)
    return {"documents": chunks, "chars": chars, "bytes": path.stat().st_size}


def chunk_scale(args) -> None:
    """`prepare` over `args.chunks` one-document chunks, pass 2 sampled (see the module doc)."""
    import resource

    import minitron.shards as shards
    from minitron.data import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    stamp, sha = datetime.now(timezone.utc), commit()
    sampler, write_split = Sampler(), shards._write_split

    def sampled(*a, **k):  # pass 2 of one split, sampled
        sampler.active = True
        try:
            return write_split(*a, **k)
        finally:
            sampler.sample()
            sampler.active = False

    shards._write_split = sampled
    with tempfile.TemporaryDirectory(prefix="bench-data-chunks-", dir=args.work) as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        info = make_chunk_corpus(corpus, args.chunks, args.chunk_chars)
        t0 = time.perf_counter()
        m = shards.prepare(str(corpus), Path(tmp) / "out", tokenizer, workers=1, block_size=BLOCK,
                           chunk_chars=args.chunk_chars, progress=False)
        wall = time.perf_counter() - t0
    sampler.stop()
    st, total = m["stats"], sum(s["tokens"] for s in m["splits"].values())
    row = {"chunks": args.chunks, "chunk_chars": args.chunk_chars, "corpus": info, "tokens": total,
           "documents": {s: v["documents"] for s, v in m["splits"].items()}, "workers": 1,
           "prepare_s": wall, "tokenize_s": st["tokenize_s"], "write_s": st["write_s"],
           "tokenize_tokens_per_s": total / st["tokenize_s"],
           "write_tokens_per_s": total / st["write_s"], "pass2_peak": sampler.peak,
           "peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "open_file_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}
    with open("/proc/sys/vm/max_map_count") as f:
        row["max_map_count"] = int(f.read())
    meta = dict(device="cpu", device_name=f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
                versions=versions(), git_sha=sha, timestamp=stamp.isoformat(timespec="seconds"),
                tokenizer="smollm2-135m (vocab 49152, uint16 shards)", block_size=BLOCK)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"data-chunks-cpu-{stamp.strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, results=[row]), indent=1) + "\n")
    p = row["pass2_peak"]
    table = "\n".join([
        f"# data prepare at a corpus's chunk count ({meta['device_name']})", "",
        f"git {sha}, {meta['timestamp']}; {args.chunks} one-document chunks of >= "
        f"{args.chunk_chars} characters, 1 worker; `python benchmarks/bench_data.py --chunks "
        f"{args.chunks} --chunk-chars {args.chunk_chars}`.", "",
        "| chunks | tokens | tokenize tokens/s | pass 2 tokens/s | pass 2 peak open files | "
        "pass 2 peak mappings | pass 2 peak RSS MB | open-file limit | vm.max_map_count |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.chunks} | {total:,} | {row['tokenize_tokens_per_s']:,.0f} | "
        f"{row['write_tokens_per_s']:,.0f} | {p['open_files']} | {p['maps']} | "
        f"{p['rss_mb']:.0f} | {row['open_file_limit']} | {row['max_map_count']} |", "",
        "Pass 2 before this change kept a memory map (and its descriptor) per chunk of a split: "
        f"{max(row['documents'].values()):,} for the train split here (the limits: the last "
        "two columns).", ""])
    stem.with_suffix(".md").write_text(table)
    print(table)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[10, 30, 100],
                    help="corpus sizes in millions of tokens")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--baseline-max", type=float, default=10,
                    help="run the raw-source start-up only up to this size (millions; 0 = never)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--chunks", type=int, default=None,
                    help="instead: prepare this many one-document chunks, pass 2 sampled")
    ap.add_argument("--chunk-chars", type=int, default=100, help="characters per chunk (--chunks)")
    args = ap.parse_args(argv)
    if args.chunks:
        return chunk_scale(args)

    from minitron.data import load_tokenizer
    from minitron.shards import prepare

    tokenizer = load_tokenizer("smollm2-135m")
    rows, stamp, sha = [], datetime.now(timezone.utc), commit()  # the code measured: at the start
    with tempfile.TemporaryDirectory(prefix="bench-data-", dir=args.work) as tmp:
        root = Path(tmp)
        teacher, student = tiny_models(root, tokenizer)
        for size in args.sizes:
            tokens = int(size * 1e6)
            corpus = root / f"corpus-{size:g}M.jsonl"
            info = make_corpus(corpus, tokens)
            t0 = time.perf_counter()
            manifest = prepare(str(corpus), root / f"shards-{size:g}M", tokenizer,
                               workers=args.workers, block_size=BLOCK, progress=False)
            wall = time.perf_counter() - t0
            check_blocks(root / f"shards-{size:g}M", corpus, tokenizer)
            st = manifest["stats"]
            total = sum(s["tokens"] for s in manifest["splits"].values())
            train_tokens = manifest["splits"]["train"]["tokens"]
            budget = (train_tokens // (4 * BLOCK)) * 4 * BLOCK  # every train block in the order
            row = {"tokens": total, "corpus": info, "workers": args.workers, "prepare_s": wall,
                   "tokenize_s": st["tokenize_s"], "write_s": st["write_s"],
                   "tokens_per_s": total / st["tokenize_s"],
                   "tokens_per_s_per_worker": total / st["tokenize_s"] / args.workers,
                   "shards_mb": sum((root / f"shards-{size:g}M" / sh["file"]).stat().st_size
                                    for s in manifest["splits"].values()
                                    for sh in s["shards"]) / 2**20,
                   "train_budget_tokens": budget}
            row["shards"] = probe(teacher, student, str(root / f"shards-{size:g}M"),
                                  root / f"run-shards-{size:g}M", budget)
            if size <= args.baseline_max:
                row["raw"] = probe(teacher, student, str(corpus), root / f"run-raw-{size:g}M",
                                   budget)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "corpus"}), file=sys.stderr)
            table = write(args.out, stamp, rows, sha)
            for p in root.glob(f"*-{size:g}M*"):  # free the disk before the next size
                subprocess.run(["rm", "-rf", str(p)], check=True)

    print(table)


def write(out: Path, stamp: datetime, rows: list[dict], sha: str | None) -> str:
    """JSON + table of the sizes done so far (rewritten after each size: a long run that is
    stopped keeps what it measured)."""
    meta = dict(device="cpu", device_name=f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
                versions=versions(), git_sha=sha, timestamp=stamp.isoformat(timespec="seconds"),
                tokenizer="smollm2-135m (vocab 49152, uint16 shards)", block_size=BLOCK,
                note=("Start-up from shards: the train blocks stay memory-mapped and are read by "
                      "index per micro-batch. From a raw source: every start-up tokenizes and packs "
                      "the train split in memory. The machine is shared with other jobs: "
                      "throughput varies between runs."))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"data-cpu-{stamp.strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, results=rows), indent=1) + "\n")
    table = markdown(meta, rows)
    stem.with_suffix(".md").write_text(table)
    return table


if __name__ == "__main__":
    main()
