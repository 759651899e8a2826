"""What a supervised run records and obeys while it trains (thinktok/sft.py), as transformers callbacks:
the thinking rows' movement and gradients, a wall-clock budget, held-out evals."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from thinktok.analysis.evaluate import evaluate_policy
from thinktok.models.policy import Policy
from thinktok.models.vocab import row_movement


class ThinkingRowRecorder(TrainerCallback):
    """Per thinking row: L2 distance from init and cumulative gradient norm, at every logging step."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.cum_grad = torch.zeros(policy.vocab.size - policy.vocab.text_size)
        self.history: dict[str, list] = {"step": [], "movement": [], "cum_grad_norm": []}

    def on_pre_optimizer_step(self, args, state, control, **kw):
        grad = self.policy.model.get_input_embeddings().weight.grad
        if grad is not None:
            self.cum_grad += grad[self.policy.vocab.text_size :].detach().float().norm(dim=1).cpu()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % args.logging_steps == 0 or state.global_step == state.max_steps:
            self.record(state.global_step)

    def record(self, step: int) -> None:
        self.history["step"].append(step)
        self.history["movement"].append(row_movement(self.policy.model, self.policy.vocab,
                                                     self.policy.init_rows).tolist())
        self.history["cum_grad_norm"].append(self.cum_grad.tolist())


class WallClock(TrainerCallback):
    """Stops training once `limit` seconds (0: never) have passed since the first training step began:
    setup (data, workers) and the step-0 evals are not counted, and a curriculum's stages share one clock."""

    def __init__(self, limit: float):
        self.limit, self.start = limit, None

    def expired(self) -> bool:
        return self.limit > 0 and self.start is not None and time.monotonic() - self.start >= self.limit

    def on_step_begin(self, args, state, control, **kw):
        self.start = self.start or time.monotonic()

    def on_step_end(self, args, state, control, **kw):
        expired = self.expired()
        if self.limit > 0 and args.world_size > 1:  # every process stops at the same step, or one would wait
            flag = torch.tensor([float(expired)], device=args.device)  # forever in the next step's all-reduce
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            expired = bool(flag.item())
        control.should_training_stop |= expired


class HeldOutEvals(TrainerCallback):
    """Greedy validation accuracy with the controls (analysis/evaluate.py), at step 0, every `every` steps and
    the last: one evals.jsonl line each, in the format of RL's (rl/logs.py), `examples_seen` included, so
    that a study draws both on one learning curve. mode: the thought mode the checkpoint decodes in."""

    def __init__(self, policy: Policy, mode, task, every: int, examples: int, batch_size: int, out: Path):
        self.policy, self.mode, self.task, self.every, self.examples = policy, mode, task, every, examples
        self.batch_size, self.path = batch_size, out / "evals.jsonl"

    def on_train_begin(self, args, state, control, **kw):
        if state.global_step == 0:
            self.evaluate(0)

    def on_step_end(self, args, state, control, **kw):
        step = state.global_step
        if step % self.every == 0 or step == state.max_steps or control.should_training_stop:
            self.evaluate(step)

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        model = self.policy.model
        was_training = model.training
        model.eval()
        result = evaluate_policy(self.policy, self.mode, self.task, "validation", limit=self.examples)
        model.train(was_training)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "examples_seen": step * self.batch_size, **result}) + "\n")
