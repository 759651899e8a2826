"""The `Rollout` record: what a sampler returns, rewards score and the learner recomputes.

Sequence layout of one rollout: prompt positions 0..P-1, then step s (s = 0..S-1) is the action chosen
from the model's output at position P-1+s; its input embedding is fed at position P+s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from thinktok.models.thoughts import Action

CHOSEN = torch.tensor([Action.FREE, Action.THINK, Action.VECTOR, Action.SOFT])  # the policy's thought choices


class ArraysWhenPickled:
    """Pickles (between Ray actors, and in inline workers' copies) with every tensor field, or list of
    tensors, as numpy arrays: a small torch tensor's pickle is slow to build and to read (32 quickstart
    rollouts: 8 ms a round trip as tensors)."""

    def __getstate__(self) -> dict:
        def out(v):
            if isinstance(v, torch.Tensor):
                return v.detach().cpu().numpy()
            if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                return [x.detach().cpu().numpy() for x in v]
            return {k: out(x) for k, x in v.items()} if isinstance(v, dict) else v

        return {k: out(v) for k, v in vars(self).items()}

    def __setstate__(self, state: dict) -> None:
        def tensor(a: np.ndarray) -> torch.Tensor:  # Ray hands out read-only views of its store: copied
            return torch.from_numpy(a if a.flags.writeable else a.copy())

        def back(v):
            if isinstance(v, np.ndarray):
                return tensor(v)
            if isinstance(v, list) and v and isinstance(v[0], np.ndarray):
                return [tensor(x) for x in v]
            return {k: back(x) for k, x in v.items()} if isinstance(v, dict) else v

        vars(self).update({k: back(v) for k, v in state.items()})


@dataclass
class Rollout(ArraysWhenPickled):
    prompt_ids: list[int]
    action: torch.Tensor  # (S,) Action codes
    token: torch.Tensor  # (S,) token ids, -1 for vector/soft steps
    logprob: torch.Tensor  # (S,) policy log-prob of each action at sampling time (0 for forced steps)
    text_size: int  # ids below this are text
    mode: str
    vector: torch.Tensor | None = None  # (S, D) continuous actions (rows of other steps unused)
    soft_ids: torch.Tensor | None = None  # (S, k) soft-thought token ids
    soft_w: torch.Tensor | None = None  # (S, k) soft-thought weights
    weight_version: int = 0

    @property
    def is_text(self) -> torch.Tensor:
        """(S,) bool: text steps (what the teacher sees)."""
        return (self.token >= 0) & (self.token < self.text_size)

    @property
    def is_chosen_thought(self) -> torch.Tensor:
        """(S,) bool: thought steps the policy chose (a thinking token, vector or mixture), not the markers
        and pauses inserted by rule nor a learned stop."""
        chosen = torch.isin(self.action, CHOSEN)
        return chosen & ~self.is_text

    @property
    def kinds(self) -> list[str]:
        return ["text" if r else "thought" for r in self.is_text.tolist()]

    @property
    def text_ids(self) -> list[int]:
        """Generated text tokens, thought steps removed."""
        return self.token[self.is_text].tolist()

    @property
    def text_view(self) -> list[int]:
        """Prompt + generated text with every thought step removed: the teacher's input."""
        return self.prompt_ids + self.text_ids

    @property
    def num_text(self) -> int:
        return int(self.is_text.sum())

    @property
    def num_thought(self) -> int:
        return len(self.token) - self.num_text

    @property
    def num_steps(self) -> int:
        return len(self.token)


def opening_thoughts(r: Rollout) -> int:
    """Number of steps before the rollout's first text token (all of them if it wrote no text)."""
    return int(r.is_text.nonzero()[0]) if r.num_text else r.num_steps


def with_gold(r: Rollout, gold: torch.Tensor, pause_every: bool = False, thoughts: bool = True) -> Rollout:
    """The rollout's opening thought steps (none with thoughts=False), then the gold tokens as text actions:
    what gold-answer rewards and the latent term score. pause_every: the opening pause block also precedes
    every later gold token, as the policy sees pauses (pause_at=every; with vocab slots_at=every the opening
    block stands in for the later blocks the policy would sample)."""
    first = opening_thoughts(r) if thoughts else 0
    block = r.token[:first] if pause_every else r.token[:0]
    token = torch.cat([r.token[:first]] + [torch.cat([
        block, g[None]]) if i else g[None] for i, g in enumerate(gold)])
    action = torch.where(token < r.text_size, int(Action.TEXT), int(Action.FORCED))
    action[:first] = r.action[:first]

    def keep_opening(x):  # payloads of the opening steps; zeros after (gold steps are tokens)
        return None if x is None else torch.cat([x[:first], x.new_zeros(len(token) - first, *x.shape[1:])])

    return Rollout(prompt_ids=r.prompt_ids, text_size=r.text_size, mode=r.mode, action=action, token=token,
                   logprob=torch.zeros(len(token)), vector=keep_opening(r.vector),
                   soft_ids=keep_opening(r.soft_ids),
                   soft_w=keep_opening(r.soft_w), weight_version=r.weight_version)
