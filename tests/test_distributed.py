"""Multi-process training on CPU with gloo, 2 processes launched by torchrun (a real subprocess).

One torchrun launch runs every training below in the same process group (to pay the start-up once):
  A: 8 steps, batch 4 per rank                      -> compared with 1 process, batch 8
  B: the same run stopped after step 4, then resumed -> compared with A, loss for loss
  D: B again with FSDP2 (fully_shard) instead of DDP  -> compared with A
  C: a masked model with self-conditioning under DDP -> finishes with finite losses
  E, F: a masked model that predicts its dropped class, DDP and FSDP2 -> the same losses
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _train_worker import run_workers, tiny_model, tiny_train

from demask.checkpoint import load_checkpoint
from demask.config import ModelConfig, TrainConfig
from demask.distributed import DistInfo, parallelize, torchrun_command
from demask.train import train

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]
STEPS, B = 8, 4


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Results of the 2-process runs A and B (and B resumed), keyed by name."""
    tmp = tmp_path_factory.mktemp("ddp")
    common = dict(steps=STEPS, batch_size=B, val_every=4, val_batches=3)
    runs = [
        {
            "model": tiny_model(),
            "train": tiny_train(tmp / "A", **common),
            "result": str(tmp / "A.json"),
        },
        {
            "model": tiny_model(),
            "train": tiny_train(tmp / "B", **common),
            "stop_after": 4,
            "result": str(tmp / "B1.json"),
        },
        {
            "model": tiny_model(),
            "train": tiny_train(tmp / "B", **common),
            "resume": True,
            "result": str(tmp / "B2.json"),
        },
    ]
    fsdp = dict(common, fsdp=True)
    runs += [
        {
            "model": tiny_model(),
            "train": tiny_train(tmp / "D", **fsdp),
            "stop_after": 4,
            "result": str(tmp / "D1.json"),
        },
        {
            "model": tiny_model(),
            "train": tiny_train(tmp / "D", **fsdp),
            "resume": True,
            "result": str(tmp / "D2.json"),
        },
        {  # self-conditioning leaves a Linear unused on some steps: DDP must cope
            "model": tiny_model("masked", self_cond=True),
            "train": tiny_train(tmp / "C", steps=4, batch_size=B, val_batches=1),
            "result": str(tmp / "C.json"),
        },
    ]
    # E, F: a model that predicts its dropped class, whose loss calls the net twice (the batch and
    # the condition's own term), under DDP and FSDP2
    joint = dict(cond_prefix_len=1, cond_drop_prob=0.5, predict_dropped_cond=True)
    runs += [
        {
            "model": tiny_model("masked", **joint),
            "train": tiny_train(tmp / name, steps=4, batch_size=B, val_batches=1, fsdp=fsdp_on),
            "result": str(tmp / f"{name}.json"),
        }
        for name, fsdp_on in (("E", False), ("F", True))
    ]
    run_workers(runs, tmp, nproc=2)
    names = ("A", "B1", "B2", "C", "D1", "D2", "E", "F")
    return tmp, {n: json.loads((tmp / f"{n}.json").read_text()) for n in names}


def _losses(res: dict) -> dict[int, float]:
    return {int(k): v for k, v in res["losses"].items()}


def test_two_ranks_equal_one_process_with_twice_the_batch(two_ranks, tmp_path):
    tmp, res = two_ranks
    m = ModelConfig(**tiny_model())
    one = train(
        m,
        TrainConfig(
            **tiny_train(
                tmp_path / "one", steps=STEPS, batch_size=2 * B, val_every=4, val_batches=3
            )
        ),
    )
    two = _losses(res["A"])
    assert sorted(two) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert two[s] == pytest.approx(one.losses[s], rel=1e-5, abs=1e-6)
    a = load_checkpoint(tmp / "A").model.state_dict()
    b = load_checkpoint(tmp_path / "one").model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # validation is reduced over ranks: the same number as one process evaluating everything
    for s, v in res["A"]["val"].items():
        assert v == pytest.approx(one.val[int(s)], rel=1e-5)


