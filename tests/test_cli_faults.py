"""The CLI under hostile input and faults (issue 12): every case ends in one line on stderr and
exit code 2 (or does the right thing), and every case that could lose data hashes the run folder
before and after to prove that nothing was lost or changed.

Runs are tiny (dim 16, one layer, 4 steps on digits), so the whole file stays fast.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from demask.checkpoint import load_checkpoint
from demask.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dim", "16", "--depth", "1", "--heads", "2", "--batch-size", "8", "--quiet", "--no-plot"]
STEP4 = "checkpoints/step_00000004"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, command: str, *needles: str) -> str:
    """Assert exit 2 and one line `demask COMMAND: error: ...` holding every needle."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"demask {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (folders too, as 'dir')."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(folder.rglob("*"))
    }


def train_argv(out: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["train", "--data", "digits", "--steps", str(steps), "--out", str(out), *TINY, *extra]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished masked run on digits: 4 steps, checkpoints at 2 and 4."""
    run = tmp_path_factory.mktemp("faults") / "run"
    assert main(train_argv(run, "--save-every", "2", "--val-every", "4")) == 0
    assert (run / "latest").read_text().strip() == STEP4
    return run


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    """A private copy of the base run."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory) -> Path:
    """An autoregressive run on a small text file, seq_len 16."""
    base = tmp_path_factory.mktemp("ar")
    data = base / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    run = base / "run"
    argv = ["train", "--model", "autoregressive", "--data", data, "--seq-len", "16"]
    assert main([str(a) for a in argv] + ["--steps", "2", "--out", str(run), *TINY]) == 0
    return run


# ------------------------------------------------------------------------------ 1: data loss


def test_fresh_train_refuses_a_folder_holding_files_demask_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "my_model.bin").write_bytes(b"precious")
    (out / "notes.txt").write_text("my notes")
    before = digest(out)
    code, _, err = run_cli(capsys, *train_argv(out, steps=1))
    one_line_error(code, err, "train", "did not write", "checkpoints/my_model.bin", "notes.txt")
    assert digest(out) == before


def test_a_run_whose_latest_is_lost_is_found_not_wiped(run, capsys, tmp_path):
    (run / "latest").unlink()
    before = digest(run)
    code, _, err = run_cli(capsys, *train_argv(run, steps=1))
    one_line_error(code, err, "train", "already holds a checkpoint", "step_00000004")
    assert digest(run) == before
    # the newest complete step_* is the run's checkpoint: sample and resume find it
    assert load_checkpoint(run).step == 4
    code, out, err = run_cli(capsys, "train", "--resume", "--steps", "5", "--out", run, "--quiet")
    assert code == 0, err
    assert (run / "latest").read_text().strip() == "checkpoints/step_00000005"


def test_checkpoints_copied_alone_are_never_wiped(base_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(base_run / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / STEP4)  # only the older checkpoint, and an incomplete newer one
    (out / "checkpoints/step_00000009").mkdir()
    (out / "checkpoints/step_00000009/model.safetensors").write_bytes(b"half")
    before = digest(out)
    code, _, err = run_cli(capsys, *train_argv(out, steps=1))
    one_line_error(code, err, "train", "already holds a checkpoint")
    assert digest(out) == before
    assert load_checkpoint(out).step == 2  # the newest COMPLETE one


def test_overwrite_removes_only_what_demask_wrote(run, capsys):
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "mine.bin").write_bytes(b"mine")
    code, _, err = run_cli(capsys, *train_argv(run, "--overwrite", steps=1))
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "checkpoints" / "mine.bin").read_bytes() == b"mine"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["mine.bin", "step_00000001"]


