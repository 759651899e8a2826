"""The task-vocabulary head: one restricted distribution in SFT's loss, the samplers, the recompute, the
teacher and a checkpoint's evaluation, each checked against a log-softmax over the allowed rows computed
here from the weight matrix."""

import pytest
import torch
import torch.nn.functional as F

from thinktok.envs import TaskConfig, load_task
from thinktok.errors import UserError
from thinktok.models.head import head_columns, head_name, labelled_logits, restrict_head, task_text_ids
from thinktok.models.policy import load_policy
from thinktok.models.teacher import Teacher
from thinktok.models.thought_config import SamplingConfig, ThoughtConfig
from thinktok.models.thought_modes import make_mode
from thinktok.models.thoughts import Action
from thinktok.rl.recompute import recompute_logprobs
from thinktok.rl.sampler import sample
from thinktok.sft import label_loss
from thinktok.sft_config import ModelConfig, SFTConfig

TASK = TaskConfig(name="multiplication", digits=2, spaced=True, reverse=True, num_train=50, num_val=5,
                  num_test=5)


def task_policy(num_thinking=8, seed=0):
    policy = load_policy("tiny", num_thinking, False, seed=seed)
    task = load_task(TASK)
    restrict_head(policy.model, task_text_ids(task, policy.tokenizer), policy.vocab.text_size)
    return policy, task


def reference_logprobs(policy, hidden):
    """log-softmax over the allowed rows only, from the tied weight matrix: (N, D) -> (N, V), -inf outside."""
    w = policy.model.get_input_embeddings().weight
    allowed = sorted(policy.model.config.thinktok_head["text_ids"]) + list(
        range(policy.vocab.text_size, policy.vocab.size))
    out = torch.full((hidden.shape[0], w.shape[0]), float("-inf"))
    out[:, allowed] = F.log_softmax(hidden @ w[allowed].T, -1)
    return out, allowed


def test_task_ids_cover_the_task_and_nothing_else():
    policy, task = task_policy()
    ids = policy.model.config.thinktok_head["text_ids"]
    tok = policy.tokenizer
    digits = {tok(f" {d}").input_ids[0] for d in range(10)}
    assert digits <= set(ids) and tok.eos_token_id in ids
    assert tok(" ;").input_ids[0] in ids and tok(" *").input_ids[0] in ids
    # 10 digits, 10 spaced digits, " *", " =", " ;", EOS
    assert tok(" the").input_ids[0] not in ids and len(ids) <= 24


def test_head_logprobs_and_argmax_match_reference():
    policy, _ = task_policy()
    hidden = torch.randn(7, policy.model.config.n_embd)
    ref, allowed = reference_logprobs(policy, hidden)
    got = F.log_softmax(policy.model.get_output_embeddings()(hidden), -1)
    assert torch.allclose(got[:, allowed], ref[:, allowed], atol=1e-5)
    assert got.exp()[:, [i for i in range(policy.vocab.size) if i not in set(allowed)]].max() == 0
    assert torch.isfinite(got).all()  # finite masked logits: KLs over the full width stay finite
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_sft_loss_is_the_restricted_cross_entropy():
    policy, task = task_policy(num_thinking=0)
    tok = policy.tokenizer
    row = task.dataset["train"][0]
    prompt, target = tok(row["prompt"]).input_ids, tok(task.target(row, "cot")).input_ids + [tok.eos_token_id]
    ids = torch.tensor([prompt + target])
    labels = torch.tensor([[-100] * len(prompt) + target])
    loss = label_loss(policy.model, ids, torch.ones_like(ids), labels, torch.zeros(1, 0, dtype=torch.long))
    hidden = policy.model.base_model(input_ids=ids).last_hidden_state[0, len(prompt) - 1 : -1]
    ref, _ = reference_logprobs(policy, hidden)
    expected = -ref[torch.arange(len(target)), torch.tensor(target)].mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    with pytest.raises(UserError, match="outside the task head"):
        labelled_logits(policy.model, hidden[:1], torch.tensor([tok(" the").input_ids[0]]))


