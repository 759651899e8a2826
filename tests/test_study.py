"""`thinktok study`: arms over seeds as Ray tasks, warm starts in order, restarts that skip finished work, a
killed arm retried at once (or recorded as failed), an arm's own error recorded with its traceback, a node's
death survived on a two-node cluster, and a report whose numbers are the arms' own evaluations."""

import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from unittest.mock import patch

import pytest
import ray

from thinktok.analysis.content import ContentConfig
from thinktok.rl.actors import init_ray
from thinktok.rl.config import RayConfig
from thinktok.study import run_study
from thinktok.study_config import ArmConfig, StudyConfig

CONFIGS = Path(__file__).parents[1] / "configs"
SFT = str(CONFIGS / "sft_quickstart_answer.yaml")
TASK = ["task.num_train=64", "task.num_val=8", "task.num_test=8"]
SFT_TINY = [*TASK, "train.max_steps=4", "train.batch_size=8"]
RL_TINY = [*TASK, "rl.max_steps=2", "rl.prompts_per_step=2", "rl.num_generations=2", "eval_every=0",
           "save_every=2", "ray.num_rollout_workers=1", "sampling.max_new_tokens=4"]


def study(tmp_path, arms, seeds=(0, 1), **kw) -> StudyConfig:
    """A tiny study, each arm evaluated on 4 examples; without the content measures (3 s an arm here) unless
    `content` says otherwise."""
    kw.setdefault("content", ContentConfig(enabled=False))
    kw.setdefault("eval_limit", 4)
    return StudyConfig(name="t", out_dir=str(tmp_path), seeds=list(seeds), sft_overrides=SFT_TINY,
                       train_overrides=RL_TINY, arms=arms, **kw)


@pytest.fixture
def fresh_ray():
    ray.shutdown()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_ray():
    """One local cluster for the module's local studies (they count it as local: parallel_arms at a time),
    whose idle task workers, torch already imported, the next study reuses. Started from the main thread: one
    that a study thread started takes Ray 5 s to shut down. Started while RAY_ADDRESS names another cluster
    (as a `ray start`, or another test process's ray.cluster_utils cluster, would): a local cluster is new,
    never that one joined (which refuses num_cpus)."""
    ray.shutdown()
    with patch.dict(os.environ, {"RAY_ADDRESS": "127.0.0.1:9"}):
        init_ray(RayConfig())
    yield
    ray.shutdown()


