"""`thinktok train CONFIG [key=value ...]`: the main job. Data flows one way:
task prompts -> Ray rollout workers (policy copies, any thought mode) -> Ray teacher workers (frozen
teacher scores the text views) -> TRL learner (GRPO / RLOO / PPO) -> new weights -> rollout workers.
With rollout=parallel the prompts are windows of the task's text, the rollout workers think at every
position at once and the scoring workers reward each position's thought by its gain (rl/parallel.py).

Outputs under runs/<name>/: config.yaml (as resolved), metrics.jsonl (one line per step), TensorBoard
events, checkpoints (HF format + tokenizer with thinking tokens + trainer state, written atomically),
evals.jsonl and annotated sample rollouts (JSONL + HTML) at every eval.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from trl import GRPOConfig

from thinktok.config import load_config, save_config
from thinktok.envs import TaskConfig, load_task
from thinktok.models.policy import load_policy
from thinktok.models.policy import freeze_rows
from thinktok.models.thoughts import SamplingConfig, ThoughtConfig, check_trainable, make_mode

from .actors import RayConfig, start_workers, stop_workers
from .checkpoint import EXTRA_STATE, atomic_save, find_checkpoint, save_run_info
from .evaluate import evaluate_policy
from .learner import ParallelGRPOTrainer, ParallelRollouts, RayRollouts, ThoughtGRPOTrainer, ThoughtPPOTrainer, rollout_reward
from .parallel import ParallelConfig, evaluate_parallel, sample_parallel, task_windows
from .render import parallel_to_json, to_html, to_json, to_jsonl
from .rewards import GOLD_REWARDS, RewardConfig
from .rollout import sample

ALGOS = ("grpo", "rloo", "ppo")
ROLLOUTS = ("sequential", "parallel")


@dataclass
class RLConfig:
    algo: str = "grpo"  # grpo | rloo | ppo
    num_generations: int = 4  # rollouts per prompt (the group)
    prompts_per_step: int = 8
    max_steps: int = 60
    lr: float = 5e-5
    beta: float = 0.0  # KL(pi_text || init_text) at text steps, exact over the text columns (rl/learner.py)
    # weight of the supervised latent term -log pi_text(gold answer | prompt, the rollout's opening thoughts):
    # teaches the model to read its thoughts (STaR / Quiet-STaR); the parallel path has parallel.nll_coef
    latent_coef: float = 0.0
    epsilon: float = 0.2  # clip range
    max_grad_norm: float = 1.0
    gamma: float = 1.0  # ppo
    lam: float = 0.95  # ppo
    vf_coef: float = 0.5  # ppo
    # weight versions a rollout may lag the learner. Only 0: rollouts are always sampled with the learner's
    # current weights (the sampler's log-probs are the behaviour policy of the importance ratio, but nothing
    # here samples ahead of the learner yet)
    max_staleness: int = 0

    def validate(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"unknown algo {self.algo!r}: expected one of {', '.join(ALGOS)}")
        if self.max_staleness != 0:
            raise ValueError(f"rl.max_staleness={self.max_staleness}: asynchronous (stale) rollouts are not "
                             "implemented; every rollout uses the learner's current weights (set 0)")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2 (group baselines need two samples)")


@dataclass
class TrainConfig:
    name: str = "quickstart"
    run_dir: str | None = None  # default runs/<name>
    seed: int = 0
    device: str = "cpu"  # the learner's device
    policy: str = "tiny"  # initial policy: built-in config, hub name or checkpoint directory
    teacher: str | None = None  # frozen teacher checkpoint
    teacher_sft: str | None = None  # SFT config that trains the teacher when `teacher` does not exist yet
    policy_sft: str | None = None  # SFT config that trains the initial policy when `policy` does not exist yet
    task: TaskConfig = field(default_factory=TaskConfig)
    thought: ThoughtConfig = field(default_factory=ThoughtConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    rollout: str = "sequential"  # sequential: thoughts interleaved in rollouts | parallel: a thought at every position
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval_every: int = 10
    eval_examples: int = 64
    save_every: int = 10
    samples_per_eval: int = 4

    def validate(self) -> None:
        for part in (self.task, self.thought, self.sampling, self.rewards, self.rl):
            part.validate()
        if self.rollout not in ROLLOUTS:
            raise ValueError(f"unknown rollout {self.rollout!r}: expected one of {', '.join(ROLLOUTS)}")
        if self.rollout == "sequential":
            check_trainable(self.thought, self.sampling)
            s = self.sampling
            if "teacher_kl" in self.rewards.weights and (s.temperature != 1 or s.top_k or s.top_p < 1):
                raise ValueError("rewards teacher_kl estimates -KL(pi_text || teacher) only from samples of pi_text: "
                                 "sample at temperature 1 without top_k/top_p (else it estimates "
                                 "KL(pi_s || pi_text) - KL(pi_s || teacher) for the sampling distribution pi_s)")
            gold_only = set(self.rewards.weights) <= set(GOLD_REWARDS) and not self.rewards.thinking_cost
            if self.thought.mode == "pause" and gold_only and not self.rl.latent_coef:
                raise ValueError("with pause thoughts (inserted by rule, no choice) gold_loglik/thought_gain credit no "
                                 "action: nothing would train. Add rl.latent_coef or another reward")
        if self.rollout == "parallel":
            self.parallel.validate()
            if self.rl.beta:
                raise ValueError("rl.beta is a KL on text steps, and parallel rollouts generate no text: set 0")
            if self.rl.latent_coef:
                raise ValueError("rl.latent_coef is for sequential rollouts: the parallel path has parallel.nll_coef")
            if self.thought.mode not in ("vocab", "single"):
                raise ValueError(f"rollout=parallel samples discrete thinking tokens: thought.mode must be vocab or "
                                 f"single, got {self.thought.mode}")
            if self.rl.algo == "ppo":
                raise ValueError("rollout=parallel trains with grpo or rloo (per-position group baselines), not ppo")
            if self.parallel.scorer == "teacher" and not self.teacher:
                raise ValueError("parallel.scorer=teacher needs a teacher checkpoint (teacher=PATH)")

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")


def ensure_checkpoint(path: str | None, sft_config: str | None, role: str) -> str | None:
    """A checkpoint the run needs (teacher, initial policy), trained first from its SFT config when it is
    missing (fresh machines). Built-in names (tiny, gpt2, ...) are not paths and pass through."""
    if path is None or Path(path).exists() or not sft_config:
        return path
    from .sft import SFTConfig, run_sft

    sft = load_config(SFTConfig, sft_config)
    print(f"{role} {path} not found: training it with {sft_config} first")
    ckpt = run_sft(sft)
    if ckpt.resolve() != Path(path).resolve():
        raise ValueError(f"{sft_config} writes {ckpt}, but {role}={path}")
    return path


def ensure_teacher(cfg: TrainConfig) -> str | None:
    """The teacher checkpoint (trained first when missing), with a warning when it is the policy's own start."""
    if cfg.teacher is not None and Path(cfg.teacher).resolve() == Path(cfg.policy).resolve():
        warnings.warn(f"the teacher is the policy's own starting checkpoint ({cfg.teacher}): it knows nothing the "
                      "student does not, so teacher rewards pay for imitating it, not for useful thoughts",
                      stacklevel=2)
    return ensure_checkpoint(cfg.teacher, cfg.teacher_sft, "teacher")


