"""The masked recipe's options (issue 11): zero-started branch outputs, the skip from the input,
the token shift, the relative-offset bias and bell-shaped mask counts for mean-CE training."""

from __future__ import annotations

import pytest
import torch

from demask import Decoder, Encoder, NonAutoregressiveWrapper, TransformerWrapper
from demask.model.attention_layers import INPUT_SKIP_SCALE
from demask.model.layers import shift_tokens
from demask.model.positions import REL_BIAS_SCALE, RelativePositions
from demask.objectives.masked import MaskedObjective, bell_mass, count_masks
from demask.schedules import get_schedule


def _net(seed: int = 0, **options) -> TransformerWrapper:
    """A rotary Encoder without absolute positions (so that only the options place tokens)."""
    net_keys = ("rel_pos_attn_bias", "use_abs_pos_emb")
    net_opts = {k: options.pop(k) for k in net_keys if k in options}
    torch.manual_seed(seed)
    layers = Encoder(dim=16, depth=2, heads=2, attn_dim_head=8, rotary_pos_emb=True, **options)
    return TransformerWrapper(num_tokens=11, max_seq_len=12, attn_layers=layers,
                              abs_pos_attn_bias=False, **net_opts)  # fmt: skip


def test_zero_started_outputs_make_every_block_the_identity():
    net = _net(zero_init_branch_output=True)
    for block in net.attn_layers.blocks:
        assert block.attn.to_out.weight.count_nonzero() == 0
        assert block.ff.proj_out.weight.count_nonzero() == 0
    x = torch.randint(0, 11, (3, 12))
    expected = net.to_logits(net.attn_layers.final_norm(net.token_emb(x)))
    torch.testing.assert_close(net(x), expected)
    plain = _net()  # the default keeps GPT-2's scaled residual start
    assert all(b.attn.to_out.weight.count_nonzero() > 0 for b in plain.attn_layers.blocks)


def test_input_skip_adds_mu_times_the_input_before_every_block():
    skip, plain = _net(input_skip=True), _net()
    missing = plain.load_state_dict(skip.state_dict(), strict=False)
    assert missing.unexpected_keys == ["attn_layers.input_skip"]
    x = torch.randint(0, 11, (3, 12))
    torch.testing.assert_close(skip(x), plain(x))  # mu starts at 0: the same net
    with torch.no_grad():
        skip.attn_layers.input_skip.copy_(torch.tensor([0.3, -0.2]))
    mu = skip.attn_layers.input_skip.detach() * INPUT_SKIP_SCALE
    x0: list[torch.Tensor] = []  # the reference: hooks that add mu_l x0 to block l's input
    plain.attn_layers.register_forward_pre_hook(lambda m, a: x0.append(a[0]))
    for i, block in enumerate(plain.attn_layers.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: (a[0] + mu[i] * x0[-1], *a[1:]))
    torch.testing.assert_close(skip(x), plain(x))
    skip(x).sum().backward()
    assert skip.attn_layers.input_skip.grad.abs().min() > 0


def test_shift_tokens_reads_each_channel_part_from_its_offset():
    h = torch.arange(2 * 5 * 7, dtype=torch.float32).view(2, 5, 7)
    out = shift_tokens(h, 1)  # parts of 3, 2, 2 channels from i - 1, i, i + 1
    for i in range(5):
        torch.testing.assert_close(out[:, i, :3], h[:, i - 1, :3] if i > 0 else torch.zeros(2, 3))
        torch.testing.assert_close(out[:, i, 3:5], h[:, i, 3:5])
        torch.testing.assert_close(out[:, i, 5:], h[:, i + 1, 5:] if i < 4 else torch.zeros(2, 2))
    two = shift_tokens(h, 2)  # parts of 2, 2, 1, 1, 1 from i - 2 .. i + 2
    torch.testing.assert_close(two[:, 3, :2], h[:, 1, :2])
    torch.testing.assert_close(two[:, 2, 6:], h[:, 4, 6:])
    assert int(two[:, 4, 6:].count_nonzero()) == 0 and int(two[:, :2, :2].count_nonzero()) == 0
    key_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    padded = shift_tokens(h, 1, key_mask)  # padding is read as zeros
    assert int(padded[1, 2, 5:].count_nonzero()) == 0
    torch.testing.assert_close(padded[0], out[0])
    torch.testing.assert_close(padded[1, :2], out[1, :2])


