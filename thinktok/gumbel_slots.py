"""Thought slots whose tokens the model chooses, trained by straight-through Gumbel-softmax instead of RL:
the positive control for discovery (`configs/sft_mult2_gumbel.yaml`; docs/results.md).

RL's discovery arms (configs/rl_discovery.yaml) fill fixed slots after the prompt with thinking tokens the
policy samples from its distribution over the thinking columns (Action.THINK, temperature 1), and train the
choice by REINFORCE on thought_gain and the reader by the latent term -log pi_text(gold | prompt, thoughts).
Here the same slots are filled by the same draw, but the gold answer's log-likelihood after them reaches the
logits that chose them through the straight-through estimator (Havrylov & Titov 2017, arXiv 1705.11192): the
forward pass feeds the hard one-hot sample, so each slot's input is exactly the chosen token's embedding;
the backward pass differentiates the relaxed sample softmax((logits + g) / tau) in its place. The reader is
trained by the same loss. If this finds a code RL does not, the code exists and is learnable at this size and
RL's estimator is what fails; if neither does, discovery at this size is the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from thinktok.models.head import column_logits, head_columns, masked_logit


@dataclass(frozen=True)
class GumbelSlots:
    think_lo: int  # the first thinking token's id
    num_thinking: int  # N: each slot chooses among <think0> .. <think{N-1}>
    tau: float  # the relaxation's temperature: the backward pass's only setting (the forward draw has none)

    def inputs(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               slot_pos: torch.Tensor) -> torch.Tensor:
        """(B, W, D) input embeddings with every slot filled, left to right, by a token drawn from the
        model's thinking-column distribution after what precedes it (slot_pos (B, L): each row's slot
        positions, -1 = none). Gradients reach each choice's logits through the relaxed sample."""
        embed = model.get_input_embeddings()
        embeds = embed(input_ids)  # (B, W, D)
        table = embed.weight[self.think_lo : self.think_lo + self.num_thinking]  # (N, D)
        rows = torch.arange(len(input_ids), device=input_ids.device)
        for j in range(slot_pos.shape[1]):
            pos = slot_pos[:, j]
            has = pos >= 0
            if not has.any():
                break
            upto = int(pos.max())  # causal: the positions before the furthest slot decide every row's choice
            hidden = model.base_model(inputs_embeds=embeds[:, :upto],
                                      attention_mask=attention_mask[:, :upto]).last_hidden_state
            logits = column_logits(model, hidden[rows[has], pos[has] - 1], self.think_lo,
                                   self.think_lo + self.num_thinking)  # (B', N)
            choice = F.gumbel_softmax(logits.float(), tau=self.tau, hard=True)  # (B', N) one-hot forward
            embeds = embeds.clone()  # the previous passes' graph reads the old tensor
            embeds[rows[has], pos[has]] = choice.to(table.dtype) @ table
        return embeds

    def text_only(self, model, logits: torch.Tensor) -> torch.Tensor:
        """(K, n) logits over the head's columns -> the same with every thinking column masked: the answer
        is scored under pi_text, as the sampler decodes text after the slots, and as RL's latent term
        scores it."""
        thinking = head_columns(model) >= self.think_lo
        return logits.masked_fill(thinking, masked_logit(logits.dtype))
