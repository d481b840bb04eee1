"""Import path of the seed library (`x_transformers.nonautoregressive_wrapper`), so that seed code
runs with only the package name changed. The implementation is `demask.wrappers.nonautoregressive`."""

from demask.wrappers.nonautoregressive import Losses, NonAutoregressiveWrapper

__all__ = ["Losses", "NonAutoregressiveWrapper"]
