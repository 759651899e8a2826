"""The learner: TRL's GRPO trainer running thinktok's step (rl/step.py), with as few overrides as possible.

transformers' Trainer runs the loop (optimizer, schedule, clipping, logging, checkpoints, resume); each
step is `rl_step`: the collector's rollouts and rewards, then the recompute, advantages and loss below.
Its overrides of TRL's and transformers' private methods (training_step, _compute_loss,
_get_per_token_logps_and_entropies, _metrics, _clip_grad_norm) are listed, with what each does and why, in
thinktok/compat.py, which checks the installed versions at start-up.

  * The behaviour policy is the sampler's: its recorded log-probs are TRL's old log-probs, so the ratio is
    pi_learner / pi_sampler (1 up to float error when on-policy, as here; a mismatch, e.g. bf16 workers
    under an fp32 learner, enters the ratio rather than being ignored, and is logged as `logprob_mismatch`).
    With density_scale=per_dim a vector step's ratio is (pi/mu)^(1/D): its clip bounds D times that
    log-ratio, and its logged mismatch is per dimension.
    Rollouts are always sampled with the learner's current weights: no asynchronous or multi-epoch reuse.
  * Advantages: `group_advantages` (rl/advantages.py, shared with `thinktok signal`) of the scalar rewards,
    computed once here. algo=rloo: TRL 1.16's RLOOTrainer has no custom rollouts, so RLOO runs here as GRPO
    with the leave-one-out baseline A_i = r_i - mean_{j!=i} r_j.
  * KL (rl.beta): not TRL's per-token KL, which would also price thought steps against a reference that
    barely thinks. Ours is the exact KL(pi_text || ref_text) at text steps only, over the text columns
    renormalised, at temperature 1.
  * The loss runs over the steps a rollout's reward depends on (`Rewards.credit`), forced steps excluded.
    rl.entropy_coef is TRL's entropy bonus (GRPOConfig.entropy_coef) over those steps, with the
    recompute's entropies: with gold-answer rewards alone (thought_gain), the thought choices only.
  * `extra_modules` (the thought mode with a learned sigma, PPO's value head, the parallel path's mixing
    head): one map, built by the caller, that the optimizer, clipping, weight publishing, checkpoints,
    resume and evals all read.
  * algo=ppo: rl/ppo.py. rollout=parallel: rl/parallel/learner.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from trl import GRPOConfig, GRPOTrainer

from thinktok.compat import check_libraries
from thinktok.errors import UserError

from .advantages import group_advantages
from .recompute import Recomputed, gold_answer_loglik, recompute_logprobs
from .step import Batch, rl_step


def rewards_come_from_the_collector(*_, **__):
    """TRL's constructor requires a reward function; the rewards are the reward workers' (rl/step.py), and
    TRL's own reward pipeline never runs."""
    raise RuntimeError("TRL's reward pipeline ran: thinktok's learner scores in rl_step (rl/step.py)")


class Precomputed(NamedTuple):
    """What `objective` hands TRL's loss as its `model`: the recompute's (B, S) log-probs and entropies."""

    logprob: torch.Tensor
    entropy: torch.Tensor


