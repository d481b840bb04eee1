"""Training objectives: each turns a batch of tokens and a backbone into (loss, metrics)."""

from demask.objectives.autoregressive import autoregressive_loss, forgetful_causal_mask

__all__ = ["autoregressive_loss", "forgetful_causal_mask"]
