"""Peak-memory probe, run in a fresh process per measurement by `harness.measure_memory_subprocess`.

    python -m benchmarks.memprobe <suite module> <workload> <lib> '<config json>' <calls>

Builds the suite's workload for one library (model, optimizer, inputs), resets the resident-set
high-water mark, runs the workload `calls` times, and prints one JSON line with the peak growth.
A fresh process per measurement keeps one library's allocations from hiding the other's.
"""

from __future__ import annotations

import importlib
import json
import sys

import torch

from benchmarks.harness import peak_rss_delta


def main(argv: list[str]) -> None:
    module_name, workload, lib, config_json, calls = argv
    torch.set_num_threads(2)
    module = importlib.import_module(module_name)
    cfg = module.Config(**json.loads(config_json))
    work = module.WORKLOADS[workload](lib, cfg)
    result = peak_rss_delta(work.run, calls=int(calls))
    print(json.dumps({"lib": lib, "workload": workload, **result}))


if __name__ == "__main__":
    main(sys.argv[1:])
