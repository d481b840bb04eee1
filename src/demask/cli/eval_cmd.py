"""`demask eval`: likelihood on the validation split and the quality of samples."""

from __future__ import annotations

import argparse

from demask.cli._common import Command, add_sampling_arguments, positive_int

DESCRIPTION = """\
Evaluate a checkpoint on the validation split of its training data, print a table and write
eval.json (into the run folder unless --json says otherwise).

Likelihood, in bits per token:
  masked models          the NELBO (an upper bound on the negative log-likelihood)
  autoregressive models  the exact negative log-likelihood
Sample quality:
  digits  a classifier trained on the real digits scores --num generated digits: mean top-class
          probability, entropy of the predicted-class histogram (log2 10 = 3.32 is uniform), and the
          Frechet distance between classifier features of real and generated images
  text    generative perplexity of the samples under --ar-checkpoint (an autoregressive model
          trained on the same data), always next to the samples' unigram entropy

Examples:
  demask eval --checkpoint runs/digits
  demask eval --checkpoint runs/stdlib --ar-checkpoint runs/stdlib-ar --num 32
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `demask eval`."""
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    p.add_argument(
        "--ar-checkpoint",
        help="text: an autoregressive run on the same data, to score samples (generative perplexity)",
    )
    p.add_argument(
        "--num", type=positive_int, default=256, help="samples to score (default: %(default)s)"
    )
    p.add_argument(
        "--max-batches",
        type=positive_int,
        help="validation batches for the likelihood (default: the whole split)",
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="(default: %(default)s)")
    add_sampling_arguments(p)
    p.add_argument("--json", help="where to write the results (default: <run>/eval.json)")


def run(args: argparse.Namespace) -> int:
    from demask.cli._eval import run_eval

    return run_eval(args)


COMMAND = Command(
    name="eval",
    help="likelihood (bits/token) on the validation split, and sample quality",
    description=DESCRIPTION,
    add_arguments=add_arguments,
    run=run,
)
