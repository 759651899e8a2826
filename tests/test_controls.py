"""The eval controls (no thoughts, pause, shuffled thoughts): what they feed the model, and their verdict on a
toy model whose thoughts are known to matter and on one whose thoughts cannot matter."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import boost_thinking
from thinktok.analysis.controls import control_modes, derange, thought_inputs
from thinktok.analysis.evaluate import evaluate_policy
from thinktok.envs.base import norm
from thinktok.models.policy import load_policy
from thinktok.models.thought_config import SamplingConfig, ThoughtConfig
from thinktok.models.thought_modes import make_mode
from thinktok.rl.sampler import sample

DIGITS = [f" {d}" for d in range(10)]


def toy_task(policy, n=10):
    rows = [{"prompt": f"{d} =", "answer": str(d), "steps": []} for d in range(n)]
    return SimpleNamespace(dataset={"test": rows}, check=lambda text, row: norm(text) == norm(row["answer"]))


def greedy_mode(policy, **cfg):
    return make_mode(ThoughtConfig(**cfg), policy.vocab, SamplingConfig(max_new_tokens=2, greedy=True))


def test_replay_feeds_the_donor_thoughts_at_the_thought_steps():
    policy = load_policy("tiny", 8, False, seed=0)
    boost_thinking(policy, 25)
    mode = greedy_mode(policy, mode="vocab", num_thinking=8, max_thought_tokens=3)
    prompts = [policy.tokenizer(p).input_ids for p in ["12 * 34 =", "hello", "a b c", "x ="]]
    embed = policy.model.get_input_embeddings()
    main = sample(policy.model, mode, prompts)
    donors = thought_inputs(main, mode, embed)
    assert sum(len(d) for d in donors) > 0
    shuffled = derange(donors)
    controls = control_modes(mode, shuffled, embed)
    fed = []
    hook = policy.model.base_model.register_forward_pre_hook(
        lambda m, a, kw: fed.append(kw["inputs_embeds"][:, -1].clone()), with_kwargs=True)
    out = sample(policy.model, controls["shuffled_thoughts"], prompts)
    hook.remove()
    for b, r in enumerate(out):
        thought_steps = [s for s in range(r.num_steps) if r.token[s] >= policy.vocab.text_size]
        for k, s in enumerate(thought_steps):  # step s's input is fed by the sampler's (s+1)-th forward
            donor = shuffled[b]
            want = donor[k % len(donor)] if len(donor) else embed.weight[policy.vocab.think_id(0)]
            assert torch.allclose(fed[s + 1][b], want), (b, k)
    none = sample(policy.model, controls["no_thoughts"], prompts)
    assert all(r.num_thought == 0 for r in none)


def test_controls_agree_when_thoughts_cannot_matter():
    """init=mean: every thinking row is the same vector, so learned, pause and shuffled thoughts feed
    identical inputs: their numbers must be identical (a replay that fed anything else would show)."""
    policy = load_policy("tiny", 8, False, init="mean", seed=0)
    mode = greedy_mode(policy, mode="vocab", num_thinking=8, max_thought_tokens=2)
    # scales every (identical) thinking row alike: the model thinks, rows stay equal
    boost_thinking(policy, 25)
    result = evaluate_policy(policy, mode, toy_task(policy), "test")
    metrics = ("accuracy", "text_tokens_mean", "thought_steps_mean", "prompt_tokens_mean")
    main = {k: result[k] for k in metrics}
    assert main["thought_steps_mean"] > 0
    assert result["controls"]["pause"] == main and result["controls"]["shuffled_thoughts"] == main


def train_copy_model(steps: int = 80, negatives: int = 1024):
    """A tiny model whose answer is whatever digit its thought names: trained to think <think_d> after "d =",
    and to answer the digit of the thought it reads, which is corrupted half of the time in training (so the
    answer cannot be read off the prompt alone). The softmax is over the batch's tokens and `negatives`
    sampled others, not the 50k-wide head that was 3/4 of each step: measured against the full vocabulary,
    every greedy choice still wins by >= 4.4 nats (the thought after "d =") and >= 5.1 nats (the digit after
    each of the 100 (d, thought) pairs)."""
    torch.manual_seed(0)
    policy = load_policy("tiny", 10, False, seed=0)
    tok, v, model = policy.tokenizer, policy.vocab, policy.model
    digit = [tok(d).input_ids[0] for d in DIGITS]  # " 3": the answer after the thought
    bare = [tok(str(d)).input_ids[0] for d in range(10)]  # "3": the prompt "3 =" starts without a space
    eq = tok(" =").input_ids[0]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        d = torch.randint(0, 10, (64,), generator=gen)
        j = torch.where(torch.rand(64, generator=gen) < 0.5, d, torch.randint(0, 10, (64,), generator=gen))
        think = torch.tensor([v.think_id(int(x)) for x in j])
        ids = torch.stack([torch.tensor(bare)[d], torch.full_like(d, eq), think, torch.tensor(digit)[j],
                           torch.full_like(d, v.eos_id)], 1)  # (64, 5)
        targets = ids[:, 1:].clone()
        targets[:, 1] = torch.where(j == d, think, -100)  # the right thought; never learn a corrupted one
        rows = torch.unique(torch.cat([ids.flatten(), torch.randint(0, v.size, (negatives,), generator=gen)]))
        column = torch.full((v.size,), -100)
        column[rows] = torch.arange(len(rows))  # a token id -> its column among `rows`
        labels = torch.where(targets >= 0, column[targets.clamp(min=0)], -100)  # (64, 4)
        hidden = model.transformer(input_ids=ids).last_hidden_state[:, :-1]  # (64, 4, d)
        logits = hidden @ model.lm_head.weight[rows].T  # (64, 4, rows)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return policy


@pytest.fixture(scope="module")
def copy_model():
    return train_copy_model()


@pytest.mark.parametrize("placement", [dict(max_thought_tokens=1), dict(slots=1)])
def test_controls_on_a_model_whose_thoughts_matter(copy_model, placement):
    """Free placement (the policy chooses to think) and a fixed slot (it chooses only the content) alike."""
    policy = copy_model
    mode = greedy_mode(policy, mode="vocab", num_thinking=10, **placement)
    result = evaluate_policy(policy, mode, toy_task(policy), "test")
    c = result["controls"]
    assert result["accuracy"] >= 0.9 and result["thought_steps_mean"] == pytest.approx(1.0)
    # shuffled: each example copies its neighbour's digit; pause: every answer reads <think0> ("0")
    assert c["shuffled_thoughts"]["accuracy"] <= 0.2 and c["pause"]["accuracy"] <= 0.2
    assert c["no_thoughts"]["thought_steps_mean"] == 0
