"""Hostile runs, as a user meets them on the real commands: a re-export into a folder holding the
user's own files, the leftovers of a killed run, a diverging learning rate, a rank killed under
torchrun. Each must end with one clear line naming the offending thing, exit code 2, no traceback,
and every earlier artifact untouched.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minitron.common import MinitronError, check_replaceable
from tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
BLOCK = 32
TIMEOUT = 240  # a hang fails the test instead of blocking CI

# Imported by the subprocesses below (`-m hworker`): the real stage CLIs, with two test hooks.
# DIVERGE_AT=k: the learning-rate schedule stays at 1e-5 of the peak (a healthy lr) for k
# optimizer steps, then jumps to the peak (a diverging one); DIVERGE_AT=never keeps it low.
# KILL_RANK=r, KILL_AT=s: rank r kills itself with SIGKILL after optimizer step s.
WORKER = '''
import os, signal, sys
import minitron.distill.command as d  # the command calls the distill it imported
import minitron.distill.loop as loop
from minitron.common import run_cli

at = os.environ.get("DIVERGE_AT")
if at is not None:
    loop.lr_factor = lambda step, *a: 1e-5 if at == "never" or step < int(at) else 1.0

real_distill = d.distill

def on_step(step):
    if (os.environ.get("RANK", "0") == os.environ.get("KILL_RANK")
            and step == int(os.environ["KILL_AT"])):
        os.kill(os.getpid(), signal.SIGKILL)

d.distill = lambda *a, **k: real_distill(*a, on_step=on_step, **k)
if __name__ == "__main__":
    run_cli(d.main)
'''
LAUNCH = ("import sys; from minitron.common import run_cli; from minitron.distributed import "
          "launch_torchrun; "
          "run_cli(lambda argv: launch_torchrun('hworker', argv, 2), sys.argv[1:])")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny teacher and a narrower student (random weights: enough to train on), a corpus."""
    import sysconfig

    root = tmp_path_factory.mktemp("hostile")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((stdlib / n).read_text() for n in ("json/decoder.py", "textwrap.py",
                                                          "string.py", "shlex.py", "csv.py"))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text[i:i + 2500]}) + "\n"
                              for i in range(0, len(text), 2500)))
    make_tiny_model("llama", path=root / "teacher", seed=0)
    make_tiny_model("llama", path=root / "student", seed=1, hidden_size=32, num_attention_heads=4,
                    num_hidden_layers=2, intermediate_size=48)
    (root / "hworker.py").write_text(WORKER)
    return root


