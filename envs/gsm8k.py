"""GSM8K from the hub (`openai/gsm8k`, config `main`) when reachable; offline, a clear error."""

from __future__ import annotations

from typing import TYPE_CHECKING

from thinktok.errors import UserError

from .base import Task, norm

if TYPE_CHECKING:
    from datasets import DatasetDict


class GSM8K(Task):
    def load(self) -> DatasetDict:
        from datasets import DatasetDict, load_dataset

        try:
            raw = load_dataset("openai/gsm8k", "main")
        except Exception as e:
            raise UserError(f"GSM8K needs the Hugging Face hub (openai/gsm8k), which is not reachable here "
                             f"({e.__class__.__name__}); use multiplication, hops, prosqa or prontoqa "
                             "offline") from None
        split = raw["train"].train_test_split(test_size=self.cfg.num_val, seed=self.cfg.seed)

        def convert(ds):
            return ds.map(self.convert, remove_columns=ds.column_names)

        return DatasetDict(train=convert(split["train"]), validation=convert(split["test"]),
                           test=convert(raw["test"]))

    @staticmethod
    def convert(row: dict) -> dict:
        reasoning, answer = row["answer"].split("####")
        return {"prompt": f"Question: {row['question']} Answer:", "answer": answer.strip(),
                "steps": [s.strip() for s in reasoning.strip().split("\n") if s.strip()]}

    def check(self, text, row):
        return norm(text.split(";")[-1]).replace(",", "") == norm(row["answer"]).replace(",", "")
