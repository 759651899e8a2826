"""Supervised training with transformers' Trainer: the base/teacher model, and the supervised
thinking-token arms that RL is compared against.

  * no thoughts (`thought: null`): a small GPT-2 trained from scratch on the task's text (answer-only or
    chain-of-thought); the default teacher and policy initialisation on machines without weights;
  * thought slots (modes vocab/single/pause): `slots` thinking tokens inserted after the prompt, their
    embeddings trained by back-propagation from the answer loss (seed 000's setup: one shared embedding
    with `single`, k distinct with `vocab`), or frozen (`train_slots: false`, the pause-token baseline);
  * continuous (Coconut's curriculum): stage s replaces the first s reasoning steps by c continuous
    thoughts each; the thought inputs are the previous position's last hidden state; loss masked there.
  * chosen slots (`slot_choice: gumbel`, mode vocab): each slot's thinking token drawn by the model itself and
    the choice trained by straight-through Gumbel-softmax from the answer loss (thinktok/gumbel_slots.py):
    the positive control for RL's discovery of a code;
  * a partial code (`slot_choice: code`, mode vocab, the discovery ladder's first rung): the first
    `code_steps` reasoning steps written into the first slots in the discrete curriculum's code, which the
    model is trained to emit; the other slots hold thinking tokens drawn uniformly per example, unlabelled:
    slots whose content nobody supervises, for RL to choose;
  * discrete (the same curriculum for a thinking vocabulary, mode vocab with format cot): stage s rewrites
    the first s reasoning steps in thinking tokens, text token t -> <think_{code(t) mod N}> with code(t) the
    index of t among the training steps' distinct ids, and trains the model to emit them. The final stage
    answers after thoughts alone: an RL warm start whose thoughts already carry the steps' content, in a
    vocabulary that matches no text (its code is only the starting point RL can move from).

While training, every thinking row's L2 distance from its initial value and cumulative gradient norm are
recorded (seed 000, figures 2, 4, 5) and saved with the checkpoint for `compare`.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.nn.utils.rnn import pad_sequence
from transformers import Trainer, TrainingArguments

from thinktok.envs import load_task
from thinktok.errors import UserError
from thinktok.models.head import head_columns, head_name, labelled_logits, restrict_head, task_text_ids
from thinktok.models.policy import Policy, freeze_rows, load_policy
from thinktok.models.thought_config import SamplingConfig, ThoughtConfig
from thinktok.models.thought_modes import make_mode

from .checkpoint import ROWS_FILE, save_run_info
from .gumbel_slots import GumbelSlots
from .sft_callbacks import HeldOutEvals, ThinkingRowRecorder, WallClock
from .sft_config import SCHEDULES, SFTConfig


def step_codebook(tokenizer, rows) -> dict[int, int]:
    """Each distinct text id of the rows' reasoning steps -> its index (sorted ids): the discrete curriculum's
    code, so that distinct step tokens get distinct thinking tokens while N covers them."""
    ids = {t for row in rows for step in row["steps"] for t in tokenizer(" " + step).input_ids}
    return {t: i for i, t in enumerate(sorted(ids))}


def encode(tokenizer, policy: Policy, cfg: SFTConfig, task, row: dict, stage: int = 0,
           code: dict[int, int] | None = None) -> dict:
    """One training example: ids, labels (-100 on prompt and thought positions; on the discrete curriculum's
    thinking tokens, the tokens themselves), latent positions: the inputs the model computes itself
    (continuous thoughts' hidden states, chosen slots' tokens)."""
    v = policy.vocab
    prompt = tokenizer(row["prompt"]).input_ids
    thought: list[int] = []
    n_latent = 0
    emit_thought = False
    if cfg.discrete_curriculum:
        done = min(stage, len(row["steps"]))
        thought = [v.think_id(code[t] % v.num_thinking) for step in row["steps"][:done]
                   for t in tokenizer(" " + step).input_ids]
        target = tokenizer(task.target({**row, "steps": row["steps"][done:]}, "cot")).input_ids
        emit_thought = True
    elif cfg.thought is not None and cfg.thought.mode == "continuous":
        done = min(stage, len(row["steps"]))
        n_latent = done * cfg.curriculum.thoughts_per_step
        rest = {**row, "steps": row["steps"][done:]}
        target = tokenizer(task.target(rest, "cot")).input_ids
        thought = [v.bot_id] + [v.eot_id] * n_latent + [v.eot_id]  # latent placeholders get hidden states
    else:
        target = tokenizer(task.target(row, cfg.format)).input_ids
        if cfg.thought is not None:
            thought = [v.think_id(j % v.num_thinking) for j in range(cfg.slots)]
    thought_labels = thought if emit_thought else [-100] * len(thought)
    if cfg.slot_choice == "code":
        thought_labels = [v.think_id(code[t] % v.num_thinking) for step in row["steps"][: cfg.code_steps]
                          for t in tokenizer(" " + step).input_ids]
        if len(thought_labels) > cfg.slots:
            raise UserError(f"slot_choice=code: {cfg.code_steps} steps of {row['prompt']!r} take "
                            f"{len(thought_labels)} thinking tokens, more than slots={cfg.slots}")
        # the free slots: uniform draws, the same for this example in every epoch and run of this seed
        free = torch.randint(v.num_thinking, (cfg.slots - len(thought_labels),),
                             generator=torch.Generator().manual_seed(cfg.seed * 1_000_003
                                                                     + zlib.crc32(row["prompt"].encode())))
        thought = thought_labels + [v.think_id(int(k)) for k in free]
        thought_labels = thought_labels + [-100] * len(free)
    ids = prompt + thought + target + [v.eos_id]
    labels = [-100] * len(prompt) + thought_labels + target + [v.eos_id]
    latent = range(len(prompt) + 1, len(prompt) + 1 + n_latent)  # after <bot>
    if cfg.slot_choice == "gumbel":  # the placeholders above are replaced by the model's draws
        latent = range(len(prompt), len(prompt) + cfg.slots)
    return {"input_ids": ids, "labels": labels, "latent_pos": list(latent)}


def collate(batch: list[dict], pad_id: int) -> dict:
    def padded(key, value):  # (B, longest), right-padded with `value`
        return pad_sequence([torch.tensor(b[key], dtype=torch.long) for b in batch], batch_first=True,
                            padding_value=value)

    mask = pad_sequence([torch.ones(len(b["input_ids"]), dtype=torch.long) for b in batch], batch_first=True)
    return {"input_ids": padded("input_ids", pad_id), "labels": padded("labels", -100),
            "attention_mask": mask, "latent_pos": padded("latent_pos", -1)}


def continuous_inputs(model, input_ids, attention_mask, latent_pos) -> torch.Tensor:
    """Coconut's forward: each latent slot's input is the last hidden state of the position before it.
    One pass per latent (the chain is sequential); gradients flow through the whole chain."""
    embeds = model.get_input_embeddings()(input_ids)  # (B, W, D)
    rows = torch.arange(len(input_ids), device=input_ids.device)
    for j in range(latent_pos.shape[1]):
        pos = latent_pos[:, j]
        has = pos >= 0
        if not has.any():
            break
        hidden = model.base_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        prev = hidden[rows, (pos - 1).clamp_min(0)]  # (B, D)
        embeds = embeds.clone()
        embeds[rows[has], pos[has]] = prev[has]
    return embeds


def label_loss(model, input_ids, attention_mask, labels, latent_pos,
               slots: GumbelSlots | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions (HF's causal-LM loss), computing the
    head only where a label is predicted (on short-answer tasks the prompt is most of each sequence and the
    head most of a small model's compute), and with a task head only over its columns.
    input_ids, attention_mask, labels: (B, W); latent_pos: (B, L) the positions whose inputs the model
    computes, -1 = none: continuous thoughts, or with `slots` the chosen slots (then the labels are scored
    under the text distribution, as RL's latent term scores the gold answer)."""
    if slots is not None:
        embeds = slots.inputs(model, input_ids, attention_mask, latent_pos)
    elif latent_pos.numel():
        embeds = continuous_inputs(model, input_ids, attention_mask, latent_pos)
    else:
        embeds = model.get_input_embeddings()(input_ids)
    hidden = model.base_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100  # (B, W-1): position t predicts token t+1
    logits, labels = labelled_logits(model, hidden[:, :-1][keep], target[keep])  # (K, V or task columns)
    if slots is not None:
        logits = slots.text_only(model, logits)
    return F.cross_entropy(logits.float(), labels)


