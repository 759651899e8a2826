"""`sample`: batched sampling with a KV cache for every thought mode, one rollout per prompt.

Why in rl/ and not beside the thought modes in models/: this is the rollout stage of the RL data flow, while
a mode is a per-step interface that knows nothing of sequences, caches or batches; keeping the sampler out of
models/ keeps that interface small.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import DynamicCache

from thinktok.compat import cache_kwarg
from thinktok.models.head import head_logits
from thinktok.models.thoughts import StepOut, ThoughtMode

from .decoding import RECORDS, check_ids, finished, left_pad, rng_devices, to_rollouts
from .rollout import Rollout
from .static_sampler import static_sampler

if TYPE_CHECKING:  # transformers' modeling module imports torch._dynamo, and with it Triton
    from transformers import PreTrainedModel


@torch.no_grad()
def sample(
    model: PreTrainedModel, mode: ThoughtMode, prompts: list[list[int]], seed: int = 0,
    weight_version: int = 0, static: bool = False, compile: bool = False,
) -> list[Rollout]:
    """Sample one rollout per prompt. Deterministic under `seed` (the global RNG is forked, not touched).
    rl/recompute.py's teacher-forced recompute is the reference its log-probs are tested against.

    static=True decodes against a preallocated KV cache with fixed shapes (`StaticSampler`); compile=True
    (implies static) also runs each decoding step through torch.compile, as CUDA graphs on a GPU. Both give
    the dynamic path's tokens under the same seed.
    """
    if static or compile:
        return static_sampler(model, mode, compile).sample(prompts, seed, weight_version)
    model.eval()
    device = model.device
    embed: nn.Embedding = model.get_input_embeddings()
    base = model.base_model
    kv = cache_kwarg(base)
    vocab, sampling = mode.vocab, mode.sampling
    check_ids(prompts, vocab.size)
    ids, mask = left_pad(prompts, vocab.eos_id, device)
    batch = len(prompts)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, P)
    steps: list[StepOut] = []
    alive: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)
        cache = DynamicCache()
        hidden = base(inputs_embeds=embed(ids), attention_mask=mask, position_ids=pos, use_cache=True,
                      **{kv: cache}).last_hidden_state[:, -1]  # (B, D)
        state = mode.init_state(batch, device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        n_text = torch.zeros(batch, dtype=torch.long, device=device)
        for _ in range(sampling.max_new_tokens + mode.max_thought_steps(sampling.max_new_tokens)):
            out = mode.step(head_logits(model, hidden), hidden, state, embed)
            steps.append(out)
            alive.append(~done)
            n_text, done = finished(out.token, n_text, done, vocab.text_size, vocab.eos_id, sampling)
            if done.all():
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            hidden = base(inputs_embeds=out.embeds[:, None], attention_mask=mask, position_ids=pos,
                          use_cache=True, **{kv: cache}).last_hidden_state[:, -1]
    return collate_steps(prompts, steps, torch.stack(alive, 1), mode, weight_version)


def collate_steps(prompts, steps: list[StepOut], alive: torch.Tensor, mode: ThoughtMode,
                  weight_version: int) -> list[Rollout]:
    """Per-step batch records -> one trimmed `Rollout` per sequence (on the CPU)."""
    def stack(name):
        """(B, S, ...) of one field; steps without a payload (forced/text steps) get zeros there."""
        present = [getattr(s, name) for s in steps if getattr(s, name) is not None]
        if not present:
            return None
        return torch.stack([x if x is not None else torch.zeros_like(present[0])
                            for x in (getattr(s, name) for s in steps)], 1).cpu()

    fields = {name: stack(name) for name in RECORDS}
    return to_rollouts(prompts, fields, alive, mode, weight_version)
