"""The frozen teacher and every reward mode against a hand computation on a tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make
from thinktok.envs import TaskConfig, load_task
from thinktok.models.policy import load_policy
from thinktok.models.teacher import Teacher
from thinktok.rl.rewards import RewardConfig, RewardModel
from thinktok.rl.rollout import sample

TASK = load_task(TaskConfig(name="multiplication", num_train=4, num_val=1, num_test=1))
ROWS = TASK.dataset["train"].to_list()[:3]


@pytest.fixture(scope="module")
def teacher():
    return Teacher(load_policy("tiny", 0, False, seed=7).model)


def rollouts_for(case="vocab", seed=1):
    policy, mode = make(case)
    prompts = [policy.tokenizer(r["prompt"]).input_ids for r in ROWS]
    return policy, mode, sample(policy.model, mode, prompts, seed=seed)


def hand_teacher_lp(model, ids, start):
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return torch.stack([lp[i - 1, ids[i]] for i in range(start, len(ids))])


def test_teacher_sees_no_thinking_token_and_is_frozen(teacher):
    # a seed whose rollouts think: the boosted tiny model starts a thought with p ~ 0.6% a step
    policy, mode, rollouts = rollouts_for(seed=0)
    assert sum(r.num_thought for r in rollouts) > 0
    seen = []
    hook = teacher.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    RewardModel(RewardConfig(), teacher).score(rollouts)
    hook.remove()
    ids = torch.cat([s.flatten() for s in seen])
    assert ids.max() < policy.vocab.real_size  # padding included: never a thinking id
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    with pytest.raises(ValueError, match="outside its vocabulary"):
        teacher.token_logprobs([[1, 2, policy.vocab.think_id(0)]], [1])


def test_teacher_loglik_and_kl_by_hand(teacher):
    _, _, rollouts = rollouts_for()
    rewards = RewardModel(RewardConfig(weights={"teacher_loglik": 1.0, "teacher_kl": 0.5}), teacher).score(rollouts)
    for i, r in enumerate(rollouts):
        lp = hand_teacher_lp(teacher.model, r.text_view, len(r.prompt_ids))
        assert rewards.parts["teacher_loglik"][i].item() == pytest.approx(lp.mean().item(), abs=1e-5)
        kl = (lp - r.logprob[r.is_real]).mean()
        assert rewards.parts["teacher_kl"][i].item() == pytest.approx(kl.item(), abs=1e-4)
        assert rewards.total[i].item() == pytest.approx(lp.mean().item() + 0.5 * kl.item(), abs=1e-4)
        # token-wise: each text step carries its own share, thought steps carry nothing
        assert torch.allclose(rewards.per_step[i][r.is_real], lp / r.num_real + 0.5 * (lp - r.logprob[r.is_real]) / r.num_real, atol=1e-5)
        assert rewards.per_step[i][~r.is_real].abs().max() == 0 if r.num_thought else True


def test_exact_match_gold_loglik_and_thinking_cost():
    policy, mode, rollouts = rollouts_for("pause-prompt")
    cfg = RewardConfig(weights={"exact_match": 1.0, "gold_loglik": 1.0}, thinking_cost=0.1)
    rm = RewardModel(cfg, task=TASK, tokenizer=policy.tokenizer, policy=policy.model, mode=mode)
    rewards = rm.score(rollouts, ROWS)
    for i, (r, row) in enumerate(zip(rollouts, ROWS)):
        text = policy.tokenizer.decode(r.real_ids)
        assert rewards.parts["exact_match"][i] == float(TASK.check(text, row))
        assert rewards.parts["thinking_cost"][i].item() == pytest.approx(-0.1 * r.num_thought)
        # by hand: prompt + the 3 forced pause tokens + gold answer tokens, text-token softmax
        gold = policy.tokenizer(TASK.target(row)).input_ids
        ids = r.prompt_ids + r.token[:3].tolist() + gold
        with torch.no_grad():
            logits = policy.model(torch.tensor([ids])).logits[0, :, : policy.vocab.real_size].float()
        lp = F.log_softmax(logits, -1)
        start = len(r.prompt_ids) + 3
        expect = torch.stack([lp[j - 1, ids[j]] for j in range(start, len(ids))]).mean()
        assert rewards.parts["gold_loglik"][i].item() == pytest.approx(expect.item(), abs=1e-5)
        assert rewards.per_step[i][-1] >= rewards.parts["gold_loglik"][i] + rewards.parts["exact_match"][i] - 0.1 - 1e-5


def test_non_finite_reward_names_the_rollout(teacher, monkeypatch):
    _, _, rollouts = rollouts_for()
    real = teacher.token_logprobs
    monkeypatch.setattr(teacher, "token_logprobs", lambda s, st: [x if i != 1 else x * math.nan for i, x in enumerate(real(s, st))])
    with pytest.raises(ValueError, match="reward teacher_loglik is nan for rollout 1"):
        RewardModel(RewardConfig(), teacher).score(rollouts)


def test_reward_config_errors():
    with pytest.raises(ValueError, match="unknown reward mode 'vibes'"):
        RewardModel(RewardConfig(weights={"vibes": 1.0}))
    with pytest.raises(ValueError, match="needs a teacher"):
        RewardModel(RewardConfig())
