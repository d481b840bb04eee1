"""`demask demo`: train a class-conditional masked model on the digits, sample, score, draw.

Under 5 minutes on 2 CPU cores. The settings below were chosen by measurement (docs/CLI.md, "The
demo", gives the numbers and the command that produced them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from demask.cli._common import CLIError, format_table, write_json

DATA = "digits-labelled"  # each digit preceded by its class token: the condition
# The tuned demo: model and training settings (ModelConfig / TrainConfig fields). The seed's BERT
# augmentation is off (no_replace_prob = random_token_prob = 0): it shows the model wrong or
# unmasked tokens at positions it is scored on, which costs likelihood and sample quality here
# (benchmarks/RESULTS.md, "ablation").
# attn_dim_head 24 (= dim // heads): the head width the demo was tuned and measured with.
# abs_pos_attn_bias False: positions added to the pixels only. The Encoder's position bias (the
# default, which makes seq-256 text learn) made this demo worse (seed 0: class agreement 0.57
# against 0.90, Frechet distance 5.3 against 2.5; benchmarks/RESULTS.md).
# ff_glu, ff_swish, ff_mult 8/3: a SwiGLU feed-forward with as many weights as the plain MLP
# (width 256 at dim 96); lower NELBO at every seed tried (docs/CLI.md, "The demo").
# cond_drop_prob 0.5 with predict_dropped_cond: half the rows drop their class, and those rows
# mask it at their own rate and predict it, so that sampling without a class draws one first
# (then the pixels given it; the class prior is learned from every row, docs/CLI.md, "The class
# prior"). Against a quarter of the rows dropped and unscored, and the class
# drawn along the way: the digits drawn without a class are recognised more often at every seed
# (top-class 0.90 against 0.70 on 1,000 digits, Frechet distance 3.8 against 4.5); by class 94%
# against 96% land in their class (docs/CLI.md).
DEMO_MODEL: dict[str, Any] = {
    "dim": 96, "depth": 4, "heads": 4, "attn_dim_head": 24, "cond_prefix_len": 1,
    "cond_drop_prob": 0.5, "predict_dropped_cond": True, "no_replace_prob": 0.0,
    "random_token_prob": 0.0, "abs_pos_attn_bias": False, "ff_glu": True, "ff_swish": True,
    "ff_mult": 8 / 3,
}  # fmt: skip
# optimizer muon: Muon on the blocks' matrices (demask.optim), at the same lr and steps; lower
# NELBO at every seed tried, 1.79 against 1.93 bits/pixel (docs/CLI.md, "The demo").
DEMO_TRAIN: dict[str, Any] = {
    "optimizer": "muon",
    "max_steps": 750,
    "batch_size": 64,
    "lr": 3e-3,
    "warmup_steps": 75,
    "val_every": 250,
    "val_batches": 2,
    "checkpoint_every": 0,
    "log_every": 10,
}
# How the demo samples: MDLM ancestral sampling, one pixel per step, at a constant temperature
# of 0.8. Guidance (`generate(..., guidance_scale=w)`) is off: on a 1,000-step model w = 2 raised
# the classifier's agreement from 0.96 to 0.99 but moved the digits away from real ones (Frechet
# distance 2.0 -> 7.6), see docs/CLI.md.
DEMO_SAMPLING: dict[str, Any] = {
    "sampler": "ancestral", "steps": 64, "start_temperature": 0.8, "filter_thres": 0.0,
    "anneal_temperature": False,
}  # fmt: skip
GUIDANCE: float | None = None
PER_CLASS_DRAWN = 8  # digits per class in samples_by_class.png (one row per class)
PER_CLASS_SCORED = 20  # conditional digits per class scored by the classifier
# digits scored without a class: as many as by class, since the Frechet distance is biased upwards
# for small counts (real digits: about 4.6 at 64, 2.4 at 200) and compares only at one count
SCORED = 10 * PER_CLASS_SCORED
STRIP_CLASSES = (0, 2, 5, 7)  # the digits shown being demasked in demasking.png
PIXEL_SCALE = 6
MARKER = "demo.json"  # marks a folder written by the demo, which a later demo may overwrite
# the demo's numbers; not `eval.json`, which `demask eval --checkpoint <demo folder>` writes
RECORD = "demo_eval.json"


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


def sample_classes(
    model: Any, tokenizer: Any, labels: Tensor, *, guidance: float | None, seed: int
) -> tuple[Tensor, Tensor]:
    """(B, N) class-conditional samples for `labels` (B,) and their (steps, B, N) history."""
    dev = next(model.parameters()).device
    prompt = torch.full((len(labels), tokenizer.seq_len), model.mask_id, dtype=torch.long)
    prompt[:, 0] = torch.tensor([tokenizer.class_token(int(c)) for c in labels])
    tokens, history = model.generate(
        prompt=prompt.to(dev), guidance_scale=guidance, return_history=True,
        generator=torch.Generator(dev).manual_seed(seed),
        allowed_tokens=tokenizer.allowed_tokens(model.num_tokens), **DEMO_SAMPLING,
    )  # fmt: skip
    return tokens.cpu(), history.cpu()


def sample_unconditional(model: Any, tokenizer: Any, num: int, seed: int) -> Tensor:
    """(num, N) samples without a given class: the class token stays masked, or, for a model
    trained with predict_dropped_cond (the demo's), the model draws it first, then the pixels
    given it."""
    dev = next(model.parameters()).device
    prompt = torch.full((num, tokenizer.seq_len), model.mask_id, dtype=torch.long, device=dev)
    gen = torch.Generator(dev).manual_seed(seed)
    allowed = tokenizer.allowed_tokens(model.num_tokens)
    return model.generate(prompt=prompt, generator=gen, allowed_tokens=allowed,
                          **DEMO_SAMPLING).cpu()  # fmt: skip


def _draw(out: Path, model: Any, tok: Any, cond: Tensor, history: Tensor, uncond: Tensor) -> list:
    """samples_by_class.png, demasking.png and samples.png."""
    from demask import pictures

    k = tok.prefix_len
    by_class = cond.view(10, PER_CLASS_SCORED, -1)[:, :PER_CLASS_DRAWN].reshape(-1, cond.shape[1])
    rows = [c * PER_CLASS_SCORED for c in STRIP_CLASSES]  # the first sample of those classes
    pixels = history[:, rows, k:]  # (steps, R, 64)
    start = torch.full_like(pixels[:1], model.mask_id)  # the fully masked start
    return [
        pictures.save_image_grid(by_class, out / "samples_by_class.png", PER_CLASS_DRAWN,
                                 tokenizer=tok, scale=PIXEL_SCALE),
        pictures.save_demasking_strip(torch.cat([start, pixels]), model.mask_id,
                                      out / "demasking.png", tokenizer=tok,
                                      max_rows=len(rows), max_cols=10, scale=PIXEL_SCALE),
        pictures.save_image_grid(uncond, out / "samples.png", 8, tokenizer=tok,
                                 scale=PIXEL_SCALE),
    ]  # fmt: skip


def _score(tok: Any, cond: Tensor, labels: Tensor, uncond: Tensor) -> dict[str, Any]:
    """Classifier metrics of SCORED digits each way, and of as many real digits (the yardstick)."""
    from demask.metrics import digits_class_accuracy, digits_quality, real_digits_quality

    k = tok.prefix_len
    q_cond = digits_quality(cond[:, k:])
    q_cond["class_accuracy"] = digits_class_accuracy(cond[:, k:], labels)
    q_cond["guidance_scale"] = GUIDANCE
    return {
        "conditional": q_cond,
        "unconditional": digits_quality(uncond[:SCORED, k:]),
        "real_digits": real_digits_quality(SCORED),
    }


def run_demo(args: argparse.Namespace) -> int:
    """Train, sample, evaluate, draw; print the numbers and where the files are."""
    from demask.cli._generate import load_run, resolve_device
    from demask.cli._run import note, write_loss_curve
    from demask.config import ModelConfig, TrainConfig
    from demask.data import get_dataset
    from demask.evaluate import likelihood_bits_per_token
    from demask.train import train

    t0 = time.perf_counter()
    out = Path(args.out)
    overwrite = _check_out(out)
    device = resolve_device(args.device)
    ds = get_dataset(DATA, "train")
    model_cfg = ModelConfig(
        kind="masked", num_tokens=ds.tokenizer.vocab_size, max_seq_len=ds.seq_len, **DEMO_MODEL
    )
    train_fields = dict(DEMO_TRAIN, seed=args.seed)
    if args.max_steps is not None:
        steps = args.max_steps
        train_fields.update(max_steps=steps, warmup_steps=min(steps // 10, 50))
        train_fields["val_every"] = max(1, steps // 5)
    train_cfg = TrainConfig(
        data=DATA, out=str(out), device=str(device), progress=not args.quiet, **train_fields
    )
    note(
        f"demo: training a class-conditional masked transformer (dim {model_cfg.dim}, depth "
        f"{model_cfg.depth}) on {len(ds)} digits for {train_cfg.max_steps} steps"
    )
    result = train(model_cfg, train_cfg, overwrite=overwrite)
    write_json(out / MARKER, {"model": model_cfg.to_dict(), "train": train_cfg.to_dict()})
    t_train = time.perf_counter() - t0

    run = load_run(str(out), device=device, kind="masked")
    model, tok = run.model.eval(), run.tokenizer
    num_uncond = max(args.num, SCORED)  # the first SCORED are scored, the first --num drawn
    note(f"demo: sampling {SCORED} digits by class and {num_uncond} without")
    labels = torch.arange(10).repeat_interleave(PER_CLASS_SCORED)  # (SCORED,)
    cond, history = sample_classes(model, tok, labels, guidance=GUIDANCE, seed=args.seed)
    uncond = sample_unconditional(model, tok, num_uncond, args.seed)
    written = [str(p) for p in _draw(out, model, tok, cond, history, uncond[: args.num])]
    written.append(str(write_loss_curve(out)))

    results: dict[str, Any] = {"checkpoint": str(run.checkpoint.path), "step": result.step}
    results["nelbo_bits_per_pixel"] = likelihood_bits_per_token(
        model, run.dataset, 64, seed=args.seed
    )  # the pixels given the class (the class token is the condition)
    results["sampling"] = dict(DEMO_SAMPLING)
    results.update(_score(tok, cond, labels, uncond))
    results["seconds"] = {"train": round(t_train, 1), "total": round(time.perf_counter() - t0, 1)}
    write_json(out / RECORD, results)
    written.append(str(out / RECORD))
    c, u, real = results["conditional"], results["unconditional"], results["real_digits"]
    rows = [
        ("NELBO bits/pixel given the class (val)", results["nelbo_bits_per_pixel"]),
        ("by class: classifier agrees with the class asked for", c["class_accuracy"]),
        ("by class: classifier mean top-class prob", c["mean_top_prob"]),
        ("by class: Frechet distance to real digits", c["frechet_distance"]),
        ("unconditional: classifier mean top-class prob", u["mean_top_prob"]),
        ("unconditional: predicted-class entropy bits (max 3.32)", u["class_entropy_bits"]),
        ("unconditional: Frechet distance to real digits", u["frechet_distance"]),
        (
            f"real digits ({SCORED} training digits, {real['draws']} draws): top-class prob",
            real["mean_top_prob"],
        ),
        ("real digits: Frechet distance (the floor at this count)", real["frechet_distance"]),
        ("seconds", results["seconds"]["total"]),
    ]
    print(format_table(rows))
    print("wrote:\n" + "\n".join(f"  {p}" for p in written))
    return 0
