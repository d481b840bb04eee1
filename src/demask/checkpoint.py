"""Checkpoints that survive being killed, and rebuilding a model from a checkpoint alone.

Layout of a run folder:

    run/latest                           one line: "checkpoints/step_00000100" (written LAST)
    run/checkpoints/step_00000100/
        model.safetensors                the weights (fp32); the configs also sit in its metadata
        config.json                      {"model": ModelConfig, "train": TrainConfig}
        state.pt                         optimiser state, step, RNG states (torch.save of a dict)

Atomicity: a checkpoint is written into a temporary folder `checkpoints/.tmp-step_...` inside the
run folder, every file is fsync'ed, the folder is renamed into place (`os.replace`, atomic on one
file system), and only then is `latest` replaced (temporary file, fsync, `os.replace`). A process
killed at any moment (SIGKILL included) leaves `latest` pointing at the previous, complete
checkpoint; the stale temporary folder is removed by the next save.

Test hook: `DEMASK_TEST_CHECKPOINT_SLEEP="STEP:SECONDS"` sleeps SECONDS between the files of the
checkpoint of step >= STEP, so a test can kill a real process in the middle of a write.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from demask.config import ModelConfig, TrainConfig, build_model, configs_from_json, configs_to_json
from demask.distributed import DistInfo, barrier, broadcast_object

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
LATEST_FILE = "latest"
CHECKPOINTS_DIR = "checkpoints"
_TMP_PREFIX = ".tmp-"
_SLEEP_ENV = "DEMASK_TEST_CHECKPOINT_SLEEP"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or holds another kind of model (one-line message)."""


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """The RNG states of this process: torch CPU, CUDA (if any) and Python's `random`."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    ckpts.mkdir(parents=True, exist_ok=True)
    for stale in ckpts.glob(_TMP_PREFIX + "*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = ckpts / step_dir_name(step)
    pointer = run_dir / LATEST_FILE
    current = pointer.is_file() and (run_dir / pointer.read_text().strip()) == final
    if not current:  # a same-step folder that `latest` does not name may be stale: rewrite it
        tmp = ckpts / f"{_TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}"
        tmp.mkdir()
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
        _fsync_dir(tmp)
        if final.exists():  # not named by `latest`, so moving it away is safe at any moment
            os.replace(final, ckpts / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(tmp, final)
        _fsync_dir(ckpts)
    _write_latest(run_dir, final)
    _prune(ckpts, keep=keep, current=final)
    for old in ckpts.glob(f"{_TMP_PREFIX}old-*"):
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_latest(run_dir: Path, final: Path) -> None:
    tmp = run_dir / f"{_TMP_PREFIX}{LATEST_FILE}-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{CHECKPOINTS_DIR}/{final.name}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / LATEST_FILE)
    _fsync_dir(run_dir)


def _prune(ckpts: Path, *, keep: int, current: Path) -> None:
    dirs = sorted(p for p in ckpts.glob("step_*") if p.is_dir())
    for old in dirs[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def clear_run(run_dir: str | Path) -> None:
    """Remove the checkpoints and `latest` of a run folder (used to start a run over)."""
    run_dir = Path(run_dir)
    (run_dir / LATEST_FILE).unlink(missing_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# finding and loading


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint folder `run_dir/latest` points at, or None when the run has none."""
    pointer = Path(run_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    target = Path(run_dir) / pointer.read_text().strip()
    if not (target / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{pointer} points at {target}, which holds no {WEIGHTS_FILE}")
    return target


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder for a run folder, a checkpoint folder or a weights file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    if path.is_file():
        if path.name == LATEST_FILE:
            path = path.parent
        elif path.suffix == ".safetensors":
            return path.parent
        else:
            raise CheckpointError(
                f"checkpoint file {str(path)!r} is not a .safetensors file; give a run folder, "
                "a checkpoint folder or its model.safetensors"
            )
    if (path / WEIGHTS_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"no checkpoint in {str(path)!r}: expected a run folder with a '{LATEST_FILE}' file "
            f"or a checkpoint folder with {WEIGHTS_FILE}"
        )
    return found


def _read_weights(
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


def read_configs(ckpt_dir: Path, meta: dict[str, str]) -> tuple[ModelConfig, TrainConfig | None]:
    """The configs of a checkpoint: config.json, or the weights' metadata when it is missing."""
    cfg_file = ckpt_dir / CONFIG_FILE
    try:
        text = cfg_file.read_text() if cfg_file.is_file() else meta["demask_config"]
        return configs_from_json(text)
    except (KeyError, ValueError, TypeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} has no valid config: {msg}") from None


def read_state(ckpt_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The training state (state.pt) of a checkpoint folder."""
    path = Path(ckpt_dir) / STATE_FILE
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} has no {STATE_FILE}") from None
    except Exception as err:  # torch.load raises many kinds on a truncated file
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{str(path)!r} is corrupt or unreadable: {msg}") from None


def load_checkpoint(
    path: str | Path,
    *,
    kind: str | None = None,
    map_location: str | torch.device = "cpu",
    with_state: bool = False,
) -> Checkpoint:
    """Rebuild the model of a checkpoint from the checkpoint alone.

    path: a run folder (its `latest` checkpoint), a checkpoint folder, or a model.safetensors file.
    kind: when given, the checkpoint must hold this model kind ("masked" | "autoregressive").
    with_state: also read state.pt (optimiser and RNG states) into `Checkpoint.state`.
    Raises CheckpointError (a ValueError, one line) when the checkpoint is missing, corrupt or of
    another kind. The model is returned in eval mode on `map_location`.
    """
    ckpt_dir = resolve_checkpoint(path)
    weights, meta = _read_weights(ckpt_dir / WEIGHTS_FILE)
    model_config, train_config = read_configs(ckpt_dir, meta)
    if kind is not None and model_config.kind != kind:
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} holds a {model_config.kind!r} model, expected {kind!r}"
        )
    model = build_model(model_config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} does not match its config: {first}"
        ) from None
    model.to(map_location).eval()
    state = read_state(ckpt_dir, map_location) if with_state else None
    step = int(meta.get("demask_step", state["step"] if state else -1))
    return Checkpoint(model, model_config, train_config, step, ckpt_dir, state)


def checkpoint_configs(path: str | Path) -> tuple[ModelConfig, TrainConfig | None, int]:
    """(model config, train config, step) of a checkpoint, without building the model; e.g. for
    `demask train --resume`, which starts from the saved configs and overrides a few fields."""
    ckpt_dir = resolve_checkpoint(path)
    _, meta = _read_weights(ckpt_dir / WEIGHTS_FILE, tensors_too=False)
    model_config, train_config = read_configs(ckpt_dir, meta)
    return model_config, train_config, int(meta.get("demask_step", -1))


# ----------------------------------------------------------------------------------------------
# training state: full (unsharded) state dicts, so any world size can resume any checkpoint


def save_training_state(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    model_config: ModelConfig,
    train_config: TrainConfig,
    info: DistInfo,
) -> Path | None:
    """Gather the full model and optimiser state (a collective under FSDP2: every rank calls
    this) and let rank 0 write the checkpoint. Returns its folder on rank 0, None elsewhere."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd: dict[str, Any] = get_model_state_dict(model, options=full)  # type: ignore[assignment]
    osd = get_optimizer_state_dict(model, optimizer, options=full)
    path = None
    if info.is_main:
        extra = {"optimizer": osd, "rng": rng_state(), "world_size": info.world_size}
        path = save_checkpoint(run_dir, step=step, model_state=msd, model_config=model_config,
                               train_config=train_config, train_state=extra,
                               keep=train_config.keep_checkpoints)  # fmt: skip
    barrier(info)
    return path


def restore_training_state(
    ckpt_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo
) -> int:
    """Load weights and optimiser state saved by `save_training_state` into `model` (possibly
    DDP-replicated or FSDP2-sharded, any world size): rank 0 reads the files and broadcasts.
    Returns the checkpoint's step."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = read_state(ckpt_dir) if info.is_main else {}
    weights: dict[str, Any] = load_file(str(Path(ckpt_dir) / WEIGHTS_FILE)) if info.is_main else {}
    load = StateDictOptions(full_state_dict=True, broadcast_from_rank0=info.distributed)
    set_model_state_dict(model, weights, options=load)
    set_optimizer_state_dict(model, optimizer, state.get("optimizer", {}), options=load)
    if info.is_main and "rng" in state:
        set_rng_state(state["rng"])
    return int(broadcast_object(state.get("step"), info))


def plan_run(
    run_dir: str | Path, model_config: ModelConfig, *, resume: bool, overwrite: bool
) -> Path | None:
    """Decide how a training run starts in `run_dir`: the checkpoint folder to resume from, or
    None to start fresh. Raises CheckpointError (nothing to resume, model config differs from the
    saved one, broken `latest`) or FileExistsError (a checkpoint is there and neither resume nor
    overwrite was asked: it is never overwritten silently)."""
    found = latest_checkpoint(run_dir)
    if resume:
        if found is None:
            raise CheckpointError(f"resume=True but {str(run_dir)!r} holds no checkpoint to resume")
        saved, _ = read_configs(found, {})
        diff = {k: (v, getattr(model_config, k)) for k, v in saved.to_dict().items()
                if getattr(model_config, k) != v}  # fmt: skip
        if diff:
            raise CheckpointError(
                f"model config differs from the checkpoint in {str(found)!r}: (saved, given) {diff}"
            )
        return found
    if found is not None and not overwrite:
        raise FileExistsError(
            f"out {str(run_dir)!r} already holds a checkpoint ({found.name}); resume it "
            "(resume=True) or start over (overwrite=True), or pick another folder"
        )
    return None
