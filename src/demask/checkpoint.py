"""Checkpoints that survive being killed, and rebuilding a model from a checkpoint alone.

Layout of a run folder:

    run/latest                           one line: "checkpoints/step_00000100" (written LAST)
    run/checkpoints/step_00000100/
        model.safetensors                the weights (fp32); the configs also sit in its metadata
        config.json                      {"format_version": 1, "model": ..., "train": ...}
        state.pt                         optimiser state, step, RNG states (torch.save of a dict)

Atomicity: a checkpoint is written into a temporary folder `checkpoints/.tmp-step_...` inside the
run folder, every file is fsync'ed, the folder is renamed into place (`os.replace`, atomic on one
file system), and only then is `latest` replaced (temporary file, fsync, `os.replace`). A process
killed at any moment (SIGKILL included) leaves `latest` pointing at the previous, complete
checkpoint; the stale temporary folder is removed by the next save. A write that fails (a full
disk) removes its temporary folder and raises `runfolder.WriteError` naming the path and the free
space. When `latest` is missing, the newest complete `step_*` is the run's checkpoint.

Loading refuses weights that do not fit the config (listing the tensors) or hold NaN/inf values.
The run folder's rules (what demask owns, the lock) are in `demask.runfolder`; saving and restoring
a (distributed) training run is in `demask.training_state`.

Test hook: `DEMASK_TEST_CHECKPOINT_SLEEP="STEP:SECONDS"` sleeps SECONDS between the files of the
checkpoint of step >= STEP, so a test can kill a real process in the middle of a write.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from demask.config import ModelConfig, TrainConfig, build_model, configs_from_json, configs_to_json
from demask.runfolder import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LATEST_FILE,
    STATE_FILE,
    TMP_PREFIX,
    WEIGHTS_FILE,
    CheckpointError,
    atomic_write_text,
    clear_run,
    fsync_dir,
    latest_checkpoint,
    read_latest,
    step_dir_name,
    write_error,
)

__all__ = ["CheckpointError", "Checkpoint", "clear_run", "latest_checkpoint", "load_checkpoint",
           "save_checkpoint", "resolve_checkpoint", "checkpoint_configs", "check_weights",
           "read_configs", "read_state", "read_weights", "step_dir_name"]  # fmt: skip

_SLEEP_ENV = "DEMASK_TEST_CHECKPOINT_SLEEP"


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns: the rebuilt model (eval mode) and everything saved with it."""

    model: nn.Module
    model_config: ModelConfig
    train_config: TrainConfig | None
    step: int
    path: Path  # the checkpoint folder
    state: dict[str, Any] | None = field(default=None, repr=False)  # state.pt, if asked for


# ----------------------------------------------------------------------------------------------
# low-level helpers


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _test_sleep(step: int) -> None:
    spec = os.environ.get(_SLEEP_ENV)
    if not spec:
        return
    from_step, seconds = spec.split(":")
    if step >= int(from_step):
        time.sleep(float(seconds))


