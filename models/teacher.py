"""The frozen teacher: a causal LM that scores the real-text view of rollouts (thinking steps removed,
positions re-packed). Frozen means eval mode, no gradients, and no optimizer ever sees its parameters."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForCausalLM, PreTrainedModel

from thinktok.compat import selective_log_softmax

from .head import head_columns, head_logits, masked_logit, restore_head


class Teacher:
    def __init__(self, model: PreTrainedModel, batch_size: int = 32):
        self.model = model.eval().requires_grad_(False)
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", batch_size: int = 32) -> "Teacher":
        try:
            model = AutoModelForCausalLM.from_pretrained(path)
        except OSError as e:
            raise ValueError(f"cannot load teacher from {path}: {e}") from None
        restore_head(model)
        return cls(model.to(device), batch_size)

    @torch.no_grad()
    def think(self, prompt: list[int], separator: int, max_new_tokens: int, eos: int) -> list[int]:
        """The teacher's own chain of thought for a prompt: its greedy continuation up to and including the
        last `separator` (the answer after it is dropped: the student's answer is what gets scored)."""
        ids = torch.tensor([prompt], device=self.model.device)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=max_new_tokens, pad_token_id=eos, eos_token_id=eos)[
                                      0, len(prompt):]
        out = out.tolist()
        cut = max((i + 1 for i, t in enumerate(out) if t == separator), default=0)
        return out[:cut]

    @torch.no_grad()
    def token_logprobs(self, seqs: list[list[int]], start: list[int]) -> list[torch.Tensor]:
        """log p(seq[i] | seq[:i]) for i >= start[b], per sequence: a (len - start,) tensor each."""
        out = []
        for lo in range(0, len(seqs), self.batch_size):
            out += self._batch(seqs[lo : lo + self.batch_size], start[lo : lo + self.batch_size])
        return out

    def _batch(self, seqs, start):
        for i, s in enumerate(seqs):
            bad = [t for t in s if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"teacher input {i} has ids outside its vocabulary of {self.vocab_size}: "
                                 f"{bad[:4]} (thinking tokens must be stripped before scoring)")
        device = self.model.device
        ids = pad_sequence([torch.tensor(s) for s in seqs], batch_first=True).to(device)  # (B, W), right pad
        mask = pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs], batch_first=True).to(device)
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, W, D)
        # the head only where a scored token is predicted: position i predicts token i + 1, i >= start - 1
        counts = [len(s) - b for s, b in zip(seqs, start)]
        rows = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)]).to(device)
        at = torch.cat([torch.arange(b - 1, len(s) - 1) for s, b in zip(seqs, start)]).to(device)
        logits = head_logits(self.model, hidden[rows, at]).float()  # (N, K): over the head's columns only
        cols, target = head_columns(self.model), ids[rows, at + 1]
        col = torch.searchsorted(cols, target).clamp_max(len(cols) - 1)
        lp = selective_log_softmax(logits, col)  # (N,)
        # a token outside a task head: the restricted head's (finite) masked logit, as at full width
        outside = masked_logit(logits.dtype) - torch.logsumexp(logits, -1)
        lp = torch.where(cols[col] == target, lp, outside)
        return list(lp.cpu().split(counts))
