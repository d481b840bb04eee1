"""The model contract (both kinds answer the same methods) and the configuration taken from the
constructors: defaults, checks, the format-1 migration and the generated command-line options."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _train_worker import SEQ_LEN, tiny_model, tiny_train

from demask import AutoregressiveWrapper, Encoder, NonAutoregressiveWrapper, TransformerWrapper
from demask.config import (
    CONFIG_FORMAT_VERSION,
    CONSTRUCTORS,
    ModelConfig,
    TrainConfig,
    build_model,
    configs_from_json,
    configs_to_json,
)
from demask.evaluate import likelihood_bits_per_token, likelihood_sums
from demask.model.attention_layers import AttentionLayers
from demask.model.layers import Attention, FeedForward, Norm
from demask.wrappers.contract import SampleOptions

param = pytest.mark.parametrize
pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[1] / "src/demask"

# ModelConfig fields that no constructor names (or that mean a little more than its parameter)
CONFIG_ONLY = {"kind", "num_tokens", "max_seq_len", "dim", "depth", "mask_id", "token_critic"}
# constructor parameters that are deliberately not configurable, and why
NOT_CONFIGURABLE = {
    "self", "kwargs", "net", "attn_layers",  # built from the config
    "logits_dim",  # the token critic's (1); a model's output is its vocabulary
    "cross_attend",  # needs a context at every call: not a model the CLI can train
    "attn_flash",  # accepted for compatibility, has no effect
}  # fmt: skip


# ------------------------------------------------------------------------- defaults, one place


def test_every_config_default_is_the_constructors_default():
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    checked = set()
    for constructor in CONSTRUCTORS:
        for name, p in inspect.signature(constructor).parameters.items():
            if name in NOT_CONFIGURABLE:
                continue
            assert name in fields, f"{constructor.__qualname__}({name}=...) has no config field"
            if name in CONFIG_ONLY:
                continue
            assert fields[name].default == p.default, name
            assert type(fields[name].default) is type(p.default), name
            checked.add(name)
    assert set(fields) == checked | CONFIG_ONLY  # nothing else restates a default
    assert len(checked) >= 30
    # the head width of the seed: one dim / heads builds one model, however it is reached
    assert ModelConfig().attn_dim_head == 64
    assert inspect.signature(Encoder).parameters["attn_dim_head"].default == 64
    # the token critic is a module in the seed; the config builds one (False <-> None)
    assert inspect.signature(NonAutoregressiveWrapper).parameters["token_critic"].default is None
    assert fields["token_critic"].default is False


def test_a_config_and_the_seed_api_build_the_same_model():
    cfg = ModelConfig(kind="masked", num_tokens=9, max_seq_len=8, dim=32, depth=2, heads=4)
    torch.manual_seed(0)
    built = build_model(cfg)
    torch.manual_seed(0)
    net = TransformerWrapper(
        num_tokens=10, max_seq_len=8, attn_layers=Encoder(dim=32, depth=2, heads=4)
    )
    seed = NonAutoregressiveWrapper(net, mask_id=9)
    a, b = built.state_dict(), seed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert built.net.attn_layers.dim_head == 64


def test_checks_are_the_constructors():
    with pytest.raises(ValueError, match="attn_kv_heads must divide heads=8, got 3"):
        ModelConfig(attn_kv_heads=3)
    with pytest.raises(ValueError, match="rotary_emb_dim must be <= 64"):
        ModelConfig(rotary_pos_emb=True, rotary_emb_dim=128)
    with pytest.raises(ValueError, match="cond_prefix_len must be <= 63, got 64"):
        ModelConfig(cond_prefix_len=64)
    with pytest.raises(TypeError, match="use_rmsnorm must be a bool, got int 1"):
        ModelConfig(use_rmsnorm=1)
    with pytest.raises(TypeError, match="attn_kv_heads must be an int or None, got str"):
        ModelConfig(attn_kv_heads="2")


def test_every_option_reaches_the_built_model():
    cfg = ModelConfig(
        kind="masked", num_tokens=9, max_seq_len=8, dim=16, depth=1, heads=4, attn_dim_head=8,
        attn_kv_heads=2, attn_qk_norm=True, ff_glu=True, ff_swish=True, use_rmsnorm=True,
        rotary_pos_emb=True, rotary_emb_dim=4, emb_dim=8, post_emb_norm=True,
        self_token_critic=True, critic_loss_weight=0.5, steps=5, schedule="cosine",
        zero_init_branch_output=True, input_skip=True, rel_pos_attn_bias=True,
        use_simple_mdlm_loss_weight=False, train_masking="bell",
    )  # fmt: skip
    model = build_model(cfg)
    assert model.net.attn_layers.zero_init_branch_output and model.net.rel_pos_attn is not None
    assert model.net.attn_layers.input_skip is not None and model.train_masking == "bell"
    layers = model.net.attn_layers
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    assert attn and all(a.kv_heads == 2 and a.dim_head == 8 and a.qk_norm for a in attn)
    ff = [m for m in model.modules() if isinstance(m, FeedForward)]
    assert ff and all(f.glu and f.act is F.silu for f in ff)
    assert all(
        n.rms for n in model.modules() if isinstance(n, Norm) and n is not model.net.post_emb_norm
    )
    assert layers.rotary is not None and layers.rotary.rot_dim == 4
    assert model.net.emb_dim == 8 and model.net.post_emb_norm is not None
    assert model.to_critic_logits is not None and model.critic_loss_weight == 0.5
    assert model.steps == 5 and model.schedule.mask_ratio(torch.tensor(0.5)) == pytest.approx(
        math.cos(math.pi * 0.5 / 2)
    )
    critic = build_model(dataclasses.replace(cfg, self_token_critic=False, token_critic=True))
    assert critic.token_critic is not None and critic.token_critic.logits_dim == 1


# ------------------------------------------------------------------------- format 1 still loads

V1_MODEL = {
    "kind": "autoregressive", "num_tokens": 256, "seq_len": SEQ_LEN, "dim": 16, "depth": 1,
    "heads": 2, "dim_head": None, "ff_mult": 4, "dropout": 0.0, "rotary": False,
    "tie_embedding": False, "schedule": "linear", "steps": 18, "mask_id": None,
    "self_cond": False, "self_cond_train_prob": 0.75, "no_replace_prob": 0.15,
    "random_token_prob": 0.1, "can_mask_prev_unmasked": False,
    "use_simple_mdlm_loss_weight": True, "cond_drop_prob": 0.0, "cond_prefix_len": 0,
    "mask_prob": 0.0, "add_attn_z_loss": False,
}  # fmt: skip


def _as_v1(train: dict) -> str:
    """A config.json as demask wrote it in format 1."""
    old_train = {("steps" if k == "max_steps" else k): v for k, v in train.items()}
    model = dict(V1_MODEL, num_tokens=tiny_model()["num_tokens"])
    return json.dumps({"format_version": 1, "model": model, "train": old_train})


def test_format_1_migrates_with_the_head_width_it_used():
    model, train = configs_from_json(_as_v1(TrainConfig(max_steps=7).to_dict()))
    assert model.attn_dim_head == 16 // 2  # v1: dim_head None meant dim // heads
    assert (model.max_seq_len, model.attn_dropout, model.ff_dropout) == (SEQ_LEN, 0.0, 0.0)
    # and format 2's positions: added to the embeddings only (abs_pos_attn_bias=False)
    assert model == ModelConfig(**tiny_model(), abs_pos_attn_bias=False)
    assert train is not None and train.max_steps == 7
    v1 = dict(V1_MODEL, dim_head=4, dropout=0.1, rotary=True)
    text = json.dumps({"model": v1, "train": None})  # no version: written before versions
    model, _ = configs_from_json(text)
    assert (model.attn_dim_head, model.attn_dropout, model.ff_dropout) == (4, 0.1, 0.1)
    assert model.rotary_pos_emb
    broken = json.dumps({"format_version": 1, "model": {k: v for k, v in V1_MODEL.items()
                                                          if k != "dim_head"}, "train": None})  # fmt: skip
    with pytest.raises(ValueError, match=r"missing \['dim_head'\]"):
        configs_from_json(broken)


def test_format_2_keeps_the_positions_it_built():
    """A version-2 config of an Encoder with absolute positions built them added to the tokens
    only; version 3's default adds an attention bias, so the migration says False."""
    model = ModelConfig(**tiny_model("masked"))
    payload = json.loads(configs_to_json(model))
    assert payload["format_version"] == CONFIG_FORMAT_VERSION == 8
    del payload["model"]["abs_pos_attn_bias"]
    payload["format_version"] = 2
    old, _ = configs_from_json(json.dumps(payload))
    assert old.abs_pos_attn_bias is False and model.abs_pos_attn_bias is None
    assert old == dataclasses.replace(model, abs_pos_attn_bias=False)
    built_old, built_new = build_model(old).net, build_model(model).net
    assert built_old.abs_pos_attn is None and built_new.abs_pos_attn is not None


