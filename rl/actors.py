"""Ray actors: rollout workers (a policy copy running the rollout engine in any thought mode) and teacher
workers (the frozen teacher scoring text views). The learner is the single controller that calls them.

Fault tolerance is Ray's: actors restart (`max_restarts`) and an interrupted call is retried
(`max_task_retries`). A retried call reproduces its samples exactly because every call carries its seed and
the weight version it must sample with, so a dead actor loses and duplicates nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import ray
import torch

from thinktok.envs import TaskConfig, load_task
from thinktok.models.parallel import MixingHead
from thinktok.models.policy import load_policy
from thinktok.models.teacher import Teacher
from thinktok.models.thoughts import SamplingConfig, ThoughtConfig, make_mode
from thinktok.models.vocab import load_base_tokenizer

from .parallel import ParallelConfig, ParallelRollout, ParallelScorer, sample_parallel
from .rewards import POLICY_REWARDS, RewardConfig, RewardModel, Rewards
from .rollout import Rollout, sample


@dataclass
class RayConfig:
    address: str | None = None  # join an existing cluster (multi-node); None starts a local one
    num_rollout_workers: int = 2
    num_teacher_workers: int = 1
    gpus_per_rollout_worker: float = 0.0  # fractions let several actors share one card
    gpus_per_teacher_worker: float = 0.0
    max_restarts: int = 3
    verbose: bool = False  # forward actor logs to the driver
    start_timeout_s: float = 300.0  # actors not placed by then: a clear error instead of a hang


def init_ray(cfg: RayConfig) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local cluster: no token warnings
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # A local cluster gets generous logical CPUs: actors mostly wait on each other and share the cores, and a
    # later run in the same process (bench train: 1, 2, 4 actors) must still fit.
    cpus = None if cfg.address else max(os.cpu_count() or 1, 64)
    ray.init(address=cfg.address, num_cpus=cpus, log_to_driver=cfg.verbose, include_dashboard=False,
             configure_logging=cfg.verbose, logging_level=logging.INFO if cfg.verbose else logging.ERROR)


class RolloutWorker:
    """Holds a policy copy; samples with exactly the weights of the version it is asked for."""

    def __init__(self, policy_path: str, thought: ThoughtConfig, sampling: SamplingConfig, device: str, threads: int = 1):
        torch.set_num_threads(threads)
        self.policy = load_policy(policy_path, thought.vocab_tokens, thought.markers)
        self.policy.model.to(device).eval()
        self.mode = make_mode(thought, self.policy.vocab, sampling).to(device)
        self.version = -1

    def load(self, weights: list, version: int) -> None:
        """weights: [ObjectRef] of a state dict, wrapped in a list so Ray fetches it only when stale."""
        if version != self.version:
            state = ray.get(weights[0])
            self.policy.model.load_state_dict(state["model"])
            self.mode.load_state_dict(state["mode"])
            self.version = version

    def sample(self, prompts: list[list[int]], seed: int, weights: list, version: int) -> list[Rollout]:
        self.load(weights, version)
        return sample(self.policy.model, self.mode, prompts, seed=seed, weight_version=version)

    def sample_parallel(self, windows: torch.Tensor, thought_len: int, seed: int, weights: list,
                        version: int) -> ParallelRollout:
        self.load(weights, version)
        out = sample_parallel(self.policy.model, self.mode, windows.to(self.policy.model.device), thought_len, seed, version)
        return out.to("cpu")

    def pid(self) -> int:
        return os.getpid()


class TeacherWorker:
    """Holds the frozen teacher (and, for gold_loglik or parallel gains, a policy copy) and scores rollouts.
    With `parallel`, it scores parallel-thought windows instead (ParallelScorer)."""

    def __init__(self, teacher_path: str | None, rewards: RewardConfig, task: TaskConfig, policy_path: str,
                 thought: ThoughtConfig, sampling: SamplingConfig, device: str, threads: int = 1,
                 parallel: ParallelConfig | None = None):
        torch.set_num_threads(threads)
        needs_teacher = teacher_path and (parallel is None or parallel.scorer == "teacher")
        teacher = Teacher.load(teacher_path, device) if needs_teacher else None
        self.model = self.mode = self.head = None
        if set(POLICY_REWARDS) & set(rewards.weights) or parallel:  # rewards that read the policy need a copy
            policy = load_policy(policy_path, thought.vocab_tokens, thought.markers)
            self.mode = make_mode(thought, policy.vocab, sampling).to(device)
            self.model = policy.model.to(device).eval()
        self.version = -1
        if parallel:
            self.head = MixingHead(self.model.config.hidden_size).to(device) if parallel.mixing_head else None
            self.scorer = ParallelScorer(parallel, self.model, self.mode, self.head, teacher)
        else:
            self.rewards = RewardModel(rewards, teacher, load_task(task), load_base_tokenizer(policy_path), self.model,
                                       self.mode)

    def load(self, weights: list, version: int) -> None:
        if self.model is not None and version != self.version:
            state = ray.get(weights[0])
            self.model.load_state_dict(state["model"])
            self.mode.load_state_dict(state["mode"])  # a learned sigma, for densities the scorer computes
            if self.head is not None:
                self.head.load_state_dict(state["head"])
            self.version = version

    def score(self, rollouts: list[Rollout], rows: list[dict], weights: list, version: int) -> Rewards:
        self.load(weights, version)
        return self.rewards.score(rollouts, rows)

    def score_parallel(self, rollout: ParallelRollout, weights: list, version: int) -> tuple[ParallelRollout, dict]:
        self.load(weights, version)
        return self.scorer(rollout.to(self.model.device)).to("cpu"), self.scorer.stats

    def pid(self) -> int:
        return os.getpid()


@dataclass
class Workers:
    rollout: list = field(default_factory=list)
    teacher: list = field(default_factory=list)


def start_workers(cfg: RayConfig, policy_path: str, teacher_path: str | None, thought: ThoughtConfig,
                  sampling: SamplingConfig, rewards: RewardConfig, task: TaskConfig,
                  parallel: ParallelConfig | None = None) -> Workers:
    init_ray(cfg)
    opts = dict(max_restarts=cfg.max_restarts, max_task_retries=cfg.max_restarts, num_cpus=1)
    device = lambda gpus: "cuda" if gpus > 0 else "cpu"  # noqa: E731
    rollout_cls = ray.remote(RolloutWorker).options(num_gpus=cfg.gpus_per_rollout_worker, **opts)
    teacher_cls = ray.remote(TeacherWorker).options(num_gpus=cfg.gpus_per_teacher_worker, **opts)
    workers = Workers(
        [rollout_cls.remote(policy_path, thought, sampling, device(cfg.gpus_per_rollout_worker))
         for _ in range(cfg.num_rollout_workers)],
        [teacher_cls.remote(teacher_path, rewards, task, policy_path, thought, sampling, device(cfg.gpus_per_teacher_worker),
                            parallel=parallel)
         for _ in range(cfg.num_teacher_workers)],
    )
    # fail here, not mid-step, if one cannot start or be placed
    ready, pending = ray.wait([w.pid.remote() for w in workers.rollout + workers.teacher],
                              num_returns=len(workers.rollout) + len(workers.teacher), timeout=cfg.start_timeout_s)
    if pending:
        stop_workers(workers)
        raise RuntimeError(f"{len(pending)} Ray actors were not placed within {cfg.start_timeout_s} s: the cluster lacks "
                           f"the resources asked for (ray.* settings: {cfg})")
    ray.get(ready)
    return workers


def chunks(items: list, n: int) -> list[list]:
    """n contiguous, near-equal chunks (some may be empty)."""
    size, extra = divmod(len(items), n)
    out, lo = [], 0
    for i in range(n):
        hi = lo + size + (i < extra)
        out.append(items[lo:hi])
        lo = hi
    return out


def stop_workers(workers: Workers) -> None:
    for w in workers.rollout + workers.teacher:
        ray.kill(w, no_restart=True)
