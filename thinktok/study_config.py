"""A study's configuration (`thinktok study CONFIG`): its arms, seeds, shared overrides, comparisons and
measures, checked before anything runs; thinktok/study.py runs it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from thinktok.analysis.content import ContentConfig
from thinktok.errors import UserError

KINDS = ("sft", "train", "eval")


@dataclass
class ArmConfig:
    name: str = "arm"  # the arm's name: its folder and its row in the report
    kind: str = "sft"  # sft | train | eval (training-free: init_from's checkpoint under `thought` overrides)
    config: str | None = None  # the YAML `thinktok sft` / `thinktok train` would take (not for eval)
    overrides: list[str] = field(default_factory=list)  # key=value over config (eval: ThoughtConfig keys)
    init_from: str | None = None  # another arm whose checkpoint (same seed) this one starts from
    num_cpus: float = 1.0  # the Ray task's request
    num_gpus: float = 0.0  # the Ray task's request
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources the task requests


@dataclass
class StudyConfig:
    name: str = "study"  # the study directory is runs/<name> unless out_dir is set
    out_dir: str | None = None  # default runs/<name>
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # every arm runs once per seed
    sft_overrides: list[str] = field(default_factory=list)  # applied to every sft arm (task, model, budget)
    train_overrides: list[str] = field(default_factory=list)  # applied to every train arm (task, budget)
    arms: list[ArmConfig] = field(default_factory=list)  # the arms, in any order (init_from orders them)
    comparisons: list[list[str]] = field(default_factory=list)  # [arm a, arm b]: one paired statement each
    split: str = "test"  # the split every arm is evaluated on
    eval_limit: int | None = None  # first N examples of the split (None: all)
    # attempts of an (arm, seed) whose task is killed from outside (OOM kill, its worker's or node's death)
    max_attempts: int = 3
    # without a Ray address (a local cluster): (arm, seed)s running at once (each task uses one core); a retry
    # takes the next place
    parallel_arms: int = 2
    # what the thoughts carry (analysis/content.py), measured on every arm that thinks
    content: ContentConfig = field(default_factory=ContentConfig)
    # the frozen teacher of every train arm (set as their `teacher`) and of the text task's measures
    # (analysis/text_eval.py); one checkpoint for all seeds, trained by the driver from teacher_sft first
    # when missing, so that no two arms train it at once
    teacher: str | None = None
    teacher_sft: str | None = None  # the SFT config that writes `teacher`

    def validate(self) -> None:
        names = [a.name for a in self.arms]
        if not names:
            raise UserError("a study needs at least one arm")
        if len(set(names)) != len(names):
            raise UserError(f"arm names must be unique, got {names}")
        if not self.seeds:
            raise UserError("a study needs at least one seed")
        if self.max_attempts < 1 or self.parallel_arms < 1:
            raise UserError("max_attempts and parallel_arms must be >= 1")
        for a in self.arms:
            if a.kind not in KINDS:
                raise UserError(f"arm {a.name}: unknown kind {a.kind!r}: expected one of {', '.join(KINDS)}")
            if a.kind != "eval" and not a.config:
                raise UserError(f"arm {a.name}: kind {a.kind} needs a config")
            if a.kind == "eval" and not a.init_from:
                raise UserError(f"arm {a.name}: kind eval evaluates another arm's checkpoint: set init_from")
            if a.init_from is not None and a.init_from not in names:
                raise UserError(f"arm {a.name}: init_from {a.init_from!r} is not an arm of this study")
        for pair in self.comparisons:
            if len(pair) != 2 or not set(pair) <= set(names):
                raise UserError(f"comparison {pair} must name two arms of this study")
        order(self.arms)  # refuses cycles
        self.content.validate()
        for a in self.arms:  # an arm's bad override ends the study now, not hours in when the arm starts
            load_arm(self, a)  # (without its start checkpoint: the arm it starts from writes that)
        if self.teacher_sft and not self.teacher:
            raise UserError("teacher_sft needs teacher: the checkpoint path it writes")

    @property
    def dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")


def load_arm(cfg: StudyConfig, arm: ArmConfig, extra: list[str] = ()):
    """The arm's config (SFTConfig, TrainConfig, or an eval arm's ThoughtConfig) with the study's overrides,
    the study's teacher and the arm's own, then `extra` (run_arm's start checkpoint, seed and run directory),
    loaded and checked; a failure names the arm."""
    from thinktok.config import load_config
    from thinktok.models.thought_config import ThoughtConfig
    from thinktok.rl.config import TrainConfig
    from thinktok.sft_config import SFTConfig

    teacher = [f"teacher={cfg.teacher}", "teacher_sft=null"] if cfg.teacher else []
    cls, path, over = {
        "sft": (SFTConfig, arm.config, [*cfg.sft_overrides, *arm.overrides]),
        "train": (TrainConfig, arm.config, [*cfg.train_overrides, *teacher, *arm.overrides]),
        "eval": (ThoughtConfig, None, list(arm.overrides)),
    }[arm.kind]
    try:
        return load_config(cls, path, [*over, *extra])
    except (UserError, OSError) as e:  # ConfigError is a UserError
        raise UserError(f"arm {arm.name}: {e}") from None


def order(arms: list[ArmConfig]) -> list[ArmConfig]:
    """Arms with every init_from before its dependants."""
    by_name, done, out = {a.name: a for a in arms}, set(), []
    while len(out) < len(arms):
        ready = [a for a in arms if a.name not in done and (a.init_from is None or a.init_from in done)]
        if not ready:
            raise UserError(f"init_from forms a cycle among {sorted(set(by_name) - done)}")
        for a in ready:
            out.append(a)
            done.add(a.name)
    return out
