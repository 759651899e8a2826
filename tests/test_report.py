"""A study's report from hand-written result records (no training): the content section's numbers are the
seeds' own, the annotated rollouts page holds each arm's examples, and the figure fixes hold (no negative
zero entropy, no panel for an arm that used no thinking token)."""

from types import SimpleNamespace

import pytest

from thinktok.analysis.report import entropy_bits, summarise, write_report


def content(changed: float, pass1: float, seed: int) -> dict:
    return {"num_examples": 4,
            "interventions": [{"position": 0, "n": 4, "changed": changed, "accuracy": 1.0,
                               "accuracy_intervened": 1 - changed, "drop_points": 100 * changed},
                              {"position": 1, "n": 0}],
            "pass_at_k": {"pass@1": pass1, "pass@4": 1.0},
            "code_table": {"top_pairs": [{"position": 0, "candidate": "step 1 char 1",
                                          "nmi": 0.9 + seed / 100, "chance": 0.01, "purity": 0.95, "n": 4}]},
            "embedding": [{"token": "<think3>", "uses": 7, "nearest": [" 3", " a", " b"],
                           "logit_lens": [" 4", " 5", " 6"], "moved": 0.25}],
            "rollouts": [{"prompt": "3 7 =", "answer": "4", "gold": "4", "correct": True, "reward": 1.0,
                          "steps": [{"kind": "thought", "token_id": 15, "text": "<think3>", "logprob": -0.1,
                                     "nearest": [" 3", " a", " b"]},
                                    {"kind": "real", "token_id": 4, "text": " 4", "logprob": -0.2}]}]}


def record(arm: str, seed: int, acc: float, usage: list[int], extra: dict | None = None) -> dict:
    ev = {"mode": "vocab", "accuracy": acc, "thought_steps_mean": 2.0, "real_tokens_mean": 3.0,
          "prompt_tokens_mean": 4.0, "thought_usage": usage, **(extra or {})}
    return {"arm": arm, "seed": seed, "kind": "sft", "wall_s": 10.0, "eval": ev, "movement": None}


def test_report_shows_what_the_thoughts_carry(tmp_path):
    records = [record("coded", s, 0.5 + s / 10, [0, 5, 0, 2],
                      {"content": content(0.5 + s / 4, 0.6 + s / 10, s)}) for s in (0, 1)]
    records += [record("silent", s, 0.1, [0, 0, 0, 0]) for s in (0, 1)]
    cfg = SimpleNamespace(dir=tmp_path, name="t", split="test", seeds=[0, 1], comparisons=[])
    data = write_report(cfg, records, {})

    c = data["arms"]["coded"]["content"]
    (position,) = c["interventions"]  # position 1 had no example in either seed
    assert position["changed"]["values"] == [0.5, 0.75]
    assert position["changed"]["mean"] == pytest.approx(0.625)
    assert c["pass_at_k"]["pass@1"]["mean"] == pytest.approx(0.65)
    assert set(c["code_pairs"]) == {0, 1} and c["code_pairs"][1][0]["nmi"] == pytest.approx(0.91)
    assert "content" not in data["arms"]["silent"]
    md = (tmp_path / "report.md").read_text()
    assert "## What the thoughts carry" in md and "### coded" in md and "### silent" not in md
    assert "| 0 | 0.625 ± 0.177 | 62.5 ± 17.7 | 4, 4 |" in md
    assert "position 0 ~ step 1 char 1: NMI 0.90 (chance 0.01), purity 0.95, n 4" in md
    assert "| <think3> | 7 | ' 3' · ' a' · ' b' | ' 4' · ' 5' · ' 6' | 0.250 |" in md
    page = (tmp_path / "rollouts.html").read_text()
    assert "<h2>coded (seed 0)</h2>" in page and "<sub>≈3|a|b</sub>" in page and "silent" not in page
    assert (tmp_path / "interventions.png").stat().st_size > 0 and "interventions.png" in md


def test_entropy_is_never_negative_zero():
    assert f"{entropy_bits([0, 9, 0]):.2f}" == "0.00"
    assert entropy_bits([1, 1, 1, 1]) == pytest.approx(2.0)
    summary = summarise([record("silent", 0, 0.1, [0, 0])])
    assert summary["silent"]["thought_entropy_bits"] == 0.0
