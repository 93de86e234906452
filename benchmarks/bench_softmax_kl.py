"""Benchmark the distillation loss: eager PyTorch, torch.compile, liger-kernel, the chunked torch
reference and the fused Triton kernel, in one run, on the same inputs.

    python benchmarks/bench_softmax_kl.py            # CUDA: the full grid (V x N x dtype x phase)
    python benchmarks/bench_softmax_kl.py --quick    # small shapes; on CPU the reference paths only

Every provider is checked against a float64 reference (on a slice of rows) before it is timed.
Writes benchmarks/results/softmax_kl-<device>-<time>.json and a .md table beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from minitron.kernels import fused_linear_softmax_kl, softmax_kl, token_losses

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PHASES = ("fwd", "bwd", "fwd+bwd")
TEMPERATURE = 2.0
# Published peak HBM bandwidth (GB/s), for when the device properties do not give clock and bus.
PEAK_BANDWIDTH_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000,
                       "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555, "L40S": 864, "A10G": 600}


# ----------------------------------------------------------------------------- providers
# Each takes (student [N, V] requiring grad, teacher [N, V]) and returns the mean per-token loss
# T^2 KL(softmax(t/T) || softmax(s/T)).
def eager(s, t):
    """What a training script writes by hand: fp32 log-softmaxes and F.kl_div, all [N, V] tensors."""
    log_q = F.log_softmax(s.float() / TEMPERATURE, dim=-1)
    log_p = F.log_softmax(t.float() / TEMPERATURE, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * TEMPERATURE**2


def reference_unchunked(s, t):
    return token_losses(s, t, TEMPERATURE).mean()


def chunked_reference(s, t):
    return softmax_kl(s, t, TEMPERATURE, backend="torch")


def ours(s, t):
    return softmax_kl(s, t, TEMPERATURE, backend="triton")


def make_liger():
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except ImportError:
        return None
    # Liger's kernel takes log-probabilities: the log-softmaxes stay in PyTorch (fp32 [N, V]).
    loss_fn = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def liger(s, t):
        log_q = F.log_softmax(s.float() / TEMPERATURE, dim=-1)
        log_p = F.log_softmax(t.float() / TEMPERATURE, dim=-1)
        return loss_fn(log_q, log_p) * TEMPERATURE**2

    return liger


def providers(device: str, with_compile: bool) -> dict:
    out = {"eager": eager}
    if with_compile:
        out["torch.compile"] = torch.compile(reference_unchunked, dynamic=False)
    if device == "cuda":
        liger = make_liger()
        if liger is not None:
            out["liger"] = liger
        out["minitron"] = ours
    else:
        out["minitron-torch"] = chunked_reference
    return out


# ----------------------------------------------------------------------------- measurement
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    """CUDA events on a GPU (no host clock noise), perf_counter on CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def time_phase(fn, args, phase, device, reps, warmup) -> tuple[list[float], float | None]:
    """Milliseconds per rep of fn(*args) for one phase, and the peak extra device memory (MiB).

    The args that require grad are the leaves whose .grad is cleared between reps."""
    leaves = [a for a in args if a.requires_grad]
    times = []
    if device == "cuda":
        torch.cuda.empty_cache()
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for i in range(warmup + reps):
        for leaf in leaves:
            leaf.grad = None
        if phase == "fwd":  # a training forward: the inputs require grad, so graphs are built
            with Timer(device) as tm:
                fn(*args)
        elif phase == "bwd":
            loss = fn(*args)
            sync(device)
            with Timer(device) as tm:
                loss.backward()
            del loss
        else:
            with Timer(device) as tm:
                fn(*args).backward()
        if i >= warmup:
            times.append(tm.ms)
    for leaf in leaves:
        leaf.grad = None
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
    return times, peak


def check(fn, s, t, rows: int) -> str | None:
    """None if fn matches the float64 reference on the first `rows` rows, else what went wrong."""
    s_, t_ = s[:rows].detach().clone().requires_grad_(True), t[:rows].detach()
    loss = fn(s_, t_)
    loss.backward()
    s64 = s_.detach().double().requires_grad_(True)
    ref = token_losses(s64, t_.double(), TEMPERATURE).mean()
    ref.backward()
    # Loss: fp32 math everywhere. Gradient: one rounding to the input dtype plus fp32 noise.
    grad_rtol = 2e-2 if s.dtype == torch.bfloat16 else 1e-3
    loss_err = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-12)
    grad_err = ((s_.grad.double() - s64.grad).abs().max() / s64.grad.abs().max()).item()
    if not math.isfinite(loss.item()) or loss_err > 1e-3:
        return f"loss {loss.item():.6g} vs reference {ref.item():.6g}"
    if not math.isfinite(grad_err) or grad_err > grad_rtol:
        return f"gradient max error {grad_err:.2e} of its largest entry"
    return None


