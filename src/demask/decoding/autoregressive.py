"""The autoregressive decoding loop: the one place that calls the model during AR generation.

Layout of a decoding run (B rows, prompt length P, S new tokens):
- `buf` (B, P + S) is allocated once; the left-aligned prompts fill buf[:, :P] (shorter prompts
  are left-padded, `start_pos` (B,) says where each row's real tokens start) and step i writes its
  tokens into buf[:, P + i]. Nothing is concatenated or re-allocated per step.
- `ModelStepper` feeds one model (the net, or the amateur of contrastive decoding) and returns
  next-token logits (B, V). With the key/value cache (the default) a step feeds only the newest
  token, at an explicit position, to the preallocated `net.new_cache(B, capacity)`. An eager step
  reads the power-of-two bucket of written slots; with `compile=True` it reads the whole capacity,
  so its shapes never change (`torch.compile`; a CUDA graph on a GPU). Without the cache a step
  re-runs the last `max_seq_len` tokens. Past `max_seq_len` the window slides: with rotary
  positions the cache becomes a ring over the last `max_seq_len` positions; with absolute
  positions only the no-cache path can slide, and asking for the cache raises a ValueError.
- `select_tokens` turns logits into tokens: repetition penalty, contrastive scores, then greedy
  argmax (temperature 0) or filter + float64 Gumbel-max sampling. It never calls the model.

Sliding note: in ring mode the cached keys/values of old positions were computed while their own
context was still in the window, so past `max_seq_len` the cached and the no-cache paths attend
over the same tokens but are not bit-identical (the no-cache path recomputes every hidden state
from the truncated window). Within `max_seq_len` they agree (tested at temperature 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn

from demask._checks import check_choice
from demask.model.kv_cache import KVCache
from demask.samplers.categorical import sample_categorical
from demask.samplers.filters import min_p, top_a, top_k, top_k_compact, top_p

__all__ = [
    "FILTER_FUNCTIONS",
    "ModelStepper",
    "Running",
    "SamplingOptions",
    "Stopping",
    "apply_repetition_penalty",
    "compile_decode_step",
    "contrastive_logits",
    "iter_decode",
    "resolve_filter",
    "select_tokens",
]

FilterFn = Callable[[Tensor], Tensor]

# name -> (filter, keyword arguments used when filter_kwargs is empty); the filters themselves live
# in demask.samplers.filters (one top-k in the package). The defaults follow the seed library:
# top-k keeps the top 10% of the vocabulary.
FILTER_FUNCTIONS: dict[str, tuple[Callable[..., Tensor], dict[str, Any]]] = {
    "top_k": (top_k, {"thres": 0.9}),
    "top_p": (top_p, {"p": 0.9}),
    "min_p": (min_p, {"p": 0.1}),
    "top_a": (top_a, {"a": 0.02}),
}


def resolve_filter(
    filter_logits_fn: str | Callable[..., Tensor] | None, filter_kwargs: dict[str, Any] | None
) -> FilterFn | None:
    """A logits filter by name (see FILTER_FUNCTIONS) or a callable, bound to `filter_kwargs`."""
    if filter_logits_fn is None:
        return None
    if isinstance(filter_logits_fn, str):
        check_choice("filter_logits_fn", filter_logits_fn, FILTER_FUNCTIONS)
        fn, defaults = FILTER_FUNCTIONS[filter_logits_fn]
        return partial(fn, **(filter_kwargs or defaults))
    if callable(filter_logits_fn):
        return partial(filter_logits_fn, **(filter_kwargs or {}))
    raise TypeError(
        "filter_logits_fn must be None, a callable or one of "
        f"{sorted(FILTER_FUNCTIONS)}, got {type(filter_logits_fn).__name__}"
    )


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, https://arxiv.org/abs/1909.05858).

    The logits of tokens already in the sequence are divided by `penalty` where positive and
    multiplied by it where negative, so penalty > 1 always makes them less likely.
    logits: (B, V), seen: (B, V) bool -> (B, V).
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def contrastive_logits(expert: Tensor, amateur: Tensor, alpha: float, beta: float = 1.0) -> Tensor:
    """Contrastive decoding scores (Li et al. 2022, https://arxiv.org/abs/2210.15097).

    score = log p_expert - beta * log p_amateur on the plausible set
    {x : p_expert(x) >= alpha * max p_expert}, -inf elsewhere (beta = 1 is the paper's objective).
    expert, amateur: (B, V) logits -> (B, V) scores, used as logits by the sampler.
    """
    log_e = expert.float().log_softmax(dim=-1)  # (B, V)
    log_a = amateur.float().log_softmax(dim=-1)
    floor = log_e.amax(dim=-1, keepdim=True) + (math.log(alpha) if alpha > 0 else -math.inf)
    return (log_e - beta * log_a).masked_fill(log_e < floor, -math.inf)


@dataclass
class SamplingOptions:
    """How logits become tokens. temperature 0 = greedy (filters are then irrelevant)."""

    temperature: float = 1.0
    filter_fn: FilterFn | None = None
    repetition_penalty: float = 1.0
    contrastive_alpha: float = 0.1
    contrastive_beta: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        # top-k (the default filter) samples over its k kept entries only, not V with -inf
        # padding: the same distribution, less noise to draw and nothing to scatter.
        fn = self.filter_fn
        self._top_k: dict[str, Any] | None = None
        if isinstance(fn, partial) and fn.func is top_k and not fn.args:
            self._top_k = dict(fn.keywords)


def select_tokens(
    logits: Tensor,
    options: SamplingOptions,
    seen: Tensor | None = None,
    amateur_logits: Tensor | None = None,
) -> Tensor:
    """Next tokens (B,) from logits (B, V). Pure: the model is never called here.

    Order: repetition penalty (if `seen`), contrastive scores (if `amateur_logits`), then argmax at
    temperature 0, else the filter on the (un-tempered) logits and a float64 Gumbel-max draw from
    softmax(logits / temperature), the seed library's order.
    """
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, options.repetition_penalty)
    if amateur_logits is not None:
        if seen is not None:
            amateur_logits = apply_repetition_penalty(
                amateur_logits, seen, options.repetition_penalty
            )
        logits = contrastive_logits(
            logits, amateur_logits, options.contrastive_alpha, options.contrastive_beta
        )
    if options.temperature == 0.0:
        return logits.argmax(dim=-1)
    if options._top_k is not None:
        values, index = top_k_compact(logits, **options._top_k)  # (B, k) each
        choice = sample_categorical(values, options.temperature, options.generator)  # (B,)
        return index.gather(-1, choice[:, None]).squeeze(-1)
    if options.filter_fn is not None:
        logits = options.filter_fn(logits)
    return sample_categorical(logits, options.temperature, options.generator)


def _decode_step(
    net: nn.Module, tokens: Tensor, cache: Any, input_pos: Tensor, seq_start_pos: Tensor | None
) -> Tensor:
    """One cached step: tokens (B, 1) at absolute position input_pos (1,) -> logits (B, V).

    Every shape is fixed (the cache is read whole, under a mask), so this is the function that
    `compile_decode_step` compiles once and replays at every position."""
    return cast(
        Tensor, net(tokens, cache=cache, input_pos=input_pos, seq_start_pos=seq_start_pos)[:, -1]
    )


_COMPILED: dict[str, Callable[..., Tensor]] = {}


def compile_decode_step(mode: str | bool = True, device_type: str = "cpu") -> Callable[..., Tensor]:
    """`_decode_step` compiled with `torch.compile` (made once per mode, then shared).

    mode True: "reduce-overhead" on CUDA (the step is captured in a CUDA graph) and inductor's
    default mode elsewhere; a string is torch.compile's `mode`. Weights stay graph inputs (no
    freezing), so a model trained further in place is seen by the compiled step. Compiling
    happens at the first call for a given network, batch and cache capacity (seconds to minutes);
    later calls replay the compiled step.
    """
    key = f"{mode}:{device_type}"
    if key not in _COMPILED:
        if mode is True:
            mode = "reduce-overhead" if device_type == "cuda" else "default"
        _COMPILED[key] = torch.compile(_decode_step, mode=str(mode), fullgraph=True, dynamic=False)
    return _COMPILED[key]


@dataclass
class Running:
    """How the model is run: with the static key/value cache (`cache_kv`), seeing at most
    `window` tokens (default: its max_seq_len), with the cached step compiled (`compile`, see
    `compile_decode_step`)."""

    cache_kv: bool = True
    window: int | None = None
    compile: bool | str = False


class ModelStepper:
    """Feeds one model the sequence held in `buf` and returns next-token logits (B, V).

    buf: (B, T) token buffer, shared with the loop; prompt_len: P, the prompt is buf[:, :P];
    start_pos: (B,) index of each row's first real token (None: no padding); cache_kv: use the
    running: cache, window and compilation (see `Running`). `prefill()` runs the prompt; `step(cur)` runs after buf[:, cur - 1]
    was written and returns the logits that predict buf[:, cur].

    With the cache a step feeds the net one token per row at an explicit position (`input_pos`):
    no host-side state, no token-range check (the loop wrote the ids itself), static shapes.
    """

    def __init__(
        self,
        net: nn.Module,
        buf: Tensor,
        prompt_len: int,
        start_pos: Tensor | None,
        running: Running,
        name: str = "net",
    ):
        batch, total = buf.shape
        self.net, self.buf, self.prompt_len, self.start_pos = net, buf, prompt_len, start_pos
        window = running.window
        self.window = cast(int, net.max_seq_len) if window is None else window
        self.cache = None
        if start_pos is not None:  # (B, T): True at real tokens, allocated once
            cols = torch.arange(total, device=buf.device)
            self.real = cols[None, :] >= start_pos[:, None]
        compile = running.compile
        self._compiled = bool(compile)
        if running.cache_kv:
            self.cache = self._new_cache(name, batch, total)
        # with the cache the model sees buf[:, offset:]; the prompt is cut to the window
        self.offset = max(0, prompt_len - self.window)
        self.cache_start = None
        if start_pos is not None:
            self.cache_start = (start_pos - self.offset).clamp(min=0)
        self._step_fn: Callable[..., Tensor] = _decode_step
        self._mark_step = False
        if compile and self.cache is not None:
            self._step_fn = compile_decode_step(compile, buf.device.type)
            self._mark_step = buf.device.type == "cuda"
        # eager steps read only the written slots' bucket (KVCache.read_bound); a compiled one
        self._bounded = isinstance(self.cache, KVCache) and not self._compiled  # reads them all
        self._tokens = buf[:, :1].clone()  # (B, 1) the step's input, at a fixed address
        self._input_pos = torch.zeros(1, dtype=torch.long, device=buf.device)

    def _new_cache(self, name: str, batch: int, total: int) -> Any:
        net = self.net
        if not getattr(net, "can_cache_kv", False):
            raise ValueError(
                f"cache_kv=True needs a causal {name} (a Decoder) that supports a key/value "
                "cache; pass cache_kv=False"
            )
        if total > self.window and not net.can_cache_kv_outside_max_seq_len:
            raise ValueError(
                f"prompt length {self.prompt_len} + seq_len {total - self.prompt_len} = {total} "
                f"exceeds the {name}'s max_seq_len={self.window}, and its absolute position "
                "embeddings cannot slide a key/value cache past max_seq_len: pass cache_kv=False "
                "(the window then slides by re-running the last max_seq_len tokens every step), "
                "or use rotary_pos_emb=True"
            )
        capacity = total
        if self._compiled:  # a compiled step is specialised to the capacity: round it up to a
            capacity = -(-total // 64) * 64  # multiple of 64, so most lengths reuse one compile
        return cast(Callable[..., Any], net.new_cache)(batch, min(capacity, self.window))

    def _run(self, lo: int, hi: int, cache: Any) -> Tensor:
        x = self.buf[:, lo:hi]  # (B, n)
        kwargs: dict[str, Any] = {}
        if self.start_pos is not None:
            kwargs["mask"] = self.real[:, lo:hi]
            kwargs["seq_start_pos"] = (self.start_pos - lo).clamp(min=0)
        if cache is not None:
            kwargs["cache"] = cache
        return self.net(x, **kwargs)[:, -1]  # (B, V)

    def prefill(self) -> Tensor:
        return self._run(self.offset, self.prompt_len, self.cache)

    def step(self, cur: int) -> Tensor:
        if self.cache is None:
            return self._run(max(0, cur - self.window), cur, None)
        self._tokens.copy_(self.buf[:, cur - 1 : cur])
        self._input_pos.fill_(cur - 1 - self.offset)
        if self._bounded:
            self.cache.read_slots = self.cache.read_bound(cur - 1 - self.offset)
        if self._mark_step:  # a new CUDA-graph replay: the last step's outputs are consumed
            torch.compiler.cudagraph_mark_step_begin()
        logits = self._step_fn(
            self.net, self._tokens, self.cache, self._input_pos, self.cache_start
        )
        self.cache.length += 1  # the count the host-side path would keep
        return logits

    def reorder(self, index: Tensor) -> None:
        """Rows become old rows `index` (beam search); the caller reorders `buf` itself."""
        if self.cache is not None:
            self.cache.reorder(index)


def _prompt_seen(buf: Tensor, prompt_len: int, start_pos: Tensor | None, vocab: int) -> Tensor:
    """(B, V) bool: which tokens occur among each row's real prompt tokens."""
    prompt = buf[:, :prompt_len]  # (B, P)
    if start_pos is not None:
        cols = torch.arange(prompt_len, device=buf.device)
        prompt = prompt.masked_fill(cols[None, :] < start_pos[:, None], vocab)  # padding -> V
    counts = torch.zeros(buf.shape[0], vocab + 1, dtype=torch.int32, device=buf.device)
    counts.scatter_add_(1, prompt, torch.ones_like(prompt, dtype=torch.int32))
    return counts[:, :vocab] > 0


@dataclass
class Stopping:
    """When a row stops: after `eos_token` or after completing one of `stop_sequences` ((L,) long
    tensors); its later positions hold `pad_value`."""

    eos_token: int | None = None
    stop_sequences: Sequence[Tensor] = ()
    pad_value: int = 0

    @property
    def active(self) -> bool:
        return self.eos_token is not None or len(self.stop_sequences) > 0

    def update(self, done: Tensor, buf: Tensor, cur: int, start_pos: Tensor | None) -> None:
        """Mark in done (B,) the rows that stop with the token just written at buf[:, cur]."""
        if self.eos_token is not None:
            done |= buf[:, cur] == self.eos_token
        for stop in self.stop_sequences:
            first = cur + 1 - stop.shape[0]
            if first < 0:
                continue
            hit = (buf[:, first : cur + 1] == stop).all(dim=-1)  # (B,)
            if start_pos is not None:
                hit &= start_pos <= first  # the match must lie inside the real tokens
            done |= hit


def iter_decode(
    net: nn.Module,
    buf: Tensor,
    prompt_len: int,
    *,
    start_pos: Tensor | None = None,
    options: SamplingOptions | None = None,
    running: Running | None = None,
    stopping: Stopping | None = None,
    amateur: nn.Module | None = None,
) -> Iterator[Tensor]:
    """Fill buf[:, prompt_len:] token by token, yielding each step's tokens (B,).

    buf: (B, P + S) long with the left-aligned prompts in buf[:, :P]. A row stops as `stopping`
    says. The loop ends early once every row has stopped (the rest of buf stays
    `stopping.pad_value`, so the caller should pre-fill buf with it). Arguments are assumed
    validated.
    """
    options = options or SamplingOptions()
    running = running or Running()
    stopping = stopping or Stopping()
    expert = ModelStepper(net, buf, prompt_len, start_pos, running)
    amateur_stepper = None
    if amateur is not None:
        amateur_stepper = ModelStepper(
            amateur, buf, prompt_len, start_pos, running, "amateur_model"
        )
    batch, total = buf.shape
    seq_len = total - prompt_len
    seen = None
    if options.repetition_penalty != 1.0:
        seen = _prompt_seen(buf, prompt_len, start_pos, cast(int, net.num_tokens))
    done = torch.zeros(batch, dtype=torch.bool, device=buf.device)

    logits = expert.prefill()  # (B, V)
    amateur_logits = amateur_stepper.prefill() if amateur_stepper is not None else None
    for i in range(seq_len):
        cur = prompt_len + i
        tokens = select_tokens(logits, options, seen, amateur_logits)  # (B,)
        if stopping.active:
            tokens = tokens.masked_fill(done, stopping.pad_value)
        buf[:, cur] = tokens
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        if stopping.active:
            stopping.update(done, buf, cur, start_pos)
        yield tokens
        if (stopping.active and bool(done.all())) or i + 1 == seq_len:
            return
        logits = expert.step(cur + 1)
        if amateur_stepper is not None:
            amateur_logits = amateur_stepper.step(cur + 1)
