"""ablation: one change per row against the reference, several seeds, masked models on bytes.

Each row trains one masked model with the quality suite's recipe (`benchmarks.quality`: the
Shakespeare bytes, seq 256, AdamW at lr 1e-3 with a 20-step warm-up, gradient norm clipped at 1,
the same batches for every row at a given seed) and scores it with demask's evaluator: the
validation NELBO in bits per byte (32 windows, 32 fixed times) and the cross-entropy of the masked
bytes with exactly 5% of the bytes masked (13 of 256), which shows whether the model uses its
context (the unigram entropy of these bytes is about 4.8 bits).

Rows are changes to demask's masked model, and the reference library's masked model with its
better objective (`use_simple_mdlm_loss_weight=False`, mean cross-entropy). The `--positions`
option picks rotary or learned absolute positions (the seed configuration) for every row.
Jobs (row x seed) run in `--jobs` processes of one thread each, seed-major, so a partial run
already has every row at the first seeds. The table gives the mean and the spread (min-max).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import harness, objective_rows, quality
from benchmarks.libs import build_net, load

NAME = "ablation"


@dataclass(frozen=True)
class Row:
    """One change: the library, wrapper and layer options, and an optional re-initialisation."""

    lib: str = "demask"
    wrapper: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, Any] = field(default_factory=dict)
    net: dict[str, Any] = field(default_factory=dict)  # TransformerWrapper options
    init: tuple[str, ...] = ()  # keys of INITS, applied in order after the net is built
    estimator: str | None = None  # demask's NonAutoregressiveWrapper.mdlm_estimator
    count_power: float | None = None  # its mdlm_count_power (importance-sampled mask counts)
    objective: str | None = None  # a key of objective_rows.VARIANTS: the training loss replaced
    train: dict[str, Any] = field(
        default_factory=dict
    )  # Config overrides: lr, warmup, weight_decay
    note: str = ""


def _baseline_init(net: nn.Module) -> None:
    """demask's initialisation before this ablation (every Linear and Embedding N(0, 0.02),
    zero biases), so that each row is one change from the same start whatever the library's
    current default is."""
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _outputs(block: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """A block's projections that write into the residual stream (attention, feed-forward)."""
    return block.attn.to_out, block.ff.proj_out


def _resid_scaled(net: nn.Module) -> None:
    """GPT-2's scaled residual init: the output projections of every block at 0.02 / sqrt(2L)."""
    depth = net.attn_layers.depth
    for block in net.attn_layers.blocks:
        for lin in _outputs(block):
            nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * depth))


def _emb_kaiming(net: nn.Module) -> None:
    """Token embeddings at std sqrt(2 / dim) (the reference's kaiming-normal scale)."""
    nn.init.normal_(net.token_emb.weight, std=math.sqrt(2 / net.emb_dim))


def _emb_unit(net: nn.Module) -> None:
    """Token embeddings at std 1 / sqrt(dim) (unit-norm rows)."""
    nn.init.normal_(net.token_emb.weight, std=1 / math.sqrt(net.emb_dim))


def _sinusoids(n: int, d: int) -> Tensor:
    """(n, d) unit-std sinusoids: demask's own (`demask.model.positions.sinusoids`)."""
    from demask.model.positions import sinusoids

    return sinusoids(n, d)


def _pos_sinusoid_at(std: float) -> Callable[[nn.Module], None]:
    """Learned absolute positions initialised as sinusoids at std `std`."""

    def init(net: nn.Module) -> None:
        table = net.abs_pos_emb.weight
        with torch.no_grad():
            table.copy_(_sinusoids(*table.shape) * std)

    return init


def _pos_sinusoid(net: nn.Module) -> None:
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


def _pos_unit_table(net: nn.Module) -> None:
    n, d = net.abs_pos_emb.weight.shape
    net.abs_pos_emb = _UnitTable(n, d, float(net.token_emb.weight.std()))


def _mimetic_qk(net: nn.Module) -> None:
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


def _head_zero(net: nn.Module) -> None:
    """The output projection to the logits at zero (untied heads only): every first prediction is
    exactly uniform, and the head learns from the stream's first useful features (modded-nanogpt's
    start)."""
    if net.to_logits.weight is net.token_emb.weight:
        raise ValueError("head_zero needs an untied output projection")
    nn.init.zeros_(net.to_logits.weight)


