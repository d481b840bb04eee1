"""The ablation's re-initialisations and added modules (`INITS`), applied to a built net.

Each maps a freshly built demask (or reference) net to the row's start: initialisations of
embeddings, positions and projections, and modules that exist only in the ablation (a relative
offset bias, ALiBi, a skip from the embeddings), each started so that the net computes what it
did before. Rows name them in `Row.init` (`benchmarks.ablation_rows`); `benchmarks.positions`
uses them too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from demask.model.positions import RelativePositions


def baseline_init(net: Any) -> None:
    """demask's initialisation before this ablation (every Linear and Embedding N(0, 0.02),
    zero biases), so that each row is one change from the same start whatever the library's
    current default is."""
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _outputs(block: Any) -> tuple[nn.Linear, nn.Linear]:
    """A block's projections that write into the residual stream (attention, feed-forward)."""
    return block.attn.to_out, block.ff.proj_out


def _resid_scaled(net: Any) -> None:
    """GPT-2's scaled residual init: the output projections of every block at 0.02 / sqrt(2L)."""
    depth = net.attn_layers.depth
    for block in net.attn_layers.blocks:
        for lin in _outputs(block):
            nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * depth))


def _emb_kaiming(net: Any) -> None:
    """Token embeddings at std sqrt(2 / dim) (the reference's kaiming-normal scale)."""
    nn.init.normal_(net.token_emb.weight, std=math.sqrt(2 / net.emb_dim))


def _emb_unit(net: Any) -> None:
    """Token embeddings at std 1 / sqrt(dim) (unit-norm rows)."""
    nn.init.normal_(net.token_emb.weight, std=1 / math.sqrt(net.emb_dim))


def _sinusoids(n: int, d: int) -> Tensor:
    """(n, d) unit-std sinusoids: demask's own (`demask.model.positions.sinusoids`)."""
    from demask.model.positions import sinusoids

    return sinusoids(n, d)


def _pos_sinusoid_at(std: float) -> Callable[[Any], None]:
    """Learned absolute positions initialised as sinusoids at std `std`."""

    def init(net: Any) -> None:
        table = net.abs_pos_emb.weight
        with torch.no_grad():
            table.copy_(_sinusoids(*table.shape) * std)

    return init


def _pos_sinusoid(net: Any) -> None:
    """Learned absolute positions initialised as sinusoids at the token embeddings' scale."""
    table = net.abs_pos_emb.weight
    with torch.no_grad():
        table.copy_(_sinusoids(*table.shape) * float(net.token_emb.weight.std()))


class _UnitTable(nn.Module):
    """Learned positions stored at unit scale (sinusoids) and multiplied by `scale` in use, so
    that Adam's per-step noise is small against them."""

    def __init__(self, n: int, d: int, scale: float):
        super().__init__()
        self.table = nn.Parameter(_sinusoids(n, d))
        self.scale = scale

    def forward(self, pos: Tensor) -> Tensor:
        return torch.nn.functional.embedding(pos, self.table) * self.scale


def _pos_unit_table(net: Any) -> None:
    n, d = net.abs_pos_emb.weight.shape
    net.abs_pos_emb = _UnitTable(n, d, float(net.token_emb.weight.std()))


def _mimetic_qk(net: Any) -> None:
    """Mimetic attention (Trockman and Kolter 2023, arXiv 2305.09828): every head's key projection
    starts equal to its query projection, at std 1/sqrt(dim), so that W_q^T W_k is near a scaled
    identity and a query first attends to the inputs that resemble it (itself, and with smooth
    positions, its neighbours)."""
    for block in net.attn_layers.blocks:
        attn = block.attn
        w = attn.to_qkv.weight
        q_dim = attn.heads * attn.dim_head
        if attn.kv_heads != attn.heads:
            raise ValueError("mimetic init needs one key head per query head")
        with torch.no_grad():
            w[:q_dim].normal_(std=w.shape[1] ** -0.5)
            w[q_dim : 2 * q_dim].copy_(w[:q_dim])


def _head_zero(net: Any) -> None:
    """The output projection to the logits at zero (untied heads only): every first prediction is
    exactly uniform, and the head learns from the stream's first useful features (modded-nanogpt's
    start)."""
    if net.to_logits.weight is net.token_emb.weight:
        raise ValueError("head_zero needs an untied output projection")
    nn.init.zeros_(net.to_logits.weight)


def _resid_zero(net: Any) -> None:
    """Every block's output projections (attention and feed-forward) at zero: each block starts as
    the identity on the residual stream."""
    for block in net.attn_layers.blocks:
        for lin in _outputs(block):
            nn.init.zeros_(lin.weight)


def _fan_in_at(gain: float) -> Callable[[Any], None]:
    """Every block's projections at std gain / sqrt(fan_in) (width-aware, as PyTorch's default
    and the reference scale theirs), the residual outputs further by 1 / sqrt(2 * depth);
    embeddings and the logit projection as they were."""

    def init(net: Any) -> None:
        out_scale = 1 / math.sqrt(2 * net.attn_layers.depth)
        for block in net.attn_layers.blocks:
            for lins, scale in (((block.attn.to_qkv, block.ff.proj_in), 1.0),
                                (_outputs(block), out_scale)):  # fmt: skip
                for lin in lins:
                    std = gain * scale / math.sqrt(lin.weight.shape[1])
                    nn.init.normal_(lin.weight, std=std)

    return init


