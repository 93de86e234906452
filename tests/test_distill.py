"""Distillation: a tiny teacher trained here, pruned, then distilled back; resume, NaN stop, CLI.

KL is checked against a naive float64 computation, resume against an uninterrupted run, the final
folder against a plain `transformers` reload in a subprocess that never imports minitron.
"""

import copy
import dataclasses
import json
import math
import os
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
from minitron.data import load_blocks
from minitron.config import DistillConfig, TeacherCorrectionConfig
from minitron.distill import batch_indices, distill, lr_factor, main
from tiny import make_tiny_model, tiny_tokenizer

BLOCK = 32
ROPE = {"rope_type": "default", "rope_theta": 100_000.0}


@pytest.fixture(autouse=True)
def _torch_loss_on_cpu(monkeypatch):
    # The Triton interpreter (what conftest turns on for the kernel tests) costs seconds per step
    # here; on CPU without it the kernel contract routes to its torch reference, as in production.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _corpus(path: Path) -> Path:
    """A .jsonl of ~200 pieces of stdlib source: data.py hashes each into a split (~5% eval)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "shlex.py",
             "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "calendar.py", "difflib.py",
             "argparse.py", "csv.py", "configparser.py", "tokenize.py", "pprint.py", "dataclasses.py"]
    text = "\n\n".join((stdlib / n).read_text() for n in names)
    pieces = [text[i:i + 2500] for i in range(0, len(text), 2500)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in pieces))
    return path


def _naive_kl(student, teacher, blocks) -> float:
    """Mean per-token KL(teacher || student), float64, one plain formula."""
    with torch.no_grad():
        s = student(blocks).logits.double().log_softmax(-1)
        t = teacher(blocks).logits.double().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny teacher trained briefly with plain AdamW + CE, and its width-pruned student."""
    from minitron.importance import compute_scores
    from minitron.prune import prune, save_pruned

    root = tmp_path_factory.mktemp("distill")
    tok = tiny_tokenizer()
    data = _corpus(root / "corpus.jsonl")
    train = load_blocks(tok, "train", 256, source=str(data), block_size=BLOCK)
    evalb = load_blocks(tok, "eval", 8, source=str(data), block_size=BLOCK)
    calib = load_blocks(tok, "calibration", 16, source=str(data), block_size=BLOCK)

    # SmolLM2's rope base, not the default: a stage that lost rope_parameters would show.
    teacher = make_tiny_model("llama", seed=0, rope_parameters=ROPE)
    teacher.train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        ids = train[torch.randint(len(train), (16,), generator=gen)]
        loss = teacher(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    teacher.eval()
    teacher_dir = root / "teacher"
    teacher.save_pretrained(teacher_dir, safe_serialization=True)
    tok.save_pretrained(teacher_dir)

    scores = compute_scores(teacher, calib, batch_size=8)
    student = prune(teacher, scores, {"hidden_size": 32, "intermediate_size": 48})
    student_dir = root / "student"
    save_pruned(student, tok, student_dir)
    return {"root": root, "tok": tok, "data": data, "train": train, "eval": evalb,
            "teacher": teacher, "student": student, "teacher_dir": teacher_dir,
            "student_dir": student_dir}


def _cfg(**kw) -> DistillConfig:
    base = dict(tokens=12 * 8 * BLOCK, batch_size=8, block_size=BLOCK, lr=5e-3, warmup_fraction=0.1,
                checkpoint_every=4, eval_every=100, eval_blocks=8, progress=False, seed=0)
    base.update(kw)
    return DistillConfig(**base)


def _run(world, out, config, **kw):
    teacher = copy.deepcopy(world["teacher"])
    student = copy.deepcopy(world["student"])
    metrics = distill(teacher, student, world["train"], world["eval"], config, out,
                      tokenizer=world["tok"], **kw)
    return metrics, student, teacher


# ----------------------------------------------------------------------------- quality
def test_distillation_lowers_kl_to_teacher(world, tmp_path):
    teacher, before = world["teacher"], world["student"]
    kl_before = _naive_kl(before, teacher, world["eval"])
    metrics, student, _ = _run(world, tmp_path / "run", _cfg(tokens=30 * 8 * BLOCK, eval_every=10))
    kl_after = _naive_kl(student, teacher, world["eval"])
    assert kl_after < 0.35 * kl_before, (kl_before, kl_after)
    # The loop's own eval agrees with the naive number, and its KL curve falls.
    assert metrics["kl_to_teacher"] == pytest.approx(kl_after, rel=1e-4)
    evals = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl_to_teacher"] for r in evals if r["kind"] == "eval"]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [0, 10, 20, 30]
    assert kls[0] == pytest.approx(kl_before, rel=1e-4) and kls[-1] < kls[1] < kls[0]
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_final_model_is_streamed_in_the_source_dtype(world, tmp_path):
    # Written tensor by tensor (no whole-model gather): fp32 bit-equal to the trained student,
    # bf16 (config.json saying so) where the student's source folder was bf16.
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        _, student, _ = _run(world, out, _cfg(tokens=2 * 8 * BLOCK),
                             info={"student_dtype": dtype})
        written = load_file(out / "model.safetensors")
        trained = student.state_dict()
        assert written.keys() <= trained.keys()
        for k, v in written.items():
            assert v.dtype == getattr(torch, dtype) and torch.equal(v, trained[k].to(v.dtype)), k
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype
        assert "student_dtype" not in json.loads((out / "minitron.json").read_text())
        assert not list(out.glob(".final*"))


def test_final_folder_reloads_in_plain_transformers(world, tmp_path):
    out = tmp_path / "run"
    metrics, student, _ = _run(world, out, _cfg(tokens=2 * 8 * BLOCK))
    info = json.loads((out / "minitron.json").read_text())
    assert info["distillation"]["status"] == "finished"
    assert info["distillation"]["config"]["tokens"] == 2 * 8 * BLOCK
    assert info["distillation"]["metrics"]["eval_loss"] == pytest.approx(metrics["eval_loss"])
    # The student's rotary settings, as transformers 5 writes them, unchanged by distillation.
    written = json.loads((out / "config.json").read_text())
    assert written["rope_parameters"] == ROPE
    assert not {"rope_theta", "rope_scaling"} & set(written)
    ids = world["eval"][:2]
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad(): torch.save(m(ids).logits, sys.argv[1])\n"
        "assert 'minitron' not in sys.modules\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "logits.pt")], check=True, env=env,
                   cwd=tmp_path)
    with torch.no_grad():
        want = student(ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, rtol=1e-5, atol=1e-5)


