"""k-digit by k-digit multiplication with a partial-product chain of thought (as in the implicit-CoT
line of work), optionally with spaced and/or reversed digits, which makes it learnable for small models."""

from __future__ import annotations

from .base import Task, unique


class Multiplication(Task):
    def number(self, n: int) -> str:
        digits = str(n)[::-1] if self.cfg.reverse else str(n)
        return " ".join(digits) if self.cfg.spaced else digits

    def make(self, rng) -> dict:
        k = self.cfg.digits
        a, b = rng.randint(10 ** (k - 1), 10**k - 1), rng.randint(10 ** (k - 1), 10**k - 1)
        partials = [a * int(d) * 10**i for i, d in enumerate(reversed(str(b)))]
        return {
            "prompt": f"{self.number(a)} * {self.number(b)} =",
            "answer": self.number(a * b),
            "steps": [self.number(p) for p in partials],  # a times each digit of b, least significant first
            "a": a,
            "b": b,
        }

    def rows(self) -> list[dict]:
        c = self.cfg
        return unique(self.make, c.num_train + c.num_val + c.num_test, c.seed)
