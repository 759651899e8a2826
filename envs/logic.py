"""Graph reasoning in Coconut's ProsQA format (`{question, answer, steps, edges, root, target, neg_target,
idx_to_symbol}`), generated procedurally or imported from a JSON file, and a ProntoQA-style
true/false variant. Generation is deterministic by seed; depth, branching and distractors are set."""

from __future__ import annotations

import json
import re
from pathlib import Path

from thinktok.errors import UserError

from .base import Task, norm, unique

ONSETS = ["b", "d", "f", "g", "l", "m", "n", "r", "s", "t", "v", "w", "y", "z", "gr", "st", "sh", "br"]
VOWELS = ["a", "e", "i", "o", "u"]
CODAS = ["mpus", "rpus", "ngus", "lpus", "mpee", "rnus", "xus", "ffo"]
NAMES = ["Alex", "Sam", "Tom", "Max", "Jack", "Polly", "Rex", "Wren", "Fae", "Stella"]
ADJECTIVES = ["bright", "cold", "sour", "loud", "small", "fast", "dull", "wooden"]


def symbols(rng, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        word = rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
        if word not in out:
            out.append(word)
    return out


class ProsQA(Task):
    """"Every X is a Y" facts over a DAG; is the entity a `target` (reachable) or `neg_target` (not)?"""

    def make(self, rng) -> dict:
        c = self.cfg
        path_len = c.depth + 1
        n = path_len + c.branching + c.distractors * path_len
        sym = symbols(rng, n)
        path = list(range(path_len))  # root .. target
        edges = [[path[i], path[i + 1]] for i in range(c.depth)]
        nxt = path_len
        for _ in range(c.branching):  # dead ends hanging off the gold path: reachable, but not an option
            edges.append([rng.choice(path[:-1]), nxt])
            nxt += 1
        ends = []
        for _ in range(c.distractors):  # disjoint chains: not reachable from the root
            chain = list(range(nxt, nxt + path_len))
            edges += [[chain[i], chain[i + 1]] for i in range(c.depth)]
            ends.append(chain[-1])
            nxt += path_len
        neg = ends[0]
        name = rng.choice(NAMES)
        facts = [f"Every {sym[a]} is a {sym[b]}." for a, b in edges]
        rng.shuffle(facts)
        options = [sym[path[-1]], sym[neg]]
        rng.shuffle(options)
        return {
            "prompt": " ".join(facts) + f" {name} is a {sym[0]}. Is {name} a {options[0]} or {options[1]}?",
            "question": " ".join(facts) + f" {name} is a {sym[0]}. Is {name} a {options[0]} or {options[1]}?",
            "answer": f"{name} is a {sym[path[-1]]}.",
            "steps": [f"{name} is a {sym[p]}." for p in path[1:-1]],
            "edges": edges,
            "root": 0,
            "target": path[-1],
            "neg_target": neg,
            "idx_to_symbol": sym,
        }

    def rows(self) -> list[dict]:
        c = self.cfg
        if c.path:
            return self.import_json(Path(c.path))
        return unique(self.make, c.num_train + c.num_val + c.num_test, c.seed)

    @staticmethod
    def import_json(path: Path) -> list[dict]:
        """Coconut's files: a JSON list of {question, answer, steps, ...}; `prompt` := question."""
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read ProsQA file {path}: {e}") from None
        if not isinstance(data, list) or not all({"question", "answer", "steps"} <= set(r) for r in data):
            raise UserError(f"{path}: expected a JSON list of objects with question, answer and steps")
        return [{**r, "prompt": r["question"]} for r in data]

    def check(self, text: str, row: dict) -> bool:
        # the last "is a X" in the continuation is the answer
        found = re.findall(r"is an? (\w+)", text.split(";")[-1])
        return bool(found) and norm(found[-1]) == norm(row["answer"].split()[-1])


class ProntoQA(Task):
    """ProntoQA-style: a `depth`-hop chain of "Every X is a Y", a property at its end, true or false."""

    def make(self, rng) -> dict:
        c = self.cfg
        sym = symbols(rng, c.depth + 2)
        chain, other = sym[: c.depth + 1], sym[-1]
        adj = rng.choice(ADJECTIVES)
        truth = rng.random() < 0.5
        name = rng.choice(NAMES)
        facts = [f"Every {chain[i]} is a {chain[i + 1]}." for i in range(c.depth)]
        facts.append(f"Every {chain[-1]} is {'' if truth else 'not '}{adj}.")
        # distractor with the opposite claim
        facts.append(f"Every {other} is {'not ' if truth else ''}{adj}.")
        rng.shuffle(facts)
        return {
            "prompt": " ".join(facts) + f" {name} is a {chain[0]}. True or false: {name} is {adj}.",
            "answer": "True" if truth else "False",
            "steps": [f"{name} is a {s}." for s in chain[1:]]
            + [f"{name} is {'' if truth else 'not '}{adj}."],
        }

    def rows(self) -> list[dict]:
        c = self.cfg
        return unique(self.make, c.num_train + c.num_val + c.num_test, c.seed)
