"""A study's learning curves: every arm's held-out accuracy (and its shuffled-thoughts control; on the text
task, which has no accuracy, its reverse KL to the teacher) and, for RL arms, its training reward against
examples seen (one example: one rollout, or one supervised example), mean and spread over seeds. Read from
the runs' own logs: `evals.jsonl` (RL's evals; SFT's with train.eval_every) and `metrics.jsonl` (RL's
steps), each line carrying `examples_seen`."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

REWARD_WINDOW = 50  # steps in the rolling mean of a reward curve: one step's reward is a few dozen rollouts


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def over_seeds(runs: list[list[tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-seed (x, y) points -> x, mean, std at every x that every seed reached (a seed stopped early by
    a wall-clock budget ends the curve there rather than bending its mean)."""
    by_x: dict[float, list[float]] = defaultdict(list)
    for run in runs:
        for x, y in run:
            by_x[x].append(y)
    xs = sorted(x for x, ys in by_x.items() if len(ys) == len(runs))
    ys = [np.array(by_x[x]) for x in xs]
    return np.array(xs), np.array([y.mean() for y in ys]), np.array([y.std() for y in ys])


def rolling(points: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    ys = np.array([y for _, y in points], dtype=float)
    if len(ys) < window:
        return points
    mean = np.convolve(ys, np.ones(window) / window, mode="valid")
    return [(points[i + window - 1][0], float(m)) for i, m in enumerate(mean)]


Curve = tuple[np.ndarray, np.ndarray, np.ndarray]  # x, mean, std over seeds


def curves(study: Path, arms: list[str], seeds: list[int]) -> tuple[str, dict, dict, dict]:
    """The measure (accuracy; reverse_kl where no run logged an accuracy: the text task) and, per arm that
    every seed logged: its held-out curve, its shuffled-thoughts control's (accuracy only), its rolling
    training reward, each a Curve."""
    logged = {arm: [read_lines(study / arm / f"seed{s}" / "evals.jsonl") for s in seeds] for arm in arms}
    text = not any("accuracy" in e for runs in logged.values() for run in runs for e in run)
    measure = "reverse_kl" if text else "accuracy"
    acc, shuffled, reward = {}, {}, {}
    for arm in arms:
        evals = [[e for e in run if "examples_seen" in e and measure in e] for run in logged[arm]]
        if all(evals):
            acc[arm] = over_seeds([[(e["examples_seen"], e[measure]) for e in run] for run in evals])
            if not text and all("controls" in e for run in evals for e in run):
                control = [[(e["examples_seen"], e["controls"]["shuffled_thoughts"]["accuracy"]) for e in run]
                           for run in evals]
                shuffled[arm] = over_seeds(control)
        steps = [read_lines(study / arm / f"seed{s}" / "metrics.jsonl") for s in seeds]
        steps = [[(m["examples_seen"], m["reward_mean"]) for m in run if "examples_seen" in m]
                 for run in steps]
        if all(steps):
            reward[arm] = over_seeds([rolling(run, REWARD_WINDOW) for run in steps])
    return measure, acc, shuffled, reward


def learning_curves(study: Path, arms: list[str], seeds: list[int], out: Path) -> Path | None:
    """The figure (the held-out measure, and reward where any arm has one), or None when no arm logged an
    eval."""
    measure, acc, shuffled, reward = curves(study, arms, seeds)
    if not acc:
        return None
    text = measure == "reverse_kl"
    fig = Figure(figsize=(11 if reward else 7, 4.5))
    axes = fig.subplots(1, 2 if reward else 1, squeeze=False)[0]
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}
    scale = 1 if text else 100
    for arm, (x, m, s) in acc.items():
        axes[0].plot(x, scale * m, "o-", ms=3, color=colors[arm], label=arm)
        axes[0].fill_between(x, scale * (m - s), scale * (m + s), color=colors[arm], alpha=0.2)
    for arm, (x, m, _) in shuffled.items():
        axes[0].plot(x, scale * m, "--", color=colors[arm], lw=1)
    if text:
        axes[0].set(xlabel="rollouts seen", ylabel="validation reverse KL to the teacher (nats/token)",
                    title="reverse KL(student || teacher), mean ± std over seeds")
    else:
        axes[0].set(xlabel="examples seen (rollouts, or supervised examples)",
                    ylabel="validation accuracy (%), mean ± std over seeds",
                    title="accuracy (solid) and its shuffled-thoughts control (dashed)")
    axes[0].legend(fontsize=7)
    if reward:
        for arm, (x, m, s) in reward.items():
            axes[1].plot(x, m, color=colors[arm], label=arm)
            axes[1].fill_between(x, m - s, m + s, color=colors[arm], alpha=0.2)
        axes[1].set(xlabel="rollouts seen", ylabel=f"training reward ({REWARD_WINDOW}-step rolling mean)",
                    title="RL arms: reward, mean ± std over seeds")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out
