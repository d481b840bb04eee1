"""NonAutoregressiveWrapper: the seed contract, prompts, samplers, critics and bad input."""

import math
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from demask import Encoder, Losses, NonAutoregressiveWrapper, TransformerWrapper
from demask.samplers import RULES

param = pytest.mark.parametrize
V, N, MASK = 9, 12, 9  # 9 real tokens, mask id 9, length 12
EXACT = sorted(n for n, c in RULES.items() if c.exact_counts)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(n=N, dim=16, logits_dim=None):
    return TransformerWrapper(
        num_tokens=V + 1,
        max_seq_len=n,
        logits_dim=logits_dim,
        attn_layers=Encoder(dim=dim, depth=1, heads=2),
    )


def wrapper(**kw):
    torch.manual_seed(0)
    return NonAutoregressiveWrapper(tiny_net(), mask_id=MASK, **kw)


class OneHotNet(nn.Module):
    """Predicts `target` at every position whatever the input; counts its calls."""

    def __init__(self, target, num_tokens=V + 1, scale=60.0):
        super().__init__()
        self.num_tokens, self.max_seq_len, self.emb_dim = num_tokens, target.numel(), num_tokens
        self.attn_layers = SimpleNamespace(dim=num_tokens)
        self.register_buffer("emb", F.one_hot(target, num_tokens).float() * scale)
        self.anchor = nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, x, return_embeddings=False, sum_embeds=None, **kwargs):
        self.calls += 1
        return self.emb.expand(x.shape[0], -1, -1)  # (B, N, V): embeddings == logits

    def logits_from_embeddings(self, emb):
        return emb


def seed_counts(fillable, steps, seed_fn):
    """floor(F * seed_fn(j / steps)) for j = 1..steps, the progress as an exact fraction."""
    return [math.floor(fillable * seed_fn(Fraction(j, steps))) for j in range(1, steps + 1)]


# ----------------------------------------------------------------- generate: the seed contract
@param("batch_size,shape", [(None, (N,)), (1, (1, N)), (5, (5, N))])
def test_generate_shape_and_no_mask_left(batch_size, shape):
    out = wrapper().generate(batch_size=batch_size)
    assert out.shape == shape and out.dtype == torch.long
    assert not (out == MASK).any()
    assert ((out >= 0) & (out < V)).all()


@param("sampler", EXACT)
@param(
    "schedule,seed_fn",
    [
        ("linear", lambda p: 1 - p),  # exact rational arithmetic
        ("cosine", lambda p: math.cos(math.pi * float(p) / 2)),
        (lambda p: 1 - p**2, lambda p: 1 - p**2),
    ],
)
@param("can_remask", [False, True])
def test_masked_count_after_each_step_follows_the_schedule(sampler, schedule, seed_fn, can_remask):
    w = wrapper(schedule=schedule, can_mask_prev_unmasked=can_remask)
    steps = 6  # 2/3 of the way: cos(pi/3) = 0.5, a float-rounding trap for floor(12 * ...)
    _, history = w.generate(batch_size=3, steps=steps, sampler=sampler, return_history=True)
    assert history.shape == (steps, 3, N)
    want = seed_counts(N, steps, seed_fn)
    for row in range(3):
        assert (history[:, row] == MASK).sum(-1).tolist() == want


def test_revealed_tokens_are_never_remasked_by_default():
    w = wrapper()
    _, history = w.generate(batch_size=4, return_history=True)
    for prev, cur in zip(history, history[1:]):
        revealed = prev != MASK
        assert torch.equal(cur[revealed], prev[revealed])


def test_can_mask_prev_unmasked_lets_tokens_go_back():
    w = wrapper(can_mask_prev_unmasked=True)
    _, history = w.generate(batch_size=16, start_temperature=3.0, return_history=True)
    back = [((p != MASK) & (c == MASK)).any() for p, c in zip(history, history[1:])]
    assert any(back)


def test_eval_inside_training_state_restored():
    w = wrapper()
    seen = []
    w.net.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    w.train()
    w.generate(batch_size=2)
    assert seen and not any(seen) and w.training
    w.eval()
    w.generate(batch_size=2)
    assert not w.training


