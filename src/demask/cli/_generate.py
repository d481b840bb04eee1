"""Loading a run and generating from it: shared by `demask sample`, `eval` and `demo`.

Generation is picked by model kind from `GENERATORS` (a registry, not an if/elif); the pictures or
text written for the samples are picked by the data's modality from `WRITERS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from demask.cli._common import HOLE_MARKER, CLIError, parse_prompt

DEFAULT_MASKED_SAMPLER = "ancestral"
# model kind -> the sampling settings used when the options leave them out (recorded in eval.json)
SAMPLING_DEFAULTS: dict[str, dict[str, Any]] = {
    "masked": {"sampler": DEFAULT_MASKED_SAMPLER, "filter_thres": 0.0, "anneal": False},
    "autoregressive": {"filter_thres": 0.0},
}
GRID_COLUMNS = 8  # digits per row in samples.png
PIXEL_SCALE = 6  # each image pixel drawn as a 6x6 block (an 8x8 digit is 48x48 pixels)
STRIP_ROWS = 4  # sequences shown in demasking.png
STRIP_COLUMNS = 10  # states shown per sequence at most (evenly spaced, first and last included)


@dataclass
class Run:
    """A loaded checkpoint with what generation needs to know about its data."""

    checkpoint: Any  # demask.checkpoint.Checkpoint
    tokenizer: Any  # the data's tokenizer (encode / decode)
    modality: str  # "image" | "text"
    dataset: Any | None  # the validation split, or None when the data is not available here
    run_dir: Path  # the run folder (where eval.json and samples/ go by default)

    @property
    def kind(self) -> str:
        return self.checkpoint.model_config.kind

    @property
    def model(self) -> Any:
        return self.checkpoint.model


def resolve_device(device: str | None) -> torch.device:
    """The torch device of a --device option (None: cuda if available, else cpu)."""
    from demask.distributed import resolve_device as _resolve

    try:
        return _resolve(device or "auto")
    except ValueError as err:
        raise CLIError(f"--device {device!r}: {err}") from None


def load_run(
    path: str, *, device: torch.device, kind: str | None = None, what: str = "--checkpoint"
) -> Run:
    """Rebuild the model of a run folder / checkpoint and find its data's tokenizer.

    kind: when given, the checkpoint must hold that model kind (else a one-line error).
    """
    from demask.checkpoint import CheckpointError, load_checkpoint
    from demask.data import get_dataset, get_tokenizer

    try:
        ckpt = load_checkpoint(path, kind=kind, map_location=device)
    except CheckpointError as err:
        raise CLIError(f"{what} {path}: {err}") from None
    train_cfg = ckpt.train_config
    dataset = None
    if train_cfg is not None:
        try:
            dataset = get_dataset(
                train_cfg.data,
                "val",
                seq_len=ckpt.model_config.seq_len,
                max_bytes=train_cfg.data_max_bytes,
            )
        except (ValueError, OSError):
            dataset = None  # data not on this machine: text models still sample (bytes)
    if dataset is not None:
        tokenizer, modality = dataset.tokenizer, dataset.modality
    else:
        tokenizer, modality = get_tokenizer("bytes"), "text"
    folder = Path(ckpt.path)
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    return Run(ckpt, tokenizer, modality, dataset, run_dir)


@dataclass
class Samples:
    """Generated tokens (B, N) and, for masked models, the states after each step (S, B, N)."""

    tokens: Tensor
    history: Tensor | None = None


def _masked_prompt(run: Run, prompt: list[int | None], num: int) -> Tensor:
    n = run.checkpoint.model_config.seq_len
    if len(prompt) > n:
        raise CLIError(
            f"--prompt: {len(prompt)} tokens, longer than the model's sequence length {n}"
        )
    mask_id = run.model.mask_id
    ids = [mask_id if t is None else t for t in prompt] + [mask_id] * (n - len(prompt))
    return torch.tensor(ids, dtype=torch.long).expand(num, n).clone()  # (num, N)


def no_class_tokens(tokenizer: Any) -> Callable[[Tensor], Tensor] | None:
    """A logits filter that never samples a class token at a pixel (labelled data), or None."""
    classes = getattr(tokenizer, "num_classes", 0)
    if not classes:
        return None
    first = tokenizer.levels

    def only_pixels(logits: Tensor) -> Tensor:  # (M, V)
        logits[:, first : first + classes] = -torch.inf
        return logits

    return only_pixels


def _class_prompt(run: Run, label: int, num: int) -> Tensor:
    """(num, N): the class token of `label`, then mask tokens to fill."""
    classes = getattr(run.tokenizer, "num_classes", 0)
    if not classes or not getattr(run.model, "cond_prefix_len", 0):
        raise CLIError(
            f"--class {label}: this model is not class-conditional (train one with "
            "`demask train --data digits --conditional`)"
        )
    if label >= classes:
        raise CLIError(f"--class: expected a class in 0..{classes - 1}, got {label}")
    n = run.checkpoint.model_config.seq_len
    prompt = torch.full((num, n), run.model.mask_id, dtype=torch.long)
    prompt[:, 0] = run.tokenizer.class_token(label)
    return prompt


def generate_masked(run: Run, opts: argparse.Namespace, prompt: list[int | None] | None) -> Samples:
    """Iterative demasking (the wrapper's `generate`), with the step-by-step states kept.

    CLI defaults: MDLM ancestral sampling at a constant temperature without logits filtering,
    i.e. samples from the model's own distribution (Sahoo et al. 2024,
    https://arxiv.org/abs/2406.07524). `--sampler confidence --filter-thres 0.7 --anneal` is the
    seed's MaskGIT decoding, which on small data tends to collapse onto a few modes.
    """
    dev = next(run.model.parameters()).device
    kwargs: dict[str, Any] = {
        "generator": torch.Generator(dev).manual_seed(opts.seed),
        "return_history": True,
        "sampler": getattr(opts, "sampler", None) or DEFAULT_MASKED_SAMPLER,
        "filter_thres": getattr(opts, "filter_thres", None) or 0.0,
        "anneal_temperature": bool(getattr(opts, "anneal", False)),
        "start_temperature": opts.temperature,
        "logits_filter": no_class_tokens(run.tokenizer),
    }
    if getattr(opts, "steps", None) is not None:
        kwargs["steps"] = opts.steps
    if prompt is not None:
        kwargs["prompt"] = _masked_prompt(run, prompt, opts.num).to(dev)
    label, guidance = getattr(opts, "class_label", None), getattr(opts, "guidance", None)
    if label is not None:
        kwargs["prompt"] = _class_prompt(run, label, opts.num).to(dev)
    elif guidance is not None:
        raise CLIError(f"--guidance {guidance}: guidance needs a condition; give --class too")
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    tokens, history = run.model.generate(batch_size=opts.num, **kwargs)
    return Samples(tokens.cpu(), history.cpu())


def _first_tokens(run: Run, num: int, seed: int) -> Tensor:
    """(num, 1) first tokens for unconditional AR sampling: the first token of randomly drawn
    real examples, i.e. a sample from the data's own first-token distribution."""
    if run.dataset is None:
        raise CLIError(
            "--prompt is needed: the run's training data is not available here to draw first "
            "tokens from"
        )
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(run.dataset), (num,), generator=gen)
    return torch.stack([run.dataset[int(i)][:1] for i in idx])  # (num, 1)


