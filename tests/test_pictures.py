"""Pictures: exact PNG sizes, pixels that encode the data, masked pixels coloured, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from demask.data import GreyLevelTokenizer
from demask.pictures import (
    GRID_COLOUR,
    MASK_COLOUR,
    read_metrics,
    save_demasking_strip,
    save_image_grid,
    save_loss_curve,
)


def _read(path):
    from matplotlib.image import imread

    return imread(str(path))[..., :3]  # (H, W, 3) floats in [0, 1]


def _cell(img, row, col, h, w, scale=4, pad=1):
    y, x = pad + row * (h * scale + pad), pad + col * (w * scale + pad)
    return img[y : y + h * scale : scale, x : x + w * scale : scale]  # one sample per pixel


def test_image_grid_size_and_pixels(tmp_path):
    checker = (np.indices((8, 8)).sum(0) % 2) * 16  # grey levels 0 / 16
    images = np.stack([checker, 16 - checker, np.full((8, 8), 8)] * 4)  # (12, 8, 8) ints
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", ncols=5)
    img = _read(path)
    assert img.shape == (3 * 33 + 1, 5 * 33 + 1, 3)  # rows*(8*4+1)+1, cols*(8*4+1)+1
    np.testing.assert_allclose(_cell(img, 0, 0, 8, 8)[..., 0], checker / 16, atol=1 / 255)
    np.testing.assert_allclose(_cell(img, 0, 1, 8, 8)[..., 1], 1 - checker / 16, atol=1 / 255)
    np.testing.assert_allclose(_cell(img, 0, 2, 8, 8), 0.5, atol=1 / 255)
    np.testing.assert_allclose(img[0, 0], GRID_COLOUR, atol=1 / 255)  # separator
    np.testing.assert_allclose(img[-2, -2], GRID_COLOUR, atol=1 / 255)  # the empty 15th cell
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["grid.png"]  # no temporary file


def test_image_grid_from_floats_tokens_and_inverted(tmp_path):
    x = np.zeros((2, 3, 4))
    x[0, 1, 2] = 1.0
    img = _read(save_image_grid(x, tmp_path / "f.png", scale=2, pad=0, invert=True))
    assert img.shape == (6, 16, 3)
    assert img[2, 4].tolist() == [0, 0, 0] and img[0, 0].tolist() == [1, 1, 1]  # ink is dark
    tok = GreyLevelTokenizer()
    ids = torch.full((3, 64), 16)
    ids[:, 0] = 0
    img = _read(save_image_grid(ids, tmp_path / "t.png", tokenizer=tok, scale=1, pad=0))
    assert img.shape == (8, 24, 3) and img[0, 0, 0] == 0 and img[0, 1, 0] == 1


def test_demasking_strip_colours_masked_pixels(tmp_path):
    mask_id, b, n = 17, 3, 64
    final = torch.arange(b * n).reshape(b, n) % 17  # (B, N) grey levels
    history = []
    for t in range(5):  # step t reveals the first 16*t pixels
        state = torch.full((b, n), mask_id)
        state[:, : 16 * t] = final[:, : 16 * t]
        history.append(state)
    path = save_demasking_strip(history, mask_id, tmp_path / "strip.png", max_rows=2)
    img = _read(path)
    assert img.shape == (2 * 33 + 1, 5 * 33 + 1, 3)  # 2 sequences x 5 steps
    first = _cell(img, 0, 0, 8, 8)
    np.testing.assert_allclose(first, np.broadcast_to(MASK_COLOUR, first.shape), atol=1 / 255)
    mid = _cell(img, 1, 2, 8, 8)  # sequence 1 at step 2: 32 pixels (4 rows) revealed
    np.testing.assert_allclose(mid[:4, :, 0], final[1, :32].reshape(4, 8) / 16, atol=1 / 255)
    np.testing.assert_allclose(mid[4:], np.broadcast_to(MASK_COLOUR, mid[4:].shape), atol=1 / 255)
    last = _cell(img, 0, 4, 8, 8)
    np.testing.assert_allclose(last[..., 2], final[0].reshape(8, 8) / 16, atol=1 / 255)


def test_demasking_strip_subsamples_columns(tmp_path):
    history = torch.zeros(30, 2, 4, dtype=torch.long)  # (T, B, N), 2x2 images
    img = _read(
        save_demasking_strip(history, 5, tmp_path / "s.png", image_shape=(2, 2), max_cols=4)
    )
    assert img.shape == (2 * 9 + 1, 4 * 9 + 1, 3)
    tok = GreyLevelTokenizer(levels=3, image_shape=(2, 2))
    img = _read(save_demasking_strip(history[:3], 5, tmp_path / "s.png", tokenizer=tok, pad=0))
    assert img.shape == (2 * 8, 3 * 8, 3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: save_image_grid(np.full((2, 8, 8), 17), p), r"expected \[0, 16\]"),
        (lambda p: save_image_grid(np.full((2, 8, 8), 1.5), p), r"must lie in \[0, 1\]"),
        (lambda p: save_image_grid(np.zeros((8, 8)), p), r"shape \(N, H, W\)"),
        (lambda p: save_image_grid(np.zeros((1, 8, 8)), p, ncols=0), "ncols must be >= 1"),
        (
            lambda p: save_demasking_strip([torch.full((1, 64), 20)], 17, p),
            "holds token 20, expected ids in \\[0, 16\\] or mask_id=17",
        ),
        (lambda p: save_demasking_strip([torch.zeros(1, 63)], 17, p), "shape \\(B, 64\\)"),
    ],
)
def test_bad_picture_input(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(tmp_path / "x.png")
    assert not list(tmp_path.iterdir())  # nothing written


def test_loss_curve_from_jsonl_and_records(tmp_path):
    records = [{"type": "train", "step": s, "loss": 3.0 / s, "lr": 1e-3} for s in range(1, 51)]
    records += [{"type": "val", "step": s, "val_bits_per_token": 4.0 / s} for s in (10, 30, 50)]
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    assert read_metrics(jsonl) == records
    img = _read(save_loss_curve(jsonl, tmp_path / "loss.png", figsize=(5, 3), dpi=80))
    assert img.shape == (240, 400, 3)
    # the curves are drawn: blue train loss and orange validation pixels exist
    blue = np.abs(img - np.array([0x1F, 0x77, 0xB4]) / 255).sum(-1) < 0.05
    orange = np.abs(img - np.array([0xFF, 0x7F, 0x0E]) / 255).sum(-1) < 0.05
    assert blue.sum() > 100 and orange.sum() > 20
    img2 = _read(save_loss_curve(records, tmp_path / "loss2.png", figsize=(5, 3), dpi=80))
    np.testing.assert_array_equal(img, img2)


def test_loss_curve_bad_input(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        save_loss_curve(tmp_path / "nope.jsonl", tmp_path / "l.png")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="is not JSON lines"):
        save_loss_curve(tmp_path / "bad.jsonl", tmp_path / "l.png")
    with pytest.raises(ValueError, match="no records"):
        save_loss_curve([{"step": 1, "lr": 0.1}], tmp_path / "l.png")
