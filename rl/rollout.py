"""The rollout engine: batched sampling with a KV cache for every thought mode, the `Rollout` record,
and the one teacher-forced recompute of a finished rollout's log-probs that the learner trains on.

Sequence layout of one rollout: prompt positions 0..P-1, then step s (s = 0..S-1) is the action chosen
from the model's output at position P-1+s; its input embedding is fed at position P+s.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from thinktok.models.thoughts import Action, ContinuousThoughts, SoftThoughts, State, StepOut, ThoughtMode


@dataclass
class Rollout:
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
        """(S,) bool: thought steps the policy chose (a thinking token, vector or mixture), not the markers and
        pauses inserted by rule nor a learned stop."""
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
    token = torch.cat([r.token[:first]] + [torch.cat([block, g[None]]) if i else g[None] for i, g in enumerate(gold)])
    action = torch.where(token < r.real_size, int(Action.TEXT), int(Action.FORCED))
    action[:first] = r.action[:first]

    def keep_opening(x):  # payloads of the opening steps; zeros after (gold steps are tokens)
        return None if x is None else torch.cat([x[:first], x.new_zeros(len(token) - first, *x.shape[1:])])

    return Rollout(prompt_ids=r.prompt_ids, real_size=r.real_size, mode=r.mode, action=action, token=token,
                   logprob=torch.zeros(len(token)), vector=keep_opening(r.vector), soft_ids=keep_opening(r.soft_ids),
                   soft_w=keep_opening(r.soft_w), weight_version=r.weight_version)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, P), attention mask (B, P), prompts right-aligned so that every row decodes in step."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def check_ids(prompts: list[list[int]], vocab_size: int) -> None:
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids out of range [0, {vocab_size}): {bad[:5]}")


def rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    mode: ThoughtMode,
    prompts: list[list[int]],
    seed: int = 0,
    weight_version: int = 0,
    use_cache: bool = True,
    static: bool = False,
    compile: bool = False,
) -> list[Rollout]:
    """Sample one rollout per prompt. Deterministic under `seed` (the global RNG is forked, not touched).

    use_cache=False re-runs the whole sequence every step: the reference the KV-cache path is tested against.
    static=True decodes against a preallocated KV cache with fixed shapes (`StaticSampler`); compile=True
    (implies static) also runs each decoding step through torch.compile, as CUDA graphs on a GPU. Both give
    the dynamic path's tokens under the same seed.
    """
    if static or compile:
        return static_sampler(model, mode, compile).sample(prompts, seed, weight_version)
    model.eval()
    device = model.device
    embed: nn.Embedding = model.get_input_embeddings()
    base, head = model.base_model, model.get_output_embeddings()
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
        hidden = base(inputs_embeds=inputs, attention_mask=mask, position_ids=pos, past_key_values=cache,
                      use_cache=use_cache).last_hidden_state[:, -1]
        state = mode.init_state(batch, device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        n_real = torch.zeros(batch, dtype=torch.long, device=device)
        for _ in range(sampling.max_new_tokens + mode.max_thought_steps(sampling.max_new_tokens)):
            out = mode.step(head(hidden), hidden, state, embed)
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
            hidden = base(inputs_embeds=step_in, attention_mask=mask, position_ids=step_pos, past_key_values=cache,
                          use_cache=use_cache).last_hidden_state[:, -1]
    return collate_steps(prompts, steps, torch.stack(alive, 1), mode, weight_version)


# ---- static cache, compiled step ------------------------------------------------------------------
CHECK_EVERY = 8  # decoding steps between the host's `done.all()` checks on the static path (one sync each)


class StaticKV:
    """A KV cache preallocated to the rollout's maximum length, (B, H, max_len, Dh) per layer, written in
    place at slot `slot` (a (1,) tensor the step advances): fixed shapes, no torch.cat per step, so the
    decoding step can be compiled and captured. Duck-typed: GPT-2's attention only calls `update`
    (transformers 5.17 to 5.24), and the 4D mask the sampler passes means the mask code never asks a cache
    for its length."""

    def __init__(self, config, batch: int, max_len: int, slot: torch.Tensor, dtype, device):
        heads = config.num_attention_heads
        shape = (batch, heads, max_len, config.hidden_size // heads)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.slot = slot

    def update(self, key, value, layer_idx, *args, **kwargs):
        """key, value (B, H, 1, Dh) of the step -> the layer's whole (B, H, max_len, Dh) keys and values."""
        self.keys[layer_idx].index_copy_(2, self.slot, key)
        self.values[layer_idx].index_copy_(2, self.slot, value)
        return self.keys[layer_idx], self.values[layer_idx]

    def load_prefix(self, cache: DynamicCache) -> None:
        """Copy the prompt's keys/values (the dynamic path's own prefill) into slots 0..P-1."""
        for layer, keys, values in zip(cache.layers, self.keys, self.values):
            keys[:, :, : layer.keys.shape[2]].copy_(layer.keys)
            values[:, :, : layer.values.shape[2]].copy_(layer.values)


