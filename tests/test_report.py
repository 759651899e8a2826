"""A study's report from hand-written result records (no training): the content section's numbers are the
seeds' own, the annotated rollouts page holds each arm's examples, and the figure fixes hold (no negative
zero entropy, no panel for an arm that used no thinking token)."""

import json
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
                                    {"kind": "text", "token_id": 4, "text": " 4", "logprob": -0.2}]}]}


def record(arm: str, seed: int, acc: float, usage: list[int], extra: dict | None = None) -> dict:
    ev = {"mode": "vocab", "accuracy": acc, "thought_steps_mean": 2.0, "text_tokens_mean": 3.0,
          "prompt_tokens_mean": 4.0, "thought_usage": usage, **(extra or {})}
    return {"arm": arm, "seed": seed, "kind": "sft", "wall_s": 10.0, "eval": ev, "movement": None}


def test_report_shows_what_the_thoughts_carry(tmp_path):
    records = [record("coded", s, 0.5 + s / 10, [0, 5, 0, 2],
                      {"content": content(0.5 + s / 4, 0.6 + s / 10, s)}) for s in (0, 1)]
    records += [record("silent", s, 0.1, [0, 0, 0, 0]) for s in (0, 1)]
    constant = content(0.0, 0.1, 0)
    constant["code_table"]["top_pairs"][0]["nmi"] = 0.0
    records += [record("constant", 0, 0.1, [4, 0, 0, 0], {"content": constant}),
                record("text", 0, 0.8, [], {"content": {**content(0.0, 0.8, 0), "interventions": [],
                                                        "code_table": {"top_pairs": []}}})]
    cfg = SimpleNamespace(dir=tmp_path, name="t", split="test", seeds=[0, 1], comparisons=[])
    data = write_report(cfg, records, {})
    md = (tmp_path / "report.md").read_text()
    assert "- code table, seed 0: NMI 0.00 at every position: the thoughts carry nothing" in md
    assert md.split("### text")[1].count("code table") == 0  # no thoughts: no empty code-table lines

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


def text_eval(kl: float, nll: float, spearman: float | None, seed: int, wants: bool = True) -> dict:
    deciles = [{"surprisal": float(i), "rate": i / 10 + seed / 100,
                **({"propensity": i / 100} if wants else {})} for i in range(10)]
    placement = {"after_thought": 4.0 + seed, "after_text": 2.0, "spearman": spearman, "deciles": deciles,
                 **({"spearman_propensity": 0.4} if wants else {})}
    return {"mode": "vocab", "reverse_kl": kl, "nll": nll, "teacher_nll": 3.0, "thoughts_per_100": 12.5,
            "after_thought_per_100": 10.0, "controls": {"no_thoughts": {"nll": nll + 0.5},
                                                          "pause": {"nll": nll + 0.25},
                                                          "shuffled_thoughts": {"nll": nll + 0.125}},
            "placement": {"teacher": placement, "student": {**placement, "spearman": 0.5},
                          "num_tokens": 100, "propensity": 0.0125 * (seed + 1) if wants else None},
            "rollouts": [{"prompt": "The", "reward": -kl, "num_text": 1, "num_thought": 1,
                          "steps": [{"kind": "thought", "token_id": 50300, "text": "<think3>", "logprob": -1,
                                     "nearest": [" a", " b", " c"]},
                                    {"kind": "text", "token_id": 5, "text": " cat", "logprob": -2.0,
                                     "teacher_logprob": -8.5}]}]}


