"""The rollout engine: batched sampling with a KV cache for every thought mode, the `Rollout` record,
and the one teacher-forced recompute of a finished rollout's log-probs that the learner trains on.

Sequence layout of one rollout: prompt positions 0..P-1, then step s (s = 0..S-1) is the action chosen
from the model's output at position P-1+s; its input embedding is fed at position P+s.

Why here and not beside the thought modes in models/: this is the rollout stage of the RL data flow (its
records are what rewards score and the learner recomputes), while a mode is a per-step interface that knows
nothing of sequences, caches or batches; keeping the sampler out of models/ keeps that interface small.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from thinktok.errors import UserError
from thinktok.models.head import head_logits
from thinktok.models.thoughts import Action, StepOut, ThoughtMode

if TYPE_CHECKING:  # transformers' modeling module imports torch._dynamo, and with it Triton
    from transformers import PreTrainedModel


class ArraysWhenPickled:
    """Pickles (between Ray actors, and in inline workers' copies) with every tensor field, or list of
    tensors, as numpy arrays: a small torch tensor's pickle is slow to build and to read (32 quickstart
    rollouts: 8 ms a round trip as tensors)."""

    def __getstate__(self) -> dict:
        def out(v):
            if isinstance(v, torch.Tensor):
                return v.detach().cpu().numpy()
            if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                return [x.detach().cpu().numpy() for x in v]
            return {k: out(x) for k, x in v.items()} if isinstance(v, dict) else v

        return {k: out(v) for k, v in vars(self).items()}

    def __setstate__(self, state: dict) -> None:
        def tensor(a: np.ndarray) -> torch.Tensor:  # Ray hands out read-only views of its store: copied
            return torch.from_numpy(a if a.flags.writeable else a.copy())

        def back(v):
            if isinstance(v, np.ndarray):
                return tensor(v)
            if isinstance(v, list) and v and isinstance(v[0], np.ndarray):
                return [tensor(x) for x in v]
            return {k: back(x) for k, x in v.items()} if isinstance(v, dict) else v

        vars(self).update({k: back(v) for k, v in state.items()})


@dataclass
class Rollout(ArraysWhenPickled):
    prompt_ids: list[int]
    action: torch.Tensor  # (S,) Action codes
    token: torch.Tensor  # (S,) token ids, -1 for vector/soft steps
    logprob: torch.Tensor  # (S,) policy log-prob of each action at sampling time (0 for forced steps)
    real_size: int  # ids below this are text
    mode: str
    vector: torch.Tensor | None = None  # (S, D) continuous actions (rows of other steps unused)
    soft_ids: torch.Tensor | None = None  # (S, k) soft-thought token ids
    soft_w: torch.Tensor | None = None  # (S, k) soft-thought weights
    weight_version: int = 0

    @property
    def is_real(self) -> torch.Tensor:
        """(S,) bool: text steps (what the teacher sees)."""
        return (self.token >= 0) & (self.token < self.real_size)

    @property
    def is_chosen_thought(self) -> torch.Tensor:
        """(S,) bool: thought steps the policy chose (a thinking token, vector or mixture), not the markers
        and pauses inserted by rule nor a learned stop."""
        chosen = ((self.action == Action.ANY) | (self.action == Action.THINK) | (self.action == Action.VECTOR)
                  | (self.action == Action.SOFT))
        return chosen & ~self.is_real

    @property
    def kinds(self) -> list[str]:
        return ["real" if r else "thought" for r in self.is_real.tolist()]

    @property
    def real_ids(self) -> list[int]:
        """Generated text tokens, thought steps removed."""
        return self.token[self.is_real].tolist()

    @property
    def text_view(self) -> list[int]:
        """Prompt + generated text with every thought step removed: the teacher's input."""
        return self.prompt_ids + self.real_ids

    @property
    def num_real(self) -> int:
        return int(self.is_real.sum())

    @property
    def num_thought(self) -> int:
        return len(self.token) - self.num_real

    @property
    def num_steps(self) -> int:
        return len(self.token)