# ----------------------------------------------------------------------------- from hidden states
# The same loss taken from final hidden states and LM heads: (h_s [N, H_s], w_s [V, H_s], h_t [N, H_t],
# w_t [V, H_t]); the student's hidden states and head get gradients. This is where the full [N, V]
# logits can be avoided altogether, so what it is about is peak memory.
def eager_linear(hs, ws, ht, wt):
    return eager(hs @ ws.T, ht @ wt.T)


def ours_linear_logits(hs, ws, ht, wt):
    return softmax_kl(hs @ ws.T, ht @ wt.T, TEMPERATURE)


def ours_fused_linear(hs, ws, ht, wt):
    return fused_linear_softmax_kl(hs, ws, ht, wt, TEMPERATURE, chunk_size=1024)


def make_liger_linear():
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None
    # Liger's generalized JSD at beta = 0 is forward KL(teacher || student) at temperature T, per
    # token mean, without the T^2 factor (liger-kernel 0.8.5); the correctness check holds it to ours.
    loss_fn = LigerFusedLinearJSD(jsd_beta=0.0, temperature=TEMPERATURE)

    def liger_linear(hs, ws, ht, wt):
        return loss_fn(hs, ws, ht, wt) * TEMPERATURE**2

    return liger_linear


def linear_providers(device: str) -> dict:
    out = {"eager": eager_linear, "minitron (logits)": ours_linear_logits}
    liger = make_liger_linear() if device == "cuda" else None
    if liger is not None:
        out["liger fused-linear"] = liger
    out["minitron fused-linear"] = ours_fused_linear
    return out


def check_linear(fn, hs, ws, ht, wt, rows: int) -> str | None:
    """None if fn's loss and student gradients match float64 on the first `rows` tokens."""
    hs_, ws_ = hs[:rows].detach().clone().requires_grad_(True), ws.detach().clone().requires_grad_(True)
    loss = fn(hs_, ws_, ht[:rows], wt)
    loss.backward()
    hs64, ws64 = hs_.detach().double().requires_grad_(True), ws_.detach().double().requires_grad_(True)
    ref = token_losses(hs64 @ ws64.T, ht[:rows].double() @ wt.double().T, TEMPERATURE).mean()
    ref.backward()
    # Logits from low-precision matmuls differ from float64 ones by a rounding each.
    tol = 3e-2 if hs.dtype != torch.float32 else 2e-3
    loss_err = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-12)
    if not math.isfinite(loss.item()) or loss_err > tol:
        return f"loss {loss.item():.6g} vs reference {ref.item():.6g}"
    for name, got, want in (("hidden", hs_.grad, hs64.grad), ("weight", ws_.grad, ws64.grad)):
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        if not math.isfinite(err) or err > 3 * tol:
            return f"{name} gradient max error {err:.2e} of its largest entry"
    return None


def run_linear(device, dtypes, vocab, tokens, hidden, reps, warmup) -> list[dict]:
    rows = []
    funcs = linear_providers(device)
    h_s, h_t = hidden
    for dname in dtypes:
        dtype = DTYPES[dname]
        for v in vocab:
            for n in tokens:
                g = torch.Generator(device=device).manual_seed(0)
                hs = torch.randn(n, h_s, device=device, generator=g).to(dtype).requires_grad_(True)
                ws = (torch.randn(v, h_s, device=device, generator=g) * h_s**-0.5).to(dtype).requires_grad_(True)
                ht = torch.randn(n, h_t, device=device, generator=g).to(dtype)
                wt = (torch.randn(v, h_t, device=device, generator=g) * h_t**-0.5).to(dtype)
                args = (hs, ws, ht, wt)
                for name, fn in funcs.items():
                    base = dict(provider=name, dtype=dname, N=n, V=v, H_student=h_s, H_teacher=h_t)
                    try:
                        err = check_linear(fn, *args, rows=min(n, 64))
                    except torch.cuda.OutOfMemoryError:
                        err = "oom"
                    if err is not None:
                        print(f"{name} (linear) {dname} N={n} V={v}: NOT TIMED, {err}", file=sys.stderr)
                        rows.append(dict(base, phase="fwd+bwd", error="wrong" if err != "oom" else "oom", detail=err))
                        continue
                    try:
                        times, peak = time_phase(fn, args, "fwd+bwd", device, reps, warmup)
                    except torch.cuda.OutOfMemoryError:
                        rows.append(dict(base, phase="fwd+bwd", error="oom"))
                        continue
                    rows.append(dict(base, phase="fwd+bwd", **summarize(times, peak)))
                    print(f"{name:22s} {dname} N={n:5d} V={v:6d} fwd+bwd {cell(rows[-1])}", file=sys.stderr)
                del hs, ws, ht, wt, args
    return rows


