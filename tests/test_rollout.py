"""The rollout engine: sampler vs teacher-forced recompute, KV cache vs none, determinism, stopping."""

import pytest
import torch

from conftest import make
from thinktok.models.thoughts import Action
from thinktok.rl.recompute import recompute_logprobs
from thinktok.rl.sampler import sample

PROMPTS = [[1105, 1635, 4974, 796], [15496], [40, 588, 11]]  # different lengths: left padding


def close(a, b):
    """fp32 agreement: 1e-5 absolute, relative for large densities (a Gaussian over D dims sums D terms)."""
    return ((a - b).abs() <= 1e-5 * torch.clamp(b.abs(), min=1.0)).all()


def test_recompute_matches_sampler(case):
    policy, mode = make(case)
    rollouts = sample(policy.model, mode, PROMPTS, seed=3)
    rec = recompute_logprobs(policy.model, mode, rollouts)
    lp, valid = rec.logprob, rec.valid
    for i, r in enumerate(rollouts):
        assert valid[i].sum() == r.num_steps
        assert close(lp[i, : r.num_steps], r.logprob), (case, lp[i, : r.num_steps] - r.logprob)
    # stochastic actions carry real log-probs, forced ones none
    sampled = torch.cat([r.action for r in rollouts]) != Action.FORCED
    assert torch.cat([r.logprob for r in rollouts])[~sampled].eq(0).all()


def steps_where(rollouts, rec, pick):
    """(B, S_max) bool of the steps `pick(rollout)` selects, on the recompute's grid."""
    mask = torch.zeros_like(rec.valid)
    for i, r in enumerate(rollouts):
        mask[i, : r.num_steps] = pick(r)
    return mask


def test_recompute_is_differentiable():
    """Vector steps alone reach the network through h and reach a learned sigma; thought-token steps alone
    reach the thinking rows; forced steps reach nothing."""
    policy, mode = make("continuous")
    mode.log_sigma.requires_grad_(True)
    rollouts = sample(policy.model, mode, PROMPTS, seed=0)
    rec = recompute_logprobs(policy.model, mode, rollouts)
    vec = steps_where(rollouts, rec, lambda r: r.action == Action.VECTOR)
    assert vec.sum() == 3 * 3
    rec.logprob[vec].sum().backward()
    assert policy.model.transformer.ln_f.weight.grad.abs().sum() > 0  # d log N(x; h, s) / dh flows back
    assert policy.model.transformer.h[0].mlp.c_fc.weight.grad.abs().sum() > 0
    assert mode.log_sigma.grad.abs() > 0

    policy, mode = make("vocab")
    rollouts = sample(policy.model, mode, PROMPTS, seed=0)
    rec = recompute_logprobs(policy.model, mode, rollouts)
    think = steps_where(rollouts, rec, lambda r: r.is_chosen_thought)
    assert think.sum() > 0
    rec.logprob[think].sum().backward()
    rows = policy.model.get_input_embeddings().weight.grad[policy.vocab.text_size : policy.vocab.size]
    chosen = {t - policy.vocab.text_size for r in rollouts for t in r.token[r.is_chosen_thought].tolist()}
    assert all(rows[j].abs().sum() > 0 for j in chosen)

    policy, mode = make("pause-prompt")
    rollouts = sample(policy.model, mode, PROMPTS, seed=0)
    rec = recompute_logprobs(policy.model, mode, rollouts)
    forced = steps_where(rollouts, rec, lambda r: r.action == Action.FORCED)
    assert forced.sum() == 3 * 3  # 3 prompts x 3 pauses
    assert rec.logprob[forced].eq(0).all()
    policy.model.zero_grad()
    (rec.logprob * forced).sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in policy.model.parameters())


def test_deterministic_under_seed():
    policy, mode = make("soft-dirichlet")
    a, b, c = (sample(policy.model, mode, PROMPTS, seed=s) for s in (7, 7, 8))
    assert all(torch.equal(x.token, y.token) and torch.equal(x.soft_w, y.soft_w) for x, y in zip(a, b))
    assert any(not torch.equal(x.soft_w, z.soft_w) for x, z in zip(a, c))
    torch.manual_seed(0)
    ref = torch.rand(1)
    torch.manual_seed(0)
    sample(policy.model, mode, PROMPTS, seed=1)
    assert torch.rand(1) == ref  # the caller's RNG stream is untouched


