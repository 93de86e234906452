"""GGUF for every family: F16 / Q8_0 (gguf's encoder) and Q4_K_M (llama.cpp's), read back by
transformers' GGUF loader (its own tensor reader, dequantizer and inverse rotary permutation) and
compared with the source model's logits; the pre-tokenizer named as llama.cpp names it, checked by
tokenizing text through transformers' GGUF tokenizer; Llama 3.1's rope factors; the importance
matrix.

Tolerances come from the quantization step, not a constant: each file's logits must stay within 3x
the logit change of a control, the same reloaded model with Gaussian noise of exactly the measured
per-tensor quantization error added instead of the quantization itself. A wrong tensor mapping,
permutation or norm offset moves logits far more than noise of that size does.
"""


import numpy as np
import pytest
import torch

from minitron import gguf_vocab, to_gguf
from minitron.common import MinitronError
from tiny import VOCAB, make_tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# Pruned-style shapes: GQA everywhere; hidden 256 (whole k-quant blocks) with q width heads x
# head_dim = 192 != hidden where llama.cpp allows it (Qwen2 and Phi-3 size attention by the hidden
# size), and an MLP width of 320 (not a multiple of 256: ffn_down falls back, and is reported).
BASE = dict(hidden_size=256, intermediate_size=320, num_hidden_layers=2)
CASES = {
    "llama": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24),
    "mistral": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24),
    "qwen2": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32),
    "qwen3": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24),
    "gemma2": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                   layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
}
IDS = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _noise_control(model, reference: dict[str, torch.Tensor], errors: dict[str, torch.Tensor],
                   seed: int = 0) -> torch.Tensor:
    """Logits of `model` with each 2-D weight set to reference + Gaussian noise of RMS errors[name]:
    the effect of an error of the measured size but no structure."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and name in errors:
                p.copy_(reference[name] + errors[name] * torch.randn(p.shape, generator=g))
        return model(IDS).logits


def _rms(a: torch.Tensor) -> torch.Tensor:
    return a.pow(2).mean().sqrt()


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """family -> (source model, source logits, {type: path}) for F16, Q8_0 and (with llama.cpp)
    Q4_K_M, written once."""
    from minitron.gguf_quant import write_all

    kquants = ("q4_k_m",) if _has_llama_cpp() else ()
    out = {}
    for family, shape in CASES.items():
        folder = tmp_path_factory.mktemp(family)
        model = make_tiny_model(family, folder, seed=2, **{**BASE, **shape})
        files = write_all(model, tiny_tokenizer(), folder, folder, ("f16", "q8_0") + kquants)
        with torch.no_grad():
            out[family] = (model, model(IDS).logits, {f["type"]: f for f in files})
    return out


def _has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("family", list(CASES))
def test_every_family_reads_back_within_its_quantization_error(families, family):
    model, ref, files = families[family]
    cfg = to_gguf.reference_config(model.config)
    f16 = to_gguf.load_gguf(files["f16"]["path"], cfg)
    src = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        got16 = f16(IDS).logits
    # F16 against the source: the control adds noise of F16's rounding error of each weight
    copy = make_tiny_model(family, seed=2, **{**BASE, **CASES[family]})
    errors = {k: _rms(v - v.half().float()) for k, v in src.items() if v.ndim == 2}
    assert _rel(got16, ref) <= 3 * _rel(_noise_control(copy, src, errors), ref)
    f16_weights = {k: v.detach().clone() for k, v in f16.state_dict().items()}
    for qtype, entry in files.items():
        if qtype == "f16":
            continue
        back = to_gguf.load_gguf(entry["path"], cfg)
        with torch.no_grad():
            got = back(IDS).logits
        errors = {k: _rms(v - f16_weights[k]) for k, v in back.state_dict().items() if v.ndim == 2}
        control = _noise_control(back, f16_weights, errors)
        assert _rel(got, got16) <= 3 * _rel(control, got16), qtype
        assert _rel(got, ref) < 0.5, qtype  # and never far from the source at all
    if "q4_k_m" in files:
        fell = {f["tensor"] for f in files["q4_k_m"]["fallbacks"]}
        widths = {n: w.shape[-1] for n, w in to_gguf.gguf_tensors(model) if w.ndim == 2}
        assert fell == {n for n, w in widths.items() if w % 256}
        assert any(n.endswith("ffn_down.weight") for n in fell)


def test_kquant_sizes_order(families):
    if not _has_llama_cpp():
        pytest.skip("llama-cpp-python (minitron[gguf]) is not installed")
    _, _, files = families["llama"]
    sizes = {t: f["path"].stat().st_size for t, f in files.items()}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]


def test_gemma_attention_scale_is_folded_for_llama_cpp(families):
    """Gemma's query_pre_attn_scalar (tiny: 12 != head_dim 24 for Gemma 2) goes into the weights,
    and the reloaded model computes the source's logits with llama.cpp's scale."""
    model, ref, files = families["gemma2"]
    arch = to_gguf.gguf_arch(model.config)
    assert to_gguf.attention_fold(model.config, arch) == pytest.approx((24 / 12) ** 0.5)
    back = to_gguf.load_gguf(files["f16"]["path"], to_gguf.reference_config(model.config))
    with torch.no_grad():
        assert _rel(back(IDS).logits, ref) < 5e-3  # F16 weights: ~2^-11 per weight


def test_shapes_llama_cpp_cannot_hold_are_refused():
    with pytest.raises(MinitronError, match=r"qwen2 sizes attention by the hidden size.*8 x 24"):
        to_gguf.gguf_arch(make_tiny_model("qwen2", hidden_size=128, head_dim=24).config)
    with pytest.raises(MinitronError, match=r"tie_word_embeddings=false"):
        to_gguf.gguf_arch(make_tiny_model("gemma2", tie_word_embeddings=False).config)
    with pytest.raises(MinitronError, match=r"rope_type 'yarn'"):
        to_gguf.gguf_arch(make_tiny_model("llama", rope_parameters={
            "rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
            "original_max_position_embeddings": 128}).config)


# ----------------------------------------------------------------------------- tokenizer
def _llama3_tokenizer():
    """A byte-level BPE trained here with Llama 3's pre-tokenizer (its split regex, then bytes) and
    its BOS handling."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / n).read_text() for n in ("json/decoder.py", "textwrap.py", "string.py")]
    texts += ["3 33 333 3333 33333 (hello) I've 'told he's there 1314151天"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gguf_vocab.LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")


TEXTS = [gguf_vocab.CHECK_TEXT, "x = 1234567; print(x)  # (hello)\n\n  I've 'told\tthem 33333 times",
         "def f(a, b):\n    return a+b  # 3.14159 café"]
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama31")
    model = make_tiny_model("llama", seed=4, hidden_size=64, head_dim=16, num_attention_heads=4,
                            num_key_value_heads=2, rope_parameters=LLAMA31_ROPE)
    model.save_pretrained(folder)
    tok = _llama3_tokenizer()
    tok.save_pretrained(folder)
    path = to_gguf.write_gguf(model, tok, folder, folder / "m.gguf", "f16")
    return model, tok, folder, path


def test_llama31_text_tokenizes_as_the_source_and_logits_match(llama31):
    """Llama-3.1-style tiny model: llama3 rope scaling written as rope_freqs, pre-tokenizer
    'llama-bpe'; text (not ids) through transformers' GGUF tokenizer gives the source's ids, and
    the reloaded model its logits at positions past the original context (where the factors act)."""
    import gguf

    model, tok, folder, path = llama31
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama-bpe"
    assert gguf_vocab.text_mismatch(tok, path, TEXTS) is None
    back_tok = gguf_vocab.gguf_tokenizer(path)
    assert back_tok.encode("3333333 (hello)", add_special_tokens=False) == tok.encode(
        "3333333 (hello)", add_special_tokens=False)

    # rope_freqs against transformers' own llama3 frequencies: default inv_freq / llama3 inv_freq
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    np.testing.assert_allclose(np.asarray(freqs.data), (plain / llama3.double()).numpy(), rtol=1e-5)
    assert not np.allclose(np.asarray(freqs.data), 1.0)  # the test model's factors do act

    ids = torch.randint(1, VOCAB, (1, 96), generator=torch.Generator().manual_seed(3))
    back = to_gguf.load_gguf(path, to_gguf.reference_config(model.config))
    with torch.no_grad():
        assert _rel(back(ids).logits, model(ids).logits) < 5e-3


def test_a_wrong_pre_tokenizer_is_caught_by_the_text_check(llama31, tmp_path, monkeypatch):
    model, tok, folder, _ = llama31
    monkeypatch.setattr(gguf_vocab, "pre_tokenizer_name", lambda t: "gpt-2")
    wrong = to_gguf.write_gguf(model, tok, folder, tmp_path / "wrong.gguf", "f16")
    assert gguf_vocab.text_mismatch(tok, wrong, TEXTS) is not None


def test_pre_tokenizer_names():
    assert gguf_vocab.pre_tokenizer_name(tiny_tokenizer()) == "gpt-2"  # GPT-2's ByteLevel regex
    assert gguf_vocab.pre_tokenizer_name(_llama3_tokenizer()) == "llama-bpe"
    from minitron.models import embedded_model_dir, load_tokenizer

    smol = load_tokenizer(str(embedded_model_dir()))  # llama.cpp's hash of SmolLM2's tokenizer
    assert gguf_vocab.pre_tokenizer_name(smol) == "smollm"

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    odd = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    odd.pre_tokenizer = pre_tokenizers.Whitespace()
    odd.decoder = decoders.ByteLevel()
    with pytest.raises(MinitronError, match=r"unknown pre-tokenizer .*Whitespace"):
        gguf_vocab.pre_tokenizer_name(PreTrainedTokenizerFast(tokenizer_object=odd))


# ----------------------------------------------------------------------------- importance matrix
def test_imatrix_file_and_its_effect(families, tmp_path):
    """The imatrix file holds calibration's sums and token counts under GGUF names; with it,
    llama.cpp's Q4_K_M has a lower activation-weighted error on the weighted tensors."""
    import gguf

    from minitron import calibration
    from minitron.gguf_quant import imatrix_values, quantize_gguf, write_imatrix

    model, _, files = families["llama"]
    blocks = torch.randint(1, VOCAB, (4, 32), generator=torch.Generator().manual_seed(9))
    stats = calibration.collect(model, blocks)
    names = to_gguf.hf_to_gguf_names(model.config)
    path = write_imatrix(stats, names, tmp_path / "imatrix.gguf")
    read = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    hf = "model.layers.1.mlp.down_proj"
    np.testing.assert_allclose(read["blk.1.ffn_down.weight.in_sum2"].ravel(),
                               stats.get(hf, "sq_sum").float().numpy(), rtol=1e-6)
    assert read["blk.1.ffn_down.weight.counts"].ravel()[0] == stats.tokens[hf] == 4 * 32

    if not _has_llama_cpp():
        pytest.skip("llama-cpp-python (minitron[gguf]) is not installed")
    imatrix = imatrix_values(stats, names)
    with_im = quantize_gguf(files["f16"]["path"], tmp_path / "with.gguf", "q4_k_m", imatrix)
    cfg = to_gguf.reference_config(model.config)
    plain = to_gguf.load_gguf(files["q4_k_m"]["path"], cfg).state_dict()
    weighted = to_gguf.load_gguf(with_im, cfg).state_dict()
    src = model.state_dict()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        w = torch.from_numpy(imatrix[names[name]])
        err = {k: (((sd[name + ".weight"] - src[name + ".weight"]) ** 2) * w).sum().item()
               for k, sd in (("plain", plain), ("imatrix", weighted))}
        assert err["imatrix"] < err["plain"], (name, err)


# ----------------------------------------------------------------------------- llama.cpp itself
def _llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    """Logits of every position from llama.cpp's own forward of the GGUF file."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=max(64, len(ids)), logits_all=True, verbose=False,
                n_threads=1, seed=0)
    llm.eval(ids)
    out = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    llm.close()
    return out


@pytest.mark.parametrize("family", list(CASES))
def test_llama_cpp_computes_the_source_logits(families, family):
    """The consumer itself: llama.cpp reads each family's F16 file (metadata, soft-caps, sliding
    pattern, rope bases, folded scale, fused Phi-3 tensors) and computes the source's logits, within
    3x a control of F16 rounding noise on the weights and activations' scale."""
    if not _has_llama_cpp():
        pytest.skip("llama-cpp-python (minitron[gguf]) is not installed")
    model, _, files = families[family]
    ids = IDS[0].tolist()
    got = _llama_cpp_logits(files["f16"]["path"], ids)
    with torch.no_grad():
        ref = model(IDS[:1]).logits[0]
    src = {k: v.detach().clone() for k, v in model.state_dict().items()}
    errors = {k: _rms(v - v.half().float()) for k, v in src.items() if v.ndim == 2}
    copy = make_tiny_model(family, seed=2, **{**BASE, **CASES[family]})
    control = _noise_control(copy, src, errors)[0]
    assert _rel(got, ref) <= 3 * 2 * _rel(control, ref), (_rel(got, ref), _rel(control, ref))


