"""Ray actors: rollout workers (a policy copy running the rollout engine in any thought mode) and reward
workers (the frozen teacher scoring text views; a policy copy for rewards that read the policy). The learner
is the single controller that calls them. The parallel path's workers (rl/parallel/actors.py) share the
versioned weight loader and `start_workers`.

Fault tolerance is Ray's: actors restart (`max_restarts`) and an interrupted call is retried
(`max_task_retries`). A retried call reproduces its samples exactly because every call carries its seed and
the weight version it must sample with, so a dead actor loses and duplicates nothing.

With ray.inline the same worker classes run in the learner's process behind the actors' calling convention
(`InlineWorker`): the learner's code is one path, and `get` reads either kind of result.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch
from torch import nn

from thinktok.models.head import head_columns
from thinktok.models.policy import load_policy
from thinktok.models.thought_config import SamplingConfig, ThoughtConfig
from thinktok.models.thought_modes import make_mode
from thinktok.models.vocab import load_base_tokenizer

from .config import RayConfig
from .rewards import POLICY_REWARDS, RewardConfig, RewardModel, Rewards
from .rollout import Rollout
from .sampler import sample

if TYPE_CHECKING:
    from thinktok.envs import TaskConfig


def init_ray(cfg: RayConfig) -> None:
    """Join cfg.address, or start a local cluster."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local cluster: no token warnings
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # A local cluster gets generous logical CPUs: actors mostly wait on each other and share the cores, and a
    # later run in the same process (bench train: 1, 2, 4 actors) must still fit.
    cpus = None if cfg.address else max(os.cpu_count() or 1, 64)
    # "local": a new cluster, never one that `ray start` or ray.cluster_utils left on this machine (which
    # ray.init(address=None) would join, and refuse num_cpus for)
    ray.init(address=cfg.address or "local", num_cpus=cpus,
             log_to_driver=cfg.verbose, include_dashboard=False, configure_logging=cfg.verbose,
             logging_level=logging.INFO if cfg.verbose else logging.ERROR)


class VersionedWeights:
    """The one weight loader every worker shares: `modules` (the model, the thought mode, a mixing head: names
    as the learner publishes them) get the state of the version a call asks for, fetched only when stale.
    What `Publisher` sends: inline, the learner's own tensors; to actors, a base state (fetched when the
    worker's base is another) and the rows and tensors that differ from it."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules, self.version, self.base = modules, -1, None

    def load(self, weights: list, version: int) -> None:
        if not self.modules or version == self.version:  # a worker without policy modules fetches nothing
            return
        if isinstance(weights[0], SharedWeights):
            for name, module in self.modules.items():
                # the module takes the learner's tensors (assign) once: the optimizer updates them in place,
                # and a compiled sampler's graph stays valid only while its parameters stay the same objects
                mine = module.state_dict()
                if any(mine[k].data_ptr() != v.data_ptr() for k, v in weights[0][name].items()):
                    module.load_state_dict(weights[0][name], assign=True)
        else:
            base_ref, base_version, delta_ref = weights
            if self.base != base_version:
                base = ray.get(base_ref)
                for name, module in self.modules.items():
                    module.load_state_dict({k: tensor(*a) for k, a in base[name].items()})
                self.base = base_version
            delta = ray.get(delta_ref)
            with torch.no_grad():
                for name, module in self.modules.items():
                    state = module.state_dict()  # aliases of the parameters and buffers
                    for k, (rows, a) in delta[name].items():
                        if rows is None:
                            state[k].copy_(tensor(*a))
                        else:
                            state[k].index_copy_(0, torch.from_numpy(rows), tensor(*a))
        self.version = version


def policy_copy(policy_path: str, thought: ThoughtConfig, sampling: SamplingConfig, device: str):
    """(model in eval mode, thought mode) on `device`, from the run's initial policy."""
    policy = load_policy(policy_path, thought.vocab_tokens, thought.markers)
    mode = make_mode(thought, policy.vocab, sampling, head_columns(policy.model))
    return policy.model.to(device).eval(), mode.to(device)


class RolloutWorker:
    """Holds a policy copy; samples with exactly the weights of the version it is asked for."""

    def __init__(self, policy_path: str, thought: ThoughtConfig, sampling: SamplingConfig, device: str,
                 threads: int = 1):
        torch.set_num_threads(threads)
        self.model, self.mode = policy_copy(policy_path, thought, sampling, device)
        self.weights = VersionedWeights({"model": self.model, "mode": self.mode})

    def sample(self, prompts: list[list[int]], seed: int, weights: list, version: int) -> list[Rollout]:
        self.weights.load(weights, version)
        return sample(self.model, self.mode, prompts, seed=seed, weight_version=version,
                      compile=self.mode.sampling.engine == "compiled")

    def pid(self) -> int:
        return os.getpid()


