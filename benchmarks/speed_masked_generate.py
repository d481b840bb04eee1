"""speed/masked-generate: NonAutoregressiveWrapper.generate(batch_size=16), demask vs reference.

Config: Encoder dim 256, depth 4, heads 4, num_tokens 257 (mask id 256), seq 256, steps 18, the
seed's default sampling arguments (start_temperature 1, filter_thres 0.7). The models are untrained
(random weights, same seed): speed does not depend on the weights (for fixed-count samplers; the
adaptive ones' speed does, so they are measured on trained nets by `frontier`).

Workloads: "generate" (the wrapper's default schedule, linear) and "generate-cosine" (the seed's
example constructs the wrapper with schedule="cosine").

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


def generate(lib_name: str, cfg: Config, schedule: str = "linear") -> Workload:
    lib = load(lib_name)
    torch.manual_seed(cfg.seed)
    net = build_net(lib, causal=False, num_tokens=cfg.num_tokens, max_seq_len=cfg.seq_len,
                    dim=cfg.dim, depth=cfg.depth, heads=cfg.heads)  # fmt: skip
    model = require(lib, "NonAutoregressiveWrapper")(
        net, mask_id=cfg.num_tokens - 1, steps=cfg.steps, schedule=schedule
    )
    model.eval()

    def run() -> torch.Tensor:
        return model.generate(batch_size=cfg.batch)  # (B, N)

    f = flops.masked_generate_flops(cfg.shape(), cfg.batch, cfg.seq_len, cfg.steps)
    return Workload(run, cfg.batch * cfg.seq_len, f)


def generate_cosine(lib_name: str, cfg: Config) -> Workload:
    return generate(lib_name, cfg, schedule="cosine")


WORKLOADS = {"generate": generate, "generate-cosine": generate_cosine}


def add_args(p: argparse.ArgumentParser) -> None:
    compare.add_speed_args(p, warmup=1, repeats=5)


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = Config() if not args.smoke else SMOKE
    return compare.run_suite(sys.modules[__name__], NAME, cfg, args)
