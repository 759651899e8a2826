"""Parallel thought rollouts: GPT-2 through the kernel, sampling vs teacher-forced recompute, isolation of
positions, and the scored gains against T separate sequential rollouts (the naive form, by hand)."""

import pytest
import torch

from thinktok.kernels.parallel_thought import parallel_thought_mask
from thinktok.models.parallel_gpt2 import MixingHead, layout_positions, parallel_hidden
from thinktok.models.policy import load_policy
from thinktok.models.teacher import Teacher
from thinktok.models.thought_config import SamplingConfig, ThoughtConfig
from thinktok.models.thought_modes import make_mode
from thinktok.rl.parallel.config import ParallelConfig
from thinktok.rl.parallel.rollout import sample_parallel, text_windows
from thinktok.rl.parallel.scorer import ParallelScorer, position_advantages, score, true_targets

B, T, L = 2, 6, 3  # two rows: the interpreted kernel costs per (row, head) program


def setup(num_thinking: int = 8):
    policy = load_policy("tiny", num_thinking, False)
    mode = make_mode(ThoughtConfig(mode="vocab", num_thinking=num_thinking), policy.vocab, SamplingConfig())
    real = torch.randint(0, 50257, (B, T), generator=torch.Generator().manual_seed(0))
    return policy, mode, real


def with_true_targets(rollout):
    rollout.target_ids, rollout.target_p = true_targets(rollout.text)
    return rollout


def test_gpt2_with_kernel_equals_explicit_mask():
    policy, _, real = setup()
    model = policy.model.eval()
    ids = torch.cat([real, torch.randint(50257, 50265, (B, T * L))], dim=1)
    mask = parallel_thought_mask(T, L)
    dense = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))[None, None].expand(B, 1, -1, -1)
    with torch.no_grad():
        ours = parallel_hidden(model, ids, T, L)
        ref = model.base_model(input_ids=ids, position_ids=layout_positions(T, L).expand(B, -1),
                               attention_mask=dense).last_hidden_state
    assert (ours - ref).abs().max() < 1e-4
    assert model.config._attn_implementation != "parallel_thought"  # restored after the call


def test_sampler_matches_recompute_and_thoughts_are_thinking_tokens():
    policy, mode, real = setup()
    rollout = with_true_targets(sample_parallel(policy.model, mode, real, L, seed=1))
    assert rollout.thoughts.shape == (B, T, L)
    assert ((rollout.thoughts >= 50257) & (rollout.thoughts < 50265)).all()
    with torch.no_grad():
        scored = score(policy.model, mode, rollout, lookahead=2)
    assert torch.allclose(scored.thought_logprob, rollout.logprob, atol=1e-5)
    again = sample_parallel(policy.model, mode, real, L, seed=1)
    assert torch.equal(again.thoughts, rollout.thoughts)
    assert not torch.equal(sample_parallel(policy.model, mode, real, L, seed=2).thoughts, rollout.thoughts)


def test_positions_are_isolated():
    """A thought at position 2 changes nothing at any other position."""
    policy, mode, real = setup()
    rollout = sample_parallel(policy.model, mode, real, L, seed=2)
    with torch.no_grad():
        base = parallel_hidden(policy.model, rollout.layout(1), T, L)
        rollout.thoughts[:, 2] = 50257 + (rollout.thoughts[:, 2] - 50257 + 1) % 8
        changed = parallel_hidden(policy.model, rollout.layout(1), T, L)
    pos2 = torch.arange(T + 2 * L, T + 3 * L)
    others = torch.ones(T * (1 + L), dtype=torch.bool)
    others[pos2] = False
    assert torch.allclose(base[:, others], changed[:, others], atol=1e-5)
    assert not torch.allclose(base[:, pos2], changed[:, pos2], atol=1e-3)


def sequential_reference(model, real, thoughts, ids, p, lookahead):
    """The naive form, one window row and position at a time: run x_{<=t}, the thought, then x_{t+1..} as an
    ordinary causal sequence and read off each prediction's expected log-prob of the targets."""
    lo = 50257
    b, t, _ = thoughts.shape
    post = torch.zeros(b, t, lookahead)
    base = torch.zeros(b, t, lookahead)
    with torch.no_grad():
        plain = model(input_ids=real).logits[..., :lo].log_softmax(-1)  # (B, T, V)
        for i in range(b):
            for pos in range(t):
                seq = torch.cat([real[i, : pos + 1], thoughts[i, pos], real[i, pos + 1 : pos + lookahead]])
                lp = model(input_ids=seq[None]).logits[0, :, :lo].log_softmax(-1)
                for k in range(lookahead):
                    if pos + k + 1 < t:
                        row = pos + k
                        post[i, pos, k] = (p[i, row] * lp[pos + thoughts.shape[2] + k, ids[i, row]]).sum()
                        base[i, pos, k] = (p[i, row] * plain[i, row, ids[i, row]]).sum()
    return post, base


