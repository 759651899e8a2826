"""The supervised runs' configs (thinktok sft CONFIG): model, training arguments, curriculum. The stages
and modes they select are described in thinktok/sft.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from thinktok.envs import FORMATS, TaskConfig
from thinktok.errors import UserError
from thinktok.models.head import HEADS
from thinktok.models.thought_config import ThoughtConfig

SCHEDULES = {"cosine": "cosine", "constant": "constant_with_warmup"}  # ours -> transformers' scheduler


@dataclass
class ModelConfig:
    name: str = "tiny"  # tiny | small | gpt2 | hub name | checkpoint directory
    init: str = "mean"  # new thinking rows: mean | norm
    # full: GPT-2's whole vocabulary | task: every distribution a softmax over the task's own text tokens,
    # the thinking tokens and markers (models/head.py); recorded in the checkpoint. Not for the text task
    head: str = "full"


@dataclass
class TrainArgs:
    epochs: float = 3.0  # epochs (without a curriculum)
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 32  # examples per optimizer step
    lr: float = 1e-3  # peak learning rate
    schedule: str = "cosine"  # after warm-up: cosine (decay to 0) | constant
    warmup_steps: int = 100  # optimizer steps of linear warm-up (per curriculum stage)
    max_grad_norm: float = 1.0  # global gradient-norm clip
    # stop after this many seconds of training (whole run, curriculum included; 0: no limit): for arms
    # compared at equal wall time
    max_seconds: float = 0.0
    log_every: int = 20  # steps between logged losses
    # steps between held-out evals (greedy validation accuracy with the controls, evals.jsonl: the learning
    # curve; also at step 0 and the end); 0: none. Not with a curriculum (its thoughts change by stage)
    eval_every: int = 0
    eval_examples: int = 200  # validation examples per eval
    device: str = "cpu"  # cpu | cuda


@dataclass
class CurriculumConfig:
    """Coconut: stage s replaces the first s reasoning steps with s * thoughts_per_step continuous
    thoughts."""

    stages: int = 2  # curriculum stages after stage 0 (plain CoT): stage s rewrites the first s steps
    thoughts_per_step: int = 1  # continuous thoughts per rewritten reasoning step
    epochs_per_stage: float = 1.0  # epochs of each curriculum stage
    # optimizer steps of each stage, overriding epochs_per_stage: one count for every stage, or a list of one
    # per stage (stage 0 first): the last stage, which must learn to read the rewritten steps, may need most
    steps_per_stage: int | list[int] = -1
    # first stage to train: a warm start from a curriculum checkpoint continues at its last stage
    start_stage: int = 0


@dataclass
class SFTConfig:
    name: str = "sft"  # run name: the run directory is runs/<name> unless run_dir is set
    run_dir: str | None = None  # default runs/<name>
    seed: int = 0  # seeds the model's initialisation, the new rows and the data order
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    format: str = "answer"  # answer | cot: the gold continuation trained on
    thought: ThoughtConfig | None = None  # None: a plain LM (base / teacher)
    slots: int = 0  # thought slots after the prompt (vocab/single/pause)
    train_slots: bool = True  # False: slot embeddings frozen (pause-token baseline)
    # fixed: slot j holds <think_{j mod N}> (seed 000's setup) | gumbel: the model draws each slot's token
    # from its thinking columns and learns the choice by straight-through Gumbel-softmax (mode vocab) |
    # code: the first code_steps reasoning steps in the discrete curriculum's code (labelled), the other
    # slots uniform draws (unlabelled; mode vocab)
    slot_choice: str = "fixed"
    code_steps: int = 1  # slot_choice=code: reasoning steps written in code into the first slots
    gumbel_tau: float = 1.0  # slot_choice=gumbel: the relaxation's temperature (the backward pass only)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    train: TrainArgs = field(default_factory=TrainArgs)

    def validate(self) -> None:
        self.task.validate()
        if self.model.head not in HEADS:
            raise UserError(f"unknown model.head {self.model.head!r}: expected one of {', '.join(HEADS)}")
        if self.model.head == "task" and self.task.name == "text":
            raise UserError("model.head=task is refused for the text task: real text needs the whole "
                             "vocabulary (set model.head=full)")
        if self.train.schedule not in SCHEDULES:
            raise UserError(f"unknown train.schedule {self.train.schedule!r}: expected one of "
                             f"{', '.join(SCHEDULES)}")
        c = self.curriculum
        if not 0 <= c.start_stage <= c.stages:
            raise UserError(f"curriculum.start_stage must be in 0..{c.stages}")
        if isinstance(c.steps_per_stage, list) and len(c.steps_per_stage) != c.stages + 1:
            raise UserError(f"curriculum.steps_per_stage lists {len(c.steps_per_stage)} counts for "
                             f"{c.stages + 1} stages (0..{c.stages})")
        if self.format not in FORMATS:
            raise UserError(f"unknown format {self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.thought is not None:
            self.thought.validate()
            if self.thought.mode == "soft":
                raise UserError("soft thoughts have no supervised arm here: train them with RL (thinktok "
                                 "train)")
            if self.thought.mode == "continuous" and self.format != "cot":
                raise UserError("the continuous curriculum replaces chain-of-thought steps: set format=cot")
            if self.discrete_curriculum:
                if self.curriculum.stages < 1:
                    raise UserError("the discrete curriculum (mode vocab, format cot) needs "
                                     "curriculum.stages >= 1")
            elif self.thought.mode != "continuous" and self.slots < 1:
                raise UserError(f"thought mode {self.thought.mode} needs slots >= 1")
        if self.slot_choice not in ("fixed", "gumbel", "code"):
            raise UserError(f"unknown slot_choice {self.slot_choice!r}: expected fixed, gumbel or code")
        if self.slot_choice in ("gumbel", "code"):
            th = self.thought
            if th is None or th.mode != "vocab" or self.slots < 1 or self.format != "answer":
                raise UserError(f"slot_choice={self.slot_choice} chooses the tokens of thought slots: it "
                                 "needs thought.mode vocab, slots >= 1 and format answer")
        if self.slot_choice == "code" and self.code_steps < 1:
            raise UserError("slot_choice=code writes code_steps >= 1 reasoning steps into the slots")
        if self.slot_choice == "gumbel":
            if not self.train_slots or self.gumbel_tau <= 0:
                raise UserError("slot_choice=gumbel trains the slots' choices: train_slots must be true and "
                                 "gumbel_tau > 0")
        if self.train.eval_every < 0 or self.train.eval_every and self.curriculum_stages:
            raise UserError("train.eval_every must be >= 0, and 0 with a curriculum (its thoughts change by "
                             "stage)")

    @property
    def discrete_curriculum(self) -> bool:
        """mode vocab with format cot and no slots: reasoning steps are rewritten in thinking tokens."""
        vocab = self.thought is not None and self.thought.mode == "vocab"
        return vocab and self.format == "cot" and not self.slots

    @property
    def curriculum_stages(self) -> bool:
        """Trained in curriculum stages (continuous, or the discrete curriculum)."""
        return self.thought is not None and (self.thought.mode == "continuous" or self.discrete_curriculum)

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"
