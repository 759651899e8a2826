"""`thinktok signal CONFIG [key=value ...]`: does a run's learning signal point where it should, before any
training? Samples a few batches with the initial policy exactly as `thinktok train` would (same rewards,
same group size), computes the learner's advantages (`group_advantages`), and reports what they reward:

  * the mean advantage of rollouts with chosen thoughts vs without (negative: every update lowers P(think));
  * better vs worse thoughts (what fixed slots need, where every rollout thinks): each rollout's thought gain,
    log pi_text(gold answer | prompt, its opening thoughts) - the same without them under the initial policy,
    and the mean advantage of rollouts whose thoughts help (gain > 0) vs hurt, and corr(advantage, gain);
  * for tasks with answers, the reward's correlation with correctness and accuracy with vs without thoughts;
  * the mean of each reward term, with vs without thoughts.

No Ray and no learner: the policy, teacher and reward model run in this process, once per batch.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from thinktok.envs import load_task
from thinktok.errors import UserError
from thinktok.models.head import head_columns
from thinktok.models.policy import load_policy
from thinktok.models.teacher import Teacher
from thinktok.models.thought_modes import make_mode
from thinktok.rl.advantages import group_advantages
from thinktok.rl.config import TrainConfig
from thinktok.rl.rewards import POLICY_REWARDS, RewardConfig, RewardModel
from thinktok.rl.sampler import sample
from thinktok.rl.train import ensure_teacher
from thinktok.sft import ensure_checkpoint


def mean_where(x: torch.Tensor, mask: torch.Tensor) -> float | None:
    return x[mask].mean().item() if mask.any() else None


def corr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation, None when either side is constant (or empty)."""
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return torch.corrcoef(torch.stack([a.float(), b.float()]))[0, 1].item()


@torch.no_grad()
def measure_signal(cfg: TrainConfig, batches: int = 4) -> dict:
    cfg.validate()
    if cfg.rollout != "sequential":
        raise UserError("thinktok signal measures sequential rollouts (parallel runs log their gains per "
                         "step)")
    torch.manual_seed(cfg.seed)
    thought = cfg.thought
    ensure_checkpoint(cfg.policy, cfg.policy_sft, "policy")
    policy = load_policy(cfg.policy, thought.vocab_tokens, thought.markers, init=thought.init, seed=cfg.seed)
    teacher_path = ensure_teacher(cfg)
    teacher = Teacher.load(teacher_path) if teacher_path else None
    task = load_task(cfg.task)
    mode = make_mode(thought, policy.vocab, cfg.sampling, head_columns(policy.model))
    reads_policy = set(POLICY_REWARDS) & set(cfg.rewards.weights)
    rewards = RewardModel(cfg.rewards, teacher, task, policy.tokenizer,
                          policy.model if reads_policy else None, mode if reads_policy else None)
    judge = RewardModel(RewardConfig(weights={"thought_gain": 1.0}), None, task, policy.tokenizer,
                        policy.model, mode)
    rows_all = task.dataset["train"].to_list()
    rng = random.Random(cfg.seed)
    g = cfg.rl.num_generations
    totals, thinks, correct, gains, parts = [], [], [], [], {}
    for b in range(batches):
        rows = [row for row in rng.sample(rows_all, cfg.rl.prompts_per_step) for _ in range(g)]
        rollouts = sample(policy.model, mode, [policy.tokenizer(r["prompt"]).input_ids for r in rows], seed=b)
        scored = rewards.score(rollouts, rows)
        totals.append(scored.total)
        thinks.append(torch.tensor([bool(r.is_chosen_thought.any()) for r in rollouts]))
        gains.append(judge.score(rollouts, rows).parts["thought_gain"])
        texts = [policy.tokenizer.decode(r.text_ids, skip_special_tokens=True) for r in rollouts]
        correct.append(torch.tensor([float(task.check(text, row)) for text, row in zip(texts, rows)]))
        for name, value in scored.parts.items():
            parts.setdefault(name, []).append(value)
    total, think, ok, gain = torch.cat(totals), torch.cat(thinks), torch.cat(correct), torch.cat(gains)
    adv = group_advantages(total, g, cfg.rl.algo)  # as the learner computes them (PPO: as GRPO would)
    helps = think & (gain > 0)
    return {
        "rollouts": len(total), "with_thoughts": int(think.sum()),
        "advantage_with_thoughts": mean_where(adv, think), "advantage_without_thoughts": mean_where(
            adv, ~think),
        "advantage_helpful_thoughts": mean_where(adv, helps), "advantage_unhelpful_thoughts": mean_where(
            adv, think & ~helps),
        "advantage_gain_corr": corr(adv[think], gain[think]), "thought_gain_mean": mean_where(gain, think),
        "reward_correctness_corr": corr(total, ok), "accuracy": ok.mean().item(),
        "accuracy_with_thoughts": mean_where(ok, think), "accuracy_without_thoughts": mean_where(ok, ~think),
        "terms": {name: {"mean": torch.cat(v).mean().item(), "with_thoughts": mean_where(torch.cat(v), think),
                         "without_thoughts": mean_where(torch.cat(v), ~think)} for name, v in parts.items()},
    }


def run_signal(cfg: TrainConfig, batches: int, out: Path | None) -> dict:
    result = {"config": {"policy": cfg.policy, "teacher": cfg.teacher, "rewards": cfg.rewards.weights,
                         "teacher_context": cfg.rewards.teacher_context, "thought": cfg.thought.mode},
              **measure_signal(cfg, batches)}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result
