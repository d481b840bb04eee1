"""The training loop: AdamW, warm-up + cosine LR, clipping, checkpoints, validation, DDP / FSDP2.

`train` does, in this order:
  1. read the data and check it against the model config (`_load_data`);
  2. build the `TrainState`: weights from `seed`, compiled / data-parallel, AdamW (`build_state`);
  3. lock the run folder and plan the start: fresh, resume, or refuse (`start_run`, read only);
  4. on resume, restore the checkpoint into the state (`restore_training_state`);
  5. loop (`_loop`): `train_step(state, batch)` per update, then the records, validation and
     checkpoints. The first record or checkpoint is the first change to the folder (`RunLog`), so
     a start that fails at any point, even for lack of memory in the first step, changes nothing.

Reproducibility and exact resume come from one mechanism: every random choice is a function of
(seed, step). The weights are initialised from `seed`; the batch of update s is
`demask.data.get_batch(ds, s, batch_size, seed, rank, world_size)`; the model's own randomness in
update s (masking times, BERT replacement, self-conditioning, dropout) comes from torch's RNG
seeded from (seed, s, rank) for that forward only (`model_step_seed`; the caller's RNG state is
given back); the LR is `lr_at(s)`. So a checkpoint holds no RNG state, a run resumed from the
checkpoint of step s repeats, loss for loss, what the uninterrupted run did, and two ranks with
batch b see exactly the examples one process with batch 2b sees.

Faults: a NaN/inf loss or gradient norm is caught before the update (all ranks agree through one
all-reduce per step); `nan_policy="stop"` raises NonFiniteLossError naming the step and the batch,
`"skip"` drops that update. Checkpoints refuse non-finite weights. SIGTERM / Ctrl-C (SIGINT) end
the run after the current step with a checkpoint; a second Ctrl-C aborts at once. The run
folder's rules (one writer, never clearing files demask did not write) are `demask.runfolder`'s.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from demask import distributed as dd
from demask._checks import check_int
from demask.config import ModelConfig, TrainConfig
from demask.data import batch_indices, get_batch, get_dataset
from demask.evaluate import likelihood_bits_per_token
from demask.runfolder import RunLock
from demask.runlog import Callback, RunLog
from demask.training_state import (
    TrainState,
    build_state,
    restore_training_state,
    save_training_state,
    seeded,
    start_run,
)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf (nan_policy="stop")."""


class RunStatus(str, Enum):
    """How a `train` invocation ended."""

    FINISHED = "finished"  # all train_cfg.max_steps done
    INTERRUPTED = "interrupted"  # SIGTERM / Ctrl-C
    STOPPED = "stopped"  # stop_after

    def __str__(self) -> str:
        return self.value


class StepStatus(str, Enum):
    """What `train_step` did; the value of a skipped update names what was not finite."""

    UPDATED = "updated"
    NONFINITE_LOSS = "loss"  # on some rank: update skipped
    NONFINITE_GRAD = "gradient norm"  # update skipped
    STOPPED = "stopped"  # some rank was asked to stop: nothing done, state.step unchanged

    def __str__(self) -> str:
        return self.value


@dataclass
class StepMetrics:
    """What `train_step` returns."""

    status: StepStatus
    lr: float
    loss: float = math.nan  # mean over ranks; nan unless UPDATED
    grad_norm: float = math.nan  # after synchronisation, before clipping
    own_loss: float = math.nan  # this rank's loss (to report a non-finite one)
    here: bool = False  # the non-finite loss was this rank's


