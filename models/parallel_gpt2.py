"""GPT-2 forward over the parallel-thought layout (T real tokens, then T*L thoughts position-major) with
the fused kernel as a transformers attention implementation, so the model code stays transformers' own.

Also here: Quiet-STaR's mixing head, which weighs post-thought against pre-thought predictions.

Two forms, two kernels: the full teacher-forced layout (`parallel_thought_attention`; scoring and the
learner's recompute) and the incremental form used while sampling (`parallel_thought_decode`: one new
thought per position against cached keys/values).

The pattern fixes the mask, so the implementation ignores `attention_mask` (no padding inside a layout:
batch rows share T and L) and a mask function that builds nothing is registered beside it: transformers
would otherwise materialise a dense (N, N) mask, the very cost the kernel avoids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from thinktok.compat import attn_implementation
from thinktok.kernels.parallel_decode import parallel_thought_decode
from thinktok.kernels.parallel_thought import parallel_thought_attention

NAME = "parallel_thought"


class ParallelCache:
    """Per-layer keys/values of the incremental form: the real prefix (B, H, T, D) and each position's
    thoughts so far (B, H, T, j, D). transformers' caches hold one sequence per row, not this layout."""

    def __init__(self):
        self.text: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.thought: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def parallel_thought_attention_impl(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                    num_text: int | None = None, thought_len: int = 0,
                                    parallel_cache: ParallelCache | None = None, **kwargs):
    """transformers' attention signature: q, k, v (B, H, N, D) -> (B, N, H, D), no weights.

    With a `parallel_cache`: the first call is the real prefix (cached), each later call one new thought
    token per position (incremental form). Without: the full layout through the fused kernel."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    layer = module.layer_idx
    if parallel_cache is not None and layer in parallel_cache.text:
        k_t, v_t = key[:, :, :, None], value[:, :, :, None]  # (B, H, T, 1, D)
        if layer in parallel_cache.thought:
            old_k, old_v = parallel_cache.thought[layer]
            k_t, v_t = torch.cat([old_k, k_t], 3), torch.cat([old_v, v_t], 3)
        parallel_cache.thought[layer] = (k_t, v_t)
        out = parallel_thought_decode(query, *parallel_cache.text[layer], k_t, v_t, scaling)
    elif thought_len == 0:  # real tokens only: plain causal attention
        if parallel_cache is not None:  # contiguous once here, not at every thought step
            parallel_cache.text[layer] = (key.contiguous(), value.contiguous())
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    else:
        out = parallel_thought_attention(query, key, value, num_text, thought_len, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, parallel_thought_attention_impl)
AttentionMaskInterface.register(NAME, lambda *args, **kwargs: None)


def layout_positions(num_text: int, thought_len: int, device=None) -> torch.Tensor:
    """Position ids: real token t at t; thought (t, j) at t + 1 + j (it continues from its position)."""
    t = torch.arange(num_text, device=device)
    j = torch.arange(thought_len, device=device)
    return torch.cat([t, (t[:, None] + 1 + j[None, :]).flatten()])


def parallel_hidden(model, ids: torch.Tensor, num_text: int, thought_len: int,
                    cache: ParallelCache | None = None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """ids (B, T + T*L) in the layout -> last hidden state (B, N, H), after the final layer norm.
    With `cache`: ids (B, T) is the real prefix (thought_len 0) or step j's thoughts (position_ids t+1+j).

    No LM head here: callers project only the rows and columns they need (`head.column_logits`), because
    over GPT-2's 50k columns the head, not attention, dominates a small model's parallel pass.
    The call still goes through `model` itself (logits for one row only), so a DDP-wrapped learner syncs
    its gradients."""
    config = getattr(model, "module", model).config
    with attn_implementation(config, NAME):
        pos = layout_positions(num_text, thought_len, ids.device) if position_ids is None else position_ids
        # an all-ones mask only tells transformers there is no padding (windows hold EOS ids); the registered
        # mask function turns it into nothing
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                    position_ids=pos.expand(ids.shape[0], -1),
                    num_text=num_text, thought_len=thought_len, parallel_cache=cache, use_cache=False,
                    output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[-1]


class MixingHead(nn.Module):
    """Quiet-STaR's mixing head: w = sigmoid(MLP([h_pre; h_post])) in (0, 1) per prediction, and the mixed
    logits are the convex mix pre + w * (post - pre): a sigmoid keeps w in (0, 1), so a mix never
    extrapolates away from the thought. The last layer starts with zero weights and bias INIT_BIAS, so
    w = 0.0067 everywhere: training starts within 1% of the base model's predictions, with a gradient that
    never vanishes. Even convex, a mix can raise the target's log-prob above both passes (log-softmax is
    concave in the logits): the gain with a head is partly an ensemble of two passes, so scoring reports the
    unmixed gain beside it."""

    INIT_BIAS = -5.0

    def __init__(self, hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * hidden_size, hidden_size), nn.ReLU(),
                                 nn.Linear(hidden_size, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, self.INIT_BIAS)

    def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        """pre, post (..., H) hidden states -> (..., 1) mixing weight."""
        return torch.sigmoid(self.net(torch.cat([pre, post], -1).to(self.net[0].weight.dtype)))
