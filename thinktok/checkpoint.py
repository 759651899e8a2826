"""Checkpoint layout: every file a thinktok checkpoint holds, named here and nowhere else.

A checkpoint is Hugging Face format (model + tokenizer with thinking tokens, loads with
`AutoModelForCausalLM`) plus:
  thinktok_vocab.json      the thinking vocabulary's layout (models/vocab.py, which names the file)
  thinktok_init_rows.pt    the new rows as initialised (row-movement measures)
  thinktok_run.yaml        which task, format and thought mode the weights were trained for (and the parallel
                           settings), so that `sample`, `eval` and `compare` need no other input
  thinktok_extra.pt        RL checkpoints: the learner's extra modules (thought mode, value head, mixing head)
  thinking_rows.json       SFT checkpoints: each thinking row's movement and gradient norm over training
Written atomically: a temp directory renamed into place. Only file names and yaml at import: models/policy.py
imports the names, and the loaders import the configs they build (from models/, envs/, rl/) when called.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
import yaml

from thinktok.errors import UserError

INIT_ROWS_FILE = "thinktok_init_rows.pt"
RUN_INFO = "thinktok_run.yaml"
EXTRA_STATE = "thinktok_extra.pt"
ROWS_FILE = "thinking_rows.json"


def save_run_info(directory: Path, task, format: str, thought, parallel=None) -> None:
    """format: the SFT text format, "rl", or "parallel" (then `parallel` holds the parallel-thought settings).
    task: TaskConfig; thought: ThoughtConfig or None (a plain LM); parallel: ParallelConfig or None."""
    from thinktok.models.thought_config import ThoughtConfig

    thought = thought if thought is not None else ThoughtConfig(mode="none", num_thinking=0)
    info = {"task": dataclasses.asdict(task), "format": format, "thought": dataclasses.asdict(thought)}
    if parallel is not None:
        info["parallel"] = dataclasses.asdict(parallel)
    (Path(directory) / RUN_INFO).write_text(yaml.safe_dump(info, sort_keys=False))


def read_run_info(directory: Path) -> dict:
    path = Path(directory) / RUN_INFO
    if not path.exists():
        raise UserError(f"{directory} is not a thinktok checkpoint: {RUN_INFO} is missing (a checkpoint "
                         "from before this layout, or a plain Hugging Face model: pass its thought settings "
                         "by hand)")
    return yaml.safe_load(path.read_text())


def load_run_info(directory: Path):
    """-> (TaskConfig, format, ThoughtConfig) the checkpoint was trained with."""
    from thinktok.config import from_dict
    from thinktok.envs import TaskConfig
    from thinktok.models.thought_config import ThoughtConfig

    info = read_run_info(directory)
    return from_dict(TaskConfig, info["task"]), info["format"], from_dict(ThoughtConfig, info["thought"])


def load_parallel_info(directory: Path):
    """-> the checkpoint's ParallelConfig, or None for a sequential checkpoint."""
    from thinktok.config import from_dict
    from thinktok.rl.parallel.config import ParallelConfig

    info = read_run_info(directory)
    if "parallel" not in info:
        return None
    if "num_real" in info["parallel"]:  # checkpoints written before the key was named num_text
        info["parallel"]["num_text"] = info["parallel"].pop("num_real")
    return from_dict(ParallelConfig, info["parallel"])


def step_of(checkpoint: Path) -> int:
    """trainer/checkpoint-N -> N."""
    return int(Path(checkpoint).name.rsplit("-", 1)[1])


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory: its `checkpoint/` (sft) or newest `trainer/checkpoint-N`
    (train)."""
    path = Path(path)
    if (path / RUN_INFO).exists():
        return path
    if (path / "checkpoint" / RUN_INFO).exists():
        return path / "checkpoint"
    steps = sorted((path / "trainer").glob("checkpoint-*"), key=step_of)
    if steps:
        return steps[-1]
    if (path / "config.json").exists():  # a model directory without the run info: an older layout
        read_run_info(path)  # raises, naming the missing file
    raise UserError(f"no checkpoint found at {path}")


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


def save_extra_state(directory: Path, modules: dict) -> None:
    torch.save({name: m.state_dict() for name, m in modules.items()}, Path(directory) / EXTRA_STATE)


def load_extra_state(directory: Path, modules: dict) -> None:
    """Load what the checkpoint holds into `modules` (name -> module); a module it lacks keeps its weights."""
    path = Path(directory) / EXTRA_STATE
    state = torch.load(path) if path.exists() else {}
    for name, module in modules.items():
        if name in state:
            module.load_state_dict(state[name])


class RunTrainer:
    """Mixin for the RL learner classes: atomic checkpoints that carry everything a checkpoint must.
    run_cfg (TrainConfig), vocab and init_rows are what every checkpoint of the run records."""

    def __init__(self, *args, run_cfg, vocab, init_rows: torch.Tensor, **kwargs):
        self.run_cfg, self.vocab, self.init_rows = run_cfg, vocab, init_rows
        self._save_root: str | None = None
        super().__init__(*args, **kwargs)

    def _get_output_dir(self, trial):
        return self._save_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        root = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        self._save_root = str(root / ".saving")  # the Trainer writes into .saving/checkpoint-N
        main = self.accelerator.is_main_process
        if main:
            shutil.rmtree(self._save_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)  # the model from the first process, RNG states from each
        finally:
            self._save_root = None
        self.accelerator.wait_for_everyone()  # every process's RNG state is in before the rename
        if main:
            self.finish_checkpoint(root, name)
        self.accelerator.wait_for_everyone()

    def finish_checkpoint(self, root: Path, name: str) -> None:
        """What the Trainer does not write, then .saving/checkpoint-N renamed into place."""
        tmp = root / ".saving" / name
        self.vocab.save(tmp)
        torch.save(self.init_rows, tmp / INIT_ROWS_FILE)
        parallel = self.run_cfg.rollout == "parallel"
        save_run_info(tmp, self.run_cfg.task, "parallel" if parallel else "rl", self.run_cfg.thought,
                      self.run_cfg.parallel if parallel else None)
        save_extra_state(tmp, self.extra_modules)
        atomic_save(root / name, lambda d: [p.rename(d / p.name) for p in tmp.iterdir()])
        shutil.rmtree(root / ".saving")