def linear_markdown(rows, names) -> list[str]:
    subject = "minitron fused-linear"
    lines = ["", "## From hidden states (logits matmuls included)", "",
             f"Student H={rows[0]['H_student']}, teacher H={rows[0]['H_teacher']}, forward+backward. "
             "Cells: median ms (p10-p90), peak extra MiB over the inputs. The fused-linear form never "
             f"holds more than 1024 tokens of logits. Ratios: baseline / {subject} (time; memory).", ""]
    head = ["dtype", "N", "V"] + names + [f"vs {n}" for n in names if n != subject]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = {}
    for r in rows:
        table.setdefault((r["dtype"], r["N"], r["V"]), {})[r["provider"]] = r
    for key, cells in table.items():
        out = [str(k) for k in key]
        out += [cell(cells.get(n)) for n in names]
        mine = cells.get(subject, {})
        for n in names:
            if n == subject:
                continue
            r = cells.get(n, {})
            if mine.get("median_ms") and r.get("median_ms"):
                ratio = f"{r['median_ms'] / mine['median_ms']:.2f}x"
                if mine.get("peak_MiB") and r.get("peak_MiB") is not None:
                    ratio += f"; {r['peak_MiB'] / mine['peak_MiB']:.1f}x memory"
                out.append(ratio)
            else:
                out.append("-")
        lines.append("| " + " | ".join(out) + " |")
    return lines


def bandwidth_gbps(device) -> float | None:
    if device != "cuda":
        return None
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    for key, gbps in PEAK_BANDWIDTH_GBPS.items():
        if key in props.name:
            return float(gbps)
    return None


def ideal_bytes(n, v, itemsize, phase) -> int:
    """The least memory traffic the job needs: read both logit tensors, write the gradient."""
    return {"fwd": 2 * n * v * itemsize, "bwd": n * v * itemsize, "fwd+bwd": 3 * n * v * itemsize}[phase]


def git_sha() -> str | None:
    """The checkout's commit, read from .git directly (no git binary needed on the GPU machine)."""
    git = ROOT / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(" ", 1)[1]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "liger_kernel"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            out[name] = None
    return out


# ----------------------------------------------------------------------------- report
def summarize(times: list[float], peak: float | None) -> dict:
    med = statistics.median(times)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [med] * 9
    return dict(median_ms=med, p10_ms=q[0], p90_ms=q[-1], reps=len(times), peak_MiB=peak)


def cell(r: dict | None) -> str:
    """A result as a table cell: median ms (p10-p90)[, peak MiB][, GB/s (% of peak)], or why not."""
    if r is None:
        return "-"
    if r.get("error"):
        return r["error"]
    text = f"{r['median_ms']:.3g} ({r['p10_ms']:.3g}-{r['p90_ms']:.3g})"
    if r.get("peak_MiB") is not None:
        text += f", {r['peak_MiB']:.0f} MiB"
    if r.get("GBps") is not None:
        text += f", {r['GBps']:.0f} GB/s"
        if r.get("pct_bandwidth") is not None:
            text += f" ({r['pct_bandwidth']:.0f}%)"
    return text


def ratios(rows, subject):
    """baseline ms / subject ms per (dtype, N, V, phase): > 1 means the subject is faster."""
    by_key = {}
    for r in rows:
        if r.get("median_ms") is not None:
            by_key.setdefault((r["dtype"], r["N"], r["V"], r["phase"]), {})[r["provider"]] = r["median_ms"]
    for r in rows:
        key = (r["dtype"], r["N"], r["V"], r["phase"])
        mine = by_key.get(key, {}).get(subject)
        if r["provider"] != subject and mine and r.get("median_ms"):
            r[f"{subject}_speedup"] = r["median_ms"] / mine