def opening_thoughts(r: Rollout) -> int:
    """Number of steps before the rollout's first text token (all of them if it wrote no text)."""
    return int(r.is_real.nonzero()[0]) if r.num_real else r.num_steps


def with_gold(r: Rollout, gold: torch.Tensor, pause_every: bool = False, thoughts: bool = True) -> Rollout:
    """The rollout's opening thought steps (none with thoughts=False), then the gold tokens as text actions:
    what gold-answer rewards and the latent term score. pause_every: the opening pause block also precedes
    every later gold token, as the policy sees pauses (pause_at=every; with vocab slots_at=every the opening
    block stands in for the later blocks the policy would sample)."""
    first = opening_thoughts(r) if thoughts else 0
    block = r.token[:first] if pause_every else r.token[:0]
    token = torch.cat([r.token[:first]] + [torch.cat([
        block, g[None]]) if i else g[None] for i, g in enumerate(gold)])
    action = torch.where(token < r.real_size, int(Action.TEXT), int(Action.FORCED))
    action[:first] = r.action[:first]

    def keep_opening(x):  # payloads of the opening steps; zeros after (gold steps are tokens)
        return None if x is None else torch.cat([x[:first], x.new_zeros(len(token) - first, *x.shape[1:])])

    return Rollout(prompt_ids=r.prompt_ids, real_size=r.real_size, mode=r.mode, action=action, token=token,
                   logprob=torch.zeros(len(token)), vector=keep_opening(r.vector),
                   soft_ids=keep_opening(r.soft_ids),
                   soft_w=keep_opening(r.soft_w), weight_version=r.weight_version)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, P), attention mask (B, P), prompts right-aligned so that every row decodes in step."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    ids = pad_sequence([torch.tensor(p) for p in prompts], batch_first=True, padding_value=pad_id,
                       padding_side="left")
    mask = pad_sequence([torch.ones(len(p), dtype=torch.long) for p in prompts], batch_first=True,
                        padding_side="left")
    return ids.to(device), mask.to(device)


def check_ids(prompts: list[list[int]], vocab_size: int) -> None:
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"prompt {i} has token ids out of range [0, {vocab_size}): {bad[:5]}")


def rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def cache_kwarg(model: nn.Module) -> str:
    """The name `model.forward` takes (and its output returns) the KV cache by: `cache` from transformers
    5.24 (`past_key_values`, its deprecated alias there, goes in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample(
    model: PreTrainedModel, mode: ThoughtMode, prompts: list[list[int]], seed: int = 0,
    weight_version: int = 0, use_cache: bool = True, static: bool = False, compile: bool = False,
) -> list[Rollout]:
    """Sample one rollout per prompt. Deterministic under `seed` (the global RNG is forked, not touched).

    use_cache=False re-runs the whole sequence every step: the reference the KV-cache path is tested against.
    static=True decodes against a preallocated KV cache with fixed shapes (`StaticSampler`); compile=True
    (implies static) also runs each decoding step through torch.compile, as CUDA graphs on a GPU. Both give
    the dynamic path's tokens under the same seed.
    """
    if static or compile:
        from .static_sampler import static_sampler  # imports this module: loaded on first use

        return static_sampler(model, mode, compile).sample(prompts, seed, weight_version)
    model.eval()
    device = model.device
    embed: nn.Embedding = model.get_input_embeddings()
    base = model.base_model
    kv = cache_kwarg(base)
    vocab, sampling = mode.vocab, mode.sampling
    check_ids(prompts, vocab.size)
    ids, mask = left_pad(prompts, vocab.eos_id, device)
    batch = len(prompts)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    inputs = embed(ids)  # (B, P, D)
    steps: list[StepOut] = []
    alive: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)
        cache = DynamicCache() if use_cache else None
        hidden = base(inputs_embeds=inputs, attention_mask=mask, position_ids=pos, use_cache=use_cache,
                      **{kv: cache}).last_hidden_state[:, -1]
        state = mode.init_state(batch, device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        n_real = torch.zeros(batch, dtype=torch.long, device=device)
        for _ in range(sampling.max_new_tokens + mode.max_thought_steps(sampling.max_new_tokens)):
            out = mode.step(head_logits(model, hidden), hidden, state, embed)
            steps.append(out)
            alive.append(~done)
            real = (out.token >= 0) & (out.token < vocab.real_size)
            n_real += real
            done = done | (n_real >= sampling.max_new_tokens)
            if sampling.stop_at_eos:
                done = done | (real & (out.token == vocab.eos_id))
            if done.all():
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            new_pos = pos[:, -1:] + 1
            if use_cache:
                step_in, step_pos = out.embeds[:, None], new_pos
            else:
                inputs = torch.cat([inputs, out.embeds[:, None]], dim=1)
                step_in, step_pos = inputs, torch.cat([pos, new_pos], dim=1)
            pos = torch.cat([pos, new_pos], dim=1)
            hidden = base(inputs_embeds=step_in, attention_mask=mask, position_ids=step_pos,
                          use_cache=use_cache, **{kv: cache}).last_hidden_state[:, -1]
    return collate_steps(prompts, steps, torch.stack(alive, 1), mode, weight_version)


def collate_steps(prompts, steps: list[StepOut], alive: torch.Tensor, mode: ThoughtMode,
                  weight_version: int) -> list[Rollout]:
    """Per-step batch records -> one trimmed `Rollout` per sequence (on the CPU)."""
    def stack(name):
        """(B, S, ...) of one field; steps without a payload (forced/text steps) get zeros there."""
        present = [getattr(s, name) for s in steps if getattr(s, name) is not None]
        if not present:
            return None
        return torch.stack([x if x is not None else torch.zeros_like(present[0])
                            for x in (getattr(s, name) for s in steps)], 1).cpu()

    fields = {name: stack(name) for name in RECORDS}
    return to_rollouts(prompts, fields, alive, mode, weight_version)


RECORDS = ("action", "token", "logprob", "vector", "soft_ids", "soft_w")  # the StepOut fields a rollout keeps


def to_rollouts(prompts, fields: dict, alive: torch.Tensor, mode: ThoughtMode,
                weight_version: int) -> list[Rollout]:
    """(B, S, ...) CPU records of every `RECORDS` field (None: the mode has no such payload), (B, S) alive ->
    one trimmed `Rollout` per sequence."""
    action, token, logprob = fields["action"], fields["token"], fields["logprob"].float()
    vector, soft_ids, soft_w = fields["vector"], fields["soft_ids"], fields["soft_w"]
    lengths = alive.sum(1).tolist()
    return [
        Rollout(
            prompt_ids=list(p), action=action[i, :n], token=token[i, :n], logprob=logprob[i, :n],
            real_size=mode.vocab.real_size, mode=mode.cfg.mode,
            vector=None if vector is None else vector[i, :n].float(),
            soft_ids=None if soft_ids is None else soft_ids[i, :n],
            soft_w=None if soft_w is None else soft_w[i, :n].float(), weight_version=weight_version,
        )
        for i, (p, n) in enumerate(zip(prompts, lengths))
    ]


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

    text_logp = mode.text_logprobs(logits[cat("is_real")]) if text else None
    return Recomputed(grid(lp), grid(torch.ones_like(lp, dtype=torch.bool)),
                      None if ent is None else grid(ent), grid(h), text_logp)


def own_text_logprobs(model: PreTrainedModel, mode: ThoughtMode,
                      rollouts: list[Rollout]) -> list[torch.Tensor]:
    """log pi_text(y_t | x, y_<t, thoughts) of each rollout's own text tokens under the plain text
    distribution (text columns renormalised, temperature 1, no top-k/top-p): one (num_real,) tensor per
    rollout, differentiable. The head runs at the text steps only."""
    core = model.module if hasattr(model, "module") else model
    real = torch.cat([r.is_real for r in rollouts]).to(core.device)
    logits = head_logits(core, choosing_hidden(model, rollouts)[real])  # (N_text, K)
    ids = torch.cat([r.token[r.is_real] for r in rollouts]).to(core.device)
    return list(mode.text_token_logprob(logits, ids).split([r.num_real for r in rollouts]))


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
