"""`thinktok study CONFIG [key=value ...] [--ray-address ADDR]`: the experiment itself. Every arm (a config
fragment over `thinktok sft` or `thinktok train`, or a training-free evaluation of another arm's checkpoint)
runs for every seed as a Ray task with its resource request, on a local cluster or an existing one. Each
finished (arm, seed) is evaluated on the study's split, with the controls, and recorded in
`<study>/<arm>/seed<k>/result.json`; a restarted study never reruns a recorded one. Arms that start from
another arm's checkpoint (`init_from`, same seed) wait for it.

Failures. A task killed from outside (Ray's memory monitor, a SIGKILL of its worker, its node's death) is
resubmitted at once, ahead of every (arm, seed) not yet started, up to `max_attempts` in all; the rerun
resumes an RL arm from its last checkpoint and restarts an SFT arm. An arm's own Python error is not retried.
Each failure's full text (the traceback, for a Python error) goes to the arm's `error.log`; an (arm, seed)
that fails for good is recorded with its cause in `study.log`, `study.json` and the report, while the other
arms finish. The driver retries itself (Ray's `max_retries` would queue the rerun behind all submitted work).

Progress: one line per (arm, seed) and state in `study.log` (and on stdout). The report (analysis/report.py)
is written at the end. The study directory must be visible to every node (a shared filesystem), as the warm
starts read checkpoints another task wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from thinktok.config import save_config

from .study_config import ArmConfig, StudyConfig, load_arm, order

WORKER = "worker.json"  # in each (arm, seed)'s directory: the node, pid and attempt of its latest task
ERROR_LOG = "error.log"  # in each (arm, seed)'s directory: every failed attempt's full text


def run_dir(study: Path, arm: str, seed: int) -> Path:
    return study / arm / f"seed{seed}"


def checkpoint_of(study: Path, arm: ArmConfig, seed: int) -> Path:
    from thinktok.checkpoint import find_checkpoint

    return find_checkpoint(run_dir(study, arm.name, seed))


def run_arm(cfg: StudyConfig, arm: ArmConfig, seed: int, attempt: int = 1) -> dict:
    """One (arm, seed): train (or, for eval arms, only load), then evaluate with the controls. Runs inside a
    Ray task; returns the record the driver writes to result.json."""
    import ray
    import torch

    out = run_dir(cfg.dir, arm.name, seed)
    out.mkdir(parents=True, exist_ok=True)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    # where and as what it runs: a rerun after a node's death shows here, and the pid is the one to kill
    tmp = out / f".{WORKER}.tmp"  # renamed into place: the driver never reads half a file
    tmp.write_text(json.dumps({"node": node, "pid": os.getpid(), "attempt": attempt}))
    tmp.replace(out / WORKER)
    torch.manual_seed(seed)
    start = time.perf_counter()
    init = str(checkpoint_of(cfg.dir, next(a for a in cfg.arms if a.name == arm.init_from), seed)) \
        if arm.init_from else None
    if arm.kind == "sft":
        from thinktok.sft import run_sft

        sft = load_arm(cfg, arm, [*([f"model.name={init}"] if init else []), f"seed={seed}", f"run_dir={out}",
                                  f"name={arm.name}"])
        save_config(sft, out / "config.yaml")
        run_sft(sft)
    elif arm.kind == "train":
        from thinktok.rl.train import run_train

        train = load_arm(cfg, arm, [*([f"policy={init}", "policy_sft=null"] if init else []), f"seed={seed}",
                                    f"run_dir={out}", f"name={arm.name}"])
        resume = (out / "metrics.jsonl").exists() and any((out / "trainer").glob("checkpoint-*"))
        if (out / "metrics.jsonl").exists() and not resume:  # died before its first checkpoint: start over
            shutil.rmtree(out / "trainer", ignore_errors=True)
            for name in ("metrics.jsonl", "evals.jsonl"):
                (out / name).unlink(missing_ok=True)
        run_train(train, resume=resume)
    wall = time.perf_counter() - start
    return {"arm": arm.name, "seed": seed, "kind": arm.kind, "wall_s": wall, **measure(cfg, arm, seed, init)}


def remeasure_arm(cfg: StudyConfig, arm: ArmConfig, seed: int, record: dict) -> dict:
    """A recorded (arm, seed) evaluated again from its checkpoint (new measures on finished runs); its
    training wall time is kept. Runs inside a Ray task."""
    init = str(checkpoint_of(cfg.dir, next(a for a in cfg.arms if a.name == arm.init_from), seed)) \
        if arm.init_from else None
    return {**record, **measure(cfg, arm, seed, init)}


def measure(cfg: StudyConfig, arm: ArmConfig, seed: int, init: str | None) -> dict:
    """The arm's evaluation on the study's split (with the controls) and its thinking rows' movement."""
    import torch

    from thinktok.analysis.compare import movement
    from thinktok.analysis.evaluate import evaluate, evaluate_policy, evaluate_text
    from thinktok.checkpoint import load_run_info
    from thinktok.envs import load_task
    from thinktok.models.head import head_columns
    from thinktok.models.policy import load_policy
    from thinktok.models.thought_config import SamplingConfig
    from thinktok.models.thought_modes import make_mode

    if arm.kind == "eval":  # training-free: the checkpoint decoded under other thought settings
        task_cfg = load_run_info(init)[0]
        thought = load_arm(cfg, arm)
        policy = load_policy(init, thought.vocab_tokens, thought.markers, init=thought.init, seed=seed)
        mode = make_mode(thought, policy.vocab, SamplingConfig(greedy=True), head_columns(policy.model))
        if task_cfg.name == "text":  # e.g. fresh thinking rows on a text checkpoint: the before-RL baseline
            result = evaluate_text(policy, mode, load_task(task_cfg), cfg.split, cfg.teacher, cfg.eval_limit)
        else:
            with torch.no_grad():
                result = evaluate_policy(policy, mode, load_task(task_cfg), cfg.split, limit=cfg.eval_limit,
                                         content=cfg.content)
        result.update(mode=thought.mode, checkpoint=init)
        return {"eval": result, "movement": None}
    ckpt = checkpoint_of(cfg.dir, arm, seed)
    _, _, thought = load_run_info(ckpt)
    policy = load_policy(str(ckpt), thought.vocab_tokens, thought.markers)
    with torch.no_grad():
        result = evaluate(str(ckpt), None, cfg.split, limit=cfg.eval_limit, save=False, policy=policy,
                          content=cfg.content, teacher=cfg.teacher)
    moved = movement(ckpt, policy)
    return {"eval": result, "movement": {k: moved[k] for k in ("num_rows", "mean", "max") if k in moved}}


