"""Pictures: grids of small grey-level images, demasking strips and loss curves, as PNG files.

Grids and strips are composed pixel by pixel in numpy and written with matplotlib's `imsave`, so
their pixel size is exact and every pixel encodes the data: a grey level g of L levels is drawn
with brightness g / (L - 1) (0 black, the top level white; `invert=True` draws ink dark on white),
each image pixel as a `scale` x `scale` block, cells separated by `pad` pixels of `GRID_COLOUR`,
masked pixels in `MASK_COLOUR`. Loss curves are matplotlib figures rendered by the Agg canvas
(never pyplot, never `show`). Every file is written through `demask.runfolder.atomic_write`
(a temporary name in the target folder, fsync, rename), so a reader never sees half a PNG.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from demask._checks import check_int
from demask.runfolder import atomic_write

GRID_COLOUR = (0.25, 0.35, 0.6)  # cell separators: a blue-grey no grey level can take
MASK_COLOUR = (0.9, 0.15, 0.15)  # masked pixels in a demasking strip: red


def _save_rgb(rgb: np.ndarray, path: str | os.PathLike) -> Path:
    """(H, W, 3) floats in [0, 1] -> a PNG of exactly H x W pixels."""
    from matplotlib.image import imsave  # lazy: matplotlib is slow to import

    return atomic_write(path, lambda tmp: imsave(tmp, rgb, format="png"))


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _brightness(images: Any, levels: int, invert: bool) -> np.ndarray:
    """(N, H, W) floats in [0, 1] or integer grey levels in [0, levels) -> floats in [0, 1]."""
    x = _to_numpy(images)
    if x.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got shape {x.shape}")
    if x.dtype.kind in "iub":
        if x.size and (x.min() < 0 or x.max() >= levels):
            raise ValueError(
                f"images hold grey levels in [{x.min()}, {x.max()}], expected [0, {levels - 1}] "
                f"(levels={levels})"
            )
        x = x.astype(np.float64) / (levels - 1)
    elif x.dtype.kind == "f":
        if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise ValueError(
                f"float images must lie in [0, 1], got values in [{x.min():g}, {x.max():g}]; "
                "pass integer grey levels (with levels=...) instead"
            )
        x = x.astype(np.float64)
    else:
        raise TypeError(f"images must be numeric, got dtype {x.dtype}")
    return 1.0 - x if invert else x


def _compose(cells: np.ndarray, ncols: int, scale: int, pad: int) -> np.ndarray:
    """(N, h, w, 3) RGB cells -> one (rows*(h*s+pad)+pad, ncols*(w*s+pad)+pad, 3) canvas."""
    n, h, w, _ = cells.shape
    rows = math.ceil(n / ncols)
    ch, cw = h * scale, w * scale
    canvas = np.empty((rows * (ch + pad) + pad, ncols * (cw + pad) + pad, 3))
    canvas[:] = GRID_COLOUR
    big = cells.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, h*s, w*s, 3)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (ch + pad), pad + c * (cw + pad)
        canvas[y : y + ch, x : x + cw] = big[i]
    return canvas


def _layout(scale: int = 4, pad: int = 1, invert: bool = False) -> tuple[int, int, bool]:
    """The drawing options shared by the picture writers (TypeError for an unknown one)."""
    return scale, pad, invert


def _layout_checks(scale: int, pad: int) -> None:
    check_int("scale", scale, min=1)
    check_int("pad", pad, min=0)


def save_image_grid(
    images: Any,
    path: str | os.PathLike,
    ncols: int = 8,
    *,
    levels: int = 17,
    tokenizer: Any = None,
    scale: int = 4,
    pad: int = 1,
    invert: bool = False,
) -> Path:
    """Write N small images as a grid PNG; returns the path.

    images: (N, H, W) floats in [0, 1] or integer grey levels in [0, levels); or, with a
    `tokenizer` (a GreyLevelTokenizer), (N, H*W) token ids that it decodes (levels from it).
    ncols: images per row (fewer if N is smaller). The PNG is exactly
    rows*(H*scale+pad)+pad by ncols*(W*scale+pad)+pad pixels.
    """
    if tokenizer is not None:
        images, levels = tokenizer.decode(images), tokenizer.levels
    check_int("ncols", ncols, min=1)
    check_int("levels", levels, min=2)
    _layout_checks(scale, pad)
    grey = _brightness(images, levels, invert)  # (N, H, W)
    if len(grey) == 0:
        raise ValueError("images must hold at least one image, got N=0")
    rgb = np.repeat(grey[..., None], 3, axis=-1)  # (N, H, W, 3)
    return _save_rgb(_compose(rgb, min(ncols, len(grey)), scale, pad), path)


def _pick_columns(steps: int, max_cols: int | None) -> list[int]:
    """Evenly spaced step indices, the first and the last always included."""
    if max_cols is None or steps <= max_cols:
        return list(range(steps))
    return sorted({round(i * (steps - 1) / (max_cols - 1)) for i in range(max_cols)})


def save_demasking_strip(
    history: Sequence[Tensor] | Tensor,
    mask_id: int,
    path: str | os.PathLike,
    *,
    image_shape: tuple[int, int] = (8, 8),
    levels: int = 17,
    tokenizer: Any = None,
    max_rows: int = 4,
    max_cols: int | None = 16,
    **layout: Any,
) -> Path:
    """Write a strip: one row per sequence, one column per demasking step; returns the path.

    history: T states, each (B, N) token ids with N = H*W, ids in [0, levels) or == mask_id (a
    list of tensors, or one (T, B, N) tensor), e.g. from fully masked to fully generated.
    The first `max_rows` sequences are drawn; with more than `max_cols` states, evenly spaced
    ones (first and last included). Masked pixels are drawn in MASK_COLOUR. With a `tokenizer`
    (a GreyLevelTokenizer), image_shape and levels are taken from it. layout: scale=4, pad=1,
    invert=False, as for `save_image_grid`.
    """
    scale, pad, invert = _layout(**layout)
    if tokenizer is not None:
        image_shape, levels = tokenizer.image_shape, tokenizer.levels
    check_int("mask_id", mask_id, min=0)
    check_int("levels", levels, min=2)
    check_int("max_rows", max_rows, min=1)
    if max_cols is not None:
        check_int("max_cols", max_cols, min=2)
    _layout_checks(scale, pad)
    states = torch.stack(list(history)) if not isinstance(history, Tensor) else history
    h, w = image_shape
    if states.ndim != 3 or states.shape[0] == 0 or states.shape[2] != h * w:
        raise ValueError(
            f"history must be T >= 1 states of shape (B, {h * w}) for images of shape "
            f"{tuple(image_shape)}, got shape {tuple(states.shape)}"
        )
    states = states[_pick_columns(states.shape[0], max_cols), :max_rows].cpu()  # (T', R, N)
    masked = states == mask_id
    bad = (~masked) & ((states < 0) | (states >= levels))
    if bool(bad.any()):
        raise ValueError(
            f"history holds token {int(states[bad][0])}, expected ids in [0, {levels - 1}] "
            f"or mask_id={mask_id}"
        )
    t, r, _ = states.shape
    grey = _brightness(states.clamp(0, levels - 1).reshape(t * r, h, w).numpy(), levels, invert)
    rgb = np.repeat(grey[..., None], 3, axis=-1)  # (T'*R, H, W, 3)
    rgb[masked.reshape(t * r, h, w).numpy()] = MASK_COLOUR
    rgb = rgb.reshape(t, r, h, w, 3).transpose(1, 0, 2, 3, 4).reshape(r * t, h, w, 3)  # row-major
    return _save_rgb(_compose(rgb, t, scale, pad), path)


def read_metrics(metrics: str | os.PathLike | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records from a JSONL file (one JSON object a line, blank lines skipped) or an iterable."""
    if isinstance(metrics, (str, os.PathLike)):
        path = Path(metrics)
        if not path.is_file():
            raise ValueError(f"metrics file {str(path)!r} does not exist")
        lines = path.read_text().splitlines()
        try:
            return [json.loads(line) for line in lines if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"metrics file {str(path)!r} is not JSON lines: {err}") from None
    return [dict(r) for r in metrics]


