"""The text measures: how a checkpoint continues held-out prefixes against a frozen teacher
that sees only the text, and where its thoughts go. For every arm of a text study (`thinktok eval --teacher`
on one checkpoint):

  reverse_kl        per-token KL(pi_text || teacher) on the student's own continuations (temperature 1, its
                    thoughts sampled as in training): minus the teacher_kl reward (rl/rewards.py), here on
                    held-out prompts
  nll               per-token NLL of the true continuation, its real tokens forced and its thoughts the
                    policy's own (greedy, wherever the policy chooses to think); and the same under the
                    controls (analysis/controls.py: no_thoughts, pause, shuffled_thoughts)
  teacher_nll       the teacher's per-token NLL of the same tokens: the gap the student starts from
  thoughts_per_100  non-text steps (thoughts, pauses, markers: the extra compute) per 100 real tokens of the
                    student's own continuations; after_thought_per_100: the share (%) of true-continuation
                    tokens right after a non-text step
  placement         where do thoughts go: for every true-continuation token, whether a
                    thought step came right before it, against its surprisal under the teacher and under the
                    student without thoughts: mean surprisal after a thought and not, Spearman's rank
                    correlation, and the thought rate per surprisal decile (the report's figure); with free
                    placement over thinking tokens also the propensity, P(a thinking token) where the policy
                    decides whether to think before the token, which a greedy decode that never thinks hides
  rollouts          a few own continuations: every step (thoughts with their nearest text tokens), the
                    teacher's log-prob of each real token, the rollout's reward
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from thinktok.errors import UserError
from thinktok.models.thought_config import SamplingConfig
from thinktok.models.thought_modes import with_sampling
from thinktok.models.thoughts import StepOut, ThoughtMode
from thinktok.rl.recompute import recompute_logprobs
from thinktok.rl.rollout import Rollout
from thinktok.rl.sampler import sample

from .controls import CONTROLS, ModeWrapper, control_modes, derange, thought_inputs
from .render import step_records

BINS = 10  # surprisal deciles of the placement figure
SHOWN = 8  # annotated own continuations kept per arm


class ForceText(ModeWrapper):
    """Runs `inner` but makes row b's i-th text step its gold token `gold[b, i]`, with log pi_text(gold) (the
    plain text distribution of `mode`) as that step's log-prob; thought steps stay the policy's own."""

    counter = "text_fed"

    def __init__(self, inner, mode: ThoughtMode, gold: torch.Tensor):
        super().__init__(inner)
        self.mode, self.gold = mode, gold  # gold: (B, T) text ids, padded past each row's length
        # what the sampler reads: exactly T text steps; the inner mode keeps its own settings for its steps
        self.sampling = replace(inner.sampling, max_new_tokens=gold.shape[1], stop_at_eos=False)

    def step(self, logits, hidden, state, embed: nn.Embedding) -> StepOut:
        out = self.inner.step(logits, hidden, state, embed)
        real = (out.token >= 0) & (out.token < self.vocab.text_size)
        i = state.extra["text_fed"].clamp_max(self.gold.shape[1] - 1)
        gold = self.gold.gather(1, i[:, None])[:, 0]  # (B,)
        lp = self.mode.text_token_logprob(logits, gold)
        out.token = torch.where(real, gold, out.token)
        out.embeds = torch.where(real[:, None], embed(gold).to(out.embeds.dtype), out.embeds)
        out.logprob = torch.where(real, lp, out.logprob)
        state.extra["text_fed"] = state.extra["text_fed"] + real
        return out


def forced(model, runner, mode: ThoughtMode, prompts: list[list[int]],
           golds: list[list[int]]) -> list[Rollout]:
    """The gold continuations forced through `runner` (`mode` or a control over it): one rollout per prompt
    whose text steps are the gold tokens, log-probs log pi_text(gold_t | x, gold_<t, thoughts)."""
    width = max(len(g) for g in golds)
    gold = torch.tensor([g + [g[-1]] * (width - len(g)) for g in golds], device=model.device)
    return sample(model, ForceText(runner, mode, gold), prompts)


def token_table(r: Rollout, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A forced rollout's first n text tokens -> (n,) log-probs and (n,) bool: a thought step came right
    before the token (markers and pauses count: the step fed something other than text)."""
    real = r.is_text.nonzero()[:, 0][:n]
    before = torch.zeros(len(real), dtype=torch.bool)
    before[real > 0] = ~r.is_text[real[real > 0] - 1]
    return r.logprob[real], before


