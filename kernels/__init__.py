"""Triton kernels, each with a plain-PyTorch reference."""

from .parallel_decode import parallel_thought_decode, parallel_thought_decode_reference
from .parallel_thought import (
           parallel_thought_attention,
           parallel_thought_attention_reference,
           parallel_thought_mask,
)

__all__ = ["parallel_thought_attention", "parallel_thought_attention_reference", "parallel_thought_decode",
           "parallel_thought_decode_reference", "parallel_thought_mask"]
