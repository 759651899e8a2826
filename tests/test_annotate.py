"""Annotated rollouts (analysis/annotate.py, analysis/render.py, `thinktok sample --task`): what each
thinking token stands for against a known rule code; correctness against the task's own check; rewards and
group advantages against an independent computation; the page's counts, data and controls."""

import json
import math
import shutil
import subprocess

import pytest

from thinktok.analysis.annotate import token_codes
from thinktok.analysis.render import to_html
from thinktok.cli import main
from thinktok.envs import TaskConfig, load_task


def test_token_codes_recover_a_known_rule_code():
    """Position 0 writes the first partial product's first digit d as <think{d}>; position 1 is noise
    (one token whatever the problem). The code must come out d -> <think{d}> at purity 1, and position 1's
    token must not look like a code (its NMI is 0)."""
    task = load_task(TaskConfig(name="multiplication", digits=2, num_train=10, num_val=300, num_test=10))
    rows = list(task.dataset["validation"])
    first = [str(r["steps"][0]).replace(" ", "")[0] for r in rows]
    symbols = [[f"<think{d}>", "<think99>"] for d in first]
    best = [{"position": 0, "candidate": "step 1 char 1", "nmi": 1.0, "chance": 0.01},
            {"position": 1, "candidate": "answer char 1", "nmi": 0.0, "chance": 0.0}]
    codes = token_codes(rows, symbols, best)
    for d in set(first):
        c = codes[f"<think{d}>"]
        assert (c["value"], c["purity"], c["candidate"]) == (d, 1.0, "step 1 char 1")
        assert c["n"] == first.count(d)
    assert codes["<think99>"]["nmi"] == 0.0 and codes["<think99>"]["purity"] < 0.5


def sample_records(tmp_path, *flags):
    out = tmp_path / "rollouts.jsonl"
    assert main(["sample", "--model", "tiny", "--mode", "vocab", "--num-thinking", "4",
                 "--max-thought-tokens", "2", "--max-new-tokens", "6", "--task", "multiplication",
                 "--format", "jsonl", "--out", str(out), *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_sample_task_annotates_every_rollout(tmp_path):
    records = sample_records(tmp_path)
    assert len(records) == 16 and [r["group"] for r in records] == [g for g in range(4) for _ in range(4)]
    task = load_task(TaskConfig(name="multiplication"))
    rows = list(task.dataset["validation"])[:4]
    for rec in records:
        row = rows[rec["group"]]
        assert rec["prompt"] == row["prompt"] and rec["gold"] == row["answer"]
        assert rec["correct"] == bool(task.check(rec["answer"], row))
        assert rec["terms"]["exact_match"] == float(rec["correct"])
        assert rec["reward"] == pytest.approx(sum(rec["terms"].values()), abs=1e-5)
        for step in rec["steps"]:
            assert step["prob"] == pytest.approx(math.exp(step["logprob"]))
    for g in range(4):  # GRPO's advantage by hand: (r - mean) / (sample std + 1e-4) within each group
        rewards = [r["reward"] for r in records if r["group"] == g]
        mean = sum(rewards) / 4
        std = (sum((x - mean) ** 2 for x in rewards) / 3) ** 0.5
        got = [r["advantage"] for r in records if r["group"] == g]
        assert got == pytest.approx([(x - mean) / (std + 1e-4) for x in rewards], abs=1e-4)


def page(records):
    return to_html(records, title="t")


def test_page_counts_filters_and_shows_codes(tmp_path):
    records = sample_records(tmp_path, "--num-prompts", "2", "--num-samples", "3", "--rewards",
                             "exact_match", "--mode", "pause", "--num-pause", "2",
                             "--num-thinking", "1")  # pauses: thought steps for sure
    assert len(records) == 6 and all(set(r["terms"]) == {"exact_match"} for r in records)
    records[0]["correct"] = True  # one right answer, whatever the random model wrote
    thought = next(s for r in records for s in r["steps"] if s["kind"] == "thought")
    thought["code"] = {"value": "7", "purity": 0.98, "n": 50, "candidate": "step 1 char 1", "nmi": 0.9,
                       "chance": 0.01}
    html = page(records)
    right = sum(r["correct"] for r in records)
    assert f"6 rollouts, {right} right, {6 - right} wrong" in html
    assert html.count('class="rollout right"') == right and html.count('class="rollout wrong"') == 6 - right
    assert html.count("data-advantage=") == 6 and "onclick=\"show('wrong')\"" in html
    assert f"{thought['text']}=7".replace("<", "&lt;").replace(">", "&gt;") in html
    assert "purity 0.98 over 50 uses" in html
    assert f"gold {records[0]['gold']}" in html


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless Chromium here (docs/testing.md)")
def test_page_filters_in_a_headless_browser(tmp_path):
    """The page's own script run by Chromium: after show('right') only right rollouts are displayed."""
    records = sample_records(tmp_path, "--num-prompts", "2", "--num-samples", "2")
    records[1]["correct"] = True
    html = page(records).replace("</script>", "</script><script>show('right');"
                                 "document.title=[...document.querySelectorAll('.rollout')]"
                                 ".filter(d=>d.style.display!=='none').length</script>")
    path = tmp_path / "page.html"
    path.write_text(html)
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    right = sum(r["correct"] for r in records)
    assert f"<title>{right}</title>" in dom
