"""Seed 004's text measures (analysis/text_eval.py) on rule models whose placement is known: the text counts
up (after d comes d+1 mod 10); the policy thinks one <think0> before every odd token and before 0, and a
thought raises the right token's logit from 2 to 5; the teacher finds odd tokens hard (logit 1, else 4).
Every expected number below is computed from those logits or from a contingency table, not by the module."""

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import RuleBase, RuleModel
from thinktok.analysis.text_eval import ForceText, placement, ranks, spearman, text_measures, token_table
from thinktok.models.policy import Policy
from thinktok.models.thought_config import SamplingConfig, ThoughtConfig
from thinktok.models.thought_modes import make_mode
from thinktok.models.vocab import ThinkingVocab
from thinktok.rl.sampler import sample

WORDS = [f" {d}" for d in range(10)] + ["<eos>"]  # text ids 0..10
EOS, N = 10, 2  # thinking tokens <think0>, <think1>: ids 11, 12
T, V = len(WORDS), len(WORDS) + N
LENGTH = 6  # true continuation tokens per row


class Tokenizer:
    eos_token_id = EOS

    def __call__(self, text: str):
        return SimpleNamespace(input_ids=[WORDS.index(" " + w) for w in text.split()])

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(WORDS[i] if i < T else f"<think{i - T}>" for i in ids)


def thinks_before(target: int) -> bool:
    return target % 2 == 1 or target == 0


class CountingBase(RuleBase):
    """The counting policy of the module docstring."""

    width = V

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high  # the right token's logit without / with the thought it wanted

    def logits(self, seq: list[int]) -> torch.Tensor:
        out = torch.zeros(V)
        target = ([t for t in seq if t < 10] or [9])[-1] + 1
        target %= 10
        if seq[-1] >= T:  # just thought
            out[target] = self.high
        elif thinks_before(target):
            out[T] = 30.0  # <think0>; where thinking is off, the text alone is left: logit `low`
            out[target] = self.low
        else:
            out[target] = self.high
        return out


class Teacher:
    """Text only: the right next token gets logit `odd` when odd, `even` otherwise."""

    def __init__(self, odd: float = 1.0, even: float = 4.0):
        self.odd, self.even = odd, even

    def token_logprobs(self, seqs, start):
        out = []
        for s, st in zip(seqs, start):
            lps = []
            for i in range(st, len(s)):
                target = (s[i - 1] + 1) % 10 if s[i - 1] < 10 else 0
                logit = self.odd if target % 2 else self.even
                norm = math.log(math.exp(logit) + T - 1)
                lps.append((logit if s[i] == target else 0.0) - norm)
            out.append(torch.tensor(lps))
        return out


def surprisal(logit: float) -> float:
    """-log p of the token holding `logit` among T text tokens whose other logits are 0."""
    return -math.log(math.exp(logit) / (math.exp(logit) + T - 1))


TASK = SimpleNamespace(target=lambda row, fmt: " " + row["answer"])
ROWS = [{"prompt": str(d), "answer": " ".join(str((d + i) % 10) for i in range(1, LENGTH + 1))}
        for d in range(10)]


def counting_policy(low=2.0, high=5.0, max_thoughts=8, greedy=True):
    vocab = ThinkingVocab(text_size=T, num_thinking=N, markers=False, eos_id=EOS)
    model = RuleModel(CountingBase(low, high))
    mode = make_mode(ThoughtConfig(mode="vocab", num_thinking=N, max_thought_tokens=max_thoughts), vocab,
                     SamplingConfig(max_new_tokens=LENGTH, greedy=greedy))
    return Policy(model, Tokenizer(), vocab, model.embed.weight[T:].detach().clone()), mode


def test_forcing_keeps_the_policys_thoughts_and_scores_the_gold():
    policy, mode = counting_policy()
    gold = torch.tensor([[5, 6, 7, 8]])  # after "4": a thought before 5 and before 7
    (r,) = sample(policy.model, ForceText(mode, mode, gold), [[4]])
    assert r.token.tolist() == [T, 5, 6, T, 7, 8]
    lp, before = token_table(r, 4)
    assert before.tolist() == [True, False, True, False]
    assert torch.allclose(lp, torch.full((4,), -surprisal(5.0)))
    # a wrong gold token is scored, not replaced by the policy's choice: " 9" where " 5" was expected
    (r,) = sample(policy.model, ForceText(mode, mode, torch.tensor([[9, 0]])), [[4]])
    assert r.token.tolist() == [T, 9, T, 0]  # the model reads the forced 9: 0 comes next, thought before
    assert math.isclose(float(r.logprob[r.is_text][0]), math.log(1 / (math.exp(5.0) + T - 1)), rel_tol=1e-5)


