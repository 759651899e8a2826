"""The learner: TRL's GRPO trainer, fed by Ray rollouts and teacher rewards, with as few overrides as
possible (trl is pinned exactly because `grpo_trainer.py` changes often; each override is tested against
the base method).

  * `RayRollouts` is TRL's `rollout_func`: it publishes the current weights, samples on the rollout workers,
    scores on the teacher workers, and hands TRL token ids, a loss mask (forced thought steps are not
    actions) and the scalar rewards.
  * `_get_per_token_logps_and_entropies` computes log-probs with the rollout engine's recompute, so that
    vector actions (continuous, soft) and masked distributions (thought budgets) get exactly the density
    they were sampled from. The clipped surrogate and logging are TRL's.
  * The behaviour policy is the sampler's: its recorded log-probs are TRL's old log-probs, so the ratio is
    pi_learner / pi_sampler (1 up to float error when on-policy, as here; a mismatch, e.g. bf16 workers
    under an fp32 learner, enters the ratio rather than being ignored, and is logged as `logprob_mismatch`).
    With density_scale=per_dim a vector step's ratio is (pi/mu)^(1/D): its clip bounds D times that
    log-ratio, and its logged mismatch is per dimension.
    Rollouts are always sampled with the learner's current weights: no asynchronous or multi-epoch reuse.
  * KL (rl.beta): not TRL's per-token KL, which would also price thought steps against a reference that
    barely thinks. Ours is the exact KL(pi_text || ref_text) at text steps only, over the text columns
    renormalised, at temperature 1.
  * The loss runs over the steps a rollout's reward depends on (`Rewards.credit`), forced steps excluded.
  * algo=rloo: TRL 1.16's RLOOTrainer has no `rollout_func`, so RLOO runs here as GRPO without std scaling
    and with the leave-one-out factor G/(G-1): A_i = r_i - mean_{j!=i} r_j.
  * algo=ppo: `ThoughtPPOTrainer` (TRL dropped its PPOTrainer) replaces only the advantage with GAE over
    per-step teacher rewards and a value head, and adds the value loss.
  * rollout=parallel: `ParallelRollouts` + `ParallelGRPOTrainer`. A TRL row is one window with a thought
    at every position (completion = the T*L thought tokens); the advantage is per position (its gain minus
    the mean over the G thoughts at that position) and the log-probs come from one pass through the kernel.
"""

from __future__ import annotations

import ray
import torch
from torch import nn
from trl import GRPOTrainer

from thinktok.models.parallel import MixingHead
from thinktok.models.thoughts import Action, ThoughtMode

from .actors import Workers, chunks
from .parallel import ParallelConfig, ParallelRollout, position_advantages, score
from .rollout import Rollout, recompute_logprobs, with_gold


class PoisonedStep(FloatingPointError):
    """NaN/inf in rewards, advantages or loss: the step stops before any optimizer step or checkpoint."""


def check_finite(name: str, x: torch.Tensor, step: int) -> None:
    if not torch.isfinite(x).all():
        raise PoisonedStep(f"{name} is not finite at step {step} ({int((~torch.isfinite(x)).sum())} bad values); "
                           "no checkpoint is written from this state")


