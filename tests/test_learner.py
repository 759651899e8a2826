"""The learner's signal on toy problems, without Ray: per algorithm, one update makes the known better action
likelier; the sampler is the behaviour policy (a stale batch is corrected); forced steps carry no gradient;
the KL is over text steps only; extra parameters are clipped; the mode sits on the model's device."""


import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig

from conftest import boost_thinking
from thinktok.errors import UserError
from thinktok.models.policy import load_policy
from thinktok.models.thought_config import SamplingConfig, ThoughtConfig
from thinktok.models.thought_modes import make_mode
from thinktok.models.thoughts import Action
from thinktok.rl.advantages import group_advantages
from thinktok.rl.learner import ThoughtGRPOTrainer
from thinktok.rl.ppo import ThoughtPPOTrainer, value_head
from thinktok.rl.recompute import recompute_logprobs
from thinktok.rl.sampler import sample
from thinktok.rl.step import Batch, Collector, padded

PROMPTS = {"p0": [1105, 1635, 4974, 796], "p1": [15496]}


def policy_and_mode(thought: dict, boost: float | None = None, seed: int = 0):
    cfg = ThoughtConfig(**thought)
    policy = load_policy("tiny", cfg.vocab_tokens, cfg.markers, seed=seed)
    if boost:
        boost_thinking(policy, boost)
    return policy, make_mode(cfg, policy.vocab, SamplingConfig(max_new_tokens=4))


GOLD = {"p0": [1065, 2078], "p1": [11, 995]}  # answers for the latent term


def local_trainer(tmp_path, policy, mode, reward, algo="grpo", group=8, lr=1e-3, kl_ref=None, kl_coef=0.0,
                  latent_coef=0.0, credit=None, **grpo_args):
    """The real trainer classes with a local collector: sample here, `reward(rollout)` at the last step.
    credit(rollout): the (S,) bool steps the loss runs over (default: every step not forced). grpo_args:
    GRPOConfig fields over the defaults below."""
    credit = credit or (lambda r: r.action != Action.FORCED)

    def collector(prompts, trainer, version):
        rollouts = sample(trainer.model, mode, [PROMPTS[p] for p in prompts], seed=version)
        per_step = []
        for r in rollouts:
            steps = torch.zeros(r.num_steps)
            steps[-1] = reward(r)
            per_step.append(steps)
        return Batch(rollouts, torch.stack([s.sum() for s in per_step]),
                     padded([r.logprob for r in rollouts]),
                     padded([credit(r).long() for r in rollouts]), per_step,
                     [GOLD[p] for p in prompts])

    defaults = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False,
                    per_device_train_batch_size=len(PROMPTS) * group, num_generations=group, max_steps=1,
                    learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                    beta=0.0, scale_rewards="none" if algo == "rloo" else "group", report_to=[],
                    save_strategy="no", logging_steps=1, disable_dropout=True, seed=0,
                    max_completion_length=16)
    args = GRPOConfig(**{**defaults, **grpo_args})
    modules = {"mode": mode,
               **({"value_head": value_head(policy.model.config.hidden_size)} if algo == "ppo" else {})}
    cls, extra = (ThoughtPPOTrainer, {}) if algo == "ppo" else (ThoughtGRPOTrainer, {"algo": algo})
    return cls(model=policy.model, args=args, processing_class=policy.tokenizer,
               train_dataset=Dataset.from_dict({"prompt": list(PROMPTS)}), collector=collector,
               extra_modules=modules, kl_ref=kl_ref, kl_coef=kl_coef, latent_coef=latent_coef, **extra)


