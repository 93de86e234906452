"""The teacher cache: the sparse KL against float64 references, the cache's content against the
teacher's own float64 log-softmax, refusals, resume, and distillation from the cache vs online.

The margin for a small k: the cached loss is the KL between the (k+1)-bucket coarsenings of teacher
and student, so it never exceeds the full KL (data processing inequality); on the trained tiny
teacher below, k = 8 of 384 keeps it within 25% of the full KL, and distillation from it lowers the
full KL about as much as online distillation does.
"""

import copy
import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from minitron.common import MinitronError
from minitron.config import CacheConfig, DataConfig, DistillConfig
from minitron.data import load_blocks
from minitron.distill import distill
from minitron.kernels.sparse_kl import fused_linear_sparse_kl, sparse_kl
from minitron import teacher_cache as tc
from tiny import VOCAB, make_tiny_model, tiny_tokenizer

BLOCK = 32
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _torch_loss_on_cpu(monkeypatch):
    # The online loss takes its torch reference on CPU (the Triton interpreter costs seconds a step).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _corpus(path: Path, names: list[str]) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((stdlib / n).read_text() for n in names)
    pieces = [text[i:i + 2500] for i in range(0, len(text), 2500)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in pieces))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny teacher trained briefly on stdlib text (so that its distribution is peaked, as a real
    LM's is), a smaller student, and the data as a .jsonl source."""
    root = tmp_path_factory.mktemp("cache")
    tok = tiny_tokenizer()
    data = _corpus(root / "corpus.jsonl", ["json/decoder.py", "json/encoder.py", "textwrap.py",
                                           "string.py", "shlex.py", "fnmatch.py", "glob.py",
                                           "bisect.py", "heapq.py", "calendar.py", "csv.py"])
    train = load_blocks(tok, "train", 96, source=str(data), block_size=BLOCK)
    evalb = load_blocks(tok, "eval", 8, source=str(data), block_size=BLOCK)
    teacher = make_tiny_model("llama", seed=0)
    teacher.train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        ids = train[torch.randint(len(train), (16,), generator=gen)]
        teacher(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    teacher.eval()
    teacher_dir = root / "teacher"
    teacher.save_pretrained(teacher_dir, safe_serialization=True)
    tok.save_pretrained(teacher_dir)
    student = make_tiny_model("llama", seed=1, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=2)
    return {"root": root, "tok": tok, "data": data, "train": train, "eval": evalb,
            "teacher": teacher, "teacher_dir": teacher_dir, "student": student}


def _build(world, out, **kw) -> dict:
    cfg = CacheConfig(**{"tokens": len(world["train"]) * BLOCK, "block_size": BLOCK,
                         "batch_size": 16, "progress": False, **kw})
    return tc.build_cache(world["teacher_dir"], out, cfg, data=DataConfig(source=str(world["data"])))


@pytest.fixture(scope="module")
def full_cache(world):
    """k = V, float32 storage: the exact teacher (the storage dtype aside)."""
    out = world["root"] / "cache_full"
    _build(world, out, k=VOCAB, dtype="float32")
    return out


@pytest.fixture(scope="module")
def small_cache(world):
    """k = 8 of 384, float16: the default kind of cache, built through the command."""
    out = world["root"] / "cache_k8"
    tc.main(["build", "--model", str(world["teacher_dir"]), "--data", str(world["data"]),
             "--output", str(out), "teacher_cache.k=8", f"teacher_cache.tokens={96 * BLOCK}",
             f"--block-size={BLOCK}", "--batch-size", "16", "teacher_cache.shard_tokens=768",
             "--no-progress"])
    return out


# ----------------------------------------------------------------------------- the loss
def _reference_bucket_kl(s, t_logp, idx, mask=None):
    """float64, autograd, one plain formula: KL between the (k+1)-bucket coarsenings (kept tokens
    + one tail bucket of 1 - sum kept) of the teacher log-probs `t_logp` [N, V] and softmax(s)."""
    lq = s.log_softmax(-1)
    lp_k, lq_k = t_logp.gather(1, idx), lq.gather(1, idx)
    p_tail = (1 - lp_k.exp().sum(-1)).clamp_min(0)
    q_tail = 1 - lq_k.exp().sum(-1)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log()
                                             - q_tail.clamp_min(1e-300).log()), 0.0)
    per = (lp_k.exp() * (lp_k - lq_k)).sum(-1) + tail
    return per.mean() if mask is None else (per * mask).sum() / mask.sum()