def test_format_3_keeps_a_rotary_encoder_without_absolute_positions():
    """Version 3's default gave a rotary Encoder no absolute positions; version 4's gives it the
    position bias too, so the migration says False for rotary configs (and leaves the rest)."""
    rotary = ModelConfig(**tiny_model("masked"), rotary_pos_emb=True)
    plain = ModelConfig(**tiny_model("masked"))
    migrated = []
    for model in (rotary, plain):
        payload = json.loads(configs_to_json(model))
        payload["format_version"] = 3
        migrated.append(configs_from_json(json.dumps(payload))[0])
    assert migrated[0] == dataclasses.replace(rotary, abs_pos_attn_bias=False)
    assert migrated[1] == plain  # absolute positions: format 3 built the bias already
    built_old, built_new = build_model(migrated[0]).net, build_model(rotary).net
    assert built_old.abs_pos_emb is None and built_old.abs_pos_attn is None
    assert built_new.abs_pos_emb is not None and built_new.abs_pos_attn is not None


def test_format_4_trained_with_adamw():
    """Version 4 had no optimiser fields: its runs trained with AdamW, and resume so."""
    model = ModelConfig(**tiny_model("masked"))
    train = TrainConfig(optimizer="muon", muon_momentum=0.9, max_steps=3)
    payload = json.loads(configs_to_json(model, train))
    assert payload["train"]["optimizer"] == "muon"
    assert configs_from_json(json.dumps(payload)) == (model, train)  # round trip
    for key in ("optimizer", "muon_momentum", "muon_rms"):
        del payload["train"][key]
    payload["format_version"] = 4
    _, old = configs_from_json(json.dumps(payload))
    assert old == dataclasses.replace(train, optimizer="adamw", muon_momentum=0.95, muon_rms=0.2)


