"""GPT-2 forward over the parallel-thought layout (T real tokens, then T*L thoughts position-major) with
the fused kernel as a transformers attention implementation, so the model code stays transformers' own.

The pattern fixes the mask, so the implementation ignores `attention_mask` (no padding inside a layout:
batch rows share T and L) and a mask function that builds nothing is registered beside it: transformers
would otherwise materialise a dense (N, N) mask, the very cost the kernel avoids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from thinktok.kernels import parallel_thought_attention

NAME = "parallel_thought"


def parallel_thought_attention_impl(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                    num_real: int | None = None, thought_len: int = 0, **kwargs):
    """transformers' attention signature: q, k, v (B, H, N, D) -> (B, N, H, D), no weights."""
    if thought_len == 0:  # real tokens only: plain causal attention
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    else:
        out = parallel_thought_attention(query, key, value, num_real, thought_len, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, parallel_thought_attention_impl)
AttentionMaskInterface.register(NAME, lambda *args, **kwargs: None)


def layout_positions(num_real: int, thought_len: int, device=None) -> torch.Tensor:
    """Position ids: real token t at t; thought (t, j) at t + 1 + j (it continues from its position)."""
    t = torch.arange(num_real, device=device)
    j = torch.arange(thought_len, device=device)
    return torch.cat([t, (t[:, None] + 1 + j[None, :]).flatten()])


def parallel_forward(model: PreTrainedModel, ids: torch.Tensor, num_real: int, thought_len: int):
    """ids (B, T + T*L) in the layout -> model output (logits (B, N, V), hidden states)."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = NAME
    try:
        pos = layout_positions(num_real, thought_len, ids.device).expand(ids.shape[0], -1)
        return model(input_ids=ids, position_ids=pos, num_real=num_real, thought_len=thought_len)
    finally:
        model.config._attn_implementation = previous
