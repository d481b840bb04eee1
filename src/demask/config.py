"""Run configuration: what model to build (`ModelConfig`) and how to train it (`TrainConfig`).

Both are plain dataclasses with one comment per field, validated on construction, and round-trip
through JSON (`to_dict` / `from_dict`, `save_configs` / `load_configs`). A checkpoint stores both,
so `build_model(model_config)` rebuilds the exact network from the checkpoint alone.

`ModelConfig`'s fields carry the constructors' own names and defaults: a field named like a
parameter of `Encoder`/`Decoder` (AttentionLayers), `TransformerWrapper` or a wrapper takes that
parameter's default from the constructor's signature (`seed_default`), and the constructors'
own checks validate it (the model is built once on the meta device). Only what no constructor
says is written here: the kind, the data's vocabulary and length, the width and depth, and the
mask id and token critic of a masked model.

`build_model` looks the builder up in `MODEL_BUILDERS` (kind name -> builder, one line per kind:
the wrapper's `from_config`). A new model kind is a wrapper with the methods of
`demask.wrappers.contract.ModelContract` plus `register_model_kind(name, Wrapper.from_config)`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from demask._checks import check_choice, check_float, check_int, reject_unknown_kwargs
from demask._config_fields import check_types, deprecated_names, seed_default
from demask.config_formats import (
    CONFIG_FORMAT_VERSION,
    MIGRATIONS,
)
from demask.model import TransformerWrapper
from demask.model.attention_layers import AttentionLayers
from demask.optim import OPTIMIZERS, Muon
from demask.wrappers import AutoregressiveWrapper, NonAutoregressiveWrapper

# ----------------------------------------------------------------------------------------------
# the model registry

ModelBuilder = Callable[["ModelConfig"], nn.Module]
MODEL_BUILDERS: dict[str, ModelBuilder] = {}


def register_model_kind(kind: str, builder: ModelBuilder) -> ModelBuilder:
    """Add (or replace) the builder used by `build_model` for `ModelConfig(kind=kind)`."""
    MODEL_BUILDERS[kind] = builder
    return builder


# the constructors whose parameters ModelConfig's fields mirror, in the order they are built
CONSTRUCTORS: tuple[Callable[..., Any], ...] = (
    AttentionLayers.__init__,
    TransformerWrapper.__init__,
    NonAutoregressiveWrapper.__init__,
    AutoregressiveWrapper.__init__,
)


_LAYERS, _NET, _MASKED, _AR = CONSTRUCTORS


# ----------------------------------------------------------------------------------------------
# model


@dataclass
class ModelConfig:
    """The network and its wrapper. Options marked (masked) / (AR) apply to that kind only."""

    kind: str = "masked"  # a key of MODEL_BUILDERS: "masked" | "autoregressive"
    num_tokens: int = 256  # vocabulary of the DATA; a masked net gets one more embedding (the mask)
    max_seq_len: int = 64  # sequence length of the data and the net
    # --- the backbone: Encoder (masked) / Decoder (AR) ---
    dim: int = 128  # model width
    depth: int = 4  # transformer blocks
    heads: int = seed_default(_LAYERS, "heads")  # attention heads
    attn_dim_head: int = seed_default(_LAYERS, "attn_dim_head")  # width of one head
    attn_kv_heads: int | None = seed_default(_LAYERS, "attn_kv_heads")  # grouped-query: K/V heads
    attn_qk_norm: bool = seed_default(_LAYERS, "attn_qk_norm")  # normalised queries and keys
    attn_dropout: float = seed_default(_LAYERS, "attn_dropout")  # dropout on attention weights
    ff_dropout: float = seed_default(_LAYERS, "ff_dropout")  # dropout inside the feed-forward
    ff_mult: float = seed_default(_LAYERS, "ff_mult")  # feed-forward hidden width = ff_mult * dim
    ff_glu: bool = seed_default(_LAYERS, "ff_glu")  # gated feed-forward (GEGLU)
    ff_swish: bool = seed_default(_LAYERS, "ff_swish")  # SiLU activation (SwiGLU with ff_glu)
    use_rmsnorm: bool = seed_default(_LAYERS, "use_rmsnorm")  # RMSNorm instead of LayerNorm
    rotary_pos_emb: bool = seed_default(_LAYERS, "rotary_pos_emb")  # rotary positions
    rotary_emb_dim: int | None = seed_default(_LAYERS, "rotary_emb_dim")  # rotated channels
    attn_z_loss_weight: float = seed_default(_LAYERS, "attn_z_loss_weight")  # with add_attn_z_loss
    # the blocks' residual-stream outputs start at zero
    zero_init_branch_output: bool = seed_default(_LAYERS, "zero_init_branch_output")
    input_skip: bool = seed_default(_LAYERS, "input_skip")  # block l reads x + mu_l x0
    # (Encoder) the blocks' normed inputs read 2k + 1 channel parts from positions i - k .. i + k
    shift_tokens: int = seed_default(_LAYERS, "shift_tokens")
    # --- the backbone: TransformerWrapper ---
    emb_dim: int | None = seed_default(_NET, "emb_dim")  # token embedding width (None: dim)
    emb_dropout: float = seed_default(_NET, "emb_dropout")  # dropout on the input embeddings
    tie_embedding: bool = seed_default(_NET, "tie_embedding")  # share embedding and output
    use_abs_pos_emb: bool = seed_default(_NET, "use_abs_pos_emb")  # learned positions (no rotary)
    post_emb_norm: bool = seed_default(_NET, "post_emb_norm")  # normalise the embeddings
    # absolute positions also as an attention bias (None: for an Encoder, not for a Decoder)
    abs_pos_attn_bias: bool | None = seed_default(_NET, "abs_pos_attn_bias")
    # (masked) a learned bias of the key's offset from the query on the attention logits
    rel_pos_attn_bias: bool = seed_default(_NET, "rel_pos_attn_bias")
    add_continuous_pred_head: bool = seed_default(_NET, "add_continuous_pred_head")  # (AR)
    # --- (masked) NonAutoregressiveWrapper ---
    mask_id: int | None = None  # id of the mask token; None -> num_tokens (an extra embedding)
    steps: int = seed_default(_MASKED, "steps")  # demasking steps at generation time
    self_cond: bool = seed_default(_MASKED, "self_cond")  # self-conditioning on embeddings
    # how often training uses self-conditioning
    self_cond_train_prob: float = seed_default(_MASKED, "self_cond_train_prob")
    no_replace_prob: float = seed_default(_MASKED, "no_replace_prob")  # BERT: shown unchanged
    random_token_prob: float = seed_default(_MASKED, "random_token_prob")  # BERT: random token
    schedule: str = seed_default(_MASKED, "schedule")  # masking schedule (linear | cosine)
    # generation may re-mask tokens it revealed earlier
    can_mask_prev_unmasked: bool = seed_default(_MASKED, "can_mask_prev_unmasked")
    token_critic: bool = False  # a separate critic net like the backbone (the seed: a module)
    self_token_critic: bool = seed_default(_MASKED, "self_token_critic")  # a critic head
    # weight of the critic's binary loss
    critic_loss_weight: float = seed_default(_MASKED, "critic_loss_weight")
    # the MDLM loss (a NELBO estimate); off: MaskGIT's mean cross-entropy
    use_simple_mdlm_loss_weight: bool = seed_default(_MASKED, "use_simple_mdlm_loss_weight")
    cond_drop_prob: float = seed_default(_MASKED, "cond_drop_prob")  # rows without condition
    cond_prefix_len: int = seed_default(_MASKED, "cond_prefix_len")  # leading condition tokens
    # a dropped condition is masked and predicted like the rest (a joint model of both)
    predict_dropped_cond: bool = seed_default(_MASKED, "predict_dropped_cond")
    # how mean-CE training masks: schedule (a time, Bernoulli masks) | bell (counts, row means)
    train_masking: str = seed_default(_MASKED, "train_masking")
    # --- (AR) AutoregressiveWrapper ---
    ignore_index: int = seed_default(_AR, "ignore_index")  # target id left out of the loss
    pad_value: int = seed_default(_AR, "pad_value")  # written after EOS, left-pads prompts
    mask_prob: float = seed_default(_AR, "mask_prob")  # forgetful causal masking in training
    add_attn_z_loss: bool = seed_default(_AR, "add_attn_z_loss")  # add the attention z-loss
    # weight of the next-embedding loss (with add_continuous_pred_head)
    next_embed_loss_weight: float = seed_default(_AR, "next_embed_loss_weight")

    def __post_init__(self) -> None:
        check_types(self)
        check_choice("kind", self.kind, MODEL_BUILDERS)
        check_int("num_tokens", self.num_tokens, min=2)
        check_int("max_seq_len", self.max_seq_len, min=2)
        if self.mask_id is not None:
            check_int("mask_id", self.mask_id, min=0)
        with torch.device("meta"):  # the constructors' own checks, without allocating weights
            build_model(self)

    @property
    def seq_len(self) -> int:
        """The length of the data's sequences (= max_seq_len)."""
        return self.max_seq_len

    def arguments(self, constructor: Any, **overrides: Any) -> dict[str, Any]:
        """The keyword arguments of `constructor` (a class or function) that are fields here,
        with `overrides` (which also add arguments)."""
        names = inspect.signature(constructor).parameters
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names}
        out.update(overrides)
        return out

    def backbone(self, layers: type, **overrides: Any) -> TransformerWrapper:
        """The TransformerWrapper of this config around `layers` (Encoder or Decoder); overrides
        go to the TransformerWrapper (num_tokens, logits_dim, ...)."""
        attn_layers = layers(**self.arguments(AttentionLayers))
        return TransformerWrapper(attn_layers=attn_layers, **self.arguments(TransformerWrapper,
                                                                          **overrides))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data)


