"""Checkpoints: round trip, rebuild from the checkpoint alone, clear errors, real processes killed
(SIGKILL mid-write) or stopped (SIGTERM) while they train, format 1 still loading, and the one
atomic writer every file goes through."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _train_worker import SEQ_LEN, subprocess_env, tiny_model, tiny_train, worker_command
from safetensors import safe_open
from safetensors.torch import save_file

from demask.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    checkpoint_configs,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from demask.config import ModelConfig, TrainConfig, build_model, configs_from_json
from demask.runfolder import WriteError, atomic_write, atomic_write_text
from demask.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _save(run_dir: Path, step: int, model=None, kind="autoregressive", keep=2):
    cfg = ModelConfig(**tiny_model(kind))
    torch.manual_seed(step)
    model = model or build_model(cfg)
    path = save_checkpoint(
        run_dir,
        step=step,
        model_state=model.state_dict(),
        model_config=cfg,
        train_config=TrainConfig(steps=10),
        train_state={"note": "x"},
        keep=keep,
    )
    return model, path


def test_round_trip_from_run_folder_checkpoint_folder_and_file(tmp_path):
    model, path = _save(tmp_path, 3)
    x = torch.randint(0, tiny_model()["num_tokens"], (2, SEQ_LEN))
    with torch.no_grad():
        want = model.net(x)
    for where in (tmp_path, path, path / "model.safetensors"):
        ck = load_checkpoint(where, with_state=True)
        assert ck.step == 3 and ck.path == path and not ck.model.training
        assert ck.model_config == ModelConfig(**tiny_model())
        assert ck.train_config == TrainConfig(steps=10)
        assert ck.state["note"] == "x" and ck.state["step"] == 3
        with torch.no_grad():
            assert torch.equal(ck.model.net(x), want)
    assert (tmp_path / "latest").read_text() == "checkpoints/step_00000003\n"
    assert checkpoint_configs(tmp_path)[2] == 3


def test_weights_file_alone_rebuilds_the_model(tmp_path):
    model, path = _save(tmp_path, 1)
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    (alone / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    ck = load_checkpoint(alone / "model.safetensors")  # configs come from the file's metadata
    for a, b in zip(ck.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_keeps_the_newest_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path).name == "step_00000004"


def test_a_stale_same_step_folder_is_replaced(tmp_path):
    """A writer killed after renaming its folder but before moving `latest` leaves a complete
    step folder that `latest` does not name; a later save of that step must not trust it."""
    _save(tmp_path, 1)
    _save(tmp_path, 2)  # a complete step-2 folder ...
    (tmp_path / "latest").write_text("checkpoints/step_00000001\n")  # ... latest not moved
    torch.manual_seed(99)
    model = build_model(ModelConfig(**tiny_model()))  # other weights for the same step
    _save(tmp_path, 2, model=model)
    got = load_checkpoint(tmp_path).model.state_dict()
    for a, b in zip(got.values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert not any((tmp_path / "checkpoints").glob(".tmp-*"))


def test_refuses_non_finite_weights(tmp_path):
    model, _ = _save(tmp_path, 1)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(ValueError, match="refusing to save the checkpoint of step 2: non-finite"):
        _save(tmp_path, 2, model=model)
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_corrupt_and_wrong_kind_are_one_line_errors(tmp_path):
    _, path = _save(tmp_path, 1)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, kind="masked")
    assert "holds a 'autoregressive' model, expected 'masked'" in _one_line(err)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert "corrupt or unreadable" in _one_line(err)
    weights.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(weights)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="is not a .safetensors file"):
        load_checkpoint(tmp_path / "notes.txt")
    assert issubclass(CheckpointError, ValueError)  # the CLI maps ValueError to exit code 2


def edit_saved_config(weights: Path, edit) -> None:
    """Rewrite the configs held in a weights file's metadata with `edit(config_dict)`."""
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    cfg = json.loads(meta["demask_config"])
    edit(cfg)
    save_file(tensors, str(weights), metadata={**meta, "demask_config": json.dumps(cfg)})


def test_mismatched_weights_are_a_clear_error(tmp_path):
    _, path = _save(tmp_path, 1)
    edit_saved_config(path / "model.safetensors", lambda c: c["model"].update(dim=32))
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_checkpoint(tmp_path)


# ----------------------------------------------------------------------- real processes


def _start(tmp_path: Path, run: dict, **env: str) -> subprocess.Popen:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([run]))
    return subprocess.Popen(
        worker_command(spec),
        env=subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"worker exited early ({proc.returncode}): {err.decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the worker")
        time.sleep(0.05)


