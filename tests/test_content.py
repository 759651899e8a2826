"""The content measures (analysis/content.py) on a model whose code is known: a rule that copies the prompt's
first digit d into its first thought (<think_d>), then thinks a constant <think0>, then answers d + 1 (mod
10) read from the first thought alone. Position 0 carries the code, position 1 nothing."""

import itertools
import math
import random
from types import SimpleNamespace

import pytest
import torch

from conftest import RuleBase, RuleModel, make
from thinktok.analysis.content import (
    ContentConfig,
    Intervene,
    code_table,
    content_measures,
    nmi,
    pass_at_k,
    replacements,
    thought_steps,
    thought_symbols,
    unbiased_pass_at_k,
)
from thinktok.analysis.controls import thought_inputs
from thinktok.models.policy import Policy
from thinktok.models.thought_config import SamplingConfig, ThoughtConfig
from thinktok.models.thought_modes import make_mode
from thinktok.models.thoughts import Action
from thinktok.models.vocab import ThinkingVocab
from thinktok.rl.rollout import Rollout
from thinktok.rl.sampler import sample

WORDS = [f" {d}" for d in range(10)] + [" =", "<eos>"]  # the text vocabulary: ids 0..11
EOS, N = 11, 10  # end of text; thinking tokens <think0..9> are ids 12..21
V = len(WORDS) + N


class Tokenizer:
    def __call__(self, text: str):
        return SimpleNamespace(input_ids=[WORDS.index(" " + w) for w in text.split()])

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join("" if i == EOS and skip_special_tokens else WORDS[i] if i < len(WORDS)
                       else f"<think{i - len(WORDS)}>" for i in ids)


class CopyRule(RuleBase):
    """Copies the prompt's first digit d into the first thought, thinks <think0>, answers d + 1 from the first
    thought alone, then EOS."""

    width = V

    def __init__(self, tie: bool):
        super().__init__()
        self.tie = tie  # odd d: the answer is d+1 or d+2 with equal logits (pass@k has something to find)

    def logits(self, seq: list[int]) -> torch.Tensor:
        out = torch.zeros(V)
        gen = seq[3:]  # prompt "d e ="
        thoughts = [t - len(WORDS) for t in gen if t >= len(WORDS)]
        answer = (thoughts[0] + 1) % 10 if thoughts else None
        if answer is not None:
            out[answer] += 5.0  # what the logit lens should read at every position after the first thought
        if not gen:
            out[len(WORDS) + seq[0]] = 30.0  # copy d
        elif len(thoughts) == 1 and len(gen) == 1:
            out[len(WORDS)] = 30.0  # a constant second thought
        elif len(gen) == 2:
            out[answer] = 30.0
            if self.tie and thoughts[0] % 2:
                out[(answer + 1) % 10] = 30.0
        else:
            out[EOS] = 30.0
        return out


def check(text: str, row: dict) -> bool:
    return text.split() == [row["answer"]]


TASK = SimpleNamespace(check=check)


def rule_policy(tie: bool = False) -> tuple[Policy, object]:
    vocab = ThinkingVocab(text_size=len(WORDS), num_thinking=N, markers=False, eos_id=EOS)
    model = RuleModel(CopyRule(tie))
    with torch.no_grad():
        for d in range(N):  # <think_d>'s row leans to " d": its nearest text token
            model.embed.weight[len(WORDS) + d, d] = 0.5
    init = model.embed.weight[len(WORDS):].detach().clone()
    init[3] += torch.tensor([3.0, 4.0] + [0.0] * (V - 2))  # <think3> has moved by exactly 5 since init
    cfg = ThoughtConfig(mode="vocab", num_thinking=N, max_thought_tokens=4)
    mode = make_mode(cfg, vocab, SamplingConfig(max_new_tokens=3, greedy=True))
    return Policy(model, Tokenizer(), vocab, init), mode


