"""`demask demo`: train a small masked model on the digits, sample, and write pictures (< 5 min)."""

from __future__ import annotations

import argparse

from demask.cli._common import Command, positive_int

DESCRIPTION = """\
The two-minute tour: trains a small masked (MaskGIT / MDLM) transformer on scikit-learn's bundled
8x8 digits, generates digits by iterative demasking, scores them with a digits classifier, and
writes into --out:
  samples.png     a grid of generated digits
  demasking.png   a few digits being demasked step by step
  loss_curve.png  the training loss
  eval.json       the numbers printed at the end
It needs no download and runs in under 5 minutes on 2 CPU cores.

Example:
  demask demo --out runs/demo
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `demask demo`."""
    p.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    p.add_argument(
        "--steps", type=positive_int, help="training steps (default: the tuned demo setting)"
    )
    p.add_argument(
        "--num", type=positive_int, default=64, help="digits to draw (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", help="cpu | cuda (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from demask.cli._demo import run_demo

    return run_demo(args)


COMMAND = Command(
    name="demo",
    help="train a masked model on digits, sample, write PNGs (under 5 minutes on CPU)",
    description=DESCRIPTION,
    add_arguments=add_arguments,
    run=run,
)