def test_fused_linear_form_matches_logits_form(world, tmp_path):
    """Same run through the chunked LM-head kernel and through materialized logits."""
    cfg = dict(tokens=3 * 8 * BLOCK, alpha=0.3, temperature=2.0)
    _, a, _ = _run(world, tmp_path / "logits", _cfg(loss_impl="logits", **cfg))
    _, b, _ = _run(world, tmp_path / "fused", _cfg(loss_impl="fused", **cfg))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_teacher_keeps_its_own_dtype(world, tmp_path):
    teacher = copy.deepcopy(world["teacher"]).to(torch.bfloat16)
    student = copy.deepcopy(world["student"])
    metrics = distill(teacher, student, world["train"], world["eval"],
                      _cfg(tokens=2 * 8 * BLOCK, loss_impl="fused"), tmp_path / "run")
    assert next(teacher.parameters()).dtype == torch.bfloat16
    assert next(student.parameters()).dtype == torch.float32
    assert math.isfinite(metrics["eval_loss"]) and metrics["kl_to_teacher"] < metrics["start"]["kl_to_teacher"]


def test_activation_checkpointing_gives_the_same_training(world, tmp_path):
    _, a, _ = _run(world, tmp_path / "plain", _cfg(tokens=2 * 8 * BLOCK))
    _, b, _ = _run(world, tmp_path / "ckpt", _cfg(tokens=2 * 8 * BLOCK, gradient_checkpointing=True))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    assert not b.is_gradient_checkpointing  # switched off again after training