def test_sigkill_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    run_dir = tmp_path / "run"
    run = {
        "model": tiny_model(),
        "train": tiny_train(run_dir, steps=1000, checkpoint_every=2),
        # sleep 60 s after the weights of every checkpoint from step 4 on: the kill lands mid-write
        "slow_checkpoint": [4, 60],
    }
    proc = _start(tmp_path, run)
    ckpts = run_dir / "checkpoints"
    _wait_for(lambda: any(ckpts.glob(".tmp-step_00000004-*/model.safetensors")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert any(ckpts.glob(".tmp-*"))  # the half-written checkpoint is there ...
    assert latest_checkpoint(run_dir).name == "step_00000002"  # ... but latest was not moved
    ck = load_checkpoint(run_dir, with_state=True)
    assert ck.step == 2 and ck.state["step"] == 2 and "optimizer" in ck.state
    # and the run resumes from it, cleaning the stale temporary folder on its next save
    res = train(
        ModelConfig(**run["model"]), TrainConfig(**{**run["train"], "steps": 4}), resume=True
    )
    assert res.step == 4 and sorted(res.losses) == [3, 4]
    assert not any(ckpts.glob(".tmp-*"))
    assert load_checkpoint(run_dir).step == 4


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)]
)
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    run_dir = tmp_path / "run"
    result = tmp_path / "result.json"
    run = {
        "model": tiny_model(),
        "train": tiny_train(run_dir, steps=100_000, checkpoint_every=0),
        "result": str(result),
    }
    proc = _start(tmp_path, run)
    metrics = run_dir / "metrics.jsonl"

    def some_steps_done() -> bool:
        return metrics.is_file() and len(metrics.read_text().splitlines()) >= 3

    _wait_for(some_steps_done, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    res = json.loads(result.read_text())
    assert res["status"] == "interrupted" and 3 <= res["step"] < 100_000
    ck = load_checkpoint(run_dir)
    assert ck.step == res["step"]
    assert "interrupted: saving the checkpoint" in err.decode()


# ------------------------------------------------------------------- format versions


def test_a_checkpoint_holds_one_copy_of_its_config_and_no_rng_state(tmp_path):
    _, path = _save(tmp_path, 3)
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "state.pt"]
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["demask_format_version"] == str(FORMAT_VERSION) == "2"
    assert configs_from_json(meta["demask_config"]) == (
        ModelConfig(**tiny_model()),
        TrainConfig(steps=10),
    )
    assert load_checkpoint(path, with_state=True).state == {"note": "x", "step": 3}


def test_a_newer_format_is_refused(tmp_path):
    _, path = _save(tmp_path, 1)
    weights = path / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    save_file(tensors, str(weights), metadata={**meta, "demask_format_version": "3"})
    with pytest.raises(
        CheckpointError, match="format version '3'; this demask reads versions 1 to 2"
    ):
        load_checkpoint(tmp_path)


V1 = Path(__file__).parent / "data" / "checkpoint_v1"  # written by demask 9083a05: see make.py


def test_a_format_1_checkpoint_loads_and_resumes(tmp_path):
    """A checkpoint of the old layout (config.json beside the weights, RNG states in state.pt)
    rebuilds its model, and a run resumes from it into the losses the old code's uninterrupted
    run had (approximately: the fixture was computed on one CPU, the test may run on another)."""
    sys.path.insert(0, str(V1))
    try:
        from make import MODEL, TRAIN
    finally:
        sys.path.remove(str(V1))
    run_dir = Path(shutil.copytree(V1 / "run", tmp_path / "run"))
    ckpt = run_dir / "checkpoints" / "step_00000002"
    assert (ckpt / "config.json").is_file()  # the old layout
    ck = load_checkpoint(run_dir, with_state=True)
    # format 1 meant a head width of dim // heads; the migration records it (ModelConfig's own
    # default is now the seed's 64), and format 2's positions, added to the embeddings only
    old_model = ModelConfig(
        **MODEL, attn_dim_head=MODEL["dim"] // MODEL["heads"], abs_pos_attn_bias=False
    )
    assert ck.step == 2 and ck.model_config == old_model
    assert ck.train_config == TrainConfig(**TRAIN, out=ck.train_config.out)
    assert "rng" in ck.state and "optimizer" in ck.state  # RNG states: saved, now ignored
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert all(torch.equal(v, f.get_tensor(k)) for k, v in ck.model.state_dict().items())
    res = train(old_model, TrainConfig(**TRAIN, out=str(run_dir)), resume=True)
    want = {int(k): v for k, v in json.loads((V1 / "losses.json").read_text()).items()}
    assert sorted(res.losses) == [3, 4]
    assert res.losses == pytest.approx({s: want[s] for s in (3, 4)}, rel=1e-5)
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_00000004").iterdir()) == [
        "model.safetensors",
        "state.pt",
    ]


# ------------------------------------------------------------------- the one atomic writer


def test_atomic_write_replaces_files_and_folders(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    assert atomic_write(target, lambda tmp: tmp.write_text("one")) == target
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    folder = tmp_path / "folder"
    for text in ("a", "b"):
        atomic_write(folder, lambda tmp, t=text: (tmp.mkdir(), (tmp / "f").write_text(t)))
    assert [p.name for p in folder.iterdir()] == ["f"] and (folder / "f").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "sub"]  # no temporaries


@pytest.mark.parametrize("what", ["file", "folder"])
@pytest.mark.parametrize("fail", ["in the writer", "at fsync", "at the rename"])
def test_a_failed_atomic_write_leaves_the_old_version(tmp_path, monkeypatch, what, fail):
    target = tmp_path / "target"
    if what == "file":
        target.write_text("old")

        def write(tmp):
            tmp.write_text("new, cut short")
            if fail == "in the writer":
                raise OSError(errno.ENOSPC, "No space left on device")
    else:
        target.mkdir()
        (target / "f").write_text("old")

        def write(tmp):
            tmp.mkdir()
            (tmp / "f").write_text("new, cut short")
            if fail == "in the writer":
                raise OSError(errno.ENOSPC, "No space left on device")

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fail == "at fsync":
        monkeypatch.setattr(os, "fsync", no_space)
    real_replace = os.replace

    def replace(src, dst):  # the temporary is never renamed into place
        if Path(src).name.startswith(".tmp-target"):
            no_space()
        real_replace(src, dst)

    if fail == "at the rename":
        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteError, match="No space left on device") as err:
        atomic_write(target, write)
    assert str(target) in str(err.value) and "free there" in str(err.value)
    old = target.read_text() if what == "file" else (target / "f").read_text()
    assert old == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["target"]  # no temporary left


def test_an_interrupted_atomic_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "target"
    target.write_text("old")

    def interrupted(tmp):
        tmp.write_text("new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["target"]
