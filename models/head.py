"""The task-vocabulary head: every next-token distribution a softmax over the task's own tokens.

A tiny GPT-2 spends ~94% of its compute in GPT-2's 50,257-wide head (128 x 50,257 multiply-adds per
position against ~0.4M for both layers), although a task like multiplication uses a dozen text tokens. With
`model.head: task` the LM head computes only the rows of the task's text tokens (every id in its prompts,
answers and chains of thought, and EOS) plus every thinking token and marker, and gives every other column
a logit of `masked_logit` (probability exactly 0 after a softmax, yet finite, so KLs and entropies over the
full width stay finite). Every log-probability is then that of the restricted distribution.

It lives in the model: the text ids are recorded in the model's config (`thinktok_head` in config.json), so
a checkpoint restores its head wherever thinktok loads it (`load_policy`, `Teacher.load`).

Two views of one head. thinktok's own code works in the head's *column space*: `head_logits` computes the
K allowed rows only, (..., K), and `head_columns` says which token id each column is (K = V for a full head,
the identity: one code path). The thought modes sample, mask and score over those K columns and map ids at
the edges (thoughts.py), so no softmax, cumulative sum or entropy ever runs over the other 50k columns. The
LM head's own forward (what `model(...).logits` and `generate` call) is replaced on the instance to give the
same distribution at full width, every other column `masked_logit`: Hugging Face code and users' scripts see
a (..., V) head and need to know nothing.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from thinktok.errors import UserError

HEADS = ("full", "task")
CONFIG_KEY = "thinktok_head"


def masked_logit(dtype: torch.dtype) -> float:
    """A logit no softmax can pick, finite in `dtype` even after division by a temperature of 0.25."""
    return max(-1e6, torch.finfo(dtype).min / 4)


def task_text_ids(task, tokenizer) -> list[int]:
    """Every text id the task's rows use (all splits: prompt, answer, chain of thought, each step) and EOS."""
    ids = {tokenizer.eos_token_id}
    for split in task.dataset.values():
        for row in split:
            texts = [row["prompt"], task.target(row, "answer")]
            if row["steps"]:
                texts += [task.target(row, "cot")] + [" " + step for step in row["steps"]]
            for text in texts:
                ids.update(tokenizer(text).input_ids)
    return sorted(ids)


def restrict_head(model, text_ids: list[int], text_size: int) -> None:
    """Restrict `model`'s LM head to `text_ids` and every row from `text_size` on (thinking tokens and
    markers), and record the text ids in its config. Call after any vocabulary expansion."""
    head = model.get_output_embeddings()
    rows = head.weight.shape[0]
    text_ids = sorted(set(text_ids))
    if not text_ids or text_ids[0] < 0 or text_ids[-1] >= text_size:
        raise UserError(f"task head ids must lie in [0, {text_size}), got {text_ids[:1]}..{text_ids[-1:]}")
    allowed = torch.tensor(text_ids + list(range(text_size, rows)), device=head.weight.device)  # sorted
    head.register_buffer("allowed", allowed, persistent=False)
    head.forward = types.MethodType(_restricted_forward, head)
    setattr(model.config, CONFIG_KEY, {"text_ids": text_ids, "text_size": text_size})


def _restricted_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., V) logits: the allowed rows computed, every other column `masked_logit`."""
    return _scattered_linear(self, hidden, self.allowed, 0, self.weight.shape[0])


def _rows(head, hidden: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., len(cols)): the logits of the head's rows `cols` only."""
    return F.linear(hidden, head.weight[cols], None if head.bias is None else head.bias[cols])


def _scattered_linear(head, hidden: torch.Tensor, cols: torch.Tensor, lo: int, width: int) -> torch.Tensor:
    """Rows `cols` of the head computed and placed at columns cols - lo of a (..., width) tensor of
    `masked_logit`."""
    out = hidden.new_full((*hidden.shape[:-1], width), masked_logit(hidden.dtype))
    return out.index_copy(-1, cols - lo, _rows(head, hidden, cols))


def head_columns(model) -> torch.Tensor:
    """(K,) the token id of each column `head_logits` returns, ascending: the task head's allowed rows (text
    ids, then every thinking token and marker), or every row of a full head."""
    head = getattr(model, "module", model).get_output_embeddings()
    allowed = getattr(head, "allowed", None)
    if allowed is not None:
        return allowed
    rows = getattr(model, "module", model).get_input_embeddings().weight
    return torch.arange(rows.shape[0], device=rows.device)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., K) logits over the head's columns (`head_columns`): only those rows are computed."""
    head = getattr(model, "module", model).get_output_embeddings()
    allowed = getattr(head, "allowed", None)
    return head(hidden) if allowed is None else _rows(head, hidden, allowed)


def restore_head(model) -> None:
    """Re-apply the head a loaded checkpoint was trained with (no-op for a full head)."""
    saved = getattr(model.config, CONFIG_KEY, None)
    if saved:
        # "real_size": checkpoints written before the key was named text_size
        restrict_head(model, saved["text_ids"], saved.get("text_size", saved.get("real_size")))


def head_name(model) -> str:
    return "task" if getattr(model.config, CONFIG_KEY, None) else "full"


def labelled_logits(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (K, D), labels (K,) -> logits and labels for a cross-entropy. With a task head: logits over the
    allowed columns only (K, n) and labels re-indexed into them, equal to the masked (K, V) loss at n/V of
    the cost. A label outside the head is an error, not a silent infinite loss."""
    head = model.get_output_embeddings()
    allowed = getattr(head, "allowed", None)
    if allowed is None:
        return head(hidden), labels
    index = torch.searchsorted(allowed, labels).clamp_max(len(allowed) - 1)
    outside = allowed[index] != labels
    if outside.any():
        raise UserError(f"label id {labels[outside][0].item()} is outside the task head: the head was built "
                         "from other data than this training set")
    return _rows(head, hidden, allowed), index


def column_logits(model, hidden: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """Logits of vocabulary columns [lo, hi) only: (..., D) -> (..., hi - lo); columns outside a task head
    get `masked_logit`, and only the allowed ones are computed."""
    head = getattr(model, "module", model).get_output_embeddings()
    hi = head.weight.shape[0] if hi is None else hi
    allowed = getattr(head, "allowed", None)
    if allowed is None:
        bias = None if head.bias is None else head.bias[lo:hi]
        return F.linear(hidden, head.weight[lo:hi], bias)
    return _scattered_linear(head, hidden, allowed[(allowed >= lo) & (allowed < hi)], lo, hi - lo)
