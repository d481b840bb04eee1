"""`demask sample`: generate from a trained run (PNG grid + demasking strip for digits, text otherwise)."""

from __future__ import annotations

import argparse

from demask.cli._common import Command, add_sampling_arguments, positive_int

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
    add_sampling_arguments(p)
    p.add_argument(
        "--length",
        type=positive_int,
        help="autoregressive models: tokens to generate (default: the model's sequence length "
        "minus the prompt)",
    )
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