def _teacher_sparse(t_logp, k):
    top = t_logp.topk(k, dim=-1)
    tail = t_logp.scatter(1, top.indices, -math.inf).logsumexp(-1)
    return top.values.float(), top.indices.int(), tail.float()


@pytest.mark.parametrize("k", [251, 8])
def test_sparse_kl_loss_and_gradient_match_float64(k):
    """k = V: the full forward KL (the reference is then the plain full-vocabulary formula);
    k = 8: the bucketed KL, whose gradient is derived in closed form in sparse_kl.py."""
    torch.manual_seed(0)
    n, v = 40, 251
    s = torch.randn(n, v, dtype=torch.float64) * 2
    t_logp = (torch.randn(n, v, dtype=torch.float64) * 3).log_softmax(-1)
    mask = torch.rand(n) > 0.3
    s32 = s.float().requires_grad_()
    loss = sparse_kl(s32, *_teacher_sparse(t_logp, k), mask=mask)
    loss.backward()
    s64 = s.clone().requires_grad_()
    if k == v:
        lq = s64.log_softmax(-1)
        ref = ((t_logp.exp() * (t_logp - lq)).sum(-1) * mask).sum() / mask.sum()
    else:
        ref = _reference_bucket_kl(s64, t_logp, t_logp.topk(k, -1).indices, mask)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    assert (s32.grad.double() - s64.grad).abs().max().item() < 1e-5
    assert s32.grad[~mask].abs().max().item() == 0.0


def test_sparse_kl_with_k_equal_v_equals_the_online_kernel_with_ce():
    """The cached form with k = V against the online loss (`softmax_kl`, the torch path it takes on
    CPU), both with the data's cross-entropy mixed in: loss and student-logit gradient."""
    from minitron.kernels import softmax_kl

    torch.manual_seed(1)
    n, v = 48, 384
    s = torch.randn(n, v) * 2
    t = torch.randn(n, v) * 3
    labels = torch.randint(v, (n,))
    labels[::7] = -100
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    online = softmax_kl(a, t, labels=labels, ce_weight=0.25, backend="torch")
    cached = sparse_kl(b, *_teacher_sparse(t.double().log_softmax(-1), v), labels=labels,
                       ce_weight=0.25)
    (online * 3).backward()
    (cached * 3).backward()  # grad_output != 1
    assert cached.item() == pytest.approx(online.item(), abs=1e-5)
    assert (a.grad - b.grad).abs().max().item() < 1e-5


def test_fused_linear_form_gradients_match_float64():
    """From hidden states and the LM head in chunks: loss and gradients with respect to both."""
    torch.manual_seed(2)
    n, h, v, k = 37, 24, 199, 16
    hid = torch.randn(n, h, dtype=torch.float64)
    w = torch.randn(v, h, dtype=torch.float64) * 0.3
    t_logp = (torch.randn(n, v, dtype=torch.float64) * 3).log_softmax(-1)
    h32, w32 = hid.float().requires_grad_(), w.float().requires_grad_()
    loss = fused_linear_sparse_kl(h32, w32, *_teacher_sparse(t_logp, k), chunk_size=10)
    loss.backward()
    h64, w64 = hid.clone().requires_grad_(), w.clone().requires_grad_()
    _reference_bucket_kl(h64 @ w64.T, t_logp, t_logp.topk(k, -1).indices).backward()
    ref = _reference_bucket_kl(hid @ w.T, t_logp, t_logp.topk(k, -1).indices)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    assert (h32.grad.double() - h64.grad).abs().max().item() < 1e-5
    assert (w32.grad.double() - w64.grad).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- the cache's content
