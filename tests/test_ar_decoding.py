"""The autoregressive decoding loop and beam search, on hand-built models with known answers.

The mock backbones here follow the model contract (num_tokens, max_seq_len, new_cache, cache=,
mask=, seq_start_pos=) but compute logits from the previous token only (a bigram table), so every
expected output can be written down or brute-forced.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from demask.decoding.autoregressive import (
    apply_repetition_penalty,
    contrastive_logits,
)
from demask.wrappers.autoregressive import AutoregressiveWrapper

param = pytest.mark.parametrize


class MockCache:
    def __init__(self, batch: int, capacity: int):
        self.batch_size, self.capacity, self.length = batch, capacity, 0
        self.reorders: list[Tensor] = []

    def reorder(self, index: Tensor) -> None:
        self.reorders.append(index)


class BigramNet(nn.Module):
    """logits[b, i] = table[x[b, i]]: the next token depends only on the current one."""

    def __init__(self, table: Tensor, max_seq_len: int = 64):
        super().__init__()
        self.register_buffer("table", table.float())
        self.num_tokens = table.shape[0]
        self.max_seq_len = max_seq_len
        self.can_cache_kv = True
        self.can_cache_kv_outside_max_seq_len = True
        self.widths: list[int] = []  # input width of every call
        self.lin = nn.Linear(1, 1)  # a submodule, to check training flags

    def new_cache(self, batch_size: int, capacity: int | None = None) -> MockCache:
        return MockCache(batch_size, capacity or self.max_seq_len)

    def forward(self, x, mask=None, cache=None, seq_start_pos=None, input_pos=None):  # noqa: ARG002
        assert x.shape[1] <= self.max_seq_len or cache is not None
        assert not self.training, "generation must run in eval mode"
        self.widths.append(x.shape[1])
        if cache is not None and input_pos is None:  # with input_pos the caller keeps the count
            cache.length += x.shape[1]
        return self.table[x]  # (B, N, V)


def cycle_table(vocab: int, step: int = 1, scale: float = 1e4) -> Tensor:
    """One-hot logits: after token t comes (t + step) % vocab."""
    nxt = (torch.arange(vocab) + step) % vocab
    return torch.nn.functional.one_hot(nxt, vocab).float() * scale


def wrap(table: Tensor, **kw) -> AutoregressiveWrapper:
    return AutoregressiveWrapper(BigramNet(table, **kw))


# ----------------------------------------------------------------------------- exact sequences
@param("cache_kv", [True, False])
@param("temperature", [0.0, 1.0])
def test_one_hot_logits_give_that_exact_sequence(cache_kv, temperature):
    model = wrap(cycle_table(7, step=3), max_seq_len=5)  # 12 tokens > max_seq_len: window slides
    prompts = torch.tensor([[0, 1], [4, 2]])
    out = model.generate(prompts, 10, temperature=temperature, cache_kv=cache_kv)
    expected = [
        [0, 1] + [(1 + 3 * i) % 7 for i in range(1, 11)],
        [4, 2] + [(2 + 3 * i) % 7 for i in range(1, 11)],
    ]
    assert out.tolist() == expected


def test_cache_feeds_one_token_per_step_and_no_cache_window_is_bounded():
    net = BigramNet(cycle_table(5), max_seq_len=6)
    model = AutoregressiveWrapper(net)
    model.generate(torch.tensor([[0, 1, 2]]), 9, temperature=0.0)
    assert net.widths == [3] + [1] * 8  # one prefill, then one token per step (9 tokens: 8 steps)
    net.widths.clear()
    model.generate(torch.tensor([[0, 1, 2]]), 9, temperature=0.0, cache_kv=False)
    assert net.widths == [3, 4, 5, 6, 6, 6, 6, 6, 6]  # slides at max_seq_len


def test_eos_rows_are_padded_after_eos_and_generation_stops_when_all_stopped():
    net = BigramNet(cycle_table(8))
    model = AutoregressiveWrapper(net, pad_value=7)
    prompts = torch.tensor([[0], [3], [4]])
    out = model.generate(prompts, 6, temperature=0.0, eos_token=5, return_only_new=True)
    assert out.tolist() == [
        [1, 2, 3, 4, 5, 7],
        [4, 5, 7, 7, 7, 7],
        [5, 7, 7, 7, 7, 7],
    ]
    net.widths.clear()
    out = model.generate(torch.tensor([[3], [4]]), 10, temperature=0.0, eos_token=5)
    assert out.tolist() == [[3, 4, 5] + [7] * 8, [4, 5] + [7] * 9]
    assert len(net.widths) == 2  # prefill + one step: both rows stopped after two tokens


def test_stop_sequences_stop_a_row_after_the_sequence():
    model = wrap(cycle_table(8))
    out = model.generate(
        torch.tensor([[0], [5]]),
        6,
        temperature=0.0,
        stop_sequences=[[2, 3], [7]],
        return_only_new=True,
    )
    assert out.tolist() == [[1, 2, 3, 0, 0, 0], [6, 7, 0, 0, 0, 0]]


def test_stop_sequence_may_start_inside_the_prompt():
    model = wrap(cycle_table(8))
    out = model.generate(torch.tensor([[1]]), 4, temperature=0.0, stop_sequences=[[1, 2, 3]])
    assert out.tolist() == [[1, 2, 3, 0, 0]]


def test_repetition_penalty_exact():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.5, -1.0, -2.0])
    model = wrap(logits.expand(6, 6).clone())
    assert model.generate(torch.tensor([[5]]), 4, temperature=0.0).tolist() == [[5, 0, 0, 0, 0]]
    out = model.generate(torch.tensor([[5]]), 5, temperature=0.0, repetition_penalty=10.0)
    assert out.tolist() == [[5, 0, 1, 2, 3, 0]]  # each used token drops below the next one
    out = model.generate(torch.tensor([[0]]), 2, temperature=0.0, repetition_penalty=10.0)
    assert out.tolist() == [[0, 1, 2]]  # prompt tokens count as seen
    seen = torch.tensor([[True, False, True, False, False, False]])
    got = apply_repetition_penalty(logits[None], seen, 2.0)
    assert got.tolist() == [[1.5, 2.0, 0.5, 0.5, -1.0, -2.0]]


def test_contrastive_decoding_picks_the_best_plausible_ratio():
    p_exp = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p_ama = torch.tensor([0.6, 0.2, 0.199, 0.001])  # token 3 has the largest ratio (50)
    scores = contrastive_logits(p_exp.log()[None], p_ama.log()[None], alpha=0.2)
    ratio = (p_exp / p_ama).log()
    assert torch.isinf(scores[0, 3]) and scores[0, 3] < 0  # 0.05 < 0.2 * 0.5: implausible
    assert torch.allclose(scores[0, :3], ratio[:3].float(), atol=1e-5)
    expert = wrap(p_exp.log().expand(4, 4).clone())
    amateur = BigramNet(p_ama.log().expand(4, 4).clone())
    cd = dict(amateur_model=amateur, contrastive_decode_kwargs={"alpha": 0.2})
    assert expert.generate(torch.tensor([[0]]), 3, temperature=0.0, **cd).tolist() == [[0, 1, 1, 1]]
    assert expert.generate(torch.tensor([[0]]), 3, temperature=0.0).tolist() == [[0, 0, 0, 0]]
    sampled = expert.generate(torch.zeros(200, 1, dtype=torch.long), 2, filter_logits_fn=None, **cd)
    assert not bool((sampled == 3).any())  # never an implausible token


# ----------------------------------------------------------------------------- sampling
def test_sampling_frequencies_follow_softmax_with_temperature_and_top_k():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    model = wrap(logits.expand(5, 5).clone())
    n = 20000
    gen = torch.Generator().manual_seed(1)
    prompts = torch.zeros(n, 1, dtype=torch.long)
    for temp in (0.5, 2.0):
        out = model.generate(prompts, 1, temperature=temp, filter_logits_fn=None, generator=gen)
        freq = torch.bincount(out[:, 1], minlength=5).double() / n
        want = (logits.double() / temp).softmax(-1)
        assert torch.all((freq - want).abs() < 4 * (want * (1 - want) / n).sqrt() + 1e-9)
    out = model.generate(prompts, 1, filter_kwargs={"k": 2}, generator=gen)
    freq = torch.bincount(out[:, 1], minlength=5).double() / n
    want = torch.tensor([math.e / (math.e + 1), 1 / (math.e + 1), 0, 0, 0], dtype=torch.double)
    assert freq[2:].sum() == 0
    assert torch.all((freq - want).abs() < 0.015)


@param(
    "name,kwargs",
    [("top_k", {"k": 3}), ("top_p", {"p": 0.5}), ("min_p", {"p": 0.3}), ("top_a", {"a": 0.5})],
)
def test_every_named_filter_removes_what_it_should(name, kwargs):
    logits = torch.tensor([3.0, 2.5, 1.0, 0.0, -2.0, -3.0])
    from demask.decoding.autoregressive import FILTER_FUNCTIONS

    fn, _ = FILTER_FUNCTIONS[name]
    allowed = torch.isfinite(fn(logits[None], **kwargs))[0]
    model = wrap(logits.expand(6, 6).clone())
    gen = torch.Generator().manual_seed(0)
    out = model.generate(
        torch.zeros(500, 1, dtype=torch.long),
        1,
        filter_logits_fn=name,
        filter_kwargs=kwargs,
        generator=gen,
    )
    used = torch.bincount(out[:, 1], minlength=6) > 0
    assert torch.equal(used, allowed)


def test_fixed_generator_repeats_and_another_seed_differs():
    torch.manual_seed(0)
    model = wrap(torch.randn(11, 11))
    prompts = torch.randint(0, 11, (4, 3))

    def run(seed):
        return model.generate(
            prompts, 20, generator=torch.Generator().manual_seed(seed), filter_logits_fn=None
        )

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_streaming_iterator_and_callback_yield_the_generated_tokens():
    torch.manual_seed(0)
    model = wrap(torch.randn(9, 9) * 3)
    prompts = torch.randint(0, 9, (3, 2))
    kw = dict(temperature=0.0, eos_token=4)
    full = model.generate(prompts, 12, return_only_new=True, **kw)
    streamed = torch.stack(list(model.stream(prompts, 12, **kw)), dim=1)
    assert torch.equal(streamed, full[:, : streamed.shape[1]])
    assert bool((full[:, streamed.shape[1] :] == 0).all())
    got: list[Tensor] = []
    model.generate(prompts, 12, callback=got.append, **kw)
    assert torch.equal(torch.stack(got, dim=1), streamed)
    one = list(model.stream(prompts[0], 5, temperature=0.0))  # a 1-D prompt streams scalars
    assert [int(t) for t in one] == model.generate(prompts[0], 5, temperature=0.0)[2:].tolist()


# ----------------------------------------------------------------------------- prompts and state
def test_prompt_forms_give_the_same_rows():
    model = wrap(cycle_table(6))
    rows = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([0, 5])]
    as_list = model.generate(rows, 4, temperature=0.0)
    assert [r.tolist() for r in as_list] == [
        [1, 2, 3, 4, 5, 0, 1],
        [4, 5, 0, 1, 2],
        [0, 5, 0, 1, 2, 3],
    ]
    padded = torch.tensor([[1, 2, 3], [4, 9, 9], [0, 5, 9]])  # 9 is out of range: never read
    out = model.generate(padded, 4, temperature=0.0, prompt_lens=torch.tensor([3, 1, 2]))
    assert out.tolist() == [[1, 2, 3, 4, 5, 0, 1], [0, 0, 4, 5, 0, 1, 2], [0, 0, 5, 0, 1, 2, 3]]
    assert model.generate(rows[0], 2, temperature=0.0).tolist() == [1, 2, 3, 4, 5]
    new = model.generate(rows, 2, temperature=0.0, return_only_new=True)
    assert [r.tolist() for r in new] == [[4, 5], [5, 0], [0, 1]]


def test_training_state_restored_per_module():
    model = wrap(cycle_table(4))
    model.train()
    model.net.lin.eval()
    model.generate(torch.tensor([[0]]), 3)
    list(model.stream(torch.tensor([[0]]), 3))
    model.beam_search(torch.tensor([[0]]), 3, beams=2)
    assert model.training and model.net.training and not model.net.lin.training


@param(
    "kwargs,match",
    [
        (dict(prompts=torch.zeros(2, 0, dtype=torch.long)), "prompts"),
        (dict(prompts=[torch.tensor([1]), torch.tensor([], dtype=torch.long)]), r"prompts\[1\]"),
        (dict(prompts=torch.tensor([[1, 9]])), "prompts"),
        (dict(prompts=torch.tensor([[1, -1]])), "prompts"),
        (dict(seq_len=0), "seq_len"),
        (dict(seq_len=-3), "seq_len"),
        (dict(temperature=-0.5), "temperature"),
        (dict(filter_logits_fn="top_z"), "filter_logits_fn"),
        (dict(filter_kwargs={"p": 1.5}, filter_logits_fn="top_p"), "top_p"),
        (dict(eos_token=8), "eos_token"),
        (dict(stop_sequences=[[]]), r"stop_sequences\[0\]"),
        (dict(stop_sequences=[[1, 8]]), r"stop_sequences\[0\]"),
        (dict(prompt_lens=torch.tensor([0])), "prompt_lens"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(contrastive_decode_kwargs={"alpha": 2.0}), "alpha"),
    ],
)
def test_bad_generate_arguments_raise_naming_the_argument(kwargs, match):
    model = wrap(cycle_table(8))
    args = dict(prompts=torch.tensor([[1, 2]]), seq_len=3)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        model.generate(args.pop("prompts"), args.pop("seq_len"), **args)


def test_unknown_generate_keyword_and_bad_beams_raise():
    model = wrap(cycle_table(8))
    with pytest.raises(TypeError, match="top_kk"):
        model.generate(torch.tensor([[1]]), 2, top_kk=3)
    with pytest.raises(ValueError, match="beams"):
        model.beam_search(torch.tensor([[1]]), 2, beams=0)


# ----------------------------------------------------------------------------- beam search
def brute_force(table: Tensor, prompt_last: int, seq_len: int, eos: int | None, pad: int):
    """All continuations of length seq_len with their log-probabilities under a bigram table."""
    logp = table.double().log_softmax(-1)
    best: dict[tuple[int, ...], float] = {}
    for seq in itertools.product(range(table.shape[0]), repeat=seq_len):
        score, prev, out, stopped = 0.0, prompt_last, [], False
        for t in seq:
            if stopped:
                out.append(pad)
                continue
            score += float(logp[prev, t])
            out.append(t)
            prev = t
            stopped = eos is not None and t == eos
        best[tuple(out)] = score
    return max(best.items(), key=lambda kv: kv[1])


def test_beam_search_beats_greedy_on_a_hand_built_model():
    # after 0: 1 (0.6) or 2 (0.4); after 1 all four tokens are equally likely (0.25);
    # after 2 comes 3 with 0.9. Greedy takes 0 -> 1 -> * (0.15); the best is 0 -> 2 -> 3 (0.36).
    probs = torch.tensor(
        [[1e-6, 0.6, 0.4, 1e-6], [0.25, 0.25, 0.25, 0.25], [0.05, 0.025, 0.025, 0.9], [0.25] * 4]
    )
    model = wrap(probs.log())
    prompt = torch.tensor([[0]])
    assert model.generate(prompt, 2, temperature=0.0)[0, 1].item() == 1
    seq, score = model.beam_search(prompt, 2, beams=2, return_scores=True)
    assert seq.tolist() == [[0, 2, 3]]
    want_seq, want_score = brute_force(probs.log(), 0, 2, None, 0)
    assert list(want_seq) == [2, 3]
    assert score.item() == pytest.approx(want_score, abs=1e-5)


@param("eos", [None, 2])
@param("cache_kv", [True, False])
def test_exhaustive_beam_search_equals_brute_force(eos, cache_kv):
    torch.manual_seed(5)
    vocab, seq_len = 4, 4
    table = torch.randn(vocab, vocab) * 2
    model = wrap(table)
    for start in range(vocab):
        seq, score = model.beam_search(
            torch.tensor([[start]]),
            seq_len,
            beams=vocab ** (seq_len - 1),
            eos_token=eos,
            cache_kv=cache_kv,
            return_scores=True,
            return_only_new=True,
        )
        want_seq, want_score = brute_force(table, start, seq_len, eos, 0)
        assert seq[0].tolist() == list(want_seq)
        assert score.item() == pytest.approx(want_score, abs=1e-4)


@param("eos", [None, 3])
def test_beam_of_one_is_greedy(eos):
    torch.manual_seed(2)
    model = wrap(torch.randn(7, 7) * 2)
    prompts = torch.randint(0, 7, (5, 2))
    greedy = model.generate(prompts, 8, temperature=0.0, eos_token=eos)
    assert torch.equal(model.beam_search(prompts, 8, beams=1, eos_token=eos), greedy)


def test_beam_search_returns_all_beams_sorted_and_reorders_the_cache():
    torch.manual_seed(3)
    net = BigramNet(torch.randn(5, 5))
    model = AutoregressiveWrapper(net)
    seqs, scores = model.beam_search(
        torch.tensor([[1], [2]]), 3, beams=3, return_all_beams=True, return_scores=True
    )
    assert seqs.shape == (2, 3, 4) and scores.shape == (2, 3)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    logp = net.table.double().log_softmax(-1)
    for b in range(2):
        for k in range(3):
            s = seqs[b, k].tolist()
            ref = sum(float(logp[s[i], s[i + 1]]) for i in range(3))
            assert scores[b, k].item() == pytest.approx(ref, abs=1e-5)
        assert len({tuple(r) for r in seqs[b].tolist()}) == 3  # distinct hypotheses