def test_format_5_built_without_the_recipe_options():
    """Version 5 had no zero-started outputs, input skip, relative bias or bell masking: its
    configs load with them off, as those nets were built and trained."""
    model = ModelConfig(**tiny_model("masked"), zero_init_branch_output=True, input_skip=True,
                        rel_pos_attn_bias=True, use_simple_mdlm_loss_weight=False,
                        train_masking="bell")  # fmt: skip
    payload = json.loads(configs_to_json(model))
    assert configs_from_json(json.dumps(payload))[0] == model  # round trip
    for key in ("zero_init_branch_output", "input_skip", "rel_pos_attn_bias", "train_masking"):
        del payload["model"][key]
    payload["format_version"] = 5
    old, _ = configs_from_json(json.dumps(payload))
    assert old == dataclasses.replace(model, zero_init_branch_output=False, input_skip=False,
                                      rel_pos_attn_bias=False, train_masking="schedule")  # fmt: skip


def test_format_6_built_without_a_token_shift():
    """Version 6 had no token shift: its configs load with shift_tokens=0."""
    model = ModelConfig(**tiny_model("masked"), shift_tokens=1)
    payload = json.loads(configs_to_json(model))
    assert configs_from_json(json.dumps(payload))[0] == model  # round trip
    assert build_model(model).net.attn_layers.shift_tokens == 1
    del payload["model"]["shift_tokens"]
    payload["format_version"] = 6
    old, _ = configs_from_json(json.dumps(payload))
    assert old == dataclasses.replace(model, shift_tokens=0)


