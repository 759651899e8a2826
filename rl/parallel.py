"""Parallel thought rollouts (Quiet-STaR style): for a text of T real tokens, think L thinking tokens at
every position at once, then score how much each position's thought raises the log-prob of the true next
token. All passes run through GPT-2 with the fused parallel-thought kernel (models/parallel.py).

  sample_parallel   incremental form: pass j feeds thought j-1 at all T positions against a KV cache
  thought_gain      per position: log p(x_{t+1} | x_{<=t}, thought_t) - log p(x_{t+1} | x_{<=t})
  parallel_loss     REINFORCE with the mean over the G thoughts sampled at the same position as baseline
                    (Quiet-STaR), negative gains clamped to 0 as there; differentiable through the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from thinktok.models.parallel import ParallelCache, parallel_forward
from thinktok.models.thoughts import ThoughtMode

from .rollout import rng_devices


@dataclass
class ParallelRollout:
    real: torch.Tensor  # (B, T) the text
    thoughts: torch.Tensor  # (B, T, L) thinking token ids, thought (t, j) at layout index T + t*L + j
    logprob: torch.Tensor  # (B, T, L) sampling log-probs

    def layout(self) -> torch.Tensor:
        b, t, l = self.thoughts.shape
        return torch.cat([self.real, self.thoughts.reshape(b, t * l)], dim=1)


def choosing_logits(logits: torch.Tensor, num_real: int, thought_len: int) -> torch.Tensor:
    """Logits that choose thought j (0..L) at every position: real row t for j=0, thought (t, j-1) after.
    (B, N, V) -> (B, T, L+1, V); index L gives the post-thought prediction of the next real token."""
    b, _, v = logits.shape
    real = logits[:, :num_real, None]
    thought = logits[:, num_real:].reshape(b, num_real, thought_len, v)
    return torch.cat([real, thought], dim=2)


@torch.no_grad()
def sample_parallel(model, mode: ThoughtMode, real: torch.Tensor, thought_len: int, seed: int = 0) -> ParallelRollout:
    """Incremental form: the real prefix once, then one pass per thought step feeding T new tokens (one per
    position) against cached keys/values. Thoughts are drawn from the thinking tokens only."""
    b, t = real.shape
    cache = ParallelCache()
    steps = torch.arange(t, device=real.device)
    thoughts, logps = [], []
    with torch.random.fork_rng(devices=rng_devices(real.device)):
        torch.manual_seed(seed)
        logits = parallel_forward(model, real, t, 0, cache).logits  # (B, T, V): choose thought 0
        for j in range(thought_len):
            lp = thought_logprobs(logits, mode)
            tok = torch.multinomial(lp.reshape(b * t, -1).exp(), 1).reshape(b, t)
            thoughts.append(tok)
            logps.append(lp.gather(-1, tok[..., None])[..., 0])
            if j + 1 < thought_len:
                logits = parallel_forward(model, tok, t, 0, cache, position_ids=steps + 1 + j).logits
    return ParallelRollout(real, torch.stack(thoughts, 2), torch.stack(logps, 2))


def thought_logprobs(logits: torch.Tensor, mode: ThoughtMode) -> torch.Tensor:
    """Log-softmax over the thinking tokens only: (..., V) -> (..., V), -inf elsewhere."""
    return F.log_softmax(logits.float().masked_fill(~mode.think_cols, float("-inf")), dim=-1)


def thought_gain(model, rollout: ParallelRollout, mode: ThoughtMode) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position t < T-1: gain in log p(true next token) from the thought, and the thoughts' log-probs
    recomputed teacher-forced (differentiable): (B, T-1), (B, T, L)."""
    b, t, l = rollout.thoughts.shape
    logits = choosing_logits(parallel_forward(model, rollout.layout(), t, l).logits, t, l)  # (B, T, L+1, V)
    text = logits[..., : mode.vocab.real_size].float().log_softmax(-1)  # next-token predictions over text
    nxt = rollout.real[:, 1:, None]
    without = text[:, :-1, 0].gather(-1, nxt)[..., 0]
    with_thought = text[:, :-1, l].gather(-1, nxt)[..., 0]
    logp = thought_logprobs(logits[:, :, :l], mode).gather(-1, rollout.thoughts[..., None])[..., 0]
    return with_thought - without, logp


def parallel_loss(model, rollout: ParallelRollout, mode: ThoughtMode, group: int) -> tuple[torch.Tensor, dict]:
    """REINFORCE over G thoughts per position (rows b*G..b*G+G-1 share a text). Returns loss and stats."""
    gain, logp = thought_gain(model, rollout, mode)
    g = gain.detach().reshape(-1, group, gain.shape[1])
    advantage = (g - g.mean(1, keepdim=True)).clamp_min(0).reshape_as(gain)  # Quiet-STaR keeps positive ones
    loss = -(advantage * logp[:, :-1].sum(-1)).mean()
    return loss, {"gain_mean": gain.mean().item(), "advantage_mean": advantage.mean().item()}
