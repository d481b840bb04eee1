"""Property-based fuzzing of the public API with hypothesis (issue 12): every invalid argument of
the wrappers, the layers and the backbone raises ValueError or TypeError whose message names it.

Random on every run; DEMASK_FUZZ_EXAMPLES=N searches longer (see tests/test_properties.py).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from _fuzz import EXAMPLES, FUZZ
from hypothesis import given, settings
from hypothesis import strategies as st

from demask import (
    AutoregressiveWrapper,
    Decoder,
    Encoder,
    NonAutoregressiveWrapper,
    TransformerWrapper,
)
from demask.decoding.autoregressive import FILTER_FUNCTIONS
from demask.samplers import RULES
from demask.schedules import SCHEDULES

pytestmark = pytest.mark.usefixtures("one_thread")


def build_net(cfg: dict[str, Any], layers_cls: type) -> TransformerWrapper:
    torch.manual_seed(0)
    return TransformerWrapper(
        num_tokens=cfg["num_tokens"],
        max_seq_len=cfg["max_seq_len"],
        attn_layers=layers_cls(**cfg["layers"]),
    )


# ------------------------------------------------------------------ invalid arguments
def _not_an_int(none: bool = True) -> st.SearchStrategy[Any]:
    """Not an int; None too unless None means the default (`generate(steps=None)`)."""
    bad = st.one_of(st.floats(allow_nan=True), st.text(max_size=3), st.booleans())
    return st.one_of(bad, st.none()) if none else bad


def _bad_probability() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.floats(max_value=-1e-9),
        st.floats(min_value=1.0 + 1e-9),
        st.just(math.nan),
        st.text(max_size=3),
    )


def _bad_temperature() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.floats(max_value=-1e-300), st.sampled_from([math.nan, math.inf]), st.text(max_size=3)
    )


def _schedule_error() -> st.SearchStrategy[Any]:
    """Schedules that are wrong in one way each (name unknown, wrong type, bad callable)."""
    return st.one_of(
        st.text(max_size=8).filter(lambda s: s not in SCHEDULES),
        st.integers(),
        st.floats(-2.0, 2.0).map(lambda c: lambda p: c),  # constant
        st.floats(0.01, 1.0).map(lambda a: lambda p: a * p),  # reversed (or too small)
        st.floats(1.01, 5.0).map(lambda a: lambda p: a * (1 - p)),  # above 1
        st.sampled_from([lambda p: math.nan, lambda p: (1 - p) / p, lambda p: 1 / 0]),
    )


# (the argument, a strategy of invalid values, what to call with it)
def _masked_ctor(name: str, value: Any) -> Any:
    net = build_net(
        dict(num_tokens=5, max_seq_len=4, layers=dict(dim=8, depth=1, heads=1)), Encoder
    )
    kwargs: dict[str, Any] = {"mask_id": 4, name: value}
    return NonAutoregressiveWrapper(net, **kwargs)


def _masked_generate(name: str, value: Any) -> Any:
    w = _masked_ctor("steps", 2)
    return w.generate(**{"batch_size": 1, name: value})


def _causal_generate(name: str, value: Any) -> Any:
    net = build_net(
        dict(num_tokens=5, max_seq_len=6, layers=dict(dim=8, depth=1, heads=1)), Decoder
    )
    model = AutoregressiveWrapper(net)
    args: dict[str, Any] = {"prompts": torch.zeros(1, 2, dtype=torch.long), "seq_len": 2}
    if name in ("prompts", "seq_len"):
        args[name] = value
        return model.generate(args.pop("prompts"), **args)
    return model.generate(args.pop("prompts"), **args, **{name: value})


def _layers(name: str, value: Any) -> Any:
    kwargs: dict[str, Any] = dict(dim=8, depth=1, heads=2)
    kwargs[name] = value
    return Decoder(**kwargs)


def _wrapper_net(name: str, value: Any) -> Any:
    kwargs: dict[str, Any] = dict(num_tokens=5, max_seq_len=4)
    kwargs[name] = value
    return TransformerWrapper(attn_layers=Encoder(dim=8, depth=1, heads=1), **kwargs)


INVALID = [
    (_masked_ctor, "mask_id", st.one_of(st.integers(max_value=-1), st.integers(min_value=5))),
    (_masked_ctor, "steps", st.one_of(st.integers(max_value=0), _not_an_int())),
    (_masked_ctor, "no_replace_prob", _bad_probability()),
    (_masked_ctor, "self_cond_train_prob", _bad_probability()),
    (_masked_ctor, "critic_loss_weight", _bad_temperature()),
    (_masked_ctor, "schedule", _schedule_error()),
    (_masked_generate, "start_temperature", _bad_temperature()),
    (_masked_generate, "filter_thres", st.one_of(_bad_probability(), st.just(1.0))),
    (_masked_generate, "steps", st.one_of(st.integers(max_value=0), _not_an_int(none=False))),
    (_masked_generate, "batch_size", st.one_of(st.integers(max_value=0), st.floats())),
    (_masked_generate, "seq_len", st.one_of(st.integers(max_value=0), st.integers(min_value=5))),
    (_masked_generate, "sampler", st.text(max_size=8).filter(lambda s: s not in RULES)),
    (_masked_generate, "noise_level_scale", _bad_temperature()),
    (_causal_generate, "temperature", _bad_temperature()),
    (_causal_generate, "seq_len", st.one_of(st.integers(max_value=0), _not_an_int())),
    (_causal_generate, "eos_token", st.one_of(st.integers(max_value=-1), st.integers(min_value=5))),
    (
        _causal_generate,
        "repetition_penalty",
        st.one_of(st.floats(max_value=0.0), st.just(math.nan)),
    ),
    (
        _causal_generate,
        "filter_logits_fn",
        st.text(max_size=8).filter(lambda s: s not in FILTER_FUNCTIONS),
    ),
    (
        _causal_generate,
        "prompts",
        st.one_of(
            st.integers(5, 99).map(lambda v: torch.full((1, 2), v)),
            st.just(torch.zeros(1, 2)),  # float ids
            st.just(torch.zeros(1, 0, dtype=torch.long)),
            st.just([]),
        ),
    ),
    (
        _causal_generate,
        "prompt_lens",
        st.sampled_from(
            [[0], [3], [1, 1], torch.tensor([1.0]), torch.tensor([True]), torch.tensor([[2]])]
        ),
    ),
    (_layers, "dim", st.one_of(st.integers(max_value=0), _not_an_int())),
    (_layers, "depth", st.one_of(st.integers(max_value=0), _not_an_int())),
    (_layers, "heads", st.one_of(st.integers(max_value=0), _not_an_int())),
    (_layers, "ff_mult", st.one_of(st.floats(max_value=1 / 8 - 1e-9), st.just(math.nan))),
    (_layers, "attn_dim_head", st.integers(max_value=0)),
    (_layers, "attn_dropout", _bad_probability()),
    (_wrapper_net, "num_tokens", st.one_of(st.integers(max_value=0), _not_an_int())),
    (_wrapper_net, "max_seq_len", st.one_of(st.integers(max_value=0), _not_an_int())),
    (_wrapper_net, "emb_dropout", _bad_probability()),
]


@settings(FUZZ, max_examples=max(EXAMPLES, 3 * len(INVALID)))
@given(data=st.data())
def test_invalid_argument_is_refused_by_name(data):
    call, name, values = data.draw(st.sampled_from(INVALID), label="case")
    value = data.draw(values, label=name)
    with pytest.raises((ValueError, TypeError)) as err:
        call(name, value)
    assert name in str(err.value), (name, value, err.value)
