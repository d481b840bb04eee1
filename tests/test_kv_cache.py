"""The static key/value cache at explicit positions, the compiled decode step, the seed library's
cache idiom (`cache=Intermediates`) and its beam-search / generate options, on real tiny models."""

from __future__ import annotations

import pytest
import torch

from demask import Decoder, Encoder, TransformerWrapper
from demask.decoding.autoregressive import Running, _decode_step, compile_decode_step
from demask.wrappers.autoregressive import AutoregressiveWrapper

param = pytest.mark.parametrize
pytestmark = pytest.mark.usefixtures("one_thread")


def make(layers=Decoder, num_tokens=29, max_seq_len=24, **kw):
    torch.manual_seed(0)
    return TransformerWrapper(
        num_tokens=num_tokens,
        max_seq_len=max_seq_len,
        attn_layers=layers(dim=32, depth=2, heads=4, attn_dim_head=8, **kw),
    ).eval()


# ----------------------------------------------------------------------------- static cache
@param("kw", [{}, dict(rotary_pos_emb=True), dict(attn_kv_heads=2, ff_glu=True)])
@param("prompt_len", [1, 3, 7])
@torch.no_grad()
def test_static_decode_steps_equal_the_full_forward(kw, prompt_len):
    net = make(**kw)
    x = torch.randint(0, 29, (3, 16))
    full = net(x)  # (3, 16, V)
    cache = net.new_cache(3, capacity=20)
    steps = [net(x[:, :prompt_len], cache=cache)]
    pos = torch.zeros(1, dtype=torch.long)
    for i in range(prompt_len, 16):
        pos.fill_(i)  # explicit positions: the cache's own count stays where the prefill left it
        steps.append(_decode_step(net, x[:, i : i + 1], cache, pos, None)[:, None])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == prompt_len