def test_two_rank_resume_is_exact(two_ranks):
    tmp, res = two_ranks
    assert res["B1"]["status"] == "stopped" and res["B1"]["step"] == 4
    assert res["B2"]["status"] == "finished" and res["B2"]["step"] == STEPS
    resumed = {**_losses(res["B1"]), **_losses(res["B2"])}
    assert sorted(_losses(res["B2"])) == list(range(5, STEPS + 1))
    assert resumed == _losses(res["A"])  # exactly
    a = load_checkpoint(tmp / "A").model.state_dict()
    b = load_checkpoint(tmp / "B").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp2_matches_ddp_and_resumes(two_ranks):
    tmp, res = two_ranks
    assert res["D1"]["step"] == 4 and res["D2"]["status"] == "finished"
    fsdp = {**_losses(res["D1"]), **_losses(res["D2"])}
    ddp = _losses(res["A"])
    assert sorted(fsdp) == sorted(ddp)
    for s in ddp:
        assert fsdp[s] == pytest.approx(ddp[s], rel=1e-5, abs=1e-6)
    a = load_checkpoint(tmp / "A").model.state_dict()
    d = load_checkpoint(tmp / "D").model.state_dict()  # gathered to a full state dict
    for k in a:
        torch.testing.assert_close(d[k], a[k], rtol=1e-4, atol=1e-5)


def test_masked_self_conditioning_under_ddp(two_ranks):
    tmp, res = two_ranks
    losses = _losses(res["C"])
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in losses.values())
    assert load_checkpoint(tmp / "C", kind="masked").step == 4


def test_a_loss_with_two_network_calls_trains_alike_under_ddp_and_fsdp2(two_ranks):
    tmp, res = two_ranks
    ddp, fsdp = _losses(res["E"]), _losses(res["F"])
    assert sorted(ddp) == sorted(fsdp) == [1, 2, 3, 4]
    for s in ddp:
        assert math.isfinite(ddp[s]) and fsdp[s] == pytest.approx(ddp[s], rel=1e-5, abs=1e-6)
    e = load_checkpoint(tmp / "E").model.state_dict()
    f = load_checkpoint(tmp / "F").model.state_dict()
    for k in e:
        torch.testing.assert_close(f[k], e[k], rtol=1e-4, atol=1e-5)


def test_torchrun_command_strips_nproc():
    cmd = torchrun_command(2, ["train", "--nproc", "2", "--data", "digits", "--nproc=2"])
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "demask",
        "train",
        "--data",
        "digits",
    ]
    extra = ["--nnodes", "2", "--node_rank", "1", "--rdzv_endpoint", "host:29500"]
    assert torchrun_command(4, ["train"], extra=extra)[3:9] == extra
    with pytest.raises(ValueError, match="nproc must be >= 1, got 0"):
        torchrun_command(0, ["train"])


def test_parallelize_single_process_is_the_module_itself():
    m = torch.nn.Linear(2, 2)
    assert parallelize(m, DistInfo()) is m


@pytest.mark.slow
def test_launch_runs_demask_train_under_torchrun(tmp_path):
    """`demask train --nproc 2` -> launch() -> torchrun -> `python -m demask train` on 2 ranks."""
    import os

    from _train_worker import DATA, SEQ_LEN, subprocess_env

    from demask.distributed import launch

    out = tmp_path / "run"
    argv = ["train", "--model", "autoregressive", "--data", DATA, "--steps", "3",
            "--batch-size", "2", "--dim", "16", "--depth", "1", "--heads", "2", "--quiet",
            "--no-plot", "--out", str(out), "--nproc", "2"]  # fmt: skip
    if DATA != "digits":
        argv += ["--seq-len", str(SEQ_LEN), "--max-bytes", "20000"]
    env = subprocess_env()
    old = dict(os.environ)
    os.environ.update(env)
    try:
        assert launch(2, argv) == 0
    finally:
        os.environ.clear()
        os.environ.update(old)
    ck = load_checkpoint(out)
    assert ck.step == 3 and ck.train_config.batch_size == 2
    state = load_checkpoint(out, with_state=True).state
    assert state["world_size"] == 2


def test_fsdp_flag_on_one_process_trains_unsharded(tmp_path):
    m = ModelConfig(**tiny_model())
    plain = train(m, TrainConfig(**tiny_train(tmp_path / "a", steps=2)))
    fsdp = train(m, TrainConfig(**tiny_train(tmp_path / "b", steps=2, fsdp=True)))
    assert fsdp.losses == plain.losses
