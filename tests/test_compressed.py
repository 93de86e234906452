"""compressed-tensors checkpoints (W8A8, W4A16) reloaded by plain transformers in a fresh process.

The reference is independent of minitron.compressed and of the compressed-tensors library: the
scheme's defining equations applied by hand in float64 (W8A8: float32, see `reference`) to the (activation-aware rescaled) source:
symmetric round-to-nearest of each weight row (W8A8: step max|w| / 127.5, integers in [-128, 127])
or group (W4A16: step max|w| / 7.5, integers in [-8, 7]), steps and unquantized tensors stored in
bfloat16, and for W8A8 the same rounding of each token's activations. The reload must follow it
far more closely than it follows the unquantized source.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minitron import calibration
from minitron.common import MinitronError
from minitron.config import ExportConfig
from tiny import make_tiny_model, tiny_tokenizer

pytest.importorskip("compressed_tensors")

from minitron import compressed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# hidden 128 with 8 heads of 16 and MLP 256: every input width a multiple of 128, the group vLLM
# expects for 4-bit weights.
SHAPE = dict(hidden_size=128, head_dim=16, intermediate_size=256)
QMAX = {"w8a8": 127.5, "w4a16": 7.5}  # (2^bits - 1) / 2: compressed-tensors' symmetric range
QRANGE = {"w8a8": (-128, 127), "w4a16": (-8, 7)}


def _ids(n, length, seed):
    return torch.randint(0, 384, (n, length), generator=torch.Generator().manual_seed(seed))


def _round(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return (x / step).round().clamp(lo, hi) * step


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


def reference(model, scheme: str, group: int | None):
    """`model` (already rescaled) quantized by the scheme's definition, in float64."""
    ref = copy.deepcopy(model).double()
    lo, hi = QRANGE[scheme]
    for name, p in ref.named_parameters():
        p.data = _bf16(p.data)  # what the folder stores for every unquantized tensor
    for name, m in ref.named_modules():
        if not isinstance(m, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        w = dict(model.named_modules())[name].weight.data.double()
        rows = w.view(w.shape[0], -1, group) if group else w.view(w.shape[0], 1, -1)
        step = _bf16(rows.abs().amax(-1, keepdim=True) / QMAX[scheme])
        m.weight.data = _round(rows, step, lo, hi).view_as(w)
        if scheme == "w8a8":
            m.register_forward_pre_hook(_per_token)
    # W8A8 runs in float32, as the runtime does (every value above is exact in float32): each
    # token's largest |x| lies exactly on a rounding tie (127.5 steps) that the last bit of the
    # activations decides, so float64 activations would round a different value in every token.
    return ref.float() if scheme == "w8a8" else ref


def _per_token(_, args):
    """W8A8's activations: one step per token, computed at run time."""
    x = args[0]
    return _round(x, x.abs().amax(-1, keepdim=True) / QMAX["w8a8"], -128, 127)


RELOAD = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
ids_file, out, *folders = sys.argv[1:]
ids = load_file(ids_file)["ids"]
logits = {}
for i, folder in enumerate(folders):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits[str(i)] = model(ids).logits.contiguous()
assert "minitron" not in sys.modules
save_file(logits, out)
"""


def reload_logits(folders: list[Path], ids: torch.Tensor, tmp: Path) -> list[torch.Tensor]:
    """Logits of each folder loaded by plain transformers in one fresh interpreter."""
    from safetensors.torch import load_file, save_file

    save_file({"ids": ids.contiguous()}, tmp / "ids.safetensors")
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(tmp / "ids.safetensors"),
                           str(tmp / "logits.safetensors"), *map(str, folders)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = load_file(tmp / "logits.safetensors")
    return [out[str(i)] for i in range(len(folders))]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A tiny llama with a few outlier input channels (as real LMs have: what SmoothQuant / AWQ
    are for) written in both schemes, with and without the activation-aware scales, and each
    folder's logits from a fresh interpreter's plain transformers reload."""
    tmp = tmp_path_factory.mktemp("compressed")
    model = make_tiny_model("llama", seed=5, **SHAPE)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 70]] = 8.0
    stats = calibration.collect(model, _ids(4, 32, seed=1), gram=True)
    runs = [(scheme, aware) for scheme in compressed.SCHEMES for aware in (True, False)]
    folders, infos = {}, {}
    for scheme, aware in runs:
        folders[scheme, aware] = tmp / f"{compressed.folder_name(scheme)}-{aware}"
        infos[scheme, aware] = compressed.write(model, tiny_tokenizer(), folders[scheme, aware],
                                                scheme, stats if aware else None)
    ids = _ids(2, 24, seed=2)
    logits = dict(zip(runs, reload_logits([folders[r] for r in runs], ids, tmp)))
    return model, stats, ids, folders, infos, logits


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_config_and_tensors_are_what_vllm_reads(written, scheme):
    _, _, _, folders, infos, _ = written
    folder = folders[scheme, True]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    w, act = group["weights"], group["input_activations"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    assert qc["quantization_status"] == "compressed" and group["targets"] == ["Linear"]
    assert (w["type"], w["symmetric"], w["dynamic"]) == ("int", True, False)
    q_proj = "model.layers.0.self_attn.q_proj."
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        if scheme == "w8a8":
            assert qc["format"] == "int-quantized" and (w["num_bits"], w["strategy"]) == (8, "channel")
            assert (act["num_bits"], act["strategy"], act["dynamic"], act["symmetric"]) == (
                8, "token", True, True)
            assert f.get_tensor(q_proj + "weight").dtype == torch.int8
            assert f.get_tensor(q_proj + "weight_scale").shape == (128, 1)
        else:
            assert qc["format"] == "pack-quantized" and act is None
            assert (w["num_bits"], w["strategy"], w["group_size"]) == (4, "group", 128)
            assert f.get_tensor(q_proj + "weight_packed").shape == (128, 128 // 8)  # 8 per int32
            assert f.get_tensor(q_proj + "weight_scale").shape == (128, 1)
            assert f.get_tensor(q_proj + "weight_shape").tolist() == [128, 128]
        assert "lm_head.weight" in keys and "lm_head.weight_scale" not in keys
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert (folder / "tokenizer.json").exists()
    info = infos[scheme, True]
    assert (info["format"], info["transform"]) == (qc["format"], {"w8a8": "smoothquant",
                                                                  "w4a16": "awq"}[scheme])
    assert info["size_mb"] == pytest.approx((folder / "model.safetensors").stat().st_size / 2**20)


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_reload_in_transformers_follows_the_scheme(written, scheme):
    model, stats, ids, _, _, logits = written
    rescaled = copy.deepcopy(model)
    compressed.transform_(rescaled, scheme, stats)
    with torch.no_grad():
        want = reference(rescaled, scheme, 128 if scheme == "w4a16" else None)(ids).logits.float()
        source = model(ids).logits
    got = logits[scheme, True]
    quant_err = (source - want).abs().max().item()
    assert quant_err > 1e-3  # the scheme did quantize
    # what float arithmetic may still round the other way (a value on a step's edge) stays far
    # below the quantization error itself
    assert (got - want).abs().max().item() < 0.05 * quant_err, (
        (got - want).abs().max().item(), quant_err)


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_activation_aware_scales_lower_the_error(written, scheme):
    """With outlier input channels, the folded SmoothQuant / AWQ scales leave a smaller logit
    error after reload than plain round-to-nearest of the same scheme."""
    model, _, ids, _, _, logits = written
    with torch.no_grad():
        source = model(ids).logits
    aware, plain = ((logits[scheme, a] - source).pow(2).mean().item() for a in (True, False))
    assert aware < plain, (aware, plain)


def test_bad_scheme_and_setting_are_clear_errors(tmp_path):
    model = make_tiny_model("llama", seed=0)
    with pytest.raises(MinitronError, match="scheme 'w3a7' is not one minitron writes; valid: w8a8, w4a16"):
        compressed.write(model, tiny_tokenizer(), tmp_path / "x", "w3a7")
    assert not (tmp_path / "x").exists()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(MinitronError, match="exists and is not empty"):
        compressed.write(model, tiny_tokenizer(), tmp_path / "x", "w8a8")
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"
    with pytest.raises(MinitronError, match="export.compressed.*w3a7.*none, w8a8, w4a16, all"):
        ExportConfig(compressed="w3a7")


def test_group_follows_the_widths():
    """128 where it divides every quantized input width, else 64 / 32, else one per channel."""
    assert compressed.group_size(make_tiny_model("llama", **SHAPE)) == 128
    assert compressed.group_size(make_tiny_model("llama", hidden_size=64)) == 32  # MLP 96
    odd = make_tiny_model("llama", intermediate_size=80)  # down_proj reads 80 = 16 x 5
    assert compressed.group_size(odd) is None
    assert compressed.quant_scheme("w4a16", odd).weights.strategy == "channel"