def test_cache_holds_the_teachers_top_k_and_tail(world, full_cache, small_cache):
    cache_v, cache_8 = tc.open_cache(full_cache), tc.open_cache(small_cache)
    rows = torch.tensor([0, 5, 95, 30])
    ids = world["train"][rows]
    with torch.no_grad():
        ref = world["teacher"](ids).logits.double().log_softmax(-1)  # [4, T, V]
    full = cache_v.targets(rows)
    assert torch.equal(full.ids, ids)
    got = torch.full_like(ref, -math.inf).scatter_(-1, full.top_idx.long(), full.top_logp.double())
    assert (got - ref).abs().max().item() < 1e-5  # every entry, each index once
    assert torch.isneginf(full.log_tail).all()
    small = cache_8.targets(rows)
    assert small.top_logp.dtype == torch.float16 and small.top_idx.dtype == torch.int32
    want = ref.topk(8, -1)
    assert torch.equal(small.top_idx.long(), want.indices)
    assert (small.top_logp.double() - want.values).abs().max().item() < 1e-2  # fp16 rounding
    tail = torch.log1p(-want.values.exp().sum(-1))
    assert (small.log_tail.double() - tail).abs().max().item() < 1e-4
    m = json.loads((small_cache / "manifest.json").read_text())
    assert m["num_blocks"] == 96 and len(m["shards"]) == 4 and m["k"] == 8
    assert m["teacher"]["hash"] == tc.teacher_hash(world["teacher_dir"])
    assert m["data"]["fingerprint"] == tc.data_identity(world["train"])["fingerprint"]


