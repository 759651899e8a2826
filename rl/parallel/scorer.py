"""Parallel thought rollouts (Quiet-STaR style): for a window of T real tokens, think L thinking tokens at
every position at once, then reward each position's thought by how much it raises the log-prob of the
next n true tokens. Every pass runs through GPT-2 with the fused parallel-thought kernel
(models/parallel_gpt2.py).

Layout of a scored window: the T real tokens, then per position t a segment of L + n - 1 tokens,
[thought_0 .. thought_{L-1}, x_{t+1} .. x_{t+n-1}] (the true continuation teacher-forced after the thought),
so the kernel's pattern (own segment causal + real prefix <= t) is exactly "think, then read on".
Prediction k (k = 0..n-1) of position t is of the token after real row t+k: post-thought from segment
index L-1+k, pre-thought (base) from real row t+k. It is valid while t+k+1 < T.

Targets ("scorer"): `policy` scores the true next token (Quiet-STaR, the policy's own head); `teacher` uses
the frozen teacher's next-token distribution over the real window (top-k, renormalised; the teacher reads
only real tokens, as everywhere): the gain is then in expected log-prob under the teacher's distribution.

  sample_parallel   incremental form (rollout.py): pass j feeds thought j-1 at all T positions against a cache
  score             thought log-probs (differentiable) and post/base target log-probs from one pass
  ParallelScorer    what the scoring actor runs: targets + per-position gains
  position_advantages  gain minus the mean over the G thoughts sampled at the same position (Quiet-STaR)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch

from thinktok.checkpoint import load_extra_state
from thinktok.errors import PoisonedStep, UserError
from thinktok.models.head import column_logits
from thinktok.models.parallel_gpt2 import MixingHead, parallel_hidden
from thinktok.models.teacher import Teacher
from thinktok.models.thoughts import ThoughtMode

from ..advantages import group_advantages
from .config import ParallelConfig
from .rollout import ParallelRollout, choosing_hidden, sample_parallel, task_windows, thought_logprobs


def true_targets(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy scorer: real row r predicts x_{r+1} with weight 1 (the last row's target is a placeholder)."""
    nxt = torch.cat([real[:, 1:], real[:, -1:]], dim=1)
    return nxt[..., None], torch.ones(*nxt.shape, 1, device=real.device)


