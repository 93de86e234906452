"""Run an exported ONNX folder: logits, greedy decoding with the KV cache and latency through a plain
`onnxruntime.InferenceSession`, and generation through ONNX Runtime GenAI, the deployment runtime.

Both read the graph's interface from the folder's `genai_config.json` (see `minitron.onnx_graph`).
Nothing here imports transformers or the model's PyTorch code.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from minitron.common import MinitronError
from minitron.onnx_graph import GENAI_CONFIG

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def read_genai_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / GENAI_CONFIG
    if not path.is_file():
        raise MinitronError(f"model: '{folder}' has no {GENAI_CONFIG}; is it a minitron ONNX export?")
    return json.loads(path.read_text())


def eos_ids(genai: dict[str, Any]) -> set[int]:
    eos = genai["model"].get("eos_token_id")
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def until_eos(tokens: Sequence[int], eos: set[int]) -> list[int]:
    """The tokens up to and including the first end-of-sequence one (greedy runs stop there)."""
    out = []
    for t in tokens:
        out.append(int(t))
        if t in eos:
            break
    return out


class OnnxLM:
    """A causal LM over one graph of an exported folder, fed by hand: prefill, then one token at a
    time with the cache the graph returns (what ONNX Runtime GenAI does, in numpy)."""

    def __init__(self, folder: str | Path, file_name: str | None = None,
                 provider: str = "CPUExecutionProvider", threads: int | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.genai = read_genai_config(self.folder)
        decoder = self.genai["model"]["decoder"]
        self.file_name = file_name or decoder["filename"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.folder / self.file_name), options,
                                            providers=[provider])
        layers = decoder["num_hidden_layers"]
        names = decoder["inputs"]
        self.past = [names[k] % i for i in range(layers) for k in ("past_key_names", "past_value_names")]
        outs = decoder["outputs"]
        self.present = [outs[k] % i for i in range(layers) for k in ("present_key_names", "present_value_names")]
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.cache_dtype = _NUMPY[inputs[self.past[0]].type]
        self.kv_shape = (decoder["num_key_value_heads"], decoder["head_size"])
        self.has_positions = "position_ids" in inputs
        self.vocab_size = self.genai["model"]["vocab_size"]
        self.eos = eos_ids(self.genai)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_shape[0], 0, self.kv_shape[1]), self.cache_dtype)
                for _ in self.past]

    def step(self, ids: np.ndarray, cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward of `ids` [b, s] after the cached positions; (logits [b, s, V], new cache)."""
        batch, seq = ids.shape
        past = cache[0].shape[2]
        feeds = {"input_ids": ids.astype(np.int64),
                 "attention_mask": np.ones((batch, past + seq), np.int64),
                 **dict(zip(self.past, cache))}
        if self.has_positions:
            feeds["position_ids"] = np.broadcast_to(np.arange(past, past + seq), (batch, seq)).copy()
        out = self.session.run(["logits", *self.present], feeds)
        return out[0], out[1:]

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [b, L, V] of a forward over `ids` [b, L] with no cache."""
        logits, _ = self.step(ids.cpu().numpy(), self.empty_cache(ids.shape[0]))
        return torch.from_numpy(logits)

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> list[int]:
        """Greedy continuation of `prompt` [1, L] through the KV cache, stopping after an EOS."""
        logits, cache = self.step(prompt.cpu().numpy(), self.empty_cache(1))
        tokens: list[int] = []
        while len(tokens) < new_tokens:
            tokens.append(int(logits[0, -1].argmax()))
            if tokens[-1] in self.eos:
                break
            logits, cache = self.step(np.array([[tokens[-1]]]), cache)
        return tokens

    def speed(self, prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3) -> dict[str, float]:
        """`minitron.measure.speed`'s protocol: one random prompt, then greedy decode steps; medians."""
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, self.vocab_size, (1, prompt_len), generator=gen).numpy()
        prefill, decode = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            logits, cache = self.step(prompt, self.empty_cache(1))
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(new_tokens):  # timed whatever the tokens are: no early stop at EOS
                logits, cache = self.step(logits[:, -1:].argmax(-1), cache)
            decode.append((time.perf_counter() - t0) / new_tokens)
        return {"prefill_tokens_per_s": prompt_len / statistics.median(prefill),
                "decode_ms_per_token": 1000 * statistics.median(decode)}


def genai_generate(folder: str | Path, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """Greedy tokens from ONNX Runtime GenAI over the folder's deployed graph (stops after an EOS)."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise MinitronError("onnxruntime-genai is not installed: pip install 'minitron[onnxruntime]' "
                            "(or onnxruntime-genai-cuda with [onnxruntime-gpu])") from None
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(list(map(int, prompt)))
    tokens: list[int] = []
    while not generator.is_done() and len(tokens) < new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return until_eos(tokens, eos_ids(read_genai_config(folder)))
