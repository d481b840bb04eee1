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
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from demask import distributed as dd
from demask._checks import check_int
from demask.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    clear_run,
    latest_checkpoint,
    read_configs,
    read_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from demask.config import ModelConfig, TrainConfig, build_model, save_configs
from demask.evaluate import likelihood_bits_per_token

METRICS_FILE = "metrics.jsonl"
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
    decay, rest = [], []
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
    """metrics.jsonl on rank 0: one JSON record per line; also passed to the callbacks."""

    def __init__(self, path: Path | None, callbacks: Sequence[Callback], keep_upto: int | None):
        self.path, self.callbacks = path, list(callbacks)
        if path is None:
            return
        kept = []
        if keep_upto is not None and path.is_file():  # resume: drop records after the checkpoint
            kept = [
                r for r in path.read_text().splitlines() if r and json.loads(r)["step"] <= keep_upto
            ]
        path.write_text("".join(r + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for cb in self.callbacks:
            cb(record)


def _plan(out: Path, model_cfg: ModelConfig, resume: bool, overwrite: bool) -> dict[str, Any]:
    """Rank 0 decides: start fresh, resume from a checkpoint, or refuse (with the error)."""
    try:
        found = latest_checkpoint(out)
    except CheckpointError as err:
        return {"error": ("CheckpointError", str(err))}
    if resume:
        if found is None:
            msg = f"resume=True but {str(out)!r} holds no checkpoint to resume from"
            return {"error": ("CheckpointError", msg)}
        saved, _ = read_configs(found, {})
        if saved != model_cfg:
            diff = {
                k: (v, getattr(model_cfg, k))
                for k, v in saved.to_dict().items()
                if getattr(model_cfg, k) != v
            }
            msg = (
                f"model config differs from the checkpoint in {str(found)!r}: (saved, given) {diff}"
            )
            return {"error": ("CheckpointError", msg)}
        return {"error": None, "ckpt": str(found)}
    if found is not None and not overwrite:
        msg = (
            f"out {str(out)!r} already holds a checkpoint ({found.name}); resume it "
            "(resume=True) or start over (overwrite=True), or pick another folder"
        )
        return {"error": ("FileExistsError", msg)}
    return {"error": None, "ckpt": None}


_ERRORS = {"CheckpointError": CheckpointError, "FileExistsError": FileExistsError}


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
    Under torchrun each process calls this; the process group is joined here.
    """
    from demask.data import batch_indices, get_batch, get_dataset

    if not isinstance(model_cfg, ModelConfig) or not isinstance(train_cfg, TrainConfig):
        raise TypeError("train(model_cfg, train_cfg) needs a ModelConfig and a TrainConfig")
    if stop_after is not None:
        check_int("stop_after", stop_after, min=1)
    info = dd.setup(train_cfg.device)
    try:
        return _train(
            model_cfg,
            train_cfg,
            info,
            resume,
            overwrite,
            callbacks,
            stop_after,
            get_dataset,
            get_batch,
            batch_indices,
        )
    finally:
        dd.teardown(info)


def _train(model_cfg, train_cfg, info, resume, overwrite, callbacks, stop_after,
           get_dataset, get_batch, batch_indices) -> TrainResult:  # fmt: skip
    cfg, out, dev = train_cfg, Path(train_cfg.out), info.device
    main = info.is_main
    kw = {"seq_len": model_cfg.seq_len, "max_bytes": cfg.data_max_bytes}
    train_ds, val_ds = get_dataset(cfg.data, "train", **kw), get_dataset(cfg.data, "val", **kw)
    vocab = train_ds.tokenizer.vocab_size
    if vocab > model_cfg.num_tokens:
        raise ValueError(
            f"num_tokens must be >= the data's vocabulary {vocab}, got {model_cfg.num_tokens}"
        )
    plan = dd.broadcast_object(_plan(out, model_cfg, resume, overwrite) if main else None, info)
    if plan["error"]:
        kind, msg = plan["error"]
        raise _ERRORS[kind](msg)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            clear_run(out)
        save_configs(out / "config.json", model_cfg, cfg)

    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg).to(dev)
    module = dd.parallelize(
        model, info, compile=cfg.compile, fsdp=cfg.fsdp, find_unused_parameters=model_cfg.self_cond
    )
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)
    )
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    start = 0
    if plan["ckpt"] is not None:
        ckpt = Path(plan["ckpt"])
        state = read_state(ckpt) if main else {}
        weights = load_file(str(ckpt / WEIGHTS_FILE)) if main else {}
        load = StateDictOptions(full_state_dict=True, broadcast_from_rank0=info.distributed)
        set_model_state_dict(model, weights, options=load)
        set_optimizer_state_dict(model, optimizer, state.get("optimizer", {}), options=load)
        start = dd.broadcast_object(state.get("step"), info)
        if main and "rng" in state:
            set_rng_state(state["rng"])
    metrics = _Metrics(
        out / "metrics.jsonl" if main else None, callbacks, keep_upto=start if resume else None
    )
    result = TrainResult(step=start, status="finished")

    def save(step: int) -> None:
        msd = get_model_state_dict(model, options=full)  # collective under FSDP2
        osd = get_optimizer_state_dict(model, optimizer, options=full)
        if main:
            extra = {"optimizer": osd, "rng": rng_state(), "world_size": info.world_size}
            result.checkpoint = save_checkpoint(
                out,
                step=step,
                model_state=msd,
                model_config=model_cfg,
                train_config=cfg,
                train_state=extra,
                keep=cfg.keep_checkpoints,
            )
            metrics.write({"type": "checkpoint", "step": step, "path": str(result.checkpoint)})
        dd.barrier(info)

    def validate(step: int) -> None:
        bits = likelihood_bits_per_token(
            model,
            val_ds,
            cfg.batch_size,
            cfg.val_batches * info.world_size,  # the same examples for any world size
            info.rank,
            info.world_size,
            seed=cfg.seed,
            device=dev,
        )
        result.val[step] = bits
        metrics.write({"type": "val", "step": step, "val_bits_per_token": bits})
        say(f"step {step}: val {bits:.4f} bits/token")

    tty = sys.stderr.isatty()
    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=start,
        disable=not (main and cfg.progress and tty),
        unit="step",
        dynamic_ncols=True,
    )

    def say(text: str, always: bool = False) -> None:
        if main and (cfg.progress or always):
            bar.write(text, file=sys.stderr) if tty else print(text, file=sys.stderr, flush=True)

    tokens_per_step = cfg.batch_size * info.world_size * model_cfg.seq_len
    flag = {"stop": False}
    t_last, steps_since = time.perf_counter(), 0
    model.train()
    step = start
    with _stop_on_signals(flag), bar:
        while step < cfg.steps:
            s = step + 1
            lr = lr_at(s, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = get_batch(train_ds, s, cfg.batch_size, cfg.seed, info.rank, info.world_size).to(dev)
            seed = model_step_seed(cfg.seed, s, info.rank)
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            with torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext():
                loss = _scalar_loss(module(x))
            bad = not bool(torch.isfinite(loss.detach()))
            # one all-reduce per step: [loss sum, ranks with a bad loss, ranks asked to stop]
            agg = torch.tensor(
                [0.0 if bad else float(loss.detach()), float(bad), float(flag["stop"])],
                dtype=torch.float64,
                device=dev,
            )
            dd.all_reduce_sum(agg, info)
            if agg[2] > 0:  # SIGTERM / Ctrl-C somewhere: leave before this update
                result.status = "interrupted"
                break
            grad_norm = float("nan")
            if agg[1] == 0:
                loss.backward()
                clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if agg[1] > 0 or not math.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                idx = batch_indices(
                    len(train_ds), s, cfg.batch_size, cfg.seed, info.rank, info.world_size
                )
                what = "loss" if agg[1] > 0 else "gradient norm"
                where = (
                    f"rank {info.rank} loss {float(loss.detach())}, batch = train examples {idx.tolist()[:16]}"
                    f" (get_batch(step={s}, seed={cfg.seed}, rank={info.rank}, world_size={info.world_size}))"
                )
                if agg[1] > 0 and not bad:
                    where = "on another rank"
                msg = f"non-finite {what} at step {s} {where}"
                metrics.write(
                    {
                        "type": "nonfinite",
                        "step": s,
                        "what": what,
                        "action": cfg.nan_policy,
                        "batch_indices": idx.tolist(),
                    }
                )
                if cfg.nan_policy == "stop":
                    raise NonFiniteLossError(
                        msg + "; stopping without a checkpoint (nan_policy='stop')"
                    )
                say(msg + "; update skipped")
                result.skipped.append(s)
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step = result.step = s
            mean_loss = float(agg[0]) / info.world_size
            if agg[1] == 0:
                result.losses[s] = mean_loss
            steps_since += 1
            bar.update(1)
            if s % cfg.log_every == 0 or s == cfg.steps:
                now = time.perf_counter()
                tps = tokens_per_step * steps_since / max(now - t_last, 1e-9)
                t_last, steps_since = now, 0
                metrics.write(
                    {
                        "type": "train",
                        "step": s,
                        "loss": mean_loss,
                        "lr": lr,
                        "tokens_per_s": tps,
                        "grad_norm": grad_norm,
                    }
                )
                bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tps:,.0f}")
            if cfg.val_every and s % cfg.val_every == 0 and s != cfg.steps:
                validate(s)
            if s == stop_after:
                result.status = "stopped"
                break
            if cfg.checkpoint_every and s % cfg.checkpoint_every == 0 and s != cfg.steps:
                save(s)
    if result.status == "finished":
        validate(step)
    if result.status == "interrupted":
        say(f"interrupted: saving the checkpoint of step {step}", always=True)
    if step > 0 and (
        result.checkpoint is None or not result.checkpoint.name.endswith(f"{step:08d}")
    ):
        save(step)
    return result