# ------------------------------------------------------------------------------ 2: validate first


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--schedule", "foo"], "schedule"),
        (["--seed", str(2**70)], "--seed"),
        (["--batch-size", str(10**12)], "out of memory"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_overwrite_with_a_bad_option_keeps_the_old_run(run, capsys, extra, needle):
    before = digest(run)
    code, _, err = run_cli(capsys, *train_argv(run, "--overwrite", *extra, steps=1))
    one_line_error(code, err, "train", needle)
    assert digest(run) == before


@pytest.mark.parametrize(
    "extra", [["--schedule", "foo"], ["--batch-size", str(10**12)], ["--warmup-steps", "-1"]]
)
def test_a_failing_start_leaves_no_folder_behind(tmp_path, capsys, extra):
    out = tmp_path / "new" / "run"
    code, _, err = run_cli(capsys, *train_argv(out, *extra, steps=1))
    assert code == 2, err
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------ 3, 5, 11: loading


def test_a_weights_file_path_loads_that_file(run, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(train_argv(other, "--dim", "32", steps=1)) == 0
    target = run / STEP4 / "other.safetensors"
    shutil.copy(other / "checkpoints/step_00000001/model.safetensors", target)
    ckpt = load_checkpoint(target)
    assert ckpt.model_config.dim == 32 and ckpt.step == 1
    code, _, err = run_cli(
        capsys, "sample", "--checkpoint", target, "--num", "2", "--out", tmp_path
    )
    assert code == 0, err
    # a weights file without a demask config in its metadata is named, not replaced
    bare = run / STEP4 / "bare.safetensors"
    save_file({"x": torch.zeros(2)}, str(bare))
    code, _, err = run_cli(capsys, "sample", "--checkpoint", bare)
    one_line_error(code, err, "sample", "bare.safetensors", "no demask config")


def _rewrite_weights(path: Path, change, change_meta=lambda meta: meta) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    save_file(change(tensors), str(path), metadata=change_meta(meta))


def test_nan_weights_are_refused_on_load_naming_the_tensor(run, capsys):
    name = "net.token_emb.weight"

    def poison(t):
        t[name][0, 0] = float("nan")
        return t

    _rewrite_weights(run / STEP4 / "model.safetensors", poison)
    before = digest(run)
    for command in ("sample", "eval"):
        code, _, err = run_cli(capsys, command, "--checkpoint", run, "--num", "2")
        one_line_error(code, err, command, "NaN/inf", name)
    code, _, err = run_cli(capsys, "train", "--resume", "--steps", "6", "--out", run, "--quiet")
    one_line_error(code, err, "train", "NaN/inf", name)
    assert digest(run) == before


def _edit_config(run: Path, edit) -> None:
    """Edit the checkpoint's one copy of its configs, in its weights' metadata."""

    def change_meta(meta):
        cfg = json.loads(meta["demask_config"])
        edit(cfg)
        return {**meta, "demask_config": json.dumps(cfg)}

    _rewrite_weights(run / STEP4 / "model.safetensors", lambda t: t, change_meta)


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (lambda c: c["model"].pop("schedule"), ["missing", "schedule"]),
        (lambda c: c["train"].pop("data"), ["missing", "data"]),
        (lambda c: c.update(extra=1), ["unknown", "extra"]),
        (lambda c: c.pop("train"), ["train"]),
        (lambda c: c.update(format_version=99), ["format_version 99", "newer"]),
    ],
)
def test_a_saved_config_with_missing_or_unknown_keys_is_refused(run, capsys, edit, needles):
    _edit_config(run, edit)
    code, _, err = run_cli(capsys, "sample", "--checkpoint", run, "--num", "2")
    one_line_error(code, err, "sample", "model.safetensors", "no valid config", *needles)


def test_config_json_records_a_format_version_and_is_0644(run, tmp_path, capsys):
    from demask.config import CONFIG_FORMAT_VERSION

    with safe_open(str(run / STEP4 / "model.safetensors"), framework="pt") as f:
        saved = f.metadata()["demask_config"]
    for text in ((run / "config.json").read_text(), saved):
        assert json.loads(text)["format_version"] == CONFIG_FORMAT_VERSION
    old = os.umask(0o022)
    try:
        out = tmp_path / "modes"
        assert main(train_argv(out, steps=1)) == 0
        json_out = tmp_path / "eval.json"
        argv = ["eval", "--checkpoint", out, "--num", "2", "--max-batches", "1", "--json", json_out]
        assert run_cli(capsys, *argv)[0] == 0
    finally:
        os.umask(old)
    for path in (out / "config.json", out / "latest", out / "metrics.jsonl", json_out):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# ------------------------------------------------------------------------------ 12: option misuse


@pytest.mark.parametrize(("option", "needle"), [("--data", "--data"), ("--out", "--out")])
def test_empty_data_or_out_is_an_error(tmp_path, capsys, monkeypatch, option, needle):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", "digits", "--steps", "1", "--out", tmp_path / "x", *TINY]
    argv[argv.index(option) + 1] = ""
    code, _, err = run_cli(capsys, *argv)
    one_line_error(code, err, "train", needle, "''")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("which", "option"),
    [
        ("ar", ["--sampler", "confidence"]),
        ("ar", ["--steps", "4"]),
        ("ar", ["--anneal"]),
        ("masked", ["--length", "4"]),
    ],
)
def test_options_of_the_other_model_kind_are_errors(base_run, ar_run, capsys, which, option):
    ckpt = ar_run if which == "ar" else base_run
    code, _, err = run_cli(capsys, "sample", "--checkpoint", ckpt, "--num", "2", *option)
    kind = "masked" if which == "ar" else "autoregressive"
    one_line_error(code, err, "sample", option[0], f"{kind} models only")