def generate_autoregressive(
    run: Run, opts: argparse.Namespace, prompt: list[int | None] | None
) -> Samples:
    """Left-to-right sampling after a prefix (the prompt, or one real first token)."""
    if prompt is not None and any(t is None for t in prompt):
        raise CLIError(
            f"--prompt: {HOLE_MARKER} holes need a masked model; an autoregressive model only "
            "continues a prefix"
        )
    if prompt is not None and not prompt:
        raise CLIError("--prompt: an autoregressive model needs at least one prompt token")
    n = run.checkpoint.model_config.seq_len
    if prompt is None:
        start = _first_tokens(run, opts.num, opts.seed)
    else:
        start = torch.tensor(prompt, dtype=torch.long).expand(opts.num, len(prompt)).clone()
    given_length = getattr(opts, "length", None)
    if given_length is None and start.shape[1] >= n:
        raise CLIError(
            f"--prompt: {start.shape[1]} tokens leave no room to generate: the model's sequence "
            f"length is {n}, so give at most {n - 1} prompt tokens"
        )
    length = given_length or n - start.shape[1]
    if length < 1 or start.shape[1] + length > n:
        raise CLIError(
            f"--length: prompt ({start.shape[1]} tokens) + {length} new tokens must fit the "
            f"model's sequence length {n}"
        )
    dev = next(run.model.parameters()).device
    filter_thres = getattr(opts, "filter_thres", None)
    tokens = run.model.generate(
        start.to(dev),
        length,
        temperature=opts.temperature,
        filter_logits_fn="top_k" if filter_thres else None,
        filter_kwargs={"thres": filter_thres} if filter_thres else None,
        generator=torch.Generator(dev).manual_seed(opts.seed),
    )
    return Samples(tokens.cpu())


