"""`thinktok train CONFIG [key=value ...]`: the main job. Data flows one way:
task prompts -> Ray rollout workers (policy copies, any thought mode) -> Ray reward workers (the frozen
teacher scores the text views) -> TRL learner (GRPO / RLOO / PPO) -> new weights -> rollout workers.
With rollout=parallel the prompts are windows of the task's text, the rollout workers think at every
position at once and the scoring workers reward each position's thought by its gain (rl/parallel/).

Outputs under runs/<name>/: config.yaml (as resolved), metrics.jsonl (one line per step), TensorBoard
events, checkpoints (HF format + tokenizer with thinking tokens + trainer state, written atomically),
evals.jsonl and annotated sample rollouts (JSONL + HTML) at step 0, every eval and the end.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from torch import nn
from transformers.trainer_callback import ProgressCallback, TrainerCallback
from trl import GRPOConfig

from thinktok.checkpoint import RunTrainer, atomic_save, find_checkpoint, load_extra_state, step_of
from thinktok.compat import check_libraries
from thinktok.config import save_config
from thinktok.envs import load_task
from thinktok.errors import UserError
from thinktok.models.head import head_columns
from thinktok.models.policy import freeze_rows, load_policy
from thinktok.models.thought_modes import make_mode
from thinktok.sft import ensure_checkpoint
from thinktok.sft_callbacks import WallClock

from .actors import sequential_workers, start_workers, stop_workers
from .config import TrainConfig
from .learner import ThoughtGRPOTrainer
from .logs import RewardProgress, RunLogger, truncate_after
from .ppo import ThoughtPPOTrainer, value_head
from .rewards import gold_answer
from .step import Collector


class GRPORun(RunTrainer, ThoughtGRPOTrainer):
    """GRPO / RLOO on sequential rollouts, with the run's checkpoints."""


class PPORun(RunTrainer, ThoughtPPOTrainer):
    """PPO on sequential rollouts, with the run's checkpoints."""


@dataclass
class RolloutPath:
    """What differs between the sequential and the parallel path, built by one function each (PATHS)."""

    prompts: dict  # TRL's prompt strings -> task rows (sequential) or window token ids (parallel)
    workers: tuple  # (rollout, reward) worker classes and arguments, for start_workers
    collector: partial  # stages 1-3 of the step (rl/step.py); takes the started workers
    trainer: type
    trainer_kwargs: dict
    extra_modules: dict[str, nn.Module]  # beside the thought mode (a mixing head)
    completion_len: int
    val_windows: list | None = None


def sequential_path(cfg: TrainConfig, policy, task, init_dir: str, teacher: str | None) -> RolloutPath:
    rows = task.dataset["train"].to_list()
    prompts = {r["prompt"]: r for r in rows}
    gold = {r["prompt"]: gold_answer(policy.tokenizer, task, r) for r in rows} if cfg.rl.latent_coef else None
    workers = sequential_workers(init_dir, teacher, cfg.thought, cfg.sampling, cfg.rewards, cfg.task)
    trainer, kwargs = (PPORun, dict(gamma=cfg.rl.gamma, lam=cfg.rl.lam, vf_coef=cfg.rl.vf_coef)) \
        if cfg.rl.algo == "ppo" else (GRPORun, {})
    return RolloutPath(prompts, workers,
                       partial(Collector, tokenizer=policy.tokenizer, rows_by_prompt=prompts, seed=cfg.seed,
                               gold_by_prompt=gold),
                       trainer, {**kwargs, "kl_coef": cfg.rl.beta, "latent_coef": cfg.rl.latent_coef}, {},
                       cfg.sampling.max_new_tokens + cfg.thought.budget + 2)


def parallel_path(cfg: TrainConfig, policy, task, init_dir: str, teacher: str | None) -> RolloutPath:
    from thinktok.models.parallel_gpt2 import MixingHead

    from .parallel.actors import parallel_workers
    from .parallel.learner import ParallelCollector, ParallelRun
    from .parallel.rollout import task_windows

    p = cfg.parallel
    windows = {split: task_windows(task, split, p, policy.tokenizer) for split in ("train", "validation")}
    prompts = {f"window {i}": w for i, w in enumerate(windows["train"])}
    heads = {"mixing_head": MixingHead(policy.model.config.hidden_size)} if p.mixing_head else {}
    return RolloutPath(prompts, parallel_workers(init_dir, teacher, cfg.thought, cfg.sampling, p),
                       partial(ParallelCollector, windows_by_prompt=prompts, cfg=p, seed=cfg.seed),
                       ParallelRun, {"parallel": p}, heads, p.num_text * p.thought_len, windows["validation"])


PATHS = {"sequential": sequential_path, "parallel": parallel_path}


def ensure_teacher(cfg: TrainConfig, can_train: bool = True) -> str | None:
    """The teacher checkpoint (trained first when missing), with a warning when it is the policy's own
    start."""
    if cfg.teacher is not None and Path(cfg.teacher).resolve() == Path(cfg.policy).resolve():
        warnings.warn(f"the teacher is the policy's own starting checkpoint ({cfg.teacher}): it knows "
                      f"nothing the student does not, so teacher rewards pay for imitating it, not for "
                      f"useful thoughts", stacklevel=2)
    return ensure_checkpoint(cfg.teacher, cfg.teacher_sft, "teacher", can_train)


def latest_checkpoint(out: Path) -> Path | None:
    return find_checkpoint(out) if list((out / "trainer").glob("checkpoint-*")) else None


