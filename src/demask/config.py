"""Run configuration: what model to build (`ModelConfig`) and how to train it (`TrainConfig`).

Both are plain dataclasses with one comment per field, validated on construction with
`demask._checks`, and round-trip through JSON (`to_dict` / `from_dict`, `save_configs` /
`load_configs`). A checkpoint stores both, so `build_model(model_config)` rebuilds the exact
network from the checkpoint alone.

`build_model` looks the builder up in `MODEL_BUILDERS`, a registry keyed by `ModelConfig.kind`
("masked" -> NonAutoregressiveWrapper around an Encoder, "autoregressive" -> AutoregressiveWrapper
around a Decoder). A new model kind is one builder function plus `register_model_kind(...)`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from demask._checks import check_choice, check_float, check_int, reject_unknown_kwargs

if TYPE_CHECKING:
    from demask.model import TransformerWrapper

# ----------------------------------------------------------------------------------------------
# the model registry

ModelBuilder = Callable[["ModelConfig"], nn.Module]
MODEL_BUILDERS: dict[str, ModelBuilder] = {}


def register_model_kind(kind: str, builder: ModelBuilder) -> ModelBuilder:
    """Add (or replace) the builder used by `build_model` for `ModelConfig(kind=kind)`."""
    MODEL_BUILDERS[kind] = builder
    return builder


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


# ----------------------------------------------------------------------------------------------
# model


@dataclass
class ModelConfig:
    """The network and its wrapper. Options marked (masked) / (AR) apply to that kind only."""

    kind: str = "masked"  # a key of MODEL_BUILDERS: "masked" | "autoregressive"
    num_tokens: int = 256  # vocabulary of the DATA; a masked net gets one more embedding (the mask)
    seq_len: int = 64  # sequence length; the net's max_seq_len
    dim: int = 128  # model width
    depth: int = 4  # transformer blocks
    heads: int = 4  # attention heads
    dim_head: int | None = None  # width of one head; None -> dim // heads
    ff_mult: int = 4  # feed-forward hidden width = ff_mult * dim
    dropout: float = 0.0  # attention and feed-forward dropout (0 keeps DDP runs exactly equivalent)
    rotary: bool = False  # rotary position embeddings instead of learned absolute ones
    tie_embedding: bool = False  # share the token embedding with the output projection
    # --- (masked) NonAutoregressiveWrapper options, seed defaults ---
    schedule: str = "linear"  # masking schedule name (linear | cosine | ...)
    steps: int = 18  # demasking steps at generation time
    mask_id: int | None = None  # id of the mask token; None -> num_tokens (an extra embedding)
    self_cond: bool = False  # self-conditioning on the previous prediction's embeddings
    self_cond_train_prob: float = 0.75  # how often self-conditioning is used in training
    no_replace_prob: float = 0.15  # BERT: share of masked positions shown unchanged
    random_token_prob: float = 0.1  # BERT: share of masked positions shown as a random token
    can_mask_prev_unmasked: bool = False  # generation may re-mask tokens unmasked earlier
    use_simple_mdlm_loss_weight: bool = True  # MDLM weight alpha'(t) / (1 - alpha(t)) on the loss
    cond_drop_prob: float = 0.0  # share of training rows whose condition is dropped (guidance)
    cond_prefix_len: int = 0  # leading condition tokens (1: a class token); never masked
    # --- (AR) AutoregressiveWrapper options ---
    mask_prob: float = 0.0  # (AR) share of input tokens masked in training (arXiv:2210.13432)
    add_attn_z_loss: bool = False  # (AR) add the attention z-loss to the training loss

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, MODEL_BUILDERS)
        check_int("num_tokens", self.num_tokens, min=2)
        check_int("seq_len", self.seq_len, min=2)
        check_int("dim", self.dim, min=1)
        check_int("depth", self.depth, min=1)
        check_int("heads", self.heads, min=1)
        if self.dim_head is not None:
            check_int("dim_head", self.dim_head, min=1)
        elif self.dim % self.heads:
            raise ValueError(
                f"heads must divide dim when dim_head is None, got dim={self.dim}, "
                f"heads={self.heads}; set dim_head or pick heads dividing dim"
            )
        check_int("ff_mult", self.ff_mult, min=1)
        check_float("dropout", self.dropout, min=0.0, max=1.0, max_inclusive=False)
        check_int("steps", self.steps, min=1)
        if self.mask_id is not None:
            check_int("mask_id", self.mask_id, min=0)
        check_float("self_cond_train_prob", self.self_cond_train_prob, min=0.0, max=1.0)
        check_float("no_replace_prob", self.no_replace_prob, min=0.0, max=1.0)
        check_float("random_token_prob", self.random_token_prob, min=0.0, max=1.0)
        check_float("mask_prob", self.mask_prob, min=0.0, max=1.0, max_inclusive=False)
        check_float("cond_drop_prob", self.cond_drop_prob, min=0.0, max=1.0)
        check_int("cond_prefix_len", self.cond_prefix_len, min=0, max=self.seq_len - 1)
        for name in (
            "rotary",
            "tie_embedding",
            "self_cond",
            "can_mask_prev_unmasked",
            "use_simple_mdlm_loss_weight",
            "add_attn_z_loss",
        ):
            _check_bool(name, getattr(self, name))
        if not isinstance(self.schedule, str):
            raise TypeError(f"schedule must be a str, got {type(self.schedule).__name__}")

    @property
    def head_dim(self) -> int:
        """The width of one attention head."""
        return self.dim_head if self.dim_head is not None else self.dim // self.heads

    @property
    def resolved_mask_id(self) -> int:
        """The mask token id of a masked model (num_tokens unless given)."""
        return self.num_tokens if self.mask_id is None else self.mask_id

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data)


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
    steps: int = 2000  # total optimiser steps (the LR schedule spans these)
    batch_size: int = 32  # sequences per step per process
    lr: float = 3e-4  # peak learning rate (AdamW)
    warmup_steps: int = 100  # linear warm-up from 0 to lr over these steps
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio at the last step
    weight_decay: float = 0.1  # AdamW decoupled decay, on matrices of Linear layers only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
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
        for name in ("data", "out", "device"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty str, got {value!r}")
        if self.data_max_bytes is not None:
            check_int("data_max_bytes", self.data_max_bytes, min=1)
        check_int("steps", self.steps, min=1)
        check_int("batch_size", self.batch_size, min=1)
        check_float("lr", self.lr, min=0.0, min_inclusive=False)
        check_int("warmup_steps", self.warmup_steps, min=0)
        check_float("min_lr_ratio", self.min_lr_ratio, min=0.0, max=1.0)
        check_float("weight_decay", self.weight_decay, min=0.0)
        check_float("beta1", self.beta1, min=0.0, max=1.0, max_inclusive=False)
        check_float("beta2", self.beta2, min=0.0, max=1.0, max_inclusive=False)
        check_float("grad_clip", self.grad_clip, min=0.0)
        check_int("seed", self.seed, min=0, max=MAX_SEED)
        for name in ("bf16", "compile", "fsdp", "progress"):
            _check_bool(name, getattr(self, name))
        check_int("log_every", self.log_every, min=1)
        check_int("val_every", self.val_every, min=0)
        check_int("val_batches", self.val_batches, min=1)
        check_int("val_num_times", self.val_num_times, min=1)
        check_int("checkpoint_every", self.checkpoint_every, min=0)
        check_int("keep_checkpoints", self.keep_checkpoints, min=1)
        check_choice("nan_policy", self.nan_policy, NAN_POLICIES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, data)


def _from_dict(cls: Any, data: dict[str, Any]) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} data must be a dict, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    reject_unknown_kwargs(cls.__name__, {k: v for k, v in data.items() if k not in names})
    return cls(**data)


# ----------------------------------------------------------------------------------------------
# JSON


# Version of the JSON layout below; a reader refuses a newer one. Files written before versions
# existed have no "format_version" and are read as version 1 (the same layout).
CONFIG_FORMAT_VERSION = 1
_CONFIG_ENTRIES = ("format_version", "model", "train")


def configs_to_json(model: ModelConfig, train: TrainConfig | None = None) -> str:
    """Both configs as one JSON document:
    {"format_version": 1, "model": {...}, "train": {...} | null}."""
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
    """Inverse of `configs_to_json`. Refuses (ValueError) a newer format version, unknown or
    missing entries and fields: nothing falls back to a default."""
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
    """The wrapper (NonAutoregressiveWrapper / AutoregressiveWrapper / a registered kind) for
    `config`, with freshly initialised weights (seed torch beforehand for reproducibility)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    check_choice("kind", config.kind, MODEL_BUILDERS)
    return MODEL_BUILDERS[config.kind](config)


