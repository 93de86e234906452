"""The demo's distillation shape, end to end through `minitron.distill.distill`, with the default
precision policy: a smoke run for a lent GPU (bf16 there), and its CPU stand-in.

The embedded SmolLM2 cannot travel to the GPU machine (64 MiB carry limit), so teacher and student
are built from configs in the demo's shapes (teacher: SmolLM2-135M, 30 layers, hidden 576, 9/3
heads, MLP 1536; student: the demo's width-pruned 384 / 6 heads / 1024) with Llama-3's 128,256-entry
vocabulary, which routes the loss through the fused linear+KL form. Random teacher, random tokens:
it checks that the loop runs, stays finite and lowers its loss, and measures speed and memory.

    python benchmarks/distill_smoke.py [--steps 50] [--device cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch


def build(hidden: int, heads: int, mlp: int, vocab: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=3,
                      head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e5})
    return LlamaForCausalLM(cfg).eval()


def _without_matplotlib() -> bool:
    """distill() ends by plotting its losses with matplotlib, a minitron dependency that a GPU image
    may lack (nothing can be installed there but a few carried wheels, and matplotlib with its own
    dependencies is ~25 MB of platform wheels). The smoke run measures training, not the plot: there
    it goes without one, and its JSON says so."""
    if importlib.util.find_spec("matplotlib") is not None:
        return False
    import minitron.distill.stage

    minitron.distill.stage.plot_losses = lambda *args, **kwargs: None
    return True


def main(argv=None) -> int:
    from minitron.config import DistillConfig
    from minitron.distill import distill
    from minitron.precision import resolve

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", default="gpu-out")
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    teacher = build(576, 9, 1536, args.vocab, args.layers, seed=0).to(dev)
    student = build(384, 6, 1024, args.vocab, args.layers, seed=1).to(dev)
    batch, block = 4, 128
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, args.vocab, (args.steps * batch, block), generator=gen)
    evalb = torch.randint(0, args.vocab, (8, block), generator=gen)
    config = DistillConfig(tokens=args.steps * batch * block, batch_size=batch, block_size=block,
                           lr=3e-4, warmup_fraction=0.05, eval_every=max(args.steps // 2, 1),
                           eval_blocks=8, checkpoint_every=args.steps, progress=False,
                           precision=args.precision)
    no_plot = _without_matplotlib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        metrics = distill(teacher, student, train, evalb, config, Path(tmp) / "run")
        losses = [json.loads(line)["loss"] for line in (Path(tmp) / "run" / "metrics.jsonl")
                  .read_text().splitlines() if json.loads(line)["kind"] == "train"]
    wall = time.perf_counter() - t0
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "git": sha, "precision": resolve(args.precision, dev),
        "vocab": args.vocab, "layers": args.layers, "steps": args.steps,
        "tokens_per_step": batch * block, "loss_impl": metrics["loss_impl"],
        "first_loss": losses[0], "last_loss": losses[-1], "wall_s": round(wall, 1),
        "train_tokens_per_s": metrics["train_tokens_per_s"],
        "peak_gpu_gib": (round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
                         if dev.type == "cuda" else None),
        "eval": {k: metrics[k] for k in ("eval_loss", "kl_to_teacher", "top1_agreement")},
        "loss_plot": not no_plot,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"distill_smoke-{dev.type}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = all(map(lambda x: x == x and abs(x) != float("inf"), losses)) and losses[-1] < losses[0]
    print("DISTILL SMOKE", "OK" if ok else "FAILED: loss did not fall or is not finite")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
