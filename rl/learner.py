"""The learner: TRL's GRPO trainer, fed by Ray rollouts and rewards, with as few overrides as possible.

Every use of TRL 1.16.0's private internals is in this module (rl/ppo.py and rl/parallel/learner.py override
the public hooks below instead); `check_trl` refuses any other TRL version at start-up. What each does:

  GRPOTrainer._generate_and_score_completions  override: after TRL's own (rollout_func, reward functions),
      replaces its advantages by ours (`set_advantages`), carries each row's Rollout (and gold ids) into the
      batch, logs rollout statistics and checks the advantages are finite
  GRPOTrainer._compute_loss  override: binds the batch's rollouts to the model (`RecomputeBatch`), makes the
      sampler's log-probs TRL's old ones, adds `extra_loss`, logs the log-prob mismatch
  GRPOTrainer._get_per_token_logps_and_entropies  override: log-probs of the recorded actions from our
      recompute (`recompute`), the only densities that fit vector actions and thought budgets
  batch keys  read: sampling_per_token_logps, completion_mask, tool_mask (present with tools), advantages,
      completion_ids; written: old_per_token_logps, advantages, rollout, gold
  GRPOTrainer._metrics  appended to by `log_metric`: our metrics reach TRL's logs (metrics.jsonl)
  transformers' Trainer._clip_grad_norm  override: the extra modules' parameters are clipped with the model's

  * `RayRollouts` is TRL's `rollout_func`: it publishes the current weights, samples on the rollout workers,
    scores on the reward workers, and hands TRL token ids, a loss mask (forced thought steps are not
    actions), the scalar rewards and, as extra fields, each row's `Rollout` (and gold answer ids).
  * State travels in the open: TRL copies the extra fields into its per-example inputs, the trainer moves
    them into the batch dict it shuffles and splits (`out["rollout"]`), and `_compute_loss` binds the batch's
    rollouts to the model in a `RecomputeBatch`, the only `model` the log-prob override accepts.
  * `_get_per_token_logps_and_entropies` computes log-probs with the rollout engine's recompute, so that
    vector actions (continuous, soft) and masked distributions (thought budgets) get exactly the density
    they were sampled from. The clipped surrogate and logging are TRL's.
  * The behaviour policy is the sampler's: its recorded log-probs are TRL's old log-probs, so the ratio is
    pi_learner / pi_sampler (1 up to float error when on-policy, as here; a mismatch, e.g. bf16 workers
    under an fp32 learner, enters the ratio rather than being ignored, and is logged as `logprob_mismatch`).
    With density_scale=per_dim a vector step's ratio is (pi/mu)^(1/D): its clip bounds D times that
    log-ratio, and its logged mismatch is per dimension.
    Rollouts are always sampled with the learner's current weights: no asynchronous or multi-epoch reuse.
  * `extra_modules` (the thought mode with a learned sigma, PPO's value head, the parallel path's mixing
    head): one map, built by the caller, that the optimizer, clipping, weight publishing, checkpoints,
    resume and evals all read.
  * KL (rl.beta): not TRL's per-token KL, which would also price thought steps against a reference that
    barely thinks. Ours is the exact KL(pi_text || ref_text) at text steps only, over the text columns
    renormalised, at temperature 1.
  * The loss runs over the steps a rollout's reward depends on (`Rewards.credit`), forced steps excluded.
  * Advantages: `group_advantages` (rl/advantages.py, shared with `thinktok signal`) of the scalar rewards,
    in place of TRL's. algo=rloo: TRL 1.16's RLOOTrainer has no `rollout_func`, so RLOO runs here as GRPO
    with the leave-one-out baseline A_i = r_i - mean_{j!=i} r_j.
  * algo=ppo: rl/ppo.py. rollout=parallel: rl/parallel/learner.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
import torch
import trl
from torch import nn
from trl import GRPOConfig, GRPOTrainer

from thinktok.errors import PoisonedStep, UserError
from thinktok.models.thoughts import Action

from .actors import Workers, chunks, get, put_weights
from .advantages import group_advantages
from .rollout import Recomputed, Rollout, gold_answer_loglik, recompute_logprobs

TRL_VERSION = "1.16.0"  # the TRL whose private methods this module overrides (pyproject.toml pins it)


def check_trl() -> None:
    """The installed TRL is the one this module's overrides were written against, or a clear error."""
    if trl.__version__ != TRL_VERSION:
        raise UserError(f"thinktok's learner overrides private methods of TRL {TRL_VERSION} (rl/learner.py), "
                        f"but TRL {trl.__version__} is installed: pip install trl=={TRL_VERSION}")


