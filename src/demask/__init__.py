"""demask: masked (MaskGIT, Mask-Predict, MDLM) and autoregressive generation with transformers.

The public API. The seed-compatible facade is `TransformerWrapper`, `Encoder`, `Decoder`,
`NonAutoregressiveWrapper` (with `Losses`) and `AutoregressiveWrapper`.
"""

from demask.model import Decoder, Encoder, Intermediates, KVCache, TransformerWrapper
from demask.wrappers import AutoregressiveWrapper, Losses, NonAutoregressiveWrapper

__version__ = "0.1.0"

__all__ = [
    "AutoregressiveWrapper",
    "Decoder",
    "Encoder",
    "Intermediates",
    "KVCache",
    "Losses",
    "NonAutoregressiveWrapper",
    "TransformerWrapper",
]
