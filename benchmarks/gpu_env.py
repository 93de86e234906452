"""The environment check that `benchmarks/gpu_check.sh` runs first on a lent GPU machine: the versions
there, what imports, which carried wheels (`.wheels/`) it installs and which it leaves, and whether
minitron's minimum versions (read from pyproject.toml) hold. Needs no GPU; `check()` takes a
versions mapping, so a CPU test runs it against the GPU image's versions.

    python benchmarks/gpu_env.py [--wheels .wheels] [--out gpu-out] [--stage plan|installed]
                                 [--install-list FILE]

Writes OUT/gpu_env-STAGE.json and, with --install-list, the wheels to install (one path a line).
Exits 1 when something the GPU run needs (ALWAYS_NEEDED below) is missing or too old.
Needs `packaging` (transformers depends on it, so every image that can run minitron has it).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import platform
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path
from typing import Iterable, Mapping

from packaging import tags
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# pyproject's extras whose minimums are checked besides its dependencies; of the two ONNX Runtime
# extras (alternatives: one module folder), the one whose runtime is installed (see extras_for).
EXTRAS = ("triton", "onnxruntime", "onnxruntime-gpu", "dev")
# Needed by what gpu_check.sh runs (kernel tests and benchmark, distill_smoke.py): a miss here
# stops the run. Their minimums come from pyproject.toml like every other.
ALWAYS_NEEDED = ("python", "torch", "triton", "transformers")
# Needed by one step each: without them gpu_check.sh runs that step in a lesser form or not at all.
STEP_NEEDS = {
    "pytest": "no GPU kernel tests and no tests/test_bf16.py",
    "liger-kernel": "no liger columns in the benchmark",
    "matplotlib": "distill_smoke.py goes without distill()'s loss plot",
}
# Reported for the record: packages a GPU image may or may not have.
ALSO_REPORTED = ("numpy", "tokenizers", "packaging", "pytest", "pluggy", "iniconfig", "pygments",
                 "liger-kernel", "optimum", "bitsandbytes", "onnxruntime-genai-cuda")
# Module -> the distributions it needs to import.
IMPORTS = {
    "minitron": ("python",),
    "minitron.kernels": ("python", "torch"),
    "transformers": ("transformers", "tokenizers", "huggingface-hub"),
    "pytest": ("pytest",),
    "liger_kernel": ("liger-kernel", "torch", "triton"),
    "matplotlib": ("matplotlib",),
}


def requirements(pyproject: Path = ROOT / "pyproject.toml", extras: Iterable[str] = EXTRAS
                 ) -> list[Requirement]:
    """minitron's requirements: Python, the dependencies, then the named extras (first mention wins)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = ["python" + project["requires-python"], *project["dependencies"]]
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    out: dict[str, Requirement] = {}
    for line in lines:
        req = Requirement(line)
        out.setdefault(canonicalize_name(req.name), req)
    return list(out.values())


def extras_for(versions: Mapping[str, str | None]) -> tuple[str, ...]:
    ort = "onnxruntime-gpu" if versions.get("onnxruntime-gpu") else "onnxruntime"
    return tuple(e for e in EXTRAS if not e.startswith("onnxruntime") or e == ort)


def python_tags(python: str, platforms: Iterable[str] | None = None) -> set[tags.Tag]:
    """The wheel tags a CPython of this version accepts (platforms: the running machine's by default)."""
    major, minor = (int(p) for p in python.split(".")[:2])
    plats = list(tags.platform_tags()) if platforms is None else list(platforms)
    return (set(tags.cpython_tags((major, minor), platforms=plats))
            | set(tags.compatible_tags((major, minor), f"cp{major}{minor}", plats)))