def test_spearman_against_a_contingency_table_and_hand_ranks():
    assert torch.equal(ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])), torch.tensor([2.5, 0.0, 2.5, 1.0],
                                                                                 dtype=torch.float64))
    # binary against binary: Spearman's rho is the phi coefficient of the 2x2 table
    x = torch.tensor([1] * 30 + [1] * 6 + [0] * 24, dtype=torch.float)
    y = torch.tensor([1] * 30 + [0] * 6 + [0] * 24, dtype=torch.float)
    n11, n10, n01, n00 = 30, 6, 0, 24
    phi = (n11 * n00 - n10 * n01) / math.sqrt((n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00))
    assert math.isclose(spearman(x, y), phi, rel_tol=1e-9)
    assert math.isclose(spearman(torch.arange(5.0), -torch.arange(5.0) ** 3), -1.0)
    assert spearman(torch.ones(4), torch.arange(4.0)) is None


def test_placement_means_and_deciles():
    before = torch.tensor([True, False, True, False])
    s = torch.tensor([3.0, 1.0, 2.0, 0.0])
    out = placement(before, s)
    assert out["after_thought"] == 2.5 and out["after_text"] == 0.5
    # four distinct surprisals: one token in each occupied decile, in surprisal order
    assert [(d["surprisal"], d["rate"]) for d in out["deciles"]] == [(0.0, 0.0), (1.0, 0.0), (2.0, 1.0),
                                                                      (3.0, 1.0)]


def test_text_measures_find_the_known_placement():
    policy, mode = counting_policy()
    with torch.no_grad():
        out = text_measures(policy, mode, TASK, ROWS, Teacher(), batch_size=4, max_tokens=LENGTH)
    # 60 true tokens: every digit 6 times; thoughts before the 30 odd ones and the 6 zeros
    assert out["placement"]["num_tokens"] == 60
    assert math.isclose(out["after_thought_per_100"], 100 * 36 / 60)
    s_odd, s_even = surprisal(1.0), surprisal(4.0)
    teacher = out["placement"]["teacher"]
    assert math.isclose(teacher["after_thought"], (30 * s_odd + 6 * s_even) / 36, rel_tol=1e-5)
    assert math.isclose(teacher["after_text"], s_even, rel_tol=1e-5)
    phi = (30 * 24 - 6 * 0) / math.sqrt(36 * 24 * 30 * 30)
    assert math.isclose(teacher["spearman"], phi, rel_tol=1e-6)
    assert math.isclose(out["teacher_nll"], (s_odd + s_even) / 2, rel_tol=1e-5)
    # the propensity where it decides: ~1 before the 36 (think logit 30); before the 24 others the two
    # thinking logits are 0 against the right token's 5 and ten text zeros
    want_low = 2 / (math.exp(5.0) + T - 1 + 2)
    assert math.isclose(out["placement"]["propensity"], (36 + 24 * want_low) / 60, rel_tol=1e-5)
    assert math.isclose(teacher["spearman_propensity"], phi, rel_tol=1e-6)
    easy, hard = teacher["deciles"]  # two surprisal values: two bins; the 30 even tokens include the 6 zeros
    assert easy["n"] == 30 and easy["propensity"] == pytest.approx((24 * want_low + 6) / 30, rel=1e-5)
    assert hard["n"] == 30 and hard["rate"] == 1.0
    # with its thoughts every token has logit 5; without them the 36 it thinks before drop to 2
    assert math.isclose(out["nll"], surprisal(5.0), rel_tol=1e-5)
    no = out["controls"]["no_thoughts"]["nll"]
    assert math.isclose(no, (36 * surprisal(2.0) + 24 * surprisal(5.0)) / 60, rel_tol=1e-5)
    student = out["placement"]["student"]  # surprisal without thoughts: exactly the tokens thought before
    assert student["spearman"] == 1.0 and math.isclose(student["after_thought"], surprisal(2.0), rel_tol=1e-5)
    assert out["controls"]["pause"]["nll"] == out["nll"]  # the pause input is <think0>: what it thinks anyway
    assert len(out["rollouts"]) == 8
    shown = out["rollouts"][0]
    texts = [s for s in shown["steps"] if s["kind"] == "text"]
    assert len(texts) == shown["num_text"] and all("teacher_logprob" in s for s in texts)


