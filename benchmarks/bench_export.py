"""Benchmark the ONNX export against PyTorch and against ONNX Runtime GenAI's own model builder.

    python benchmarks/bench_export.py                 # SmolLM2-135M, ~10 min on a 2-core box
    python benchmarks/bench_export.py --model DIR --prompt 256 --new 32 --repeats 3

One thread everywhere (torch.set_num_threads(1), ORT intra-op threads 1): batch-1 latency on a
shared CPU. A prompt of --prompt tokens from the held-out split, then --new greedy tokens with the
KV cache. Rows, all in one run:
- pytorch-fp32: the transformers model (the reference: ratios are against it);
- ours-*: minitron.export's FP32 graph (validated against PyTorch by the export itself), then each
  quantized variant made from it by the export's own quantizer, each run through ONNX Runtime
  GenAI (the deployment runtime) and, for FP32, also fed by hand through plain ONNX Runtime;
- builder-fp32 / builder-int4: `python -m onnxruntime_genai.models.builder` run directly on the same
  Hugging Face folder (Microsoft's exporter: fused GroupQueryAttention and rotary ops), through
  ONNX Runtime GenAI. The bar to beat.
Prefill: the time to run the prompt (GenAI: `append_tokens`); decode: per new token, medians of
--repeats. Greedy agreement: leading tokens equal to PyTorch FP32's (min_length forces --new tokens
in every runtime). Correctness first: the FP32 graph must reproduce PyTorch's greedy tokens before
anything is timed.

Writes benchmarks/results/export-cpu-<time>.json and a .md table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).parent))
from bench_data import commit  # noqa: E402

RUNTIME_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "genai_config.json")


def torch_row(model, prompt, new: int, repeats: int) -> dict:
    import torch

    from minitron.models import cache_kwarg, cache_of

    kw = cache_kwarg(model)

    prefill, decode = [], []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True)
            prefill.append(time.perf_counter() - t0)
            cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(new):
                out = model(token, use_cache=True, **{kw: cache})
                cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
            decode.append((time.perf_counter() - t0) / new)
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False)[0, prompt.shape[1]:].tolist()
    return {"runtime": "pytorch", "prefill_ms": 1000 * statistics.median(prefill),
            "decode_ms": 1000 * statistics.median(decode), "tokens": tokens}


def genai_row(folder: Path, prompt: list[int], new: int, repeats: int) -> dict:
    """Latency and greedy tokens through ONNX Runtime GenAI, one intra-op thread."""
    import onnxruntime_genai as og

    cfg_path = folder / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=2))
    model = og.Model(str(folder))
    prefill, decode, tokens = [], [], []
    for _ in range(repeats):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + new + 1,
                                  min_length=len(prompt) + new + 1)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt)  # the prefill forward
        prefill.append(time.perf_counter() - t0)
        generator.generate_next_token()  # picks the first token from the prefill's logits
        tokens = [int(generator.get_next_tokens()[0])]
        t0 = time.perf_counter()
        for _ in range(new):  # each runs one forward of the previous token, then picks
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        decode.append((time.perf_counter() - t0) / new)
    return {"runtime": "onnxruntime-genai", "prefill_ms": 1000 * statistics.median(prefill),
            "decode_ms": 1000 * statistics.median(decode), "tokens": tokens[:new]}


def ort_row(folder: Path, file_name: str, prompt, new: int, repeats: int) -> dict:
    """The same graph fed by hand through a plain ONNX Runtime session (minitron.onnx_lm)."""
    import numpy as np

    from minitron.onnx_lm import OnnxLM

    lm = OnnxLM(folder, file_name, threads=1)
    ids = prompt.numpy()
    prefill, decode = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits, cache = lm.step(ids, lm.empty_cache(1))
        prefill.append(time.perf_counter() - t0)
        tokens = [int(logits[0, -1].argmax())]
        t0 = time.perf_counter()
        for _ in range(new):
            logits, cache = lm.step(np.array([[tokens[-1]]]), cache)
            tokens.append(int(logits[0, -1].argmax()))
        decode.append((time.perf_counter() - t0) / new)
    return {"runtime": "onnxruntime", "prefill_ms": 1000 * statistics.median(prefill),
            "decode_ms": 1000 * statistics.median(decode), "tokens": tokens[:new]}


def variant_folder(fp32_dir: Path, root: Path, variant, calib) -> Path:
    """A runtime folder holding one quantized graph made by minitron.export's own quantizer."""
    from minitron import export as ex
    from minitron.onnx_graph import set_genai_file

    out = root / f"ours-{variant.name}"
    out.mkdir()
    for name in RUNTIME_FILES:
        shutil.copy(fp32_dir / name, out / name)
    folded = root / "folded.onnx"
    if not folded.exists():
        ex.fold_initializer_transposes(fp32_dir / ex.DEPLOY_FILE, folded)
    ex.quantize(folded, out / ex.DEPLOY_FILE, variant, calib)
    set_genai_file(out, ex.DEPLOY_FILE)
    return out


