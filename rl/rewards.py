"""Rewards, in one place. A frozen teacher scores only the real-text view of each rollout.

Modes (combined with weights from config):
  teacher_loglik  mean teacher log-prob of the rollout's generated text tokens (seed 004)
  teacher_kl      per text token, teacher log-prob minus policy log-prob (on-policy distillation; the
                  thoughts are free latent actions), averaged over text tokens
  gold_loglik     the policy's teacher-forced log-prob of the gold answer given the prompt and its own
                  thoughts (a dense reward for tasks; the teacher cannot read thoughts, so the policy does)
  exact_match     answer correctness, 1 or 0
  thinking_cost   minus `thinking_cost` per thought step (adaptive compute)

Every mode is laid out per step (S,) so that PPO can use token-wise rewards; per-step values sum to the
rollout's scalar reward, which GRPO/RLOO use. A non-finite reward is an error naming the rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from thinktok.models.teacher import Teacher
from thinktok.models.thoughts import Action, ThoughtMode

from .rollout import Rollout, recompute_logprobs

REWARD_MODES = ("teacher_loglik", "teacher_kl", "gold_loglik", "exact_match")


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"teacher_loglik": 1.0})
    thinking_cost: float = 0.0

    def validate(self) -> None:
        unknown = set(self.weights) - set(REWARD_MODES)
        if unknown:
            raise ValueError(f"unknown reward mode {sorted(unknown)[0]!r}: expected {', '.join(REWARD_MODES)}")
        if not self.weights and not self.thinking_cost:
            raise ValueError("rewards: give at least one weight")


@dataclass
class Rewards:
    per_step: list[torch.Tensor]  # (S_b,) per rollout
    total: torch.Tensor  # (B,) = per_step sums
    parts: dict[str, torch.Tensor]  # mode -> (B,) unweighted scalars, for logging


class RewardModel:
    """Plain object, no global state: it can live inside a Ray actor on whatever device its models sit."""

    def __init__(self, cfg: RewardConfig, teacher: Teacher | None = None, task=None, tokenizer=None,
                 policy=None, mode: ThoughtMode | None = None):
        cfg.validate()
        needs_teacher = {"teacher_loglik", "teacher_kl"} & set(cfg.weights)
        if needs_teacher and teacher is None:
            raise ValueError(f"reward {sorted(needs_teacher)[0]} needs a teacher")
        if {"gold_loglik", "exact_match"} & set(cfg.weights) and (task is None or tokenizer is None):
            raise ValueError("rewards gold_loglik and exact_match need the task and tokenizer")
        if "gold_loglik" in cfg.weights and (policy is None or mode is None):
            raise ValueError("reward gold_loglik needs the policy and its thought mode")
        self.cfg, self.teacher, self.task, self.tokenizer, self.policy, self.mode = cfg, teacher, task, tokenizer, policy, mode

    def score(self, rollouts: list[Rollout], rows: list[dict] | None = None) -> Rewards:
        """rows: the task rows the rollouts answer (for gold_loglik and exact_match)."""
        per_step = [torch.zeros(r.num_steps) for r in rollouts]
        parts: dict[str, torch.Tensor] = {}
        w = self.cfg.weights
        if "teacher_loglik" in w or "teacher_kl" in w:
            teacher_lp = self.teacher.token_logprobs([r.text_view for r in rollouts], [len(r.prompt_ids) for r in rollouts])
            for name in ("teacher_loglik", "teacher_kl"):
                if name in w:
                    steps = [self._spread(r, lp if name == "teacher_loglik" else lp - r.logprob[r.is_real])
                             for r, lp in zip(rollouts, teacher_lp)]
                    self._add(name, steps, per_step, parts)
        if "exact_match" in w:
            ok = [float(self.task.check(self.tokenizer.decode(r.real_ids, skip_special_tokens=True), row))
                  for r, row in zip(rollouts, rows)]
            self._add("exact_match", [self._at_end(r, v) for r, v in zip(rollouts, ok)], per_step, parts)
        if "gold_loglik" in w:
            gold = self.gold_loglik(rollouts, rows)
            self._add("gold_loglik", [self._at_end(r, v) for r, v in zip(rollouts, gold.tolist())], per_step, parts)
        if self.cfg.thinking_cost:
            steps = [-self.cfg.thinking_cost * (~r.is_real).float() for r in rollouts]
            self._add("thinking_cost", steps, per_step, parts, weight=1.0)
        return Rewards(per_step, torch.stack([s.sum() for s in per_step]), parts)

    def _add(self, name, steps, per_step, parts, weight=None):
        weight = self.cfg.weights[name] if weight is None else weight
        scalars = torch.stack([s.sum() for s in steps])
        bad = (~torch.isfinite(scalars)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"reward {name} is {scalars[i].item()} for rollout {i}; refusing to train on it")
        for acc, s in zip(per_step, steps):
            acc += weight * s
        parts[name] = scalars

    @staticmethod
    def _spread(r: Rollout, values: torch.Tensor) -> torch.Tensor:
        """Per text token values -> (S,) with each at its text step, divided by the text count (a mean)."""
        out = torch.zeros(r.num_steps)
        out[r.is_real] = values.float() / max(r.num_real, 1)
        return out

    @staticmethod
    def _at_end(r: Rollout, value: float) -> torch.Tensor:
        out = torch.zeros(r.num_steps)
        out[-1] = value
        return out

    @torch.no_grad()
    def gold_loglik(self, rollouts: list[Rollout], rows: list[dict]) -> torch.Tensor:
        """Mean log-prob of the gold answer's tokens after prompt + the rollout's opening thought steps,
        by the rollout engine's own recompute (the gold tokens as text actions)."""
        forced = []
        for r, row in zip(rollouts, rows):
            first_real = int(r.is_real.nonzero()[0]) if r.num_real else r.num_steps
            gold = torch.tensor(self.tokenizer(self.task.target(row, "answer")).input_ids)
            cut = lambda x: None if x is None else x[:first_real]  # noqa: E731
            pad = lambda x: None if x is None else torch.cat([x[:first_real], x.new_zeros(len(gold), *x.shape[1:])])  # noqa: E731
            forced.append(Rollout(
                prompt_ids=r.prompt_ids, real_size=r.real_size, mode=r.mode,
                action=torch.cat([cut(r.action), torch.full((len(gold),), int(Action.TEXT))]),
                token=torch.cat([cut(r.token), gold]), logprob=torch.zeros(first_real + len(gold)),
                vector=pad(r.vector), soft_ids=pad(r.soft_ids), soft_w=pad(r.soft_w)))
        lp = recompute_logprobs(self.policy, self.mode, forced).logprob
        return torch.stack([lp[i, r.num_steps - r.num_real : r.num_steps].mean() for i, r in enumerate(forced)]).cpu()