def test_jsd_and_intermediate_loss_train(world, tmp_path):
    _, student, _ = _run(world, tmp_path / "run", _cfg(
        tokens=10 * 8 * BLOCK, divergence="jsd", intermediate=((3, 3), (1, 1)),
        intermediate_loss="mse"))
    rec = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rec if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["intermediate_loss"] < train[0]["intermediate_loss"]
    # The learned width map (32 -> 64) is checkpointed with the student.
    shards = sorted((tmp_path / "run" / "checkpoint").glob("*.safetensors"))
    saved = {k: v for f in shards for k, v in load_file(f).items()}
    proj = {k: v for k, v in saved.items() if k.startswith("model.projections.")}
    assert sorted(v.shape for v in proj.values()) == [torch.Size([64, 32])] * 2
    assert any(k.startswith("optim.projections.") for k in saved)  # with its AdamW state


def test_teacher_correction_then_distill(world, tmp_path):
    out = tmp_path / "run"
    metrics, _, teacher = _run(world, out, _cfg(tokens=2 * 8 * BLOCK),
                               correction=TeacherCorrectionConfig(tokens=4 * 8 * BLOCK))
    assert (out / "teacher_correction" / "teacher.safetensors").exists()
    corrected = load_file(out / "teacher_correction" / "teacher.safetensors")
    original = world["teacher"].state_dict()
    assert any(not torch.equal(corrected[k], original[k]) for k in corrected)
    # The teacher that taught is the corrected one, frozen.
    assert torch.equal(teacher.model.norm.weight, corrected["model.norm.weight"])
    assert not any(p.requires_grad for p in teacher.parameters())
    assert metrics["teacher_correction"]["steps"] == 4
    assert set(metrics["teacher_corrected"]) == {"eval_loss", "eval_perplexity"}


def test_baselines_ce_and_scratch(world, tmp_path):
    ce, _, _ = _run(world, tmp_path / "ce", _cfg(tokens=2 * 8 * BLOCK, baseline="ce"))
    scratch, s, _ = _run(world, tmp_path / "scratch", _cfg(tokens=2 * 8 * BLOCK, baseline="scratch"))
    assert ce["loss_impl"] == scratch["loss_impl"] == "cross_entropy"
    # ce starts from the pruned weights, scratch from a random init of the same shape (loss ~ ln V).
    assert ce["start"]["eval_loss"] < scratch["start"]["eval_loss"]
    assert scratch["start"]["eval_loss"] == pytest.approx(math.log(384), abs=0.3)
    assert s.config.hidden_size == 32


