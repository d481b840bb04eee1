"""Probe: the digits demo with one of its settings changed, at one thread.

    python -m benchmarks.demo_variants VARIANT SEED [--out DIR]

Runs `demask demo`'s own `run_demo` (training, sampling, scoring, pictures) with `DEMO_MODEL`
updated by the variant, `torch.set_num_threads(1)` so that several seeds can run side by side,
and writes the demo's folder (its numbers in `demo_eval.json`) to DIR (default
runs/demo-variants/VARIANT-sSEED). Results: docs/CLI.md, "The demo" ("Three variants tried").
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

DEMO_SEQ_LEN = 65  # the class token and 64 pixels
# the demo's settings before predict_dropped_cond (a quarter of the rows dropped, unscored)
_UNSCORED = {"predict_dropped_cond": False, "cond_drop_prob": 0.25}
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},  # the demo as it ships
    "unscored": _UNSCORED,  # the demo before predict_dropped_cond
    "drop40": {**_UNSCORED, "cond_drop_prob": 0.4},  # the class dropped from 40% of the rows
    "cebell": {**_UNSCORED, "use_simple_mdlm_loss_weight": False, "train_masking": "bell"},
    "shift1": {**_UNSCORED, "shift_tokens": 1},  # the token shift of reach 1
    "predict25": {"cond_drop_prob": 0.25},  # the dropped class predicted, a quarter dropped
    "noprior": {},  # the demo without the condition's own term (`condition_prior_loss`)
    "prior_whole": {},  # that term weighed by 1, not by the condition's share of the row (1 / 65)
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variant", choices=list(VARIANTS))
    p.add_argument("seed", type=int)
    p.add_argument("--out", help="the demo's folder (default: runs/demo-variants/VARIANT-sSEED)")
    args = p.parse_args()
    torch.set_num_threads(1)
    from demask.cli import _demo

    _demo.DEMO_MODEL.update(VARIANTS[args.variant])
    if args.variant in ("noprior", "prior_whole"):  # variants of the code, not the settings
        from demask.objectives import masked

        term = masked.condition_prior_loss
        if args.variant == "noprior":  # not computed: the random draws of the code before it
            masked.condition_prior_loss = lambda x, *_: x.new_zeros((), dtype=torch.float)
        else:
            masked.condition_prior_loss = lambda *a: term(*a) * DEMO_SEQ_LEN
    out = args.out or f"runs/demo-variants/{args.variant}-s{args.seed}"
    demo_args = argparse.Namespace(
        out=out, seed=args.seed, device="cpu", quiet=True, max_steps=None, num=64
    )
    return int(_demo.run_demo(demo_args))


if __name__ == "__main__":
    raise SystemExit(main())
