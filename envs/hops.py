"""Pointer chasing: a table of symbol -> symbol pairs (a random permutation of `symbols` letters) and a start
symbol; the answer is the symbol reached after following `depth` pointers. Each hop is one lookup, so
answer-only decoding needs `depth` sequential lookups in one forward pass (more than a 2-layer model has
layers for), while the chain of thought lists the intermediate symbols and makes each step one lookup.

    prompt  "map a f , b c , c a , d e , e b , f d | b ="   (depth 3: b -> c -> a -> f)
    cot     " c ; a ; f"        answer " f"

Every symbol is one GPT-2 token (" a" .. " z"), so a thought per intermediate symbol is one thought step.
"""

from __future__ import annotations

import string

from .base import Task, unique

LETTERS = string.ascii_lowercase


class Hops(Task):
    def make(self, rng) -> dict:
        c = self.cfg
        sym = rng.sample(LETTERS, c.symbols)
        nxt = dict(zip(sym, rng.sample(sym, len(sym))))
        keys = rng.sample(sym, len(sym))  # the table in a random order: position says nothing
        start = rng.choice(sym)
        path = [start]
        for _ in range(c.depth):
            path.append(nxt[path[-1]])
        return {"prompt": "map " + " , ".join(f"{k} {nxt[k]}" for k in keys) + f" | {start} =",
                "answer": path[-1], "steps": path[1:-1]}

    def rows(self) -> list[dict]:
        c = self.cfg
        return unique(self.make, c.num_train + c.num_val + c.num_test, c.seed)
