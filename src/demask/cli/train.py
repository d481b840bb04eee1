"""`demask train`: train a masked or autoregressive model on digits, the Python stdlib or your text."""

from __future__ import annotations

import argparse

from demask.cli._common import Command, positive_int, seed_int

DESCRIPTION = """\
Train a model and write a run folder: checkpoint (safetensors weights + config + optimiser state),
a metrics log (metrics.jsonl) and a loss-curve PNG.

Data (--data):
  digits         scikit-learn's bundled 8x8 digits, 17 grey levels, 64 tokens per image
  python-stdlib  this Python's standard library sources, byte-level (site-packages left out)
  PATH           a text file or a folder of text files, byte-level

Examples:
  demask train --model masked --data digits --train-steps 2000 --out runs/digits
  demask train --data digits --conditional --out runs/digits-cond   # then: sample --class 7
  demask train --model autoregressive --data python-stdlib --seq-len 256 --out runs/stdlib-ar
  demask train --data ./my_texts --seq-len 128 --out runs/mine
  demask train --out runs/digits --train-steps 4000 --resume   # continue runs/digits to 4000
  demask train --data digits --use-rmsnorm --ff-glu --attn-kv-heads 2 --self-token-critic
  demask train --data digits --nproc 2 --out runs/ddp       # data-parallel, via torchrun
"""


# fields the CLI sets itself (from the data, --model, --seq-len, --conditional, --quiet ...)
MODEL_SKIP = ("kind", "num_tokens", "max_seq_len", "mask_id", "cond_prefix_len", "cond_drop_prob")
TRAIN_SKIP = ("data", "out", "progress")
# fields whose flag is not their name: the first spelling is current, the others deprecated
MODEL_FLAGS = {"steps": ("--decode-steps",)}
TRAIN_FLAGS = {
    "max_steps": ("--train-steps", "--steps"),
    "checkpoint_every": ("--checkpoint-every", "--save-every"),
    "data_max_bytes": ("--data-max-bytes", "--max-bytes"),
}

TRAIN_TYPES = {"seed": seed_int}  # checked by argparse: the message names the range


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `demask train`: a few of its own, and one per ModelConfig / TrainConfig field
    (`demask.cli._options`); options left out take the library's defaults."""
    from demask.cli._options import add_config_arguments
    from demask.config import MODEL_BUILDERS, ModelConfig, TrainConfig

    g = p.add_argument_group("what to train")
    g.add_argument(
        "--model",
        choices=sorted(MODEL_BUILDERS),
        help="masked: NonAutoregressiveWrapper (MaskGIT / MDLM); autoregressive: a causal "
        "decoder (default: masked; on --resume: the run's)",
    )
    g.add_argument(
        "--data", help="digits | python-stdlib | PATH (default: digits; on --resume: the run's)"
    )
    g.add_argument("--seq-len", type=positive_int, help="sequence length (default: the dataset's)")
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
    g = p.add_argument_group(
        "the model (ModelConfig: the constructors' options and defaults; (masked) / (AR) apply "
        "to that kind only)"
    )
    add_config_arguments(g, ModelConfig, skip=MODEL_SKIP, flags=MODEL_FLAGS)

    g = p.add_argument_group("how to train (TrainConfig)")
    add_config_arguments(g, TrainConfig, skip=TRAIN_SKIP, flags=TRAIN_FLAGS, types=TRAIN_TYPES)
    g.add_argument("--nproc", type=positive_int, default=1, help="processes (torchrun, DDP)")

    g = p.add_argument_group("output")
    g.add_argument("--out", help="run folder (default: runs/<data>-<model>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument(
        "--overwrite", action="store_true", help="start over even if --out holds a checkpoint"
    )
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
