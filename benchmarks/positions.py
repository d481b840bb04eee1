"""positions: does a masked Encoder learn to use its context at seq 256? A fast probe per way of
encoding positions (one process, one thread, minutes per row).

Each row trains demask's masked model (its default MDLM loss and BERT augmentation) at dim 64,
depth 2, 4 heads, batch 16, seq 256, AdamW lr 1e-3, gradient norm clipped at 1, on one of two
sources, and reports the cross-entropy (bits) of the symbols when exactly 5% of each window is
masked, so every masked symbol has visible neighbours:
  chain        an order-1 chain on 64 symbols: the next is (5 * prev + 1) % 64 with probability
               0.9, else uniform (context-free: 6 bits; given the neighbours: near 0.5)
  shakespeare  bytes of the plays: trained on the train plays, scored on windows of the validation
               plays (context-free: the unigram entropy, about 4.8 bits)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import harness, quality
from benchmarks.ablation_inits import INITS
from benchmarks.libs import build_net, load

NAME = "positions"


@dataclass(frozen=True)
class Config:
    dim: int = 64
    depth: int = 2
    heads: int = 4
    batch: int = 16
    seq_len: int = 256
    steps: int = 300
    lr: float = 1e-3
    eval_rows: int = 32
    seed: int = 0


SMOKE = Config(dim=16, depth=1, heads=2, batch=2, seq_len=32, steps=3, eval_rows=2)

# row -> (layer options, TransformerWrapper options, inits from benchmarks.ablation.INITS)
ROWS: dict[str, tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]] = {
    "rotary": ({"rotary_pos_emb": True}, {}, ()),
    "added": ({}, {"abs_pos_attn_bias": False}, ()),
    "added-sin0.02": ({}, {"abs_pos_attn_bias": False}, ("pos_sinusoid",)),
    "added-sin0.3-mimetic": ({}, {"abs_pos_attn_bias": False}, ("pos_sin_0.3", "mimetic_qk")),
    "bias": ({}, {}, ()),  # demask's default for an Encoder
}


Source = tuple[int, Callable[[int], Tensor], Callable[[torch.Generator], Tensor]]


def _source(name: str, data: str | None, cfg: Config) -> Source:
    """(vocabulary, the training batch at a step, the evaluation rows drawn with a generator) of
    a source. Shakespeare trains on the train plays (`demask.data`, as `quality`
    does) and is scored on the validation plays' windows."""
    if name == "chain":
        g = torch.Generator().manual_seed(cfg.seed)
        load("demask")  # puts src/ on the path when demask is not installed
        from demask.data import shift_chain

        return (64, lambda step: shift_chain(cfg.batch, cfg.seq_len, g),
                lambda gen: shift_chain(cfg.eval_rows, cfg.seq_len, gen))  # fmt: skip
    _, get_batch, get_dataset = quality._demask_modules()
    folder = str(quality.data_folder(data))
    train_ds = get_dataset(folder, split="train", seq_len=cfg.seq_len)
    val_ds = get_dataset(folder, split="val", seq_len=cfg.seq_len)
    rows = torch.stack(quality.eval_windows(val_ds, cfg.eval_rows))
    return 256, lambda step: get_batch(train_ds, step, cfg.batch, cfg.seed), lambda gen: rows


def run_row(row: str, source: str, cfg: Config, data: str | None) -> dict[str, Any]:
    lib = load("demask")
    vocab, batch, eval_rows = _source(source, data, cfg)
    layers, net_kw, inits = ROWS[row]
    torch.manual_seed(cfg.seed)
    net = build_net(lib, causal=False, num_tokens=vocab + 1, max_seq_len=cfg.seq_len, dim=cfg.dim,
                    depth=cfg.depth, heads=cfg.heads, net_kwargs=net_kw, **layers)  # fmt: skip
    for name in inits:
        INITS[name](net)
    model = lib.NonAutoregressiveWrapper(net, mask_id=vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    start = time.perf_counter()
    for step in range(cfg.steps):
        loss = model(batch(step)).loss
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    train_s = time.perf_counter() - start
    model.eval()
    gv = torch.Generator().manual_seed(123)
    x = eval_rows(gv)
    evaluate, _, _ = quality._demask_modules()
    count = max(1, round(0.05 * cfg.seq_len))
    ce = evaluate.masked_cross_entropy_bits(net, x, count, vocab, gv, batch_size=len(x))
    print(f"{source} {row} seed {cfg.seed}: CE@5% {ce:.3f} bits ({train_s:.0f} s)", flush=True)
    return {"row": row, "source": source, "seed": cfg.seed, "ce_t005_bits": ce, "train_s": train_s}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--sources", nargs="+", default=["chain", "shakespeare"],
                   choices=["chain", "shakespeare"])  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=None, help="the Shakespeare folder")


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    cfg = SMOKE if args.smoke else Config()
    if args.steps is not None:
        cfg = Config(**{**asdict(cfg), "steps": args.steps})
    results = [run_row(row, source, Config(**{**asdict(cfg), "seed": seed}), args.data)
               for seed in args.seeds for source in args.sources for row in args.rows]  # fmt: skip
    table = [[r["source"], r["row"], r["seed"], f"{r['ce_t005_bits']:.3f}", f"{r['train_s']:.0f}"]
             for r in results]  # fmt: skip
    print(f"## {NAME}  (config {asdict(cfg)})")
    print(harness.format_table(["source", "row", "seed", "CE@5% bits", "train s"], table))
    return harness.record(NAME, asdict(cfg), results, args=vars(args))
