"""`demask eval`: bits per token on the validation split, then sample quality; a table and JSON."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from demask.cli._common import CLIError, format_table, write_json
from demask.cli._generate import Run, generate, load_run, resolve_device, sample_options


def likelihood(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """Bits per token on the validation split: NELBO (masked) or exact NLL (autoregressive)."""
    from demask.evaluate import likelihood_sums

    if run.dataset is None:
        data = run.checkpoint.train_config.data if run.checkpoint.train_config else "?"
        raise CLIError(f"--checkpoint: the run's data {data!r} is not available here")
    bits, count = likelihood_sums(
        run.model, run.dataset, args.batch_size, args.max_batches, seed=args.seed
    )
    return {
        "likelihood": run.model.likelihood_name,
        "bits_per_token": bits / count,
        "tokens_scored": count,
    }


def image_quality(run: Run, samples: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Digits classifier metrics of the generated images (and, with --class, how many the
    classifier puts in that class)."""
    from demask.metrics import digits_class_accuracy, digits_quality

    pixels = samples[..., getattr(run.tokenizer, "prefix_len", 0) :]  # no class token
    out = digits_quality(pixels)
    label = getattr(args, "class_label", None)
    if label is not None:
        out["class_accuracy"] = digits_class_accuracy(pixels, [label] * len(pixels))
    return out


def text_quality(run: Run, samples: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Unigram entropy of the samples (and of real validation text), plus the generative
    perplexity under --ar-checkpoint when given."""
    from demask.metrics import causal_nll_fn
    from demask.metrics import text_quality as _text_quality

    nll_fn = None
    if args.ar_checkpoint:
        ar = load_run(
            args.ar_checkpoint, device=resolve_device(args.device), kind="autoregressive",
            what="--ar-checkpoint",
        )  # fmt: skip
        ar_cfg, cfg = ar.checkpoint.model_config, run.checkpoint.model_config
        if ar_cfg.num_tokens != cfg.num_tokens or ar_cfg.max_seq_len < samples.shape[1]:
            raise CLIError(
                f"--ar-checkpoint {args.ar_checkpoint}: its model ({ar_cfg.num_tokens} tokens, "
                f"length {ar_cfg.max_seq_len}) cannot score samples of {cfg.num_tokens} tokens and "
                f"length {samples.shape[1]}"
            )
        net = ar.model.net
        dev = next(net.parameters()).device
        score = causal_nll_fn(net)
        nll_fn = lambda tokens: score(tokens.to(dev)).cpu()  # noqa: E731
    reference = None
    if run.dataset is not None:
        reference = run.dataset.gather(_arange(min(len(run.dataset), max(len(samples), 64))))
    out: dict[str, Any] = dict(_text_quality(samples, nll_fn=nll_fn, reference=reference))
    if nll_fn is not None:
        out["ar_checkpoint"] = str(args.ar_checkpoint)
    return out


def _arange(n: int) -> Any:
    import torch

    return torch.arange(n)


# data modality -> sample-quality metric
QUALITY = {"image": image_quality, "text": text_quality}


def evaluate_run(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """All numbers of `demask eval` for a loaded run, as one JSON-ready dict."""
    cfg = run.checkpoint.model_config
    results: dict[str, Any] = {
        "checkpoint": str(run.checkpoint.path),
        "step": run.checkpoint.step,
        "model": run.kind,
        "data": run.checkpoint.train_config.data if run.checkpoint.train_config else None,
        "split": "val",
        "seq_len": cfg.max_seq_len,
    }
    results.update(likelihood(run, args))
    samples = generate(run, args.num, sample_options(run, args))
    sampling = {"num": int(samples.tokens.shape[0]), "seed": args.seed}
    sampling.update(samples.settings)  # the settings used, defaults included
    for name in ("temperature", "decode_steps", "sampler", "filter_thres", "anneal",
                 "class_label", "guidance"):  # fmt: skip
        if getattr(args, name, None) not in (None, False):
            sampling[name] = getattr(args, name)
    results["sampling"] = sampling
    results["quality"] = QUALITY[run.modality](run, samples.tokens, args)
    return results


def table_rows(results: dict[str, Any]) -> list[tuple[str, Any]]:
    """The printed table: likelihood first, then every scalar quality number."""
    rows: list[tuple[str, Any]] = [
        ("model", results["model"]),
        ("step", results["step"]),
        (f"{results['likelihood']} bits/token (val)", results["bits_per_token"]),
    ]
    for name, value in results["quality"].items():
        if isinstance(value, (int, float)):
            rows.append((name, value))
    return rows


def run_eval(args: argparse.Namespace) -> int:
    """`demask eval`."""
    run = load_run(args.checkpoint, device=resolve_device(args.device))
    args.prompt = None
    results = evaluate_run(run, args)
    path = Path(args.json) if args.json else run.run_dir / "eval.json"
    write_json(path, results)
    print(format_table(table_rows(results)))
    print(f"wrote: {path}")
    return 0