class Progress:
    """One line per (arm, seed) and state, to study.log and stdout; the running RL arms' step and reward."""

    def __init__(self, path: Path):
        self.path = path

    def say(self, arm: str, seed: int, state: str, detail: str = "") -> None:
        self.note(f"{arm} seed {seed}: {state}{'  ' + detail if detail else ''}")

    def note(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def running(self, study: Path, arm: str, seed: int, attempt: int, of: int, since: float) -> None:
        out = run_dir(study, arm, seed)
        worker = out / WORKER
        started = worker.exists() and worker.stat().st_mtime >= since and json.loads(
            worker.read_text())["attempt"] == attempt  # by this study run, as this attempt
        if not started:
            self.say(arm, seed, "queued")
            return
        state = "running" if attempt == 1 else f"running (attempt {attempt} of {of})"
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().strip():
            last = json.loads(metrics.read_text().splitlines()[-1])
            self.say(arm, seed, state, f"step {last['step']} reward {last['reward_mean']:.3f}")
        else:
            self.say(arm, seed, state)


def crash_cause(error: Exception) -> str | None:
    """What killed an arm's task from outside (worth a rerun), or None: the arm's own error, or a failure a
    rerun would meet again (an unschedulable request)."""
    import ray.exceptions as rx

    causes = ((rx.OutOfMemoryError, "out of memory (killed by Ray's memory monitor)"),
              (rx.WorkerCrashedError, "worker died"), (rx.NodeDiedError, "node died"),
              (rx.LocalRayletDiedError, "node died"), (rx.ObjectLostError, "result lost with its node"))
    return next((cause for cls, cause in causes if isinstance(error, cls)), None)


def failure(error: Exception) -> str:
    """One line for the log and report: the arm's own exception (or Ray's error), its type and first line."""
    import ray.exceptions as rx

    cause = error.cause if isinstance(error, rx.RayTaskError) else error
    return f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"


def log_failure(out: Path, attempt: int, error: Exception) -> None:
    """The failure's full text (for a Python error, Ray's text of it: the remote frames and the exception),
    appended to the arm's log without Ray's terminal colours."""
    out.mkdir(parents=True, exist_ok=True)
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    with open(out / ERROR_LOG, "a") as f:
        f.write(f"--- attempt {attempt}, {time.strftime('%Y-%m-%d %H:%M:%S')}: {type(error).__name__}\n"
                f"{text}\n")


@dataclass
class Ledger:
    """The driver's state: recorded results, (arm, seed)s failed for good (-> cause), running tasks (ref ->
    (arm, seed)), attempts made, and (arm, seed)s due for a retry (they go before any not yet started)."""

    results: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)
    running: dict = field(default_factory=dict)
    attempts: dict = field(default_factory=dict)
    retry: list = field(default_factory=list)


