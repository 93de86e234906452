"""Runs at the scale of many GPUs and nodes, checked on CPU (issue 25): the device every stage
loads on, GPU memory given back between stages, the strategy and memory plan across nodes, the
launcher's restarts, and the writer lock on filesystems without flock."""

import errno
import fcntl
import gc
import json
import subprocess
import sys
import weakref

import pytest
import torch

from minitron import common, distributed, memory_plan
from minitron.models import resolve_device

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- devices
def test_null_device_picks_cuda_where_there_is_one(monkeypatch):
    # Only the choice is faked here (there is no GPU on the test machine); every stage that loads
    # a model (prune/importance, evaluate, search, distill) takes its device from this function.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == "cuda"
    assert resolve_device("cpu") == "cpu"  # an explicit setting wins
    assert resolve_device("cuda:3") == "cuda:3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"


def test_a_finished_stages_model_is_collected_with_its_memory():
    # HF models hold reference cycles (hooks, tied modules): dropping the last name does not free
    # them until the collector runs, and only then can the CUDA cache be emptied.
    class Cyclic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 64)
            self.me = [self]  # a cycle, as hooks and back references make

    gc.disable()
    try:
        model = Cyclic()
        alive = weakref.ref(model.lin.weight)
        del model
        assert alive() is not None  # the cycle keeps it
        common.free_accelerator_memory()  # no CUDA call on a machine without CUDA
        assert alive() is None
    finally:
        gc.enable()


# ----------------------------------------------------------------------------- several nodes
def test_auto_strategy_is_hsdp_across_nodes():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert distributed.strategy("auto", cuda, n_nodes=1) == "fsdp"
    assert distributed.strategy("auto", cuda, n_nodes=4) == "hsdp"
    assert distributed.strategy("auto", cpu, n_nodes=4) == "ddp"
    assert distributed.strategy("fsdp", cuda, n_nodes=4) == "fsdp"  # an explicit choice stays


def test_plan_under_a_hand_started_torchrun_over_two_nodes_is_hsdp(monkeypatch, capsys):
    from minitron.config import DistillConfig, ModelConfig, TeacherCorrectionConfig
    from minitron.distill import memory_plan_

    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    config = DistillConfig(batch_size=16, gpu_memory_gib=1000.0)
    student = _llama(1024, 2, 32768)
    memory_plan_(student, student, config, TeacherCorrectionConfig(), 16, ModelConfig())
    assert "on 16 process(es), hsdp" in capsys.readouterr().out


def _recipe(*overrides):
    from minitron.recipe import load_recipe

    return load_recipe("recipes/llama-3.1-8b-to-4b-width.yaml", list(overrides))


def test_dry_run_plans_hsdp_over_the_shard_group_of_every_node(capsys):
    from minitron.pipeline import dry_run

    one = dry_run(_recipe("distill.micro_batch_size=1"))["memory_plan"]["terms_gib"]
    four = dry_run(_recipe("distill.micro_batch_size=1", "distill.nnodes=4",
                           "distill.rdzv_endpoint=node0:29500"))
    out = capsys.readouterr().out
    assert "nnodes=4" in out and "on 32 process(es), hsdp" in out
    # HSDP shards over one node's 8 GPUs: the sharded terms are those of one node alone, not
    # a quarter of them (which dividing by the world size of 32 would give).
    terms = four["memory_plan"]["terms_gib"]
    for k in ("student params (fp32)", "optimizer (AdamW fp32)"):
        assert terms[k] == one[k]


def _llama(hidden, layers, vocab):
    return dict(model_type="llama", hidden_size=hidden, intermediate_size=4 * hidden,
                num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                head_dim=hidden // 16, vocab_size=vocab, tie_word_embeddings=False,
                max_position_embeddings=4096)