def _resid_zero(net: nn.Module) -> None:
    """Every block's output projections (attention and feed-forward) at zero: each block starts as
    the identity on the residual stream."""
    for block in net.attn_layers.blocks:
        for lin in _outputs(block):
            nn.init.zeros_(lin.weight)


def _fan_in_at(gain: float) -> Callable[[nn.Module], None]:
    """Every block's projections at std gain / sqrt(fan_in) (width-aware, as PyTorch's default
    and the reference scale theirs), the residual outputs further by 1 / sqrt(2 * depth);
    embeddings and the logit projection as they were."""

    def init(net: nn.Module) -> None:
        out_scale = 1 / math.sqrt(2 * net.attn_layers.depth)
        for block in net.attn_layers.blocks:
            for lins, scale in (((block.attn.to_qkv, block.ff.proj_in), 1.0),
                                (_outputs(block), out_scale)):  # fmt: skip
                for lin in lins:
                    std = gain * scale / math.sqrt(lin.weight.shape[1])
                    nn.init.normal_(lin.weight, std=std)

    return init


class _RelativeBias(nn.Module):
    """A learned per-head logit bias of the key's offset from the query, b[h, j - i] (T5-style,
    unbucketed), shared by the layers; `scale` multiplies a zero-started table so that Adam's
    steps move it at `scale` times the learning rate."""

    def __init__(self, heads: int, n: int, scale: float):
        super().__init__()
        self.n, self.scale = n, scale
        self.table = nn.Parameter(torch.zeros(heads, 2 * n - 1))

    def forward(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        offset = key_pos[None, :] - query_pos[:, None] + self.n - 1  # (Nq, Nk)
        return self.table[:, offset] * self.scale  # (H, Nq, Nk)


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


def _add_bias(make: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], None]:
    """Add a second positional logit bias (a module of the query and key positions) to the net's
    own (rotary default with the position bias only)."""

    def init(net: nn.Module) -> None:
        if net.abs_pos_attn is None:
            raise ValueError("this row needs the position bias (abs_pos_attn_bias=True)")
        net.extra_bias = make(net)
        own = net._untied_bias
        net._untied_bias = lambda q, k: own(q, k) + net.extra_bias(q, k)

    return init


class _X0Mix(nn.Module):
    """Per-block scalars mu_l (started at 0, times `scale`): block l reads x + mu_l * x0, x0 the
    embeddings entering the layers (modded-nanogpt's skip from the input)."""

    def __init__(self, depth: int, scale: float):
        super().__init__()
        self.scale = scale
        self.mu = nn.Parameter(torch.zeros(depth))
        self.x0: Tensor | None = None


def _x0_mix(net: nn.Module) -> None:
    layers = net.attn_layers
    mix = _X0Mix(layers.depth, 8.0)
    net.x0_mix = mix

    def keep_x0(module: nn.Module, args: tuple[Any, ...]) -> None:
        mix.x0 = args[0]

    layers.register_forward_pre_hook(keep_x0)
    for i, block in enumerate(layers.blocks):

        def add_x0(module: nn.Module, args: tuple[Any, ...], i: int = i) -> tuple[Any, ...]:
            assert mix.x0 is not None
            return (args[0] + mix.mu[i] * mix.scale * mix.x0, *args[1:])

        block.register_forward_pre_hook(add_x0)


