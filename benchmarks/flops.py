"""Analytic model FLOPs, the same nominal count for both libraries.

Notation: d = model dim, L = depth, I = heads * dim_head (attention inner dim), m = ff_mult,
V = vocabulary (logits) size, c = number of keys a query attends to.

    P = L * (4 * d * I + 2 * m * d**2) + d * V     # weights of every matmul (q, k, v, out, two
                                                    # feed-forward layers, logits); embedding
                                                    # lookups, norms and biases are not matmuls
    forward FLOPs per token  = 2 * P + 4 * L * c * I      # 2 per multiply-add; attention is
                                                          # QK^T (2cI) plus AV (2cI) per layer
    training FLOPs per token = 3 * forward = 6 * P + 12 * L * c * I

Training and masked generation use c = N (the full sequence; for causal training this follows
the PaLM / nanoGPT MFU convention of counting the full N). Cached autoregressive decoding counts
c = the real context length of each decoded token. The counts are *nominal*: the work of the
plain algorithm. An implementation that skips work (say, the vocabulary projection at positions
already decoded) gets credit for it, exactly as in model-FLOPs utilisation (MFU).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The sizes that fix a transformer's FLOPs."""

    dim: int  # d, model width
    depth: int  # L, number of layers (attention + feed-forward)
    heads: int  # attention heads
    num_tokens: int  # V, logits per position
    dim_head: int = 64  # per-head width (the seed API's default)
    ff_mult: int = 4  # feed-forward hidden = ff_mult * dim

    @property
    def inner(self) -> int:
        return self.heads * self.dim_head


def matmul_params(s: ModelShape) -> int:
    """P: the number of weights that take part in a matmul per token."""
    per_layer = 4 * s.dim * s.inner + 2 * s.ff_mult * s.dim * s.dim
    return s.depth * per_layer + s.dim * s.num_tokens


def forward_flops_per_token(s: ModelShape, context: int) -> float:
    """2 P + 4 L c I: one token's forward pass attending to `context` keys."""
    return 2.0 * matmul_params(s) + 4.0 * s.depth * context * s.inner


def train_flops(s: ModelShape, batch: int, seq_len: int) -> float:
    """(6 P + 12 L N I) * B * N: forward + backward of one batch (the optimizer step is ignored)."""
    return 3.0 * forward_flops_per_token(s, seq_len) * batch * seq_len


def masked_generate_flops(s: ModelShape, batch: int, seq_len: int, steps: int) -> float:
    """steps full bidirectional forwards of a (B, N) batch."""
    return steps * batch * seq_len * forward_flops_per_token(s, seq_len)


def ar_generate_flops(s: ModelShape, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Cached decoding: prefill of the prompt, then one forward per new token but the last.

    T = prompt_len + new_tokens - 1 positions go through the network, position j attending to
    j + 1 keys, so the FLOPs are B * (T * 2P + 4 L I * T (T + 1) / 2).
    """
    t = prompt_len + new_tokens - 1
    return batch * (t * 2.0 * matmul_params(s) + 4.0 * s.depth * s.inner * t * (t + 1) / 2)