class RewardWorker:
    """Holds the frozen teacher (and, for rewards that read the policy, a policy copy) and scores rollouts."""

    def __init__(self, teacher_path: str | None, rewards: RewardConfig, task: TaskConfig, policy_path: str,
                 thought: ThoughtConfig, sampling: SamplingConfig, device: str, threads: int = 1):
        # imported here, not at the top: a rollout worker's process, which imports this module too, then
        # skips the task data's libraries (datasets, pandas, pyarrow) and TRL, about 1 s of its start-up
        from thinktok.envs import load_task
        from thinktok.models.teacher import Teacher

        torch.set_num_threads(threads)
        teacher = Teacher.load(teacher_path, device) if teacher_path else None
        model = mode = None
        if set(POLICY_REWARDS) & set(rewards.weights):  # rewards that read the policy need a copy
            model, mode = policy_copy(policy_path, thought, sampling, device)
        # the mode too: a learned sigma enters the densities the rewards compute
        self.weights = VersionedWeights({"model": model, "mode": mode} if model is not None else {})
        self.rewards = RewardModel(rewards, teacher, load_task(task), load_base_tokenizer(policy_path),
                                   model, mode)

    def score(self, rollouts: list[Rollout], rows: list[dict], weights: list, version: int) -> Rewards:
        self.weights.load(weights, version)
        return self.rewards.score(rollouts, rows)

    def pid(self) -> int:
        return os.getpid()


@dataclass
class Workers:
    rollout: list = field(default_factory=list)
    reward: list = field(default_factory=list)  # reward workers, or the parallel path's scoring workers


def start_workers(cfg: RayConfig, rollout: tuple[type, tuple], reward: tuple[type, tuple]) -> Workers:
    """rollout, reward: (worker class, constructor arguments before `device`), one pair per path."""
    if cfg.inline:  # objects in this process, on its own GPU (accelerate's LOCAL_RANK) if any
        def start(cls, args, gpus, n):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if gpus > 0 else "cpu"
            return [InlineWorker(cls, (*args, device)) for _ in range(n)]
    else:
        init_ray(cfg)
        opts = dict(max_restarts=cfg.max_restarts, max_task_retries=cfg.max_restarts, num_cpus=1)

        def start(cls, args, gpus, n):
            actor = ray.remote(cls).options(num_gpus=gpus, **opts)
            return [actor.remote(*args, "cuda" if gpus > 0 else "cpu") for _ in range(n)]

    workers = Workers(start(*rollout, cfg.gpus_per_rollout_worker, cfg.num_rollout_workers),
                      start(*reward, cfg.gpus_per_teacher_worker, cfg.num_reward_workers))
    if cfg.inline:
        return workers
    # fail here, not mid-step, if one cannot start or be placed
    every = workers.rollout + workers.reward
    ready, pending = ray.wait([w.pid.remote() for w in every], num_returns=len(every),
                              timeout=cfg.start_timeout_s)
    if pending:
        stop_workers(workers)
        raise RuntimeError(f"{len(pending)} Ray actors were not placed within {cfg.start_timeout_s} s: the "
                           f"cluster lacks the resources asked for (ray.* settings: {cfg})")
    ray.get(ready)
    return workers


@contextmanager
def actor_threads():
    """An actor's one intra-op thread (the workers' default) inside, the caller's count restored after: an
    inline call computes with an actor's thread count, so its floating-point reductions, and samples, are
    the actor's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Finished:
    """An inline call's outcome, read by `get` as Ray reads an ObjectRef: the value, or its error raised."""

    value: Any = None
    error: BaseException | None = None

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


class InlineWorker:
    """A worker object in the learner's process with an actor's calling convention (ray.inline):
    `w.sample.remote(*args)` runs at once on deep copies of its arguments and returns a copy of the result,
    as an actor would receive and send them, so neither side sees the other's later in-place changes. The
    published weights (`SharedWeights`) are not copied: `VersionedWeights` assigns them to its modules.
    A call leaves the learner's random state as it found it (the sampler seeds every generator, CUDA's
    included, and restores only its own device's)."""

    def __init__(self, cls: type, args: tuple):
        with actor_threads():
            self.worker = cls(*copy.deepcopy(args))

    def __getattr__(self, name: str):
        if name == "worker":  # not yet set (a copy or unpickling under way): not a method to look up
            raise AttributeError(name)
        method = getattr(self.worker, name)

        def remote(*args, **kwargs) -> Finished:
            devices = range(torch.cuda.device_count()) if torch.cuda.is_available() else []
            with actor_threads(), torch.random.fork_rng(devices=devices):
                try:
                    return Finished(copy.deepcopy(method(*copy.deepcopy(args), **copy.deepcopy(kwargs))))
                except Exception as e:  # raised where an actor's error is: at `get`
                    return Finished(error=e)

        return SimpleNamespace(remote=remote)


