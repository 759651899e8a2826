"""Tasks as `datasets.Dataset` splits, each knowing its prompt, gold continuation and answer check."""

from .base import FORMATS, TASKS, Task, TaskConfig
from .gsm8k import GSM8K
from .hops import Hops
from .logic import ProntoQA, ProsQA
from .multiplication import Multiplication
from .text import Text

TASKS.update(multiplication=Multiplication, hops=Hops, prosqa=ProsQA, prontoqa=ProntoQA, text=Text,
             gsm8k=GSM8K)


def load_task(cfg: TaskConfig) -> Task:
    cfg.validate()
    return TASKS[cfg.name](cfg)


__all__ = ["FORMATS", "Task", "TaskConfig", "load_task"]
