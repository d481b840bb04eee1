"""The backbone: token ids -> logits. It knows nothing of masking, schedules or sampling."""

from demask.model.attention_layers import AttentionLayers, Decoder, Encoder
from demask.model.intermediates import Intermediates
from demask.model.kv_cache import KVCache
from demask.model.transformer import TransformerWrapper

__all__ = [
    "AttentionLayers",
    "Decoder",
    "Encoder",
    "Intermediates",
    "KVCache",
    "TransformerWrapper",
]
