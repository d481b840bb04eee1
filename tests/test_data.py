"""Data layer: tokenizers, the fixed splits, windows, stateless batching and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from demask.data import (
    DOC_SEPARATOR,
    ByteTokenizer,
    GreyLevelTokenizer,
    batch_indices,
    digits_images,
    get_batch,
    get_dataset,
    get_tokenizer,
    stdlib_files,
    step_seed,
)

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"
if not SHAKESPEARE.is_dir():
    SHAKESPEARE = Path("/work/shared/data/shakespeare")
param = pytest.mark.parametrize


# --------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_invalid_utf8():
    tok = ByteTokenizer()
    text = "To be, or not to be: ça va? 🎭"
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids[None].repeat(2, 1)) == [text, text]
    # half of a 4-byte emoji is replaced, not an error
    assert tok.decode(ids[:-2]) == text[:-1] + "\ufffd"
    with pytest.raises(ValueError, match=r"expected ids in \[0, 255\]"):
        tok.decode(torch.tensor([65, 256]))


def test_grey_level_tokenizer_round_trip_and_errors():
    tok = GreyLevelTokenizer()
    assert tok.vocab_size == 17 and tok.seq_len == 64
    images = np.random.default_rng(0).integers(0, 17, size=(3, 8, 8))
    ids = tok.encode(images.astype(np.float64))  # load_digits gives floats with integral values
    assert ids.shape == (3, 64) and ids.dtype == torch.long
    assert ids[1, 8 * 2 + 5] == images[1, 2, 5]  # row-major pixel order
    np.testing.assert_array_equal(tok.decode(ids), images)
    with pytest.raises(ValueError, match="integral grey levels"):
        tok.encode(images / 3.0 + 0.1)
    with pytest.raises(ValueError, match=r"expected ids in \[0, 16\]"):
        tok.encode(np.full((8, 8), 17))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 8, 8\)"):
        tok.encode(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="64 tokens"):
        tok.decode(torch.zeros(2, 63, dtype=torch.long))


@param("tok", [ByteTokenizer(), GreyLevelTokenizer(levels=5, image_shape=(2, 3))])
def test_tokenizer_registry_rebuilds_from_config(tok):
    again = get_tokenizer(tok.name, **tok.config())
    assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
    assert repr(again) == repr(tok)
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        get_tokenizer("bpe-unknown")


# --------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_disjoint_and_complete():
    from sklearn.datasets import load_digits

    train, val = get_dataset("digits", "train"), get_dataset("digits", "val")
    assert (len(train), len(val), train.seq_len) == (1500, 297, 64)
    assert train.tokenizer.vocab_size == 17 and train.modality == "image"
    x = train[7]
    assert x.shape == (64,) and x.dtype == torch.long
    np.testing.assert_array_equal(train.tokenizer.decode(x), digits_images("train")[7])
    # together the splits are exactly the 1,797 images, each once
    real = load_digits().images.reshape(-1, 64).astype(np.int64)
    ours = torch.cat([train.rows, val.rows]).numpy()
    key = lambda a: sorted(map(bytes, a.astype(np.uint8)))  # noqa: E731
    assert key(ours) == key(real)
    order = np.random.default_rng(0).permutation(1797)  # the documented split
    np.testing.assert_array_equal(val.rows.numpy(), real[order[1500:]])


def test_digits_rejects_other_seq_len():
    with pytest.raises(ValueError, match="seq_len must be 64.*got 32"):
        get_dataset("digits", seq_len=32)


# --------------------------------------------------------------------------- batching


def test_get_batch_matches_reference_and_is_pure():
    ds = get_dataset("digits")
    b = get_batch(ds, step=5, batch_size=8, seed=3)
    gen = torch.Generator().manual_seed(step_seed(3, 5))
    idx = torch.randint(len(ds), (8,), generator=gen)
    assert torch.equal(b, torch.stack([ds[int(i)] for i in idx]))
    assert b.shape == (8, 64) and b.dtype == torch.long
    # a pure function: the same call later (after other calls) gives the same batch
    for s in range(4):
        get_batch(ds, step=s, batch_size=8, seed=3)
    assert torch.equal(get_batch(ds, step=5, batch_size=8, seed=3), b)
    assert not torch.equal(get_batch(ds, step=6, batch_size=8, seed=3), b)
    assert not torch.equal(get_batch(ds, step=5, batch_size=8, seed=4), b)


def test_ranks_partition_the_single_process_batch():
    ds = get_dataset("digits")
    whole = get_batch(ds, step=11, batch_size=6, seed=0)
    parts = [get_batch(ds, 11, 2, 0, rank=r, world_size=3) for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)


def test_get_batch_on_a_plain_dataset_equals_gather_path():
    ds = get_dataset("digits", "val")
    plain = [ds[i] for i in range(len(ds))]  # a list has no .gather
    assert torch.equal(get_batch(plain, 2, 5, 1), get_batch(ds, 2, 5, 1))


def test_step_seed_pairs_do_not_collide():
    seeds = {step_seed(s, t) for s in range(20) for t in range(50)}
    assert len(seeds) == 1000
    assert step_seed(1, 0) != step_seed(0, 1_000_003)


@param(
    "kwargs, match",
    [
        ({"step": -1}, "step must be >= 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"rank": 2, "world_size": 2}, "rank must be <= 1"),
        ({"seed": 1.5}, "seed must be an int"),
    ],
)
def test_batch_arguments_are_checked(kwargs, match):
    args = {"step": 0, "batch_size": 2, "seed": 0} | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        batch_indices(10, **args)


# --------------------------------------------------------------------------- text


def test_single_file_windows_and_split(tmp_path):
    data = bytes((i * 7) % 26 + 97 for i in range(1000))
    path = tmp_path / "book.txt"
    path.write_bytes(data)
    train = get_dataset(path, "train", seq_len=16)
    val = get_dataset(str(path), "val", seq_len=16)
    n_val = 100  # the last 10% of bytes
    assert len(train) == (1000 - n_val) - 16 + 1  # a window at every offset
    assert len(val) == n_val // 16  # non-overlapping windows
    assert bytes(train[123].tolist()) == data[123:139]
    assert bytes(train[-1].tolist()) == data[900 - 16 : 900]
    assert bytes(val[2].tolist()) == data[900 + 32 : 900 + 48]
    assert train.tokenizer.vocab_size == 256 and train.modality == "text"
    assert get_dataset(path).seq_len == 256  # the text default
    assert len(get_dataset(path, seq_len=8, max_bytes=100)) == 100 - 8 + 1


def test_folder_split_order_and_separator(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").write_text("never read")
    (tmp_path / "empty.txt").write_text("")
    names = [f"f{i:02d}.txt" for i in range(9)] + ["sub/z.txt", "sub/a.txt"]
    for i, name in enumerate(names):
        (tmp_path / name).write_text(f"<{name}:{i}>" * 5)
    # 11 files sorted by relative path; the last max(1, 11 // 10) = 1 is val
    order = sorted(names)
    assert order[-1] == "sub/z.txt"
    train = get_dataset(tmp_path, "train", seq_len=4)
    val = get_dataset(tmp_path, "val", seq_len=4)
    want_train = DOC_SEPARATOR.join((tmp_path / n).read_bytes() for n in order[:-1])
    assert bytes(train.rows[:, 0].tolist()) + bytes(train.rows[-1, 1:].tolist()) == want_train
    want_val = (tmp_path / "sub/z.txt").read_bytes()
    assert b"".join(bytes(r.tolist()) for r in val.rows) == want_val[: len(val) * 4]


def test_shakespeare_val_is_the_last_three_plays():
    files = sorted(p for p in SHAKESPEARE.iterdir() if p.is_file())
    val = get_dataset(SHAKESPEARE, "val", seq_len=1024)
    want = DOC_SEPARATOR.join(p.read_bytes() for p in files[-3:])
    got = bytes(val.rows.reshape(-1).tolist())
    assert got == want[: len(got)] and len(want) - len(got) < 1024


def test_python_stdlib_split_is_documented_and_clean():
    files = stdlib_files()
    val_files = stdlib_files("val")
    assert val_files == files[::20] and len(stdlib_files("train")) == len(files) - len(val_files)
    parts = {part for f in files for part in f.parts}
    assert not parts & {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
    assert all(f.suffix == ".py" and f.stat().st_size > 0 for f in files)
    val = get_dataset("python-stdlib", "val")
    n_bytes = sum(f.stat().st_size for f in val_files) + len(val_files) - 1
    assert len(val) == n_bytes // 256
    assert val.tokenizer.decode(val[0]) == val_files[0].read_text()[:256]
    capped = get_dataset("python-stdlib", "train", seq_len=32, max_bytes=10_000)
    assert len(capped) == 10_000 - 32 + 1


# --------------------------------------------------------------------------- bad input


def _bad(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"{kind}.txt"
    content = {
        "empty": b"",
        "nul": b"hello\x00world" * 100,
        "latin1": "café ".encode("latin-1") * 100,
        "short": b"x" * 16,
    }
    if kind == "missing":
        return p
    if kind == "empty-folder":
        p = tmp_path / "folder"
        p.mkdir()
        (p / "e.txt").write_bytes(b"")
        return p
    p.write_bytes(content[kind])
    return p


@param(
    "kind, match",
    [
        ("missing", "neither a built-in dataset .* nor an existing file or folder"),
        ("empty", "is empty"),
        ("empty-folder", "is empty"),
        ("nul", "looks binary \\(contains NUL bytes\\)"),
        ("latin1", "looks binary \\(not valid UTF-8"),
        ("short", "shorter than one sequence: seq_len=16 needs at least 17 bytes"),
    ],
)
def test_bad_text_input_names_the_path(tmp_path, kind, match):
    path = _bad(tmp_path, kind)
    with pytest.raises(ValueError, match=match) as err:
        get_dataset(path, seq_len=16)
    assert path.name in str(err.value)


def test_a_binary_file_inside_a_folder_is_named(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("fine text " * 50)
    (tmp_path / "1.txt").write_bytes(b"\x00\x01" * 100)
    with pytest.raises(ValueError, match=r"1\.txt' looks binary"):
        get_dataset(tmp_path, "val", seq_len=8)


@param(
    "kwargs, match",
    [
        ({"split": "test"}, "split must be one of \\['train', 'val'\\], got 'test'"),
        ({"seq_len": 0}, "seq_len must be >= 1, got 0"),
        ({"max_bytes": 100}, "max_bytes applies to text datasets only"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_dataset("digits", **kwargs)
    with pytest.raises(ValueError, match="spec must name a dataset"):
        get_dataset("")


def test_byte_tokenizer_round_trips_the_empty_string():
    from demask.data import ByteTokenizer

    tok = ByteTokenizer()
    ids = tok.encode("")
    assert ids.dtype == torch.long and ids.shape == (0,)
    assert tok.decode(ids) == ""


def test_shift_chain_follows_its_law_and_entropy_rate():
    """Empirical transitions of a long sample match the chain's law: the shifted symbol with
    probability keep + (1 - keep) / V, every other symbol (1 - keep) / V; the first column is
    uniform; the stated entropy rate equals the entropy of that conditional law; a fixed
    generator repeats."""
    from demask.data import shift_chain, shift_chain_entropy_rate

    vocab, keep = 8, 0.75
    x = shift_chain(4000, 50, torch.Generator().manual_seed(0), vocab, keep)
    assert x.shape == (4000, 50) and int(x.min()) >= 0 and int(x.max()) < vocab
    prev, nxt = x[:, :-1].reshape(-1), x[:, 1:].reshape(-1)
    hit = (nxt == (5 * prev + 1) % vocab).double().mean()
    assert float(hit) == pytest.approx(keep + (1 - keep) / vocab, abs=0.005)  # 196,000 draws
    first = torch.bincount(x[:, 0], minlength=vocab).double() / 4000
    assert float((first - 1 / vocab).abs().max()) < 0.025
    law = torch.full((vocab,), (1 - keep) / vocab, dtype=torch.float64)
    law[0] += keep
    assert shift_chain_entropy_rate(vocab, keep) == pytest.approx(float(-(law * law.log2()).sum()))
    assert shift_chain_entropy_rate(vocab, 1.0) == 0.0
    again = shift_chain(4000, 50, torch.Generator().manual_seed(0), vocab, keep)
    assert torch.equal(x, again)
    with pytest.raises(ValueError, match="keep"):
        shift_chain(2, 3, torch.Generator(), vocab, 1.5)


def test_masked_cross_entropy_bits_equals_a_hand_computation():
    """Exactly `count` positions per row are masked and scored: a net whose logits at a masked
    position put probability p on the true token (a lookup that sees the mask id) scores
    -log2 p; a net that ignores its input scores the cross-entropy of its fixed law."""
    from torch import nn

    from demask.evaluate import masked_cross_entropy_bits

    vocab, mask_id = 4, 4
    x = torch.randint(vocab, (6, 10), generator=torch.Generator().manual_seed(1))

    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, tokens):
            return self.logits.expand(*tokens.shape, vocab)

    law = torch.tensor([0.1, 0.2, 0.3, 0.4])
    got = masked_cross_entropy_bits(Fixed(law.log()), x, 3, mask_id,
                                    torch.Generator().manual_seed(2), draws=2, batch_size=4)  # fmt: skip
    # the scored positions are drawn from the generator: repeat the draws by hand
    gen = torch.Generator().manual_seed(2)
    masks = [torch.rand(x.shape, generator=gen).argsort(-1).argsort(-1) < 3 for _ in range(2)]
    assert all(int(m.sum(-1).min()) == 3 == int(m.sum(-1).max()) for m in masks)
    want = torch.cat([-law.log2()[x[m]] for m in masks]).mean()
    assert got == pytest.approx(float(want), rel=1e-6)

    class Oracle(nn.Module):  # sees the true row: p = 0.7 on the truth where masked
        def forward(self, tokens):
            assert int((tokens == mask_id).sum()) == 3 * len(tokens)
            out = torch.full((*tokens.shape, vocab), math.log(0.1))
            return out.scatter(-1, x[: len(tokens), :, None], math.log(0.7))

    assert masked_cross_entropy_bits(Oracle(), x, 3, mask_id, batch_size=6) == pytest.approx(
        -math.log2(0.7), rel=1e-6
    )
    with pytest.raises(ValueError, match="count"):
        masked_cross_entropy_bits(Oracle(), x, 11, mask_id)