class RunTrainer:
    """Mixin for the learner classes: atomic checkpoints that carry everything a checkpoint must."""

    run_cfg: TrainConfig
    policy_extras: dict

    def _get_output_dir(self, trial):
        return getattr(self, "_save_root", None) or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        root = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        self._save_root = str(root / ".saving")
        shutil.rmtree(self._save_root, ignore_errors=True)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._save_root = None
        tmp = root / ".saving" / name
        self.policy_extras["vocab"].save(tmp)
        torch.save(self.policy_extras["init_rows"], tmp / "thinktok_init_rows.pt")
        parallel = self.run_cfg.rollout == "parallel"
        save_run_info(tmp, self.run_cfg.task, "parallel" if parallel else "rl", self.run_cfg.thought,
                      self.run_cfg.parallel if parallel else None)
        torch.save(extra_state(self), tmp / EXTRA_STATE)
        atomic_save(root / name, lambda d: [p.rename(d / p.name) for p in tmp.iterdir()])
        shutil.rmtree(root / ".saving")


def extra_state(trainer) -> dict:
    state = {"mode": trainer.thought_mode.state_dict()}
    if hasattr(trainer, "value_head"):
        state["value_head"] = trainer.value_head.state_dict()
    if getattr(trainer, "mixing_head", None) is not None:
        state["mixing_head"] = trainer.mixing_head.state_dict()
    return state


class GRPORun(RunTrainer, ThoughtGRPOTrainer):
    pass


class PPORun(RunTrainer, ThoughtPPOTrainer):
    pass


class ParallelRun(RunTrainer, ParallelGRPOTrainer):
    pass