def wheel_metadata(path: Path) -> tuple[str | None, list[Requirement]] | None:
    """(Requires-Python, Requires-Dist) from a wheel's METADATA; None if it cannot be read."""
    try:
        with zipfile.ZipFile(path) as whl:
            name = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
            meta = HeaderParser().parsestr(whl.read(name).decode("utf-8"))
    except (OSError, zipfile.BadZipFile, StopIteration, UnicodeDecodeError):
        return None
    return meta.get("Requires-Python"), [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def unmet(req: Requirement, versions: Mapping[str, str | None], who: str = "minitron") -> str | None:
    """Why `versions` does not satisfy `req`, naming the package and the minimum; None if it does."""
    name = canonicalize_name(req.name)
    have = versions.get(name)
    if have is None:
        return f"{name} is not installed ({who} needs {req})"
    # prereleases=True: a nightly torch (2.12.0.dev...) is still at least 2.6.
    if req.specifier.contains(have, prereleases=True):
        return None
    lower = [s for s in req.specifier if s.operator in (">=", ">", "~=", "==")]
    if any(Version(have) < Version(s.version.rstrip(".*")) for s in lower):
        return f"{name} {have} is older than {who} needs ({req})"
    return f"{name} {have} is outside what {who} accepts ({req})"


def _applies(req: Requirement, python: str) -> bool:
    """Whether a wheel's Requires-Dist line applies on this Python (no extras asked for)."""
    if req.marker is None:
        return True
    env = {"python_version": ".".join(python.split(".")[:2]), "python_full_version": python, "extra": ""}
    return req.marker.evaluate(env)


def _pick_wheel(path: Path, versions: Mapping[str, str | None], python: str, accepted: set) -> dict:
    try:
        name, version, _, wheel_tags = parse_wheel_filename(path.name)
    except InvalidWheelFilename:
        return dict(file=path.name, action="skip", why="not a wheel file name")
    name = canonicalize_name(name)
    row = dict(file=path.name, path=str(path), name=name, version=str(version), action="install",
               why="", requires=None)
    meta = wheel_metadata(path)
    if meta is not None:
        row["requires"] = [str(r) for r in meta[1] if _applies(r, python)]
    if not wheel_tags & accepted:
        row.update(action="skip", why=f"built for {', '.join(sorted(map(str, wheel_tags)))}, "
                                      f"not for this Python {python}")
    elif meta is not None and meta[0] and not SpecifierSet(meta[0]).contains(python, prereleases=True):
        row.update(action="skip", why=f"needs Python {meta[0]}, this is {python}")
    elif versions.get(name) is not None:
        # --no-deps into the image would replace its copy, which its own packages were built with.
        row.update(action="skip", why=f"{name} {versions[name]} is already installed")
    return row


def plan_wheels(wheels: Iterable[Path], versions: Mapping[str, str | None], python: str,
                platforms: Iterable[str] | None = None) -> list[dict]:
    """Which wheels to install, and why each other one is left: not for this Python, already
    installed, an older copy of another wheel, or a requirement (from its METADATA) not met."""
    accepted = python_tags(python, platforms)
    rows = [_pick_wheel(Path(w), versions, python, accepted) for w in sorted(wheels, key=str)]
    newest: dict[str, dict] = {}
    for row in rows:
        if row["action"] == "install":
            best = newest.setdefault(row["name"], row)
            if Version(row["version"]) > Version(best["version"]):
                best.update(action="skip", why=f"older than {row['file']}")
                newest[row["name"]] = row
            elif row is not best:
                row.update(action="skip", why=f"older than {best['file']}")
    # A wheel installed with --no-deps whose requirements are missing would fail at import; leaving
    # it out can strand another wheel that needs it, so repeat until nothing changes.
    changed = True
    while changed:
        changed = False
        after = {**versions, **{r["name"]: r["version"] for r in rows if r["action"] == "install"}}
        for row in rows:
            if row["action"] != "install" or not row["requires"]:
                continue
            why = [u for r in map(Requirement, row["requires"]) if (u := unmet(r, after, row["name"]))]
            if why:
                row.update(action="skip", why="; ".join(why))
                changed = True
    return rows


def check(versions: Mapping[str, str | None], wheels: Iterable[Path] = (), *,
          reqs: list[Requirement] | None = None, platforms: Iterable[str] | None = None) -> dict:
    """The whole check for an environment given as {distribution: version or None, "python": ...}:
    the wheel plan, minitron's requirements after it, the imports to expect, the problems
    (ALWAYS_NEEDED requirements not met) that should stop a GPU run, and what runs in a lesser
    form (STEP_NEEDS missing)."""
    versions = {canonicalize_name(k): v for k, v in versions.items()}
    python = versions["python"]
    reqs = requirements(extras=extras_for(versions)) if reqs is None else reqs
    rows = plan_wheels(wheels, versions, python, platforms)
    after = {**versions, **{r["name"]: r["version"] for r in rows if r["action"] == "install"}}
    by_name = {canonicalize_name(r.name): r for r in reqs}
    req_rows = []
    for req in reqs:
        name = canonicalize_name(req.name)
        why = unmet(req, after)
        req_rows.append(dict(requirement=str(req), name=name, version=after.get(name), ok=why is None,
                             why=why, needed_here=name in ALWAYS_NEEDED))

    def why_not(dist: str) -> str | None:
        if dist in by_name:
            return unmet(by_name[dist], after)
        return None if after.get(dist) is not None else f"{dist} is not installed"

    return {
        "python": python,
        "versions": versions,
        "wheels": rows,
        "install": [r["path"] for r in rows if r["action"] == "install"],
        "after_install": after,
        "requirements": req_rows,
        "imports_expected": {m: not any(map(why_not, needs)) for m, needs in IMPORTS.items()},
        "problems": [r["why"] for r in req_rows if r["needed_here"] and not r["ok"]],
        "lesser": [f"{why}: {what}" for dist, what in STEP_NEEDS.items() if (why := why_not(dist))],
    }


def installed(names: Iterable[str]) -> dict[str, str | None]:
    """The running interpreter's versions of these distributions (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in sorted({canonicalize_name(n) for n in names} - {"python"}):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = _module_version(name.replace("-", "_"))
    return out


def _module_version(module: str) -> str | None:
    # CUDA images may ship a module under another distribution's name (NGC's torch brings triton as
    # pytorch-triton): then the module's own __version__ is the version.
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # noqa: BLE001 - a module that does not import is not installed for our purposes
        return None


def try_imports(modules: Iterable[str]) -> dict[str, dict]:
    """Import each module for real: where it came from, or the error."""
    out = {}
    for module in modules:
        try:
            mod = importlib.import_module(module)
            out[module] = {"ok": True, "from": getattr(mod, "__file__", None)}
        except Exception as e:  # noqa: BLE001 - any failure is the answer here
            out[module] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return out


def cuda_info() -> dict:
    try:
        import torch
    except ImportError:
        return {"available": False}
    ok = torch.cuda.is_available()
    return {"available": ok, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if ok else None}


def _print(report: dict) -> None:
    print(f"python {report['python']} ({sys.executable}); CUDA: {report['cuda']}")
    print("versions:", ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    print("not installed:", ", ".join(k for k, v in report["versions"].items() if v is None) or "-")
    for row in report["wheels"]:
        print(f"wheel {row['file']}: {row['action']}" + (f" ({row['why']})" if row["why"] else ""))
    for row in report["requirements"]:
        if not row["ok"] and not row["needed_here"] and row["name"] not in STEP_NEEDS:
            print("not needed here:", row["why"])
    for line in report["lesser"]:
        print("lesser run:", line)
    for module, res in report["imports"].items():
        print(f"import {module}: " + (f"ok from {res['from']}" if res["ok"] else res["error"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheels", type=Path, default=ROOT / ".wheels")
    p.add_argument("--out", type=Path, default=Path("gpu-out"))
    p.add_argument("--stage", default="plan", help="names the JSON: gpu_env-STAGE.json")
    p.add_argument("--install-list", type=Path, help="write the wheels to install here, one a line")
    args = p.parse_args(argv)

    wheels = sorted(args.wheels.glob("*")) if args.wheels.is_dir() else []
    names = {r.name for r in requirements()} | set(ALSO_REPORTED)
    for w in wheels:
        try:
            names.add(parse_wheel_filename(w.name)[0])
        except InvalidWheelFilename:
            pass
    report = check(installed(names), wheels)
    report.update(stage=args.stage, platform=platform.platform(), cuda=cuda_info(),
                  imports=try_imports(IMPORTS))
    if not report["imports"]["minitron.kernels"]["ok"]:
        report["problems"].append("minitron.kernels does not import: "
                                  + report["imports"]["minitron.kernels"]["error"])
    _print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu_env-{args.stage}.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.install_list:
        args.install_list.write_text("".join(p + "\n" for p in report["install"]))
    for problem in report["problems"]:
        print("ENVIRONMENT PROBLEM:", problem)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