def check_finite(name: str, x: torch.Tensor, step: int) -> None:
    if not torch.isfinite(x).all():
        raise PoisonedStep(f"{name} is not finite at step {step} ({int((~torch.isfinite(x)).sum())} bad "
                           f"values); no checkpoint is written from this state")


def cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


class RayRollouts:
    """TRL rollout_func(prompts, trainer): prompts arrive already repeated num_generations times."""

    def __init__(self, workers: Workers, tokenizer, rows_by_prompt: dict[str, dict], seed: int,
                 gold_by_prompt: dict[str, list[int]] | None = None):
        self.workers, self.tokenizer, self.rows, self.seed = workers, tokenizer, rows_by_prompt, seed
        self.gold = gold_by_prompt  # gold answer ids, for the learner's latent term
        self.weights_ref, self.published = None, -1

    def publish(self, trainer, version: int) -> list:
        """Weights of `version` (the model and every extra module), published once per version
        (`put_weights`: an ObjectRef in a list, so that workers fetch it only when their copy is stale)."""
        if version != self.published:
            model = trainer.accelerator.unwrap_model(trainer.model)
            modules = {name: cpu_state(m) for name, m in trainer.extra_modules.items()}
            self.weights_ref = put_weights(self.workers, {"model": cpu_state(model), **modules})
            self.published = version
        return self.weights_ref

    def call_seed(self, version: int, chunk: int, rank: int) -> int:
        """Depends only on (run seed, learner rank, step, chunk): a call retried after an actor death
        resamples the same, and learner processes under accelerate draw different samples."""
        return ((self.seed * 1_000_003 + rank) * 1_000_003 + version) * 7919 + chunk

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

    def __call__(self, prompts: list[str], trainer) -> dict:
        version = trainer.state.global_step
        weights = self.publish(trainer, version)
        ids = [self.tokenizer(p).input_ids for p in prompts]
        parts = chunks(list(range(len(prompts))), len(self.workers.rollout))
        rank = trainer.accelerator.process_index
        futures = [w.sample.remote([ids[i] for i in part], self.call_seed(version, k, rank), weights, version)
                   for k, (w, part) in enumerate(zip(self.workers.rollout, parts)) if part]
        rollouts: list[Rollout] = [r for chunk in get(futures) for r in chunk]
        rows = [self.rows[p] for p in prompts]
        groups = chunks(list(range(len(rollouts))), len(self.workers.reward))
        calls = [w.score.remote([rollouts[i] for i in g], [rows[i] for i in g], weights, version)
                 for w, g in zip(self.workers.reward, groups) if g]
        scored = self.get_scores(calls, version)
        per_step = [s for part in scored for s in part.per_step]
        credit = [c for part in scored for c in part.credit]
        total = torch.cat([part.total for part in scored])
        check_finite("reward", total, version)
        return {
            "prompt_ids": [r.prompt_ids for r in rollouts],
            # vector/soft steps have no token: a placeholder id; their log-probs come from the recompute
            "completion_ids": [r.token.clamp_min(0).tolist() for r in rollouts],
            "logprobs": [r.logprob.tolist() for r in rollouts],
            # the loss runs over actions (not forced steps) that the reward depends on
            "env_mask": [((r.action != Action.FORCED) & c).long().tolist() for r, c in zip(rollouts, credit)],
            "reward": total.tolist(),
            # extra fields: TRL copies them into its per-example inputs; the trainer carries them in the batch
            "rollout": rollouts,
            "per_step": per_step,
            "gold": [self.gold[p] for p in prompts] if self.gold else [None] * len(prompts),
        }


