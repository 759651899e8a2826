"""`thinktok sample`: output formats, the error paths (one line, exit code 2), and what commands import."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from thinktok.cli import main
from thinktok.models.policy import load_policy


def test_jsonl_schema(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--mode", "soft", "--num-samples", "2", "--max-new-tokens", "4",
                 "--max-thought-tokens", "2",
                 "--format", "jsonl", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    for rec in records:
        assert {"prompt", "mode", "steps", "text_only", "num_text", "num_thought"} <= rec.keys()
        assert rec["prompt"] == "12 * 34 =" and rec["mode"] == "soft"
        assert len(rec["steps"]) == rec["num_text"] + rec["num_thought"]
        # <bot> is a row of the expanded vocabulary, so it carries its nearest text tokens; text does not
        assert {"kind", "token_id", "text", "logprob", "prob", "nearest"} == rec["steps"][0].keys()
        assert len(rec["steps"][0]["nearest"]) == 3
        assert all("nearest" not in s for s in rec["steps"] if s["kind"] == "text")
        assert [s["kind"] for s in rec["steps"][:4]] == ["thought"] * 4  # <bot>, 2 soft thoughts, <eot>
        assert rec["steps"][1]["text"].startswith("<soft: ") and rec["steps"][1]["token_id"] is None
        assert rec["text_only"] == "".join(s["text"] for s in rec["steps"] if s["kind"] == "text")


def test_text_and_html_show_thinking_tokens(tmp_path, monkeypatch):
    import conftest

    original = load_policy

    def boosted(*a, **k):  # make the untrained model emit thinking tokens so they are rendered
        p = original(*a, **k)
        conftest.boost_thinking(p)
        return p

    monkeypatch.setattr("thinktok.models.policy.load_policy", boosted)
    html = tmp_path / "s.html"
    assert main(["sample", "--num-thinking", "8", "--max-thought-tokens", "3", "--num-samples", "3",
                 "--format", "html", "--out", str(html)]) == 0
    page = html.read_text()
    assert page.startswith("<!doctype html>") and '<span class="thought"' in page and "&lt;think" in page
    text = tmp_path / "s.txt"
    assert main(["sample", "--num-thinking", "8", "--max-thought-tokens", "3", "--num-samples", "3",
                 "--out", str(text)]) == 0
    assert "<think" in text.read_text()


def test_parallel_sample_puts_a_thought_after_every_token(capsys):
    assert main(["sample", "--mode", "parallel", "--num-thinking", "8", "--max-thought-tokens", "2",
                 "--num-samples", "1", "--format", "jsonl"]) == 0
    rec = json.loads(capsys.readouterr().out)
    kinds = [s["kind"] for s in rec["steps"]]
    assert rec["mode"] == "parallel" and rec["num_text"] == 4 and kinds == ["text", "thought", "thought"] * 4
    thoughts = [s for s in rec["steps"] if s["kind"] == "thought"]
    assert all(s["text"].startswith("<think") and s["logprob"] <= 0 for s in thoughts)
    assert rec["text_only"] == "12 * 34 ="


def test_continuous_marker_shows_nearest_tokens(capsys):
    assert main(["sample", "--mode", "continuous", "--num-samples", "1", "--max-new-tokens", "2",
                 "--max-thought-tokens", "1", "--format", "jsonl"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["steps"][1]["text"].startswith("<cont: ") and rec["steps"][1]["text"].count("|") == 2


@pytest.mark.parametrize("args, message", [
    (["--mode", "telepathy"], "unknown thought mode 'telepathy'"),
    (["--num-thinking", "-2"], "num_thinking must be >= 0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["--model", "/no/such/checkpoint"], "does not exist"), (["--format", "pdf"], "unknown format"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_errors_are_one_line_exit_2(args, message, capsys):
    assert main(["sample", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("thinktok: error: ") and message in err
    assert "Traceback" not in err


def test_checkpoint_without_requested_tokens(tmp_path, capsys):
    load_policy("tiny", 4, markers=False).save(tmp_path / "ck")
    capsys.readouterr()  # the save's progress bar
    assert main(["sample", "--model", str(tmp_path / "ck"), "--num-thinking", "64"]) == 2
    err = capsys.readouterr().err
    # one error line (after transformers' loading bar)
    assert "Traceback" not in err and err.splitlines()[-1].startswith("thinktok: error: ")
    assert "has 4 thinking tokens" in err.splitlines()[-1]
    assert main(["sample", "--model", str(tmp_path / "ck"), "--num-thinking", "4", "--num-samples", "1",
                 "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize("args, message", [
    (["train", "configs/quickstart.yaml", "rl.algo=a2c"], "unknown algo 'a2c'"),
    (["train", "configs/quickstart.yaml", "rl.lrr=1"], "unknown config key rl.lrr"),
    (["train", "configs/quickstart.yaml", "thought.mode=telepathy"], "unknown thought mode"),
    (["train", "configs/quickstart.yaml", "rewards.weights={vibes: 1}"], "unknown reward mode 'vibes'"),
    (["train", "--resume", "/no/such/run"], "no/such/run/config.yaml"), (["train"], "needs a CONFIG"),
    (["sft", "configs/sft_mult2_tiny.yaml", "train.batch_size=big"], "train.batch_size: expected int"),
    (["eval", "/no/such/run"], "no checkpoint found"),
])
def test_config_commands_reject_bad_input(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("thinktok: error: ") and message in err and err.count("\n") == 1


def test_summary_means_and_spreads_over_runs(tmp_path, capsys):
    """Two fake runs' first/last evals -> mean and sample std per column, by hand."""
    def ev(step, acc, none, pause, shuf, steps):
        controls = {k: {"accuracy": v} for k, v in zip(("no_thoughts", "pause", "shuffled_thoughts"),
                                                       (none, pause, shuf))}
        return json.dumps({"step": step, "accuracy": acc, "thought_steps_mean": steps, "controls": controls})

    for name, end in (("a", ev(10, 0.5, 0.1, 0.2, 0.3, 2.0)), ("b", ev(10, 0.7, 0.3, 0.2, 0.1, 4.0))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "evals.jsonl").write_text(ev(0, 0.0, 0.0, 0.0, 0.0, 1.0) + "\n" + ev(
            5, 9, 9, 9, 9, 9)
                                                     + "\n" + end + "\n")
    out = tmp_path / "s.json"
    assert main(["summary", str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["end"]["learned"]["mean"] == pytest.approx(0.6)
    assert s["end"]["learned"]["std"] == pytest.approx(0.1414214)
    assert s["end"]["pause"]["std"] == 0 and s["end"]["thought_steps"]["values"] == [2.0, 4.0]
    assert s["start"]["learned"]["mean"] == 0 and s["steps"] == [[0, 10], [0, 10]]
    assert "shuffled thoughts" in capsys.readouterr().out
    assert main(["summary", str(tmp_path)]) == 2  # no evals.jsonl: one error line


def test_sample_reads_the_checkpoints_thought_settings(tmp_path, capsys):
    """A checkpoint records its vocabulary and thought mode: `sample --model CKPT` needs no other flag (8
    thinking tokens, 2 fixed slots here), flags override what they state, and a model directory from before
    the run-info layout gets an error naming the missing file."""
    from thinktok.checkpoint import RUN_INFO, save_run_info
    from thinktok.envs import TaskConfig
    from thinktok.models.thought_config import ThoughtConfig

    policy = load_policy("tiny", 8, False)
    policy.save(tmp_path / "ckpt")
    save_run_info(tmp_path / "ckpt", TaskConfig(), "rl", ThoughtConfig(mode="vocab", num_thinking=8, slots=2))
    out = tmp_path / "s.jsonl"
    common = ["sample", "--model", str(tmp_path / "ckpt"), "--num-samples", "2", "--max-new-tokens", "3",
              "--format", "jsonl", "--out", str(out)]
    assert main(common) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["num_thought"] for r in records] == [2, 2]
    assert main(common + ["--mode", "pause", "--num-thinking", "8", "--num-pause", "3"]) == 0
    assert [json.loads(line)["num_thought"] for line in out.read_text().splitlines()] == [3, 3]
    policy.model.save_pretrained(tmp_path / "old")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "old")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("thinktok: error: ")
    assert RUN_INFO in err.splitlines()[-1]


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user errors become one line and exit code 2: an error of the code itself propagates."""
    import thinktok.analysis.evaluate as evaluate

    def broken(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(evaluate, "evaluate", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["eval", "somewhere"])


# imported by a command that neither compiles, starts Ray nor builds a task, they only cost start-up time
HEAVY = ("ray", "trl", "triton", "thinktok.kernels", "datasets")


def probe(code: str, cwd) -> subprocess.Popen:
    """A fresh interpreter started on `code` in `cwd`, which is on its sys.path (`finished` reads it);
    `heavy()` in it prints the HEAVY modules it holds so far."""
    head = f"import sys\ndef heavy():\n    print('HEAVY', *[m for m in {HEAVY!r} if m in sys.modules])\n"
    return subprocess.Popen([sys.executable, "-c", head + code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def finished(proc: subprocess.Popen, returncode: int = 0) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()  # a no-op once it has exited; a hung one does not outlive the test
    assert proc.returncode == returncode, stderr[-2000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def heavy_after_each(out: subprocess.CompletedProcess) -> list[set[str]]:
    return [set(line.split()[1:]) for line in out.stdout.splitlines() if line.startswith("HEAVY")]


def test_commands_import_only_what_they_use(tmp_path):
    """`sample --help`, parsing a train config and a sequential `sample` add none of HEAVY: transformers'
    GPT-2 modeling imports torch._dynamo and with it Triton (transformers 5.24), allowed only where
    transformers does it alone. The sequential path (train, sft, eval, a sampled rollout) never imports the
    kernels or registers the parallel attention backend. One fresh interpreter runs the stages in order and
    reports after each: modules only accumulate, so each stage's check holds for it and all before it. It ends
    as `python -m thinktok.cli` with a bad flag: exit status 2 and one error line. transformers alone is
    imported from the repository root, as a script or Ray worker started there does: the root's kernels/
    folder must not shadow the `kernels` distribution transformers imports (it has no __init__.py)."""
    root = Path(__file__).parents[1]
    config = root / "configs" / "quickstart.yaml"
    # the two interpreters run at once: each is one core's imports
    alone = probe("from transformers import GPT2LMHeadModel\nheavy()", root)
    sample = "main(['sample', '--num-samples', '1', '--max-new-tokens', '2', '--out', "
    text, jsonl = sample + "'s.txt'])", sample + "'s.jsonl', '--format', 'jsonl'])"
    staged = probe(
        "from thinktok.cli import main\n"
        "try:\n    main(['sample', '--help'])\nexcept SystemExit:\n    pass\nheavy()\n"
        "from thinktok.config import load_config\nfrom thinktok.rl.config import TrainConfig\n"
        f"load_config(TrainConfig, {str(config)!r}, [])\nheavy()\n"
        f"assert {text} == 0\nheavy()\n"
        "import thinktok.rl.train, thinktok.sft, thinktok.analysis.evaluate, thinktok.analysis.compare\n"
        f"assert {jsonl} == 0\n"
        "from transformers import AttentionInterface\n"
        "ours = ('thinktok.kernels', 'thinktok.models.parallel_gpt2')\n"
        "bad = [m for m in sys.modules if m.startswith(ours)]\n"
        "bad += [k for k in AttentionInterface._global_mapping if 'parallel' in k]\nprint('loaded:', bad)\n"
        "import runpy\nsys.argv = ['thinktok', 'sample', '--mode', 'telepathy']\n"
        "runpy.run_module('thinktok.cli', run_name='__main__')\n",
        tmp_path)
    try:
        (own,) = heavy_after_each(finished(alone))
        done = finished(staged, returncode=2)
    finally:
        staged.kill()  # the other one too, if the first failed
    helped, parsed, sampled = heavy_after_each(done)
    assert helped == set()
    assert parsed <= own & {"triton"} and sampled <= own & {"triton"}
    assert (tmp_path / "s.txt").stat().st_size > 0 and (tmp_path / "s.jsonl").stat().st_size > 0
    assert "loaded: []" in done.stdout.splitlines()
    assert done.stderr.splitlines()[-1].startswith("thinktok: error: ") and "telepathy" in done.stderr
