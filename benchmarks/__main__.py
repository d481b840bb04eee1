"""python -m benchmarks <suite> [--smoke] [--out PATH] [suite options]

Suites (one module each; `python -m benchmarks <suite> --help` for its options):
  speed/train            training step tokens/s, GFLOP/s, % of the fp32 matmul peak, peak memory
  speed/masked-generate  NonAutoregressiveWrapper.generate tokens/s
  speed/ar-generate      AutoregressiveWrapper.generate tokens/s with the key/value cache
  quality                validation NELBO / NLL in bits per byte at an equal training budget
  ablation               one change per row vs the reference, several seeds (masked models)
  positions              does a masked Encoder use its context at seq 256? (a fast probe)
  frontier               masked generation steps vs generative perplexity vs wall time (+ PNG)
  gpu                    bf16 / compile / fused AdamW / SDPA: MFU and generation (CUDA only)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from benchmarks.harness import REPO, git_commit, write_json

SUITES: dict[str, str] = {
    "speed/train": "benchmarks.speed_train",
    "speed/masked-generate": "benchmarks.speed_masked_generate",
    "speed/ar-generate": "benchmarks.speed_ar_generate",
    "quality": "benchmarks.quality",
    "ablation": "benchmarks.ablation",
    "positions": "benchmarks.positions",
    "frontier": "benchmarks.frontier",
    "gpu": "benchmarks.gpu",
}


def default_out(suite: str, smoke: bool) -> Path:
    stem = suite.replace("/", "_") + ("_smoke" if smoke else "")
    return REPO / "runs" / "bench" / f"{stem}.json"


def suite_parser(suite: str) -> argparse.ArgumentParser:
    """The options of one suite (only that suite's module is imported)."""
    module = importlib.import_module(SUITES[suite])
    p = argparse.ArgumentParser(
        prog=f"python -m benchmarks {suite}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true", help="a tiny config, for tests")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default runs/bench/)")
    module.add_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    suite = argv[0]
    if suite not in SUITES:
        print(f"suite must be one of {sorted(SUITES)}, got {suite!r}", file=sys.stderr)
        return 2
    args = suite_parser(suite).parse_args(argv[1:])
    args.suite = suite
    git_at_start = git_commit()  # the code that ran (HEAD may move while a long suite runs)
    payload = importlib.import_module(SUITES[suite]).main(args)
    if payload is None:  # the suite skipped itself (and said why)
        return 0
    payload["machine"]["git_at_start"] = git_at_start
    out = write_json(args.out or default_out(suite, args.smoke), payload)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
