"""The `thinktok` command: one entry point, one subcommand per job.

    thinktok sample --model tiny --mode vocab --num-thinking 64 --prompt "12 * 34 =" --num-samples 4
    thinktok sft configs/sft_mult2_tiny.yaml [key=value ...]
    thinktok train configs/quickstart.yaml [key=value ...] [--resume runs/quickstart]
    thinktok eval runs/sft_mult2_tiny --task multiplication [--split test]
    thinktok compare runs/sft_slots_k runs/rl_vocab runs/parallel_quickstart [--split test]
    thinktok signal configs/quickstart.yaml [key=value ...]   (does the reward favour thinking, at step 0?)
    thinktok study configs/study_smoke.yaml [key=value ...] [--ray-address ADDR]   (every arm, seeds, report)
    thinktok summary runs/quickstart-s0 runs/quickstart-s1 runs/quickstart-s2   (start/end table, controls)
    thinktok bench rollout [--model tiny --batch 8 --new-tokens 64]
    thinktok bench parallel             (thoughts at every position vs the base model and the naive loop)
    thinktok bench attention            (CUDA only)
    thinktok bench train [CONFIG]       (1, 2, 4 rollout actors)
    thinktok bench head --batch 64      (SFT and RL step time, task-vocabulary head vs the full head)

Bad input (unknown mode, negative counts, a checkpoint without the requested thinking tokens, an
unreadable path: `thinktok.errors.UserError` and missing files) ends with one `thinktok: error: ...` line and
exit code 2; anything else is a bug in thinktok and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the whole usage block first
        raise UsageError(message)


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample annotated rollouts")
    p.add_argument("--model", default="tiny",
                   help="tiny | small | gpt2 | hub name | checkpoint or run directory (a thinktok checkpoint "
                   "brings its thought settings: the flags below override only what they state)")
    p.add_argument("--mode", default=None, help="vocab | single | continuous | soft | pause | parallel "
                   "(default: the checkpoint's, else vocab)")
    p.add_argument("--num-thinking", type=int, default=None,
                   help="thinking tokens (default: the checkpoint's, else 64; single: 1; pause: 1)")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--task", default=None,
                   help="prompts from a task's problems (multiplication, hops, ...; a checkpoint's own task "
                   "settings when it names the same task), each rollout annotated: right or wrong against "
                   "the gold answer, reward terms, group advantage, and what each thinking token stands for")
    p.add_argument("--split", default="validation", help="with --task: the split the problems come from")
    p.add_argument("--num-prompts", type=int, default=4, help="with --task: problems (a group each)")
    p.add_argument("--rewards", default="exact_match,thought_gain",
                   help="with --task: comma-separated reward terms scored (weight 1 each; no teacher terms); "
                   "thought_gain is dropped for a mode without thoughts")
    p.add_argument("--num-samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="real tokens per sample")
    p.add_argument("--max-thought-tokens", type=int, default=None,
                   help="thought steps per sample (default 32)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--sigma", type=float, default=None, help="continuous: exploration std (default 0.1)")
    p.add_argument("--noise", default=None, help="soft: none | gumbel | dirichlet (default gumbel)")
    p.add_argument("--num-pause", type=int, default=None, help="pause: tokens per insertion (default 4)")
    p.add_argument("--pause-at", default=None, help="pause: prompt | every (default prompt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--format", default="text", help="text | html | jsonl")
    p.add_argument("--out", default=None, help="write to this file instead of stdout")


def add_sft(sub) -> None:
    p = sub.add_parser("sft", help="supervised training: base/teacher models and supervised thinking tokens")
    p.add_argument("config", nargs="?", help="YAML experiment (configs/sft_*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value, dotted keys for nested fields (train.lr=3e-4)")
    p.add_argument("--help-config", action="store_true", help="print every config field: type, default, help")


def add_train(sub) -> None:
    p = sub.add_parser("train", help="distributed RL: Ray rollout/teacher actors, TRL learner")
    p.add_argument("config", nargs="?",
                   help="YAML experiment (configs/quickstart.yaml); optional with --resume")
    p.add_argument("overrides", nargs="*", help="key=value, dotted keys for nested fields (rl.lr=1e-4)")
    p.add_argument("--resume", default=None, help="run directory to continue from its last checkpoint")
    p.add_argument("--ray-address", default=None,
                   help="join an existing Ray cluster (default: start a local one)")
    p.add_argument("--verbose", action="store_true", help="forward actor logs")
    p.add_argument("--help-config", action="store_true", help="print every config field: type, default, help")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="greedy accuracy of a checkpoint on a task split")
    p.add_argument("path", help="run directory or checkpoint")
    p.add_argument("--task", default=None, help="task name (default: the one it was trained on)")
    p.add_argument("--split", default="test")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="first N examples only")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--content-limit", type=int, default=200,
                   help="examples the content measures (interventions, code table, embedding view, pass@k) "
                        "use; 0 skips them")
    p.add_argument("--teacher", default=None,
                   help="text task: the frozen teacher checkpoint its measures score against (default: the "
                        "run's own teacher, from its config.yaml)")
    p.add_argument("--seed", type=int, default=0,
                   help="text task: the seed of the sampled continuations the reverse KL is estimated on "
                        "(another seed: another measurement of the same policy, for its noise)")


def add_compare(sub) -> None:
    p = sub.add_parser("compare",
                       help="supervised vs RL-trained thinking tokens on one task: eval + row movement")
    p.add_argument("runs", nargs="+", help="run directories or checkpoints")
    p.add_argument("--task", default=None, help="task name (default: the first run's task, as configured)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None,
                   help="first N examples (windows, for parallel runs) only")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default="runs/compare", help="where compare.json and compare.png go")


def add_signal(sub) -> None:
    p = sub.add_parser("signal",
                       help="before training: advantages of rollouts with vs without thoughts, reward vs "
                                      "correctness, for a train config")
    p.add_argument("config", help="YAML experiment, as for train")
    p.add_argument("overrides", nargs="*", help="key=value, dotted keys for nested fields")
    p.add_argument("--batches", type=int, default=4,
                   help="batches of prompts_per_step x num_generations rollouts")
    p.add_argument("--out", default=None, help="also write the JSON here")


def add_study(sub) -> None:
    p = sub.add_parser("study", help="every arm (SFT, RL, training-free) over seeds as Ray tasks, one report")
    p.add_argument("config", nargs="?", help="YAML study (configs/study_smoke.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value over the study config (seeds=[0,1,2])")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: a local one)")
    p.add_argument("--remeasure", action="store_true",
                   help="evaluate every recorded (arm, seed) again from its checkpoint (new measures on "
                        "finished runs; no training), then run the rest and write the report")
    p.add_argument("--help-config", action="store_true", help="print every config field: type, default, help")


def add_summary(sub) -> None:
    p = sub.add_parser("summary",
                       help="RL runs' held-out accuracy at start and end, with thoughts and under each "
                                       "control; mean +/- std over several runs (seeds)")
    p.add_argument("runs", nargs="+", help="run directories of `thinktok train` (each with evals.jsonl)")
    p.add_argument("--json", default=None, help="also write the numbers (means, stds, per-run values) here")


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks, as ratios against a baseline run in the same process")
    p.add_argument("what", help="rl | rollout | parallel | attention | train | head")
    p.add_argument("config", nargs="?", default=None,
                   help="train: the experiment to time (default configs/quickstart.yaml); rl: one of its "
                        "three configs (default: all)")
    p.add_argument("overrides", nargs="*", help="train: key=value overrides")
    p.add_argument("--steps", type=int, default=6, help="train: RL steps per actor count; rl: timed steps")
    p.add_argument("--warm-up", type=int, default=3, help="rl: untimed steps first")
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--num-text", type=int, default=64, help="parallel: text tokens per window")
    p.add_argument("--thought-len", type=int, default=8, help="parallel: thought tokens per position")
    p.add_argument("--lookahead", type=int, default=4, help="parallel: true tokens scored after each thought")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="runs/bench")


def device(a) -> str:
    """--device, defaulting to CUDA when there is one: decided when a command runs, not when the parser is
    built, so that `--help` imports no torch."""
    if a.device is not None:
        return a.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_sample(a) -> None:
    from thinktok.analysis.samples import sample_command

    sample_command(a)


def run_sft(a) -> None:
    from thinktok.config import load_config, save_config
    from thinktok.sft import run_sft
    from thinktok.sft_config import SFTConfig

    if a.help_config:
        return print_config_help(SFTConfig)
    if a.config is None:
        raise UsageError("sft needs a CONFIG")
    cfg = load_config(SFTConfig, a.config, a.overrides)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.out_dir / "config.yaml")
    print(f"checkpoint: {run_sft(cfg)}")


def print_config_help(cls) -> None:
    """`--help-config`: every field, nested ones dotted, as `key: type = default  help`."""
    from thinktok.config import describe

    print("\n".join(describe(cls)))


def run_train(a) -> None:
    from thinktok.config import load_config
    from thinktok.rl.config import TrainConfig
    from thinktok.rl.train import run_train

    if a.help_config:
        return print_config_help(TrainConfig)
    if a.config and "=" in a.config:  # `--resume RUN key=value`: the first override landed in `config`
        a.overrides, a.config = [a.config, *a.overrides], None
    path = Path(a.resume) / "config.yaml" if a.resume else a.config
    if path is None:
        raise UsageError("train needs a CONFIG (or --resume RUN_DIR)")
    extra = [f"ray.address={a.ray_address}"] if a.ray_address else []
    extra += ["ray.verbose=true"] if a.verbose else []
    # a resumed run continues where it lies, not where its config says it was first written (a copy or a moved
    # run would otherwise write into the original)
    extra += [f"run_dir={a.resume}"] if a.resume else []
    cfg = load_config(TrainConfig, path, [*a.overrides, *extra])
    final = run_train(cfg, resume=bool(a.resume))
    if int(os.environ.get("RANK", 0)):  # a learner process under accelerate other than the first
        return
    print(f"final checkpoint: {final}")
    if cfg.rollout == "sequential" and cfg.eval_every and cfg.task.name != "text":  # text: no accuracy
        from thinktok.analysis.compare import summary

        summary([str(cfg.out_dir)])


def run_eval(a) -> None:
    import json

    from thinktok.analysis.content import ContentConfig
    from thinktok.analysis.evaluate import evaluate

    content = ContentConfig(limit=a.content_limit) if a.content_limit > 0 else None
    teacher, own = a.teacher, Path(a.path) / "config.yaml"
    if teacher is None and own.exists():  # an RL run's config names its teacher
        import yaml

        teacher = (yaml.safe_load(own.read_text()) or {}).get("teacher")
    print(json.dumps(evaluate(a.path, a.task, a.split, a.max_new_tokens, a.batch_size, device(a), a.limit,
                              content=content, teacher=teacher, seed=a.seed)))


def run_compare(a) -> None:
    from thinktok.analysis.compare import compare

    compare(a.runs, a.task, a.split, a.limit, device(a), Path(a.out))


def run_study(a) -> None:
    from thinktok.config import load_config
    from thinktok.study import run_study
    from thinktok.study_config import StudyConfig

    if a.help_config:
        return print_config_help(StudyConfig)
    if a.config is None:
        raise UsageError("study needs a CONFIG")
    out = run_study(load_config(StudyConfig, a.config, a.overrides), a.ray_address,
                    remeasure_done=a.remeasure)
    print(f"report: {out / 'report.md'} and {out / 'report.html'}")


def run_summary(a) -> None:
    import json

    from thinktok.analysis.compare import summary

    result = summary(a.runs)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


def run_signal(a) -> None:
    import json

    from thinktok.analysis.signal import run_signal
    from thinktok.config import load_config
    from thinktok.rl.config import TrainConfig

    cfg = load_config(TrainConfig, a.config, a.overrides)
    print(json.dumps(run_signal(cfg, a.batches, Path(a.out) if a.out else None), indent=2))


def run_bench(a) -> None:
    if a.what == "rl":
        from thinktok.analysis.bench_rl import CONFIGS, bench_rl

        bench_rl((a.config,) if a.config else CONFIGS, a.steps, a.warm_up, Path(a.out))
    elif a.what == "rollout":
        from thinktok.analysis.bench import bench_rollout

        bench_rollout(a.model, a.batch, a.new_tokens, a.repeats, device(a), a.dtype, Path(a.out))
    elif a.what == "parallel":
        from thinktok.analysis.bench import bench_parallel

        bench_parallel(a.model, a.batch, a.num_text, a.thought_len, a.lookahead, a.repeats, device(a),
                       a.dtype, Path(a.out))
    elif a.what == "train":
        from thinktok.analysis.bench import bench_train

        bench_train(a.config or "configs/quickstart.yaml", a.overrides, a.steps, (1, 2, 4), Path(a.out))
    elif a.what == "attention":
        from thinktok.kernels.bench import bench_attention

        bench_attention(Path(a.out))
    elif a.what == "head":
        from thinktok.analysis.bench import bench_head

        bench_head(a.model, a.batch, a.repeats, a.device, Path(a.out))
    else:
        raise UsageError(f"unknown benchmark {a.what!r}: expected rl, rollout, parallel, attention, train or "
                         "head")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = Parser(prog="thinktok", description="Teach GPT-2 to think in tokens of its own.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_sample(sub)
    add_sft(sub)
    add_train(sub)
    add_eval(sub)
    add_compare(sub)
    add_signal(sub)
    add_summary(sub)
    add_study(sub)
    add_bench(sub)
    from thinktok.errors import PoisonedStep, UserError

    try:
        a = parser.parse_args(argv)
        {"sample": run_sample, "sft": run_sft, "train": run_train, "eval": run_eval, "compare": run_compare,
         "signal": run_signal, "summary": run_summary, "study": run_study, "bench": run_bench}[a.command](a)
    # user errors (and a diverged step, which names its cause) are one line; a bug keeps its traceback
    except (UsageError, UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            PoisonedStep) as e:
        print(f"thinktok: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
