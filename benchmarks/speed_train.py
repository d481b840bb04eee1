"""speed/train: one training step (forward + backward + AdamW step), demask vs the reference.

Workloads, all at the same config (dim 256, depth 4, heads 4, num_tokens 257, seq 256, batch 16):
  backbone        TransformerWrapper(Encoder): cross-entropy of the logits against random targets
  masked          NonAutoregressiveWrapper(Encoder net, mask_id=256): its own masked loss
  autoregressive  AutoregressiveWrapper(Decoder net): teacher-forced next-token loss

Tokens per call = batch * seq_len; FLOPs per call = (6 P + 12 L N I) * B * N (benchmarks/flops.py).
The fraction of this CPU's fp32 matmul peak is reported next to the achieved GFLOP/s.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import compare, flops, harness
from benchmarks.harness import Workload
from benchmarks.libs import build_net, load, require

NAME = "speed/train"


@dataclass(frozen=True)
class Config:
    dim: int = 256
    depth: int = 4
    heads: int = 4
    num_tokens: int = 257  # 256 bytes + the mask token
    seq_len: int = 256
    batch: int = 16
    lr: float = 3e-4
    seed: int = 0

    def shape(self) -> flops.ModelShape:
        return flops.ModelShape(self.dim, self.depth, self.heads, self.num_tokens)


SMOKE = Config(dim=32, depth=1, heads=2, num_tokens=17, seq_len=16, batch=2)


def _tokens(cfg: Config, high: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(0, high, (cfg.batch, length), generator=g)  # (B, N)


def _step_fn(model: torch.nn.Module, loss_fn: Any, lr: float) -> Any:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()

    return step


def _work(cfg: Config, run: Any) -> Workload:
    tokens = cfg.batch * cfg.seq_len
    return Workload(run, tokens, flops.train_flops(cfg.shape(), cfg.batch, cfg.seq_len))


def backbone(lib_name: str, cfg: Config) -> Workload:
    lib = load(lib_name)
    torch.manual_seed(cfg.seed)
    net = build_net(lib, causal=False, num_tokens=cfg.num_tokens, max_seq_len=cfg.seq_len,
                    dim=cfg.dim, depth=cfg.depth, heads=cfg.heads)  # fmt: skip
    x = _tokens(cfg, cfg.num_tokens, cfg.seq_len)  # (B, N)
    y = torch.roll(x, 1, dims=1)  # (B, N) any fixed target will do

    def loss_fn() -> torch.Tensor:
        logits = net(x)  # (B, N, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    return _work(cfg, _step_fn(net, loss_fn, cfg.lr))


def masked(lib_name: str, cfg: Config) -> Workload:
    lib = load(lib_name)
    torch.manual_seed(cfg.seed)
    net = build_net(lib, causal=False, num_tokens=cfg.num_tokens, max_seq_len=cfg.seq_len,
                    dim=cfg.dim, depth=cfg.depth, heads=cfg.heads)  # fmt: skip
    model = require(lib, "NonAutoregressiveWrapper")(net, mask_id=cfg.num_tokens - 1)
    x = _tokens(cfg, cfg.num_tokens - 1, cfg.seq_len)  # (B, N), never the mask id
    return _work(cfg, _step_fn(model, lambda: model(x).loss, cfg.lr))


def autoregressive(lib_name: str, cfg: Config) -> Workload:
    lib = load(lib_name)
    torch.manual_seed(cfg.seed)
    net = build_net(lib, causal=True, num_tokens=cfg.num_tokens, max_seq_len=cfg.seq_len,
                    dim=cfg.dim, depth=cfg.depth, heads=cfg.heads)  # fmt: skip
    model = require(lib, "AutoregressiveWrapper")(net)
    x = _tokens(cfg, cfg.num_tokens, cfg.seq_len)  # (B, N): N - 1 predictions, counted as N
    return _work(cfg, _step_fn(model, lambda: model(x), cfg.lr))


WORKLOADS = {"backbone": backbone, "masked": masked, "autoregressive": autoregressive}


def add_args(p: argparse.ArgumentParser) -> None:
    compare.add_speed_args(p, warmup=2, repeats=7)
    p.add_argument("--matmul-n", type=int, default=4096, help="size of the peak-matmul probe")


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = SMOKE if args.smoke else Config()
    torch.set_num_threads(args.threads)
    peak = harness.matmul_peak_gflops(
        n=128 if args.smoke else args.matmul_n, repeats=5, threads=args.threads
    )
    results = compare.compare(sys.modules[__name__], cfg, args)
    print(f"## {NAME}  (config {asdict(cfg)})")
    print(
        f"fp32 matmul peak, torch.mm {peak['n']}x{peak['n']} at {peak['threads']} threads: "
        f"{peak['median_gflops']:.1f} GFLOP/s median, {peak['best_gflops']:.1f} best"
    )
    print(compare.table(results, matmul_peak_gflops=peak["median_gflops"]))
    compare.print_profiles(results)
    return harness.record(NAME, asdict(cfg), results, matmul_peak=peak, args=vars(args))
