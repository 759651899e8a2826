"""Loading and saving a policy: a causal LM with a thinking vocabulary, its tokenizer and vocabulary
layout, in Hugging Face format (a checkpoint loads with `AutoModelForCausalLM`).

Names: `tiny` and `small` are random-initialised GPT-2 configs sized for a CPU; `gpt2`, `gpt2-medium`, …
(or any hub name) and local directories load real weights for users who have them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from thinktok.checkpoint import INIT_ROWS_FILE
from thinktok.errors import UserError

from .head import restore_head
from .vocab import (
    ThinkingVocab,
    add_thinking_tokens,
    expand_embeddings,
    load_base_tokenizer,
    offline_gpt2_tokenizer,
)

GPT2_VOCAB = 50257

# Dropout is off: rollouts and the learner's recompute must see the same function.
SMALL_CONFIGS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_embd=128, n_head=4, n_positions=512),
    "small": dict(n_layer=6, n_embd=384, n_head=6, n_positions=1024),
    "base": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024),  # GPT-2 small's shape, for GPUs
}


class PolicyLoadError(UserError):
    """A model name/path that cannot be loaded, or a checkpoint that does not match the request."""


@dataclass
class Policy:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    vocab: ThinkingVocab
    init_rows: torch.Tensor  # (new rows, d_model) as initialised, for movement measurements

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.vocab.save(directory)
        torch.save(self.init_rows, directory / INIT_ROWS_FILE)


def small_gpt2(name: str, seed: int = 0) -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=GPT2_VOCAB, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     **SMALL_CONFIGS[name])
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def load_policy(
    name_or_path: str, num_thinking: int, markers: bool, init: str = "mean", seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Policy:
    """Model + tokenizer with `num_thinking` thinking tokens (and `<bot>`/`<eot>` if `markers`).

    A directory saved by `Policy.save` already holds its thinking vocabulary: it must match the request.
    Anything else is a base model whose vocabulary is expanded here.
    """
    path = Path(name_or_path)
    if path.is_dir():
        saved = ThinkingVocab.load(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            own = (path / "tokenizer_config.json").exists()
            tokenizer = load_base_tokenizer(str(path)) if own else offline_gpt2_tokenizer()
        except (OSError, ValueError) as e:
            raise PolicyLoadError(f"cannot load a model from {path}: {e}") from None
        if saved is not None and saved.size > saved.text_size:  # else: a plain LM, expanded below
            if (saved.num_thinking, saved.markers) != (num_thinking, markers):
                raise PolicyLoadError(
                    f"checkpoint {path} has {saved.num_thinking} thinking tokens (markers={saved.markers}), "
                    f"the request needs {num_thinking} (markers={markers})"
                )
            rows = model.get_input_embeddings().weight.shape[0]
            if rows != saved.size or len(tokenizer) != saved.size:
                raise PolicyLoadError(f"checkpoint {path} is inconsistent: {rows} embedding rows, "
                                      f"{len(tokenizer)} tokenizer entries, vocabulary layout says "
                                      f"{saved.size}")
            init_file = path / INIT_ROWS_FILE
            rows = model.get_input_embeddings().weight[saved.text_size :]
            init_rows = torch.load(init_file) if init_file.exists() else rows.detach().clone()
            restore_head(model)
            return Policy(model, tokenizer, saved, init_rows)
    elif name_or_path in SMALL_CONFIGS:
        model, tokenizer = small_gpt2(name_or_path, seed).to(dtype), offline_gpt2_tokenizer()
    elif path.suffix or path.parent != Path("."):
        raise PolicyLoadError(f"model path {name_or_path} does not exist")
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
            tokenizer = load_base_tokenizer(name_or_path)
        except OSError as e:
            raise PolicyLoadError(
                f"cannot load model {name_or_path!r} ({e.__class__.__name__}); offline, use a local path "
                f"or one of the built-in configs: {', '.join(SMALL_CONFIGS)}"
            ) from None
    vocab = add_thinking_tokens(tokenizer, num_thinking, markers)
    init_rows = expand_embeddings(model, vocab, init=init, seed=seed)
    restore_head(model)  # a checkpoint's task head, over the rows it has now
    return Policy(model, tokenizer, vocab, init_rows)


def freeze_rows(policy: Policy, rows: list[int]) -> None:
    """Zero the gradient of some embedding rows (pause baseline: slots stay at their initial value).
    The rows are tied with the unembedding, so both uses stay frozen."""
    idx = torch.tensor(rows)
    policy.model.get_input_embeddings().weight.register_hook(lambda g: g.index_fill(0, idx.to(g.device), 0.0))
