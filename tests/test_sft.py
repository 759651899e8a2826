"""Supervised training on the CPU: loss goes down, thinking-row records, the Coconut forward, eval."""

import json

import pytest
import torch

from thinktok.cli import main
from thinktok.config import load_config
from thinktok.envs import TaskConfig, load_task
from thinktok.models.policy import load_policy
from thinktok.models.thought_config import ThoughtConfig
from thinktok.sft import (
    collate,
    continuous_inputs,
    encode,
    label_loss,
    run_sft,
    step_codebook,
)
from thinktok.sft_config import CurriculumConfig, SFTConfig

BASE = ["task.num_train=64", "task.num_val=4", "task.num_test=8", "train.batch_size=16", "train.log_every=5",
        "train.lr=3e-3"]


def sft(tmp_path, *overrides, steps=20):
    cfg = load_config(SFTConfig, None, [f"run_dir={tmp_path}", f"train.max_steps={steps}", *BASE, *overrides])
    return cfg, run_sft(cfg)


def test_loss_goes_down_and_checkpoint_evaluates(tmp_path, capsys):
    _, ckpt = sft(tmp_path, steps=30)
    losses = [float(h["loss"]) for h in json.loads((tmp_path / "losses.json").read_text())]
    assert losses[-1] < losses[0] - 1.0
    assert (ckpt / "thinktok_run.yaml").exists()
    assert main(["eval", str(tmp_path), "--split", "test", "--max-new-tokens", "6"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"accuracy", "num_examples", "text_tokens_mean", "thought_steps_mean", "wall_s"} <= result.keys()
    assert result["num_examples"] == 8 and result["thought_steps_mean"] == 0
    assert (tmp_path / "eval_multiplication_test.json").exists()


@pytest.mark.parametrize("mode, k, trained", [("vocab", 2, True), ("single", 1, True), ("pause", 2, False)])
def test_thinking_rows_records(tmp_path, mode, k, trained):
    _, ckpt = sft(tmp_path, f"thought.mode={mode}", f"thought.num_thinking={k}", "slots=2",
                  f"train_slots={str(trained).lower()}", steps=10)
    rows = json.loads((ckpt / "thinking_rows.json").read_text())
    moved, grads = torch.tensor(rows["movement"][-1]), torch.tensor(rows["cum_grad_norm"][-1])
    assert rows["step"][0] == 0 and rows["step"][-1] == 10 and len(moved) == k
    assert torch.tensor(rows["movement"][0]).abs().max() == 0
    if trained:  # every slot row is used and learns
        assert (moved > 0).all() and (grads > 0).all()
    else:  # pause baseline: the slot rows never move
        assert moved.abs().max() == 0 and grads.abs().max() == 0
    policy = load_policy(str(ckpt), k, markers=False)
    assert torch.equal(policy.init_rows, load_policy("tiny", k, False).init_rows)


def test_coconut_forward_feeds_hidden_states():
    policy = load_policy("tiny", 0, markers=True)
    model = policy.model
    ids = torch.tensor([[5, 6, 7, policy.vocab.bot_id, 0, 0, policy.vocab.eot_id, 9]])
    latent = torch.tensor([[4, 5]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        embeds = continuous_inputs(model, ids, mask, latent)
        # by hand: latent 4 := last hidden at 3; latent 5 := last hidden at 4 (given latent 4's input)
        e = model.get_input_embeddings()(ids)
        e[0, 4] = model.base_model(inputs_embeds=e[:, :4]).last_hidden_state[0, 3]
        e[0, 5] = model.base_model(inputs_embeds=e[:, :5]).last_hidden_state[0, 4]
    assert torch.allclose(embeds, e, atol=1e-5)


def test_continuous_curriculum(tmp_path):
    cfg, ckpt = sft(tmp_path, "thought.mode=continuous", "thought.num_thinking=0", "format=cot",
                    "curriculum.stages=2", "curriculum.thoughts_per_step=1", "curriculum.epochs_per_stage=1",
                    steps=-1)
    info = (ckpt / "thinktok_run.yaml").read_text()
    assert "mode: continuous" in info and "max_thought_tokens: 2" in info
    with pytest.raises(ValueError, match="set format=cot"):
        load_config(SFTConfig, None, ["thought.mode=continuous", "thought.num_thinking=0"])


def test_compare_shared_vs_distinct_slots(tmp_path, capsys):
    """`thinktok compare`: both arms evaluated on the first run's task, rows' movement from the
    checkpoints."""
    sft(tmp_path / "shared", "thought.mode=single", "thought.num_thinking=1", "slots=2", steps=10)
    sft(tmp_path / "distinct", "thought.mode=vocab", "thought.num_thinking=2", "slots=2", steps=10)
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "shared"), str(tmp_path / "distinct"), "--limit", "4",
                 "--out", str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    shared, distinct = report["runs"]
    assert report["task"] == "multiplication" and shared["num_examples"] == distinct["num_examples"] == 4
    assert shared["mode"] == distinct["mode"] == "pause"  # supervised slots decode as fixed insertions
    # the eval controls, per run
    assert set(shared["controls"]) == {"no_thoughts", "pause", "shuffled_thoughts"}
    assert shared["movement"]["num_rows"] == 1 and distinct["movement"]["num_rows"] == 2
    # the movement is the checkpoint's rows against its saved initial rows, the last SFT record says the same
    rows_file = tmp_path / "distinct" / "checkpoint" / "thinking_rows.json"
    last = json.loads(rows_file.read_text())["movement"][-1]
    assert distinct["movement"]["rows"] == pytest.approx(last, rel=1e-4) and max(last) > 0
    assert (out / "compare.png").stat().st_size > 10_000
    assert "distinct" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "nowhere")]) == 2


