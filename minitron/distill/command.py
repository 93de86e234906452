"""The stage on model folders (`run_distill`): the memory plan, the launch on several processes
(torchrun) and each rank's run; and `python -m minitron.distill`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from minitron import distributed
from minitron.common import MinitronError, check_writable, format_table
from minitron.config import (DataConfig, DistillConfig, ModelConfig, TeacherCorrectionConfig,
                             check_correction)
from minitron.distill.loop import LOGS
from minitron.distill.stage import _read_info, _source_dtype, distill

# The settings the command takes (minitron.cli); the models are --teacher and --student. The
# distill section comes first, so `--tokens` and `--lr` are its aliases (teacher_correction.tokens
# is set by name).
CLI_KEYS = {"distill": None, "teacher_correction": None,
            "model": ("dtype", "device", "trust_remote_code"),
            "data": ("source", "text_field")}


def run_distill(
    teacher_path: str | os.PathLike | None,
    student_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: DistillConfig,
    *,
    correction: TeacherCorrectionConfig | None = None,
    data: DataConfig | None = None,
    model: ModelConfig | None = None,
) -> dict[str, Any]:
    """From model paths to a finished output folder (resuming a run that is already there).

    `data` gives the source and text field (the blocks are distillation's own: `config.block_size`,
    `config.seed`); `model` the teacher's dtype and the student's device (the student trains in
    float32). Under torchrun it joins the process group and runs as one rank. Outside torchrun
    with `config.nproc_per_node` > 1 it starts `python -m minitron.distill` with the same settings
    on that many local processes and waits (so a recipe can ask for K processes).
    """
    from minitron.models import check_same_tokenizer, load_config

    correction = correction or TeacherCorrectionConfig()
    data, model = data or DataConfig(), model or ModelConfig()
    check_correction(config, correction)
    out = Path(output_dir)
    for name, path in (("--teacher", teacher_path), ("--student", student_path)):
        if path is not None and Path(str(path)).expanduser().resolve() == out.expanduser().resolve():
            raise MinitronError(f"--output {out} is the {name} folder itself; choose another --output")
    done = _read_info(out).get("distillation", {})
    if done.get("status") == "finished":
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"[minitron] {out} holds a finished run; not repeating it")
        return done["metrics"]
    if config.uses_teacher and teacher_path is None and not config.uses_cache:
        raise MinitronError("distillation needs --teacher or distill.teacher_cache; without a "
                            "teacher use distill.baseline=ce or distill.baseline=scratch")
    # Cheap checks on the folders, configs and tokenizers before any weights load.
    trust = model.trust_remote_code
    s_cfg = load_config(student_path, trust)
    t_cfg = load_config(teacher_path, trust) if teacher_path is not None else None
    if teacher_path is not None:
        check_same_tokenizer(teacher_path, student_path, trust)
    check_writable(out, "--output")
    max_pos = min(c.max_position_embeddings for c in (s_cfg, t_cfg) if c is not None)
    if config.block_size > max_pos:
        raise MinitronError(f"distill.block_size={config.block_size} is longer than the models' "
                            f"context ({max_pos} positions); choose block_size <= {max_pos}")
    world = int(os.environ.get("WORLD_SIZE", config.nproc_per_node * config.nnodes))
    memory_plan_(t_cfg, s_cfg, config, correction, world, model, show=False)
    sections = {"distill": config, "teacher_correction": correction, "data": data, "model": model}
    if not distributed.under_torchrun() and (config.nproc_per_node > 1 or config.nnodes > 1):
        return _launch(teacher_path, student_path, out, sections)
    if distributed.under_torchrun():  # a failing rank's traceback goes there (child_failure)
        os.environ.setdefault(distributed.LOG_DIR_ENV, str(out / LOGS))
    with distributed.process_group(model.device, config.process_group_timeout_s) as device:
        try:
            return _run_rank(teacher_path, student_path, out, sections, device, max_pos)
        except MinitronError as e:
            if distributed.world() == 1:
                raise
            distributed.record_for_torchrun(e)
            raise MinitronError(f"rank {distributed.rank()}: {e}") from None


def memory_plan_(teacher_cfg, student_cfg, config: DistillConfig,
                 correction: TeacherCorrectionConfig, world: int, model: ModelConfig,
                 show: bool = True):
    """The per-GPU memory plan (`minitron.memory_plan`), printed if `show`; refuses a plan over
    `config.gpu_memory_gib` or, on a GPU, the detected memory. Returns the plan."""
    from minitron import memory_plan
    from minitron.models import default_device

    dev = torch.device(model.device or default_device())
    gpu = (int(config.gpu_memory_gib * memory_plan.GIB) if config.gpu_memory_gib
           else memory_plan.detected_gpu_bytes() if dev.type == "cuda" else None)
    # nodes: the setting's, or what a torchrun started by hand spans
    n_nodes = max(config.nnodes, int(os.environ.get("WORLD_SIZE", 1))
                  // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1))
    strategy = distributed.strategy(config.strategy, torch.device("cuda" if gpu else dev.type),
                                    n_nodes)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", config.nproc_per_node))
    checkpointed = None
    if config.gradient_checkpointing is None:  # the plan chooses (`_checkpointed_layers`)
        checkpointed = memory_plan.choose_checkpointing(teacher_cfg or student_cfg, student_cfg,
                                                        config, world, model.dtype, strategy,
                                                        gpu, per_node)
    plan = memory_plan.plan_distill(teacher_cfg or student_cfg, student_cfg, config, world,
                                    model.dtype, strategy, correction_tokens=correction.tokens,
                                    per_node=per_node, checkpointed=checkpointed)
    if show:
        print(format_table(plan.rows()))
        if checkpointed is not None:
            layers = memory_plan.Shape.of(student_cfg).layers
            print(f"activation checkpointing (chosen by the plan): {checkpointed} of {layers} "
                  f"decoder layers")
        print(f"estimated peak per GPU: {plan.peak / memory_plan.GIB:.1f} GiB on {world} "
              f"process(es), {strategy}" + (f", of {gpu / memory_plan.GIB:.1f} GiB" if gpu else ""))
    memory_plan.check_fits(plan, gpu)
    return plan


def _launch(teacher_path, student_path, out: Path, sections: dict[str, Any]) -> dict[str, Any]:
    """Run this same distillation on `nproc_per_node` local processes (torch's elastic launcher);
    each receives the settings on its command line, as `section.key=value` arguments."""
    from minitron import cli

    config = sections["distill"]
    k = config.nproc_per_node
    dev = sections["model"].device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and k > torch.cuda.device_count():
        raise MinitronError(f"distill.nproc_per_node={k} but this node has "
                            f"{torch.cuda.device_count()} GPU(s); choose nproc_per_node <= "
                            f"{torch.cuda.device_count()}")
    argv = ["--student", str(student_path), "--output", str(out)]
    if teacher_path is not None:
        argv += ["--teacher", str(teacher_path)]
    distributed.launch_torchrun("minitron.distill", argv + cli.as_overrides(sections, CLI_KEYS), k,
                                config.nnodes, config.rdzv_endpoint,
                                f"minitron-{out.resolve().name}", config.max_restarts)
    return json.loads((out / "minitron.json").read_text())["distillation"]["metrics"]


def _run_rank(teacher_path, student_path, out: Path, sections: dict[str, Any], device: str,
              max_pos: int) -> dict[str, Any]:
    """One process's part of `run_distill` (all of it when there is one process)."""
    from minitron.data import block_rule
    from minitron.distill.schedule import run_blocks
    from minitron.models import load_model, resolve_model

    config, data, model = sections["distill"], sections["data"], sections["model"]
    teacher_device = config.teacher_device
    if distributed.dist_on() and teacher_device is not None and teacher_device.startswith("cuda"):
        teacher_device = device  # this rank's GPU
    teacher = None
    if teacher_path is not None and config.uses_cache:
        from minitron.teacher_cache import open_cache

        open_cache(config.teacher_cache).check_teacher(teacher_path)  # not loaded: the cache is it
    elif teacher_path is not None:
        teacher, _ = load_model(teacher_path, dtype=model.dtype, device=teacher_device or device,
                                trust_remote_code=model.trust_remote_code)
    # A teacher correction trains first: the student waits on the host until it is done.
    correction = sections["teacher_correction"]
    student, tokenizer = load_model(student_path, dtype="float32",
                                    device="cpu" if correction.tokens else device,
                                    trust_remote_code=model.trust_remote_code)
    train_blocks, eval_blocks = run_blocks(tokenizer, data, config, max_pos)
    info = _read_info(resolve_model(student_path, model.trust_remote_code))
    info = {"student_source": str(student_path),
            "student_dtype": _source_dtype(resolve_model(student_path, model.trust_remote_code)),
            "teacher": str(teacher_path) if teacher_path is not None else None,
            "data": {"source": data.source, "train_blocks": len(train_blocks),
                     "eval_blocks": len(eval_blocks), "block_size": config.block_size,
                     "blocks": block_rule(tokenizer)},
            "pruning": info or None}
    return distill(teacher, student, train_blocks, eval_blocks, config, out, tokenizer=tokenizer,
                   info=info, correction=correction, student_device=device)


# ----------------------------------------------------------------------------- CLI
def build_parser():
    import minitron.distill
    from minitron import cli

    p = cli.stage_parser("python -m minitron.distill",
                         minitron.distill.__doc__.splitlines()[0], CLI_KEYS)
    p.add_argument("--teacher", help="teacher model: folder, hub id or 'smollm2-135m' "
                                     "(needed unless a baseline; with a baseline, only for eval KL)")
    p.add_argument("--student", required=True, help="student model folder (e.g. a pruned model)")
    p.add_argument("--output", required=True, help="run folder; the final HF model is written here")
    p.add_argument("--dry-run", action="store_true",
                   help="print the per-GPU memory plan from the model configs and stop")
    return p


def main(argv: list[str] | None = None) -> int:
    from minitron import cli

    args = cli.parse(build_parser(), argv)
    c = cli.configs(args)
    config = c["distill"]
    if args.dry_run:
        from minitron.models import load_config

        trust = c["model"].trust_remote_code
        t_cfg = load_config(args.teacher, trust, need_weights=False) if args.teacher else None
        memory_plan_(t_cfg, load_config(args.student, trust, need_weights=False), config, c["teacher_correction"],
                     config.nproc_per_node * config.nnodes, c["model"])
        return 0
    result = run_distill(args.teacher, args.student, args.output, config,
                         correction=c["teacher_correction"], data=c["data"], model=c["model"])
    launched = config.nproc_per_node > 1 or config.nnodes > 1
    if int(os.environ.get("RANK", 0)) != 0 or (launched and not distributed.under_torchrun()):
        return 0  # the summary comes from rank 0 (which the launcher's torchrun already ran)
    rows = []
    if "teacher" in result:
        rows.append({"model": "teacher", **_ppl_row(result["teacher"])})
    if result.get("start"):
        rows.append({"model": "student before training", **_ppl_row(result["start"])})
    rows.append({"model": f"student after {result.get('train_tokens')} tokens", **_ppl_row(result)})
    print(format_table(rows))
    print(f"wrote {args.output} ({result.get('train_tokens_per_s')} student tokens/s in training)")
    return 0


def _ppl_row(m: dict[str, Any]) -> dict[str, Any]:
    return {"eval_loss": m.get("eval_loss"), "perplexity": m.get("eval_perplexity"),
            "kl_to_teacher": m.get("kl_to_teacher"), "top1_agreement": m.get("top1_agreement")}

