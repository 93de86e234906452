"""Every family, pruned to the shapes width pruning makes, exports and runs in both ONNX runtimes.

References are independent of minitron's export: the pruned folder reloaded by plain transformers
(greedy tokens, log-likelihoods in float32), ONNX Runtime GenAI generating from the exported folder
(what a user deploys), and lm-eval's own `onnxruntime` model scoring it.
"""

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from minitron.importance import compute_scores
from minitron.prune import prune, save_pruned
from tiny import bos_tokenizer, make_tiny_model, tiny_tokenizer

pytest.importorskip("onnxruntime")
og = pytest.importorskip("onnxruntime_genai")

pytestmark = pytest.mark.usefixtures("one_thread")

# (model overrides, prune target): grouped-query attention everywhere, hidden_size != heads x
# head_dim (e.g. 48 with 8 or 4 heads of 8). These are the shapes optimum-onnx 0.1's runtime mis-sized
# (Gemma 2 and Phi-3 with GQA, any hidden-pruned Qwen3 / Gemma 2 / Phi-3, Llama-3.1-Minitron-4B-Width's
# 3072 = 32 x 96 with heads of 128), which the old export refused or patched per family.
CASES = {
    "llama": ({}, {"hidden_size": 48}),
    "mistral": ({}, {"hidden_size": 48, "num_attention_heads": 4}),
    "qwen2": ({}, {"hidden_size": 48}),
    "qwen3": ({"head_dim": 8}, {"hidden_size": 48}),
    "gemma2": ({"tie_word_embeddings": True}, {"hidden_size": 48, "num_attention_heads": 4}),
    "gemma3_text": ({"tie_word_embeddings": True},
                    {"hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1}),
    "phi3": ({"tie_word_embeddings": True}, {"hidden_size": 48, "num_attention_heads": 4}),
}
PROMPT = torch.randint(1, 384, (1, 9), generator=torch.Generator().manual_seed(11))
NEW_TOKENS = 16


def _genai_tokens(folder: Path, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens straight from onnxruntime_genai's API, with no minitron code in between."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def _until_eos(tokens: list[int], eos: int = 0) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("family", list(CASES))
def test_pruned_shape_exports_and_generates_in_onnx_runtime_genai(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from minitron.config import DataConfig, ExportConfig
    from minitron.export import export
    from minitron.onnx_lm import OnnxLM
    from minitron.tasks import ort_lm

    overrides, target = CASES[family]
    model = make_tiny_model(family, initializer_range=0.1, **overrides)
    calib = torch.randint(0, 384, (6, 24), generator=torch.Generator().manual_seed(1))
    pruned = prune(model, compute_scores(model, calib, 4), {**target, "intermediate_size": 64})
    # Gemma's tokenizer prepends BOS: its blocks, validation prompt and task contexts start with it.
    tok = bos_tokenizer() if family.startswith("gemma") else tiny_tokenizer()
    save_pruned(pruned, tok, tmp_path / "pruned")
    corpus = str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")
    export(tmp_path / "pruned", tmp_path / "onnx",
           ExportConfig(int8="none", gen_tokens=8, compare=False, speed=False),
           DataConfig(source=corpus, eval_blocks=2, block_size=32))
    report = json.loads((tmp_path / "onnx" / "report.json").read_text())
    assert report["blocks"].startswith("BOS" if family.startswith("gemma") else "no BOS")
    assert (report["prompt_tokens"][0] == 1) == family.startswith("gemma")

    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    config = reference.config
    assert config.hidden_size != config.num_attention_heads * config.head_dim
    assert config.num_key_value_heads < config.num_attention_heads
    with torch.no_grad():
        expected = reference.generate(PROMPT, attention_mask=torch.ones_like(PROMPT),
                                      max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    expected = _until_eos(expected[0, PROMPT.shape[1]:].tolist())
    assert _genai_tokens(tmp_path / "onnx", PROMPT[0].tolist(), NEW_TOKENS) == expected

    # plain ONNX Runtime: per-token log-likelihoods of held-out ids within 1e-4 of PyTorch's
    ids = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = torch.log_softmax(reference(ids).logits.double(), -1)
    got = torch.log_softmax(OnnxLM(tmp_path / "onnx").logits(ids).double(), -1)
    take = ids[:, 1:, None]
    assert (got[:, :-1].gather(-1, take) - want[:, :-1].gather(-1, take)).abs().max().item() < 1e-4
    if family == "gemma3_text":  # lm-eval's own ONNX model reads the folder too
        from lm_eval.api.instance import Instance

        request = Instance("loglikelihood", {}, ("def f(x):", " return x"), 0)
        (score, _), = ort_lm(tmp_path / "onnx").loglikelihood([request])
        context = [1] + tok.encode("def f(x):", add_special_tokens=False)  # BOS, as PyTorch's HFLM
        continuation = tok.encode(" return x", add_special_tokens=False)
        whole = torch.tensor([context + continuation])
        with torch.no_grad():
            logp = torch.log_softmax(reference(whole).logits[0, :-1].double(), -1)
        targets = whole[0, 1:]
        want_score = logp.gather(-1, targets[:, None])[-len(continuation):].sum().item()
        assert score == pytest.approx(want_score, abs=1e-4)


def test_longrope_switches_to_the_long_factors_past_the_original_context(tmp_path):
    """Phi-3-128k / Phi-3.5 / Phi-4-mini: transformers picks longrope's long factors once a position
    passes original_max_position_embeddings (writing the choice into a buffer, which a plain trace
    drops: the graph then kept the short factors, logits off by 1.0 of 3.4 at 100 tokens). Checked
    against transformers on a prompt past the switch and on decoding across it, step by step."""
    from transformers import DynamicCache

    from minitron.models import cache_kwarg
    from minitron.onnx_graph import export_graph, write_genai_config
    from minitron.onnx_lm import OnnxLM

    model = make_tiny_model("phi3", max_position_embeddings=256, original_max_position_embeddings=64,
                            initializer_range=0.1,
                            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.75,
                                             "long_factor": [1.0, 4.0, 16.0],
                                             "short_factor": [1.0, 1.5, 2.0],
                                             "original_max_position_embeddings": 64})
    export_graph(model, tmp_path / "model.onnx")
    write_genai_config(tmp_path, model.config, tiny_tokenizer(), "model.onnx")
    lm = OnnxLM(tmp_path)
    ids = torch.randint(1, 384, (1, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (lm.logits(ids) - model(ids).logits).abs().max().item() < 1e-4
        cache, logits = DynamicCache(), []
        ort_cache, ort_logits = lm.empty_cache(1), []
        for lo, hi in [(0, 60)] + [(i, i + 1) for i in range(60, 70)]:  # prefill 60, decode past 64
            logits.append(model(ids[:, lo:hi], use_cache=True, **{cache_kwarg(model): cache}).logits)
            out, ort_cache = lm.step(ids[:, lo:hi].numpy(), ort_cache)
            ort_logits.append(torch.from_numpy(out))
    assert (torch.cat(ort_logits, 1) - torch.cat(logits, 1)).abs().max().item() < 1e-4
