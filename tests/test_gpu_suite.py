"""`make gpu-suite`'s structure on a CPU: the parts list, failure records, JSON, the summary, the CPU exit,
and imports from a source checkout on PYTHONPATH (how the GPU machine runs it), so the GPU visit finds no
typo."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import thinktok.gpu_suite as suite

ROOT = suite.ROOT
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
# a fresh interpreter without the editable install's finder: only PYTHONPATH resolves `thinktok`
STRIP = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
    "sys.path_hooks[:] = [h for h in sys.path_hooks if 'editable' not in repr(h).lower()]; "
)


def source_checkout(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", STRIP + code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )


def test_parts_list():
    names = [p.name for p in suite.PARTS]
    assert len(set(names)) == len(names) and set(suite.BY_NAME) == set(names)
    assert all(callable(p.run) and p.budget_s > 0 and p.help for p in suite.PARTS)
    assert sum(p.budget_s for p in suite.PARTS) <= 9 * 60 - 10  # the 9 minutes, env report included
    assert {
        "kernel_tests",
        "kernel_errors",
        "attention",
        "rollout_batches",
        "rollout_compiled",
        "parallel",
        "train_gpt2small",
        "train_parallel_gpt2small",
    } == set(names)
    for config in ("configs/gpu_gpt2small.yaml", "configs/parallel_gpu_gpt2small.yaml"):
        assert (ROOT / config).is_file()


def broken(out):
    raise ValueError("bad thing\nsecond line")


def test_failures_are_recorded_and_the_suite_goes_on(tmp_path, capsys):
    parts = [suite.Part("first", broken, 5, "fails"), suite.Part("second", lambda out: {"x": 1}, 5, "works")]
    records = suite.run_suite(parts, tmp_path, isolate=False)
    assert [r["status"] for r in records] == ["failed", "ok"]
    failed = json.loads((tmp_path / "first.json").read_text())
    assert failed["error"]["type"] == "ValueError" and failed["error"]["message"].startswith("bad thing")
    assert failed["error"]["where"].startswith("tests/test_gpu_suite.py:") and failed["error"][
        "where"
    ].endswith("in broken")
    assert json.loads((tmp_path / "second.json").read_text())["results"] == {"x": 1}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [p["status"] for p in summary["parts"]] == ["failed", "ok"]
    table = capsys.readouterr().out
    assert (
        "1/2 parts ok; not ok: first" in table and "ValueError: bad thing (tests/test_gpu_suite.py:" in table
    )


@NO_GPU
def test_isolated_parts_record_failures_and_timeouts(tmp_path):
    """Real parts in their own processes: on a CPU each says it needs CUDA; one killed at its budget."""
    record = suite.run_isolated(suite.BY_NAME["kernel_errors"], tmp_path)
    assert record["status"] == "failed" and record["error"]["type"] == "RuntimeError"
    assert record["error"]["message"] == "no CUDA GPU" and record["error"]["where"].startswith(
        "thinktok/gpu_suite.py:"
    )
    assert json.loads((tmp_path / "kernel_errors.json").read_text()) == record
    assert "RuntimeError: no CUDA GPU" in (tmp_path / "kernel_errors.log").read_text()  # its traceback
    # 0.2 s is less than importing torch takes: the process is killed and the record says so
    timeout = suite.run_isolated(replace(suite.BY_NAME["parallel"], budget_s=0.2), tmp_path)
    assert timeout["status"] == "timeout" and "budget" in timeout["error"]["message"]
    assert json.loads((tmp_path / "parallel.json").read_text())["status"] == "timeout"


def test_dry_run_and_bad_parts(capsys):
    assert suite.main(["--dry-run", "--parts", "attention,parallel"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "parallel" in out and "total" in out and "kernel_tests" not in out
    assert suite.main(["--parts", "attention,nope"]) == 2
    assert "unknown parts nope" in capsys.readouterr().err


@NO_GPU
def test_cpu_exit_from_a_source_checkout(tmp_path):
    """The GPU machine's way in (PYTHONPATH, no install): every module imports, and on a CPU the suite says
    there is no GPU in one line, exits 1, no traceback."""
    code = (
        "import thinktok.rl.rollout as r, thinktok.kernels.parallel_thought as k, thinktok.models.thoughts, "
        "thinktok.analysis.bench, "
        "thinktok.rl.train; print(r.__file__, k.__file__); "
        "from thinktok.gpu_suite import main; sys.exit(main([]))"
    )
    done = source_checkout(code, tmp_path)
    assert done.returncode == 1, done.stderr
    kernel = ROOT / "kernels" / "parallel_thought.py"
    assert done.stdout.split() == [str(ROOT / "rl" / "rollout.py"), str(kernel)]
    assert "no CUDA GPU" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_target_takes_an_interpreter():
    done = subprocess.run(
        ["make", "-n", "gpu-suite", "PYTHON=python3", "GPU_SUITE_OUT=/tmp/x"], cwd=ROOT, capture_output=True,
        text=True,
    )
    assert "GPU_SUITE_OUT=/tmp/x python3 -m thinktok.gpu_suite" in done.stdout


def test_parts_run_at_tiny_sizes_on_cpu(tmp_path, monkeypatch):
    """The parts' own code (bench calls, kernel error records) shrunk to a CPU; the GPU runs the same. The
    compiled engine is traced by dynamo whole (fullgraph, as asked) and run by its eager backend: inductor's
    compile of each mode's step, 15-25 s cold on this CPU, is test_rollout.py's."""
    compile_ = torch.compile

    def traced_only(fn, *, fullgraph=False, dynamic=None, **inductor_only):
        return compile_(fn, fullgraph=fullgraph, dynamic=dynamic, backend="eager")

    monkeypatch.setattr(torch, "compile", traced_only)
    monkeypatch.setattr(
        suite,
        "SIZES", suite.Sizes(
            device="cpu", model="tiny", dtype="float32", new_tokens=16, batches=(2,), compiled_batch=2,
            compiled_modes=("vocab",), repeats=1, parallel=(2, 8, 2, 2), kernel=(1, 8, 2, 16),
            kernel_dtypes=("float32",), tiles=("fixed",),
        ),
    )
    for name in ("kernel_errors", "rollout_batches", "rollout_compiled", "parallel"):
        record = suite.run_in_process(suite.BY_NAME[name], tmp_path)
        assert record["status"] == "ok", record["error"]
        assert json.loads((tmp_path / f"{name}.json").read_text())["status"] == "ok"
    errors = json.loads((tmp_path / "kernel_errors.json").read_text())["results"]["float32/fixed"]
    assert set(errors) == {"forward", "dq", "dk", "dv", "decode"} and max(errors.values()) < 1e-5
    compiled = json.loads((tmp_path / "rollout_compiled.json").read_text())["results"]["modes"]["vocab"]
    assert compiled["compiled"]["ratio_vs_generate"] > 0 and compiled["compiled_vs_dynamic"] > 0
    batches = json.loads((tmp_path / "rollout_batches.json").read_text())["results"]
    assert list(batches) == ["2"] and set(batches["2"]["modes"]) == {"vocab", "continuous", "soft", "pause"}


def test_train_parts_on_cpu_with_a_brief_teacher(tmp_path, monkeypatch):
    """Both training parts' own code on the GPU configs, shrunk to a CPU: the missing teacher is trained (2
    SFT steps of a tiny model) into the suite's folder, then 2 RL steps each report samples/s."""
    small = (
        "device=cpu",
        "ray.gpus_per_rollout_worker=0",
        "ray.gpus_per_teacher_worker=0",
        "ray.num_rollout_workers=1",
        "ray.inline=true",  # the workers in this process: the train tests cover Ray actors
        "task.num_train=32",
        "task.num_val=4",
        "task.num_test=4",
        "thought.num_thinking=8",
        "rl.prompts_per_step=2",
        "rl.num_generations=2",
        "sampling.max_new_tokens=4",
        "thought.max_thought_tokens=2",
        "parallel.num_text=8",
        "parallel.thought_len=2",
        "parallel.lookahead=2",
        "eval_examples=2",
        "teacher=" + str(tmp_path / "missing"),
    )
    monkeypatch.setattr(
        suite,
        "SIZES", suite.Sizes(
            device="cpu", train_steps=2, train_overrides=small, teacher_overrides=(
                "model.name=tiny",
                "train.device=cpu",
                "train.max_steps=2",
                "task.num_train=32",
                "task.num_val=4",
                "task.num_test=4",
            ),
        ),
    )
    # the parallel part's learner and workers on the CPU path, not the kernel in Triton's interpreter (its
    # tests are test_kernels.py's; 0.6 s a launch)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for name in ("train_gpt2small", "train_parallel_gpt2small"):
        record = suite.run_in_process(suite.BY_NAME[name], tmp_path)
        assert record["status"] == "ok", record["error"]
        assert record["results"]["samples_per_s"] > 0 and record["results"]["last"]["step"] == 2
    assert (tmp_path / "teacher" / "checkpoint").is_dir()
