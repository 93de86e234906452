"""Task accuracy through lm-evaluation-harness: the shipped offline task, the ONNX adapter, the extra."""

import json
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from tiny import make_tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval")  # the `tasks` extra (part of `dev`, so `make test` has it)

from minitron.task_data import make_words_and_code as maker  # noqa: E402
from minitron.tasks import SHIPPED_TASKS, TASK_DIR, score_torch  # noqa: E402

TASK = SHIPPED_TASKS[0]


def shipped_items() -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / "words_and_code.jsonl").read_text().splitlines()]


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: a local task must not touch the network."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_shipped_items_are_the_scripts_and_each_has_its_one_right_answer():
    items = shipped_items()
    assert 100 <= len(items) <= 200
    assert items == json.loads(json.dumps(maker.make_items()))  # the committed file is reproducible
    opposites = dict(maker.OPPOSITES + [(b, a) for a, b in maker.OPPOSITES])
    bodies = {name: body for group in maker.FUNCTIONS.values() for name, body in group.items()}
    assert len(opposites) == 2 * len(maker.OPPOSITES)  # no word has two opposites in the list
    for item in items:
        choices, prompt = item["choices"], item["prompt"]
        assert len(choices) == 4 and len(set(choices)) == 4
        if item["kind"] == "opposites":
            key = opposites[prompt.removeprefix("The opposite of ").removesuffix(" is")]
        else:
            key = bodies[prompt.removeprefix("def ").split("(")[0]]
            compile(f"{prompt} {choices[0]}", "item", "exec")  # the choices are valid Python
        assert choices[item["label"]] == key


@torch.no_grad()
def reference_accuracy(model, tokenizer, items) -> float:
    """Plain-torch multiple-choice scoring: the choice with the highest summed log-probability
    after the prompt (no lm-eval involved)."""
    correct = 0
    for item in items:
        context = item["prompt"]
        n_ctx = len(tokenizer.encode(context))
        scores = []
        for choice in item["choices"]:
            ids = torch.tensor([tokenizer.encode(f"{context} {choice}")])
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            targets = ids[0, 1:]
            scores.append(logprobs[n_ctx - 1:].gather(-1, targets[n_ctx - 1:, None]).sum().item())
        correct += max(range(4), key=scores.__getitem__) == item["label"]
    return correct / len(items)


def test_shipped_task_scores_a_tiny_model_offline_like_a_plain_torch_reference(no_network):
    model, tokenizer = make_tiny_model("llama", seed=1), tiny_tokenizer()
    result = score_torch(model, tokenizer, [TASK], limit=16)[TASK]
    assert result["items"] == 16
    assert result["acc"] == pytest.approx(reference_accuracy(model, tokenizer, shipped_items()[:16]))
    assert result["acc_stderr"] > 0


