"""ONNX files on disk: sizes, external data, renaming and removing a graph with its data, the
MatMulNBits accuracy level, and the graph rewrites quantization needs."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

from minitron.common import MinitronError

DEPLOY_FILE = "model.onnx"  # the graph genai_config.json names


def onnx_files(path: Path) -> list[Path]:
    """The .onnx file and the external-data files it references."""
    stat = path.stat()
    return [path] + [path.parent / loc for loc in _data_locations(str(path), stat.st_mtime_ns,
                                                                   stat.st_size)]


@functools.lru_cache(maxsize=64)
def _data_locations(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    """The external-data files a graph names, read once per version of the file (keyed by its
    modification time and size): sizes, renames and the quantizers ask it many times, and a
    graph below 2 GB holds its weights inline, so reading its structure reads all of them."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    proto = onnx.load(path, load_external_data=False)
    return tuple(sorted({dict((e.key, e.value) for e in t.external_data)["location"]
                         for t in _get_all_tensors(proto) if uses_external_data(t)}))


def onnx_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in onnx_files(path)) / 2**20


def uses_external_data(path: Path) -> bool:
    return len(onnx_files(path)) > 1


def rename_onnx(src: Path, dst: Path) -> None:
    """Rename an ONNX model and its external data (to `<dst name>_data`)."""
    import onnx

    files = onnx_files(src)
    if len(files) == 1:
        os.replace(src, dst)
        return
    if len(files) > 2:
        raise MinitronError(f"{src} spreads its weights over {len(files) - 1} files; expected one")
    proto = onnx.load(str(src), load_external_data=False)
    _point_data_at_(proto, dst.name + "_data")
    os.replace(files[1], dst.parent / (dst.name + "_data"))
    onnx.save(proto, str(dst))
    if src != dst:
        src.unlink()


def _point_data_at_(proto, data_name: str) -> None:
    """Name `data_name` as the external-data file of every external tensor of `proto`."""
    from onnx.external_data_helper import _get_all_tensors
    from onnx.external_data_helper import uses_external_data as tensor_external

    for t in _get_all_tensors(proto):
        if tensor_external(t):
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = data_name


def relevel_onnx(src: Path, dst: Path, level: int | None) -> None:
    """A copy of the MatMulNBits graph `src` at another accuracy_level, written to `dst`.

    The level is an attribute of each MatMulNBits node and changes nothing in the weights (ORT's
    quantizers only write it onto the nodes), so the second level of a scheme costs a copy of
    the quantized graph (its external data copied as bytes, never parsed) instead of a second
    quantization, which would read and parse every FP32 weight again."""
    import onnx

    files = onnx_files(src)
    proto = onnx.load(str(src), load_external_data=False)
    set_accuracy_level_(proto, level)
    if len(files) > 1:
        data = dst.with_name(dst.name + "_data")
        _point_data_at_(proto, data.name)
        # A copy, not a hard link: onnx refuses to read external data with several links.
        shutil.copyfile(files[1], data)
    onnx.save(proto, str(dst))


def remove_onnx(path: Path) -> None:
    if path.exists():
        for f in onnx_files(path):
            f.unlink(missing_ok=True)


def quantizable_graph(src: Path, dst: Path) -> Path:
    """The graph the quantizers read: `src` itself when no Transpose reads a weight (what torch's
    exporter writes; checked on the structure, without reading the weights), else a copy at `dst`
    with those transposes folded (`fold_initializer_transposes`)."""
    import onnx

    proto = onnx.load(str(src), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    if not any(n.op_type == "Transpose" and n.input[0] in inits for n in proto.graph.node):
        return src
    del proto  # the fold loads the weights too
    fold_initializer_transposes(src, dst)
    return dst


def fold_initializer_transposes(src: Path, dst: Path) -> list[str]:
    """Copy of `src` where each Transpose of a weight becomes a transposed weight.

    An exporter may keep one copy of tied embeddings and feed the LM head through a run-time
    Transpose; the quantizers only quantize MatMuls whose weight is an initializer, so without this
    the LM head (a quarter of SmolLM2's weights) would stay FP32. (torch's exporter folds those
    transposes itself; this keeps any graph it is given quantizable.)
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    inits = {t.name: t for t in proto.graph.initializer}
    folded = []
    for node in list(proto.graph.node):
        if node.op_type == "Transpose" and node.input[0] in inits:
            w = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            t = numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)), node.output[0])
            proto.graph.initializer.append(t)
            proto.graph.node.remove(node)
            folded.append(node.output[0])
    external = uses_external_data(src)
    onnx.save(proto, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
              location=dst.name + "_data")
    return folded


def set_accuracy_level_(proto, level: int | None) -> None:
    """Set accuracy_level on every MatMulNBits node of `proto` (0 or None: remove it)."""
    import onnx

    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        for attr in [a for a in node.attribute if a.name == "accuracy_level"]:
            node.attribute.remove(attr)
        if level:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
