"""What `demask train` does once the arguments are parsed: configs in, `demask.train.train` out.

Everything here calls the library; the only logic of its own is turning options into the
`ModelConfig` / `TrainConfig` dataclasses (options left out keep the dataclass defaults, or the
run's saved values on --resume) and reporting where things were written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from demask.cli._common import CLIError, one_line
from demask.cli.train import MODEL_SKIP, TRAIN_SKIP


def _model_given(args: argparse.Namespace) -> dict[str, Any]:
    """The ModelConfig fields the user gave (--model and --seq-len included)."""
    from demask.cli._options import given
    from demask.config import ModelConfig

    fields = given(args, ModelConfig, skip=MODEL_SKIP)
    for option, name in (("model", "kind"), ("seq_len", "max_seq_len")):
        if getattr(args, option, None) is not None:
            fields[name] = getattr(args, option)
    return fields


def _naming_the_flag(message: str, args: argparse.Namespace) -> str:
    """`message` with the flag in front when it begins with the name of a field the user gave."""
    from demask.cli.train import MODEL_FLAGS, TRAIN_FLAGS

    name = message.split(" ", 1)[0].rstrip(":")
    if name not in {**_model_given(args), **_train_given(args)}:
        return message
    flags = {**MODEL_FLAGS, **TRAIN_FLAGS}
    flag = flags[name][0] if name in flags else "--" + name.replace("_", "-")
    return f"{flag}: {message}"


def _train_given(args: argparse.Namespace) -> dict[str, Any]:
    from demask.cli._options import given
    from demask.config import TrainConfig

    return given(args, TrainConfig, skip=TRAIN_SKIP)


def data_spec(spec: str) -> str:
    """Built-in dataset names stay as they are; a path is made absolute, so that `sample` and
    `eval` find the data from any working directory."""
    from demask.data import DATASETS

    return spec if spec in DATASETS else str(Path(spec).expanduser().resolve())


# dataset -> its labelled form (a class token before each example), for --conditional
LABELLED = {"digits": "digits-labelled"}
DEFAULT_COND_DROP_PROB = 0.1  # --conditional: rows trained without their class


def _labelled(data: str, args: argparse.Namespace) -> str:
    """The dataset to load: the labelled form of `data` with --conditional."""
    if getattr(args, "cond_drop_prob", None) is not None and not args.conditional:
        raise CLIError("--cond-drop-prob applies to --conditional models; add --conditional")
    if getattr(args, "predict_dropped_cond", None) and not args.conditional:
        raise CLIError("--predict-dropped-cond applies to --conditional models; add --conditional")
    if not args.conditional or data in LABELLED.values():
        return data
    if data not in LABELLED:
        raise CLIError(
            f"--conditional: {data!r} has no labels; labelled data: {', '.join(sorted(LABELLED))}"
        )
    return LABELLED[data]


def _check_conditional(model_cfg: Any) -> None:
    """A condition prefix needs a model that has one (asked of the model, built on meta)."""
    import torch

    from demask.config import build_model

    if model_cfg.cond_prefix_len:
        with torch.device("meta"):
            model = build_model(model_cfg)
        if not getattr(model, "cond_prefix_len", 0):
            raise CLIError(
                f"--conditional: a {model_cfg.kind!r} model takes no condition prefix; "
                "class-conditional training needs --model masked"
            )


def default_out(data: str, kind: str) -> str:
    """runs/<data name>-<model kind>, e.g. runs/digits-masked."""
    return f"runs/{Path(data).name or 'data'}-{kind}"


def _resume_configs(args: argparse.Namespace, out: str) -> tuple[Any, Any]:
    from demask.checkpoint import checkpoint_configs
    from demask.config import TrainConfig

    model_cfg, train_cfg, step = checkpoint_configs(out)  # CheckpointError: missing / corrupt
    if args.model is not None and args.model != model_cfg.kind:
        raise CLIError(
            f"--model {args.model}: the run in {out!r} holds a {model_cfg.kind!r} model; "
            "resume it without --model or pick another --out"
        )
    saved_data = train_cfg.data if train_cfg is not None else None
    given = _labelled(data_spec(args.data), args) if args.data is not None else None
    if given is not None and saved_data is not None and given != saved_data:
        raise CLIError(f"--data {args.data!r}: the run in {out!r} was trained on {saved_data!r}")
    # model options must match the saved ones (train() refuses a different model config)
    model_cfg = dataclasses.replace(model_cfg, **_model_given(args))
    wanted = args.max_steps
    if wanted is not None and wanted < step:
        raise CLIError(
            f"--train-steps {wanted}: the run in {out!r} is already at step {step}; give "
            f"--train-steps >= {step} to continue it (or leave it out)"
        )
    base = train_cfg if train_cfg is not None else TrainConfig(out=out)
    train_cfg = dataclasses.replace(base, out=out, **_train_given(args))
    return model_cfg, train_cfg


def _fresh_configs(args: argparse.Namespace, out: str) -> tuple[Any, Any]:
    from demask.config import ModelConfig, TrainConfig
    from demask.data import get_dataset

    data = _labelled(data_spec("digits" if args.data is None else args.data), args)
    # load the data first: a missing, empty, binary or too-short data path fails here, before
    # anything is written
    ds = get_dataset(data, "train", seq_len=args.seq_len, max_bytes=args.data_max_bytes)
    get_dataset(data, "val", seq_len=args.seq_len, max_bytes=args.data_max_bytes)
    fields = _model_given(args)
    fields.update(num_tokens=ds.tokenizer.vocab_size, max_seq_len=ds.seq_len)
    if ds.condition_len:  # a labelled dataset: the class token is the condition
        drop = getattr(args, "cond_drop_prob", None)
        fields.update(cond_prefix_len=ds.condition_len,
                      cond_drop_prob=DEFAULT_COND_DROP_PROB if drop is None else drop)  # fmt: skip
    model_cfg = ModelConfig(**fields)
    _check_conditional(model_cfg)
    train_cfg = TrainConfig(data=data, out=out, **_train_given(args))
    return model_cfg, train_cfg


def _check_options(args: argparse.Namespace) -> None:
    """One-line errors for options that contradict each other or name nothing."""
    for option in ("data", "out"):
        value = getattr(args, option)
        if value is not None and not value.strip():
            what = "digits | python-stdlib | a path" if option == "data" else "a folder"
            raise CLIError(f"--{option}: expected {what}, got {value!r}")
    if args.device is not None:
        from demask.cli._generate import resolve_device

        resolve_device(args.device)  # --device tpu: one line now, not a traceback later
    if args.resume and args.overwrite:
        raise CLIError("--resume and --overwrite contradict each other; give one")


def run_training(args: argparse.Namespace) -> int:
    """`demask train`: build the configs, train (or relaunch under torchrun), plot, report."""
    _check_options(args)
    if args.nproc > 1:
        from demask.distributed import in_torchrun, launch

        if in_torchrun():
            raise CLIError("--nproc: already inside torchrun; drop --nproc")
        return launch(args.nproc, args._argv)
    from demask.config import ModelConfig
    from demask.train import NonFiniteLossError, train

    out = args.out or default_out(args.data or "digits", args.model or ModelConfig.kind)
    make = _resume_configs if args.resume else _fresh_configs
    try:
        model_cfg, train_cfg = make(args, out)
    except (ValueError, TypeError) as err:  # a config field's check: name the flag too
        raise CLIError(_naming_the_flag(str(err), args)) from None
    train_cfg = dataclasses.replace(train_cfg, progress=not args.quiet)
    try:
        result = train(model_cfg, train_cfg, resume=args.resume, overwrite=args.overwrite)
    except NonFiniteLossError as err:  # a failed run, not bad input: exit 1, still one line
        print(f"demask train: {one_line(str(err))}", file=sys.stderr)
        return 1
    if not _is_main_process():
        return 0
    lines = [f"run folder: {out} (step {result.step}/{train_cfg.max_steps}, {result.status})"]
    if result.checkpoint is not None:
        lines.append(f"checkpoint: {result.checkpoint}")
    if result.val:
        step, bits = max(result.val.items())
        lines.append(f"validation: {bits:.4f} bits/token at step {step}")
    lines.append(f"metrics:    {Path(out) / 'metrics.jsonl'}")
    if not args.no_plot:
        lines.append(f"loss curve: {write_loss_curve(Path(out))}")
    print("\n".join(lines))
    return 0 if result.status != "interrupted" else 130


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def write_loss_curve(run_dir: Path) -> Path:
    """loss_curve.png from the run's metrics.jsonl."""
    from demask.pictures import save_loss_curve

    return save_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")


def note(message: str) -> None:
    """A progress note on stderr (stdout carries the results)."""
    print(message, file=sys.stderr, flush=True)
