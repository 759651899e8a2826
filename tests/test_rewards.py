"""The frozen teacher and every reward mode against a hand computation on a tiny model."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import make
from thinktok.envs import TaskConfig, load_task
from thinktok.errors import PoisonedStep
from thinktok.models.policy import load_policy
from thinktok.models.teacher import Teacher
from thinktok.models.thoughts import Action
from thinktok.rl.rewards import RewardConfig, RewardModel
from thinktok.rl.sampler import sample

TASK = load_task(TaskConfig(name="multiplication", num_train=4, num_val=1, num_test=1))
ROWS = TASK.dataset["train"].to_list()[:3]


@pytest.fixture(scope="module")
def teacher():
    return Teacher(load_policy("tiny", 0, False, seed=7).model)


def rollouts_for(case="vocab", seed=1, **sampling):
    policy, mode = make(case, **sampling)
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
    hook = teacher.model.base_model.register_forward_pre_hook(  # where the teacher's input ids enter
        lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    RewardModel(RewardConfig(), teacher).score(rollouts)
    hook.remove()
    ids = torch.cat([s.flatten() for s in seen])
    assert ids.max() < policy.vocab.text_size  # padding included: never a thinking id
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    with pytest.raises(ValueError, match="outside its vocabulary"):
        teacher.token_logprobs([[1, 2, policy.vocab.think_id(0)]], [1])


def hand_policy_text_lp(policy, r):
    """log pi_text of each text token, from input ids (no embeddings path, no mode): text columns only,
    temperature 1, renormalised by an explicit exp/sum."""
    ids = r.prompt_ids + r.token.tolist()
    with torch.no_grad():
        logits = policy.model(torch.tensor([ids])).logits[0].double()
    out = []
    for s, tok in enumerate(r.token.tolist()):
        if tok < policy.vocab.text_size:
            row = logits[len(r.prompt_ids) - 1 + s, : policy.vocab.text_size]
            out.append(torch.log(row[tok].exp() / row.exp().sum()))
    return torch.stack(out).float()


def test_teacher_loglik_and_kl_by_hand(teacher):
    # tempered, filtered sampling: the rewards must not see it (the KL is of the plain text distribution)
    policy, mode, rollouts = rollouts_for(temperature=0.7, top_k=40)
    assert sum(r.num_thought for r in rollouts) > 0
    cfg = RewardConfig(weights={"teacher_loglik": 1.0, "teacher_kl": 0.5})
    rewards = RewardModel(cfg, teacher, policy=policy.model, mode=mode).score(rollouts)
    for i, r in enumerate(rollouts):
        q = hand_teacher_lp(teacher.model, r.text_view, len(r.prompt_ids))
        p = hand_policy_text_lp(policy, r)
        assert rewards.parts["teacher_loglik"][i].item() == pytest.approx(q.mean().item(), abs=1e-5)
        assert rewards.parts["teacher_kl"][i].item() == pytest.approx((q - p).mean().item(), abs=1e-4)
        assert rewards.total[i].item() == pytest.approx(q.mean().item() + 0.5 * (q - p).mean().item(),
                                                        abs=1e-4)
        # token-wise: each text step carries its own share, thought steps carry nothing
        assert torch.allclose(rewards.per_step[i][r.is_text], (q + 0.5 * (q - p)) / r.num_text, atol=1e-5)
        assert rewards.per_step[i][~r.is_text].abs().sum() == 0
        assert rewards.credit[i].all()


def hand_gold_lp(policy, prefix, gold, pause_block=()):
    """Mean log pi_text of the gold tokens after prompt + thought ids, each later gold token preceded by the
    pause block when given: the layout written out by hand, scored from input ids."""
    ids, at = list(prefix), []
    for j, g in enumerate(gold):
        if j:
            ids += list(pause_block)
        at.append(len(ids))
        ids.append(g)
    with torch.no_grad():
        logits = policy.model(torch.tensor([ids])).logits[0, :, : policy.vocab.text_size].double()
    return torch.stack([logits[k - 1].log_softmax(-1)[ids[k]] for k in at]).mean().item()


@pytest.mark.parametrize("case", ["pause-prompt", "pause-every", "vocab"])
def test_exact_match_gold_loglik_and_thinking_cost(case):
    # top-k 5 at temperature 0.5: scoring gold under the sampling filter made this -inf or tempered
    policy, mode, rollouts = rollouts_for(case, temperature=0.5, top_k=5)
    cfg = RewardConfig(weights={"exact_match": 1.0, "gold_loglik": 1.0}, thinking_cost=0.1)
    rm = RewardModel(cfg, task=TASK, tokenizer=policy.tokenizer, policy=policy.model, mode=mode)
    rewards = rm.score(rollouts, ROWS)
    for i, (r, row) in enumerate(zip(rollouts, ROWS)):
        text = policy.tokenizer.decode(r.text_ids)
        assert rewards.parts["exact_match"][i] == float(TASK.check(text, row))
        tokens = r.token.tolist()
        first = next(k for k, t in enumerate(tokens) if t < policy.vocab.text_size)
        # pauses are no choice
        chosen = sum(t >= policy.vocab.text_size for t in tokens) if case == "vocab" else 0
        assert rewards.parts["thinking_cost"][i].item() == pytest.approx(-0.1 * chosen)
        gold = policy.tokenizer(TASK.target(row)).input_ids + [policy.vocab.eos_id]  # the answer and its end
        block = tokens[:first] if case == "pause-every" else ()
        expect = hand_gold_lp(policy, r.prompt_ids + tokens[:first], gold, block)
        assert rewards.parts["gold_loglik"][i].item() == pytest.approx(expect, abs=1e-5)
    if case == "pause-every":  # the pause the policy reads before every text token changes the score
        r, row = rollouts[0], ROWS[0]
        gold = policy.tokenizer(TASK.target(row)).input_ids + [policy.vocab.eos_id]  # the answer and its end
        without = hand_gold_lp(policy, r.prompt_ids + r.token[:2].tolist(), gold)
        assert abs(without - rewards.parts["gold_loglik"][0].item()) > 1e-3


def test_gold_loglik_credits_only_the_opening_thoughts():
    policy, mode, rollouts = rollouts_for("vocab")
    rm = RewardModel(RewardConfig(weights={"gold_loglik": 1.0}), task=TASK, tokenizer=policy.tokenizer,
                     policy=policy.model, mode=mode)
    rewards = rm.score(rollouts, ROWS)
    for r, credit in zip(rollouts, rewards.credit):
        first = int(r.is_text.nonzero()[0])
        # the opening thoughts and the choice to end them (a text token chosen over a thought) carry the
        # reward
        assert credit[: first + 1].all() and not credit[first + 1 :].any()
    # a step after the first text token (here turned into a thought) does not change the reward: no credit
    r = rollouts[0]
    edited = replace(r, token=r.token.clone(), action=r.action.clone())
    later = r.num_steps - 1
    assert later > int(r.is_text.nonzero()[0])
    edited.token[later], edited.action[later] = policy.vocab.think_id(0), Action.FREE
    again = rm.score([edited] + rollouts[1:], ROWS)
    assert again.parts["gold_loglik"][0].item() == pytest.approx(rewards.parts["gold_loglik"][0].item(),
                                                                 abs=1e-6)


def test_thinking_cost_counts_chosen_thoughts_only():
    policy, mode, rollouts = rollouts_for("continuous")
    rm = RewardModel(RewardConfig(weights={}, thinking_cost=1.0))
    costs = rm.score(rollouts).parts["thinking_cost"]
    # <bot>, 3 vectors, <eot>: only the 3 vectors were chosen
    assert costs.tolist() == [-3.0] * len(rollouts) and all(r.num_thought == 5 for r in rollouts)


def test_non_finite_reward_names_the_rollout(teacher, monkeypatch):
    _, _, rollouts = rollouts_for()
    real = teacher.token_logprobs
    monkeypatch.setattr(teacher, "token_logprobs", lambda s,
                        st: [x if i != 1 else x * math.nan for i, x in enumerate(real(s, st))])
    with pytest.raises(PoisonedStep, match="reward teacher_loglik is nan for rollout 1"):
        RewardModel(RewardConfig(), teacher).score(rollouts)


def test_reward_config_errors():
    with pytest.raises(ValueError, match="unknown reward mode 'vibes'"):
        RewardModel(RewardConfig(weights={"vibes": 1.0}))
    with pytest.raises(ValueError, match="needs a teacher"):
        RewardModel(RewardConfig())


def test_thought_gain_by_hand():
    """log pi_text(gold | prompt, opening thoughts) - log pi_text(gold | prompt), per gold token, written
    out."""
    policy, mode, rollouts = rollouts_for("pause-prompt")
    rm = RewardModel(RewardConfig(weights={"thought_gain": 1.0}), task=TASK, tokenizer=policy.tokenizer,
                     policy=policy.model, mode=mode)
    rewards = rm.score(rollouts, ROWS)
    for i, (r, row) in enumerate(zip(rollouts, ROWS)):
        gold = policy.tokenizer(TASK.target(row)).input_ids + [policy.vocab.eos_id]  # the answer and its end
        expect = hand_gold_lp(policy, r.prompt_ids + r.token[:3].tolist(), gold) - hand_gold_lp(
            policy, r.prompt_ids, gold)
        assert rewards.parts["thought_gain"][i].item() == pytest.approx(expect, abs=1e-5)
        assert abs(expect) > 1e-4 and rewards.credit[i][:3].all() and not rewards.credit[i][4:].any()


def test_teacher_reads_the_gold_chain_of_thought(teacher):
    """gold_cot: q(y | x, gold steps, y_<t), written out: prompt + " s1 ; s2 ;" + the student's text."""
    policy, mode, rollouts = rollouts_for()
    cfg = RewardConfig(weights={"teacher_loglik": 1.0}, teacher_context="gold_cot")
    rewards = RewardModel(cfg, teacher, task=TASK, tokenizer=policy.tokenizer).score(rollouts, ROWS)
    for i, (r, row) in enumerate(zip(rollouts, ROWS)):
        steps = policy.tokenizer(" " + " ; ".join(row["steps"]) + " ;").input_ids
        q = hand_teacher_lp(teacher.model, r.prompt_ids + steps + r.text_ids, len(r.prompt_ids) + len(steps))
        assert rewards.parts["teacher_loglik"][i].item() == pytest.approx(q.mean().item(), abs=1e-5)
    plain = RewardModel(RewardConfig(), teacher).score(rollouts)
    assert (plain.total - rewards.total).abs().max() > 1e-3


def test_teacher_own_chain_of_thought_stops_before_its_answer(teacher, monkeypatch):
    policy, mode, rollouts = rollouts_for()
    sep = policy.tokenizer(" ;").input_ids[-1]
    prompt = rollouts[0].prompt_ids
    fake = torch.tensor([prompt + [5, sep, 6, sep, 7, 50256]])
    monkeypatch.setattr(teacher.model, "generate", lambda ids, **kw: fake)
    assert teacher.think(prompt, sep, 8, 50256) == [5, sep, 6, sep]  # " 7" (its answer) dropped
    cfg = RewardConfig(weights={"teacher_loglik": 1.0}, teacher_context="own_cot")
    rm = RewardModel(cfg, teacher, task=TASK, tokenizer=policy.tokenizer)
    assert rm.teacher_context(rollouts[:1], None) == [[5, sep, 6, sep]]
    with pytest.raises(ValueError, match="teacher_context=gold_cot needs the task"):
        RewardModel(RewardConfig(teacher_context="gold_cot"), teacher)