@torch.no_grad()
def p_think_first(policy) -> float:
    """Mean over the prompts of P(first step is a thinking token), the softmax over text + thinking tokens."""
    v = policy.vocab
    return sum(policy.model(torch.tensor([p])).logits[0, -1].softmax(-1)[v.text_size : v.size].sum().item()
               for p in PROMPTS.values()) / len(PROMPTS)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_advantages_are_the_shared_group_advantages(tmp_path, algo):
    """The learner's advantages are `group_advantages` of the rollouts' rewards (as `thinktok signal`
    computes them), and by hand: grpo (r - group mean) / (group std + 1e-4) as TRL's scale_rewards="group",
    rloo r_i minus the mean of the group's other rewards."""
    policy, mode = policy_and_mode(dict(mode="vocab", num_thinking=8, max_thought_tokens=2), boost=25)
    trainer = local_trainer(tmp_path, policy, mode, lambda r: float(r.token[0] >= r.text_size) + r.num_steps,
                            algo=algo)
    prompts = [p for p in PROMPTS for _ in range(8)]  # TRL's order: each prompt's group in turn
    batch = trainer.collector(prompts, trainer, 0)
    ours = trainer.advantages(batch, None)
    rewards = batch.reward
    assert rewards.std() > 0 and torch.allclose(ours, group_advantages(rewards, 8, algo))
    hand = []
    for g in rewards.reshape(2, 8).tolist():
        for i, r in enumerate(g):
            others = [x for j, x in enumerate(g) if j != i]
            mean = sum(g) / 8
            std = (sum((x - mean) ** 2 for x in g) / 7) ** 0.5
            hand.append(r - sum(others) / 7 if algo == "rloo" else (r - mean) / (std + 1e-4))
    assert torch.allclose(ours, torch.tensor(hand), atol=1e-5)


@pytest.mark.parametrize("algo", ["grpo", "rloo", "ppo"])
def test_one_update_makes_the_better_discrete_action_likelier(tmp_path, algo):
    """Reward 1 when the rollout opens with a thinking token (P ~ 0.2-0.3 at the start), else 0."""
    policy, mode = policy_and_mode(dict(mode="vocab", num_thinking=8, max_thought_tokens=2), boost=25)
    before = p_think_first(policy)
    trainer = local_trainer(tmp_path, policy, mode, lambda r: float(r.token[0] >= r.text_size), algo=algo)
    batch = trainer.collector(list(PROMPTS) * 8, trainer, 0)
    # both actions sampled: the group baseline has something to compare
    assert 0 < batch.reward.sum() < 16
    trainer.train()
    assert p_think_first(policy) > before + 0.01, (before, p_think_first(policy))


def test_one_update_makes_the_rewarded_slot_content_likelier(tmp_path):
    """Fixed slots (the policy chooses only what to think): reward 1 when the first slot holds <think0>
    (P = 1/4 at the start, 4 thinking tokens), else 0; one GRPO update raises P(<think0> | prompt) in the
    slot's own distribution (thinking columns only)."""
    policy, mode = policy_and_mode(dict(mode="vocab", num_thinking=4, slots=2))
    v = policy.vocab

    @torch.no_grad()
    def p_think0():
        return sum(mode.think_logprobs(policy.model(torch.tensor([p])).logits[0, -1:])[0, 0].exp().item()
                   for p in PROMPTS.values()) / len(PROMPTS)

    before = p_think0()
    trainer = local_trainer(tmp_path, policy, mode, lambda r: float(r.token[0] == v.think_id(0)), lr=3e-3)
    trainer.train()
    assert p_think0() > before + 0.01, (before, p_think0())


@torch.no_grad()
def first_thought_mean(policy, u: torch.Tensor) -> float:
    """h . u at the position that chooses the first continuous thought (after the prompt and <bot>)."""
    out = []
    for p in PROMPTS.values():
        hidden = policy.model(torch.tensor([p + [policy.vocab.bot_id]]),
                              output_hidden_states=True).hidden_states
        out.append(hidden[-1][0, -1] @ u)
    return sum(out).item() / len(out)


