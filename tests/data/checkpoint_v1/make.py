"""Write the format-1 checkpoint fixture beside this file with demask as it was at commit 9083a05
(before checkpoints lost their config.json and RNG state):

    git archive 9083a05 src | tar -x -C /tmp/v1
    PYTHONPATH=/tmp/v1/src python tests/data/checkpoint_v1/make.py

It trains MODEL/TRAIN for 2 of 4 steps (the checkpoint of step 2 goes to run/), then the whole
4-step run elsewhere, and records that run's losses in losses.json: a resume from the fixture
must repeat losses 3 and 4.
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch

from demask.config import ModelConfig, TrainConfig
from demask.train import train

HERE = Path(__file__).resolve().parent
MODEL = dict(kind="masked", num_tokens=17, seq_len=64, dim=16, depth=1, heads=2)
TRAIN = dict(
    data="digits",
    steps=4,
    batch_size=4,
    lr=3e-3,
    warmup_steps=2,
    log_every=1,
    val_every=0,
    val_batches=1,
    checkpoint_every=0,
    progress=False,
    device="cpu",
)

if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        m = ModelConfig(**MODEL)
        full = train(m, TrainConfig(**TRAIN, out=str(Path(tmp) / "full")))
        run = HERE / "run"
        shutil.rmtree(run, ignore_errors=True)
        part = train(m, TrainConfig(**TRAIN, out=str(run)), stop_after=2)
        assert part.losses == {s: full.losses[s] for s in (1, 2)}
    for name in ("metrics.jsonl", "config.json"):
        (run / name).unlink()
    losses = {str(k): v for k, v in full.losses.items()}
    (HERE / "losses.json").write_text(json.dumps(losses, indent=1) + "\n")
