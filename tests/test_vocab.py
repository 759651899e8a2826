"""Vocabulary expansion: sizes, tied rows, saved initial rows, tokenizer layout, checkpoints."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from thinktok.models.policy import PolicyLoadError, load_policy
from thinktok.models.vocab import ThinkingVocab, row_movement


def test_expansion_sizes_and_layout():
    p = load_policy("tiny", num_thinking=16, markers=True)
    v = p.vocab
    assert (v.text_size, v.size) == (50257, 50257 + 16 + 2)
    assert p.model.get_input_embeddings().weight.shape[0] == v.size == len(p.tokenizer)
    assert p.model.config.vocab_size == v.size
    assert p.tokenizer.convert_tokens_to_ids(["<think0>", "<think15>", "<bot>", "<eot>"]) == [
        50257, 50272, 50273, 50274]
    assert (v.bot_id, v.eot_id, v.eos_id) == (50273, 50274, 50256)
    # special: dropped from decoded text, so TRL's decoded completions and the teacher never see them
    assert p.tokenizer.decode([50257, 1105, 50260], skip_special_tokens=True) == " 12"
    # a thinking token in text is one token, never split into characters
    assert p.tokenizer(" 12<think3> =").input_ids == [1105, 50260, 796]


def test_rows_tied_and_initial_copy_kept():
    p = load_policy("tiny", num_thinking=4, markers=False)
    emb, head = p.model.get_input_embeddings().weight, p.model.get_output_embeddings().weight
    assert emb.data_ptr() == head.data_ptr()  # GPT-2 ties input and output rows
    assert torch.equal(p.init_rows, emb[50257:].detach())
    assert torch.cdist(p.init_rows, p.init_rows).fill_diagonal_(1).min() > 0  # distinct tokens start distinct
    assert row_movement(p.model, p.vocab, p.init_rows).abs().max() == 0
    with torch.no_grad():
        emb[50258] += 3.0
    moved = row_movement(p.model, p.vocab, p.init_rows)
    assert moved[1] == pytest.approx(3.0 * emb.shape[1] ** 0.5, rel=1e-5)
    assert moved[[0, 2, 3]].abs().max() == 0
    p.init_rows.add_(1)  # the copy is independent of the live weights
    assert not torch.equal(p.init_rows, emb[50257:].detach())


def test_norm_init_matches_text_row_norm():
    p = load_policy("tiny", num_thinking=32, markers=False, init="norm")
    emb = p.model.get_input_embeddings().weight.detach()
    target = emb[:50257].norm(dim=1).mean()
    assert torch.allclose(emb[50257:].norm(dim=1), target.expand(32), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown init"):
        load_policy("tiny", num_thinking=2, markers=False, init="zeros")


def test_checkpoint_roundtrip_and_vocab_mismatch(tmp_path):
    p = load_policy("tiny", num_thinking=8, markers=False)
    p.save(tmp_path / "ck")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")  # loads with plain transformers
    assert plain.get_input_embeddings().weight.shape[0] == 50257 + 8
    q = load_policy(str(tmp_path / "ck"), num_thinking=8, markers=False)
    assert q.vocab == p.vocab == ThinkingVocab.load(tmp_path / "ck")
    assert torch.equal(q.init_rows, p.init_rows)
    assert torch.equal(q.model.get_input_embeddings().weight, p.model.get_input_embeddings().weight)
    with pytest.raises(PolicyLoadError, match="has 8 thinking tokens.*needs 64"):
        load_policy(str(tmp_path / "ck"), num_thinking=64, markers=False)


def test_bad_names():
    with pytest.raises(PolicyLoadError, match="does not exist"):
        load_policy("./no/such/dir", 4, False)
    with pytest.raises(ValueError, match=">= 0"):
        load_policy("tiny", -1, False)


def test_a_checkpoint_written_before_text_size_loads(tmp_path):
    """The vocabulary's field was named real_size until it became text_size: those checkpoints still load."""
    import json

    from thinktok.models.vocab import VOCAB_FILE, ThinkingVocab

    (tmp_path / VOCAB_FILE).write_text(json.dumps({"real_size": 50257, "num_thinking": 4, "markers": False,
                                                   "eos_id": 50256}))
    assert ThinkingVocab.load(tmp_path) == ThinkingVocab(text_size=50257, num_thinking=4, markers=False,
                                                         eos_id=50256)
