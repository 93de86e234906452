"""What the CPU offers for integer matmuls, and the INT8 settings ONNX Runtime advises for it.

Torch-free: `int8_settings` is a pure function of a CPU description, so both kinds of x86 CPU (with
and without VNNI) and ARM are testable on any machine.

Why it matters: on x86-64 CPUs without an integer dot-product instruction (AVX2 or AVX-512 without
VNNI), ONNX Runtime's u8 x s8 matmul kernels multiply with VPMADDUBSW, which adds pairs of
products into int16 with saturation: 2 x 255 x 127 = 64770 overflows int16, so large weights and
activations clip (the static per-tensor INT8 test gave top-1 0.71 on such an AMD EPYC against 0.93+
with VNNI). ONNX Runtime's guidance (`onnxruntime.quantization.quantize_static` docstring, "Choosing
parameters for CPU inference", and the quantization FAQ) is: without VNNI, uint8 activations, int8
weights and `reduce_range=True` (7-bit weights in [-64, 64]: 2 x 255 x 64 = 32640 fits int16);
with VNNI (VPDPBUSD accumulates in int32), the same types at full range; on ARM, int8 activations
and weights at full range. U8U8 is ORT's other way out of saturation, but it is slower, and the
reduced range already removes the overflow, so minitron uses reduced range.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Linux /proc/cpuinfo flag names of the integer dot-product instructions.
X86_DOT_FLAGS = {"avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}
ARM_DOT_FLAGS = {"asimddp": "dotprod", "i8mm": "i8mm"}


@dataclass(frozen=True)
class CpuDescription:
    machine: str  # platform.machine(): x86_64 / AMD64 / aarch64 / arm64
    flags: frozenset[str]  # /proc/cpuinfo "flags" (x86) or "Features" (ARM); empty if unknown
    model: str = ""


@dataclass(frozen=True)
class Int8Settings:
    """ONNX Runtime quantizer arguments for one CPU, and the ISA they were chosen for."""

    isa: str
    integer_dot: bool
    activation_type: str  # "uint8" | "int8" (static quantization; dynamic is always uint8)
    weight_type: str
    reduce_range: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_x86(machine: str) -> bool:
    return machine.lower() in ("x86_64", "amd64", "i686", "i386", "x86")


def is_arm(machine: str) -> bool:
    return machine.lower() in ("aarch64", "arm64") or machine.lower().startswith("armv8")


def int8_settings(cpu: CpuDescription) -> Int8Settings:
    """The INT8 types and range for `cpu`, per ONNX Runtime's CPU guidance (see the module doc)."""
    flags = {f.lower() for f in cpu.flags}
    if is_arm(cpu.machine):
        dots = [name for flag, name in ARM_DOT_FLAGS.items() if flag in flags]
        # Apple Silicon exposes no /proc/cpuinfo; every arm64 Mac has dotprod.
        if not flags and platform.system() == "Darwin":
            dots = ["dotprod"]
        isa = "arm64" + (f" ({'+'.join(dots)})" if dots else " (no dotprod)")
        return Int8Settings(isa, bool(dots), "int8", "int8", False,
                            "ARM: no int16 saturation in ORT's int8 kernels; symmetric int8 activations")
    dots = [name for flag, name in X86_DOT_FLAGS.items() if flag in flags]
    if not is_x86(cpu.machine):
        return Int8Settings(cpu.machine or "unknown", False, "uint8", "int8", True,
                            "unknown architecture: reduced range is safe everywhere")
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    if dots:
        return Int8Settings(f"x86-64 {vector} + {' + '.join(dots)}", True, "uint8", "int8", False,
                            "integer dot product accumulates in int32: full-range weights")
    why = ("no integer dot product: u8s8 pairs saturate int16, 7-bit weights avoid it"
           if flags else "CPU flags unknown: assume no VNNI, reduced range is safe everywhere")
    return Int8Settings(f"x86-64 {vector} (no VNNI)" if flags else "x86-64 (flags unknown)", False,
                        "uint8", "int8", True, why)


def describe_cpu(cpuinfo: str | None = None, machine: str | None = None) -> CpuDescription:
    """This machine's CPU (or the one a /proc/cpuinfo text describes)."""
    machine = machine or platform.machine()
    if cpuinfo is None:
        cpuinfo = ""
        with contextlib.suppress(OSError):
            cpuinfo = Path("/proc/cpuinfo").read_text()
    flags: set[str] = set()
    model = ""
    for line in cpuinfo.splitlines():  # the first processor's entry describes them all
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return CpuDescription(machine, frozenset(flags), model or platform.processor() or machine)


# Deployment targets by name, for exporting on one machine for another kind of CPU.
CPU_TARGETS: dict[str, CpuDescription] = {
    "vnni": CpuDescription("x86_64", frozenset({"sse4_2", "avx2", "fma", "avx512f", "avx512_vnni"}),
                           "x86-64 with AVX-512 VNNI"),
    "no-vnni": CpuDescription("x86_64", frozenset({"sse4_2", "avx2", "fma"}), "x86-64 AVX2 without VNNI"),
    "arm": CpuDescription("aarch64", frozenset({"asimd", "asimddp", "i8mm"}), "ARMv8.6 with dotprod"),
}
INT8_CPUS = ("auto", *CPU_TARGETS)


def int8_target(name: str = "auto") -> Int8Settings:
    """INT8 settings for this machine ('auto') or a named kind of CPU (CPU_TARGETS)."""
    return int8_settings(describe_cpu() if name == "auto" else CPU_TARGETS[name])
