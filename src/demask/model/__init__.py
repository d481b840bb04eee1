"""The backbone: token ids -> logits. It knows nothing of masking, schedules or sampling."""

from demask.model.kv_cache import KVCache
from demask.model.transformer import (
    AttentionLayers,
    Decoder,
    Encoder,
    Intermediates,
    TransformerWrapper,
)

__all__ = [
    "AttentionLayers",
    "Decoder",
    "Encoder",
    "Intermediates",
    "KVCache",
    "TransformerWrapper",
]
