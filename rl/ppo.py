"""PPO as a narrow subclass of the GRPO learner: TRL 1.16 has no PPOTrainer, and PPO differs from GRPO here
only in the advantage (GAE over per-step rewards with a learned value baseline instead of group
normalisation) plus a value loss. The value head (`value_head`, one of the learner's extra modules) reads the
policy's detached last hidden state."""

from __future__ import annotations

import torch
from torch import nn

from thinktok.models.thoughts import Action

from .learner import RecomputeBatch, ThoughtGRPOTrainer, pad_to
from .rollout import recompute_logprobs


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

    def set_advantages(self, inputs: list[dict], out: dict) -> None:
        """out["advantages"]: GAE over the per-step rewards, whitened over action steps; out["returns"]."""
        rollouts = out["rollout"]
        with torch.no_grad():
            rec = recompute_logprobs(self.model, self.thought_mode, rollouts)
            values = self.value_head(rec.hidden.float())[..., 0]  # (B, S)
        rewards = torch.zeros_like(values)
        for i, r in enumerate(x["per_step"] for x in inputs):
            rewards[i, : len(r)] = r.to(values.device)
        adv, returns = gae(rewards, values, rec.valid, self.gamma, self.lam)
        action = rec.valid.clone()
        for i, r in enumerate(rollouts):
            action[i, : r.num_steps] &= (r.action != Action.FORCED).to(action.device)
        mean, std = adv[action].mean(), adv[action].std().clamp_min(1e-6)  # whitened over action steps
        width = out["completion_ids"].shape[1]
        out["advantages"] = pad_to((adv - mean) / std * action, width)
        out["returns"] = pad_to(returns, width)

    def extra_loss(self, batch: RecomputeBatch, inputs: dict) -> torch.Tensor:
        rec = batch.recomputed
        values = self.value_head(rec.hidden.detach().float())[..., 0]
        returns = inputs["returns"][:, : values.shape[1]]
        value_loss = ((values - returns) ** 2 * rec.valid).sum() / rec.valid.sum().clamp_min(1)
        self.log_metric("value_loss", value_loss.item())
        return super().extra_loss(batch, inputs) + self.vf_coef * 0.5 * value_loss
