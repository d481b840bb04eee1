"""The state of a training run, `TrainState` (model, optimiser, step): built from the configs,
saved as a checkpoint and restored into any world size; and how a run starts in its folder
(`plan_run`, `start_run`).

There is nothing else to save: the learning rate of update s (`demask.train.lr_at`), its batch
(`demask.data.get_batch`) and the model's randomness in it (`demask.train.model_step_seed`) are
pure functions of the configs and s, so `step` is the whole of the LR schedule, the data position
and the RNG state. The files and their atomicity are `demask.checkpoint`'s; the run folder's rules
(what demask owns, the lock) are `demask.runfolder`'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from demask import distributed as dd
from demask.checkpoint import (
    CheckpointError,
    check_weights,
    checkpoint_configs,
    read_state,
    read_weights,
    save_checkpoint,
)
from demask.config import ModelConfig, TrainConfig, build_model
from demask.distributed import DistInfo, barrier, broadcast_object
from demask.optim import build_optimizer
from demask.runfolder import (
    STATE_FILE,
    WEIGHTS_FILE,
    RunLock,
    check_fresh_start,
    latest_checkpoint,
)


@dataclass
class TrainState:
    """What changes while a run trains: the weights, the optimiser state and the step."""

    model: nn.Module  # the wrapper: state dicts, evaluation
    module: nn.Module  # what the training step calls: `model` under DDP / FSDP2 / compile
    optimizer: torch.optim.Optimizer
    model_config: ModelConfig
    train_config: TrainConfig
    info: DistInfo  # this process's rank, world size and device
    step: int = 0  # updates done (skipped ones included)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's global RNG seeded to `seed`; the caller's RNG state (CPU and
    `device`) is given back afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def build_state(model_config: ModelConfig, train_config: TrainConfig, info: DistInfo) -> TrainState:
    """The state of step 0: weights initialised from `train_config.seed`, on `info.device`,
    compiled and data-parallel as asked (`distributed.parallelize`), and the optimiser
    `train_config.optimizer` (`demask.optim`)."""
    cfg = train_config
    with seeded(cfg.seed, info.device):
        model = build_model(model_config).to(info.device)
    module = dd.parallelize(
        model,
        info,
        compile=cfg.compile,
        fsdp=cfg.fsdp,
        find_unused_parameters=model_config.self_cond,
    )
    optimizer = build_optimizer(  # after parallelize: FSDP2 swaps parameters
        cfg.optimizer,
        model,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(cfg.beta1, cfg.beta2),
        momentum=cfg.muon_momentum,
        rms=cfg.muon_rms,
    )
    return TrainState(model, module, optimizer, model_config, train_config, info)


# full (unsharded) state dicts, so any world size can resume any checkpoint


def save_training_state(run_dir: str | Path, state: TrainState) -> Path | None:
    """Gather the full model and optimiser state (a collective under FSDP2: every rank calls
    this) and let rank 0 write the checkpoint of `state.step`. Returns its folder on rank 0, None
    elsewhere."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd: dict[str, Any] = get_model_state_dict(state.model, options=full)  # type: ignore[assignment]
    osd = get_optimizer_state_dict(state.model, state.optimizer, options=full)
    path = None
    if state.info.is_main:
        path = save_checkpoint(
            run_dir,
            step=state.step,
            model_state=msd,
            model_config=state.model_config,
            train_config=state.train_config,
            train_state={"optimizer": osd, "world_size": state.info.world_size},
            keep=state.train_config.keep_checkpoints,
        )
    barrier(state.info)
    return path


def restore_training_state(ckpt_dir: str | Path, state: TrainState) -> None:
    """Load the weights, optimiser state and step saved by `save_training_state` into `state`
    (possibly DDP-replicated or FSDP2-sharded, any world size): rank 0 reads the files and
    broadcasts. RNG states saved by format-1 checkpoints are not needed, and ignored."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    info = state.info
    saved: dict[str, Any] = {}
    weights: dict[str, Any] = {}
    problem = None
    if info.is_main:
        try:
            saved = read_state(ckpt_dir)
            weights, _ = read_weights(Path(ckpt_dir) / WEIGHTS_FILE)
            check_weights(state.model, weights, Path(ckpt_dir) / WEIGHTS_FILE)
        except CheckpointError as err:
            problem = err
    problem = broadcast_object(problem, info)  # every rank raises, none waits for the others
    if problem is not None:
        raise problem
    load = StateDictOptions(full_state_dict=True, broadcast_from_rank0=info.distributed)
    set_model_state_dict(state.model, weights, options=load)
    try:
        optim = saved.get("optimizer", {})
        set_optimizer_state_dict(state.model, state.optimizer, optim, options=load)
        _check_optimizer_state(state.optimizer)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{str(Path(ckpt_dir) / STATE_FILE)!r} holds optimiser state that does not fit this "
            f"model ({msg}); expected the state saved with these weights"
        ) from None
    state.step = int(broadcast_object(saved.get("step"), info))


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
    run_dir: str | Path,
    model_config: ModelConfig,
    *,
    resume: bool,
    overwrite: bool,
    optimizer: str | None = None,
) -> Path | None:
    """Decide how a training run starts in `run_dir`: the checkpoint folder to resume from, or
    None to start fresh. Raises CheckpointError (nothing to resume, model config or `optimizer`
    differs from the saved one, broken `latest`) or FileExistsError (a checkpoint is there and
    neither resume nor overwrite was asked: it is never overwritten silently; or the folder holds
    files demask did not write, or an incomplete `step_*`)."""
    if overwrite and not resume:
        check_fresh_start(run_dir, overwrite=True)
        return None
    found = latest_checkpoint(run_dir)
    if resume:
        if found is None:
            raise CheckpointError(f"resume=True but {str(run_dir)!r} holds no checkpoint to resume")
        saved_model, saved_train, _ = checkpoint_configs(found)
        saved = saved_model.to_dict()
        if optimizer is not None and saved_train is not None and saved_train.optimizer != optimizer:
            raise CheckpointError(
                f"optimizer={optimizer!r}, but the run in {str(found)!r} trained with "
                f"{saved_train.optimizer!r}, whose state cannot carry over; resume with "
                f"optimizer={saved_train.optimizer!r} or start a new run"
            )
        diff = {
            k: (v, getattr(model_config, k))
            for k, v in saved.items()
            if getattr(model_config, k) != v
        }
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
    out: Path,
    cfg: ModelConfig,
    *,
    resume: bool,
    overwrite: bool,
    info: DistInfo,
    optimizer: str | None = None,
) -> tuple[Path | None, RunLock | None]:
    """Rank 0 locks the run folder and decides (plan_run) and tells the others, so all ranks raise
    the same error. Nothing is written but the lock (and the folder for it, removed again when
    this raises). Returns (checkpoint folder to resume or None, the lock on rank 0 or None)."""
    outcome: Any = None
    lock: RunLock | None = None
    if info.is_main:
        try:
            lock = RunLock(out).acquire()
            plan = plan_run(out, cfg, resume=resume, overwrite=overwrite, optimizer=optimizer)
            outcome = ("ok", plan)
        except (ValueError, OSError) as err:
            if lock is not None:
                lock.release(remove_created=True)
            outcome = ("error", err)
    kind, value = broadcast_object(outcome, info)
    if kind != "ok":
        raise value
    return value, lock
