"""`demask train`: train a masked or autoregressive model on digits, the Python stdlib or your text."""

from __future__ import annotations

import argparse

from demask.cli._common import Command, positive_float, positive_int, seed_int

DESCRIPTION = """\
Train a model and write a run folder: checkpoint (safetensors weights + config + optimiser state),
a metrics log (metrics.jsonl) and a loss-curve PNG.

Data (--data):
  digits         scikit-learn's bundled 8x8 digits, 17 grey levels, 64 tokens per image
  python-stdlib  this Python's standard library sources, byte-level (site-packages left out)
  PATH           a text file or a folder of text files, byte-level

Examples:
  demask train --model masked --data digits --steps 2000 --out runs/digits
  demask train --data digits --conditional --out runs/digits-cond   # then: sample --class 7
  demask train --model autoregressive --data python-stdlib --seq-len 256 --out runs/stdlib-ar
  demask train --data ./my_texts --seq-len 128 --out runs/mine
  demask train --out runs/digits --steps 4000 --resume     # continue runs/digits to step 4000
  demask train --data digits --nproc 2 --out runs/ddp       # data-parallel, via torchrun
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `demask train`; numeric options left out take the library's defaults."""
    g = p.add_argument_group("what to train")
    g.add_argument(
        "--model",
        choices=["masked", "autoregressive"],
        help="masked: NonAutoregressiveWrapper (MaskGIT / MDLM); autoregressive: a causal "
        "decoder (default: masked; on --resume: the run's)",
    )
    g.add_argument(
        "--data", help="digits | python-stdlib | PATH (default: digits; on --resume: the run's)"
    )
    g.add_argument("--seq-len", type=positive_int, help="sequence length (default: the dataset's)")
    g.add_argument(
        "--max-bytes", type=positive_int, help="text data: use at most this many bytes per split"
    )
    g.add_argument("--dim", type=positive_int, help="model width")
    g.add_argument("--depth", type=positive_int, help="number of transformer layers")
    g.add_argument("--heads", type=positive_int, help="attention heads")
    g.add_argument("--schedule", help="masking schedule of a masked model (linear | cosine)")
    g.add_argument(
        "--conditional",
        action="store_true",
        help="class-conditional masked model on a labelled dataset (digits): a class token "
        "precedes each image (sample with --class C, and --guidance W)",
    )
    g.add_argument(
        "--cond-drop-prob",
        type=float,
        help="with --conditional: share of training rows without their class, so that one "
        "model learns both and can be guided (default: 0.1)",
    )

    g = p.add_argument_group("how to train")
    g.add_argument("--steps", type=positive_int, help="total optimiser steps")
    g.add_argument("--batch-size", type=positive_int, help="sequences per step (per process)")
    g.add_argument("--lr", type=positive_float, help="peak learning rate (AdamW)")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps before the cosine decay")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, help="gradient-norm clipping (0 = off)")
    g.add_argument("--seed", type=seed_int, help="random seed (runs are reproducible)")
    g.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--nproc", type=positive_int, default=1, help="processes (torchrun, DDP)")

    g = p.add_argument_group("output")
    g.add_argument("--out", help="run folder (default: runs/<data>-<model>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument(
        "--overwrite", action="store_true", help="start over even if --out holds a checkpoint"
    )
    g.add_argument("--val-every", type=positive_int, help="validate every N steps")
    g.add_argument("--save-every", type=positive_int, help="checkpoint every N steps")
    g.add_argument("--log-every", type=positive_int, help="log metrics every N steps")
    g.add_argument("--no-plot", action="store_true", help="do not write loss_curve.png")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from demask.cli._run import run_training

    return run_training(args)


COMMAND = Command(
    name="train",
    help="train a masked or autoregressive model",
    description=DESCRIPTION,
    add_arguments=add_arguments,
    run=run,
)
