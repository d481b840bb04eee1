"""The training loop: AdamW, warm-up + cosine LR, clipping, checkpoints, validation, DDP / FSDP2.

Reproducibility and exact resume: the weights are initialised from `seed`; the batch of step s is
`demask.data.get_batch(ds, s, batch_size, seed, rank, world_size)` (a pure function); the model's
own randomness at step s (masking times, BERT replacement, self-conditioning) is seeded from
(seed, step, rank) before the forward; the LR is a pure function of the step (`lr_at`). So a run
resumed from the checkpoint of step s repeats, loss for loss, what the uninterrupted run did, and
two ranks with batch b see exactly the examples one process with batch 2b sees.

Weight decay rule: only the weight matrices of `nn.Linear` layers decay; biases, norm gains and
embeddings (token and position, including a Linear weight tied to an embedding) do not.

Faults: a NaN/inf loss or gradient norm is caught before the update (all ranks agree through one
all-reduce per step); `nan_policy="stop"` raises NonFiniteLossError naming the step and the batch,
`"skip"` drops that update. Checkpoints refuse non-finite weights. SIGTERM / Ctrl-C (SIGINT) end
the run after the current step with a checkpoint; a second Ctrl-C aborts at once.

The run folder (see `demask.runfolder`): locked for one writer; a fresh run never clears a folder
holding files demask did not write or a `step_*` unless `overwrite`; and the folder is changed
only after everything was built and the first step ran (`_Run.commit`).
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from demask import distributed as dd
from demask._checks import check_int
from demask.config import ModelConfig, TrainConfig, build_model, save_configs
from demask.data import batch_indices, get_batch, get_dataset
from demask.evaluate import likelihood_bits_per_token
from demask.runfolder import (
    METRICS_FILE,
    RunLock,
    atomic_write_text,
    clear_run,
    read_metrics,
    write_error,
)
from demask.training_state import restore_training_state, save_training_state, start_run

Callback = Callable[[dict[str, Any]], None]


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf (nan_policy="stop")."""


