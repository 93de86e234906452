"""Llama-3.1-8B -> 4.5B width distillation at real width and two layers, through minitron's own
CLI (`python -m minitron.distill`) under `torchrun --nproc_per_node=1`: FSDP2, the bf16 policy,
NCCL and DCP checkpoints on a GPU. The first thing `gpu_check.sh` runs on a lent GPU.

Per activation-checkpointing setting (true, false): an uninterrupted run of STEPS optimizer steps,
then the same run killed (SIGKILL from the step hook) after its checkpoint at step STEPS/2 is
confirmed, then resumed to the end; the final model.safetensors of both must agree. Without
activation checkpointing (where a save is the largest share of a step) also the uninterrupted run
with `--async-checkpoint` (dcp.async_save on a gloo group beside NCCL, FSDP2 shards staged from
the GPU): its weights must agree with the synchronous run's, and the per-step times of both show
how long the step that saves is blocked.

Models are built from recipes/configs/llama-3.1-8b.json (random weights, no download) with 2
layers: teacher hidden 4096 / MLP 14336 / 32 heads / 8 KV heads / vocab 128256 / llama3 rope;
student the recipe's width shape (hidden 3072, MLP 9216, heads kept). Data: blocks of 8192 tokens
of stdlib source, tokenized by a 512-entry byte-level BPE trained here in a second; the models keep
Llama's 128256-entry vocabulary (ids >= 512 never occur in the input, but every step computes the
full 128256-way logits and KL, which is what costs time and memory). A tokenizer padded to 128256
entries was tried: 24 MB of tokenizer.json and ~8 s per load, several loads per launch.

Extrapolation to 32 layers: the measured step time is split into per-layer and fixed (embedding,
LM heads, loss) parts in proportion to their matmul FLOPs (see `flops`), then
t(32) = fixed + 32 x per-layer. Memory: peak allocated / reserved in the rank against
`minitron.memory_plan.plan_distill` at 2 layers (what ran) and at 32 (the projection).

    python benchmarks/distill_8b_step.py [--tiny] [--steps 6] [--out DIR] [--work DIR]

--tiny: the CPU stand-in (hidden 64, vocab 512, 2 layers, 64-token blocks, gloo) that
tests/test_gpu_check.py runs. Writes OUT/distill_8b_step-DEVICE-TIME.json and a .md table
(OUT: benchmarks/results by default; gpu_check.sh gives its $OUT); exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = ROOT / "recipes" / "configs" / "llama-3.1-8b.json"
BPE_VOCAB = 512
TOKENS_94B = 94e9
TINY_T = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, vocab_size=512)
TINY_S = dict(hidden_size=48, intermediate_size=96)
REAL_S = dict(hidden_size=3072, intermediate_size=9216)  # recipes/llama-3.1-8b-to-4b-width.yaml


# ----------------------------------------------------------------------------- worker (a rank)
def worker(argv: list[str]) -> None:
    """One torchrun rank: the real CLI, a SIGKILL after step GC_KILL_AT, peak memory to GC_MEM."""
    import torch

    import minitron.distill.command as d  # the command calls the distill it imported
    import minitron.distill.stage
    from minitron.common import run_cli

    kill_at = int(os.environ.get("GC_KILL_AT", 0))
    real = d.distill

    def on_step(step: int) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    d.distill = lambda *a, **k: real(*a, on_step=on_step, **k)
    # distill() ends with a matplotlib plot of its losses: the GPU image has no matplotlib (see
    # distill_smoke.py), and the plot is not what is measured, so no run here draws one.
    minitron.distill.stage.plot_losses = lambda *a, **k: None
    cuda = torch.cuda.is_available()
    try:
        run_cli(d.main, argv)
    finally:
        if cuda and os.environ.get("GC_MEM"):
            Path(os.environ["GC_MEM"]).write_text(json.dumps({
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}))


# ----------------------------------------------------------------------------- inputs
def llama_configs(tiny: bool, layers: int = 2):
    from transformers import LlamaConfig

    base = {k: v for k, v in json.loads(LLAMA_8B.read_text()).items() if not k.startswith("_")}
    base.update(num_hidden_layers=layers, bos_token_id=None, eos_token_id=0)
    if tiny:
        base.update(TINY_T)
    teacher = LlamaConfig(**base)
    student = LlamaConfig(**{**base, **(TINY_S if tiny else REAL_S)})
    return teacher, student


def tokenizer():
    """A byte-level BPE of BPE_VOCAB entries trained on a few stdlib files (no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([(stdlib / n).read_text() for n in ("textwrap.py", "string.py")], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def corpus(path: Path, chars: int) -> None:
    """JSONL of stdlib source in 4000-character documents, about `chars` in all."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for f in sorted(stdlib.glob("*.py")):
        text = f.read_text(errors="replace")
        for i in range(0, len(text), 4000):
            docs.append(json.dumps({"text": text[i:i + 4000]}) + "\n")
            total += len(text[i:i + 4000])
        if total >= chars:
            break
    path.write_text("".join(docs))


def build_models(work: Path, tiny: bool, device: str) -> None:
    import torch
    from transformers import LlamaForCausalLM

    tok = tokenizer()
    for name, cfg, seed in zip(("teacher", "student"), llama_configs(tiny), (0, 1)):
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
        if name == "teacher":  # the teacher loads in bf16 (model.dtype): stored as such
            model = model.to(torch.bfloat16)
        model.save_pretrained(work / name, safe_serialization=True)
        tok.save_pretrained(work / name)
        del model
    if device == "cuda":  # the ranks are other processes: hand this one's cache back
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- runs
def distill_args(work: Path, tiny: bool, steps: int, gc: bool) -> list[str]:
    block = 64 if tiny else 8192
    return ["--teacher", str(work / "teacher"), "--student", str(work / "student"),
            "--source", str(work / "corpus.jsonl"), "--tokens", str(steps * block),
            "--batch-size", "1", "--block-size", str(block), "--lr", "1e-3",
            "--warmup-fraction", "0", "--checkpoint-every", str(steps // 2),
            "--eval-every", str(steps), "--eval-blocks", "1", "--eval-batch-size", "1",
            "--loss-impl", "fused", "--strategy", "fsdp", "--no-progress", "--seed", "0",
            "--no-keep-checkpoint", "--device", "cpu" if tiny else "cuda",
            "--precision", "fp32" if tiny else "bf16",
            "--gradient-checkpointing" if gc else "--no-gradient-checkpointing"]


def torchrun(args: list[str], out: Path, kill_at: int = 0, mem: Path | None = None,
             timeout: float = 600) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(Path(__file__).resolve()), "--worker", *args, "--output", str(out)]
    env = {**os.environ, "GC_KILL_AT": str(kill_at), "GC_MEM": str(mem or ""),
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get(
               "PYTHONPATH", "").split(os.pathsep) if p])}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, time.monotonic() - t0


def train_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def compare_weights(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    same_keys = wa.keys() == wb.keys()
    diff = max(((wa[k].float() - wb[k].float()).abs().max().item() for k in wa if k in wb),
               default=float("inf"))
    return {"same_keys": same_keys, "tensors": len(wa), "max_abs_diff": diff,
            "bitwise_equal": same_keys and all(wa[k].equal(wb[k]) for k in wa)}


def one_setting(work: Path, tiny: bool, steps: int, gc: bool) -> dict:
    """Uninterrupted run, killed run, resumed run; their records and the weight comparison."""
    args = distill_args(work, tiny, steps, gc)
    tag = "gc" if gc else "nogc"
    full, killed, mem = work / f"full-{tag}", work / f"killed-{tag}", work / f"mem-{tag}.json"
    rc, log, wall_full = torchrun(args, full, mem=mem)
    if rc != 0:
        raise RuntimeError(f"uninterrupted run (gradient_checkpointing={gc}) failed:\n{log[-4000:]}")
    kill_at = steps // 2 + 1  # the step-`steps // 2` checkpoint is confirmed during this step
    rc_kill, log_kill, wall_kill = torchrun(args, killed, kill_at=kill_at)
    checkpointed = (killed / "checkpoint").exists()
    rc_resume, log_resume, wall_resume = torchrun(args, killed)
    if rc_resume != 0:
        raise RuntimeError(f"resumed run failed:\n{log_resume[-4000:]}")
    recs = train_records(full)
    # Step 1 warms up (Triton compiles, allocator grows); the median skips the one step that also
    # saves the previous step's checkpoint (a checkpoint is written once the next step looks sane).
    tps = [r["tokens_per_s"] for r in recs[1:]] or [recs[0]["tokens_per_s"]]
    tokens_per_step = recs[0]["tokens"]
    losses = [r["loss"] for r in recs]
    resumed = re.search(r"resuming from step (\d+)/", log_resume)
    result = {
        "gradient_checkpointing": gc, "steps": len(recs), "tokens_per_step": tokens_per_step,
        "losses": losses, "median_step_s": tokens_per_step / statistics.median(tps),
        "tokens_per_s": statistics.median(tps),
        "wall_s": {"uninterrupted": round(wall_full, 1), "killed": round(wall_kill, 1),
                   "resumed": round(wall_resume, 1)},
        "kill": {"at_step": kill_at, "exit_code": rc_kill, "checkpoint_left": checkpointed,
                 "resumed_from_step": int(resumed.group(1)) if resumed else None,
                 "resumed_steps_logged": [r["step"] for r in train_records(killed)],
                 "killed_log_tail": log_kill[-600:]},
        "resume_vs_uninterrupted": compare_weights(full, killed),
        "memory": json.loads(mem.read_text()) if mem.exists() else None,
    }
    if not gc:
        result["async_checkpoint"] = async_run(args, full, work / f"async-{tag}")
    for out in (full, killed):  # a real-width run leaves GBs: keep only the records
        shutil.rmtree(out, ignore_errors=True)
    return result


def async_run(args: list[str], sync: Path, out: Path) -> dict:
    """The uninterrupted run again with distill.async_checkpoint, against the synchronous one."""
    rc, log, wall = torchrun(args + ["--async-checkpoint"], out)
    if rc != 0:
        raise RuntimeError(f"run with --async-checkpoint failed:\n{log[-4000:]}")
    step_s = lambda run: [round(r["tokens"] / r["step"] / r["tokens_per_s"], 3)
                          for r in train_records(run)]
    result = {"wall_s": round(wall, 1), "step_s": step_s(out), "sync_step_s": step_s(sync),
              "losses_equal": [r["loss"] for r in train_records(out)]
              == [r["loss"] for r in train_records(sync)],
              "vs_sync": compare_weights(sync, out)}
    shutil.rmtree(out, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------- extrapolation
def flops(cfg, tokens: int, teacher: bool, gc: bool) -> tuple[float, float]:
    """(per decoder layer, fixed) matmul FLOPs of one step for `cfg`: the teacher runs forward
    only (2 FLOPs per multiply-add), the student forward and backward (3x), plus one more forward
    of each layer under activation checkpointing. Attention over causal blocks: half the
    T x T scores. Fixed: the LM head (the embedding lookup is no matmul)."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_token = 2 * (h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size)
    per_token += 2 * 2 * (tokens / 2) * q  # scores and weighted sum, causal half
    head = 2 * h * cfg.vocab_size
    mult = 1 if teacher else (3 + (1 if gc else 0))
    return per_token * tokens * mult, head * tokens * (1 if teacher else 3)


def extrapolate(step_s: float, tokens: int, tiny: bool, gc: bool, layers: int = 2,
                depth: int = 32) -> dict:
    t_cfg, s_cfg = llama_configs(tiny)
    tl, tf = flops(t_cfg, tokens, True, False)
    sl, sf = flops(s_cfg, tokens, False, gc)
    per_layer_flops, fixed_flops = tl + sl, tf + sf
    total = layers * per_layer_flops + fixed_flops
    per_layer_s = step_s * per_layer_flops / total
    fixed_s = step_s * fixed_flops / total
    step_deep = fixed_s + depth * per_layer_s
    tok_s = tokens / step_deep
    return {"method": "measured step split into per-layer and fixed parts by matmul FLOPs; "
                      f"t({depth}) = fixed + {depth} x per-layer",
            "per_layer_s": per_layer_s, "fixed_s": fixed_s, f"step_s_{depth}_layers": step_deep,
            f"tokens_per_s_per_gpu_{depth}_layers": tok_s,
            "days_94B_tokens_one_gpu": TOKENS_94B / tok_s / 86400,
            "days_94B_tokens_8_gpus_ideal": TOKENS_94B / tok_s / 86400 / 8}


def planned(tiny: bool, steps: int, gc: bool, layers: int) -> dict:
    from minitron.config import DistillConfig
    from minitron.memory_plan import GIB, plan_distill

    block = 64 if tiny else 8192
    t_cfg, s_cfg = llama_configs(tiny, layers)
    config = DistillConfig(tokens=steps * block, batch_size=1, block_size=block,
                           eval_blocks=1, eval_batch_size=1, loss_impl="fused",
                           gradient_checkpointing=gc, strategy="fsdp")
    plan = plan_distill(t_cfg, s_cfg, config, 1, "bfloat16", "fsdp")
    return {"peak_gib": plan.peak / GIB, "phases_gib": {k: v / GIB for k, v in plan.phases.items()}}


# ----------------------------------------------------------------------------- main
def _meta(device: str) -> dict:
    import torch
    import transformers

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    return {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor()
            or platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda, "git": sha,
            "nccl": str(torch.cuda.nccl.version()) if device == "cuda" else None}


def checks(setting: dict, tiny: bool) -> dict:
    losses = setting["losses"]
    cmp = setting["resume_vs_uninterrupted"]
    out = {"loss_finite": all(abs(x) != float("inf") and x == x for x in losses),
           "loss_falling": losses[-1] < losses[0],
           "killed_then_resumed": setting["kill"]["exit_code"] != 0
           and setting["kill"]["checkpoint_left"]
           and setting["kill"]["resumed_from_step"] == setting["kill"]["at_step"] - 1
           and setting["kill"]["resumed_steps_logged"] == list(range(1, len(losses) + 1)),
           # CPU: the same ops in the same order, bitwise. GPU: bf16 kernels with atomics may
           # reorder sums between processes: within one bf16 rounding of an fp32 master weight.
           "resume_equal": cmp["bitwise_equal"] if tiny else (cmp["same_keys"]
                                                              and cmp["max_abs_diff"] <= 1e-4)}
    if "async_checkpoint" in setting:
        cmp = setting["async_checkpoint"]["vs_sync"]
        out["async_checkpoint_equal"] = cmp["bitwise_equal"] if tiny else (
            cmp["same_keys"] and cmp["max_abs_diff"] <= 1e-4)
    return out


def table(result: dict) -> str:
    head = (f"# distill_8b_step on {result['device']} (torch {result['torch']}, transformers "
            f"{result['transformers']}, git {result['git']})\n\n"
            "| grad. ckpt | step s (2 layers) | s/layer | tok/s/GPU @32 | days 94B @1 GPU "
            "| peak alloc / reserved GiB | plan GiB @2 / @32 | first -> last loss | resume "
            "max diff | checks |\n" + "|---" * 10 + "|\n")
    rows = []
    for s in result["settings"]:
        ext, mem, plan = s["extrapolated"], s["memory"] or {}, s["plan"]
        alloc = (f"{mem['peak_allocated_gib']:.2f} / {mem['peak_reserved_gib']:.2f}"
                 if mem else "n/a (CPU)")
        rows.append(
            f"| {s['gradient_checkpointing']} | {s['median_step_s']:.4f} | {ext['per_layer_s']:.4f} "
            f"| {ext['tokens_per_s_per_gpu_32_layers']:.0f} | {ext['days_94B_tokens_one_gpu']:.1f} "
            f"| {alloc} | {plan['2_layers']['peak_gib']:.2f} / {plan['32_layers']['peak_gib']:.2f} "
            f"| {s['losses'][0]:.4g} -> {s['losses'][-1]:.4g} "
            f"| {s['resume_vs_uninterrupted']['max_abs_diff']:.3g} "
            f"| {'ok' if all(s['checks'].values()) else s['checks']} |")
    for s in result["settings"]:
        if "async_checkpoint" in s:
            a = s["async_checkpoint"]
            rows.append(f"\nWith --async-checkpoint (grad. ckpt {s['gradient_checkpointing']}): "
                        f"step s {a['step_s']} against {a['sync_step_s']} synchronous (a "
                        f"checkpoint is saved during steps {result['steps'] // 2 + 1} and "
                        f"{result['steps']}); weights max diff {a['vs_sync']['max_abs_diff']:.3g}.")
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU stand-in: tiny widths, gloo")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--work", type=Path, help="scratch folder (default: OUT/distill_8b_work)")
    p.add_argument("--gc", default="true,false", help="gradient_checkpointing settings to run")
    args = p.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    work = args.work or Path(tempfile.mkdtemp(prefix="distill_8b_work-", dir=args.out
                                              if args.out.is_dir() else None))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        result = run_all(args, device, work)
    finally:  # a real-width run leaves GBs of models and checkpoints
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"distill_8b_step-{device}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table(result))
    print(json.dumps(result, indent=2))
    print("DISTILL 8B STEP", "OK" if result["ok"] else "FAILED", f"({path})")
    return 0 if result["ok"] else 1


def run_all(args: argparse.Namespace, device: str, work: Path) -> dict:
    t0 = time.monotonic()
    corpus(work / "corpus.jsonl", 200_000 if args.tiny else 2_500_000)
    build_models(work, args.tiny, device)
    result = {**_meta(device), "tiny": args.tiny, "layers": 2, "steps": args.steps,
              "launcher": "torchrun --standalone --nproc_per_node=1",
              "backend": "gloo" if args.tiny else "nccl", "strategy": "fsdp (FSDP2)",
              "precision": "fp32" if args.tiny else "bf16", "tokenizer_entries": BPE_VOCAB,
              "loss_plot": False, "settings": [], "build_s": round(time.monotonic() - t0, 1)}
    ok = True
    for gc in (v.strip() == "true" for v in args.gc.split(",")):
        s = one_setting(work, args.tiny, args.steps, gc)
        s["extrapolated"] = extrapolate(s["median_step_s"], s["tokens_per_step"], args.tiny, gc)
        s["plan"] = {"2_layers": planned(args.tiny, args.steps, gc, 2),
                     "32_layers": planned(args.tiny, args.steps, gc, 32)}
        if s["memory"]:
            s["memory"]["allocated_over_plan_2_layers"] = (s["memory"]["peak_allocated_gib"]
                                                           / s["plan"]["2_layers"]["peak_gib"])
        s["checks"] = checks(s, args.tiny)
        ok = ok and all(s["checks"].values())
        result["settings"].append(s)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    result["ok"] = ok
    return result


if __name__ == "__main__":
    raise SystemExit(main())