def test_padding_does_not_change_logprobs():
    policy, mode = make("vocab")
    rollouts = sample(policy.model, mode, PROMPTS, seed=2)
    together = recompute_logprobs(policy.model, mode, rollouts).logprob
    for i, r in enumerate(rollouts):
        alone = recompute_logprobs(policy.model, mode, [r]).logprob
        assert close(alone[0], together[i, : r.num_steps])


def test_vocab_budget_and_text_view():
    policy, mode = make("vocab", max_new_tokens=5)
    rollouts = sample(policy.model, mode, PROMPTS * 3, seed=0)
    assert sum(r.num_thought for r in rollouts) > 0  # the boosted model does think
    for r in rollouts:
        assert r.num_thought <= 4 and r.num_text <= 5
        n_before = torch.cumsum(~r.is_text, 0) - (~r.is_text).long()  # thoughts before each step
        # thinking tokens may be chosen exactly while under budget
        assert torch.equal(r.action == Action.FREE, n_before < 4)
        assert all(t < policy.vocab.text_size for t in r.text_view)
        assert r.text_view == r.prompt_ids + [t for t in r.token.tolist() if t < policy.vocab.text_size]


def test_pause_every_inserts_k_before_each_text_token():
    policy, mode = make("pause-every", max_new_tokens=3)
    r = sample(policy.model, mode, PROMPTS[:1], seed=0)[0]
    v = policy.vocab
    assert r.token.tolist()[0:2] == [v.think_id(0), v.think_id(1)] and r.action.tolist()[:3] == [0, 0, 1]
    assert r.num_thought == 2 * r.num_text


def test_vocab_slots_sample_content_only():
    """slots=3: exactly three thinking tokens after the prompt, each drawn from the thinking columns alone
    (its log-prob by hand: a softmax over those N logits), then text only, whatever the boosted rows would
    win."""
    policy, mode = make("vocab-slots", max_new_tokens=4)
    v = policy.vocab
    rollouts = sample(policy.model, mode, PROMPTS, seed=1)
    for p, r in zip(PROMPTS, rollouts):
        assert r.action.tolist()[:3] == [Action.THINK] * 3 and (r.action[3:] == Action.TEXT).all()
        assert ((r.token[:3] >= v.think_start) & (r.token[:3] < v.think_start + 8)).all()
        assert r.num_thought == 3 and r.is_chosen_thought.sum() == 3
        with torch.no_grad():
            logits = policy.model(torch.tensor([p + r.token[:2].tolist()])).logits[0, -1]
        think = logits[v.think_start : v.think_start + 8]
        by_hand = think[r.token[2] - v.think_start] - torch.log(torch.exp(think).sum())
        assert abs(r.logprob[2].item() - by_hand.item()) < 1e-5


def test_vocab_slots_every_and_soft_slots_fix_the_count():
    policy, mode = make("vocab-slots-every", max_new_tokens=3)
    r = sample(policy.model, mode, PROMPTS[:1], seed=0)[0]
    assert r.action.tolist() == [Action.THINK, Action.TEXT] * r.num_text and r.num_text >= 1
    policy, mode = make("soft-slots")  # a cold stop would end thinking after one step: slots switch it off
    r = sample(policy.model, mode, PROMPTS[:1])[0]
    assert r.action.tolist()[:4] == [Action.FORCED, Action.SOFT, Action.SOFT, Action.FORCED]


def test_continuous_fixed_count_and_learned_stop():
    policy, mode = make("continuous")
    r = sample(policy.model, mode, PROMPTS[:1])[0]
    assert r.action.tolist()[:5] == [Action.FORCED, Action.VECTOR, Action.VECTOR, Action.VECTOR,
                                     Action.FORCED]
    assert r.token[4] == policy.vocab.eot_id
    policy, mode = make("continuous-stop")
    with torch.no_grad():  # make <eot> overwhelmingly likely: the policy stops at once
        policy.model.get_input_embeddings().weight[policy.vocab.eot_id] *= 500
    r = sample(policy.model, mode, PROMPTS[:1])[0]
    assert r.action.tolist()[:2] == [Action.FORCED, Action.STOP]