class ThoughtGRPOTrainer(GRPOTrainer):
    """collector: stages 1-3 of the step (rl/step.py `Collector`, or the parallel path's). extra_modules:
    modules trained beside the model ({"mode": thought_mode, ...}). kl_ref: the frozen reference for the
    text-step KL (kl_coef = rl.beta); TRL's own beta must be 0. latent_coef: weight of the supervised latent
    term, -log pi_text(y* | x, z_open) (the gold ids come with each rollout): it teaches the model to read
    its own thoughts (STaR / Quiet-STaR's latent-variable objective)."""

    def __init__(self, model, args: GRPOConfig, *rest, collector, extra_modules: dict[str, nn.Module],
                 algo: str = "grpo", kl_ref: nn.Module | None = None, kl_coef: float = 0.0,
                 latent_coef: float = 0.0, **kwargs):
        check_libraries()
        # refused before TRL builds anything (with its own beta it would load a reference model)
        if args.num_iterations != 1 or args.steps_per_generation != 1 or args.beta != 0:
            raise UserError("thinktok's learner trains each batch once, on-policy, with its own text-step "
                             "KL: num_iterations=1, steps_per_generation=1 and TRL's beta=0 (use kl_coef)")
        if kl_coef and kl_ref is None:
            raise UserError("kl_coef > 0 needs a reference model (kl_ref)")
        self.collector, self.extra_modules = collector, extra_modules
        self.thought_mode = extra_modules["mode"]
        self.algo, self.kl_ref, self.kl_coef, self.latent_coef = algo, kl_ref, kl_coef, latent_coef
        super().__init__(model, [rewards_come_from_the_collector], args, *rest, **kwargs)
        # everything the loss touches lives beside the model (the mode's column masks, a learned sigma, heads)
        for module in self.extra_modules.values():
            module.to(self.accelerator.device)
        if kl_ref is not None:
            self.kl_ref = kl_ref.to(self.accelerator.device).eval().requires_grad_(False)

    def training_step(self, model, inputs: list[dict], num_items_in_batch=None) -> torch.Tensor:
        """The Trainer's step hook: `inputs` are the dataloader's rows (TRL's sampler repeats each prompt G
        times in a row)."""
        loss = rl_step(self, model, [x["prompt"] for x in inputs])
        self.average_extra_grads()
        return loss

    def average_extra_grads(self) -> None:
        """DDP averages the model's gradients over the learner processes; the extra modules (a value head, a
        learned sigma, a mixing head) sit outside its wrapper, so theirs are averaged here, the same way."""
        if self.accelerator.num_processes == 1:
            return
        params = self.extra_parameters()
        # which have a gradient on some process: the others keep none (AdamW skips a None, not a zero)
        has = self.global_sum(*[torch.tensor(float(p.grad is not None), device=self.accelerator.device)
                                for p in params]) if params else []
        for p, any_grad in zip(params, has):
            if not any_grad:
                continue
            if p.grad is None:  # every process joins every all-reduce, in the same order
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= self.accelerator.num_processes

    def global_sum(self, *values: torch.Tensor) -> torch.Tensor:
        """(len(values),): each scalar summed over the learner processes (normalisers of the union batch)."""
        return self.accelerator.reduce(torch.stack([v.float() for v in values]), reduction="sum")

    # ---- stages 4-6 of rl_step ---------------------------------------------------------------------------
    def recompute(self, model, batch: Batch) -> Recomputed:
        """The rollout engine's teacher-forced recompute: (B, S) log-probs and entropies of the recorded
        actions, hidden states, and (with the KL) the text distributions."""
        return recompute_logprobs(model, self.thought_mode, batch.rollouts, text=bool(self.kl_coef))

    def advantages(self, batch: Batch, rec) -> torch.Tensor:
        """(B,): this process's rows' `group_advantages` (by algo) of every process's rewards, gathered as
        TRL gathers them (in the global batch's order: process k holds its k-th block of whole groups)."""
        local = batch.reward.to(self.accelerator.device)
        start = self.accelerator.process_index * len(local)
        adv = group_advantages(self.accelerator.gather(local), self.num_generations, self.algo)
        return adv[start : start + len(local)]

    def objective(self, rec, advantages: torch.Tensor, batch: Batch) -> torch.Tensor:
        """TRL's policy loss (its loss_type; dapo: the clipped surrogate summed over every process's loss
        mask, over its size) with old log-probs = the sampler's: ratio = pi_learner / pi_sampler."""
        device = self.accelerator.device
        mask, sampled = batch.mask.to(device), batch.sampled.to(device)
        rows = mask.shape[0]
        inputs = {"prompt_ids": mask.new_zeros(rows, 0), "prompt_mask": mask.new_zeros(rows, 0),
                  "completion_ids": torch.zeros_like(mask), "completion_mask": mask,
                  "advantages": advantages, "old_per_token_logps": sampled,
                  "num_items_in_batch": self.accelerator.gather(mask.sum()).sum()}
        loss = super()._compute_loss(Precomputed(rec.logprob, rec.entropy), inputs)
        gap = ((rec.logprob.detach() - sampled).abs() * mask).max()
        self.log_metric("logprob_mismatch", gap.item(), reduce="max")
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *_, **__):
        """TRL's loss asks its model for log-probs: ours are the recompute's (`objective` passes them)."""
        if not isinstance(model, Precomputed):
            raise RuntimeError("TRL asked for log-probs outside thinktok's objective: the learner needs "
                               "num_iterations=1, steps_per_generation=1 and TRL's beta=0")
        if model.logprob.shape != (input_ids.shape[0], logits_to_keep):
            raise RuntimeError(f"log-probs {tuple(model.logprob.shape)} for a ({input_ids.shape[0]}, "
                               f"{logits_to_keep}) batch: batch bookkeeping broke")
        return model.logprob, model.entropy, None

    def extra_loss(self, model, rec, batch: Batch) -> torch.Tensor:
        """Terms beside TRL's surrogate (which holds TRL's entropy bonus): the text-step KL, the latent
        term."""
        loss = torch.zeros((), device=self.accelerator.device)
        if self.kl_coef:
            kl = self.text_kl(rec, batch.rollouts)
            self.log_metric("kl", kl.item())  # the mean over processes of each one's share: the global mean
            loss = loss + self.kl_coef * kl
        if self.latent_coef:
            nll = -gold_answer_loglik(model, self.thought_mode, batch.rollouts, batch.gold).mean()
            self.log_metric("latent_nll", nll.item())
            loss = loss + self.latent_coef * nll
        return loss

    def text_kl(self, rec: Recomputed, rollouts: list) -> torch.Tensor:
        """Mean over every process's text steps of the exact KL(pi_text || ref_text), both over the text
        columns at temperature 1; thought steps carry none. Reads the policy's text log-probs of the
        recompute. This process's sum over the global count / N: DDP's mean over N processes of the
        gradients is then the gradient of the union batch's mean, whatever each process's count."""
        policy_lp = rec.text_logp  # (N_text, n_text), differentiable
        with torch.no_grad():
            ref_lp = recompute_logprobs(self.kl_ref, self.thought_mode, rollouts, text=True,
                                        entropy=False).text_logp
        (count,) = self.global_sum(torch.tensor(policy_lp.shape[0], device=policy_lp.device))
        share = count.clamp(min=1) / self.accelerator.num_processes
        return (policy_lp.exp() * (policy_lp - ref_lp.float())).sum() / share

    # ---- logging, optimizer ------------------------------------------------------------------------------
    def log_step(self, batch: Batch, seconds: float) -> None:
        """The step's reward over every process's rows (as TRL logs it), its time (what the progress bar's
        samples/s read) and the collector's statistics."""
        rewards = self.accelerator.gather(batch.reward.to(self.accelerator.device))
        self.log_metric("step_time", seconds, reduce="max")  # the step ends when the slowest process's does
        self._metrics["train"]["reward"].append(rewards.mean().item())  # gathered already
        self._metrics["train"]["reward_std"].append(rewards.std().item())
        for k, v in batch.stats.items():  # every process holds as many rows: the mean is the union's
            self.log_metric(f"rollout/{k}", v, reduce="min" if k == "weight_version" else "mean")

    def log_metric(self, name: str, value: float, reduce: str = "mean") -> None:
        """One value of a training metric, reduced over the learner processes (a collective: every process
        logs the same names in the same order), averaged into TRL's log of the step."""
        if self.accelerator.num_processes > 1:
            values = self.accelerator.gather(torch.tensor([float(value)], device=self.accelerator.device))
            value = getattr(values, reduce)().item()
        self._metrics["train"][name].append(value)

    def extra_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.extra_modules.values() for p in m.parameters() if p.requires_grad]

    def create_optimizer(self, model=None):
        """TRL's optimizer plus the extra modules' parameters (a learned sigma, heads), when there are any."""
        opt = super().create_optimizer(model) if model is not None else super().create_optimizer()
        extra = self.extra_parameters()
        if extra:
            opt.add_param_group({"params": extra, "weight_decay": 0.0})

            # the Trainer zeroes model.parameters() only: these would sum over all steps
            def zero_extra_grads(*_):
                for p in extra:
                    p.grad = None

            opt.register_step_post_hook(zero_extra_grads)
        return opt

    def _clip_grad_norm(self, model):
        """The Trainer clips model.parameters() only: the extra parameters are clipped with them, by one
        norm."""
        extra = self.extra_parameters()
        if not extra:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(list(model.parameters()) + extra, self.args.max_grad_norm)