def test_resume_with_fewer_steps_than_done_is_an_error(run, capsys):
    before = digest(run)
    code, _, err = run_cli(
        capsys, "train", "--resume", "--train-steps", "2", "--out", run, "--quiet"
    )
    one_line_error(code, err, "train", "--train-steps 2", "already at step 4")
    assert digest(run) == before


# ------------------------------------------------------------------------------ 13: full disk


def test_a_full_disk_during_a_checkpoint_leaves_no_temp_files(run, capsys, monkeypatch):
    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("demask.checkpoint.save_file", full_disk)
    keep = {k: v for k, v in digest(run).items() if k.startswith(STEP4) or k == "latest"}
    code, _, err = run_cli(capsys, "train", "--resume", "--steps", "5", "--out", run, "--quiet")
    one_line_error(code, err, "train", "No space left on device", "step_00000005", "free")
    after = digest(run)
    assert {k: after[k] for k in keep} == keep  # the previous checkpoint and latest intact
    assert not [p for p in run.rglob("*") if p.name.startswith(".tmp-")]
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "train", "--resume", "--steps", "5", "--out", run, "--quiet")
    assert code == 0, err


def test_a_full_disk_while_writing_a_text_file_names_it_and_cleans_up(tmp_path, monkeypatch):
    from demask.runfolder import WriteError, atomic_write_text

    path = tmp_path / "config.json"
    path.write_text("old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(WriteError, match="No space left on device") as info:
        atomic_write_text(path, "new")
    assert str(path) in str(info.value) and "free there" in str(info.value)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# ------------------------------------------------------------------------------ 14: one writer


def test_a_second_writer_is_refused_by_name(run, capsys):
    from demask.runfolder import RunLock

    before = digest(run)
    lock = RunLock(run).acquire()
    try:
        code, _, err = run_cli(capsys, "train", "--resume", "--steps", "6", "--out", run)
        one_line_error(code, err, "train", f"another demask process (pid {os.getpid()})", str(run))
    finally:
        lock.release()
    assert digest(run) == before


def test_a_lock_left_by_a_killed_process_does_not_block(run, capsys):
    script = (
        "import time\nfrom demask.runfolder import RunLock\n"
        f"RunLock({str(run)!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli(capsys, "train", "--resume", "--steps", "5", "--out", run)
        one_line_error(code, err, "train", f"(pid {holder.pid})")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / ".demask.lock").is_file()  # left behind by the killed process
    code, _, err = run_cli(capsys, "train", "--resume", "--steps", "5", "--out", run, "--quiet")
    assert code == 0, err
    assert not (run / ".demask.lock").exists()


# ------------------------------------------------------------------------------ 15: metrics log


def test_a_torn_last_metrics_line_is_dropped_on_resume(run, capsys):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "st')
    code, _, err = run_cli(capsys, "train", "--resume", "--steps", "5", "--out", run, "--quiet")
    assert code == 0, err
    assert "torn last line" in err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 5


def test_a_torn_middle_metrics_line_is_refused_naming_the_file(run, capsys):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines.insert(1, '{"type": "tr')
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = digest(run)
    code, _, err = run_cli(capsys, "train", "--resume", "--steps", "5", "--out", run, "--quiet")
    one_line_error(code, err, "train", "metrics.jsonl", "line 2")
    assert digest(run) == before


# ------------------------------------------------------------------------------ 16: special files


@pytest.fixture
def alarm():
    """Fail instead of hanging: SIGALRM after 20 s."""

    def ring(signum, frame):
        raise TimeoutError("hung")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_data_that_is_not_a_regular_file_is_refused(tmp_path, capsys, alarm, kind):
    if kind == "device":
        data = Path("/dev/zero")
    else:
        data = tmp_path / "pipe"
        os.mkfifo(data)
    argv = ["train", "--data", data, "--seq-len", "16", "--steps", "1", "--out", tmp_path / "o"]
    code, _, err = run_cli(capsys, *argv, *TINY)
    one_line_error(code, err, "train", str(data), "not a regular file")


# ------------------------------------------------------------------------------ 17, 18: messages


@pytest.mark.parametrize("device", ["tpu", "cuda:-1", "meta"])
def test_a_bad_device_is_one_line(base_run, tmp_path, capsys, device):
    code, _, err = run_cli(capsys, *train_argv(tmp_path / "o", "--device", device, steps=1))
    one_line_error(code, err, "train", f"--device {device!r}")
    code, _, err = run_cli(capsys, "sample", "--checkpoint", base_run, "--device", device)
    one_line_error(code, err, "sample", f"--device {device!r}")


def test_huge_num_is_one_line(base_run, capsys):
    code, _, err = run_cli(capsys, "sample", "--checkpoint", base_run, "--num", str(10**12))
    one_line_error(code, err, "sample", "out of memory", f"--num {10**12}")


@pytest.mark.parametrize("change", ["renamed", "reshaped"])
def test_resume_from_mismatched_weights_lists_the_tensors(run, capsys, change):
    name = "net.token_emb.weight"

    def edit(t):
        if change == "renamed":
            t["net.token_emb.renamed"] = t.pop(name)
        else:
            t[name] = t[name][:-1].clone()
        return t

    _rewrite_weights(run / STEP4 / "model.safetensors", edit)
    before = digest(run)
    code, _, err = run_cli(capsys, "train", "--resume", "--steps", "6", "--out", run, "--quiet")
    needles = (
        [name, "net.token_emb.renamed"]
        if change == "renamed"
        else [name, "saved (17, 16), expected (18, 16)"]
    )
    one_line_error(code, err, "train", "does not match", *needles)
    assert digest(run) == before


def test_resume_with_another_models_optimiser_state_is_one_line(run, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(train_argv(other, "--dim", "32", steps=1)) == 0
    shutil.copy(other / "checkpoints/step_00000001/state.pt", run / STEP4 / "state.pt")
    before = digest(run)
    code, _, err = run_cli(capsys, "train", "--resume", "--steps", "6", "--out", run, "--quiet")
    one_line_error(code, err, "train", "state.pt", "optimiser state")
    assert digest(run) == before


def test_garbage_state_pt_never_repeats_torchs_unsafe_advice(run, capsys):
    (run / STEP4 / "state.pt").write_bytes(b"\x80\x04garbage" * 10)
    before = digest(run)
    code, _, err = run_cli(capsys, "train", "--resume", "--steps", "6", "--out", run, "--quiet")
    line = one_line_error(code, err, "train", "state.pt", "corrupt")
    assert "weights_only" not in line
    assert digest(run) == before


def test_a_binary_latest_is_named(run, capsys):
    (run / "latest").write_bytes(b"\xff\xfe\x00garbage")
    before = digest(run)
    for argv, command in [
        (["sample", "--checkpoint", run], "sample"),
        (["train", "--resume", "--steps", "6", "--out", run, "--quiet"], "train"),
        (train_argv(run, steps=1), "train"),
    ]:
        code, _, err = run_cli(capsys, *argv)
        one_line_error(code, err, command, str(run / "latest"), "expected one line")
    assert digest(run) == before


@pytest.mark.parametrize("command", ["train", "sample"])
def test_a_huge_seed_names_the_option(base_run, tmp_path, capsys, command):
    argv = train_argv(tmp_path / "o", steps=1) if command == "train" else ["sample"]
    if command == "sample":
        argv += ["--checkpoint", str(base_run)]
    code, _, err = run_cli(capsys, *argv, "--seed", str(2**70))
    assert code == 2 and "--seed" in err and "2**63 - 1" in err, err
    assert "Overflow" not in err


def test_invalid_utf8_in_a_prompt_names_the_option(ar_run, capsys):
    prompt = b"the \xff fox".decode("utf-8", "surrogateescape")  # as argv arrives on Linux
    code, _, err = run_cli(capsys, "sample", "--checkpoint", ar_run, "--prompt", prompt)
    one_line_error(code, err, "sample", "--prompt", "UTF-8")


def test_an_ar_prompt_longer_than_the_sequence_blames_the_prompt(ar_run, capsys):
    code, _, err = run_cli(capsys, "sample", "--checkpoint", ar_run, "--prompt", "x" * 20)
    line = one_line_error(code, err, "sample", "--prompt: 20 tokens", "sequence length is 16")
    assert "--length" not in line


def test_every_torch_load_is_weights_only():
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("weights_only") == "True", f"{path}:{node.lineno}"