class _AlibiBias(nn.Module):
    """Symmetric ALiBi (Press et al. 2022, arXiv 2108.12409): head h adds -m_h |j - i|, slopes
    started at 2^(-8 (h + 1) / H) and learned (through their logarithm), shared by the layers."""

    def __init__(self, heads: int):
        super().__init__()
        start = torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)])
        self.log_slope = nn.Parameter(start.log())

    def forward(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        dist = (key_pos[None, :] - query_pos[:, None]).abs().float()  # (Nq, Nk)
        return -self.log_slope.exp()[:, None, None] * dist


def _add_bias(make: Callable[[Any], nn.Module]) -> Callable[[Any], None]:
    """Add a second positional logit bias (a module of the query and key positions) to the net's
    own (rotary default with the position bias only)."""

    def init(net: Any) -> None:
        if net.abs_pos_attn is None:
            raise ValueError("this row needs the position bias (abs_pos_attn_bias=True)")
        net.extra_bias = make(net)
        own = net._pos_bias
        net._pos_bias = lambda q, k: own(q, k) + net.extra_bias(q, k)

    return init


def _x0_mix(net: Any) -> None:
    """The library's input skip (`Encoder(input_skip=True)`) added to a built net: block l reads
    x + mu_l x0, mu_l started at 0 (modded-nanogpt's skip from the input)."""
    layers = net.attn_layers
    layers.input_skip = nn.Parameter(torch.zeros(layers.depth))


VALUE_EMB_SCALE = 8.0  # a value embedding is used at VALUE_EMB_SCALE x its stored table


class _ValueEmbeddings(nn.Module):
    """Value embeddings (modded-nanogpt's): block l's attention values get e_l(token) added, one
    table per block, started at zero (the net computes what it did) and kept outside
    `attn_layers` (AdamW, not Muon). The net's input tokens reach the blocks through hooks."""

    def __init__(self, net: Any):
        super().__init__()
        attn = net.attn_layers.blocks[0].attn
        self.q_dim, self.kv_dim = attn.heads * attn.dim_head, attn.kv_heads * attn.dim_head
        self.tables = nn.Parameter(torch.zeros(net.attn_layers.depth, net.num_tokens, self.kv_dim))
        self.tokens: Tensor | None = None

    def add_to(self, layer: int, qkv: Tensor) -> Tensor:
        """qkv (B, N, q + 2 kv) of block `layer` with the tokens' value embedding on its v part."""
        assert self.tokens is not None and self.tokens.shape == qkv.shape[:2]
        ve = torch.nn.functional.embedding(self.tokens, self.tables[layer]) * VALUE_EMB_SCALE
        return qkv + torch.nn.functional.pad(ve.to(qkv.dtype), (self.q_dim + self.kv_dim, 0))


def _value_emb(net: Any) -> None:
    """Value embeddings added to a built demask net (`_ValueEmbeddings`)."""
    net.value_emb = _ValueEmbeddings(net)

    def keep_tokens(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        net.value_emb.tokens = args[0] if args else kwargs["x"]

    net.register_forward_pre_hook(keep_tokens, with_kwargs=True)
    for i, block in enumerate(net.attn_layers.blocks):
        block.attn.to_qkv.register_forward_hook(
            lambda _m, _inp, out, i=i: net.value_emb.add_to(i, out)
        )


class _RateEmbedding(nn.Module):
    """The share r of masked tokens in a row, as Fourier features (r, sin(pi k r), cos(pi k r),
    k = 1..4) projected to one vector added to every token embedding of the row; the projection
    starts at zero (the net computes what it did). A masked model's own noise level, read from
    its input (MDLM's time conditioning, without a time)."""

    k: Tensor  # (F,) the frequencies pi k

    def __init__(self, dim: int, mask_id: int, freqs: int = 4):
        super().__init__()
        self.mask_id = mask_id
        self.register_buffer("k", torch.arange(1, freqs + 1) * math.pi, persistent=False)
        self.proj = nn.Linear(1 + 2 * freqs, dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, ids: Tensor) -> Tensor:
        r = (ids == self.mask_id).float().mean(-1, keepdim=True)  # (B, 1)
        feats = torch.cat([r, torch.sin(self.k * r), torch.cos(self.k * r)], -1)  # (B, 1 + 2F)
        return self.proj(feats)[:, None, :]  # (B, 1, dim)


def _rate_cond(net: Any) -> None:
    """`_RateEmbedding` added to the token embeddings (the mask id is the last token)."""
    net.rate_emb = _RateEmbedding(net.token_emb.embedding_dim, net.num_tokens - 1)
    net.token_emb.register_forward_hook(lambda _m, inp, out: out + net.rate_emb(inp[0]))


class _QKVConv(nn.Module):
    """Primer's depthwise convolutions on the queries, keys and values (So et al. 2021, arXiv
    2109.08668), here centred (kernel 3 over positions i-1, i, i+1: a masked model reads both
    sides) and added to the projection's output with zero-started weights, so that the net
    computes what it did. One per block, kept outside `attn_layers` (AdamW, not Muon)."""

    def __init__(self, net: Any, kernel: int = 3):
        super().__init__()
        width = net.attn_layers.blocks[0].attn.to_qkv.weight.shape[0]
        convs = [
            nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width, bias=False)
            for _ in range(net.attn_layers.depth)
        ]
        for conv in convs:
            nn.init.zeros_(conv.weight)
        self.convs = nn.ModuleList(convs)

    def add_to(self, layer: int, qkv: Tensor) -> Tensor:
        """qkv (B, N, q + 2 kv) of block `layer` plus its depthwise convolution over positions."""
        conv = self.convs[layer]
        return qkv + conv(qkv.transpose(1, 2)).transpose(1, 2)


def _qkv_conv(net: Any) -> None:
    """Depthwise convolutions on every block's queries, keys and values (`_QKVConv`)."""
    net.qkv_conv = _QKVConv(net)
    for i, block in enumerate(net.attn_layers.blocks):
        block.attn.to_qkv.register_forward_hook(
            lambda _m, _inp, out, i=i: net.qkv_conv.add_to(i, out)
        )


def shift_thirds(h: Tensor) -> Tensor:
    """(B, N, D) with its channels in three parts: the first read from position i - 1, the second
    from i, the third from i + 1 (zeros past the ends): the reference's `shift_tokens=1` on an
    Encoder, written from its description. The screen's hook, kept as measured: the library's
    `Encoder(shift_tokens=1)` (rows `...-st1-...`) splits with `tensor_split` (86 / 85 / 85
    channels at dim 256) where this splits with `chunk` (86 / 86 / 84)."""
    before, here, after = h.chunk(3, dim=-1)
    before = torch.nn.functional.pad(before, (0, 0, 1, 0))[:, :-1]
    after = torch.nn.functional.pad(after, (0, 0, 0, 1))[:, 1:]
    return torch.cat((before, here, after), dim=-1)


def _token_shift(net: Any) -> None:
    """Every block's normed attention and feed-forward inputs through `shift_thirds`."""
    for block in net.attn_layers.blocks:
        for norm in (block.attn_norm, block.ff_norm):
            norm.register_forward_hook(lambda _m, _inp, out: shift_thirds(out))


class _ShiftConvs(nn.Module):
    """A learned depthwise convolution over positions i-1, i, i+1 (one per normed input of every
    block), started as `shift_thirds`: the net computes what the token-shift row does at the
    start and can learn its own mix. Kept outside `attn_layers` (AdamW, not Muon)."""

    def __init__(self, net: Any):
        super().__init__()
        dim = net.attn_layers.dim
        start = torch.zeros(dim, 1, 3)
        for part, tap in zip(torch.arange(dim).chunk(3), (0, 1, 2), strict=True):
            start[part, 0, tap] = 1.0  # conv1d: out[i] = w0 h[i-1] + w1 h[i] + w2 h[i+1]
        convs = []
        for _ in range(2 * net.attn_layers.depth):
            conv = nn.Conv1d(dim, dim, 3, padding=1, groups=dim, bias=False)
            with torch.no_grad():
                conv.weight.copy_(start)
            convs.append(conv)
        self.convs = nn.ModuleList(convs)

    def mix(self, index: int, h: Tensor) -> Tensor:
        return self.convs[index](h.transpose(1, 2)).transpose(1, 2)


def _shift_conv(net: Any) -> None:
    """Every block's normed attention and feed-forward inputs through a learned, shift-started
    depthwise convolution (`_ShiftConvs`)."""
    net.shift_convs = _ShiftConvs(net)
    for i, block in enumerate(net.attn_layers.blocks):
        for j, norm in enumerate((block.attn_norm, block.ff_norm)):
            norm.register_forward_hook(
                lambda _m, _inp, out, k=2 * i + j: net.shift_convs.mix(k, out)
            )


INITS: dict[str, Callable[[Any], None]] = {
    "token_shift": _token_shift,
    "shift_conv": _shift_conv,
    "qkv_conv": _qkv_conv,
    "value_emb": _value_emb,
    "rate_cond": _rate_cond,
    "rel_bias": _add_bias(lambda net: RelativePositions(net.attn_layers.heads, net.max_seq_len)),
    "alibi": _add_bias(lambda net: _AlibiBias(net.attn_layers.heads)),
    "x0_mix": _x0_mix,
    "fan_in_1": _fan_in_at(1.0),
    "fan_in_0.5": _fan_in_at(0.5),
    "head_zero": _head_zero,
    "resid_zero": _resid_zero,
    "mimetic_qk": _mimetic_qk,
    "pos_sin_0.3": _pos_sinusoid_at(0.3),
    "pos_sin_1": _pos_sinusoid_at(1.0),
    "resid_scaled": _resid_scaled,
    "emb_kaiming": _emb_kaiming,
    "emb_unit": _emb_unit,
    "pos_sinusoid": _pos_sinusoid,
    "pos_unit_table": _pos_unit_table,
}
