"""The typed recipe: one YAML file describes a whole compression run.

Sections are the stages' own config dataclasses (`minitron.config`); nothing here imports torch. Loading is
strict: an unknown key, a wrong type or an out-of-range value fails at load time naming the file,
the key path, the value and what is allowed, with a close-match suggestion for typos. Command-line
overrides (`distill.temperature=2`) go through the same conversion.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from minitron.common import MinitronError
from minitron.config import (CacheConfig, DataConfig, DistillConfig, EvaluateConfig, ExportConfig,
                             ImportanceConfig, ModelConfig, PruneConfig, SearchConfig, Section,
                             SweepConfig,
                             TeacherCorrectionConfig, check_correction)


@dataclass
class Recipe:
    name: str = "run"
    output_dir: str = "runs"
    """The run folder is <output_dir>/<name>."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    teacher_correction: TeacherCorrectionConfig = field(default_factory=TeacherCorrectionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher_cache: CacheConfig = field(default_factory=CacheConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    source_file: str | None = field(default=None, metadata={"internal": True})

    def __post_init__(self) -> None:
        check_correction(self.distill, self.teacher_correction)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source_file")
        return d


# ----------------------------------------------------------------------------- conversion
class RecipeError(MinitronError):
    pass


def _fail(where: str, key: str, message: str) -> typing.NoReturn:
    raise RecipeError(f"{where}: {key}: {message}")


def _convert(tp: Any, value: Any, key: str, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key, where)
            except RecipeError as e:
                errors.append(str(e).rsplit(": ", 1)[-1])
        _fail(where, key, f"{value!r} is not valid ({'; '.join(errors)})")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            _fail(where, key, f"{value!r} is not one of {', '.join(map(repr, args))}{hint}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) and args and args[0] is str:  # `--tasks a,b`: a list of names
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            _fail(where, key, f"expected a list, got {value!r}")
        return [_convert(args[0] if args else Any, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            _fail(where, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):  # PyYAML reads `1e6` as a string
            try:
                value = float(value)
            except ValueError:
                _fail(where, key, f"expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            _fail(where, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            _fail(where, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(where, key, f"expected a string, got {value!r}")
        return value
    return value


def build_section(cls: type, raw: Any, key: str, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        _fail(where, key or "(top level)", f"expected a mapping of {cls.__name__} fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")]
    kwargs = {}
    for name, value in raw.items():
        path = f"{key}.{name}" if key else str(name)
        if name not in names:
            renamed = cls.renamed(str(name)) if issubclass(cls, Section) else None
            if renamed:
                _fail(where, path, renamed)
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            _fail(where, path, f"unknown key; {hint}valid keys: {', '.join(names)}")
        kwargs[name] = _convert(hints[name], value, path, where)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, MinitronError) as e:
        if key and str(e).startswith(f"{key}."):  # a section's own message names the key path
            raise RecipeError(f"{where}: {e}") from None
        _fail(where, key or "(top level)", str(e))


# ----------------------------------------------------------------------------- loading
def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        dotted, sep, text = item.partition("=")
        if not sep or not dotted:
            raise RecipeError(f"override '{item}' is not of the form section.key=value")
        parsed.append((dotted.strip(), yaml.safe_load(text) if text.strip() else None))
    return parsed


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem names the file and the key path."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' not found; shipped recipes: "
                          f"{', '.join(sorted(p.name for p in Path('recipes').glob('*.yaml')))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the top level must be a mapping of sections")
    recipe = build_section(Recipe, raw, "", str(path))  # the file alone must be valid
    if overrides:
        for dotted, value in parse_overrides(list(overrides)):
            _set_dotted(raw, dotted, value)
        recipe = build_section(Recipe, raw, "", f"{path} (with overrides {' '.join(overrides)})")
    recipe.source_file = str(path)
    if recipe.model.config is not None:
        recipe.model.config = str((path.parent / recipe.model.config).resolve())
    return recipe


def fingerprint(*parts: Any) -> str:
    """A short stable hash of settings (dataclasses or plain values)."""
    def plain(x):
        return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x
    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
