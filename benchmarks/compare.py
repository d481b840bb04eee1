"""The side-by-side speed comparison every speed suite runs.

A speed suite module defines a `Config` dataclass and `WORKLOADS: dict[name, (lib, cfg) ->
Workload]`. For each workload, `compare` builds it for both libraries in this process, times them
interleaved (same warmup, same repeats, same threads), measures peak memory of each in its own
subprocess, and returns rows plus the demask/reference ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
from types import ModuleType
from typing import Any

import torch

from benchmarks import harness
from benchmarks.libs import reference_available

MIB = 2**20


def compare(module: ModuleType, cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Time (and measure the memory of) every workload of `module` for both libraries."""
    libs = [lib for lib in args.libs if lib != "reference" or reference_available()]
    torch.set_num_threads(args.threads)
    cfg_dict = dataclasses.asdict(cfg)
    results: dict[str, Any] = {}
    names = args.workloads or list(module.WORKLOADS)
    for name in names:
        if name not in module.WORKLOADS:
            raise ValueError(f"--workload must be among {sorted(module.WORKLOADS)}, got {name!r}")
        make = module.WORKLOADS[name]
        works = {lib: make(lib, cfg) for lib in libs}
        times = harness.time_interleaved(
            {lib: w.run for lib, w in works.items()}, warmup=args.warmup, repeats=args.repeats
        )
        rows = {lib: harness.speed_row(lib, works[lib], times[lib]) for lib in libs}
        if args.memory:
            for lib in libs:
                mem = harness.measure_memory_subprocess(module.__name__, name, lib, cfg_dict)
                rows[lib]["peak_mem_delta_bytes"] = mem["peak_delta_bytes"]
                rows[lib]["memory_method"] = mem["method"]
        entry: dict[str, Any] = {"rows": rows}
        if "reference" in rows and "demask" in rows:
            d, r = rows["demask"], rows["reference"]
            entry["ratio_tokens_per_s"] = d["tokens_per_s"] / r["tokens_per_s"]
            if "peak_mem_delta_bytes" in d:
                entry["ratio_peak_mem"] = d["peak_mem_delta_bytes"] / max(
                    r["peak_mem_delta_bytes"], 1
                )
        if args.profile:
            entry["profile"] = {lib: harness.profile_table(works[lib].run) for lib in libs}
        results[name] = entry
        del works
    return results


def table(results: dict[str, Any], matmul_peak_gflops: float | None = None) -> str:
    """One markdown table: a row per (workload, library) and a ratio row per workload."""
    headers = ["workload", "library", "s/call (median)", "tokens/s", "GFLOP/s"]
    if matmul_peak_gflops:
        headers.append("% mm peak")
    headers.append("peak mem (MiB)")
    rows: list[list[Any]] = []
    for name, entry in results.items():
        for lib, row in entry["rows"].items():
            cells = [name, lib, row["median_s"], row["tokens_per_s"], row["gflops"]]
            if matmul_peak_gflops:
                cells.append(100.0 * row["gflops"] / matmul_peak_gflops)
            mem = row.get("peak_mem_delta_bytes")
            cells.append(None if mem is None else mem / MIB)
            rows.append(cells)
        if "ratio_tokens_per_s" in entry:
            cells = [name, "demask / reference", None, entry["ratio_tokens_per_s"], None]
            if matmul_peak_gflops:
                cells.append(None)
            cells.append(entry.get("ratio_peak_mem"))
            rows.append(cells)
    return harness.format_table(headers, rows)


def print_profiles(results: dict[str, Any]) -> None:
    for name, entry in results.items():
        for lib, text in entry.get("profile", {}).items():
            print(f"\n### profile {name} / {lib}\n{text}")


def add_speed_args(p: argparse.ArgumentParser, *, warmup: int, repeats: int) -> None:
    """The options every speed suite accepts."""
    p.add_argument("--warmup", type=int, default=warmup, help="untimed calls per library")
    p.add_argument("--repeats", type=int, default=repeats, help="timed calls per library")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak memory")
    p.add_argument(
        "--libs", nargs="+", default=list(harness.LIBS), choices=harness.LIBS, help="libraries"
    )
    p.add_argument("--profile", action="store_true", help="print torch.profiler op tables")
    p.add_argument(
        "--workload", dest="workloads", action="append", help="run only this workload (repeatable)"
    )


def run_suite(module: ModuleType, name: str, cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Compare both libraries on `module`'s workloads, print the table and return the record."""
    results = compare(module, cfg, args)
    print(f"## {name}  (config {dataclasses.asdict(cfg)})")
    print(table(results))
    print_profiles(results)
    return harness.record(name, dataclasses.asdict(cfg), results, args=vars(args))
