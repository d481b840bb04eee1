"""Checkpoints that survive being killed, and rebuilding a model from a checkpoint alone.

Layout of a run folder (checkpoint format 2):

    run/latest                           one line: "checkpoints/step_00000100" (written LAST)
    run/checkpoints/step_00000100/
        model.safetensors                the weights (fp32); its metadata holds the configs (the
                                         checkpoint's one copy), the step and the format version
        state.pt                         optimiser state and step (torch.save of a dict)

Format 1 (demask before issue 13) also wrote the configs into a `config.json` beside the weights
and RNG states into state.pt. Both still load: a folder's config.json is read where there is one,
and RNG states are ignored (a run's randomness is a function of its seed and step, see
`demask.train`, so nothing needs restoring).

Atomicity: the checkpoint folder is written through `runfolder.atomic_write` (a temporary folder
`checkpoints/.tmp-step_...` beside it, every file fsync'ed, renamed into place), and only then is
`latest` replaced (the same writer). A process killed at any moment (SIGKILL included) leaves
`latest` pointing at the previous, complete checkpoint; a stale temporary folder is removed by the
next save. A write that fails (a full disk) removes its temporary folder and raises
`runfolder.WriteError` naming the path and the free space. When `latest` is missing, the newest
complete `step_*` is the run's checkpoint.

Loading refuses weights that do not fit the config (listing the tensors) or hold NaN/inf values.
The run folder's rules (what demask owns, the lock) are in `demask.runfolder`; saving and restoring
a (distributed) training run is in `demask.training_state`.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from demask.config import ModelConfig, TrainConfig, build_model, configs_from_json, configs_to_json
from demask.runfolder import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LATEST_FILE,
    STATE_FILE,
    TMP_PREFIX,
    WEIGHTS_FILE,
    CheckpointError,
    atomic_write,
    atomic_write_text,
    clear_run,
    latest_checkpoint,
    read_latest,
    step_dir_name,
)

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "Checkpoint",
    "clear_run",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "resolve_checkpoint",
    "checkpoint_configs",
    "check_weights",
    "read_configs",
    "read_state",
    "read_weights",
    "step_dir_name",
]

FORMAT_VERSION = 2  # of the checkpoint layout above; a reader refuses a newer one
_FORMAT_KEY = "demask_format_version"  # in the weights' metadata; absent in format 1


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns: the rebuilt model (eval mode) and everything saved with it."""

    model: nn.Module
    model_config: ModelConfig
    train_config: TrainConfig | None
    step: int
    path: Path  # the checkpoint folder
    state: dict[str, Any] | None = field(default=None, repr=False)  # state.pt, if asked for


# ----------------------------------------------------------------------------------------------
# saving


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    model_state: dict[str, Tensor],
    model_config: ModelConfig,
    train_config: TrainConfig | None = None,
    train_state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write the checkpoint of `step` atomically into `run_dir` and point `latest` at it.

    model_state: a full (unsharded) state dict; every tensor must be finite (a NaN/inf weight raises
    ValueError and nothing is written, so no poisoned checkpoint replaces a good one).
    train_state: optimiser state etc., saved with torch.save into state.pt (step is added).
    keep: how many checkpoints to keep; older ones are deleted after `latest` moves.
    Returns the checkpoint folder.
    """
    run_dir = Path(run_dir)
    bad = [
        k for k, v in model_state.items() if v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if bad:
        raise ValueError(
            f"refusing to save the checkpoint of step {step}: non-finite values in {bad[:3]}"
        )
    ckpts = run_dir / CHECKPOINTS_DIR
    final = ckpts / step_dir_name(step)
    for stale in ckpts.glob(TMP_PREFIX + "*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    try:
        current = read_latest(run_dir) == final
    except CheckpointError:  # a broken pointer: replaced below
        current = False
    if not current:  # a same-step folder that `latest` does not name may be stale: rewrite it
        meta = {
            "format": "pt",
            "demask_config": configs_to_json(model_config, train_config),
            "demask_step": str(step),
            _FORMAT_KEY: str(FORMAT_VERSION),
        }
        state = {**(train_state or {}), "step": step}
        atomic_write(final, lambda tmp: _write_folder(tmp, model_state, meta, state))
    atomic_write_text(run_dir / LATEST_FILE, f"{CHECKPOINTS_DIR}/{final.name}\n")
    _prune(ckpts, keep=keep, current=final)
    return final


def _write_folder(
    folder: Path, model_state: dict[str, Tensor], meta: dict[str, str], state: dict[str, Any]
) -> None:
    folder.mkdir()
    # clone: safetensors refuses shared storage (tied embeddings) and views
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata=meta)
    torch.save(state, folder / STATE_FILE)


def _prune(ckpts: Path, *, keep: int, current: Path) -> None:
    dirs = sorted(p for p in ckpts.glob("step_*") if p.is_dir())
    for old in dirs[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# finding and loading


def _resolve(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint folder, weights file) for a run folder, a checkpoint folder or a weights file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    if path.is_file():
        if path.name == LATEST_FILE:
            path = path.parent
        elif path.suffix == ".safetensors":
            return path.parent, path
        else:
            raise CheckpointError(
                f"checkpoint file {str(path)!r} is not a .safetensors file; give a run folder, "
                "a checkpoint folder or its model.safetensors"
            )
    if (path / WEIGHTS_FILE).is_file():
        return path, path / WEIGHTS_FILE
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"no checkpoint in {str(path)!r}: expected a run folder with a '{LATEST_FILE}' file "
            f"or a checkpoint folder with {WEIGHTS_FILE}"
        )
    return found, found / WEIGHTS_FILE


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder for a run folder, a checkpoint folder or a weights file."""
    return _resolve(path)[0]


