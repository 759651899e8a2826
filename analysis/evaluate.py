"""`thinktok eval`: greedy decoding of a checkpoint on a task split; accuracy, mean text tokens and thought
steps per answer (the Coconut table's columns) and wall time, the controls (analysis/controls.py) and what
the thoughts carry (analysis/content.py), printed as one JSON object and saved. The text task has no
accuracy: its checkpoints get the text measures against a frozen teacher (analysis/text_eval.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from thinktok.checkpoint import find_checkpoint, load_extra_state, load_parallel_info, load_run_info
from thinktok.envs import TaskConfig, load_task
from thinktok.errors import UserError
from thinktok.models.head import head_columns
from thinktok.models.policy import load_policy
from thinktok.models.thought_config import SamplingConfig
from thinktok.models.thought_modes import make_mode
from thinktok.rl.sampler import sample

from .content import ContentConfig, content_measures
from .controls import CONTROLS, control_modes, derange, thought_inputs
from .text_eval import text_measures


def decode(policy, modes, task, rows: list[dict], batch_size: int) -> tuple[dict, list]:
    """Greedy answers for `rows`, `modes(lo, hi)` the mode for rows[lo:hi] -> metrics, rollouts."""
    correct, real, thought, prompt, rollouts = 0, 0, 0, 0, []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        out = sample(policy.model, modes(lo, lo + len(chunk)),
                     [policy.tokenizer(r["prompt"]).input_ids for r in chunk])
        for r, row in zip(out, chunk):
            correct += task.check(policy.tokenizer.decode(r.text_ids, skip_special_tokens=True), row)
            real += r.num_text
            thought += r.num_thought
            prompt += len(r.prompt_ids)
        rollouts += out
    n = len(rows)
    return {"accuracy": correct / n, "text_tokens_mean": real / n, "thought_steps_mean": thought / n,
            "prompt_tokens_mean": prompt / n}, rollouts


def evaluate_policy(policy, mode, task, split: str = "test", batch_size: int = 64, limit: int | None = None,
                    controls: bool = True, content: ContentConfig | None = None) -> dict:
    """Greedy accuracy and steps per answer; with `controls`, the same metrics with thoughts removed, replaced
    by a fixed pause input, and shuffled across examples (analysis/controls.py); with `content`, the content
    measures on its first rows (analysis/content.py) and their wall time."""
    rows = list(task.dataset[split])[:limit]
    mode = mode.to(policy.model.device)
    start = time.perf_counter()
    result, rollouts = decode(policy, lambda lo, hi: mode, task, rows, batch_size)
    result.update(num_examples=len(rows), wall_s=time.perf_counter() - start)
    v = policy.vocab
    if v.num_thinking:  # how often each thinking token was chosen or inserted: what the vocabulary became
        think = torch.cat([r.token for r in rollouts] or [torch.zeros(0, dtype=torch.long)])
        think = think[(think >= v.think_start) & (think < v.think_start + v.num_thinking)] - v.think_start
        result["thought_usage"] = torch.bincount(think, minlength=v.num_thinking).tolist()
    if controls and mode.cfg.mode != "none":
        embed = policy.model.get_input_embeddings()
        shuffled = derange(thought_inputs(rollouts, mode, embed))
        result["controls"] = {
            name: decode(policy, lambda lo, hi, name=name: control_modes(mode, shuffled[lo:hi], embed)[name],
                         task, rows, batch_size)[0]
            for name in CONTROLS}
    if content is not None and content.enabled:  # without thoughts: pass@k and annotated rollouts
        start = time.perf_counter()
        result["content"] = content_measures(policy, mode, task, rows, rollouts, content, batch_size)
        result["content_s"] = time.perf_counter() - start
    return result


def evaluate_text(policy, mode, task, split: str, teacher: str | None, limit: int | None = None,
                  batch_size: int = 64, max_new_tokens: int = 32, seed: int = 0) -> dict:
    """The text task's measures (analysis/text_eval.py) on the split's first `limit` rows, against the
    `teacher` checkpoint, and their wall time. seed: the sampled continuations' (the reverse KL's sample)."""
    if teacher is None:
        raise UserError("the text task is measured against a frozen teacher (reverse KL, surprisal): "
                        "pass --teacher CHECKPOINT")
    from thinktok.models.teacher import Teacher  # imports TRL: only where a teacher is used

    rows = list(task.dataset[split])[:limit]
    start = time.perf_counter()
    with torch.no_grad():
        result = text_measures(policy, mode, task, rows, Teacher.load(teacher, policy.model.device),
                               batch_size, max_new_tokens, seed)
    return {**result, "wall_s": time.perf_counter() - start}


def evaluate(path: str, task_name: str | None, split: str = "test", max_new_tokens: int = 32,
             batch_size: int = 64, device: str = "cpu", limit: int | None = None,
             task_cfg: TaskConfig | None = None, save: bool = True, policy=None,
             content: ContentConfig | None = None, teacher: str | None = None, seed: int = 0) -> dict:
    """task_cfg: evaluate on exactly this task (compare puts every run on the same one); else the run's own
    task, or a default-configured `task_name`. save: write eval_<task>_<split>.json beside the run.
    policy: the checkpoint's policy when the caller has loaded it already. content: run the content measures
    (not for parallel-thought checkpoints). teacher: the frozen teacher checkpoint the text task's measures
    (analysis/text_eval.py) score against; the text task has no accuracy and needs it. seed: the text task's
    sampled continuations (another seed: another measurement of the same policy's reverse KL)."""
    ckpt = find_checkpoint(path)
    own_task, fmt, thought = load_run_info(ckpt)
    if task_cfg is None:
        task_cfg = TaskConfig(name=task_name) if task_name and task_name != own_task.name else own_task
    if split not in ("train", "validation", "test"):
        raise UserError(f"unknown split {split!r}: expected train, validation or test")
    policy = policy or load_policy(str(ckpt), thought.vocab_tokens, thought.markers)
    policy.model.to(device)
    mode = make_mode(thought, policy.vocab, SamplingConfig(max_new_tokens=max_new_tokens, greedy=True),
                     head_columns(policy.model))
    load_extra_state(ckpt, {"mode": mode})  # what RL learned in the mode itself (a learned sigma)
    result = {"checkpoint": str(ckpt), "task": task_cfg.name, "split": split, "format": fmt,
              "mode": thought.mode}
    parallel = load_parallel_info(ckpt)
    if parallel is not None:  # parallel thoughts: NLL of the split's text with and without them
        from thinktok.rl.parallel.scorer import evaluate_parallel_checkpoint

        result.update(evaluate_parallel_checkpoint(ckpt, policy, mode.to(device), parallel,
                                                   load_task(task_cfg), split, batch_size, limit))
    elif task_cfg.name == "text":
        result.update(evaluate_text(policy, mode.to(device), load_task(task_cfg), split, teacher, limit,
                                    batch_size, max_new_tokens, seed))
    else:
        with torch.no_grad():
            result.update(evaluate_policy(policy, mode, load_task(task_cfg), split, batch_size, limit,
                                          content=content))
    if save:
        out = Path(path) if Path(path).is_dir() else ckpt
        (out / f"eval_{task_cfg.name}_{split}.json").write_text(json.dumps(result, indent=2))
    return result