def _env(root: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DIVERGE_AT",
                                                            "KILL_RANK", "KILL_AT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `cmd` in its own process group (stdout and stderr together, as a terminal shows them);
    on TIMEOUT kill the whole group and fail."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"hung for {TIMEOUT} s:\n{out[-3000:]}")
    return proc.returncode, out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _export_cmd(world: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "minitron.export", "--model", str(world / "student"),
            "--output", str(out), "--source", str(world / "corpus.jsonl"), "--block-size",
            str(BLOCK), "--eval-blocks", "2", "--calib-samples", "2", "--gen-tokens", "4",
            "--no-compare", "--no-speed", "--int8", "none"]


# ----------------------------------------------------------------------------- replacing a folder
def test_reexport_and_overwrite_refuse_folders_holding_other_files(world, tmp_path):
    out = tmp_path / "onnx"
    rc, log = _run(_export_cmd(world, out), _env(world))
    assert rc == 0, log[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(manifest["files"])

    (out / "README.md").write_text("my notes on this export")
    before = _snapshot(out)
    rc, log = _run(_export_cmd(world, out), _env(world))
    assert rc == 2, log[-3000:]
    assert "Traceback" not in log
    assert log.strip().splitlines()[-1] == (
        f"error: --output {out} holds files the previous minitron export did not write: "
        f"README.md; replacing the folder would delete them: move them out, or choose another "
        f"folder")
    assert _snapshot(out) == before

    # The same rule for prune --overwrite, checked before any weights load.
    pruned = tmp_path / "pruned"
    prune = [sys.executable, "-m", "minitron.prune", "--model", str(world / "teacher"),
             "--output", str(pruned), "--hidden-size", "32", "--source",
             str(world / "corpus.jsonl"), "--block-size", str(BLOCK), "--calibration-blocks", "4"]
    rc, log = _run(prune, _env(world))
    assert rc == 0, log[-3000:]
    check_replaceable(pruned, "minitron.json", "pruned model")  # its own files: replaceable
    (pruned / "importance" / "notes.txt").write_text("why I pruned this")
    before = _snapshot(pruned)
    rc, log = _run(prune + ["--overwrite"], _env(world))
    assert rc == 2 and "Traceback" not in log, log[-3000:]
    assert log.strip().splitlines()[-1] == (
        f"error: --output {pruned} holds files the previous minitron pruned model did not write: "
        f"importance/notes.txt; replacing the folder would delete them: move them out, or choose "
        f"another folder")
    assert _snapshot(pruned) == before

    # A non-empty folder with no manifest of ours: refused too, naming what it holds.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("...")
    rc, log = _run(prune[:6] + [str(mine)] + prune[7:] + ["--overwrite"], _env(world))
    assert rc == 2 and "Traceback" not in log, log[-3000:]
    assert log.strip().splitlines()[-1] == (
        f"error: --output {mine} exists and is not a previous minitron pruned model (no "
        f"minitron.json listing its files; it holds thesis.tex); choose a new or empty folder, "
        f"or remove it")
    assert (mine / "thesis.tex").read_text() == "..."


# ----------------------------------------------------------------------------- leftovers
def test_killed_export_leftovers_are_removed_at_the_next_start(world, tmp_path):
    """kill -9 while the export writes its temporary folder; the next export removes it, but
    not a temporary folder that a live writer holds, nor a `.tmp-*` folder that is not ours."""
    from minitron.common import atomic_dir

    out = tmp_path / "onnx"
    foreign = tmp_path / ".tmp-onnx-someone-elses"  # no lock file of ours: never touched
    foreign.mkdir()
    # A live writer of the same output (this process) holds its own temporary folder meanwhile;
    # when it finishes, the export is there and it does not overwrite it.
    with pytest.raises(MinitronError, match="appeared while it was being written"):
        with atomic_dir(out) as live:
            ours = {live.name, foreign.name}
            proc = subprocess.Popen(_export_cmd(world, out), env=_env(world), cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + TIMEOUT

            def left():
                return [p for p in tmp_path.iterdir()
                        if p.is_dir() and p.name.startswith(".tmp-onnx-") and p.name not in ours]

            while not left():
                assert proc.poll() is None and time.monotonic() < deadline, "ended before the kill"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = left()
            assert len(killed) == 1 and not out.exists()

            rc, log = _run(_export_cmd(world, out), _env(world))
            assert rc == 0, log[-3000:]
            assert "Traceback" not in log
            assert f"[minitron] removed {killed[0].name}, left by an interrupted export" in log
            assert not left() and live.is_dir() and foreign.is_dir()
            assert (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-onnx-someone-elses", "onnx"]


# ----------------------------------------------------------------------------- divergence
def _distill_cmd(world: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hworker", "--teacher", str(world / "teacher"), "--student",
            str(world / "student"), "--output", str(out), "--source", str(world / "corpus.jsonl"),
            "--tokens", str(8 * 4 * BLOCK), "--batch-size", "4", "--block-size", str(BLOCK),
            "--warmup-fraction", "0", "--checkpoint-every", "1", "--eval-every", "100",
            "--eval-blocks", "2", "--no-progress", "--device", "cpu", *extra]


def _checkpoint_weights(out: Path) -> dict[str, torch.Tensor]:
    shards = sorted((out / "checkpoint").glob("*.safetensors"))  # torch.distributed.checkpoint's
    return {k: v for f in shards for k, v in load_file(f).items() if k.startswith("model.student.")}


def test_diverging_lr_stops_early_and_keeps_a_checkpoint_from_before(world, tmp_path):
    """The peak lr of 10 is reached after 3 healthy steps: the update of step 4 blows the weights
    up (the loss goes from ~0.02 to ~1e3). The run stops at the next step's check, before any
    further update, and the checkpoint it keeps is step 3's (step 4's, due after the jump, is never
    confirmed); rerunning resumes. (At lr 100 the next gradient norm is nan on transformers 5.24 /
    torch 2.13: the non-finite check catches that, not the spike check tested here.)"""
    out = tmp_path / "run"
    cmd = _distill_cmd(world, out, "--lr", "10")
    rc, log = _run(cmd, _env(world, DIVERGE_AT=3))
    assert rc == 2, log[-3000:]
    assert "Traceback" not in log
    last = log.strip().splitlines()[-1]
    assert last.startswith("error: distill stopped: the training is diverging at step 5/8: "
                           "the loss jumped to "), last
    assert (f"; the weights were not updated and the last good checkpoint (step 3) in "
            f"{out / 'checkpoint'} is intact. Lower the learning rate (lr=10.0)") in last
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    start = {k: v for k, v in load_file(world / "student" / "model.safetensors").items()}
    kept = _checkpoint_weights(out)
    assert kept and all(torch.isfinite(w).all() for w in kept.values())
    # Three updates at lr 1e-3 move no weight by more than ~3e-3 (AdamW's step is at most ~lr).
    drift = max((kept[f"model.student.{k}"] - v).abs().max().item() for k, v in start.items())
    assert drift < 1e-2, drift
    stopped = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert stopped == {"kind": "stopped", "step": 5, "reason": "divergence"}
    assert not (out / "minitron.json").exists()

    # Rerunning resumes from the kept checkpoint (its optimizer already holds the peak lr for
    # the next update, so the run diverges again), stops at the same check, and keeps it as it was.
    kept_files = _snapshot(out / "checkpoint")
    rc, again = _run(cmd, _env(world, DIVERGE_AT=3))
    assert rc == 2 and "Traceback" not in again, again[-3000:]
    assert "resuming from step 3/8" in again
    assert again.strip().splitlines()[-1] == last
    assert _snapshot(out / "checkpoint") == kept_files


def test_gradient_norm_check_when_turned_on(world, tmp_path):
    """The same diverging run with only the (opt-in) gradient-norm check: it stops there too."""
    out = tmp_path / "run"
    rc, log = _run(_distill_cmd(world, out, "--lr", "10", "--spike-loss-factor", "0",
                                "--spike-grad-factor", "10"), _env(world, DIVERGE_AT=3))
    assert rc == 2 and "Traceback" not in log, log[-3000:]
    last = log.strip().splitlines()[-1]
    assert last.startswith("error: distill stopped: the training is diverging at step 5/8: the "
                           "gradient norm jumped to "), last
    assert "(distill.spike_grad_factor=10.0); the weights were not updated and the last good " \
           "checkpoint (step 3)" in last
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3


def test_spike_checks_do_not_stop_a_healthy_run(world, tmp_path):
    """The same run at a hot but sane lr (30x the demo's 3e-4) finishes: no false alarm."""
    rc, log = _run(_distill_cmd(world, tmp_path / "run", "--lr", "1e-2"), _env(world))
    assert rc == 0 and "distill stopped" not in log, log[-3000:]


# ----------------------------------------------------------------------------- a rank killed
def test_killed_rank_ends_with_one_line_per_failed_rank(world, tmp_path):
    """Rank 1 of 2 (gloo) is killed (SIGKILL) after step 2: rank 0's collective breaks. The user
    sees one line per failed rank, the killed one last, and no traceback; rank 0's traceback is in
    its log file under the run folder; `--debug` shows the tracebacks as well."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", LAUNCH, *_distill_cmd(world, out, "--lr", "1e-3")[3:]]
    rc, log = _run(cmd, _env(world, KILL_RANK=1, KILL_AT=2))
    assert rc == 2, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    errors = [l for l in log.strip().splitlines() if l.startswith("error: ")]
    assert errors[-1] == ("error: rank 1 died (SIGKILL) with no error message; the launcher "
                          "stopped the others; the log is above"), log[-3000:]
    # Rank 0 either saw its collective break (its line points at its log) or was stopped by the
    # launcher first: one line either way.
    assert len(errors) == 2, errors
    if errors[0].startswith("error: rank 0: RuntimeError: "):
        assert errors[0].endswith(f"(traceback: {out / 'logs' / 'rank0.log'})"), errors[0]
        assert "Traceback (most recent call last)" in (out / "logs" / "rank0.log").read_text()
    else:
        assert errors[0] == ("error: rank 0 was stopped by the launcher (SIGTERM) after rank 1 "
                             "failed"), errors
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1

    rc, log = _run(cmd + ["--debug"], _env(world, KILL_RANK=1, KILL_AT=2))
    assert rc == 2 and "Traceback" in log, log[-3000:]