def test_training_from_shards_matches_training_from_memory(world, tmp_path):
    """Rows read by index from prepared shards train exactly like the in-memory blocks, and the
    run's data fingerprint is the manifest's (no hashing of the corpus)."""
    from minitron.shards import Prepared, prepare

    prepare(str(world["data"]), tmp_path / "shards", world["tok"], workers=1, shard_tokens=1000,
            progress=False)
    view = Prepared(tmp_path / "shards").blocks("train", BLOCK, len(world["train"]))
    cfg = _cfg(tokens=4 * 8 * BLOCK)
    _run(world, tmp_path / "memory", cfg)
    student = copy.deepcopy(world["student"])
    distill(copy.deepcopy(world["teacher"]), student, view, world["eval"], cfg,
            tmp_path / "shards_run", tokenizer=world["tok"])
    a = load_file(tmp_path / "memory" / "model.safetensors")
    b = load_file(tmp_path / "shards_run" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run = json.loads((tmp_path / "shards_run" / "distill_run.json").read_text())
    assert run["train_data"] == view.fingerprint


# ----------------------------------------------------------------------------- resume
class _Killed(Exception):
    pass


def test_resume_after_interruption_gives_identical_weights(world, tmp_path):
    cfg = _cfg(tokens=9 * 2 * 4 * BLOCK, batch_size=4, grad_accum=2, checkpoint_every=3, alpha=0.2,
               intermediate=((3, 3),), eval_every=4)
    _run(world, tmp_path / "straight", cfg)

    def kill_at_5(step):
        if step == 5:
            raise _Killed

    with pytest.raises(_Killed):
        _run(world, tmp_path / "resumed", cfg, on_step=kill_at_5)
    assert json.loads((tmp_path / "resumed/checkpoint/state.json").read_text())["step"] == 3
    assert not (tmp_path / "resumed" / "minitron.json").exists()
    _run(world, tmp_path / "resumed", cfg)

    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The metrics log has each step once, as if never interrupted.
    steps = [json.loads(l)["step"] for l in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == list(range(1, 10))

    # A finished run is not repeated.
    calls = []
    _run(world, tmp_path / "resumed", cfg, on_step=calls.append)
    assert calls == []


def _checkpoint_files(ckpt: Path) -> dict[str, object]:
    """What a checkpoint folder holds: every shard's tensors, the JSON files, trainer.pt."""
    tensors = {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
    return {"tensors": tensors, "trainer": trainer,
            **{name: json.loads((ckpt / name).read_text())
               for name in ("state.json", "param_groups.json")}}


def test_async_checkpoint_writes_what_the_synchronous_save_writes(world, tmp_path):
    """distill.async_checkpoint: the checkpoints are written in the background, each one committed
    before the next starts; the last one holds tensor for tensor what the synchronous save wrote at
    that step, and the run's losses and weights are the synchronous run's."""
    cfg = _cfg(tokens=6 * 8 * BLOCK, checkpoint_every=2)
    _run(world, tmp_path / "sync", cfg)
    _run(world, tmp_path / "async", dataclasses.replace(cfg, async_checkpoint=True))
    a, b = (_checkpoint_files(tmp_path / run / "checkpoint") for run in ("sync", "async"))
    assert a["state.json"]["step"] == 6 and len(a["tensors"]) > 10
    timeless = lambda state: {k: v for k, v in state.items() if k != "train_time_s"}
    assert timeless(b["state.json"]) == timeless(a["state.json"])
    assert b["param_groups.json"] == a["param_groups.json"]
    assert b["tensors"].keys() == a["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    assert b["trainer"]["scheduler"] == a["trainer"]["scheduler"]
    assert torch.equal(b["trainer"]["rng"]["torch"], a["trainer"]["rng"]["torch"])
    wa, wb = (load_file(tmp_path / run / "model.safetensors") for run in ("sync", "async"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    losses = [[json.loads(l)["loss"] for l in (tmp_path / run / "metrics.jsonl").read_text()
               .splitlines() if json.loads(l)["kind"] == "train"] for run in ("sync", "async")]
    assert len(losses[0]) == 6 and losses[1] == losses[0]
    assert not list((tmp_path / "async").glob(".tmp-*"))  # committed, lock released


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async_checkpoint"])
def test_nan_loss_stops_with_checkpoint_intact(world, tmp_path, monkeypatch, background):
    """With async_checkpoint, step 4's checkpoint (started at step 5) may still be being written
    when step 6 stops: the stop waits for it, so the message names it and it is on disk."""
    import minitron.distill.losses as d  # where _micro_loss finds _kd_loss

    real, calls = d._kd_loss, []

    def poisoned(*args, **kw):
        calls.append(1)
        loss = real(*args, **kw)
        return loss * float("nan") if len(calls) == 6 else loss

    monkeypatch.setattr(d, "_kd_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(MinitronError, match=r"the loss became nan at step 6/12; the weights were "
                                            r"not updated and the last good checkpoint \(step 4\)"):
        _run(world, out, _cfg(async_checkpoint=background))
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4
    shards = sorted((out / "checkpoint").glob("*.safetensors"))  # torch.distributed.checkpoint's
    weights = {k: v for f in shards for k, v in load_file(f).items()}
    assert any(k.startswith("model.student.") for k in weights)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "minitron.json").exists()
    monkeypatch.setattr(d, "_kd_loss", real)
    # rerunning resumes and finishes
    metrics, _, _ = _run(world, out, _cfg(async_checkpoint=background))
    assert metrics["steps"] == 12 and math.isfinite(metrics["eval_loss"])


# ----------------------------------------------------------------------------- pieces
def test_data_order_is_a_permutation_per_epoch_and_sharded_disjointly():
    cfg = DistillConfig(tokens=10_000, batch_size=4, block_size=8, grad_accum=2)
    seen = torch.cat([batch_indices(s, m, 12, cfg) for s in range(3) for m in range(2)])
    assert sorted(seen[:12].tolist()) == list(range(12)) and sorted(seen[12:].tolist()) == list(range(12))
    assert seen[:12].tolist() != seen[12:].tolist()  # a new order each epoch
    for step, micro in ((0, 0), (1, 1), (5, 0)):
        whole = batch_indices(step, micro, 12, cfg)
        shards = [batch_indices(step, micro, 12, cfg, rank=r, world=2) for r in range(2)]
        assert sorted(torch.cat(shards).tolist()) == sorted(whole.tolist())


def test_a_later_stage_reads_only_the_blocks_after_the_skipped_ones():
    """skip_tokens (the sweep's iterative pruning): a second stage that skips the first stage's
    tokens reads rows [n, 2n) of the train blocks it opens, each once per epoch, on any process
    count; without a skip the order is the plain one."""
    first = DistillConfig(tokens=6 * 2 * 8, batch_size=2, block_size=8, seed=3)
    n = first.blocks_read
    second = dataclasses.replace(first, skip_tokens=first.tokens)
    assert (n, second.skip_blocks, second.blocks_read) == (12, 12, 24)
    a = torch.cat([batch_indices(s, 0, n, first) for s in range(first.steps)])
    b = torch.cat([batch_indices(s, 0, 2 * n, second) for s in range(2 * second.steps)])
    assert sorted(a.tolist()) == list(range(n))
    assert sorted(b[:n].tolist()) == sorted(b[n:].tolist()) == list(range(n, 2 * n))
    assert b[:n].tolist() != b[n:].tolist()  # its own epochs, each in a new order
    unskipped = dataclasses.replace(first, skip_tokens=0)
    assert torch.equal(batch_indices(4, 0, 2 * n, unskipped), batch_indices(4, 0, 2 * n, first))
    for step in (0, 5, 9):
        shards = [batch_indices(step, 0, 2 * n, second, rank=r, world=2) for r in range(2)]
        assert sorted(torch.cat(shards).tolist()) == sorted(batch_indices(step, 0, 2 * n, second).tolist())


def test_per_process_micro_batches_cover_each_step_on_any_process_count():
    """micro_batch_size: every process count that divides the global batch reads, per optimizer
    step, exactly the samples one process reads (disjointly); one that does not is refused."""
    from minitron.config import check_world
    from minitron.distill import micro_steps

    cfg = DistillConfig(tokens=10_000, batch_size=6, block_size=8, grad_accum=2, micro_batch_size=2)
    plain = DistillConfig(tokens=10_000, batch_size=6, block_size=8, grad_accum=2)
    for step in (0, 1, 7):
        want = sorted(torch.cat([batch_indices(step, m, 50, plain) for m in range(2)]).tolist())
        for world in (1, 2, 3, 6):
            parts = [batch_indices(step, m, 50, cfg, rank=r, world=world).tolist()
                     for r in range(world) for m in range(micro_steps(cfg, world))]
            assert all(len(p) == 2 for p in parts)
            assert sorted(sum(parts, [])) == want, (step, world)
    assert micro_steps(cfg, 3) == 2 and micro_steps(cfg, 6) == 1
    with pytest.raises(MinitronError, match="does not split into micro_batch_size=2 x world size=4"):
        check_world(cfg, 4, "world size")


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- refusals
def _cli(world, out, *extra):
    args = ["--teacher", str(world["teacher_dir"]), "--student", str(world["student_dir"]),
            "--output", str(out), "--source", str(world["data"]), "--block-size", str(BLOCK),
            "--batch-size", "4", "--tokens", str(2 * 4 * BLOCK), "--eval-blocks", "4",
            "--no-progress", *extra]
    return main(args)


@pytest.mark.parametrize("extra, message", [
    (["--tokens", "10"], r"distill.tokens=10 is less than one optimizer step .* give tokens >= 128"),
    (["--alpha", "1"], r"alpha=1.0 is pure cross-entropy.*distill.baseline=ce"),
    (["distill.alpha=1.5"], r"distill.alpha=1.5 is invalid; valid: 0 <= x <= 1"),
    (["--temperature", "0"], r"distill.temperature=0.0 is invalid; valid: a number > 0"),
    (["--lr", "-1"], r"distill.lr=-1.0 is invalid; valid: a number > 0"),
    (["--divergence", "tvd"], r"distill.divergence: 'tvd' is not one of 'kl', 'reverse_kl', 'jsd'"),
    (["--beta", "1"], r"distill.beta=1.0 is invalid; valid: 0 < x < 1"),
    (["--baseline", "lora"], r"distill.baseline: 'lora' is not valid \('lora' is not one of 'ce', "
                             r"'scratch'"),
    (["--loss-impl", "fast"], r"distill.loss_impl: 'fast' is not one of 'auto', 'logits', 'fused'"),
    (["--intermediate-loss", "l1"], r"distill.intermediate_loss: 'l1' is not one of 'cosine', 'mse'"),
    (["--batch-size", "0"], r"distill.batch_size=0 is invalid; valid: an integer >= 1"),
    (["distill.checkpoint_every=0"], r"distill.checkpoint_every=0 is invalid; valid: an integer >= 1"),
    (["distill.async_checkpoint=sometimes"],
     r"distill.async_checkpoint: expected true or false, got 'sometimes'"),
    (["--intermediate", "3-1"], r"distill.intermediate: expected a list, got '3-1'"),
    (["--intermediate", "[[3, -1]]"], r"distill.intermediate=\(\(3, -1\),\) is invalid; valid: "
                                      r"pairs of non-negative layer indices"),
    (["--intermediate", "[[9, 1]]"], r"intermediate pair 9:1 is out of range: the teacher has "
                                     r"layers 0..3, the student 0..3"),
    (["--intermediate", "[[3, 3]]", "--baseline", "ce"],
     r"distill.intermediate=\[\[3, 3\]\] needs a teacher"),
    (["teacher_correction.tokens=512", "--baseline", "scratch"],
     r"teacher_correction.tokens=512 corrects a teacher that the 'scratch' baseline does not use"),
    (["--dtype", "int4"], r"model.dtype: 'int4' is not one of 'float32', 'bfloat16', 'float16'"),
    (["--block-size", "512", "--tokens", "4096"],
     r"distill.block_size=512 is longer than the models' context \(256 positions\)"),
    (["distill.temprature=2"], r"distill.temprature: unknown key; did you mean 'distill.temperature'"),
    (["data.block_size=8"], r"data.block_size: unknown key"),  # distillation's own block_size counts
    (["distill.skip_tokens=100000000"], r"distill.skip_tokens=100000000 skips 3125000 blocks of 32 "
                                        r"tokens, but the train split has \d+: no fresh block"),
])
def test_cli_refusals(world, tmp_path, extra, message):
    with pytest.raises(MinitronError, match=message):
        _cli(world, tmp_path / "out", *extra)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_cli_refuses_missing_teacher(world, tmp_path):
    with pytest.raises(MinitronError, match=r"distillation needs --teacher or distill.teacher_cache; without a teacher use "
                                            r"distill.baseline=ce or distill.baseline=scratch"):
        main(["--student", str(world["student_dir"]), "--output", str(tmp_path / "o")])


def test_cli_refuses_vocab_mismatch(world, tmp_path):
    other = tmp_path / "other"
    make_tiny_model("llama", path=other, vocab_size=500)
    with pytest.raises(MinitronError, match=r"the teacher '.*other' has a vocabulary of 500 "
                                            r"entries, the student '.*' 384"):
        main(["--teacher", str(other), "--student", str(world["student_dir"]),
              "--output", str(tmp_path / "o")])


def test_cli_refuses_output_that_is_not_a_run(world, tmp_path):
    with pytest.raises(MinitronError, match=r"--output .* is the --student folder itself"):
        _cli(world, world["student_dir"])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(MinitronError, match=r"output folder .*busy is not empty and holds no "
                                            r"distillation run"):
        _cli(world, busy)


def test_cli_refuses_resume_with_other_settings(world, tmp_path, monkeypatch):
    import minitron.distill as d

    def stop(*a, **k):
        raise _Killed

    out = tmp_path / "run"
    monkeypatch.setattr(d.stage, "_write_final", stop)  # where distill() finds it
    with pytest.raises(_Killed):
        _cli(world, out)
    with pytest.raises(MinitronError, match=r"holds a run started with other settings \(lr: 0.0001 "
                                            r"-> 0.001\); rerun with the same settings"):
        _cli(world, out, "--lr", "1e-3")
    # The settings declared resumable (config.resumable) may change; every other one may not.
    started = json.loads((out / "distill_run.json").read_text())
    for key in d.RESUMABLE_SETTINGS:
        d.loop._check_run_dir(out, {**started, "config": {**started["config"], key: "changed"}})
    for key in set(started["config"]) - d.RESUMABLE_SETTINGS:
        with pytest.raises(MinitronError, match=f"other settings \\({key}: "):
            d.loop._check_run_dir(out, {**started, "config": {**started["config"], key: "changed"}})
    assert {"checkpoint_every", "nproc_per_node", "strategy"} <= d.RESUMABLE_SETTINGS
    assert not {"lr", "tokens", "seed", "block_size"} & d.RESUMABLE_SETTINGS


def test_cli_killed_at_any_moment_resumes_to_the_same_weights(world, tmp_path):
    """The real command on prepared shards: a refusal exits 2 with one line; a run killed with
    SIGKILL mid-training and rerun ends with the weights of an uninterrupted run (in-process)."""
    from minitron.shards import prepare

    prepare(str(world["data"]), tmp_path / "shards", world["tok"], workers=1, progress=False)
    args = ["--teacher", str(world["teacher_dir"]), "--student", str(world["student_dir"]),
            "data.source=" + str(tmp_path / "shards"), "--block-size", str(BLOCK), "--batch-size", "4",
            "distill.eval_blocks=4", "--no-progress", "--tokens", str(16 * 4 * BLOCK),
            "--checkpoint-every", "2", "--eval-every", "5", "--alpha", "0.1"]
    cmd = [sys.executable, "-m", "minitron.distill", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    bad = subprocess.run(cmd + ["--output", str(tmp_path / "bad"), "--divergence", "tv"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: command line: distill.divergence: 'tv' is not one of 'kl', "
                                  "'reverse_kl', 'jsd'")

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--output", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint" / "state.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "minitron.json").exists(), "the run ended before it could be killed"
    again = subprocess.run(cmd + ["--output", str(out)], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr
    assert "resuming from step" in again.stdout
    assert "student before training" in again.stdout

    main(args + ["--output", str(tmp_path / "straight")])
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((out / "minitron.json").read_text())
    assert info["distillation"]["metrics"]["steps"] == 16
    assert info["pruning"]["shape"]["hidden_size"] == 32  # the pruner's record is carried over


# The real command whose background write of step 4's checkpoint never ends: the real safetensors
# writer, held (not a mock of torch.distributed.checkpoint); it says when it holds.
HELD_WRITE = """
import os, sys, time
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from minitron import checkpoint
from minitron.common import run_cli
from minitron.distill import main

class HeldWriter(HuggingFaceStorageWriter):
    def write_data(self, plan, planner):
        if str(self.path).endswith("-checkpoint-4"):
            open(os.environ["HELD_MARKER"], "w").close()
            time.sleep(600)
        return super().write_data(plan, planner)

checkpoint._writer = lambda tmp: HeldWriter(str(tmp), save_distributed=True)
run_cli(main)
"""


def test_run_killed_during_a_background_checkpoint_write_resumes_from_the_previous_one(world,
                                                                                       tmp_path):
    """distill.async_checkpoint: a run SIGKILLed while step 4's checkpoint is being written keeps
    step 2's (committed before step 4's write began); the rerun removes the half-written folder,
    resumes from step 2 and ends with the weights of an uninterrupted synchronous run."""
    args = ["--teacher", str(world["teacher_dir"]), "--student", str(world["student_dir"]),
            "--source", str(world["data"]), "--block-size", str(BLOCK), "--batch-size", "4",
            "distill.eval_blocks=4", "--no-progress", "--tokens", str(8 * 4 * BLOCK),
            "--checkpoint-every", "2", "--eval-every", "5", "--alpha", "0.1"]
    out, marker = tmp_path / "killed", tmp_path / "held"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HELD_MARKER": str(marker)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, "-c", HELD_WRITE, *args, "--async-checkpoint",
                             "--output", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert marker.exists(), err[-3000:]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert (out / ".tmp-checkpoint-4").is_dir()  # the write in flight when the run was killed

    main(args + ["--async-checkpoint", "--output", str(out)])
    assert not list(out.glob(".tmp-*"))
    main(args + ["--output", str(tmp_path / "straight")])
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