# model kind -> how to generate
GENERATORS: dict[str, Callable[[Run, argparse.Namespace, list[int | None] | None], Samples]] = {
    "masked": generate_masked,
    "autoregressive": generate_autoregressive,
}


# sampling option (argparse dest) -> the model kind it applies to
KIND_OPTIONS = {"sampler": "masked", "steps": "masked", "anneal": "masked",
                "length": "autoregressive"}  # fmt: skip


def generate(run: Run, opts: argparse.Namespace) -> Samples:
    """Samples from `run` as `opts` (num, seed, temperature, prompt, ...) ask."""
    for dest, kind in KIND_OPTIONS.items():
        if getattr(opts, dest, None) not in (None, False) and run.kind != kind:
            flag = "--" + dest.replace("_", "-")
            raise CLIError(
                f"{flag}: applies to {kind} models only, but the checkpoint holds a {run.kind!r} "
                f"model; drop {flag}"
            )
    prompt = None
    if run.kind != "masked" and getattr(opts, "class_label", None) is not None:
        raise CLIError("--class: class-conditional sampling needs a masked model")
    if getattr(opts, "prompt", None) is not None:
        if run.modality != "text":
            raise CLIError(
                f"--prompt: prompts are for text models; this run's data is {run.modality}"
            )
        try:
            opts.prompt.encode("utf-8")
        except UnicodeEncodeError as err:  # undecodable bytes on the command line
            raise CLIError(
                f"--prompt: not valid UTF-8 (an undecodable byte at character {err.start}); "
                "expected UTF-8 text"
            ) from None
        prompt = parse_prompt(opts.prompt, run.tokenizer.encode)
    if run.kind not in GENERATORS:
        raise CLIError(f"--checkpoint: no generation for model kind {run.kind!r}")
    return GENERATORS[run.kind](run, opts, prompt)


# ---------------------------------------------------------------------------------- writers


def write_image_samples(run: Run, samples: Samples, out: Path) -> list[str]:
    """samples.png (a grid) and, with a history, demasking.png (the first sequences, step by
    step from fully masked to done)."""
    from demask import pictures

    out.mkdir(parents=True, exist_ok=True)
    ncols = max(1, min(GRID_COLUMNS, samples.tokens.shape[0]))
    grid = pictures.save_image_grid(
        samples.tokens, out / "samples.png", ncols, tokenizer=run.tokenizer, scale=PIXEL_SCALE
    )
    written = [grid]
    if samples.history is not None:
        mask_id = run.model.mask_id
        pixels = samples.history[..., getattr(run.tokenizer, "prefix_len", 0) :]  # no class token
        start = torch.full_like(pixels[:1], mask_id)  # (1, B, N): the fully masked start
        history = torch.cat([start, pixels])  # (steps + 1, B, N)
        written.append(
            pictures.save_demasking_strip(
                history,
                mask_id,
                out / "demasking.png",
                tokenizer=run.tokenizer,
                max_rows=STRIP_ROWS,
                max_cols=STRIP_COLUMNS,
                scale=PIXEL_SCALE,
            )
        )
    return [str(p) for p in written]


def decode_texts(run: Run, tokens: Tensor) -> list[str]:
    texts = run.tokenizer.decode(tokens)
    return [t.replace("\x00", "\u2400") for t in texts]  # NUL marks a document boundary


def write_text_samples(run: Run, samples: Samples, out: Path) -> list[str]:
    """Print the samples and write them to samples.txt."""
    texts = decode_texts(run, samples.tokens)
    body = "".join(f"{'-' * 30} sample {i}\n{t}\n" for i, t in enumerate(texts))
    print(body, end="")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "samples.txt"
    path.write_text(body)
    return [str(path)]


# data modality -> what to write for samples
WRITERS: dict[str, Callable[[Run, Samples, Path], list[str]]] = {
    "image": write_image_samples,
    "text": write_text_samples,
}


def run_sampling(args: argparse.Namespace) -> int:
    """`demask sample`."""
    run = load_run(args.checkpoint, device=resolve_device(args.device))
    samples = generate(run, args)
    out = Path(args.out) if args.out else run.run_dir / "samples"
    written = WRITERS[run.modality](run, samples, out)
    print("wrote: " + ", ".join(written))
    return 0