def started(run: Path, attempt: int = 1, timeout: float = 180) -> dict:
    """worker.json of the (arm, seed) at `run` once its task `attempt` has started."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "worker.json").exists():
            worker = json.loads((run / "worker.json").read_text())
            if worker["attempt"] == attempt:
                return worker
        time.sleep(0.05)
    raise AssertionError(f"{run}: attempt {attempt} never started")


def in_background(cfg: StudyConfig, **kw) -> threading.Thread:
    thread = threading.Thread(target=run_study, args=(cfg,), kwargs={"poll_s": 2, **kw})
    thread.start()
    return thread


def test_a_killed_arm_is_retried_at_once_and_nothing_else_reruns(tmp_path, local_ray):
    """One arm at a time: `a` is SIGKILLed as it starts; its retry runs before `b`, which was waiting (Ray's
    own retry queued behind it), and `b` runs once."""
    cfg = study(tmp_path, [ArmConfig(name="a", config=SFT), ArmConfig(name="b", config=SFT)], seeds=(0,),
                parallel_arms=1)
    thread = in_background(cfg, report=False)
    first = started(tmp_path / "a" / "seed0")
    os.kill(first["pid"], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive()
    log = (tmp_path / "study.log").read_text()
    assert "a seed 0: retrying (attempt 2 of 3): worker died" in log
    assert log.index("a seed 0: done") < log.index("b seed 0: submitted")  # the retry went first
    assert log.count("b seed 0: submitted") == 1 and log.count("b seed 0: done") == 1
    assert log.count("a seed 0: submitted") == 1 and "failed" not in log
    second = json.loads((tmp_path / "a" / "seed0" / "worker.json").read_text())
    assert second["attempt"] == 2 and second["pid"] != first["pid"]
    assert all((tmp_path / arm / "seed0" / "result.json").exists() for arm in "ab")
    assert "--- attempt 1" in (tmp_path / "a" / "seed0" / "error.log").read_text()


def test_failed_arms_are_recorded_with_their_cause_while_the_others_finish(tmp_path, local_ray):
    """`broken` raises (its start checkpoint does not exist): failed at once, its traceback in its error.log.
    `killed` is SIGKILLed with no attempt left: failed, the cause named. `fine` finishes; the report lists
    both."""
    arms = [ArmConfig(name="broken", config=SFT, overrides=[f"model.name={tmp_path / 'missing'}"]),
            ArmConfig(name="killed", config=SFT), ArmConfig(name="fine", config=SFT)]
    cfg = study(tmp_path, arms, seeds=(0,), max_attempts=1, parallel_arms=3)
    thread = in_background(cfg, report=True)
    os.kill(started(tmp_path / "killed" / "seed0")["pid"], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive()
    failed = json.loads((tmp_path / "study.json").read_text())["failed"]
    assert set(failed) == {"broken seed 0", "killed seed 0"}
    assert failed["broken seed 0"].startswith("PolicyLoadError: ")
    assert failed["killed seed 0"].startswith("worker died on attempt 1 of 1")
    log = (tmp_path / "study.log").read_text()
    assert f"broken seed 0: failed  {failed['broken seed 0']}" in log
    assert f"killed seed 0: failed  {failed['killed seed 0']}" in log and "retrying" not in log
    trace = (tmp_path / "broken" / "seed0" / "error.log").read_text()
    assert ", in run_arm\n" in trace and "PolicyLoadError" in trace and str(tmp_path / "missing") in trace
    report = (tmp_path / "report.md").read_text()
    assert "## Failed" in report and "- broken seed 0: PolicyLoadError" in report
    assert (tmp_path / "fine" / "seed0" / "result.json").exists() and "| fine | sft |" in report


def test_study_runs_every_arm_reports_their_numbers_and_skips_on_restart(tmp_path, local_ray):
    arms = [ArmConfig(name="answer", config=SFT),
            ArmConfig(name="distinct", config=SFT, overrides=["thought.mode=pause", "thought.num_thinking=2",
                                                               "slots=2"]),
            ArmConfig(name="soft", kind="eval", init_from="answer", overrides=["mode=soft", "num_thinking=0",
                                                                              "noise=none"]),
            ArmConfig(name="rl", kind="train", config=str(CONFIGS / "rl_discovery.yaml"), init_from="answer",
                      overrides=["thought.num_thinking=4", "thought.slots=2"])]
    cfg = study(tmp_path, arms, comparisons=[["rl", "answer"]])
    run_study(cfg, report=True, poll_s=5)
    report = json.loads((tmp_path / "study.json").read_text())
    for arm in ("answer", "distinct", "soft", "rl"):
        records = [json.loads((tmp_path / arm / f"seed{s}" / "result.json").read_text()) for s in (0, 1)]
        accs = [r["eval"]["accuracy"] for r in records]
        assert report["arms"][arm]["accuracy"]["values"] == accs  # the report's numbers are the arms' own
        assert report["arms"][arm]["accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    assert report["arms"]["distinct"]["thought_steps"]["mean"] == 2  # 2 pause slots per answer
    assert set(report["arms"]["distinct"]["controls"]) == {"no_thoughts", "pause", "shuffled_thoughts"}
    rl = report["arms"]["rl"]
    assert rl["thought_steps"]["mean"] == 2 and len(rl["thought_usage"]) == 4

    def acc(arm, s):
        return json.loads((tmp_path / arm / f"seed{s}" / "result.json").read_text())["eval"]["accuracy"]

    (statement,) = report["comparisons"]
    assert statement["per_seed"] == pytest.approx([100 * (acc("rl", s) - acc("answer", s)) for s in (0, 1)])
    figures = ("accuracy_vs_compute.png", "row_movement.png", "vocabulary_usage.png")
    for name in ("report.md", "report.html", *figures):
        assert (tmp_path / name).stat().st_size > 0
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "<td>distinct</td>" in html
    assert "| rl | train |" in (tmp_path / "report.md").read_text()
    # a restarted study reruns nothing: every (arm, seed) is recorded
    stamps = {p: p.stat().st_mtime for p in tmp_path.glob("*/seed*/result.json")}
    run_study(cfg, report=False, poll_s=5)
    assert {p: p.stat().st_mtime for p in tmp_path.glob("*/seed*/result.json")} == stamps
    assert (tmp_path / "study.log").read_text().count("done before (skipped)") == 8
    assert "What the thoughts carry" not in (tmp_path / "report.md").read_text()
    # a measure added after the runs finished: --remeasure evaluates every recorded run again, trains nothing
    walls = {p: json.loads(p.read_text())["wall_s"] for p in stamps}
    weights = {p: p.stat().st_mtime for p in tmp_path.glob("*/seed*/**/model.safetensors")}
    assert len(weights) >= 6  # answer, distinct, rl: two seeds each (soft evaluates answer's)
    run_study(replace(cfg, content=ContentConfig(limit=4, samples=2, pass_k=[1, 2], max_positions=2)),
              report=True, poll_s=5, remeasure_done=True)
    for p, wall in walls.items():
        record = json.loads(p.read_text())
        assert "content" in record["eval"] and "pass_at_k" in record["eval"]["content"]
        assert record["wall_s"] == wall  # the training time it was recorded with
    assert {p: p.stat().st_mtime for p in weights} == weights
    log = (tmp_path / "study.log").read_text()
    assert log.count("remeasured") == 8 and log.count("submitted") == 8  # the first run's submissions only
    assert "What the thoughts carry" in (tmp_path / "report.md").read_text()


def test_bad_study_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="init_from 'nope'"):
        study(tmp_path, [ArmConfig(name="a", config=SFT, init_from="nope")]).validate()
    with pytest.raises(ValueError, match="cycle"):
        study(tmp_path, [ArmConfig(name="a", config=SFT, init_from="b"),
                         ArmConfig(name="b", config=SFT, init_from="a")]).validate()
    with pytest.raises(ValueError, match="needs a config"):
        study(tmp_path, [ArmConfig(name="a", kind="sft")]).validate()
    with pytest.raises(ValueError, match="teacher_sft needs teacher"):
        study(tmp_path, [ArmConfig(name="a", config=SFT)], teacher_sft=SFT).validate()
    with pytest.raises(ValueError, match="arm a: .*missing.yaml"):  # before any arm runs, not when it does
        study(tmp_path, [ArmConfig(name="a", config=str(tmp_path / "missing.yaml"))]).validate()


def test_an_arm_whose_node_dies_reruns_elsewhere(tmp_path, fresh_ray):
    """Two worker nodes (ray.cluster_utils.Cluster); the node running the arm is removed mid-run; the study
    retries the task on the other node and finishes with the arm recorded."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=1, resources={"arm_slot": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    over = ["train.max_steps=8"]  # caught running: the kill comes within 0.1 s, its imports take seconds
    arm = ArmConfig(name="a", config=SFT, overrides=over, resources={"arm_slot": 1})
    cfg = study(tmp_path, [arm], seeds=(0,))
    thread = in_background(cfg, ray_address=cluster.address, report=False)
    first = started(tmp_path / "a" / "seed0")["node"]
    victim = next(n for n in nodes if n.node_id == first)
    cluster.remove_node(victim)
    thread.join(timeout=600)
    try:
        assert not thread.is_alive()
        assert (tmp_path / "a" / "seed0" / "result.json").exists()
        assert started(tmp_path / "a" / "seed0", attempt=2)["node"] != first  # reran on the surviving node
        assert "a seed 0: retrying (attempt 2 of 3)" in (tmp_path / "study.log").read_text()
    finally:
        ray.shutdown()
        cluster.shutdown()
