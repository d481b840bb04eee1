"""Conditions and classifier-free guidance for masked models: the class-token dataset, condition
positions in training (never masked, dropped with cond_drop_prob), the NELBO of the rest given
the condition, and guided generation (w = 0 is unconditional sampling, exactly)."""

import pytest
import torch
from torch import nn

from demask import Encoder, NonAutoregressiveWrapper, TransformerWrapper
from demask.data import digits_labels, get_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

V, N, MASK = 6, 8, 6  # vocabulary 6 (ids 0..5), length 8, mask id 6


class Recorder(nn.Module):
    """A TransformerWrapper that remembers the token inputs of its forward calls."""

    def __init__(self, net: TransformerWrapper):
        super().__init__()
        self.inner = net
        self.num_tokens, self.max_seq_len, self.emb_dim = (
            net.num_tokens,
            net.max_seq_len,
            net.emb_dim,
        )
        self.attn_layers = net.attn_layers
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, **kw):
        self.inputs.append(x.clone())
        return self.inner(x, **kw)

    def logits_from_embeddings(self, emb):
        return self.inner.logits_from_embeddings(emb)


def wrapper(record=False, **kw):
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=V + 1, max_seq_len=N,
                             attn_layers=Encoder(dim=16, depth=1, heads=2))  # fmt: skip
    if record:
        net = Recorder(net)
    kw = dict(no_replace_prob=0.0, random_token_prob=0.0) | kw
    return NonAutoregressiveWrapper(net, mask_id=MASK, **kw)


