"""The optimisers (`demask.optim`): Muon's orthogonalised step against a hand computation and
against torch's own Muon, its AdamW part against torch's AdamW exactly, which parameters each part
takes, the configuration's checks, and a tiny model that learns with it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from demask import Encoder, NonAutoregressiveWrapper, TransformerWrapper
from demask.config import ModelConfig, TrainConfig, build_model
from demask.data import shift_chain, shift_chain_entropy_rate
from demask.optim import OPTIMIZERS, Muon, build_optimizer, orthogonalize, param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**over):
    kw = dict(kind="masked", num_tokens=12, max_seq_len=16, dim=32, depth=2, heads=2)
    return build_model(ModelConfig(**{**kw, **over}))


@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (16, 16)])
def test_orthogonalize_keeps_the_singular_vectors_and_evens_the_values(shape):
    g = torch.Generator().manual_seed(0)
    # singular values from 1e-3 to 10: a badly conditioned gradient
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    s = torch.logspace(-3, 1, k, dtype=torch.float64)
    x = (u[:, :k] * s) @ v[:, :k].T
    out = orthogonalize(x.float()).double()
    assert out.shape == x.shape and orthogonalize(x.float()).dtype == torch.float32
    inner = u[:, :k].T @ out @ v[:, :k]  # U^T O V: diagonal when O shares x's singular vectors
    diag = inner.diagonal()
    assert (inner - torch.diag(diag)).abs().max() < 1e-4
    top = diag[s > 0.05]  # the quintic's fixed band for all but the tiniest values
    assert top.min() > 0.6 and top.max() < 1.25, top
    assert diag[0] > 0.0  # even a 1e-4-relative direction moves, in its own sign


def test_orthogonalize_rejects_non_matrices():
    with pytest.raises(ValueError, match=r"g must be a 2-D matrix, got shape \(3, 2, 2\)"):
        orthogonalize(torch.ones(3, 2, 2))


def test_one_muon_step_is_the_hand_computation():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 4))
    w0 = w.detach().clone()
    opt = Muon([{"params": [w], "muon": True}], lr=0.1, weight_decay=0.5, momentum=0.9)
    grads = [torch.randn(6, 4) for _ in range(2)]
    buf = torch.zeros(6, 4)
    want = w0.clone()
    for grad in grads:
        w.grad = grad.clone()
        opt.step()
        buf = 0.9 * buf + grad
        want = want * (1 - 0.1 * 0.5) - 0.1 * 0.2 * math.sqrt(6) * orthogonalize(grad + 0.9 * buf)
    torch.testing.assert_close(w.detach(), want)


def test_muon_agrees_with_torchs_muon():
    """torch.optim.Muon (bfloat16 iteration, the same scaling with adjust_lr_fn='match_rms_adamw')
    takes a step within bfloat16's rounding of ours."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(32, 16))
    b = nn.Parameter(a.detach().clone())
    ours = Muon([{"params": [a], "muon": True}], lr=0.05, weight_decay=0.1)
    theirs = torch.optim.Muon([b], lr=0.05, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    start = a.detach().clone()
    for _ in range(3):
        grad = torch.randn(32, 16)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    step_ours, step_theirs = a.detach() - start, b.detach() - start
    rel = (step_ours - step_theirs).norm() / step_ours.norm()
    assert rel < 0.03, rel


def test_the_adamw_groups_are_torchs_adamw_exactly():
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    ref = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    ours = Muon([{"params": list(b.parameters())}], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    for _ in range(4):
        x = torch.randn(7, 5)
        for net, opt in ((a, ref), (b, ours)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = _tiny()
    muon, decay, rest = param_groups(model, 0.1, muon=True)
    assert muon["muon"] and muon["weight_decay"] == 0.1 and decay["weight_decay"] == 0.1
    assert rest["weight_decay"] == 0.0 and "muon" not in decay and "muon" not in rest
    names = {id(p): n for n, p in model.named_parameters()}
    got = sorted(names[id(p)] for p in muon["params"])
    want = sorted(
        f"net.attn_layers.blocks.{i}.{w}.weight"
        for i in range(2)
        for w in ("attn.to_qkv", "attn.to_out", "ff.proj_in", "ff.proj_out")
    )
    assert got == want  # depth 2 x 4 matrices: exactly the blocks' Linear weights
    # embeddings stay out of both decaying groups; each parameter is in exactly one group
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    assert emb and not emb & {id(p) for p in muon["params"] + decay["params"]}
    ids = [id(p) for g in (muon, decay, rest) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    # without muon, the same split as AdamW has always had: the blocks' matrices decay
    plain_decay, _ = param_groups(model, 0.1)
    assert {id(p) for p in muon["params"]} < {id(p) for p in plain_decay["params"]}


def test_build_optimizer_names_and_checks():
    model = _tiny()
    assert sorted(OPTIMIZERS) == ["adamw", "muon"]
    assert isinstance(build_optimizer("adamw", model, lr=1e-3, weight_decay=0.1), torch.optim.AdamW)
    opt = build_optimizer("muon", model, lr=1e-3, weight_decay=0.1, momentum=0.9, rms=0.5)
    assert isinstance(opt, Muon) and opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["rms"] == 0.5
    with pytest.raises(
        ValueError, match=r"optimizer must be one of \['adamw', 'muon'\], got 'sgd'"
    ):
        build_optimizer("sgd", model, lr=1e-3, weight_decay=0.1)
    with pytest.raises(
        ValueError, match=r"Muon groups take 2-D weights only, got shapes \[\(4,\)\]"
    ):
        Muon([{"params": [nn.Parameter(torch.ones(4))], "muon": True}])
    with pytest.raises(ValueError, match="momentum must be in"):
        Muon([{"params": [nn.Parameter(torch.ones(2, 2))]}], momentum=1.0)
    with pytest.raises(ValueError, match="rms must be > 0, got -1"):
        Muon([{"params": [nn.Parameter(torch.ones(2, 2))]}], rms=-1)


def test_train_config_checks_the_optimizer():
    assert (
        TrainConfig().optimizer == "adamw" and TrainConfig(optimizer="muon").muon_momentum == 0.95
    )
    with pytest.raises(
        ValueError, match=r"optimizer must be one of \['adamw', 'muon'\], got 'lion'"
    ):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="optimizer='muon' needs whole weight matrices"):
        TrainConfig(optimizer="muon", fsdp=True)
    with pytest.raises(ValueError, match="muon_momentum"):
        TrainConfig(muon_momentum=1.5)
    with pytest.raises(ValueError, match="muon_rms"):
        TrainConfig(muon_rms=0.0)
    # one place for each default: the config's are Muon's own
    assert (TrainConfig().muon_momentum, TrainConfig().muon_rms) == (0.95, 0.2)


def test_a_tiny_masked_model_learns_a_chain_with_muon():
    """The shift chain (each symbol a fixed map of the previous one, or a uniform jump): with
    Muon, 150 steps take the NELBO more than half way from the context-free 3 bits to the
    chain's entropy per symbol, and never below it (the NELBO is a bound)."""
    vocab, length = 8, 16
    torch.manual_seed(0)
    net = TransformerWrapper(
        num_tokens=vocab + 1, max_seq_len=length,
        attn_layers=Encoder(dim=32, depth=2, heads=2, rotary_pos_emb=True),
    )  # fmt: skip
    w = NonAutoregressiveWrapper(net, mask_id=vocab, no_replace_prob=0.0, random_token_prob=0.0)
    opt = build_optimizer("muon", w, lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        loss = w(shift_chain(32, length, g, vocab)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    val = shift_chain(256, length, torch.Generator().manual_seed(2), vocab)
    bits = float(w.nelbo(val, num_times=8, generator=torch.Generator().manual_seed(0)).mean())
    uniform = math.log2(vocab)
    entropy = (uniform + (length - 1) * shift_chain_entropy_rate(vocab)) / length  # H(X) / L
    print(f"muon chain NELBO {bits:.3f}, entropy {entropy:.3f}, uniform {uniform:.3f}")
    assert entropy - 0.05 < bits < entropy + 0.5 * (uniform - entropy), (bits, entropy, uniform)
