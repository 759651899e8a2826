"""The thought modes, one class each, behind the interface of thoughts.py (`ThoughtMode`): what a decoding
step feeds the model, what it samples and when thinking stops. `make_mode` picks the class for a config.

  VocabThoughts       vocab / single / none: thinking tokens compete with text; the policy decides when
  PauseThoughts       pause: k thinking tokens inserted by rule (after the prompt or before every text token)
  SlotThoughts        vocab with slots: the pause schedule, each slot's token sampled from the thinking
                      columns
  ContinuousThoughts  continuous (Coconut): the last hidden state fed back, Gaussian exploration
  SoftThoughts        soft (Soft Thinking): embedding mixtures over the top-k text tokens, noise, cold stop
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Dirichlet, Normal

from thinktok.errors import UserError

from .thought_config import SamplingConfig, ThoughtConfig
from .thoughts import Action, StepOut, ThoughtMode, inverse_cdf, select
from .vocab import ThinkingVocab


class VocabThoughts(ThoughtMode):
    """`vocab` / `single`: thinking tokens compete with text in one softmax; the policy decides when to
    think."""

    def step(self, logits, hidden, state, embed):
        allow = state.n_thought < self.cfg.max_thought_tokens
        tok, lp = self.sample_token(logits, allow)
        state.n_thought += self.vocab.is_thought(tok)
        action = torch.where(allow, Action.FREE, Action.TEXT)
        return StepOut(action, tok, embed(tok), lp)


class PauseThoughts(ThoughtMode):
    """`pause`: k thought tokens inserted by rule (after the prompt, or before every text token); slot j
    uses `<think{j mod N}>`, so N=1 is one shared embedding and N=k gives k distinct ones."""

    @property
    def count(self) -> int:
        return self.cfg.num_pause

    def init_state(self, batch, device):
        state = super().init_state(batch, device)
        state.phase.fill_(self.count)  # thought steps left to insert
        return state

    def slot(self, logits, state, embed) -> StepOut:
        return self.forced(self.vocab.think_start + state.run % self.vocab.num_thinking, embed)

    def step(self, logits, hidden, state, embed):
        pausing = state.phase > 0
        every = self.cfg.every
        # the text token is sampled on every step (see MarkedThoughts.step)
        out = select(pausing, self.slot(logits, state, embed), self.text_step(logits, embed))
        state.n_thought += pausing
        state.run = torch.where(pausing, state.run + 1, 0 if every else state.run)
        state.phase = torch.where(pausing, state.phase - 1, self.count if every else 0)
        return out

    def max_thought_steps(self, max_new_tokens):
        return self.count * (max_new_tokens if self.cfg.every else 1)


class SlotThoughts(PauseThoughts):
    """`vocab` with `slots` k > 0: the pause schedule (k steps after the prompt, or before every text token),
    each slot a thinking token the policy samples from the thinking columns alone (Action.THINK): it chooses
    what to think, never whether."""

    @property
    def count(self) -> int:
        return self.cfg.slots

    def slot(self, logits, state, embed):
        lp = self.think_logprobs(logits)
        idx = lp.argmax(-1, keepdim=True) if self.sampling.greedy else inverse_cdf(lp.exp())
        tok = self.vocab.think_start + idx[:, 0]
        return StepOut(torch.full_like(tok, Action.THINK), tok, embed(tok), lp.gather(1, idx)[:, 0])


class MarkedThoughts(ThoughtMode):
    """Modes whose thoughts sit between `<bot>` and `<eot>` right after the prompt (as in Coconut):
    phase 0 emits `<bot>`, phase 1 thinks until the subclass says stop, phase 2 decodes text."""

    def thought(self, logits, hidden, state, embed) -> tuple[StepOut, torch.Tensor]:
        """The thinking-phase step and whether it ends thinking, (B,) bool."""
        raise NotImplementedError

    def step(self, logits, hidden, state, embed):
        # Every branch runs on every step, whatever phase the rows are in: no host sync (`.any()`) decides the
        # work, so the step can be compiled and captured as a CUDA graph, and the random stream a seed gives
        # is the same on the dynamic and the static/compiled path (a skipped branch would draw nothing).
        thinking = state.phase == 1
        think, ends = self.thought(logits, hidden, state, embed)
        out = select(thinking, think, self.forced(torch.full_like(state.phase, self.vocab.bot_id), embed))
        out = select(state.phase == 2, self.text_step(logits, embed), out)
        state.n_thought += state.phase < 2
        state.phase = torch.where(thinking & ends, 2, torch.where(state.phase == 0, 1, state.phase))
        return out


class ContinuousThoughts(MarkedThoughts):
    """`continuous` (Coconut): the thought fed next is x = h + sigma * eps, h the last hidden state.
    Stops after exactly `max_thought_tokens` (or `slots`) thoughts, or (learned_stop) when the policy samples
    <eot>."""

    def __init__(self, cfg, vocab, sampling, columns=None):
        super().__init__(cfg, vocab, sampling, columns)
        self.log_sigma = nn.Parameter(torch.tensor(math.log(cfg.sigma) if cfg.sigma > 0 else 0.0),
                                      requires_grad=cfg.learn_sigma)

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def vector_logprob(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Gaussian density of continuous action x around hidden state h: (N,), the mean over the D
        dimensions (density_scale=per_dim) or their sum (joint)."""
        if self.cfg.sigma == 0:
            return torch.zeros(x.shape[0], device=x.device)
        lp = Normal(h.float(), self.sigma).log_prob(x.float())
        return lp.mean(-1) if self.cfg.density_scale == "per_dim" else lp.sum(-1)

    def thought(self, logits, hidden, state, embed):
        eot = torch.full_like(state.phase, self.vocab.eot_id)
        h = hidden.float()
        explore = self.cfg.sigma > 0 and not self.sampling.greedy
        x = h + self.sigma.detach() * torch.randn_like(h) if explore else h
        lp = self.vector_logprob(x, h)
        vec = StepOut(torch.full_like(eot, Action.VECTOR), torch.full_like(eot, -1), x.to(hidden.dtype), lp,
                      vector=x)
        budget_left = state.n_thought - 1 < self.cfg.budget  # n_thought counts <bot>
        if not self.cfg.learned_stop:
            return select(budget_left, vec, self.forced(eot, embed)), ~budget_left
        stop_lp, cont_lp = self.stop_logprobs(logits)
        stop = (stop_lp.exp() > 0.5) if self.sampling.greedy else torch.rand(
            stop_lp.shape, device=logits.device) < stop_lp.exp()
        vec.logprob = lp + cont_lp
        chosen = StepOut(torch.full_like(eot, Action.STOP), eot, embed(eot), stop_lp)
        out = select(budget_left, select(stop, chosen, vec), self.forced(eot, embed))
        return out, stop | ~budget_left


