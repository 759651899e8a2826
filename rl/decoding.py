"""What both samplers (rl/sampler.py's dynamic one and rl/static_sampler.py's fixed-shape one) share: the
prompts' padding and checks, the end-of-rollout rule, and the per-step records turned into `Rollout`s."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from thinktok.errors import UserError
from thinktok.models.thought_config import SamplingConfig
from thinktok.models.thoughts import ThoughtMode

from .rollout import Rollout


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


def finished(token: torch.Tensor, n_text: torch.Tensor, done: torch.Tensor, text_size: int, eos_id: int,
             sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """After a step that chose `token` (B,): (text tokens so far, done). A rollout ends after
    max_new_tokens text tokens, or (stop_at_eos) at an EOS; thought steps count toward neither."""
    text = (token >= 0) & (token < text_size)
    n_text = n_text + text
    done = done | (n_text >= sampling.max_new_tokens)
    if sampling.stop_at_eos:
        done = done | (text & (token == eos_id))
    return n_text, done


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
            text_size=mode.vocab.text_size, mode=mode.cfg.mode,
            vector=None if vector is None else vector[i, :n].float(),
            soft_ids=None if soft_ids is None else soft_ids[i, :n],
            soft_w=None if soft_w is None else soft_w[i, :n].float(), weight_version=weight_version,
        )
        for i, (p, n) in enumerate(zip(prompts, lengths))
    ]