def test_soft_cold_stop():
    policy, mode = make("soft-none-cold")
    r = sample(policy.model, mode, PROMPTS[:1])[0]
    # entropy is always under the (huge) threshold: the second low-entropy step becomes <eot>
    assert r.action.tolist()[:3] == [Action.FORCED, Action.SOFT, Action.FORCED]
    assert r.token[2] == policy.vocab.eot_id


def test_out_of_range_ids_are_rejected():
    policy, mode = make("vocab")
    with pytest.raises(ValueError, match="out of range"):
        sample(policy.model, mode, [[1, 2, 10**6]])
    with pytest.raises(ValueError, match="at least one token"):
        sample(policy.model, mode, [[]])


def test_vector_step_gradient_is_on_a_token_scale():
    """A continuous step's summed Gaussian density had a gradient 20x a text step's (median over steps, all
    parameters; sigma 0.1, D 128): with a global clip, text learning starved. Per dimension it is below 1x."""
    def median_norms(scale):
        policy, mode = make("continuous")
        mode.cfg.density_scale = scale
        rollouts = sample(policy.model, mode, PROMPTS, seed=0)
        norms = {Action.VECTOR: [], Action.TEXT: []}
        for r in rollouts:
            for s in range(r.num_steps):
                if int(r.action[s]) in norms:
                    policy.model.zero_grad()
                    recompute_logprobs(policy.model, mode, [r]).logprob[0, s].backward()
                    g = torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None])
                    norms[int(r.action[s])].append(g.norm())
        return torch.stack(norms[Action.VECTOR]).median() / torch.stack(norms[Action.TEXT]).median()

    assert median_norms("per_dim") < 1.0
    assert median_norms("joint") > 10.0  # what the default replaced


def same_rollouts(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.token, y.token) and torch.equal(x.action, y.action)
        assert close(x.logprob, y.logprob), (x.logprob - y.logprob).abs().max()
        for name in ("soft_ids", "soft_w"):
            if getattr(x, name) is not None:
                assert close(getattr(x, name).float(), getattr(y, name).float())
        if x.vector is not None:
            vec = x.action == Action.VECTOR
            assert close(x.vector[vec], y.vector[vec])


def check_static(case, compiled):
    policy, mode = make(case)
    dynamic = sample(policy.model, mode, PROMPTS, seed=5)
    same_rollouts(dynamic, sample(policy.model, mode, PROMPTS, seed=5, static=True, compile=compiled))
    # a second call reuses the sampler's buffers (and compiled graph): still the same, and seeds still matter
    same_rollouts(sample(policy.model, mode, PROMPTS[::-1], seed=6),
                  sample(policy.model, mode, PROMPTS[::-1], seed=6, static=True, compile=compiled))


def test_static_cache_matches_dynamic(case):
    """Preallocated cache, eager step = the dynamic path, left-padded prompts of different lengths."""
    check_static(case, compiled=False)


# one compile per mode's code path (single = vocab's code, compiled in test_compiled_vocab_step_stops_early;
# pause-prompt, continuous and soft-none-cold are covered eagerly above): a cold CPU compile takes 10-20 s
@pytest.mark.parametrize("case", ["pause-every", "continuous-stop", "soft-gumbel", "soft-dirichlet"])
def test_compiled_step_matches_dynamic(case):
    check_static(case, compiled=True)


def test_compiled_vocab_step_stops_early():
    """vocab's compiled step: thoughts, rows that end at different steps (EOS made likely), a loop that stops
    before its step budget, and a second call through the same buffers and graph."""
    policy, mode = make("vocab", max_new_tokens=24)
    with torch.no_grad():
        policy.model.get_input_embeddings().weight[policy.vocab.eos_id] *= 80
    dynamic = sample(policy.model, mode, PROMPTS * 2, seed=1)
    lengths = [r.num_steps for r in dynamic]
    assert len(set(lengths)) > 1 and max(lengths) < 24  # EOS ends rows early, at different steps
    assert all(r.token[-1] == policy.vocab.eos_id for r in dynamic if r.num_text < 24)
    assert sum(r.num_thought for r in dynamic) > 0
    same_rollouts(dynamic, sample(policy.model, mode, PROMPTS * 2, seed=1, compile=True))
    # a second call of the same batch shape (the sampler's buffers and compiled graph reused)
    same_rollouts(sample(policy.model, mode, PROMPTS[::-1] * 2, seed=2),
                  sample(policy.model, mode, PROMPTS[::-1] * 2, seed=2, compile=True))