def test_llama_cpp_applies_llama31_rope_freqs(llama31):
    """llama.cpp tokenizes the test texts as the source does, and past
    original_max_position_embeddings (32), where the llama3 factors change the logits, computes the
    source's with the written rope_freqs."""
    if not _has_llama_cpp():
        pytest.skip("llama-cpp-python (minitron[gguf]) is not installed")
    model, tok, _, path = llama31
    from llama_cpp import Llama

    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in TEXTS:  # llama.cpp's own 'llama-bpe' splitting gives the source's ids
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(
            text, add_special_tokens=False)
    vocab.close()
    ids = torch.randint(1, VOCAB, (1, 96), generator=torch.Generator().manual_seed(3))
    got = _llama_cpp_logits(path, ids[0].tolist())
    plain = make_tiny_model("llama", seed=4, hidden_size=64, head_dim=16, num_attention_heads=4,
                            num_key_value_heads=2, rope_parameters={"rope_type": "default",
                                                                    "rope_theta": 500000.0})
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref, unscaled = model(ids).logits[0], plain(ids).logits[0]
    # far closer to the llama3-scaled source than to the same weights without the scaling
    assert _rel(got, ref) < 0.25 * _rel(got, unscaled)


def test_phi3_longrope_factors_and_attention_factor(tmp_path):
    """Phi-3-128k style longrope: the factor tensors and the attention factor are written as
    llama.cpp's converter writes them; transformers' loader and (with the extra) llama.cpp compute
    the source's logits, within 3x the F16 noise control."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "long_factor": [1.0, 4.0, 16.0], "short_factor": [1.0, 1.5, 2.0]}
    shape = dict(max_position_embeddings=8192, original_max_position_embeddings=1024,
                 rope_parameters=rope, tie_word_embeddings=True)
    model = make_tiny_model("phi3", tmp_path, **shape)
    path = to_gguf.write_gguf(model, tiny_tokenizer(), tmp_path, tmp_path / "m.gguf", "f16")
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    np.testing.assert_array_equal(tensors["rope_factors_long.weight"], [1.0, 4.0, 16.0])
    np.testing.assert_array_equal(tensors["rope_factors_short.weight"], [1.0, 1.5, 2.0])
    attn = reader.fields["phi3.rope.scaling.attn_factor"]
    assert float(attn.parts[attn.data[0]][0]) == pytest.approx((1 + np.log(8) / np.log(1024)) ** 0.5)
    with torch.no_grad():
        ref = model(IDS).logits
    src = {k: v.detach().clone() for k, v in model.state_dict().items()}
    errors = {k: _rms(v - v.half().float()) for k, v in src.items() if v.ndim == 2}
    bound = 3 * _rel(_noise_control(make_tiny_model("phi3", **shape), src, errors), ref)
    back = to_gguf.load_gguf(path, to_gguf.reference_config(model.config))
    with torch.no_grad():
        assert _rel(back(IDS).logits, ref) <= bound
    if _has_llama_cpp():
        assert _rel(_llama_cpp_logits(path, IDS[0].tolist()), ref[0]) <= 2 * bound


def test_kquants_without_their_encoder_say_how_to_install_it(tmp_path, monkeypatch):
    import sys

    from minitron.gguf_quant import write_all

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were absent
    model = make_tiny_model("llama")
    with pytest.raises(MinitronError, match=r"pip install 'minitron\[gguf\]'"):
        write_all(model, tiny_tokenizer(), tmp_path, tmp_path, ("q4_k_m",))
    assert not list(tmp_path.iterdir())  # refused before writing anything
