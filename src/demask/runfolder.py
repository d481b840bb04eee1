"""Run folders on disk: what demask owns in one, where its newest checkpoint is, the one atomic
writer, and one lock per folder.

Promises (tests/test_cli_faults.py checks each):

* demask never deletes a file it did not write: `clear_run` removes only `latest`, the
  `checkpoints/step_*` folders and demask's temporary files; `foreign_entries` lists everything
  else, and a fresh run refuses a folder holding any of it (or any `step_*` checkpoint) unless
  asked to start over.
* `latest` is only a pointer: when it is missing, the newest complete `checkpoints/step_*` is the
  run's checkpoint (a run whose `checkpoints/` was copied alone is still found, never wiped).
* Every file demask writes (text, pictures, checkpoint folders) is replaced atomically through
  one function, `atomic_write`: temporary name, fsync, rename; with the usual permissions (0666
  minus the umask, like any other file); a failed write (a full disk) leaves no temporary file and
  raises `WriteError`, one line naming the path and the free space.
* `RunLock`: one writer per run folder (an advisory `flock` on `OUT/.demask.lock`, released by the
  kernel when the process dies, so a lock left by a killed process never blocks).

Nothing here imports torch: the CLI uses it before a model is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
LATEST_FILE = "latest"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".demask.lock"
TMP_PREFIX = ".tmp-"  # every temporary file or folder demask writes starts with this
# what demask writes at the top of a run folder (train, sample, eval, demo)
_RESULTS = ("loss_curve.png", "samples", "eval.json", "demo.json", "demo_eval.json", "samples.png",
            "samples_by_class.png", "demasking.png")  # fmt: skip
OWN_NAMES = frozenset(
    (LATEST_FILE, CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, LOCK_FILE) + _RESULTS
)
_STEP_RE = re.compile(r"step_(\d+)")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or holds another kind of model (one-line message)."""


class WriteError(OSError):
    """Writing a file failed (for example a full disk); the message names the path and the free
    space, and no temporary file is left behind."""

    def __str__(self) -> str:
        return str(self.strerror)


class RunLockedError(OSError):
    """Another process holds the lock of the run folder."""

    def __str__(self) -> str:
        return str(self.strerror)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _human(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def write_error(path: str | Path, err: OSError) -> WriteError:
    """A one-line WriteError for a failed write of `path`: the reason and the free space."""
    if isinstance(err, WriteError):
        return err
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"{_human(shutil.disk_usage(where).free)} free there"
    except OSError:
        free = "free space unknown"
    reason = err.strerror or str(err) or type(err).__name__
    return WriteError(err.errno or errno.EIO, f"could not write {str(path)!r}: {reason} ({free})")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file in a folder and the folder itself."""
    if path.is_dir():
        for entry in path.iterdir():
            _fsync_tree(entry)
        fsync_dir(path)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Replace `path` atomically with what `write(tmp)` puts at `tmp`: a file or a folder.

    The one way demask writes files: `write` fills a temporary name beside `path`
    (`.tmp-NAME-PID-RANDOM`), everything written is fsync'ed, the temporary is renamed onto `path`
    (`os.replace`, atomic on one file system) and the parent folder fsync'ed. Files get the
    permissions of any new file (0666 minus the umask). A folder already at `path` is first moved
    aside (two renames, so replace only a folder no reader relies on) and removed after. When
    anything fails, the temporary is removed, `path` is left as it was and the error is raised
    (an OSError as a WriteError naming `path` and the free space). Returns `path`."""
    path = Path(path)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    old: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        _fsync_tree(tmp)
        if path.is_dir() and not path.is_symlink():
            old = path.parent / f"{TMP_PREFIX}old-{tmp.name[len(TMP_PREFIX) :]}"
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as err:  # a full disk, Ctrl-C...: leave no temporary behind
        _remove(tmp)
        if old is not None and not path.exists():
            os.replace(old, path)
        if isinstance(err, OSError):
            raise write_error(path, err) from None
        raise
    fsync_dir(path.parent)
    if old is not None:
        _remove(old)
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) through `atomic_write`."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# finding the checkpoint of a run


