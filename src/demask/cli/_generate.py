"""Loading a run and generating from it: shared by `demask sample`, `eval` and `demo`.

Generation is the model contract's `model.sample(num, SampleOptions(...))`, whatever the kind;
this module turns the command-line options into `SampleOptions`. The pictures or text written
for the samples are picked by the data's modality from `WRITERS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from demask.cli._common import CLIError, flag, parse_prompt

if TYPE_CHECKING:
    from demask.wrappers.contract import SampleOptions, Samples

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
                seq_len=ckpt.model_config.max_seq_len,
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


def _class_prompt(run: Run, label: int) -> tuple[int | None, ...]:
    """The class token of `label`, then holes to fill."""
    classes = getattr(run.tokenizer, "num_classes", 0)
    if not classes or not getattr(run.model, "cond_prefix_len", 0):
        raise CLIError(
            f"--class {label}: this model is not class-conditional (train one with "
            "`demask train --data digits --conditional`)"
        )
    if label >= classes:
        raise CLIError(f"--class: expected a class in 0..{classes - 1}, got {label}")
    n = run.checkpoint.model_config.max_seq_len
    return (run.tokenizer.class_token(label),) + (None,) * (n - 1)


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


def _text_prompt(run: Run, text: str) -> tuple[int | None, ...]:
    if run.modality != "text":
        raise CLIError(f"--prompt: prompts are for text models; this run's data is {run.modality}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # undecodable bytes on the command line
        raise CLIError(
            f"--prompt: not valid UTF-8 (an undecodable byte at character {err.start}); "
            "expected UTF-8 text"
        ) from None
    return tuple(parse_prompt(text, run.tokenizer.encode))


def sample_options(run: Run, args: argparse.Namespace) -> SampleOptions:
    """The `SampleOptions` that the command-line options of `sample` / `eval` ask for."""
    from demask.wrappers.contract import SampleOptions

    label, guidance = getattr(args, "class_label", None), getattr(args, "guidance", None)
    draws_class = run.checkpoint.model_config.predict_dropped_cond
    if guidance is not None and label is None and not draws_class:
        raise CLIError(
            f"--guidance {guidance}: guidance needs a condition; give --class too (only a model "
            "trained with --predict-dropped-cond draws a class to guide by)"
        )
    prompt = None
    if getattr(args, "prompt", None) is not None:
        prompt = _text_prompt(run, args.prompt)
    if label is not None:
        prompt = _class_prompt(run, label)
    uses = run.model.sample_options
    start = None
    if prompt is None and "start" in uses:  # a model that continues a prefix: real first tokens
        start = _first_tokens(run, args.num, args.seed)
    allowed = None
    if "allowed_tokens" in uses and hasattr(run.tokenizer, "allowed_tokens"):  # labelled images
        allowed = run.tokenizer.allowed_tokens(run.model.num_tokens)
    return SampleOptions(
        seed=args.seed,
        temperature=args.temperature,
        filter_thres=getattr(args, "filter_thres", None) or 0.0,
        prompt=prompt,
        start=start,
        length=getattr(args, "length", None),
        sampler=getattr(args, "sampler", None),
        decode_steps=getattr(args, "decode_steps", None),
        anneal=bool(getattr(args, "anneal", False)),
        guidance=guidance,
        allowed_tokens=allowed,
        history=True,
    )


def generate(run: Run, num: int, options: SampleOptions) -> Samples:
    """`num` samples of `run`'s model (`model.sample`); its errors about an option name the
    command-line flag."""
    from demask.wrappers.contract import SAMPLE_OPTION_NAMES

    try:
        return run.model.sample(num, options)  # type: ignore[no-any-return]
    except ValueError as err:
        name, sep, rest = str(err).partition(":")
        if sep and name in SAMPLE_OPTION_NAMES:
            raise CLIError(f"{flag(name)}:{rest}") from None
        raise


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
    samples = generate(run, args.num, sample_options(run, args))
    out = Path(args.out) if args.out else run.run_dir / "samples"
    written = WRITERS[run.modality](run, samples, out)
    print("wrote: " + ", ".join(written))
    return 0