def save_loss_curve(
    metrics: str | os.PathLike | Iterable[dict[str, Any]],
    path: str | os.PathLike,
    *,
    figsize: tuple[float, float] = (6.4, 4.0),
    dpi: int = 100,
) -> Path:
    """Plot train loss and validation metrics against step; returns the path.

    metrics: a metrics.jsonl path or records. Train points: records with "step" and "loss"
    (or "train_loss"); validation points: every numeric key starting with "val_" (drawn on a
    second axis). The PNG is figsize * dpi pixels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = [r for r in read_metrics(metrics) if isinstance(r.get("step"), (int, float))]
    train = [(r["step"], r.get("loss", r.get("train_loss"))) for r in records]
    train = [(s, v) for s, v in train if isinstance(v, (int, float))]
    val_keys = sorted({k for r in records for k in r if k.startswith("val_")})
    if not train and not val_keys:
        raise ValueError("metrics hold no records with 'step' and 'loss' or 'val_*' values")
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if val_keys:
        ax2 = ax.twinx()
        colours = itertools.cycle(["tab:orange", "tab:green", "tab:red", "tab:purple"])
        for key, colour in zip(val_keys, colours):
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            ax2.plot(*zip(*pts), "o-", color=colour, label=key.replace("_", " "))
        ax2.set_ylabel("validation")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