# ----------------------------------------------------------------------------------------------
# saving


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    model_state: dict[str, Tensor],
    model_config: ModelConfig,
    train_config: TrainConfig | None = None,
    train_state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write the checkpoint of `step` atomically into `run_dir` and point `latest` at it.

    model_state: a full (unsharded) state dict; every tensor must be finite (a NaN/inf weight raises
    ValueError and nothing is written, so no poisoned checkpoint replaces a good one).
    train_state: optimiser state etc., saved with torch.save into state.pt (step is added).
    keep: how many checkpoints to keep; older ones are deleted after `latest` moves.
    Returns the checkpoint folder.
    """
    run_dir = Path(run_dir)
    bad = [
        k for k, v in model_state.items() if v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if bad:
        raise ValueError(
            f"refusing to save the checkpoint of step {step}: non-finite values in {bad[:3]}"
        )
    ckpts = run_dir / CHECKPOINTS_DIR
    final = ckpts / step_dir_name(step)
    pointer = run_dir / LATEST_FILE
    try:
        current = read_latest(run_dir) == final
    except CheckpointError:  # a broken pointer: replaced below
        current = False
    tmp: Path | None = None
    try:
        ckpts.mkdir(parents=True, exist_ok=True)
        for stale in ckpts.glob(TMP_PREFIX + "*"):  # left by a writer that was killed
            shutil.rmtree(stale, ignore_errors=True)
        if not current:  # a same-step folder that `latest` does not name may be stale: rewrite it
            tmp = ckpts / f"{TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}"
            tmp.mkdir()
            _write_files(tmp, step, model_state, model_config, train_config, train_state)
            if final.exists():  # not named by `latest`, so moving it away is safe at any moment
                os.replace(final, ckpts / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
            os.replace(tmp, final)
            tmp = None
            fsync_dir(ckpts)
    except BaseException as err:  # a full disk, a kill signal...: leave no temporary files
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise write_error(final, err) from None
        raise
    atomic_write_text(pointer, f"{CHECKPOINTS_DIR}/{final.name}\n")
    _prune(ckpts, keep=keep, current=final)
    for old in ckpts.glob(f"{TMP_PREFIX}old-*"):
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(tmp: Path, step: int, model_state: dict[str, Tensor], model_config: ModelConfig,
                 train_config: TrainConfig | None, train_state: dict[str, Any] | None) -> None:  # fmt: skip
    cfg_json = configs_to_json(model_config, train_config)
    # clone: safetensors refuses shared storage (tied embeddings) and views
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
    meta = {"format": "pt", "demask_config": cfg_json, "demask_step": str(step)}
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=meta)
    _fsync_file(tmp / WEIGHTS_FILE)
    _test_sleep(step)
    (tmp / CONFIG_FILE).write_text(cfg_json + "\n")
    _fsync_file(tmp / CONFIG_FILE)
    _test_sleep(step)
    state = dict(train_state or {})
    state["step"] = step
    torch.save(state, tmp / STATE_FILE)
    _fsync_file(tmp / STATE_FILE)
    fsync_dir(tmp)


def _prune(ckpts: Path, *, keep: int, current: Path) -> None:
    dirs = sorted(p for p in ckpts.glob("step_*") if p.is_dir())
    for old in dirs[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# finding and loading


def _resolve(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint folder, weights file) for a run folder, a checkpoint folder or a weights file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    if path.is_file():
        if path.name == LATEST_FILE:
            path = path.parent
        elif path.suffix == ".safetensors":
            return path.parent, path
        else:
            raise CheckpointError(
                f"checkpoint file {str(path)!r} is not a .safetensors file; give a run folder, "
                "a checkpoint folder or its model.safetensors"
            )
    if (path / WEIGHTS_FILE).is_file():
        return path, path / WEIGHTS_FILE
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"no checkpoint in {str(path)!r}: expected a run folder with a '{LATEST_FILE}' file "
            f"or a checkpoint folder with {WEIGHTS_FILE}"
        )
    return found, found / WEIGHTS_FILE


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder for a run folder, a checkpoint folder or a weights file."""
    return _resolve(path)[0]


def read_weights(
    weights: Path, *, tensors_too: bool = True
) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            keys = list(f.keys()) if tensors_too else []
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint {str(weights)!r} is corrupt or unreadable: {msg}"
        ) from None
    return tensors, meta


def _configs_of(weights: Path, meta: dict[str, str]) -> tuple[ModelConfig, TrainConfig | None]:
    """The configs of a weights file: its folder's config.json for a model.safetensors, else the
    file's own metadata (a file renamed or copied out of its folder carries its config along)."""
    if weights.name == WEIGHTS_FILE:
        return read_configs(weights.parent, meta)
    if "demask_config" not in meta:
        raise CheckpointError(
            f"checkpoint {str(weights)!r} holds no demask config in its metadata; expected a "
            f"weights file written by demask, or the checkpoint folder with its {CONFIG_FILE}"
        )
    return read_configs(None, meta, what=str(weights))


