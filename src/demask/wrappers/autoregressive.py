"""`AutoregressiveWrapper`: the seed-compatible facade for training and sampling a causal model.

    net = TransformerWrapper(num_tokens=256, max_seq_len=1024, attn_layers=Decoder(dim=512, depth=6, heads=8))
    model = AutoregressiveWrapper(net)
    loss = model(tokens)                          # teacher-forced cross-entropy, a scalar
    out = model.generate(prompts, seq_len=100)    # (B, P + 100): prompts then new tokens

It composes the objective (demask.objectives.autoregressive) and the decoding loop
(demask.decoding.autoregressive, demask.decoding.beam); it holds configuration and validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from demask._checks import check_float, check_int, reject_unknown_kwargs
from demask.decoding.autoregressive import (
    Running,
    SamplingOptions,
    Stopping,
    iter_decode,
    resolve_filter,
)
from demask.decoding.beam import BeamOptions, beam_search
from demask.decoding.prompts import (
    PreparedPrompts,
    check_stop_sequences,
    check_token_id,
    prepare_prompts,
)
from demask.modes import eval_mode
from demask.objectives.autoregressive import LossOptions, autoregressive_loss
from demask.wrappers.contract import ModelContract, SampleOptions, Samples, prefix_of

__all__ = ["AutoregressiveWrapper"]


def check_sampling(temperature: Any, repetition_penalty: Any) -> tuple[float, float]:
    """Validate the scalar sampling arguments (named in the error)."""
    temperature = check_float("temperature", temperature, min=0.0)
    penalty = check_float("repetition_penalty", repetition_penalty, min=0.0, min_inclusive=False)
    return temperature, penalty


class AutoregressiveWrapper(ModelContract):
    """Teacher-forced training and sampling for a causal `TransformerWrapper` (a Decoder).

    Args (the seed's):
      net: the backbone, tokens (B, N) -> logits (B, N, V).
      ignore_index: target id that does not count in the loss (e.g. padding).
      pad_value: the id written after a row's EOS and used to left-pad prompts; a valid token id.
      mask_prob: forgetful causal masking in training, in [0, 1) (arXiv 2210.13432).
      add_attn_z_loss: add the backbone's attention z-loss to the loss.
      next_embed_loss_weight: weight of the next-embedding loss, used when the net was built with
        add_continuous_pred_head=True (cosine distance; see demask.objectives.autoregressive).
    """

    kind = "autoregressive"
    likelihood_name = "exact_nll"
    sample_options = frozenset({"seed", "temperature", "filter_thres", "prompt", "start", "length",
                                "history"})  # fmt: skip

    def __init__(
        self,
        net: nn.Module,
        ignore_index: int = -100,
        pad_value: int = 0,
        mask_prob: float = 0.0,
        add_attn_z_loss: bool = False,
        next_embed_loss_weight: float = 0.1,
    ):
        super().__init__()
        if not isinstance(net, nn.Module) or not hasattr(net, "num_tokens"):
            raise TypeError(
                f"net must be a TransformerWrapper (a module with num_tokens), got {type(net).__name__}"
            )
        layers = getattr(net, "attn_layers", None)
        if layers is not None and getattr(layers, "causal", None) is not True:
            raise ValueError(
                f"net must be causal (attn_layers=Decoder(...)), got attn_layers="
                f"{type(layers).__name__}: a bidirectional net sees the tokens it must predict"
            )
        self.net = net
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.pad_value = check_int("pad_value", pad_value)
        self.mask_prob = check_float("mask_prob", mask_prob, min=0.0, max=1.0, max_inclusive=False)
        self.add_attn_z_loss = bool(add_attn_z_loss)
        self.next_embed_loss_weight = check_float(
            "next_embed_loss_weight", next_embed_loss_weight, min=0.0
        )

    @property
    def max_seq_len(self) -> int:
        return cast(int, self.net.max_seq_len)

    @property
    def num_tokens(self) -> int:
        return cast(int, self.net.num_tokens)

    def forward(self, x: Tensor, return_metrics: bool = False, **kwargs: Any) -> Any:
        """x: (B, N) tokens -> the scalar loss; with return_metrics, (loss, metrics dict).

        kwargs: `mask` (B, N) bool padding mask, `generator` for the masking draw, and anything
        the net's forward accepts (e.g. `context`). Forgetful masking applies in training only.
        """
        options = LossOptions(
            ignore_index=self.ignore_index,
            pad_value=self.pad_value,
            mask_prob=self.mask_prob if self.training else 0.0,
            add_attn_z_loss=self.add_attn_z_loss,
            next_embed_loss_weight=self.next_embed_loss_weight,
        )
        loss, metrics = autoregressive_loss(self.net, x, options, **kwargs)
        return (loss, metrics) if return_metrics else loss

    # ---------------------------------------------------------------- the model contract
    def loss(self, x: Tensor, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """`forward(x, return_metrics=True)`: the loss and its metrics (ce, tokens, ...)."""
        return cast(tuple[Tensor, dict[str, Tensor]], self(x, return_metrics=True, **kwargs))

    def likelihood_bits(self, x: Tensor, *, num_times: int | None = None) -> tuple[Tensor, int]:
        """Exact NLL bits of x[:, 1:] given the prefix, summed over the batch x (B, N), from the
        network's logits (training extras such as input masking or the z-loss never leak in);
        token 0 has no prefix and is not scored. num_times is unused."""
        logits = self.net(x[:, :-1])  # (B, N-1, V)
        nats = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        return nats.double() / math.log(2.0), x[:, 1:].numel()

    def sample(self, n: int, options: SampleOptions) -> Samples:
        """Left-to-right sampling of n rows after a prefix: `options.prompt` (token ids, no
        holes) or `options.start` (n, k); `options.length` new tokens (default: up to
        max_seq_len). filter_thres > 0 keeps the top ceil((1 - F) * vocab) logits."""
        self.check_sample_options(options)
        start = prefix_of(n, options)
        limit = self.max_seq_len
        if options.length is None and start.shape[1] >= limit:
            raise ValueError(
                f"prompt: {start.shape[1]} tokens leave no room to generate: the model's sequence "
                f"length is {limit}, so give at most {limit - 1} prompt tokens"
            )
        length = options.length or limit - start.shape[1]
        if length < 1 or start.shape[1] + length > limit:
            raise ValueError(
                f"length: prompt ({start.shape[1]} tokens) + {length} new tokens must fit the "
                f"model's sequence length {limit}"
            )
        dev = next(self.net.parameters()).device
        thres = options.filter_thres
        tokens = self.generate(
            start.to(dev),
            length,
            temperature=options.temperature,
            filter_logits_fn="top_k" if thres else None,
            filter_kwargs={"thres": thres} if thres else None,
            generator=torch.Generator(dev).manual_seed(options.seed),
        )
        return Samples(cast(Tensor, tokens).cpu(), None, {"filter_thres": thres})

    @classmethod
    def from_config(cls, config: Any) -> AutoregressiveWrapper:
        """A Decoder backbone over the data's tokens, and the wrapper."""
        from demask.model import Decoder

        return cls(config.backbone(Decoder, num_tokens=config.num_tokens), **config.arguments(cls))

    # ---------------------------------------------------------------- generation
    def _setup(
        self, prompts: Any, seq_len: Any, prompt_lens: Any, eos_token: Any
    ) -> tuple[PreparedPrompts, int, int | None]:
        vocab = self.num_tokens
        seq_len = check_int("seq_len", seq_len, min=1)
        check_int("pad_value", self.pad_value, min=0, max=vocab - 1)
        eos = check_token_id("eos_token", eos_token, vocab)
        prepared = prepare_prompts(prompts, prompt_lens, num_tokens=vocab, pad_value=self.pad_value)
        return prepared, seq_len, eos

    def _running(
        self, cache_kv: Any, restrict_to_max_seq_len: Any, compile: Any, total: int
    ) -> Running:
        """How the net runs. restrict_to_max_seq_len=False (the seed's option): the net sees the
        whole sequence, which must then fit max_seq_len unless its positions are rotary."""
        window = None
        if not restrict_to_max_seq_len:
            window = max(total, self.max_seq_len)
            if total > self.max_seq_len and not getattr(
                self.net, "can_cache_kv_outside_max_seq_len", False
            ):
                raise ValueError(
                    f"restrict_to_max_seq_len=False: prompt + seq_len = {total} tokens exceed "
                    f"max_seq_len={self.max_seq_len} and the net's absolute position embeddings "
                    "cannot go further (use rotary_pos_emb=True, or restrict_to_max_seq_len=True)"
                )
        if not isinstance(compile, (bool, str)):
            raise TypeError(f"compile must be a bool or a torch.compile mode, got {compile!r}")
        return Running(bool(cache_kv), window, compile)

    def _decode_iter(  # noqa: PLR0913  (seed signature: generate's keyword options)
        self,
        prompts: Any,
        seq_len: int,
        *,
        eos_token: int | None = None,
        temperature: float = 1.0,
        filter_logits_fn: str | Callable[..., Tensor] | None = "top_k",
        filter_kwargs: dict[str, Any] | None = None,
        prompt_lens: Tensor | Sequence[int] | None = None,
        cache_kv: bool = True,
        restrict_to_max_seq_len: bool = True,
        compile: bool | str = False,
        amateur_model: nn.Module | None = None,
        contrastive_decode_kwargs: dict[str, float] | None = None,
        repetition_penalty: float = 1.0,
        stop_sequences: Sequence[Any] | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Iterator[Tensor], Tensor, PreparedPrompts]:
        """Validate everything, allocate the output buffer, and return the decoding iterator."""
        reject_unknown_kwargs("AutoregressiveWrapper.generate", kwargs)
        prepared, seq_len, eos = self._setup(prompts, seq_len, prompt_lens, eos_token)
        temperature, penalty = check_sampling(temperature, repetition_penalty)
        filter_fn = resolve_filter(filter_logits_fn, filter_kwargs)
        vocab = self.num_tokens
        if filter_fn is not None:  # surface bad filter_kwargs now, not after the prefill
            filter_fn(torch.zeros(1, vocab))
        cd = dict(contrastive_decode_kwargs or {})
        alpha = check_float(
            "contrastive_decode_kwargs['alpha']", cd.pop("alpha", 0.1), min=0.0, max=1.0
        )
        beta = check_float("contrastive_decode_kwargs['beta']", cd.pop("beta", 1.0), min=0.0)
        reject_unknown_kwargs("contrastive_decode_kwargs", cd)
        if amateur_model is not None and getattr(amateur_model, "num_tokens", None) != vocab:
            raise ValueError(
                f"amateur_model must share the vocabulary of the net ({vocab} tokens), got "
                f"{getattr(amateur_model, 'num_tokens', None)}"
            )
        stops = check_stop_sequences(
            stop_sequences, num_tokens=vocab, device=prepared.tokens.device
        )
        options = SamplingOptions(temperature, filter_fn, penalty, alpha, beta, generator)
        prompt_len = prepared.tokens.shape[1]
        buf = torch.full(
            (prepared.tokens.shape[0], prompt_len + seq_len),
            self.pad_value,
            dtype=torch.long,
            device=prepared.tokens.device,
        )
        buf[:, :prompt_len] = prepared.tokens
        it = iter_decode(
            self.net,
            buf,
            prompt_len,
            start_pos=prepared.start_pos,
            options=options,
            running=self._running(cache_kv, restrict_to_max_seq_len, compile, buf.shape[1]),
            stopping=Stopping(eos, stops, self.pad_value),
            amateur=amateur_model,
        )
        return it, buf, prepared

    @torch.no_grad()
    def generate(
        self,
        prompts: Tensor | Sequence[Tensor],
        seq_len: int,
        *,
        callback: Callable[[Tensor], Any] | None = None,
        return_only_new: bool = False,
        **kwargs: Any,
    ) -> Tensor | list[Tensor]:
        """Sample `seq_len` tokens after each prompt; returns prompts followed by the new tokens.

        prompts: (B, P) tensor, (P,) tensor, or a list of 1-D tensors (see `prompt_lens`).
        Returns (B, P + seq_len) (or (B, seq_len) with return_only_new), matching the input
        form (1-D in, 1-D out; list in, list out). Positions after a row's EOS or stop sequence
        hold pad_value.

        Keyword options:
          temperature=1.0           0 = greedy (argmax); must be >= 0
          filter_logits_fn="top_k"  a name in decoding.autoregressive.FILTER_FUNCTIONS ("top_k",
                                    "top_p", "min_p", "top_a"), a callable(logits, **kw), or None
          filter_kwargs=None        e.g. {"k": 20}, {"thres": 0.9}, {"p": 0.9}, {"a": 0.02};
                                    empty: the filter's default (top_k keeps the top 10%)
          eos_token=None            a row stops after it; generation ends when all rows stopped
          stop_sequences=None       list of token sequences; a row stops after completing one
          prompt_lens=None          (B,) real lengths of right-padded (B, P) prompts
          cache_kv=True             the static key/value cache (see decoding.autoregressive)
          restrict_to_max_seq_len=True  False: the net sees the whole sequence, not a sliding
                                    window of max_seq_len tokens (rotary nets may then go past it)
          compile=False             True: the cached decoding step runs through torch.compile
                                    (a CUDA graph on a GPU; the first call compiles: seconds to
                                    minutes); or a torch.compile mode string
          repetition_penalty=1.0    CTRL penalty (> 1 discourages tokens already present)
          amateur_model=None        contrastive decoding (arXiv 2210.15097) against this model,
          contrastive_decode_kwargs {"alpha": 0.1, "beta": 1.0}
          generator=None            a torch.Generator for reproducible sampling
          callback=None             called with each step's tokens (B,) as they are produced
        """
        with eval_mode(self, kwargs.get("amateur_model")):
            it, buf, prepared = self._decode_iter(prompts, seq_len, **kwargs)
            for tokens in it:
                if callback is not None:
                    callback(tokens)
        return prepared.format(buf, prepared.tokens.shape[1], return_only_new)

    @torch.no_grad()
    def stream(
        self, prompts: Tensor | Sequence[Tensor], seq_len: int, **kwargs: Any
    ) -> Iterator[Tensor]:
        """Like `generate`, but yields each step's new tokens (B,) (or a scalar for a 1-D prompt).

        Arguments are validated before the first token is produced; the model is in eval mode
        while the iterator runs and its training state is restored when it ends or is closed.
        Rows that have stopped yield pad_value.
        """
        with eval_mode(self, kwargs.get("amateur_model")):
            it, _, prepared = self._decode_iter(prompts, seq_len, **kwargs)
            for tokens in it:
                yield tokens[0] if prepared.kind == "vector" else tokens

    @torch.no_grad()
    def beam_search(  # noqa: PLR0913  (seed signature, plus demask's options)
        self,
        prompts: Tensor | Sequence[Tensor],
        seq_len: int,
        beams: int = 4,
        return_beams_and_scores: bool = False,
        eos_token: int | None = None,
        temperature: float = 1.0,
        stochastic: bool = False,
        prompt_lens: Tensor | Sequence[int] | None = None,
        filter_logits_fn: str | Callable[..., Tensor] | None = None,
        restrict_to_max_seq_len: bool = True,
        filter_kwargs: dict[str, Any] | None = None,
        cache_kv: bool = True,
        *,
        length_penalty: float = 0.0,
        generator: torch.Generator | None = None,
        compile: bool | str = False,
        return_scores: bool = False,
        return_all_beams: bool = False,
        return_only_new: bool = False,
    ) -> Any:
        """Beam search (see demask.decoding.beam): the most probable continuation of each prompt.

        Returns the best sequence per row, shaped like `generate`'s output; with return_all_beams
        a (B, beams, ...) tensor (a list of (beams, ...) tensors for list prompts), best first.
        With return_scores, (sequences, scores): total log-probabilities in nats, (B,) or
        (B, beams), divided by length ** length_penalty when length_penalty > 0.
        return_beams_and_scores (the seed's): (all beams, scores) beams first, (beams, B, ...) and
        (beams, B), best first. stochastic (the seed's): choose hypotheses by Gumbel-perturbed
        scores, from softmax(filter_logits_fn(logits) / temperature) (no filter by default),
        drawn with `generator`; the scores returned stay the model's log-probabilities.
        """
        prepared, seq_len, eos = self._setup(prompts, seq_len, prompt_lens, eos_token)
        beams = check_int("beams", beams, min=1)
        length_penalty = check_float("length_penalty", length_penalty, min=0.0)
        temperature, _ = check_sampling(temperature, 1.0)
        sampling = None
        if stochastic:
            filter_fn = resolve_filter(filter_logits_fn, filter_kwargs)
            sampling = SamplingOptions(temperature, filter_fn, generator=generator)
        total = prepared.tokens.shape[1] + seq_len
        running = self._running(cache_kv, restrict_to_max_seq_len, compile, total)
        with eval_mode(self):
            seqs, scores = beam_search(
                self.net,
                prepared.tokens,
                seq_len,
                BeamOptions(beams, length_penalty, sampling),
                start_pos=prepared.start_pos,
                stopping=Stopping(eos, (), self.pad_value),
                running=running,
            )  # (B, K, T), (B, K)
        if return_beams_and_scores:
            return_all_beams, return_scores = True, True
        if not return_all_beams:
            seqs, scores = seqs[:, 0], scores[:, 0]
        out = prepared.format(seqs, prepared.tokens.shape[1], return_only_new)
        if prepared.kind == "vector":
            scores = scores[0]
        if return_beams_and_scores:  # the seed's layout: beams first
            out = out.transpose(0, 1) if isinstance(out, Tensor) and out.ndim == 3 else out
            scores = scores.transpose(0, 1) if scores.ndim == 2 else scores
        return (out, scores) if return_scores else out
