"""The discovery positive control's estimator (thinktok/gumbel_slots.py): the forward draw is the policy's
own slot draw, and one straight-through update makes the better slot token likelier; the SFT run with it
(slot_choice=gumbel) logs a learning curve and writes a checkpoint that decodes as RL's slots do."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thinktok.checkpoint import load_run_info
from thinktok.config import load_config
from thinktok.errors import UserError
from thinktok.gumbel_slots import GumbelSlots
from thinktok.models.policy import load_policy
from thinktok.sft import run_sft
from thinktok.sft_config import SFTConfig

PROMPT = [11, 22, 33]  # any text ids
GOLD = [44, 55]


def untied_policy(num_thinking: int):
    """The tiny policy with its LM head untied from the input embeddings: the head's thinking rows then
    only set the slot's choice (the answer is scored with thinking columns masked), so an update of those
    rows alone moves the writer and nothing else."""
    policy = load_policy("tiny", num_thinking, markers=False, init="norm", seed=0)
    head = policy.model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone())
    return policy


def batch(policy, copies: int):
    v = policy.vocab
    ids = torch.tensor([PROMPT + [v.think_id(0)] + GOLD] * copies)
    slot = torch.full((copies, 1), len(PROMPT))
    return ids, torch.ones_like(ids), slot


def slot_probs(policy, ids, slots: GumbelSlots) -> torch.Tensor:
    """(N,) the policy's distribution over the thinking columns at the slot, computed by hand."""
    hidden = policy.model.base_model(input_ids=ids[:1, : len(PROMPT)]).last_hidden_state[0, -1]
    w = policy.model.get_output_embeddings().weight[slots.think_lo : slots.think_lo + slots.num_thinking]
    return torch.softmax(w @ hidden, -1)


def answer_loss(policy, embeds, slots: GumbelSlots) -> torch.Tensor:
    """(B,) -log pi_text(gold | prompt, slot): thinking columns excluded by hand, not by `text_only`."""
    logits = policy.model(inputs_embeds=embeds).logits[:, len(PROMPT) : len(PROMPT) + len(GOLD)]
    logp = torch.log_softmax(logits[..., : slots.think_lo], -1)
    return -logp.gather(-1, torch.tensor(GOLD).expand(len(embeds), -1)[..., None]).squeeze(-1).sum(-1)


def test_forward_is_a_draw_from_the_policys_slot_distribution():
    torch.manual_seed(0)
    policy = untied_policy(4)
    slots = GumbelSlots(policy.vocab.think_id(0), 4, tau=1.0)
    ids, mask, slot = batch(policy, 4000)
    with torch.no_grad():
        embeds = slots.inputs(policy.model, ids, mask, slot)
        table = policy.model.get_input_embeddings().weight[slots.think_lo : slots.think_lo + 4]
        # every slot input is one thinking row (up to the straight-through sum's rounding)
        dist = (embeds[:, len(PROMPT), None] - table).abs().amax(-1)  # (B, N) max-abs distance
        assert dist.min(-1).values.max() < 1e-6
        chosen = dist.argmin(-1)
        freq = torch.bincount(chosen, minlength=4) / len(chosen)
        expected = slot_probs(policy, ids, slots)
    assert (freq - expected).abs().max() < 0.03  # 4000 draws: ~4 standard errors
    # everything else is the token embedding of the ids
    plain = policy.model.get_input_embeddings()(ids)
    assert torch.equal(embeds[:, : len(PROMPT)], plain[:, : len(PROMPT)])
    assert torch.equal(embeds[:, len(PROMPT) + 1 :], plain[:, len(PROMPT) + 1 :])


def test_one_straight_through_update_makes_the_better_token_likelier():
    torch.manual_seed(0)
    policy = untied_policy(2)
    model, v = policy.model, policy.vocab
    emb = model.get_input_embeddings().weight
    with torch.no_grad():  # two nearby rows: the loss is close to linear between them, so the estimator's
        # first-order guess of each token's loss has the sign of the true difference
        emb[v.think_id(1)] = emb[v.think_id(0)] + 0.2 * torch.randn(emb.shape[1])
    slots = GumbelSlots(v.think_id(0), 2, tau=1.0)
    ids, mask, slot = batch(policy, 512)
    with torch.no_grad():  # each token's exact answer loss, the slot fixed by hand
        fixed = torch.stack([answer_loss(policy, model.get_input_embeddings()(torch.tensor(
            [PROMPT + [v.think_id(k)] + GOLD])), slots)[0] for k in range(2)])
    better = int(fixed.argmin())
    before = slot_probs(policy, ids, slots)[better]
    head = model.get_output_embeddings().weight
    loss = answer_loss(policy, slots.inputs(model, ids, mask, slot), slots).mean()
    (grad,) = torch.autograd.grad(loss, head)
    with torch.no_grad():  # SGD on the head's thinking rows alone: the writer
        head[slots.think_lo :] -= 50.0 * grad[slots.think_lo :]
        after = slot_probs(policy, ids, slots)[better]
    assert after > before + 1e-3, (fixed.tolist(), before.item(), after.item())


def test_text_only_masks_every_thinking_column():
    policy = load_policy("tiny", 3, markers=False, seed=0)
    slots = GumbelSlots(policy.vocab.think_id(0), 3, tau=1.0)
    logits = torch.randn(2, policy.vocab.size)
    masked = slots.text_only(policy.model, logits)
    assert torch.equal(masked[:, : slots.think_lo], logits[:, : slots.think_lo])
    assert (F.softmax(masked, -1)[:, slots.think_lo :] == 0).all()


GUMBEL = ["thought.mode=vocab", "thought.num_thinking=4", "slots=3", "slot_choice=gumbel",
          "task.num_train=64",
          "task.num_val=8", "task.num_test=8", "train.batch_size=16", "train.log_every=5"]


def test_gumbel_sft_run_logs_a_curve_and_decodes_with_chosen_slots(tmp_path):
    cfg = load_config(SFTConfig, None, [f"run_dir={tmp_path}", "train.max_steps=6", "train.eval_every=4",
                                        "train.eval_examples=8", *GUMBEL])
    ckpt = run_sft(cfg)
    evals = [json.loads(line) for line in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert [(e["step"], e["examples_seen"]) for e in evals] == [(0, 0), (4, 64), (6, 96)]
    assert all(e["num_examples"] == 8 and e["thought_steps_mean"] == 3 and "controls" in e for e in evals)
    _, _, thought = load_run_info(ckpt)
    assert (thought.mode, thought.num_thinking, thought.slots) == ("vocab", 4, 3)
    rows = json.loads((ckpt / "thinking_rows.json").read_text())
    assert (torch.tensor(rows["cum_grad_norm"][-1]) > 0).all()  # every thinking row got a gradient


@pytest.mark.parametrize("bad", [["thought.mode=pause"], ["format=cot"], ["train_slots=false"],
                                 ["gumbel_tau=0"], ["slot_choice=sometimes"]])
def test_gumbel_sft_refuses_settings_it_cannot_train(tmp_path, bad):
    with pytest.raises(UserError, match="slot_choice|gumbel"):
        load_config(SFTConfig, None, [f"run_dir={tmp_path}", *GUMBEL, *bad]).validate()