def rollout_reward(completions, reward, **_):
    """TRL reward function: the reward workers' scalar, carried through rollout_func's extra keys."""
    return list(reward)


@dataclass
class RecomputeBatch:
    """The model bound to one training batch's rollouts: what `_compute_loss` hands TRL's loss as `model`, so
    that the log-prob override knows which rollouts the rows are. The override fills `recomputed` (the
    recompute's output) and `logps` (detached (B, S) log-probs, for the mismatch metric)."""

    model: nn.Module
    rollouts: list
    recomputed: Recomputed | None = None
    logps: torch.Tensor | None = None


class ThoughtGRPOTrainer(GRPOTrainer):
    """extra_modules: modules trained beside the model ({"mode": thought_mode, ...}). kl_ref: the frozen
    reference for the text-step KL (rl.beta = kl_coef); TRL's own beta must be 0. latent_coef: weight of the
    supervised latent term, -log pi_text(y* | x, z_open) (the gold ids come with each rollout): it teaches the
    model to read its own thoughts (STaR / Quiet-STaR's latent-variable objective)."""

    def __init__(self, model, reward_funcs, args: GRPOConfig, *rest, extra_modules: dict[str, nn.Module],
                 algo: str = "grpo", kl_ref: nn.Module | None = None, kl_coef: float = 0.0,
                 latent_coef: float = 0.0, **kwargs):
        check_trl()
        # refused before TRL builds anything (with its own beta it would load a reference model)
        if args.num_iterations != 1 or args.steps_per_generation != 1 or args.beta != 0:
            raise UserError("thinktok's learner trains each batch once, on-policy, with its own text-step "
                             "KL: num_iterations=1, steps_per_generation=1 and TRL's beta=0 (use kl_coef)")
        if kl_coef and kl_ref is None:
            raise UserError("kl_coef > 0 needs a reference model (kl_ref)")
        self.extra_modules, self.thought_mode, self.algo = extra_modules, extra_modules["mode"], algo
        self.kl_ref, self.kl_coef, self.latent_coef = kl_ref, kl_coef, latent_coef
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        # everything the loss touches lives beside the model (the mode's column masks, a learned sigma, heads)
        for module in self.extra_modules.values():
            module.to(self.accelerator.device)
        if kl_ref is not None:
            self.kl_ref = kl_ref.to(self.accelerator.device).eval().requires_grad_(False)

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

    def log_rollouts(self, inputs: list[dict]) -> None:
        """Per-step rollout statistics, through TRL's metrics (metrics.jsonl strips the `rollout/` prefix)."""
        rollouts = [x["rollout"] for x in inputs]
        n = len(rollouts)
        stats = {"thought_steps_mean": sum(r.num_thought for r in rollouts) / n,
                 "real_tokens_mean": sum(r.num_real for r in rollouts) / n,
                 "weight_version": min(r.weight_version for r in rollouts)}
        for k, v in stats.items():
            self.log_metric(f"rollout/{k}", v)

    def log_metric(self, name: str, value: float) -> None:
        """One value of a training metric, averaged into TRL's log of the step."""
        self._metrics["train"][name].append(value)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)  # runs rollout_func; its fields are in `inputs`
        out["rollout"] = [x["rollout"] for x in inputs]  # lists are shuffled and split with the batch
        if self.latent_coef:
            out["gold"] = [x["gold"] for x in inputs]
        self.set_advantages(inputs, out)
        self.log_rollouts(inputs)
        check_finite("advantages", out["advantages"], self.state.global_step)
        return out

    def set_advantages(self, inputs: list[dict], out: dict) -> None:
        """out["advantages"]: this process's rows' `group_advantages` (by algo) of every process's rewards,
        gathered as TRL gathers them (a prompt's group may span processes)."""
        local = torch.tensor([x["reward"] for x in inputs], device=self.accelerator.device)
        start = self.accelerator.process_index * len(local)
        adv = group_advantages(self.accelerator.gather(local), self.num_generations, self.algo)
        out["advantages"] = adv[start : start + len(local)].to(out["advantages"].device)

    def _compute_loss(self, model, inputs):
        batch = RecomputeBatch(model, inputs["rollout"])
        # the sampler is the behaviour policy: ratio = pi_learner / pi_sampler, not 1 by construction
        sampled = inputs["sampling_per_token_logps"]
        loss = super()._compute_loss(batch, {**inputs, "old_per_token_logps": sampled})
        loss = loss + self.extra_loss(batch, inputs) / self.current_gradient_accumulation_steps
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        width = batch.logps.shape[1]
        gap = ((batch.logps - sampled[:, :width]).abs() * mask[:, :width]).max()
        self.log_metric("logprob_mismatch", gap.item())
        check_finite("loss", loss.detach(), self.state.global_step)
        return loss

    def extra_loss(self, batch: RecomputeBatch, inputs: dict) -> torch.Tensor:
        """Terms beside TRL's surrogate, per batch: the text-step KL and the latent term."""
        loss = torch.zeros((), device=batch.logps.device)
        if self.kl_coef:
            kl = self.text_kl(batch)
            self.log_metric("kl", kl.item())
            loss = loss + self.kl_coef * kl
        if self.latent_coef:
            nll = self.latent_nll(batch.model, batch.rollouts, inputs["gold"])
            self.log_metric("latent_nll", nll.item())
            loss = loss + self.latent_coef * nll
        return loss

    def latent_nll(self, model, rollouts: list[Rollout], gold: list[list[int]]) -> torch.Tensor:
        """Mean over rollouts of -(1/|y*|) sum_t log pi_text(y*_t | x, z_open, y*_<t): the gold answer after
        each rollout's own opening thoughts, scored as the gold rewards score it (`gold_answer_loglik`)."""
        with self.accelerator.autocast():
            return -gold_answer_loglik(model, self.thought_mode, rollouts, gold).mean()

    def text_kl(self, batch: RecomputeBatch) -> torch.Tensor:
        """Mean over text steps of the exact KL(pi_text || ref_text), both over the text columns at
        temperature 1; thought steps carry none. Reads the policy's text log-probs of this batch's
        recompute."""
        policy_lp = batch.recomputed.text_logp  # (N_text, V_text), differentiable
        with torch.no_grad(), self.accelerator.autocast():
            ref_lp = recompute_logprobs(self.kl_ref, self.thought_mode, batch.rollouts, text=True).text_logp
        if policy_lp.shape[0] == 0:
            return policy_lp.sum()
        return (policy_lp.exp() * (policy_lp - ref_lp.float())).sum(-1).mean()

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **_):
        """Log-probs of the recorded actions by `recompute`: (B, logits_to_keep)."""
        batch = bound(model, input_ids)
        with self.accelerator.autocast():
            batch.recomputed, logps, entropy = self.recompute(batch)
        batch.logps = logps.detach()
        entropy = pad_to(entropy, logits_to_keep) if compute_entropy else None
        return pad_to(logps, logits_to_keep), entropy, None

    def recompute(self, batch: RecomputeBatch) -> tuple:
        """-> (what `extra_loss` reads as batch.recomputed, (B, S) log-probs of the recorded actions, (B, S)
        entropies): the rollout engine's teacher-forced recompute."""
        rec = recompute_logprobs(batch.model, self.thought_mode, batch.rollouts, text=bool(self.kl_coef))
        return rec, rec.logprob, rec.entropy


def bound(model, input_ids: torch.Tensor) -> RecomputeBatch:
    """The RecomputeBatch TRL's loss passes on as `model`; anything else means TRL asked for log-probs where
    this learner never does (old or reference log-probs need num_iterations > 1 or TRL's beta)."""
    if not isinstance(model, RecomputeBatch):
        raise RuntimeError("log-probs requested outside _compute_loss: thinktok's learner needs "
                           "num_iterations=1, steps_per_generation=1 and TRL's beta=0")
    if len(model.rollouts) != input_ids.shape[0]:
        raise RuntimeError(f"{input_ids.shape[0]} rows but {len(model.rollouts)} rollouts: batch "
                           f"bookkeeping broke")
    return model


def pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, S) -> (B, width), zeros on the right: TRL's completion width can exceed the longest rollout."""
    return nn.functional.pad(x.reshape(x.shape[0], -1), (0, width - x[0].numel()))
