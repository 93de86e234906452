"""Distillation on several processes: torch's elastic launcher (torchrun), 2 ranks, gloo on CPU (the same code on NCCL/GPUs).

The reference is a plain single-process run of the same command (same global batch and seed): the
2-process runs must reach the same weights and losses, resume from each other's checkpoints on
another process count, read disjoint shares of every batch, and stop together (with the failing
rank's message, not a hang) when one rank fails. Worker processes record the token ids their loss
actually received, so the sharding is checked on what was consumed, not on the indexing code.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minitron.common import MinitronError
from tiny import make_tiny_model

BLOCK, BATCH, ACCUM, STEPS = 32, 6, 2, 6  # BATCH splits over 1, 2 and 3 processes
# The fused linear+KL form, CE mixed in, an intermediate loss through a learned 32 -> 64 projection,
# two micro-batches per step and a tied-embedding student: every path where a wrapper could miss a
# gradient sync or a checkpoint could miss a tensor.
ARGS = ["--tokens", str(STEPS * BATCH * ACCUM * BLOCK), "--batch-size", str(BATCH),
        "--grad-accum", str(ACCUM), "--block-size", str(BLOCK), "--lr", "5e-3",
        "--warmup-fraction", "0.2", "--alpha", "0.2", "--loss-impl", "fused",
        "--intermediate", "[[3, 1]]", "--checkpoint-every", "2", "--eval-every", "100",
        "--eval-blocks", "4", "--no-progress", "--device", "cpu", "--seed", "3"]
TIMEOUT = 480  # a hang fails the test instead of blocking CI (a two-rank run takes ~60 s alone, 2-3 min on a loaded machine)

# Imported by the torchrun workers (`-m dworker`): the real CLI, with the loss recording the ids it
# receives and, on request, one rank failing (killed, an error, or a NaN loss) at a chosen point.
WORKER = '''
import json, math, os, signal
import minitron.distill.command as d  # the command calls the distill it imported
import minitron.distill.losses as losses  # where _micro_loss finds _kd_loss
from minitron.common import MinitronError, run_cli

rank = int(os.environ.get("RANK", 0))
env = lambda k: int(os.environ.get(k, 0))
calls = [0]
real_loss, real_distill = losses._kd_loss, d.distill

def kd_loss(student, teacher, ids, *a, **k):
    calls[0] += 1
    with open(os.environ["DW_RECORD"] + f".{rank}", "a") as f:
        f.write(json.dumps(ids.tolist()) + "\\n")
    loss = real_loss(student, teacher, ids, *a, **k)
    if rank == 1 and calls[0] == env("DW_NAN_AT"):
        loss = loss * math.nan
    return loss

def on_step(step):
    if rank == 1 and step == env("DW_KILL_AT"):
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 1 and step == env("DW_FAIL_AT"):
        raise MinitronError("the disk of rank 1 is full (test)")

losses._kd_loss = kd_loss
d.distill = lambda *a, **k: real_distill(*a, on_step=on_step, **k)
if __name__ == "__main__":
    run_cli(d.main)
'''
LAUNCH = ("import os, sys; from minitron.common import run_cli; from minitron.distributed import "
          "launch_torchrun; run_cli(lambda argv: launch_torchrun('dworker', argv, "
          "int(os.environ.get('DW_NPROC', 2))), sys.argv[1:])")


@pytest.fixture(autouse=True)
def _torch_loss_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as in test_distill: the torch path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A briefly trained tiny teacher, a narrower 2-layer tied-embedding student, a stdlib corpus."""
    root = tmp_path_factory.mktemp("dist")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((stdlib / n).read_text() for n in (
        "json/decoder.py", "textwrap.py", "string.py", "shlex.py", "argparse.py", "csv.py",
        "difflib.py", "calendar.py"))
    data = root / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": text[i:i + 2500]}) + "\n"
                            for i in range(0, len(text), 2500)))
    teacher = make_tiny_model("llama", seed=0)
    from minitron.data import load_blocks
    from tiny import tiny_tokenizer

    blocks = load_blocks(tiny_tokenizer(), "train", 64, source=str(data), block_size=BLOCK)
    teacher.train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for i in range(30):
        ids = blocks[(i * 8) % 64:(i * 8) % 64 + 8]
        teacher(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    teacher.eval().save_pretrained(root / "teacher", safe_serialization=True)
    tiny_tokenizer().save_pretrained(root / "teacher")
    make_tiny_model("llama", path=root / "student", seed=1, hidden_size=32, num_attention_heads=4,
                    num_hidden_layers=2, intermediate_size=48, tie_word_embeddings=True)
    (root / "dworker.py").write_text(WORKER)
    common = ["--teacher", str(root / "teacher"), "--student", str(root / "student"),
              "--source", str(data), *ARGS]
    return {"root": root, "args": common}


def _env(world, record: Path | None = None, **flags) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("DW_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(world["root"])] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env["DW_RECORD"] = str(record or world["root"] / "unused")
    env.update({f"DW_{k.upper()}": str(v) for k, v in flags.items()})
    return env


def _run(cmd: list[str], env: dict[str, str]) -> tuple[int, str, float]:
    """Run `cmd` in its own process group; on TIMEOUT kill the whole group and fail (a hang)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"hung for {TIMEOUT} s:\n{out[-3000:]}")
    return proc.returncode, out, time.monotonic() - t0


def _two_ranks(world, out: Path, *extra: str, record: Path | None = None, **flags):
    """The worker CLI on 2 processes through the launcher (as `--nproc-per-node 2` starts it)."""
    cmd = [sys.executable, "-c", LAUNCH, *world["args"], "--output", str(out), *extra]
    return _run(cmd, _env(world, record, **flags))


def _one_rank(world, out: Path, *extra: str, record: Path | None = None, **flags):
    """The worker CLI as one plain process: no torchrun, no process group."""
    cmd = [sys.executable, "-m", "dworker", *world["args"], "--output", str(out), *extra]
    return _run(cmd, _env(world, record, **flags))


def _records(path: Path) -> list[list[tuple[int, ...]]]:
    """One entry per loss call (micro-batch): the rows of token ids it received."""
    if not path.exists():
        return []
    return [[tuple(r) for r in json.loads(line)] for line in path.read_text().splitlines()]


def _train_losses(out: Path) -> dict[int, float]:
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert steps == sorted(set(steps)), steps  # each step logged once, by rank 0 alone
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def _assert_same_model(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:  # sums in another order: float32 rounding, far below one lr-sized update
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=k)
    la, lb = _train_losses(a), _train_losses(b)
    assert la.keys() == lb.keys() == set(range(1, STEPS + 1))
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-4, abs=1e-5), s
    ma = json.loads((a / "minitron.json").read_text())["distillation"]["metrics"]
    mb = json.loads((b / "minitron.json").read_text())["distillation"]["metrics"]
    for k in ("eval_loss", "kl_to_teacher"):
        assert mb[k] == pytest.approx(ma[k], rel=1e-4), k


@pytest.fixture(scope="module")
def reference(world):
    """The single-process run: plain `python -m dworker` (the real CLI), recording its batches."""
    out, record = world["root"] / "reference", world["root"] / "reference.ids"
    rc, log, _ = _one_rank(world, out, record=record)
    assert rc == 0, log[-3000:]
    weights = load_file(out / "model.safetensors")
    start = load_file(world["root"] / "student" / "model.safetensors")
    assert max((weights[k] - start[k]).abs().max() for k in weights) > 1e-2  # it did train
    return {"out": out, "batches": _records(Path(f"{record}.0"))}


# ----------------------------------------------------------------------------- equivalence
def test_ddp_on_two_processes_matches_one_process(world, reference, tmp_path):
    """`python -m minitron.distill --nproc-per-node 2` (the launcher, no test worker)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "minitron.distill", *world["args"], "--output", str(out),
           "--nproc-per-node", "2", "--strategy", "ddp"]
    rc, log, _ = _run(cmd, _env(world))
    assert rc == 0, log[-3000:]
    assert log.count("| student after") == 1  # one summary (rank 0), not one per process
    _assert_same_model(reference["out"], out)
    info = json.loads((out / "minitron.json").read_text())
    assert info["distillation"]["metrics"]["processes"] == {"world_size": 2, "strategy": "ddp"}
    # The same plain HF folder as a single-process run: same files, same config.
    names = lambda d: sorted(p.name for p in d.iterdir() if p.is_file() and p.suffix != ".png")
    assert names(out) == names(reference["out"])
    assert (json.loads((out / "config.json").read_text())
            == json.loads((reference["out"] / "config.json").read_text()))


def test_fsdp_rank_killed_mid_run_resumes_on_one_and_on_three_processes(world, reference, tmp_path):
    """FSDP on 2 ranks, rank 1 SIGKILLed after step 5 (checkpoint at 4, one shard per rank):
    torchrun ends rank 0 too; one plain process, and separately 3 FSDP ranks, then resume from the
    sharded checkpoint to the reference result (the three with per-process micro-batches)."""
    out, record = tmp_path / "fsdp", tmp_path / "ids"
    rc, log, wall = _two_ranks(world, out, "--strategy", "fsdp", record=record, kill_at=5)
    assert rc == 2, log[-3000:]
    assert log.rstrip().splitlines()[-1] == ("error: rank 1 died (SIGKILL) with no error message; "
                                             "the launcher stopped the others; the log is above")
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
    assert not (out / "minitron.json").exists()

    # Each rank's loss saw its own half of every micro-batch: disjoint, and together the global
    # batch the single process saw, for every micro-batch that ran.
    r0, r1 = _records(Path(f"{record}.0")), _records(Path(f"{record}.1"))
    n = min(len(r0), len(r1))
    assert n >= 5 * ACCUM
    for i in range(n):
        assert len(r0[i]) == len(r1[i]) == BATCH // 2
        assert not set(r0[i]) & set(r1[i])
        assert sorted(r0[i] + r1[i]) == sorted(reference["batches"][i]), i
    assert not {r for b in r0 for r in b} & {r for b in r1 for r in b}

    shards = sorted(p.name for p in (out / "checkpoint").glob("*.safetensors"))
    assert len(shards) == 2, shards  # each rank wrote its own; no rank gathered the whole state
    shutil.copytree(out, tmp_path / "three")

    resumed = tmp_path / "resumed.ids"
    rc, log, _ = _one_rank(world, out, record=resumed)
    assert rc == 0, log[-3000:]
    assert "resuming from step 4/6" in log
    _assert_same_model(reference["out"], out)
    # The resumed run consumed exactly the token ids the uninterrupted one did from step 5 on.
    assert _records(Path(f"{resumed}.0")) == reference["batches"][4 * ACCUM:]

    # Per-process micro-batches of 2 (2 micro-steps each): the same global batch of 12.
    rc, log, _ = _two_ranks(world, tmp_path / "three", "--strategy", "fsdp",
                            "--micro-batch-size", "2", nproc=3)
    assert rc == 0, log[-3000:]
    assert "resuming from step 4/6 (" in log and "on 3 processes" in log
    _assert_same_model(reference["out"], tmp_path / "three")


def test_one_process_checkpoint_resumes_on_two_processes(world, reference, tmp_path):
    """The other way: a plain run killed after step 3 (checkpoint at 2) finishes under FSDP."""
    out = tmp_path / "killed"
    env = _env(world, kill_at=3)
    env["RANK"] = "1"  # the worker's hooks act on "rank 1"; outside torchrun nothing else reads it
    rc, log, _ = _run([sys.executable, "-m", "dworker", *world["args"], "--output", str(out)], env)
    assert rc == -signal.SIGKILL, log[-3000:]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2

    rc, log, _ = _two_ranks(world, out, "--strategy", "fsdp")
    assert rc == 0, log[-3000:]
    assert "resuming from step 2/6 (" in log and "on 2 processes" in log
    _assert_same_model(reference["out"], out)


def test_hybrid_sharding_on_a_2x2_mesh_matches_one_process(world, reference, tmp_path):
    """HSDP over a (replicate 2, shard 2) gloo mesh of 4 processes, per-process micro-batches of 1
    (3 micro-steps each: the same global batch of 12): the reference's weights and losses."""
    out = tmp_path / "hsdp"
    rc, log, _ = _two_ranks(world, out, "--strategy", "hsdp", "--hsdp-shard-size", "2",
                            "--micro-batch-size", "1", nproc=4)
    assert rc == 0, log[-3000:]
    _assert_same_model(reference["out"], out)
    info = json.loads((out / "minitron.json").read_text())
    assert info["distillation"]["metrics"]["processes"] == {"world_size": 4, "strategy": "hsdp"}


# ----------------------------------------------------------------------------- the bf16 policy
# bf16 compute rounds every matmul operand to 8 significant bits. One process (autocast over fp32
# weights) and FSDP2 (MixedPrecisionPolicy: bf16 parameters, also for the embeddings and norms that
# autocast leaves fp32) differ by that rounding only. Measured over the 6 steps here: per-step loss
# of one bf16 process vs fp32 within 8e-4 relative, FSDP2 bf16 vs one bf16 process within 1.1e-3.
BF16_VS_FP32 = 5e-3
BF16_VS_BF16 = 5e-3


def _final_metrics(out: Path) -> dict:
    return json.loads((out / "minitron.json").read_text())["distillation"]["metrics"]


def test_bf16_policy_one_process_and_fsdp_agree_and_track_fp32(world, reference, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    rc, log, _ = _one_rank(world, one, "--precision", "bf16")
    assert rc == 0, log[-3000:]
    rc, log, _ = _two_ranks(world, two, "--precision", "bf16", "--strategy", "fsdp")
    assert rc == 0, log[-3000:]
    fp32, l1, l2 = _train_losses(reference["out"]), _train_losses(one), _train_losses(two)
    assert fp32.keys() == l1.keys() == l2.keys() == set(range(1, STEPS + 1))
    # bf16 really ran: the first loss (same weights, same batch) differs from fp32's by rounding.
    assert l1[1] != fp32[1] and l2[1] != fp32[1]
    for s in fp32:
        assert l1[s] == pytest.approx(fp32[s], rel=BF16_VS_FP32), s
        assert l2[s] == pytest.approx(fp32[s], rel=BF16_VS_FP32), s
        assert l2[s] == pytest.approx(l1[s], rel=BF16_VS_BF16), s
    m0, m1, m2 = (_final_metrics(p) for p in (reference["out"], one, two))
    for k in ("eval_loss", "kl_to_teacher"):
        assert m1[k] == pytest.approx(m0[k], rel=BF16_VS_FP32), k
        assert m2[k] == pytest.approx(m1[k], rel=BF16_VS_BF16), k
    # The saved weights are the fp32 master weights, not bf16 copies.
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in (*w1.values(), *w2.values()))


def test_teacher_correction_on_two_fsdp_ranks_matches_one_process(world, tmp_path):
    """Teacher correction (fp32 master weights, sharded under FSDP2), then distillation."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = [f"teacher_correction.tokens={2 * BATCH * BLOCK}", "model.dtype=bfloat16"]
    rc, log, _ = _one_rank(world, one, *extra)
    assert rc == 0, log[-3000:]
    rc, log, _ = _two_ranks(world, two, *extra, "--strategy", "fsdp")
    assert rc == 0, log[-3000:]
    c1, c2 = (load_file(p / "teacher_correction" / "teacher.safetensors") for p in (one, two))
    assert all(v.dtype == torch.float32 for v in c1.values())  # the fp32 master weights
    start = load_file(world["root"] / "teacher" / "model.safetensors")
    assert max((c1[k] - start[k]).abs().max() for k in c1) > 1e-3  # it did train
    for k in c1:
        torch.testing.assert_close(c1[k], c2[k], rtol=1e-4, atol=1e-4, msg=k)
    # The distillation after it reads the teacher in bf16, whose matmuls round differently on half
    # a batch: the losses agree to bf16 rounding.
    l1, l2 = _train_losses(one), _train_losses(two)
    assert l1.keys() == l2.keys() == set(range(1, STEPS + 1))
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=BF16_VS_BF16), s


# ----------------------------------------------------------------------------- failures
def test_background_checkpoint_on_two_fsdp_ranks_holds_the_state_of_its_step(tmp_path):
    """distill.async_checkpoint's save on 2 gloo ranks (FSDP2 shards), its write held open while
    three optimizer steps and an all-reduce run on the default group: no hang (the write's
    collectives are on a group of their own), and the committed checkpoint holds, tensor for
    tensor, what the synchronous save wrote before those steps (the state was copied first)."""
    script = Path(__file__).with_name("_async_ckpt_rank.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    init = f"file://{tmp_path / 'store'}"
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), "2", init, str(tmp_path)],
                              env=env, start_new_session=True) for r in range(2)]
    try:
        assert [p.wait(timeout=TIMEOUT) for p in ranks] == [0, 0]
    finally:
        for p in ranks:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for r in range(2):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == {
            "in_flight": True, "all_reduce": 2.0, "committed": True}
    sync, done = tmp_path / "sync" / "checkpoint", tmp_path / "async" / "checkpoint"
    shards = sorted(p.name for p in sync.glob("*.safetensors"))
    assert len(shards) == 2 and shards == sorted(p.name for p in done.glob("*.safetensors"))
    for name in shards:
        a, b = load_file(sync / name), load_file(done / name)
        assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    for name in ("state.json", "param_groups.json"):
        assert (sync / name).read_text() == (done / name).read_text()
    assert not list((tmp_path / "async").glob(".tmp-*"))


def test_error_on_one_rank_ends_all_ranks_with_its_message(world, tmp_path):
    rc, log, wall = _two_ranks(world, tmp_path / "fail", fail_at=2)
    assert rc == 2, log[-3000:]
    # The launcher's own last line: the failing rank's message, as run_cli prints a MinitronError.
    assert log.rstrip().splitlines()[-1] == "error: rank 1: the disk of rank 1 is full (test)"
    assert wall < 90  # rank 0, waiting in the next collective, was stopped by torchrun


def test_nan_on_one_rank_stops_every_rank_at_the_same_step(world, tmp_path):
    # Call 3 of rank 1's loss = step 2, micro-batch 0: the all-reduced loss is NaN on both ranks.
    out = tmp_path / "nan"
    rc, log, _ = _two_ranks(world, out, nan_at=3)
    assert rc == 2, log[-3000:]
    for rank in (0, 1):  # both ranks stopped on their own, at the same step, with one message
        assert (f"error: rank {rank}: distill stopped: the loss became nan at step 2/6; the weights"
                f" were not updated and no checkpoint had been written yet" in log), rank
    assert log.rstrip().splitlines()[-1].startswith("error: rank ")
    assert not (out / "checkpoint").exists() and not (out / "minitron.json").exists()


def test_recorded_failure_is_written_whole_and_read_by_the_launcher(tmp_path, monkeypatch):
    """A rank's error record reaches torch's launcher as written (atomically: an empty file,
    seen while the launcher stopped a rank mid-write, crashed the launcher on the JSON)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from minitron.distributed import _recorded, record_for_torchrun

    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    renames, replace = [], os.replace

    def watched_replace(src, dst):  # the file appears by a rename of a complete record
        renames.append((json.loads(Path(src).read_text()), Path(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", watched_replace)
    try:
        raise MinitronError("the disk of rank 1 is full (test)")
    except MinitronError as e:
        record_for_torchrun(e)
    assert [dst for _, dst in renames] == [path]
    assert renames[0][0] == json.loads(path.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["error.json"]  # no temporary file left
    failure = ProcessFailure(local_rank=1, pid=123, exitcode=1, error_file=str(path))
    assert _recorded(failure) == "MinitronError: the disk of rank 1 is full (test)"
    assert "raise MinitronError" in failure.error_file_data["message"]["extraInfo"]["py_callstack"]


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "3", "--nproc-per-node", "2", "--tokens", "3000"],
     r"batch_size=3 does not split over nproc_per_node=2 processes"),
    (["--strategy", "zero3"], r"distill.strategy: 'zero3' is not one of 'auto', 'ddp', 'fsdp', 'hsdp'"),
    (["--nnodes", "2"], r"distill.nnodes=2 needs distill.rdzv_endpoint"),
    (["distill.nproc_per_node=0"], r"distill.nproc_per_node=0 is invalid; valid: an integer >= 1"),
])
def test_refusals_before_any_process_starts(world, tmp_path, extra, message):
    from minitron.distill import main

    with pytest.raises(MinitronError, match=message):
        main([*world["args"], "--output", str(tmp_path / "x"), *extra])
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- GPUs
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_on_two_gpus_matches_one_gpu(world, tmp_path):
    # The default precision policy (bf16 on CUDA): one GPU autocasts over fp32 weights, FSDP2 uses
    # MixedPrecisionPolicy, so they agree to bf16 rounding, as on CPU above.
    args = [a if a != "cpu" else "cuda" for a in world["args"]]
    one, two = tmp_path / "one", tmp_path / "two"
    for out, extra in ((one, []), (two, ["--nproc-per-node", "2", "--strategy", "fsdp"])):
        rc, log, _ = _run([sys.executable, "-m", "minitron.distill", *args, "--output", str(out),
                           *extra], _env(world))
        assert rc == 0, log[-3000:]
    l1, l2 = _train_losses(one), _train_losses(two)
    assert l1.keys() == l2.keys() == set(range(1, STEPS + 1))
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=BF16_VS_BF16), s


def test_failing_rank_is_read_from_the_failure_records(tmp_path):
    """The launcher's ChildFailedError holds one ProcessFailure per failed rank; the one that
    caused the stop wins over the ranks the launcher stopped (SIGTERM) or that fell with it."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from minitron.distributed import failure_message, root_failure

    def failure(rank, exitcode, message=None):
        path = tmp_path / f"error-{rank}.json"
        if message is not None:  # what ErrorHandler.record_exception writes
            path.write_text(json.dumps({"message": {"message": message, "extraInfo": {
                "py_callstack": "", "timestamp": "0"}}}))
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file=str(path))

    stopped, killed, crashed = failure(0, -signal.SIGTERM), failure(1, -signal.SIGKILL), failure(2, 1)
    assert failure_message(*root_failure({0: stopped, 1: killed, 2: crashed})) == (
        "rank 1 died (SIGKILL) with no error message; the launcher stopped the others; the log is "
        "above")
    assert root_failure({0: stopped, 2: crashed})[0] == 2
    said = failure(3, 2, "MinitronError: the disk is full")
    assert failure_message(*root_failure({1: killed, 3: said})) == "rank 3: the disk is full"
