"""Per-input-channel activation statistics of every linear layer: one calibration pass, two products.

The importance pass (minitron.importance.compute_scores) already runs forward hooks over the
calibration blocks; with a `Collector` attached to the same forward it also records, for the input
of every nn.Linear of the decoder layers (keyed by its Hugging Face module name, e.g.
`model.layers.0.mlp.down_proj`), per input channel j over all N tokens:

- `sq_sum`  = sum_t x_tj^2   (llama.cpp's importance matrix is sq_sum / N; GPTQ's Hessian diagonal)
- `abs_max` = max_t |x_tj|   (SmoothQuant's migration scales)
- `abs_sum` = sum_t |x_tj|   (AWQ's scales: abs_sum / N is mean |x_j|)
- optionally `gram` = X^T X  [D, D] (GPTQ), only when asked for: it is D^2 per layer.

The token count N is kept once per module. Sums are accumulated in float64 so that long passes do
not lose the small channels. Pruning keeps a subset of every linear's input channels; `Stats.remap`
follows it (new module names, kept channels), so the pruned model's folder carries statistics
that fit its own shapes. They are an approximation of the pruned model's own activations (its
norms average over fewer channels); export recomputes them in one short pass where none are saved
(a plain Hugging Face folder, a distilled student).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from minitron.common import MinitronError

FILE = "importance/calibration.safetensors"  # inside a model folder, beside the importance scores
KINDS = ("sq_sum", "abs_max", "abs_sum")


@dataclass
class Stats:
    """Input-channel statistics per linear module (see the module docstring for the meaning)."""

    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.modules

    def get(self, name: str, kind: str) -> torch.Tensor:
        """The `kind` statistic of module `name` (a clear error if missing)."""
        if name not in self.modules:
            raise MinitronError(f"no calibration statistics for module '{name}'; have "
                                f"{len(self.modules)} modules (e.g. {next(iter(self.modules), '-')})")
        if kind not in self.modules[name]:
            raise MinitronError(f"calibration statistic '{kind}' of '{name}' was not collected; "
                                f"have {sorted(self.modules[name])}")
        return self.modules[name][kind]

    def mean_sq(self, name: str) -> torch.Tensor:
        """E[x_j^2]: llama.cpp's importance matrix entry of `name`."""
        return self.get(name, "sq_sum") / self.tokens[name]

    def mean_abs(self, name: str) -> torch.Tensor:
        """E[|x_j|]: AWQ's activation scale of `name`."""
        return self.get(name, "abs_sum") / self.tokens[name]

    def remap(self, mapping: Mapping[str, tuple[str, torch.Tensor | None]]) -> Stats:
        """Statistics of a pruned model: `mapping` is old module name -> (new name, kept input
        channels or None for all). Modules not in `mapping` are dropped (a dropped layer)."""
        out = Stats()
        for old, (new, cols) in mapping.items():
            if old not in self.modules:
                continue
            kept = {}
            for kind, t in self.modules[old].items():
                if cols is None:
                    kept[kind] = t.clone()
                elif kind == "gram":
                    kept[kind] = t.index_select(0, cols).index_select(1, cols)
                else:
                    kept[kind] = t.index_select(0, cols)
            out.modules[new], out.tokens[new] = kept, self.tokens[old]
        return out

    def check_matches(self, model: nn.Module) -> list[str]:
        """Names of the model's collected linears whose input width differs from the statistics'
        (empty: they fit)."""
        bad = []
        for name, module in linear_modules(model):
            have = self.modules.get(name)
            if have is not None and next(iter(have.values())).shape[0] != module.in_features:
                bad.append(name)
        return bad


def linear_modules(model: nn.Module, include_head: bool = False) -> list[tuple[str, nn.Linear]]:
    """(HF name, module) of every nn.Linear inside the decoder layers (and the LM head if asked)."""
    from minitron.models import arch_of

    spec = arch_of(model)
    prefix = spec.layers + "."
    out = [(n, m) for n, m in model.named_modules()
           if isinstance(m, nn.Linear) and n.startswith(prefix)]
    if include_head:
        out.append((spec.lm_head, spec.get(model, spec.lm_head)))
    return out


