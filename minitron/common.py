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
# A writer's temporary folder `.tmp-<output>-<random>` has a lock file beside it,
# `.tmp-<output>-<random>.lock`, that names the output and that the writer holds (flock) until its
# folder is renamed into place or removed. The kernel drops the lock when the writer dies, however
# it dies (kill -9 included), so a later run can tell a dead writer's leftovers (lock free) from a
# live writer's folder (lock held), and never touches a `.tmp-*` folder without our lock file.
LOCK_SUFFIX = ".lock"


# Some shared filesystems (NFS without lockd, some FUSE mounts) refuse flock with these. There the
# lock file itself is the lock: created exclusively (mkstemp's O_CREAT|O_EXCL), it names its owner's
# host and pid, and counts as stale when that process is gone (same host) or, for another host's,
# when the file is older than STALE_FOREIGN_LOCK_S (its process cannot be asked).
_NO_FLOCK_ERRNOS = {"ENOLCK", "EOPNOTSUPP", "ENOTSUP", "ENOSYS", "EINVAL"}
STALE_FOREIGN_LOCK_S = 6 * 3600.0


def _flock_unsupported(e: OSError) -> bool:
    import errno

    return e.errno in {getattr(errno, n) for n in _NO_FLOCK_ERRNOS if hasattr(errno, n)}


def _owner_gone(fd: int) -> bool:
    """A lock file's owner (its JSON: host, pid) is no longer running: the fallback's stale test."""
    import socket

    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        owner = {}
    if owner.get("host") not in (None, socket.gethostname()):
        return time.time() - os.fstat(fd).st_mtime > STALE_FOREIGN_LOCK_S
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return not isinstance(pid, int)  # our own lock is held; one without a pid is garbage
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _try_lock(path: Path, create: bool = False):
    """An open file of `path` holding an exclusive flock, or None if another process holds it.
    Where the filesystem has no flock, the file is taken when it names no owner (just made) or
    its owner is gone (`_owner_gone`)."""
    import fcntl

    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if create else fcntl.LOCK_NB))
    except OSError as e:
        if _flock_unsupported(e) and _owner_gone(fd):  # an empty (just made) one included
            return fd
        os.close(fd)  # held by a live writer
        return None
    return fd


def claim(tmp: Path, final: Path) -> int:
    """Hold the lock of writer folder `tmp` (for output `final`) until `release`. The lock file
    names the output and its owner (host and pid: what the no-flock fallback's stale test reads)."""
    import socket

    fd = _try_lock(tmp.with_name(tmp.name + LOCK_SUFFIX), create=True)
    if fd is None:
        raise MinitronError(f"could not lock {tmp.name + LOCK_SUFFIX} in {tmp.parent}")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"output": final.name, "pid": os.getpid(),
                             "host": socket.gethostname()}).encode())
    return fd


def _claimed_tmp(final: Path) -> tuple[Path, int]:
    """A new temporary folder beside `final`, created only once its lock is held (so that no
    moment exists when a killed writer's folder has no lock file)."""
    while True:
        fd, lock = tempfile.mkstemp(prefix=f".tmp-{final.name}-", suffix=LOCK_SUFFIX,
                                    dir=final.parent)
        os.close(fd)
        tmp = Path(lock[: -len(LOCK_SUFFIX)])
        held = claim(tmp, final)
        try:
            tmp.mkdir()
            return tmp, held
        except FileExistsError:  # a folder of that name without our lock: leave it, try another
            release(tmp, held)


