"""Exact resume in one process: stopped after step s and resumed, a run repeats the uninterrupted
run's later losses and ends with the same weights (weights, optimiser and step restored; the data
position, the LR and the RNG are functions of the step).
The two-process version is in test_distributed.py."""

from __future__ import annotations

import json

import pytest
import torch
from _train_worker import tiny_model, tiny_train

from demask.checkpoint import load_checkpoint
from demask.config import ModelConfig, TrainConfig
from demask.data import get_batch, get_dataset
from demask.distributed import DistInfo
from demask.train import train, train_step
from demask.training_state import build_state, restore_training_state, save_training_state

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(path):
    return load_checkpoint(path).model.state_dict()


@pytest.mark.parametrize(
    ("kind", "optimizer"),
    [("autoregressive", "adamw"), ("masked", "adamw"), ("masked", "muon")],
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, kind, optimizer):
    m = ModelConfig(**tiny_model(kind))
    opts = {"steps": 8, "val_every": 4, "optimizer": optimizer}
    full = TrainConfig(**tiny_train(tmp_path / "full", **opts))
    try:
        ref = train(m, full)
    except ImportError as err:
        pytest.skip(f"{kind} wrapper not available yet: {err}")
    part = TrainConfig(**tiny_train(tmp_path / "part", **opts))
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


def test_a_saved_state_restores_into_the_same_state(tmp_path):
    """save_training_state then restore_training_state into a state with other weights: the same
    weights, optimiser state and step, so the next updates are the same, bit for bit."""
    m = ModelConfig(**tiny_model("masked"))
    t = TrainConfig(**tiny_train(tmp_path / "run", steps=6))
    ds = get_dataset(t.data, "train", seq_len=m.seq_len, max_bytes=t.data_max_bytes)
    state = build_state(m, t, DistInfo())
    for s in (1, 2, 3):
        train_step(state, get_batch(ds, s, t.batch_size, t.seed))
    path = save_training_state(t.out, state)
    other = build_state(m, t, DistInfo())
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(1.0)
    restore_training_state(path, other)
    assert other.step == 3
    a, b = state.model.state_dict(), other.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = state.optimizer.state_dict(), other.optimizer.state_dict()
    groups = [[{**g, "betas": tuple(g["betas"])} for g in d["param_groups"]] for d in (sa, sb)]
    assert groups[0] == groups[1] and sa["state"].keys() == sb["state"].keys()  # betas: a list
    for i, moments in sa["state"].items():
        assert all(torch.equal(v, sb["state"][i][k]) for k, v in moments.items())
    for s in (4, 5):
        batch = get_batch(ds, s, t.batch_size, t.seed)
        assert train_step(state, batch).loss == train_step(other, batch).loss


def test_resume_refuses_another_optimizer(tmp_path):
    """AdamW's moments are no Muon momentum: a run resumes with the optimiser it trained with,
    and the refusal leaves its checkpoint as it was."""
    from demask.runfolder import CheckpointError

    m = ModelConfig(**tiny_model("masked"))
    t = TrainConfig(**tiny_train(tmp_path / "run", steps=2))
    train(m, t)
    before = _weights(tmp_path / "run")
    muon = TrainConfig(**{**t.to_dict(), "steps": 4, "optimizer": "muon"})
    with pytest.raises(CheckpointError, match="optimizer='muon', but the run in .* with 'adamw'"):
        train(m, muon, resume=True)
    after = _weights(tmp_path / "run")
    assert load_checkpoint(tmp_path / "run").step == 2
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(train(m, TrainConfig(**{**t.to_dict(), "steps": 3}), resume=True).losses) == [3]
