"""The ablation's rows trained with Muon on the blocks' matrices (issue 11), on the bases of
`benchmarks.ablation_rows`; `benchmarks.ablation` merges them into its `ROWS`."""

from __future__ import annotations

from dataclasses import replace

from benchmarks import ar_aux, quality
from benchmarks.ablation_rows import (
    _CE_POSBIAS,
    _COMBO_INIT,
    _POSBIAS,
    _REFERENCE_CE,
    _SWIGLU,
    Row,
)
from benchmarks.partial_masking import digit_base

# both libraries' best recipe so far: mean CE, SwiGLU, Muon on the blocks' matrices (RMS 0.2)
_MUON = {"optimizer": "muon"}
_CE_SWIGLU_MUON = replace(
    _CE_POSBIAS,
    layers=_SWIGLU,
    train=_MUON,
    note="mean CE, the position bias, SwiGLU; Muon on the blocks' matrices",
)
_REFERENCE_CE_SWIGLU_MUON = replace(
    _REFERENCE_CE,
    layers=_SWIGLU,
    train=_MUON,
    note="the reference, mean CE, SwiGLU; Muon on the blocks' matrices",
)

_RECIPE = replace(
    _CE_SWIGLU_MUON,
    wrapper={"use_simple_mdlm_loss_weight": False, "train_masking": "bell"},
    layers={**_SWIGLU, "zero_init_branch_output": True, "input_skip": True},
    net={"abs_pos_attn_bias": True, "rel_pos_attn_bias": True},
    init=("resid_zero",),  # the harness's baseline start would undo the zero outputs
    train={**_MUON, "muon_rms": 0.1},
    note="mean CE with bell-shaped mask counts, the position bias, the relative bias, "
    "zero-started outputs, the input skip, SwiGLU (the library's options); Muon (RMS 0.1)",
)

# the reference's best setting measured: its own two of the three recipe modules
_REFERENCE_BEST = replace(
    _REFERENCE_CE_SWIGLU_MUON,
    # its T5 bias (rel_pos_bias=True) stops with rotary layers ("only alibi allowed for
    # custom positions"), so the reference gets the other two
    layers={**_SWIGLU, "zero_init_branch_output": True, "reinject_input": True},
    train={**_MUON, "muon_rms": 0.5},
    note="the reference, mean CE, SwiGLU, zero-started branch outputs and re-injected input; "
    "Muon (RMS 0.5) on the blocks",
)
# its nearest to value embeddings: the first layer's values mixed into every later layer's
# (ResFormer, a learned per-token mix) and a learned per-token, per-layer scale of the
# feed-forward output (its "deep embed")
_REFERENCE_VRES = replace(
    _REFERENCE_BEST,
    layers={**_REFERENCE_BEST.layers, "add_value_residual": True},
    net={"ff_deep_embed": True},
    note="the reference, mean CE, SwiGLU, zero-started branch outputs, re-injected input, "
    "value residual, per-token deep embeddings; Muon (RMS 0.5) on the blocks",
)


def _at_adamw_lr(base: Row, lr: float, note: str) -> Row:
    """`base` with its AdamW part (embeddings, output layer, norms) at `lr` and Muon's step on the
    blocks (its RMS x lr) held where it was."""
    rms = base.train["muon_rms"] * base.train.get("lr", quality.Config.lr) / lr
    return replace(base, train={**base.train, "lr": lr, "muon_rms": rms}, note=note)


def _with_cooldown(base: Row, fraction: float) -> Row:
    """`base` with the lr decayed linearly to 0 over the last `fraction` of the steps."""
    return replace(
        base,
        train={**base.train, "cooldown": fraction},
        note=f"{base.note}; lr decayed linearly to 0 over the last {fraction:.0%} of the steps",
    )