def problems(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        d, e = rng.randrange(10), rng.randrange(10)
        rows.append({"prompt": f"{d} {e} =", "answer": str((d + 1) % 10), "steps": [str(d), str(e)]})
    return rows


def decode_rows(policy, mode, rows):
    return sample(policy.model, mode, [policy.tokenizer(r["prompt"]).input_ids for r in rows])


def test_rule_model_does_what_it_says():
    policy, mode = rule_policy()
    rows = problems(20)
    for row, r in zip(rows, decode_rows(policy, mode, rows)):
        d = int(row["steps"][0])
        assert r.token.tolist() == [len(WORDS) + d, len(WORDS), (d + 1) % 10, EOS]


def test_content_measures_find_the_known_code():
    policy, mode = rule_policy()
    rows = problems(600)
    rollouts = decode_rows(policy, mode, rows)
    cfg = ContentConfig(limit=600, samples=2, pass_k=[1, 2], top_tokens=N)
    out = content_measures(policy, mode, TASK, rows, rollouts, cfg, batch_size=128)

    first, second = out["interventions"]  # the code's position changes every answer; the constant none
    assert first == {"position": 0, "n": 600, "changed": 1.0, "accuracy": 1.0, "accuracy_intervened": 0.0,
                     "drop_points": 100.0}
    assert second["n"] == 600 and second["changed"] == 0.0 and second["drop_points"] == 0.0

    pairs = {(p["position"], p["candidate"]): p for p in out["code_table"]["top_pairs"]}
    code = pairs[0, "step 1 char 1"]
    assert code["nmi"] == pytest.approx(1.0) and code["purity"] == 1.0
    assert out["code_table"]["best_per_position"][0]["nmi"] == pytest.approx(1.0)
    table = code_table(rows, thought_symbols(rollouts, mode, policy.tokenizer, policy.model.embed),
                       ContentConfig(top_pairs=100))
    every = {(p["position"], p["candidate"]): p for p in table["top_pairs"]}
    uncoded = every[0, "step 2 char 1"]  # e is in the prompt but never copied
    assert uncoded["nmi"] - uncoded["chance"] < 0.03
    position_1 = [p for (k, _), p in every.items() if k == 1]
    assert position_1 and all(p["nmi"] == 0.0 for p in position_1)  # a constant thought codes nothing

    view = {e["token"]: e for e in out["embedding"]}
    assert view["<think0>"]["uses"] == 600 + sum(r["steps"][0] == "0" for r in rows)
    three = view["<think3>"]
    assert three["nearest"][0] == " 3"  # the row leans to " 3"
    assert three["logit_lens"][0] == " 4"  # where <think3> is fed the rule ranks d + 1 first
    assert three["moved"] == pytest.approx(5.0)
    assert out["pass_at_k"] == {"pass@1": 1.0, "pass@2": 1.0}
    assert [r["correct"] for r in out["rollouts"]] == [True] * cfg.rollouts
    step = out["rollouts"][0]["steps"][0]
    assert step["text"] == f"<think{rows[0]['steps'][0]}>" and step["nearest"][0] == f" {rows[0]['steps'][0]}"


def test_pass_at_k_on_a_coin_flip():
    """Odd d: two answers tie at temperature 1, so each sample is right with probability 1/2."""
    policy, mode = rule_policy(tie=True)
    rows = problems(150, seed=1)
    odd = sum(int(r["steps"][0]) % 2 for r in rows) / len(rows)
    out = pass_at_k(policy.model, mode, TASK, policy.tokenizer, rows, ContentConfig(samples=8, pass_k=[1, 8]),
                    batch_size=256)
    assert out["pass@1"] == pytest.approx(1 - odd / 2, abs=0.04)
    assert out["pass@8"] == pytest.approx(1 - odd / 2**8, abs=0.02)


def test_unbiased_pass_at_k_against_enumeration():
    for n, c, k in [(4, 1, 2), (6, 2, 3), (5, 0, 1), (5, 5, 4), (8, 3, 1)]:
        draws = list(itertools.combinations([1] * c + [0] * (n - c), k))
        assert unbiased_pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))


