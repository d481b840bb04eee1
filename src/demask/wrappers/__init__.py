"""The seed-compatible facades: objectives and decoders composed around a backbone."""

from demask.wrappers.autoregressive import AutoregressiveWrapper

__all__ = ["AutoregressiveWrapper"]