def test_shift_tokens_shifts_every_blocks_normed_inputs():
    shifted, plain = _net(shift_tokens=1), _net()
    plain.load_state_dict(shifted.state_dict())  # no parameters of its own
    x = torch.randint(0, 11, (3, 12))
    assert not torch.allclose(shifted(x), plain(x))
    for block in plain.attn_layers.blocks:  # the reference: hooks on the norms' outputs
        for norm in (block.attn_norm, block.ff_norm):
            norm.register_forward_hook(lambda m, a, out: shift_tokens(out, 1))
    torch.testing.assert_close(shifted(x), plain(x))
    # a changed token reaches exactly its two neighbours' (and its own) first attention input
    probe, inter = _net(shift_tokens=1), []
    probe.attn_layers.blocks[0].attn.register_forward_pre_hook(lambda m, a: inter.append(a[0]))
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % 11
    probe(x), probe(y)
    moved = (inter[0] - inter[1]).abs().amax(dim=(0, 2)) > 0
    assert moved.nonzero().flatten().tolist() == [4, 5, 6]


def test_shift_tokens_is_checked_and_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="shift_tokens must be >= 0, got -1"):
        Encoder(dim=16, depth=1, shift_tokens=-1)
    with pytest.raises(ValueError, match="shift_tokens must be <= 7, got 8"):
        Encoder(dim=16, depth=1, shift_tokens=8)  # 17 parts of 16 channels
    with pytest.raises(TypeError, match="shift_tokens must be an int, got bool True"):
        Encoder(dim=16, depth=1, shift_tokens=True)
    with pytest.raises(ValueError, match="shift_tokens is an Encoder option, got shift_tokens=1"):
        Decoder(dim=16, depth=1, shift_tokens=1)
    model = NonAutoregressiveWrapper(_net(shift_tokens=1), mask_id=10, steps=4)
    with pytest.raises(ValueError, match="cache='prefix' does not support a net with shift_tok"):
        model.generate(batch_size=1, seq_len=12, block_size=4, cache="prefix")
    out = model.generate(batch_size=1, seq_len=12, block_size=4)  # uncached blocks work
    assert out.shape == (1, 12) and int((out == 10).sum()) == 0


def test_relative_bias_is_the_table_entry_of_each_offset():
    rel = RelativePositions(heads=2, max_len=4)
    with torch.no_grad():
        rel.table.copy_(torch.randn(2, 7))
    q_pos, k_pos = torch.tensor([0, 2, 5]), torch.tensor([1, 3, 4, 9])
    bias = rel(q_pos, k_pos)
    assert bias.shape == (2, 3, 4)
    for h in range(2):
        for a, i in enumerate(q_pos.tolist()):
            for b, j in enumerate(k_pos.tolist()):
                offset = max(-3, min(3, j - i))  # beyond +-(max_len - 1): the last entry
                assert bias[h, a, b].item() == pytest.approx(
                    rel.table[h, offset + 3].item() * REL_BIAS_SCALE
                )
    batched = rel(torch.stack([q_pos, q_pos + 1]), torch.stack([k_pos, k_pos + 1]))
    assert batched.shape == (2, 2, 3, 4)
    torch.testing.assert_close(batched[0], bias)
    torch.testing.assert_close(batched[1], bias)  # only the offsets count