@dataclass
class DecodeBuffers:
    """Everything one decoding step reads and writes, allocated once per (batch, cache length) and updated
    in place: a captured CUDA graph replays on fixed addresses, and a compiled step keeps its guards."""

    hidden: torch.Tensor  # (B, D) last hidden state of the position before the step
    n_thought: torch.Tensor  # (B,) the mode's State counters
    phase: torch.Tensor
    run: torch.Tensor
    done: torch.Tensor  # (B,) bool
    n_real: torch.Tensor  # (B,) text tokens so far
    valid: torch.Tensor  # (B, L) bool: cache slots that hold a real key (prompt padding is False)
    pos: torch.Tensor  # (B,) position id of the step's input
    slot: torch.Tensor  # (1,) cache slot of the step's input
    step: torch.Tensor  # (1,) step index, the records' column
    alive: torch.Tensor  # (B, S) bool records
    records: dict[str, torch.Tensor]  # name -> (B, S, ...) per `RECORDS` field the mode produces
    cache: StaticKV


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, q, L) bool -> (B, 1, q, L) additive mask (0 or the dtype's min: no NaN for a fully masked row)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class StaticSampler:
    """`sample(..., static=True)`: the dynamic path's prefill, then every decoding step as one function of
    `DecodeBuffers` (logits -> the mode's step, sampling included, from the forked global generator -> the
    next position's forward against a `StaticKV`). compile=True runs that function through torch.compile,
    with CUDA graphs on a GPU (what mode="reduce-overhead" turns on). Host syncs: one `done.all()` every
    CHECK_EVERY steps."""

    def __init__(self, model: PreTrainedModel, mode: ThoughtMode, compile: bool):
        self.model, self.mode = model, mode
        self.buffers: dict[tuple[int, int], DecodeBuffers] = {}
        params = inspect.signature(model.base_model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.24 renamed it
        self.step = self.decode_step
        if compile:
            # every sampler (model, mode, batch and cache-length bucket) is one entry of decode_step's cache
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            # fallback_random: random ops stay the eager aten calls on the global generator, so one seed gives
            # the dynamic path's draws; fullgraph: a graph break would silently split the CUDA graph
            options = {"fallback_random": True, "triton.cudagraphs": model.device.type == "cuda"}
            self.step = torch.compile(self.decode_step, dynamic=False, fullgraph=True, options=options)

    def allocate(self, batch: int, max_len: int, steps: int) -> DecodeBuffers:
        model, mode, device = self.model, self.mode, self.model.device
        dim = model.config.hidden_size
        z = lambda *shape, dtype=torch.long: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        records = {"action": z(batch, steps), "token": z(batch, steps),
                   "logprob": z(batch, steps, dtype=torch.float32)}
        if isinstance(mode, ContinuousThoughts):
            records["vector"] = z(batch, steps, dim, dtype=torch.float32)
        if isinstance(mode, SoftThoughts):
            k = mode.cfg.soft_top_k or mode.vocab.real_size
            records |= {"soft_ids": z(batch, steps, k), "soft_w": z(batch, steps, k, dtype=torch.float32)}
        slot = z(1)
        b = DecodeBuffers(z(batch, dim, dtype=model.dtype), z(batch), z(batch), z(batch),
                          z(batch, dtype=torch.bool), z(batch), z(batch, max_len, dtype=torch.bool), z(batch),
                          slot, z(1), z(batch, steps, dtype=torch.bool), records,
                          StaticKV(model.config, batch, max_len, slot, model.dtype, device))
        tensors = [*vars(b).values(), *records.values(), *b.cache.keys, *b.cache.values]
        for x in tensors:
            if isinstance(x, torch.Tensor):
                torch._dynamo.mark_static_address(x)
        return b

    def decode_step(self, b: DecodeBuffers) -> None:
        """One decoding step, in place on `b`: record the mode's step at column `b.step`, then feed its
        embedding at cache slot `b.slot` and keep the new last hidden state."""
        model, mode, vocab, sampling = self.model, self.mode, self.mode.vocab, self.mode.sampling
        state = State(b.n_thought.clone(), b.phase.clone(), b.run.clone())
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        out = mode.step(head(b.hidden), b.hidden, state, embed)
        for name, rec in b.records.items():
            rec.index_copy_(1, b.step, getattr(out, name).to(rec.dtype).unsqueeze(1))
        b.alive.index_copy_(1, b.step, ~b.done[:, None])
        real = (out.token >= 0) & (out.token < vocab.real_size)
        n_real = b.n_real + real
        done = b.done | (n_real >= sampling.max_new_tokens)
        if sampling.stop_at_eos:
            done = done | (real & (out.token == vocab.eos_id))
        allowed = b.valid & (torch.arange(b.valid.shape[1], device=b.valid.device) <= b.slot)  # (B, L)
        hidden = model.base_model(inputs_embeds=out.embeds[:, None],
                                  attention_mask=additive_mask(allowed[:, None], model.dtype),
                                  position_ids=b.pos[:, None], use_cache=True,
                                  **{self.cache_kw: b.cache}).last_hidden_state
        for buf, new in ((b.n_thought, state.n_thought), (b.phase, state.phase), (b.run, state.run),
                         (b.done, done), (b.n_real, n_real), (b.hidden, hidden[:, -1])):
            buf.copy_(new)
        for counter in (b.pos, b.slot, b.step):
            counter.add_(1)

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], seed: int, weight_version: int) -> list[Rollout]:
        model, mode, device = self.model, self.mode, self.model.device
        model.eval()
        embed = model.get_input_embeddings()
        check_ids(prompts, mode.vocab.size)
        ids, mask = left_pad(prompts, mode.vocab.eos_id, device)
        batch, width = ids.shape
        steps = mode.sampling.max_new_tokens + mode.max_thought_steps(mode.sampling.max_new_tokens)
        # cache length rounded up to 64: prompts of nearby lengths share buffers and compiled graphs
        max_len = -(-(width + steps) // 64) * 64
        if (batch, max_len) not in self.buffers:
            self.buffers[batch, max_len] = self.allocate(batch, max_len, steps)
        b = self.buffers[batch, max_len]
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.random.fork_rng(devices=rng_devices(device)):
            torch.manual_seed(seed)
            prefill = DynamicCache()
            hidden = model.base_model(inputs_embeds=embed(ids), attention_mask=mask, position_ids=pos,
                                      past_key_values=prefill, use_cache=True).last_hidden_state[:, -1]
            b.cache.load_prefix(prefill)
            state = mode.init_state(batch, device)
            b.valid.fill_(True)
            b.valid[:, :width].copy_(mask.bool())
            for buf, new in ((b.hidden, hidden), (b.n_thought, state.n_thought), (b.phase, state.phase),
                             (b.run, state.run), (b.pos, pos[:, -1] + 1)):
                buf.copy_(new)
            for buf, value in ((b.done, False), (b.n_real, 0), (b.slot, width), (b.step, 0)):
                buf.fill_(value)
            for s in range(steps):
                self.step(b)
                if (s + 1) % CHECK_EVERY == 0 and b.done.all():
                    break
            n = s + 1
        fields = {name: b.records[name][:, :n].cpu() if name in b.records else None for name in RECORDS}
        return to_rollouts(prompts, fields, b.alive[:, :n].cpu(), mode, weight_version)


# (id(model), id(mode), compile) -> sampler. A sampler holds its model and mode (so their ids stay theirs while
# cached) and its buffers: the few most recent are kept, a rollout worker uses one.
_SAMPLERS: OrderedDict[tuple[int, int, bool], StaticSampler] = OrderedDict()
MAX_SAMPLERS = 8


def static_sampler(model: PreTrainedModel, mode: ThoughtMode, compile: bool) -> StaticSampler:
    """One sampler (buffers, compiled step) per model, mode and compile switch."""
    key = (id(model), id(mode), compile)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = StaticSampler(model, mode, compile)
        if len(_SAMPLERS) > MAX_SAMPLERS:
            _SAMPLERS.popitem(last=False)
    _SAMPLERS.move_to_end(key)
    return _SAMPLERS[key]


def collate_steps(prompts, steps: list[StepOut], alive: torch.Tensor, mode: ThoughtMode, weight_version: int) -> list[Rollout]:
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
            soft_w=None if soft_w is None else soft_w[i, :n].float(),
            weight_version=weight_version,
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


class Recomputed(NamedTuple):
    logprob: torch.Tensor  # (B, S_max) per-step log-probs, 0 past each rollout's end
    valid: torch.Tensor  # (B, S_max) bool
    entropy: torch.Tensor  # (B, S_max) entropy of the token distribution at token steps, 0 elsewhere
    hidden: torch.Tensor  # (B, S_max, D) last hidden state at the position that chose each step
    # with text=True: (N_text, V_text) log-softmax of the plain text distribution (temperature 1, no filter)
    # at every text step, rollouts in order (what rewards and the KL term read); else None
    text_logp: torch.Tensor | None = None


def recompute_logprobs(model: PreTrainedModel, mode: ThoughtMode, rollouts: list[Rollout],
                       text: bool = False) -> Recomputed:
    """One teacher-forced forward (no cache) over finished rollouts -> per-step log-probs. Differentiable:
    this is what the learner trains on. `model` may be a DDP/accelerate wrapper: its forward is called."""
    core = model.module if hasattr(model, "module") else model
    device = core.device
    embed = core.get_input_embeddings()
    seqs = [torch.cat([embed(torch.tensor(r.prompt_ids, device=device)), step_inputs(r, embed)[:-1]]) for r in rollouts]
    width = max(len(s) for s in seqs)
    inputs = torch.zeros(len(seqs), width, seqs[0].shape[-1], device=device, dtype=seqs[0].dtype)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        inputs[i, : len(s)] = s
        mask[i, : len(s)] = 1
    out = model(inputs_embeds=inputs, attention_mask=mask, output_hidden_states=True)
    # the position that chose step s of rollout b is P_b - 1 + s
    rows = torch.cat([torch.full((r.num_steps,), i) for i, r in enumerate(rollouts)]).to(device)
    cols = torch.cat([len(r.prompt_ids) - 1 + torch.arange(r.num_steps) for r in rollouts]).to(device)
    h, logits = out.hidden_states[-1][rows, cols], out.logits[rows, cols]  # (N, D), (N, V)
    cat = lambda name: (None if getattr(rollouts[0], name) is None  # noqa: E731
                        else torch.cat([getattr(r, name) for r in rollouts]).to(device))
    lp, ent = mode.action_logprobs(cat("action"), cat("token"), logits, h, cat("vector"), cat("soft_ids"), cat("soft_w"),
                                   with_entropy=True)
    steps = max(r.num_steps for r in rollouts)
    step_idx = torch.cat([torch.arange(r.num_steps) for r in rollouts]).to(device)
    grid = lambda x: torch.zeros(len(rollouts), steps, *x.shape[1:], device=device, dtype=x.dtype).index_put((rows, step_idx), x)  # noqa: E731
    text_logp = mode.text_logprobs(logits[cat("is_real")]) if text else None
    return Recomputed(grid(lp), grid(torch.ones_like(lp, dtype=torch.bool)), grid(ent), grid(h), text_logp)


def text_token_logprobs(model: PreTrainedModel, mode: ThoughtMode, rollouts: list[Rollout]) -> list[torch.Tensor]:
    """log pi(y_t | x, y_<t, thoughts) of each rollout's text tokens under the plain text distribution (text
    columns renormalised, temperature 1, no top-k/top-p): one (num_real,) CPU tensor per rollout."""
    with torch.no_grad():
        text_logp = recompute_logprobs(model, mode, rollouts, text=True).text_logp
    ids = torch.cat([r.token[r.is_real] for r in rollouts]).to(text_logp.device)
    lp = text_logp.gather(1, ids[:, None])[:, 0].cpu()
    return list(lp.split([r.num_real for r in rollouts]))
