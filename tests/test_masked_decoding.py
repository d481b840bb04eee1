"""Masked decoding through the wrapper: mixed batches, network calls, eval mode, block decoding."""

import pytest
import torch

from demask import Encoder, NonAutoregressiveWrapper, TransformerWrapper
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