@pytest.mark.parametrize("scorer", ["policy", "teacher"])
def test_gain_equals_separate_rollouts(scorer, monkeypatch):
    if scorer == "teacher":  # the scorer's logic on the CPU path; the policy case runs the kernel
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    policy, mode, real = setup()
    model = policy.model.eval()
    teacher = Teacher(load_policy("tiny", 0, False, seed=7).model) if scorer == "teacher" else None
    cfg = ParallelConfig(num_text=T, thought_len=L, lookahead=3, scorer=scorer, teacher_top_k=5)
    scorer_ = ParallelScorer(cfg, model, mode, teacher=teacher)
    rollout = scorer_(sample_parallel(model, mode, real, L, seed=3))
    if scorer == "teacher":  # the targets are the teacher's top-5 next tokens, renormalised
        top = teacher.model(input_ids=real).logits.topk(5, -1)
        assert torch.equal(rollout.target_ids, top.indices)
        assert torch.allclose(rollout.target_p, top.values.softmax(-1))
    post, base = sequential_reference(model, real, rollout.thoughts, rollout.target_ids, rollout.target_p, 3)
    with torch.no_grad():
        scored = score(model, mode, rollout, 3)
    valid = scored.valid
    assert torch.allclose(scored.post * valid, post, atol=1e-4)
    assert torch.allclose(scored.base * valid, base, atol=1e-4)
    assert torch.allclose(rollout.gain, (post - base).sum(-1), atol=1e-4)
    assert (rollout.gain[:, -1] == 0).all() and rollout.gain[:, 0].abs().sum() > 0


def test_mixing_head_starts_from_the_base_model_and_learns(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the head's logic on the CPU path; the kernel: above
    policy, mode, real = setup()
    head = MixingHead(policy.model.config.hidden_size)
    rollout = with_true_targets(sample_parallel(policy.model, mode, real, L, seed=4))
    scored = score(policy.model, mode, rollout, 2, head)
    # w = sigmoid(-5) = 0.0067: within 1% of the base model's predictions
    gap = ((scored.post - scored.base) * scored.valid).abs().max()
    assert gap <= 0.02 * ((scored.post_raw - scored.base) * scored.valid).abs().max() + 1e-5
    scored.nll().backward()
    assert head.net[-1].weight.grad.abs().sum() > 0  # yet the head gets a gradient from the first step
    with torch.no_grad():
        head.net[-1].bias.fill_(20.0)  # w = sigmoid(20) ~ 1: the post-thought prediction
        mixed = score(policy.model, mode, rollout, 2, head)
        plain = score(policy.model, mode, rollout, 2)
    assert torch.allclose(mixed.post * mixed.valid, plain.post * plain.valid, atol=1e-4)
    assert torch.allclose(mixed.gain_raw, plain.gain, atol=1e-4)  # the unmixed gain is reported beside it


def test_mixing_head_is_a_convex_mix():
    """w < 0 extrapolated away from the thought: a thought that lowers the target's log-prob from -0.69 to
    -2.13 scored +0.57 at w = -0.995. Bounded to [0, 1], over two tokens the mixed log-prob lies between the
    two passes', so a harmful thought never scores a positive gain, whatever the head learned."""
    torch.manual_seed(0)
    head = MixingHead(8)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 3.0)
        head.net[-1].bias.fill_(-5.0)  # pushes the raw output negative, where tanh went below 0
    pre_h, post_h = torch.randn(1000, 8), torch.randn(1000, 8)
    w = head(pre_h, post_h)
    assert (w >= 0).all() and (w <= 1).all()  # in (0, 1); float rounds the far tails to 0 and 1
    # never a dead unit: every input still sends the head a gradient (a clamp at 0 did not)
    w.sum().backward()
    assert head.net[-1].bias.grad.abs() > 0
    pre = torch.tensor([0.0, 0.0])  # target (token 0) log-prob -0.69
    post = torch.tensor([-1.0, 0.75])  # -2.13 after the thought
    mixed = pre + w * (post - pre)  # (1000, 2)
    gain = mixed.log_softmax(-1)[:, 0] - pre.log_softmax(-1)[0]
    assert (gain <= 1e-7).all()


def test_position_advantages_by_hand():
    gain = torch.tensor([[1.0, 2.0, 5.0], [3.0, 0.0, 7.0], [0.0, 1.0, 1.0], [2.0, 1.0, 1.0]])
    adv = position_advantages(gain, group=2, algo="grpo", positive_only=False)
    assert torch.equal(adv,
                       torch.tensor([[-1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(position_advantages(gain, 2, "grpo", True), adv.clamp_min(0))
    assert torch.equal(position_advantages(gain, 2, "rloo", False), 2 * adv)  # leave-one-out: G/(G-1)


def test_text_windows_and_config_errors():
    assert text_windows([[1, 2, 3], [4, 5]], 3, eos=0) == [[1, 2, 3], [0, 4, 5]]
    with pytest.raises(ValueError, match="fewer than one window"):
        text_windows([[1]], 8, eos=0)
    with pytest.raises(ValueError, match="scorer"):
        ParallelConfig(scorer="oracle").validate()
    with pytest.raises(ValueError, match="needs a teacher"):
        policy, mode, _ = setup()
        ParallelScorer(ParallelConfig(scorer="teacher"), policy.model, mode)
