"""Thought modes behind one interface.

A mode answers three questions for the rollout engine, one decoding step at a time:
  * what input embedding the step feeds the model next,
  * what the *action* is and its log-probability under the policy (what RL differentiates),
  * when thinking starts and stops.

Every step records an `Action` code. The recompute path (`action_logprobs`) turns a code plus the
logits/hidden state at that position back into the log-prob, with the same functions the sampler used,
so the sampler's numbers and the learner's teacher-forced numbers agree by construction.

Here: the action codes, the base class with the distributions both sides share, and the
text step. The modes themselves (and `make_mode`) are in thought_modes.py: `none` (plain text decoding:
base models and teachers), `vocab` (N discrete thinking tokens the policy may emit anywhere, or fill fixed
slots with), `single` (vocab with one shared token), `continuous` (Coconut: last hidden state fed back,
Gaussian exploration), `soft` (Soft Thinking: probability-weighted embedding mixtures, Gumbel/Dirichlet
noise, cold stop), `pause` (fixed insertion, no sampling).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Dirichlet, RelaxedOneHotCategorical
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from thinktok.errors import UserError

from .thought_config import SamplingConfig, ThoughtConfig
from .vocab import ThinkingVocab


class Action(IntEnum):
    FORCED = 0  # inserted by rule (<bot>, <eot>, pause tokens): no choice, log-prob 0
    TEXT = 1  # token sampled with the thinking tokens masked out
    FREE = 2  # free placement: a token from text + thinking tokens (vocab mode under its thought budget)
    VECTOR = 3  # continuous thought x ~ N(h, sigma^2 I)  (+ log P(continue) with a learned stop)
    STOP = 4  # learned stop: <eot> chosen with probability P(<eot>)
    SOFT = 5  # soft thought: mixture weights w over top-k token ids
    THINK = 6  # fixed slot: a thinking token sampled from the thinking columns alone (vocab with slots > 0)


def entropy_of(logp: torch.Tensor) -> torch.Tensor:
    """(N, K) log-probs, -inf at banned columns -> (N,) entropies -sum p log p whose gradient stays finite
    there: entr(p) and p * log p both back-propagate inf x 0 = NaN at p = 0, which an entropy bonus would
    spread to every weight."""
    return -(logp.exp() * torch.where(torch.isfinite(logp), logp, 0.0)).sum(-1)


@dataclass
class StepOut:
    """One decoding step for a batch of B sequences."""

    action: torch.Tensor  # (B,) Action codes
    token: torch.Tensor  # (B,) token id, -1 for vector/soft steps
    embeds: torch.Tensor  # (B, D) input embedding fed next
    logprob: torch.Tensor  # (B,) log-prob of the action (0 for forced steps)
    vector: torch.Tensor | None = None  # (B, D) continuous action x
    soft_ids: torch.Tensor | None = None  # (B, k)
    soft_w: torch.Tensor | None = None  # (B, k)


@dataclass
class State:
    """Per-sequence counters the modes keep while sampling; all (B,) tensors."""

    n_thought: torch.Tensor
    phase: torch.Tensor  # continuous/soft: 0 before <bot>, 1 thinking, 2 text; pause: pauses left to insert
    run: torch.Tensor  # soft: consecutive low-entropy steps; pause: index of the next pause slot
    extra: dict = field(default_factory=dict)


class ThoughtMode(nn.Module):
    """Shared distributions (used by both `step` and `action_logprobs`) and the discrete text step."""

    def __init__(self, cfg: ThoughtConfig, vocab: ThinkingVocab, sampling: SamplingConfig,
                 columns: torch.Tensor | None = None):
        """columns: (K,) the token id of each logit column the model's head gives (`head_columns`, ascending:
        text ids, then every thinking token and marker); None = every vocabulary id (a full head)."""
        super().__init__()
        cfg.validate()
        sampling.validate()
        self.cfg, self.vocab, self.sampling = cfg, vocab, sampling
        cols = torch.arange(vocab.size) if columns is None else torch.as_tensor(columns).cpu()
        if len(cols) < vocab.size - vocab.text_size or not torch.equal(
                cols[len(cols) - (vocab.size - vocab.text_size):], torch.arange(vocab.text_size, vocab.size)):
            raise UserError(f"the head's columns must end with every thinking token and marker (ids "
                            f"{vocab.text_size}..{vocab.size - 1}); got {cols[-4:].tolist()}")
        # the column layout: the n_text text columns first, then the thinking tokens, then the markers
        self.n_text = len(cols) - (vocab.size - vocab.text_size)
        self.think_col = self.n_text  # the column of <think0>
        self.eot_col = None if vocab.eot_id is None else vocab.eot_id - vocab.text_size + self.n_text
        self.full = len(cols) == vocab.size  # columns are token ids: no mapping at the edges
        self.register_buffer("columns", cols, persistent=False)
        k = torch.arange(len(cols))
        # column masks, built once (the token step runs every decoding step)
        self.register_buffer("think_cols", (k >= self.n_text) & (k < self.n_text + vocab.num_thinking),
                             persistent=False)
        self.register_buffer("marker_cols", k >= self.n_text + vocab.num_thinking, persistent=False)
        self.register_buffer("gumbel_tau", torch.tensor(cfg.gumbel_tau), persistent=False)
        self.warpers = [w for w in (TopKLogitsWarper(sampling.top_k) if sampling.top_k else None,
                                    TopPLogitsWarper(sampling.top_p) if sampling.top_p < 1 else None) if w]

    # ---- ids at the edges ----------------------------------------------------------------------
    def token_of(self, col: torch.Tensor) -> torch.Tensor:
        """Column indices -> token ids."""
        return col if self.full else self.columns[col]

    def column_of(self, token: torch.Tensor) -> torch.Tensor:
        """Token ids (every one in the head) -> column indices. An id outside the head is an error: its
        log-prob would be -inf."""
        if self.full:
            return token
        col = torch.searchsorted(self.columns, token).clamp_max(len(self.columns) - 1)
        outside = self.columns[col] != token
        if outside.any():
            raise UserError(f"token id {token[outside][0].item()} is outside the model's task head: the head "
                            "was built from other data than these rollouts")
        return col

    def check_width(self, logits: torch.Tensor) -> None:
        if logits.shape[-1] != len(self.columns):
            raise UserError(f"the model's head gives {logits.shape[-1]} logit columns but this thought mode "
                            f"was built for {len(self.columns)}: build it with make_mode(..., "
                            "head_columns(model)) for the model it samples from")

    # ---- distributions -------------------------------------------------------------------------
    def token_logprobs(self, logits: torch.Tensor, allow_think: torch.Tensor,
                       keep: torch.Tensor | None = None) -> torch.Tensor:
        """(N, K) logits, (N,) bool -> (N, K) log-probs of the sampling distribution for a token step.

        keep (N,): columns the top-k/top-p filter never removes. The recompute passes the recorded tokens: a
        logit that differs from the sampler's in the last bit can move a sampled token just past the
        filter's edge, which would make its log-prob -inf and abort the step."""
        logits = logits.float() / self.sampling.temperature
        banned = self.marker_cols[None, :] | (self.think_cols[None, :] & ~allow_think[:, None])
        logits = logits.masked_fill(banned, float("-inf"))
        unfiltered = logits
        for warp in self.warpers:
            logits = warp(None, logits)
        if keep is not None and self.warpers:
            logits = logits.scatter(1, keep[:, None], unfiltered.gather(1, keep[:, None]))
        return F.log_softmax(logits, dim=-1)

    def think_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, K) -> (N, num_thinking): a fixed slot's distribution, the thinking columns alone at the
        sampling temperature (no top-k/top-p: N is small and every thinking token stays reachable)."""
        return F.log_softmax(logits[:, self.think_col : self.think_col + self.vocab.num_thinking].float()
                             / self.sampling.temperature, dim=-1)

    def text_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, K) -> (N, n_text): the plain text distribution (text columns only, temperature 1, no filter).
        What rewards score text with, whatever the sampling settings (`text_token_logprob`: one token's)."""
        return F.log_softmax(logits[:, : self.n_text].float(), dim=-1)

    def text_token_logprob(self, logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """(N, K) logits, (N,) text token ids -> (N,) their `text_logprobs`, as a gather minus a logsumexp
        (no (N, n_text) log-softmax written)."""
        text = logits[:, : self.n_text].float()
        return text.gather(1, self.column_of(token)[:, None])[:, 0] - torch.logsumexp(text, -1)

    def stop_logprobs(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Learned stop: (log P(<eot>), log P(not <eot>)) under the full softmax, each (N,)."""
        lse = torch.logsumexp(logits.float(), -1)
        eot = self.eot_col
        rest = torch.cat([logits[:, :eot], logits[:, eot + 1 :]], -1).float()
        return logits[:, eot].float() - lse, torch.logsumexp(rest, -1) - lse

    def soft_probs(self, logits: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Renormalised mixture distribution over the chosen columns: (N, K), (N, k) -> (N, k)."""
        return F.softmax(logits.float().gather(-1, cols) / self.cfg.soft_temperature, dim=-1)

    def soft_logprob(self, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Density of the mixture weights w given the clean probabilities p, both (N, k): (N,).
        Per dimension of the simplex (k - 1) unless density_scale=joint."""
        scale = max(p.shape[-1] - 1, 1) if self.cfg.density_scale == "per_dim" else 1
        if self.cfg.noise == "gumbel":
            return self.gumbel(p).log_prob(w) / scale
        if self.cfg.noise == "dirichlet":
            return Dirichlet(self.concentration(p)).log_prob(w) / scale
        return torch.zeros(p.shape[0], device=p.device)

    def gumbel(self, p: torch.Tensor) -> RelaxedOneHotCategorical:
        """The Gumbel-softmax (Concrete) distribution of mixture weights around probabilities p (N, k): the
        sampler draws from it and the recompute scores with it."""
        return RelaxedOneHotCategorical(self.gumbel_tau, probs=p, validate_args=False)

    def concentration(self, p: torch.Tensor) -> torch.Tensor:
        # floor: a zero concentration is not a Dirichlet; tiny probabilities still get a proper density
        return (self.cfg.dirichlet_alpha * p).clamp_min(1e-3)

    def action_logprobs(self, action, token, logits, hidden, vector=None, soft_ids=None, soft_w=None,
                        with_entropy=False):
        """Recompute: log-prob of N recorded steps from the logits/hidden at the positions that chose them.

        action, token: (N,) (token ids); logits: (N, K) over the head's columns; hidden: (N, D); vector:
        (N, D); soft_ids, soft_w: (N, k). Differentiable in logits and hidden (and sigma when learned).
        with_entropy: also return (N,) entropy of the token distribution at token steps (0 at vector/soft
        steps), for the learner's logs.
        """
        self.check_width(logits)
        out = torch.zeros(action.shape[0], device=logits.device)
        entropy = torch.zeros_like(out)
        tok = (action == Action.TEXT) | (action == Action.FREE)
        if tok.any():
            col = self.column_of(token[tok])
            lp = self.token_logprobs(logits[tok], action[tok] == Action.FREE, keep=col)
            out = out.index_put((tok.nonzero()[:, 0],), lp.gather(1, col[:, None])[:, 0])
            if with_entropy:
                entropy = entropy.index_put((tok.nonzero()[:, 0],), entropy_of(lp))
        slot = action == Action.THINK
        if slot.any():
            lp = self.think_logprobs(logits[slot])
            picked = lp.gather(1, (token[slot] - self.vocab.think_start)[:, None])[:, 0]
            out = out.index_put((slot.nonzero()[:, 0],), picked)
            if with_entropy:
                entropy = entropy.index_put((slot.nonzero()[:, 0],), entropy_of(lp))
        if self.vocab.markers and self.cfg.learned_stop:
            stop_lp, cont_lp = self.stop_logprobs(logits)
            out = out + torch.where(action == Action.STOP, stop_lp, 0) + torch.where(
                action == Action.VECTOR, cont_lp, 0)
        vec = action == Action.VECTOR
        if vec.any():  # only ContinuousThoughts records vector actions
            out = out.index_put((vec.nonzero()[:, 0],), self.vector_logprob(vector[vec], hidden[vec]),
                                accumulate=True)
        soft = action == Action.SOFT
        if soft.any():
            p = self.soft_probs(logits[soft], self.column_of(soft_ids[soft]))
            out = out.index_put((soft.nonzero()[:, 0],), self.soft_logprob(p, soft_w[soft]))
        return (out, entropy) if with_entropy else out

    # ---- sampling ------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device) -> State:
        z = torch.zeros(batch, dtype=torch.long, device=device)
        return State(n_thought=z.clone(), phase=z.clone(), run=z.clone())

    def sample_token(self, logits: torch.Tensor, allow_think: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor]:
        """(B, K) -> sampled token ids (B,) and their log-probs (B,)."""
        self.check_width(logits)
        lp = self.token_logprobs(logits, allow_think)
        col = lp.argmax(-1, keepdim=True) if self.sampling.greedy else inverse_cdf(lp.exp())
        return self.token_of(col[:, 0]), lp.gather(1, col)[:, 0]

    def text_step(self, logits: torch.Tensor, embed: nn.Embedding) -> StepOut:
        """A text token sampled with the thinking tokens masked out, for every row."""
        tok, lp = self.sample_token(logits,
                                    torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device))
        return StepOut(torch.full_like(tok, Action.TEXT), tok, embed(tok), lp)

    def forced(self, token: torch.Tensor, embed: nn.Embedding) -> StepOut:
        return StepOut(torch.full_like(token, Action.FORCED), token, embed(token),
                       torch.zeros(token.shape, device=token.device))

    def step(self, logits: torch.Tensor, hidden: torch.Tensor, state: State, embed: nn.Embedding) -> StepOut:
        raise NotImplementedError

    def max_thought_steps(self, max_new_tokens: int) -> int:
        """Upper bound on thought steps (markers included) in one rollout: sizes the decoding loop."""
        return self.cfg.budget + 2 * self.vocab.markers


def inverse_cdf(p: torch.Tensor) -> torch.Tensor:
    """(N, K) probabilities -> (N, 1) sampled columns, from one uniform per row against the cumulative sum
    (fp64). torch.multinomial draws an exponential per entry: on a CPU that was most of a decoding step at
    V = 50k. Columns of probability 0 add nothing to the sum, so the draw is the same over any superset of the
    columns (a task head's K or all V) under the same uniform."""
    cdf = p.double().cumsum(-1)
    total = cdf[:, -1:]
    # the first id whose cumulative mass exceeds u * total: never a zero-probability id (u * total < total)
    u = torch.minimum(torch.rand_like(total) * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True)


def select(cond: torch.Tensor, a: StepOut, b: StepOut) -> StepOut:
    """Per sequence: a where cond, else b. Payload fields take whichever side has them."""
    def pick(x, y):
        return torch.where(cond.view(-1, *([1] * (x.dim() - 1))), x, y)

    def payload(x, y):
        return x if y is None else (y if x is None else pick(x, y))

    return StepOut(pick(a.action, b.action), pick(a.token, b.token), pick(a.embeds, b.embeds),
                   pick(a.logprob, b.logprob), payload(a.vector, b.vector), payload(a.soft_ids, b.soft_ids),
                   payload(a.soft_w, b.soft_w))
