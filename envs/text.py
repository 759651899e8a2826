"""Free text (the text study: a student scored by a frozen teacher): a prefix as prompt, the model continues.
From local .txt files, a `datasets` name, or `pydoc`: the English documentation topics that ship with
CPython (`pydoc_data.topics`, ~65k words), an offline corpus on any machine. The "answer" is the true
continuation, which only likelihood rewards use."""

from __future__ import annotations

from pathlib import Path

from thinktok.errors import UserError

from .base import Task


class Text(Task):
    def documents(self) -> list[str]:
        c = self.cfg
        if c.path:
            p = Path(c.path)
            files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
            if not files or not all(f.exists() for f in files):
                raise UserError(f"text task: no readable .txt files at {p}")
            return [f.read_text(encoding="utf-8", errors="replace") for f in files]
        if c.dataset == "pydoc":
            from pydoc_data.topics import topics

            return [topics[k] for k in sorted(topics)]
        if c.dataset:
            from datasets import load_dataset

            try:
                ds = load_dataset(c.dataset, split="train")
            except Exception as e:  # offline or unknown name: say which, not a deep datasets traceback
                raise UserError(f"cannot load dataset {c.dataset!r} ({e.__class__.__name__}); "
                                 "offline, use text path=FILE_OR_DIR") from None
            return [r["text"] for r in ds]
        raise UserError("text task needs path= (a .txt file or folder) or dataset= (a datasets name)")

    def rows(self) -> list[dict]:
        c = self.cfg
        words = " ".join(self.documents()).split()
        span = c.prompt_words + c.answer_words
        return [{"prompt": " ".join(words[i : i + c.prompt_words]),
                 "answer": " ".join(words[i + c.prompt_words : i + span]), "steps": []}
                for i in range(0, len(words) - span + 1, span)]
