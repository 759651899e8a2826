"""`thinktok signal`: the advantage of rollouts with vs without thoughts, on rewards whose sign is known."""

import pytest
import torch

from thinktok.analysis.signal import measure_signal
from thinktok.config import load_config
from thinktok.rl.advantages import group_advantages
from thinktok.rl.config import TrainConfig


def cfg(*overrides):
    base = ["policy=tiny", "task.spaced=true", "task.reverse=true", "thought.init=norm", "task.num_train=64",
            "task.num_val=4",
            "task.num_test=4", "thought.num_thinking=256", "thought.max_thought_tokens=3",
            "sampling.max_new_tokens=6",
            "rl.prompts_per_step=4", "rl.num_generations=8", "rewards.weights={}"]
    return load_config(TrainConfig, None, base + list(overrides))


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 4.0])
    assert torch.allclose(group_advantages(r, 2, "grpo", scale=False), torch.tensor([-1.0, 1, 0, 0, -1, 1]))
    std = torch.tensor([1.0, 3.0]).std()
    assert torch.allclose(group_advantages(r, 2, "grpo")[:2], torch.tensor([-1.0, 1.0]) / (std + 1e-4))
    # rloo: r_i minus the mean of the others, never scaled
    loo = torch.tensor([r[i] - (r[(i // 3) * 3:(i // 3) * 3 + 3].sum() - r[i]) / 2 for i in range(6)])
    assert torch.allclose(group_advantages(r, 3, "rloo"), loo)


@pytest.mark.parametrize("cost", [1.0, -1.0])
def test_signal_sees_which_way_a_reward_pushes_thinking(cost):
    out = measure_signal(cfg(f"rewards.thinking_cost={cost}"), batches=2)
    assert 0 < out["with_thoughts"] < out["rollouts"] == 64
    with_, without = out["advantage_with_thoughts"], out["advantage_without_thoughts"]
    assert (with_ < 0 < without) if cost > 0 else (with_ > 0 > without)
    assert out["terms"]["thinking_cost"]["without_thoughts"] == 0


def test_signal_ranks_better_and_worse_thoughts_in_fixed_slots():
    """Fixed slots: every rollout thinks, so with-vs-without says nothing; the gain of its thoughts for the
    gold answer (policy-scored) separates them. Rewarded by that gain, helpful thoughts get the higher
    advantage."""
    out = measure_signal(cfg("thought.slots=2", "rewards.weights={thought_gain: 1.0}"), batches=2)
    assert out["with_thoughts"] == out["rollouts"] and out["advantage_without_thoughts"] is None
    assert out["advantage_helpful_thoughts"] > 0 > out["advantage_unhelpful_thoughts"]
    # positive, not 1: GRPO centres and scales per group, the gain is compared across groups
    assert out["advantage_gain_corr"] > 0
