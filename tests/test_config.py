"""Configs: YAML + dotted overrides, unknown keys and wrong types rejected with the key's name."""

from pathlib import Path

import pytest

from thinktok.config import ConfigError, load_config
from thinktok.sft_config import SFTConfig


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_dotted_overrides(tmp_path):
    p = write(tmp_path, "name: x\ntask:\n  digits: 3\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config(SFTConfig, p,
                      ["train.lr=0.01", "task.spaced=true", "thought.mode=pause", "thought.num_thinking=2",
                                     "slots=2"])
    assert (cfg.name, cfg.task.digits, cfg.train.lr, cfg.task.spaced, cfg.slots) == ("x", 3, 0.01, True, 2)
    assert cfg.thought.mode == "pause" and cfg.thought.num_thinking == 2
    assert cfg.train.epochs == SFTConfig().train.epochs  # untouched defaults stay
    assert load_config(SFTConfig, p, ["train.epochs=2"]).train.epochs == 2.0  # int accepted for a float


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key train.lrr"), ("bogus=1", "unknown config key bogus"),
    ("train.batch_size=big", "train.batch_size: expected int"),
    ("task.spaced=3", "task.spaced: expected bool"), ("train.epochs=true", "train.epochs: expected float"),
    ("task=3", "task: expected a mapping"), ("noequals", "is not key=value"),
    ("thought.mode=telepathy", "unknown thought mode"), ("format=poem", "unknown format"),
])
def test_bad_overrides_name_the_key(tmp_path, override, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(SFTConfig, write(tmp_path, "name: x\n"), [override])


def test_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTConfig, write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(SFTConfig, write(tmp_path, "- a\n- b\n"))


def test_every_shipped_config_loads_and_validates():
    from pathlib import Path

    from thinktok.rl.config import TrainConfig
    from thinktok.study_config import StudyConfig

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 6
    kinds = {"sft_": SFTConfig, "study_": StudyConfig}
    for path in configs:
        cls = next((c for prefix, c in kinds.items() if path.name.startswith(prefix)), TrainConfig)
        cfg = load_config(cls, path)
        cfg.validate()


def test_policy_overrides_of_a_config_with_policy_sft(tmp_path, monkeypatch):
    """configs/quickstart.yaml trains its policy with policy_sft when it is missing. `policy=tiny` (a name,
    not a path) passes through untrained; a path that policy_sft does not write is refused before any
    training, naming policy_sft=null; the path it writes is trained once."""
    import thinktok.sft as sft
    from thinktok.errors import UserError
    from thinktok.rl.config import TrainConfig

    trained = []
    monkeypatch.setattr(sft, "run_sft", lambda cfg: trained.append(cfg.out_dir))
    configs = Path(__file__).parents[1] / "configs"
    monkeypatch.chdir(tmp_path)  # the runs/ paths, resolved here
    over = [f"policy_sft={configs / 'sft_quickstart_curriculum.yaml'}"]
    cfg = load_config(TrainConfig, configs / "quickstart.yaml", [*over, "policy=tiny"])
    assert sft.ensure_checkpoint(cfg.policy, cfg.policy_sft, "policy") == "tiny" and not trained
    cfg = load_config(TrainConfig, configs / "quickstart.yaml", [*over, "policy=runs/mine/checkpoint"])
    with pytest.raises(UserError, match="set policy_sft=null"):
        sft.ensure_checkpoint(cfg.policy, cfg.policy_sft, "policy")
    assert not trained
    cfg = load_config(TrainConfig, configs / "quickstart.yaml", over)
    assert sft.ensure_checkpoint(cfg.policy, cfg.policy_sft, "policy") == cfg.policy
    assert trained == [Path("runs/sft_quickstart_curriculum")]


def test_a_study_refuses_an_arms_bad_override_before_anything_runs(tmp_path):
    """An arm's override is checked when the study is loaded, named with the arm, whatever the arm's kind:
    an unknown key, a wrong type and an invalid combination (parallel rollouts under PPO)."""
    from thinktok.errors import UserError
    from thinktok.study_config import StudyConfig

    text_kl = Path(__file__).parents[1] / "configs" / "text_kl.yaml"
    bad = {"train": f"{{name: b, kind: train, config: {text_kl}, overrides: [OVER]}}",
           "eval": "{name: b, kind: eval, init_from: a, overrides: [OVER]}"}
    cases = [("train", "rl.lrr=1e-4", "rl.lrr"), ("train", "rl.max_steps=many", "rl.max_steps"),
             ("train", "rl.algo=ppo, rollout=parallel", "not ppo"), ("eval", "num_thinkin=4", "num_thinkin")]
    for kind, override, named in cases:
        path = tmp_path / "study.yaml"
        path.write_text(f"arms:\n  - {{name: a, kind: train, config: {text_kl}}}\n"
                        f"  - {bad[kind].replace('OVER', override)}\n")
        with pytest.raises(UserError, match=f"arm b: .*{named}"):
            load_config(StudyConfig, path)
    path.write_text(f"arms:\n  - {{name: a, kind: train, config: {text_kl}, overrides: [rl.lr=1e-4]}}\n")
    assert load_config(StudyConfig, path).arms[0].overrides == ["rl.lr=1e-4"]