def batch(b=512):
    return torch.randint(0, V, (b, N), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("estimator", ["count", "time"])
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_condition_is_never_masked_and_dropped_at_its_rate(drop, estimator):
    w = wrapper(record=True, cond_prefix_len=2, cond_drop_prob=drop)
    w.mdlm_estimator = estimator
    x = batch()
    torch.manual_seed(5)
    w(x)
    (inp,) = w.net.inputs
    dropped = (inp[:, :2] == MASK).all(-1)  # (B,) both condition tokens masked together
    kept = (inp[:, :2] == x[:, :2]).all(-1)
    assert bool((dropped | kept).all())  # a condition is shown whole or dropped whole
    assert abs(float(dropped.float().mean()) - drop) < 0.06
    if drop == 0:
        assert not bool(dropped.any())
    if estimator == "count":  # every row masks 1..6 of the other tokens
        assert bool((inp[:, 2:] == MASK).any(-1).all())


def test_nelbo_with_a_condition_counts_only_the_other_tokens():
    w = wrapper(cond_prefix_len=2).eval()
    x = batch(16)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with_prefix = w.nelbo(x, num_times=8, generator=g())
    explicit = torch.zeros(N, dtype=torch.bool)
    explicit[:2] = True
    w.cond_prefix_len = 0
    same = w.nelbo(x, num_times=8, generator=g(), condition=explicit)
    assert torch.allclose(with_prefix, same)
    everything = w.nelbo(x, num_times=8, generator=g())
    assert not torch.allclose(with_prefix, everything)


def test_guidance_zero_is_exactly_unconditional_sampling():
    w = wrapper(cond_prefix_len=1, cond_drop_prob=0.2).eval()
    cond = torch.full((4, N), MASK)
    cond[:, 0] = torch.tensor([0, 1, 2, 3])
    uncond = torch.full((4, N), MASK)
    kw = dict(sampler="ancestral", steps=N, filter_thres=0.0, anneal_temperature=False)
    guided = w.generate(
        prompt=cond, guidance_scale=0.0, generator=torch.Generator().manual_seed(7), **kw
    )
    plain = w.generate(prompt=uncond, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(guided[:, 1:], plain[:, 1:])
    assert torch.equal(guided[:, 0], cond[:, 0])  # the given condition is kept
    assert bool((plain[:, 0] == MASK).all())  # a dropped condition stays dropped
    assert not bool((plain[:, 1:] == MASK).any())


def test_guidance_mixes_the_two_predictions_and_validates():
    from demask.denoiser import Denoiser, Guidance
    from demask.samplers import MaskedState

    w = wrapper(cond_prefix_len=1).eval()
    seq = torch.full((3, N), MASK)
    seq[:, 0] = torch.tensor([0, 2, 4])
    rows, cols = (seq != MASK).logical_not().nonzero(as_tuple=True)
    drop = torch.zeros(3, N, dtype=torch.bool)
    drop[:, 0] = True
    with torch.no_grad():
        c = w.net(seq)[rows, cols].float()
        u = w.net(seq.masked_fill(drop, MASK))[rows, cols].float()
        for scale in (0.0, 1.0, 3.0):
            model = Denoiser(w.net, guidance=Guidance(scale, drop))
            got = model.logits(MaskedState(seq, seq == MASK, MASK), seq == MASK).values
            torch.testing.assert_close(got, u + scale * (c - u))
    assert not torch.allclose(c, u)  # the class token does change the prediction
    cond = torch.full((8, N), MASK)
    cond[:, 0] = 2
    with pytest.raises(ValueError, match="guidance_scale"):
        w.generate(batch_size=2, guidance_scale=2.0)  # no condition to guide by
    with pytest.raises(ValueError, match="guidance_scale"):
        w.generate(prompt=cond, guidance_scale=-1.0)


def test_constructor_checks_condition_arguments():
    with pytest.raises(ValueError, match="cond_drop_prob"):
        wrapper(cond_drop_prob=1.5)
    with pytest.raises(ValueError, match="cond_prefix_len"):
        wrapper(cond_prefix_len=N)
    w = wrapper()
    with pytest.raises(ValueError, match="condition"):
        w(batch(4), condition=torch.ones(N + 1, dtype=torch.bool))


def test_predicting_the_dropped_condition_is_the_joint_loss_for_dropped_rows(monkeypatch):
    """predict_dropped_cond with every row dropped trains exactly the model without a
    condition: the class positions are masked at the row's rate and scored like the rest (plus
    the condition's own term, tested below, left out here)."""
    from demask.objectives import masked

    monkeypatch.setattr(masked, "condition_prior_loss", lambda x, *_: x.new_zeros(()))
    x = batch(64)
    joint = wrapper(cond_prefix_len=2, cond_drop_prob=1.0, predict_dropped_cond=True)
    plain = wrapper()  # the same net (seeded), no condition at all
    torch.manual_seed(3)
    got = joint(x).loss
    torch.manual_seed(3)
    torch.rand(64)  # the drop draw, which the plain wrapper does not make
    assert torch.equal(got, plain(x).loss)
    # without dropout the condition is given and unscored, as without predict_dropped_cond
    kept = wrapper(cond_prefix_len=2, cond_drop_prob=1e-9, predict_dropped_cond=True)
    hidden = wrapper(cond_prefix_len=2, cond_drop_prob=1e-9)
    torch.manual_seed(3)
    a = kept(x).loss
    torch.manual_seed(3)
    torch.rand(64)
    assert torch.equal(a, hidden(x).loss)


def test_the_condition_term_is_its_cross_entropy_with_the_rest_hidden():
    """condition_prior_loss: each row's condition, an exact count of its tokens masked, every
    other token masked; the mean over rows of the row's mean CE times the condition's share of
    the row, equal to a row-by-row computation, with one network row per distinct input (one for
    a one-token class)."""
    from demask.objectives.masked import condition_prior_loss, count_masks

    w = wrapper(record=True, cond_prefix_len=1, cond_drop_prob=0.5, predict_dropped_cond=True)
    x = batch(64)

    def predict(inp, mask):
        return w._masked_ce(x, inp, mask, False)

    got = condition_prior_loss(x, w._condition(None, 64, N, "cpu"), predict, MASK)
    assert w.net.inputs[-1].tolist() == [[MASK] * N]  # one row: the fully masked canvas
    with torch.no_grad():
        logits = w.net(torch.full((1, N), MASK))[0, 0]  # the class slot there
    by_hand = torch.nn.functional.cross_entropy(logits.expand(64, -1), x[:, 0]) / N
    assert torch.allclose(got, by_hand, atol=1e-6)
    got.backward()  # and it trains the net
    assert w.net.inner.token_emb.weight.grad[MASK].abs().sum() > 0
    # a condition of 1 to 3 tokens per row: counts drawn, the rest of the condition visible
    cond = torch.arange(N) < torch.randint(
        1, 4, (64, 1), generator=torch.Generator().manual_seed(2)
    )
    x = torch.randint(0, 2, (64, N), generator=torch.Generator().manual_seed(4))  # few inputs
    torch.manual_seed(7)
    got = condition_prior_loss(x, cond, predict, MASK)
    rows_run = len(w.net.inputs[-1])
    torch.manual_seed(7)
    cmask, counts, _ = count_masks(cond)
    inp = torch.where(cond & ~cmask, x, MASK)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(w.net(inp).transpose(1, 2), x, reduction="none")
    by_hand = ((ce * cmask).sum(-1) / counts * cond.sum(-1) / N).mean()
    assert torch.allclose(got, by_hand, atol=1e-6)
    assert bool((counts >= 1).all() and (counts <= cond.sum(-1)).all())
    assert rows_run == len(torch.unique(torch.cat([inp, cmask], 1), dim=0)) < 64


def test_the_condition_term_teaches_the_prior_that_generation_draws_from():
    """A class prior of (0.7, 0.2, 0.1), dropped from only 10% of the rows: the classes a model
    draws with nothing given follow it, since the condition's term scores the class on the
    fully masked canvas in every batch."""
    classes = torch.tensor([V - 3, V - 2, V - 1])  # the class tokens 3, 4, 5; pixels 0-2
    gen = torch.Generator().manual_seed(0)
    w = wrapper(cond_prefix_len=1, cond_drop_prob=0.1, predict_dropped_cond=True)
    opt = torch.optim.Adam(w.parameters(), lr=1e-2)
    for _ in range(60):
        label = torch.multinomial(torch.tensor([0.7, 0.2, 0.1]), 64, True, generator=gen)
        pixels = (label[:, None] + torch.arange(N - 1)) % 3  # each class its own pattern
        loss = w(torch.cat([classes[label][:, None], pixels], 1)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = torch.softmax(w.eval().net(torch.full((1, N), MASK))[0, 0, classes], -1)
    assert torch.allclose(p, torch.tensor([0.7, 0.2, 0.1]), atol=0.045), p  # without: 0.064 off


def test_predicted_condition_is_seen_masked_and_in_the_loss():
    w = wrapper(record=True, cond_prefix_len=1, cond_drop_prob=0.5, predict_dropped_cond=True)
    x = batch()
    torch.manual_seed(5)
    w(x)
    inp, prior = w.net.inputs  # the batch, then the condition's term: one fully masked row
    assert prior.tolist() == [[MASK] * N]
    masked_class = inp[:, 0] == MASK
    # dropped rows mask the class at their own rate (about half of them, as the pixels'
    # counts say), kept rows never: so about a quarter of the rows, not a half
    assert 0.15 < float(masked_class.float().mean()) < 0.35
    rate = (inp[:, 1:] == MASK).float().mean(-1)
    assert float(rate[masked_class].mean()) > float(rate[~masked_class].mean())


def test_a_model_that_predicts_its_condition_draws_one_when_none_is_given():
    from demask.data.tokenizers import GreyLevelTokenizer

    # vocabulary: 4 "pixels" (0-3), 2 classes (4, 5), mask 6; the class slot is position 0
    tok = GreyLevelTokenizer(levels=4, image_shape=(1, N - 1), num_classes=2)
    allowed = tok.allowed_tokens(V + 1)  # (N, 7)
    assert allowed[0].tolist() == [False] * 4 + [True, True, False]
    assert bool((allowed[1:, :4]).all()) and not bool(allowed[1:, 4:].any())
    kw = dict(sampler="ancestral", steps=N, filter_thres=0.0, anneal_temperature=False)
    start = torch.full((64, N), MASK)
    for predict in (False, True):
        w = wrapper(cond_prefix_len=1, cond_drop_prob=0.2, predict_dropped_cond=predict).eval()
        out = w.generate(prompt=start, allowed_tokens=allowed,
                         generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
        assert bool((out[:, 1:] < 4).all())  # pixels only at the pixels
        if predict:  # the class slot is drawn, from the classes only
            assert bool(((out[:, 0] == 4) | (out[:, 0] == 5)).all())
        else:  # a dropped condition stays dropped
            assert bool((out[:, 0] == MASK).all())
    with pytest.raises(ValueError, match="predict_dropped_cond=True needs condition dropout"):
        wrapper(predict_dropped_cond=True)  # nothing to drop
    with pytest.raises(ValueError, match="cond_drop_prob > 0"):
        wrapper(cond_prefix_len=1, predict_dropped_cond=True)


def test_a_dropped_condition_is_drawn_first_then_given():
    """Sampling without a class from a model that predicts it is p(class) p(rest | class): the
    class is drawn in a pass of its own from the fully masked canvas, from the model's own
    distribution there (temperature 1, whatever the pixels' temperature), then the rest is
    decoded exactly as if that class had been given (and can be guided by it); the pass's
    network call is counted in the stats, not in the history."""
    w = wrapper(cond_prefix_len=1, cond_drop_prob=0.5, predict_dropped_cond=True).eval()
    with torch.no_grad():
        for p in w.parameters():  # a net whose predictions differ from position to position
            p.add_(0.3 * torch.randn_like(p, generator=torch.Generator().manual_seed(3)))
    allowed = torch.ones(N, V + 1, dtype=torch.bool)
    allowed[:, MASK] = False
    greedy = dict(start_temperature=0.0, filter_thres=0.0, steps=N - 1, allowed_tokens=allowed)
    start = torch.full((4000, N), MASK)
    gen = torch.Generator().manual_seed(0)
    out, history, stats = w.generate(prompt=start, return_history=True, return_stats=True,
                                     generator=gen, **greedy)  # fmt: skip
    with torch.no_grad():  # the class slot's distribution on the fully masked canvas
        p = torch.softmax(w.net(start[:1])[0, 0, :V].double(), -1)
    freq = torch.bincount(out[:, 0], minlength=V).double() / len(out)
    assert float((freq - p).abs().max()) < 4 * float((p * (1 - p) / len(out)).sqrt().max())
    assert float(p.max()) > 0.3  # far from uniform: the check above can tell
    given = start.clone()
    given[:, 0] = out[:, 0]
    by_hand, given_stats = w.generate(prompt=given, return_stats=True, **greedy)
    assert torch.equal(out, by_hand)
    assert history.shape == (N - 1, 4000, N)
    assert torch.equal(history[:, :, 0], out[:, 0].expand(N - 1, -1))
    assert stats.evaluations == given_stats.evaluations + 1
    assert stats.filled == given_stats.filled + 4000
    # guided by the drawn class: w = 1 is the conditional prediction itself
    guided = w.generate(prompt=start, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                        **greedy)  # fmt: skip
    assert torch.equal(guided, out)
    # a bad scale is refused by name before any network call, the condition's pass included
    rec = wrapper(record=True, cond_prefix_len=1, cond_drop_prob=0.5, predict_dropped_cond=True)
    with pytest.raises(ValueError, match="guidance_scale must be in"):
        rec.eval().generate(prompt=start[:2], guidance_scale=-1.0)
    assert rec.net.inputs == []


@pytest.mark.parametrize(
    "allowed, match",
    [
        (torch.ones(V + 1), "bool tensor, got torch.float32"),
        (
            torch.ones(2, 2, 2, dtype=torch.bool),
            r"bool tensor, got torch.bool of shape \(2, 2, 2\)",
        ),
        (torch.ones(V, dtype=torch.bool), r"shape \(7,\) or \(8, 7\)"),
        (torch.ones(N - 1, V + 1, dtype=torch.bool), r"got \(7, 7\)"),
        (torch.arange(V + 1) == MASK, "no token to draw but mask_id"),
    ],
)
def test_allowed_tokens_are_checked(allowed, match):
    w = wrapper().eval()
    with pytest.raises(ValueError, match=match):
        w.generate(batch_size=2, allowed_tokens=allowed)


def test_allowed_tokens_of_one_row_apply_everywhere():
    w = wrapper().eval()
    allowed = torch.zeros(V + 1, dtype=torch.bool)
    allowed[[1, 3]] = True
    out = w.generate(batch_size=32, allowed_tokens=allowed, filter_thres=0.0)
    assert set(out.unique().tolist()) == {1, 3}


def test_labelled_digits_put_the_class_token_first():
    ds = get_dataset("digits-labelled", "val")
    plain = get_dataset("digits", "val")
    tok = ds.tokenizer
    assert (ds.seq_len, tok.vocab_size, ds.condition_len) == (65, 27, 1)
    labels = torch.as_tensor(digits_labels("val"))
    rows = torch.stack([ds[i] for i in range(len(ds))])
    assert torch.equal(rows[:, 0], 17 + labels)
    assert torch.equal(rows[:, 1:], torch.stack([plain[i] for i in range(len(plain))]))
    assert (tok.decode(rows[:3]) == plain.tokenizer.decode(rows[:3, 1:])).all()
    assert tok.class_token(7) == 24


# ------------------------------------------------------------------------------------ CLI


def test_cli_trains_a_conditional_model_and_samples_a_class(tmp_path, capsys):
    import json

    from demask.checkpoint import load_checkpoint
    from demask.cli import main

    run = tmp_path / "cond"
    tiny = ["--dim", "16", "--depth", "1", "--heads", "2", "--batch-size", "8", "--quiet"]
    argv = ["train", "--data", "digits", "--conditional", "--steps", "2", "--out", str(run)]
    assert main([*argv, "--cond-drop-prob", "0.25", *tiny]) == 0
    cfg = load_checkpoint(run).model_config
    assert (cfg.cond_prefix_len, cfg.cond_drop_prob, cfg.seq_len, cfg.num_tokens) == (
        1,
        0.25,
        65,
        27,
    )
    out = tmp_path / "samples"
    argv = ["sample", "--checkpoint", str(run), "--num", "4", "--steps", "8", "--out", str(out)]
    assert main([*argv, "--class", "7", "--guidance", "2"]) == 0
    assert (out / "samples.png").is_file() and (out / "demasking.png").is_file()
    code = main(["eval", "--checkpoint", str(run), "--num", "4", "--steps", "8", "--class", "3",
                 "--json", str(tmp_path / "e.json"), "--max-batches", "1"])  # fmt: skip
    assert code == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["sampling"]["class_label"] == 3 and 0 <= res["quality"]["class_accuracy"] <= 1
    capsys.readouterr()
    # errors name the option: a class out of range, guidance without a class, a plain model
    assert main([*argv, "--class", "10"]) == 2
    assert "--class" in capsys.readouterr().err
    assert main([*argv, "--guidance", "2"]) == 2
    assert "--guidance" in capsys.readouterr().err
    assert (
        main(["train", "--data", "python-stdlib", "--conditional", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "--conditional" in capsys.readouterr().err


def test_cli_trains_a_model_that_predicts_its_class_and_draws_one(tmp_path, capsys):
    import json

    from demask.checkpoint import load_checkpoint
    from demask.cli import main

    run = tmp_path / "joint"
    tiny = ["--dim", "16", "--depth", "1", "--heads", "2", "--batch-size", "8", "--quiet"]
    argv = ["train", "--data", "digits", "--conditional", "--train-steps", "2", "--out", str(run)]
    assert main([*argv, "--cond-drop-prob", "0.5", "--predict-dropped-cond", *tiny]) == 0
    cfg = load_checkpoint(run).model_config
    assert (cfg.cond_drop_prob, cfg.predict_dropped_cond) == (0.5, True)
    # without --class the model draws the class slot itself; the pixels stay grey levels
    code = main(["eval", "--checkpoint", str(run), "--num", "6", "--decode-steps", "8",
                 "--json", str(tmp_path / "e.json"), "--max-batches", "1"])  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "e.json").read_text())["quality"]["num_images"] == 6
    # and guidance needs no --class: the class it draws first guides the pixels
    out = tmp_path / "guided"
    argv = ["sample", "--checkpoint", str(run), "--num", "4", "--decode-steps", "8"]
    assert main([*argv, "--guidance", "2", "--out", str(out)]) == 0
    assert (out / "samples.png").is_file()
    capsys.readouterr()
    bare = ["train", "--data", "digits", "--predict-dropped-cond", "--out", str(tmp_path / "x")]
    assert main(bare) == 2
    assert "--predict-dropped-cond applies to --conditional" in capsys.readouterr().err


def test_one_sampler_checks_its_allowed_tokens_again_on_another_canvas():
    from demask.samplers import MaskedSampler, get_rule

    w = wrapper().eval()
    allowed = torch.ones(N, V + 1, dtype=torch.bool)
    sampler = MaskedSampler(get_rule("confidence"), allowed_tokens=allowed)
    assert w.generate(batch_size=2, sampler=sampler).shape == (2, N)  # checked once, then reused
    with pytest.raises(ValueError, match=r"got \(8, 7\)"):  # a shorter canvas: checked anew
        w.generate(batch_size=2, seq_len=N - 1, sampler=sampler)
