"""Every usage example of the seed pages (../shared/seeds), with only the import changed.

The one other change: `.cuda()` is dropped, since CI has no GPU. Each example runs twice: at the
seed's own sizes (slow: dim 512, depth 6, 512 positions) and shrunk (default suite), through the
same code, so the calls and the shapes they promise are checked either way.
"""

from __future__ import annotations

import pytest
import torch

VERBATIM = dict(dim=512, depth=6, heads=8, seq=512, num_tokens=256, batch=16)
SHRUNK = dict(dim=32, depth=1, heads=2, seq=24, num_tokens=256, batch=3)
sizes = pytest.mark.parametrize(
    "s", [SHRUNK, pytest.param(VERBATIM, marks=pytest.mark.slow)], ids=["shrunk", "verbatim"]
)


@sizes
def test_seed_000_nonautoregressive_init(s):
    from demask import Encoder, TransformerWrapper
    from demask.nonautoregressive_wrapper import NonAutoregressiveWrapper

    NUM_TOKENS = s["num_tokens"]
    MASK_ID = NUM_TOKENS

    model = TransformerWrapper(
        num_tokens=NUM_TOKENS + 1,
        max_seq_len=s["seq"],
        attn_layers=Encoder(dim=s["dim"], depth=s["depth"], heads=s["heads"]),
    )

    model = NonAutoregressiveWrapper(
        model, mask_id=MASK_ID, steps=18, schedule="cosine", self_cond=True
    )

    x = torch.randint(0, NUM_TOKENS, (2, s["seq"]))
    losses = model(x)
    assert set(losses._fields) == {"loss", "generator_loss", "critic_loss"}
    assert losses.loss.ndim == 0 and torch.isfinite(losses.loss)
    losses.loss.backward()


@sizes
def test_seed_002_generate(s):
    from demask import Encoder, TransformerWrapper
    from demask.nonautoregressive_wrapper import NonAutoregressiveWrapper

    # Setup model
    net = TransformerWrapper(
        num_tokens=s["num_tokens"],
        max_seq_len=s["seq"],
        attn_layers=Encoder(dim=s["dim"], depth=s["depth"], heads=s["heads"]),
    )
    model = NonAutoregressiveWrapper(net, mask_id=255, steps=18)

    # Batch generation
    generated = model.generate(batch_size=s["batch"], start_temperature=1.0, filter_thres=0.7)
    assert generated.shape == (s["batch"], s["seq"])
    assert not (generated == 255).any()

    # Single sequence generation (batch dimension squeezed)
    single = model.generate()
    assert single.shape == (s["seq"],)

    # Higher temperature and noise scale for more diverse outputs
    generated = model.generate(batch_size=8, start_temperature=2.0, noise_level_scale=1.5)
    assert generated.shape == (8, s["seq"])
    assert model.training  # the training state is restored


def test_seed_002_generate_with_token_critic():
    from demask import Encoder, TransformerWrapper
    from demask.nonautoregressive_wrapper import NonAutoregressiveWrapper

    net = TransformerWrapper(
        num_tokens=17, max_seq_len=16, attn_layers=Encoder(dim=32, depth=1, heads=2)
    )
    critic = TransformerWrapper(
        num_tokens=17, max_seq_len=16, logits_dim=1, attn_layers=Encoder(dim=32, depth=1, heads=2)
    )
    model = NonAutoregressiveWrapper(net, mask_id=16, steps=6, token_critic=critic)
    losses = model(torch.randint(0, 16, (2, 16)))
    assert losses.critic_loss is not None and torch.isfinite(losses.critic_loss)
    generated = model.generate(batch_size=8, start_temperature=2.0, noise_level_scale=1.5)
    assert generated.shape == (8, 16) and not (generated == 16).any()


@sizes
def test_seed_004_autoregressive(s):
    from torch.optim import Adam

    from demask import Decoder, TransformerWrapper
    from demask.autoregressive_wrapper import AutoregressiveWrapper

    seq = 2 * s["seq"]  # the seed's decoder has max_seq_len = 1024
    model = TransformerWrapper(
        num_tokens=256,
        max_seq_len=seq,
        attn_layers=Decoder(dim=s["dim"], depth=s["depth"], heads=s["heads"]),
    )

    model = AutoregressiveWrapper(model)
    assert model.max_seq_len == seq

    optimizer = Adam(model.parameters(), lr=3e-4)
    dataloader = [torch.randint(0, 256, (2, 33)) for _ in range(2)]
    for batch in dataloader:
        tokens = batch  # shape: (batch_size, seq_len)
        loss = model(tokens)  # forward returns scalar loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.ndim == 0

    prompt = torch.tensor([[1, 2, 3]])
    new = 100 if s is VERBATIM else 20
    generated = model.generate(prompt, seq_len=new)  # shape: (1, 103)
    assert generated.shape == (1, 3 + new)
    assert torch.equal(generated[:, :3], prompt)


def test_seed_004_mlm_augmentation():
    from demask import Decoder, TransformerWrapper
    from demask.autoregressive_wrapper import AutoregressiveWrapper

    net = TransformerWrapper(
        num_tokens=256, max_seq_len=64, attn_layers=Decoder(dim=32, depth=1, heads=2)
    )
    model = AutoregressiveWrapper(
        net,
        mask_prob=0.15,  # mask 15% of input tokens during training
    )
    loss = model(torch.randint(0, 256, (2, 33)))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_seed_constructor_defaults_match_the_seed_signatures():
    import inspect

    from demask import AutoregressiveWrapper, NonAutoregressiveWrapper

    nar = inspect.signature(NonAutoregressiveWrapper.__init__).parameters
    expected_nar = dict(
        steps=18,
        self_cond=False,
        self_cond_train_prob=0.75,
        no_replace_prob=0.15,
        random_token_prob=0.1,
        schedule="linear",
        can_mask_prev_unmasked=False,
        token_critic=None,
        self_token_critic=False,
        critic_loss_weight=1.0,
        use_simple_mdlm_loss_weight=True,
    )
    for name, default in expected_nar.items():
        assert nar[name].default == default, name
    assert nar["mask_id"].kind is inspect.Parameter.KEYWORD_ONLY
    gen = inspect.signature(NonAutoregressiveWrapper.generate).parameters
    for name, default in dict(
        batch_size=None, start_temperature=1.0, filter_thres=0.7, noise_level_scale=1.0
    ).items():
        assert gen[name].default == default, name
    ar = inspect.signature(AutoregressiveWrapper.__init__).parameters
    for name, default in dict(
        ignore_index=-100,
        pad_value=0,
        mask_prob=0.0,
        add_attn_z_loss=False,
        next_embed_loss_weight=0.1,
    ).items():
        assert ar[name].default == default, name
