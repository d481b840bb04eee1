"""The versions of the config JSON layout (`demask.config.configs_to_json`) and the migrations that
bring an older file to the current one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Version of the config JSON layout; a reader refuses a newer one and migrates an older one
# (`MIGRATIONS`). Files written before versions existed have no "format_version" and are read as
# version 1. Version 2 named the fields after the constructors' parameters. Version 3 added
# `abs_pos_attn_bias`, whose default (None) changed what an Encoder with absolute positions builds.
# Version 4: the same default gives a rotary Encoder the bias as well. Version 5 added the training
# optimiser (`optimizer`, `muon_momentum`, `muon_rms`); every earlier run trained with AdamW.
# Version 6 added `zero_init_branch_output`, `input_skip`, `rel_pos_attn_bias` and
# `train_masking`; every earlier net was built, and trained, without them. Version 7 added
# `shift_tokens`; every earlier net was built without a token shift. Version 8 added
# `predict_dropped_cond`; every earlier model left a dropped condition unscored.
CONFIG_FORMAT_VERSION = 8

# format version 1: the model fields, and what it built for the options it did not record
V1_MODEL_FIELDS = (
    "kind", "num_tokens", "seq_len", "dim", "depth", "heads", "dim_head", "ff_mult", "dropout",
    "rotary", "tie_embedding", "schedule", "steps", "mask_id", "self_cond", "self_cond_train_prob",
    "no_replace_prob", "random_token_prob", "can_mask_prev_unmasked",
    "use_simple_mdlm_loss_weight", "cond_drop_prob", "cond_prefix_len", "mask_prob",
    "add_attn_z_loss",
)  # fmt: skip
V1_IMPLIED: dict[str, Any] = {
    "attn_kv_heads": None, "attn_qk_norm": False, "ff_glu": False, "ff_swish": False,
    "use_rmsnorm": False, "rotary_emb_dim": None, "attn_z_loss_weight": 1e-4, "emb_dim": None,
    "emb_dropout": 0.0, "use_abs_pos_emb": True, "post_emb_norm": False,
    "add_continuous_pred_head": False, "token_critic": False, "self_token_critic": False,
    "critic_loss_weight": 1.0, "ignore_index": -100, "pad_value": 0,
    "next_embed_loss_weight": 0.1,
}  # fmt: skip


def _migrate_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: fields renamed to the constructors' names; the head width recorded (v1's
    dim_head None meant dim // heads); one dropout split in two; the rest as v1 built it."""
    model = payload.get("model")
    if isinstance(model, dict):
        missing = [k for k in V1_MODEL_FIELDS if k not in model]
        if missing:
            raise ValueError(f'config JSON "model" is missing {missing}; expected every field')
        model = dict(model)
        dim, heads, dim_head = model["dim"], model["heads"], model.pop("dim_head")
        if dim_head is None and isinstance(dim, int) and isinstance(heads, int) and heads > 0:
            dim_head = dim // heads
        dropout = model.pop("dropout")
        model.update(max_seq_len=model.pop("seq_len"), rotary_pos_emb=model.pop("rotary"),
                     attn_dim_head=dim_head, attn_dropout=dropout, ff_dropout=dropout)  # fmt: skip
        model = {**V1_IMPLIED, **model}
    train = payload.get("train")
    if isinstance(train, dict) and "steps" in train:
        train = {("max_steps" if k == "steps" else k): v for k, v in train.items()}
    return {**payload, "model": model, "train": train, "format_version": 2}


def _migrate_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """Format 2 -> 3: positions added to the embeddings only, as version 2 built every net."""
    model = payload.get("model")
    if isinstance(model, dict):
        model = {**model, "abs_pos_attn_bias": False}
    return {**payload, "model": model, "format_version": 3}


def _migrate_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """Format 3 -> 4: rotary layers without absolute positions, as version 3 built them."""
    model = payload.get("model")
    if (
        isinstance(model, dict)
        and model.get("rotary_pos_emb")
        and model.get("abs_pos_attn_bias", False) is None
    ):
        model = {**model, "abs_pos_attn_bias": False}
    return {**payload, "model": model, "format_version": 4}


def _migrate_v4(payload: dict[str, Any]) -> dict[str, Any]:
    """Format 4 -> 5: the optimiser recorded; version 4 always trained with AdamW."""
    train = payload.get("train")
    if isinstance(train, dict):
        train = {"optimizer": "adamw", "muon_momentum": 0.95, "muon_rms": 0.2, **train}
    return {**payload, "train": train, "format_version": 5}


def _migrate_v5(payload: dict[str, Any]) -> dict[str, Any]:
    """Format 5 -> 6: the options version 5 did not have, as it built and trained every net."""
    model = payload.get("model")
    if isinstance(model, dict):
        model = {**V5_IMPLIED, **model}
    return {**payload, "model": model, "format_version": 6}


V5_IMPLIED: dict[str, Any] = {
    "zero_init_branch_output": False, "input_skip": False, "rel_pos_attn_bias": False,
    "train_masking": "schedule",
}  # fmt: skip


def _migrate_v6(payload: dict[str, Any]) -> dict[str, Any]:
    """Format 6 -> 7: no token shift, as version 6 built every net."""
    model = payload.get("model")
    if isinstance(model, dict):
        model = {**V6_IMPLIED, **model}
    return {**payload, "model": model, "format_version": 7}


V6_IMPLIED: dict[str, Any] = {"shift_tokens": 0}


def _migrate_v7(payload: dict[str, Any]) -> dict[str, Any]:
    """Format 7 -> 8: a dropped condition unscored, as version 7 trained every model."""
    model = payload.get("model")
    if isinstance(model, dict):
        model = {**V7_IMPLIED, **model}
    return {**payload, "model": model, "format_version": 8}


V7_IMPLIED: dict[str, Any] = {"predict_dropped_cond": False}


# format version v -> the function that turns a payload of version v into one of version v + 1
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: _migrate_v1,
    2: _migrate_v2,
    3: _migrate_v3,
    4: _migrate_v4,
    5: _migrate_v5,
    6: _migrate_v6,
    7: _migrate_v7,
}