class RayRollouts:
    """TRL rollout_func(prompts, trainer): prompts arrive already repeated num_generations times."""

    def __init__(self, workers: Workers, tokenizer, rows_by_prompt: dict[str, dict], seed: int,
                 gold_by_prompt: dict[str, list[int]] | None = None):
        self.workers, self.tokenizer, self.rows, self.seed = workers, tokenizer, rows_by_prompt, seed
        self.gold = gold_by_prompt  # gold answer ids, for the learner's latent term
        self.weights_ref, self.published = None, -1

    def publish(self, trainer, version: int) -> list:
        """Weights of `version` into the object store, once per version (ObjectRef wrapped in a list so
        that workers fetch it only when their copy is stale)."""
        if version != self.published:
            model = trainer.accelerator.unwrap_model(trainer.model)
            cpu = lambda state: {k: v.detach().cpu() for k, v in state.items()}  # noqa: E731
            self.weights_ref = ray.put({"model": cpu(model.state_dict()),
                                        **{name: cpu(m.state_dict()) for name, m in trainer.worker_modules().items()}})
            self.published = version
        return [self.weights_ref]

    def call_seed(self, version: int, chunk: int, rank: int) -> int:
        """Depends only on (run seed, learner rank, step, chunk): a call retried after an actor death resamples
        the same, and learner processes under accelerate draw different samples."""
        return ((self.seed * 1_000_003 + rank) * 1_000_003 + version) * 7919 + chunk

    @staticmethod
    def get_scores(futures: list, version: int) -> list:
        try:
            return ray.get(futures)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ValueError):  # the scorers' own checks (non-finite rewards or gains)
                raise PoisonedStep(f"scoring failed at step {version}: {e.cause}") from None
            raise

    def __call__(self, prompts: list[str], trainer) -> dict:
        version = trainer.state.global_step
        weights = self.publish(trainer, version)
        ids = [self.tokenizer(p).input_ids for p in prompts]
        parts = chunks(list(range(len(prompts))), len(self.workers.rollout))
        rank = trainer.accelerator.process_index
        futures = [w.sample.remote([ids[i] for i in part], self.call_seed(version, k, rank), weights, version)
                   for k, (w, part) in enumerate(zip(self.workers.rollout, parts)) if part]
        rollouts: list[Rollout] = [r for chunk in ray.get(futures) for r in chunk]
        rows = [self.rows[p] for p in prompts]
        groups = chunks(list(range(len(rollouts))), len(self.workers.teacher))
        scored = self.get_scores([w.score.remote([rollouts[i] for i in g], [rows[i] for i in g], weights, version)
                                  for w, g in zip(self.workers.teacher, groups) if g], version)
        per_step = [s for part in scored for s in part.per_step]
        credit = [c for part in scored for c in part.credit]
        total = torch.cat([part.total for part in scored])
        check_finite("reward", total, version)
        trainer.store(rollouts, per_step, [self.gold[p] for p in prompts] if self.gold else None)
        return {
            "prompt_ids": [r.prompt_ids for r in rollouts],
            # vector/soft steps have no token: a placeholder id; their log-probs come from the recompute
            "completion_ids": [r.token.clamp_min(0).tolist() for r in rollouts],
            "logprobs": [r.logprob.tolist() for r in rollouts],
            # the loss runs over actions (not forced steps) that the reward depends on
            "env_mask": [((r.action != Action.FORCED) & c).long().tolist() for r, c in zip(rollouts, credit)],
            "reward": total.tolist(),
        }


def rollout_reward(completions, reward, **_):
    """TRL reward function: the teacher workers' scalar, carried through rollout_func's extra keys."""
    return list(reward)


