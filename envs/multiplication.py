"""k-digit by k-digit multiplication with a partial-product chain of thought (as in the implicit-CoT
line of work), optionally with spaced and/or reversed digits, which makes it learnable for small models."""

from __future__ import annotations

from thinktok.errors import UserError

from .base import Task, unique


class Multiplication(Task):
    def number(self, n: int) -> str:
        digits = str(n)[::-1] if self.cfg.reverse else str(n)
        return " ".join(digits) if self.cfg.spaced else digits

    def make(self, rng, b_digits: int | None = None) -> dict:
        k = self.cfg.digits
        kb = b_digits or k
        a, b = rng.randint(10 ** (k - 1), 10**k - 1), rng.randint(10 ** (kb - 1), 10**kb - 1)
        partials = [a * int(d) * 10**i for i, d in enumerate(reversed(str(b)))]
        return {
            "prompt": f"{self.number(a)} * {self.number(b)} =",
            "answer": self.number(a * b),
            "steps": [self.number(p) for p in partials],  # a times each digit of b, least significant first
            "a": a,
            "b": b,
        }

    def rows(self) -> list[dict]:
        """k x k problems; with easy_fraction, that share of the training rows (spread through it) replaced by
        k x 1 problems."""
        c = self.cfg
        rows = unique(self.make, c.num_train + c.num_val + c.num_test, c.seed)
        n_easy = round(c.easy_fraction * c.num_train)
        if n_easy:
            easy = unique(lambda rng: self.make(rng, b_digits=1), n_easy, c.seed + 1)
            if len(easy) < n_easy:
                raise UserError(f"only {len(easy)} distinct {c.digits}x1-digit problems for {n_easy} easy "
                                 "rows: lower easy_fraction")
            every = c.num_train / n_easy
            for i, row in enumerate(easy):
                rows[int(i * every)] = row
        return rows
