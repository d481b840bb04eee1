"""speed/masked-generate: NonAutoregressiveWrapper.generate(batch_size=16), demask vs reference.

Config: Encoder dim 256, depth 4, heads 4, num_tokens 257 (mask id 256), seq 256, steps 18, the
seed's default sampling arguments (start_temperature 1, filter_thres 0.7). The models are untrained
(random weights, same seed): speed does not depend on the weights (for fixed-count samplers; the
adaptive ones' speed does, so they are measured on trained nets by `frontier`).

Workloads: "generate" (the wrapper's default schedule, linear), "generate-cosine" (the seed's
example constructs the wrapper with schedule="cosine"), and "generate-dilated": demask with
sampler="dilated" at 6 steps (a third of the seed's 18), cosine, against the reference's seed
generate at 18 steps, cosine ("generate-dilated") or linear ("generate-dilated-linear"); tokens
per call are the same, and the FLOPs count each library's own steps.

Tokens per call = batch * seq_len (tokens produced); FLOPs per call = steps full forwards of the
(B, N) batch, steps * B * N * (2 P + 4 L N I), nominal (benchmarks/flops.py).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks import compare, flops
from benchmarks.harness import Workload
from benchmarks.libs import build_net, load, require

NAME = "speed/masked-generate"


@dataclass(frozen=True)
class Config:
    dim: int = 256
    depth: int = 4
    heads: int = 4
    num_tokens: int = 257  # 256 bytes + the mask token
    seq_len: int = 256
    batch: int = 16
    steps: int = 18
    seed: int = 0

    def shape(self) -> flops.ModelShape:
        return flops.ModelShape(self.dim, self.depth, self.heads, self.num_tokens)


SMOKE = Config(dim=32, depth=1, heads=2, num_tokens=17, seq_len=16, batch=2, steps=4)


def generate(
    lib_name: str, cfg: Config, schedule: str = "linear", steps: int | None = None, **kwargs: Any
) -> Workload:
    """The library's generate at `steps` (default `cfg.steps`), with `kwargs` for generate."""
    lib = load(lib_name)
    steps = cfg.steps if steps is None else steps
    torch.manual_seed(cfg.seed)
    net = build_net(lib, causal=False, num_tokens=cfg.num_tokens, max_seq_len=cfg.seq_len,
                    dim=cfg.dim, depth=cfg.depth, heads=cfg.heads)  # fmt: skip
    model = require(lib, "NonAutoregressiveWrapper")(
        net, mask_id=cfg.num_tokens - 1, steps=steps, schedule=schedule
    )
    model.eval()

    def run() -> torch.Tensor:
        return model.generate(batch_size=cfg.batch, **kwargs)  # (B, N)

    f = flops.masked_generate_flops(cfg.shape(), cfg.batch, cfg.seq_len, steps)
    return Workload(run, cfg.batch * cfg.seq_len, f)


def generate_cosine(lib_name: str, cfg: Config) -> Workload:
    return generate(lib_name, cfg, schedule="cosine")


def generate_dilated(lib_name: str, cfg: Config, reference_schedule: str = "cosine") -> Workload:
    """demask's dilated order at a third of the seed's steps (6 of 18; at least 1), cosine, the
    seed's sampling otherwise, against the reference's seed generate at its 18 steps with
    `reference_schedule`. The frontier suite measures the quality of the two on one trained net
    (benchmarks/RESULTS.md); the temperature there that matches the reference's quality does
    not change the speed."""
    if lib_name != "demask":
        return generate(lib_name, cfg, reference_schedule)
    return generate(lib_name, cfg, "cosine", max(1, cfg.steps // 3), sampler="dilated")


def generate_dilated_linear(lib_name: str, cfg: Config) -> Workload:
    return generate_dilated(lib_name, cfg, reference_schedule="linear")


WORKLOADS = {
    "generate": generate,
    "generate-cosine": generate_cosine,
    "generate-dilated": generate_dilated,
    "generate-dilated-linear": generate_dilated_linear,
}


def add_args(p: argparse.ArgumentParser) -> None:
    compare.add_speed_args(p, warmup=1, repeats=5)


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = Config() if not args.smoke else SMOKE
    return compare.run_suite(sys.modules[__name__], NAME, cfg, args)