deprecated_names(
    ModelConfig, {"seq_len": "max_seq_len", "rotary": "rotary_pos_emb", "dim_head": "attn_dim_head"}
)


# ----------------------------------------------------------------------------------------------
# training

NAN_POLICIES = ("stop", "skip")
MAX_SEED = 2**63 - 1  # torch's generators take a 64-bit seed


@dataclass
class TrainConfig:
    """How to train. `batch_size` is PER PROCESS: the global batch is batch_size * world_size."""

    data: str = "digits"  # dataset spec for demask.data.get_dataset: digits | python-stdlib | PATH
    data_max_bytes: int | None = None  # text data: keep at most this many bytes per split
    out: str = "runs/demask"  # run folder: checkpoints, config.json, metrics.jsonl
    max_steps: int = 2000  # total optimiser steps (the LR schedule spans these)
    batch_size: int = 32  # sequences per step per process
    optimizer: str = "adamw"  # adamw | muon (Muon on the blocks' matrices, AdamW on the rest)
    lr: float = 3e-4  # peak learning rate (both parts of muon share it)
    warmup_steps: int = 100  # linear warm-up from 0 to lr over these steps
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio at the last step
    weight_decay: float = 0.1  # AdamW decoupled decay, on matrices of Linear layers only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    muon_momentum: float = seed_default(Muon, "momentum")  # Muon's Nesterov momentum
    muon_rms: float = seed_default(Muon, "rms")  # Muon's update RMS as a share of the lr
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    seed: int = 0  # seeds init, data order and the masking noise
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    bf16: bool = False  # bf16 autocast for the forward pass
    compile: bool = False  # torch.compile the network (applied before DDP / FSDP)
    fsdp: bool = False  # shard parameters with FSDP2 (fully_shard) instead of DDP replication
    log_every: int = 10  # write a metrics record every N steps
    val_every: int = 200  # validate every N steps (and at the end); 0 = only at the end
    val_batches: int = 8  # validation: the first val_batches * global batch examples of val
    val_num_times: int = 8  # (masked) NELBO diffusion times in validation (demask eval: 32)
    checkpoint_every: int = 500  # checkpoint every N steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 2  # how many recent checkpoints to keep in out/checkpoints
    nan_policy: str = "stop"  # on a NaN/inf loss or gradient: stop | skip (drop that update)
    progress: bool = True  # tqdm bar on rank 0 (also off when stderr is not a terminal)

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("data", "out", "device"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty str, got {value!r}")
        if self.data_max_bytes is not None:
            check_int("data_max_bytes", self.data_max_bytes, min=1)
        check_int("max_steps", self.max_steps, min=1)
        check_int("batch_size", self.batch_size, min=1)
        check_float("lr", self.lr, min=0.0, min_inclusive=False)
        check_int("warmup_steps", self.warmup_steps, min=0)
        check_float("min_lr_ratio", self.min_lr_ratio, min=0.0, max=1.0)
        check_float("weight_decay", self.weight_decay, min=0.0)
        check_float("beta1", self.beta1, min=0.0, max=1.0, max_inclusive=False)
        check_float("beta2", self.beta2, min=0.0, max=1.0, max_inclusive=False)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_float("muon_momentum", self.muon_momentum, min=0.0, max=1.0, max_inclusive=False)
        check_float("muon_rms", self.muon_rms, min=0.0, min_inclusive=False)
        if self.optimizer == "muon" and self.fsdp:
            raise ValueError(
                "optimizer='muon' needs whole weight matrices, and fsdp=True shards them; "
                "expected optimizer='adamw' with fsdp, or fsdp=False (DDP) with muon"
            )
        check_float("grad_clip", self.grad_clip, min=0.0)
        check_int("seed", self.seed, min=0, max=MAX_SEED)
        check_int("log_every", self.log_every, min=1)
        check_int("val_every", self.val_every, min=0)
        check_int("val_batches", self.val_batches, min=1)
        check_int("val_num_times", self.val_num_times, min=1)
        check_int("checkpoint_every", self.checkpoint_every, min=0)
        check_int("keep_checkpoints", self.keep_checkpoints, min=1)
        check_choice("nan_policy", self.nan_policy, NAN_POLICIES)

    @property
    def steps(self) -> int:
        """Deprecated name of max_steps."""
        return self.max_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, data)