def test_unknown_task_is_a_one_line_error():
    from minitron.common import MinitronError

    with pytest.raises(MinitronError, match="minitron_words_and_cod"):
        score_torch(make_tiny_model("llama"), tiny_tokenizer(), ["minitron_words_and_cod"])
    with pytest.raises(MinitronError, match="limit: 0 is invalid"):
        score_torch(make_tiny_model("llama"), tiny_tokenizer(), [TASK], limit=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from minitron.config import DataConfig, ExportConfig
    from minitron.export import export

    root = tmp_path_factory.mktemp("tasks")
    model = make_tiny_model("llama", root / "model", seed=3)
    corpus = str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")
    export(root / "model", root / "onnx",
           ExportConfig(int8="none", calib_samples=2, gen_tokens=8, compare=False, speed=False),
           DataConfig(source=corpus, eval_blocks=2, block_size=32))
    return model, root / "onnx"


def test_onnx_adapter_log_likelihoods_match_pytorch(exported):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from minitron.tasks import ort_lm

    model, folder = exported
    items = shipped_items()[:6]
    requests = [Instance("loglikelihood", {}, (it["prompt"], f" {c}"), i)
                for i, it in enumerate(items) for c in it["choices"]]
    requests.append(Instance("loglikelihood", {}, ("", "print('hello')"), 99))  # empty context
    rolling = [Instance("loglikelihood_rolling", {}, ("def f(x):\n    return x + 1\n",), 0)]
    torch_lm = HFLM(pretrained=model, tokenizer=tiny_tokenizer(), batch_size=4)
    onnx_lm = ort_lm(folder)
    expected, got = torch_lm.loglikelihood(requests), onnx_lm.loglikelihood(requests)
    for (e, e_greedy), (g, g_greedy) in zip(expected, got, strict=True):
        assert g == pytest.approx(e, abs=1e-3)
        assert g_greedy == e_greedy
    assert onnx_lm.loglikelihood_rolling(rolling)[0] == pytest.approx(
        torch_lm.loglikelihood_rolling(rolling)[0], abs=1e-3)


def test_evaluate_cli_scores_an_onnx_folder(exported, tmp_path, no_network):
    from minitron.evaluate import main

    out = tmp_path / "tasks.json"
    assert main(["--model", str(exported[1]), "--tasks", TASK, "--limit", "8", "--num-fewshot", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())["tasks"][TASK]
    assert result["items"] == 8 and result["num_fewshot"] == 1
    # The graph's log-likelihoods equal PyTorch's (the test above), so its accuracy on the same
    # items is the PyTorch model's, scored by lm-eval's own HF adapter.
    from minitron.tasks import score_torch

    expected = score_torch(exported[0], tiny_tokenizer(), [TASK], limit=8, num_fewshot=1)[TASK]
    assert result["acc"] == expected["acc"] and result["acc_stderr"] == pytest.approx(expected["acc_stderr"])


BLOCK_LM_EVAL = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("lm_eval blocked for this test")
sys.meta_path.insert(0, Block())
import importlib
from minitron.common import run_cli
run_cli(importlib.import_module(sys.argv[1]).main, sys.argv[2:])
"""


def test_without_the_extra_tasks_fail_with_one_line_naming_it(tmp_path):
    model = tmp_path / "model"
    make_tiny_model("llama", model)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  name: {model}\nprune:\n  enabled: false\ndistill:\n  enabled: false\n"
                      f"export:\n  enabled: false\nevaluate:\n  tasks: [{TASK}]\n")
    commands = [["minitron.evaluate", "--model", str(model), "--tasks", TASK, "--no-speed"],
                ["minitron.pipeline", str(recipe), "--dry-run"]]  # refused before any work
    for command in commands:
        result = subprocess.run([sys.executable, "-c", BLOCK_LM_EVAL, *command],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, command
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "minitron[tasks]" in lines[0], result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_embedded_teacher_beats_chance_and_its_pruned_self(no_network):
    from minitron.data import load_blocks
    from minitron.importance import ImportanceConfig, compute_scores
    from minitron.models import load_model
    from minitron.prune import prune

    model, tokenizer = load_model("smollm2-135m")
    # 64 of the shipped items (the demo's limit): the teacher scores ~0.89 on them, so the margin
    # below is ~8 standard errors, at under half the time of all of them
    teacher = score_torch(model, tokenizer, [TASK], limit=64)[TASK]
    assert teacher["items"] == 64
    # chance is 0.25; well above it: more than 5 standard errors
    assert teacher["acc"] > 0.25 + 5 * teacher["acc_stderr"]
    # the demo's shape, from a cheap importance pass
    blocks = load_blocks(tokenizer, "calibration", 16, block_size=128)
    scores = compute_scores(model, blocks, config=ImportanceConfig(head_score="o_proj_contribution"))
    pruned = prune(model, scores, {"hidden_size": 384, "num_attention_heads": 6,
                                   "intermediate_size": 1024})
    assert score_torch(pruned, tokenizer, [TASK], limit=64)[TASK]["acc"] < teacher["acc"]
