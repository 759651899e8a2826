"""Checkpoints: Hugging Face format (model + tokenizer with thinking tokens + thinktok's vocabulary layout),
plus `thinktok_run.yaml` saying which task, format and thought mode the weights were trained for, so that
`eval` and `sample` need no other input. Written atomically: a temp directory renamed into place."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import yaml

from thinktok.config import from_dict
from thinktok.envs import TaskConfig
from thinktok.models.thoughts import ThoughtConfig

from .parallel import ParallelConfig

RUN_INFO = "thinktok_run.yaml"
EXTRA_STATE = "thinktok_extra.pt"  # RL checkpoints: thought-mode parameters, PPO value head, mixing head


def save_run_info(directory: Path, task: TaskConfig, format: str, thought: ThoughtConfig | None,
                  parallel: ParallelConfig | None = None) -> None:
    """format: the SFT text format, "rl", or "parallel" (then `parallel` holds the parallel-thought settings)."""
    info = {"task": dataclasses.asdict(task), "format": format,
            "thought": dataclasses.asdict(thought if thought is not None else ThoughtConfig(mode="none", num_thinking=0))}
    if parallel is not None:
        info["parallel"] = dataclasses.asdict(parallel)
    (Path(directory) / RUN_INFO).write_text(yaml.safe_dump(info, sort_keys=False))


def load_run_info(directory: Path) -> tuple[TaskConfig, str, ThoughtConfig]:
    path = Path(directory) / RUN_INFO
    if not path.exists():
        raise ValueError(f"{directory} is not a thinktok checkpoint (no {RUN_INFO})")
    info = yaml.safe_load(path.read_text())
    return from_dict(TaskConfig, info["task"]), info["format"], from_dict(ThoughtConfig, info["thought"])


def load_parallel_info(directory: Path) -> ParallelConfig | None:
    info = yaml.safe_load((Path(directory) / RUN_INFO).read_text())
    return from_dict(ParallelConfig, info["parallel"]) if "parallel" in info else None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory: its `checkpoint/` (sft) or newest `trainer/checkpoint-N` (train)."""
    path = Path(path)
    if (path / RUN_INFO).exists():
        return path
    if (path / "checkpoint" / RUN_INFO).exists():
        return path / "checkpoint"
    steps = sorted((path / "trainer").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if steps:
        return steps[-1]
    raise ValueError(f"no checkpoint found at {path}")


def atomic_save(directory: Path, write) -> Path:
    """write(tmp_dir) then rename into place: a kill mid-save never leaves a broken checkpoint."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)
    return directory
