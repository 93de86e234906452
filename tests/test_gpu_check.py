"""benchmarks/gpu_check.sh and its environment check (benchmarks/gpu_env.py), on CPU: the check run
against the GPU image's versions and a `.wheels/` folder of placeholder files named like real
wheels, plus a few real (tiny) wheels whose METADATA states requirements."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load_gpu_env():
    spec = importlib.util.spec_from_file_location("gpu_env", ROOT / "benchmarks" / "gpu_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_env = _load_gpu_env()

# The H100/H200 CUDA image (notes/environment.md): no optimum, bitsandbytes, liger-kernel,
# onnxruntime-genai or pytest. packaging, numpy, pyyaml and tqdm come with transformers.
IMAGE = {
    "python": "3.12.3", "torch": "2.11.0+cu128", "triton": "3.6.0", "transformers": "5.17.0",
    "huggingface-hub": "1.33.0", "tokenizers": "0.23.2", "onnx": "1.23.1", "onnxruntime": "1.30.0",
    "accelerate": "1.15.0", "safetensors": "0.8.0", "packaging": "25.0", "numpy": "2.3.4",
    "pyyaml": "6.0.3", "tqdm": "4.67.1",
    "pytest": None, "liger-kernel": None, "onnxruntime-genai": None, "optimum": None,
    "bitsandbytes": None, "onnxscript": None, "gguf": None, "matplotlib": None,
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"]
CARRIED = [  # what gpu_check.sh's header says to download, and three that must not install
    "pytest-9.2.0-py3-none-any.whl", "pluggy-1.7.0-py3-none-any.whl",
    "iniconfig-2.3.1-py3-none-any.whl", "packaging-26.4-py3-none-any.whl",
    "pygments-2.21.0-py3-none-any.whl", "liger_kernel-0.8.5-py3-none-any.whl",
    "pytest-8.4.2-py3-none-any.whl",  # an older copy
    "onnxruntime_genai-0.18.0-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
    "notes.txt",
]


def fake_wheels(folder: Path, names=CARRIED) -> list[Path]:
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return sorted(folder.iterdir())


def real_wheel(folder: Path, name: str, version: str, requires=(), requires_python=None) -> Path:
    """A minimal wheel: a module and the METADATA that gpu_env reads its requirements from."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Python: {requires_python}"] if requires_python else []
    meta += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{name}/__init__.py", "")
        whl.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
    return path


def by_file(report: dict) -> dict[str, dict]:
    return {row["file"]: row for row in report["wheels"]}


def test_gpu_image_with_the_carried_wheels(tmp_path):
    report = gpu_env.check(IMAGE, fake_wheels(tmp_path / ".wheels"), platforms=PLATFORMS)
    rows = by_file(report)
    installs = sorted(Path(p).name for p in report["install"])
    assert installs == ["iniconfig-2.3.1-py3-none-any.whl", "liger_kernel-0.8.5-py3-none-any.whl",
                        "pluggy-1.7.0-py3-none-any.whl", "pygments-2.21.0-py3-none-any.whl",
                        "pytest-9.2.0-py3-none-any.whl"]
    assert "packaging 25.0 is already installed" in rows["packaging-26.4-py3-none-any.whl"]["why"]
    assert "older than pytest-9.2.0" in rows["pytest-8.4.2-py3-none-any.whl"]["why"]
    genai = rows["onnxruntime_genai-0.18.0-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"]
    assert genai["action"] == "skip" and "cp311-cp311" in genai["why"] and "3.12.3" in genai["why"]
    assert rows["notes.txt"]["action"] == "skip"
    assert report["imports_expected"] == {"minitron": True, "minitron.kernels": True,
                                          "transformers": True, "pytest": True, "liger_kernel": True,
                                          "matplotlib": False}
    assert report["after_install"]["pytest"] == "9.2.0"
    assert report["problems"] == []
    # Only the loss plot is missing (matplotlib: ~25 MB of platform wheels, not carried).
    assert report["lesser"] == ["matplotlib is not installed (minitron needs matplotlib>=3.7): "
                                "distill_smoke.py goes without distill()'s loss plot"]
    reqs = {r["name"]: r for r in report["requirements"]}
    # pyproject's minimums, read from the file: the image meets those the GPU run needs ...
    assert reqs["transformers"]["requirement"] == "transformers>=5.10" and reqs["transformers"]["ok"]
    assert reqs["torch"]["ok"] and reqs["triton"]["ok"] and reqs["python"]["ok"]
    # ... and lacks some the run does not need, which are reported, not fatal.
    assert not reqs["onnxscript"]["ok"] and not reqs["onnxscript"]["needed_here"]
    assert reqs["pytest"]["ok"]  # dev extra, met by the carried wheel