def ready(cfg: StudyConfig, ledger: Ledger, progress: Progress) -> list:
    """(arm, seed)s that may start now: retries first, then in order those not recorded, failed or busy
    whose init_from is recorded. Marks as failed (skipped) those whose init_from failed."""
    busy = set(ledger.running.values()) | set(ledger.retry)
    out = list(ledger.retry)
    for arm in order(cfg.arms):
        for seed in cfg.seeds:
            key = (arm.name, seed)
            if key in ledger.results or key in ledger.failed or key in busy:
                continue
            if arm.init_from and (arm.init_from, seed) in ledger.failed:
                ledger.failed[key] = f"its init_from {arm.init_from} failed"
                progress.say(arm.name, seed, "skipped", ledger.failed[key])
            elif not arm.init_from or (arm.init_from, seed) in ledger.results:
                out.append(key)
    return out


def settle(cfg: StudyConfig, ledger: Ledger, ref, progress: Progress) -> None:
    """A finished task: its record written, or its failure logged and then retried (killed from outside,
    attempts left) or recorded as failed."""
    import ray

    key = ledger.running.pop(ref)
    out, n = run_dir(cfg.dir, *key), ledger.attempts[key]
    try:
        record = ray.get(ref)
    except ray.exceptions.RayError as e:
        log_failure(out, n, e)
        cause = crash_cause(e)
        if cause is not None and n < cfg.max_attempts:
            ledger.retry.append(key)
            progress.say(*key, f"retrying (attempt {n + 1} of {cfg.max_attempts}): {cause}")
            return
        what = f"{cause} on attempt {n} of {cfg.max_attempts}" if cause else failure(e)
        ledger.failed[key] = f"{what} (full text in {key[0]}/seed{key[1]}/{ERROR_LOG})"
        progress.say(*key, "failed", ledger.failed[key])
        return
    ledger.results[key] = record
    (out / "result.json").write_text(json.dumps(record, indent=2))
    ev = record["eval"]
    if "accuracy" in ev:
        metric = f"accuracy {ev['accuracy']:.3f}"
    elif "reverse_kl" in ev:
        metric = f"reverse KL {ev['reverse_kl']:.3f} nll {ev['nll']:.3f}"
    else:
        metric = f"nll {ev.get('nll_thought', 0):.3f}"
    progress.say(*key, "done", f"{metric} in {record['wall_s']:.0f} s")