class ThoughtGRPOTrainer(GRPOTrainer):
    """kl_ref: the frozen reference for the text-step KL (rl.beta = kl_coef); TRL's own beta must be 0.
    latent_coef: weight of the supervised latent term, -log pi_text(y* | x, z_open) (rollout_func stores the
    gold ids): it teaches the model to read its own thoughts (STaR / Quiet-STaR's latent-variable objective)."""

    def __init__(self, *args, thought_mode: ThoughtMode, algo: str = "grpo", kl_ref: nn.Module | None = None,
                 kl_coef: float = 0.0, latent_coef: float = 0.0, **kwargs):
        self.thought_mode, self.algo = thought_mode, algo
        self.kl_ref, self.kl_coef, self.latent_coef = kl_ref, kl_coef, latent_coef
        self._rollouts: list[Rollout] = []
        self._gold: list[list[int]] | None = None
        self._per_step: list[torch.Tensor] = []
        self._batch: list[Rollout] | None = None
        self._recomputed = self._last_logps = None
        self.rollout_stats: dict = {}
        super().__init__(*args, **kwargs)
        args_ = self.args
        if args_.num_iterations != 1 or args_.steps_per_generation != 1 or args_.beta != 0:
            raise ValueError("thinktok's learner trains each batch once, on-policy, with its own text-step KL: "
                             "num_iterations=1, steps_per_generation=1 and TRL's beta=0 (use kl_coef)")
        if kl_coef and kl_ref is None:
            raise ValueError("kl_coef > 0 needs a reference model (kl_ref)")
        # everything the loss touches lives beside the model (the mode's column masks, a learned sigma)
        self.thought_mode.to(self.accelerator.device)
        if kl_ref is not None:
            self.kl_ref = kl_ref.to(self.accelerator.device).eval().requires_grad_(False)

    def create_optimizer(self, model=None):
        """TRL's optimizer plus the thought mode's own parameters (a learned sigma), when there are any."""
        opt = super().create_optimizer(model) if model is not None else super().create_optimizer()
        extra = [p for p in self.extra_parameters() if p.requires_grad]
        if extra:
            opt.add_param_group({"params": extra, "weight_decay": 0.0})

            def zero_extra_grads(*_):  # the Trainer zeroes model.parameters() only: these would sum over all steps
                for p in extra:
                    p.grad = None

            opt.register_step_post_hook(zero_extra_grads)
        return opt

    def _clip_grad_norm(self, model):
        """The Trainer clips model.parameters() only: the extra parameters are clipped with them, by one norm."""
        extra = [p for p in self.extra_parameters() if p.requires_grad]
        if not extra:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(list(model.parameters()) + extra, self.args.max_grad_norm)

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.thought_mode.parameters())

    def worker_modules(self) -> dict[str, nn.Module]:
        """Modules besides the model whose weights the workers need at every version."""
        return {"mode": self.thought_mode}

    def store(self, rollouts: list[Rollout], per_step: list[torch.Tensor], gold: list[list[int]] | None = None) -> None:
        self._rollouts, self._per_step, self._gold = rollouts, per_step, gold
        n = len(rollouts)
        self.rollout_stats = {
            "thought_steps_mean": sum(r.num_thought for r in rollouts) / n,
            "real_tokens_mean": sum(r.num_real for r in rollouts) / n,
            "weight_version": min(r.weight_version for r in rollouts),
        }

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.algo == "rloo":
            g = self.num_generations
            out["advantages"] = out["advantages"] * g / (g - 1)
        # which stored rollout each row is: TRL shuffles and splits extra tensor keys with the batch
        out["rollout_idx"] = torch.arange(len(self._rollouts), device=out["advantages"].device)
        check_finite("advantages", out["advantages"], self.state.global_step)
        return out

    def _compute_loss(self, model, inputs):
        idx = inputs["rollout_idx"].tolist()
        self._batch = [self._rollouts[i] for i in idx]
        # the sampler is the behaviour policy: ratio = pi_learner / pi_sampler, not 1 by construction
        sampled = inputs["sampling_per_token_logps"]
        inputs = {**inputs, "old_per_token_logps": sampled}
        try:
            loss = super()._compute_loss(model, inputs)
            if self.kl_coef:
                kl = self.text_kl(self._batch)
                self._metrics["train"]["kl"].append(kl.item())
                loss = loss + self.kl_coef * kl / self.current_gradient_accumulation_steps
            if self.latent_coef:
                nll = self.latent_nll(model, self._batch, [self._gold[i] for i in idx])
                self._metrics["train"]["latent_nll"].append(nll.item())
                loss = loss + self.latent_coef * nll / self.current_gradient_accumulation_steps
        finally:
            self._batch = None
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        width = self._last_logps.shape[1]
        gap = ((self._last_logps - sampled[:, :width]).abs() * mask[:, :width]).max()
        self._metrics["train"]["logprob_mismatch"].append(gap.item())
        check_finite("loss", loss.detach(), self.state.global_step)
        return loss

    def latent_nll(self, model, rollouts: list[Rollout], gold: list[list[int]]) -> torch.Tensor:
        """Mean over rollouts of -(1/|y*|) sum_t log pi_text(y*_t | x, z_open, y*_<t): the gold answer after each
        rollout's own opening thoughts (the layout gold_loglik scores), differentiable."""
        cfg = self.thought_mode.cfg
        forced = [with_gold(r, torch.tensor(g), cfg.every) for r, g in zip(rollouts, gold)]
        with self.accelerator.autocast():
            text_logp = recompute_logprobs(model, self.thought_mode, forced, text=True).text_logp
        ids = torch.cat([torch.tensor(g) for g in gold]).to(text_logp.device)
        lp = text_logp.gather(1, ids[:, None])[:, 0].split([len(g) for g in gold])
        return -torch.stack([x.mean() for x in lp]).mean()

    def text_kl(self, rollouts: list[Rollout]) -> torch.Tensor:
        """Mean over text steps of the exact KL(pi_text || ref_text), both over the text columns at temperature
        1; thought steps carry none. Reads the policy's text log-probs left by this batch's recompute."""
        policy_lp = self._recomputed.text_logp  # (N_text, V_text), differentiable
        with torch.no_grad(), self.accelerator.autocast():
            ref_lp = recompute_logprobs(self.kl_ref, self.thought_mode, rollouts, text=True).text_logp
        if policy_lp.shape[0] == 0:
            return policy_lp.sum()
        return (policy_lp.exp() * (policy_lp - ref_lp.float())).sum(-1).mean()

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **_):
        """Log-probs of the recorded actions by the rollout engine's recompute: (B, logits_to_keep)."""
        rollouts = self._batch if self._batch is not None else self._rollouts  # inside generate: original order
        if len(rollouts) != input_ids.shape[0]:
            raise RuntimeError(f"{input_ids.shape[0]} rows but {len(rollouts)} rollouts: batch bookkeeping broke")
        with self.accelerator.autocast():
            rec = recompute_logprobs(model, self.thought_mode, rollouts, text=bool(self.kl_coef))
        self._recomputed, self._last_logps = rec, rec.logprob.detach()
        width = logits_to_keep - rec.logprob.shape[1]
        pad = lambda x: nn.functional.pad(x, (0, width))  # noqa: E731
        return pad(rec.logprob), pad(rec.entropy) if compute_entropy else None, None


