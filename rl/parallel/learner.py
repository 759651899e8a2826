"""The parallel path's learner: `ParallelCollector` (stages 1-3 of rl_step) and `ParallelGRPOTrainer`.

A TRL row is one window with a thought at every position (completion = the T*L thought tokens); the advantage
is per position (its gain minus the mean over the G thoughts sampled there) and the log-probs come from one
pass through the kernel, beside the post-thought NLL (Quiet-STaR trains the prediction after a thought
beside the REINFORCE term). The mixing head, when there is one, is the extra module "mixing_head".
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from thinktok.checkpoint import RunTrainer
from thinktok.rl.actors import Workers, chunks, get
from thinktok.rl.learner import ThoughtGRPOTrainer
from thinktok.rl.step import Batch, Collector, check_finite, fan_out

from .config import ParallelConfig
from .rollout import ParallelRollout
from .scorer import Scored, position_advantages, score


class ParallelCollector(Collector):
    """Stages 1-3 for parallel thoughts: windows -> rollout workers (a thought at every position) ->
    scoring workers (per-position gains) -> rows of T*L thought tokens each, one per window."""

    def __init__(self, workers: Workers, windows_by_prompt: dict[str, list[int]], cfg: ParallelConfig,
                 seed: int):
        super().__init__(workers, None, windows_by_prompt, seed)
        self.cfg = cfg

    def __call__(self, prompts: list[str], trainer, version: int) -> Batch:
        weights = self.publish(trainer, version)
        offset = trainer.accelerator.process_index * len(prompts)  # its rows' place in the global batch
        real = torch.tensor([self.rows[p] for p in prompts])  # (R, T)
        every = list(range(len(prompts)))
        sampling = fan_out(self.workers.rollout, "sample", chunks(every, len(self.workers.rollout)),
                           lambda k, part: (real[part], self.cfg.thought_len,
                                            self.call_seed(version, offset + part[0]), weights, version))
        sampled = ParallelRollout.cat(get(sampling))
        scoring = fan_out(self.workers.reward, "score", chunks(every, len(self.workers.reward)),
                          lambda k, part: (sampled.rows(part), weights, version))
        scored = self.get_scores(scoring, version)
        batch = ParallelRollout.cat([part for part, _ in scored])
        check_finite("reward", batch.gain, version)
        r, t, l = batch.thoughts.shape
        stats = {k: sum(s[k] for _, s in scored) / len(scored) for k in scored[0][1]}
        stats.update(gain_mean=batch.gain[:, :-1].mean().item(), thought_tokens=t * l,
                     weight_version=batch.weight_version)
        mask = torch.ones(r, t, l, dtype=torch.long)
        mask[:, -1] = 0  # the last position has no next token: its thought is not an action here
        return Batch(rollouts=[batch.rows([i]) for i in range(r)], reward=batch.gain[:, :-1].mean(1),
                     sampled=batch.logprob.reshape(r, -1), mask=mask.reshape(r, -1), stats=stats)


class ParallelRecomputed(NamedTuple):
    logprob: torch.Tensor  # (R, T*L) log-probs of the sampled thought tokens
    entropy: torch.Tensor  # (R, T*L)
    scored: Scored  # the pass itself (the post-thought NLL)


class ParallelGRPOTrainer(ThoughtGRPOTrainer):
    """TRL's GRPO objective over parallel thoughts: per-position advantages, log-probs from one kernel pass,
    plus the post-thought NLL."""

    def __init__(self, *args, parallel: ParallelConfig, **kwargs):
        self.parallel = parallel
        super().__init__(*args, **kwargs)
        self.mixing_head = self.extra_modules.get("mixing_head")

    def recompute(self, model, batch: Batch) -> ParallelRecomputed:
        """One parallel pass for the log-probs of the sampled thoughts (and the NLL term); the gain was
        scored by the scoring workers."""
        rollout = ParallelRollout.cat(batch.rollouts).to(self.accelerator.device)
        scored = score(model, self.thought_mode, rollout, self.parallel.lookahead, self.mixing_head,
                       post=self.parallel.nll_coef > 0, base=False)
        r = len(batch.rollouts)
        return ParallelRecomputed(scored.thought_logprob.reshape(r, -1),
                                  scored.thought_entropy.reshape(r, -1), scored)

    def advantages(self, batch: Batch, rec: ParallelRecomputed) -> torch.Tensor:
        """(R, T*L): each position's advantage (`position_advantages`) on its L thought tokens."""
        rollout = ParallelRollout.cat(batch.rollouts)
        r, t, l = rollout.thoughts.shape
        adv = position_advantages(rollout.gain, self.num_generations, self.algo, self.parallel.positive_only)
        return adv[..., None].expand(r, t, l).reshape(r, t * l).to(self.accelerator.device)

    def extra_loss(self, model, rec: ParallelRecomputed, batch: Batch) -> torch.Tensor:
        loss = super().extra_loss(model, rec, batch)
        if self.parallel.nll_coef:
            nll = rec.scored.nll()
            self.log_metric("nll_post_thought", nll.item())
            loss = loss + self.parallel.nll_coef * nll
        return loss


class ParallelRun(RunTrainer, ParallelGRPOTrainer):
    """The parallel GRPO trainer with the run's checkpoints."""