@param("rotary", [False, True])
@torch.no_grad()
def test_static_decode_with_left_padding_equals_unpadded_rows(rotary):
    net = make(rotary_pos_emb=rotary)
    rows = [torch.randint(0, 29, (n,)) for n in (5, 2, 4)]
    new = torch.randint(0, 29, (3, 6))
    width = 5
    padded = torch.zeros(3, width, dtype=torch.long)
    start = torch.tensor([width - len(r) for r in rows])
    for b, r in enumerate(rows):
        padded[b, start[b] :] = r
    mask = torch.arange(width)[None, :] >= start[:, None]
    cache = net.new_cache(3, capacity=12)
    first = net(padded, mask=mask, cache=cache, seq_start_pos=start)[:, -1]
    got = [first]
    pos = torch.zeros(1, dtype=torch.long)
    for i in range(5):
        pos.fill_(width + i)
        got.append(_decode_step(net, new[:, i : i + 1], cache, pos, start))
    for b, r in enumerate(rows):
        want = net(torch.cat([r, new[b, :5]])[None])[0, len(r) - 1 :]  # (6, V)
        torch.testing.assert_close(torch.stack([g[b] for g in got]), want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_decode_step_reads_the_whole_capacity_under_a_mask():
    net = make()
    cache = net.new_cache(2, capacity=10)
    net(torch.randint(0, 29, (2, 3)), cache=cache)
    for p in (3, 7):
        slots, mask = cache.step(torch.tensor([p]), None)
        assert mask is not None and mask.shape == (2, 1, 1, 10)  # the same shape at every position
        assert mask[0, 0, 0].tolist() == [i <= p and i < 4 or i == p for i in range(10)]


@torch.no_grad()
def test_reads_grow_by_buckets_and_equal_the_full_forward():
    """Attention reads the smallest power-of-two bucket (>= 64) holding every written slot: one
    token at a time through positions 0..149 (buckets 64, 128, 256 -> capacity 200), the host
    path and the decoding loop's explicit positions give the full forward's logits."""
    net = make(max_seq_len=200)
    cache = net.new_cache(2, capacity=200)
    bounds = {p: cache.read_bound(p) for p in (0, 62, 63, 64, 127, 128, 198, 199, 250)}
    assert bounds == {0: 64, 62: 64, 63: 64, 64: 128, 127: 128, 128: 200, 198: 200, 199: 200,
                      250: 200}  # fmt: skip
    small = net.new_cache(2, capacity=40)
    assert [small.read_bound(p) for p in (0, 38, 39, 80)] == [40, 40, 40, 40]
    x = torch.randint(0, 29, (2, 150))
    full = net(x)
    host = torch.cat([net(x[:, i : i + 1], cache=cache) for i in range(150)], dim=1)
    torch.testing.assert_close(host, full, atol=1e-5, rtol=1e-5)
    _, mask = cache.step(torch.tensor([150]), None, read_slots=cache.read_bound(150))
    assert mask is not None and mask.shape == (2, 1, 1, 200)
    model = AutoregressiveWrapper(net)
    kw = dict(temperature=0.0, filter_logits_fn=None)
    cached = model.generate(x[:, :3], 140, cache_kv=True, **kw)  # the loop sets read_slots
    plain = model.generate(x[:, :3], 140, cache_kv=False, **kw)
    assert torch.equal(cached, plain)


def test_token_range_is_still_checked():
    net = make()
    with pytest.raises(ValueError, match="x"):
        net(torch.tensor([[1, 29]]))
    cache = net.new_cache(1)
    net(torch.tensor([[1, 2]]), cache=cache)
    with pytest.raises(ValueError, match="x"):
        net(torch.tensor([[-1]]), cache=cache)  # a user's continuation is checked too
    _, inter = net(torch.tensor([[1, 2]]), return_intermediates=True)
    with pytest.raises(ValueError, match="x"):
        net(torch.tensor([[1, 2, 40]]), cache=inter)
    with pytest.raises(ValueError, match="prompts"):
        AutoregressiveWrapper(net).generate(torch.tensor([[1, 29]]), 3)


# ----------------------------------------------------------------------------- the seed's idiom
@param("kw", [{}, dict(rotary_pos_emb=True)])
@torch.no_grad()
def test_cache_idiom_gives_the_full_forward_logits(kw):
    net = make(**kw)
    x = torch.randint(0, 29, (2, 12))
    full = net(x)
    logits, cache = net(x[:, :4], return_intermediates=True)
    torch.testing.assert_close(logits, full[:, :4], atol=1e-5, rtol=1e-5)
    for n in range(5, 13):
        logits, cache = net(x[:, :n], cache=cache, return_intermediates=True)
        assert logits.shape == (2, 1, 29)  # only the new position
        torch.testing.assert_close(logits[:, 0], full[:, n - 1], atol=1e-5, rtol=1e-5)
    assert cache.cache_length == 12
    # several new tokens at once, and branching twice from the same state
    _, start = net(x[:, :4], return_intermediates=True)
    for _ in range(2):
        logits, _ = net(x[:, :9], cache=start, return_intermediates=True)
        torch.testing.assert_close(logits, full[:, 4:9], atol=1e-5, rtol=1e-5)


def test_cache_idiom_errors():
    with torch.no_grad():
        _, inter = make(Encoder)(torch.randint(0, 29, (1, 4)), return_intermediates=True)
        with pytest.raises(ValueError, match="causal"):
            make()(torch.randint(0, 29, (1, 5)), cache=inter)
        net = make()
        _, inter = net(torch.randint(0, 29, (1, 4)), return_intermediates=True)
        with pytest.raises(ValueError, match="whole sequence"):
            net(torch.randint(0, 29, (1, 4)), cache=inter)


def test_training_with_intermediates_keeps_gradients_and_values():
    net = make().train()
    x = torch.randint(0, 29, (2, 8))
    logits, inter = net(x, return_intermediates=True, return_attn_z_loss=True)
    assert len(inter.kv) == 2 and not inter.kv[0][0].requires_grad
    (logits.sum() + inter.attn_z_loss).backward()
    assert all(p.grad is not None for p in net.parameters())
    plain, _ = net(x, return_intermediates=True)  # recording keys/values changes nothing
    assert torch.equal(plain, net(x))


# ----------------------------------------------------------------------------- generate options
def test_restrict_to_max_seq_len_false_attends_to_the_whole_sequence():
    net = make(rotary_pos_emb=True, max_seq_len=8)
    model = AutoregressiveWrapper(net)
    prompt = torch.randint(0, 29, (2, 3))
    kw = dict(temperature=0.0, restrict_to_max_seq_len=False)
    cached = model.generate(prompt, 10, **kw)
    uncached = model.generate(prompt, 10, cache_kv=False, **kw)
    assert torch.equal(cached, uncached)
    with torch.no_grad():  # the last token is the argmax after the whole 12-token sequence
        assert int(net(cached[:1, :-1])[0, -1].argmax()) == int(cached[0, -1])
    with pytest.raises(ValueError, match="restrict_to_max_seq_len"):
        AutoregressiveWrapper(make(max_seq_len=8)).generate(prompt, 10, **kw)


def test_beam_search_scores_are_summed_log_probs_of_a_full_forward():
    net = make()
    model = AutoregressiveWrapper(net)
    prompts = torch.randint(0, 29, (2, 3))
    seqs, scores = model.beam_search(prompts, 4, beams=3, return_beams_and_scores=True)
    assert seqs.shape == (3, 2, 7) and scores.shape == (3, 2)  # the seed's layout: beams first
    assert bool((scores[:-1] >= scores[1:]).all())
    with torch.no_grad():
        logp = net(seqs.reshape(6, 7)[:, :-1]).log_softmax(-1)  # (6, 6, V)
    new = seqs.reshape(6, 7)[:, 3:]
    want = logp[:, 2:].gather(-1, new[..., None]).squeeze(-1).sum(-1).view(3, 2)
    torch.testing.assert_close(scores, want, atol=1e-4, rtol=1e-5)
    assert torch.equal(seqs[0], model.beam_search(prompts, 4, beams=3))


def test_stochastic_beam_search_repeats_with_a_fixed_generator():
    model = AutoregressiveWrapper(make())
    prompts = torch.randint(0, 29, (2, 3))

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return model.beam_search(prompts, 6, beams=3, stochastic=True, generator=g,
                                 return_beams_and_scores=True, **kw)  # fmt: skip

    (a, sa), (b, sb) = run(0), run(0)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    runs = {tuple(run(s)[0].flatten().tolist()) for s in range(6)}
    assert len(runs) > 1  # the draws differ
    best = model.beam_search(prompts, 6, beams=3, return_beams_and_scores=True)[1]
    assert bool((sa[0] <= best[0] + 1e-5).all())  # sampling never beats the search's best
    greedy = run(1, temperature=0.0)[0]  # temperature 0: no noise, the plain search
    assert torch.equal(
        greedy, model.beam_search(prompts, 6, beams=3, return_beams_and_scores=True)[0]
    )
    (c, _) = run(0, filter_logits_fn="top_k", filter_kwargs={"k": 1})
    assert c.shape == a.shape


# ----------------------------------------------------------------------------- compiled step
@pytest.mark.slow
@param("rotary", [False, True])
def test_compiled_decode_gives_the_eager_tokens(rotary):
    model = AutoregressiveWrapper(make(rotary_pos_emb=rotary, max_seq_len=16))
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4])]  # left-padded inside
    kw = dict(temperature=0.0, filter_logits_fn=None)
    n = 20 if rotary else 12  # rotary: past max_seq_len, where the ring slides
    eager = model.generate(prompts, n, **kw)
    compiled = model.generate(prompts, n, compile=True, **kw)
    assert [r.tolist() for r in eager] == [r.tolist() for r in compiled]
    again = model.generate(prompts, n, compile=True, **kw)  # replays, no new compile
    assert [r.tolist() for r in again] == [r.tolist() for r in eager]
    assert compile_decode_step(True) is compile_decode_step(True)
    assert Running(compile=True).cache_kv
    with torch.no_grad():  # weights updated in place (an optimiser step): no stale frozen copy
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    eager = model.generate(prompts, n, **kw)
    compiled = model.generate(prompts, n, compile=True, **kw)
    assert [r.tolist() for r in eager] == [r.tolist() for r in compiled]