def test_relative_bias_starts_as_nothing_and_a_constant_row_changes_nothing():
    rel, plain = _net(rel_pos_attn_bias=True), _net()
    plain.load_state_dict(rel.state_dict(), strict=False)
    x = torch.randint(0, 11, (3, 12))
    torch.testing.assert_close(rel(x), plain(x))
    with torch.no_grad():  # the same logit added to every key of a head: softmax ignores it
        rel.rel_pos_attn.table.copy_(torch.tensor([[0.7], [-1.1]]).expand(2, 23))
    torch.testing.assert_close(rel(x), plain(x))
    with torch.no_grad():
        rel.rel_pos_attn.table.normal_()
    assert not torch.allclose(rel(x), plain(x), atol=1e-4)
    rel(x).square().sum().backward()  # every offset within the window gets a gradient
    assert rel.rel_pos_attn.table.grad.abs().min() > 0


def test_relative_bias_needs_bidirectional_layers_and_a_bool():
    layers = Decoder(dim=16, depth=1, heads=2)
    with pytest.raises(ValueError, match="rel_pos_attn_bias=True needs bidirectional"):
        TransformerWrapper(num_tokens=5, max_seq_len=8, attn_layers=layers, rel_pos_attn_bias=True)
    with pytest.raises(TypeError, match="rel_pos_attn_bias must be a bool, got 1"):
        TransformerWrapper(num_tokens=5, max_seq_len=8, attn_layers=Encoder(dim=16, depth=1),
                           rel_pos_attn_bias=1)  # fmt: skip
    with pytest.raises(TypeError, match="input_skip must be a bool, got 'yes'"):
        Encoder(dim=16, depth=1, input_skip="yes")


def test_bell_counts_follow_the_bell_and_the_loss_is_the_mean_of_row_means():
    n, b = 64, 4096
    mask, counts, _ = count_masks(torch.ones(b, n, dtype=torch.bool), mass=bell_mass)
    assert torch.equal(mask.sum(-1), counts) and counts.min() >= 1 and counts.max() <= n
    levels = torch.arange(1, n + 1, dtype=torch.float64)
    q = bell_mass(levels) / bell_mass(levels).sum()
    assert counts.double().mean().item() == pytest.approx((q * levels).sum().item(), rel=0.01)
    share_mid = ((counts > n // 4) & (counts <= 3 * n // 4)).double().mean().item()
    assert share_mid == pytest.approx(q[n // 4 : 3 * n // 4].sum().item(), abs=0.02)

    schedule = get_schedule("linear")

    def objective(masking: str) -> MaskedObjective:
        return MaskedObjective(schedule, mask_id=9, num_tokens=10, no_replace_prob=0.0,
                               random_token_prob=0.0, cond_drop_prob=0.0, mdlm=False,
                               train_masking=masking)  # fmt: skip

    x = torch.randint(0, 9, (6, 32))
    cond = torch.zeros(6, 32, dtype=torch.bool)
    row_ce = torch.arange(1.0, 7.0)  # every masked token of row r has CE r + 1

    def predict(inp, mask):
        rows, cols = mask.nonzero(as_tuple=True)
        return row_ce[rows], torch.zeros(len(rows), 10), rows, cols

    torch.manual_seed(0)
    loss, *_ = objective("bell")(x, cond, predict)
    assert loss.item() == pytest.approx(row_ce.mean().item())  # rows alike, whatever k
    torch.manual_seed(0)
    pooled, _, rows, _ = objective("schedule")(x, cond, predict)
    counts = torch.bincount(rows, minlength=6).double()
    expected = (counts * row_ce.double()).sum() / counts.sum()  # tokens alike: rows by k
    assert pooled.item() == pytest.approx(expected.item())


def test_bell_masking_is_for_mean_ce_only():
    net = _net()
    with pytest.raises(ValueError, match="train_masking='bell' is for mean-CE training"):
        NonAutoregressiveWrapper(net, mask_id=10, train_masking="bell")
    with pytest.raises(ValueError, match=r"train_masking must be one of \['bell', 'schedule'\]"):
        NonAutoregressiveWrapper(net, mask_id=10, use_simple_mdlm_loss_weight=False,
                                 train_masking="uniform")  # fmt: skip
