"""The parallel path's Ray actors: a rollout worker that thinks at every position of a window, and a scoring
worker that rewards each position's thought by its gain (the policy's head or the frozen teacher's targets).
They share the sequential workers' versioned weight loader and `start_workers` (rl/actors.py)."""

from __future__ import annotations

import os

import torch

from thinktok.models.parallel_gpt2 import MixingHead
from thinktok.models.teacher import Teacher
from thinktok.models.thought_config import SamplingConfig, ThoughtConfig
from thinktok.rl.actors import RolloutWorker, VersionedWeights, policy_copy

from .config import ParallelConfig
from .rollout import ParallelRollout, sample_parallel
from .scorer import ParallelScorer


class ParallelRolloutWorker(RolloutWorker):
    """The rollout worker, sampling a thought at every position of a window instead of a sequence."""

    def sample(self, windows: torch.Tensor, thought_len: int, seed: int, weights: list,
               version: int) -> ParallelRollout:
        self.weights.load(weights, version)
        return sample_parallel(self.model, self.mode, windows.to(self.model.device), thought_len, seed,
                               version).to("cpu")


class ParallelScoringWorker:
    """A policy copy (and its mixing head) scoring parallel-thought windows; the teacher only with
    parallel.scorer=teacher."""

    def __init__(self, teacher_path: str | None, parallel: ParallelConfig, policy_path: str,
                 thought: ThoughtConfig, sampling: SamplingConfig, device: str, threads: int = 1):
        torch.set_num_threads(threads)
        teacher = Teacher.load(teacher_path,
                               device) if teacher_path and parallel.scorer == "teacher" else None
        self.model, mode = policy_copy(policy_path, thought, sampling, device)
        modules = {"model": self.model, "mode": mode}
        head = None
        if parallel.mixing_head:
            head = modules["mixing_head"] = MixingHead(self.model.config.hidden_size).to(device)
        self.weights = VersionedWeights(modules)
        self.scorer = ParallelScorer(parallel, self.model, mode, head, teacher)

    def score(self, rollout: ParallelRollout, weights: list, version: int) -> tuple[ParallelRollout, dict]:
        self.weights.load(weights, version)
        return self.scorer(rollout.to(self.model.device)).to("cpu"), self.scorer.stats

    def pid(self) -> int:
        return os.getpid()


def parallel_workers(policy_path: str, teacher_path: str | None, thought: ThoughtConfig,
                     sampling: SamplingConfig, parallel: ParallelConfig) -> tuple[tuple, tuple]:
    """The parallel path's (rollout, scoring) worker classes and arguments, for `start_workers`."""
    return ((ParallelRolloutWorker, (policy_path, thought, sampling)),
            (ParallelScoringWorker, (teacher_path, parallel, policy_path, thought, sampling)))