@pytest.mark.parametrize("static", [False, True])
def test_sampler_and_recompute_use_the_restricted_distribution(static):
    policy, task = task_policy()
    mode = make_mode(ThoughtConfig(mode="vocab", num_thinking=8, slots=2), policy.vocab,
                     SamplingConfig(max_new_tokens=6), head_columns(policy.model))
    prompts = [policy.tokenizer(r["prompt"]).input_ids for r in task.dataset["test"]]
    rollouts = sample(policy.model, mode, prompts, seed=1, static=static)
    allowed = set(policy.model.config.thinktok_head["text_ids"]) | set(range(policy.vocab.text_size,
                                                                               policy.vocab.size))
    rec = recompute_logprobs(policy.model, mode, rollouts)
    for i, r in enumerate(rollouts):
        assert set(r.token[r.token >= 0].tolist()) <= allowed
        assert torch.allclose(rec.logprob[i, : r.num_steps], r.logprob, atol=1e-5)
    # one text step by hand: the first text token of the first rollout, after its prompt and 2 slots
    r = rollouts[0]
    first = int((r.action == Action.TEXT).nonzero()[0])
    ids = torch.tensor([r.prompt_ids + r.token[:first].tolist()])
    hidden = policy.model.base_model(input_ids=ids).last_hidden_state[0, -1:]
    ref, _ = reference_logprobs(policy, hidden)
    text_only = ref[0, : policy.vocab.text_size].log_softmax(-1)  # text steps: text columns only
    assert torch.allclose(r.logprob[first], text_only[r.token[first]], atol=1e-5)


def test_checkpoint_keeps_its_head(tmp_path):
    policy, task = task_policy(num_thinking=0)
    policy.save(tmp_path / "ckpt")
    hidden = torch.randn(3, policy.model.config.n_embd)
    want = policy.model.get_output_embeddings()(hidden)
    # a policy that adds thinking tokens to it keeps the head over its text ids and every new row
    loaded = load_policy(str(tmp_path / "ckpt"), 4, False)
    assert head_name(loaded.model) == "task"
    got = loaded.model.get_output_embeddings()(hidden)
    assert torch.allclose(got[:, : policy.vocab.text_size], want, atol=1e-6)
    assert (got[:, loaded.vocab.text_size :] > -1e3).all()
    teacher = Teacher.load(tmp_path / "ckpt")
    assert torch.allclose(teacher.model.get_output_embeddings()(hidden), want, atol=1e-6)


def test_a_task_head_teacher_scores_over_its_columns():
    """A teacher with a task head: log q of each token, over the allowed rows only, as computed from the
    weight matrix; a token outside its head gets the masked logit's log-prob, as the full-width head gives
    it."""
    policy, task = task_policy(num_thinking=0)
    teacher = Teacher(policy.model)
    tok = policy.tokenizer
    ids = tok(task.dataset["train"][0]["prompt"]).input_ids + [tok(" 7").input_ids[0],
                                                                tok(" the").input_ids[0]]
    got = teacher.token_logprobs([ids], [2])[0]
    hidden = policy.model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    ref, _ = reference_logprobs(policy, hidden)
    want = ref[torch.arange(1, len(ids) - 2), torch.tensor(ids[2:-1])]
    assert torch.allclose(got[:-1], want, atol=1e-5)
    full = F.log_softmax(policy.model(torch.tensor([ids])).logits[0, -2].float(), -1)[ids[-1]]
    assert got[-1] < -1e5 and got[-1].item() == pytest.approx(full.item(), rel=1e-6)


def test_task_head_refused_for_text():
    with pytest.raises(UserError, match="text task"):
        SFTConfig(task=TaskConfig(name="text"), model=ModelConfig(head="task")).validate()
