"""`thinktok compare RUN [RUN ...]`: supervised and RL-trained thinking tokens side by side on one task, and
`thinktok summary RUN [RUN ...]`: an RL run's held-out accuracy at its start and end, with its thoughts and
under each control (mean +/- std over runs: seeds of one setting).

For every run (or checkpoint): the `eval` numbers on the same task and split (the first run's task unless
`--task`), and how far its thinking rows moved from their initial values (seed 000's measure: one shared
embedding barely moves, distinct ones do). Prints a table, saves compare.json and compare.png (accuracy or
held-out NLL per run, the sorted per-row movement, and movement over training where the run recorded it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: files only, no display or global state on a training box
from rich.console import Console
from rich.table import Table

from thinktok.checkpoint import ROWS_FILE, find_checkpoint, load_run_info
from thinktok.envs import TaskConfig
from thinktok.errors import UserError
from thinktok.models.policy import Policy, load_policy
from thinktok.models.vocab import row_movement

from .controls import CONTROLS
from .evaluate import evaluate
from .format import fmt, mean_std


def movement(ckpt: Path, policy: Policy) -> dict:
    """Thinking-row L2 distance from init now, and its history when training recorded one (SFT runs)."""
    if policy.vocab.num_thinking == 0:
        return {"num_rows": 0, "rows": [], "history": None}
    rows = row_movement(policy.model, policy.vocab, policy.init_rows)
    history = json.loads((ckpt / ROWS_FILE).read_text()) if (ckpt / ROWS_FILE).exists() else None
    return {"num_rows": len(rows), "rows": rows.tolist(), "mean": rows.mean().item(),
            "max": rows.max().item(),
            "history": history}


def compare(paths: list[str], task: str | None, split: str, limit: int | None, device: str,
            out: Path) -> dict:
    if not paths:
        raise UserError("compare needs at least one run directory or checkpoint")
    ckpts = [find_checkpoint(p) for p in paths]
    task_cfg = TaskConfig(name=task) if task else load_run_info(ckpts[0])[0]
    runs = []
    for path, ckpt in zip(paths, ckpts):
        _, _, thought = load_run_info(ckpt)
        policy = load_policy(str(ckpt), thought.vocab_tokens, thought.markers)
        with torch.no_grad():
            result = evaluate(path, None, split, device=device, limit=limit, task_cfg=task_cfg, save=False,
                              policy=policy)
        runs.append({"path": path, **result, "movement": movement(ckpt, policy)})
    report = {"task": task_cfg.name, "split": split, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    plot(runs, out / "compare.png", f"{task_cfg.name} · {split}")
    print_table(runs)
    print(f"saved {out / 'compare.json'} and {out / 'compare.png'}")
    return report


def label(run: dict) -> str:
    return f"{Path(run['path']).name} ({run['mode']}, {run['format']})"


def print_table(runs: list[dict]) -> None:
    table = Table("run", "mode", "format", "accuracy / nll with→without", "controls: none / pause / shuffled",
                  "thought steps", "rows", "row movement mean/max")
    for r in runs:
        parallel = r["format"] == "parallel"
        score = f"{r['nll_thought']:.3f} → {r['nll_base']:.3f}" if parallel else f"{r['accuracy']:.3f}"
        c = r.get("controls")  # accuracy under analysis/controls.py's controls; parallel runs have none
        controls = " / ".join(f"{c[k]['accuracy']:.3f}" for k in CONTROLS) if c else "-"
        steps = str(r.get("thought_len", "")) if parallel else f"{r['thought_steps_mean']:.2f}"
        m = r["movement"]
        moved = f"{m['mean']:.3f} / {m['max']:.3f}" if m["num_rows"] else "-"
        table.add_row(Path(r["path"]).name, r["mode"], r["format"], score, controls, steps,
                      str(m["num_rows"]), moved)
    console = Console()
    if not console.is_terminal:  # a log file: no 80-column wrap
        console.width = 160
    console.print(table)


SUMMARY_COLUMNS = ("learned", *CONTROLS, "thought_steps")


def start_end(run_dir: Path) -> dict:
    """{"start": {column: value}, "end": {...}, "steps": (first, last)} from a run's first and last eval."""
    path = Path(run_dir) / "evals.jsonl"
    if not path.exists():
        raise UserError(f"{run_dir} has no evals.jsonl: summary needs a `thinktok train` run with "
                         f"eval_every > 0")
    evals = [json.loads(line) for line in path.read_text().splitlines()]
    if "controls" not in evals[0]:
        raise UserError(f"{path} has no controls (a parallel run reports NLLs: use thinktok compare)")

    def row(e):
        return {"learned": e["accuracy"], **{k: e["controls"][k]["accuracy"] for k in CONTROLS},
                "thought_steps": e["thought_steps_mean"]}

    return {"start": row(evals[0]), "end": row(evals[-1]), "steps": (evals[0]["step"], evals[-1]["step"])}


def summary(run_dirs: list[str]) -> dict:
    """Start/end table over runs (one setting's seeds): per column mean, std (0 for one run) and values."""
    if not run_dirs:
        raise UserError("summary needs at least one run directory")
    runs = [start_end(Path(d)) for d in run_dirs]
    out = {"runs": list(run_dirs), "steps": [r["steps"] for r in runs]}
    for when in ("start", "end"):
        vals = {c: [float(r[when][c]) for r in runs] for c in SUMMARY_COLUMNS}
        out[when] = {c: dict(zip(("mean", "std"), mean_std(v)), values=v) for c, v in vals.items()}
    table = Table("", "learned thoughts", "no thoughts", "pause", "shuffled thoughts", "thought steps",
                  title=f"held-out accuracy (validation), {len(runs)} run(s): mean ± std")
    for when in ("start", "end"):
        step = "/".join(sorted({str(s[0 if when == "start" else 1]) for s in out["steps"]}))
        table.add_row(f"{when} (step {step})", *(fmt(out[when][c]) for c in SUMMARY_COLUMNS))
    Console(width=160).print(table)
    return out


def plot(runs: list[dict], path: Path, title: str) -> None:
    fig = Figure(figsize=(16, 4.5))
    ax_score, ax_rows, ax_hist = fig.subplots(1, 3)
    names = [label(r) for r in runs]
    scores = [r["nll_thought"] if r["format"] == "parallel" else r["accuracy"] for r in runs]
    ax_score.barh(names, scores, color=["#c2185b" if r["format"] == "parallel" else "#0a6ebd" for r in runs])
    ax_score.set_xlabel("accuracy (blue) / held-out NLL with thoughts (pink)")
    for r, name in zip(runs, names):
        if r["movement"]["num_rows"]:
            ax_rows.plot(sorted(r["movement"]["rows"], reverse=True), label=name)
            h = r["movement"]["history"]
            if h:
                steps = [(s, sum(m) / len(m)) for s, m in zip(h["step"], h["movement"]) if m]
                ax_hist.plot([s for s, _ in steps], [v for _, v in steps], label=name)
    ax_rows.set(xlabel="thinking row (sorted)", ylabel="L2 distance from init", title="row movement")
    ax_hist.set(xlabel="training step", ylabel="mean row distance from init",
                title="movement during training (SFT)")
    for ax in (ax_rows, ax_hist):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no run has data here", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
