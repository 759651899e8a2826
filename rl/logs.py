"""What a run writes while it trains: metrics.jsonl (one line per step), evals.jsonl and annotated samples at
step 0, every `eval_every` steps and the last step, and the progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from thinktok.analysis.annotate import annotate, checkpoint_codes, reward_model
from thinktok.analysis.evaluate import evaluate_policy, evaluate_text
from thinktok.analysis.render import to_html, to_jsonl
from thinktok.models.thought_config import SamplingConfig
from thinktok.models.thought_modes import with_sampling

from .config import TrainConfig
from .sampler import sample


class RunLogger(TrainerCallback):
    """extra_modules: the learner's (the thought mode, a mixing head), which evals use with the model the
    Trainer hands every callback. val_windows: the parallel path's validation windows (None: sequential).
    Under accelerate, the first process alone writes and evaluates (the others go on to the next step's
    collectives and wait there), and a step's rollouts are every process's."""

    def __init__(self, cfg: TrainConfig, extra_modules: dict[str, nn.Module], policy, task,
                 val_windows: list[list[int]] | None = None):
        self.cfg, self.extra_modules, self.policy, self.task = cfg, extra_modules, policy, task
        self.val_windows = val_windows
        self.out = cfg.out_dir
        self.last = time.perf_counter()

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.rollouts = self.cfg.rl.prompts_per_step * self.cfg.rl.num_generations * args.world_size
        # the start of the run's start/end table
        if self.cfg.eval_every and state.global_step == 0 and state.is_world_process_zero:
            self.evaluate(0, model)

    def on_step_end(self, args, state, control, model=None, **kw):
        step = state.global_step
        last = step == state.max_steps or control.should_training_stop  # WallClock runs before this
        if self.cfg.eval_every and (step % self.cfg.eval_every == 0 or last) and state.is_world_process_zero:
            self.evaluate(step, model)

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        now = time.perf_counter()
        n = self.rollouts
        line = {"step": state.global_step, "examples_seen": state.global_step * n,
                "reward_mean": logs.get("reward"),
                "reward_std": logs.get("reward_std"),
                "kl": logs.get("kl", 0.0), "loss": logs.get("loss"), "samples_per_s": n / (now - self.last),
                "logprob_mismatch": logs.get("logprob_mismatch"),
                **({"latent_nll": logs.get("latent_nll")} if self.cfg.rl.latent_coef else {}),
                **({"entropy": logs.get("entropy")} if self.cfg.rl.entropy_coef else {}),
                **{k.removeprefix("rollout/"): v for k, v in logs.items() if k.startswith("rollout/")}}
        self.last = now
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    @torch.no_grad()
    def evaluate(self, step: int, model: nn.Module) -> None:
        """One evals.jsonl line and annotated samples/step_N.{jsonl,html}."""
        run = self.evaluate_parallel if self.val_windows is not None else self.evaluate_sequential
        result, records = run(step, model)
        with open(self.out / "evals.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "examples_seen": step * self.rollouts, **result}) + "\n")
        samples = self.out / "samples"
        samples.mkdir(exist_ok=True)
        (samples / f"step_{step}.jsonl").write_text(to_jsonl(records))
        (samples / f"step_{step}.html").write_text(to_html(records, title=f"{self.cfg.name} · step {step}"))
        model.train()

    def evaluate_sequential(self, step: int, model: nn.Module) -> tuple[dict, list[dict]]:
        """Greedy accuracy on validation prompts, with the controls (the text task, which has no accuracy:
        seed 004's measures against the run's teacher, reverse KL first), and sampled rollouts."""
        mode = self.extra_modules["mode"]
        greedy = with_sampling(mode, SamplingConfig(**{**vars(self.cfg.sampling), "greedy": True}),
                               model.device)
        if self.cfg.task.name == "text":
            result = evaluate_text(self.policy, greedy, self.task, "validation", self.cfg.teacher,
                                   limit=self.cfg.eval_examples,
                                   max_new_tokens=self.cfg.sampling.max_new_tokens)
            del result["rollouts"]  # the samples page shows rollouts
        else:
            result = evaluate_policy(self.policy, greedy, self.task, "validation",
                                     limit=self.cfg.eval_examples)
        group = self.cfg.rl.num_generations
        rows = list(self.task.dataset["validation"])[: max(1, self.cfg.samples_per_eval // group)]
        rows = [row for row in rows for _ in range(group)]
        rollouts = sample(model, mode, [self.policy.tokenizer(r["prompt"]).input_ids for r in rows],
                          seed=step, weight_version=step)
        scorer = reward_model(self.cfg.rewards, self.policy, mode, self.task)
        codes = checkpoint_codes(self.policy, greedy, self.task)
        algo = self.cfg.rl.algo
        return result, annotate(rollouts, rows, group, self.policy, self.task, scorer, codes, algo)

    def evaluate_parallel(self, step: int, model: nn.Module) -> tuple[dict, list[dict]]:
        """Validation windows: true-text NLL with and without thoughts (whatever the training scorer), and
        annotated windows with each position's thought after its token."""
        from thinktok.analysis.render import parallel_to_json

        from .parallel.rollout import sample_parallel
        from .parallel.scorer import evaluate_parallel

        p, mode = self.cfg.parallel, self.extra_modules["mode"]
        windows = self.val_windows[: self.cfg.eval_examples]
        result = evaluate_parallel(model, mode, p, windows, self.extra_modules.get("mixing_head"), seed=step)
        real = torch.tensor(windows[: self.cfg.samples_per_eval], device=model.device)
        rollout = sample_parallel(model, mode, real, p.thought_len, seed=step, weight_version=step)
        return result, [parallel_to_json(rollout.text[i], rollout.thoughts[i], rollout.logprob[i],
                                         self.policy.tokenizer)
                        for i in range(len(real))]


class RewardProgress(ProgressCallback):
    """The Trainer's progress bar with reward and throughput on it, instead of a dict printed per step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "reward" in logs:
            step_s = max(logs.get("step_time", 0.0), 1e-9)
            rollouts = args.per_device_train_batch_size * args.world_size
            self.training_bar.set_postfix(reward=f"{logs['reward']:.3f}",
                                          samples_s=f"{rollouts / step_s:.1f}")


def truncate_after(path: Path, step: int) -> None:
    """Drop lines of steps after `step` (a resumed run rewrites them)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))
