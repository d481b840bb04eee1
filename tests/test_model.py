"""The backbone: causality, caching, padding, options, errors, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from demask import Decoder, Encoder, TransformerWrapper

param = pytest.mark.parametrize


def make(
    layers=Decoder, num_tokens=37, max_seq_len=32, dim=32, depth=2, heads=4, wrapper_kw=None, **kw
):
    torch.manual_seed(0)
    return TransformerWrapper(
        num_tokens=num_tokens,
        max_seq_len=max_seq_len,
        attn_layers=layers(dim=dim, depth=depth, heads=heads, attn_dim_head=8, **kw),
        **(wrapper_kw or {}),
    ).eval()


# --- causality ---------------------------------------------------------------------------


@param("j", [0, 5, 11])
def test_decoder_is_causal_encoder_is_not(j):
    x = torch.randint(0, 37, (2, 12))
    y = x.clone()
    y[:, j] = (y[:, j] + 1) % 37
    dec, enc = make(Decoder), make(Encoder)
    d = (dec(x) - dec(y)).abs().amax(dim=(0, 2))  # (N,)
    e = (enc(x) - enc(y)).abs().amax(dim=(0, 2))
    assert torch.all(d[:j] == 0), "a decoder position saw a later token"
    assert d[j] > 0
    assert torch.all(e > 0), "an encoder position did not see the changed token"


# --- key/value cache -----------------------------------------------------------------------


@param("rotary", [False, True])
@param("prompt_len", [1, 4, 9])
def test_cached_decoding_equals_full_forward(rotary, prompt_len):
    net = make(rotary_pos_emb=rotary, attn_kv_heads=2)
    x = torch.randint(0, 37, (3, 20))
    full = net(x)
    cache = net.new_cache(3, capacity=20)
    steps = [net(x[:, :prompt_len], cache=cache)]
    steps += [net(x[:, i : i + 1], cache=cache) for i in range(prompt_len, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert cache.length == 20


def test_cached_decoding_past_max_seq_len_with_rotary():
    net = make(max_seq_len=16, rotary_pos_emb=True)
    x = torch.randint(0, 37, (2, 40))  # 2.5x max_seq_len
    full = net(x)
    cache = net.new_cache(2, capacity=40)
    steps = [net(x[:, :3], cache=cache)] + [net(x[:, i : i + 1], cache=cache) for i in range(3, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_ring_cache_is_a_sliding_window():
    # One layer: with a cache of capacity C, position p attends to positions (p - C, p], which is
    # the last logit of a full forward over that window (rotary positions are relative).
    net = make(depth=1, rotary_pos_emb=True, max_seq_len=8)
    C = 6
    x = torch.randint(0, 37, (2, 20))
    cache = net.new_cache(2, capacity=C)
    net(x[:, :C], cache=cache)
    for p in range(C, 20):
        step = net(x[:, p : p + 1], cache=cache)[:, 0]
        window = net(x[:, p - C + 1 : p + 1])[:, -1]
        torch.testing.assert_close(step, window, atol=1e-5, rtol=0)


def test_absolute_positions_refuse_to_go_past_max_seq_len():
    net = make(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        net(torch.randint(0, 37, (1, 9)))
    cache = net.new_cache(1, capacity=16)
    net(torch.randint(0, 37, (1, 8)), cache=cache)
    with pytest.raises(ValueError, match="past max_seq_len"):
        net(torch.randint(0, 37, (1, 1)), cache=cache)
    assert net.can_cache_kv and not net.can_cache_kv_outside_max_seq_len
    assert make(rotary_pos_emb=True).can_cache_kv_outside_max_seq_len
    assert not make(Encoder).can_cache_kv


# --- padding ---------------------------------------------------------------------------------


def test_encoder_padding_does_not_change_real_positions():
    net = make(Encoder)
    x = torch.randint(0, 37, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 7:] = False
    out = net(x, mask=mask)
    y = x.clone()
    y[:, 7:] = torch.randint(0, 37, (2, 3))
    torch.testing.assert_close(net(y, mask=mask)[:, :7], out[:, :7], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, :7], net(x[:, :7]), atol=1e-5, rtol=0)


@param("rotary", [False, True])
def test_left_padded_decoder_equals_unpadded(rotary):
    net = make(rotary_pos_emb=rotary)
    x = torch.randint(0, 37, (1, 6))
    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), x], 1)
    mask = torch.arange(9)[None] >= pad
    start = torch.tensor([pad])
    out = net(padded, mask=mask, seq_start_pos=start)[:, pad:]
    torch.testing.assert_close(out, net(x), atol=1e-5, rtol=0)
    # the same through the cache, one token at a time after the padded prompt
    cache = net.new_cache(1, capacity=12)
    first = net(padded[:, :5], mask=mask[:, :5], cache=cache, seq_start_pos=start)
    rest = [net(padded[:, i : i + 1], cache=cache, seq_start_pos=start) for i in range(5, 9)]
    torch.testing.assert_close(torch.cat([first, *rest], 1)[:, pad:], net(x), atol=1e-5, rtol=0)


# --- options, each with a behavioural check ------------------------------------------------


def test_rotary_is_relative_absolute_is_not():
    x = torch.randint(0, 37, (2, 8))
    shift = torch.tensor([-5, -5])  # seq_start_pos < 0 shifts every position by +5
    rot, ab = make(rotary_pos_emb=True), make()
    torch.testing.assert_close(rot(x, seq_start_pos=shift), rot(x), atol=1e-5, rtol=0)
    assert not torch.allclose(ab(x, seq_start_pos=shift), ab(x), atol=1e-3)
    assert rot.abs_pos_emb is None and ab.abs_pos_emb is not None


def test_grouped_query_attention_equals_mha_with_shared_kv():
    gqa = make(attn_kv_heads=2)
    mha = make()
    qd, kvd = 4 * 8, 2 * 8
    with torch.no_grad():
        for bg, bm in zip(gqa.attn_layers.blocks, mha.attn_layers.blocks):
            q, k, v = bg.attn.to_qkv.weight.split((qd, kvd, kvd))
            rep = lambda w: w.view(2, 8, -1).repeat_interleave(2, 0).reshape(qd, -1)  # noqa: E731
            bm.attn.to_qkv.weight.copy_(torch.cat([q, rep(k), rep(v)]))
            for name in ("to_out", "attn_norm", "ff_norm", "ff"):
                getattr(bm if name != "to_out" else bm.attn, name).load_state_dict(
                    getattr(bg if name != "to_out" else bg.attn, name).state_dict()
                )
        for name in ("token_emb", "abs_pos_emb", "to_logits"):
            getattr(mha, name).load_state_dict(getattr(gqa, name).state_dict())
        mha.attn_layers.final_norm.load_state_dict(gqa.attn_layers.final_norm.state_dict())
    x = torch.randint(0, 37, (2, 9))
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=0)
    assert gqa.attn_layers.blocks[0].attn.to_qkv.weight.shape == (qd + 2 * kvd, 32)


def test_qk_norm_makes_attention_invariant_to_query_key_scale():
    net = make(attn_qk_norm=True).double()
    for b in net.attn_layers.blocks:  # without the norms' epsilon the invariance is exact
        b.attn.q_norm.eps = b.attn.k_norm.eps = 0.0
    x = torch.randint(0, 37, (2, 9))
    before = net(x)
    with torch.no_grad():
        for b in net.attn_layers.blocks:
            b.attn.to_qkv.weight[: 2 * 32] *= 3.0  # scale q and k rows
    torch.testing.assert_close(net(x), before, atol=1e-9, rtol=0)


def test_feedforward_widths_and_glu():
    plain = make(ff_mult=2)
    glu = make(ff_mult=3, ff_glu=True, ff_swish=True)
    assert plain.attn_layers.blocks[0].ff.proj_in.weight.shape == (64, 32)
    assert glu.attn_layers.blocks[0].ff.proj_in.weight.shape == (2 * 96, 32)
    ff = glu.attn_layers.blocks[0].ff
    h = torch.randn(3, 32)
    a, g = ff.proj_in(h).chunk(2, -1)
    torch.testing.assert_close(ff(h), ff.proj_out(a * F.silu(g)))


def test_attn_dim_head_sets_head_width():
    net = TransformerWrapper(
        num_tokens=10,
        max_seq_len=8,
        attn_layers=Encoder(dim=32, depth=1, heads=2, attn_dim_head=24),
    )
    assert net.attn_layers.blocks[0].attn.to_qkv.weight.shape == (3 * 2 * 24, 32)
    assert net.attn_layers.blocks[0].attn.to_out.weight.shape == (32, 48)


def test_rmsnorm_matches_formula():
    net = make(use_rmsnorm=True)
    norm = net.attn_layers.final_norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    h = torch.randn(4, 32)
    ref = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(h), ref, atol=1e-5, rtol=0)


@param("kw", [{"attn_dropout": 0.3}, {"ff_dropout": 0.3}])
def test_dropout_only_in_training(kw):
    net = make(**kw)
    x = torch.randint(0, 37, (2, 10))
    torch.testing.assert_close(net(x), net(x))  # eval: deterministic
    net.train()
    assert not torch.allclose(net(x), net(x))


def test_attn_flash_is_accepted_and_changes_nothing():
    torch.testing.assert_close(
        make(attn_flash=True)(torch.arange(8)[None]), make()(torch.arange(8)[None])
    )


def test_cross_attention_reads_context_and_respects_its_mask():
    net = make(Encoder, cross_attend=True)
    x = torch.randint(0, 37, (2, 6))
    ctx = torch.randn(2, 5, 32)
    cmask = torch.tensor([[True] * 3 + [False] * 2] * 2)
    out = net(x, context=ctx, context_mask=cmask)
    ctx2 = ctx.clone()
    ctx2[:, 3:] = torch.randn(2, 2, 32)  # masked context positions
    torch.testing.assert_close(net(x, context=ctx2, context_mask=cmask), out, atol=1e-6, rtol=0)
    ctx2[:, 0] += 1.0  # an unmasked one
    assert not torch.allclose(net(x, context=ctx2, context_mask=cmask), out, atol=1e-4)
    with pytest.raises(ValueError, match="context"):
        net(x)


def test_embeddings_sum_embeds_and_continuous_head():
    net = make(wrapper_kw={"add_continuous_pred_head": True})
    x = torch.randint(0, 37, (2, 7))
    logits, emb = net(x, return_logits_and_embeddings=True)
    torch.testing.assert_close(net(x, return_embeddings=True), emb)
    torch.testing.assert_close(net.to_logits(emb), logits)
    (_, inter) = net(x, return_intermediates=True)
    torch.testing.assert_close(inter.continuous_pred, net.continuous_pred_head(emb))
    assert len(inter.hiddens) == 2
    zero = torch.zeros(2, 7, 32)
    torch.testing.assert_close(net(x, sum_embeds=zero), logits)
    assert not torch.allclose(net(x, sum_embeds=zero + 0.5), logits)


def test_tied_embedding_shares_the_table():
    net = make(wrapper_kw={"tie_embedding": True})
    assert net.to_logits.weight is net.token_emb.weight


def test_attn_z_loss_matches_reference_and_keeps_outputs():
    net = make(Decoder, depth=1)
    x = torch.randint(0, 37, (2, 6))
    plain = net(x)
    logits, inter = net(x, return_intermediates=True, return_attn_z_loss=True)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    blk = net.attn_layers.blocks[0]
    h = blk.attn_norm(net.token_emb(x) + net.abs_pos_emb(torch.arange(6)))
    q, k, _ = blk.attn.to_qkv(h).split(32, -1)
    q, k = (t.view(2, 6, 4, 8).transpose(1, 2) for t in (q, k))
    att = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(
        ~torch.ones(6, 6).tril().bool(), -math.inf
    )
    ref = torch.logsumexp(att, -1).pow(2).mean() * 1e-4
    torch.testing.assert_close(inter.attn_z_loss, ref, atol=1e-7, rtol=1e-4)


# --- errors ------------------------------------------------------------------------------------


def test_unknown_kwargs_raise_naming_them():
    with pytest.raises(TypeError, match="attn_flsh"):
        Encoder(dim=8, depth=1, heads=2, attn_flsh=True)
    with pytest.raises(TypeError, match="num_tokes"):
        TransformerWrapper(
            num_tokes=3, num_tokens=3, max_seq_len=4, attn_layers=Encoder(dim=8, depth=1)
        )
    with pytest.raises(TypeError, match="retrun_embeddings"):
        make()(torch.zeros(1, 3, dtype=torch.long), retrun_embeddings=True)


@param(
    "kw, match",
    [
        ({"num_tokens": 0}, "num_tokens must be >= 1, got 0"),
        ({"max_seq_len": -2}, "max_seq_len must be >= 1, got -2"),
        ({"num_tokens": 2.5}, "num_tokens must be an int"),
    ],
)
def test_bad_constructor_arguments(kw, match):
    args = dict(num_tokens=5, max_seq_len=4, attn_layers=Encoder(dim=8, depth=1, heads=2))
    with pytest.raises((ValueError, TypeError), match=match):
        TransformerWrapper(**{**args, **kw})


def test_bad_inputs_name_the_argument():
    net = make()
    with pytest.raises(TypeError, match="x must hold integer token ids"):
        net(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"x must have 2 dimensions, got shape \(4,\)"):
        net(torch.zeros(4, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"x holds token ids in \[0, 40\], expected ids in \[0, 36\]"
    ):
        net(torch.tensor([[0, 40]]))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        net(torch.zeros(1, 4, dtype=torch.long), mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="attn_kv_heads must divide heads=4, got 3"):
        Decoder(dim=8, depth=1, heads=4, attn_kv_heads=3)


# --- learning ----------------------------------------------------------------------------------


def test_tiny_decoder_memorises_a_batch():
    torch.manual_seed(0)
    net = TransformerWrapper(
        num_tokens=20,
        max_seq_len=16,
        attn_layers=Decoder(dim=64, depth=2, heads=4, rotary_pos_emb=True),
    )
    x = torch.randint(0, 20, (4, 16))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = F.cross_entropy(net(x[:, :-1]).transpose(1, 2), x[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.5  # about log(20) = 3.0 at the start
    assert loss.item() < 0.05, f"final loss {loss.item():.3f}"


def test_ring_cache_forgets_padding_once_a_slot_is_overwritten():
    # Row 0 is left-padded by 2. Once the ring wraps, the slots that held padding hold real
    # positions and must be attended to: the step equals a full forward over the window.
    net = make(depth=1, rotary_pos_emb=True, max_seq_len=8)
    C, pad = 6, 2
    x = torch.randint(0, 37, (1, 20))
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), x[:, :4]], 1)  # (1, 6)
    mask = torch.arange(6)[None] >= pad
    start = torch.tensor([pad])
    cache = net.new_cache(1, capacity=C)
    net(padded, mask=mask, cache=cache, seq_start_pos=start)
    for p in range(4, 20):  # p = index into the real tokens
        step = net(x[:, p : p + 1], cache=cache, seq_start_pos=start)[:, 0]
        lo = max(0, p - C + 1)
        # before the wrap the padding slots are still hidden, so the window starts at the first real token
        window = net(x[:, lo : p + 1])[:, -1]
        torch.testing.assert_close(step, window, atol=1e-5, rtol=0)