def test_image_without_wheels_has_no_pytest_or_liger(tmp_path):
    report = gpu_env.check(IMAGE, [], platforms=PLATFORMS)
    assert report["install"] == [] and report["problems"] == []
    expected = report["imports_expected"]
    assert expected["minitron.kernels"] and not expected["pytest"] and not expected["liger_kernel"]
    lesser = "\n".join(report["lesser"])
    assert "pytest is not installed (minitron needs pytest>=8): no GPU kernel tests" in lesser
    assert "liger-kernel is not installed: no liger columns" in lesser


def test_too_old_transformers_is_a_problem_named_with_its_minimum(tmp_path):
    report = gpu_env.check({**IMAGE, "transformers": "4.57.6"}, [], platforms=PLATFORMS)
    assert report["problems"] == ["transformers 4.57.6 is older than minitron needs (transformers>=5.10)"]
    assert report["imports_expected"]["transformers"] is False
    missing = gpu_env.check({**IMAGE, "triton": None}, [], platforms=PLATFORMS)
    assert missing["problems"] == ["triton is not installed (minitron needs triton>=3.2)"]


def test_wheel_requirements_from_metadata(tmp_path):
    folder = tmp_path / ".wheels"
    folder.mkdir()
    real_wheel(folder, "fits", "1.0", ["torch>=2.1.2", "tomli>=2; python_version < '3.11'"])
    real_wheel(folder, "newer_torch", "1.0", ["torch>=2.12"])
    real_wheel(folder, "needs_fits", "1.0", ["fits>=1"])
    real_wheel(folder, "needs_missing", "1.0", ["not-carried"])
    real_wheel(folder, "stranded", "1.0", ["needs-missing"])  # needs one that is left out
    real_wheel(folder, "py313", "1.0", requires_python=">=3.13")
    report = gpu_env.check(IMAGE, sorted(folder.iterdir()), platforms=PLATFORMS)
    rows = {r["name"]: r for r in report["wheels"]}
    assert rows["fits"]["action"] == "install" and rows["fits"]["requires"] == ["torch>=2.1.2"]
    assert rows["needs-fits"]["action"] == "install"
    assert rows["newer-torch"]["why"] == "torch 2.11.0+cu128 is older than newer-torch needs (torch>=2.12)"
    assert rows["needs-missing"]["why"] == "not-carried is not installed (needs-missing needs not-carried)"
    assert rows["stranded"]["action"] == "skip" and "needs-missing" in rows["stranded"]["why"]
    assert rows["py313"]["why"] == "needs Python >=3.13, this is 3.12.3"


def test_requirements_come_from_pyproject():
    reqs = {r.name: str(r) for r in gpu_env.requirements()}
    assert reqs["python"] == "python>=3.10"
    assert reqs["torch"] == "torch>=2.6" and reqs["transformers"] == "transformers>=5.10"
    assert "onnxruntime" in reqs and "pytest" in reqs


def test_onnxruntime_gpu_is_checked_instead_of_onnxruntime():
    image = {**IMAGE, "onnxruntime": None, "onnxruntime-gpu": "1.30.0"}
    names = {r["name"] for r in gpu_env.check(image, [], platforms=PLATFORMS)["requirements"]}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names