@dataclass
class TrainResult:
    """What `train` did in this invocation."""

    step: int  # the last completed step
    status: RunStatus
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (mean over ranks)
    val: dict[int, float] = field(default_factory=dict)  # step -> validation bits per token
    skipped: list[int] = field(default_factory=list)  # steps whose update was dropped (NaN/inf)
    checkpoint: Path | None = None  # the last checkpoint written


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update `step` (1-based): linear warm-up to cfg.lr over warmup_steps, then
    cosine decay to cfg.lr * min_lr_ratio at step cfg.max_steps (Loshchilov & Hutter 2017,
    https://arxiv.org/abs/1608.03983, without restarts)."""
    check_int("step", step, min=1)
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def model_step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the model's own randomness at (seed, step, rank); 63 bits from numpy SeedSequence."""
    state = np.random.SeedSequence([seed, step, rank, 0x6D61736B]).generate_state(1, np.uint64)
    return int(state[0]) & (2**63 - 1)


def forward_loss(module: nn.Module, batch: Tensor) -> Tensor:
    """The one call into the model: the wrapper's forward on a (B, N) batch returns its training
    loss, a scalar tensor or a `Losses(loss, ...)`."""
    out = module(batch)
    loss = getattr(out, "loss", out)
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise TypeError(f"the model's forward must return a scalar loss, got {type(out).__name__}")
    return loss


def train_step(state: TrainState, batch: Tensor, *, stop: bool = False) -> StepMetrics:
    """Update number `state.step + 1` of `state` on `batch`, this rank's (B, N) rows.

    Sets the update's LR, runs the forward with the update's seeded RNG, and lets the ranks agree
    in one all-reduce on the mean loss, any non-finite loss and any `stop` (this process was asked
    to stop). A stop leaves everything as it was; a non-finite loss or gradient norm advances
    `state.step` without updating the weights (the caller decides whether that ends the run)."""
    cfg, info, dev = state.train_config, state.info, state.info.device
    s = state.step + 1
    lr = lr_at(s, cfg)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    with seeded(model_step_seed(cfg.seed, s, info.rank), dev), autocast:
        loss = forward_loss(state.module, batch.to(dev))
    own = loss.detach().double()
    finite = torch.isfinite(own)
    stop_t = torch.tensor(float(stop), dtype=torch.float64, device=dev)
    agg = torch.stack([torch.where(finite, own, 0.0), (~finite).double(), stop_t])
    loss_sum, n_bad, n_stop = dd.all_reduce_sum(agg, info).tolist()  # one host sync per step
    if n_stop > 0:  # SIGTERM / Ctrl-C on some rank: leave before this update
        return StepMetrics(StepStatus.STOPPED, lr)
    state.step = s
    if n_bad > 0:
        state.optimizer.zero_grad(set_to_none=True)
        return StepMetrics(
            StepStatus.NONFINITE_LOSS, lr, own_loss=float(own), here=not bool(finite)
        )
    loss.backward()
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not math.isfinite(grad_norm):  # the same on every rank: gradients are synchronised
        state.optimizer.zero_grad(set_to_none=True)
        status = StepStatus.NONFINITE_GRAD
        return StepMetrics(status, lr, grad_norm=grad_norm, own_loss=float(own), here=True)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return StepMetrics(StepStatus.UPDATED, lr, loss_sum / info.world_size, grad_norm, float(own))


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
    stop_after: int | None = None,
) -> TrainResult:
    """Train `model_cfg` on `train_cfg.data` into the run folder `train_cfg.out`.

    resume: continue from the run folder's latest checkpoint (the model config must match; the
    train config may differ, e.g. more steps). overwrite: start over in a folder that holds a
    checkpoint (otherwise FileExistsError). callbacks: called on rank 0 with every metrics record.
    stop_after: end this invocation after that step with a checkpoint (status "stopped"), as if
    interrupted; the LR schedule still spans train_cfg.max_steps.
    Under torchrun every process calls this; the process group is joined (and left) here.
    Raises NonFiniteLossError on a NaN/inf with nan_policy="stop".
    """
    if not isinstance(model_cfg, ModelConfig) or not isinstance(train_cfg, TrainConfig):
        raise TypeError("train(model_cfg, train_cfg) needs a ModelConfig and a TrainConfig")
    if stop_after is not None:
        check_int("stop_after", stop_after, min=1)
    info = dd.setup(train_cfg.device)
    lock: RunLock | None = None
    log: RunLog | None = None
    try:
        data = _load_data(model_cfg, train_cfg)
        state = build_state(model_cfg, train_cfg, info)
        out = Path(train_cfg.out)
        ckpt, lock = start_run(
            out, model_cfg, resume=resume, overwrite=overwrite, info=info,
            optimizer=train_cfg.optimizer,
        )  # fmt: skip
        if ckpt is not None:
            restore_training_state(ckpt, state)
            if state.step > train_cfg.max_steps:
                raise ValueError(
                    f"steps must be >= the step of the checkpoint resumed ({state.step}, in "
                    f"{ckpt}), got {train_cfg.max_steps}"
                )
        log = RunLog(
            (model_cfg, train_cfg),
            info,
            start=state.step,
            resumed=ckpt is not None,
            callbacks=callbacks,
        )
        try:
            return _loop(state, data, log, stop_after)
        finally:
            log.close()
    finally:
        if lock is not None:  # a run that never wrote removes the folders its lock created
            lock.release(remove_created=log is None or not log.started)
        dd.teardown(info)