INITS: dict[str, Callable[[nn.Module], None]] = {
    "rel_bias": _add_bias(lambda net: _RelativeBias(net.attn_layers.heads, net.max_seq_len, 8.0)),
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

# demask's default since issue 11: counts k ~ k^-1/2 with importance weights, GPT-2 scaled resid
# (and with absolute positions, since 2026-11-29 22:00, the Encoder's position bias)
_DEFAULT = Row(
    init=("resid_scaled",),
    estimator="count",
    count_power=0.5,
    note="count ~ k^-1/2 with importance weights, scaled resid",
)

# the default with absolute positions only added to the tokens (demask before the position bias)
_ADDED = replace(
    _DEFAULT,
    net={"abs_pos_attn_bias": False},
    note="default, positions only added to the tokens (demask before the position bias)",
)

# the rotary default as it is now: rotary and the Encoder's position bias (the ablation's rotary
# rows are rotary alone unless they ask for the bias)
_POSBIAS = replace(_DEFAULT, net={"abs_pos_attn_bias": True})

# mean CE (the reference's better objective) with GPT-2's scaled residual init
_CE_RESID = Row(
    wrapper={"use_simple_mdlm_loss_weight": False},
    init=("resid_scaled",),
    note="mean CE, scaled resid",
)

ROWS: dict[str, Row] = {
    "reference-ce": Row(
        "reference",
        {"use_simple_mdlm_loss_weight": False},
        note="the reference, mean CE (its better objective)",
    ),  # fmt: skip
    "demask-mdlm-time": Row(estimator="time", note="MDLM, time t ~ U, Bernoulli masks, 1/t weight"),
    "demask-mdlm-count": Row(estimator="count", note="MDLM, uniform exact count, row-mean CE"),
    "demask-ce": Row(wrapper={"use_simple_mdlm_loss_weight": False}, note="mean CE (MaskGIT)"),
    "demask-count-noaug": Row(
        wrapper={"no_replace_prob": 0.0, "random_token_prob": 0.0},
        estimator="count",
        note="count, no BERT augmentation",
    ),
    "demask-count-rot32": Row(
        layers={"rotary_emb_dim": 32}, estimator="count", note="count, rotary on 32 of 64"
    ),
    "demask-count-resid": Row(
        init=("resid_scaled",), estimator="count", note="count, scaled resid"
    ),
    "demask-count-embk": Row(
        init=("emb_kaiming",), estimator="count", note="count, emb std sqrt(2/d)"
    ),
    "demask-count-embu": Row(init=("emb_unit",), estimator="count", note="count, emb 1/sqrt(d)"),
    "demask-count-resid-embk": Row(
        init=("resid_scaled", "emb_kaiming"), estimator="count", note="count, resid + emb"
    ),
    "demask-ce-resid": _CE_RESID,
    "demask-count-resid-is": _DEFAULT,
    # one change against demask's default (count ~ k^-1/2 with importance weights, scaled resid)
    "demask-is-rmsnorm": replace(
        _DEFAULT, layers={"use_rmsnorm": True}, note="default + RMSNorm instead of LayerNorm"
    ),
    "demask-is-qknorm": replace(
        _DEFAULT, layers={"attn_qk_norm": True}, note="default + normalised queries and keys"
    ),
    "demask-is-wd0.1": replace(
        _DEFAULT, train={"weight_decay": 0.1}, note="default, AdamW weight decay 0.1 (not 0.01)"
    ),
    "demask-is-warm100": replace(
        _DEFAULT, train={"warmup": 100}, note="default, 100 warm-up steps (not 20)"
    ),
    "demask-is-p0.25": replace(
        _DEFAULT, count_power=0.25, note="default, counts k ~ k^-1/4 (importance-weighted)"
    ),
    "demask-is-p0.75": replace(
        _DEFAULT, count_power=0.75, note="default, counts k ~ k^-3/4 (importance-weighted)"
    ),
    "demask-is-p1": replace(
        _DEFAULT, count_power=1.0, note="default, counts k ~ 1/k: every masked token weighs alike"
    ),
    # negative powers draw the heavily masked (harder) counts more often, with smaller weights
    # (the direction of P-POTS, Jia et al. 2025, arXiv 2511.18159)
    "demask-is-pm0.5": replace(
        _DEFAULT, count_power=-0.5, note="default, counts k ~ k^1/2 (importance-weighted)"
    ),
    "demask-is-pm1": replace(
        _DEFAULT, count_power=-1.0, note="default, counts k ~ k (importance-weighted)"
    ),
    "demask-is-posbias": replace(
        _POSBIAS, note="default + the absolute position bias (with rotary: both)"
    ),
    "demask-ce-posbias": replace(
        _CE_RESID,
        net={"abs_pos_attn_bias": True},
        note="mean CE, scaled resid, the absolute position bias (with rotary: both)",
    ),
    # one change against mean CE on the rotary default (rotary + the position bias)
    "demask-ce-pb-noaug": replace(
        _CE_RESID,
        net={"abs_pos_attn_bias": True},
        wrapper={
            "use_simple_mdlm_loss_weight": False,
            "no_replace_prob": 0.0,
            "random_token_prob": 0.0,
        },
        note="mean CE with the position bias, no BERT augmentation",
    ),  # fmt: skip
    "demask-ce-pb-norand": replace(
        _CE_RESID,
        net={"abs_pos_attn_bias": True},
        wrapper={"use_simple_mdlm_loss_weight": False, "random_token_prob": 0.0},
        note="mean CE with the position bias, no random tokens (15% shown unchanged kept)",
    ),
    "demask-ce-pb-tied": replace(
        _CE_RESID,
        net={"abs_pos_attn_bias": True, "tie_embedding": True},
        note="mean CE with the position bias, tied input and output embeddings",
    ),
    "demask-ce-pb-combo": replace(
        _CE_RESID,
        net={"abs_pos_attn_bias": True},
        init=("resid_zero", "rel_bias", "x0_mix"),
        note="mean CE with the position bias + zero outputs, a relative bias and the x0 skip",
    ),
    "demask-pb-bell-combo": replace(
        _POSBIAS,
        objective="unweighted_bell",
        init=("resid_zero", "rel_bias", "x0_mix"),
        note="the bell weighting (no importance weights) with the position bias + zero outputs, "
        "a relative bias and the x0 skip",
    ),
    "reference-ce-noaug": Row(
        "reference",
        {"use_simple_mdlm_loss_weight": False, "no_replace_prob": 0.0, "random_token_prob": 0.0},
        note="the reference, mean CE, no BERT augmentation",
    ),
    # one change against the rotary default as it is now (rotary + the position bias)
    "demask-pb-headzero": replace(
        _POSBIAS,
        init=("resid_scaled", "head_zero"),
        note="rotary default (with the position bias) + the logit projection at zero",
    ),
    "demask-pb-residzero": replace(
        _POSBIAS,
        init=("resid_zero",),
        note="rotary default (with the position bias), output projections at zero",
    ),
    "demask-pb-qknorm": replace(
        _POSBIAS,
        layers={"attn_qk_norm": True},
        note="rotary default (with the position bias) + QK-norm",
    ),
    "demask-pb-embk": replace(
        _POSBIAS,
        init=("resid_scaled", "emb_kaiming"),
        note="rotary default (with the position bias), token embeddings at std sqrt(2/d)",
    ),
    "demask-pb-embk-noresid": replace(
        _POSBIAS,
        init=("emb_kaiming",),
        note="rotary default (with the position bias), embeddings at sqrt(2/d), outputs at 0.02",
    ),
    **{
        f"demask-pb-fanin{gain}": replace(
            _POSBIAS,
            init=(f"fan_in_{gain}",),
            note=f"rotary default (with the position bias), projections at {gain}/sqrt(fan_in)",
        )
        for gain in (1, 0.5)
    },
    # architecture added to the built net (the modules exist only here), each starting as the default
    **{
        f"demask-pb-{name}": replace(
            _POSBIAS,
            init=("resid_scaled", init),
            note=f"rotary default (with the position bias) + {what}",
        )
        for name, init, what in (
            ("rel", "rel_bias", "a learned relative-offset bias per head"),
            ("alibi", "alibi", "symmetric ALiBi, learned slopes"),
            ("x0", "x0_mix", "a learned skip from the embeddings"),
        )
    },
    # why mean CE trains better than the MDLM estimate (benchmarks/objective_rows.py)
    "demask-pb-pm1": replace(
        _POSBIAS,
        count_power=-1.0,
        note="rotary default (with the position bias), counts k ~ k (importance-weighted)",
    ),
    "demask-pb-unweighted-pm1": replace(
        _POSBIAS,
        objective="unweighted_pm1",
        note="rotary default (with the position bias), counts k ~ k, no importance weights "
        "(mean CE's expected gradient, not the NELBO's)",
    ),
    "demask-pb-unweighted-pm2": replace(
        _POSBIAS,
        objective="unweighted_pm2",
        note="rotary default (with the position bias), counts k ~ k^2, no importance weights",
    ),
    "demask-pb-unweighted-bell": replace(
        _POSBIAS,
        objective="unweighted_bell",
        note="rotary default (with the position bias), counts ~ r (1 - r) + 1/L at the rate "
        "r = k / L, no importance weights",
    ),
    "demask-pb-compl": replace(
        _POSBIAS,
        objective="complementary",
        note="rotary default (with the position bias), complementary mask pairs (half the windows)",
    ),
    "demask-pb-compl-p0": replace(
        _POSBIAS,
        objective="complementary_p0",
        note="rotary default (with the position bias), complementary pairs, k uniform",
    ),
    "demask-is-lr3e-3": replace(
        _DEFAULT, train={"lr": 3e-3}, note="default, peak lr 3e-3 (not 1e-3)"
    ),
    "demask-ce-lr3e-3": replace(
        _CE_RESID, train={"lr": 3e-3}, note="mean CE, scaled resid, peak lr 3e-3"
    ),
    "demask-pb-lr3e-3": replace(
        _POSBIAS, train={"lr": 3e-3}, note="rotary default (with the position bias), lr 3e-3"
    ),
    "reference-ce-lr3e-3": Row(
        "reference",
        {"use_simple_mdlm_loss_weight": False},
        train={"lr": 3e-3},
        note="the reference, mean CE, peak lr 3e-3",
    ),
    # absolute positions only
    "demask-count-resid-postable": Row(
        net={"abs_pos_attn_bias": False},
        init=("resid_scaled", "pos_unit_table"),
        estimator="count",
        note="count, scaled resid, sinusoid positions stored at unit scale",
    ),
    "demask-abs-added": _ADDED,
    "demask-abs-mimetic": replace(
        _ADDED,
        init=("resid_scaled", "mimetic_qk"),
        note="default + mimetic q/k",
    ),
    "demask-abs-possin-mimetic": replace(
        _ADDED,
        init=("resid_scaled", "pos_sinusoid", "mimetic_qk"),
        note="default + sinusoid-initialised positions + mimetic q/k",
    ),
    "demask-abs-postable-mimetic": replace(
        _ADDED,
        init=("resid_scaled", "pos_unit_table", "mimetic_qk"),
        note="default + sinusoid positions at unit scale + mimetic q/k",
    ),
    "demask-abs-sin0.3-mimetic": replace(
        _ADDED,
        init=("resid_scaled", "pos_sin_0.3", "mimetic_qk"),
        note="default + sinusoid positions at std 0.3 + mimetic q/k",
    ),
    "demask-abs-sin1-mimetic": replace(
        _ADDED,
        init=("resid_scaled", "pos_sin_1", "mimetic_qk"),
        note="default + sinusoid positions at std 1 + mimetic q/k",
    ),
    "demask-count-resid-possin": Row(
        net={"abs_pos_attn_bias": False},
        init=("resid_scaled", "pos_sinusoid"),
        estimator="count",
        note="count, scaled resid, sinusoid-initialised positions",
    ),
}


@dataclass(frozen=True)
class Config(quality.Config):
    dim: int = 128
    steps: int = 400
    positions: str = "rotary"  # rotary | absolute
    ce_windows: int = 32
    ce_draws: int = 4  # mask draws per window for the 5% cross-entropy


def build(row: Row, cfg: Config) -> nn.Module:
    lib = load(row.lib)
    torch.manual_seed(cfg.seed)
    layers, net_kwargs = dict(row.layers), dict(row.net)
    if cfg.positions == "rotary":
        layers["rotary_pos_emb"] = True
        if row.lib == "demask":  # rotary alone, as every rotary row was screened, unless asked
            net_kwargs.setdefault("abs_pos_attn_bias", False)
    net = build_net(lib, causal=False, num_tokens=257, max_seq_len=cfg.seq_len, dim=cfg.dim,
                    depth=cfg.depth, heads=cfg.heads, net_kwargs=net_kwargs, **layers)  # fmt: skip
    torch.manual_seed(cfg.seed + 1)
    if row.lib == "demask":
        from demask.model.init import init_position_bias

        _baseline_init(net)
        init_position_bias(net)  # the position bias's own start (no-op without one)
    for name in row.init:
        INITS[name](net)
    model = lib.NonAutoregressiveWrapper(net, mask_id=256, **row.wrapper)
    if row.estimator is not None:
        model.mdlm_estimator = row.estimator
    if row.count_power is not None:
        model.mdlm_count_power = row.count_power
    if row.objective is not None:
        objective_rows.install(row.objective, model)
    return model


def scored_wrapper(row: Row, model: nn.Module, cfg: Config) -> nn.Module:
    """A demask wrapper that scores `model` (the reference's logits through an adapter)."""
    if row.lib == "demask":
        return model
    nar = load("demask").NonAutoregressiveWrapper
    return nar(quality.LogitsAsEmbeddings(model.net, 257, cfg.seq_len), mask_id=256)


def run_job(job: tuple[str, int, dict[str, Any]]) -> dict[str, Any]:
    name, seed, cfg_dict = job
    torch.set_num_threads(1)
    row = ROWS[name]
    cfg = Config(**{**cfg_dict, "seed": seed, **row.train})
    evaluate, get_batch, get_dataset = quality._demask_modules()
    train_ds = get_dataset(cfg.data, split="train", seq_len=cfg.seq_len)
    val_ds = get_dataset(cfg.data, split="val", seq_len=cfg.seq_len)
    windows = quality.eval_windows(val_ds, cfg.eval_windows)
    model = build(row, cfg)
    run = quality.train(model, cfg, train_ds, get_batch)
    scored = scored_wrapper(row, model, cfg)
    bits = evaluate.likelihood_bits_per_token(scored, windows, cfg.eval_batch, seed=0)
    ce5 = evaluate.masked_cross_entropy_bits(
        scored.net, torch.stack(windows[: cfg.ce_windows]), round(0.05 * cfg.seq_len), 256,
        torch.Generator().manual_seed(0), draws=cfg.ce_draws,
    )  # fmt: skip
    out = {"row": name, "seed": seed, "nelbo": bits, "ce_t005": ce5, "train_s": run["train_s"]}
    out["final_loss_mean10"] = sum(run["losses"][-10:]) / 10
    print(f"{name} seed {seed}: NELBO {bits:.4f}, CE@5% {ce5:.3f} ({run['train_s']:.0f} s)",
          flush=True)  # fmt: skip
    return out


def summarise(results: list[dict[str, Any]], rows: list[str]) -> list[list[Any]]:
    ref = [r["nelbo"] for r in results if r["row"] == "reference-ce"]
    ref_mean = statistics.mean(ref) if ref else float("nan")
    table = []
    for name in rows:
        got = [r for r in results if r["row"] == name]
        if not got:
            continue
        nelbo = [r["nelbo"] for r in got]
        ce = [r["ce_t005"] for r in got]
        mean = statistics.mean(nelbo)
        table.append([name, len(got), f"{mean:.3f}", f"{min(nelbo):.3f}-{max(nelbo):.3f}",
                      f"{mean / ref_mean:.3f}", f"{statistics.mean(ce):.3f}", ROWS[name].note])  # fmt: skip
    return table


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--positions", choices=("rotary", "absolute"), default="rotary")
    p.add_argument("--jobs", type=int, default=2, help="processes, one thread each")
    p.add_argument("--data", default=None, help="the Shakespeare folder")


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = Config(positions=args.positions)
    if args.smoke:
        cfg = replace(cfg, **{k: v for k, v in asdict(quality.SMOKE).items() if k != "data"},
                      ce_windows=4, ce_draws=1)  # fmt: skip
    for k in ("steps", "dim"):
        if getattr(args, k) is not None:
            cfg = replace(cfg, **{k: getattr(args, k)})
    cfg = replace(cfg, data=str(quality.data_folder(args.data)))
    jobs = [(name, seed, asdict(cfg)) for seed in args.seeds for name in args.rows]
    start = time.perf_counter()
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = list(pool.imap(run_job, jobs))
    else:
        results = [run_job(j) for j in jobs]
    table = summarise(results, args.rows)
    print(f"## {NAME}  (config {asdict(cfg)}; seeds {args.seeds}; "
          f"{time.perf_counter() - start:.0f} s)")  # fmt: skip
    print(harness.format_table(
        ["row", "seeds", "NELBO mean", "min-max", "/ reference", "CE@5% bits", "change"], table))  # fmt: skip
    return harness.record(NAME, asdict(cfg), results, seeds=args.seeds, args=vars(args))
