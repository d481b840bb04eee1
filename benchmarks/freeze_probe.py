"""Probe: does inductor's weight freezing speed up demask's compiled AR decoding step?

    python -m benchmarks.freeze_probe [--calls 4] [--threads 1]

Builds the speed/ar-generate model (untrained Decoder, dim 256, depth 4, batch 8, prompt 16, 256
new tokens) and times three ways of running its cached step, interleaved in one process: eager,
`compile=True` (inductor's default mode, weights as graph inputs) and the same step compiled with
`torch._inductor.config.freezing` (weights folded as constants, Linear layers on MKL's packed
GEMM). Prints the seconds per call and whether the frozen step gave the eager step's tokens at
temperature 0.

Two things the frozen step needs that demask's `compile=True` does not do (so this probe does
them from outside): the net compiled as an eval-mode module, and one persistent cache object (a
new cache per call makes a frozen step recompile at every call). Setting `freezing` through
`torch.compile(options=...)` did not reach inductor's freezing path in torch 2.13, hence the
global config. Results: benchmarks/RESULTS.md, "Inductor's weight freezing".
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import Tensor, nn

from benchmarks import speed_ar_generate
from benchmarks.libs import build_net, load


class _Step(nn.Module):
    """The decoding step as a module, so that its weights are module state that can be frozen."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(
        self, tokens: Tensor, cache: Any, input_pos: Tensor, start: Tensor | None
    ) -> Tensor:
        from demask.decoding.autoregressive import _decode_step

        return _decode_step(self.net, tokens, cache, input_pos, start)


def _one_cache(net: nn.Module) -> None:
    """Make `net.new_cache` hand back one cache per (batch, capacity), reset before each use."""
    make: Callable[[int, int], Any] = getattr(net, "new_cache")  # noqa: B009 (a method)
    kept: dict[tuple[int, int], Any] = {}

    def new_cache(batch: int, capacity: int) -> Any:
        if (batch, capacity) not in kept:
            kept[batch, capacity] = make(batch, capacity)
        cache = kept[batch, capacity]
        cache.reset()
        cache.read_slots = cache.capacity
        return cache

    setattr(net, "new_cache", new_cache)  # noqa: B010 (an instance attribute over a method)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import demask.decoding.autoregressive as decoding

    cfg = speed_ar_generate.Config()
    lib = load("demask")
    torch.manual_seed(cfg.seed)
    net = build_net(lib, causal=True, num_tokens=cfg.num_tokens, max_seq_len=cfg.max_seq_len,
                    dim=cfg.dim, depth=cfg.depth, heads=cfg.heads)  # fmt: skip
    model = lib.AutoregressiveWrapper(net).eval()
    _one_cache(net)
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, cfg.num_tokens, (cfg.batch, cfg.prompt_len), generator=g)
    default = decoding.compile_decode_step(True, "cpu")
    frozen_step = torch.compile(_Step(net).eval(), fullgraph=True, dynamic=False)
    steps: dict[str, Callable[..., Tensor] | None] = {
        "eager": None,
        "compiled": default,
        "compiled, frozen": lambda net, *rest: frozen_step(*rest),
    }

    def run(name: str, temperature: float = 1.0) -> Tensor:
        step = steps[name]
        inductor_config.freezing = name == "compiled, frozen"
        if step is None:
            return model.generate(prompt, cfg.new_tokens, cache_kv=True, temperature=temperature)
        decoding._COMPILED["True:cpu"] = step
        return model.generate(
            prompt, cfg.new_tokens, cache_kv=True, temperature=temperature, compile=True
        )

    eager = run("eager", 0.0)
    for name in ("compiled", "compiled, frozen"):  # the first call compiles
        start = time.perf_counter()
        same = torch.equal(run(name, 0.0), eager)
        print(f"{name}: first call {time.perf_counter() - start:.1f} s, greedy tokens equal "
              f"to eager: {same}")  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.calls):
        for name in steps:
            start = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - start)
    decoding._COMPILED["True:cpu"] = default
    for name, ts in times.items():
        print(f"{name}: s per call min {min(ts):.2f} / median {statistics.median(ts):.2f} / "
              f"max {max(ts):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
