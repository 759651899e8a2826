"""`make gpu-suite` (`python -m thinktok.gpu_suite`): every measurement the first GPU visit must bring back,
in one command, from the repository root of a CUDA machine. Each part runs in its own process under a time
limit (a CUDA error poisons its process's context; a hung capture must not eat the others' time), writes
`<part>.json` and `<part>.log` into GPU_SUITE_OUT (default runs/gpu-suite/), and the suite ends with a summary
table that says which parts failed and why. On a machine without CUDA it says so in one line and exits 1.

    python -m thinktok.gpu_suite [--parts a,b] [--out DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from .suite_runner import ROOT, Part, env_info, run_in_process, run_isolated, run_suite, summary_table, write

# the suite's entry points, the runner's included (tests and scripts reach them here)
__all__ = ["BY_NAME", "PARTS", "ROOT", "SIZES", "Sizes", "main", "run_in_process", "run_isolated",
           "run_suite", "summary_table"]


@dataclass(frozen=True)
class Sizes:
    """What the parts run at. The CPU tests shrink it (tiny model, CPU, the interpreter) to run the parts' own
    code without a GPU."""

    device: str = "cuda"
    model: str = "base"  # GPT-2 small's shape
    dtype: str = "bfloat16"
    new_tokens: int = 128
    batches: tuple[int, ...] = (1, 64, 256)
    compiled_batch: int = 64
    compiled_modes: tuple[str, ...] = ("vocab", "continuous", "soft")  # the goal's modes: 3 compiles
    repeats: int = 1  # timed calls after the warm-up (see Budgets)
    parallel: tuple[int, int, int, int] = (8, 64, 8, 4)  # batch, T, L, n
    kernel: tuple[int, int, int, int] = (4, 1024, 16, 64)  # heads, T, L, head dim
    kernel_dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    tiles: tuple[str, ...] = ("fixed", "autotune")  # autotuned at bfloat16 only (compiles: see Budgets)
    train_steps: int = 20
    train_overrides: tuple[str, ...] = ()
    # a missing teacher: 150 steps of batch 128 on 4096 examples
    teacher_overrides: tuple[str, ...] = ("train.max_steps=150", "task.num_train=4096")


SIZES = Sizes()


def need_cuda() -> None:
    import torch

    if SIZES.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU")


def kernel_tests(out: Path) -> dict:
    """The GPU-only tests of tests/test_kernels.py: full size, forward, backward, bf16/fp16/fp32, decode."""
    import pytest

    need_cuda()
    junit = out / "kernel_tests.xml"
    args = ["-q", "-p", "no:cacheprovider", "-k", "on_gpu", f"--junitxml={junit}"]
    code = pytest.main([*args, str(ROOT / "tests" / "test_kernels.py")])
    cases = list(ElementTree.parse(junit).getroot().iter("testcase"))
    failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    if code != 0:
        raise AssertionError(f"pytest exit code {int(code)}; failed: {', '.join(failed) or '?'}")
    return {
        "tests": len(cases),
        "skipped": sum(c.find("skipped") is not None for c in cases),
        "junit": str(junit),
    }


def kernel_errors(out: Path) -> dict:
    """Relative errors against the fp32 references at full length (T=1024, L=16; forward, dQ, dK, dV) and of
    the decode step (T=1024, last thought step), per tile setting and dtype."""
    import torch

    from thinktok.kernels.parallel_decode import parallel_thought_decode, parallel_thought_decode_reference
    from thinktok.kernels.parallel_thought import (
        parallel_thought_attention,
        parallel_thought_attention_reference,
    )

    need_cuda()

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    heads, t, l, d = SIZES.kernel
    device, results = SIZES.device, {}
    for dtype in (getattr(torch, name) for name in SIZES.kernel_dtypes):
        g = torch.Generator(device=device).manual_seed(0)
        # batch 1 x 4 heads: the reference's (B, H, N, N) fp32 scores at N = 17408 take 1.2 GB a head
        q, k, v = (
            torch.randn(1, heads, t * (1 + l), d, device=device, generator=g, dtype=dtype).requires_grad_()
            for _ in range(3)
        )
        ref = parallel_thought_attention_reference(q, k, v, t, l)
        do = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, (q, k, v), do)
        dec = [x.detach()[:, :, :t] for x in (q, k, v)]
        kt, vt = (torch.randn(1, heads, t, l, d, device=device, generator=g, dtype=dtype) for _ in range(2))
        dec_ref = parallel_thought_decode_reference(*dec, kt, vt)
        for tiles in [t for t in SIZES.tiles if t == "fixed" or dtype == torch.bfloat16]:
            o = parallel_thought_attention(q, k, v, t, l, tiles=tiles)
            grads = torch.autograd.grad(o, (q, k, v), do)
            results[f"{str(dtype)[6:]}/{tiles}"] = {
                "forward": rel(o, ref), **{f"d{n}": rel(a, b) for n, a, b in zip("qkv", grads, ref_grads)},
                "decode": rel(parallel_thought_decode(*dec, kt, vt, tiles=tiles), dec_ref),
            }
    print(json.dumps(results, indent=1))
    return results


def attention(out: Path) -> dict:
    from thinktok.kernels.bench import bench_attention

    need_cuda()
    return bench_attention(out / "attention")


def rollout_batches(out: Path) -> dict:
    """Every mode's dynamic sampler against HF generate: base (GPT-2 small's shape), bf16, 128 new tokens."""
    from thinktok.analysis.bench import bench_rollout

    need_cuda()
    return {
        b: bench_rollout(
            SIZES.model, b, SIZES.new_tokens, 1, SIZES.device, SIZES.dtype, out / f"rollout_b{b}",
            engines=("dynamic",),
        )
        for b in SIZES.batches
    }


def rollout_compiled(out: Path) -> dict:
    """Batch 64: the static-cache sampler with its step compiled as CUDA graphs, every mode (the 5x goal)."""
    from thinktok.analysis.bench import bench_rollout

    need_cuda()
    return bench_rollout(
        SIZES.model, SIZES.compiled_batch, SIZES.new_tokens, SIZES.repeats, SIZES.device, SIZES.dtype,
        out / "rollout_compiled", modes=SIZES.compiled_modes,
    )


def parallel(out: Path) -> dict:
    from thinktok.analysis.bench import bench_parallel

    need_cuda()
    return bench_parallel(
        SIZES.model, *SIZES.parallel, SIZES.repeats, SIZES.device, SIZES.dtype, out / "parallel"
    )


def suite_teacher(out: Path, cfg) -> list[str]:
    """Overrides pointing a train config at its teacher: itself if present, else one trained briefly here."""
    from thinktok.config import load_config
    from thinktok.sft import run_sft
    from thinktok.sft_config import SFTConfig

    if cfg.teacher is None or Path(cfg.teacher).exists():
        return []
    ckpt = out / "teacher" / "checkpoint"
    if not ckpt.exists():  # a model, not a good one: what 20 RL steps need to run at all
        run_sft(
            load_config(
                SFTConfig, ROOT / cfg.teacher_sft, [f"run_dir={out / 'teacher'}", *SIZES.teacher_overrides]
            )
        )
    return [f"policy={ckpt}", f"teacher={ckpt}"]


class PeakMemory:
    """Device-wide peak of used GPU memory (the learner and the Ray actors sharing the GPU), polled."""

    def __init__(self, every_s: float = 0.25):
        self.peak, self.every_s, self.stop = 0, every_s, threading.Event()

    def poll(self):
        import torch

        while not self.stop.wait(self.every_s):
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)

    def __enter__(self):
        self.thread = threading.Thread(target=self.poll, daemon=True)
        if SIZES.device == "cuda":
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def train(config: str) -> Callable[[Path], dict]:
    def run(out: Path) -> dict:
        import torch

        from thinktok.config import load_config
        from thinktok.rl.config import TrainConfig
        from thinktok.rl.train import run_train

        need_cuda()
        run_dir, steps = out / Path(config).stem, SIZES.train_steps
        overrides = [
            *SIZES.train_overrides,
            f"run_dir={run_dir}",
            f"rl.max_steps={steps}",
            "eval_every=0",
            f"save_every={steps}",
        ]
        overrides += suite_teacher(out, load_config(TrainConfig, ROOT / config, overrides))
        cfg = load_config(TrainConfig, ROOT / config, overrides)
        start = time.perf_counter()
        with PeakMemory() as peak:
            run_train(cfg)
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rates = [m["samples_per_s"] for m in metrics[1:] if m.get("samples_per_s")]  # the first step warms up
        cuda = SIZES.device == "cuda"
        return {
            "config": config,
            "steps": steps,
            "overrides": overrides,
            "seconds": time.perf_counter() - start,
            "samples_per_s": sum(rates) / len(rates) if rates else None,
            "peak_gpu_memory_gb": peak.peak / 2**30 if cuda else None,
            "learner_peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "last": metrics[-1],
        }

    return run


# Budgets: each is the part's hard wall-clock limit, process start and imports (~5 s) included; they sum to
# 530 s so the suite ends inside 9 minutes (540 s) on one H100 even if every part runs to its limit (the env
# report before them takes ~2 s). Predicted, none measured on a GPU yet:
#   kernel_tests 75: 4 kernels x 3 dtypes with fixed tiles + 6 candidates x 4 kernels autotuned at bf16 = 36
#     Triton compiles at ~1.5 s, plus the reference at (1, 4, 17408^2) fp32 in 12 tests (~1 s each)
#   kernel_errors 25: the same kernels again, from Triton's on-disk cache; the autotuner times 24 candidates
#   attention 70: FlexAttention's compile per size (~3 x 10 s) + 3 sizes x 5 implementations x 46 timed calls
#     (dense SDPA at (1024, 16): ~60 ms fwd+bwd) + autotuning per size (~5 s, compiles cached)
#   rollout_batches 75: 12 model loads (~1.5 s) + 3 batches x (generate + 4 modes) x 2 calls x 128 steps
#     x ~10 ms (HF generate's per-step overhead at every batch) = 38 s
#   rollout_compiled 105: 3 compiles of the decode step with CUDA graphs (~20 s each) + 3 modes x 4 calls
#   parallel 25: the naive loop: 630 forwards a call x 2 calls at ~4 ms, the rest far less
#   train_gpt2small 100: a missing teacher (150 SFT steps at batch 128 + 4096 examples tokenised, ~25 s) +
#     Ray start (~10 s) + 20 GRPO steps of 256 rollouts (~2.5 s each)
#   train_parallel_gpt2small 55: Ray start + 20 steps of 16 windows of 4096 tokens through the kernel (~1 s)
PARTS = [
    Part(
        "kernel_tests", kernel_tests, 75,
        "GPU-only tests of tests/test_kernels.py (full size, dtypes, decode)",
    ), Part("kernel_errors", kernel_errors, 25, "relative errors at T=1024 L=16, fixed vs autotuned tiles"),
    Part(
        "attention", attention, 70,
        "bench attention: kernel (fixed, autotuned) vs dense SDPA vs compiled flex",
    ), Part(
        "rollout_batches", rollout_batches, 75,
        "bench rollout, base bf16, batch 1/64/256, dynamic vs generate",
    ), Part("rollout_compiled", rollout_compiled, 105, "bench rollout, batch 64, compiled static sampler"),
    Part("parallel", parallel, 25, "bench parallel on CUDA (base bf16, batch 8, T 64, L 8, n 4)"), Part(
        "train_gpt2small", train("configs/gpu_gpt2small.yaml"), 100, "20 steps of configs/gpu_gpt2small.yaml"
    ), Part(
        "train_parallel_gpt2small", train("configs/parallel_gpu_gpt2small.yaml"), 55,
        "20 steps of configs/parallel_gpu_gpt2small.yaml",
    ),
]
BY_NAME = {p.name: p for p in PARTS}


def main(argv: list[str] | None = None) -> int:
    for key, value in (
        ("HF_HUB_OFFLINE", "1"), ("RAY_AUTH_MODE", "disabled"), ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(key, value)
    p = argparse.ArgumentParser(prog="gpu-suite", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--parts", default=",".join(BY_NAME), help=f"comma-separated, in order; of {', '.join(BY_NAME)}"
    )
    p.add_argument(
        "--out", default=os.environ.get("GPU_SUITE_OUT", "runs/gpu-suite"), help="folder for the JSON"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and the budgets, run nothing")
    p.add_argument("--run-part", help=argparse.SUPPRESS)  # the child process of one part
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.run_part:
        return 0 if run_in_process(BY_NAME[a.run_part], out)["status"] == "ok" else 1
    names = [n for n in a.parts.split(",") if n]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(
            f"gpu-suite: error: unknown parts {', '.join(unknown)}; expected some of {', '.join(BY_NAME)}",
            file=sys.stderr,
        )
        return 2
    parts = [BY_NAME[n] for n in names]
    if a.dry_run:
        for part in parts:
            print(f"{part.name:<26} {part.budget_s:>4} s  {part.help}")
        print(
            f"{'total':<26} {sum(p.budget_s for p in parts):>4} s  -> {out}/<part>.json, {out}/summary.json"
        )
        return 0
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu-suite: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing run",
            file=sys.stderr,
        )
        return 1
    env = env_info(out)
    write(out, "env", env)
    print(env["nvidia_smi"])
    print("  ".join(f"{k} {v}" for k, v in env["versions"].items()), flush=True)
    records = run_suite(parts, out)
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