def test_format_7_left_a_dropped_condition_unscored():
    """Version 7 had no predict_dropped_cond: its configs load with it False."""
    cond = dict(cond_prefix_len=1, cond_drop_prob=0.2)
    model = ModelConfig(**tiny_model("masked"), **cond, predict_dropped_cond=True)
    payload = json.loads(configs_to_json(model))
    assert configs_from_json(json.dumps(payload))[0] == model  # round trip
    assert build_model(model).predict_dropped_cond is True
    del payload["model"]["predict_dropped_cond"]
    payload["format_version"] = 7
    old, _ = configs_from_json(json.dumps(payload))
    assert old == dataclasses.replace(model, predict_dropped_cond=False)


def test_a_format_1_run_folder_loads_its_model_and_resumes(tmp_path):
    from demask.checkpoint import load_checkpoint
    from demask.train import train

    m = ModelConfig(**tiny_model())
    t = TrainConfig(**tiny_train(tmp_path / "run", steps=2, checkpoint_every=1))
    train(m, t)
    saved = load_checkpoint(tmp_path / "run").model.state_dict()
    for path in (tmp_path / "run").rglob("config.json"):  # every copy back to format 1
        assert json.loads(path.read_text())["format_version"] == CONFIG_FORMAT_VERSION
        path.write_text(_as_v1(t.to_dict()))
    ck = load_checkpoint(tmp_path / "run")
    assert ck.model_config == m and ck.model.net.attn_layers.dim_head == 8
    assert all(torch.equal(ck.model.state_dict()[k], v) for k, v in saved.items())
    res = train(m, dataclasses.replace(t, max_steps=3), resume=True)
    assert res.step == 3


def test_old_names_are_deprecated_aliases():
    with pytest.warns(DeprecationWarning, match="max_steps"):
        assert TrainConfig(steps=5).max_steps == 5
    with pytest.warns(DeprecationWarning, match="max_seq_len"):
        assert ModelConfig(seq_len=32).max_seq_len == 32
    assert TrainConfig(max_steps=5).steps == 5 and ModelConfig().seq_len == 64


# ------------------------------------------------------------------------- the contract


def _pair(seed=0):
    torch.manual_seed(seed)
    masked = build_model(ModelConfig(**tiny_model("masked"))).eval()
    ar = build_model(ModelConfig(**tiny_model("autoregressive"))).eval()
    x = torch.randint(0, tiny_model()["num_tokens"], (3, SEQ_LEN))
    return masked, ar, x


def test_loss_is_forwards_loss_with_metrics():
    masked, ar, x = _pair()
    for model, parts in ((masked, {"generator_loss"}), (ar, {"ce", "tokens"})):
        torch.manual_seed(1)
        loss, metrics = model.loss(x)
        torch.manual_seed(1)
        out = model(x)
        assert torch.equal(loss, getattr(out, "loss", out)) and loss.ndim == 0
        assert parts <= set(metrics) and not any(v.requires_grad for v in metrics.values())