def test_discrete_curriculum_rewrites_steps_in_thinking_tokens(tmp_path):
    """Stage s: the first s reasoning steps become thinking tokens (distinct step tokens -> distinct thinking
    tokens), which the model is trained to emit; the rest stays text. Written out for one row."""
    from thinktok.envs import load_task
    from thinktok.sft import encode, step_codebook

    cfg = load_config(SFTConfig, None, ["thought.mode=vocab", "thought.num_thinking=16", "format=cot",
                                        "curriculum.stages=2", "task.spaced=true", *BASE])
    policy = load_policy("tiny", 16, False)
    task = load_task(cfg.task)
    tok, v = policy.tokenizer, policy.vocab
    code = step_codebook(tok, task.dataset["train"])
    assert len(code) == 10  # spaced digits: one code each, ten distinct thinking tokens
    row = task.dataset["train"][0]
    ex = encode(tok, policy, cfg, task, row, stage=1, code=code)
    prompt = tok(row["prompt"]).input_ids
    first = [v.think_id(code[t]) for t in tok(" " + row["steps"][0]).input_ids]
    rest = tok(" " + " ; ".join(row["steps"][1:] + [row["answer"]])).input_ids
    assert ex["input_ids"] == prompt + first + rest + [v.eos_id]
    assert ex["labels"] == [-100] * len(prompt) + first + rest + [v.eos_id]  # trained to emit its thoughts
    cfg_run, ckpt = sft(tmp_path, "thought.mode=vocab", "thought.num_thinking=16", "format=cot",
                        "task.spaced=true",
                        "curriculum.stages=2", "curriculum.epochs_per_stage=0.2", steps=-1)
    info = (ckpt / "thinktok_run.yaml").read_text()
    assert "mode: vocab" in info and "num_thinking: 16" in info
    with pytest.raises(ValueError, match="needs curriculum.stages >= 1"):
        load_config(SFTConfig, None, ["thought.mode=vocab", "thought.num_thinking=4", "format=cot",
                                      "curriculum.stages=0"])