class SharedWeights(dict):
    """Published weights for inline workers: {name: state dict} of the learner's own tensors, read-only by
    contract, so a deep copy of a call's arguments shares them and a worker's load assigns them to its
    modules without a copy. They hold still while they are read: inline calls return before the optimizer
    step, and the next version is published (and assigned) again."""

    def __deepcopy__(self, memo):
        return self


class Publisher:
    """The learner's side of `VersionedWeights`: one message per weight version of `modules`.

    Inline workers get the learner's tensors themselves. Actors get Ray objects: a base state, put once,
    and per version the delta from it: every tensor in full, except vocabulary-sized ones (the embedding and
    LM head rows), of which only the rows that have differed from the base at any version since (so a worker
    at any version of that base is brought up to this one). On the tiny model the rows are 26 of its 28 MB,
    and a run's gradients reach only the rows its rollouts use: a task head's few dozen. A new base is put
    when half of the rows have moved. Numpy arrays, which Ray's store maps into a reader without a copy (a
    torch tensor is pickled in-band: on the tiny model, put 86 -> 21 ms and each actor's get 45 -> 0.4 ms).
    """

    def __init__(self, workers: Workers):
        self.inline = any(isinstance(w, InlineWorker) for w in workers.rollout + workers.reward)
        self.base_ref, self.base_version = None, -1
        self.base: dict[str, dict[str, torch.Tensor]] = {}  # name -> key -> CPU copy of a vocabulary tensor
        self.moved: dict[str, dict[str, torch.Tensor]] = {}  # name -> key -> (rows,) bool: moved since base

    def __call__(self, modules: dict[str, nn.Module], version: int) -> list:
        if self.inline:
            return [SharedWeights({name: m.state_dict() for name, m in modules.items()})]
        state = {name: m.state_dict() for name, m in modules.items()}
        rows = modules["model"].get_input_embeddings().weight.shape[0]
        if self.base_ref is None or self.half_moved():
            self.base_ref, self.base_version = ray.put({n: {k: array(v) for k, v in s.items()}
                                                        for n, s in state.items()}), version
            self.base = {n: {k: v.detach().cpu().clone() for k, v in s.items() if v.dim() and len(v) == rows}
                         for n, s in state.items()}
            self.moved = {n: {k: torch.zeros(len(v), dtype=torch.bool) for k, v in b.items()}
                          for n, b in self.base.items()}
        delta, seen = {}, {}  # seen: a tied tensor's rows, by storage: one scan for the embedding and head
        for name, s in state.items():
            delta[name] = {}
            for k, v in s.items():
                if k not in self.base[name]:
                    delta[name][k] = (None, array(v))
                elif v.data_ptr() in seen:
                    delta[name][k] = seen[v.data_ptr()]
                else:
                    moved = self.moved[name][k]
                    moved |= (v.detach().cpu() != self.base[name][k]).flatten(1).any(1)
                    idx = moved.nonzero()[:, 0]
                    delta[name][k] = seen[v.data_ptr()] = (idx.numpy(), array(v[idx.to(v.device)]))
        return [self.base_ref, self.base_version, ray.put(delta)]

    def half_moved(self) -> bool:
        return any(m.float().mean() > 0.5 for per in self.moved.values() for m in per.values())


def array(t: torch.Tensor) -> tuple[np.ndarray, bool]:
    """A tensor as a numpy array Ray stores out of band (bfloat16, which numpy lacks, as its int16 bits) and
    whether it was bfloat16."""
    t = t.detach().cpu()
    return (t.view(torch.int16).numpy(), True) if t.dtype == torch.bfloat16 else (t.numpy(), False)


def tensor(a: np.ndarray, bf16: bool) -> torch.Tensor:
    """`array`'s inverse, over the same (read-only) memory: the loads above copy from it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if bf16 else t


def get(futures: list) -> list:
    """ray.get for the futures of actor calls; the results of inline workers' calls alike."""
    if futures and isinstance(futures[0], Finished):
        return [f.result() for f in futures]
    return ray.get(futures)


def sequential_workers(policy_path: str, teacher_path: str | None, thought: ThoughtConfig,
                       sampling: SamplingConfig,
                       rewards: RewardConfig, task: TaskConfig) -> tuple[tuple, tuple]:
    """The sequential path's (rollout, reward) worker classes and arguments, for `start_workers`."""
    return ((RolloutWorker, (policy_path, thought, sampling)),
            (RewardWorker, (teacher_path, rewards, task, policy_path, thought, sampling)))


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
    for w in workers.rollout + workers.reward:
        if not isinstance(w, InlineWorker):
            ray.kill(w, no_restart=True)
