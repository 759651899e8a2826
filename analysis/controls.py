"""Controls that tell whether a thought's *content* mattered or only the extra compute did (issue: thinking
that can pay). Each re-runs greedy decoding with the same policy, changing only what its thoughts feed in:

  no_thoughts        thinking disabled: text only (the extra steps removed)
  pause              the same thought steps, each fed one fixed input: <think0>'s embedding in modes with
                     thinking tokens, <bot>'s in continuous/soft mode (a fixed "pause", no content)
  shuffled_thoughts  each example is fed another example's thought inputs (example i gets example i+1's,
                     cycled when it thinks longer than its donor; a donor without thoughts gives the pause
                     input), at its own thought steps

Learned beats shuffled: the content matters. Pause beats none: the extra compute matters. The policy still
decides when to think (free placement), so the step counts can differ from the main run's; each control
reports its own.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from thinktok.models.thought_modes import VocabThoughts
from thinktok.models.thoughts import Action, State, StepOut, ThoughtMode
from thinktok.rl.recompute import step_inputs
from thinktok.rl.rollout import Rollout

CONTROLS = ("no_thoughts", "pause", "shuffled_thoughts")


def is_thought_input(out: StepOut, mode: ThoughtMode) -> torch.Tensor:
    """(B,) bool: the step feeds a thought (a thinking token chosen or inserted, a vector, a mixture), not a
    marker or text."""
    v = mode.vocab
    token_thought = (out.token >= v.text_size) & (out.token < v.text_size + v.num_thinking)
    return token_thought | (out.action == Action.VECTOR) | (out.action == Action.SOFT)


class ModeWrapper:
    """A thought mode that runs `inner` and changes what some of its steps feed or record (the controls, the
    content interventions, the text measures' forcing). Same interface as a ThoughtMode for the sampler;
    keeps a (B,) count named `counter` in the state for its subclass's step."""

    counter = "wrapped"

    def __init__(self, inner):
        self.inner, self.vocab, self.sampling, self.cfg = inner, inner.vocab, inner.sampling, inner.cfg

    def init_state(self, batch: int, device) -> State:
        state = self.inner.init_state(batch, device)
        state.extra[self.counter] = torch.zeros(batch, dtype=torch.long, device=device)
        return state

    def max_thought_steps(self, max_new_tokens: int) -> int:
        return self.inner.max_thought_steps(max_new_tokens)


class ReplayThoughts(ModeWrapper):
    """Runs `inner` but feeds row b's k-th thought step `table[b, k mod n_b]` instead of its own input
    (`fallback` where n_b = 0)."""

    counter = "replayed"

    def __init__(self, inner: ThoughtMode, table: torch.Tensor, counts: torch.Tensor, fallback: torch.Tensor):
        super().__init__(inner)
        self.table, self.counts, self.fallback = table, counts, fallback  # (B, K, D), (B,), (D,)

    def step(self, logits, hidden, state, embed: nn.Embedding) -> StepOut:
        out = self.inner.step(logits, hidden, state, embed)
        thought = is_thought_input(out, self.inner)
        if thought.any():
            k = state.extra["replayed"]
            rows = torch.arange(len(k), device=k.device)
            donor = self.table[rows, k % self.counts.clamp_min(1)]  # (B, D)
            fed = torch.where((self.counts > 0)[:, None], donor, self.fallback.expand_as(donor))
            out.embeds = torch.where(thought[:, None], fed.to(out.embeds.dtype), out.embeds)
            state.extra["replayed"] = k + thought
        return out


def thought_inputs(rollouts: list[Rollout], mode: ThoughtMode, embed: nn.Embedding) -> list[torch.Tensor]:
    """Per rollout, the inputs its thought steps fed the model, in order: (n_thought, D) each."""
    out = []
    for r in rollouts:
        step = StepOut(r.action, r.token, None, None)
        out.append(step_inputs(r, embed)[is_thought_input(step, mode).to(embed.weight.device)].detach())
    return out


def pause_input(mode: ThoughtMode, embed: nn.Embedding) -> torch.Tensor:
    """The fixed thought input of the pause control: <think0>, or <bot> in modes without thinking tokens."""
    v = mode.vocab
    token = v.think_id(0) if v.num_thinking else v.bot_id
    return embed.weight[token].detach()


def derange(donors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Example i gets example i+1's thoughts (the last gets the first's): with two or more, none keeps its
    own."""
    return donors[1:] + donors[:1]


def control_modes(mode: ThoughtMode, shuffled: list[torch.Tensor], embed: nn.Embedding) -> dict:
    """The three controls for a batch; `shuffled[b]` are the thought inputs row b replays (from `derange`)."""
    fixed = pause_input(mode, embed)
    batch, dim = len(shuffled), fixed.shape[0]
    width = max([len(d) for d in shuffled] + [1])
    table = torch.zeros(batch, width, dim, device=fixed.device)
    for i, d in enumerate(shuffled):
        table[i, : len(d)] = d
    counts = torch.tensor([len(d) for d in shuffled], device=fixed.device)
    text_only = replace(mode.cfg, max_thought_tokens=0, slots=0, learned_stop=False)
    no_thoughts = VocabThoughts(text_only, mode.vocab, mode.sampling, mode.columns)
    return {"no_thoughts": no_thoughts.to(fixed.device),
            "pause": ReplayThoughts(mode, table[:, :1], torch.zeros_like(counts), fixed),
            "shuffled_thoughts": ReplayThoughts(mode, table, counts, fixed)}
