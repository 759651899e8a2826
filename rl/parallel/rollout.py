"""The parallel path's sampler (Quiet-STaR style): for a window of T real tokens, think L thinking tokens at
every position at once, incrementally (pass j feeds thought j-1 at all T positions against a KV cache),
and the windows a task's text is cut into. Scoring is in scorer.py."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from thinktok.errors import UserError
from thinktok.models.head import column_logits
from thinktok.models.parallel_gpt2 import ParallelCache, parallel_hidden
from thinktok.models.thoughts import ThoughtMode
from thinktok.rl.decoding import rng_devices

from .config import ParallelConfig


@dataclass
class ParallelRollout:
    """R rows (windows, each repeated G times by the learner), every tensor batch-first."""

    text: torch.Tensor  # (R, T) the text
    thoughts: torch.Tensor  # (R, T, L) thinking token ids
    logprob: torch.Tensor  # (R, T, L) sampling log-probs
    target_ids: torch.Tensor | None = None  # (R, T, K) what real row r predicts (the scorer's targets)
    target_p: torch.Tensor | None = None  # (R, T, K) their weights (sum 1)
    gain: torch.Tensor | None = None  # (R, T) reward of each position's thought (0 where unscored)
    weight_version: int = 0

    def layout(self, lookahead: int) -> torch.Tensor:
        """(R, T + T*(L+n-1)) ids: real tokens, then each position's thought and its teacher-forced
        continuation."""
        r, t, _ = self.thoughts.shape
        segments = torch.cat([self.thoughts, continuation(self.text, lookahead)], dim=2)
        return torch.cat([self.text, segments.reshape(r, -1)], dim=1)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "weight_version"}

    def apply(self, fn) -> "ParallelRollout":
        """fn on every tensor field that is set (row selection, device moves)."""
        return replace(self, **{k: None if x is None else fn(x) for k, x in self.tensors().items()})

    def rows(self, idx: list[int]) -> "ParallelRollout":
        return self.apply(lambda x: x[idx])

    def to(self, device) -> "ParallelRollout":
        return self.apply(lambda x: x.to(device))

    @staticmethod
    def cat(parts: list["ParallelRollout"]) -> "ParallelRollout":
        joined = {k: None if x is None else torch.cat([p.tensors()[k] for p in parts])
                  for k, x in parts[0].tensors().items()}
        return ParallelRollout(**joined, weight_version=min(p.weight_version for p in parts))


def continuation(real: torch.Tensor, lookahead: int) -> torch.Tensor:
    """(R, T) -> (R, T, n-1): x_{t+1} .. x_{t+n-1} for each t. Past the window's end the last token repeats:
    those inputs only feed predictions that are invalid anyway (they lie after the end too)."""
    t = real.shape[1]
    idx = (torch.arange(t)[:, None] + 1 + torch.arange(lookahead - 1)[None]).clamp_max(t - 1).to(real.device)
    return real[:, idx]


def choosing_hidden(h_text: torch.Tensor, h_seg: torch.Tensor, thought_len: int) -> torch.Tensor:
    """Hidden states that choose thought j at every position: real row t for j=0, segment j-1 after.
    (R, T, H), (R, T, S, H) -> (R, T, L, H)."""
    return torch.cat([h_text[:, :, None], h_seg[:, :, : thought_len - 1]], dim=2)


def thought_logprobs(model, mode: ThoughtMode, hidden: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the thinking tokens only (thoughts never choose text): (..., H) -> (..., N_think).
    Projects onto the thinking columns alone, not the whole vocabulary."""
    lo = mode.vocab.text_size
    return column_logits(model, hidden, lo, lo + mode.vocab.num_thinking).float().log_softmax(-1)


@torch.no_grad()
def sample_parallel(model, mode: ThoughtMode, real: torch.Tensor, thought_len: int, seed: int = 0,
                    weight_version: int = 0) -> ParallelRollout:
    """Incremental form: the real prefix once, then one pass per thought step feeding T new tokens (one per
    position) against cached keys/values. Thoughts are drawn from the thinking tokens (temperature 1)."""
    r, t = real.shape
    lo = mode.vocab.text_size
    cache = ParallelCache()
    steps = torch.arange(t, device=real.device)
    thoughts, logps = [], []
    with torch.random.fork_rng(devices=rng_devices(real.device)):
        torch.manual_seed(seed)
        hidden = parallel_hidden(model, real, t, 0, cache)  # (R, T, H): chooses thought 0
        for j in range(thought_len):
            lp = thought_logprobs(model, mode, hidden)  # (R, T, N_think)
            choice = torch.multinomial(lp.reshape(r * t, -1).exp(), 1).reshape(r, t)
            thoughts.append(choice + lo)
            logps.append(lp.gather(-1, choice[..., None])[..., 0])
            if j + 1 < thought_len:
                hidden = parallel_hidden(model, choice + lo, t, 0, cache, position_ids=steps + 1 + j)
    return ParallelRollout(real, torch.stack(thoughts, 2), torch.stack(logps, 2),
                           weight_version=weight_version)


def text_windows(texts: list[list[int]], num_text: int, eos: int) -> list[list[int]]:
    """Token lists joined by EOS and cut into windows of num_text tokens (a short tail is dropped)."""
    ids = [t for text in texts for t in text + [eos]]
    if len(ids) < num_text:
        raise UserError(f"the task's text has {len(ids)} tokens, fewer than one window of "
                         f"parallel.num_text={num_text}")
    return [ids[i : i + num_text] for i in range(0, len(ids) - num_text + 1, num_text)]


def task_windows(task, split: str, cfg: ParallelConfig, tokenizer) -> list[list[int]]:
    """The split's rows as text (prompt + target in cfg.format), cut into windows of cfg.num_text tokens."""
    texts = [tokenizer(r["prompt"] + task.target(r, cfg.format)).input_ids for r in task.dataset[split]]
    return text_windows(texts, cfg.num_text, tokenizer.eos_token_id)
