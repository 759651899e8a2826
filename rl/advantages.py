"""Group-relative advantages: the one implementation that the sequential learner, the parallel learner and
`thinktok signal` share (PPO's are GAE, rl/ppo.py)."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group: int, algo: str, scale: bool = True) -> torch.Tensor:
    """rewards (N, ...), consecutive blocks of `group` rows answering one prompt (or window) -> advantages of
    the same shape, each against its group at the same trailing index:

      grpo  r_i - mean_j r_j, over (the group's std + 1e-4) when `scale` (TRL's scale_rewards="group")
      rloo  the leave-one-out baseline r_i - mean_{j!=i} r_j = G/(G-1) (r_i - mean_j r_j), never scaled
    """
    g = rewards.reshape(-1, group, *rewards.shape[1:])
    adv = g - g.mean(1, keepdim=True)
    if algo == "rloo":
        adv = adv * group / (group - 1)
    elif scale:
        adv = adv / (g.std(1, keepdim=True) + 1e-4)
    return adv.reshape_as(rewards)