def test_text_report_table_placement_figure_and_coloured_rollouts(tmp_path):
    records = [{"arm": "vocab", "seed": s, "kind": "train", "wall_s": 5.0, "movement": None,
                "eval": text_eval(1.0 + s, 4.0 + s, 0.2 + s / 10, s)} for s in (0, 1)]
    records += [{"arm": "none", "seed": s, "kind": "train", "wall_s": 5.0, "movement": None,
                 "eval": text_eval(2.0, 5.0, None, s, wants=False)} for s in (0, 1)]
    records += [{"arm": "parallel", "seed": s, "kind": "train", "wall_s": 5.0, "movement": None,
                 "eval": {"mode": "vocab", "nll_thought": 6.5 + s, "nll_base": 6.25}} for s in (0, 1)]
    cfg = SimpleNamespace(dir=tmp_path, name="t", split="test", seeds=[0, 1], comparisons=[["vocab", "none"]])
    data = write_report(cfg, records, {})
    t = data["arms"]["vocab"]["text"]
    assert t["reverse_kl"]["values"] == [1.0, 2.0] and t["controls"]["pause"]["mean"] == pytest.approx(4.75)
    assert t["teacher"]["after_thought"]["mean"] == pytest.approx(4.5)
    assert data["arms"]["none"]["text"]["teacher"]["spearman"] is None  # no seed had a correlation
    assert t["deciles"][3]["rate"]["mean"] == pytest.approx(0.305)
    md = (tmp_path / "report.md").read_text()
    heading = "## Thinking on real text"
    assert heading in md and "accuracy" not in md.split(heading)[0]
    assert ("| vocab | 1.500 ± 0.707 | 4.500 ± 0.707 | 5.000 ± 0.707 | 4.750 ± 0.707 | 4.625 ± 0.707 | "
            "3.000 ± 0.000 | 12.5 ± 0.0 (10.0 ± 0.0) | 4.500 ± 0.707 | 2.000 ± 0.000 | 0.250 ± 0.071 | "
            "0.500 ± 0.000 | 0.0188 ± 0.0088 | 0.400 ± 0.000 | 2 |") in md
    assert "| none | 2.000 ± 0.000 |" in md and "| - | - | 2 |" in md  # no propensity without free thinking
    by_metric = {s["metric"]: s for s in data["comparisons"]}
    assert by_metric["reverse_kl"]["per_seed"] == [-1.0, 0.0] and "accuracy" not in by_metric
    assert "vocab vs none: -0.500 nats/token of reverse KL, seeds agree 1/2" in md
    assert (tmp_path / "placement.png").stat().st_size > 0 and "placement.png" in md
    assert "| parallel | 7.000 ± 0.707 | 6.250 ± 0.000 | 2 |" in md and "| parallel | train |" not in md
    page = (tmp_path / "text_rollouts.html").read_text()
    assert "<h2>vocab (seed 0)</h2>" in page and "<sub>≈a|b|c</sub>" in page
    assert 'background:hsl(0,70%,85%)" title="teacher log-prob -8.50"> cat' in page  # beyond 8 nats: red


def test_learning_curves_average_seeds_where_every_seed_reached(tmp_path):
    """Mean and (population) std over seeds at each x every seed logged, by hand; a seed that stopped
    early ends the curve there; the figure is written from the runs' evals.jsonl."""
    from thinktok.analysis.curves import learning_curves, over_seeds

    x, mean, std = over_seeds([[(0, 0.1), (32, 0.3), (64, 0.5)], [(0, 0.3), (32, 0.1)]])
    assert x.tolist() == [0, 32]
    assert mean.tolist() == pytest.approx([0.2, 0.2]) and std.tolist() == pytest.approx([0.1, 0.1])
    for seed in (0, 1):
        run = tmp_path / "arm" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "evals.jsonl").write_text("".join(json.dumps({"step": s, "examples_seen": 32 * s,
                                                             "accuracy": 0.1 * s + seed}) + "\n"
                                                 for s in range(3)))
    assert learning_curves(tmp_path, ["arm", "absent"], [0, 1], tmp_path / "c.png").exists()
    assert learning_curves(tmp_path, ["absent"], [0, 1], tmp_path / "d.png") is None


def test_text_learning_curves_plot_reverse_kl(tmp_path):
    """The text task logs no accuracy: its curve is the reverse KL, the value each seed logged."""
    from thinktok.analysis.curves import curves, learning_curves

    for seed in (0, 1):
        run = tmp_path / "none" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "evals.jsonl").write_text("".join(json.dumps({"step": s, "examples_seen": 64 * s,
                                                             "reverse_kl": 0.5 - 0.1 * s - 0.2 * seed}) + "\n"
                                                 for s in range(3)))
    measure, held_out, shuffled, _ = curves(tmp_path, ["none"], [0, 1])
    x, mean, std = held_out["none"]
    assert measure == "reverse_kl" and shuffled == {} and x.tolist() == [0, 64, 128]
    assert mean.tolist() == pytest.approx([0.4, 0.3, 0.2]) and std.tolist() == pytest.approx([0.1] * 3)
    assert learning_curves(tmp_path, ["none"], [0, 1], tmp_path / "kl.png").stat().st_size > 0