class SFTTrainer(Trainer):
    """transformers' Trainer with the loss above (continuous thoughts or chosen slots spliced into the
    inputs). slots: the chosen slots' estimator, None without."""

    def __init__(self, *args, slots: GumbelSlots | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.slots = slots

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return label_loss(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
                          inputs["latent_pos"], self.slots)


def run_sft(cfg: SFTConfig) -> Path:
    cfg.validate()
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    thought = cfg.thought
    policy = load_policy(cfg.model.name, thought.vocab_tokens if thought else 0,
                         bool(thought and thought.markers), init=cfg.model.init, seed=cfg.seed)
    task = load_task(cfg.task)
    if cfg.model.head == "task":
        restrict_head(policy.model, task_text_ids(task, policy.tokenizer), policy.vocab.text_size)
    elif head_name(policy.model) == "task":
        raise UserError(f"{cfg.model.name} was trained with a task head: set model.head=task")
    if thought is not None and not cfg.train_slots:
        freeze_rows(policy, list(range(policy.vocab.text_size, policy.vocab.size)))
    recorder = ThinkingRowRecorder(policy)
    recorder.record(0)
    curriculum = cfg.curriculum_stages
    stages = range(cfg.curriculum.start_stage, cfg.curriculum.stages + 1) if curriculum else [0]
    code = step_codebook(policy.tokenizer, task.dataset["train"]) \
        if cfg.discrete_curriculum or cfg.slot_choice == "code" else None
    t = cfg.train
    clock, losses = WallClock(t.max_seconds), []
    slots = GumbelSlots(policy.vocab.think_start, policy.vocab.num_thinking, cfg.gumbel_tau) \
        if cfg.slot_choice == "gumbel" else None
    callbacks = [recorder, clock]
    if t.eval_every:  # decoding as the checkpoint will (no curriculum here: its final thought settings)
        mode = make_mode(inference_thought(cfg, 0), policy.vocab, SamplingConfig(greedy=True),
                         head_columns(policy.model))
        callbacks.append(HeldOutEvals(policy, mode, task, t.eval_every, t.eval_examples, t.batch_size, out))
    for stage in stages:
        data = Dataset.from_list([encode(policy.tokenizer, policy, cfg, task, row, stage, code)
                                  for row in task.dataset["train"]])
        epochs, steps = t.epochs, t.max_steps
        if curriculum:
            per_stage = cfg.curriculum.steps_per_stage
            epochs = cfg.curriculum.epochs_per_stage
            steps = per_stage[stage] if isinstance(per_stage, list) else per_stage
        args = TrainingArguments(
            output_dir=str(out / "trainer"), per_device_train_batch_size=t.batch_size, learning_rate=t.lr,
            num_train_epochs=epochs, max_steps=steps, warmup_steps=t.warmup_steps,
            lr_scheduler_type=SCHEDULES[t.schedule], max_grad_norm=t.max_grad_norm,
            logging_steps=t.log_every, report_to=["tensorboard"], save_strategy="no",
            use_cpu=t.device == "cpu", seed=cfg.seed, remove_unused_columns=False, disable_tqdm=False,
            dataloader_num_workers=0, weight_decay=0.0)
        trainer = SFTTrainer(model=policy.model, args=args, train_dataset=data, callbacks=callbacks,
                             data_collator=lambda b: collate(b, policy.vocab.eos_id), slots=slots)
        trainer.train()
        losses += [{**h, "stage": stage} for h in trainer.state.log_history if "loss" in h]
        if clock.expired():
            print(f"train.max_seconds={t.max_seconds} reached in stage {stage}")
            break
    ckpt = cfg.checkpoint_dir
    policy.save(ckpt)
    (ckpt / ROWS_FILE).write_text(json.dumps(recorder.history))
    latents = cfg.curriculum.stages * cfg.curriculum.thoughts_per_step
    if cfg.discrete_curriculum:  # the longest rewritten reasoning is the thought budget at inference
        stages = cfg.curriculum.stages
        latents = max(sum(len(policy.tokenizer(" " + step).input_ids) for step in row["steps"][:stages])
                      for row in task.dataset["train"])
    save_run_info(ckpt, task=cfg.task, format=cfg.format, thought=inference_thought(cfg, latents))
    (out / "losses.json").write_text(json.dumps(losses))
    return ckpt


def inference_thought(cfg: SFTConfig, latents: int) -> ThoughtConfig | None:
    """How a supervised checkpoint thinks at inference: slots are inserted as in training (pause
    mechanics, whatever their embeddings' mode), continuous thoughts run the final stage's count."""
    th = cfg.thought
    if th is None:
        return None
    if th.mode == "continuous":
        return ThoughtConfig(mode="continuous", num_thinking=0, max_thought_tokens=latents, sigma=th.sigma)
    if cfg.discrete_curriculum:  # the policy emits its thinking tokens itself, as RL's vocab mode
        return ThoughtConfig(mode="vocab", num_thinking=th.num_thinking, max_thought_tokens=latents,
                             init=cfg.model.init)
    if cfg.slot_choice in ("gumbel", "code"):  # the policy fills its slots itself (RL's vocab mode, slots)
        return ThoughtConfig(mode="vocab", num_thinking=th.num_thinking, slots=cfg.slots, init=cfg.model.init)
    return ThoughtConfig(mode="pause", num_thinking=th.vocab_tokens, num_pause=cfg.slots, pause_at="prompt")


def ensure_checkpoint(path: str | None, sft_config: str | None, role: str,
                      can_train: bool = True) -> str | None:
    """A checkpoint the run needs (teacher, initial policy), trained first from its SFT config when it is
    missing (fresh machines). A name without a folder or suffix (tiny, gpt2, a hub name) is not a path, as
    for load_policy, and passes through; a missing path the SFT config would not write is refused before
    any training, and so is one that can_train=False (an RL run's learner processes under accelerate,
    where an SFT run inside one of them would wait for the others) would have to train."""
    if path is None or Path(path).exists() or not sft_config:
        return path
    if not (Path(path).suffix or Path(path).parent != Path(".")):
        return path
    from thinktok.config import load_config

    sft = load_config(SFTConfig, sft_config)
    writes = sft.checkpoint_dir
    if writes.resolve() != Path(path).resolve():
        raise UserError(f"{role}={path} does not exist, and {role}_sft={sft_config} writes {writes}: set "
                        f"{role}_sft=null to use another {role}, or {role}={writes}")
    if not can_train:
        raise UserError(f"{role}={path} does not exist: train it in one process first "
                        f"(thinktok sft {sft_config}), then launch the learner processes")
    print(f"{role} {path} not found: training it with {sft_config} first")
    run_sft(sft)
    return path