def _net(c: ModelConfig, layers: type, num_tokens: int) -> TransformerWrapper:
    """The backbone both kinds share: `layers` is Encoder (masked) or Decoder (autoregressive)."""
    from demask.model import TransformerWrapper

    attn_layers = layers(
        dim=c.dim,
        depth=c.depth,
        heads=c.heads,
        attn_dim_head=c.head_dim,
        ff_mult=c.ff_mult,
        attn_dropout=c.dropout,
        ff_dropout=c.dropout,
        rotary_pos_emb=c.rotary,
    )
    return TransformerWrapper(
        num_tokens=num_tokens,
        max_seq_len=c.seq_len,
        attn_layers=attn_layers,
        tie_embedding=c.tie_embedding,
        use_abs_pos_emb=not c.rotary,
    )


def _build_masked(c: ModelConfig) -> nn.Module:
    from demask.model import Encoder
    from demask.wrappers import NonAutoregressiveWrapper

    mask_id = c.resolved_mask_id
    # the data's tokens plus the mask token
    net = _net(c, Encoder, num_tokens=max(c.num_tokens, mask_id) + 1)
    return NonAutoregressiveWrapper(
        net,
        mask_id=mask_id,
        steps=c.steps,
        self_cond=c.self_cond,
        self_cond_train_prob=c.self_cond_train_prob,
        no_replace_prob=c.no_replace_prob,
        random_token_prob=c.random_token_prob,
        schedule=c.schedule,
        can_mask_prev_unmasked=c.can_mask_prev_unmasked,
        use_simple_mdlm_loss_weight=c.use_simple_mdlm_loss_weight,
        cond_drop_prob=c.cond_drop_prob,
        cond_prefix_len=c.cond_prefix_len,
    )


def _build_autoregressive(c: ModelConfig) -> nn.Module:
    from demask.model import Decoder
    from demask.wrappers import AutoregressiveWrapper

    net = _net(c, Decoder, num_tokens=c.num_tokens)
    return AutoregressiveWrapper(net, mask_prob=c.mask_prob, add_attn_z_loss=c.add_attn_z_loss)


register_model_kind("masked", _build_masked)
register_model_kind("autoregressive", _build_autoregressive)
