"""`demask eval`: likelihood on the validation split and the quality of samples."""

from __future__ import annotations

import argparse

from demask.cli._common import Command, non_negative_float, positive_int

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
    p.add_argument(
        "--sampler",
        help="masked models: the remasking strategy (default: ancestral; see demask sample)",
    )
    p.add_argument("--steps", type=positive_int, help="masked models: demasking steps")
    p.add_argument(
        "--filter-thres",
        type=float,
        help="keep the top ceil((1 - F) * vocab) logits before sampling (default: 0, no "
        "filtering; the seed's MaskGIT decoding uses 0.7)",
    )
    p.add_argument(
        "--anneal",
        action="store_true",
        help="masked models: anneal the temperature linearly to 0 over the steps (the seed's "
        "MaskGIT decoding); default: a constant temperature",
    )
    p.add_argument(
        "--temperature", type=non_negative_float, default=1.0, help="(default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", help="cpu | cuda (default: cuda if available, else cpu)")
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