@pytest.mark.parametrize("scale", ["per_dim", "joint"])
def test_one_update_moves_continuous_thoughts_toward_the_rewarded_direction(tmp_path, scale):
    """Reward x_0 . u for the first thought vector x_0 ~ N(h, sigma^2): the mean h must move along u."""
    policy, mode = policy_and_mode(dict(mode="continuous", num_thinking=0, max_thought_tokens=1, sigma=0.5,
                                        density_scale=scale))
    u = torch.randn(policy.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    u = u / u.norm()
    before = first_thought_mean(policy, u)
    # the advantage is noise along the other D-1 directions: 64 rollouts make the signal along u dominate
    trainer = local_trainer(tmp_path, policy, mode, lambda r: float(r.vector[1] @ u), lr=1e-3, group=32)
    trainer.train()
    assert first_thought_mean(policy, u) > before + 0.01, (before, first_thought_mean(policy, u))


def step_loss(trainer, batch):
    """Stages 4-6 of rl_step on a collected batch: the loss, before its backward."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    rec = trainer.recompute(trainer.model, batch)
    return trainer.objective(rec, trainer.advantages(batch, rec), batch)


def hand_loss(trainer, batch, old_shift: float, eps: float = 0.2) -> torch.Tensor:
    """TRL's clipped surrogate (loss_type dapo) over the action steps, written out: the behaviour log-probs
    are the sampler's, shifted by old_shift; forced steps take no part, in the sum or in the normaliser."""
    rollouts = batch.rollouts
    lp = recompute_logprobs(trainer.model, trainer.thought_mode, rollouts).logprob
    advantages = group_advantages(batch.reward, 8, "grpo")
    total, count = 0.0, 0
    for b, r in enumerate(rollouts):
        a = advantages[b]
        for s in range(r.num_steps):
            if r.action[s] == Action.FORCED:
                continue
            ratio = torch.exp(lp[b, s] - (r.logprob[s] + old_shift))
            total = total - torch.min(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
            count += 1
    return total / count


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_stale_batch_is_corrected_against_the_sampler(tmp_path):
    """Rollouts whose sampler gave their actions e^-1 of today's probability: the ratio is e, not 1, and the
    clip acts. Forced (pause) steps carry nothing: garbage behaviour log-probs there change nothing."""
    policy, mode = policy_and_mode(dict(mode="pause", num_thinking=1, num_pause=2))
    trainer = local_trainer(tmp_path, policy, mode, lambda r: float(r.text_ids[0] % 5))
    batch = trainer.collector(list(PROMPTS) * 8, trainer, 0)
    assert group_advantages(batch.reward, 8, "grpo").abs().sum() > 0
    fresh = step_loss(trainer, batch)
    assert trainer._metrics["train"]["logprob_mismatch"][-1] < 1e-4  # on-policy: sampler == learner
    assert fresh.item() == pytest.approx(hand_loss(trainer, batch, 0.0).item(), abs=1e-5)

    action = batch.mask.bool()
    stale = Batch(**{**vars(batch), "sampled": torch.where(action, batch.sampled - 1.0, -7.0)})
    trainer.model.zero_grad()
    loss = step_loss(trainer, stale)
    assert trainer._metrics["train"]["logprob_mismatch"][-1] == pytest.approx(1.0, abs=1e-4)
    assert loss.item() == pytest.approx(hand_loss(trainer, batch, -1.0).item(), abs=1e-5)
    assert abs(loss.item() - fresh.item()) > 1e-3
    loss.backward()
    ours = grads(trainer.model)
    trainer.model.zero_grad()
    hand_loss(trainer, batch, -1.0).backward()
    assert torch.allclose(ours, grads(trainer.model), atol=1e-6)


def test_text_kl_is_exact_over_text_steps_only(tmp_path):
    """KL(pi_text || ref_text) averaged over text steps, by an explicit sum over the text vocabulary."""
    policy, mode = policy_and_mode(dict(mode="vocab", num_thinking=8, max_thought_tokens=2), boost=25)
    ref = load_policy("tiny", 8, False, seed=5).model
    trainer = local_trainer(tmp_path, policy, mode, lambda r: 0.0, kl_ref=ref, kl_coef=0.1)
    rollouts = sample(policy.model, mode, list(PROMPTS.values()) * 4, seed=1)
    assert sum(r.num_thought for r in rollouts) > 0
    got = trainer.text_kl(recompute_logprobs(policy.model, mode, rollouts, text=True), rollouts)
    terms = []
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt_ids + r.token.tolist()])
            p_logits, q_logits = policy.model(ids).logits[0].double(), ref(ids).logits[0].double()
            for s in r.is_text.nonzero()[:, 0].tolist():
                pos = len(r.prompt_ids) - 1 + s
                p = p_logits[pos, : policy.vocab.text_size].exp()
                q = q_logits[pos, : policy.vocab.text_size].exp()
                p, q = p / p.sum(), q / q.sum()
                terms.append((p * (p / q).log()).sum())
    assert len(terms) == sum(r.num_text for r in rollouts)
    assert got.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-4)


def test_extra_parameters_are_clipped_with_the_model(tmp_path):
    policy, mode = policy_and_mode(dict(mode="continuous", num_thinking=0, sigma=0.5, learn_sigma=True))
    trainer = local_trainer(tmp_path, policy, mode, lambda r: 0.0)
    for p in policy.model.parameters():
        p.grad = torch.zeros_like(p)
    mode.log_sigma.grad = torch.tensor(100.0)
    norm = trainer._clip_grad_norm(policy.model)
    assert norm.item() == pytest.approx(100.0) and mode.log_sigma.grad.abs().item() == pytest.approx(
        1.0, rel=1e-4)