def test_nmi_against_hand_computation():
    # X a fair bit, Y = X with one flip in four: I = H(Y) - H(Y|X) in nats, computed from the joint table
    xs = [0, 0, 0, 0, 1, 1, 1, 1]
    ys = [0, 0, 0, 1, 1, 1, 1, 1]
    joint = {(0, 0): 3 / 8, (0, 1): 1 / 8, (1, 1): 4 / 8}
    px, py = {0: 0.5, 1: 0.5}, {0: 3 / 8, 1: 5 / 8}
    mi = sum(p * math.log(p / (px[x] * py[y])) for (x, y), p in joint.items())
    hx, hy = math.log(2), -sum(p * math.log(p) for p in py.values())
    score, purity = nmi(xs, ys)
    assert score == pytest.approx(mi / ((hx + hy) / 2))
    assert purity == pytest.approx(7 / 8)
    assert nmi([1, 1, 1], [0, 1, 2]) == (0.0, 1 / 3)


def rollout(tokens, vectors=None):
    actions = [Action.VECTOR if t < 0 else Action.FREE for t in tokens]
    return Rollout(prompt_ids=[0], action=torch.tensor(actions), token=torch.tensor(tokens),
                   logprob=torch.zeros(len(tokens)), text_size=len(WORDS), mode="x",
                   vector=None if vectors is None else torch.tensor(vectors, dtype=torch.float))


def test_replacements_by_mode():
    policy, mode = rule_policy()
    embed = policy.model.embed
    rs = [rollout([len(WORDS) + 2, 5]), rollout([5]), rollout([len(WORDS) + 7, len(WORDS) + 1])]
    seen = set()
    for seed in range(200):
        repl, active = replacements(rs, mode, embed, 0, random.Random(seed))
        assert active.tolist() == [True, False, True]
        new = repl[[0, 2]].argmax(-1)
        assert new[0] != len(WORDS) + 2 and new[1] != len(WORDS) + 7 and (new >= len(WORDS)).all()
        seen.add(int(new[0]))
    assert seen == set(range(len(WORDS), V)) - {len(WORDS) + 2}  # uniform over the other N - 1

    vec = [[float(i)] * V for i in range(2)]
    vs = [rollout([-1, 5], vec), rollout([5], [[9.0] * V]), rollout([-1], [[7.0] * V])]
    repl, active = replacements(vs, mode, embed, 0, random.Random(0))
    assert active.tolist() == [True, False, True]  # vectors come from the other row that has a k-th one
    assert repl[0].tolist() == [7.0] * V and repl[2].tolist() == [0.0] * V
    alone = replacements(vs[:2], mode, embed, 0, random.Random(0))[1]
    assert not alone.any()
    single = ThinkingVocab(text_size=len(WORDS), num_thinking=1, markers=False, eos_id=EOS)
    one = make_mode(ThoughtConfig(mode="single", num_thinking=1), single, SamplingConfig())
    assert not replacements([rollout([len(WORDS)])], one, embed, 0, random.Random(0))[1].any()


def test_an_identity_intervention_changes_nothing_in_every_mode(case):
    """Feeding each row's own k-th thought back as the 'replacement' reproduces the rollout exactly (the
    wrapper finds the same k-th thought the measures count); a real replacement keeps every step before it."""
    policy, mode = make(case)
    prompts = [policy.tokenizer(p).input_ids for p in ("12 * 34 =", "5 * 6 =", "7 7 7 =")]
    embed = policy.model.get_input_embeddings()
    with torch.no_grad():
        base = sample(policy.model, mode, prompts, seed=3)
        own = thought_inputs(base, mode, embed)
        for k in range(max(len(x) for x in own)):
            active = torch.tensor([len(x) > k for x in own])
            repl = torch.stack([x[k] if len(x) > k else torch.zeros(embed.weight.shape[1]) for x in own])
            again = sample(policy.model, Intervene(mode, k, repl, active), prompts, seed=3)
            assert [r.token.tolist() for r in again] == [r.token.tolist() for r in base]
            moved = sample(policy.model, Intervene(mode, k, repl + 1.0, active), prompts, seed=3)
            for r, m, on in zip(base, moved, active):
                if on:
                    s = int(thought_steps(r, mode)[k]) + 1  # steps up to the k-th thought are unchanged
                    assert m.token[:s].tolist() == r.token[:s].tolist()
