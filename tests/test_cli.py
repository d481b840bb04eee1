"""CLI smoke tests in temporary folders: train / resume / sample / eval on every kind of data, and
every bad-input case ends with one line on stderr and exit code 2, leaving checkpoints untouched.

The CLI runs in-process (`main(argv)`) except for one `python -m demask` subprocess. Models are
tiny and runs a handful of steps, so the whole file stays fast.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from demask.cli import COMMANDS, Command, main, register
from demask.cli._common import parse_prompt
from demask.metrics import real_digits_quality

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dim", "16", "--depth", "1", "--heads", "2", "--batch-size", "8", "--quiet"]
TRAIN_KEYS = {"type", "step", "loss", "lr", "tokens_per_s", "grad_norm"}
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hex",
]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def grid_size(n: int, ncols: int, cell: int = 8, scale: int = 6, pad: int = 1) -> tuple[int, int]:
    """Pixel size of demask.pictures' grids: (width, height)."""
    rows = -(-n // ncols)
    return ncols * (cell * scale + pad) + pad, rows * (cell * scale + pad) + pad


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tree_digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def write_text_folder(folder: Path, files: int = 4, words: int = 400) -> Path:
    """A small folder of English-like text files (deterministic)."""
    folder.mkdir(parents=True)
    for i in range(files):
        text = " ".join(WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(words))
        (folder / f"part_{i}.txt").write_text(text + "\n")
    return folder


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A masked run on digits, 4 steps."""
    run = tmp_path_factory.mktemp("digits") / "run"
    code = main(
        ["train", "--data", "digits", "--steps", "4", "--val-every", "2", "--out", str(run), *TINY]
    )
    assert code == 0
    return run


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory) -> dict[str, Path]:
    """A masked and an autoregressive run on the same small text folder (seq_len 16)."""
    base = tmp_path_factory.mktemp("text")
    data = write_text_folder(base / "texts")
    runs = {}
    for kind in ("masked", "autoregressive"):
        runs[kind] = base / kind
        argv = ["train", "--model", kind, "--data", str(data), "--seq-len", "16", "--steps", "3"]
        assert main([*argv, "--out", str(runs[kind]), *TINY]) == 0
    runs["data"] = data
    return runs


# ------------------------------------------------------------------------------------ help


def test_python_m_demask_help_in_a_subprocess():
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "demask", "--help"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    for name in ("train", "sample", "eval", "demo"):
        assert name in done.stdout


@pytest.mark.parametrize("command", ["train", "sample", "eval", "demo"])
def test_every_subcommand_explains_itself(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert f"usage: demask {command}" in out and "Example" in out


def test_no_command_prints_help_and_exits_2(capsys):
    code, _, err = run_cli(capsys)
    assert code == 2 and "usage: demask" in err


def test_a_registered_command_runs():
    seen = []
    register(
        Command(
            "hello",
            "say hello",
            "Says hello.",
            lambda p: p.add_argument("--x"),
            lambda a: seen.append(a.x) or 0,
        )
    )
    try:
        assert main(["hello", "--x", "7"]) == 0
        assert seen == ["7"]
    finally:
        COMMANDS.pop("hello")


def test_parse_prompt_holes():
    enc = lambda s: list(s.encode())  # noqa: E731
    assert parse_prompt("ab[MASK]c[MASK:3]", enc) == [97, 98, None, 99, None, None, None]
    assert parse_prompt("[MASK:2]", enc) == [None, None]
    assert parse_prompt("no holes", enc) == list(b"no holes")


# ------------------------------------------------------------------------------------ digits


def test_train_digits_writes_checkpoint_metrics_and_loss_curve(digits_run):
    assert (digits_run / "latest").read_text().strip() == "checkpoints/step_00000004"
    assert (digits_run / "checkpoints" / "step_00000004" / "model.safetensors").is_file()
    records = metrics(digits_run)
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [4] or set(r["step"] for r in train) <= {1, 2, 3, 4}
    assert all(set(r) >= TRAIN_KEYS for r in train)
    assert [r["step"] for r in records if r["type"] == "val"] == [2, 4]
    assert all(r["val_bits_per_token"] > 0 for r in records if r["type"] == "val")
    assert png_size(digits_run / "loss_curve.png") == (640, 400)


def test_resume_continues_the_run(digits_run, tmp_path, capsys):
    run = tmp_path / "run"
    code, *_ = run_cli(capsys, "train", "--data", "digits", "--steps", "2", "--out", run, *TINY)
    assert code == 0
    code, out, _ = run_cli(capsys, "train", "--resume", "--steps", "4", "--out", run, "--quiet")
    assert code == 0, out
    assert "step 4/4" in out
    assert (run / "latest").read_text().strip() == "checkpoints/step_00000004"
    steps = [r["step"] for r in metrics(run) if r["type"] == "train"]
    assert steps == sorted(steps) and steps[-1] == 4
    # the resumed run equals the uninterrupted one (same seed): same losses, same weights
    losses = {r["step"]: r["loss"] for r in metrics(run) if r["type"] == "train"}
    assert losses[4] == next(r["loss"] for r in metrics(digits_run) if r.get("step") == 4)
    a = load_file(run / "checkpoints/step_00000004/model.safetensors")
    b = load_file(digits_run / "checkpoints/step_00000004/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_with_muon_records_it_and_resume_refuses_another_optimizer(tmp_path, capsys):
    run = tmp_path / "muon"
    argv = ["train", "--data", "digits", "--out", run, *TINY]
    code, out, _ = run_cli(
        capsys, *argv, "--steps", "2", "--optimizer", "muon", "--muon-rms", "0.5"
    )
    assert code == 0, out
    train_cfg = json.loads((run / "config.json").read_text())["train"]
    assert (train_cfg["optimizer"], train_cfg["muon_rms"], train_cfg["muon_momentum"]) == (
        "muon", 0.5, 0.95)  # fmt: skip
    code, out, err = run_cli(
        capsys, "train", "--resume", "--steps", "3", "--out", run, "--optimizer", "adamw"
    )
    assert code == 2 and "optimizer='adamw', but the run" in out + err
    assert (run / "latest").read_text().strip() == "checkpoints/step_00000002"
    code, out, _ = run_cli(capsys, "train", "--resume", "--steps", "3", "--out", run, "--quiet")
    assert code == 0 and "step 3/3" in out  # resumes with the saved optimiser
    code, out, err = run_cli(capsys, *argv, "--steps", "2", "--optimizer", "lion")
    assert code == 2 and "optimizer must be one of ['adamw', 'muon'], got 'lion'" in out + err


def test_sample_digits_writes_grid_and_strip(digits_run, tmp_path, capsys):
    code, out, _ = run_cli(
        capsys,
        "sample",
        "--checkpoint",
        digits_run,
        "--num",
        "12",
        "--out",
        tmp_path,
        "--steps",
        "6",
    )
    assert code == 0
    assert png_size(tmp_path / "samples.png") == grid_size(12, 8)
    # 4 sequences, 7 states each (the fully masked start + 6 steps)
    assert png_size(tmp_path / "demasking.png") == grid_size(4 * 7, 7)
    assert "samples.png" in out


def test_sample_is_reproducible_with_a_seed(digits_run, tmp_path, capsys):
    for name in ("a", "b"):
        argv = ["sample", "--checkpoint", digits_run, "--num", "4", "--seed", "3"]
        assert run_cli(capsys, *argv, "--out", tmp_path / name)[0] == 0
    assert (tmp_path / "a/samples.png").read_bytes() == (tmp_path / "b/samples.png").read_bytes()


def test_eval_digits_writes_json(digits_run, tmp_path, capsys):
    path = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", digits_run, "--num", "16", "--max-batches", "1", "--json", path]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    res = json.loads(path.read_text())
    assert res["model"] == "masked" and res["likelihood"] == "nelbo" and res["step"] == 4
    assert res["tokens_scored"] == 64 * 64  # one batch of 64 validation digits
    assert 0 < res["bits_per_token"] < 10
    q = res["quality"]
    assert {"mean_top_prob", "class_entropy_bits", "frechet_distance", "class_counts"} <= set(q)
    assert sum(q["class_counts"]) == 16
    assert "nelbo bits/token" in out


# ------------------------------------------------------------------------------------ text


def test_train_python_stdlib_autoregressive(tmp_path, capsys):
    run = tmp_path / "stdlib"
    argv = ["train", "--model", "autoregressive", "--data", "python-stdlib", "--seq-len", "16"]
    code, out, _ = run_cli(
        capsys, *argv, "--max-bytes", "20000", "--steps", "2", "--out", run, *TINY
    )
    assert code == 0, out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["kind"] == "autoregressive" and cfg["train"]["data"] == "python-stdlib"
    code, out, _ = run_cli(capsys, "sample", "--checkpoint", run, "--num", "2", "--prompt", "def ")
    assert code == 0
    samples = (run / "samples" / "samples.txt").read_text().split("-" * 30 + " sample ")[1:]
    assert len(samples) == 2 and all(s.split("\n", 1)[1].startswith("def ") for s in samples)


def test_text_folder_sample_infill_and_eval(text_runs, tmp_path, capsys):
    masked, ar = text_runs["masked"], text_runs["autoregressive"]
    code, out, _ = run_cli(
        capsys,
        "sample",
        "--checkpoint",
        masked,
        "--num",
        "3",
        "--prompt",
        "the[MASK:4]fox",
        "--out",
        tmp_path,
    )
    assert code == 0
    bodies = [s.split("\n", 1)[1] for s in out.split("-" * 30 + " sample ")[1:]]
    assert len(bodies) == 3 and all(b.startswith("the") for b in bodies)
    raw = (tmp_path / "samples.txt").read_text()
    assert raw.count("fox") >= 3
    path = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", masked, "--ar-checkpoint", ar, "--num", "4", "--json", path]
    code, out, _ = run_cli(capsys, *argv, "--max-batches", "2")
    assert code == 0
    res = json.loads(path.read_text())
    assert res["likelihood"] == "nelbo" and res["tokens_scored"] == 2 * 64 * 16
    q = res["quality"]
    assert q["gen_perplexity"] > 1 and 0 < q["unigram_entropy_bits"] <= 8
    assert 0 < q["reference_unigram_entropy_bits"] <= 8
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", ar, "--num", "2", "--json", path)
    assert code == 0 and json.loads(path.read_text())["likelihood"] == "exact_nll"


def test_text_sample_with_the_dilated_rule_in_few_steps(text_runs, tmp_path, capsys):
    argv = ["sample", "--checkpoint", text_runs["masked"], "--num", "2", "--seed", "1"]
    opts = ["--sampler", "dilated", "--decode-steps", "3", "--anneal", "--filter-thres", "0.7"]
    for name in ("a", "b"):
        code, out, _ = run_cli(capsys, *argv, *opts, "--prompt", "the[MASK:6]fox",
                               "--out", tmp_path / name)  # fmt: skip
        assert code == 0, out
        bodies = [s.split("\n", 1)[1] for s in out.split("-" * 30 + " sample ")[1:]]
        assert len(bodies) == 2 and all(b.startswith("the") for b in bodies)
    assert (tmp_path / "a/samples.txt").read_text() == (tmp_path / "b/samples.txt").read_text()


# ------------------------------------------------------------------------------------ bad input


def assert_one_line_error(code: int, err: str, command: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"demask {command}: error: ") or lines[0].startswith(
        "demask: error:"
    )
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


BAD_DATA = {  # case -> (file name, contents or None for a folder / nothing)
    "missing": ("no_such_file.txt", None),
    "empty file": ("empty.txt", b""),
    "empty folder": ("empty_dir", "folder"),
    "binary": ("blob.bin", bytes(range(256)) * 8),
    "too short": ("short.txt", b"tiny text"),
}


def bad_data(tmp_path: Path, case: str) -> Path:
    """A data path for each bad-input case."""
    name, contents = BAD_DATA[case]
    path = tmp_path / name
    if contents == "folder":
        path.mkdir()
    elif isinstance(contents, bytes):
        path.write_bytes(contents)
    return path


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing", "neither a built-in dataset"),
        ("empty file", "is empty"),
        ("empty folder", "is empty"),
        ("binary", "looks binary"),
        ("too short", "shorter than one sequence"),
    ],
)
def test_bad_data_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case, needle):
    data, out = bad_data(tmp_path, case), tmp_path / "out"
    argv = ["train", "--data", data, "--seq-len", "64", "--steps", "1", "--out", out, *TINY]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "train", needle)
    assert not out.exists()


def test_unknown_option_exit_2(capsys):
    code, _, err = run_cli(capsys, "train", "--no-such-option")
    assert_one_line_error(code, err, "train", "--no-such-option")


def test_bad_checkpoints_exit_2_and_stay_untouched(digits_run, text_runs, tmp_path, capsys):
    before = tree_digest(digits_run)
    cases = [
        # another model kind
        (
            ["train", "--resume", "--model", "autoregressive", "--out", digits_run],
            "train",
            "holds a 'masked' model",
        ),
        (
            ["eval", "--checkpoint", text_runs["masked"], "--ar-checkpoint", text_runs["masked"]],
            "eval",
            "expected 'autoregressive'",
        ),
        # a run folder that already holds a checkpoint, without --resume
        (
            ["train", "--data", "digits", "--steps", "1", "--out", digits_run, *TINY],
            "train",
            "already holds a checkpoint",
        ),
        # the demo never overwrites a run it did not write
        (["demo", "--out", digits_run, "--steps", "1"], "demo", "did not write"),
        # no checkpoint at all
        (["sample", "--checkpoint", tmp_path], "sample", "no checkpoint"),
        (["sample", "--checkpoint", tmp_path / "missing"], "sample", "does not exist"),
        # holes for an autoregressive model
        (
            ["sample", "--checkpoint", text_runs["autoregressive"], "--prompt", "a[MASK]b"],
            "sample",
            "need a masked model",
        ),
    ]
    for argv, command, needle in cases:
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, command, needle)
    assert tree_digest(digits_run) == before


def test_corrupt_checkpoint_exit_2_and_not_overwritten(digits_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    weights = run / "checkpoints/step_00000004/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = tree_digest(run)
    for argv, command in [
        (["sample", "--checkpoint", run], "sample"),
        (["eval", "--checkpoint", weights], "eval"),
        (["train", "--resume", "--steps", "8", "--out", run, "--quiet"], "train"),
    ]:
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, command, "corrupt")
    assert tree_digest(run) == before


@pytest.mark.slow
def test_demo_writes_pictures_and_numbers(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, _ = run_cli(
        capsys, "demo", "--out", out, "--steps", "3", "--num", "16", "--quiet"
    )
    assert code == 0
    assert png_size(out / "samples.png") == grid_size(16, 8)  # unconditional
    assert png_size(out / "samples_by_class.png") == grid_size(10 * 8, 8)  # a row per class
    assert png_size(out / "demasking.png") == grid_size(4 * 10, 10)  # 65 states, 10 shown
    assert png_size(out / "loss_curve.png") == (640, 400)
    record = (out / "demo_eval.json").read_text()
    res = json.loads(record)
    assert res["step"] == 3
    # 200 scored each way (16 drawn without a class), and 200 real digits as the yardstick
    assert res["conditional"]["num_images"] == res["unconditional"]["num_images"] == 200
    assert res["real_digits"] == real_digits_quality(200)
    assert 0.0 <= res["conditional"]["class_accuracy"] <= 1.0
    assert "NELBO bits/pixel" in stdout and str(out / "samples_by_class.png") in stdout
    # `demask eval` on the demo's folder writes its own eval.json beside the demo's record
    assert run_cli(capsys, "eval", "--checkpoint", out, "--num", "4")[0] == 0
    assert (out / "demo_eval.json").read_text() == record
    assert json.loads((out / "eval.json").read_text())["quality"]["num_images"] == 4
    # a second demo may overwrite the first one's folder
    assert run_cli(capsys, "demo", "--out", out, "--steps", "1", "--num", "4", "--quiet")[0] == 0