def test_evaluate_from_cache_matches_the_teacher_in_float64(world, full_cache):
    """With k = V the cached held-out metrics are the online ones: KL, top-1 agreement, CE."""
    rows = torch.arange(0, 96, 8)
    got = tc.evaluate_from_cache(world["student"], tc.open_cache(full_cache), rows, batch_size=5,
                                 chunk_tokens=100)
    ids = world["train"][rows]
    with torch.no_grad():
        s = world["student"](ids).logits.double().log_softmax(-1)
        t = world["teacher"](ids).logits.double().log_softmax(-1)
    assert got["kl_to_teacher_topk"] == pytest.approx((t.exp() * (t - s)).sum(-1).mean().item(),
                                                      abs=1e-5)
    assert got["top1_agreement"] == (s.argmax(-1) == t.argmax(-1)).double().mean().item()
    ce = -s[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
    assert got["eval_loss"] == pytest.approx(ce, abs=1e-5)


def test_small_k_is_within_the_stated_margin(world, small_cache):
    """Bucketed KL <= full KL (never more), and within 25% of it on the trained teacher."""
    cache = tc.open_cache(small_cache)
    rows = torch.arange(0, 96, 6)
    ids = world["train"][rows]
    with torch.no_grad():
        s = world["student"](ids).logits
        t = world["teacher"](ids).logits.double().log_softmax(-1)
    full = (t.exp() * (t - s.double().log_softmax(-1))).sum(-1).mean().item()
    c = cache.targets(rows)
    sparse = sparse_kl(s, c.top_logp, c.top_idx, c.log_tail).item()
    assert sparse <= full + 1e-4 and sparse >= 0.75 * full, (sparse, full)


# ----------------------------------------------------------------------------- distillation
def _cfg(**kw) -> DistillConfig:
    base = dict(tokens=12 * 8 * BLOCK, batch_size=8, block_size=BLOCK, lr=5e-3, warmup_fraction=0.1,
                checkpoint_every=100, eval_every=100, eval_blocks=8, progress=False, seed=0)
    base.update(kw)
    return DistillConfig(**base)


def _losses(run: Path) -> list[float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


def _naive_kl(student, teacher, blocks) -> float:
    with torch.no_grad():
        s = student(blocks).logits.double().log_softmax(-1)
        t = teacher(blocks).logits.double().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


@pytest.mark.parametrize("loss_impl", ["logits", "fused"])
def test_distill_from_full_cache_equals_online(world, full_cache, tmp_path, loss_impl):
    """k = V in float32: the same losses step after step as running the teacher (the teacher is
    not loaded: None is passed), in the logits form and the chunked hidden-state form."""
    steps = 3
    online_student = copy.deepcopy(world["student"])
    distill(copy.deepcopy(world["teacher"]), online_student, world["train"], world["eval"],
            _cfg(tokens=steps * 8 * BLOCK, loss_impl=loss_impl), tmp_path / "online")
    cached_student = copy.deepcopy(world["student"])
    m = distill(None, cached_student, world["train"], world["eval"],
                _cfg(tokens=steps * 8 * BLOCK, loss_impl=loss_impl,
                     teacher_cache=str(full_cache)), tmp_path / "cached")
    a, b = _losses(tmp_path / "online"), _losses(tmp_path / "cached")
    assert len(a) == len(b) == steps
    assert all(abs(x - y) < 1e-5 for x, y in zip(a, b)), (a, b)
    for p, q in zip(online_student.parameters(), cached_student.parameters()):
        assert (p - q).abs().max().item() < 1e-4
    assert m["teacher_cache"]["k"] == VOCAB and "kl_to_teacher" not in m


def test_distill_from_small_cache_lowers_kl_like_online(world, small_cache, tmp_path):
    cfg = dict(tokens=24 * 8 * BLOCK)
    before = _naive_kl(world["student"], world["teacher"], world["eval"])
    online = copy.deepcopy(world["student"])
    distill(copy.deepcopy(world["teacher"]), online, world["train"], world["eval"], _cfg(**cfg),
            tmp_path / "online")
    cached = copy.deepcopy(world["student"])
    distill(None, cached, world["train"], world["eval"],
            _cfg(**cfg, teacher_cache=str(small_cache)), tmp_path / "cached")
    after_online = _naive_kl(online, world["teacher"], world["eval"])
    after_cached = _naive_kl(cached, world["teacher"], world["eval"])
    assert after_online < 0.7 * before
    assert after_cached < 0.7 * before and after_cached < 1.15 * after_online, (
        before, after_online, after_cached)


# ----------------------------------------------------------------------------- refusals
def test_cache_refuses_other_data(world, small_cache, tmp_path):
    other = load_blocks(world["tok"], "train", 96, source=str(_corpus(
        tmp_path / "other.jsonl", ["difflib.py", "argparse.py", "pprint.py"])), block_size=BLOCK)
    want = json.loads((small_cache / "manifest.json").read_text())["data"]["fingerprint"]
    have = tc.data_identity(other[:96])["fingerprint"]
    with pytest.raises(MinitronError, match=rf"built from other data \(fingerprint {want}.*this "
                                            rf"run's training data \(fingerprint {have}"):
        distill(None, copy.deepcopy(world["student"]), other, world["eval"],
                _cfg(teacher_cache=str(small_cache)), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(MinitronError, match=r"holds blocks of 32 tokens; this run reads blocks of 16"):
        distill(None, copy.deepcopy(world["student"]), world["train"].reshape(-1, 16),
                world["eval"], _cfg(block_size=16, teacher_cache=str(small_cache)), tmp_path / "r2")


def test_cache_refuses_other_prepared_data_exit_2(world, tmp_path, capsys):
    """Keyed by a prepared folder's manifest fingerprint: another prepared corpus is refused by the
    distill command with exit code 2 and one line naming both fingerprints."""
    from minitron import distill as d
    from minitron.common import run_cli
    from minitron.shards import prepare

    fps = []
    for name, files in (("a", ["json/decoder.py", "textwrap.py", "string.py", "shlex.py"]),
                        ("b", ["difflib.py", "pprint.py", "bisect.py", "heapq.py"])):
        fps.append(prepare(str(_corpus(tmp_path / f"{name}.jsonl", files)), tmp_path / name,
                           world["tok"], workers=1, progress=False)["fingerprint"])
    cache = tmp_path / "cache"
    m = tc.build_cache(world["teacher_dir"], cache, CacheConfig(k=8, tokens=16 * BLOCK,
                       block_size=BLOCK, progress=False), data=DataConfig(source=str(tmp_path / "a")))
    assert m["data"] == {"kind": "prepared", "fingerprint": fps[0], "split": "train",
                         "block_size": BLOCK, "blocks": 16, "source": str(tmp_path / "a")}
    student = tmp_path / "student"
    world["student"].save_pretrained(student, safe_serialization=True)
    world["tok"].save_pretrained(student)
    argv = ["--student", str(student), "--output", str(tmp_path / "run"), "--source",
            str(tmp_path / "b"), f"distill.teacher_cache={cache}", "--tokens", str(8 * BLOCK),
            "--batch-size", "8", "--block-size", str(BLOCK), "--no-progress"]
    capsys.readouterr()  # the setup's own output
    with pytest.raises(SystemExit) as e:
        run_cli(d.main, argv)
    # transformers 5 draws a progress bar on stderr for every load ("Loading weights"): not ours
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("Loading weights")]
    assert e.value.code == 2 and len(err) == 1, err
    assert f"fingerprint {fps[0]}, prepared" in err[0] and f"fingerprint {fps[1]}, prepared" in err[0]
    assert not (tmp_path / "run").exists()


def test_an_eval_split_cache_scores_but_does_not_train(world, tmp_path):
    cache = tmp_path / "eval_cache"
    m = _build(world, cache, k=8, split="eval", tokens=8 * BLOCK)
    assert m["data"]["split"] == "eval" and m["num_blocks"] == 8
    opened = tc.open_cache(cache)
    got = tc.evaluate_from_cache(world["student"], opened)
    ids = world["eval"]  # the cache holds the eval split's blocks, and the metrics are theirs
    assert torch.equal(opened.targets(range(8)).ids, ids)
    with torch.no_grad():
        s = world["student"](ids).logits.double()
        t = world["teacher"](ids).logits.double()
    assert got["top1_agreement"] == (s.argmax(-1) == t.argmax(-1)).double().mean().item()
    ce = -s.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
    assert got["eval_loss"] == pytest.approx(ce, abs=1e-5)
    t, s = t.log_softmax(-1), s.log_softmax(-1)
    full_kl = (t.exp() * (t - s)).sum(-1).mean().item()  # the top-8 bucketed KL never exceeds it
    assert 0.5 * full_kl < got["kl_to_teacher_topk"] <= full_kl + 1e-3
    with pytest.raises(MinitronError, match=r"holds the 'eval' split; distillation trains on the "
                                            r"train split"):
        distill(None, copy.deepcopy(world["student"]), world["train"], world["eval"],
                _cfg(teacher_cache=str(cache)), tmp_path / "run")


def test_cache_refuses_another_teacher_through_the_command(world, small_cache, tmp_path):
    """The real command: exit code 2 and one line naming both teacher hashes."""
    student_dir, other = tmp_path / "student", tmp_path / "other_teacher"
    world["student"].save_pretrained(student_dir, safe_serialization=True)
    world["tok"].save_pretrained(student_dir)
    make_tiny_model("llama", path=other, seed=5)
    world["tok"].save_pretrained(other)
    cmd = [sys.executable, "-m", "minitron.distill", "--teacher", str(other), "--student",
           str(student_dir), "--output", str(tmp_path / "run"), "--source", str(world["data"]),
           f"distill.teacher_cache={small_cache}", "--tokens", str(8 * BLOCK), "--batch-size",
           "8", "--block-size", str(BLOCK), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    want, have = tc.teacher_hash(world["teacher_dir"]), tc.teacher_hash(other)
    assert r.returncode == 2, r.stderr
    assert f"(hash {want})" in r.stderr and f"hashes to {have}" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, message", [
    ({"temperature": 2.0}, r"distill.temperature=2.0 cannot be used with distill.teacher_cache"),
    ({"divergence": "jsd"}, r"distill.divergence='jsd' cannot be used with"),
    ({"intermediate": ((1, 1),)}, r"distill.intermediate=\(\(1, 1\),\) cannot be used with"),
])
def test_settings_a_cache_cannot_serve_are_refused(setting, message):
    with pytest.raises(MinitronError, match=message):
        _cfg(teacher_cache="somewhere", **setting)


def test_build_refuses_a_folder_holding_another_cache(world, small_cache):
    with pytest.raises(MinitronError, match=r"holds another teacher cache"):
        _build(world, small_cache, k=16)


# ----------------------------------------------------------------------------- resume
def test_interrupted_build_resumes_skipping_finished_shards_byte_identical(world, tmp_path,
                                                                           small_cache,
                                                                           monkeypatch):
    out = tmp_path / "cache"
    real = tc._write_shard
    written = []

    def interrupted(out_, index, *args):
        if index == 2:
            (out_ / ".tmp-shard-00002-stale").mkdir()  # what a kill mid-shard leaves
            raise KeyboardInterrupt
        written.append(index)
        return real(out_, index, *args)

    monkeypatch.setattr(tc, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _build(world, out, k=8, shard_tokens=24 * BLOCK)
    assert written == [0, 1] and not (out / "manifest.json").exists()
    written.clear()
    monkeypatch.setattr(tc, "_write_shard", lambda out_, index, *a: (written.append(index),
                                                                     real(out_, index, *a)))
    m = _build(world, out, k=8, shard_tokens=24 * BLOCK)
    assert written == [2, 3] and m["stats"]["tokens_reused"] == 48 * BLOCK
    assert not list(out.glob(".tmp-*"))
    files = sorted(p.relative_to(small_cache) for p in small_cache.rglob("*.bin"))
    assert files == sorted(p.relative_to(out) for p in out.rglob("*.bin")) and len(files) == 16
    assert all((small_cache / f).read_bytes() == (out / f).read_bytes() for f in files)
    written.clear()
    monkeypatch.setattr("minitron.models.load_model", lambda *a, **k: pytest.fail("loaded"))
    _build(world, out, k=8, shard_tokens=24 * BLOCK)  # finished: no model loaded, nothing computed
    assert written == []


def test_memory_plan_counts_no_teacher_weights_with_a_cache():
    from minitron.memory_plan import plan_distill
    from tiny import tiny_config

    t, s = tiny_config(), tiny_config(hidden_size=32)
    online = plan_distill(t, s, _cfg(), 1, "float32", "ddp")
    cached = plan_distill(t, s, _cfg(teacher_cache="c"), 1, "float32", "ddp")
    assert online.terms["teacher weights"] > 0 and cached.terms["teacher weights"] == 0


def test_fsdp_on_two_processes_from_the_cache_matches_one_process(world, small_cache, tmp_path):
    """The real command on 2 gloo ranks (FSDP2, the fused hidden-state form, CE mixed in): each rank
    reads its share of every batch from the cache by row, and the result is the one-process run's."""
    from safetensors.torch import load_file

    student = tmp_path / "student"
    world["student"].save_pretrained(student, safe_serialization=True)
    world["tok"].save_pretrained(student)
    common = [sys.executable, "-m", "minitron.distill", "--student", str(student), "--source",
              str(world["data"]), f"distill.teacher_cache={small_cache}", "--tokens",
              str(4 * 8 * BLOCK), "--batch-size", "8", "--block-size", str(BLOCK), "--lr", "5e-3",
              "--alpha", "0.2", "--loss-impl", "fused", "--eval-blocks", "4", "--no-progress",
              "--device", "cpu"]
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    outs = {}
    for name, extra in (("one", []), ("fsdp", ["--nproc-per-node", "2", "--strategy", "fsdp"])):
        outs[name] = tmp_path / name
        r = subprocess.run([*common, "--output", str(outs[name]), *extra], capture_output=True,
                           text=True, env=env, cwd=ROOT, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    a, b = _losses(outs["one"]), _losses(outs["fsdp"])
    assert len(a) == 4 and all(abs(x - y) < 1e-4 * abs(x) + 1e-5 for x, y in zip(a, b)), (a, b)
    wa, wb = (load_file(o / "model.safetensors") for o in (outs["one"], outs["fsdp"]))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=k)
    m = json.loads((outs["fsdp"] / "minitron.json").read_text())["distillation"]["metrics"]
    assert m["processes"] == {"world_size": 2, "strategy": "fsdp"} and m["teacher_cache"]["k"] == 8


def test_a_read_over_more_shards_than_the_open_file_limit(world, tmp_path):
    """48 one-block shards (192 files) read whole under an open-file limit of 64 (the reader kept
    4 memory maps per shard it touched): the same arrays as an unlimited read."""
    out = tmp_path / "many"
    _build(world, out, k=8, tokens=48 * BLOCK, shard_tokens=BLOCK)
    cache = tc.open_cache(out)
    want = {name: cache.read(name, range(48)) for name in tc._FILES}
    assert len(cache._files) <= 64 and len(cache.manifest["shards"]) == 48
    code = (
        "import resource, sys, torch\n"
        "from minitron import teacher_cache as tc\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        f"c = tc.open_cache({str(out)!r})\n"
        "rows = list(range(48)) + list(range(47, -1, -3))\n"
        "torch.save({n: c.read(n, rows) for n in tc._FILES}, sys.argv[1])\n")
    got_file = tmp_path / "got.pt"
    proc = subprocess.run([sys.executable, "-c", code, str(got_file)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(got_file, weights_only=True)
    rows = list(range(48)) + list(range(47, -1, -3))
    for name in tc._FILES:
        assert torch.equal(got[name], want[name][rows]), name


def test_build_on_two_gloo_ranks_equals_one_process(world, small_cache, tmp_path):
    """torchrun with 2 CPU processes: each builds every other missing shard; the folder is the
    one-process build's, byte for byte (manifest plan and fingerprint too)."""
    out = tmp_path / "two"
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "-m", "minitron.teacher_cache", "build", "--model",
                        str(world["teacher_dir"]), "--data", str(world["data"]), "--output",
                        str(out), "teacher_cache.k=8", f"teacher_cache.tokens={96 * BLOCK}",
                        f"--block-size={BLOCK}", "--batch-size", "16",
                        "teacher_cache.shard_tokens=768", "--no-progress", "--device", "cpu"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.count("wrote ") == 1  # rank 0 reports
    one, two = (json.loads((p / "manifest.json").read_text()) for p in (small_cache, out))
    assert two["stats"]["processes"] == 2 and two["fingerprint"] == one["fingerprint"]
    assert {k: v for k, v in two.items() if k != "stats"} == {
        k: v for k, v in one.items() if k != "stats"}
    files = sorted(p.relative_to(small_cache) for p in small_cache.rglob("*.bin"))
    assert files == sorted(p.relative_to(out) for p in out.rglob("*.bin")) and len(files) == 16
    assert all((small_cache / f).read_bytes() == (out / f).read_bytes() for f in files)


def test_dry_run_prints_the_size_and_builds_nothing(world, tmp_path, capsys):
    out = tmp_path / "dry"
    assert tc.main(["build", "--model", str(world["teacher_dir"]), "--data", str(world["data"]),
                    "--output", str(out), "teacher_cache.tokens=94000000000", "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert tc.bytes_per_token(64, "float16") == 392 and tc.bytes_per_token(8, "float32") == 72
    assert "94,000,000,000 tokens x 392 bytes/token" in said and "36.848 TB" in said
    assert not out.exists()


def test_recipe_dry_run_shows_the_search_cache_size(tmp_path, capsys):
    from minitron.pipeline import dry_run
    from minitron.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "demo-search.yaml", [f"output_dir={tmp_path}"])
    info = dry_run(recipe)["teacher_cache"]
    tokens = 16384 // recipe.distill.tokens_per_step * recipe.distill.tokens_per_step
    b = tc.bytes_per_token(recipe.teacher_cache.k, recipe.teacher_cache.dtype)
    assert info == {"tokens": tokens, "bytes_per_token": b, "gb": round(tokens * b / 1e9, 3)}
    assert f"{tokens:,} tokens x {b} bytes/token" in capsys.readouterr().out
