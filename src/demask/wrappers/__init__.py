"""The seed-compatible facades: objectives and decoders composed around a backbone."""

from demask.wrappers.autoregressive import AutoregressiveWrapper
from demask.wrappers.nonautoregressive import Losses, NonAutoregressiveWrapper

__all__ = ["AutoregressiveWrapper", "Losses", "NonAutoregressiveWrapper"]
