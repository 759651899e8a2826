"""Settings of the parallel-thought path (rollout: parallel). Kept apart from the path's code so that a
checkpoint's run info and a config load without importing the kernel."""

from __future__ import annotations

from dataclasses import dataclass

from thinktok.errors import UserError

SCORERS = ("policy", "teacher")


@dataclass
class ParallelConfig:
    num_text: int = 64  # T: real tokens per window (the task's texts, joined by EOS, cut into windows)
    thought_len: int = 12  # L: thinking tokens sampled at every position (Quiet-STaR's 12)
    lookahead: int = 4  # n: true tokens after each thought whose log-prob gain is the reward (Quiet-STaR's 4)
    scorer: str = "policy"  # policy | teacher
    teacher_top_k: int = 16  # teacher scorer: the teacher's top-k next tokens, renormalised, are the targets
    mixing_head: bool = False  # Quiet-STaR's learned mixing of post- and pre-thought predictions
    # weight of the post-thought NLL of the targets (Quiet-STaR trains it beside REINFORCE)
    nll_coef: float = 1.0
    positive_only: bool = True  # keep only positive advantages (Quiet-STaR)
    format: str = "cot"  # task rows become text as prompt + target(row, format)

    def validate(self) -> None:
        for name in ("num_text", "thought_len", "lookahead", "teacher_top_k"):
            if getattr(self, name) < 1:
                raise UserError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_text < 2:
            raise UserError("parallel.num_text must be >= 2: a position needs a next token to be scored")
        if self.scorer not in SCORERS:
            raise UserError(f"unknown parallel.scorer {self.scorer!r}: expected one of {', '.join(SCORERS)}")
        if self.nll_coef < 0:
            raise UserError(f"parallel.nll_coef must be >= 0, got {self.nll_coef}")
