"""`thinktok study`: arms over seeds as Ray tasks, warm starts in order, restarts that skip finished work, a
node's death survived on a two-node cluster, and a report whose numbers are the arms' own evaluations."""

import json
import threading
import time
from pathlib import Path

import pytest
import ray

from thinktok.study import ArmConfig, StudyConfig, run_study

CONFIGS = Path(__file__).parents[1] / "configs"
SFT = str(CONFIGS / "sft_quickstart_answer.yaml")
TASK = ["task.num_train=64", "task.num_val=8", "task.num_test=8"]
SFT_TINY = [*TASK, "train.max_steps=4", "train.batch_size=8"]
RL_TINY = [*TASK, "rl.max_steps=2", "rl.prompts_per_step=2", "rl.num_generations=2", "eval_every=0",
           "save_every=2", "ray.num_rollout_workers=1", "sampling.max_new_tokens=4"]


def study(tmp_path, arms, seeds=(0, 1), **kw) -> StudyConfig:
    return StudyConfig(name="t", out_dir=str(tmp_path), seeds=list(seeds), sft_overrides=SFT_TINY,
                       train_overrides=RL_TINY, arms=arms, **kw)


@pytest.fixture
def fresh_ray():
    ray.shutdown()
    yield
    ray.shutdown()


def test_study_runs_every_arm_reports_their_numbers_and_skips_on_restart(tmp_path, fresh_ray):
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


def test_bad_study_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="init_from 'nope'"):
        study(tmp_path, [ArmConfig(name="a", config=SFT, init_from="nope")]).validate()
    with pytest.raises(ValueError, match="cycle"):
        study(tmp_path, [ArmConfig(name="a", config=SFT, init_from="b"),
                         ArmConfig(name="b", config=SFT, init_from="a")]).validate()
    with pytest.raises(ValueError, match="needs a config"):
        study(tmp_path, [ArmConfig(name="a", kind="sft")]).validate()


def test_an_arm_whose_node_dies_reruns_elsewhere(tmp_path, fresh_ray):
    """Two worker nodes (ray.cluster_utils.Cluster); the node running the arm is removed mid-run; Ray retries
    the task on the other node and the study finishes with the arm recorded."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=1, resources={"arm_slot": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    over = ["train.max_steps=40"]  # long enough to be caught running
    arm = ArmConfig(name="a", config=SFT, overrides=over, resources={"arm_slot": 1})
    cfg = study(tmp_path, [arm], seeds=(0,))
    worker = threading.Thread(target=run_study, args=(cfg, cluster.address),
                              kwargs={"report": False, "poll_s": 2})
    worker.start()
    node_file = tmp_path / "a" / "seed0" / "node.txt"
    deadline = time.time() + 180
    while not node_file.exists() and time.time() < deadline:
        time.sleep(0.5)
    first = node_file.read_text()
    victim = next(n for n in nodes if n.node_id == first)
    cluster.remove_node(victim)
    worker.join(timeout=600)
    try:
        assert not worker.is_alive()
        assert (tmp_path / "a" / "seed0" / "result.json").exists()
        assert node_file.read_text() != first  # the rerun ran on the surviving node
    finally:
        ray.shutdown()
        cluster.shutdown()
