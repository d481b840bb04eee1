"""`demask sample`: generate from a trained run (PNG grid + demasking strip for digits, text otherwise)."""

from __future__ import annotations

import argparse

from demask.cli._common import Command, non_negative_float, positive_int

DESCRIPTION = """\
Generate from a checkpoint (a run folder or a checkpoint file); the model is rebuilt from the
checkpoint alone.

  digits: writes samples.png (a grid of generated digits) and, for masked models, demasking.png
          (a few sequences being demasked step by step) into --out (default: <run>/samples).
  text:   prints the samples, separated by lines of dashes, and writes samples.txt into --out.

Masked models sample by default with MDLM ancestral sampling at a constant temperature and no
logits filtering (samples from the model's own distribution); the seed library's MaskGIT decoding
is `--sampler confidence --filter-thres 0.7 --anneal`.

Prompts (--prompt, text only):
  masked models fill holes: `[MASK]` is one token (one byte) to fill, `[MASK:N]` is N tokens;
  positions after the prompt, up to the model's sequence length, are filled too.
  autoregressive models continue a prefix (`[MASK]` is an error: use a masked model to infill).

Examples:
  demask sample --checkpoint runs/digits --num 64
  demask sample --checkpoint runs/stdlib --prompt 'def [MASK:8](self):' --num 4
  demask sample --checkpoint runs/stdlib-ar --prompt 'import ' --length 200
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `demask sample`."""
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    p.add_argument("--num", type=positive_int, default=16, help="samples (default: %(default)s)")
    p.add_argument("--prompt", help="text prompt; `[MASK]` / `[MASK:N]` mark holes to fill")
    p.add_argument(
        "--sampler",
        help="masked models: confidence | low_confidence | random | margin | entropy | "
        "ancestral (default: ancestral)",
    )
    p.add_argument("--steps", type=positive_int, help="masked models: demasking steps")
    p.add_argument(
        "--temperature",
        type=non_negative_float,
        default=1.0,
        help="sampling temperature, 0 = greedy (default: %(default)s)",
    )
    p.add_argument(
        "--length",
        type=positive_int,
        help="autoregressive models: tokens to generate (default: the model's sequence length "
        "minus the prompt)",
    )
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
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", help="cpu | cuda (default: cuda if available, else cpu)")
    p.add_argument("--out", help="output folder (default: <run>/samples)")


def run(args: argparse.Namespace) -> int:
    from demask.cli._generate import run_sampling

    return run_sampling(args)


COMMAND = Command(
    name="sample",
    help="generate from a checkpoint (PNG for digits, text otherwise)",
    description=DESCRIPTION,
    add_arguments=add_arguments,
    run=run,
)
