"""Small pieces every stage shares: the user-facing error, atomic writes, stage timing, CLI glue."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator


class MinitronError(Exception):
    """A problem with the user's input or environment: printed without a traceback, exit code 2."""


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `final` only if the block finishes.

    An interrupted writer leaves at most a `.tmp-*` folder, never a half-written `final`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is a normal folder
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise MinitronError(f"{final} appeared while it was being written; not overwriting it")
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Refuse, before any work, an output that could not be written: create and remove a probe
    folder where the writer will create its temporary sibling (the nearest existing folder at or
    above `path`'s parent) and, if `path` is an existing folder, inside it. `what` names the
    setting in the message (e.g. '--output'). Leaves nothing behind."""
    path = Path(path).expanduser()
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MinitronError(f"{what} {path} cannot be written: {parent} is a file, not a folder")
    for folder in (parent, path) if path.is_dir() else (parent,):
        try:
            Path(tempfile.mkdtemp(prefix=".minitron-probe-", dir=folder)).rmdir()
        except OSError as e:
            raise MinitronError(f"{what} {path} cannot be written: folder {folder} is not "
                                f"writable ({e.strerror})") from None
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- timing
def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class StageTimer:
    """Wall time, CUDA-event time and peak GPU memory (on a GPU), peak RSS, and throughput.

    Used as `with StageTimer("prune") as t: ...; t.tokens += n`; `t.as_dict()` goes into reports.
    """

    name: str
    tokens: int = 0
    wall_s: float = 0.0
    cuda_s: float | None = None
    peak_gpu_mb: float | None = None
    peak_rss_mb: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __enter__(self) -> "StageTimer":
        import torch

        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
            self._ev0 = torch.cuda.Event(enable_timing=True)
            self._ev1 = torch.cuda.Event(enable_timing=True)
            self._ev0.record()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self._cuda:
            self._ev1.record()
            torch.cuda.synchronize()
            self.cuda_s = self._ev0.elapsed_time(self._ev1) / 1000
            self.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
        self.wall_s = time.perf_counter() - self._t0
        self.peak_rss_mb = peak_rss_mb()

    def as_dict(self) -> dict[str, Any]:
        d = {
            "stage": self.name,
            "wall_s": round(self.wall_s, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }
        if self.cuda_s is not None:
            d["cuda_s"] = round(self.cuda_s, 3)
            d["peak_gpu_mb"] = round(self.peak_gpu_mb, 1)
        if self.tokens:
            d["tokens"] = self.tokens
            d["tokens_per_s"] = round(self.tokens / max(self.wall_s, 1e-9), 1)
        d.update(self.extra)
        return d


# ----------------------------------------------------------------------------- CLI glue
def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a stage's `main`; a MinitronError becomes one clear line on stderr and exit code 2."""
    try:
        code = main(argv)
    except MinitronError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; artifacts written so far are intact", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A markdown table; floats get 4 significant digits."""
    if not rows:
        return "(no rows)"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
