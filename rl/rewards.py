"""Rewards, in one place. A frozen teacher scores only the real-text view of each rollout.

Text is always scored under plain distributions: log-softmax over the text columns at temperature 1,
without top-k/top-p, whatever the sampling settings (those shape exploration, not the objective).
x = prompt, y = the rollout's text tokens, z = its thought steps, y* = the gold answer's tokens,
q = the teacher, pi_text = the policy's text distribution renormalised over text tokens.

  teacher_loglik  (1/|y|) sum_t log q(y_t | x, c, y_<t)
                  c = what the teacher reads besides the prompt (teacher_context): nothing, the gold chain
                  of thought, or its own; never the student's thoughts
  teacher_kl      (1/|y|) sum_t [log q(y_t | x, c, y_<t) - log pi_text(y_t | x, y_<t, z_<t)]: minus the
                  per-token reverse KL(pi_text || q) estimated on the sample (on-policy distillation; the
                  thoughts are free latent actions the teacher never sees)
  gold_loglik     (1/|y*|) sum_t log pi_text(y*_t | x, z_open, y*_<t), y* = the gold answer then EOS,
                  z_open = the thought steps before the rollout's first text token (the policy scores,
                  since the teacher cannot read thoughts);
                  with pause_at=every (or slots_at=every) the opening block precedes every gold token
  thought_gain    gold_loglik minus the same without any thought step: what the opening thoughts add to the
                  gold answer (the subtracted term is constant within a prompt's group, so GRPO's advantage
                  equals gold_loglik's; the reward's value says whether thinking helps at all)
  exact_match     1 if the text's answer is right, else 0
  thinking_cost   -thinking_cost per thought step the policy chose (markers and pauses are not choices)

Credit: each reward names the steps whose actions it depends on (`Rewards.credit`); the learner's loss runs
over the union for the weighted terms. gold_loglik and thought_gain depend only on the opening thoughts and
the choice to stop them (the first text step, when it was chosen against a thought); every other term on every
action.

Every mode is laid out per step (S,) so that PPO can use token-wise rewards; per-step values sum to the
rollout's scalar reward, which GRPO/RLOO use. A non-finite reward is an error naming the rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from thinktok.errors import PoisonedStep, UserError
from thinktok.models.thoughts import Action, ThoughtMode

from .recompute import gold_answer_loglik, text_token_logprobs
from .rollout import ArraysWhenPickled, Rollout, opening_thoughts

if TYPE_CHECKING:  # the teacher module imports TRL: not for parsing a config
    from thinktok.models.teacher import Teacher

REWARD_MODES = ("teacher_loglik", "teacher_kl", "gold_loglik", "thought_gain", "exact_match")
# rewards that read the policy's text distribution
POLICY_REWARDS = ("teacher_kl", "gold_loglik", "thought_gain")
GOLD_REWARDS = ("gold_loglik", "thought_gain")  # depend only on the opening thoughts (and the choice to stop)


CONTEXTS = ("none", "gold_cot", "own_cot")


@dataclass
class RewardConfig:
    # reward term -> weight, summed (teacher_loglik | teacher_kl | gold_loglik | thought_gain | exact_match)
    weights: dict[str, float] = field(default_factory=lambda: {"teacher_loglik": 1.0})
    thinking_cost: float = 0.0  # subtracted per thought step the policy chose
    # what the teacher reads between the prompt and the student's text, so that it knows more than the student
    # in one pass: none | gold_cot (the task's gold chain of thought: privileged context) | own_cot (its own
    # greedy chain of thought up to the last " ;", the answer it would give dropped). A CoT-trained teacher
    # then scores an answer-only student's text as the answer after the reasoning.
    teacher_context: str = "none"
    teacher_think_tokens: int = 64  # own_cot: budget of the teacher's greedy chain of thought

    def validate(self) -> None:
        unknown = set(self.weights) - set(REWARD_MODES)
        if unknown:
            raise UserError(f"unknown reward mode {sorted(unknown)[0]!r}: expected "
                             f"{', '.join(REWARD_MODES)}")
        if self.teacher_context not in CONTEXTS:
            raise UserError(f"unknown rewards.teacher_context {self.teacher_context!r}: expected "
                             f"{', '.join(CONTEXTS)}")
        if not self.weights and not self.thinking_cost:
            raise UserError("rewards: give at least one weight")


@dataclass
class Rewards(ArraysWhenPickled):
    per_step: list[torch.Tensor]  # (S_b,) per rollout
    total: torch.Tensor  # (B,) = per_step sums
    parts: dict[str, torch.Tensor]  # mode -> (B,) unweighted scalars, for logging
    credit: list[torch.Tensor]  # (S_b,) bool per rollout: the steps whose actions the reward depends on


class RewardModel:
    """Plain object, no global state: it can live inside a Ray actor on whatever device its models sit."""

    def __init__(self, cfg: RewardConfig, teacher: Teacher | None = None, task=None, tokenizer=None,
                 policy=None, mode: ThoughtMode | None = None):
        cfg.validate()
        needs_teacher = {"teacher_loglik", "teacher_kl"} & set(cfg.weights)
        if needs_teacher and teacher is None:
            raise UserError(f"reward {sorted(needs_teacher)[0]} needs a teacher")
        if {"gold_loglik", "thought_gain",
            "exact_match"} & set(cfg.weights) and (task is None or tokenizer is None):
            raise UserError("rewards gold_loglik, thought_gain and exact_match need the task and tokenizer")
        if cfg.teacher_context != "none" and (task is None or tokenizer is None):
            raise UserError(f"rewards.teacher_context={cfg.teacher_context} needs the task and tokenizer")
        reads_policy = sorted(set(cfg.weights) & set(POLICY_REWARDS))
        if reads_policy and (policy is None or mode is None):
            raise UserError(f"reward {reads_policy[0]} needs the policy and its thought mode")
        self.cfg, self.teacher, self.task, self.tokenizer = cfg, teacher, task, tokenizer
        self.policy, self.mode = policy, mode

    def score(self, rollouts: list[Rollout], rows: list[dict] | None = None) -> Rewards:
        """rows: the task rows the rollouts answer (for gold_loglik and exact_match)."""
        per_step = [torch.zeros(r.num_steps) for r in rollouts]
        parts: dict[str, torch.Tensor] = {}
        w = self.cfg.weights
        if "teacher_loglik" in w or "teacher_kl" in w:
            context = self.teacher_context(rollouts, rows)
            views = [r.prompt_ids + c + r.text_ids for r, c in zip(rollouts, context)]
            teacher_lp = self.teacher.token_logprobs(
                views, [len(r.prompt_ids) + len(c) for r, c in zip(rollouts, context)])
            if "teacher_loglik" in w:
                self._add("teacher_loglik", [self._spread(r, lp) for r, lp in zip(rollouts, teacher_lp)],
                          per_step, parts)
            if "teacher_kl" in w:
                policy_lp = text_token_logprobs(self.policy, self.mode, rollouts)
                steps = [self._spread(r, q - p) for r, q, p in zip(rollouts, teacher_lp, policy_lp)]
                self._add("teacher_kl", steps, per_step, parts)
        if "exact_match" in w:
            ok = [float(self.task.check(self.tokenizer.decode(r.text_ids, skip_special_tokens=True), row))
                  for r, row in zip(rollouts, rows)]
            self._add("exact_match", [self._at_end(r, v) for r, v in zip(rollouts, ok)], per_step, parts)
        if "gold_loglik" in w or "thought_gain" in w:
            gold = self.gold_loglik(rollouts, rows)
        if "gold_loglik" in w:
            at_end = [self._at_end(r, v) for r, v in zip(rollouts, gold.tolist())]
            self._add("gold_loglik", at_end, per_step, parts)
        if "thought_gain" in w:
            gain = gold - self.gold_loglik(rollouts, rows, thoughts=False)
            self._add("thought_gain", [self._at_end(r, v) for r, v in zip(rollouts, gain.tolist())],
                      per_step, parts)
        if self.cfg.thinking_cost:
            steps = [-self.cfg.thinking_cost * r.is_chosen_thought.float() for r in rollouts]
            self._add("thinking_cost", steps, per_step, parts, weight=1.0)
        return Rewards(per_step, torch.stack([s.sum() for s in per_step]), parts, self.credit(rollouts))

    def teacher_context(self, rollouts: list[Rollout], rows: list[dict] | None) -> list[list[int]]:
        """Token ids the teacher reads between each rollout's prompt and its text
        (rewards.teacher_context)."""
        how = self.cfg.teacher_context
        if how == "gold_cot":
            return [self.tokenizer(self.task.reasoning(row)).input_ids for row in rows]
        if how == "own_cot":  # once per prompt: a group's G rollouts share it
            sep, eos = self.tokenizer(" ;").input_ids[-1], self.tokenizer.eos_token_id
            thought = {tuple(p): self.teacher.think(list(p), sep, self.cfg.teacher_think_tokens, eos)
                       for p in {tuple(r.prompt_ids) for r in rollouts}}
            return [thought[tuple(r.prompt_ids)] for r in rollouts]
        return [[] for _ in rollouts]

    def credit(self, rollouts: list[Rollout]) -> list[torch.Tensor]:
        """(S,) bool per rollout: the union over the weighted terms of the steps each depends on."""
        if set(self.cfg.weights) - set(GOLD_REWARDS) or self.cfg.thinking_cost:
            return [torch.ones(r.num_steps, dtype=torch.bool) for r in rollouts]
        out = []
        for r in rollouts:
            first = opening_thoughts(r)
            mask = torch.arange(r.num_steps) < first
            if first < r.num_steps and r.action[first] == Action.FREE:  # the choice to stop thinking
                mask[first] = True
            out.append(mask)
        return out

    def _add(self, name, steps, per_step, parts, weight=None):
        weight = self.cfg.weights[name] if weight is None else weight
        scalars = torch.stack([s.sum() for s in steps])
        bad = (~torch.isfinite(scalars)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise PoisonedStep(f"reward {name} is {scalars[i].item()} for rollout {i}; refusing to train on "
                               f"it")
        for acc, s in zip(per_step, steps):
            acc += weight * s
        parts[name] = scalars

    @staticmethod
    def _spread(r: Rollout, values: torch.Tensor) -> torch.Tensor:
        """Per text token values -> (S,) with each at its text step, divided by the text count (a mean)."""
        out = torch.zeros(r.num_steps)
        out[r.is_text] = values.float() / max(r.num_text, 1)
        return out

    @staticmethod
    def _at_end(r: Rollout, value: float) -> torch.Tensor:
        out = torch.zeros(r.num_steps)
        out[-1] = value
        return out

    @torch.no_grad()
    def gold_loglik(self, rollouts: list[Rollout], rows: list[dict], thoughts: bool = True) -> torch.Tensor:
        """(B,) `gold_answer_loglik` of the rows' gold answers, on the CPU."""
        gold = [gold_answer(self.tokenizer, self.task, row) for row in rows]
        return gold_answer_loglik(self.policy, self.mode, rollouts, gold, thoughts).cpu()


def gold_answer(tokenizer, task, row: dict) -> list[int]:
    """The gold answer's token ids then EOS, as SFT trains them: what the gold rewards and the latent term
    score, so that they reward stopping after the answer as well as the answer."""
    return tokenizer(task.target(row, "answer")).input_ids + [tokenizer.eos_token_id]
