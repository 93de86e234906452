"""Held-out scores of a causal LM from its final hidden states: next-token cross-entropy
(perplexity), and with a teacher the per-token KL and top-1 agreement, `EVAL_CHUNK_TOKENS` rows of
logits at a time (never [B, T, V]). Evaluation, importance's LM-loss scores, distillation's
evaluation and the search all score through here."""

from __future__ import annotations

import math

import torch

from minitron.data import batches

@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Token-weighted mean next-token loss over `blocks` [n, L] and its exp (perplexity), from the
    final hidden states, `EVAL_CHUNK_TOKENS` rows of logits at a time (never [B, T, V])."""
    return held_out(model, None, blocks, batch_size)


@torch.no_grad()
def held_out(student, teacher, blocks: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """`perplexity`'s record, and `teacher_agreement`'s with a teacher, from one pass."""
    device = next(student.parameters()).device
    sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=device)
    for batch in batches(blocks, batch_size):
        sums += batch_metric_sums(student, teacher, batch.to(device))
    m = metrics_from_sums(sums, with_teacher=teacher is not None)
    out = {"loss": m["eval_loss"], "perplexity": m["eval_perplexity"],
           "tokens": int(sums[1].item())}
    if teacher is not None:
        out.update(top1_agreement=m["top1_agreement"], kl_to_teacher=m["kl_to_teacher"])
    return out


@torch.no_grad()
def teacher_agreement(student, teacher, blocks: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Top-1 agreement and mean per-token KL(teacher || student) over the shared vocabulary, from
    both models' hidden states in logit chunks (never [B, T, V])."""
    r = held_out(student, teacher, blocks, batch_size)
    return {"top1_agreement": r["top1_agreement"], "kl_to_teacher": r["kl_to_teacher"]}


# Tokens per chunk of logits in the hidden-state evaluation: a chunk's fp32 [C, V] temporaries are
# C * V * 4 bytes each (268 MB at C = 512, V = 128256), whatever the batch and sequence length.
EVAL_CHUNK_TOKENS = 512
# What `metric_sums` adds up, in this order (float64, so sums over many batches stay exact enough).
SUM_FIELDS = ("ce_sum", "ce_count", "kl_sum", "agree", "tokens")


def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The final (normed) hidden states [B, T, H] that the LM head reads, without the head."""
    return model.get_decoder()(ids, use_cache=False).last_hidden_state


@torch.no_grad()
def metric_sums(s_hidden: torch.Tensor, s_head: torch.Tensor, ids: torch.Tensor,
                t_hidden: torch.Tensor | None = None, t_head: torch.Tensor | None = None,
                chunk_tokens: int | None = None, s_softcap: float | None = None,
                t_softcap: float | None = None) -> torch.Tensor:
    """Evaluation sums of one batch from hidden states, `chunk_tokens` tokens of logits at a time.

    s_hidden [B, T, H_s] and s_head [V, H_s] (the student), ids [B, T]; optionally the teacher's
    t_hidden [B, T, H_t] and t_head [V_t, H_t]. Returns float64 [5] (`SUM_FIELDS`): next-token
    cross-entropy summed over the B * (T - 1) positions that have a next token, that count, the
    per-token KL(teacher || student) summed over all B * T positions (the softmax-KL kernel), the
    positions where both argmaxes agree, and B * T. The full [B, T, V] logits never exist: the peak
    is a few [chunk_tokens, V] temporaries. Logits are computed as in the fused training loss:
    in autocast's dtype when autocast is on, else the hidden states' (`compute_dtype_for`).
    `s_softcap` / `t_softcap`: a family's final-logit soft-cap (Gemma 2), applied per chunk as the
    model's own head would.
    """
    from minitron.kernels import softmax_kl
    from minitron.kernels.fused_linear import compute_dtype_for

    chunk_tokens = chunk_tokens or EVAL_CHUNK_TOKENS
    b, t = ids.shape
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels = labels.reshape(-1).to(s_hidden.device)
    dtype = compute_dtype_for(s_hidden)
    hs = s_hidden.reshape(b * t, -1)
    ht = t_hidden.reshape(b * t, -1) if t_hidden is not None else None
    sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=hs.device)
    with torch.autocast(hs.device.type, enabled=False):
        ws = s_head.to(dtype)
        wt = t_head.to(device=hs.device, dtype=dtype) if t_head is not None else None
        for start in range(0, b * t, chunk_tokens):
            sl = slice(start, min(start + chunk_tokens, b * t))
            s = _softcap(hs[sl].to(dtype) @ ws.T, s_softcap)  # [C, V]
            lab = labels[sl]
            keep = lab != -100
            picked = s.gather(-1, torch.where(keep, lab, 0)[:, None]).squeeze(-1).float()
            ce = torch.logsumexp(s.float(), dim=-1) - picked
            sums[0] += torch.where(keep, ce, 0.0).sum()
            sums[1] += keep.sum()
            sums[4] += sl.stop - sl.start
            if ht is not None:
                tc = _softcap(ht[sl].to(device=hs.device, dtype=dtype) @ wt.T, t_softcap)  # [C, V_t]
                v = min(s.shape[-1], tc.shape[-1])
                sums[2] += softmax_kl(s, tc, reduction="sum")
                sums[3] += (s[:, :v].argmax(-1) == tc[:, :v].argmax(-1)).sum()
    return sums


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


@torch.no_grad()
def batch_metric_sums(student, teacher, ids: torch.Tensor) -> torch.Tensor:
    """`metric_sums` of one batch of token ids through the student (and the teacher, if any)."""
    from minitron.models import logit_softcap

    s_hidden = final_hidden(student, ids)
    s_cap = logit_softcap(student.config)
    if teacher is None:
        return metric_sums(s_hidden, student.get_output_embeddings().weight, ids, s_softcap=s_cap)
    t_dev = next(teacher.parameters()).device
    t_hidden = final_hidden(teacher, ids.to(t_dev)).to(s_hidden.device)
    return metric_sums(s_hidden, student.get_output_embeddings().weight, ids, t_hidden,
                       teacher.get_output_embeddings().weight, s_softcap=s_cap,
                       t_softcap=logit_softcap(teacher.config))


def metrics_from_sums(sums: torch.Tensor, with_teacher: bool) -> dict[str, float]:
    """The eval record from `metric_sums` (added over batches and ranks)."""
    d = dict(zip(SUM_FIELDS, sums.tolist()))
    loss = d["ce_sum"] / max(d["ce_count"], 1)
    out = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
    if with_teacher:
        out["top1_agreement"] = d["agree"] / max(d["tokens"], 1)
        out["kl_to_teacher"] = d["kl_sum"] / max(d["tokens"], 1)
    return out
