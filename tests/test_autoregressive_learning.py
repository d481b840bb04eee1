"""A tiny byte-level Decoder learns Shakespeare: validation loss below the unigram entropy, and
greedy samples made of real words. Slow (about 30 s of training on 2 CPU cores): `pytest -m slow`.

Split: the files of /work/shared/data/shakespeare sorted by name; the last three are validation.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from demask import Decoder, TransformerWrapper
from demask.wrappers.autoregressive import AutoregressiveWrapper

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"
STEPS, BATCH, SEQ, DIM = 300, 32, 64, 128


def load_split() -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted(DATA.glob("*.txt"))

    def cat(fs):
        return torch.tensor(list(b"".join(f.read_bytes() for f in fs)), dtype=torch.long)

    return cat(files[:-3]), cat(files[-3:])


def unigram_entropy(data: torch.Tensor) -> float:
    """Entropy (nats) of the empirical byte distribution: the best loss without context."""
    p = torch.bincount(data, minlength=256).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def train_tiny_model(train: torch.Tensor, steps: int = STEPS) -> AutoregressiveWrapper:
    torch.manual_seed(0)
    net = TransformerWrapper(
        num_tokens=256,
        max_seq_len=SEQ,
        attn_layers=Decoder(dim=DIM, depth=2, heads=4, attn_dim_head=DIM // 4, rotary_pos_emb=True),
    )
    model = AutoregressiveWrapper(net)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    offsets = torch.arange(SEQ + 1)
    for _ in range(steps):
        starts = torch.randint(0, len(train) - SEQ - 1, (BATCH,), generator=gen)
        loss = model(train[starts[:, None] + offsets])  # (BATCH, SEQ + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def validation_loss(model: AutoregressiveWrapper, val: torch.Tensor, chunks: int = 256) -> float:
    """Mean next-byte loss (nats) over `chunks` evenly spaced validation windows."""
    n = (len(val) - 1) // (SEQ + 1)
    windows = val[: n * (SEQ + 1)].view(n, SEQ + 1)[:: max(1, n // chunks)]
    losses = [model(w).item() * len(w) for w in windows.split(64)]
    return sum(losses) / len(windows)


@pytest.mark.slow
def test_tiny_decoder_learns_shakespeare_bytes():
    if not DATA.is_dir():
        pytest.skip(f"no Shakespeare data at {DATA}")
    train, val = load_split()
    model = train_tiny_model(train)
    loss = validation_loss(model, val)
    entropy = unigram_entropy(val)
    print(f"val loss {loss:.3f} nats = {loss / math.log(2):.3f} bits/byte; unigram {entropy:.3f}")
    assert loss < entropy - 0.5  # well below what any context-free model can reach

    prompt = torch.tensor(list(b"KING.\nWhat is th"))
    text = bytes(model.generate(prompt, 120, temperature=0.0, return_only_new=True).tolist())
    words = re.findall(r"[a-z]{3,}", text.decode("latin-1").lower())
    common = Counter(re.findall(r"[a-z]{3,}", bytes(train.tolist()).decode("latin-1").lower()))
    real = [w for w in words if common[w] >= 20]
    # at this budget greedy decoding often loops ("the the the ..."), but what it writes is words
    assert len(real) >= 5 and len(real) >= 0.8 * len(words), f"too few real words: {text!r}"
