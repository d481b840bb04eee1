"""Exact resume in one process: stopped after step s and resumed, a run repeats the uninterrupted
run's later losses and ends with the same weights (RNG, data position, optimiser, LR restored).
The two-process version is in test_distributed.py."""

from __future__ import annotations

import json

import pytest
import torch
from _train_worker import tiny_model, tiny_train

from demask.checkpoint import load_checkpoint
from demask.config import ModelConfig, TrainConfig
from demask.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(path):
    return load_checkpoint(path).model.state_dict()


@pytest.mark.parametrize("kind", ["autoregressive", "masked"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, kind):
    m = ModelConfig(**tiny_model(kind))
    full = TrainConfig(**tiny_train(tmp_path / "full", steps=8, val_every=4))
    try:
        ref = train(m, full)
    except ImportError as err:
        pytest.skip(f"{kind} wrapper not available yet: {err}")
    part = TrainConfig(**tiny_train(tmp_path / "part", steps=8, val_every=4))
    first = train(m, part, stop_after=5)
    assert first.status == "stopped" and first.step == 5 and sorted(first.losses) == [1, 2, 3, 4, 5]
    assert load_checkpoint(tmp_path / "part").step == 5
    second = train(m, part, resume=True)
    assert second.status == "finished" and sorted(second.losses) == [6, 7, 8]
    assert {**first.losses, **second.losses} == ref.losses  # exactly, step for step
    assert second.val == {8: ref.val[8]}
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the metrics log reads as one run: every train step once, in order
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "part" / "metrics.jsonl").open()
        if json.loads(line)["type"] == "train"
    ]
    assert steps == list(range(1, 9))


def test_resume_can_extend_the_run(tmp_path):
    m = ModelConfig(**tiny_model())
    t = TrainConfig(**tiny_train(tmp_path / "run", steps=3))
    train(m, t)
    more = TrainConfig(**{**t.to_dict(), "steps": 5})
    res = train(m, more, resume=True)
    assert sorted(res.losses) == [4, 5] and load_checkpoint(tmp_path / "run").step == 5
    # resuming a finished run does no step and keeps its checkpoint
    again = train(m, more, resume=True)
    assert again.losses == {} and again.step == 5
