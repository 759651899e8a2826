"""The learner across processes, on the CPU: `accelerate launch --multi_gpu --num_processes 2` runs two
learner processes under DDP over gloo (accelerate's `--cpu` flag starts one process unless MPI is set up). Two
processes of P prompts a step must take the step one process takes on the union of their 2P prompts: the
same rollouts (each process samples its own prompts, with seeds that depend on a row's place in the global
batch), the same gradient (DDP's mean over processes of each one's loss, normalised by the union's counts),
the same logged metrics (gathered), the same weights; with Ray actors and inline workers, for GRPO (with the
text-step KL) and PPO (whose value head sits outside DDP's wrapper); resumed equal to uninterrupted. Each
launch runs tests/launch_learner.py, which can save the first step's gradient and remove the all-reduce."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from thinktok.models.policy import load_policy
from thinktok.rl.actors import init_ray
from thinktok.rl.config import RayConfig

HERE = Path(__file__).parent
P = 2  # prompts per process and step


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "t"
    load_policy("tiny", 0, False, seed=3).save(path)
    return str(path)


@pytest.fixture(scope="module")
def cluster():
    """One Ray cluster that both learner processes join, each starting its own actors on it."""
    ray.shutdown()
    init_ray(RayConfig())
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run: Path, teacher: str, processes: int, *overrides: str, grads: bool = False,
           allreduce: bool = True, resume: bool = False) -> Path:
    """`thinktok train` on `processes` learner processes, each P prompts a step (one process: P times as
    many, and as many rollout and reward workers as the processes have together)."""
    settings = [f"teacher={teacher}", f"rl.prompts_per_step={P * (2 // processes)}",
                f"ray.num_rollout_workers={2 // processes}", f"ray.num_reward_workers={2 // processes}",
                *overrides]
    train = ["train", "--resume", str(run)] if resume else ["train", str(HERE / "data" / "multiprocess.yaml")]
    hands = (["--grads", str(run / "grads.pt")] if grads else []) + ([] if allreduce else ["--no-allreduce"])
    launcher = [] if processes == 1 else [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
        str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port())]
    args = [*launcher, *([sys.executable] if processes == 1 else []), str(HERE / "launch_learner.py"),
            *hands, *train, *([] if resume else [f"run_dir={run}"]), *settings]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = run / "trainer" / f"checkpoint-{step}"
    extra = torch.load(ckpt / "thinktok_extra.pt")
    return load_file(ckpt / "model.safetensors") | {f"{m}.{k}": v for m, state in extra.items()
                                                    for k, v in state.items()}


def max_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


GATHERED = ("examples_seen", "reward_mean", "reward_std", "kl", "loss", "thought_steps_mean",
            "text_tokens_mean", "weight_version", "logprob_mismatch")


def same_step(one: Path, two: Path, lr: float = 1e-3):
    """Two processes' first step equals one process's on the union: the gradient the optimizer steps with (to
    1e-6 of its largest entry), the logged metrics, and the weights after it to 1e-6. The weights' exception:
    entries whose gradient is float noise (under 1e-5 of the largest: the sums run in another order, and
    differ by ~1e-7 of it), where Adam's first step, lr g / (|g| + 1e-8), turns a 1e-11 difference into
    one of lr * 1e-3; those are held to lr / 100 (a process stepping alone moves them by ~lr)."""
    g1, g2 = torch.load(one / "grads.pt"), torch.load(two / "grads.pt")
    scale = max(g.abs().max().item() for g in g1.values())
    assert scale > 1e-3  # a step that moves something
    assert max_gap(g1, g2) <= 1e-6 * scale
    for key in GATHERED:
        assert metrics(one)[0][key] == pytest.approx(metrics(two)[0][key], rel=1e-5, abs=1e-6), key
    w1, w2 = weights(one, 1), weights(two, 1)
    assert w1.keys() == {k.removeprefix("model.") for k in g1}
    for name, grad in g1.items():
        gap = (w1[name.removeprefix("model.")] - w2[name.removeprefix("model.")]).abs()
        signal = grad.abs() > 1e-5 * scale
        assert (gap * signal).max() <= 1e-6 and gap.max() <= lr / 100, name


GRPO = ("rl.algo=grpo", "rl.beta=0.1")  # the KL's normaliser is the union's text-step count


@pytest.fixture(scope="module")
def grpo_one(tmp_path_factory, teacher):
    return launch(tmp_path_factory.mktemp("one") / "run", teacher, 1, *GRPO, "rl.max_steps=2",
                  "ray.inline=true", grads=True)


@pytest.fixture(scope="module")
def grpo_two(tmp_path_factory, teacher):
    return launch(tmp_path_factory.mktemp("two") / "run", teacher, 2, *GRPO, "rl.max_steps=2",
                  "ray.inline=true", grads=True)


def test_two_processes_step_as_one_on_the_union_inline(grpo_one, grpo_two):
    same_step(grpo_one, grpo_two)
    assert [m["examples_seen"] for m in metrics(grpo_two)] == [2 * P * 3, 4 * P * 3]  # both processes'


def test_resumed_with_ray_actors_equals_uninterrupted(grpo_one, grpo_two, tmp_path, teacher, cluster):
    """The two-process run cut after its step-1 checkpoint and resumed with Ray actors (each process's own,
    on one cluster) instead of inline workers: step 2 equals the uninterrupted run's, and its metrics the
    union's."""
    run = tmp_path / "run"
    shutil.copytree(grpo_two, run)
    shutil.rmtree(run / "trainer" / "checkpoint-2")
    launch(run, teacher, 2, "ray.inline=false", f"ray.address={cluster}", resume=True)
    assert [m["step"] for m in metrics(run)] == [1, 2]
    assert len(metrics(grpo_two)) == 2  # the copy resumed where it lies, not where its config was written
    for x, y, z in zip(metrics(grpo_one), metrics(grpo_two), metrics(run), strict=True):
        for key in GATHERED:
            assert x[key] == pytest.approx(z[key], rel=1e-5, abs=1e-6), key
            assert y[key] == pytest.approx(z[key], rel=1e-6, abs=1e-7), key
    assert max_gap(weights(grpo_two, 2), weights(run, 2)) <= 1e-6


def test_ppo_two_processes_step_as_one_on_the_union(tmp_path, teacher):
    """PPO: GAE whitened over the union's steps, the value loss over its count, the value head's gradient
    (outside DDP's wrapper) averaged by the learner."""
    ppo = ("rl.algo=ppo", "rl.max_steps=1", "ray.inline=true")
    one = launch(tmp_path / "one", teacher, 1, *ppo, grads=True)
    two = launch(tmp_path / "two", teacher, 2, *ppo, grads=True)
    assert any(k.startswith("value_head.") for k in torch.load(two / "grads.pt"))
    same_step(one, two)


def test_without_the_allreduce_the_step_differs(grpo_one, tmp_path, teacher):
    """The check above can fail: each process stepping on its own gradient is caught."""
    run = launch(tmp_path / "run", teacher, 2, *GRPO, "rl.max_steps=1", "ray.inline=true", grads=True,
                 allreduce=False)
    g1, g2 = torch.load(grpo_one / "grads.pt"), torch.load(run / "grads.pt")
    scale = max(g.abs().max().item() for g in g1.values())
    assert max_gap(g1, g2) > 1e-3 * scale  # this process's half of the batch alone
    assert max_gap(weights(grpo_one, 1), weights(run, 1)) > 1e-4