deprecated_names(TrainConfig, {"steps": "max_steps"})


def _from_dict(cls: Any, data: dict[str, Any]) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} data must be a dict, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} | set(cls.deprecated_names)
    reject_unknown_kwargs(cls.__name__, {k: v for k, v in data.items() if k not in names})
    return cls(**data)


# ----------------------------------------------------------------------------------------------
# JSON


# the JSON layout's version and the migrations from older ones: demask/config_formats.py
_CONFIG_ENTRIES = ("format_version", "model", "train")


def configs_to_json(model: ModelConfig, train: TrainConfig | None = None) -> str:
    """Both configs as one JSON document:
    {"format_version": 3, "model": {...}, "train": {...} | null}."""
    payload = {
        "format_version": CONFIG_FORMAT_VERSION,
        "model": model.to_dict(),
        "train": None if train is None else train.to_dict(),
    }
    return json.dumps(payload, indent=2, sort_keys=True)


def _section(cls: Any, name: str, data: Any) -> Any:
    """A config section with every field present (a missing one would load as a default and
    silently change the run, e.g. a cosine schedule coming back linear)."""
    if not isinstance(data, dict):
        raise ValueError(f'config JSON "{name}" must be an object, got {type(data).__name__}')
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data]
    if missing:
        raise ValueError(f'config JSON "{name}" is missing {missing}; expected every field')
    return cls.from_dict(data)