@dataclass
class TrainResult:
    """What `train` did in this invocation."""

    step: int  # the last completed step
    status: str  # "finished" | "interrupted" (signal) | "stopped" (stop_after)
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (mean over ranks)
    val: dict[int, float] = field(default_factory=dict)  # step -> validation bits per token
    skipped: list[int] = field(default_factory=list)  # steps whose update was dropped (NaN/inf)
    checkpoint: Path | None = None  # the last checkpoint written


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update `step` (1-based): linear warm-up to cfg.lr over warmup_steps, then
    cosine decay to cfg.lr * min_lr_ratio at step cfg.steps (Loshchilov & Hutter 2017,
    https://arxiv.org/abs/1608.03983, without restarts)."""
    check_int("step", step, min=1)
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: nn.Linear weight matrices decay; everything else (biases, norms, embeddings,
    and a Linear weight tied to an embedding) does not."""
    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for p in model.parameters():  # each shared parameter once
        if p.requires_grad:
            (decay if id(p) in linear and id(p) not in emb else rest).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


def model_step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the model's own randomness at (seed, step, rank); 63 bits from numpy SeedSequence."""
    state = np.random.SeedSequence([seed, step, rank, 0x6D61736B]).generate_state(1, np.uint64)
    return int(state[0]) & (2**63 - 1)


def _scalar_loss(out: Any) -> Tensor:
    loss = getattr(out, "loss", out)  # Losses(loss, ...) of a masked wrapper, or a tensor
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise TypeError(f"the model's forward must return a scalar loss, got {type(out).__name__}")
    return loss


@contextmanager
def _stop_on_signals(flag: dict[str, bool]):
    """SIGTERM / SIGINT set flag["stop"]; a second SIGINT raises KeyboardInterrupt at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _Metrics:
    """metrics.jsonl on rank 0: one JSON record per line; also passed to the callbacks.

    Nothing is written before `begin` (called by the first write): the log of a run that fails
    to start is left as it was."""

    def __init__(self, path: Path | None, callbacks: Sequence[Callback], keep_upto: int | None,
                 begin: Callable[[], None]):  # fmt: skip
        self.path, self.callbacks, self.begin = path, list(callbacks), begin
        self.kept: list[str] = []
        self.torn = False
        if path is not None and keep_upto is not None and path.is_file():  # resume
            self.kept, self.torn = read_metrics(path, keep_upto)

    def start(self) -> None:
        """Replace the log with the kept records (those of the run so far on resume)."""
        if self.path is not None:
            atomic_write_text(self.path, "".join(r + "\n" for r in self.kept))

    def write(self, record: dict[str, Any]) -> None:
        self.begin()
        if self.path is None:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise write_error(self.path, err) from None
        for cb in self.callbacks:
            cb(record)


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
    interrupted; the LR schedule still spans train_cfg.steps.
    Under torchrun every process calls this; the process group is joined (and left) here.
    Raises NonFiniteLossError on a NaN/inf with nan_policy="stop".
    """
    if not isinstance(model_cfg, ModelConfig) or not isinstance(train_cfg, TrainConfig):
        raise TypeError("train(model_cfg, train_cfg) needs a ModelConfig and a TrainConfig")
    if stop_after is not None:
        check_int("stop_after", stop_after, min=1)
    info = dd.setup(train_cfg.device)
    try:
        run = _Run(model_cfg, train_cfg, info, callbacks)
        try:
            run.open(resume, overwrite)
            return run.loop(stop_after)
        finally:
            run.close()
    finally:
        dd.teardown(info)


class _Run:
    """One invocation of `train`: the model, optimiser, data and logs of this process.

    Order: everything is validated and built first (data, model, optimiser), then the run folder
    is locked and the start planned (read only), the checkpoint restored, and only at the first
    write (a metrics record or a checkpoint, after the first step ran) is the folder changed
    (`commit`): a start that fails, even for lack of memory in the first step, changes nothing.
    """

    def __init__(self, model_cfg, train_cfg, info, callbacks) -> None:
        self.mcfg, self.cfg, self.info, self.callbacks = model_cfg, train_cfg, info, callbacks
        cfg = train_cfg
        kw = {"seq_len": model_cfg.seq_len, "max_bytes": cfg.data_max_bytes}
        self.train_ds = get_dataset(cfg.data, "train", **kw)
        self.val_ds = get_dataset(cfg.data, "val", **kw)
        vocab = self.train_ds.tokenizer.vocab_size
        if vocab > model_cfg.num_tokens:
            raise ValueError(
                f"num_tokens must be >= the data's vocabulary {vocab}, got {model_cfg.num_tokens}"
            )
        torch.manual_seed(cfg.seed)
        self.model = build_model(model_cfg).to(info.device)
        self.module = dd.parallelize(self.model, info, compile=cfg.compile, fsdp=cfg.fsdp,
                                     find_unused_parameters=model_cfg.self_cond)  # fmt: skip
        groups = param_groups(self.model, cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.lock: RunLock | None = None
        self.committed = False

    def open(self, resume: bool, overwrite: bool) -> None:
        """Lock the run folder, plan the start and restore the checkpoint (nothing written)."""
        cfg, info, out = self.cfg, self.info, Path(self.cfg.out)
        self.ckpt, self.lock = start_run(
            out, self.mcfg, resume=resume, overwrite=overwrite, info=info
        )
        ckpt = self.ckpt
        start = (
            0 if ckpt is None else restore_training_state(ckpt, self.model, self.optimizer, info)
        )
        if start > cfg.steps:
            raise ValueError(
                f"steps must be >= the step of the checkpoint resumed ({start}, in {ckpt}), got "
                f"{cfg.steps}"
            )
        path = out / METRICS_FILE if info.is_main else None
        keep = None if ckpt is None else start
        self.metrics = _Metrics(path, self.callbacks, keep_upto=keep, begin=self.commit)
        self.result = TrainResult(step=start, status="finished")
        self.tty = sys.stderr.isatty()
        from tqdm.auto import tqdm

        show = info.is_main and cfg.progress and self.tty
        self.bar = tqdm(total=cfg.steps, initial=start, disable=not show, unit="step",
                        dynamic_ncols=True)  # fmt: skip
        if self.metrics.torn:
            self.say(f"{path}: dropping its torn last line (a write cut short)", always=True)

    def commit(self) -> None:
        """The first change to the run folder: clear an old run (fresh start), write config.json
        and the metrics log so far. Called once, before the first record or checkpoint."""
        if self.committed:
            return
        self.committed = True
        if self.info.is_main:
            out = Path(self.cfg.out)
            if self.ckpt is None:
                clear_run(out)
            save_configs(out / "config.json", self.mcfg, self.cfg)
            self.metrics.start()

    def close(self) -> None:
        """Release the lock; a run that never wrote removes the folders its lock created."""
        if self.lock is not None:
            self.lock.release(remove_created=not self.committed)
            self.lock = None

    def say(self, text: str, always: bool = False) -> None:
        if self.info.is_main and (self.cfg.progress or always):
            if self.tty:
                self.bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr, flush=True)

    def save(self, step: int) -> None:
        self.commit()
        path = save_training_state(self.cfg.out, self.model, self.optimizer, step=step,
                                   model_config=self.mcfg, train_config=self.cfg, info=self.info)  # fmt: skip
        self.result.checkpoint, self.saved_step = path, step
        self.metrics.write({"type": "checkpoint", "step": step, "path": str(path)})

    def validate(self, step: int) -> None:
        info, cfg = self.info, self.cfg
        bits = likelihood_bits_per_token(
            self.model, self.val_ds, cfg.batch_size,
            cfg.val_batches * info.world_size,  # the same examples for any world size
            info.rank, info.world_size, seed=cfg.seed, num_times=cfg.val_num_times,
        )  # fmt: skip
        self.result.val[step] = bits
        self.metrics.write({"type": "val", "step": step, "val_bits_per_token": bits})
        self.say(f"step {step}: val {bits:.4f} bits/token")

    def nonfinite(self, s: int, what: str, own_loss: float, here: bool) -> None:
        """Report a NaN/inf at step s; raise (stop) or record the skipped update."""
        cfg, info = self.cfg, self.info
        idx = batch_indices(len(self.train_ds), s, cfg.batch_size, cfg.seed, info.rank,
                            info.world_size).tolist()  # fmt: skip
        where = "on another rank"
        if here:
            where = (f"on rank {info.rank} (loss {own_loss}), batch = train examples {idx[:16]} = "
                     f"get_batch(step={s}, seed={cfg.seed}, rank={info.rank}, "
                     f"world_size={info.world_size})")  # fmt: skip
        msg = f"non-finite {what} at step {s} {where}"
        self.metrics.write({"type": "nonfinite", "step": s, "what": what,
                            "action": cfg.nan_policy, "batch_indices": idx})  # fmt: skip
        if cfg.nan_policy == "stop":
            raise NonFiniteLossError(msg + "; stopping without a checkpoint (nan_policy='stop')")
        self.say(msg + "; update skipped")
        self.result.skipped.append(s)

    def step(self, s: int, stop: bool) -> tuple[float, float] | None:
        """Update number s. Returns (mean loss over ranks or nan, grad norm), None to stop."""
        cfg, info, dev = self.cfg, self.info, self.info.device
        lr = lr_at(s, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = get_batch(self.train_ds, s, cfg.batch_size, cfg.seed, info.rank, info.world_size)
        seed = model_step_seed(cfg.seed, s, info.rank)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        with torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext():
            loss = _scalar_loss(self.module(x.to(dev)))  # scalar
        own = loss.detach().double()
        finite = torch.isfinite(own)
        # ONE all-reduce (and one host sync) per step: [sum of losses, #bad losses, #stop asks]
        agg = torch.stack([torch.where(finite, own, 0.0), (~finite).double(),
                           torch.tensor(float(stop), dtype=torch.float64, device=dev)])  # fmt: skip
        loss_sum, n_bad, n_stop = dd.all_reduce_sum(agg, info).tolist()
        if n_stop > 0:  # SIGTERM / Ctrl-C on some rank: leave before this update
            return None
        if n_bad > 0:
            self.nonfinite(s, "loss", float(own), here=not bool(finite))
            self.optimizer.zero_grad(set_to_none=True)
            return math.nan, math.nan
        loss.backward()
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(grad_norm):  # the same on every rank: gradients are synchronised
            self.nonfinite(s, "gradient norm", float(own), here=True)
            self.optimizer.zero_grad(set_to_none=True)
            return math.nan, grad_norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / info.world_size, grad_norm

    def loop(self, stop_after: int | None) -> TrainResult:
        cfg, res = self.cfg, self.result
        tokens_per_step = cfg.batch_size * self.info.world_size * self.mcfg.seq_len
        flag = {"stop": False}
        t_last, since, self.saved_step = time.perf_counter(), 0, -1
        self.model.train()
        with _stop_on_signals(flag), self.bar:
            for s in range(res.step + 1, cfg.steps + 1):
                out = self.step(s, flag["stop"])
                if out is None:
                    res.status = "interrupted"
                    break
                loss, grad_norm = out
                res.step = s
                if math.isfinite(loss):
                    res.losses[s] = loss
                since += 1
                self.bar.update(1)
                if s % cfg.log_every == 0 or s == cfg.steps:
                    now = time.perf_counter()
                    tps = tokens_per_step * since / max(now - t_last, 1e-9)
                    t_last, since = now, 0
                    self.metrics.write({"type": "train", "step": s,
                                        "loss": loss if math.isfinite(loss) else None,
                                        "lr": lr_at(s, cfg), "tokens_per_s": tps,
                                        "grad_norm": grad_norm if math.isfinite(grad_norm) else None})  # fmt: skip
                    self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
                if cfg.val_every and s % cfg.val_every == 0 and s != cfg.steps:
                    self.validate(s)
                if s == stop_after:
                    res.status = "stopped"
                    break
                if cfg.checkpoint_every and s % cfg.checkpoint_every == 0 and s != cfg.steps:
                    self.save(s)
        if res.status == "finished":
            self.validate(res.step)
        if res.status == "interrupted":
            self.say(f"interrupted: saving the checkpoint of step {res.step}", always=True)
        if res.step > 0 and self.saved_step != res.step:
            self.save(res.step)
        return res
