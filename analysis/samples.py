"""`thinktok sample`: annotated rollouts of any model or checkpoint (a checkpoint's own thought settings, any
flag on top), printed as text or written as HTML or JSONL (analysis/render.py draws them). With --task the
prompts are a task's problems, `num_samples` rollouts each (a group), annotated by analysis/annotate.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from thinktok.errors import UserError


def sample_command(a) -> None:
    """`thinktok sample`: the flags of thinktok/cli.py's `add_sample` -> rollouts as text, HTML or JSONL."""
    from rich.console import Console

    from thinktok.analysis.render import to_html, to_json, to_jsonl, to_rich, verdict
    from thinktok.models.head import head_columns
    from thinktok.models.policy import load_policy
    from thinktok.models.thought_config import SamplingConfig
    from thinktok.models.thought_modes import make_mode
    from thinktok.rl.sampler import sample

    if a.format not in ("text", "html", "jsonl"):
        raise UserError(f"unknown format {a.format!r}: expected text, html or jsonl")
    if a.num_samples < 1 or a.num_prompts < 1:
        raise UserError(f"--num-samples and --num-prompts must be >= 1, got {a.num_samples}, {a.num_prompts}")
    if a.task and a.prompt:
        raise UserError("--task takes its prompts from the task's problems: drop --prompt")
    # parallel: a thought of max_thought_tokens after every prompt token (Quiet-STaR)
    cfg, model_path, parallel = sample_thought(a)
    sampling = SamplingConfig(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                              max_new_tokens=a.max_new_tokens)
    cfg.validate()
    sampling.validate()
    policy = load_policy(model_path, cfg.vocab_tokens, cfg.markers, init=cfg.init, seed=a.seed)
    model = policy.model.to(a.device)
    mode = make_mode(cfg, policy.vocab, sampling, head_columns(model)).to(a.device)
    if a.task and not parallel:
        records = task_records(a, policy, mode, cfg, sampling)
    elif parallel:
        texts = [t for t in (a.prompt or ["12 * 34 ="]) for _ in range(a.num_samples)]
        records = [sample_window(model, mode, policy.tokenizer, t, cfg.max_thought_tokens, a.seed + i)
                   for i, t in enumerate(texts)]
    else:
        texts = [t for t in (a.prompt or ["12 * 34 ="]) for _ in range(a.num_samples)]
        rollouts = sample(model, mode, [policy.tokenizer(t).input_ids for t in texts], seed=a.seed)
        records = [to_json(r, policy.tokenizer, model.get_input_embeddings().weight) for r in rollouts]
    if a.format == "text":
        with open(a.out, "w") if a.out else open(os.devnull, "w") as f:
            console = Console(file=f if a.out else None, force_terminal=False if a.out else None,
                              soft_wrap=True)
            for i, rec in enumerate(records):
                console.print(f"[dim]— sample {i} · {rec['num_text']} text, {rec['num_thought']} thought "
                              f"steps[/dim]")
                if verdict(rec):
                    console.print(verdict(rec), markup=False)
                console.print(to_rich(rec))
        return
    payload = to_jsonl(records) if a.format == "jsonl" else to_html(
        records, title=f"thinktok sample · {a.model} · {'parallel' if parallel else cfg.mode}")
    if a.out:
        Path(a.out).write_text(payload)
    else:
        sys.stdout.write(payload)


def task_records(a, policy, mode, cfg, sampling) -> list[dict]:
    """--task: the first --num-prompts problems of --split, --num-samples rollouts each, annotated."""
    from dataclasses import replace

    from thinktok.analysis.annotate import annotate, checkpoint_codes
    from thinktok.checkpoint import RUN_INFO, find_checkpoint, load_run_info
    from thinktok.envs import TaskConfig, load_task
    from thinktok.models.thought_modes import with_sampling
    from thinktok.rl.rewards import RewardConfig, RewardModel
    from thinktok.rl.sampler import sample

    run_like = any((Path(a.model) / p).exists() for p in (RUN_INFO, "checkpoint", "trainer"))
    own = load_run_info(find_checkpoint(a.model))[0] if run_like else None
    task = load_task(own if own is not None and own.name == a.task else TaskConfig(name=a.task))
    if a.split not in task.dataset:
        raise UserError(f"unknown split {a.split!r}: expected one of {', '.join(task.dataset)}")
    terms = [t for t in a.rewards.split(",") if t and not (t == "thought_gain" and cfg.mode == "none")]
    if {"teacher_loglik", "teacher_kl"} & set(terms):
        raise UserError("thinktok sample scores without a teacher: drop teacher_loglik/teacher_kl from "
                        "--rewards")
    rows = list(task.dataset[a.split])[: a.num_prompts]
    rows = [row for row in rows for _ in range(a.num_samples)]
    model = policy.model
    rollouts = sample(model, mode, [policy.tokenizer(r["prompt"]).input_ids for r in rows], seed=a.seed)
    scorer = RewardModel(RewardConfig(weights={t: 1.0 for t in terms}), task=task, tokenizer=policy.tokenizer,
                         policy=model, mode=mode) if terms else None
    greedy = with_sampling(mode, replace(sampling, greedy=True), model.device)
    codes = checkpoint_codes(policy, greedy, task)
    return annotate(rollouts, rows, a.num_samples, policy, task, scorer, codes)


def sample_thought(a) -> tuple:
    """-> (thought settings, model path, parallel?) of `thinktok sample`: a thinktok checkpoint's own settings
    (its run info), else the defaults, with every flag the user gave on top."""
    from dataclasses import replace

    from thinktok.checkpoint import RUN_INFO, find_checkpoint, load_parallel_info, load_run_info
    from thinktok.models.thought_config import ThoughtConfig

    run_like = any((Path(a.model) / p).exists() for p in (RUN_INFO, "checkpoint", "trainer"))
    ckpt = find_checkpoint(a.model) if run_like else None
    base, own_mode, model_path = ThoughtConfig(), "vocab", a.model
    if ckpt is not None:
        model_path, base = str(ckpt), load_run_info(ckpt)[2]
        own_mode = "parallel" if load_parallel_info(ckpt) is not None else base.mode
    mode = a.mode if a.mode is not None else own_mode
    stated = {"mode": "vocab" if mode == "parallel" else mode, "num_thinking": a.num_thinking,
              "max_thought_tokens": a.max_thought_tokens, "sigma": a.sigma, "noise": a.noise,
              "num_pause": a.num_pause, "pause_at": a.pause_at}
    if a.mode is not None and a.mode != own_mode:  # another mode: its defaults, not the checkpoint's settings
        base = ThoughtConfig()
        if a.num_thinking is None:
            stated["num_thinking"] = {"vocab": 64, "parallel": 64, "single": 1, "pause": 1}.get(mode, 0)
    cfg = replace(base, **{k: v for k, v in stated.items() if v is not None})
    cfg.validate()
    return cfg, model_path, mode == "parallel"


def sample_window(model, mode, tokenizer, text: str, thought_len: int, seed: int) -> dict:
    """--mode parallel: the prompt as one window, a thought sampled after every token at once."""
    import torch

    from thinktok.analysis.render import parallel_to_json
    from thinktok.rl.parallel.rollout import sample_parallel

    real = torch.tensor([tokenizer(text).input_ids], device=model.device)
    r = sample_parallel(model, mode, real, thought_len, seed)
    return parallel_to_json(r.text[0], r.thoughts[0], r.logprob[0], tokenizer)
