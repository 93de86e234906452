"""The typed recipe: one YAML file describes a whole compression run.

Sections are dataclasses (the stages' own config dataclasses where a stage has one). Loading is
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
from minitron.distill import DistillConfig
from minitron.importance import ImportanceConfig
from minitron.models import EMBEDDED_NAME
from minitron.prune import TARGET_KEYS


@dataclass
class ModelSection:
    name: str = EMBEDDED_NAME
    """Local folder, hub id, or the embedded 'smollm2-135m'."""
    config: str | None = None
    """A config.json for dry runs of models that are not on this machine (relative to the recipe)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = None
    """None picks CUDA when available, else CPU."""


@dataclass
class DataSection:
    source: str = "stdlib"
    text_field: str = "text"
    block_size: int = 256
    seed: int = 0
    calibration_blocks: int = 1024
    """The papers score importance on 1024 samples."""
    eval_blocks: int = 32

    def __post_init__(self):
        for name in ("block_size", "calibration_blocks", "eval_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class PruneSection:
    enabled: bool = True
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    num_hidden_layers: int | None = None
    target_params: float | None = None
    """A parameter budget instead of a shape: a fraction of the source (<= 1) or a count (> 1)."""
    depth: Literal["importance", "contiguous"] = "importance"

    def target(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in TARGET_KEYS if getattr(self, k) is not None}

    def __post_init__(self):
        if self.target_params is not None and self.target():
            raise ValueError("give either target_params or explicit shape fields, not both")
        if self.target_params is not None and self.target_params <= 0:
            raise ValueError(f"target_params must be > 0, got {self.target_params}")


@dataclass
class TeacherCorrectionSection:
    """Fine-tune the teacher on the distillation data first (the papers' remedy when the original
    pretraining data is not available). 0 tokens: off."""

    tokens: int = 0
    lr: float | None = None

    def __post_init__(self):
        if self.tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {self.tokens}")


@dataclass
class DistillSection(DistillConfig):
    enabled: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_correction_tokens or self.teacher_correction_lr is not None:
            raise ValueError("teacher correction is set in its own section: "
                             "teacher_correction.tokens / teacher_correction.lr")

    def config(self, correction: TeacherCorrectionSection) -> DistillConfig:
        """The stage's own config, with the teacher-correction section folded in."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(DistillConfig)}
        fields.update(teacher_correction_tokens=correction.tokens,
                      teacher_correction_lr=correction.lr)
        return DistillConfig(**fields)


@dataclass
class ExportSection:
    """Arguments of `minitron.export.export` (see its module docstring for the INT8 schemes)."""

    enabled: bool = True
    int8: Literal["blockwise", "dynamic", "static", "none"] = "blockwise"
    per_channel: bool = False
    int8_cpu: Literal["auto", "vnni", "no-vnni", "arm"] = "auto"
    """CPU kind the dynamic/static INT8 model is made for (minitron.cpu); auto: this machine."""
    int4: Literal["rtn", "hqq", "none"] = "none"
    """Deploy 4-bit MatMulNBits weights instead of INT8."""
    accuracy_level: Literal["auto", 0, 1, 2, 3, 4] = "auto"
    """MatMulNBits accuracy_level; auto measures 0 and 4 and deploys the faster that passes."""
    gguf: Literal["none", "f16", "q8_0", "all"] = "none"
    """Also write GGUF files (Llama family), validated through transformers' GGUF loader."""
    calib_samples: int = 32
    """Calibration blocks for int8=static."""
    bnb: bool = False
    """Also report bitsandbytes INT8/NF4 loading of the same checkpoint (PyTorch side)."""
    ppl_budget: float = 0.02
    """The export fails when INT8 perplexity exceeds FP32's by more than this fraction."""
    compare: bool = False
    """Also measure the INT8/INT4 schemes that are not deployment candidates, for the report."""
    keep_fp32: bool = False

    def kwargs(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("enabled")
        return d


@dataclass
class EvaluateSection:
    enabled: bool = True
    speed: bool = True
    """Measure prefill tokens/s and decode ms/token (batch 1)."""


@dataclass
class Recipe:
    name: str = "run"
    output_dir: str = "runs"
    """The run folder is <output_dir>/<name>."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    prune: PruneSection = field(default_factory=PruneSection)
    teacher_correction: TeacherCorrectionSection = field(default_factory=TeacherCorrectionSection)
    distill: DistillSection = field(default_factory=DistillSection)
    export: ExportSection = field(default_factory=ExportSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    source_file: str | None = field(default=None, metadata={"internal": True})

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
        return _build(tp, value, key, where)
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


def _build(cls: type, raw: Any, key: str, where: str) -> Any:
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
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            _fail(where, path, f"unknown key; {hint}valid keys: {', '.join(names)}")
        kwargs[name] = _convert(hints[name], value, path, where)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, MinitronError) as e:
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
    recipe = _build(Recipe, raw, "", str(path))  # the file alone must be valid
    if overrides:
        for dotted, value in parse_overrides(list(overrides)):
            _set_dotted(raw, dotted, value)
        recipe = _build(Recipe, raw, "", f"{path} (with overrides {' '.join(overrides)})")
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
