"""Parallel thought rollouts: GPT-2 through the kernel, sampling vs teacher-forced recompute, isolation of
positions, and the REINFORCE loss (kernel runs in the Triton interpreter on the CPU)."""

import torch

from thinktok.kernels import parallel_thought_mask
from thinktok.models.parallel import layout_positions, parallel_forward
from thinktok.models.policy import load_policy
from thinktok.models.thoughts import SamplingConfig, ThoughtConfig, make_mode
from thinktok.rl.parallel import parallel_loss, sample_parallel, thought_gain

T, L = 6, 3


def setup():
    policy = load_policy("tiny", 8, False)
    mode = make_mode(ThoughtConfig(mode="vocab", num_thinking=8), policy.vocab, SamplingConfig())
    real = torch.randint(0, 50257, (4, T), generator=torch.Generator().manual_seed(0))
    return policy, mode, real


def test_gpt2_with_kernel_equals_explicit_mask():
    policy, _, real = setup()
    model = policy.model.eval()
    ids = torch.cat([real, torch.randint(50257, 50265, (4, T * L))], dim=1)
    mask = parallel_thought_mask(T, L)
    dense = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))[None, None].expand(4, 1, -1, -1)
    with torch.no_grad():
        ours = parallel_forward(model, ids, T, L).logits
        ref = model(input_ids=ids, position_ids=layout_positions(T, L).expand(4, -1), attention_mask=dense).logits
    assert (ours - ref).abs().max() < 1e-4
    assert model.config._attn_implementation != "parallel_thought"  # restored after the call


def test_sampler_matches_recompute_and_thoughts_are_thinking_tokens():
    policy, mode, real = setup()
    rollout = sample_parallel(policy.model, mode, real, L, seed=1)
    assert rollout.thoughts.shape == (4, T, L)
    assert ((rollout.thoughts >= 50257) & (rollout.thoughts < 50265)).all()
    _, logp = thought_gain(policy.model, rollout, mode)
    assert torch.allclose(logp, rollout.logprob, atol=1e-5)
    again = sample_parallel(policy.model, mode, real, L, seed=1)
    assert torch.equal(again.thoughts, rollout.thoughts)


def test_positions_are_isolated():
    """A thought at position 2 changes nothing at any other position."""
    policy, mode, real = setup()
    rollout = sample_parallel(policy.model, mode, real, L, seed=2)
    with torch.no_grad():
        base = parallel_forward(policy.model, rollout.layout(), T, L).logits
        rollout.thoughts[:, 2] = 50257 + (rollout.thoughts[:, 2] - 50257 + 1) % 8
        changed = parallel_forward(policy.model, rollout.layout(), T, L).logits
    pos2 = torch.arange(T + 2 * L, T + 3 * L)
    others = torch.ones(T * (1 + L), dtype=torch.bool)
    others[pos2] = False
    assert torch.allclose(base[:, others], changed[:, others], atol=1e-5)
    assert not torch.allclose(base[:, pos2], changed[:, pos2], atol=1e-3)


def test_reinforce_loss_trains_thinking_rows():
    policy, mode, real = setup()
    group = 2
    rollout = sample_parallel(policy.model, mode, real.repeat_interleave(group, 0), L, seed=3)
    loss, stats = parallel_loss(policy.model, rollout, mode, group)
    loss.backward()
    grad = policy.model.get_input_embeddings().weight.grad
    assert torch.isfinite(loss) and stats["advantage_mean"] >= 0
    assert grad[50257:50265].abs().sum() > 0


def test_incremental_attention_equals_reference_rows():
    from thinktok.kernels import parallel_thought_attention_reference
    from thinktok.models.parallel import incremental_attention

    g = torch.Generator().manual_seed(5)
    b, h, d, j = 2, 3, 16, 2  # step j: thoughts 0..j of every position exist
    q, k, v = (torch.randn(b, h, T * (1 + L), d, generator=g) for _ in range(3))
    ref = parallel_thought_attention_reference(q, k, v, T, L)
    rows = T + torch.arange(T) * L + j  # thought (t, j) for every t
    thought = lambda x: x[:, :, T:].reshape(b, h, T, L, d)[:, :, :, : j + 1]  # noqa: E731
    out = incremental_attention(q[:, :, rows], k[:, :, :T], v[:, :, :T], thought(k), thought(v), d ** -0.5)
    assert torch.allclose(out, ref[:, :, rows], atol=1e-5)
