"""`demask demo`: train a small masked model on the digits, sample, score, draw; under 5 minutes.

The settings below were tuned on 2 CPU cores (see docs/CLI.md for the measured time and numbers).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from demask.cli._common import CLIError, format_table, write_json

# The tuned demo: model and training settings (ModelConfig / TrainConfig fields).
DEMO_MODEL: dict[str, Any] = {"dim": 96, "depth": 4, "heads": 4}
DEMO_TRAIN: dict[str, Any] = {
    "steps": 1000,
    "batch_size": 64,
    "lr": 3e-3,
    "warmup_steps": 100,
    "val_every": 100,
    "val_batches": 2,
    "checkpoint_every": 0,
    "log_every": 10,
}
# How the demo samples: MDLM ancestral sampling (see demask sample --help) at temperature 0.7.
# Measured on the demo's own checkpoint, 256 samples (demask eval --temperature T): T = 1.0 gave a
# classifier top-class probability of 0.65 and a Frechet distance of 5.2; T = 0.7 gave 0.70 and 4.1
# with the class entropy still 3.17 bits (of 3.32); T = 0.5 collapses (2.82 bits, Frechet 11.3).
DEMO_SAMPLING: dict[str, Any] = {
    "sampler": "ancestral", "steps": 64, "temperature": 0.7, "filter_thres": 0.0, "anneal": False
}  # fmt: skip
MARKER = "demo.json"  # marks a folder written by the demo, which a later demo may overwrite


def _check_out(out: Path) -> bool:
    """May the demo write into `out`? Overwrite only a previous demo's folder, never a real run."""
    from demask.checkpoint import latest_checkpoint

    if latest_checkpoint(out) is None:
        return False
    if not (out / MARKER).is_file():
        raise CLIError(
            f"--out {str(out)!r} holds a checkpoint that the demo did not write; pick another "
            "folder"
        )
    return True


def run_demo(args: argparse.Namespace) -> int:
    """Train, sample, evaluate, draw; print the numbers and where the files are."""
    from demask.cli._eval import likelihood
    from demask.cli._generate import load_run, resolve_device, write_image_samples
    from demask.cli._run import note, write_loss_curve
    from demask.config import ModelConfig, TrainConfig
    from demask.data import get_dataset
    from demask.metrics import digits_quality
    from demask.train import train

    t0 = time.perf_counter()
    out = Path(args.out)
    overwrite = _check_out(out)
    device = resolve_device(args.device)
    ds = get_dataset("digits", "train")
    model_cfg = ModelConfig(
        kind="masked", num_tokens=ds.tokenizer.vocab_size, seq_len=ds.seq_len, **DEMO_MODEL
    )
    train_fields = dict(DEMO_TRAIN, seed=args.seed)
    if args.steps is not None:
        train_fields.update(steps=args.steps, warmup_steps=min(args.steps // 10, 50))
        train_fields["val_every"] = max(1, args.steps // 5)
    train_cfg = TrainConfig(
        data="digits", out=str(out), device=str(device), progress=not args.quiet, **train_fields
    )
    note(
        f"demo: training a masked transformer (dim {model_cfg.dim}, depth {model_cfg.depth}) on "
        f"{len(ds)} digits for {train_cfg.steps} steps"
    )
    result = train(model_cfg, train_cfg, overwrite=overwrite)
    write_json(out / MARKER, {"model": model_cfg.to_dict(), "train": train_cfg.to_dict()})
    t_train = time.perf_counter() - t0

    note(f"demo: sampling {args.num} digits")
    run = load_run(str(out), device=device, kind="masked")
    opts = argparse.Namespace(
        num=args.num, seed=args.seed, prompt=None, batch_size=64, max_batches=None, **DEMO_SAMPLING
    )  # fmt: skip
    from demask.cli._generate import generate

    samples = generate(run, opts)
    written = write_image_samples(run, samples, out)
    written.append(str(write_loss_curve(out)))
    results: dict[str, Any] = {"checkpoint": str(run.checkpoint.path), "step": result.step}
    results.update(likelihood(run, opts))
    results["quality"] = digits_quality(samples.tokens)
    results["seconds"] = {"train": round(t_train, 1), "total": round(time.perf_counter() - t0, 1)}
    write_json(out / "eval.json", results)
    written.append(str(out / "eval.json"))
    q = results["quality"]
    rows = [
        ("NELBO bits/token (val)", results["bits_per_token"]),
        ("classifier mean top-class prob", q["mean_top_prob"]),
        ("predicted-class entropy bits (max 3.32)", q["class_entropy_bits"]),
        ("Frechet distance to real digits", q["frechet_distance"]),
        ("seconds", results["seconds"]["total"]),
    ]
    print(format_table(rows))
    print("wrote:\n" + "\n".join(f"  {p}" for p in written))
    return 0
