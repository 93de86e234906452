"""Teacher -> student distillation: the loop that gives a pruned model its quality back.

A frozen teacher (eval mode, no grad, its own dtype and device) teaches a trainable student with the
forward-KL kernel of `minitron.kernels` on the logits (the fused linear+KL form when the vocabulary
is large, so [N, V] logits never exist at once), optionally mixed with cross-entropy on the data
(`alpha`) and an intermediate-state loss between chosen layers. An optional first phase fine-tunes
the teacher with plain cross-entropy ("teacher correction"). Two baselines run in the same harness:
cross-entropy retraining of the pruned model (`baseline="ce"`) and the pruned shape trained from a
random initialization (`baseline="scratch"`).

Every run lives in one output folder: `checkpoint/` (latest; atomic), `metrics.jsonl`, `loss.png`
(those three: `minitron.checkpoint`), `distill_run.json` (the settings the run was started with)
and, at the end, the student as a plain Hugging Face checkpoint with `minitron.json`. Rerunning the
same command resumes from the checkpoint in the same data order; a finished run is not repeated.

`python -m minitron.distill --teacher T --student S --output DIR [distill.tokens=N]
 [distill.baseline=ce|scratch] ...` (`--help` lists every setting; `--tokens N` and the like are
aliases). Past one device the same command runs under torchrun (`distill.nproc_per_node=K` starts
the processes itself): FSDP2 or DDP splits the student, each rank reads a disjoint share of every
global batch, checkpoints are sharded and resume on any process count (`minitron.distributed`).

The modules, in the order they build on each other:
- `schedule`: micro-steps, the learning-rate factor, the data order (`batch_indices`);
- `losses`: the trainee, the KD / CE / intermediate losses, the student's evaluation;
- `loop`: the training loop with resume, the divergence guard and checkpoints;
- `stage`: `distill` and `teacher_correct_` on models in memory;
- `command`: `run_distill` on model folders (memory plan, launch, ranks) and the command line.
"""

from minitron.distill.command import CLI_KEYS, build_parser, main, memory_plan_, run_distill
from minitron.distill.loop import RESUMABLE_SETTINGS, to_device
from minitron.distill.losses import (LossSetup, evaluate_student, freeze_, intermediate_loss,
                                     make_projections, position_mask, reinitialize_)
from minitron.distill.schedule import batch_indices, blocks_fingerprint, lr_factor, micro_steps
from minitron.distill.stage import distill, teacher_correct_

__all__ = ["CLI_KEYS", "LossSetup", "RESUMABLE_SETTINGS", "batch_indices", "blocks_fingerprint",
           "build_parser", "distill", "evaluate_student", "freeze_", "intermediate_loss",
           "lr_factor", "main", "make_projections", "memory_plan_", "micro_steps",
           "position_mask", "reinitialize_", "run_distill", "teacher_correct_", "to_device"]
