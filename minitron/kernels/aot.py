"""Compile the softmax-KL kernels for an NVIDIA architecture on a machine without a GPU.

Triton lowers a kernel to a cubin with the `ptxas` its wheel ships, so register use, spills to
local memory and the width of the global loads can be checked anywhere. This does not replace a
GPU run (nothing executes), but it catches a kernel that does not compile for the target, or one
whose registers spill, before anyone books a GPU.

    python -m minitron.kernels.aot            # a table for sm_80 (A100) and sm_90 (H100/H200)
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# `minitron.kernels.softmax_kl` the module, not the function of that name the package exports.
_kl = importlib.import_module("minitron.kernels.softmax_kl")

KERNELS = {"loss": "_softmax_kl_loss_kernel", "grad": "_softmax_kl_grad_kernel"}
_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_INT_ARGS = {"V_S": "i32", "V_SHARED": "i32", "ignore_index": "i32"}
_POINTER_DTYPE = {"mask_ptr": "i1", "labels_ptr": "i64"}


@dataclass
class Compiled:
    kernel: str
    arch: int
    dtype: str
    divergence: str
    registers: int
    local_bytes: int  # stack frame + local memory: register spills (and local arrays); 0 is what we want
    shared_bytes: int
    widest_load_bits: int  # of the global loads (LDG) in the SASS: 128 = fully vectorized
    widest_store_bits: int  # of the global stores (STG)


def _signature(fn, dtype: torch.dtype) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name.isupper() and name not in _INT_ARGS:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + _POINTER_DTYPE.get(name, _TRITON_DTYPE[dtype] if name in ("s_ptr", "t_ptr", "grad_ptr")
                                                  else "fp32")
        elif name.endswith("_stride"):
            sig[name] = "i64"
        else:
            sig[name] = _INT_ARGS.get(name, "fp32")
    return sig


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__path__[0]) / "backends" / "nvidia" / "bin" / name)


def compile_kernel(kernel: str, arch: int, dtype: torch.dtype = torch.bfloat16, divergence: str = "kl",
                   vocab: int = 128256, has_mask: bool = True, has_labels: bool = False) -> Compiled:
    """Compile one variant for sm_<arch> with the launch configuration the launcher would pick."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(_kl, KERNELS[kernel])
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1, which has no compiler; "
                           "run without it (e.g. in a fresh process)")
    block, num_warps = _kl._launch_config(vocab, interpret=False)
    constants = {"DIVERGENCE": _kl._DIVERGENCE_ID[divergence], "HAS_MASK": has_mask,
                 "HAS_LABELS": has_labels, "BLOCK_V": block}
    signature = _signature(fn, dtype)
    # What the JIT would specialize at a real launch: tensors from the caching allocator are 16-byte
    # aligned, and ints that are multiples of 16 (the row strides and vocabulary sizes when V is)
    # are marked so. Without this the compiler cannot prove rows aligned and loads stay narrow.
    divisible = [name for name, kind in signature.items()
                 if kind.startswith("*") or (vocab % 16 == 0 and (name.endswith("_stride") or name.startswith("V_")))]
    divisible = [n for n in divisible if n != "go_stride"]  # 0 or 1 at a real launch
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()},
                    attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout

    def field(name):
        m = re.search(rf"\b{name}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    def widest(op):  # LDG.E.128 = a 128-bit access; no width suffix = 32 bits
        widths = [int(m) if m else 32 for m in re.findall(rf"\b{op}\.E(?:\.[A-Z]\w*)*(?:\.(\d+))?\b", sass)]
        return max(widths, default=0)

    return Compiled(kernel, arch, _TRITON_DTYPE[dtype], divergence, field("REG"), field("STACK") + field("LOCAL"),
                    field("SHARED"), widest("LDG"), widest("STG"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (90 = H100)")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--dtypes", nargs="+", choices=["bf16", "fp32", "fp16"], default=["bf16", "fp32"])
    ap.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    args = ap.parse_args(argv)
    dtypes = {v: k for k, v in _TRITON_DTYPE.items()}
    results = [compile_kernel(kernel, arch, dtypes[d], divergence, args.vocab, has_labels=True)
               for arch in args.arch for kernel in KERNELS for d in args.dtypes
               for divergence in ("kl", "reverse_kl", "jsd")]
    if args.json:
        print(json.dumps([asdict(c) for c in results]))
        return 0
    print(f"V={args.vocab}, with a fused CE term and a mask (the most registers a variant needs)")
    print("kernel  arch  dtype  divergence   regs  local  shared  widest LDG  widest STG")
    for c in results:
        print(f"{c.kernel:6s}  sm{c.arch}  {c.dtype:5s}  {c.divergence:10s}  {c.registers:5d}  "
              f"{c.local_bytes:5d}  {c.shared_bytes:6d}  {c.widest_load_bits:6d} bit  {c.widest_store_bits:6d} bit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
