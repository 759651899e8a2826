"""Distributions in the head's columns: sampling over a task head's K columns draws the same tokens, under the
same seed, as the sampler did over all V columns, with the same log-probs; so do the recompute, the entropies,
the text distribution and the gold-answer score. The reference is `tests/data/golden_rollouts.pt`, written by
the V-wide code (tests/golden.py) for every mode and both heads."""

import pytest
import torch

from conftest import MODE_CASES
from golden import GOLD, HEADS, PATH, PROMPTS, build
from thinktok.analysis.controls import control_modes, derange, thought_inputs
from thinktok.errors import UserError
from thinktok.models.head import head_columns
from thinktok.models.thought_config import ThoughtConfig
from thinktok.models.thought_modes import make_mode
from thinktok.rl.recompute import gold_answer_loglik, own_text_logprobs, recompute_logprobs
from thinktok.rl.sampler import sample

GOLDEN = torch.load(PATH)


def close(a, b, tol=1e-5):
    """Absolute, relative for large densities (a Gaussian over D dims sums D terms). 1e-5: the reference was
    written on another machine, and fp32 matmuls differ between CPUs' kernels by ~1e-6 (measured on a second
    2-core machine: up to 2.7e-6 in a log-prob, and in a continuous thought's hidden state); the draws
    themselves must be identical."""
    return ((a - b).abs() <= tol * torch.clamp(b.abs(), min=1.0)).all()


@pytest.mark.parametrize("head", HEADS)
def test_same_draws_and_logprobs_as_the_full_width_sampler(case, head):
    policy, cpu_mode = build(case, head)
    mode = make_mode(cpu_mode.cfg, policy.vocab, cpu_mode.sampling, head_columns(policy.model))
    want = GOLDEN[case, head]
    rollouts = sample(policy.model, mode, PROMPTS, seed=11)
    for r, w in zip(rollouts, want["rollouts"]):
        assert torch.equal(r.action, w["action"]) and torch.equal(r.token, w["token"]), (case, head)
        assert close(r.logprob, w["logprob"])
        for name in ("vector", "soft_ids", "soft_w"):
            got, ref = getattr(r, name), w[name]
            assert (got is None) == (ref is None) and (got is None or close(got.float(), ref.float()))
    rec = recompute_logprobs(policy.model, mode, rollouts, text=True)
    assert close(rec.logprob, want["logprob"]) and close(rec.entropy, want["entropy"], 1e-4)
    own = torch.tensor(want["own_text"])
    assert close(rec.text_logp.gather(1, mode.column_of(own)[:, None])[:, 0], want["text_logp_own"])
    assert close(torch.cat(own_text_logprobs(policy.model, mode, rollouts)), want["text_logp_own"])
    assert close(gold_answer_loglik(policy.model, mode, rollouts, GOLD), want["gold_loglik"])
    if head == "task":  # the distributions themselves were computed over the head's columns only
        k = len(head_columns(policy.model))
        assert k < 100 and rec.text_logp.shape[1] == mode.n_text == k - (policy.vocab.size
                                                                          - policy.vocab.text_size)


def test_a_mode_built_for_another_head_is_refused():
    policy, mode = build("vocab", "task")  # the mode of `make` is built over every column
    with pytest.raises(UserError, match="head_columns"):
        sample(policy.model, mode, PROMPTS, seed=0)


def test_ids_outside_the_head_are_refused():
    policy, _ = build("vocab", "task")
    mode = make_mode(ThoughtConfig(**MODE_CASES["vocab"]), policy.vocab, _.sampling,
                     head_columns(policy.model))
    rollouts = sample(policy.model, mode, PROMPTS, seed=0)
    rollouts[0].token[-1] = 262  # " the": not a multiplication token
    rollouts[0].action[-1] = 1
    with pytest.raises(UserError, match="outside the model's task head"):
        recompute_logprobs(policy.model, mode, rollouts)


def test_the_eval_controls_sample_over_a_task_head():
    """The controls are modes of their own (analysis/controls.py): each must be built over the model's head,
    and the no-thoughts control must sample text only."""
    policy, _ = build("vocab", "task")
    mode = make_mode(ThoughtConfig(**MODE_CASES["vocab"]), policy.vocab, _.sampling,
                     head_columns(policy.model))
    embed = policy.model.get_input_embeddings()
    rollouts = sample(policy.model, mode, PROMPTS, seed=0)
    controls = control_modes(mode, derange(thought_inputs(rollouts, mode, embed)), embed)
    for name, control in controls.items():
        out = sample(policy.model, control, PROMPTS, seed=0)
        allowed = set(head_columns(policy.model).tolist())
        assert all(set(r.token.tolist()) <= allowed for r in out), name
    assert all(r.num_thought == 0 for r in sample(policy.model, controls["no_thoughts"], PROMPTS, seed=0))
