"""Configuration of `thinktok train`: the RL algorithm's settings and the whole run's (task, thought mode,
sampling, rewards, rollout path, Ray workers, evals). Plain dataclasses: parsing a config starts nothing and
imports neither Ray nor TRL."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from thinktok.envs import TaskConfig
from thinktok.errors import UserError
from thinktok.models.thought_config import SamplingConfig, ThoughtConfig, check_trainable

from .parallel.config import ParallelConfig
from .rewards import GOLD_REWARDS, RewardConfig

ALGOS = ("grpo", "rloo", "ppo")
ROLLOUTS = ("sequential", "parallel")


# the Ray workers of rl/actors.py, defined here so that parsing a config imports no Ray
@dataclass
class RayConfig:
    address: str | None = None  # join an existing cluster (multi-node); None starts a local one
    num_rollout_workers: int = 2  # Ray actors sampling rollouts, each a policy copy
    num_reward_workers: int = 1  # reward workers (the parallel path: scoring workers)
    gpus_per_rollout_worker: float = 0.0  # fractions let several actors share one card
    gpus_per_teacher_worker: float = 0.0  # GPU fraction per reward (scoring) worker
    max_restarts: int = 3  # restarts of a dead actor, and retries of its interrupted call
    verbose: bool = False  # forward actor logs to the driver
    start_timeout_s: float = 300.0  # actors not placed by then: a clear error instead of a hang
    # the workers as objects in the learner's process, not Ray actors: the same samples and scores (each call
    # on copies, under an actor's one thread), no Ray at all; for breakpoints and profilers, and small runs
    # where an actor's start-up (~6 s of imports on a laptop core) outweighs the run. No fault tolerance;
    # with gpus_per_*_worker > 0 every worker sits on the learner process's own GPU
    inline: bool = False


@dataclass
class RLConfig:
    algo: str = "grpo"  # grpo | rloo | ppo
    num_generations: int = 4  # rollouts per prompt (the group)
    # distinct prompts per step; the batch is prompts_per_step * num_generations rollouts
    prompts_per_step: int = 8
    max_steps: int = 60  # optimizer steps
    # stop after this many seconds of training (0: no limit; setup not counted): arms at equal wall time
    max_seconds: float = 0.0
    lr: float = 5e-5  # learning rate (constant)
    beta: float = 0.0  # KL(pi_text || init_text) at text steps, exact over the text columns (rl/learner.py)
    # weight of the supervised latent term -log pi_text(gold answer | prompt, the rollout's opening thoughts):
    # teaches the model to read its thoughts (STaR / Quiet-STaR); the parallel path has parallel.nll_coef
    latent_coef: float = 0.0
    # entropy bonus: TRL's GRPOConfig.entropy_coef, - coef x the mean entropy of the distributions that chose
    # the steps the loss runs over (with gold-answer rewards alone: the thought choices); keeps exploring the
    # thinking vocabulary while no code pays yet (sequential rollouts)
    entropy_coef: float = 0.0
    epsilon: float = 0.2  # clip range
    max_grad_norm: float = 1.0  # gradient clipping over the model and the extra modules together
    gamma: float = 1.0  # ppo
    lam: float = 0.95  # ppo
    vf_coef: float = 0.5  # ppo

    def validate(self) -> None:
        if self.algo not in ALGOS:
            raise UserError(f"unknown algo {self.algo!r}: expected one of {', '.join(ALGOS)}")
        if self.num_generations < 2:
            raise UserError("num_generations must be >= 2 (group baselines need two samples)")


@dataclass
class TrainConfig:
    name: str = "quickstart"  # run name: the run directory is runs/<name> unless run_dir is set
    run_dir: str | None = None  # default runs/<name>
    seed: int = 0  # seeds the policy's new rows, rollouts (per step and worker) and TRL's shuffling
    device: str = "cpu"  # the learner's device
    policy: str = "tiny"  # initial policy: built-in config, hub name or checkpoint directory
    teacher: str | None = None  # frozen teacher checkpoint
    teacher_sft: str | None = None  # SFT config that trains the teacher when `teacher` does not exist yet
    # SFT config that trains the initial policy when `policy` does not exist yet
    policy_sft: str | None = None
    task: TaskConfig = field(default_factory=TaskConfig)
    thought: ThoughtConfig = field(default_factory=ThoughtConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    # sequential: thoughts interleaved in rollouts | parallel: a thought at every position
    rollout: str = "sequential"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # steps between evals (greedy accuracy and controls on validation), also at step 0 and the end; 0: none
    eval_every: int = 10
    eval_examples: int = 64  # validation examples (or windows) per eval
    save_every: int = 10  # steps between checkpoints (the last step is always saved)
    # annotated sampled rollouts written per eval (samples/step_N.html): validation problems, a group of
    # rl.num_generations each, scored with the run's rewards when they need no teacher
    samples_per_eval: int = 16

    def validate(self) -> None:
        for part in (self.task, self.thought, self.sampling, self.rewards, self.rl):
            part.validate()
        if self.ray.inline and self.ray.address:
            raise UserError(f"ray.inline runs the workers in the learner's process and joins no cluster: "
                            f"drop ray.address={self.ray.address} or ray.inline")
        if self.rollout not in ROLLOUTS:
            raise UserError(f"unknown rollout {self.rollout!r}: expected one of {', '.join(ROLLOUTS)}")
        if self.rollout == "sequential":
            check_trainable(self.thought, self.sampling)
            s = self.sampling
            if "teacher_kl" in self.rewards.weights and (s.temperature != 1 or s.top_k or s.top_p < 1):
                raise UserError("rewards teacher_kl estimates -KL(pi_text || teacher) only from samples of "
                                 "pi_text: sample at temperature 1 without top_k/top_p (else it estimates "
                                 "KL(pi_s || pi_text) - KL(pi_s || teacher) for the sampling distribution "
                                 "pi_s)")
            gold_only = set(self.rewards.weights) <= set(GOLD_REWARDS) and not self.rewards.thinking_cost
            if self.thought.mode == "pause" and gold_only and not self.rl.latent_coef:
                raise UserError("with pause thoughts (inserted by rule, no choice) "
                                 "gold_loglik/thought_gain credit no action: nothing would train. Add "
                                 "rl.latent_coef or another reward")
        if self.rollout == "parallel":
            self.parallel.validate()
            if self.rl.beta:
                raise UserError("rl.beta is a KL on text steps, and parallel rollouts generate no text: "
                                 "set 0")
            if self.rl.latent_coef:
                raise UserError("rl.latent_coef is for sequential rollouts: the parallel path has "
                                 "parallel.nll_coef")
            if self.rl.entropy_coef:
                raise UserError("rl.entropy_coef is for sequential rollouts: set 0 with rollout=parallel")
            if self.thought.mode not in ("vocab", "single"):
                raise UserError(f"rollout=parallel samples discrete thinking tokens: thought.mode must be "
                                 f"vocab or single, got {self.thought.mode}")
            if self.rl.algo == "ppo":
                raise UserError("rollout=parallel trains with grpo or rloo (per-position group baselines), "
                                 "not ppo")
            if self.parallel.scorer == "teacher" and not self.teacher:
                raise UserError("parallel.scorer=teacher needs a teacher checkpoint (teacher=PATH)")

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")
