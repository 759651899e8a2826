"""What every task is: a `datasets.DatasetDict` (train/validation/test, fixed by a seed) of rows
`{prompt, answer, steps}` plus how to render a gold continuation and how to check an answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from thinktok.errors import UserError

if TYPE_CHECKING:  # imported where a task is built: a config or a rollout worker needs no pandas or arrow
    from datasets import DatasetDict

FORMATS = ("answer", "cot")


@dataclass
class TaskConfig:
    name: str = "multiplication"  # multiplication | hops | prosqa | prontoqa | text | gsm8k
    digits: int = 2  # multiplication: k-digit by k-digit, k = 2..5
    spaced: bool = False  # multiplication: digits separated by spaces
    reverse: bool = False  # multiplication: least significant digit first
    # multiplication: fraction of the training problems that are easy (k-digit x 1-digit: one partial
    # product); validation and test stay k x k. Outcome-only RL finds step-by-step solutions when short
    # instances are common enough (arXiv 2601.15158)
    easy_fraction: float = 0.0
    depth: int = 3  # hops: pointers to follow; prosqa/prontoqa: reasoning hops
    symbols: int = 8  # hops: distinct letters in the table (2..26)
    branching: int = 2  # prosqa: dead-end branches off the gold path
    distractors: int = 1  # prosqa: disjoint chains (one of them holds the wrong option)
    path: str | None = None  # prosqa: import a Coconut-format JSON; text: a file or folder of .txt
    # text: a `datasets` name, or "pydoc": CPython's documentation topics (offline)
    dataset: str | None = None
    prompt_words: int = 24  # text: words of prefix
    answer_words: int = 24  # text: words to continue
    num_train: int = 2000  # training examples
    num_val: int = 200  # validation examples (evals during training)
    num_test: int = 200  # test examples (thinktok eval)
    seed: int = 0  # the generator's seed: fixes the splits

    def validate(self) -> None:
        if self.name not in TASKS:
            raise UserError(f"unknown task {self.name!r}: expected one of {', '.join(TASKS)}")
        if self.name == "multiplication" and not 1 <= self.digits <= 5:
            raise UserError(f"multiplication digits must be in 1..5, got {self.digits}")
        if self.name == "hops" and not (2 <= self.symbols <= 26 and self.depth >= 1):
            raise UserError(f"hops needs 2 <= symbols <= 26 and depth >= 1, got symbols={self.symbols}, "
                             f"depth={self.depth}")
        if not 0 <= self.easy_fraction < 1:
            raise UserError(f"easy_fraction must be in [0, 1), got {self.easy_fraction}")
        if min(self.num_train, self.num_val, self.num_test) < 1:
            raise UserError("num_train, num_val and num_test must be >= 1")


class Task:
    """A task's data and its rules. Subclasses fill `rows()` (or override `load`) and `check`."""

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.dataset = self.load()

    def load(self) -> DatasetDict:
        from datasets import Dataset, DatasetDict

        rows = self.rows()
        n_tr, n_va = self.cfg.num_train, self.cfg.num_val
        if len(rows) < n_tr + n_va + self.cfg.num_test:
            raise UserError(f"task {self.cfg.name} has only {len(rows)} distinct problems for "
                             f"{n_tr}+{n_va}+{self.cfg.num_test} requested")
        return DatasetDict(train=Dataset.from_list(rows[:n_tr]),
                           validation=Dataset.from_list(rows[n_tr : n_tr + n_va]),
                           test=Dataset.from_list(rows[n_tr + n_va : n_tr + n_va + self.cfg.num_test]))

    def rows(self) -> list[dict]:
        raise NotImplementedError

    def target(self, row: dict, fmt: str = "answer") -> str:
        """Gold continuation of the prompt: the answer, or the chain of thought then the answer."""
        if fmt == "answer":
            return " " + row["answer"]
        if fmt == "cot":
            return " " + " ; ".join(row["steps"] + [row["answer"]])
        raise UserError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")

    def reasoning(self, row: dict) -> str:
        """The gold chain of thought that precedes the answer in the cot format (" s1 ; s2 ;"), "" without
        steps: the privileged context a teacher may read (rewards.teacher_context=gold_cot)."""
        return " " + " ; ".join(row["steps"]) + " ;" if row["steps"] else ""

    def check(self, text: str, row: dict) -> bool:
        """Is the generated continuation's final answer right? (Text after the last ';' is the answer.)"""
        return norm(text.split(";")[-1]) == norm(row["answer"])


def norm(text: str) -> str:
    return "".join(text.split()).rstrip(".").lower()


def unique(make, n: int, seed: int) -> list[dict]:
    """n distinct rows from a seeded generator `make(rng)` (distinct prompts: no test row seen in
    training)."""
    import random

    rng, seen, rows = random.Random(seed), set(), []
    for _ in range(50 * n):
        row = make(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
            if len(rows) == n:
                break
    return rows


TASKS: dict[str, type[Task]] = {}