def remeasure(cfg: StudyConfig, ledger: Ledger, progress: Progress, limit: int | None) -> None:
    """Every recorded (arm, seed) measured again (`remeasure_arm`), `limit` at a time; one that fails keeps
    its old record, the failure in its error.log."""
    import ray

    task, arms = ray.remote(remeasure_arm), {a.name: a for a in cfg.arms}
    todo, running = sorted(ledger.results), {}
    while todo or running:
        while todo and (limit is None or len(running) < limit):
            key = todo.pop(0)
            arm = arms[key[0]]
            ref = task.options(num_cpus=arm.num_cpus, num_gpus=arm.num_gpus, resources=arm.resources,
                               max_retries=0).remote(cfg, arm, key[1], ledger.results[key])
            running[ref] = key
            progress.say(*key, "remeasuring")
        (ref,), _ = ray.wait(list(running), num_returns=1)
        key = running.pop(ref)
        try:
            record = ray.get(ref)
        except ray.exceptions.RayError as e:
            log_failure(run_dir(cfg.dir, *key), 0, e)
            progress.say(*key, "remeasure failed, old record kept", failure(e))
            continue
        ledger.results[key] = record
        (run_dir(cfg.dir, *key) / "result.json").write_text(json.dumps(record, indent=2))
        progress.say(*key, "remeasured", f"in {record['eval'].get('content_s', 0):.0f} s of content measures")


def run_study(cfg: StudyConfig, ray_address: str | None = None, report: bool = True,
              poll_s: float = 30.0, remeasure_done: bool = False) -> Path:
    """remeasure_done: measure every recorded (arm, seed) again from its checkpoint before running the rest
    (analyses added after the runs finished); training is not rerun."""
    import ray

    from thinktok.rl.actors import init_ray
    from thinktok.rl.config import RayConfig

    cfg.validate()
    study = cfg.dir
    study.mkdir(parents=True, exist_ok=True)
    save_config(cfg, study / "study.yaml")
    progress = Progress(study / "study.log")
    # without an address the cluster is the local one (started now, or earlier in this process) and runs
    # parallel_arms at once, counted here so that a retry takes the first free place
    limit = cfg.parallel_arms if ray_address is None else None
    if cfg.teacher_sft:
        from thinktok.sft import ensure_checkpoint

        start = time.perf_counter()
        ensure_checkpoint(cfg.teacher, cfg.teacher_sft, "teacher")
        progress.note(f"teacher {cfg.teacher} ready in {time.perf_counter() - start:.0f} s")
    init_ray(RayConfig(address=ray_address))
    remote, arms, ledger = ray.remote(run_arm), {a.name: a for a in cfg.arms}, Ledger()
    for arm in cfg.arms:  # recorded (arm, seed)s are never rerun
        for seed in cfg.seeds:
            path = run_dir(study, arm.name, seed) / "result.json"
            if path.exists():
                ledger.results[arm.name, seed] = json.loads(path.read_text())
                progress.say(arm.name, seed, "done before (skipped)")
    if remeasure_done:
        remeasure(cfg, ledger, progress, limit)
    last_poll, started = time.perf_counter(), time.time()
    while True:
        for key in ready(cfg, ledger, progress):
            if limit is not None and len(ledger.running) >= limit:
                break
            if key in ledger.retry:
                ledger.retry.remove(key)
            arm, n = arms[key[0]], ledger.attempts.get(key, 0) + 1
            ref = remote.options(num_cpus=arm.num_cpus, num_gpus=arm.num_gpus, resources=arm.resources,
                                 max_retries=0).remote(cfg, arm, key[1], n)
            ledger.running[ref], ledger.attempts[key] = key, n
            if n == 1:
                progress.say(*key, "submitted", f"cpus {arm.num_cpus} gpus {arm.num_gpus}")
        if not ledger.running:
            break
        done, _ = ray.wait(list(ledger.running), num_returns=1, timeout=poll_s)
        for ref in done:
            settle(cfg, ledger, ref, progress)
        if time.perf_counter() - last_poll > poll_s:
            for key in ledger.running.values():
                progress.running(study, *key, ledger.attempts[key], cfg.max_attempts, since=started)
            last_poll = time.perf_counter()
    failed = ledger.failed
    if failed:
        (study / "failed.json").write_text(json.dumps({f"{a} seed {s}": m for (a, s), m in failed.items()},
                                                      indent=2))
    if report:
        from thinktok.analysis.report import write_report

        write_report(cfg, [ledger.results[k] for k in sorted(ledger.results)], failed)
    return study