def read_weights(
    weights: Path, *, tensors_too: bool = True
) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            keys = list(f.keys()) if tensors_too else []
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint {str(weights)!r} is corrupt or unreadable: {msg}"
        ) from None
    return tensors, meta


def read_configs(weights: Path, meta: dict[str, str]) -> tuple[ModelConfig, TrainConfig | None]:
    """The configs of a weights file: the config.json beside a format-1 model.safetensors, else
    the file's own metadata (so a file renamed or copied out of its folder carries them along)."""
    version = meta.get(_FORMAT_KEY, "1")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(weights)!r} has format version {version!r}; this demask reads "
            f"versions 1 to {FORMAT_VERSION} (upgrade demask to load a newer one)"
        )
    cfg_file = weights.parent / CONFIG_FILE
    format_1 = weights.name == WEIGHTS_FILE and cfg_file.is_file()
    if not format_1 and "demask_config" not in meta:
        raise CheckpointError(
            f"checkpoint {str(weights)!r} holds no demask config in its metadata; expected a "
            "weights file written by demask"
        )
    where = str(cfg_file if format_1 else weights)
    try:
        text = cfg_file.read_text(encoding="utf-8") if format_1 else meta["demask_config"]
        return configs_from_json(text)
    except (KeyError, ValueError, TypeError, OSError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {where!r} has no valid config: {msg}") from None


def check_weights(model: nn.Module, weights: dict[str, Tensor], where: str | Path) -> None:
    """Refuse weights that do not fit `model` (listing the missing, unexpected and reshaped
    tensors) or that hold NaN/inf values (naming the tensors): CheckpointError, one line."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    reshaped = {
        k: (tuple(weights[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    }
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(
            f"unexpected tensors {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else "")
        )
    if reshaped:
        shown = ", ".join(
            f"{k}: saved {a}, expected {b}" for k, (a, b) in list(reshaped.items())[:3]
        )
        problems.append(f"reshaped tensors ({shown})")
    if problems:
        raise CheckpointError(
            f"checkpoint {str(where)!r} does not match its config: " + "; ".join(problems)
        )
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"checkpoint {str(where)!r} holds NaN/inf values in {bad[:5]}; expected finite weights "
            "(use an earlier checkpoint)"
        )


def read_state(ckpt_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The training state (state.pt) of a checkpoint folder."""
    path = Path(ckpt_dir) / STATE_FILE
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles: the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} has no {STATE_FILE}") from None
    except Exception as err:  # torch.load raises many kinds on a truncated or foreign file
        # never repeat torch's own message: it suggests loading untrusted files unsafely
        raise CheckpointError(
            f"{str(path)!r} is corrupt or not a demask training state ({type(err).__name__}); "
            "expected the state.pt demask wrote with this checkpoint"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(
            f"{str(path)!r} is not a demask training state: expected a dict with an int 'step'"
        )
    return state


def load_checkpoint(
    path: str | Path,
    *,
    kind: str | None = None,
    map_location: str | torch.device = "cpu",
    with_state: bool = False,
) -> Checkpoint:
    """Rebuild the model of a checkpoint from the checkpoint alone.

    path: a run folder (its `latest` checkpoint), a checkpoint folder, or a weights file (that
    file, with the config in its metadata unless it is the folder's model.safetensors).
    kind: when given, the checkpoint must hold this model kind ("masked" | "autoregressive").
    with_state: also read state.pt (optimiser state, step) into `Checkpoint.state`.
    Raises CheckpointError (a ValueError, one line) when the checkpoint is missing, corrupt, holds
    NaN/inf weights or another kind. The model is returned in eval mode on `map_location`.
    """
    ckpt_dir, weights_file = _resolve(path)
    weights, meta = read_weights(weights_file)
    model_config, train_config = read_configs(weights_file, meta)
    if kind is not None and model_config.kind != kind:
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} holds a {model_config.kind!r} model, expected {kind!r}"
        )
    model = build_model(model_config)
    check_weights(model, weights, weights_file)
    model.load_state_dict(weights, strict=True)
    model.to(map_location).eval()
    if with_state and weights_file.name != WEIGHTS_FILE:
        raise CheckpointError(
            f"with_state: {STATE_FILE} belongs to {WEIGHTS_FILE}, not {str(weights_file)!r}"
        )
    state = read_state(ckpt_dir, map_location) if with_state else None
    step = int(meta.get("demask_step", state["step"] if state else -1))
    return Checkpoint(model, model_config, train_config, step, ckpt_dir, state)


def checkpoint_configs(path: str | Path) -> tuple[ModelConfig, TrainConfig | None, int]:
    """(model config, train config, step) of a checkpoint, without building the model; e.g. for
    `demask train --resume`, which starts from the saved configs and overrides a few fields."""
    _, weights_file = _resolve(path)
    _, meta = read_weights(weights_file, tensors_too=False)
    model_config, train_config = read_configs(weights_file, meta)
    return model_config, train_config, int(meta.get("demask_step", -1))