class SaveAtEnd(TrainerCallback):
    """The last step is saved, whether max_steps, max_seconds or a stop from another callback ended the run
    (the Trainer saves every save_every steps only). After WallClock in the callbacks: it reads its stop."""

    def on_step_end(self, args, state, control, **kw):
        control.should_save |= control.should_training_stop or state.global_step >= state.max_steps


def run_train(cfg: TrainConfig, resume: bool = False) -> Path:
    """The run: built by `build_run`, then TRL's loop, resumed from the newest checkpoint when asked."""
    trainer, workers, resume_from = build_run(cfg, resume)
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        final = latest_checkpoint(cfg.out_dir)
    finally:
        stop_workers(workers)
    return final


def build_run(cfg: TrainConfig, resume: bool = False):
    """-> (the trainer, its started workers, the checkpoint to resume from or None); the run directory holds
    the resolved config, the initial policy and (resumed) the logs cut at the checkpoint."""
    # config and run directory
    cfg.validate()
    check_libraries()  # before any SFT warm start or Ray worker: a wrong TRL fails here, not after them
    # the learner processes under accelerate / torchrun (one without): the first writes the run directory
    # (with transformers' ddp_timeout, 30 min, which this state pre-empts: the first process's evals, while
    # the others wait at the next step, may outlast NCCL's own 10 min default)
    state = PartialState(cpu=cfg.device == "cpu", timeout=timedelta(seconds=1800))
    out = cfg.out_dir
    resume_from = latest_checkpoint(out) if resume else None
    if resume and resume_from is None:
        raise UserError(f"--resume {out}: no checkpoint to resume from")
    if resume_from is not None and step_of(resume_from) >= cfg.rl.max_steps:  # the Trainer would add a step
        done = step_of(resume_from)
        raise UserError(f"--resume {out}: the run finished at step {done} (rl.max_steps={cfg.rl.max_steps}); "
                        f"pass rl.max_steps=N with N > {done} to continue it")
    if not resume and (out / "metrics.jsonl").exists():
        raise UserError(f"{out} already holds a run: pass --resume {out}, or choose another name/run_dir")
    thought, rl = cfg.thought, cfg.rl
    init_dir = out / "policy_init"
    with state.main_process_first():  # the others read what the first wrote
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        torch.manual_seed(cfg.seed)
        # models: the teacher and initial policy (trained first when missing: one process only), the policy
        # with its thinking rows
        teacher = ensure_teacher(cfg, can_train=state.num_processes == 1)
        ensure_checkpoint(cfg.policy, cfg.policy_sft, "policy", can_train=state.num_processes == 1)
        if not (init_dir / "config.json").exists():  # saved once: a resumed run, the KL reference reload it
            start = load_policy(cfg.policy, thought.vocab_tokens, thought.markers, init=thought.init,
                                seed=cfg.seed)
            atomic_save(init_dir, start.save)
    policy = load_policy(str(init_dir), thought.vocab_tokens, thought.markers)
    if thought.mode == "pause":  # pause rows stay at their initial values, as in SFT's frozen-pause baseline
        freeze_rows(policy, list(range(policy.vocab.text_size, policy.vocab.size)))
    # data and the rollout path
    task = load_task(cfg.task)
    path = PATHS[cfg.rollout](cfg, policy, task, str(init_dir), teacher)
    extra = {"mode": make_mode(thought, policy.vocab, cfg.sampling, head_columns(policy.model)),
             **path.extra_modules}
    if rl.algo == "ppo":
        extra["value_head"] = value_head(policy.model.config.hidden_size)
    # workers
    workers = start_workers(cfg.ray, *path.workers)
    # the learner
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tb")
    if not cfg.ray.verbose:  # TRL 1.16 calls transformers APIs that 5.x deprecates: not the user's concern
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    args = GRPOConfig(
        output_dir=str(out / "trainer"), report_to=["tensorboard"], logging_steps=1,
        per_device_train_batch_size=rl.prompts_per_step * rl.num_generations,
        num_generations=rl.num_generations,
        steps_per_generation=1, num_iterations=1, max_steps=rl.max_steps, learning_rate=rl.lr,
        lr_scheduler_type="constant", beta=0.0, epsilon=rl.epsilon, max_grad_norm=rl.max_grad_norm,
        entropy_coef=rl.entropy_coef,
        scale_rewards="none" if rl.algo == "rloo" else "group", max_completion_length=path.completion_len,
        save_strategy="steps", save_steps=cfg.save_every, use_cpu=cfg.device == "cpu", bf16=False,
        gradient_checkpointing=False, disable_dropout=True, seed=cfg.seed, log_completions=False,
        dataloader_num_workers=0, weight_decay=0.0, warmup_steps=0,
    )
    kl_ref = load_policy(str(init_dir), thought.vocab_tokens, thought.markers).model if rl.beta else None
    logger = RunLogger(cfg, extra, policy, task, path.val_windows)
    trainer = path.trainer(
        model=policy.model, args=args, processing_class=policy.tokenizer,
        train_dataset=Dataset.from_dict({"prompt": list(path.prompts)}), collector=path.collector(workers),
        callbacks=[WallClock(rl.max_seconds), SaveAtEnd(), logger], extra_modules=extra, algo=rl.algo,
        kl_ref=kl_ref, run_cfg=cfg, vocab=policy.vocab, init_rows=policy.init_rows, **path.trainer_kwargs)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RewardProgress)
    if resume_from is not None:
        load_extra_state(resume_from, extra)
        for name in ("metrics.jsonl", "evals.jsonl"):
            truncate_after(out / name, step_of(resume_from))
        print(f"resuming from {resume_from} (step {step_of(resume_from)})")
    return trainer, workers, resume_from