def test_reverse_kl_matches_the_exact_kl():
    """A policy without thoughts whose right token always has logit 2, against a uniform teacher: the exact
    per-token KL(p || uniform) is log T - H(p) at every position, whatever was sampled before."""
    policy, mode = counting_policy(low=2.0, high=2.0, max_thoughts=1, greedy=False)
    uniform = Teacher(odd=0.0, even=0.0)
    rows = [ROWS[i % 10] for i in range(600)]  # ~3,000 tokens: the standard error is ~0.018
    with torch.no_grad():
        from dataclasses import replace

        from thinktok.models.thought_modes import VocabThoughts

        text_only = VocabThoughts(replace(mode.cfg, max_thought_tokens=0), mode.vocab, mode.sampling)
        out = text_measures(policy, text_only, TASK, rows, uniform, batch_size=50, max_tokens=LENGTH)
    p = torch.softmax(torch.tensor([2.0] + [0.0] * (T - 1)), -1)
    exact = math.log(T) + float((p * p.log()).sum())
    assert abs(out["reverse_kl"] - exact) < 0.06, (out["reverse_kl"], exact)  # 3.3 standard errors
    assert out["thoughts_per_100"] == 0


def test_thinktok_eval_on_a_text_checkpoint(tmp_path, capsys):
    """The real path: a (barely) trained tiny GPT-2 on the pydoc text with two thinking-token slots, scored
    against a teacher checkpoint; without a teacher the text task is refused with what to pass."""
    import json

    from thinktok.cli import main
    from thinktok.config import load_config
    from thinktok.errors import UserError
    from thinktok.sft import run_sft
    from thinktok.sft_config import SFTConfig

    cfg = load_config(SFTConfig, "configs/sft_text_student.yaml",
                      ["train.max_steps=2", "train.batch_size=4", "task.num_train=8", "task.num_val=4",
                       "task.num_test=4", f"run_dir={tmp_path / 'student'}", "thought.mode=vocab",
                       "thought.num_thinking=8", "slots=2"])
    run_sft(cfg)
    ckpt = str(cfg.checkpoint_dir)
    assert main(["eval", ckpt, "--limit", "4", "--max-new-tokens", "6", "--teacher", ckpt]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["task"] == "text" and out["num_examples"] == 4 and math.isfinite(out["reverse_kl"])
    assert set(out["controls"]) == {"no_thoughts", "pause", "shuffled_thoughts"}
    assert out["placement"]["num_tokens"] == 4 * 6  # 24-word continuations, cut at 6 tokens
    # --seed: another sample of continuations, another estimate of the same policy's reverse KL; the forced
    # true text's NLL does not depend on it
    again = ["eval", ckpt, "--limit", "4", "--max-new-tokens", "6", "--teacher", ckpt, "--seed", "1"]
    assert main(again) == 0
    other = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert other["reverse_kl"] != out["reverse_kl"] and other["nll"] == out["nll"]
    with pytest.raises(UserError, match="--teacher"):
        from thinktok.analysis.evaluate import evaluate

        evaluate(ckpt, None, limit=2, save=False)
    # an RL run's evals on the text task: these measures on validation rows, one evals.jsonl line each
    from thinktok.envs import load_task
    from thinktok.models.policy import load_policy
    from thinktok.rl.config import TrainConfig
    from thinktok.rl.logs import RunLogger

    run = load_config(TrainConfig, "configs/text_kl.yaml",
                      [f"run_dir={tmp_path / 'rl'}", f"policy={ckpt}", f"teacher={ckpt}", "task.num_train=8",
                       "task.num_val=4", "task.num_test=4", "thought.num_thinking=8", "thought.slots=2",
                       "sampling.max_new_tokens=6", "eval_examples=4", "samples_per_eval=4"])
    run.out_dir.mkdir(parents=True)
    policy = load_policy(ckpt, 8, False)
    logger = RunLogger(run, {"mode": make_mode(run.thought, policy.vocab, run.sampling)}, policy,
                       load_task(run.task))
    logger.rollouts = 32
    logger.evaluate(3, policy.model)
    (line,) = [json.loads(x) for x in (run.out_dir / "evals.jsonl").read_text().splitlines()]
    assert line["step"] == 3 and line["examples_seen"] == 3 * 32 and line["num_examples"] == 4
    assert math.isfinite(line["reverse_kl"]) and set(line["controls"]) == {"no_thoughts", "pause",
                                                                           "shuffled_thoughts"}
    assert "rollouts" not in line and (run.out_dir / "samples" / "step_3.html").exists()
