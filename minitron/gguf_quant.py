"""k-quant GGUF (Q4_K_M, Q5_K_M, Q6_K) by llama.cpp's own quantizer, with minitron's importance matrix.

The `gguf` package decodes k-quants but does not encode them, and a k-quant encoder is not ours to
write: llama.cpp's `llama_model_quantize` does it, reached through the `llama_cpp` module of
llama-cpp-python (the optional extra `minitron[gguf]`), from the F16 file `to_gguf.write_gguf` wrote.
Q4_K_M / Q5_K_M are llama.cpp's mixes (attn_v, ffn_down and the output at Q6_K in part), chosen by
llama.cpp itself.

The importance matrix: llama.cpp weighs each input channel's rounding error by the mean squared
activation of that channel (sum of x_j^2 over the calibration tokens / their count), per weight
tensor. minitron's calibration pass (minitron.calibration) collects exactly that sum per HF linear
module; here it is renamed to GGUF tensor names and handed to llama.cpp in memory, or written as the
GGUF imatrix file llama.cpp's `llama-quantize --imatrix` reads (`write_imatrix`).

k-quant blocks are 256 values wide: a tensor whose rows are not a multiple of 256 cannot be a k-quant
and llama.cpp falls back to another type for it; `fallbacks` lists those from the written file.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np

from minitron.common import MinitronError

K_BLOCK = 256
# llama.cpp's llama_ftype values (include/llama.h)
FTYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


def llama_cpp():
    """llama-cpp-python's ctypes module, or a MinitronError saying how to install it."""
    try:
        import llama_cpp as lc
    except ImportError as e:
        raise MinitronError(f"GGUF k-quants are encoded by llama.cpp's own quantizer: install the "
                            f"optional extra (pip install 'minitron[gguf]', i.e. llama-cpp-python); "
                            f"{e}") from None
    return lc


def has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def imatrix_values(stats, names: dict[str, str]) -> dict[str, np.ndarray]:
    """GGUF tensor name -> mean squared input activation per channel (what llama.cpp's quantizer
    takes), from minitron.calibration statistics keyed by HF module name (`names`: HF -> GGUF)."""
    out = {}
    for hf, gguf_name in names.items():
        if hf in stats:
            out[gguf_name] = stats.mean_sq(hf).double().numpy().astype(np.float32)
    if not out:
        raise MinitronError(f"the calibration statistics name none of the model's linear layers "
                            f"(e.g. {next(iter(names), '-')}); they belong to another model")
    return out


def write_imatrix(stats, names: dict[str, str], path: Path, dataset: str = "minitron",
                  chunk_size: int = 0) -> Path:
    """The importance matrix as llama.cpp's GGUF imatrix file (`<tensor>.in_sum2` = sum of squares,
    `<tensor>.counts` = tokens, both F32; imatrix.* metadata), for `llama-quantize --imatrix`."""
    import gguf

    tmp = Path(path).with_name(Path(path).name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [dataset])
    counts = [stats.tokens[hf] for hf in names if hf in stats]
    writer.add_uint32("imatrix.chunk_count", int(max(counts) // max(chunk_size, 1)) if counts else 0)
    writer.add_uint32("imatrix.chunk_size", int(chunk_size))
    for hf, gguf_name in names.items():
        if hf not in stats:
            continue
        sums = stats.get(hf, "sq_sum").double().numpy().astype(np.float32)
        writer.add_tensor(f"{gguf_name}.in_sum2", sums.reshape(1, -1))
        writer.add_tensor(f"{gguf_name}.counts", np.array([[float(stats.tokens[hf])]], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return Path(path)


def quantize_gguf(src: Path, dst: Path, qtype: str, imatrix: dict[str, np.ndarray] | None = None,
                  threads: int = 1) -> Path:
    """llama.cpp's `llama_model_quantize` from the F16 GGUF `src` to `dst` in `qtype`, with the
    importance matrix `imatrix` (GGUF tensor name -> per-input-channel mean square) if given."""
    if qtype not in FTYPES:
        raise MinitronError(f"k-quant type '{qtype}' is not supported; valid: {', '.join(FTYPES)}")
    lc = llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = threads
    keep = []  # the ctypes buffers must outlive the call
    if imatrix:
        entries = (lc.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            buf = np.ascontiguousarray(values, dtype=np.float32)
            keep += [buf, name.encode()]
            entries[i].name = keep[-1]
            entries[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = buf.size
        entries[len(imatrix)].name = None  # the terminator llama.cpp looks for
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(lc.llama_model_imatrix_data))
        keep.append(entries)
    tmp = Path(dst).with_name(Path(dst).name + ".part")
    rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise MinitronError(f"llama.cpp's quantizer failed ({rc}) writing {qtype} from {src}")
    os.replace(tmp, dst)
    return Path(dst)


def fallbacks(path: Path) -> list[dict[str, Any]]:
    """The 2-D tensors of a k-quant file that are not k-quants because their rows are not a multiple
    of the 256-value block (name, row width, the type llama.cpp chose instead)."""
    import gguf

    out = []
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = [int(s) for s in t.shape]
        if len(shape) == 2 and t.tensor_type.name not in K_TYPES and shape[0] % K_BLOCK:
            out.append({"tensor": t.name, "row_width": shape[0], "type": t.tensor_type.name})
    return out


def write_all(model, tokenizer, model_dir, out_dir: Path, types: tuple[str, ...],
              stats=None) -> list[dict[str, Any]]:
    """Every GGUF of `types` in `out_dir` as `model-<type>.gguf`: F16 / Q8_0 from the weights, the
    k-quants from an F16 file (kept only if F16 was asked for) with `stats`' importance matrix when
    given. Returns one dict per file: type, path, imatrix (bool), fallbacks (k-quants)."""
    from minitron.to_gguf import FLOAT_TYPES, hf_to_gguf_names, write_gguf

    kquants = [t for t in types if t in FTYPES]
    if kquants:
        llama_cpp()  # refuse before any work when the quantizer is missing
    out, base = [], Path(out_dir) / "model-f16.gguf"
    for qtype in [t for t in types if t in FLOAT_TYPES] + (["f16"] if kquants and "f16" not in types else []):
        write_gguf(model, tokenizer, model_dir, Path(out_dir) / f"model-{qtype}.gguf", qtype)
    imatrix = imatrix_values(stats, hf_to_gguf_names(model.config)) if stats is not None else None
    if imatrix is not None:
        write_imatrix(stats, hf_to_gguf_names(model.config), Path(out_dir) / "imatrix.gguf")
    for qtype in kquants:
        dst = quantize_gguf(base, Path(out_dir) / f"model-{qtype}.gguf", qtype, imatrix)
        out.append({"type": qtype, "path": dst, "imatrix": imatrix is not None,
                    "fallbacks": fallbacks(dst)})
    if kquants and "f16" not in types:
        base.unlink()
    return [{"type": t, "path": Path(out_dir) / f"model-{t}.gguf", "imatrix": False, "fallbacks": []}
            for t in types if t in FLOAT_TYPES] + out