def builder_folder(hf_dir: Path, root: Path, precision: str) -> Path:
    out = root / f"builder-{precision}"
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
                           "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(root / "cache")],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"builder {precision} failed: {proc.stderr[-2000:]}")
    return out


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if ".onnx" in f.name) / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from minitron import export as ex
    from minitron.config import DataConfig, ExportConfig
    from minitron.data import load_blocks
    from minitron.models import load_model, resolve_model

    hf_dir = Path(resolve_model(args.model))
    model, tok = load_model(args.model, dtype="float32", device="cpu")
    prompt = load_blocks(tok, "eval", 1, source="stdlib", block_size=args.prompt)
    calib = load_blocks(tok, "calibration", 8, source="stdlib", block_size=256)
    rows = {"pytorch-fp32": {**torch_row(model, prompt, args.new, args.repeats),
                             "size_mb": sum(p.numel() for p in model.parameters()) * 4 / 2**20}}
    reference = rows["pytorch-fp32"]["tokens"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        ex.export(args.model, root / "ours-fp32", ExportConfig(int8="none", speed=False),
                  DataConfig(source="stdlib"))
        export_s = time.perf_counter() - t0
        fp32 = root / "ours-fp32"
        rows["ours-fp32 (ORT)"] = ort_row(fp32, ex.DEPLOY_FILE, prompt, args.new, args.repeats)
        if rows["ours-fp32 (ORT)"]["tokens"] != reference:
            raise SystemExit("the FP32 graph's greedy tokens differ from PyTorch's: not timing a wrong model")
        folders = {"ours-fp32": fp32}
        for v in (ex.QuantVariant("blockwise", accuracy_level=0), ex.QuantVariant("blockwise", accuracy_level=4),
                  ex.QuantVariant("dynamic"), ex.QuantVariant("rtn", bits=4, accuracy_level=4),
                  ex.QuantVariant("hqq", bits=4, accuracy_level=4)):
            folders[f"ours-{v.name}"] = variant_folder(fp32, root, v, calib)
        build_s = {}
        for precision in ("fp32", "int4"):
            t0 = time.perf_counter()
            folders[f"builder-{precision}"] = builder_folder(hf_dir, root, precision)
            build_s[precision] = time.perf_counter() - t0
        for name, folder in folders.items():
            rows[name] = genai_row(folder, prompt[0].tolist(), args.new, args.repeats)
            rows[name]["size_mb"] = folder_mb(folder)
        rows["ours-fp32 (ORT)"]["size_mb"] = rows["ours-fp32"]["size_mb"]
    base = rows["pytorch-fp32"]
    table = []
    for name, r in rows.items():
        match = next((i for i, (a, b) in enumerate(zip(r["tokens"], reference)) if a != b), len(reference))
        r["greedy_match"] = match
        table.append({"model": name, "runtime": r["runtime"], "size_mb": round(r["size_mb"], 1),
                      "prefill_ms": round(r["prefill_ms"], 1),
                      "prefill_x": round(base["prefill_ms"] / r["prefill_ms"], 2),
                      "decode_tok_s": round(1000 / r["decode_ms"], 1),
                      "decode_x": round(base["decode_ms"] / r["decode_ms"], 2),
                      "greedy": f"{match}/{len(reference)}"})
    import onnxruntime
    import onnxruntime_genai
    import transformers

    from minitron.cpu import describe_cpu

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"kind": "minitron-bench-export", "model": args.model, "prompt_tokens": args.prompt,
              "new_tokens": args.new, "repeats": args.repeats, "threads": 1,
              "export_fp32_s": round(export_s, 1), "builder_s": {k: round(v, 1) for k, v in build_s.items()},
              "device": {"cpu": describe_cpu().model, "cpu_count": os.cpu_count(),
                         "load_average_1m": round(os.getloadavg()[0], 2)},
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
                           "onnxruntime-genai": onnxruntime_genai.__version__},
              "git": commit(), "rows": rows, "table": table}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"export-cpu-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    from minitron.common import format_table

    md = (f"# Export benchmark: {args.model}, {args.prompt}-token prompt, {args.new} greedy tokens, one thread\n\n"
          f"{result['device']['cpu']} ({result['device']['cpu_count']} cores, load {result['device']['load_average_1m']}); "
          f"git {result['git']}; ratios against PyTorch FP32 in the same run.\n"
          f"Export (FP32, validated): {result['export_fp32_s']} s; builder fp32 {result['builder_s']['fp32']} s, "
          f"int4 {result['builder_s']['int4']} s.\n\n" + format_table(table) + "\n\n"
          f"Command: `python benchmarks/bench_export.py {' '.join(sys.argv[1:])}`\n")
    path.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
