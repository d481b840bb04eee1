"""AutoregressiveWrapper on the real backbone: the loss against reference computations, cached
decoding against the full forward, sliding windows, padded prompts, and learning."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from demask import Decoder, TransformerWrapper
from demask.objectives.autoregressive import forgetful_causal_mask
from demask.wrappers.autoregressive import AutoregressiveWrapper

param = pytest.mark.parametrize


def tiny_net(vocab=17, max_seq_len=24, rotary=False, **kw):
    torch.manual_seed(0)
    return TransformerWrapper(
        num_tokens=vocab,
        max_seq_len=max_seq_len,
        attn_layers=Decoder(dim=32, depth=2, heads=2, attn_dim_head=16, rotary_pos_emb=rotary),
        **kw,
    )


# ----------------------------------------------------------------------------- the loss
def test_loss_is_teacher_forcing_cross_entropy():
    model = AutoregressiveWrapper(tiny_net())
    x = torch.randint(0, 17, (3, 10))
    logits = model.net(x[:, :-1])
    ref = F.cross_entropy(logits.transpose(1, 2), x[:, 1:])
    assert torch.allclose(model(x), ref, atol=1e-6)
    assert model.max_seq_len == 24


def test_ignore_index_targets_do_not_count_and_are_fed_as_pad():
    model = AutoregressiveWrapper(tiny_net(), ignore_index=-100, pad_value=3)
    x = torch.randint(0, 17, (2, 9))
    x[0, 6:] = -100
    fed = x.masked_fill(x == -100, 3)
    logits = model.net(fed[:, :-1])
    target = x[:, 1:]
    keep = target != -100
    ref = F.cross_entropy(logits[keep], target[keep])
    loss, metrics = model(x, return_metrics=True)
    assert torch.allclose(loss, ref, atol=1e-6)
    assert metrics["tokens"].item() == int(keep.sum())


def test_padding_mask_hides_padding_and_its_targets():
    model = AutoregressiveWrapper(tiny_net())
    x = torch.randint(0, 17, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    logits = model.net(x[:, :-1], mask=mask[:, :-1])
    keep = mask[:, 1:]
    ref = F.cross_entropy(logits[keep], x[:, 1:][keep])
    assert torch.allclose(model(x, mask=mask), ref, atol=1e-6)


@param("mask_prob,length,count", [(0.15, 20, 3), (0.5, 10, 5), (0.99, 4, 3), (0.05, 10, 0)])
def test_forgetful_mask_hides_exactly_floor_fraction_never_the_first(mask_prob, length, count):
    keep = forgetful_causal_mask(64, length, mask_prob, generator=torch.Generator().manual_seed(0))
    assert ((~keep).sum(dim=1) == count).all()
    assert keep[:, 0].all()
    if count:  # every later position gets hidden sometimes
        assert (~keep[:, 1:]).any(dim=0).all()


def test_mask_prob_masks_attention_in_training_only():
    model = AutoregressiveWrapper(tiny_net(), mask_prob=0.3)
    x = torch.randint(0, 17, (4, 12))
    model.train()
    model.net.eval()  # no dropout anyway; keep the comparison exact
    gen = torch.Generator().manual_seed(7)
    loss = model(x, generator=gen)
    keep = forgetful_causal_mask(4, 11, 0.3, generator=torch.Generator().manual_seed(7))
    ref = F.cross_entropy(model.net(x[:, :-1], mask=keep).transpose(1, 2), x[:, 1:])
    clean = F.cross_entropy(model.net(x[:, :-1]).transpose(1, 2), x[:, 1:])
    assert torch.allclose(loss, ref, atol=1e-6)
    assert not torch.allclose(loss, clean)
    model.eval()
    assert torch.allclose(model(x), clean, atol=1e-6)


@param("mask_prob", [1.0, -0.1, 1.5])
def test_mask_prob_outside_unit_interval_raises(mask_prob):
    with pytest.raises(ValueError, match="mask_prob"):
        AutoregressiveWrapper(tiny_net(), mask_prob=mask_prob)


def test_attn_z_loss_is_added():
    model = AutoregressiveWrapper(tiny_net(), add_attn_z_loss=True)
    x = torch.randint(0, 17, (2, 10))
    logits, inter = model.net(x[:, :-1], return_intermediates=True, return_attn_z_loss=True)
    ce = F.cross_entropy(logits.transpose(1, 2), x[:, 1:])
    loss, metrics = model(x, return_metrics=True)
    assert inter.attn_z_loss > 0
    assert torch.allclose(loss, ce + inter.attn_z_loss, atol=1e-6)
    assert torch.allclose(metrics["attn_z_loss"], inter.attn_z_loss)


def test_next_embedding_loss_is_cosine_distance_to_detached_next_embedding():
    model = AutoregressiveWrapper(
        tiny_net(add_continuous_pred_head=True), next_embed_loss_weight=0.5
    )
    x = torch.randint(0, 17, (2, 10))
    x[1, 7:] = -100
    fed = x.masked_fill(x == -100, 0)
    keep = x[:, 1:] != -100

    def reference(detach):
        logits, inter = model.net(fed[:, :-1], return_intermediates=True)
        ce = F.cross_entropy(logits[keep], x[:, 1:][keep])
        emb = model.net.token_emb(fed[:, 1:])
        emb = emb.detach() if detach else emb
        dist = 1 - F.cosine_similarity(inter.continuous_pred, emb, dim=-1)
        return ce + 0.5 * dist[keep].mean(), dist[keep].mean()

    def table_grad(loss):
        model.zero_grad()
        loss.backward()
        return model.net.token_emb.weight.grad.clone()

    ref, ref_embed = reference(detach=True)
    loss, metrics = model(x, return_metrics=True)
    assert torch.allclose(metrics["next_embed_loss"], ref_embed, atol=1e-6)
    assert torch.allclose(loss, ref, atol=1e-6)
    grad = table_grad(model(x))
    assert torch.allclose(grad, table_grad(reference(detach=True)[0]), atol=1e-7)
    assert not torch.allclose(grad, table_grad(reference(detach=False)[0]), atol=1e-7)


def test_bad_training_input_raises():
    model = AutoregressiveWrapper(tiny_net())
    with pytest.raises(ValueError, match="x"):
        model(torch.randint(0, 17, (2, 1)))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, 17, (2, 30)))
    with pytest.raises(ValueError, match="x"):
        model(torch.full((2, 5), 17))


# ----------------------------------------------------------------------------- decoding
@param("rotary", [False, True])
def test_greedy_with_cache_equals_greedy_without(rotary):
    model = AutoregressiveWrapper(tiny_net(rotary=rotary))
    prompts = torch.randint(0, 17, (3, 5))
    with_cache = model.generate(prompts, 19, temperature=0.0)
    without = model.generate(prompts, 19, temperature=0.0, cache_kv=False)
    assert with_cache.shape == (3, 24)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache[:, :5], prompts)


def reference_greedy(net, prompt, steps):
    """Greedy decoding by the full forward on the last max_seq_len tokens, one row at a time."""
    seq = prompt.clone()
    for _ in range(steps):
        logits = net(seq[None, -net.max_seq_len :])[0, -1]
        seq = torch.cat([seq, logits.argmax()[None]])
    return seq


@param("rotary", [False, True])
def test_no_cache_window_slides_past_max_seq_len(rotary):
    model = AutoregressiveWrapper(tiny_net(max_seq_len=8, rotary=rotary)).eval()
    prompts = torch.randint(0, 17, (2, 3))
    out = model.generate(prompts, 14, temperature=0.0, cache_kv=False)
    for b in range(2):
        assert torch.equal(out[b], reference_greedy(model.net, prompts[b], 14))


def test_rotary_cache_slides_as_a_ring():
    model = AutoregressiveWrapper(tiny_net(max_seq_len=8, rotary=True))
    prompts = torch.randint(0, 17, (2, 3))
    ring = model.generate(prompts, 14, temperature=0.0)
    full = model.generate(prompts, 14, temperature=0.0, cache_kv=False)
    assert ring.shape == (2, 17)
    assert torch.equal(ring[:, :9], full[:, :9])  # identical while the window has not slid
    long_prompt = torch.randint(0, 17, (1, 12))  # a prompt longer than the window works too
    assert model.generate(long_prompt, 4, temperature=0.0).shape == (1, 16)


def test_absolute_positions_refuse_the_cache_past_max_seq_len():
    model = AutoregressiveWrapper(tiny_net(max_seq_len=8))
    with pytest.raises(ValueError, match="cache_kv=False"):
        model.generate(torch.randint(0, 17, (1, 3)), 6)
    model.generate(torch.randint(0, 17, (1, 3)), 5)  # exactly max_seq_len is fine


@param("cache_kv", [True, False])
@param("rotary", [False, True])
def test_padded_prompts_decode_as_if_alone(cache_kv, rotary):
    model = AutoregressiveWrapper(tiny_net(rotary=rotary))
    torch.manual_seed(1)
    rows = [torch.randint(0, 17, (n,)) for n in (6, 2, 4)]
    batch = model.generate(rows, 8, temperature=0.0, cache_kv=cache_kv)
    for row, got in zip(rows, batch):
        alone = model.generate(row[None], 8, temperature=0.0, cache_kv=cache_kv)[0]
        assert torch.equal(got, alone)
    right_padded = torch.zeros(3, 6, dtype=torch.long)
    for i, r in enumerate(rows):
        right_padded[i, : len(r)] = r
    lens = torch.tensor([6, 2, 4])
    new = model.generate(right_padded, 8, temperature=0.0, prompt_lens=lens, return_only_new=True)
    assert torch.equal(new, torch.stack([b[-8:] for b in batch]))


def test_beam_search_on_real_model_equals_brute_force():
    model = AutoregressiveWrapper(tiny_net(vocab=4)).eval()
    prompt = torch.tensor([[1, 3]])
    seq_len = 3
    best, best_score = None, -float("inf")
    for cont in itertools.product(range(4), repeat=seq_len):
        x = torch.cat([prompt[0], torch.tensor(cont)])[None]
        logp = model.net(x[:, :-1]).log_softmax(-1)[0, 1:]  # predictions of the continuation
        score = logp.gather(1, torch.tensor(cont)[:, None]).sum().item()
        if score > best_score:
            best, best_score = list(cont), score
    seq, score = model.beam_search(
        prompt, seq_len, beams=16, return_scores=True, return_only_new=True
    )
    assert seq[0].tolist() == best
    assert score.item() == pytest.approx(best_score, abs=1e-4)
    greedy = model.generate(prompt, seq_len, temperature=0.0)
    assert torch.equal(model.beam_search(prompt, seq_len, beams=1), greedy)


def test_contrastive_decoding_runs_with_a_real_amateur_and_caches():
    expert = AutoregressiveWrapper(tiny_net())
    amateur = tiny_net()
    torch.manual_seed(3)
    for p in amateur.parameters():
        p.data.normal_(0, 0.05)
    prompts = torch.randint(0, 17, (2, 4))
    kw = dict(amateur_model=amateur, temperature=0.0)
    a = expert.generate(prompts, 10, **kw)
    b = expert.generate(prompts, 10, cache_kv=False, **kw)
    assert torch.equal(a, b)
    assert amateur.training  # restored


# ----------------------------------------------------------------------------- learning
def test_memorises_a_batch():
    torch.manual_seed(0)
    vocab, n = 16, 12
    data = torch.randint(1, vocab, (4, n))
    data[:, 0] = torch.arange(4)  # distinct first tokens: the rest is determined by them
    model = AutoregressiveWrapper(tiny_net(vocab=vocab, max_seq_len=n))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = model(data)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    out = model.generate(data[:, :1], n - 1, temperature=0.0)
    assert torch.equal(out, data)


@pytest.mark.parametrize("method", ["generate", "beam_search"])
def test_generation_leaves_no_reference_cycles(method):
    """The key/value cache (and its packed weights) must be freed when generation returns, not
    whenever the cyclic garbage collector next runs: a cycle kept every call's cache alive."""
    import gc

    model = AutoregressiveWrapper(tiny_net())
    prompt = torch.randint(0, 17, (2, 3))
    gc.collect()
    gc.disable()
    try:
        getattr(model, method)(prompt, 5)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = [type(o).__name__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert garbage == []