def test_fixed_generator_repeats():
    w = wrapper()
    a = w.generate(batch_size=4, generator=torch.Generator().manual_seed(7))
    b = w.generate(batch_size=4, generator=torch.Generator().manual_seed(7))
    c = w.generate(batch_size=4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@param("sampler", sorted(RULES))
def test_one_hot_logits_give_that_exact_sequence(sampler):
    target = torch.tensor([3, 1, 4, 1, 5, 8, 2, 6, 5, 3, 5, 8])
    w = NonAutoregressiveWrapper(OneHotNet(target), mask_id=MASK, steps=5)
    out = w.generate(batch_size=3, start_temperature=2.0, sampler=sampler, filter_thres=0.0)
    assert torch.equal(out, target.expand(3, -1))


def test_seq_len_shorter_than_max():
    out = wrapper().generate(batch_size=2, seq_len=7)
    assert out.shape == (2, 7) and not (out == MASK).any()


# ----------------------------------------------------------------- prompts (conditioning)
def _prompt():
    p = torch.full((N,), MASK)
    p[:3] = torch.tensor([1, 2, 3])  # prefix
    p[6] = 7  # a token in the middle: holes on both sides
    p[-2:] = torch.tensor([0, 5])  # suffix
    return p


@param("sampler", sorted(RULES))
def test_prompt_tokens_never_change(sampler):
    w = wrapper(can_mask_prev_unmasked=True)
    p = _prompt()
    out, history = w.generate(
        batch_size=4, prompt=p, sampler=sampler, start_temperature=3.0, return_history=True
    )
    given = p != MASK
    assert out.shape == (4, N) and not (out == MASK).any()
    assert (out[:, given] == p[given]).all()
    assert (history[:, :, given] == p[given]).all()
    if RULES[sampler].exact_counts:  # the schedule applies to the 6 fillable positions
        assert (history[:, 0] == MASK).sum(-1).tolist() == seed_counts(6, 18, lambda q: 1 - q)


def test_prompt_batch_with_different_holes():
    prompt = torch.full((2, N), MASK)
    prompt[0, :8] = 4
    prompt[1, 5:] = 2
    w = wrapper()
    _, history = w.generate(prompt=prompt, steps=4, return_history=True)
    out = history[-1]
    assert (out[0, :8] == 4).all() and (out[1, 5:] == 2).all() and not (out == MASK).any()
    assert (history[:, 0] == MASK).sum(-1).tolist() == seed_counts(4, 4, lambda q: 1 - q)
    assert (history[:, 1] == MASK).sum(-1).tolist() == seed_counts(5, 4, lambda q: 1 - q)


def test_prompt_1d_without_batch_size_returns_1d():
    out = wrapper().generate(prompt=_prompt())
    assert out.shape == (N,)


# ----------------------------------------------------------------- samplers and the network calls
def test_ancestral_step_that_reveals_nothing_does_not_call_the_network():
    target = torch.tensor([3, 1, 4, 1, 5, 8])
    net = OneHotNet(target)
    w = NonAutoregressiveWrapper(net, mask_id=MASK, steps=40)
    out, history = w.generate(
        batch_size=1,
        sampler="ancestral",
        return_history=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(out, target[None])
    start = torch.full((1, 6), MASK)
    states = [start] + list(history)
    changed_before_last = sum(
        not torch.equal(a, b) for a, b in zip(states[:-2], states[1:-1])
    )  # a change after step j (j < steps) forces one call at step j + 1
    assert net.calls == 1 + changed_before_last
    assert net.calls < 40 // 2


def test_exact_count_samplers_call_the_network_once_per_step():
    target = torch.tensor([3, 1, 4, 1, 5, 8, 2, 6])
    net = OneHotNet(target)
    w = NonAutoregressiveWrapper(net, mask_id=MASK, steps=8)
    w.generate(batch_size=2, sampler="confidence")
    assert net.calls == 8


def test_self_conditioning_feeds_previous_embeddings():
    w = wrapper(self_cond=True)
    got = []
    w.net.register_forward_hook(
        lambda m, args, kwargs, out: got.append(kwargs.get("sum_embeds")), with_kwargs=True
    )
    w.generate(batch_size=2, steps=4)
    assert got[0] is None and all(g is not None and g.shape == (2, N, 16) for g in got[1:])


def test_self_conditioning_starts_as_the_plain_model():
    """The feedback projection starts at zero: a fresh self-conditioned wrapper gives the plain
    wrapper's NELBO on the same net, and after one step it has learned to use the feedback."""
    w = wrapper(self_cond=True, self_cond_train_prob=1.0)
    plain = NonAutoregressiveWrapper(w.net, mask_id=MASK)
    assert int(w.to_self_cond.weight.count_nonzero()) == 0
    x = _x()
    a = w.nelbo(x, generator=torch.Generator().manual_seed(3))
    b = plain.nelbo(x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    w(x).loss.backward()
    opt.step()
    assert int(w.to_self_cond.weight.count_nonzero()) > 0
    c = w.nelbo(x, generator=torch.Generator().manual_seed(3))
    d = plain.nelbo(x, generator=torch.Generator().manual_seed(3))
    assert float((c - d).abs().max()) > 0.0  # the second pass now reads the first


@param("critic", ["token_critic", "self_token_critic"])
def test_generation_with_a_critic_follows_the_schedule(critic):
    kw = {"token_critic": tiny_net(logits_dim=1)} if critic == "token_critic" else {critic: True}
    w = wrapper(**kw)
    _, history = w.generate(batch_size=2, steps=6, return_history=True)
    want = seed_counts(N, 6, lambda q: 1 - q)
    assert (history[:, 1] == MASK).sum(-1).tolist() == want and not (history[-1] == MASK).any()


# ----------------------------------------------------------------- training
def _x(b=8, seed=0):
    return torch.randint(0, V, (b, N), generator=torch.Generator().manual_seed(seed))


def test_forward_returns_losses_and_backpropagates():
    w = wrapper()
    out = w(_x())
    assert isinstance(out, Losses) and out.critic_loss is None
    assert out.loss is out.generator_loss and out.loss.ndim == 0
    out.loss.backward()
    assert w.net.token_emb.weight.grad is not None


@param("critic", ["token_critic", "self_token_critic"])
def test_critic_losses(critic):
    kw = {"token_critic": tiny_net(logits_dim=1)} if critic == "token_critic" else {critic: True}
    w = wrapper(critic_loss_weight=0.5, **kw)
    torch.manual_seed(0)
    out = w(_x(), generator_sample_temperature=1.0)
    assert out.critic_loss is not None and out.critic_loss > 0
    total = out.generator_loss + 0.5 * out.critic_loss
    assert float(out.loss.detach()) == pytest.approx(float(total.detach()))
    gen_only = w(_x(), only_train_generator=True)
    assert gen_only.critic_loss is None and gen_only.loss is gen_only.generator_loss
    critic_only = w(_x(), only_train_critic=True)
    assert critic_only.loss is critic_only.critic_loss
    assert not critic_only.generator_loss.requires_grad
    if critic == "token_critic":
        w.zero_grad()
        critic_only.loss.backward()
        assert w.net.token_emb.weight.grad is None  # the generator is not trained
        assert w.token_critic.token_emb.weight.grad is not None


def test_critic_target_marks_exactly_the_wrong_tokens():
    # a generator that is always right: every sampled token equals the truth, target all zero,
    # so a critic that outputs a large negative logit everywhere has (almost) zero loss
    target = torch.tensor([3, 1, 4, 1, 5, 8, 2, 6, 5, 3, 5, 8])
    critic = tiny_net(logits_dim=1)
    with torch.no_grad():
        critic.to_logits.weight.zero_()
    critic.to_logits.bias = nn.Parameter(torch.tensor([-30.0]))
    w = NonAutoregressiveWrapper(OneHotNet(target), mask_id=MASK, token_critic=critic)
    out = w(target.expand(4, -1), generator_sample_temperature=0.5)
    assert float(out.critic_loss.detach()) < 1e-9


@param("prob,passes", [(1.0, 2), (0.0, 1)])
def test_self_conditioning_training_passes(prob, passes):
    w = wrapper(self_cond=True, self_cond_train_prob=prob)
    calls = []
    w.net.register_forward_pre_hook(lambda m, a: calls.append(1))
    w(_x()).loss.backward()
    assert len(calls) == passes
    assert (w.to_self_cond.weight.grad is not None) == (prob == 1.0)


@param("schedule", [lambda p: 1 - p**2, lambda p: math.cos(math.pi * p / 2) ** 2])
def test_callable_schedule_trains_and_generates(schedule):
    w = wrapper(schedule=schedule)
    loss = w(_x()).loss
    assert torch.isfinite(loss)
    loss.backward()
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    # the facade's conversion: mask_ratio(t) = seed_fn(1 - t)
    assert w.schedule.mask_ratio(t).tolist() == pytest.approx([schedule(0.75), schedule(0.5)])
    _, history = w.generate(batch_size=2, steps=5, return_history=True)
    assert (history[:, 0] == MASK).sum(-1).tolist() == seed_counts(N, 5, schedule)


def test_tiny_model_memorises_a_small_batch():
    torch.manual_seed(0)
    data = torch.randint(0, V, (4, N), generator=torch.Generator().manual_seed(1))
    net = TransformerWrapper(
        num_tokens=V + 1, max_seq_len=N, attn_layers=Encoder(dim=32, depth=2, heads=2)
    )
    w = NonAutoregressiveWrapper(net, mask_id=MASK, no_replace_prob=0.0, random_token_prob=0.0)
    opt = torch.optim.Adam(w.parameters(), lr=3e-3)
    before = float(w.nelbo(data, reduction="mean", generator=torch.Generator().manual_seed(0)))
    # 300 steps: with the Encoder's position bias (abs_pos_attn_bias) random rows are memorised
    # more slowly than with positions added alone (NELBO 0.85 against 0.48 bits after 150 steps)
    for _ in range(300):
        loss = w(data.repeat(8, 1)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = float(w.nelbo(data, reduction="mean", generator=torch.Generator().manual_seed(0)))
    assert before > 2.5 and after < 0.25 * before, (before, after)  # log2(9) = 3.17 bits
    samples = w.generate(batch_size=8, start_temperature=0.0)
    hits = sum(any(torch.equal(s, d) for d in data) for s in samples)
    assert hits >= 6


# ----------------------------------------------------------------- bad input
@param(
    "kw,match",
    [
        (dict(mask_id=10), "mask_id"),
        (dict(mask_id=-1), "mask_id"),
        (dict(mask_id=MASK, steps=0), "steps"),
        (dict(mask_id=MASK, schedule="quadratic"), "schedule"),
        (dict(mask_id=MASK, schedule=3), "schedule"),
        (dict(mask_id=MASK, no_replace_prob=0.8, random_token_prob=0.5), "random_token_prob"),
        (dict(mask_id=MASK, token_critic="x", self_token_critic=True), "self_token_critic"),
    ],
)
def test_bad_constructor_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        NonAutoregressiveWrapper(tiny_net(), **kw)


@param(
    "x,match",
    [
        (torch.zeros(2, N - 1, dtype=torch.long), "length 12"),
        (torch.full((2, N), V + 1), r"\[0, 9\]"),
        (torch.full((2, N), MASK), "mask_id"),
        (torch.zeros(N, dtype=torch.long), "dimensions"),
    ],
)
def test_bad_training_data(x, match):
    with pytest.raises(ValueError, match=match):
        wrapper()(x)


@param(
    "kw,match",
    [
        (dict(filter_thres=1.0), "filter_thres"),
        (dict(filter_thres=-0.1), "filter_thres"),
        (dict(steps=0), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(start_temperature=-1.0), "start_temperature"),
        (dict(seq_len=N + 1), "seq_len"),
        (dict(prompt=torch.full((N + 1,), MASK)), "prompt"),
        (dict(prompt=torch.full((2, 3, N), MASK)), "prompt"),
        (dict(prompt=torch.full((2, N), MASK), batch_size=3), "batch_size"),
        (dict(prompt=torch.full((N,), V + 1)), "prompt"),
        (dict(sampler="best"), "sampler"),
    ],
)
def test_bad_generate_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        wrapper().generate(**kw)


def test_only_train_both_is_an_error():
    with pytest.raises(ValueError, match="only_train_critic"):
        wrapper(self_token_critic=True)(_x(), only_train_generator=True, only_train_critic=True)