def test_hsdp_plan_at_2x2_matches_the_fsdp2_memory_tracker():
    # 2 nodes x 2 GPUs, shard groups of 2, on fake tensors; a mid-size Llama (the real 8B widths
    # take minutes here: tests/test_memory_plan.py checks those under FSDP).
    from fsdp_tracker import tracked_step_peak

    from minitron.config import DistillConfig

    teacher, student = _llama(2048, 2, 32768), _llama(1536, 2, 32768)
    config = DistillConfig(batch_size=4, block_size=512, nproc_per_node=2, nnodes=2,
                           rdzv_endpoint="node0:29500", gradient_checkpointing=True)
    tracked = tracked_step_peak(teacher, student, config, 4, strategy="hsdp",
                                hsdp_shard_size=2)["Total"]

    def planned(strategy):
        return memory_plan.plan_distill(teacher, student, config, 4, "bfloat16", strategy,
                                        per_node=2).phases["train step"]

    print(f"hsdp 2x2: plan {planned('hsdp') / 2**30:.2f} GiB, tracker {tracked / 2**30:.2f} GiB, "
          f"divided by the world instead: {planned('fsdp') / 2**30:.2f} GiB")
    assert abs(planned("hsdp") - tracked) <= 0.15 * tracked
    assert abs(planned("fsdp") - tracked) > 0.15 * tracked  # what dividing by the world gave


def test_max_restarts_reaches_the_launcher():
    from minitron.config import DistillConfig

    assert distributed.launch_config(2, max_restarts=3).max_restarts == 3
    assert DistillConfig().max_restarts == 0
    with pytest.raises(Exception, match="max_restarts"):
        DistillConfig(max_restarts=-1)


# ----------------------------------------------------------------------------- lock without flock
@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem that refuses flock (NFS without lockd): what its flock call answers."""
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_writer_lock_without_flock_keeps_live_writers_and_cleans_dead_ones(tmp_path, no_flock):
    final = tmp_path / "model"
    tmp, fd = common._claimed_tmp(final)  # no TypeError: the lock file itself is the lock
    owner = json.loads((tmp.parent / (tmp.name + common.LOCK_SUFFIX)).read_text())
    assert owner["pid"] == common.os.getpid() and owner["host"]
    assert common.clean_stale(final) == [] and tmp.is_dir()  # ours, alive
    # A writer that died: its pid is gone.
    dead_tmp, dead_fd = common._claimed_tmp(final)
    lock = dead_tmp.with_name(dead_tmp.name + common.LOCK_SUFFIX)
    lock.write_text(json.dumps({"output": final.name, "pid": _dead_pid(),
                                "host": json.loads(lock.read_text())["host"]}))
    common.os.close(dead_fd)
    # Another host's writer: its process cannot be asked; recent, so it is left alone.
    far_tmp, far_fd = common._claimed_tmp(final)
    far_lock = far_tmp.with_name(far_tmp.name + common.LOCK_SUFFIX)
    far_lock.write_text(json.dumps({"output": final.name, "pid": 1, "host": "another-node"}))
    common.os.close(far_fd)
    assert common.clean_stale(final) == [dead_tmp]
    assert tmp.is_dir() and far_tmp.is_dir() and not dead_tmp.exists() and not lock.exists()
    common.release(tmp, fd)


def test_run_on_several_nodes_refuses_with_commands_that_rebuild_the_recipe(tmp_path, capsys):
    # minitron.run runs on one node (pipeline.refuse_several_nodes says why); with distill.nnodes
    # > 1 it prints the commands per node. Each one's arguments must rebuild the recipe's settings.
    import shlex

    from minitron import cli, distill, evaluate, export
    from minitron.common import MinitronError
    from minitron.pipeline import NODES_RECIPE, dry_run, run
    from minitron.recipe import load_recipe

    recipe = _recipe("distill.micro_batch_size=1", "distill.nnodes=2",
                     "distill.rdzv_endpoint=node0:29500", f"output_dir={tmp_path}",
                     "distill.temperature=2.5", "export.enabled=true")
    with pytest.raises(MinitronError, match="minitron.run runs on one node") as e:
        run(recipe)
    lines = [line for line in str(e.value).splitlines() if line.startswith("python -m")]
    modules = [shlex.split(line)[2] for line in lines]
    assert modules == ["minitron.run", "minitron.distill", "minitron.export", "minitron.evaluate"]
    first = shlex.split(lines[0])
    again = load_recipe(first[3], first[4:])  # the single-process stages, from the saved recipe
    assert first[3] == str(recipe.run_dir / NODES_RECIPE)
    assert not again.distill.enabled and again.prune == recipe.prune and again.data == recipe.data
    for line, module in zip(lines[1:], (distill, export, evaluate)):
        c = cli.configs(cli.parse(module.build_parser(), shlex.split(line)[3:]))
        assert c["data"].source == str(recipe.run_dir / "0-data" / "shards")  # the data stage's
        for section, d in cli.exposed(module.CLI_KEYS):  # every setting the command takes
            if (section, d["key"]) != ("data", "source"):
                assert getattr(c[section], d["key"]) == getattr(getattr(recipe, section), d["key"])
    assert "--student" in lines[1] and str(recipe.run_dir / "1-prune" / "model") in lines[1]
    dry_run(recipe)  # the dry run plans for both nodes and shows the same commands
    assert lines[1] in capsys.readouterr().out


NODES_RECIPE_YAML = """\
name: nodes
output_dir: {out}
model:
  name: {model}
