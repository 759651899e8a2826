"""One RL step, top to bottom, in the order the data flows:

    publish weights -> sample (rollout workers) -> score (reward workers) -> recompute -> advantages -> loss

`rl_step` is the step; transformers' Trainer loop calls it once per optimizer step (through the learner's
`training_step`, rl/learner.py) and then clips the gradient, steps the optimizer, logs and checkpoints.
Stages 1-3 are the run's `Collector` (below: the sequential path; rl/parallel/learner.py: parallel thoughts);
stages 4-6 are the learner's methods, one per algorithm where they differ (rl/learner.py: GRPO and RLOO,
rl/ppo.py: PPO, rl/parallel/learner.py: per-position advantages). The loss is TRL's clipped surrogate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
import torch
from torch.nn.utils.rnn import pad_sequence

from thinktok.errors import PoisonedStep
from thinktok.models.thoughts import Action

from .actors import Publisher, Workers, chunks, get
from .rollout import Rollout


def rl_step(trainer, model, prompts: list[str]) -> torch.Tensor:
    """One step on `prompts` (each prompt's group of G in a row) -> the loss, detached, after its backward."""
    start, version = time.perf_counter(), trainer.state.global_step
    # 1-3. publish this version's weights, sample on the rollout workers, score on the reward workers
    batch = trainer.collector(prompts, trainer, version)
    check_finite("reward", batch.reward, version)
    model.train()
    with trainer.compute_loss_context_manager():  # accelerate's autocast
        # 4. recompute: the log-probs of the recorded actions under the learner's weights (differentiable);
        # before the advantages because PPO's value baseline reads the recomputed hidden states
        rec = trainer.recompute(model, batch)
        # 5. advantages, once, from every learner process's rewards
        adv = trainer.advantages(batch, rec)
        check_finite("advantages", adv, version)
        # 6. loss: TRL's clipped surrogate over the loss mask (behaviour policy: the sampler), + KL, latent
        loss = trainer.objective(rec, adv, batch) + trainer.extra_loss(model, rec, batch)
    check_finite("loss", loss.detach(), version)
    trainer.accelerator.backward(loss)
    trainer.log_step(batch, time.perf_counter() - start)
    return loss.detach()


def check_finite(name: str, x: torch.Tensor, step: int) -> None:
    if not torch.isfinite(x).all():
        raise PoisonedStep(f"{name} is not finite at step {step} ({int((~torch.isfinite(x)).sum())} bad "
                           f"values); no checkpoint is written from this state")


@dataclass
class Batch:
    """One step's collected rollouts, on the learner: B rows, S steps (actions) per row at most."""

    rollouts: list  # one record per row (a `Rollout`; the parallel path: a one-window ParallelRollout)
    reward: torch.Tensor  # (B,) scalar reward per row
    sampled: torch.Tensor  # (B, S) the sampler's log-prob of each step: the behaviour policy's
    mask: torch.Tensor  # (B, S) 1 where the loss runs: actions (not forced steps) the reward depends on
    per_step: list[torch.Tensor] | None = None  # (S_b,) per-step rewards per row (PPO's GAE)
    gold: list[list[int]] | None = None  # gold answer ids per row (the latent term)
    stats: dict[str, float] = field(default_factory=dict)  # rollout statistics for the step's log


def padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """(S_b,) per row -> (B, S_max), zeros past each row's end."""
    return pad_sequence(rows, batch_first=True)


def fan_out(workers: list, method: str, parts: list[list[int]], args) -> list:
    """Call `method` on each worker with `args(k, part)` for its part of the rows (workers without rows are
    skipped): every call starts before the first result is awaited. -> the futures, in order."""
    return [getattr(w, method).remote(*args(k, part))
            for k, (w, part) in enumerate(zip(workers, parts)) if part]


class Collector:
    """Stages 1-3 of the sequential path: publishes the learner's weights, samples the prompts' rollouts on
    the rollout workers (Ray actors, or objects in this process with ray.inline) and scores them on the
    reward workers. rows_by_prompt: the task rows the rewards check; gold_by_prompt: gold answer ids for the
    latent term (None: no latent term)."""

    def __init__(self, workers: Workers, tokenizer, rows_by_prompt: dict, seed: int,
                 gold_by_prompt: dict[str, list[int]] | None = None):
        self.workers, self.tokenizer, self.rows, self.seed = workers, tokenizer, rows_by_prompt, seed
        self.gold = gold_by_prompt
        self.publisher = Publisher(workers) if workers is not None else None
        self.weights_ref, self.published = None, -1

    def publish(self, trainer, version: int) -> list:
        """Weights of `version` (the model and every extra module), published once per version (`Publisher`:
        Ray objects in a list, so that workers fetch them only when their copy is stale)."""
        if version != self.published:
            model = trainer.accelerator.unwrap_model(trainer.model)
            self.weights_ref = self.publisher({"model": model, **trainer.extra_modules}, version)
            self.published = version
        return self.weights_ref

    def call_seed(self, version: int, first_row: int) -> int:
        """Depends only on (run seed, step, the call's first row in the step's batch over every learner
        process): a call retried after an actor death resamples the same, learner processes under
        accelerate draw different samples, and N processes of W rollout workers draw what one process of
        N*W workers draws on the union of their rows when the calls' rows line up, i.e. when each process's
        rows divide evenly among its workers (or W = 1; tests/test_multiprocess.py)."""
        return (self.seed * 1_000_003 + version) * 1_000_003 + first_row

    @staticmethod
    def get_scores(futures: list, version: int) -> list:
        """The scorers' results. Their own finiteness checks (PoisonedStep) end the step in one line naming
        it; any other error is a bug and propagates as Ray raises it, with the worker's traceback (inline
        workers: the error itself)."""
        try:
            return get(futures)
        except (ray.exceptions.RayTaskError, PoisonedStep) as e:  # an actor's (its cause) or an inline one's
            cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
            if isinstance(cause, PoisonedStep):
                raise PoisonedStep(f"scoring failed at step {version}: {cause}") from None
            raise

    def __call__(self, prompts: list[str], trainer, version: int) -> Batch:
        weights = self.publish(trainer, version)
        offset = trainer.accelerator.process_index * len(prompts)  # its rows' place in the global batch
        ids = [self.tokenizer(p).input_ids for p in prompts]
        rows = [self.rows[p] for p in prompts]
        every = list(range(len(prompts)))
        sampling = fan_out(self.workers.rollout, "sample", chunks(every, len(self.workers.rollout)),
                           lambda k, part: ([ids[i] for i in part], self.call_seed(version, offset + part[0]),
                                            weights, version))
        rollouts: list[Rollout] = [r for chunk in get(sampling) for r in chunk]
        scoring = fan_out(self.workers.reward, "score", chunks(every, len(self.workers.reward)),
                          lambda k, part: ([rollouts[i] for i in part], [rows[i] for i in part], weights,
                                           version))
        scored = self.get_scores(scoring, version)
        credit = [c for part in scored for c in part.credit]
        n = len(rollouts)
        return Batch(
            rollouts=rollouts, reward=torch.cat([part.total for part in scored]),
            sampled=padded([r.logprob for r in rollouts]),
            # the loss runs over actions (not forced steps) that the reward depends on
            mask=padded([((r.action != Action.FORCED) & c).long() for r, c in zip(rollouts, credit)]),
            per_step=[s for part in scored for s in part.per_step],
            gold=[self.gold[p] for p in prompts] if self.gold else None,
            stats={"thought_steps_mean": sum(r.num_thought for r in rollouts) / n,
                   "text_tokens_mean": sum(r.num_text for r in rollouts) / n,
                   "weight_version": min(r.weight_version for r in rollouts)})