def test_the_mode_moves_to_the_learner_device(tmp_path, monkeypatch):
    """On a GPU the mode's column masks and sigma must follow the model: the trainer moves the mode to its
    accelerator's device (spied here, since a CPU has one device)."""
    policy, mode = policy_and_mode(dict(mode="vocab", num_thinking=8))
    moved = []
    original = type(mode).to
    monkeypatch.setattr(type(mode), "to", lambda self, *a,
                        **k: moved.append(a or k) or original(self, *a, **k))
    trainer = local_trainer(tmp_path, policy, mode, lambda r: 0.0)
    assert moved and torch.device(moved[0][0]) == trainer.accelerator.device
    tensors = list(mode.buffers()) + list(mode.parameters()) + list(policy.model.parameters())
    devices = {t.device for t in tensors}
    assert devices == {trainer.accelerator.device}


@pytest.mark.parametrize("reuse", [dict(num_iterations=2), dict(steps_per_generation=2), dict(beta=0.1)])
def test_learner_refuses_reuse_and_trl_kl(tmp_path, reuse):
    """Batches reused (several iterations or steps per generation) or TRL's own KL: refused, naming the
    settings; a text-step KL without its reference too."""
    policy, mode = policy_and_mode(dict(mode="vocab", num_thinking=8))
    with pytest.raises(ValueError, match="num_iterations=1, steps_per_generation=1 and TRL's beta=0"):
        local_trainer(tmp_path, policy, mode, lambda r: 0.0, **reuse)
    with pytest.raises(ValueError, match="kl_coef > 0 needs a reference"):
        local_trainer(tmp_path, policy, mode, lambda r: 0.0, kl_coef=0.1)


def test_another_trl_version_is_refused(tmp_path, monkeypatch):
    import trl

    policy, mode = policy_and_mode(dict(mode="vocab", num_thinking=8))
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(UserError, match=r"TRL 1\.17\.0 is installed, thinktok supports TRL 1\.16\.0 only.*"
                                        r"pip install trl==1\.16\.0"):
        local_trainer(tmp_path, policy, mode, lambda r: 0.0)


def test_call_seeds_differ_across_steps_rows_and_runs():
    rollouts = Collector(None, None, {}, seed=3)
    seeds = {rollouts.call_seed(v, row) for v in range(3) for row in range(0, 64, 4)}
    assert len(seeds) == 3 * 16
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)  # what torch.manual_seed takes
    assert rollouts.call_seed(2, 3) == Collector(None, None, {}, seed=3).call_seed(2, 3)
    assert rollouts.call_seed(2, 3) != Collector(None, None, {}, seed=4).call_seed(2, 3)


def test_latent_term_by_hand_and_one_update_lowers_it(tmp_path):
    """-log pi_text(gold | prompt, opening thoughts), per gold token, written out from input ids; with a
    constant reward (zero advantages) one update with the latent term alone makes the gold likelier."""
    policy, mode = policy_and_mode(dict(mode="vocab", num_thinking=8, max_thought_tokens=2), boost=30)
    trainer = local_trainer(tmp_path, policy, mode, lambda r: 0.0, latent_coef=1.0, lr=1e-3)
    names = list(PROMPTS) * 4
    rollouts = sample(policy.model, mode, [PROMPTS[p] for p in names], seed=0)
    assert any(r.is_text.nonzero()[0] > 0 for r in rollouts)  # some rollouts open with thoughts
    gold = [GOLD[p] for p in names]

    def hand():
        out = []
        with torch.no_grad():
            for r, g in zip(rollouts, gold):
                first = int(r.is_text.nonzero()[0])
                ids = r.prompt_ids + r.token[:first].tolist() + g
                logits = policy.model(torch.tensor([ids])).logits[0, :, : policy.vocab.text_size].double()
                start = len(ids) - len(g)
                lp = [logits[k - 1].log_softmax(-1)[ids[k]] for k in range(start, len(ids))]
                out.append(-torch.stack(lp).mean())
        return torch.stack(out).mean().item()

    before = hand()
    batch = Batch(rollouts, torch.zeros(len(rollouts)), padded([r.logprob for r in rollouts]),
                  padded([torch.ones(r.num_steps, dtype=torch.long) for r in rollouts]), gold=gold)
    assert trainer.extra_loss(policy.model, None, batch).item() == pytest.approx(before, abs=1e-5)
    trainer.train()
    assert hand() < before - 1e-3
    assert trainer.state.log_history[0]["latent_nll"] > 0