def _with_shift(base: Row, reach: int) -> Row:
    """`base` with both libraries' `shift_tokens=reach` on its layers."""
    return replace(
        base,
        layers={**base.layers, "shift_tokens": reach},
        note=f"{base.note}; shift_tokens={reach} (every block's normed inputs read {2 * reach + 1} "
        f"channel parts from positions i-{reach}..i+{reach})",
    )


def _with_self_cond(base: Row) -> Row:
    """`base` with both libraries' `self_cond=True` (its `self_cond_train_prob` the seed's 0.75)."""
    return replace(
        base,
        wrapper={**base.wrapper, "self_cond": True},
        note=f"{base.note}; self_cond=True (a no-grad first pass's final embeddings, projected, "
        "added to the input in 75% of the training steps and in every scored call)",
    )


def _with_rms(base: Row, rms: float) -> Row:
    """`base` with Muon's update RMS at `rms` (times the lr)."""
    was = base.train["muon_rms"]
    return replace(
        base,
        train={**base.train, "muon_rms": rms},
        note=f"{base.note}; Muon's step changed from RMS {was} to {rms}",
    )


def _with_partial(base: Row, parts: int) -> Row:
    """`base` with every byte `parts` digits masked one by one (`benchmarks.partial_masking`)."""
    return replace(
        base,
        parts=parts,
        note=f"{base.note}; partial masking: each byte {parts} base-{digit_base(parts)} "
        "digits, masked one by one (the bell counts and the NELBO over the digits)",
    )


# both libraries' best rows with the token shift of reach 2 (the bases of the later rows)
_RECIPE_ST2 = _with_shift(_RECIPE, 2)
_REFERENCE_ST2 = _with_shift(_REFERENCE_BEST, 2)


