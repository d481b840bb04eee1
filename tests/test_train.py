"""Training loop: LR schedule, decay groups, reproducibility, golden losses, NaN policy, configs."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from _train_worker import DATA, tiny_model, tiny_train
from torch import nn

from demask.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from demask.config import (
    MODEL_BUILDERS,
    ModelConfig,
    TrainConfig,
    build_model,
    configs_from_json,
    configs_to_json,
    register_model_kind,
)
from demask.data import get_batch
from demask.distributed import DistInfo
from demask.evaluate import likelihood_bits_per_token, likelihood_sums
from demask.optim import param_groups
from demask.train import (
    NonFiniteLossError,
    RunStatus,
    StepStatus,
    lr_at,
    train,
    train_step,
)
from demask.training_state import build_state

param = pytest.mark.parametrize


pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path, name="run", model=None, **over):
    m = ModelConfig(**(model or tiny_model()))
    t = TrainConfig(**tiny_train(tmp_path / name, **over))
    return m, t


# ------------------------------------------------------------------------------- LR schedule


def test_lr_warmup_then_cosine_exact_values():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(1, cfg) == pytest.approx(1e-4, abs=1e-15)
    assert lr_at(5, cfg) == pytest.approx(5e-4, abs=1e-15)
    assert lr_at(10, cfg) == pytest.approx(1e-3, abs=1e-15)  # peak at the end of warm-up
    # half-way through the decay: cos(pi/2) = 0 -> min + (1 - min) / 2
    assert lr_at(60, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), abs=1e-15)
    assert lr_at(35, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert lr_at(110, cfg) == pytest.approx(1e-4, abs=1e-15)  # ends at lr * min_lr_ratio
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay


def test_lr_without_warmup_starts_at_peak():
    cfg = TrainConfig(lr=2e-3, warmup_steps=0, steps=4, min_lr_ratio=0.0)
    assert [lr_at(s, cfg) for s in (1, 2, 3, 4)] == pytest.approx(
        [2e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4)]
    )
    with pytest.raises(ValueError, match="step must be >= 1, got 0"):
        lr_at(0, cfg)


def test_weight_decay_only_on_linear_matrices():
    model = build_model(ModelConfig(**tiny_model()))
    decay, rest = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert all(p.ndim == 2 for p in decay["params"])
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    assert emb_ids and not emb_ids & decayed  # embeddings never decay
    lin = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    assert lin and all(id(w) in decayed for w in lin)
    assert not any(n.endswith("bias") for n in names)
    # every parameter is in exactly one group
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- the loop


def test_seeded_runs_repeat_and_seeds_differ(tmp_path):
    m, t = run(tmp_path, "a", steps=4)
    a = train(m, t)
    b = train(m, TrainConfig(**{**t.to_dict(), "out": str(tmp_path / "b")}))
    c = train(m, TrainConfig(**{**t.to_dict(), "out": str(tmp_path / "c"), "seed": 1}))
    assert a.losses == b.losses and len(a.losses) == 4
    assert a.losses != c.losses
    assert a.status == "finished" and a.step == 4


# the golden losses and the learning bounds were measured on Hamlet's bytes
needs_hamlet = pytest.mark.skipif(
    DATA == "digits", reason="Hamlet's bytes; ../shared is not beside the clone"
)

# Golden first losses of a tiny seeded run (tiny_model / tiny_train, seed 0, on
# /work/shared/data/shakespeare/hamlet_gut.txt). They pin init + data + objective + optimiser:
# a change in any of them shows here. Regenerate (after checking the change is intended) with
#   DEMASK_REGEN_GOLDEN=1 PYTHONPATH=src .venv/bin/python -m pytest tests/test_train.py -k golden -s
# and paste the printed dict.
GOLDEN = {
    # regenerated for issue 11: GPT-2's scaled residual init (demask.model.init) and the MDLM
    # loss by exact mask counts drawn from q(k) ~ k^-1/2 with importance weights
    # (objectives.masked.count_masks); masked regenerated again for the Encoder's position bias
    # (abs_pos_attn_bias, demask.model.positions)
    "autoregressive": [
        5.555888652801514,
        5.534185409545898,
        5.51491641998291,
        5.481644153594971,
        5.490691661834717,
    ],
    "masked": [
        6.351412773132324,
        5.994996070861816,
        4.829013347625732,
        4.793761730194092,
        5.19246768951416,
    ],
}


@needs_hamlet
@param("kind", sorted(GOLDEN))
def test_golden_first_losses(tmp_path, kind):
    if kind not in MODEL_BUILDERS:
        pytest.skip(f"{kind} not registered")
    try:
        m, t = run(tmp_path, model=tiny_model(kind), steps=5)
        res = train(m, t)
    except ImportError as err:
        pytest.skip(f"{kind} wrapper not available yet: {err}")
    losses = [res.losses[s] for s in range(1, 6)]
    if os.environ.get("DEMASK_REGEN_GOLDEN") or not GOLDEN[kind]:
        print(f"\n    {kind!r}: {losses!r},")
        if not GOLDEN[kind]:
            pytest.skip("no golden values stored yet")
    assert losses == pytest.approx(GOLDEN[kind], rel=1e-4)


def test_metrics_jsonl_records(tmp_path):
    m, t = run(tmp_path, steps=4, log_every=2, val_every=2, checkpoint_every=2)
    seen = []
    res = train(m, t, callbacks=[seen.append])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert records == seen
    train_recs = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_recs] == [2, 4]
    for r in train_recs:
        assert set(r) == {"type", "step", "loss", "lr", "tokens_per_s", "grad_norm"}
        assert r["loss"] == pytest.approx(res.losses[r["step"]])
        assert r["lr"] == pytest.approx(lr_at(r["step"], t))
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    vals = [r for r in records if r["type"] == "val"]
    assert [r["step"] for r in vals] == [2, 4]
    assert vals[-1]["val_bits_per_token"] == pytest.approx(res.val[4])
    assert 0 < res.val[4] < 8.5  # bytes: at most ~8 bits/token for a barely trained model
    assert [r["step"] for r in records if r["type"] == "checkpoint"] == [2, 4]


def test_bf16_autocast_runs_close_to_fp32(tmp_path):
    m, t = run(tmp_path, "fp32", steps=2)
    ref = train(m, t)
    low = train(m, TrainConfig(**{**t.to_dict(), "out": str(tmp_path / "bf16"), "bf16": True}))
    assert low.losses != ref.losses  # autocast really ran in bf16 ...
    for s in ref.losses:  # ... and stays close
        assert low.losses[s] == pytest.approx(ref.losses[s], rel=1e-2)


@pytest.mark.slow
def test_compiled_run_matches_eager(tmp_path):
    m, t = run(tmp_path, "eager", steps=3)
    ref = train(m, t)
    comp = train(m, TrainConfig(**{**t.to_dict(), "out": str(tmp_path / "c"), "compile": True}))
    for s in ref.losses:
        assert comp.losses[s] == pytest.approx(ref.losses[s], rel=1e-4)
    # compiling in place keeps the state-dict keys: the checkpoint loads into a plain model
    assert load_checkpoint(tmp_path / "c").step == 3


@needs_hamlet
def test_tiny_model_learns(tmp_path):
    m, t = run(tmp_path, model=tiny_model(dim=32), steps=150, batch_size=16, log_every=50)
    res = train(m, t)
    first = sum(res.losses[s] for s in range(1, 6)) / 5
    last = sum(res.losses[s] for s in range(146, 151)) / 5
    assert first > 4.5 and last < 0.6 * first  # bytes start near ln(256) = 5.5 nats


def test_refuses_to_overwrite_and_checks_resume(tmp_path):
    m, t = run(tmp_path, steps=2)
    train(m, t)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        train(m, t)
    other = ModelConfig(**tiny_model(dim=32))
    with pytest.raises(CheckpointError, match="model config differs.*dim"):
        train(other, t, resume=True)
    _, t2 = run(tmp_path, "empty", steps=2)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        train(m, t2, resume=True)
    res = train(m, t, overwrite=True)
    assert res.step == 2


# ------------------------------------------------------------------ the state and the step


def _state_and_data(m, t):
    from demask.data import get_dataset

    ds = get_dataset(t.data, "train", seq_len=m.seq_len, max_bytes=t.data_max_bytes)
    return build_state(m, t, DistInfo()), ds


@param("kind", ["autoregressive", "masked"])
def test_train_step_by_hand_repeats_train_and_leaves_the_rng_alone(tmp_path, kind):
    m, t = run(tmp_path, model=tiny_model(kind), steps=3)
    ref = train(m, t)
    state, ds = _state_and_data(m, t)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    for s in (1, 2, 3):
        out = train_step(state, get_batch(ds, s, t.batch_size, t.seed))
        assert out.status is StepStatus.UPDATED and state.step == s
        assert out.loss == ref.losses[s] and out.lr == lr_at(s, t) and out.grad_norm > 0
    assert torch.equal(torch.get_rng_state(), rng)  # the step's reseed is its own
    saved = load_checkpoint(t.out).model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in state.model.state_dict().items())


def test_a_stop_request_leaves_the_state_as_it_was(tmp_path):
    m, t = run(tmp_path, steps=3)
    state, ds = _state_and_data(m, t)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    out = train_step(state, get_batch(ds, 1, t.batch_size, t.seed), stop=True)
    assert out.status is StepStatus.STOPPED and state.step == 0
    assert all(torch.equal(v, before[k]) for k, v in state.model.state_dict().items())
    assert not state.optimizer.state and all(p.grad is None for p in state.model.parameters())


def test_train_leaves_the_callers_rng_alone_and_reports_enum_statuses(tmp_path):
    m, t = run(tmp_path, steps=2)
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    res = train(m, t)
    assert torch.equal(torch.get_rng_state(), rng)
    assert res.status is RunStatus.FINISHED
    assert str(res.status) == f"{res.status}" == json.loads(json.dumps(res.status)) == "finished"
    stopped = train(m, TrainConfig(**{**t.to_dict(), "out": str(tmp_path / "s")}), stop_after=1)
    assert stopped.status is RunStatus.STOPPED and stopped.step == 1


# ------------------------------------------------------------------------------- NaN policy


class NaNAtStep(nn.Module):
    """An autoregressive wrapper whose loss is NaN on training forward number `at`."""

    at = 3

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.net, self.calls = inner, inner.net, 0

    def likelihood_bits(self, x, **options):  # the model contract, for validation
        return self.inner.likelihood_bits(x, **options)

    def forward(self, x):
        self.calls += 1
        loss = self.inner(x)
        return loss * float("nan") if self.calls == self.at else loss


class InfGradAtStep(NaNAtStep):
    """A finite loss whose gradient is inf on training forward number `at`."""

    def forward(self, x):
        self.calls += 1
        loss = self.inner(x)
        if self.calls == self.at:
            loss = loss * 1.0
            loss.register_hook(lambda g: g * float("inf"))
        return loss


@pytest.fixture(scope="module")
def standins():
    """Register the fault-injecting stand-ins for this module only."""
    ar = MODEL_BUILDERS["autoregressive"]
    register_model_kind("nan-test", lambda c: NaNAtStep(ar(c)))
    register_model_kind("inf-grad-test", lambda c: InfGradAtStep(ar(c)))
    yield
    for kind in ("nan-test", "inf-grad-test"):
        MODEL_BUILDERS.pop(kind)


def test_nan_loss_stops_without_a_checkpoint(tmp_path, standins):
    m, t = run(tmp_path, model=tiny_model("nan-test"), steps=6, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 .*batch = train"):
        train(m, t)
    run_dir = tmp_path / "run"
    assert latest_checkpoint(run_dir).name == "step_00000002"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_00000001",
        "step_00000002",
    ]
    ck = load_checkpoint(run_dir)
    assert ck.step == 2 and all(torch.isfinite(p).all() for p in ck.model.parameters())
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    bad = [r for r in records if r["type"] == "nonfinite"]
    assert len(bad) == 1 and bad[0]["step"] == 3 and len(bad[0]["batch_indices"]) == 4
    assert max(r["step"] for r in records) == 3


def test_inf_gradient_is_caught_before_the_update(tmp_path, standins):
    m, t = run(tmp_path, model=tiny_model("inf-grad-test"), steps=4, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm at step 3"):
        train(m, t)
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"
    _, t2 = run(tmp_path, "skip", model=tiny_model("inf-grad-test"), steps=4, nan_policy="skip")
    res = train(m, t2)
    assert res.skipped == [3] and sorted(res.losses) == [1, 2, 4]
    ck = load_checkpoint(tmp_path / "skip")
    assert all(torch.isfinite(p).all() for p in ck.model.parameters())


def test_nan_loss_skip_policy_drops_one_update(tmp_path, standins):
    m, t = run(tmp_path, model=tiny_model("nan-test"), steps=5, nan_policy="skip")
    res = train(m, t)
    assert res.skipped == [3] and res.status == "finished"
    assert sorted(res.losses) == [1, 2, 4, 5]  # the NaN step has no loss
    ck = load_checkpoint(tmp_path / "run")
    assert ck.step == 5 and all(torch.isfinite(p).all() for p in ck.model.parameters())


# ------------------------------------------------------------------------------- configs


def test_configs_round_trip_json():
    m = ModelConfig(**tiny_model("autoregressive", rotary=True))
    t = TrainConfig(steps=7, nan_policy="skip")
    m2, t2 = configs_from_json(configs_to_json(m, t))
    assert (m2, t2) == (m, t)
    assert configs_from_json(configs_to_json(m)) == (m, None)


@param(
    ("cls", "kwargs", "match"),
    [
        (
            ModelConfig,
            {"kind": "diffusion"},
            r"kind must be one of \[.*'masked'.*\], got 'diffusion'",
        ),
        (ModelConfig, {"dim": 0}, "dim must be >= 1, got 0"),
        # the constructors' own checks (heads need not divide dim: attn_dim_head is its own)
        (ModelConfig, {"attn_kv_heads": 3}, "attn_kv_heads must divide heads=8, got 3"),
        (ModelConfig, {"ff_glu": "yes"}, "ff_glu must be a bool, got str 'yes'"),
        (TrainConfig, {"lr": -1.0}, r"lr must be in \(0, inf\), got -1"),
        (TrainConfig, {"nan_policy": "ignore"}, "nan_policy must be one of"),
        (TrainConfig, {"batch_size": 2.5}, "batch_size must be an int, got float 2.5"),
        (TrainConfig, {"bf16": "yes"}, "bf16 must be a bool"),
    ],
)
def test_bad_config_values_name_the_field(cls, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cls(**kwargs)


def test_unknown_config_keys_are_rejected():
    with pytest.raises(TypeError, match="ModelConfig got unexpected keyword argument.*: depht"):
        ModelConfig.from_dict({"depht": 3})


# ------------------------------------------------------------------------ likelihood evaluation


def _val_data(n=5):
    from _train_worker import MAX_BYTES, SEQ_LEN

    from demask.data import get_dataset

    ds = get_dataset(DATA, "val", seq_len=SEQ_LEN, max_bytes=MAX_BYTES)
    return [ds[i] for i in range(n)]  # a plain list of (N,) tensors is a dataset too


def test_autoregressive_bits_equal_a_prefix_by_prefix_reference():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**tiny_model())).eval()
    data = _val_data(3)
    got = likelihood_bits_per_token(model, data, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for x in data:
            for i in range(1, len(x)):  # predict token i from tokens < i only
                logp = model.net(x[None, :i])[0, -1].log_softmax(-1)
                total -= float(logp[x[i]]) / math.log(2)
                count += 1
    assert count == 3 * (len(data[0]) - 1)
    assert got == pytest.approx(total / count, rel=1e-5)


@param("kind", ["autoregressive", "masked"])
def test_likelihood_is_deterministic_and_splits_over_ranks(kind):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**tiny_model(kind))).eval()
    data = _val_data(5)
    state = torch.get_rng_state()
    one = likelihood_sums(model, data, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert likelihood_sums(model, data, batch_size=2) == one  # deterministic
    # ranks 0 and 1 of 2 take batches 0, 2 and 1: their sums add up to the 1-process sums
    r0 = likelihood_sums(model, data, batch_size=2, rank=0, world_size=2)
    r1 = likelihood_sums(model, data, batch_size=2, rank=1, world_size=2)
    assert r0[1] + r1[1] == one[1]
    assert r0[0] + r1[0] == pytest.approx(one[0], rel=1e-12)
    n_tok = len(data[0]) - (kind == "autoregressive")
    assert one[1] == 5 * n_tok and r1[1] == 2 * n_tok
    # max_batches counts global batches
    assert likelihood_sums(model, data, batch_size=2, max_batches=1)[1] == 2 * n_tok
    if kind == "masked":  # the NELBO of the wrapper, seeded per batch
        x = torch.stack(data[:2])
        with torch.random.fork_rng():
            torch.manual_seed(0)
            want = float(model.nelbo(x).mean())
        got = likelihood_bits_per_token(model, data[:2], batch_size=2)
        assert got == pytest.approx(want, rel=1e-9)
        assert likelihood_bits_per_token(model, data[:2], batch_size=2, seed=1) != got
        with torch.random.fork_rng():
            torch.manual_seed(0)
            want4 = float(model.nelbo(x, num_times=4).mean())
        got4 = likelihood_bits_per_token(model, data[:2], batch_size=2, num_times=4)
        assert got4 == pytest.approx(want4, rel=1e-9) and got4 != got


def test_likelihood_bad_input():
    model = build_model(ModelConfig(**tiny_model()))
    with pytest.raises(TypeError, match="wrapper must have likelihood_bits .* got Linear"):
        likelihood_bits_per_token(nn.Linear(2, 2), _val_data(2), batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        likelihood_bits_per_token(model, _val_data(2), batch_size=0)
    with pytest.raises(ValueError, match="rank must be <= 1, got 2"):
        likelihood_bits_per_token(model, _val_data(2), batch_size=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="dataset must be a non-empty"):
        likelihood_bits_per_token(model, [], batch_size=1)
