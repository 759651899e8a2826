"""The one teacher-forced recompute of finished rollouts: the per-step log-probs (and entropies) the learner
trains on, the text distributions the KL reads, and the text log-probs the rewards and the latent term
score."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from thinktok.models.head import head_logits
from thinktok.models.thoughts import Action, ThoughtMode

from .rollout import Rollout, with_gold

if TYPE_CHECKING:  # transformers' modeling module imports torch._dynamo, and with it Triton
    from transformers import PreTrainedModel


def step_inputs(r: Rollout, embed: nn.Embedding) -> torch.Tensor:
    """The input embedding each step fed the model: (S, D). Differentiable in the embedding table."""
    device, dtype = embed.weight.device, embed.weight.dtype
    token = r.token.to(device)
    out = embed(token.clamp_min(0))
    if r.vector is not None:
        vec = (r.action == Action.VECTOR).to(device)
        out = torch.where(vec[:, None], r.vector.to(device, dtype), out)
    if r.soft_ids is not None:
        soft = (r.action == Action.SOFT).to(device)
        mix = torch.einsum("sk,skd->sd", r.soft_w.to(device), embed(r.soft_ids.to(device)).float()).to(dtype)
        out = torch.where(soft[:, None], mix, out)
    return out


def recompute_inputs(rollouts: list[Rollout], embed: nn.Embedding) -> tuple[torch.Tensor, torch.Tensor]:
    """What the recompute feeds: (B, W, D) input embeddings, each rollout's prompt then every step's input
    but the last, right-padded (true positions as sampled), and the (B, W) attention mask. One embedding
    lookup for the batch (and one for soft mixtures): each lookup's backward writes a dense (V, D) gradient,
    and one per rollout cost more than the rest of the step."""
    device, dtype = embed.weight.device, embed.weight.dtype

    def padded(parts):  # per rollout: (prompt part, step part) -> (B, W, ...) right-padded with zeros
        return pad_sequence([torch.cat([a, b]) for a, b in parts], batch_first=True).to(device)

    ids = padded([(torch.tensor(r.prompt_ids), r.token[:-1].clamp_min(0)) for r in rollouts])  # (B, W)
    mask = padded([(torch.ones(len(r.prompt_ids), dtype=torch.long),
                    torch.ones(r.num_steps - 1, dtype=torch.long)) for r in rollouts])
    inputs = embed(ids)

    def at_steps(action: Action) -> torch.Tensor:  # (B, W) bool: positions fed by steps of `action`
        return padded([(torch.zeros(len(r.prompt_ids), dtype=torch.bool), r.action[:-1] == action)
                       for r in rollouts])

    if rollouts[0].vector is not None:
        vec = padded([(torch.zeros(len(r.prompt_ids), r.vector.shape[1]), r.vector[:-1]) for r in rollouts])
        inputs = torch.where(at_steps(Action.VECTOR)[..., None], vec.to(dtype), inputs)
    if rollouts[0].soft_ids is not None:
        k = rollouts[0].soft_ids.shape[1]
        soft_ids = padded([(torch.zeros(len(r.prompt_ids), k, dtype=torch.long), r.soft_ids[:-1])
                           for r in rollouts])
        soft_w = padded([(torch.zeros(len(r.prompt_ids), k), r.soft_w[:-1]) for r in rollouts])
        mix = torch.einsum("bwk,bwkd->bwd", soft_w, embed(soft_ids).float()).to(dtype)
        inputs = torch.where(at_steps(Action.SOFT)[..., None], mix, inputs)
    return inputs, mask


class Recomputed(NamedTuple):
    logprob: torch.Tensor  # (B, S_max) per-step log-probs, 0 past each rollout's end
    valid: torch.Tensor  # (B, S_max) bool
    entropy: torch.Tensor | None  # (B, S_max) entropy of the token distribution at token steps, 0 elsewhere
    hidden: torch.Tensor  # (B, S_max, D) last hidden state at the position that chose each step
    # with text=True: (N_text, n_text) log-softmax of the plain text distribution (temperature 1, no filter,
    # over the head's text columns) at every text step, rollouts in order (what the KL term reads); else None
    text_logp: torch.Tensor | None = None


def choosing_hidden(model: PreTrainedModel, rollouts: list[Rollout]) -> torch.Tensor:
    """(N, D): the last hidden state at the position that chose each step (every step of every rollout, in
    order), from one teacher-forced forward (no cache). `model` may be a DDP/accelerate wrapper: its forward
    is called, so that a data-parallel backward reduces."""
    core = model.module if hasattr(model, "module") else model
    inputs, mask = recompute_inputs(rollouts, core.get_input_embeddings())
    # logits_to_keep=1: the LM head's own (full-width) logits at one position only; ours come from the hidden
    out = model(inputs_embeds=inputs, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
    # the position that chose step s of rollout b is P_b - 1 + s
    rows = torch.cat([torch.full((r.num_steps,), i) for i, r in enumerate(rollouts)]).to(core.device)
    cols = torch.cat([len(r.prompt_ids) - 1 + torch.arange(r.num_steps) for r in rollouts]).to(core.device)
    return out.hidden_states[-1][rows, cols]


def recompute_logprobs(model: PreTrainedModel, mode: ThoughtMode, rollouts: list[Rollout],
                       text: bool = False, entropy: bool = True) -> Recomputed:
    """One teacher-forced forward over finished rollouts -> per-step log-probs (and entropies; with text,
    the text distributions at text steps). Differentiable: this is what the learner trains on. The head runs
    at the positions that chose a step only, over its own columns."""
    core = model.module if hasattr(model, "module") else model
    device = core.device
    h = choosing_hidden(model, rollouts)  # (N, D)
    logits = head_logits(core, h)  # (N, K)
    rows = torch.cat([torch.full((r.num_steps,), i) for i, r in enumerate(rollouts)]).to(device)

    def cat(name):  # one field of every rollout, concatenated over steps
        if getattr(rollouts[0], name) is None:
            return None
        return torch.cat([getattr(r, name) for r in rollouts]).to(device)

    lp, ent = mode.action_logprobs(cat("action"), cat("token"), logits, h, cat("vector"), cat("soft_ids"),
                                   cat("soft_w"), with_entropy=True) if entropy else (
        mode.action_logprobs(cat("action"), cat("token"), logits, h, cat("vector"), cat("soft_ids"),
                             cat("soft_w")), None)
    steps = max(r.num_steps for r in rollouts)
    step_idx = torch.cat([torch.arange(r.num_steps) for r in rollouts]).to(device)

    def grid(x):  # (N, ...) per step -> (B, S_max, ...), zeros past each rollout's end
        return torch.zeros(len(rollouts), steps, *x.shape[1:], device=device, dtype=x.dtype).index_put(
            (rows, step_idx), x)

    text_logp = mode.text_logprobs(logits[cat("is_text")]) if text else None
    return Recomputed(grid(lp), grid(torch.ones_like(lp, dtype=torch.bool)),
                      None if ent is None else grid(ent), grid(h), text_logp)


def own_text_logprobs(model: PreTrainedModel, mode: ThoughtMode,
                      rollouts: list[Rollout]) -> list[torch.Tensor]:
    """log pi_text(y_t | x, y_<t, thoughts) of each rollout's own text tokens under the plain text
    distribution (text columns renormalised, temperature 1, no top-k/top-p): one (num_text,) tensor per
    rollout, differentiable. The head runs at the text steps only."""
    core = model.module if hasattr(model, "module") else model
    real = torch.cat([r.is_text for r in rollouts]).to(core.device)
    logits = head_logits(core, choosing_hidden(model, rollouts)[real])  # (N_text, K)
    ids = torch.cat([r.token[r.is_text] for r in rollouts]).to(core.device)
    return list(mode.text_token_logprob(logits, ids).split([r.num_text for r in rollouts]))


def text_token_logprobs(model: PreTrainedModel, mode: ThoughtMode,
                        rollouts: list[Rollout]) -> list[torch.Tensor]:
    """`own_text_logprobs` without gradients, on the CPU: what the rewards read."""
    with torch.no_grad():
        return [lp.cpu() for lp in own_text_logprobs(model, mode, rollouts)]


def gold_answer_loglik(model: PreTrainedModel, mode: ThoughtMode, rollouts: list[Rollout], gold: list,
                       thoughts: bool = True) -> torch.Tensor:
    """(B,) (1/|y*|) sum_t log pi_text(y*_t | x, z_open, y*_<t): each rollout's gold answer ids (`gold`, one
    sequence per rollout) after its prompt and opening thought steps (none with thoughts=False), in the
    layout of `with_gold`, under the plain text distribution. The one scoring of the gold answer: the
    gold_loglik and thought_gain rewards (under no_grad) and the learner's latent term (differentiable)."""
    forced = [with_gold(r, torch.as_tensor(g), mode.cfg.every, thoughts) for r, g in zip(rollouts, gold)]
    return torch.stack([lp.mean() for lp in own_text_logprobs(model, mode, forced)])