def configs_from_json(text: str) -> tuple[ModelConfig, TrainConfig | None]:
    """Inverse of `configs_to_json`; migrates older format versions. Refuses (ValueError) a newer
    format version, unknown or missing entries and fields: nothing falls back to a default."""
    payload = json.loads(text)
    if not isinstance(payload, dict):
        raise ValueError(
            f"config JSON must be an object with entries {list(_CONFIG_ENTRIES)}, got "
            f"{type(payload).__name__}"
        )
    version = payload.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"config format_version must be an int >= 1, got {version!r}")
    if version > CONFIG_FORMAT_VERSION:
        raise ValueError(
            f"config format_version {version} is newer than this demask reads (up to "
            f"{CONFIG_FORMAT_VERSION}); upgrade demask to load it"
        )
    unknown = sorted(set(payload) - set(_CONFIG_ENTRIES))
    missing = [k for k in ("model", "train") if k not in payload]
    if not (unknown or missing):
        while version < CONFIG_FORMAT_VERSION:
            payload, version = MIGRATIONS[version](payload), version + 1
    if unknown or missing:
        found = (f"unknown entries {unknown}" if unknown else "") + (
            f"{' and ' if unknown else ''}no {missing} entries" if missing else ""
        )
        raise ValueError(
            f'config JSON has {found}; expected {list(_CONFIG_ENTRIES)} ("train": null when '
            "there is no train config)"
        )
    train = payload["train"]
    return _section(ModelConfig, "model", payload["model"]), (
        None if train is None else _section(TrainConfig, "train", train)
    )


def save_configs(path: str | Path, model: ModelConfig, train: TrainConfig | None = None) -> None:
    """Write `configs_to_json` to `path` atomically (temporary file, fsync, rename; mode 0644 under
    the usual umask, like any other file)."""
    from demask.runfolder import atomic_write_text

    atomic_write_text(path, configs_to_json(model, train) + "\n")


def load_configs(path: str | Path) -> tuple[ModelConfig, TrainConfig | None]:
    """Read a file written by `save_configs`."""
    return configs_from_json(Path(path).read_text())


# ----------------------------------------------------------------------------------------------
# building models


def build_model(config: ModelConfig) -> nn.Module:
    """The wrapper of `config.kind` (NonAutoregressiveWrapper, AutoregressiveWrapper or a
    registered kind), with freshly initialised weights (seed torch beforehand to repeat them)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    check_choice("kind", config.kind, MODEL_BUILDERS)
    return MODEL_BUILDERS[config.kind](config)


# one line per kind: the kind's name -> the wrapper's builder
register_model_kind(NonAutoregressiveWrapper.kind, NonAutoregressiveWrapper.from_config)
register_model_kind(AutoregressiveWrapper.kind, AutoregressiveWrapper.from_config)
