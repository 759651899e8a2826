"""The one timer and JSON writer of the benchmarks (analysis/bench.py, kernels/bench.py): benchmarks report
ratios against a baseline timed the same way in the same process."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch


def timed(fn, repeats: int, device: str, warm_up: int = 1) -> float:
    """Median seconds of fn() over `repeats` calls, after `warm_up` untimed calls. On CUDA, CUDA events around
    the call (the GPU's own time, the launch included); elsewhere the wall clock."""
    for _ in range(int(warm_up)):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def write_json(path: Path, results: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    return path