class RunLogger(TrainerCallback):
    """metrics.jsonl (one line per step), evals, annotated samples."""

    def __init__(self, cfg: TrainConfig, trainer_ref: list, policy, task, val_windows: list[list[int]] | None = None):
        self.cfg, self.trainer_ref, self.policy, self.task = cfg, trainer_ref, policy, task
        self.val_windows = val_windows
        self.out = cfg.out_dir
        self.last = time.perf_counter()

    def on_train_begin(self, args, state, control, **kw):
        if self.cfg.eval_every and state.global_step == 0:  # the start of the run's start/end table
            self.evaluate(0)

    def on_step_end(self, args, state, control, **kw):
        step = state.global_step
        if self.cfg.eval_every and (step % self.cfg.eval_every == 0 or step == state.max_steps):
            self.evaluate(step)

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs:
            return
        trainer = self.trainer_ref[0]
        now = time.perf_counter()
        n = self.cfg.rl.prompts_per_step * self.cfg.rl.num_generations
        line = {"step": state.global_step, "reward_mean": logs.get("reward"), "reward_std": logs.get("reward_std"),
                "kl": logs.get("kl", 0.0), "loss": logs.get("loss"), "samples_per_s": n / (now - self.last),
                "logprob_mismatch": logs.get("logprob_mismatch"),
                **({"latent_nll": logs.get("latent_nll")} if self.cfg.rl.latent_coef else {}),
                **trainer.rollout_stats}
        self.last = now
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        """One evals.jsonl line and annotated samples/step_N.{jsonl,html}."""
        trainer = self.trainer_ref[0]
        model = trainer.accelerator.unwrap_model(trainer.model)
        run = self.evaluate_parallel if self.val_windows is not None else self.evaluate_sequential
        result, records = run(step, trainer, model)
        with open(self.out / "evals.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **result}) + "\n")
        samples = self.out / "samples"
        samples.mkdir(exist_ok=True)
        (samples / f"step_{step}.jsonl").write_text(to_jsonl(records))
        (samples / f"step_{step}.html").write_text(to_html(records, title=f"{self.cfg.name} · step {step}"))
        model.train()

    def evaluate_sequential(self, step: int, trainer, model) -> tuple[dict, list[dict]]:
        """Greedy accuracy on validation prompts, and sampled rollouts."""
        greedy = make_mode(self.cfg.thought, self.policy.vocab, SamplingConfig(**{**vars(self.cfg.sampling), "greedy": True}))
        greedy.load_state_dict(trainer.thought_mode.state_dict())
        result = evaluate_policy(self.policy, greedy.to(model.device), self.task, "validation", limit=self.cfg.eval_examples)
        rows = list(self.task.dataset["validation"])[: self.cfg.samples_per_eval]
        rollouts = sample(model, trainer.thought_mode, [self.policy.tokenizer(r["prompt"]).input_ids for r in rows],
                          seed=step, weight_version=step)
        return result, [to_json(r, self.policy.tokenizer, model.get_input_embeddings().weight) for r in rollouts]

    def evaluate_parallel(self, step: int, trainer, model) -> tuple[dict, list[dict]]:
        """Validation windows: true-text NLL with and without thoughts (whatever the training scorer), and
        annotated windows with each position's thought after its token."""
        p = self.cfg.parallel
        windows = self.val_windows[: self.cfg.eval_examples]
        result = evaluate_parallel(model, trainer.thought_mode, p, windows, trainer.mixing_head, seed=step)
        real = torch.tensor(windows[: self.cfg.samples_per_eval], device=model.device)
        rollout = sample_parallel(model, trainer.thought_mode, real, p.thought_len, seed=step, weight_version=step)
        return result, [parallel_to_json(rollout.real[i], rollout.thoughts[i], rollout.logprob[i], self.policy.tokenizer)
                        for i in range(len(real))]


class RewardProgress(ProgressCallback):
    """The Trainer's progress bar with reward and throughput on it, instead of a dict printed per step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "reward" in logs:
            step_s = max(logs.get("step_time", 0.0), 1e-9)
            self.training_bar.set_postfix(reward=f"{logs['reward']:.3f}",
                                          samples_s=f"{args.per_device_train_batch_size / step_s:.1f}")


def latest_trainer_checkpoint(out: Path) -> Path | None:
    try:
        return find_checkpoint(out)
    except ValueError:
        return None


def truncate_after(path: Path, step: int) -> None:
    """Drop lines of steps after `step` (a resumed run rewrites them)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def run_train(cfg: TrainConfig, resume: bool = False) -> Path:
    cfg.validate()
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    resume_from = latest_trainer_checkpoint(out) if resume else None
    if resume and resume_from is None:
        raise ValueError(f"--resume {out}: no checkpoint to resume from")
    if not resume and (out / "metrics.jsonl").exists():
        raise ValueError(f"{out} already holds a run: pass --resume {out}, or choose another name/run_dir")
    save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    teacher = ensure_teacher(cfg)
    ensure_checkpoint(cfg.policy, cfg.policy_sft, "policy")
    thought = cfg.thought
    init_dir = out / "policy_init"
    if not (init_dir / "config.json").exists():
        # saved before training: TRL reloads the reference model from this path, with the expanded vocabulary
        policy = load_policy(cfg.policy, thought.vocab_tokens, thought.markers, init=thought.init, seed=cfg.seed)
        atomic_save(init_dir, policy.save)
    policy = load_policy(str(init_dir), thought.vocab_tokens, thought.markers)
    model = policy.model
    if thought.mode == "pause":  # pause rows stay at their initial values, as in SFT's frozen-pause baseline
        freeze_rows(policy, list(range(policy.vocab.real_size, policy.vocab.size)))
    task = load_task(cfg.task)
    train_rows = task.dataset["train"].to_list()
    parallel = cfg.parallel if cfg.rollout == "parallel" else None
    if parallel:
        windows = {split: task_windows(task, split, parallel, policy.tokenizer) for split in ("train", "validation")}
        prompts = {f"window {i}": w for i, w in enumerate(windows["train"])}
    else:
        prompts = {r["prompt"]: r for r in train_rows}
    workers = start_workers(cfg.ray, str(init_dir), teacher, thought, cfg.sampling, cfg.rewards, cfg.task, parallel)
    rl = cfg.rl
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tb")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental: we pin trl for it
    if not cfg.ray.verbose:  # TRL 1.16 calls transformers APIs that 5.x deprecates: not the user's concern
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    args = GRPOConfig(
        output_dir=str(out / "trainer"), report_to=["tensorboard"], logging_steps=1,
        per_device_train_batch_size=rl.prompts_per_step * rl.num_generations, num_generations=rl.num_generations,
        steps_per_generation=1, num_iterations=1, max_steps=rl.max_steps, learning_rate=rl.lr,
        lr_scheduler_type="constant", beta=0.0, epsilon=rl.epsilon, max_grad_norm=rl.max_grad_norm,
        scale_rewards="none" if rl.algo == "rloo" else "group",
        max_completion_length=(parallel.num_real * parallel.thought_len if parallel
                               else cfg.sampling.max_new_tokens + thought.budget + 2),
        save_strategy="steps", save_steps=cfg.save_every, use_cpu=cfg.device == "cpu", bf16=False,
        gradient_checkpointing=False, disable_dropout=True, seed=cfg.seed, log_completions=False,
        dataloader_num_workers=0, weight_decay=0.0, warmup_steps=0,
    )
    if parallel:
        rollout_func = ParallelRollouts(workers, prompts, parallel, cfg.seed)
    else:
        gold = ({r["prompt"]: policy.tokenizer(task.target(r, "answer")).input_ids for r in train_rows}
                if rl.latent_coef else None)
        rollout_func = RayRollouts(workers, policy.tokenizer, prompts, cfg.seed, gold)
    kl_ref = load_policy(str(init_dir), thought.vocab_tokens, thought.markers).model if rl.beta else None
    mode = make_mode(thought, policy.vocab, cfg.sampling)
    trainer_ref: list = []
    logger = RunLogger(cfg, trainer_ref, policy, task, windows["validation"] if parallel else None)
    if parallel:
        cls, extra = ParallelRun, dict(parallel=parallel)
    elif rl.algo == "ppo":
        cls, extra = PPORun, dict(gamma=rl.gamma, lam=rl.lam, vf_coef=rl.vf_coef)
    else:
        cls, extra = GRPORun, {}
    trainer = cls(model=model, reward_funcs=[rollout_reward], args=args, processing_class=policy.tokenizer,
                  train_dataset=Dataset.from_dict({"prompt": list(prompts)}),
                  rollout_func=rollout_func, callbacks=[logger], thought_mode=mode, algo=rl.algo, kl_ref=kl_ref,
                  kl_coef=rl.beta, latent_coef=rl.latent_coef, **extra)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RewardProgress)
    trainer.run_cfg, trainer.policy_extras = cfg, {"vocab": policy.vocab, "init_rows": policy.init_rows}
    trainer_ref.append(trainer)
    if resume_from is not None:
        state = torch.load(resume_from / EXTRA_STATE)
        trainer.thought_mode.load_state_dict(state["mode"])
        if "value_head" in state:
            trainer.value_head.load_state_dict(state["value_head"])
        if "mixing_head" in state:
            trainer.mixing_head.load_state_dict(state["mixing_head"])
        step = int(resume_from.name.split("-")[1])
        for name in ("metrics.jsonl", "evals.jsonl"):
            truncate_after(out / name, step)
        print(f"resuming from {resume_from} (step {step})")
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        final = latest_trainer_checkpoint(out)
        if final is None or int(final.name.split("-")[1]) != trainer.state.global_step:
            trainer._save_checkpoint(trainer.model, None)
            final = latest_trainer_checkpoint(out)
    finally:
        stop_workers(workers)
    return final