def markdown(meta, rows, names, subject) -> str:
    bw = meta["bandwidth_GBps"]
    lines = [f"# softmax-KL benchmark ({meta['device_name']})", "",
             f"{meta['timestamp']}, git {meta['git_sha'] or 'unknown'}, "
             + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v), "",
             f"T={TEMPERATURE}, forward KL, reduction mean. Cells: median ms (p10-p90), peak extra MiB, "
             f"GB/s of the least traffic (read student + teacher, write gradient)"
             + (f", % of {bw:.0f} GB/s peak" if bw else "") + f". Speedup = baseline / {subject}. "
             "minitron's kernels move 2 NV elements in forward (read both) and 3 NV in backward (read "
             "both again, write the gradient): 5 NV for forward+backward against the 3 NV counted here.", ""]
    if meta["note"]:
        lines += [f"**{meta['note']}**", ""]
    head = ["dtype", "N", "V", "phase"] + names + [f"{subject} vs {n}" for n in names if n != subject]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = {}
    for r in rows:
        table.setdefault((r["dtype"], r["N"], r["V"], r["phase"]), {})[r["provider"]] = r
    for key, cells in table.items():
        out = [str(k) for k in key]
        out += [cell(cells.get(n)) for n in names]
        for n in names:
            if n != subject:
                sp = cells.get(n, {}).get(f"{subject}_speedup")
                out.append(f"{sp:.2f}x" if sp else "-")
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and few reps (about a minute on CPU)")
    ap.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes (default 32000 128256 151936)")
    ap.add_argument("--tokens", type=int, nargs="+", help="token counts N (default 1024 4096 8192)")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--reps", type=int, help="timed repetitions per cell")
    ap.add_argument("--linear-hidden", type=int, nargs=2, metavar=("H_STUDENT", "H_TEACHER"),
                    help="hidden sizes of the from-hidden-states part (default 3072 4096: an 8B -> 4B pair)")
    ap.add_argument("--no-linear", action="store_true", help="skip the from-hidden-states part")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        vocab, tokens, reps, warmup = args.vocab or [32000], args.tokens or [128, 256], args.reps or 5, 1
        linear_vocab, linear_tokens, linear_hidden = vocab, tokens[-1:], args.linear_hidden or (256, 384)
    else:
        vocab, tokens = args.vocab or [32000, 128256, 151936], args.tokens or [1024, 4096, 8192]
        reps, warmup = args.reps or 20, 3
        linear_vocab, linear_tokens = args.vocab or [128256], args.tokens or [4096, 8192]
        linear_hidden = args.linear_hidden or (3072, 4096)
    note = ""
    if device == "cpu":
        note = ("CPU run: reference paths only (eager PyTorch, torch.compile, the chunked torch "
                "reference that minitron trains with on CPU); the Triton kernel and liger need CUDA.")
        print(note, file=sys.stderr)
    elif make_liger() is None:
        note = "liger-kernel is not installed: no liger column."
    funcs = providers(device, with_compile=not args.no_compile)
    subject = "minitron" if "minitron" in funcs else "minitron-torch"
    bw = bandwidth_gbps(device)
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    rows = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for v in vocab:
            for n in tokens:
                g = torch.Generator(device=device).manual_seed(0)
                s = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype).requires_grad_(True)
                t = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype)
                for name, fn in funcs.items():
                    base = dict(provider=name, dtype=dname, N=n, V=v)
                    try:
                        err = check(fn, s, t, rows=min(n, 64))
                    except torch.cuda.OutOfMemoryError:
                        err = "oom"
                    if err is not None:
                        print(f"{name} {dname} N={n} V={v}: NOT TIMED, {err}", file=sys.stderr)
                        rows += [dict(base, phase=p, error="wrong" if err != "oom" else "oom", detail=err)
                                 for p in PHASES]
                        continue
                    for phase in PHASES:
                        try:
                            times, peak = time_phase(fn, (s, t), phase, device, reps, warmup)
                        except torch.cuda.OutOfMemoryError:
                            rows.append(dict(base, phase=phase, error="oom"))
                            continue
                        row = dict(base, phase=phase, **summarize(times, peak))
                        row["GBps"] = ideal_bytes(n, v, s.element_size(), phase) / (row["median_ms"] * 1e-3) / 1e9
                        row["pct_bandwidth"] = 100 * row["GBps"] / bw if bw else None
                        rows.append(row)
                        print(f"{name:15s} {dname} N={n:5d} V={v:6d} {phase:7s} {cell(row)}", file=sys.stderr)
                del s, t
    ratios(rows, subject)
    linear_rows = [] if args.no_linear else run_linear(device, args.dtypes, linear_vocab, linear_tokens,
                                                       linear_hidden, reps, warmup)

    stamp = datetime.now(timezone.utc)
    meta = dict(device=device, device_name=device_name, bandwidth_GBps=bw, versions=versions(),
                git_sha=git_sha(), timestamp=stamp.isoformat(timespec="seconds"), quick=args.quick,
                temperature=TEMPERATURE, divergence="kl", reduction="mean", reps=reps, warmup=warmup,
                subject=subject, note=note)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"softmax_kl-{device}-{stamp.strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, results=rows, linear_results=linear_rows),
                                                    indent=1) + "\n")
    table = markdown(meta, rows, list(funcs), subject)
    if linear_rows:
        table += "\n".join(linear_markdown(linear_rows, list(linear_providers(device)))) + "\n"
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