class Collector:
    """Forward pre-hooks that accumulate `Stats`; attach to a model, run any forwards, detach.

    Attach it to the importance pass (compute_scores(..., collector=c)) to reuse that forward, or
    call `collect` for a pass of its own. `gram=True` also keeps X^T X per module (GPTQ)."""

    def __init__(self, gram: bool = False, include_head: bool = False):
        self.gram, self.include_head = gram, include_head
        self.stats = Stats()
        self._handles: list = []
        self._last: tuple[torch.Tensor, str] | None = None

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach()
            shared = self._last is not None and x is self._last[0]  # q/k/v and gate/up
            x = x.reshape(-1, x.shape[-1]).float()
            acc = self.stats.modules.get(name)
            sq = x.pow(2).sum(0).double().cpu()
            amax = x.abs().amax(0).double().cpu()
            asum = x.abs().sum(0).double().cpu()
            if acc is None:
                acc = {"sq_sum": sq, "abs_max": amax, "abs_sum": asum}
                self.stats.modules[name], self.stats.tokens[name] = acc, x.shape[0]
            else:
                acc["sq_sum"] += sq
                acc["abs_sum"] += asum
                torch.maximum(acc["abs_max"], amax, out=acc["abs_max"])
                self.stats.tokens[name] += x.shape[0]
            if self.gram:  # one [D, D] float64 sum per distinct input (modules reading it share it)
                if shared:
                    acc.setdefault("gram", self.stats.modules[self._last[1]]["gram"])
                elif "gram" in acc:
                    acc["gram"] += (x.double().T @ x.double()).cpu()
                else:
                    acc["gram"] = (x.double().T @ x.double()).cpu()
            self._last = (args[0], name)
        return hook

    def attach(self, model: nn.Module) -> Collector:
        for name, module in linear_modules(model, self.include_head):
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def detach(self) -> Stats:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None
        return self.stats


@torch.no_grad()
def collect(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, gram: bool = False,
            include_head: bool = False) -> Stats:
    """Statistics of `model` on calibration `blocks` [n, T] in a pass of their own (export uses
    this where no saved statistics fit the model)."""
    from minitron.data import batches

    if blocks.ndim != 2 or len(blocks) == 0:
        raise MinitronError(f"calibration blocks must be a non-empty [n, T] tensor, got shape "
                            f"{tuple(blocks.shape)}")
    device = next(model.parameters()).device
    c = Collector(gram=gram, include_head=include_head).attach(model)
    try:
        runner = model if include_head else model.base_model
        for batch in batches(blocks, batch_size):
            runner(input_ids=batch.to(device), use_cache=False)
    finally:
        stats = c.detach()
    return stats


def save(stats: Stats, path: str | os.PathLike) -> Path:
    """Write `stats` to `path` (.safetensors; token counts in its metadata), atomically. A folder
    path writes FILE inside it."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: modules reading one input share one Gram tensor, and safetensors refuses shared memory
    tensors = {f"{name}::{kind}": t.contiguous().clone() if kind == "gram" else t.contiguous()
               for name, kinds in stats.modules.items() for kind, t in kinds.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"minitron_calibration": json.dumps(
        {"tokens": stats.tokens})})
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike) -> Stats | None:
    """Statistics saved by `save`: a .safetensors file, or a model folder (its FILE); None if the
    folder has none. A file that is not a statistics file is an error."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / FILE
        if not path.is_file():
            return None
    if not path.is_file():
        raise MinitronError(f"calibration statistics '{path}' do not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("minitron_calibration", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise MinitronError(f"calibration statistics '{path}' are not readable: {e}") from None
    if meta is None:
        raise MinitronError(f"'{path}' is not a minitron calibration statistics file (no "
                            f"minitron_calibration metadata)")
    stats = Stats(tokens={k: int(v) for k, v in meta["tokens"].items()})
    for key, t in tensors.items():
        name, _, kind = key.rpartition("::")
        stats.modules.setdefault(name, {})[kind] = t
    return stats


def for_model(model: nn.Module, folder: str | os.PathLike | None, blocks: torch.Tensor | None,
              gram: bool = False) -> tuple[Stats | None, str]:
    """(statistics, where from) for `model`: the ones saved in its `folder` if they fit it (and
    hold X^T X when `gram`), else a short pass over `blocks` (None if no blocks)."""
    saved = load(folder) if folder is not None and Path(folder).is_dir() else None
    if saved is not None and not saved.check_matches(model) and all(
            name in saved for name, _ in linear_modules(model)) and (
            not gram or all("gram" in k for k in saved.modules.values())):
        return saved, f"saved ({Path(folder) / FILE})"
    if blocks is None:
        return None, "none"
    return collect(model, blocks, gram=gram), f"computed over {len(blocks)} calibration blocks"


def prune_mapping(rules: Mapping[str, tuple[str, torch.Tensor | None, torch.Tensor | None]],
                  names: Iterable[str]) -> dict[str, tuple[str, torch.Tensor | None]]:
    """Old linear name -> (new name, kept input channels) from prune's weight rules (old module
    path -> (new path, kept rows, kept columns)): a linear's columns are its input channels."""
    return {n: (rules[n][0], rules[n][2]) for n in names if n in rules}


__all__ = ["FILE", "KINDS", "Collector", "Stats", "collect", "for_model", "linear_modules", "load",
           "prune_mapping", "save"]