def test_one_teacher_kl_update_moves_the_policy_toward_the_teacher(tmp_path):
    """Seed 004's reward: one GRPO update on single-token rollouts rewarded by teacher_kl lowers the exact
    KL(pi || q) of the first token. Both heads are restricted to eight text tokens, the teacher made sharp
    (its final norm x20), so KL starts at ~5.6 nats; a flipped reward raises it (checked: 5.6 -> 8.6)."""
    from thinktok.models.head import head_columns, restrict_head
    from thinktok.models.teacher import Teacher
    from thinktok.rl.rewards import RewardConfig, RewardModel

    ids = [11, 13, 262, 290, 318, 257, 286, 284]
    policy, _ = policy_and_mode(dict(mode="none", num_thinking=0))
    restrict_head(policy.model, ids, policy.vocab.text_size)
    mode = make_mode(ThoughtConfig(mode="none", num_thinking=0), policy.vocab,
                     SamplingConfig(max_new_tokens=1, stop_at_eos=False), head_columns(policy.model))
    teacher = load_policy("tiny", 0, False, seed=1).model
    restrict_head(teacher, ids, policy.vocab.text_size)
    with torch.no_grad():
        teacher.transformer.ln_f.weight *= 20

    @torch.no_grad()
    def first_kl() -> float:  # exact, over the eight tokens, averaged over the prompts
        out = 0.0
        for p in PROMPTS.values():
            lp = policy.model(torch.tensor([p])).logits[0, -1].float().log_softmax(-1)[ids]
            lq = teacher(torch.tensor([p])).logits[0, -1].float().log_softmax(-1)[ids]
            out += float((lp.exp() * (lp - lq)).sum())
        return out / len(PROMPTS)

    reward = RewardModel(RewardConfig(weights={"teacher_kl": 1.0}), teacher=Teacher(teacher),
                         policy=policy.model, mode=mode)
    before = first_kl()
    trainer = local_trainer(tmp_path, policy, mode, lambda r: float(reward.score([r]).total[0]), group=16)
    trainer.train()
    assert first_kl() < before - 0.5, (before, first_kl())


def test_entropy_bonus_by_hand_and_one_update_raises_it(tmp_path):
    """rl.entropy_coef (TRL's bonus, over the loss mask): fixed slots credited alone (as thought_gain credits
    them), a constant reward (zero advantages); the entropy the loss reads is that of the slots'
    thinking-column distributions, computed here from the logits by hand, and one update with the bonus
    alone makes them more uniform. (Over text steps too, the tiny model's 50k-way text entropy dominates
    the mean and the slots' can fall: the bonus acts where the loss mask is.)"""
    policy, mode = policy_and_mode(dict(mode="vocab", num_thinking=4, slots=2))
    v = policy.vocab
    with torch.no_grad():  # a peaked start, so that there is entropy to gain
        policy.model.get_output_embeddings().weight[v.think_id(0)] *= 8
    rollouts = sample(policy.model, mode, [PROMPTS[p] for p in PROMPTS] * 4, seed=0)

    @torch.no_grad()
    def hand():  # mean over every slot of every rollout of -sum p log p over the 4 thinking columns
        out = []
        for r in rollouts:
            for k in range(2):  # the slots follow the prompt
                ids = r.prompt_ids + r.token[:k].tolist()
                logits = policy.model(torch.tensor([ids])).logits[0, -1, v.think_start : v.size]
                p = logits.double().softmax(-1)
                out.append(-(p * p.log()).sum())
        return torch.stack(out).mean().item()

    before = hand()
    rec = recompute_logprobs(policy.model, mode, rollouts)
    slots = padded([r.action == Action.THINK for r in rollouts]).bool()[:, :2]  # the two slot steps
    assert slots.all() and rec.entropy[:, :2].mean().item() == pytest.approx(before, abs=1e-5)
    # Adam's first step moves every weight by ~lr, and this peaked start is steep: a small step
    trainer = local_trainer(tmp_path, policy, mode, lambda r: 0.0, lr=1e-5, entropy_coef=1.0,
                            credit=lambda r: r.action == Action.THINK)
    trainer.train()
    assert hand() > before + 1e-3
