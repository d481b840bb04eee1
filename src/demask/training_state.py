"""Training state: the full model and optimiser state of a (possibly distributed) run saved as a
checkpoint, restored into any world size, and how a run starts in its folder (`plan_run`).

The files and their atomicity are `demask.checkpoint`'s; the run folder's rules (what demask
owns, the lock) are `demask.runfolder`'s.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from demask.checkpoint import (
    CheckpointError,
    check_weights,
    read_configs,
    read_state,
    read_weights,
    save_checkpoint,
)
from demask.config import ModelConfig, TrainConfig
from demask.distributed import DistInfo, barrier, broadcast_object
from demask.runfolder import (
    STATE_FILE,
    WEIGHTS_FILE,
    RunLock,
    check_fresh_start,
    latest_checkpoint,
)


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


# full (unsharded) state dicts, so any world size can resume any checkpoint


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

    state: dict[str, Any] = {}
    weights: dict[str, Any] = {}
    problem = None
    if info.is_main:
        try:
            state = read_state(ckpt_dir)
            weights, _ = read_weights(Path(ckpt_dir) / WEIGHTS_FILE)
            check_weights(model, weights, Path(ckpt_dir) / WEIGHTS_FILE)
        except CheckpointError as err:
            problem = err
    problem = broadcast_object(problem, info)  # every rank raises, none waits for the others
    if problem is not None:
        raise problem
    load = StateDictOptions(full_state_dict=True, broadcast_from_rank0=info.distributed)
    set_model_state_dict(model, weights, options=load)
    try:
        set_optimizer_state_dict(model, optimizer, state.get("optimizer", {}), options=load)
        _check_optimizer_state(optimizer)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{str(Path(ckpt_dir) / STATE_FILE)!r} holds optimiser state that does not fit this "
            f"model ({msg}); expected the state saved with these weights"
        ) from None
    if info.is_main and "rng" in state:
        set_rng_state(state["rng"])
    return int(broadcast_object(state.get("step"), info))


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Every per-parameter tensor of the loaded optimiser state (e.g. AdamW's moments) must have
    its parameter's shape: the state of another model would fail only at the first update."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor) and value.ndim > 0 and value.shape != p.shape:
                    raise ValueError(
                        f"{name} has shape {tuple(value.shape)} for a parameter of shape "
                        f"{tuple(p.shape)}"
                    )


def plan_run(
    run_dir: str | Path, model_config: ModelConfig, *, resume: bool, overwrite: bool
) -> Path | None:
    """Decide how a training run starts in `run_dir`: the checkpoint folder to resume from, or
    None to start fresh. Raises CheckpointError (nothing to resume, model config differs from the
    saved one, broken `latest`) or FileExistsError (a checkpoint is there and neither resume nor
    overwrite was asked: it is never overwritten silently; or the folder holds files demask did not
    write, or an incomplete `step_*`)."""
    if overwrite and not resume:
        check_fresh_start(run_dir, overwrite=True)
        return None
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
    check_fresh_start(run_dir, overwrite=overwrite)  # nothing demask did not write, no step_*
    return None


def start_run(
    out: Path, cfg: ModelConfig, *, resume: bool, overwrite: bool, info: DistInfo
) -> tuple[Path | None, RunLock | None]:
    """Rank 0 locks the run folder and decides (plan_run) and tells the others, so all ranks raise
    the same error. Nothing is written but the lock (and the folder for it, removed again when
    this raises). Returns (checkpoint folder to resume or None, the lock on rank 0 or None)."""
    outcome: Any = None
    lock: RunLock | None = None
    if info.is_main:
        try:
            lock = RunLock(out).acquire()
            outcome = ("ok", plan_run(out, cfg, resume=resume, overwrite=overwrite))
        except (ValueError, OSError) as err:
            if lock is not None:
                lock.release(remove_created=True)
            outcome = ("error", err)
    kind, value = broadcast_object(outcome, info)
    if kind != "ok":
        raise value
    return value, lock
