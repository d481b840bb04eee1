"""Masked decoding through the wrapper: mixed batches, network calls, eval mode, block decoding."""

from types import SimpleNamespace

import pytest
import torch

from demask import Decoder, Encoder, NonAutoregressiveWrapper, TransformerWrapper
from demask.samplers import RULES, MaskedSampler, ThresholdRule

param = pytest.mark.parametrize
V, N, MASK = 9, 12, 9

pytestmark = pytest.mark.usefixtures("one_thread")

# rules whose choice is a function of the logits alone (random, ancestral and remdm draw their
# own random numbers, so a row's draws depend on the batch around it)
DETERMINISTIC = sorted(set(RULES) - {"random", "ancestral", "remdm"})


def tiny_net(logits_dim=None, seed=0):
    torch.manual_seed(seed)
    return TransformerWrapper(
        num_tokens=V + 1,
        max_seq_len=N,
        logits_dim=logits_dim,
        attn_layers=Encoder(dim=16, depth=2, heads=2, rotary_pos_emb=True),
    )


def wrapper(**kw):
    return NonAutoregressiveWrapper(tiny_net(), mask_id=MASK, **kw).eval()


def mixed_prompts():
    """Prompts of different lengths (prefixes of 0-5 tokens) and hole patterns."""
    p = torch.full((5, N), MASK)
    p[1, :2] = torch.tensor([1, 2])
    p[2, :5] = torch.tensor([3, 4, 5, 6, 7])
    p[3, ::3] = 8  # holes between given tokens
    p[4, 6:] = torch.tensor([0, 1, 2, 3, 4, 5])  # a suffix
    return p


@param("sampler", DETERMINISTIC)
@param("steps", [4, 12])
def test_a_row_decodes_the_same_alone_and_in_a_mixed_batch(sampler, steps):
    w = wrapper()
    prompts = mixed_prompts()
    kw = dict(steps=steps, sampler=sampler, start_temperature=0.0, noise_level_scale=0.0)
    batch = w.generate(prompt=prompts, **kw)
    for row in range(prompts.shape[0]):
        alone = w.generate(prompt=prompts[row : row + 1], **kw)
        assert torch.equal(alone[0], batch[row]), (sampler, row)


def test_threshold_stats_count_the_network_evaluations():
    w = wrapper()
    calls = []
    w.net.register_forward_hook(lambda *a: calls.append(1))
    out, stats = w.generate(batch_size=3, steps=N, sampler=ThresholdRule(0.5), return_stats=True)
    assert not (out == MASK).any()
    assert stats.evaluations == len(calls) <= N and stats.filled == 3 * N
    assert stats.evaluations_per_token == pytest.approx(stats.evaluations / N)


def test_a_masked_sampler_object_is_used_as_given():
    w = wrapper()
    sampler = MaskedSampler(ThresholdRule(0.9), temperature=0.0)
    a = w.generate(batch_size=2, sampler=sampler, start_temperature=5.0)
    b = w.generate(batch_size=2, sampler="threshold", start_temperature=0.0)
    assert torch.equal(a, b)


@param("critic", ["token_critic", "self_token_critic"])
def test_generate_and_nelbo_keep_each_modules_own_training_flag(critic):
    kw = {"token_critic": tiny_net(logits_dim=1)} if critic == "token_critic" else {critic: True}
    w = NonAutoregressiveWrapper(tiny_net(), mask_id=MASK, **kw)
    frozen = w.token_critic if w.token_critic is not None else w.to_critic_logits
    w.train()
    frozen.eval()  # a frozen critic inside a training wrapper
    seen = []
    w.net.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    w.generate(batch_size=2, steps=3)
    w.nelbo(torch.randint(0, V, (2, N)), num_times=2)
    assert seen and not any(seen)
    assert w.training and w.net.training and not frozen.training


# ----------------------------------------------------------------- block decoding
def net_of(layers, depth, seed=0):
    torch.manual_seed(seed)
    return TransformerWrapper(
        num_tokens=V + 1,
        max_seq_len=N,
        attn_layers=layers(dim=16, depth=depth, heads=2, rotary_pos_emb=True),
    )