def step_dirs(run_dir: str | Path) -> list[Path]:
    """The `checkpoints/step_*` entries of a run folder, oldest first (complete or not)."""
    ckpts = Path(run_dir) / CHECKPOINTS_DIR
    if not ckpts.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpts.iterdir() if (m := _STEP_RE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def is_complete(ckpt_dir: Path) -> bool:
    """A checkpoint folder holding the files `save_checkpoint` writes (weights and state; a format-1
    checkpoint also has a config.json, which a complete one needs no more)."""
    return all((ckpt_dir / name).is_file() for name in (WEIGHTS_FILE, STATE_FILE))


def read_latest(run_dir: str | Path) -> Path | None:
    """The checkpoint folder named by `run_dir/latest`, or None when there is no such file."""
    pointer = Path(run_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    raw = pointer.read_bytes()
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = ""
    if not re.fullmatch(rf"{CHECKPOINTS_DIR}/step_\d+", text):
        shown = raw[:40] + (b"..." if len(raw) > 40 else b"")
        raise CheckpointError(
            f"{str(pointer)!r} is not a demask 'latest' file: it holds {shown!r}, expected one "
            f"line like '{CHECKPOINTS_DIR}/{step_dir_name(100)}'; delete it to use the newest "
            f"complete checkpoint in {CHECKPOINTS_DIR}/"
        )
    return Path(run_dir) / text


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's checkpoint folder: the one `run_dir/latest` names or, when `latest` is missing,
    the newest complete `checkpoints/step_*`; None when the run has none."""
    target = read_latest(run_dir)
    if target is not None:
        if not (target / WEIGHTS_FILE).is_file():
            pointer = Path(run_dir) / LATEST_FILE
            raise CheckpointError(f"{pointer} points at {target}, which holds no {WEIGHTS_FILE}")
        return target
    complete = [p for p in step_dirs(run_dir) if p.is_dir() and is_complete(p)]
    return complete[-1] if complete else None


# ----------------------------------------------------------------------------------------------
# what demask owns in a run folder


def _is_demask_config(path: Path) -> bool:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and "model" in payload


def foreign_entries(run_dir: str | Path) -> list[str]:
    """The entries of a run folder that demask did not write (relative paths, sorted)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for entry in sorted(run_dir.iterdir()):
        name = entry.name
        if name.startswith(TMP_PREFIX):
            continue
        if name not in OWN_NAMES or (name == CONFIG_FILE and not _is_demask_config(entry)):
            found.append(name)
        elif name == CHECKPOINTS_DIR:
            if not entry.is_dir():
                found.append(name)
                continue
            for sub in sorted(entry.iterdir()):
                if not (sub.name.startswith(TMP_PREFIX) or _STEP_RE.fullmatch(sub.name)):
                    found.append(f"{CHECKPOINTS_DIR}/{sub.name}")
    return found


def check_fresh_start(run_dir: str | Path, *, overwrite: bool) -> None:
    """Raise FileExistsError unless a new run may start in `run_dir`: the folder is new, or holds
    only files demask wrote and no `step_*` checkpoint (complete or not); `overwrite` allows
    both (and even then only demask's own files are removed)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"out {str(run_dir)!r} is a file, expected a folder")
    if overwrite:
        return
    ckpts = step_dirs(run_dir)
    if ckpts:
        raise FileExistsError(
            f"out {str(run_dir)!r} already holds a checkpoint ({ckpts[-1].name}); resume it "
            "(resume=True) or start over (overwrite=True), or pick another folder"
        )
    foreign = foreign_entries(run_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise FileExistsError(
            f"out {str(run_dir)!r} holds files demask did not write ({shown}); pick a new or "
            "empty folder, or start over there with overwrite=True (which still removes only "
            "demask's own files)"
        )


def clear_run(run_dir: str | Path) -> None:
    """Remove demask's checkpoints, `latest` and temporary files from a run folder (to start a
    run over); nothing demask did not write is touched."""
    run_dir = Path(run_dir)
    (run_dir / LATEST_FILE).unlink(missing_ok=True)
    ckpts = run_dir / CHECKPOINTS_DIR
    if ckpts.is_dir():
        for entry in ckpts.iterdir():
            if entry.is_dir() and (
                _STEP_RE.fullmatch(entry.name) or entry.name.startswith(TMP_PREFIX)
            ):
                shutil.rmtree(entry, ignore_errors=True)
        with contextlib.suppress(OSError):
            ckpts.rmdir()  # only when empty
    for entry in run_dir.glob(TMP_PREFIX + "*"):
        if entry.is_file():
            entry.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# one writer per run folder


class RunLock:
    """An exclusive lock on a run folder: `OUT/.demask.lock`, held with `flock` and holding the
    owner's pid. The kernel drops the lock when its process dies, so a stale file never blocks.

    acquire() creates the folder if needed; release(remove_created=True) removes the folders it
    created when they are still empty (a start that failed leaves nothing behind)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.created: list[Path] = []

    def acquire(self) -> RunLock:
        missing = []
        for folder in (self.run_dir, *self.run_dir.parents):
            if folder.exists():
                break
            missing.append(folder)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise FileExistsError(f"out {str(self.run_dir)!r} is a file, expected a folder")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(self.run_dir, err) from None
        self.created = missing
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise RunLockedError(
                    errno.EBUSY,
                    f"another demask process (pid {pid}) is writing to {self.run_dir}; wait for "
                    "it to end or pick another --out",
                ) from None
            try:  # the previous holder may have removed the file between our open and flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self, *, remove_created: bool = False) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        if remove_created:
            for folder in self.created:  # innermost first
                try:
                    folder.rmdir()
                except OSError:
                    break