@dataclass(frozen=True)
class _Data:
    train: Any  # a dataset: len(), ds[i] -> (N,) long
    val: Any


def _load_data(model_cfg: ModelConfig, cfg: TrainConfig) -> _Data:
    kw = {"seq_len": model_cfg.seq_len, "max_bytes": cfg.data_max_bytes}
    train_ds, val_ds = get_dataset(cfg.data, "train", **kw), get_dataset(cfg.data, "val", **kw)
    vocab = train_ds.tokenizer.vocab_size
    if vocab > model_cfg.num_tokens:
        raise ValueError(
            f"num_tokens must be >= the data's vocabulary {vocab}, got {model_cfg.num_tokens}"
        )
    return _Data(train_ds, val_ds)


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, bool]]:
    """SIGTERM / SIGINT set flag["stop"]; a second SIGINT raises KeyboardInterrupt at once."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _loop(state: TrainState, data: _Data, log: RunLog, stop_after: int | None) -> TrainResult:
    """Updates state.step + 1 .. cfg.max_steps, with records, validation and checkpoints."""
    cfg, info = state.train_config, state.info
    res = TrainResult(step=state.step, status=RunStatus.FINISHED)
    saved = -1
    state.model.train()
    with _stop_on_signals() as flag:
        while state.step < cfg.max_steps:
            s = state.step + 1
            batch = get_batch(data.train, s, cfg.batch_size, cfg.seed, info.rank, info.world_size)
            m = train_step(state, batch, stop=flag["stop"])
            if m.status is StepStatus.STOPPED:
                res.status = RunStatus.INTERRUPTED
                break
            if m.status is StepStatus.UPDATED:
                res.losses[s] = m.loss
            else:
                _skip(state, data, log, m)  # raises with nan_policy "stop"
                res.skipped.append(s)
            res.step = s
            log.update(s, m.loss, m.grad_norm, m.lr)
            if cfg.val_every and s % cfg.val_every == 0 and s != cfg.max_steps:
                _validate(state, data, log, res)
            if s == stop_after:
                res.status = RunStatus.STOPPED
                break
            if cfg.checkpoint_every and s % cfg.checkpoint_every == 0 and s != cfg.max_steps:
                saved = _save(state, log, res)
    if res.status is RunStatus.FINISHED:
        _validate(state, data, log, res)
    elif res.status is RunStatus.INTERRUPTED:
        log.say(f"interrupted: saving the checkpoint of step {res.step}", always=True)
    if res.step > 0 and saved != res.step:
        _save(state, log, res)
    return res


def _save(state: TrainState, log: RunLog, res: TrainResult) -> int:
    log.begin()
    path = save_training_state(state.train_config.out, state)
    res.checkpoint = path
    log.write({"type": "checkpoint", "step": state.step, "path": str(path)})
    return state.step


def _validate(state: TrainState, data: _Data, log: RunLog, res: TrainResult) -> None:
    cfg, info = state.train_config, state.info
    bits = likelihood_bits_per_token(
        state.model,
        data.val,
        cfg.batch_size,
        cfg.val_batches * info.world_size,  # the same examples for any world size
        info.rank,
        info.world_size,
        seed=cfg.seed,
        num_times=cfg.val_num_times,
    )
    res.val[state.step] = bits
    log.write({"type": "val", "step": state.step, "val_bits_per_token": bits})
    log.say(f"step {state.step}: val {bits:.4f} bits/token")


def _skip(state: TrainState, data: _Data, log: RunLog, m: StepMetrics) -> None:
    """Report the non-finite loss or gradient norm of update state.step; raise NonFiniteLossError
    (nan_policy "stop") or let the loop go on without that update ("skip")."""
    cfg, info, s = state.train_config, state.info, state.step
    idx = batch_indices(len(data.train), s, cfg.batch_size, cfg.seed, info.rank, info.world_size)
    where = "on another rank"
    if m.here:
        where = (
            f"on rank {info.rank} (loss {m.own_loss}), batch = train examples "
            f"{idx.tolist()[:16]} = get_batch(step={s}, seed={cfg.seed}, rank={info.rank}, "
            f"world_size={info.world_size})"
        )
    msg = f"non-finite {m.status} at step {s} {where}"
    record = {"type": "nonfinite", "step": s, "what": str(m.status), "action": cfg.nan_policy}
    log.write({**record, "batch_indices": idx.tolist()})
    if cfg.nan_policy == "stop":
        raise NonFiniteLossError(msg + "; stopping without a checkpoint (nan_policy='stop')")
    log.say(msg + "; update skipped")