def test_gpu_check_script_parses_and_has_no_old_shims():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    # The path shim that linked a top-level kernels/ into a copy of minitron, and the
    # transformers 4.57 wheels distill_smoke.py once needed.
    assert re.search(r"(?<!minitron/)kernels/", text) is None and "ln -s" not in text
    assert "SHIM" not in text and "4.57" not in text and "transformers==" not in text
    assert "gpu_env.py" in text and "--no-index --no-deps" in text
    assert 'case "$MODE" in' in text and "quick|bar|full)" in text
    for run in ("tests/test_kernels.py", "--vocab 128256 --tokens 8192 --dtypes bf16",
                "distill_smoke.py --steps 50", "tests/test_bf16.py"):
        assert run in text


def test_header_download_line_is_what_the_plan_was_tested_with():
    header = SCRIPT.read_text().split("# then carry")[0]
    pinned = dict(re.findall(r"([A-Za-z][\w.-]*)==([\w.]+)", header))
    carried = {name: version for name, version, _ in
               (gpu_env.parse_wheel_filename(f)[:3] for f in CARRIED[:6])}
    assert {gpu_env.canonicalize_name(n): v for n, v in pinned.items()} == \
        {n: str(v) for n, v in carried.items()}


def test_installed_falls_back_to_the_modules_version():
    # No distribution is named `json`, but the module is there with a __version__ (as NGC's triton
    # is there under the distribution pytorch-triton).
    import json

    found = gpu_env.installed(["json", "pytest", "surely-not-installed"])
    assert found["json"] == json.__version__ and found["surely-not-installed"] is None
    assert found["pytest"] == pytest.__version__ and found["python"].count(".") == 2


def test_distill_8b_step_cpu_stand_in(tmp_path):
    """benchmarks/distill_8b_step.py --tiny: the real-width GPU benchmark's driver at tiny width
    (gloo, FSDP2 on one torchrun process, DCP checkpoints): uninterrupted, killed after the
    step-3 checkpoint, resumed; the JSON's fields and the resumed weights bitwise equal to the
    uninterrupted run's. One gradient_checkpointing setting (true) keeps it to three launches."""
    import json
    import os
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill_8b_step.py"),
                           "--tiny", "--gc", "true", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("distill_8b_step-cpu-*.json")
    result = json.loads(path.read_text())
    assert "| True |" in path.with_suffix(".md").read_text()
    assert result["ok"] and result["tiny"] and result["backend"] == "gloo"
    assert result["git"] and result["torch"] and result["device"]
    assert not list(tmp_path.glob("distill_8b_work*"))  # scratch (GBs at real width) removed
    (s,) = result["settings"]
    assert s["gradient_checkpointing"] is True and s["steps"] == 6
    assert s["checks"] == {"loss_finite": True, "loss_falling": True, "killed_then_resumed": True,
                           "resume_equal": True}
    assert s["kill"]["at_step"] == 4 and s["kill"]["resumed_from_step"] == 3
    assert s["kill"]["exit_code"] != 0 and "SIGKILL" in s["kill"]["killed_log_tail"]
    cmp = s["resume_vs_uninterrupted"]
    assert cmp["bitwise_equal"] and cmp["max_abs_diff"] == 0.0 and cmp["tensors"] == 21
    assert len(s["losses"]) == 6 and s["tokens_per_step"] == 64 and s["tokens_per_s"] > 0
    ext = s["extrapolated"]
    assert ext["per_layer_s"] > 0 and ext["fixed_s"] > 0
    assert ext["step_s_32_layers"] == pytest.approx(ext["fixed_s"] + 32 * ext["per_layer_s"])
    assert ext["days_94B_tokens_one_gpu"] == pytest.approx(
        94e9 / ext["tokens_per_s_per_gpu_32_layers"] / 86400)
    plan = s["plan"]
    assert 0 < plan["2_layers"]["peak_gib"] < plan["32_layers"]["peak_gib"]
    assert s["memory"] is None  # CUDA peaks only on a GPU


def test_gpu_check_runs_the_8b_step_first_and_skippably():
    text = SCRIPT.read_text()
    body = text.split("env_check installed", 1)[1]
    assert body.index("distill_8b_step.py") < body.index("tests/test_kernels.py")
    assert "GPU_CHECK_SKIP_8B" in body
