"""Property-based fuzzing of the public API with hypothesis (issue 12): random small valid
configurations of both wrappers train one step and generate (invalid arguments:
tests/test_properties_invalid.py).

Properties of every valid configuration (vocabulary, length, width, heads, depth, positions,
schedule, sampler, steps, temperature, filter, prompt with holes):
- one training step gives a finite loss, finite gradients and finite weights;
- generation returns ids in [0, num_tokens), no mask id is left, the given prompt tokens are
  unchanged, and a fixed torch.Generator repeats the output exactly.

The examples are random on every run (fuzzing keeps exploring) and bounded to stay fast; set
DEMASK_FUZZ_EXAMPLES=500 for a longer search. A failure prints the shrunk example and its
@reproduce_failure blob.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from _fuzz import FUZZ
from hypothesis import given
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


# the seed's schedule: a registry name or a callable of progress p (1 at p = 0, 0 at p = 1)
SEED_SCHEDULES: list[Any] = sorted(SCHEDULES) + [
    lambda p: 1 - p**2,
    lambda p: math.cos(math.pi * p / 2) ** 3,  # float-only: element by element
    lambda p: (1 - p) ** 0.5,
]
# token ids may come in any integer dtype (converted to long); the output is always long
ID_DTYPES = st.sampled_from([torch.long, torch.int32, torch.int16, torch.int8, torch.uint8])
TEMPERATURES = st.one_of(
    st.sampled_from([0.0, 1e-320, 1e-30, 1.0]), st.floats(0.0, 3.0, allow_nan=False)
)


# ------------------------------------------------------------------ configurations
@st.composite
def id_tensors(draw: st.DrawFn, num_tokens: int, shape: tuple[int, int]) -> torch.Tensor:
    """A tensor of ids in [0, num_tokens) of the given shape, in a random integer dtype."""
    size = shape[0] * shape[1]
    ids = draw(st.lists(st.integers(0, num_tokens - 1), min_size=size, max_size=size))
    return torch.tensor(ids).view(shape).to(draw(ID_DTYPES))


@st.composite
def layers_kwargs(draw: st.DrawFn) -> dict[str, Any]:
    """Encoder/Decoder keyword arguments of a tiny model."""
    heads = draw(st.integers(1, 3))
    return dict(
        dim=draw(st.sampled_from([8, 12, 16])),
        depth=draw(st.integers(1, 2)),
        heads=heads,
        attn_dim_head=draw(st.sampled_from([4, 8])),
        attn_kv_heads=draw(st.sampled_from([d for d in (1, heads) if heads % d == 0])),
        rotary_pos_emb=draw(st.booleans()),
        ff_mult=draw(st.sampled_from([0.5, 1, 2])),
        ff_glu=draw(st.booleans()),
        use_rmsnorm=draw(st.booleans()),
    )


@st.composite
def masked_setups(draw: st.DrawFn) -> dict[str, Any]:
    num_tokens = draw(st.integers(2, 12))
    length = draw(st.integers(1, 10))
    batch = draw(st.integers(1, 3))
    mask_id = draw(st.integers(0, num_tokens - 1))
    real = [t for t in range(num_tokens) if t != mask_id]
    x = draw(st.lists(st.sampled_from(real), min_size=batch * length, max_size=batch * length))
    holes = draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length))
    wrapper = dict(
        mask_id=mask_id,
        steps=draw(st.integers(1, 6)),
        schedule=draw(st.sampled_from(SEED_SCHEDULES)),
        self_cond=draw(st.booleans()),
        no_replace_prob=draw(st.sampled_from([0.0, 0.15])),
        random_token_prob=draw(st.sampled_from([0.0, 0.1])),
        can_mask_prev_unmasked=draw(st.booleans()),
    )
    critic = draw(st.sampled_from(["none", "self", "net"]))  # token critic: none, head, network
    generate = dict(
        sampler=draw(st.sampled_from(sorted(RULES))),
        start_temperature=draw(TEMPERATURES),
        filter_thres=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.95, allow_nan=False))),
        anneal_temperature=draw(st.booleans()),
        noise_level_scale=draw(st.floats(0.0, 2.0, allow_nan=False)),
    )
    return dict(
        net=dict(num_tokens=num_tokens, max_seq_len=length, layers=draw(layers_kwargs())),
        wrapper=wrapper,
        generate=generate,
        critic=critic,
        x=torch.tensor(x).view(batch, length).to(draw(ID_DTYPES)),
        holes=torch.tensor(holes).view(batch, length),
        # generate from the prompt with holes, or from scratch with batch_size and seq_len
        unprompted_len=draw(st.one_of(st.none(), st.integers(1, length))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def causal_setups(draw: st.DrawFn) -> dict[str, Any]:
    num_tokens = draw(st.integers(2, 12))
    max_seq_len = draw(st.integers(2, 10))
    batch = draw(st.integers(1, 3))
    layers = draw(layers_kwargs())
    prompt_len = draw(st.integers(1, max_seq_len))
    seq_len = draw(st.integers(1, 6))
    inside = prompt_len + seq_len <= max_seq_len
    name = draw(st.sampled_from([None, *sorted(FILTER_FUNCTIONS)]))
    filter_kwargs = {
        None: None,
        "top_k": draw(st.sampled_from([None, {"k": 1}, {"thres": 0.5}])),
        "top_p": {"p": draw(st.floats(0.01, 1.0))},
        "min_p": {"p": draw(st.floats(0.0, 1.0))},
        "top_a": {"a": draw(st.floats(0.0, 1.0))},
    }[name]
    generate = dict(
        temperature=draw(TEMPERATURES),
        filter_logits_fn=name,
        filter_kwargs=filter_kwargs,
        # absolute positions cannot slide a cached window past max_seq_len (documented)
        cache_kv=draw(st.booleans()) and (inside or layers["rotary_pos_emb"]),
        eos_token=draw(st.one_of(st.none(), st.integers(0, num_tokens - 1))),
        repetition_penalty=draw(st.sampled_from([1.0, 1.3])),
    )
    train_len = draw(st.integers(2, max_seq_len + 1))
    form = draw(st.sampled_from(["tensor", "padded", "list"]))
    lengths = [prompt_len] * batch
    if form != "tensor":
        lengths = draw(st.lists(st.integers(1, prompt_len), min_size=batch, max_size=batch))
    return dict(
        net=dict(num_tokens=num_tokens, max_seq_len=max_seq_len, layers=layers),
        generate=generate,
        x=draw(id_tensors(num_tokens, (batch, train_len))),
        prompts=draw(id_tensors(num_tokens, (batch, prompt_len))),
        form=form,
        lengths=lengths,
        seq_len=seq_len,
        beams=draw(st.sampled_from([0, 0, 1, 3])),  # 0: no beam search in this example
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_net(cfg: dict[str, Any], layers_cls: type) -> TransformerWrapper:
    torch.manual_seed(0)
    return TransformerWrapper(
        num_tokens=cfg["num_tokens"],
        max_seq_len=cfg["max_seq_len"],
        attn_layers=layers_cls(**cfg["layers"]),
    )


def train_one_step(model: torch.nn.Module, loss: torch.Tensor) -> None:
    assert loss.ndim == 0 and torch.isfinite(loss), loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ------------------------------------------------------------------ valid configurations
@FUZZ
@given(setup=masked_setups())
def test_masked_wrapper_trains_and_generates(setup):
    net_cfg = setup["net"]
    critic = None
    if setup["critic"] == "net":
        tiny = dict(dim=8, depth=1, heads=1)
        critic = TransformerWrapper(
            num_tokens=net_cfg["num_tokens"],
            max_seq_len=net_cfg["max_seq_len"],
            logits_dim=1,
            attn_layers=Encoder(**tiny),
        )
    w = NonAutoregressiveWrapper(
        build_net(net_cfg, Encoder),
        token_critic=critic,
        self_token_critic=setup["critic"] == "self",
        **setup["wrapper"],
    )
    torch.manual_seed(setup["seed"])
    train_one_step(w, w(setup["x"]).loss)

    mask_id, num_tokens = w.mask_id, w.num_tokens
    prompt = setup["x"].masked_fill(setup["holes"], mask_id)  # (B, N) with holes
    batch, length = prompt.shape
    if setup["unprompted_len"] is not None:
        length = setup["unprompted_len"]
        where: dict[str, Any] = dict(batch_size=batch, seq_len=length)
    else:
        where = dict(prompt=prompt)

    def run() -> torch.Tensor:
        gen = torch.Generator().manual_seed(setup["seed"])
        return w.generate(generator=gen, **where, **setup["generate"])

    out = run()
    assert out.shape == (batch, length) and out.dtype == torch.long
    assert bool(((out >= 0) & (out < num_tokens)).all())
    assert not bool((out == mask_id).any())
    if "prompt" in where:
        given_tokens = ~setup["holes"]
        assert torch.equal(out[given_tokens], prompt[given_tokens].long())
    assert torch.equal(run(), out)
    bits = w.nelbo(setup["x"], num_times=2, generator=torch.Generator().manual_seed(0))
    assert bits.shape == (batch,) and bool(torch.isfinite(bits).all())
    assert bool((bits >= 0).all())  # (0 is a valid estimate when no draw masked anything)


def _prompt_forms(prompts: torch.Tensor, lengths: list[int], form: str) -> tuple[Any, Any]:
    """The prompts as generate takes them: (prompts argument, prompt_lens argument)."""
    if form == "list":
        return [row[:n] for row, n in zip(prompts, lengths)], None
    if form == "padded":
        return prompts, lengths
    return prompts, None


def _check_prompts_kept(
    out: Any, prompts: torch.Tensor, lengths: list[int], form: str, seq_len: int, pad_value: int
) -> list[torch.Tensor]:
    """Every row begins with its own prompt (left-padded with pad_value when padded); returns
    each row's new tokens."""
    width = prompts.shape[1]
    if form == "list":
        assert isinstance(out, list) and len(out) == len(lengths)
        for row, prompt, n in zip(out, prompts, lengths):
            assert row.shape == (n + seq_len,) and torch.equal(row[:n], prompt[:n].long())
        return [row[-seq_len:] for row in out]
    assert out.shape == (prompts.shape[0], width + seq_len) and out.dtype == torch.long
    for row, prompt, n in zip(out, prompts, lengths):
        assert torch.equal(row[width - n : width], prompt[:n].long())
        assert bool((row[: width - n] == pad_value).all())
    return list(out[:, width:])


