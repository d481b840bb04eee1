"""Hostile library input (issue 12, items 4, 6-10): each case is refused by name or handled right.

Schedules are checked when built, malformed `[MASK:...]` holes are errors, every integer dtype of
token ids is accepted (converted to long) and nothing else is, an autoregressive wrapper refuses a
bidirectional net, a tiny temperature is greedy, and degenerate configurations are refused.
"""

from __future__ import annotations

import math

import pytest
import torch

from demask import (
    AutoregressiveWrapper,
    Decoder,
    Encoder,
    NonAutoregressiveWrapper,
    TransformerWrapper,
)
from demask.cli._common import MAX_HOLES, CLIError, parse_prompt
from demask.samplers import sample_categorical
from demask.schedules import CallableSchedule, get_schedule

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


# ------------------------------------------------------------------ 4: schedule callables
def _float_only_wavy(p):
    return (1 - p) * (1 + math.cos(6 * math.pi * p)) / 2  # right ends, in [0, 1], not monotone


@param(
    "schedule,match",
    [
        (lambda p: p, r"mask ratio 1 at p=0 .* got schedule\(0\) = 0 .* reversed"),
        (lambda p: 0.5 + 0 * p, r"mask ratio 1 at p=0 .* schedule\(0\) = 0\.5"),
        (lambda p: 2 * (1 - p), r"mask ratios in \[0, 1\], got schedule\(0\) = 2"),
        (lambda p: (1 - p) * (1 - 1.5 * p), r"in \[0, 1\], got schedule\(.*\) = -"),
        (lambda p: float("nan"), r"finite mask ratios, got schedule\(0\) = nan"),
        (lambda p: (1 - p) / p, r"finite mask ratios, got schedule\(0\) = inf"),
        (_float_only_wavy, r"non-increasing in p, got schedule\(.*\) = .* and schedule"),
        (lambda p: 1 / 0, "schedule could not be evaluated at p in .*ZeroDivisionError"),
    ],
)
def test_bad_seed_schedule_is_refused_at_construction(schedule, match):
    with pytest.raises(ValueError, match=match):
        masked(schedule=schedule)


def test_package_convention_callable_is_checked_in_t():
    with pytest.raises(ValueError, match=r"mask ratio 1 at t=1 .* reversed"):
        get_schedule(lambda t: 1 - t)
    with pytest.raises(ValueError, match=r"non-decreasing in t"):
        CallableSchedule(lambda t: 1 - _float_only_wavy(t))


@param(
    "schedule",
    ["linear", "cosine", lambda p: 1 - p**2, lambda p: math.cos(math.pi * p / 2) ** 2],
)
def test_good_schedules_still_build_and_give_a_positive_nelbo(schedule):
    w = masked(schedule=schedule)
    bits = w.nelbo(tokens((2, N)), generator=torch.Generator().manual_seed(0))
    assert bool((bits > 1.0).all())  # an untrained model: near log2(7) = 2.8 bits, never 0


def test_callable_rounding_near_the_ends_is_tolerated():
    # float32 arithmetic: cos(float32(pi / 2)) = -4.4e-8 at the clean end
    s = get_schedule(lambda t: 1 - torch.cos(t.float() * (math.pi / 2)).double())
    assert s.mask_ratio(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist() == [0.0, 1.0]


# ------------------------------------------------------------------ 6: hole markers
def _enc(text):
    return list(text.encode())


@param(
    "text",
    [
        "[MASK:-1]",
        "[MASK:abc]",
        "[MASK:99999999999999999999]",
        "[MASK:0]",
        "[MASK:]",
        "[MASK: 3]",
        "[MASK:+3]",
        "[MASK:3.0]",
        f"[MASK:{MAX_HOLES + 1}]",
    ],
)
def test_malformed_hole_is_one_clear_error(text):
    with pytest.raises(CLIError, match=r"--prompt: bad hole marker '\[MASK:.*expected \[MASK\]"):
        parse_prompt("ab " + text + " cd", _enc)


def test_unclosed_hole_is_an_error():
    with pytest.raises(CLIError, match=r"--prompt: .*'\[MASK:' is not closed"):
        parse_prompt("ab [MASK:3", _enc)


def test_well_formed_holes_and_plain_text():
    assert parse_prompt("a[MASK:2]b[MASK]", _enc) == [97, None, None, 98, None]
    assert parse_prompt("[MASK:007]", _enc) == [None] * 7
    assert parse_prompt("[MASKED] [MASK", _enc) == _enc("[MASKED] [MASK")  # not markers


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


# ------------------------------------------------------------------ 8: causal nets only
def test_autoregressive_wrapper_refuses_a_bidirectional_net():
    with pytest.raises(ValueError, match=r"net must be causal .* got attn_layers=Encoder"):
        causal(layers=Encoder)


# ------------------------------------------------------------------ 9: tiny temperatures
@param("temperature", [1e-320, 5e-324, 1e-300, 1e-30])
def test_tiny_temperature_is_greedy(temperature):
    logits = torch.randn(500, 40, generator=torch.Generator().manual_seed(0)) * 50
    got = sample_categorical(logits, temperature, torch.Generator().manual_seed(1))
    assert torch.equal(got, logits.argmax(-1))


def test_tiny_temperature_breaks_exact_ties_at_random():
    logits = torch.tensor([0.0, 3.0, 3.0, -1.0]).expand(4000, -1)
    got = sample_categorical(logits, 1e-300, torch.Generator().manual_seed(0))
    counts = torch.bincount(got, minlength=4).tolist()
    assert counts[0] == counts[3] == 0 and min(counts[1:3]) > 1800


def test_tiny_temperature_is_greedy_in_both_wrappers():
    model = causal()
    prompts = tokens((4, 2))
    greedy = model.generate(prompts, 5, temperature=0.0)
    assert torch.equal(model.generate(prompts, 5, temperature=1e-320), greedy)
    w = masked()
    outs = [
        w.generate(batch_size=4, start_temperature=t, anneal_temperature=False, filter_thres=0.0)
        for t in (0.0, 1e-320)
    ]
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------ 10: degenerate configurations
def test_masked_vocabulary_of_only_the_mask_id_is_refused():
    net = TransformerWrapper(num_tokens=1, max_seq_len=N, attn_layers=Encoder(dim=8, depth=1))
    with pytest.raises(ValueError, match=r"net.num_tokens must be >= 2, got 1"):
        NonAutoregressiveWrapper(net, mask_id=0)


@param("layers", [Encoder, Decoder])
@param("ff_mult,glu", [(0.01, False), (0.01, True), (0.06, False)])
def test_zero_width_feed_forward_is_refused(layers, ff_mult, glu):
    want = rf"feed-forward width int\(ff_mult \* dim\) = int\({ff_mult} \* 16\) must be >= 1, got 0"
    with pytest.raises(ValueError, match=want):
        layers(dim=16, depth=1, heads=2, ff_mult=ff_mult, ff_glu=glu)
    layers(dim=16, depth=1, heads=2, ff_mult=1 / 16)  # width 1 is allowed


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