MUON_ROWS: dict[str, Row] = {
    "demask-ce-pb-swiglu-muon": _CE_SWIGLU_MUON,
    "demask-pb-swiglu-muon": replace(
        _POSBIAS,
        layers=_SWIGLU,
        train=_MUON,
        note="the MDLM default, SwiGLU; Muon on the blocks' matrices",
    ),
    "demask-ce-pb-swiglu-muon-tied": replace(
        _CE_SWIGLU_MUON,
        net={**_CE_SWIGLU_MUON.net, "tie_embedding": True},
        note="mean CE, the position bias, SwiGLU, tied embeddings; Muon on the blocks' matrices",
    ),
    "demask-ce-pb-swiglu-muon-qknorm": replace(
        _CE_SWIGLU_MUON,
        layers={**_CE_SWIGLU_MUON.layers, "attn_qk_norm": True},
        note="mean CE, the position bias, SwiGLU, QK-norm; Muon on the blocks' matrices",
    ),
    "demask-ce-pb-combo-swiglu-muon01": replace(
        _CE_SWIGLU_MUON,
        init=_COMBO_INIT,
        train={**_MUON, "muon_rms": 0.1},
        note="mean CE, the position bias, SwiGLU, zero outputs, a relative bias and the x0 skip; "
        "Muon (RMS 0.1) on the blocks",
    ),
    "demask-pb-bell-combo-swiglu-muon01": replace(
        _POSBIAS,
        objective="unweighted_bell",
        init=_COMBO_INIT,
        layers=_SWIGLU,
        train={**_MUON, "muon_rms": 0.1},
        note="the bell weighting, the position bias, SwiGLU, zero outputs, a relative bias and "
        "the x0 skip; Muon (RMS 0.1) on the blocks",
    ),
    # the same recipe from the library's own options (no ablation modules): it computes what
    # demask-pb-bell-combo-swiglu-muon01 does (the same weights, masks and losses)
    "demask-ce-recipe-swiglu-muon01": _RECIPE,
    "demask-ce-recipe-ve-swiglu-muon01": replace(
        _RECIPE,
        init=("resid_zero", "value_emb"),
        note="the library's recipe (bell counts, both position biases, zero-started outputs, the "
        "input skip, SwiGLU) + value embeddings (an ablation module); Muon (RMS 0.1)",
    ),
    "demask-ce-recipe-swiglu-lr3e-3-muon0033": _at_adamw_lr(
        _RECIPE,
        3e-3,
        "the library's recipe with AdamW's part (embeddings, output layer, norms, the biases' "
        "tables) at lr 3e-3; Muon's step as before (RMS 0.1 / 3 of lr 3e-3)",
    ),
    "demask-ce-recipe-swiglu-lr5e-4-muon02": _at_adamw_lr(
        _RECIPE,
        5e-4,
        "the library's recipe with AdamW's part at lr 5e-4; Muon's step as before (RMS 0.2 "
        "of lr 5e-4)",
    ),
    "demask-pb-anneal50-swiglu-muon": replace(
        _POSBIAS,
        objective="anneal_50",
        layers=_SWIGLU,
        train=_MUON,
        note="the MDLM estimate reached by a ramp from mean CE's weighting over the first half; "
        "SwiGLU, Muon",
    ),
    "demask-pb-anneal100-swiglu-muon": replace(
        _POSBIAS,
        objective="anneal_100",
        layers=_SWIGLU,
        train=_MUON,
        note="the MDLM estimate reached by a ramp from mean CE's weighting over all steps; "
        "SwiGLU, Muon",
    ),
    "reference-ce-swiglu-muon": _REFERENCE_CE_SWIGLU_MUON,
    "reference-ce-skip-vres-swiglu-muon05": _REFERENCE_VRES,
    "reference-ce-skip-vres-cos-swiglu-muon05": replace(
        _REFERENCE_VRES,
        wrapper={**_REFERENCE_VRES.wrapper, "schedule": "cosine"},
        note="the reference's value-residual row trained with the seeds' schedule='cosine' "
        "(mask rates cos(pi t / 2): more rows heavily masked); Muon (RMS 0.5)",
    ),
    "reference-ce-skip-swiglu-lr5e-4-muon10": _at_adamw_lr(
        _REFERENCE_BEST,
        5e-4,
        "the reference's best row with AdamW's part at lr 5e-4; Muon's step as before "
        "(RMS 1.0 of lr 5e-4)",
    ),
    "reference-ce-skip-swiglu-muon05": _REFERENCE_BEST,
    "demask-ce-recipe-swiglu-muon01-cd30": _with_cooldown(_RECIPE, 0.3),
    "reference-ce-skip-swiglu-muon05-cd30": _with_cooldown(_REFERENCE_BEST, 0.3),
    "demask-ce-recipe-conv-swiglu-muon01": replace(
        _RECIPE,
        init=("resid_zero", "qkv_conv"),
        note="the library's recipe + depthwise convolutions (kernel 3, centred) on every block's "
        "queries, keys and values (Primer's; an ablation module); Muon (RMS 0.1)",
    ),
    "demask-ce-recipe-shift-swiglu-muon01": replace(
        _RECIPE,
        init=("resid_zero", "token_shift"),
        note="the library's recipe + the reference's token shift (every block's normed attention "
        "and feed-forward inputs: a third of the channels from each of i-1, i, i+1; an ablation "
        "module); Muon (RMS 0.1)",
    ),
    "demask-ce-recipe-shiftconv-swiglu-muon01": replace(
        _RECIPE,
        init=("resid_zero", "shift_conv"),
        note="the library's recipe + a learned depthwise convolution (kernel 3) on every block's "
        "normed attention and feed-forward inputs, started as the token shift (an ablation "
        "module); Muon (RMS 0.1)",
    ),
    "demask-ce-recipe-st1-swiglu-muon01": _with_shift(_RECIPE, 1),
    "demask-ce-recipe-st2-swiglu-muon01": _RECIPE_ST2,
    "reference-ce-skip-st2-swiglu-muon05": _REFERENCE_ST2,
    # the reference's own token shift, reach 1 (the demask row's counterpart is `...-st1-...`)
    "reference-ce-skip-shift-swiglu-muon05": _with_shift(_REFERENCE_BEST, 1),
    "demask-ce-recipe-st3-swiglu-muon01": _with_shift(_RECIPE, 3),
    "reference-ce-skip-st3-swiglu-muon05": _with_shift(_REFERENCE_BEST, 3),
    "demask-ce-recipe-st2-sc-swiglu-muon01": _with_self_cond(_RECIPE_ST2),
    "reference-ce-skip-st2-sc-swiglu-muon05": _with_self_cond(_REFERENCE_ST2),
    "demask-ce-recipe-st2-swiglu-muon01-cd30": _with_cooldown(_RECIPE_ST2, 0.3),
    **{
        f"demask-ce-recipe-st2-{name.replace('_', '')}-swiglu-muon01-cd30": replace(
            _with_cooldown(_RECIPE_ST2, 0.3),
            objective=name,
            note=f"{_with_cooldown(_RECIPE_ST2, 0.3).note}; the first {rows} rows of each batch "
            f"trained left to right on the same weights (next-byte CE, weight {weight}; "
            "benchmarks/ar_aux.py)",
        )
        for name, (rows, weight) in ar_aux.VARIANTS.items()
    },
    "demask-ce-recipe-st2-sc-swiglu-muon01-cd30": _with_cooldown(_with_self_cond(_RECIPE_ST2), 0.3),
    "reference-ce-skip-st2-swiglu-muon05-cd30": _with_cooldown(_REFERENCE_ST2, 0.3),
    "demask-ce-recipe-st2-norel-swiglu-muon01-cd30": _with_cooldown(
        replace(
            _RECIPE_ST2,
            net={**_RECIPE.net, "rel_pos_attn_bias": False},
            note=f"{_RECIPE_ST2.note}; without the relative-offset bias",
        ),
        0.3,
    ),
    # Muon's step re-bracketed on both best rows with the cooldown (the reference's 0.5 and
    # demask's 0.1 were best without the shift)
    **{
        f"{prefix}-st2-swiglu-muon{str(rms).replace('.', '')}-cd30": _with_cooldown(
            _with_rms(base, rms), 0.3
        )
        for prefix, base, values in (
            ("demask-ce-recipe", _RECIPE_ST2, (0.05, 0.2, 0.4)),
            ("reference-ce-skip", _REFERENCE_ST2, (0.125, 0.25, 1.0)),
        )
        for rms in values
    },
    "demask-ce-recipe-st2-rate-swiglu-muon01-cd30": replace(
        _with_cooldown(_RECIPE_ST2, 0.3),
        init=(*_RECIPE.init, "rate_cond"),
        note=f"{_with_cooldown(_RECIPE_ST2, 0.3).note}; the row's masked share as an input "
        "embedding (Fourier features, a zero-started projection)",
    ),
    **{
        f"demask-ce-recipe-st2-prime{p}-swiglu-muon01-cd30": _with_partial(
            _with_cooldown(_RECIPE_ST2, 0.3), p
        )
        for p in (2, 4, 8)
    },
}


def _muon_rms_sweep() -> dict[str, Row]:
    """Muon's update RMS swept for both libraries' SwiGLU mean-CE rows: `...-muon05` is RMS 0.5."""
    sweep = {  # row name: (base row, its description, the RMS values)
        "demask-ce-pb-swiglu": (
            _CE_SWIGLU_MUON,
            "mean CE, the position bias, SwiGLU",
            (0.1, 0.5, 1.0),
        ),
        "reference-ce-swiglu": (
            _REFERENCE_CE_SWIGLU_MUON,
            "the reference, mean CE, SwiGLU",
            (0.5, 1.0, 2.0, 4.0),
        ),
    }
    return {
        f"{name}-muon{str(rms).replace('.', '')}": replace(
            base,
            train={**base.train, "muon_rms": rms},
            note=f"{what}; Muon (update RMS {rms} lr) on the blocks",
        )
        for name, (base, what, values) in sweep.items()
        for rms in values
    }


MUON_ROWS.update(_muon_rms_sweep())