def gae(rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over steps: (B, S) each -> advantages, returns (B, S).
    Past a rollout's end (valid False) the value is 0 and nothing propagates."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        nxt_value = values[:, t + 1] * valid[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        nxt_valid = valid[:, t + 1].float() if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt_value - values[:, t]
        last = (delta + gamma * lam * nxt_valid * last) * valid[:, t]
        adv[:, t] = last
    return adv, adv + values * valid


class ThoughtPPOTrainer(ThoughtGRPOTrainer):
    """PPO as a narrow subclass: TRL 1.16 has no PPOTrainer, and PPO differs from GRPO here only in the
    advantage (GAE over per-step teacher rewards with a learned value baseline instead of group
    normalisation) plus a value loss. The value head reads the policy's detached last hidden state."""

    def __init__(self, *args, gamma: float = 1.0, lam: float = 0.95, vf_coef: float = 0.5, **kwargs):
        self.gamma, self.lam, self.vf_coef = gamma, lam, vf_coef
        model = kwargs["model"]
        self.value_head = nn.Linear(model.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        super().__init__(*args, **kwargs)
        self.value_head.to(self.accelerator.device)

    def extra_parameters(self):
        return super().extra_parameters() + list(self.value_head.parameters())

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        with torch.no_grad():
            rec = recompute_logprobs(self.model, self.thought_mode, self._rollouts)
            values = self.value_head(rec.hidden.float())[..., 0]  # (B, S)
        rewards = torch.zeros_like(values)
        for i, r in enumerate(self._per_step):
            rewards[i, : len(r)] = r.to(values.device)
        adv, returns = gae(rewards, values, rec.valid, self.gamma, self.lam)
        action = rec.valid.clone()
        for i, r in enumerate(self._rollouts):
            action[i, : r.num_steps] &= (r.action != Action.FORCED).to(action.device)
        mean, std = adv[action].mean(), adv[action].std().clamp_min(1e-6)  # whitened over action steps
        width = out["completion_ids"].shape[1] - adv.shape[1]
        out["advantages"] = nn.functional.pad((adv - mean) / std * action, (0, width))
        out["returns"] = nn.functional.pad(returns, (0, width))
        check_finite("advantages", out["advantages"], self.state.global_step)
        return out

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)  # leaves the batch's recompute in self._recomputed
        rec = self._recomputed
        values = self.value_head(rec.hidden.detach().float())[..., 0]
        returns = inputs["returns"][:, : values.shape[1]]
        value_loss = ((values - returns) ** 2 * rec.valid).sum() / rec.valid.sum().clamp_min(1)
        self._metrics["train"]["value_loss"].append(value_loss.item())
        return loss + self.vf_coef * 0.5 * value_loss / self.current_gradient_accumulation_steps


class ParallelRollouts(RayRollouts):
    """rollout_func for parallel thoughts: windows -> rollout workers (a thought at every position) ->
    scoring workers (per-position gains) -> TRL rows of T*L thought tokens each."""

    def __init__(self, workers: Workers, windows_by_prompt: dict[str, list[int]], cfg: ParallelConfig, seed: int):
        super().__init__(workers, None, windows_by_prompt, seed)
        self.cfg = cfg

    def __call__(self, prompts: list[str], trainer) -> dict:
        version = trainer.state.global_step
        weights = self.publish(trainer, version)
        real = torch.tensor([self.rows[p] for p in prompts])  # (R, T)
        parts = [p for p in chunks(list(range(len(prompts))), len(self.workers.rollout)) if p]
        rank = trainer.accelerator.process_index
        futures = [w.sample_parallel.remote(real[part], self.cfg.thought_len, self.call_seed(version, k, rank), weights,
                                            version)
                   for k, (w, part) in enumerate(zip(self.workers.rollout, parts))]
        sampled = ParallelRollout.cat(ray.get(futures))
        groups = [g for g in chunks(list(range(len(prompts))), len(self.workers.teacher)) if g]
        scored = self.get_scores([w.score_parallel.remote(sampled.rows(g), weights, version)
                                  for w, g in zip(self.workers.teacher, groups)], version)
        batch = ParallelRollout.cat([part for part, _ in scored])
        check_finite("reward", batch.gain, version)
        stats = {k: sum(s[k] for _, s in scored) / len(scored) for k in scored[0][1]}
        trainer.store_parallel(batch, stats)
        r, t, l = batch.thoughts.shape
        scored_positions = torch.ones(r, t, l, dtype=torch.long)
        scored_positions[:, -1] = 0  # the last position has no next token: its thought is not an action here
        return {
            "prompt_ids": batch.real.tolist(),
            "completion_ids": batch.thoughts.reshape(r, -1).tolist(),
            "logprobs": batch.logprob.reshape(r, -1).tolist(),
            "env_mask": scored_positions.reshape(r, -1).tolist(),
            "reward": batch.gain[:, :-1].mean(1).tolist(),  # for TRL's logs; advantages are per position
        }


class ParallelGRPOTrainer(ThoughtGRPOTrainer):
    """TRL's GRPO objective over parallel thoughts: per-position advantages, log-probs from one kernel pass,
    plus the post-thought NLL (Quiet-STaR trains the prediction after a thought beside the REINFORCE term)."""

    def __init__(self, *args, parallel: ParallelConfig, **kwargs):
        self.parallel = parallel
        hidden = kwargs["model"].config.hidden_size
        self.mixing_head = MixingHead(hidden) if parallel.mixing_head else None
        self._nll = self._parallel_batch = None
        super().__init__(*args, **kwargs)
        if self.mixing_head is not None:
            self.mixing_head.to(self.accelerator.device)

    def extra_parameters(self):
        return super().extra_parameters() + (list(self.mixing_head.parameters()) if self.mixing_head else [])

    def worker_modules(self):
        return {**super().worker_modules(), **({"head": self.mixing_head} if self.mixing_head else {})}

    def store_parallel(self, batch: ParallelRollout, stats: dict) -> None:
        self._parallel_batch = batch  # in TRL's row order, for the advantages
        self._rollouts = [batch.rows([i]) for i in range(len(batch.real))]  # one record per TRL row, for the shuffle
        r, t, l = batch.thoughts.shape
        self.rollout_stats = {"gain_mean": batch.gain[:, :-1].mean().item(), "thought_tokens": t * l,
                              "weight_version": batch.weight_version, **stats}

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        batch = self._parallel_batch
        r, t, l = batch.thoughts.shape
        g = self.num_generations
        adv = position_advantages(batch.gain, g, self.parallel.positive_only)  # (R, T)
        if self.algo == "rloo":
            adv = adv * g / (g - 1)
        per_token = adv[..., None].expand(r, t, l).reshape(r, t * l)
        width = out["completion_ids"].shape[1] - t * l
        out["advantages"] = nn.functional.pad(per_token, (0, width)).to(out["advantages"].device)
        check_finite("advantages", out["advantages"], self.state.global_step)
        return out

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)  # its log-prob pass leaves the batch's post-thought NLL
        if self.parallel.nll_coef:
            self._metrics["train"]["nll_thought"].append(self._nll.item())
            loss = loss + self.parallel.nll_coef * self._nll / self.current_gradient_accumulation_steps
            check_finite("loss", loss.detach(), self.state.global_step)
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **_):
        """Log-probs of the sampled thoughts from one parallel pass: (R, logits_to_keep)."""
        rows = self._batch if self._batch is not None else self._rollouts
        if len(rows) != input_ids.shape[0]:
            raise RuntimeError(f"{input_ids.shape[0]} rows but {len(rows)} rollouts: batch bookkeeping broke")
        batch = ParallelRollout.cat(rows).to(input_ids.device)
        with self.accelerator.autocast():
            # the gain was scored by the scoring workers: only the thoughts' log-probs and the NLL term here
            scored = score(model, self.thought_mode, batch, self.parallel.lookahead, self.mixing_head,
                           post=self.parallel.nll_coef > 0, base=False)
        self._nll = scored.nll() if self.parallel.nll_coef else None
        self._last_logps = scored.thought_logprob.detach().reshape(len(rows), -1)
        r = len(rows)
        pad = lambda x: nn.functional.pad(x.reshape(r, -1), (0, logits_to_keep - x[0].numel()))  # noqa: E731
        return pad(scored.thought_logprob), pad(scored.thought_entropy) if compute_entropy else None, None