def propensity(model, mode: ThoughtMode, rollouts: list[Rollout], golds: list[list[int]]) -> torch.Tensor:
    """(N,) P(a thinking token) under the full softmax at temperature 1, at the step where the policy decides
    whether to think before each true token (the step right after the previous one): how much it wants to
    think there, whether or not the greedy decode did. For free placement over thinking tokens."""
    v = mode.vocab
    hidden = recompute_logprobs(model, mode, rollouts).hidden  # (B, S, D) at the position choosing each step
    logits = model.get_output_embeddings()(hidden).float()  # (B, S, V)
    p = torch.softmax(logits, -1)[..., v.think_start : v.think_start + v.num_thinking].sum(-1)  # (B, S)
    out = []
    for b, (r, g) in enumerate(zip(rollouts, golds)):
        real = r.is_text.nonzero()[:, 0][: len(g)]
        decide = torch.cat([real.new_zeros(1), real[:-1] + 1])
        out.append(p[b, decide.to(p.device)].cpu())
    return torch.cat(out)


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties given their mean rank (what Spearman's coefficient needs)."""
    order = x.argsort()
    r = torch.empty(len(x), dtype=torch.float64)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    _, inv = torch.unique(x, return_inverse=True)
    mean = torch.zeros(int(inv.max()) + 1, dtype=torch.float64).index_add_(0, inv, r) / torch.bincount(inv)
    return mean[inv]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman's rank correlation (Pearson's on tie-averaged ranks); None where either side is constant."""
    rx, ry = ranks(x.double()), ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = (rx.square().sum() * ry.square().sum()).sqrt()
    return None if den == 0 else float((rx * ry).sum() / den)


def placement(before: torch.Tensor, surprisal: torch.Tensor, wants: torch.Tensor | None = None) -> dict:
    """Thought-before-token flags (N,) against one surprisal (N,) in nats: mean surprisal after a thought and
    not (None where no such token), Spearman's rho, and per surprisal decile its mean surprisal and rate;
    with `wants` (N,), the propensity to think there: its rho against the surprisal and mean per decile."""
    def mean(x):
        return float(x.mean()) if len(x) else None

    # to 1e-4 nats: float32 log-softmaxes of equal logits differ in their last bits, which is no ranking
    key = surprisal.double().round(decimals=4)
    edges = torch.quantile(key, torch.arange(BINS + 1, dtype=torch.float64) / BINS)  # exact k/10 levels
    bins = torch.bucketize(key, edges[1:-1], right=True)  # (N,) in 0..BINS-1
    # ties are never split, so with many ties a bin holds more than a tenth and some bins are empty (dropped)
    deciles = [{"bin": b, "n": int((bins == b).sum()), "surprisal": mean(surprisal[bins == b]),
                "rate": mean(before[bins == b].float()),
                **({"propensity": mean(wants[bins == b])} if wants is not None else {})}
               for b in range(BINS) if (bins == b).any()]
    out = {"after_thought": mean(surprisal[before]), "after_text": mean(surprisal[~before]),
           "spearman": spearman(before.float(), key), "deciles": deciles}
    if wants is not None:
        out["spearman_propensity"] = spearman(wants.double(), key)
    return out


def continuation_ids(task, tokenizer, rows: list[dict], max_tokens: int) -> list[list[int]]:
    """The true continuation of each row as token ids, at most max_tokens of them."""
    return [tokenizer(task.target(row, "answer")).input_ids[:max_tokens] for row in rows]


def text_measures(policy, mode: ThoughtMode, task, rows: list[dict], teacher, batch_size: int = 32,
                  max_tokens: int = 32, seed: int = 0) -> dict:
    """The measures in the module docstring for `rows` (held-out), `teacher` a models.teacher.Teacher."""
    from thinktok.rl.rewards import RewardConfig, RewardModel

    model, tok = policy.model, policy.tokenizer
    prompts = [tok(r["prompt"]).input_ids for r in rows]
    golds = continuation_ids(task, tok, rows, max_tokens)
    if not all(golds):
        raise UserError(f"text measures: row {golds.index([])} has an empty continuation (max_tokens "
                        f"{max_tokens}): every row needs at least one true token to score")
    embed = model.get_input_embeddings()
    thinks = mode.cfg.mode != "none"

    # the true continuation, forced, under the policy's own thoughts and then each control (deranged over
    # all rows, as evaluate.py does: a one-row last batch would otherwise replay its own thoughts)
    def batches():
        return ((lo, prompts[lo : lo + batch_size], golds[lo : lo + batch_size])
                for lo in range(0, len(rows), batch_size))

    own_thoughts = [r for _, p, g in batches() for r in forced(model, mode, mode, p, g)]
    runs: dict[str, list[Rollout]] = {"thoughts": own_thoughts}
    if thinks:
        shuffled = derange(thought_inputs(own_thoughts, mode, embed))
        runs.update({name: [] for name in CONTROLS})
        for lo, p, g in batches():
            for name, control in control_modes(mode, shuffled[lo : lo + len(p)], embed).items():
                runs[name] += forced(model, control, mode, p, g)
    free = mode.cfg.mode in ("vocab", "single") and not mode.cfg.slots and mode.vocab.num_thinking > 0
    wants = torch.cat([propensity(model, mode, own_thoughts[lo : lo + len(p)], g)
                       for lo, p, g in batches()]) if free else None
    tables = {name: [token_table(r, len(g)) for r, g in zip(rs, golds)] for name, rs in runs.items()}
    nll = {name: -float(torch.cat([lp for lp, _ in t]).mean()) for name, t in tables.items()}
    before = torch.cat([b for _, b in tables["thoughts"]])
    q = teacher.token_logprobs([p + g for p, g in zip(prompts, golds)], [len(p) for p in prompts])
    surprisal_teacher = -torch.cat(q).float()
    plain = tables["no_thoughts" if thinks else "thoughts"]
    surprisal_student = -torch.cat([lp for lp, _ in plain]).float()

    # the student's own continuations, sampled as RL samples them (temperature 1, no filter) and scored as
    # the teacher_kl reward scores them
    sampler = with_sampling(mode, SamplingConfig(max_new_tokens=max_tokens, temperature=1.0), model.device)
    reward = RewardModel(RewardConfig(weights={"teacher_kl": 1.0}), teacher=teacher, policy=model,
                         mode=sampler)
    own, kl = [], []
    for lo in range(0, len(rows), batch_size):
        batch = sample(model, sampler, prompts[lo : lo + batch_size], seed=seed + lo)
        kl.append(-reward.score(batch).parts["teacher_kl"])  # (B,) per-token KL of each rollout
        own += batch
    kl = torch.cat(kl)
    # pooled over tokens (the reward is a per-rollout mean): per-rollout means would weigh the tokens of
    # rollouts cut short by an early EOS more, and the stop depends on what was sampled
    lengths = torch.tensor([r.num_text for r in own], dtype=torch.float)
    shown = own[:SHOWN]
    q_shown = teacher.token_logprobs([r.text_view for r in shown], [len(r.prompt_ids) for r in shown])
    return {
        "num_examples": len(rows),
        "reverse_kl": float((kl * lengths).sum() / lengths.sum().clamp_min(1)),
        "nll": nll["thoughts"],
        "controls": {name: {"nll": nll[name]} for name in CONTROLS if name in nll},
        "teacher_nll": float(surprisal_teacher.mean()),
        "thoughts_per_100": 100 * sum(r.num_thought for r in own) / max(int(lengths.sum()), 1),
        "after_thought_per_100": 100 * int(before.sum()) / max(len(before), 1),
        "placement": {"teacher": placement(before, surprisal_teacher, wants),
                      "student": placement(before, surprisal_student, wants), "num_tokens": len(before),
                      "propensity": None if wants is None else float(wants.mean()), "free": free},
        "rollouts": [annotate(r, tok, embed.weight, lp, -float(k)) for r, lp, k in zip(shown, q_shown, kl)],
    }


def annotate(r: Rollout, tokenizer, embedding: torch.Tensor, teacher_lp: torch.Tensor, reward: float) -> dict:
    """One own continuation for the report: its steps, each real one with the teacher's log-prob."""
    steps, lp = step_records(r, tokenizer, embedding), iter(teacher_lp.tolist())
    for s in steps:
        if s["kind"] == "text":
            s["teacher_logprob"] = next(lp)
    return {"prompt": tokenizer.decode(r.prompt_ids), "steps": steps, "reward": reward,
            "num_text": r.num_text, "num_thought": r.num_thought}