def read_configs(
    ckpt_dir: Path | None, meta: dict[str, str], what: str | None = None
) -> tuple[ModelConfig, TrainConfig | None]:
    """The configs of a checkpoint: config.json, or the weights' metadata when it is missing."""
    cfg_file = None if ckpt_dir is None else ckpt_dir / CONFIG_FILE
    try:
        if cfg_file is not None and cfg_file.is_file():
            what = str(cfg_file)
            return configs_from_json(cfg_file.read_text(encoding="utf-8"))
        return configs_from_json(meta["demask_config"])
    except (KeyError, ValueError, TypeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        where = what or str(ckpt_dir)
        raise CheckpointError(f"checkpoint {where!r} has no valid config: {msg}") from None


def check_weights(model: nn.Module, weights: dict[str, Tensor], where: str | Path) -> None:
    """Refuse weights that do not fit `model` (listing the missing, unexpected and reshaped
    tensors) or that hold NaN/inf values (naming the tensors): CheckpointError, one line."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    reshaped = {k: (tuple(weights[k].shape), tuple(v.shape)) for k, v in expected.items()
                if k in weights and weights[k].shape != v.shape}  # fmt: skip
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(
            f"unexpected tensors {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else "")
        )
    if reshaped:
        shown = ", ".join(
            f"{k}: saved {a}, expected {b}" for k, (a, b) in list(reshaped.items())[:3]
        )
        problems.append(f"reshaped tensors ({shown})")
    if problems:
        raise CheckpointError(
            f"checkpoint {str(where)!r} does not match its config: " + "; ".join(problems)
        )
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"checkpoint {str(where)!r} holds NaN/inf values in {bad[:5]}; expected finite weights "
            "(use an earlier checkpoint)"
        )


def read_state(ckpt_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The training state (state.pt) of a checkpoint folder."""
    path = Path(ckpt_dir) / STATE_FILE
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles: the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} has no {STATE_FILE}") from None
    except Exception as err:  # torch.load raises many kinds on a truncated or foreign file
        # never repeat torch's own message: it suggests loading untrusted files unsafely
        raise CheckpointError(
            f"{str(path)!r} is corrupt or not a demask training state ({type(err).__name__}); "
            "expected the state.pt demask wrote with this checkpoint"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(
            f"{str(path)!r} is not a demask training state: expected a dict with an int 'step'"
        )
    return state


def load_checkpoint(
    path: str | Path,
    *,
    kind: str | None = None,
    map_location: str | torch.device = "cpu",
    with_state: bool = False,
) -> Checkpoint:
    """Rebuild the model of a checkpoint from the checkpoint alone.

    path: a run folder (its `latest` checkpoint), a checkpoint folder, or a weights file (that
    file, with the config in its metadata unless it is the folder's model.safetensors).
    kind: when given, the checkpoint must hold this model kind ("masked" | "autoregressive").
    with_state: also read state.pt (optimiser and RNG states) into `Checkpoint.state`.
    Raises CheckpointError (a ValueError, one line) when the checkpoint is missing, corrupt, holds
    NaN/inf weights or another kind. The model is returned in eval mode on `map_location`.
    """
    ckpt_dir, weights_file = _resolve(path)
    weights, meta = read_weights(weights_file)
    model_config, train_config = _configs_of(weights_file, meta)
    if kind is not None and model_config.kind != kind:
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} holds a {model_config.kind!r} model, expected {kind!r}"
        )
    model = build_model(model_config)
    check_weights(model, weights, weights_file)
    model.load_state_dict(weights, strict=True)
    model.to(map_location).eval()
    if with_state and weights_file.name != WEIGHTS_FILE:
        raise CheckpointError(
            f"with_state: {STATE_FILE} belongs to {WEIGHTS_FILE}, not {str(weights_file)!r}"
        )
    state = read_state(ckpt_dir, map_location) if with_state else None
    step = int(meta.get("demask_step", state["step"] if state else -1))
    return Checkpoint(model, model_config, train_config, step, ckpt_dir, state)


def checkpoint_configs(path: str | Path) -> tuple[ModelConfig, TrainConfig | None, int]:
    """(model config, train config, step) of a checkpoint, without building the model; e.g. for
    `demask train --resume`, which starts from the saved configs and overrides a few fields."""
    _, weights_file = _resolve(path)
    _, meta = read_weights(weights_file, tensors_too=False)
    model_config, train_config = _configs_of(weights_file, meta)
    return model_config, train_config, int(meta.get("demask_step", -1))
