"""The Encoder's absolute-position attention bias (`demask.model.positions`)."""

from __future__ import annotations

import math

import pytest
import torch

from demask import Decoder, Encoder, TransformerWrapper
from demask.model.positions import ADDED_SCALE, UntiedPositions, sinusoids


def test_sinusoids_are_the_transformer_waves_at_unit_std():
    table = sinusoids(10, 6)
    assert table.shape == (10, 6)
    assert table.std().item() == pytest.approx(1.0, abs=1e-6)
    scale = table[1, 1].item() / math.cos(1.0)  # column 1 is cos(pos * 1)
    for pos in range(10):
        for i in range(3):
            freq = 1.0 / 10000 ** (2 * i / 6)
            assert table[pos, 2 * i].item() == pytest.approx(scale * math.sin(pos * freq), abs=1e-5)
            assert table[pos, 2 * i + 1].item() == pytest.approx(
                scale * math.cos(pos * freq), abs=1e-5
            )


def test_bias_is_the_untied_positional_term_per_head():
    torch.manual_seed(0)
    heads, pos_dim, table_dim = 3, 4, 8
    module = UntiedPositions(table_dim, heads, pos_dim)
    p_query, p_key = torch.randn(2, 5, table_dim), torch.randn(2, 7, table_dim)
    bias = module(p_query, p_key)
    assert bias.shape == (2, heads, 5, 7)
    w = module.to_qk.weight
    for h in range(heads):
        u_q = w[h * pos_dim : (h + 1) * pos_dim]
        u_k = w[(heads + h) * pos_dim : (heads + h + 1) * pos_dim]
        expected = (p_query @ u_q.T) @ (p_key @ u_k.T).transpose(-1, -2) / math.sqrt(pos_dim)
        torch.testing.assert_close(bias[:, h], expected)


def test_the_mimetic_start_is_a_symmetric_kernel_that_falls_with_the_offset():
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=5, max_seq_len=32,
                             attn_layers=Encoder(dim=64, depth=1, heads=2))  # fmt: skip
    assert net.abs_pos_attn is not None
    pos = torch.arange(32)
    bias = net._pos_bias(pos, pos).detach()  # (H, N, N)
    torch.testing.assert_close(bias, bias.transpose(-1, -2))  # U_k = U_q at the start
    # mean bias at offsets 0, 1, 2, 4, 8, 16: falling, in every head (attention starts local)
    by_offset = torch.stack([bias.diagonal(o, -2, -1).mean(-1) for o in (0, 1, 2, 4, 8, 16)])
    assert bool((by_offset[1:] < by_offset[:-1]).all()), by_offset


def test_the_table_is_added_at_the_tokens_scale_with_the_bias():
    torch.manual_seed(0)
    for bias in (True, False):
        net = TransformerWrapper(num_tokens=5, max_seq_len=8, abs_pos_attn_bias=bias,
                                 attn_layers=Encoder(dim=16, depth=1, heads=2))  # fmt: skip
        x = torch.zeros(1, 8, dtype=torch.long)
        pos = torch.arange(8)
        h = net._embed(x, pos, top=7, sum_embeds=None)
        added = net.abs_pos_emb(pos) * (ADDED_SCALE if bias else 1.0)
        torch.testing.assert_close(h[0], net.token_emb(x)[0] + added)


def test_which_nets_build_the_bias():
    def build(layers, **kw):
        return TransformerWrapper(num_tokens=5, max_seq_len=8, attn_layers=layers, **kw)

    assert build(Encoder(dim=16, depth=1, heads=2)).abs_pos_attn is not None  # default: on
    assert build(Decoder(dim=16, depth=1, heads=2)).abs_pos_attn is None  # default: off
    assert build(Encoder(dim=16, depth=1, heads=2), abs_pos_attn_bias=False).abs_pos_attn is None
    rotary = build(Encoder(dim=16, depth=1, heads=2, rotary_pos_emb=True))
    assert rotary.abs_pos_emb is not None and rotary.abs_pos_attn is not None  # default: both
    alone = build(Encoder(dim=16, depth=1, heads=2, rotary_pos_emb=True), abs_pos_attn_bias=False)
    assert alone.abs_pos_emb is None and alone.abs_pos_attn is None  # rotary alone
    no_table = build(Encoder(dim=16, depth=1, heads=2, rotary_pos_emb=True), use_abs_pos_emb=False)
    assert no_table.abs_pos_emb is None and no_table.abs_pos_attn is None
    causal = build(Decoder(dim=16, depth=1, heads=2, rotary_pos_emb=True))
    assert causal.abs_pos_emb is None and causal.abs_pos_attn is None
    with pytest.raises(ValueError, match="abs_pos_attn_bias=True needs bidirectional"):
        build(Decoder(dim=16, depth=1, heads=2), abs_pos_attn_bias=True)
    with pytest.raises(TypeError, match="abs_pos_attn_bias must be a bool or None, got 1"):
        build(Encoder(dim=16, depth=1, heads=2), abs_pos_attn_bias=1)
    for layers in (Encoder(dim=16, depth=1, heads=2),
                   Encoder(dim=16, depth=1, heads=2, rotary_pos_emb=True)):  # fmt: skip
        with pytest.raises(ValueError, match="needs the learned position table, but use_abs_pos"):
            build(layers, use_abs_pos_emb=False, abs_pos_attn_bias=True)  # not silently bias-free


def test_the_bias_changes_the_output_only_through_attention_and_is_position_dependent():
    """Two positions holding the same token in a fully masked row: with the bias (and the table
    added) they get different outputs; the bias is what a forward adds (zeroing U_q, U_k gives
    the added-only net's output)."""
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=5, max_seq_len=8,
                             attn_layers=Encoder(dim=16, depth=2, heads=2))  # fmt: skip
    x = torch.full((1, 8), 4)
    out = net(x)
    assert not torch.allclose(out[0, 0], out[0, 5])
    with torch.no_grad():
        net.abs_pos_attn.to_qk.weight.zero_()
    h = net._embed(x, torch.arange(8), top=7, sum_embeds=None)
    plain = net.to_logits(net.attn_layers(h, torch.arange(8)))
    torch.testing.assert_close(net(x), plain)
