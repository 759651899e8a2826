"""PPO as a narrow subclass of the GRPO learner: TRL 1.16 has no PPOTrainer, and PPO differs from GRPO here
only in the advantage (GAE over per-step rewards with a learned value baseline instead of group
normalisation) plus a value loss. The value head (`value_head`, one of the learner's extra modules) reads the
policy's detached last hidden state."""

from __future__ import annotations

import torch
from torch import nn

from thinktok.models.thoughts import Action

from .learner import ThoughtGRPOTrainer
from .recompute import Recomputed
from .step import Batch, padded


def value_head(hidden_size: int) -> nn.Linear:
    """V(h) = w.h + b, zero-initialised: the first advantages are the returns themselves."""
    head = nn.Linear(hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def gae(rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over steps: (B, S) each -> advantages, returns (B, S).
    Past a rollout's end (valid False) the value is 0 and nothing propagates."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        nxt_value = values[:, t + 1] * valid[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        nxt_valid = valid[:, t + 1].float() if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt_value - values[:, t]
        last = (delta + gamma * lam * nxt_valid * last) * valid[:, t]
        adv[:, t] = last
    return adv, adv + values * valid


class ThoughtPPOTrainer(ThoughtGRPOTrainer):
    """extra_modules must hold "value_head" (`value_head(hidden_size)`)."""

    def __init__(self, *args, gamma: float = 1.0, lam: float = 0.95, vf_coef: float = 0.5, **kwargs):
        self.gamma, self.lam, self.vf_coef = gamma, lam, vf_coef
        super().__init__(*args, **kwargs)
        self.value_head = self.extra_modules["value_head"]

    def values(self, rec: Recomputed) -> torch.Tensor:
        """(B, S) V(h) at the positions that chose each step, differentiable in the value head only."""
        return self.value_head(rec.hidden.detach().float())[..., 0]

    def returns(self, batch: Batch, rec: Recomputed) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE over the per-step rewards against the current values: (B, S) advantages and returns."""
        with torch.no_grad():
            values = self.values(rec)
        rewards = padded(batch.per_step).to(values.device)
        return gae(rewards, values, rec.valid, self.gamma, self.lam)

    def advantages(self, batch: Batch, rec: Recomputed) -> torch.Tensor:
        """(B, S): GAE, whitened over every learner process's action steps (forced steps get 0)."""
        adv, _ = self.returns(batch, rec)
        action = padded([r.action != Action.FORCED for r in batch.rollouts]).to(adv.device) & rec.valid
        n, total = self.global_sum(action.sum(), adv[action].sum())
        mean = total / n
        # two passes, as .std(): one-pass sums of squares lose the spread when it is small beside the mean
        (squares,) = self.global_sum(((adv[action] - mean) ** 2).sum())
        std = (squares / (n - 1)).sqrt().clamp_min(1e-6)
        return (adv - mean) / std * action

    def extra_loss(self, model, rec: Recomputed, batch: Batch) -> torch.Tensor:
        _, returns = self.returns(batch, rec)
        # this process's sum over the global step count / N: DDP's mean of gradients is the union batch's
        (steps,) = self.global_sum(rec.valid.sum())
        share = steps.clamp_min(1) / self.accelerator.num_processes
        value_loss = ((self.values(rec) - returns) ** 2 * rec.valid).sum() / share
        self.log_metric("value_loss", value_loss.item())
        return super().extra_loss(model, rec, batch) + self.vf_coef * 0.5 * value_loss
