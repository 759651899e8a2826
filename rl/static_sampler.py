"""The rollout engine's static path: decoding against a KV cache preallocated to the rollout's maximum
length, every step one function of fixed-shape buffers updated in place (logits -> the mode's step ->
the next position's forward), optionally through torch.compile (CUDA graphs on a GPU). Same tokens as the
dynamic path in sampler.py under the same seed (tested for every mode); `sample(..., static=True)` and
`compile=True` come here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from thinktok.compat import cache_kwarg
from thinktok.models.head import head_logits
from thinktok.models.thought_modes import ContinuousThoughts, SoftThoughts
from thinktok.models.thoughts import State, ThoughtMode

from .decoding import RECORDS, check_ids, finished, left_pad, rng_devices, to_rollouts
from .rollout import Rollout

# decoding steps between the host's `done.all()` checks: one sync each on a GPU; on a CPU a check is free,
# and stopping at once saves the steps a batch would decode after every rollout ended
CHECK_EVERY = {"cuda": 8, "cpu": 1}


class StaticKV:
    """A KV cache preallocated to the rollout's maximum length, (B, H, max_len, Dh) per layer, written in
    place at slot `slot` (a (1,) tensor the step advances): fixed shapes, no torch.cat per step, so the
    decoding step can be compiled and captured. Duck-typed: GPT-2's attention only calls `update`
    (transformers 5.17 to 5.25: thinktok/compat.py), and the 4D mask the sampler passes means the mask code
    never asks a cache for its length."""

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
    n_text: torch.Tensor  # (B,) text tokens so far
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
        self.cache_kw = cache_kwarg(model.base_model)
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

        def z(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        records = {"action": z(batch, steps), "token": z(batch, steps),
                   "logprob": z(batch, steps, dtype=torch.float32)}
        if isinstance(mode, ContinuousThoughts):
            records["vector"] = z(batch, steps, dim, dtype=torch.float32)
        if isinstance(mode, SoftThoughts):
            k = mode.cfg.soft_top_k or mode.n_text
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
        out = mode.step(head_logits(model, b.hidden), b.hidden, state, model.get_input_embeddings())
        for name, rec in b.records.items():
            rec.index_copy_(1, b.step, getattr(out, name).to(rec.dtype).unsqueeze(1))
        b.alive.index_copy_(1, b.step, ~b.done[:, None])
        n_text, done = finished(out.token, b.n_text, b.done, vocab.text_size, vocab.eos_id, sampling)
        allowed = b.valid & (torch.arange(b.valid.shape[1], device=b.valid.device) <= b.slot)  # (B, L)
        hidden = model.base_model(inputs_embeds=out.embeds[:, None],
                                  attention_mask=additive_mask(allowed[:, None], model.dtype),
                                  position_ids=b.pos[:, None], use_cache=True,
                                  **{self.cache_kw: b.cache}).last_hidden_state
        for buf, new in ((b.n_thought, state.n_thought), (b.phase, state.phase), (b.run, state.run),
                         (b.done, done), (b.n_text, n_text), (b.hidden, hidden[:, -1])):
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
                                      use_cache=True, **{self.cache_kw: prefill}).last_hidden_state[:, -1]
            b.cache.load_prefix(prefill)
            state = mode.init_state(batch, device)
            b.valid.fill_(True)
            b.valid[:, :width].copy_(mask.bool())
            for buf, new in ((b.hidden, hidden), (b.n_thought, state.n_thought), (b.phase, state.phase),
                             (b.run, state.run), (b.pos, pos[:, -1] + 1)):
                buf.copy_(new)
            for buf, value in ((b.done, False), (b.n_text, 0), (b.slot, width), (b.step, 0)):
                buf.fill_(value)
            for s in range(steps):
                self.step(b)
                if (s + 1) % CHECK_EVERY.get(device.type, 8) == 0 and b.done.all():
                    break
            n = s + 1
        fields = {name: b.records[name][:, :n].cpu() if name in b.records else None for name in RECORDS}
        return to_rollouts(prompts, fields, b.alive[:, :n].cpu(), mode, weight_version)


# (id(model), id(mode), compile) -> sampler. A sampler holds its model and mode (so their ids stay theirs
# while cached) and its buffers: the few most recent are kept, a rollout worker uses one.
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


