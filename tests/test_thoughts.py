"""Each mode's log-prob against a hand computation, and the modes' stopping rules."""

import math

import pytest
import torch

from conftest import make
from thinktok.models.thought_config import SamplingConfig, ThoughtConfig, check_trainable
from thinktok.models.thought_modes import make_mode
from thinktok.models.thoughts import Action
from thinktok.models.vocab import ThinkingVocab

V = ThinkingVocab(text_size=10, num_thinking=3, markers=False, eos_id=9)
VM = ThinkingVocab(text_size=10, num_thinking=0, markers=True, eos_id=9)  # ids 10, 11 = <bot>, <eot>


def mode(vocab=V, sampling=None, **cfg):
    return make_mode(ThoughtConfig(**cfg), vocab, sampling or SamplingConfig())


def test_token_logprob_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 13)
    m = mode(mode="vocab", num_thinking=3)
    lp = m.token_logprobs(logits, torch.tensor([True, False]))
    # row 0: thinking allowed, full softmax; row 1: only the 10 text tokens
    assert torch.allclose(lp[0], logits[0] - torch.logsumexp(logits[0], 0), atol=1e-6)
    assert torch.allclose(lp[1, :10], logits[1, :10] - torch.logsumexp(logits[1, :10], 0), atol=1e-6)
    assert torch.isinf(lp[1, 10:]).all()
    hot = mode(mode="vocab", num_thinking=3, sampling=SamplingConfig(temperature=2.0, top_k=4))
    lp = hot.token_logprobs(logits[:1], torch.tensor([True]))[0]
    top = logits[0].topk(4).indices
    expect = logits[0, top] / 2 - torch.logsumexp(logits[0, top] / 2, 0)
    assert torch.allclose(lp[top], expect, atol=1e-6)
    assert torch.isinf(lp).sum() == 13 - 4


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * 9]))
    lp = mode(mode="vocab", num_thinking=3, sampling=SamplingConfig(top_p=0.7)).token_logprobs(
        logits, torch.tensor([True]))
    assert torch.allclose(lp[0, :2].exp(), torch.tensor([0.5, 0.3]) / 0.8, atol=1e-6)
    assert torch.isinf(lp[0, 2:]).all()


@pytest.mark.parametrize("scale", ["joint", "per_dim"])
def test_gaussian_and_stop_logprob_by_hand(scale):
    torch.manual_seed(1)
    m = mode(VM, mode="continuous", num_thinking=0, sigma=0.3, learned_stop=True, density_scale=scale)
    h, x, logits = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 12)
    d = 5
    gauss = -0.5 * (((x - h) / 0.3) ** 2).sum(-1) - d * math.log(0.3) - 0.5 * d * math.log(2 * math.pi)
    gauss = gauss / d if scale == "per_dim" else gauss  # per dimension; the stop term is a token's, unscaled
    p_eot = logits.softmax(-1)[:, 11]
    action = torch.tensor([Action.VECTOR, Action.STOP])
    got = m.action_logprobs(action, torch.tensor([-1, 11]), logits, h, vector=x)
    assert torch.allclose(got, torch.stack([gauss[0] + torch.log1p(-p_eot[0]), p_eot[1].log()]), atol=1e-5)


def test_learned_sigma_gets_a_gradient():
    m = mode(VM, mode="continuous", num_thinking=0, sigma=0.5, learn_sigma=True, density_scale="joint")
    lp = m.vector_logprob(torch.ones(3, 4), torch.zeros(3, 4))
    lp.sum().backward()
    # d/dlog_sigma of sum_i -0.5 z_i^2 - log sigma, z = 1/sigma  ->  sum_i (z_i^2 - 1)
    assert m.log_sigma.grad == pytest.approx(3 * 4 * (1 / 0.25 - 1), rel=1e-5)


def test_soft_densities_by_hand():
    p = torch.tensor([[0.6, 0.3, 0.1]])
    w = torch.tensor([[0.5, 0.2, 0.3]])
    k, tau = 3, 0.5
    # Concrete (Gumbel-softmax) density, Maddison et al. 2017
    concrete = (math.lgamma(k) + (k - 1) * math.log(tau) + (p.log() - (tau + 1) * w.log()).sum()
                - k * torch.log((p * w ** -tau).sum()))
    got = mode(VM, mode="soft", num_thinking=0, noise="gumbel", gumbel_tau=tau,
               density_scale="joint").soft_logprob(p, w)
    assert got.item() == pytest.approx(concrete.item(), rel=1e-5)
    per_dim = mode(VM, mode="soft", num_thinking=0, noise="gumbel", gumbel_tau=tau).soft_logprob(p, w)
    # the simplex has k-1 dimensions
    assert per_dim.item() == pytest.approx(concrete.item() / (k - 1), rel=1e-5)
    a = 2.0 * p[0]
    dirichlet = torch.lgamma(a.sum()) - torch.lgamma(a).sum() + ((a - 1) * w[0].log()).sum()
    got = mode(VM, mode="soft", num_thinking=0, noise="dirichlet", dirichlet_alpha=2.0,
               density_scale="joint").soft_logprob(p, w)
    assert got.item() == pytest.approx(dirichlet.item(), rel=1e-5)
    assert mode(VM, mode="soft", num_thinking=0, noise="none").soft_logprob(p, w).item() == 0