@FUZZ
@given(setup=causal_setups())
def test_autoregressive_wrapper_trains_and_generates(setup):
    model = AutoregressiveWrapper(build_net(setup["net"], Decoder))
    torch.manual_seed(setup["seed"])
    train_one_step(model, model(setup["x"]))

    prompts, lengths, form = setup["prompts"], setup["lengths"], setup["form"]
    seq_len, opts = setup["seq_len"], setup["generate"]
    given_prompts, prompt_lens = _prompt_forms(prompts, lengths, form)

    def run() -> Any:
        gen = torch.Generator().manual_seed(setup["seed"])
        return model.generate(
            given_prompts, seq_len, prompt_lens=prompt_lens, generator=gen, **opts
        )

    out = run()
    new = _check_prompts_kept(out, prompts, lengths, form, seq_len, model.pad_value)
    assert all(bool(((row >= 0) & (row < model.num_tokens)).all()) for row in new)
    again = run()
    assert all(torch.equal(a, b) for a, b in zip(again, out))
    if opts["eos_token"] is not None:  # after a row's EOS only pad_value follows
        for row in new:
            hits = (row == opts["eos_token"]).nonzero()
            if len(hits):
                assert bool((row[int(hits[0]) + 1 :] == model.pad_value).all())

    if setup["beams"]:
        beam = dict(beams=setup["beams"], prompt_lens=prompt_lens, cache_kv=opts["cache_kv"])
        best, scores = model.beam_search(given_prompts, seq_len, return_scores=True, **beam)
        _check_prompts_kept(best, prompts, lengths, form, seq_len, model.pad_value)
        assert bool(torch.isfinite(scores).all()) and bool((scores <= 0).all())
        again = model.beam_search(given_prompts, seq_len, **beam)
        assert all(torch.equal(a, b) for a, b in zip(again, best))