data:
  source: {source}
  workers: 1
  block_size: 32
  calibration_blocks: 8
  eval_blocks: 4
prune:
  hidden_size: 32            # 4 heads x head_dim 8
  num_attention_heads: 4
  intermediate_size: 48
distill:
  tokens: 256                # 4 steps of 2 x 32 tokens, one block per node each step
  batch_size: 2
  block_size: 32
  eval_every: 4
  eval_blocks: 2
  checkpoint_every: 4
  progress: false
  nnodes: 2
  nproc_per_node: 1
  rdzv_endpoint: 127.0.0.1:{port}
  process_group_timeout_s: 120
export:
  enabled: false             # ~70 s for the tiny model; its command is checked by the test above
evaluate:
  speed: false
"""
NODE_TIMEOUT = 240  # a hung rendezvous fails the test instead of blocking CI


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _paragraph_corpus(path):
    """A JSONL corpus of ~200 short documents (stdlib paragraphs): enough for every split."""
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with open(path, "w") as f:
        for name in ("textwrap.py", "string.py", "json/decoder.py", "shlex.py", "fnmatch.py"):
            for para in (stdlib / name).read_text().split("\n\n"):
                if para.strip():
                    f.write(json.dumps({"text": para}) + "\n")
    return path


def _printed(line: str) -> tuple[str, list[str]]:
    import shlex

    words = shlex.split(line)
    assert words[:2] == ["python", "-m"], line
    return words[2], words[3:]


def _run_here(line: str) -> None:
    """A printed single-process command, run by its module's `main` in this process (what
    `python -m module ...` runs, without another interpreter start)."""
    import importlib

    module, argv = _printed(line)
    assert importlib.import_module(module).main(argv) == 0


def _run_nodes(line: str, n: int) -> list[str]:
    """The printed every-node command, started `n` times at once: `n` launchers meeting at the
    recipe's rendezvous, as `n` nodes would. Returns each node's output."""
    import os
    import signal

    module, argv = _printed(line)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    nodes = [subprocess.Popen([sys.executable, "-m", module, *argv], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(n)]
    try:
        logs = [node.communicate(timeout=NODE_TIMEOUT)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0] * n, "\n".join(g[-2000:] for g in logs)
    return logs


def _assert_same_weights_and_losses(a, b) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:  # sums in another order: float32 rounding, far below one lr-sized update
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=k)

    def losses(folder):
        records = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r["kind"] == "train"]

    assert losses(b) == pytest.approx(losses(a), rel=1e-4, abs=1e-5)


def test_two_node_loopback_run_of_the_printed_commands(tmp_path):
    # The test: a recipe with distill.nnodes=2 run as `minitron.run` tells us to. The
    # first node's single-process stages run once; two launchers (the "nodes", one process each)
    # meet at a c10d rendezvous on 127.0.0.1 and distill; evaluation runs once.
    import shlex
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from minitron.common import MinitronError
    from minitron.pipeline import run
    from minitron.recipe import load_recipe
    from minitron.shards import Prepared
    from tiny import make_tiny_model

    make_tiny_model("llama", path=tmp_path / "teacher")
    recipe_file = tmp_path / "nodes.yaml"
    recipe_file.write_text(NODES_RECIPE_YAML.format(
        out=tmp_path / "runs", model=tmp_path / "teacher", port=_free_port(),
        source=_paragraph_corpus(tmp_path / "corpus.jsonl")))
    with pytest.raises(MinitronError, match="minitron.run runs on one node") as e:
        run(load_recipe(str(recipe_file)))
    lines = [line for line in str(e.value).splitlines() if line.startswith("python -m")]
    assert [_printed(line)[0] for line in lines] == ["minitron.run", "minitron.distill",
                                                     "minitron.evaluate"]
    run_dir = tmp_path / "runs" / "nodes"

    _run_here(lines[0])  # the first node: data and prune
    stage_files = {name: run_dir / name / "stage.json" for name in ("0-data", "1-prune")}
    single = {name: f.read_text() for name, f in stage_files.items()}
    assert all(json.loads(s)["status"] == "done" for s in single.values())
    assert not (run_dir / "2-distill").exists()

    logs = _run_nodes(lines[1], 2)  # every node: the distillation
    assert all("starting 1 processes on each of 2 nodes" in log for log in logs)
    distilled = run_dir / "2-distill" / "model"
    metrics = json.loads((distilled / "minitron.json").read_text())["distillation"]["metrics"]
    assert metrics["processes"] == {"world_size": 2, "strategy": "ddp"}  # both nodes took part
    records = [json.loads(r) for r in (distilled / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]  # once, whole
    assert sum("wrote " + str(distilled) in log for log in logs) == 1  # rank 0's summary only
    # The nodes ran none of the single-process stages again.
    assert {name: f.read_text() for name, f in stage_files.items()} == single
    # The same command on one process (here) trains the same model: each node took its share of
    # every batch, and DDP summed the gradients.
    module, argv = _printed(lines[1])
    argv[argv.index("--output") + 1] = str(tmp_path / "one-process")
    _run_here(shlex.join(["python", "-m", module, *argv, "distill.nnodes=1"]))
    _assert_same_weights_and_losses(distilled, tmp_path / "one-process")

    _run_here(lines[2])  # the first node again: evaluation
    argv = _printed(lines[2])[1]
    assert argv[argv.index("--json") + 1] == str(run_dir / "3-evaluate" / "distilled.json")
    result = json.loads((run_dir / "3-evaluate" / "distilled.json").read_text())
    # The final model reloads in plain transformers and scores what the evaluate command said.
    model = AutoModelForCausalLM.from_pretrained(distilled, dtype=torch.float32).eval()
    blocks = Prepared(Path(run_dir / "0-data" / "shards")).blocks("eval", 32, 4).tensor()
    with torch.no_grad():
        logits = model(blocks).logits.double()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             blocks[:, 1:].reshape(-1))
    assert result["tokens"] == 4 * 31
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)


# ----------------------------------------------------------------------------- throughput
def test_plan_chooses_activation_checkpointing_by_what_fits():
    from minitron.config import DistillConfig

    teacher, student = _llama(4096, 8, 128256), _llama(3072, 8, 128256)
    config = DistillConfig(batch_size=8, block_size=8192, nproc_per_node=8)

    def step(k):
        return memory_plan.plan_distill(teacher, student, config, 8, "bfloat16", "fsdp",
                                        checkpointed=k).phases["train step"]

    def choose(gpu):
        return memory_plan.choose_checkpointing(teacher, student, config, 8, "bfloat16", "fsdp",
                                                int(gpu))

    room = memory_plan.CHECKPOINT_HEADROOM
    assert step(8) < step(4) < step(0)
    assert choose(step(0) / room + 1) == 0  # fits without: off
    assert choose(step(8) / room - 1) == 8  # fits only with every layer: on (the plan refuses)
    middle = choose((step(3) + step(4)) / 2 / room)  # nearly fits: selective
    assert middle == 4 and step(middle) <= (step(3) + step(4)) / 2 < step(middle - 1)
    assert memory_plan.choose_checkpointing(teacher, student, config, 8, "bfloat16", "fsdp",
                                            None) == 0  # no GPU


def test_selective_checkpointing_recomputes_the_first_layers_with_the_same_gradients():
    from tiny import make_tiny_model

    from minitron.config import DistillConfig
    from minitron.distill import loop

    ids = torch.randint(0, 100, (2, 16))

    def grads(checkpointed):
        model = make_tiny_model("llama", num_hidden_layers=3)
        config = DistillConfig(gradient_checkpointing=None, gpu_memory_gib=1.0)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(loop, "_checkpointed_layers", lambda *a: checkpointed)
            loop._setup_model(model, None, config, kd=False)
        flags = [layer.gradient_checkpointing for layer in model.model.layers]
        model(ids, labels=ids).loss.backward()
        return flags, [p.grad for p in model.parameters()]

    flags, selective = grads(2)
    assert flags == [True, True, False]
    _, plain = grads(0)
    for a, b in zip(selective, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_null_checkpointing_asks_the_plan_with_the_gpu_given():
    from tiny import make_tiny_model

    from minitron.config import DistillConfig
    from minitron.distill import loop

    model = make_tiny_model("llama", num_hidden_layers=3)
    assert loop._checkpointed_layers(model, None, DistillConfig()) == 0  # no GPU: off
    assert loop._checkpointed_layers(model, None, DistillConfig(gradient_checkpointing=True)) == 3
    roomy = DistillConfig(gpu_memory_gib=80.0)
    assert loop._checkpointed_layers(model, None, roomy) == 0
    tight = DistillConfig(gpu_memory_gib=1e-6)  # nothing fits: every layer (the plan refuses)
    assert loop._checkpointed_layers(model, None, tight) == 3


def test_micro_batches_go_to_the_cpu_without_pinning():
    from minitron.distill import to_device

    host = torch.arange(12).view(3, 4)
    out = to_device(host, "cpu")
    assert torch.equal(out, host) and not out.is_pinned()


# ----------------------------------------------------------------------------- no whole-model gather
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_safetensors_equal_the_gathered_state_in_its_dtype(tmp_path, dtype):
    # Teacher correction's hand-off writes its file tensor by tensor (header first); it must hold
    # exactly what saving the gathered state dict held, in the model's own dtype.
    from safetensors.torch import load_file, save_file
    from tiny import make_tiny_model

    model = make_tiny_model("llama", tie_word_embeddings=True).to(dtype)
    seen = []
    distributed.write_streamed_safetensors(tmp_path / "streamed.safetensors", model,
                                           on_tensor=lambda n, t: seen.append(n))
    save_file(distributed.full_state_dict(model), str(tmp_path / "whole.safetensors"))
    a, b = (load_file(tmp_path / f) for f in ("streamed.safetensors", "whole.safetensors"))
    assert a.keys() == b.keys() and seen == list(a)  # tied aliases dropped in both
    for k in a:
        assert a[k].dtype == dtype and torch.equal(a[k], b[k]), k


def test_streamed_write_on_two_ranks_holds_one_tensor_not_the_model(tmp_path):
    # Two gloo FSDP2 ranks, a 256 MiB fp32 model (16 x 16 MiB), built sharded from the meta
    # device. Rank 0's peak RSS grows by about one tensor while it streams the file; the whole
    # gather (today's path before this change, measured after it as the control) grows by the model.
    import os
    from pathlib import Path

    from safetensors.torch import load_file

    script = Path(__file__).with_name("_stream_rank.py")
    init = f"file://{tmp_path / 'store'}"
    # A fixed mmap threshold: glibc's dynamic one keeps freed 16 MiB blocks in the heap, and the
    # peak RSS then grows with fragmentation (~150 MiB here) rather than with what the code holds.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), "2", init, str(tmp_path)],
                              env=env) for r in range(2)]
    assert [p.wait(timeout=300) for p in ranks] == [0, 0]
    peak = json.loads((tmp_path / "peak.json").read_text())
    print(peak)
    assert peak["model_mb"] == 256
    assert peak["streamed_mb"] < 0.25 * peak["model_mb"]
    assert peak["gathered_mb"] > 0.75 * peak["model_mb"]  # the measure sees a whole gather
    written = load_file(tmp_path / "streamed.safetensors")
    assert [float(written[f"{i}.weight"][0, 0]) for i in range(16)] == [float(i) for i in range(16)]


def test_a_rerun_loads_the_corrected_teacher_tensor_by_tensor(tmp_path):
    # What a rerun of a finished teacher correction does with its streamed fp32 file: each tensor
    # into the bf16 teacher, cast; a file of another model is refused by name.
    from tiny import make_tiny_model

    from minitron.common import MinitronError
    from minitron.distill.stage import _load_corrected

    corrected = make_tiny_model("llama", seed=1)
    distributed.write_streamed_safetensors(tmp_path / "teacher.safetensors", corrected)
    teacher = make_tiny_model("llama", seed=0).to(torch.bfloat16)
    _load_corrected(teacher, tmp_path / "teacher.safetensors")
    for k, v in teacher.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, corrected.state_dict()[k].bfloat16()), k
    assert not any(p.requires_grad for p in teacher.parameters())
    other = make_tiny_model("llama", num_hidden_layers=1)
    with pytest.raises(MinitronError, match="does not hold this teacher's weights"):
        _load_corrected(other, tmp_path / "teacher.safetensors")
