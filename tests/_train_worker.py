"""Shared helpers of the training tests, and the entry point of their subprocesses.

As a script (`python tests/_train_worker.py SPEC.json`, alone or under torchrun) it runs the
training runs listed in SPEC.json one after the other in the same process group and writes, on
rank 0, each run's result (losses, status, step, skipped, val) to the JSON file the run names.
A run with "slow_checkpoint": [STEP, SECONDS] sleeps SECONDS after writing the weights of every
checkpoint of step >= STEP, so a test can kill the process in the middle of a checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
# ../shared lies beside the repository clone (locally and in CI)
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/shakespeare/hamlet_gut.txt"
DATA = str(SHAKESPEARE) if SHAKESPEARE.is_file() else "digits"
SEQ_LEN = 16 if SHAKESPEARE.is_file() else 64
MAX_BYTES = 20_000 if SHAKESPEARE.is_file() else None  # digits take no byte limit


def tiny_model(kind: str = "autoregressive", **over: Any) -> dict[str, Any]:
    """A ModelConfig dict small enough to train a step in milliseconds."""
    num_tokens = 256 if DATA != "digits" else 17
    # attn_dim_head=8 (dim // heads): the head width these tiny models had before the config took
    # the seed's default of 64; the golden losses of test_train.py were measured with it
    cfg = dict(kind=kind, num_tokens=num_tokens, max_seq_len=SEQ_LEN, dim=16, depth=1, heads=2,
               attn_dim_head=8)  # fmt: skip
    cfg.update(over)
    return cfg


def tiny_train(out: str | Path, **over: Any) -> dict[str, Any]:
    """A TrainConfig dict for a few fast, quiet steps (`steps=` sets max_steps)."""
    cfg = dict(
        data=DATA,
        data_max_bytes=MAX_BYTES,
        out=str(out),
        max_steps=8,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        log_every=1,
        val_every=0,
        val_batches=2,
        checkpoint_every=0,
        progress=False,
        device="cpu",
    )
    if "steps" in over:
        over["max_steps"] = over.pop("steps")
    cfg.update(over)
    return cfg


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def worker_command(spec_path: Path, nproc: int = 1) -> list[str]:
    """The command that runs this script on `nproc` processes (torchrun when nproc > 1)."""
    script = str(Path(__file__).resolve())
    if nproc == 1:
        return [sys.executable, script, str(spec_path)]
    from demask.distributed import torchrun_command

    cmd = torchrun_command(nproc, [str(spec_path)])
    return cmd[: cmd.index("-m", 3)] + [script, str(spec_path)]  # a script instead of -m demask


def run_workers(runs: list[dict[str, Any]], tmp: Path, nproc: int, timeout: float = 240) -> None:
    """Run `runs` in one launch of `nproc` processes; raise with the output when it fails."""
    spec = tmp / f"spec-{nproc}.json"
    spec.write_text(json.dumps(runs))
    proc = subprocess.run(
        worker_command(spec, nproc),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"workers failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def slow_checkpoints(from_step: int, seconds: float) -> None:
    """Make every checkpoint of step >= from_step pause `seconds` after its weights are written
    (in this process: demask.checkpoint's weights writer is replaced by a slow one)."""
    import time

    import demask.checkpoint as checkpoint

    write = checkpoint.save_file

    def slow(tensors: Any, filename: str, metadata: dict[str, str] | None = None) -> None:
        write(tensors, filename, metadata=metadata)
        if int((metadata or {}).get("demask_step", -1)) >= from_step:
            time.sleep(seconds)

    checkpoint.save_file = slow


def main(spec_path: str) -> None:
    import torch.distributed as dist

    from demask.config import ModelConfig, TrainConfig
    from demask.train import train

    runs = json.loads(Path(spec_path).read_text())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")  # one group for all runs; train() reuses it
    for run in runs:
        if run.get("slow_checkpoint"):
            slow_checkpoints(*run["slow_checkpoint"])
        res = train(
            ModelConfig(**run["model"]),
            TrainConfig(**run["train"]),
            resume=run.get("resume", False),
            overwrite=run.get("overwrite", False),
            stop_after=run.get("stop_after"),
        )
        if int(os.environ.get("RANK", "0")) == 0 and run.get("result"):
            payload = {
                "losses": {str(k): v for k, v in res.losses.items()},
                "val": {str(k): v for k, v in res.val.items()},
                "status": res.status,
                "step": res.step,
                "skipped": res.skipped,
            }
            Path(run["result"]).write_text(json.dumps(payload))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
