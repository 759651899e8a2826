"""thinktok/compat.py: the library versions and private hooks it checks at start-up, and the bounds that
pyproject.toml and constraints.txt give for the same libraries."""

import re
from pathlib import Path

import pytest
import tomllib
import transformers
import trl

from thinktok.compat import PRIVATE_HOOKS, TRANSFORMERS, TRL, check_libraries
from thinktok.errors import UserError

ROOT = Path(__file__).parents[1]


def test_the_installed_libraries_pass():
    check_libraries()


@pytest.mark.parametrize("library,version,says", [
    (trl, "1.17.0", "TRL 1.17.0 is installed, thinktok supports TRL 1.16.0 only"),
    (transformers, "6.0.0", "transformers 6.0.0 is installed, thinktok supports >=5.17,<5.26"),
    (transformers, "5.16.9", "transformers 5.16.9 is installed"),
])
def test_another_version_is_one_clear_error(monkeypatch, library, version, says):
    monkeypatch.setattr(library, "__version__", version)
    with pytest.raises(UserError, match=re.escape(says)) as caught:
        check_libraries()
    assert "pip install trl==1.16.0" in str(caught.value)


def test_a_missing_private_hook_is_named(monkeypatch):
    monkeypatch.delattr(trl.GRPOTrainer, "_compute_loss")
    with pytest.raises(UserError, match=r"trl\.GRPOTrainer\._compute_loss is missing"):
        check_libraries()


def test_every_hook_the_learner_overrides_is_checked():
    """Each private method the learner classes define or call appears in PRIVATE_HOOKS."""
    source = "".join((ROOT / f).read_text() for f in ("rl/learner.py", "thinktok/checkpoint.py"))
    used = set(re.findall(r"def (_[a-z][a-z_]+)\(self", source))
    used |= set(re.findall(r"super\(\)\.(_[a-z][a-z_]+)\(", source))
    assert used <= {n for names in PRIVATE_HOOKS.values() for n in names}, used


def test_pyproject_and_constraints_match_the_checked_versions():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"trl=={TRL}" in deps
    assert f"transformers>={TRANSFORMERS[0]},<{TRANSFORMERS[1]}" in deps
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["trl"] == TRL
    low, high = (tuple(map(int, v.split("."))) for v in TRANSFORMERS)
    assert low <= tuple(map(int, pins["transformers"].split(".")[:2])) < high
    assert not {"torch", "triton"} & set(pins)  # those come with the torch build (Makefile's TORCH)