def test_one_block_is_plain_decoding():
    w = wrapper()
    kw = dict(batch_size=3, steps=6, sampler="confidence")
    plain = w.generate(generator=torch.Generator().manual_seed(1), **kw)
    one = w.generate(block_size=N, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(plain, one)


def test_blocks_fill_left_to_right():
    w = wrapper()
    out, history = w.generate(batch_size=2, steps=6, block_size=4, return_history=True)
    assert history.shape[0] == 6 and not (out == MASK).any()
    for j, state in enumerate(history, start=1):  # 2 steps per block
        done = 4 * (j // 2)
        assert not (state[:, :done] == MASK).any() and (state[:, done + 4 :] == MASK).all()


@param("layers,depth", [(Encoder, 1), (Decoder, 2)])
@param("cache", ["prefix", "dual"])
@param("sampler", ["confidence", "threshold"])
def test_cached_blocks_equal_uncached_where_the_cache_is_exact(layers, depth, cache, sampler):
    """Exact: a one-layer net's keys depend on each position's own token; a causal net's
    prefix keys never see the block. Greedy decoding, so any logit change would show."""
    w = NonAutoregressiveWrapper(net_of(layers, depth), mask_id=MASK).eval()
    prompts = mixed_prompts()
    kw = dict(steps=8, block_size=4, sampler=sampler, start_temperature=0.0)
    plain, s0 = w.generate(prompt=prompts, return_stats=True, **kw)
    cached, s1 = w.generate(prompt=prompts, cache=cache, return_stats=True, **kw)
    assert torch.equal(plain, cached)
    assert s0.evaluations == s1.evaluations


def test_cached_logits_equal_uncached_logits_for_one_layer():
    from demask.decoding.block_cache import CachedDenoiser
    from demask.denoiser import Denoiser
    from demask.samplers import MaskedState

    net = net_of(Encoder, 1).eval()
    seq = torch.randint(0, V, (2, N))
    seq[:, 4:] = MASK
    state = MaskedState(seq, seq == MASK, MASK)
    block = (seq == MASK) & (torch.arange(N) < 8)
    for cache in ("prefix", "dual"):
        model = CachedDenoiser(net, cache=cache)
        model.start_block(4, 8)
        first = model.logits(state, block).values  # the recording call: a full forward
        seq2 = seq.clone()
        seq2[:, 4] = 2  # the block changes; prefix and suffix do not
        state2 = MaskedState(seq2, seq2 == MASK, MASK)
        want = Denoiser(net).logits(state2, state2.masked & block)
        got = model.logits(state2, state2.masked & block)
        torch.testing.assert_close(first, Denoiser(net).logits(state, block).values)
        torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=1e-5)


def test_deep_bidirectional_cache_is_approximate_but_decodes():
    w = NonAutoregressiveWrapper(net_of(Encoder, 2), mask_id=MASK).eval()
    out = w.generate(batch_size=2, steps=6, block_size=4, cache="dual")
    assert not (out == MASK).any()


class EosNet(torch.nn.Module):
    """Predicts token 1 everywhere, EOS (token 0) at position 5, strongly; counts its calls."""

    def __init__(self):
        super().__init__()
        target = torch.ones(N, dtype=torch.long)
        target[5] = 0
        self.num_tokens, self.max_seq_len, self.emb_dim = V + 1, N, V + 1
        self.attn_layers = SimpleNamespace(dim=V + 1)
        self.register_buffer("emb", torch.nn.functional.one_hot(target, V + 1).float() * 20)
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, x, return_embeddings=False, sum_embeds=None, **kwargs):
        self.calls += 1
        return self.emb.expand(x.shape[0], -1, -1)

    def logits_from_embeddings(self, emb):
        return emb


def test_blocks_stop_at_the_first_eos_block():
    net = EosNet()
    w = NonAutoregressiveWrapper(net, mask_id=MASK)
    out, stats = w.generate(batch_size=2, steps=6, block_size=4, eos_id=0, return_stats=True)
    assert (out[:, 5:] == 0).all() and (out[:, :5] == 1).all()
    assert stats.evaluations == net.calls == 4  # blocks 1 and 2, two steps each; block 3 skipped


def test_eos_penalty_keeps_eos_out_of_a_fixed_canvas():
    w = NonAutoregressiveWrapper(EosNet(), mask_id=MASK)
    plain = w.generate(batch_size=2, steps=4, start_temperature=0.0)
    assert (plain[:, 5] == 0).all()
    out = w.generate(batch_size=2, steps=4, start_temperature=0.0, eos_id=0, eos_penalty=30.0)
    assert not (out == 0).any()


@param(
    "kw,match",
    [
        (dict(cache="prefix"), "block_size"),
        (dict(cache="full", block_size=4), "cache"),
        (dict(eos_penalty=1.0), "eos_id"),
        (dict(eos_id=MASK), "mask"),
        (dict(block_size=0), "block_size"),
    ],
)
def test_bad_block_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        wrapper().generate(batch_size=1, **kw)