def test_bits_per_token_equals_the_previous_evaluator():
    masked, ar, x = _pair()
    data = list(x)
    # masked: the NELBO per token times N per row, its noise seeded by seed * 1_000_003 + batch
    with torch.random.fork_rng():
        torch.manual_seed(5 * 1_000_003)
        want = float((masked.nelbo(x, num_times=4).sum() * x.shape[1]).double())
    assert likelihood_sums(masked, data, 3, seed=5, num_times=4) == (want, x.numel())
    # autoregressive: the exact NLL of tokens 1.. from the net's logits
    with torch.no_grad():
        nats = F.cross_entropy(ar.net(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten(),
                               reduction="sum")  # fmt: skip
    assert likelihood_sums(ar, data, 3) == (float(nats.double() / math.log(2)), x[:, 1:].numel())
    for model in (masked, ar):
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(0)
            one = model.bits_per_token(x)
        assert one == pytest.approx(likelihood_bits_per_token(model, data, 3), rel=1e-12)
    assert (masked.likelihood_name, ar.likelihood_name) == ("nelbo", "exact_nll")


def test_sample_for_both_kinds():
    masked, ar, _ = _pair()
    s = masked.sample(4, SampleOptions(decode_steps=3, history=True, prompt=(1, None, 2)))
    assert s.tokens.shape == (4, SEQ_LEN) and s.history.shape == (3, 4, SEQ_LEN)
    assert (s.tokens[:, 0] == 1).all() and (s.tokens[:, 2] == 2).all()
    assert not (s.tokens == masked.mask_id).any()
    assert s.settings == {"sampler": "ancestral", "filter_thres": 0.0, "anneal": False}
    again = masked.sample(4, SampleOptions(decode_steps=3, prompt=(1, None, 2)))
    assert torch.equal(again.tokens, s.tokens) and again.history is None  # seeded
    a = ar.sample(2, SampleOptions(prompt=(5, 6), length=3, temperature=0.0))
    assert a.tokens.shape == (2, 5) and a.tokens[:, :2].tolist() == [[5, 6], [5, 6]]
    b = ar.sample(2, SampleOptions(start=torch.tensor([[5], [7]])))
    assert b.tokens.shape == (2, SEQ_LEN) and b.tokens[:, 0].tolist() == [5, 7]


@param(
    ("which", "options", "match"),
    [
        ("ar", SampleOptions(decode_steps=4), "decode_steps: applies to masked models only"),
        ("ar", SampleOptions(sampler="confidence"), "sampler: applies to masked models only"),
        ("masked", SampleOptions(length=4), "length: applies to autoregressive models only"),
        ("ar", SampleOptions(prompt=(1, None)), "prompt: holes need a masked model"),
        ("ar", SampleOptions(), "prompt: an autoregressive model needs a prompt or start"),
        ("masked", SampleOptions(prompt=(1,) * (SEQ_LEN + 1)), "longer than the model's"),
    ],
)
def test_sample_refuses_what_the_kind_does_not_use(which, options, match):
    masked, ar, _ = _pair()
    with pytest.raises(ValueError, match=match):
        (ar if which == "ar" else masked).sample(2, options)


def test_nothing_outside_the_wrappers_dispatches_on_the_kind_name():
    """The trainer, evaluator, checkpoints and CLI call methods; the only kind names are the
    wrappers' own `kind` and the messages that name one."""
    dispatch = re.compile(
        r"""[=!]= *["'](masked|autoregressive)["']|["'](masked|autoregressive)["'] *:"""
        r"""|["'](NonAutoregressiveWrapper|AutoregressiveWrapper)["']"""
    )
    files = [SRC / "config.py", SRC / "evaluate.py", SRC / "train.py", SRC / "checkpoint.py",
             *sorted((SRC / "cli").glob("*.py"))]  # fmt: skip
    found = [f"{p.name}: {m.group(0)}" for p in files for m in dispatch.finditer(p.read_text())]
    assert found == []


# ------------------------------------------------------------------------- the command line


def _cli_model(tmp_path, *argv):
    from demask.cli import build_parser
    from demask.cli._run import _fresh_configs

    args = build_parser().parse_args(["train", "--data", "digits", *argv])
    model_cfg, _ = _fresh_configs(args, str(tmp_path / "out"))
    return model_cfg, build_model(model_cfg)


def _attn(model):
    return [m for m in model.modules() if isinstance(m, Attention)]


@param(
    ("argv", "check"),
    [
        (["--use-rmsnorm"], lambda m: all(n.rms for n in m.modules() if isinstance(n, Norm))),
        (["--ff-glu", "--ff-swish"],
         lambda m: all(f.glu and f.act is F.silu for f in m.modules() if isinstance(f, FeedForward))),
        (["--attn-kv-heads", "2"], lambda m: {a.kv_heads for a in _attn(m)} == {2}),
        (["--attn-qk-norm"], lambda m: all(a.qk_norm for a in _attn(m))),
        (["--attn-dim-head", "16"], lambda m: {a.dim_head for a in _attn(m)} == {16}),
        (["--heads", "2"], lambda m: {(a.heads, a.dim_head) for a in _attn(m)} == {(2, 64)}),
        (["--self-token-critic"], lambda m: m.to_critic_logits is not None),
        (["--token-critic"], lambda m: m.token_critic is not None),
        (["--rotary-pos-emb"], lambda m: m.net.attn_layers.rotary is not None),
        (["--tie-embedding"], lambda m: m.net.to_logits.weight is m.net.token_emb.weight),
        (["--decode-steps", "7"], lambda m: m.steps == 7),
        (["--self-cond"], lambda m: m.to_self_cond is not None),
        (["--model", "autoregressive", "--add-attn-z-loss", "--mask-prob", "0.2"],
         lambda m: isinstance(m, AutoregressiveWrapper) and m.add_attn_z_loss
         and m.mask_prob == 0.2),
    ],
)  # fmt: skip
def test_the_cli_reaches_each_constructor_option(tmp_path, argv, check):
    _, model = _cli_model(tmp_path, *argv)
    assert check(model)


def test_every_config_field_has_a_train_option():
    from demask.cli import build_parser
    from demask.cli.train import MODEL_SKIP, TRAIN_SKIP

    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    dests = {a.dest for a in train._actions}
    for cls, skip in ((ModelConfig, MODEL_SKIP), (TrainConfig, TRAIN_SKIP)):
        assert {f.name for f in dataclasses.fields(cls)} - set(skip) <= dests
    assert "--train-steps" in train.format_help() and "--steps" in train.format_help()
    from demask.cli._options import field_help

    for cls in (ModelConfig, TrainConfig):  # each option's help is its field's comment
        assert set(field_help(cls)) == {f.name for f in dataclasses.fields(cls)}


def test_train_with_new_options_end_to_end(tmp_path, capsys):
    from demask.cli import main

    out = tmp_path / "run"
    argv = ["train", "--data", "digits", "--train-steps", "1", "--dim", "16", "--depth", "1",
            "--heads", "2", "--attn-kv-heads", "1", "--use-rmsnorm", "--ff-glu",
            "--self-token-critic", "--batch-size", "4", "--quiet", "--no-plot", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["attn_kv_heads"] == 1 and saved["use_rmsnorm"] and saved["self_token_critic"]
    assert saved["attn_dim_head"] == 64
    code = main(["sample", "--checkpoint", str(out), "--num", "2", "--decode-steps", "2",
                 "--out", str(tmp_path / "s")])  # fmt: skip
    assert code == 0


def test_attention_layers_take_their_options_as_parameters():
    params = inspect.signature(AttentionLayers).parameters
    assert {"attn_dim_head", "attn_kv_heads", "use_rmsnorm", "ff_glu"} <= set(params)


def test_validating_a_config_draws_no_random_numbers():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    ModelConfig(self_cond=True, self_token_critic=True)
    ModelConfig(kind="autoregressive", add_continuous_pred_head=True)
    assert torch.equal(state, torch.get_rng_state())  # built on meta: seeded runs repeat
