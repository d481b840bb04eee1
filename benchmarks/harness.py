"""Shared benchmark harness: timing, memory, machine info, tables, JSON.

Timing: every library gets the same warmup, then the libraries are timed in interleaved repeats
(the order alternates each repeat, so drift in machine load hits both alike) and the median is
reported. Peak memory: one fresh subprocess per (library, workload) measures the growth of the
resident set (see `peak_rss_delta`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
LIBS = ("demask", "reference")


@dataclass(frozen=True)
class Workload:
    """One unit of work for one library, ready to be timed.

    run: does the work once (a training step, one `generate` call, ...).
    tokens: tokens processed (training) or produced (generation) by one call.
    flops: nominal model FLOPs of one call (see benchmarks/flops.py for the formulas).
    """

    run: Callable[[], Any]
    tokens: int
    flops: float


# ---------------------------------------------------------------------------------------- timing


def time_once(fn: Callable[[], Any], *, cuda: bool = False) -> float:
    """Wall-clock seconds of one call (synchronising the GPU around it when `cuda`)."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_interleaved(
    fns: dict[str, Callable[[], Any]], *, warmup: int, repeats: int, cuda: bool = False
) -> dict[str, list[float]]:
    """Time each function `repeats` times, interleaved, after `warmup` untimed calls each.

    Repeat r runs the functions in order when r is even and in reverse order when r is odd, so a
    slow drift in machine load (other processes, thermal) is shared between them.
    Returns {name: [seconds of each repeat]}.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(time_once(fns[name], cuda=cuda))
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def speed_row(name: str, work: Workload, seconds: Sequence[float]) -> dict[str, Any]:
    """The figures of one library on one workload, from its repeat times."""
    t = median(seconds)
    return {
        "library": name,
        "median_s": t,
        "min_s": float(min(seconds)),
        "max_s": float(max(seconds)),
        "repeats": len(seconds),
        "tokens_per_call": work.tokens,
        "tokens_per_s": work.tokens / t,
        "gflop_per_call": work.flops / 1e9,
        "gflops": work.flops / t / 1e9,
    }


# ---------------------------------------------------------------------------------------- memory


def _proc_status_kb(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux >= 4.0). True when it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_delta(fn: Callable[[], Any], calls: int = 2) -> dict[str, Any]:
    """Peak growth of the resident set while `fn` runs `calls` times, in bytes.

    Measures: VmHWM after the calls minus VmRSS before them, with the high-water mark reset just
    before (so the model's construction does not count). This is what the workload adds to the
    process at its peak: activations, gradients, optimizer state, caches, plus whatever the
    allocator keeps. Torch's CPU allocator is invisible to tracemalloc, which is why this reads the
    kernel's counters. Falls back to getrusage's ru_maxrss when /proc is unavailable.
    """
    import resource

    before = _proc_status_kb("VmRSS")
    can_reset = reset_peak_rss()
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(calls):
        fn()
    hwm = _proc_status_kb("VmHWM")
    ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if can_reset and before is not None and hwm is not None:
        return {"peak_delta_bytes": (hwm - before) * 1024, "method": "VmHWM - VmRSS (reset)"}
    return {"peak_delta_bytes": (ru_after - ru_before) * 1024, "method": "ru_maxrss delta"}


def measure_memory_subprocess(
    suite_module: str,
    workload: str,
    lib: str,
    config: dict[str, Any],
    *,
    calls: int = 2,
    timeout: int = 900,
) -> dict[str, Any]:
    """Run `benchmarks.memprobe` in a fresh Python for one (library, workload); return its JSON."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.memprobe",
        suite_module,
        workload,
        lib,
        json.dumps(config),
        str(calls),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")) if p
    )
    out = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"memprobe {suite_module} {lib} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- hardware


def matmul_peak_gflops(n: int = 4096, repeats: int = 5, threads: int = 2) -> dict[str, Any]:
    """This machine's practical fp32 matmul peak: GFLOP/s of an (n, n) @ (n, n) torch.mm.

    2 * n**3 FLOPs per product; one untimed warmup, then the median and the best of `repeats`.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        torch.mm(a, b)
        times = [time_once(lambda: torch.mm(a, b)) for _ in range(repeats)]
    finally:
        torch.set_num_threads(old)
    flops = 2.0 * n**3
    return {
        "n": n,
        "threads": threads,
        "median_gflops": flops / median(times) / 1e9,
        "best_gflops": flops / min(times) / 1e9,
    }


def cpu_model_name() -> str:
    """`Model name` from lscpu (falls back to /proc/cpuinfo, then platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> dict[str, Any]:
    """HEAD commit of the repository and whether the tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "-uno"))}


def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for dist in ("demask", "x-transformers", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def machine_info() -> dict[str, Any]:
    """Everything needed to read a figure later: machine, software, commit, date, load."""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": library_versions(),
        "git": git_commit(),
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------- presentation


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return f"{value:.3g}"
    return "" if value is None else str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table, columns padded to line up in a terminal."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells, expected {len(headers)}")
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


def record(suite: str, config: dict[str, Any], results: Any, **extra: Any) -> dict[str, Any]:
    """The JSON record every suite writes."""
    return {
        "suite": suite,
        "machine": machine_info(),
        "config": config,
        "results": results,
        **extra,
    }


# ------------------------------------------------------------------------------------ profiling


def profile_table(fn: Callable[[], Any], *, calls: int = 2, row_limit: int = 20) -> str:
    """torch.profiler's per-operator table for `calls` calls of `fn`, sorted by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)
