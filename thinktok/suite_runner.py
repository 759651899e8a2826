"""The GPU suite's runner (thinktok/gpu_suite.py holds the parts): each part in its own process under a time
limit, a JSON record per part whatever happens (ok, failed with where and why, timeout, crashed), the
summary table, and the machine's facts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "triton", "trl", "ray", "datasets", "accelerate", "pytest")


@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Path], dict]  # output folder -> results (JSON-able); raising marks the part failed
    budget_s: int  # wall-clock limit of the part's process, import and CUDA start-up included
    help: str


def where(exc: BaseException) -> str:
    """The innermost frame of the project's own code in exc's traceback (else the innermost of all)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(str(ROOT)) and "/site-packages/" not in f.filename]
    if not frames:
        return "?"
    f = (ours or frames)[-1]
    name = Path(f.filename).relative_to(ROOT) if f.filename.startswith(str(ROOT)) else f.filename
    return f"{name}:{f.lineno} in {f.name}"


def write(out: Path, name: str, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))


def run_in_process(part: Part, out: Path) -> dict:
    """Run one part here -> its record (ok, or failed with error type, message, where), also written."""
    start = time.perf_counter()
    record = {"name": part.name, "status": "ok", "error": None, "results": None, "budget_s": part.budget_s}
    try:
        record["results"] = part.run(out)
    except Exception as e:  # noqa: BLE001 -- any failure is recorded and the suite goes on
        traceback.print_exc()
        record |= {
            "status": "failed",
            "error": {"type": type(e).__name__, "message": str(e)[:2000], "where": where(e)},
        }
    record["seconds"] = round(time.perf_counter() - start, 1)
    write(out, part.name, record)
    return record


def run_isolated(part: Part, out: Path) -> dict:
    """Run one part in a child process (`--run-part`), its output shown and kept in `<part>.log`; the child
    writes the record. After its budget the child's whole process group is killed (Ray's processes too)."""
    start = time.perf_counter()
    path = out / f"{part.name}.json"
    path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "thinktok.gpu_suite", "--run-part", part.name, "--out", str(out)]
    with open(out / f"{part.name}.log", "w") as log:
        child = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
        )
        tee = threading.Thread(target=copy_lines, args=(child.stdout, log), daemon=True)
        tee.start()
        try:
            child.wait(timeout=part.budget_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        try:  # what the part left behind (a Ray cluster after a failure, say) must not hold the GPU
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()
        tee.join(timeout=5)
    if not timed_out and path.exists():
        return json.loads(path.read_text())
    if timed_out:
        status, error = (
            "timeout", {"type": "Timeout", "message": f"killed after its budget of {part.budget_s} s"},
        )
    else:
        status, error = "failed", {"type": "Crashed", "message": f"exit code {child.returncode}, no record"}
    record = {
        "name": part.name,
        "status": status,
        "error": {**error, "where": f"{part.name}.log"},
        "results": None,
        "budget_s": part.budget_s,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write(out, part.name, record)
    return record


def copy_lines(source, log) -> None:
    for line in source:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)


def run_suite(parts: list[Part], out: Path, isolate: bool = True) -> list[dict]:
    """Every part in order, whatever the earlier ones did; then summary.json and the printed table."""
    records = []
    for part in parts:
        print(f"\n=== {part.name} (budget {part.budget_s} s): {part.help}", flush=True)
        records.append((run_isolated if isolate else run_in_process)(part, out))
    write(
        out,
        "summary",
        {"parts": [{k: r[k] for k in ("name", "status", "seconds", "budget_s", "error")} for r in records]},
    )
    print(summary_table(records))
    return records


def summary_table(records: list[dict]) -> str:
    lines = [f"{'part':<22} {'status':<8} {'seconds':>8} {'budget':>7}  why", "-" * 100]
    for r in records:
        e = r["error"]
        why = (
            f"{e['type']}: {e['message'].splitlines()[0][:80] if e['message'] else ''} ({e['where']})"
            if e
            else ""
        )
        lines.append(f"{r['name']:<22} {r['status']:<8} {r['seconds']:>8.1f} {r['budget_s']:>7}  {why}")
    failed = [r["name"] for r in records if r["status"] != "ok"]
    lines.append(
        f"{len(records) - len(failed)}/{len(records)} parts ok"
        + (f"; not ok: {', '.join(failed)}" if failed else "")
    )
    return "\n".join(lines)


# ---- the parts ------------------------------------------------------------------------------------


def env_info(out: Path) -> dict:
    """nvidia-smi's report and the package versions (printed at the top of the output)."""
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        smi = f"nvidia-smi failed: {e}"
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"nvidia_smi": smi, "versions": versions}