@torch.no_grad()
def teacher_targets(teacher: Teacher, real: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher scorer: the teacher's top-k next-token distribution after each real row, renormalised.
    (R, T) -> ids (R, T, k), weights (R, T, k). The teacher reads the real window only."""
    if int(real.max()) >= teacher.vocab_size:
        raise UserError(f"window has ids >= the teacher's vocabulary ({teacher.vocab_size}): thoughts "
                         f"leaked into it")
    logits = teacher.model(input_ids=real.to(teacher.model.device)).logits.float()
    top = logits.topk(k, dim=-1)
    return top.indices.to(real.device), top.values.softmax(-1).to(real.device)


def valid_predictions(num_text: int, lookahead: int, device=None) -> torch.Tensor:
    """(T, n) bool: prediction k of position t exists iff its target x_{t+k+1} lies inside the window."""
    t = torch.arange(num_text, device=device)[:, None]
    k = torch.arange(lookahead, device=device)[None]
    return t + k + 1 < num_text


class Scored(NamedTuple):
    thought_logprob: torch.Tensor  # (R, T, L) log-prob of each sampled thought token
    thought_entropy: torch.Tensor  # (R, T, L) entropy of the distribution it was drawn from
    # (R, T, n) expected log-prob of the targets after the thought (mixed, with a head)
    post: torch.Tensor | None
    base: torch.Tensor | None  # (R, T, n) the same without the thought
    valid: torch.Tensor  # (T, n) which predictions exist
    post_raw: torch.Tensor | None = None  # (R, T, n) with a mixing head: the post-thought pass alone, unmixed

    @property
    def gain(self) -> torch.Tensor:
        """(R, T) summed over the n valid predictions: Quiet-STaR's reward."""
        return ((self.post - self.base) * self.valid).sum(-1)

    @property
    def gain_raw(self) -> torch.Tensor:
        """(R, T) the gain of the post-thought pass alone (= gain without a mixing head)."""
        post = self.post if self.post_raw is None else self.post_raw
        return ((post - self.base) * self.valid).sum(-1)

    def nll(self, base: bool = False) -> torch.Tensor:
        """Mean negative log-likelihood of the targets over valid predictions, after the thought (or
        without)."""
        lp = self.base if base else self.post
        return -(lp * self.valid).sum() / (self.valid.sum() * lp.shape[0]).clamp_min(1)


def score(model, mode: ThoughtMode, rollout: ParallelRollout, lookahead: int, head: MixingHead | None = None,
          post: bool = True, base: bool = True) -> Scored:
    """One teacher-forced pass over the scored layout through the kernel. Differentiable when grads are on.
    post/base: compute the target log-probs after/without the thoughts (each costs (R, T, V_text) head slabs;
    the learner needs no base, and no post when it trains without the NLL term)."""
    r, t, l = rollout.thoughts.shape
    n, seg, lo = lookahead, l + lookahead - 1, mode.vocab.text_size
    h = parallel_hidden(model, rollout.layout(n), t, seg)  # (R, N, H)
    h_text, h_seg = h[:, :t], h[:, t:].reshape(r, t, seg, -1)
    think = thought_logprobs(model, mode, choosing_hidden(h_text, h_seg, l))  # (R, T, L, N_think)
    thought_lp = think.gather(-1, (rollout.thoughts - lo)[..., None])[..., 0]
    entropy = -(think.exp() * think).sum(-1)
    valid = valid_predictions(t, n, h.device)
    if not (post or base):
        return Scored(thought_lp, entropy, None, None, valid)

    if rollout.target_ids is None:
        raise UserError("score needs targets: pass the rollout through ParallelScorer (or set "
                         "true_targets) first")
    ids, p = rollout.target_ids, rollout.target_p  # (R, T, K)
    rows = (torch.arange(t, device=h.device)[:, None] + torch.arange(n,
                                                                     device=h.device)[None]).clamp_max(t - 1)
    # (R, T, V_text)
    pre_logits = column_logits(model, h_text, 0, lo).float() if base or head is not None else None
    post_lp, base_lp, raw_lp = [], [], []
    if base:
        base_target = pre_logits.gather(-1, ids) - pre_logits.logsumexp(-1, keepdim=True)  # (R, T, K)
        base_lp = [(p[:, rows[:, k]] * base_target[:, rows[:, k]]).sum(-1) for k in range(n)]
    for k in range(n if post else 0):  # one (R, T, V) slab at a time: the text head is the memory peak
        logits = column_logits(model, h_seg[:, :, l - 1 + k], 0, lo).float()
        ids_k, p_k = ids[:, rows[:, k]], p[:, rows[:, k]]

        def expected(x, ids_k=ids_k, p_k=p_k):  # E_p[log softmax(x)] over the k target ids
            return (p_k * (x.gather(-1, ids_k) - x.logsumexp(-1, keepdim=True))).sum(-1)

        if head is not None:
            raw_lp.append(expected(logits).detach())
            pre = pre_logits[:, rows[:, k]]  # (R, T, V): real row t+k
            logits = pre + head(h_text[:, rows[:, k]], h_seg[:, :, l - 1 + k]).float() * (logits - pre)
        post_lp.append(expected(logits))

    def stack(xs):
        return torch.stack(xs, -1) if xs else None

    return Scored(thought_lp, entropy, stack(post_lp), stack(base_lp), valid, stack(raw_lp))


def position_advantages(gain: torch.Tensor, group: int, algo: str, positive_only: bool) -> torch.Tensor:
    """(R, T) gains, rows b*G .. b*G+G-1 sharing a window -> (R, T) advantages against the G thoughts at the
    same position (`group_advantages`, unscaled); the last position (never scored) gets 0."""
    adv = group_advantages(gain, group, algo, scale=False)
    adv = adv.clamp_min(0) if positive_only else adv
    adv[:, -1] = 0.0
    return adv


@dataclass
class ParallelScorer:
    """What the scoring actor holds: a policy copy (+ mixing head) and, for the teacher scorer, the
    teacher."""

    cfg: ParallelConfig
    model: torch.nn.Module
    mode: ThoughtMode
    head: MixingHead | None = None
    teacher: Teacher | None = None
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.cfg.scorer == "teacher" and self.teacher is None:
            raise UserError("parallel.scorer=teacher needs a teacher checkpoint (teacher=...)")
        if self.teacher is not None and self.teacher.vocab_size != self.mode.vocab.text_size:
            raise UserError(f"teacher vocabulary ({self.teacher.vocab_size}) != the policy's text "
                             f"vocabulary ({self.mode.vocab.text_size}): its targets would name other tokens")

    def targets(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.scorer == "teacher":
            return teacher_targets(self.teacher, real, self.cfg.teacher_top_k)
        return true_targets(real)

    @torch.no_grad()
    def __call__(self, rollout: ParallelRollout) -> ParallelRollout:
        ids, p = self.targets(rollout.text)
        rollout = replace(rollout, target_ids=ids, target_p=p)
        scored = score(self.model, self.mode, rollout, self.cfg.lookahead, self.head)
        gain = scored.gain.float()
        if not torch.isfinite(gain).all():
            bad = int((~torch.isfinite(gain)).any(1).nonzero()[0])
            raise PoisonedStep(f"parallel gain is not finite for window row {bad}; refusing to train on it")
        self.stats = {"nll_thought": scored.nll().item(), "nll_base": scored.nll(base=True).item(),
                      "gain_unmixed_mean": scored.gain_raw[:, :-1].mean().item()}
        return replace(rollout, gain=gain)


@torch.no_grad()
def evaluate_parallel(model, mode: ThoughtMode, cfg: ParallelConfig, windows: list[list[int]],
                      head: MixingHead | None = None, seed: int = 0, batch_size: int = 16) -> dict:
    """Sampled thoughts on held-out windows, scored against the true text: mean NLL of the next n tokens
    without and with the thought, and the mean gain per scored position."""
    scorer = ParallelScorer(replace(cfg, scorer="policy"), model, mode, head)
    was_training = model.training
    model.eval()
    gains, stats = [], []
    for lo in range(0, len(windows), batch_size):
        real = torch.tensor(windows[lo : lo + batch_size], device=model.device)
        scored = scorer(sample_parallel(model, mode, real, cfg.thought_len, seed + lo))
        gains.append(scored.gain[:, :-1].mean().item())
        stats.append(scorer.stats)
    model.train(was_training)

    def mean(xs):
        return sum(xs) / len(xs)

    # with a mixing head, gain_mean is the mixed prediction's; gain_unmixed_mean the post-thought pass alone's
    return {"gain_mean": mean(gains), **{k: mean([s[k] for s in stats]) for k in stats[0]},
            "num_windows": len(windows)}


def evaluate_parallel_checkpoint(ckpt: Path, policy, mode: ThoughtMode, cfg: ParallelConfig, task, split: str,
                                 batch_size: int, limit: int | None) -> dict:
    """`thinktok eval` of a parallel checkpoint: `evaluate_parallel` on the split's windows, with the
    checkpoint's mixing head when it has one."""
    head = MixingHead(policy.model.config.hidden_size).to(policy.model.device) if cfg.mixing_head else None
    load_extra_state(ckpt, {"mixing_head": head} if head is not None else {})
    windows = task_windows(task, split, cfg, policy.tokenizer)[:limit]
    start = time.perf_counter()
    out = evaluate_parallel(policy.model, mode, cfg, windows, head, batch_size=batch_size)
    return {**out, "thought_len": cfg.thought_len, "lookahead": cfg.lookahead,
            "mixing_head": head is not None,
            "wall_s": time.perf_counter() - start}
