"""`demask demo`: train a class-conditional masked model on the digits, sample, score, draw."""

from __future__ import annotations

import argparse

from demask.cli._common import Command, positive_int

DESCRIPTION = """\
The tour: trains a class-conditional masked (MDLM) transformer on scikit-learn's bundled 8x8
digits (a class token before each digit), generates digits by iterative demasking, scores them
with a classifier trained on the real digits, and writes into --out:
  samples_by_class.png  one row per class 0-9
  demasking.png         a few digits being demasked step by step
  samples.png           digits sampled without a class
  loss_curve.png        the training loss
  demo_eval.json        the numbers printed at the end
It needs no download and runs in about 3.5 minutes on 2 CPU cores.

Example:
  demask demo --out runs/demo
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `demask demo`."""
    p.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    p.add_argument(
        "--train-steps",
        "--steps",
        dest="max_steps",
        type=positive_int,
        help="training steps (default: the tuned demo setting; --steps is the deprecated spelling)",
    )
    p.add_argument(
        "--num",
        type=positive_int,
        default=64,
        help="digits drawn without a class in samples.png (default: %(default)s; 200 are scored, "
        "as many as by class)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", help="cpu | cuda (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from demask.cli._demo import run_demo

    return run_demo(args)


COMMAND = Command(
    name="demo",
    help="train a class-conditional masked model on digits, sample, write PNGs (about 3.5 minutes on CPU)",
    description=DESCRIPTION,
    add_arguments=add_arguments,
    run=run,
)
