"""`OrtLM`: lm-eval's model interface over an exported ONNX folder (optimum's ORTModelForCausalLM).

Imports lm-eval at module level: import it through `minitron.tasks.ort_lm`, which checks the
`tasks` extra first. Scores log-likelihood requests (multiple choice, perplexity tasks); generative
tasks need the PyTorch model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from minitron.common import MinitronError


class OrtLM(TemplateLM):
    """Tokenizes like lm-eval's HFLM with its defaults (tokenizer's own special-token setting,
    BOS or else EOS as the prefix of empty contexts), so both see the same token requests."""

    def __init__(self, folder: str | os.PathLike, file_name: str | None = None,
                 provider: str = "CPUExecutionProvider"):
        super().__init__()
        from transformers import AutoTokenizer

        from minitron.export import DEPLOY_FILE, load_ort

        folder = Path(folder)
        name = file_name or DEPLOY_FILE
        if not (folder / name).is_file():
            raise MinitronError(f"model: no '{name}' in ONNX folder '{folder}'")
        self.model = load_ort(folder, name, provider)
        # trust_remote_code is always given: None would make transformers ask on the terminal
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        self.max_length = getattr(self.model.config, "max_position_embeddings", 2048)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens, **kwargs)

    @torch.no_grad()
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context) and whether greedy decoding would produce it."""
        whole = (context + continuation)[-(self.max_length + 1):]
        ids = torch.tensor([whole[:-1]], dtype=torch.long)
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        logprobs = F.log_softmax(logits[-len(continuation):].float(), dim=-1)
        target = torch.tensor(continuation, dtype=torch.long)
        total = logprobs.gather(-1, target[:, None]).sum().item()
        return total, bool((logprobs.argmax(-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        # One request per forward: no padding, so no padding mistakes; ORT on a CPU gains little
        # from batching these short sequences.
        results = []
        for cache_key, context, continuation in tqdm(requests, disable=disable_tqdm):
            answer = self._score(context, continuation)
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
            results.append(answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm):
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            total = sum(self._score(ctx, cont)[0] for ctx, cont in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise MinitronError("tasks: the ONNX adapter scores log-likelihood tasks only (multiple "
                            "choice, perplexity); run generative tasks on the PyTorch model")
