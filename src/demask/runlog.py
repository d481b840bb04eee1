"""What a training run reports besides its checkpoints: config.json and metrics.jsonl in the run
folder (rank 0 only), progress and messages on stderr, and the callbacks.

Nothing is written before `begin` (called by the first record, and by `train` before the first
checkpoint), so a run that fails to start, even for lack of memory in its first step, leaves its
folder as it was. `begin` clears an old run on a fresh start and writes config.json and the metrics
log so far: on resume, the records of the steps up to the checkpoint (a torn last line, from a
write cut short, is dropped).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from demask.config import ModelConfig, TrainConfig, save_configs
from demask.distributed import DistInfo
from demask.runfolder import METRICS_FILE, atomic_write_text, clear_run, write_error

Callback = Callable[[dict[str, Any]], None]


class RunLog:
    """The reports of one `train` invocation, from update `start` on.

    resumed: the run continues from the checkpoint of step `start` (its log is kept up to there);
    otherwise the folder's old run, if any, is cleared at `begin`."""

    def __init__(
        self,
        configs: tuple[ModelConfig, TrainConfig],
        info: DistInfo,
        *,
        start: int,
        resumed: bool,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.model_config, self.cfg = configs
        self.main, self.resumed, self.callbacks = info.is_main, resumed, list(callbacks)
        self.out = Path(self.cfg.out)
        self.path = self.out / METRICS_FILE if self.main else None
        self.kept: list[str] = []
        torn = False
        if self.path is not None and resumed and self.path.is_file():
            self.kept, torn = read_metrics(self.path, start)
        self.started = False
        self.tokens_per_step = self.cfg.batch_size * info.world_size * self.model_config.seq_len
        self.t_last, self.since = time.perf_counter(), 0
        self.tty = sys.stderr.isatty()
        from tqdm.auto import tqdm

        show = self.main and self.cfg.progress and self.tty
        self.bar = tqdm(
            total=self.cfg.max_steps,
            initial=start,
            disable=not show,
            unit="step",
            dynamic_ncols=True,
        )
        if torn:
            self.say(f"{self.path}: dropping its torn last line (a write cut short)", always=True)

    def begin(self) -> None:
        """The first change to the run folder (once): clear an old run (fresh start), write
        config.json and the metrics log so far."""
        if self.started:
            return
        self.started = True
        if self.main:
            if not self.resumed:
                clear_run(self.out)
            save_configs(self.out / "config.json", self.model_config, self.cfg)
            atomic_write_text(self.out / METRICS_FILE, "".join(r + "\n" for r in self.kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append a record to metrics.jsonl and pass it to the callbacks (rank 0)."""
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

    def say(self, text: str, always: bool = False) -> None:
        """A message on stderr (rank 0; only with cfg.progress unless `always`)."""
        if self.main and (self.cfg.progress or always):
            if self.tty:
                self.bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr, flush=True)

    def update(self, step: int, loss: float, grad_norm: float, lr: float) -> None:
        """Update `step` is done: advance the progress bar, and every cfg.log_every steps (and at
        the last) write a train record with the throughput since the previous one."""
        self.since += 1
        self.bar.update(1)
        if step % self.cfg.log_every and step != self.cfg.max_steps:
            return
        now = time.perf_counter()
        tps = self.tokens_per_step * self.since / max(now - self.t_last, 1e-9)
        self.t_last, self.since = now, 0
        self.write(
            {
                "type": "train",
                "step": step,
                "loss": loss if math.isfinite(loss) else None,
                "lr": lr,
                "tokens_per_s": tps,
                "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            }
        )
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")

    def close(self) -> None:
        self.bar.close()


def read_metrics(path: Path, upto: int) -> tuple[list[str], bool]:
    """The lines of a metrics log (metrics.jsonl) whose records are of steps <= `upto` (to resume
    after that step), and whether a torn last line (a write cut short by a kill or a full disk)
    was dropped. A line that is not a JSON record anywhere else is refused (ValueError naming the
    file and the line)."""
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    kept, torn = [], False
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            step = record["step"] if isinstance(record, dict) else None
            if not isinstance(step, int):
                raise ValueError("no int 'step'")
        except (ValueError, KeyError):
            if i == len(lines) - 1:
                torn = True
                break
            shown = line[:60].decode("utf-8", "replace")
            raise ValueError(
                f"metrics log {str(path)!r}: line {i + 1} of {len(lines)} is not a JSON record "
                f"with a 'step' ({shown!r}); expected one record per line: fix or delete that "
                "line to resume"
            ) from None
        if step <= upto:
            kept.append(line.decode("utf-8"))
    return kept, torn