def release(tmp: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        tmp.with_name(tmp.name + LOCK_SUFFIX).unlink()
    os.close(fd)


def clean_stale(final: str | os.PathLike) -> list[Path]:
    """Remove what writers of `final` that died left beside it: their `.tmp-*` folders (a whole
    model each) and, if one died between its two renames, put the previous `final` back. Only
    folders with our lock file naming `final`, and only when no live process holds the lock.
    Returns the folders removed."""
    final = Path(final)
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    prefix = f".tmp-{final.name}-"
    for lock in sorted(final.parent.iterdir()):
        if not (lock.name.startswith(prefix) and lock.name.endswith(LOCK_SUFFIX)):
            continue
        fd = _try_lock(lock)
        if fd is None:
            continue  # a live writer's
        try:
            owner = json.loads(os.pread(fd, 4096, 0) or b"{}").get("output")
        except ValueError:
            owner = None
        if owner != final.name:  # another output whose name starts like ours
            os.close(fd)
            continue
        tmp = lock.with_name(lock.name[: -len(LOCK_SUFFIX)])
        old = tmp.with_name(tmp.name + ".old")
        if old.is_dir() and not final.exists():
            old.rename(final)  # killed between `final -> old` and `tmp -> final`
        for leftover in (tmp, old):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
        release(tmp, fd)
    return removed


def remove_unheld(tmp: Path) -> bool:
    """Remove writer folder `tmp` and its lock file unless a live writer holds the lock (a folder
    without a lock file is removed too: for callers that own every `.tmp-*` in their folder)."""
    fd = _try_lock(tmp.with_name(tmp.name + LOCK_SUFFIX))
    lock_exists = tmp.with_name(tmp.name + LOCK_SUFFIX).exists()
    if fd is None and lock_exists:
        return False  # a live writer's
    shutil.rmtree(tmp, ignore_errors=True)
    if fd is not None:
        release(tmp, fd)
    return True


def listed_files(folder: Path, manifest: str, kind: str | None = None) -> set[str] | None:
    """The files `folder/manifest` (a JSON object with a "files" list, and `kind` if given) says
    its writer wrote, itself included; None when there is no such manifest."""
    try:
        data = json.loads((folder / manifest).read_text())
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, list) or (kind is not None and data.get("kind") != kind):
        return None
    return {str(f) for f in files} | {manifest}


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_replaceable(folder: str | os.PathLike, manifest: str, what: str,
                      kind: str | None = None, flag: str = "--output") -> None:
    """Refuse to replace `folder` unless it is new, empty, or holds nothing but the files its
    manifest lists (what an earlier run of the same stage wrote): a user's README or notes in it
    would be deleted with it. `what` names the stage's output ('export', 'pruned model')."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise MinitronError(f"{flag} {folder} exists and is a file; give a folder path")
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
    if not present and not any(folder.iterdir()):
        return
    listed = listed_files(folder, manifest, kind)
    if listed is None:
        raise MinitronError(
            f"{flag} {folder} exists and is not a previous minitron {what} (no {manifest} listing "
            f"its files; it holds {_few(sorted(p.name for p in folder.iterdir()))}); choose a new "
            f"or empty folder, or remove it")
    # A listed folder covers what is in it (a writer may list its top-level entries only).
    extra = [f for f in present
             if not any("/".join(f.split("/")[:i]) in listed for i in range(1, f.count("/") + 2))]
    if extra:
        raise MinitronError(
            f"{flag} {folder} holds files the previous minitron {what} did not write: "
            f"{_few(extra)}; replacing the folder would delete them: move them out, or choose "
            f"another folder")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False, manifest: str | None = None,
               what: str = "output", kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `final` only if the block finishes.

    An interrupted writer leaves at most a `.tmp-*` folder, never a half-written `final`; the next
    writer of the same `final` removes it (`clean_stale`). With `overwrite` an existing `final` is
    replaced; with `manifest` only if it still holds nothing but the files its manifest lists
    (`check_replaceable`, checked again here: files may have been added during the work).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    tmp, lock = _claimed_tmp(final)
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise MinitronError(f"{final} appeared while it was being written; not overwriting it")
            if manifest is not None:
                check_replaceable(final, manifest, what, kind)
            old = tmp.with_name(tmp.name + ".old")  # under the same lock: see clean_stale
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        release(tmp, lock)


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


def free_accelerator_memory() -> None:
    """Give back what a finished stage held: collect its now unreferenced models (reference
    cycles included: HF modules and hooks make some), then return the CUDA caching allocator's
    free blocks to the driver, so that the next stage (8 distillation ranks, one on this GPU)
    does not start beside importance's cached gigabytes. No CUDA call without CUDA."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- CLI glue
DEBUG_FLAG = "--debug"  # every stage command takes it (minitron.cli, minitron.run)
DEBUG_ENV = "MINITRON_DEBUG"  # how it reaches torchrun's child processes (they inherit it)


def debug_mode() -> bool:
    """Whether the user asked for full tracebacks (`--debug`)."""
    return os.environ.get(DEBUG_ENV) == "1"


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a stage's `main`; a MinitronError becomes one clear line on stderr and exit code 2.

    With `--debug` the traceback is printed too. In a torchrun child process (see
    `child_failure`) any other error also becomes one line, with its
    traceback in a per-rank log file, so that a failing rank does not bury the summary."""
    args = sys.argv[1:] if argv is None else argv
    if DEBUG_FLAG in args:
        os.environ[DEBUG_ENV] = "1"
    try:
        code = main(argv)
    except MinitronError as e:
        if debug_mode():
            import traceback

            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; artifacts written so far are intact", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if debug_mode() or not child_failure(e):
            raise
        sys.exit(1)
    sys.exit(code or 0)


class RankFailure(Exception):
    """What `child_failure` records: an error the rank did not expect (not a MinitronError)."""


LOG_DIR_ENV = "MINITRON_LOG_DIR"  # where a torchrun child writes the traceback of its failure


def child_failure(error: BaseException) -> bool:
    """In a torchrun child process: an error that is not a MinitronError (most often a collective
    that broke because a peer died) becomes one line on stderr and in the launcher's failure
    record; its traceback goes to `rank<N>.log` in the run's log folder. Returns False outside
    torchrun (the caller re-raises: a plain process shows its traceback)."""
    import traceback

    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # not under torchrun
        return False
    r = int(os.environ.get("RANK", 0))
    folder = os.environ.get(LOG_DIR_ENV) or os.path.join(tempfile.gettempdir(), "minitron-logs")
    path = os.path.join(folder, f"rank{r}.log")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            traceback.print_exception(error, file=f)
    except OSError:
        path = "not written: the log folder is not writable"
    first = (str(error).strip().splitlines() or [""])[0][:300]
    line = f"{type(error).__name__}: {first} (traceback: {path})"
    with contextlib.suppress(Exception):  # into torchrun's failure record, as distributed does
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(RankFailure(line))
    print(f"error: rank {r}: {line}", file=sys.stderr)
    return True


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


def read_exactly(f, offset: int, out, damaged: str) -> None:
    """Fill the array `out` with the bytes of open file `f` from `offset` (a read by offset: no
    memory map); a file that ends early raises MinitronError(`damaged`)."""
    f.seek(offset)
    view, got = memoryview(out).cast("B"), 0
    while got < out.nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise MinitronError(damaged)
        got += n