def test_partial_code_writes_the_first_step_and_leaves_the_other_slots_free(tmp_path):
    """slot_choice=code (the discovery ladder's first rung): the first reasoning step in the discrete
    curriculum's code in the first slots, labelled; the remaining slots uniform thinking tokens, unlabelled,
    the same for an example on every call, other ones under another seed. Written out for one row."""
    from thinktok.envs import load_task
    from thinktok.sft import encode, step_codebook

    over = ["thought.mode=vocab", "thought.num_thinking=16", "slots=8", "slot_choice=code",
            "task.spaced=true", "task.reverse=true", *BASE]
    cfg = load_config(SFTConfig, None, over)
    policy = load_policy("tiny", 16, False)
    task = load_task(cfg.task)
    tok, v = policy.tokenizer, policy.vocab
    code = step_codebook(tok, task.dataset["train"])
    row = task.dataset["train"][0]
    ex = encode(tok, policy, cfg, task, row, code=code)
    prompt, answer = tok(row["prompt"]).input_ids, tok(" " + row["answer"]).input_ids
    first = [v.think_id(code[t]) for t in tok(" " + row["steps"][0]).input_ids]
    free = ex["input_ids"][len(prompt) + len(first) : len(prompt) + 8]
    assert ex["input_ids"] == prompt + first + free + answer + [v.eos_id] and len(first) + len(free) == 8
    assert all(v.think_start <= t < v.think_start + 16 for t in free)
    assert ex["labels"] == [-100] * len(prompt) + first + [-100] * len(free) + answer + [v.eos_id]
    assert encode(tok, policy, cfg, task, row, code=code) == ex
    others = [encode(tok, policy, load_config(SFTConfig, None, over + [f"seed={s}"]), task, row, code=code)
              for s in (1, 2, 3)]
    assert any(o["input_ids"] != ex["input_ids"] for o in others)
    with pytest.raises(ValueError, match="more than slots=2"):
        encode(tok, policy, load_config(SFTConfig, None, over + ["slots=2"]), task, row, code=code)
    with pytest.raises(ValueError, match="slot_choice=code chooses the tokens"):
        load_config(SFTConfig, None, over + ["format=cot"]).validate()
    _, ckpt = sft(tmp_path, *over[:-len(BASE)], steps=4)
    info = (ckpt / "thinktok_run.yaml").read_text()
    assert "mode: vocab" in info and "slots: 8" in info  # RL fills every slot, the coded ones too


def test_label_loss_is_hf_causal_lm_loss_on_labelled_positions():
    """The head runs only where a label is predicted; the loss must still be HF's full-sequence one."""
    policy = load_policy("tiny", 4, False, seed=0)
    cfg = SFTConfig(task=TaskConfig(name="hops", num_train=8, num_val=1, num_test=1), format="cot",
                    thought=ThoughtConfig(mode="vocab",
                                          num_thinking=4), curriculum=CurriculumConfig(stages=1))
    task = load_task(cfg.task)
    code = step_codebook(policy.tokenizer, task.dataset["train"])
    batch = collate([encode(policy.tokenizer, policy, cfg, task, r, 1, code) for r in task.dataset["train"]],
                    policy.vocab.eos_id)
    ref = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss
    got = label_loss(policy.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                     batch["latent_pos"])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_max_seconds_stops_a_curriculum_and_start_stage_skips(tmp_path):
    """A wall-clock limit ends training across a curriculum's stages (later stages never run); start_stage
    trains only the stages from it on, each for steps_per_stage."""
    disc = ["format=cot", "thought.mode=vocab", "thought.num_thinking=8", "curriculum.stages=2"]
    sft(tmp_path / "limited", *disc, "curriculum.steps_per_stage=3000", "train.max_seconds=1",
        "train.log_every=1")
    stages = {h["stage"] for h in json.loads((tmp_path / "limited" / "losses.json").read_text())}
    assert stages == {0}
    sft(tmp_path / "last", *disc, "curriculum.steps_per_stage=5", "curriculum.start_stage=2")
    logged = json.loads((tmp_path / "last" / "losses.json").read_text())
    assert {h["stage"] for h in logged} == {2} and logged[-1]["step"] == 5
    sft(tmp_path / "listed", *disc, "curriculum.steps_per_stage=[2,3,4]", "train.log_every=1")
    logged = json.loads((tmp_path / "listed" / "losses.json").read_text())
    assert [max(h["step"] for h in logged if h["stage"] == k) for k in (0, 1, 2)] == [2, 3, 4]
