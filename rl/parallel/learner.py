"""The parallel path's learner: `ParallelRollouts` (TRL's rollout_func) and `ParallelGRPOTrainer`.

A TRL row is one window with a thought at every position (completion = the T*L thought tokens); the advantage
is per position (its gain minus the mean over the G thoughts sampled there) and the log-probs come from one
pass through the kernel, beside the post-thought NLL (Quiet-STaR trains the prediction after a thought
beside the REINFORCE term). The mixing head, when there is one, is the extra module "mixing_head".
"""

from __future__ import annotations

import torch

from thinktok.checkpoint import RunTrainer
from thinktok.rl.actors import Workers, chunks, get
from thinktok.rl.learner import RayRollouts, RecomputeBatch, ThoughtGRPOTrainer, check_finite, pad_to

from .config import ParallelConfig
from .rollout import ParallelRollout
from .scorer import position_advantages, score


class ParallelRollouts(RayRollouts):
    """rollout_func for parallel thoughts: windows -> rollout workers (a thought at every position) ->
    scoring workers (per-position gains) -> TRL rows of T*L thought tokens each."""

    def __init__(self, workers: Workers, windows_by_prompt: dict[str, list[int]], cfg: ParallelConfig,
                 seed: int):
        super().__init__(workers, None, windows_by_prompt, seed)
        self.cfg = cfg

    def __call__(self, prompts: list[str], trainer) -> dict:
        version = trainer.state.global_step
        weights = self.publish(trainer, version)
        real = torch.tensor([self.rows[p] for p in prompts])  # (R, T)
        parts = [p for p in chunks(list(range(len(prompts))), len(self.workers.rollout)) if p]
        rank = trainer.accelerator.process_index
        futures = [w.sample.remote(real[part], self.cfg.thought_len, self.call_seed(version, k, rank),
                                   weights, version)
                   for k, (w, part) in enumerate(zip(self.workers.rollout, parts))]
        sampled = ParallelRollout.cat(get(futures))
        groups = [g for g in chunks(list(range(len(prompts))), len(self.workers.reward)) if g]
        scored = self.get_scores([w.score.remote(sampled.rows(g), weights, version)
                                  for w, g in zip(self.workers.reward, groups)], version)
        batch = ParallelRollout.cat([part for part, _ in scored])
        check_finite("reward", batch.gain, version)
        r, t, l = batch.thoughts.shape
        stats = {k: sum(s[k] for _, s in scored) / len(scored) for k in scored[0][1]}
        stats.update(gain_mean=batch.gain[:, :-1].mean().item(), thought_tokens=t * l,
                     weight_version=batch.weight_version)
        scored_positions = torch.ones(r, t, l, dtype=torch.long)
        scored_positions[:, -1] = 0  # the last position has no next token: its thought is not an action here
        return {
            "prompt_ids": batch.real.tolist(),
            "completion_ids": batch.thoughts.reshape(r, -1).tolist(),
            "logprobs": batch.logprob.reshape(r, -1).tolist(),
            "env_mask": scored_positions.reshape(r, -1).tolist(),
            "reward": batch.gain[:, :-1].mean(1).tolist(),  # for TRL's logs; advantages are per position
            "rollout": [batch.rows([i]) for i in range(r)],  # one record per TRL row, shuffled with the batch
            "scorer_stats": stats,  # not a list: TRL hands every row the same dict
        }


class ParallelGRPOTrainer(ThoughtGRPOTrainer):
    """TRL's GRPO objective over parallel thoughts: per-position advantages, log-probs from one kernel pass,
    plus the post-thought NLL."""

    def __init__(self, *args, parallel: ParallelConfig, **kwargs):
        self.parallel = parallel
        super().__init__(*args, **kwargs)
        self.mixing_head = self.extra_modules.get("mixing_head")

    def set_advantages(self, inputs: list[dict], out: dict) -> None:
        """out["advantages"]: each position's advantage (`position_advantages`) on its L thought tokens."""
        batch = ParallelRollout.cat(out["rollout"])  # TRL's row order, before the shuffle
        r, t, l = batch.thoughts.shape
        g = self.num_generations
        adv = position_advantages(batch.gain, g, self.algo, self.parallel.positive_only)  # (R, T)
        per_token = adv[..., None].expand(r, t, l).reshape(r, t * l)
        out["advantages"] = pad_to(per_token, out["completion_ids"].shape[1]).to(out["advantages"].device)

    def log_rollouts(self, inputs: list[dict]) -> None:
        for k, v in inputs[0]["scorer_stats"].items():  # the scorers' statistics, from rollout_func
            self.log_metric(f"rollout/{k}", v)

    def extra_loss(self, batch: RecomputeBatch, inputs: dict) -> torch.Tensor:
        loss = super().extra_loss(batch, inputs)
        if self.parallel.nll_coef:
            nll = batch.recomputed.nll()
            self.log_metric("nll_post_thought", nll.item())
            loss = loss + self.parallel.nll_coef * nll
        return loss

    def recompute(self, batch: RecomputeBatch) -> tuple:
        """-> (the scored pass, (R, T*L) log-probs and entropies of the sampled thoughts) from one parallel
        pass; the gain was scored by the scoring workers: only the log-probs and the NLL term here."""
        rollout = ParallelRollout.cat(batch.rollouts).to(self.accelerator.device)
        scored = score(batch.model, self.thought_mode, rollout, self.parallel.lookahead, self.mixing_head,
                       post=self.parallel.nll_coef > 0, base=False)
        r = len(batch.rollouts)
        return scored, scored.thought_logprob.reshape(r, -1), scored.thought_entropy.reshape(r, -1)


class ParallelRun(RunTrainer, ParallelGRPOTrainer):
    """The parallel GRPO trainer with the run's checkpoints."""
