"""The ablation's rows: one change each against demask's masked model or the reference's.

A `Row` names the library, its wrapper, layer and TransformerWrapper options, re-initialisations
(`benchmarks.ablation_inits.INITS`), the MDLM estimator and count power, a replaced training loss
(`benchmarks.objective_rows.VARIANTS`) and training overrides. `benchmarks.ablation` builds,
trains and scores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


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
    # a key of objective_rows.VARIANTS or .ANNEALED (the training loss replaced), or of
    # ar_aux.VARIANTS (some rows trained left to right)
    objective: str | None = None
    parts: int = 1  # > 1: bytes as `parts` digits masked one by one (benchmarks.partial_masking)
    train: dict[str, Any] = field(
        default_factory=dict
    )  # Config overrides: lr, warmup, weight_decay
    note: str = ""


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

# mean CE on the rotary default as it is now (rotary + the Encoder's position bias)
_CE_POSBIAS = replace(
    _CE_RESID,
    net={"abs_pos_attn_bias": True},
    note="mean CE, scaled resid, the absolute position bias (with rotary: both)",
)

# the reference library's masked model with its better objective (mean CE)
_REFERENCE_CE = Row(
    "reference",
    {"use_simple_mdlm_loss_weight": False},
    note="the reference, mean CE (its better objective)",
)

# the three ~1% gains of the screen together: zero outputs, a relative bias, the x0 skip
_COMBO_INIT = ("resid_zero", "rel_bias", "x0_mix")

# a gated feed-forward (SwiGLU, arXiv 2002.05202) at 8/3 of the width: three matrices of
# dim x (8/3) dim hold as many weights as the plain MLP's two of dim x 4 dim
_SWIGLU = {"ff_glu": True, "ff_swish": True, "ff_mult": 8 / 3}

ROWS: dict[str, Row] = {  # with Muon: benchmarks.ablation_rows_muon
    "reference-ce": _REFERENCE_CE,
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
    "demask-ce-posbias": _CE_POSBIAS,
    # one change against mean CE on the rotary default (rotary + the position bias)
    "demask-ce-pb-noaug": replace(
        _CE_POSBIAS,
        wrapper={**_CE_POSBIAS.wrapper, "no_replace_prob": 0.0, "random_token_prob": 0.0},
        note="mean CE with the position bias, no BERT augmentation",
    ),
    "demask-ce-pb-norand": replace(
        _CE_POSBIAS,
        wrapper={**_CE_POSBIAS.wrapper, "random_token_prob": 0.0},
        note="mean CE with the position bias, no random tokens (15% shown unchanged kept)",
    ),
    "demask-ce-pb-tied": replace(
        _CE_POSBIAS,
        net={**_CE_POSBIAS.net, "tie_embedding": True},
        note="mean CE with the position bias, tied input and output embeddings",
    ),
    "demask-ce-pb-combo": replace(
        _CE_POSBIAS,
        init=_COMBO_INIT,
        note="mean CE with the position bias + zero outputs, a relative bias and the x0 skip",
    ),
    "demask-pb-bell-combo": replace(
        _POSBIAS,
        objective="unweighted_bell",
        init=_COMBO_INIT,
        note="the bell weighting (no importance weights) with the position bias + zero outputs, "
        "a relative bias and the x0 skip",
    ),
    "demask-ce-pb-swiglu": replace(
        _CE_POSBIAS,
        layers=_SWIGLU,
        note="mean CE with the position bias, a SwiGLU feed-forward of the same parameter count",
    ),
    "demask-pb-swiglu": replace(
        _POSBIAS,
        layers=_SWIGLU,
        note="the MDLM default with a SwiGLU feed-forward of the same parameter count",
    ),
    "reference-ce-swiglu": replace(
        _REFERENCE_CE,
        layers=_SWIGLU,
        note="the reference, mean CE, a SwiGLU feed-forward of the same parameter count",
    ),
    "reference-ce-tied": replace(
        _REFERENCE_CE,
        net={"tie_embedding": True},
        note="the reference, mean CE, tied input and output embeddings",
    ),
    "reference-ce-noaug": replace(
        _REFERENCE_CE,
        wrapper={**_REFERENCE_CE.wrapper, "no_replace_prob": 0.0, "random_token_prob": 0.0},
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
    "reference-ce-lr3e-3": replace(
        _REFERENCE_CE, train={"lr": 3e-3}, note="the reference, mean CE, peak lr 3e-3"
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
