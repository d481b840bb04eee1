"""Import path of the seed library (`x_transformers.autoregressive_wrapper`), so that seed code
runs with only the package name changed. The implementation is `demask.wrappers.autoregressive`."""

from demask.wrappers.autoregressive import AutoregressiveWrapper

__all__ = ["AutoregressiveWrapper"]