def test_soft_mixture_is_weighted_embedding():
    policy, m = make("soft-gumbel")
    from thinktok.rl.sampler import sample

    r = sample(policy.model, m, [[1105, 1635]])[0]
    assert r.action[0] == Action.FORCED and r.token[0] == policy.vocab.bot_id
    assert (r.action[1:4] == Action.SOFT).all() and r.token[4] == policy.vocab.eot_id
    assert r.soft_ids.shape[1] == 10 and torch.allclose(r.soft_w[1:4].sum(-1), torch.ones(3))
    assert (r.soft_ids[1:4] < policy.vocab.text_size).all()  # mixtures over text tokens only


@pytest.mark.parametrize("bad, match", [
    (dict(mode="telepathy"), "unknown thought mode"),
    (dict(mode="vocab", num_thinking=0), "num_thinking >= 1"),
    (dict(mode="vocab", max_thought_tokens=-1), "max_thought_tokens must be >= 0"),
    (dict(mode="soft", noise="laplace"), "unknown soft noise"),
    (dict(mode="single", num_thinking=5), "exactly one thinking token"),
    (dict(mode="continuous", sigma=0.0, learn_sigma=True), "sigma"),
    (dict(mode="soft", learned_stop=True), "learned_stop is a continuous-mode option"),
    (dict(mode="continuous", density_scale="sqrt"), "unknown density_scale"),
    (dict(mode="single", num_thinking=1, slots=2), "it is mode pause"),
    (dict(mode="pause", slots=2), "use num_pause"),
    (dict(mode="continuous", slots=2, learned_stop=True), "set learned_stop: false"),
    (dict(mode="soft", slots=2, slots_at="every"), "slots_at=every is for mode vocab"),
    (dict(mode="vocab", slots=-1), "slots must be >= 0"),
])
def test_config_errors_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        ThoughtConfig(**bad).validate()


def test_mode_must_match_vocabulary():
    with pytest.raises(ValueError, match="needs 64 thinking tokens"):
        make_mode(ThoughtConfig(mode="vocab"), V, SamplingConfig())


@pytest.mark.parametrize("thought, sampling, match", [
    (dict(mode="continuous", sigma=0.0), {}, "sigma=0 makes continuous thoughts deterministic"),
    (dict(mode="soft", noise="none"), {}, "noise=none makes soft thoughts deterministic"),
    (dict(mode="soft", soft_top_k=0), {}, "soft_top_k=0"),
    (dict(mode="soft", soft_top_k=1), {}, "soft_top_k=1"),
    (dict(mode="vocab"), dict(greedy=True), "greedy is for evaluation"),
])
def test_untrainable_settings_are_refused_for_rl(thought, sampling, match):
    """Log-prob 0 and a constant action: no gradient by any route, yet counted in the loss normaliser."""
    with pytest.raises(ValueError, match=match):
        check_trainable(ThoughtConfig(**thought), SamplingConfig(**sampling))
    check_trainable(ThoughtConfig(mode="soft"), SamplingConfig())  # the defaults train


def test_recompute_keeps_the_sampled_token_at_the_filter_edge():
    """A last-bit difference between sampler and recompute can move a sampled token just past top-k: its
    log-prob must stay finite (and equal the filtered distribution renormalised with it kept)."""
    m = mode(mode="vocab", num_thinking=3, sampling=SamplingConfig(top_k=2))
    logits = torch.tensor([[3.0, 2.0, 2.0 - 1e-6] + [-5.0] * 10])  # token 2 sampled when it tied with token 1
    lp = m.action_logprobs(torch.tensor([Action.FREE]), torch.tensor([2]), logits, torch.zeros(1, 4))
    kept = torch.tensor([3.0, 2.0, 2.0 - 1e-6])
    assert lp.item() == pytest.approx((kept[2] - kept.logsumexp(0)).item(), abs=1e-6)
    inside = m.action_logprobs(torch.tensor([Action.FREE]), torch.tensor([0]), logits, torch.zeros(1, 4))
    assert inside.item() == pytest.approx((3.0 - torch.tensor([3.0, 2.0]).logsumexp(0)).item(), abs=1e-6)


def test_text_logprobs_ignore_sampling_settings():
    """Rewards read the plain text distribution: text columns renormalised, temperature 1, no filter."""
    torch.manual_seed(2)
    logits = torch.randn(3, 13)
    hot = mode(mode="vocab", num_thinking=3, sampling=SamplingConfig(temperature=0.5, top_k=2, top_p=0.5))
    expect = torch.stack([torch.log(logits[i, :10].exp() / logits[i, :10].exp().sum()) for i in range(3)])
    assert torch.allclose(hot.text_logprobs(logits), expect, atol=1e-6)


def test_inverse_cdf_sampling():
    """One uniform per row: frequencies follow p, zero-probability ids (banned columns) never come out."""
    from thinktok.models.thoughts import inverse_cdf

    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    torch.manual_seed(0)
    ids = inverse_cdf(p.expand(20000, -1))[:, 0]
    freq = torch.bincount(ids, minlength=6).float() / len(ids)
    assert freq[p == 0].sum() == 0 and (freq - p).abs().max() < 0.02
