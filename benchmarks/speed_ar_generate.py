"""speed/ar-generate: AutoregressiveWrapper.generate with the key/value cache, demask vs reference.

Config: Decoder dim 256, depth 4, heads 4, num_tokens 256, max_seq_len 512, batch 8, a random
prompt of 16 tokens, 256 new tokens, cache on, each library's default sampling (temperature 1 and
its default logits filter). Untrained weights, same seed for both.

Workloads: `generate` (eager) and `generate-compiled`: demask with `generate(..., compile=True)`
(the cached decode step through torch.compile, inductor's default mode on the CPU) against
the same eager reference call. The compile warm-up (the first call, untimed in the table) is timed
on its own and recorded as `compile_warmup_s`.

Tokens per call = batch * new tokens (tokens produced; the prefill's time is included). FLOPs per
call = prefill plus one cached forward per new token but the last, position j attending to j + 1
keys: B * (T * 2P + 4 L I T (T + 1) / 2) with T = prompt + new - 1 (benchmarks/flops.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from benchmarks import compare, flops
from benchmarks.harness import Workload
from benchmarks.libs import build_net, load, require

NAME = "speed/ar-generate"


@dataclass(frozen=True)
class Config:
    dim: int = 256
    depth: int = 4
    heads: int = 4
    num_tokens: int = 256
    max_seq_len: int = 512
    batch: int = 8
    prompt_len: int = 16
    new_tokens: int = 256
    seed: int = 0

    def shape(self) -> flops.ModelShape:
        return flops.ModelShape(self.dim, self.depth, self.heads, self.num_tokens)


SMOKE = Config(dim=32, depth=1, heads=2, num_tokens=17, max_seq_len=32, batch=2, new_tokens=8)


COMPILE_WARMUP_S: dict[str, float] = {}  # workload -> seconds of demask's first (compiling) call


def generate(lib_name: str, cfg: Config, compile: bool = False) -> Workload:
    lib = load(lib_name)
    torch.manual_seed(cfg.seed)
    net = build_net(lib, causal=True, num_tokens=cfg.num_tokens, max_seq_len=cfg.max_seq_len,
                    dim=cfg.dim, depth=cfg.depth, heads=cfg.heads)  # fmt: skip
    model = require(lib, "AutoregressiveWrapper")(net)
    model.eval()
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, cfg.num_tokens, (cfg.batch, cfg.prompt_len), generator=g)  # (B, P)

    kwargs = {"compile": True} if compile and lib_name == "demask" else {}

    def run() -> torch.Tensor:
        return model.generate(prompt, cfg.new_tokens, cache_kv=True, **kwargs)  # (B, P + new)

    if kwargs:  # the first call compiles: timed apart from the steady state
        start = time.perf_counter()
        run()
        COMPILE_WARMUP_S["generate-compiled"] = time.perf_counter() - start
        print(f"demask compile warm-up (first call): {COMPILE_WARMUP_S['generate-compiled']:.1f} s")
    f = flops.ar_generate_flops(cfg.shape(), cfg.batch, cfg.prompt_len, cfg.new_tokens)
    return Workload(run, cfg.batch * cfg.new_tokens, f)


WORKLOADS = {"generate": generate, "generate-compiled": partial(generate, compile=True)}


def add_args(p: argparse.ArgumentParser) -> None:
    compare.add_speed_args(p, warmup=1, repeats=7)


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = Config() if not args.smoke else SMOKE
    record = compare.run_suite(sys.modules[__name__], NAME, cfg, args)
    record["compile_warmup_s"] = dict(COMPILE_WARMUP_S)
    return record