class SoftThoughts(MarkedThoughts):
    """`soft` (Soft Thinking): the thought fed next is sum_k w_k E[id_k] over the top-k text tokens, w the
    renormalised probabilities, optionally randomised (Gumbel-softmax or Dirichlet). Cold stop: <eot> once
    the entropy stays under a threshold for `cold_stop_steps` consecutive steps, or at the budget; with
    `slots` no cold stop: exactly `slots` thoughts."""

    def thought(self, logits, hidden, state, embed):
        v, cfg = self.vocab, self.cfg
        k = cfg.soft_top_k or self.n_text
        cols = logits[:, : self.n_text].topk(k, dim=-1).indices  # (B, k) text columns
        p = self.soft_probs(logits, cols)
        ids = self.token_of(cols)
        if self.sampling.greedy or cfg.noise == "none":
            w = p
        elif cfg.noise == "gumbel":  # the distribution whose density soft_logprob scores
            w = self.gumbel(p).sample()
        elif cfg.noise == "dirichlet":
            w = Dirichlet(self.concentration(p)).sample()
        # A weight that underflows to 0 has density log 0; keep every weight positive (renormalised),
        # the recorded w is what both sampler and recompute score.
        w = w.clamp_min(1e-20)
        w = w / w.sum(-1, keepdim=True)
        mix = torch.einsum("bk,bkd->bd", w, embed(ids).float()).to(embed.weight.dtype)
        eot = torch.full_like(state.phase, v.eot_id)
        soft = StepOut(torch.full_like(eot, Action.SOFT), torch.full_like(eot, -1), mix,
                       self.soft_logprob(p, w), soft_ids=ids, soft_w=w)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
        thinking = state.phase == 1
        state.run = torch.where(thinking & (entropy < cfg.cold_stop_entropy), state.run + 1, 0)
        cold = (state.run >= cfg.cold_stop_steps) if not cfg.slots else torch.zeros_like(thinking)
        stop = cold | (state.n_thought - 1 >= cfg.budget)
        return select(stop, self.forced(eot, embed), soft), stop


def make_mode(cfg: ThoughtConfig, vocab: ThinkingVocab, sampling: SamplingConfig,
              columns: torch.Tensor | None = None) -> ThoughtMode:
    """columns: the head's (`head_columns(model)` of the model the mode samples from; None = a full head)."""
    cfg.validate()
    cls = {"none": VocabThoughts, "vocab": SlotThoughts if cfg.slots else VocabThoughts,
           "single": VocabThoughts, "pause": PauseThoughts,
           "continuous": ContinuousThoughts, "soft": SoftThoughts}[cfg.mode]
    if cfg.vocab_tokens != vocab.num_thinking or cfg.markers != vocab.markers:
        raise UserError(f"mode {cfg.mode} needs {cfg.vocab_tokens} thinking tokens (markers={cfg.markers}); "
                         f"the model's vocabulary has {vocab.num_thinking} (markers={vocab.markers})")
    return cls(cfg, vocab, sampling, columns)


def with_sampling(mode: ThoughtMode, sampling: SamplingConfig, device) -> ThoughtMode:
    """The same mode, its learned parameters (a continuous mode's sigma) included, under other sampling
    settings: pass@k and the text measures sample at temperature 1 from a mode evaluated greedily."""
    out = type(mode)(mode.cfg, mode.vocab, sampling, mode.columns).to(device)
    out.load_state_dict(mode.state_dict())
    return out
