"""The benchmark harness: tables, JSON, interleaved timing, FLOP formulas, the memory probe, one
speed suite, and the quality and frontier suites end to end in --smoke mode (skipped without the
reference library or the Shakespeare data)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `benchmarks` lives at the repository root, beside src/

from benchmarks import flops, harness  # noqa: E402

HAS_REFERENCE = importlib.util.find_spec("x_transformers") is not None


def test_format_table_exact():
    text = harness.format_table(["a", "bb"], [["x", 1.5], ["yyy", None], ["z", 12345.678]])
    assert text.splitlines() == [
        "| a   | bb       |",
        "|-----|----------|",
        "| x   | 1.500    |",
        "| yyy |          |",
        "| z   | 12,345.7 |",
    ]


def test_format_table_rejects_ragged_rows():
    with pytest.raises(ValueError, match="expected 2"):
        harness.format_table(["a", "b"], [[1, 2, 3]])


def test_record_and_json_round_trip(tmp_path):
    payload = harness.record("demo", {"dim": 8}, {"x": 1.0})
    out = harness.write_json(tmp_path / "sub" / "r.json", payload)
    back = json.loads(out.read_text())
    assert (
        back["suite"] == "demo" and back["config"] == {"dim": 8} and back["results"] == {"x": 1.0}
    )
    machine = back["machine"]
    assert machine["torch"] == torch.__version__
    assert len(machine["git"]["commit"]) == 40
    assert machine["cpu"] and machine["date_utc"].endswith("+00:00")


def test_time_interleaved_alternates_order_after_warmup():
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = harness.time_interleaved(fns, warmup=2, repeats=3)
    assert calls == ["a", "a", "b", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(times["a"]), len(times["b"])] == [3, 3]
    assert all(t >= 0 for t in times["a"] + times["b"])


def test_speed_row_figures():
    work = harness.Workload(run=lambda: None, tokens=100, flops=4e9)
    row = harness.speed_row("demask", work, [2.0, 1.0, 4.0])
    assert row["median_s"] == 2.0 and row["tokens_per_s"] == 50.0 and row["gflops"] == 2.0


def _linear_weights(model: nn.Module) -> int:
    """The Linear weights applied to every token; not demask's position bias projection, which
    runs once per position (its cost does not grow with the batch)."""
    bias = getattr(model, "abs_pos_attn", None)
    skip = {id(m) for m in bias.modules()} if bias is not None else set()
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Linear) and id(m) not in skip)  # fmt: skip


@pytest.mark.parametrize("lib", ["demask", "reference"])
def test_matmul_params_match_the_models_linear_weights(lib):
    if lib == "reference" and not HAS_REFERENCE:
        pytest.skip("x-transformers is not installed")
    from benchmarks.libs import build_net, load

    shape = flops.ModelShape(dim=64, depth=2, heads=2, num_tokens=37)
    net = build_net(
        load(lib), causal=False, num_tokens=37, max_seq_len=16, dim=64, depth=2, heads=2
    )
    assert flops.matmul_params(shape) == _linear_weights(net)


def test_flop_formulas_against_brute_force_sums():
    s = flops.ModelShape(dim=32, depth=3, heads=2, num_tokens=11, dim_head=8)
    p = flops.matmul_params(s)
    assert p == 3 * (4 * 32 * 16 + 2 * 4 * 32 * 32) + 32 * 11
    # cached decoding: every position through the net but the last new one, attending j + 1 keys
    batch, prompt, new = 3, 5, 4
    brute = sum(2 * p + 4 * s.depth * (j + 1) * s.inner for j in range(prompt + new - 1)) * batch
    assert flops.ar_generate_flops(s, batch, prompt, new) == pytest.approx(brute)
    assert flops.train_flops(s, 2, 7) == pytest.approx(3 * 2 * 7 * (2 * p + 4 * 3 * 7 * 16))
    assert flops.masked_generate_flops(s, 2, 7, 5) == pytest.approx(
        5 * 2 * 7 * (2 * p + 4 * 3 * 7 * 16)
    )


def test_peak_rss_delta_sees_torch_allocations():
    def work():
        x = torch.ones(16 * 2**20)  # 64 MiB of float32, touched
        return float(x.sum())

    result = harness.peak_rss_delta(work, calls=1)
    assert result["peak_delta_bytes"] >= 56 * 2**20


@pytest.mark.skipif(not HAS_REFERENCE, reason="x-transformers is not installed")
def test_speed_train_smoke_end_to_end(tmp_path, capsys):
    from benchmarks.__main__ import main

    out = tmp_path / "train.json"
    args = ["speed/train", "--smoke", "--out", str(out), "--warmup", "1", "--repeats", "2"]
    assert main([*args, "--workload", "backbone", "--no-memory", "--threads", "1"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "| backbone | demask / reference |" in printed
    rec = json.loads(out.read_text())
    assert rec["suite"] == "speed/train" and rec["config"]["dim"] == 32
    entry = rec["results"]["backbone"]
    d, r = entry["rows"]["demask"], entry["rows"]["reference"]
    assert d["repeats"] == r["repeats"] == 2
    assert d["tokens_per_call"] == r["tokens_per_call"] == 2 * 16
    assert entry["ratio_tokens_per_s"] == pytest.approx(d["tokens_per_s"] / r["tokens_per_s"])
    assert rec["matmul_peak"]["median_gflops"] > 0


def test_memory_probe_runs_in_a_subprocess():
    from benchmarks import speed_train

    cfg = {"dim": 32, "depth": 1, "heads": 2, "num_tokens": 17, "seq_len": 16, "batch": 2}
    speed_train.Config(**cfg)  # the probe rebuilds the same config from this dict
    got = harness.measure_memory_subprocess("benchmarks.speed_train", "backbone", "demask", cfg)
    assert got["lib"] == "demask" and got["workload"] == "backbone"
    assert got["peak_delta_bytes"] > 0


def test_unknown_suite_is_rejected(capsys):
    from benchmarks.__main__ import main

    assert main(["nope"]) == 2
    assert "suite must be one of" in capsys.readouterr().err


def test_logits_adapter_gives_demask_nelbo_unchanged():
    """Scoring a net through LogitsAsEmbeddings (how the reference is evaluated) is neutral: a
    demask net gives the same NELBO through it as through its own wrapper, mask for mask."""
    from benchmarks.libs import build_net, load
    from benchmarks.quality import LogitsAsEmbeddings

    lib = load("demask")
    torch.manual_seed(0)
    net = build_net(lib, causal=False, num_tokens=9, max_seq_len=12, dim=16, depth=1, heads=2)
    own = lib.NonAutoregressiveWrapper(net, mask_id=8)
    adapted = lib.NonAutoregressiveWrapper(LogitsAsEmbeddings(net, 9, 12), mask_id=8)
    x = torch.randint(0, 8, (3, 12), generator=torch.Generator().manual_seed(1))
    a = own.nelbo(x, generator=torch.Generator().manual_seed(2))
    b = adapted.nelbo(x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert bool((a > 0).all())


def test_logits_adapter_makes_the_self_conditioning_passes():
    """With `to_self_cond` the adapter makes the self-conditioned wrapper's two passes: a demask
    net with `self_cond=True` gives the same NELBO through it as through its own wrapper, and a
    different one from a single pass (so the second pass is really fed by the first)."""
    from benchmarks.libs import build_net, load
    from benchmarks.quality import LogitsAsEmbeddings

    lib = load("demask")
    torch.manual_seed(0)
    net = build_net(lib, causal=False, num_tokens=9, max_seq_len=12, dim=16, depth=1, heads=2)
    own = lib.NonAutoregressiveWrapper(net, mask_id=8, self_cond=True)
    with torch.no_grad():
        own.to_self_cond.weight.normal_(0.0, 1.0)  # a projection that moves the logits
    two = LogitsAsEmbeddings(net, 9, 12, to_self_cond=own.to_self_cond)
    one = LogitsAsEmbeddings(net, 9, 12)
    x = torch.randint(0, 8, (3, 12), generator=torch.Generator().manual_seed(1))
    bits = {
        name: lib.NonAutoregressiveWrapper(adapter, mask_id=8).nelbo(
            x, generator=torch.Generator().manual_seed(2)
        )
        for name, adapter in (("two", two), ("one", one))
    }
    a = own.nelbo(x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, bits["two"], rtol=1e-5, atol=1e-6)
    assert float((a - bits["one"]).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="sum_embeds"):
        two(x, sum_embeds=torch.zeros(3, 12, 16))


def _shakespeare_present() -> bool:
    from benchmarks import quality

    return quality.DATA.exists()


needs_quality_data = pytest.mark.skipif(
    not (HAS_REFERENCE and _shakespeare_present()),
    reason="needs x-transformers and ../shared/data/shakespeare beside the clone",
)


def test_default_data_folder_lies_beside_the_clone():
    from benchmarks import quality

    expected = REPO.parent / "shared" / "data" / "shakespeare"
    assert expected == quality.DATA
    assert quality.Config().data == str(quality.DATA)


@pytest.mark.parametrize("suite", ["quality", "frontier"])
def test_missing_data_folder_is_named_in_the_error(tmp_path, suite):
    from benchmarks.__main__ import main

    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        main([suite, "--smoke", "--threads", "1", "--data", str(missing),
              "--out", str(tmp_path / "r.json")])  # fmt: skip


@needs_quality_data
def test_quality_smoke_trains_and_evaluates_every_model(tmp_path, capsys):
    from benchmarks import quality
    from benchmarks.__main__ import main

    out, saved = tmp_path / "quality.json", tmp_path / "models"
    assert main(["quality", "--smoke", "--threads", "1", "--out", str(out),
                 "--save", str(saved)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "masked NELBO demask / reference-masked-mdlm:" in printed
    rec = json.loads(out.read_text())
    assert list(rec["results"]) == list(quality.MODELS)
    assert "reference-masked-mdlm" in quality.MODELS and "reference-masked-mdlm" in quality.__doc__
    for name, run in rec["results"].items():
        assert 0 < run["val_bits_per_byte"] < 20, name
        assert len(run["losses"]) == quality.SMOKE.steps
        assert (saved / f"{name}.pt").exists()
    mdlm = rec["results"]["reference-masked-mdlm"]
    assert mdlm["library"] == "reference" and mdlm["masked"] is True
    assert mdlm["wrapper_kwargs"] == {"use_simple_mdlm_loss_weight": False}
    assert all(loss > 0 for loss in mdlm["losses"])  # a mean cross-entropy, never negative
    model = quality.build_model("reference-masked-mdlm", quality.SMOKE)
    assert model.loss_weight_fn is None  # the reference's switch took effect
    assert quality.build_model("reference-masked", quality.SMOKE).loss_weight_fn is not None
    rotary = quality.build_model("demask-masked-rotary", quality.SMOKE).net
    assert rotary.attn_layers.rotary is not None and rotary.abs_pos_attn is not None  # + bias
    assert rec["results"]["demask-masked-rotary"]["layer_kwargs"] == {"rotary_pos_emb": True}
    absorb = quality.build_model("demask-masked-absorb", quality.SMOKE)
    assert (absorb.no_replace_prob, absorb.random_token_prob) == (0.0, 0.0)
    assert rec["results"]["demask-masked-absorb"]["wrapper_kwargs"] == {
        "no_replace_prob": 0.0,
        "random_token_prob": 0.0,
    }


@needs_quality_data
@pytest.mark.parametrize(
    ("options", "masked_models", "samplers"),
    [
        # the default samplers and masked models
        ([], ["demask-masked", "reference-masked", "reference-masked-mdlm"],
         ["seed-default", "ancestral", "dilated-seed-cosine-t1.0-f0.7"]),
        (["--no-reference", "--samplers", "ancestral"], ["demask-masked"], ["ancestral"]),
        (["--no-reference", "--samplers", "dilated-seed-cosine-t1.2-f0.7", "--repeats", "2"],
         ["demask-masked"], ["dilated-seed-cosine-t1.2-f0.7"]),
        (["--masked-models", "demask-masked-rotary", "reference-masked-mdlm-rotary",
          "--samplers", "seed-default"],
         ["demask-masked-rotary", "reference-masked-mdlm-rotary"], ["seed-default"]),
    ],
)  # fmt: skip
def test_frontier_smoke_one_row_per_model_sampler_and_steps(
    tmp_path, options, masked_models, samplers
):
    from benchmarks import frontier
    from benchmarks.__main__ import main

    out, png = tmp_path / "frontier.json", tmp_path / "frontier.png"
    args = ["frontier", "--smoke", "--threads", "1", "--steps", "2", "3", "--out", str(out)]
    assert main([*args, "--png", str(png), *options]) == 0
    assert png.stat().st_size > 0
    rec = json.loads(out.read_text())
    rows = rec["results"]
    assert len(rows) == len(masked_models) * 2 * len(samplers) + 2  # + AR row + validation text
    assert rec["config"]["samplers"] == samplers and rec["config"]["steps"] == [2, 3]
    assert rows[0]["model"] == "validation text" and rows[0]["sampler"] is None
    assert rows[1]["model"] == "demask-ar" and rows[1]["sampler"] == "ar-default"
    repeats = rec["config"]["repeats"]
    assert repeats == (2 if "--repeats" in options else 1)
    for r in rows[1:]:  # one wall time per call; the median is the row's
        assert len(r["wall_s_each"]) == repeats
        assert r["wall_s"] == statistics.median(r["wall_s_each"])
    masked = rows[2:]
    assert {r["model"] for r in masked} == set(masked_models)
    for r in masked:
        assert r["sampler"] in samplers and r["steps"] in (2, 3)
        assert r["sampler_kwargs"] == frontier.SAMPLERS[r["sampler"]]
        assert r["decoder"] in ("demask", "reference")
        assert 0 <= r["unigram_entropy_bits"] <= 8 and r["gen_ppl"] > 0
    combos = [(r["model"], r["sampler"], r["steps"]) for r in masked]
    assert len(set(combos)) == len(combos)
    ancestral = frontier.SAMPLERS["ancestral"]
    assert ancestral["sampler"] == "ancestral" and ancestral["filter_thres"] == 0.0
    assert ancestral["anneal_temperature"] is False
    for r in masked:  # the reference has no ancestral sampler: demask's loop runs its logits
        lib = "demask" if r["model"].startswith("demask") else "reference"
        assert r["decoder"] == (lib if r["sampler"] == "seed-default" else "demask")


@needs_quality_data
def test_ablation_smoke_one_record_per_row_and_seed(tmp_path, capsys):
    from benchmarks import ablation
    from benchmarks.__main__ import main

    out = tmp_path / "ablation.json"
    rows = ["demask-count-resid-is", "demask-ce-resid"]
    argv = ["ablation", "--smoke", "--jobs", "1", "--seeds", "0", "1", "--out", str(out)]
    assert main([*argv, "--rows", *rows]) == 0
    rec = json.loads(out.read_text())
    assert [(r["row"], r["seed"]) for r in rec["results"]] == [
        (row, seed) for seed in (0, 1) for row in rows
    ]
    for r in rec["results"]:
        assert 0 < r["nelbo"] < 20 and 0 < r["ce_t005"] < 20
    assert "| demask-ce-resid" in capsys.readouterr().out
    # each row's change takes effect on the model it builds
    cfg = ablation.Config(seq_len=32, dim=32, depth=2, heads=2)
    model = ablation.build(ablation.ROWS["demask-count-resid-is"], cfg)
    assert (model.mdlm_estimator, model.mdlm_count_power) == ("count", 0.5)
    out_std = float(model.net.attn_layers.blocks[0].attn.to_out.weight.std())
    assert abs(out_std - 0.02 / 2) < 0.003  # 0.02 / sqrt(2 * depth)
    assert (
        ablation.build(ablation.ROWS["demask-ce-resid"], cfg).use_simple_mdlm_loss_weight is False
    )
    # rotary rows are rotary alone unless the row asks for the position bias; absolute rows get
    # the Encoder's default (the bias)
    assert ablation.build(ablation.ROWS["demask-count-resid-is"], cfg).net.abs_pos_attn is None
    both = ablation.build(ablation.ROWS["demask-is-posbias"], cfg).net
    assert both.attn_layers.rotary is not None and both.abs_pos_attn is not None
    absolute = dataclasses.replace(cfg, positions="absolute")
    assert ablation.build(ablation.ROWS["demask-count-resid-is"], absolute).net.abs_pos_attn
    assert ablation.build(ablation.ROWS["demask-is-p1"], absolute).mdlm_count_power == 1.0
    # the initialisation rows: zero heads and outputs, projections at gain / sqrt(fan_in)
    wide = dataclasses.replace(cfg, dim=256)
    head = ablation.build(ablation.ROWS["demask-pb-headzero"], wide).net.to_logits.weight
    assert int(head.count_nonzero()) == 0
    blocks = ablation.build(ablation.ROWS["demask-pb-residzero"], wide).net.attn_layers.blocks
    assert all(int(b.ff.proj_out.weight.count_nonzero()) == 0 for b in blocks)
    assert all(int(b.attn.to_out.weight.count_nonzero()) == 0 for b in blocks)
    block = ablation.build(ablation.ROWS["demask-pb-fanin0.5"], wide).net.attn_layers.blocks[0]
    qkv_std = float(block.attn.to_qkv.weight.detach().std())
    out_std = float(block.ff.proj_out.weight.detach().std())
    assert abs(qkv_std - 0.5 / 16) < 0.002  # fan_in 256
    assert abs(out_std - 0.5 / 32 / 2) < 0.001  # fan_in 1024, and 1 / sqrt(2 * depth 2)
    # the SwiGLU rows: a gated feed-forward at 8/3 of the width, as many weights as the plain MLP
    for plain, gated in (("demask-ce-posbias", "demask-ce-pb-swiglu"),
                         ("reference-ce", "reference-ce-swiglu")):  # fmt: skip
        n_plain, n_gated = (
            sum(p.numel() for p in ablation.build(ablation.ROWS[r], cfg).parameters())
            for r in (plain, gated)
        )
        assert abs(n_gated - n_plain) <= 2 * 32, (plain, n_plain, n_gated)  # biases and rounding
    ff = ablation.build(ablation.ROWS["demask-pb-swiglu"], cfg).net.attn_layers.blocks[0].ff
    assert ff.glu and ff.proj_in.out_features == 2 * int(32 * 8 / 3)
    # the Muon rows on top of mean CE: tied tables, QK-norm, the update RMS swept
    tied = ablation.build(ablation.ROWS["demask-ce-pb-swiglu-muon-tied"], cfg).net
    assert tied.to_logits.weight is tied.token_emb.weight
    qk = ablation.build(ablation.ROWS["demask-ce-pb-swiglu-muon-qknorm"], cfg).net
    assert all(b.attn.qk_norm for b in qk.attn_layers.blocks)
    assert ablation.ROWS["demask-ce-pb-swiglu-muon01"].train == {"optimizer": "muon",
                                                                   "muon_rms": 0.1}  # fmt: skip
    # the architecture rows: the same logits as the default at the start (the relative bias and
    # the skip start at zero; ALiBi's slopes do not), and their parameters get gradients
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    base = ablation.build(ablation.ROWS["demask-is-posbias"], cfg).net
    for name, added, same in (("rel", "extra_bias", True), ("alibi", "extra_bias", False),
                              ("x0", "attn_layers", True)):  # fmt: skip
        net = ablation.build(ablation.ROWS[f"demask-pb-{name}"], cfg).net
        logits = net(x)
        assert torch.equal(logits, base(x)) == same, name
        logits.logsumexp(-1).sum().backward()
        grads = [p.grad for p in ([net.attn_layers.input_skip] if added == "attn_layers"
                                  else getattr(net, added).parameters())]  # fmt: skip
        assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads), name


def test_the_library_recipe_row_computes_what_the_ablation_modules_did():
    """The row built from the library's options (zero-started outputs, the input skip, the
    relative bias, bell masking) gives the module row's loss, bit for bit."""
    from benchmarks import ablation

    cfg = ablation.Config(seq_len=32, dim=32, depth=2, heads=2)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for name in ("demask-ce-recipe-swiglu-muon01", "demask-pb-bell-combo-swiglu-muon01"):
        model = ablation.build(ablation.ROWS[name], cfg)
        torch.manual_seed(3)
        losses.append(model(x).loss)
    assert torch.equal(losses[0], losses[1])
    net = ablation.build(ablation.ROWS["demask-ce-recipe-swiglu-muon01"], cfg).net
    assert net.rel_pos_attn is not None and net.attn_layers.input_skip is not None


def test_positions_smoke_one_record_per_row_and_source(tmp_path, capsys):
    from benchmarks import positions
    from benchmarks.__main__ import main

    out = tmp_path / "positions.json"
    assert main(["positions", "--smoke", "--sources", "chain", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert [r["row"] for r in rec["results"]] == list(positions.ROWS)
    assert all(0 < r["ce_t005_bits"] < 20 for r in rec["results"])
    assert "| chain  | bias" in capsys.readouterr().out  # the chain's law: tests/test_data.py


def test_frontier_rebuilds_a_rotary_net_saved_without_absolute_positions():
    """Rotary masked nets saved before config format 4 had no position table: frontier builds
    them rotary alone so that their state dict loads; newer ones (and the AR net) as they are."""
    from benchmarks import frontier, quality

    cfg = quality.SMOKE
    old = quality.build_model("demask-masked-rotary", cfg, {"abs_pos_attn_bias": False})
    new = quality.build_model("demask-masked-rotary", cfg)
    for saved, expected in ((old, {"abs_pos_attn_bias": False}), (new, None)):
        state = saved.state_dict()
        kwargs = frontier._saved_net_kwargs("demask-masked-rotary", state)
        assert kwargs == expected
        quality.build_model("demask-masked-rotary", cfg, kwargs).load_state_dict(state)
    ar = quality.build_model("demask-ar", cfg).state_dict()
    assert frontier._saved_net_kwargs("demask-ar", ar) is None


def test_objective_rows_complementary_pairs_and_unweighted_loss():
    """The ablation's loss variants: complementary pairs predict every fillable token of a window
    exactly once; the unweighted variant is the plain mean over rows of each row's mean CE."""
    from benchmarks import ablation, objective_rows
    from demask.objectives.masked import MaskedObjective
    from demask.schedules import get_schedule

    base = MaskedObjective(get_schedule("linear"), 9, 9, 0.0, 0.0, 0.0, True)
    pair = objective_rows.CountVariant(base, lambda k: k**-0.5, complementary=True)
    fillable = torch.ones(6, 20, dtype=torch.bool)
    fillable[:, :3] = False  # a given prefix is never masked
    fillable[3:] = fillable[:3]
    torch.manual_seed(0)
    mask, counts, weights = pair._masks(fillable)
    assert torch.equal(mask[:3] | mask[3:], fillable[:3])
    assert not bool((mask[:3] & mask[3:]).any())
    assert torch.equal(counts, mask.sum(-1)) and torch.equal(weights[:3], weights[3:])
    # the loss each variant returns, against a hand computation from the same draw
    x = torch.randint(0, 9, (4, 16))
    ce_all = torch.rand(4, 16)

    def predict(inp, m):
        rows, cols = m.nonzero(as_tuple=True)
        return ce_all[rows, cols], torch.zeros(len(rows), 9), rows, cols

    cond = torch.zeros(4, 16, dtype=torch.bool)
    unweighted = objective_rows.CountVariant(base, lambda k: k, weighted=False)
    torch.manual_seed(1)
    loss = unweighted(x, cond, predict)[0]
    torch.manual_seed(1)
    m, k, _ = unweighted._masks(~cond)
    expected = ((ce_all * m).sum(-1) / k).mean()
    assert torch.allclose(loss, expected)
    # the rows install their variant: training goes through it, scoring through the base NELBO
    cfg = ablation.Config(seq_len=32, dim=32, depth=2, heads=2)
    model = ablation.build(ablation.ROWS["demask-pb-compl"], cfg)
    assert isinstance(model._objective(), objective_rows.CountVariant)
    assert model._objective().complementary
    assert float(model.nelbo(torch.randint(0, 256, (2, 32)), num_times=2).mean()) > 0


def test_lr_factor_warmup_constant_then_linear_cooldown():
    from benchmarks import quality

    cfg = quality.Config(steps=10, warmup=2, cooldown=0.3)
    assert [quality.lr_factor(s, cfg) for s in range(10)] == [
        0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2 / 3, 1 / 3
    ]  # fmt: skip
    plain = dataclasses.replace(cfg, cooldown=0.0)
    assert [quality.lr_factor(s, plain) for s in range(10)] == [0.5] + [1.0] * 9
    with pytest.raises(ValueError, match="cooldown must be a fraction in \\[0, 1\\), got 1.0"):
        quality.lr_factor(0, dataclasses.replace(cfg, cooldown=1.0))
    from benchmarks import ablation

    assert ablation.ROWS["demask-ce-recipe-swiglu-muon01-cd30"].train["cooldown"] == 0.3


def test_qkv_conv_starts_as_the_identity_and_adds_each_neighbour():
    """The Primer convolution row: the same logits as the recipe at the start; with a kernel
    set, a block's q/k/v at i gain w0 x[i-1] + w1 x[i] + w2 x[i+1] of the projection (zero past
    the ends), and every kernel gets gradients once the attention outputs are not zero."""
    from benchmarks import ablation

    cfg = ablation.Config(seq_len=16, dim=32, depth=2, heads=2)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    base = ablation.build(ablation.ROWS["demask-ce-recipe-swiglu-muon01"], cfg).net
    torch.manual_seed(0)
    net = ablation.build(ablation.ROWS["demask-ce-recipe-conv-swiglu-muon01"], cfg).net
    assert torch.equal(net(x), base(x))
    proj = net.attn_layers.blocks[1].attn.to_qkv
    w = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        net.qkv_conv.convs[1].weight.copy_(w.expand_as(net.qkv_conv.convs[1].weight))
    h = torch.randn(2, 16, 32)
    plain = torch.nn.functional.linear(h, proj.weight)
    pad = torch.nn.functional.pad(plain, (0, 0, 1, 1))
    want = plain + w[0] * pad[:, :-2] + w[1] * pad[:, 1:-1] + w[2] * pad[:, 2:]
    torch.testing.assert_close(proj(h), want)
    # the recipe starts the attention outputs at zero, where no gradient reaches q, k and v
    for block in net.attn_layers.blocks:
        torch.nn.init.normal_(block.attn.to_out.weight, std=0.02)
    net(x).logsumexp(-1).sum().backward()
    assert all(bool(c.weight.grad.abs().sum() > 0) for c in net.qkv_conv.convs)


def test_partial_masking_with_one_digit_is_demask_nelbo():
    """With a byte as one base-256 digit, partial masking is plain masking: the same net gives
    the same NELBO as demask's wrapper, mask for mask (the same seeded draws)."""
    from benchmarks.libs import build_net, load
    from benchmarks.partial_masking import PartialMasking

    lib = load("demask")
    torch.manual_seed(0)
    net = build_net(lib, causal=False, num_tokens=257, max_seq_len=12, dim=16, depth=1, heads=2,
                    net_kwargs={"logits_dim": 256})  # fmt: skip
    x = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.random.fork_rng():
        torch.manual_seed(5)
        mine, count = PartialMasking(net, base=256, parts=1).likelihood_bits(x, num_times=8)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        theirs, _ = lib.NonAutoregressiveWrapper(net, mask_id=256).likelihood_bits(x, num_times=8)
    assert count == 36
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)


def test_partial_masking_digit_losses_are_the_joint_distributions_marginals():
    """Two base-16 digits per byte: a hidden digit's loss is -log of the net's byte distribution
    restricted to the visible digit and summed over the hidden one, computed here by hand."""
    from benchmarks.libs import build_net, load
    from benchmarks.partial_masking import PartialMasking, num_states

    torch.manual_seed(0)
    net = build_net(load("demask"), causal=False, num_tokens=num_states(16, 2), max_seq_len=6,
                    dim=16, depth=1, heads=2, net_kwargs={"logits_dim": 256})  # fmt: skip
    model = PartialMasking(net, base=16, parts=2)
    x = torch.tensor([[0x41, 0x62, 0x20, 0x7A, 0x0F, 0xF0]])
    hidden = torch.tensor([[[1, 1], [1, 0], [0, 1], [0, 0], [1, 1], [0, 1]]], dtype=torch.bool)
    ids = model.state_ids(x, hidden)
    # the id of (hi state, lo state), 16 for a hidden digit: hi + 17 * lo
    assert ids.tolist() == [[16 + 17 * 16, 16 + 17 * 2, 2 + 17 * 16, 7 + 17 * 10, 16 + 17 * 16,
                             15 + 17 * 16]]  # fmt: skip
    got = model.digit_nats(x, hidden)
    logp = net(ids).log_softmax(-1).view(1, 6, 16, 16)  # [hi, lo]
    want = torch.zeros(1, 6, 2)
    for i in range(6):
        hi, lo = int(x[0, i]) // 16, int(x[0, i]) % 16
        grid = logp[0, i]
        if hidden[0, i, 0] and hidden[0, i, 1]:
            want[0, i, 0] = -grid.logsumexp(1)[hi]
            want[0, i, 1] = -grid.logsumexp(0)[lo]
        elif hidden[0, i, 0]:  # lo visible: hi given lo
            want[0, i, 0] = -grid[:, lo].log_softmax(0)[hi]
        elif hidden[0, i, 1]:  # hi visible: lo given hi
            want[0, i, 1] = -grid[hi].log_softmax(0)[lo]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float(got[0, 3].detach().abs().sum()) == 0.0  # nothing hidden, nothing scored


def test_rate_embedding_starts_neutral_and_adds_the_rows_masked_share():
    """The masked-share row: the same logits as its base at the start; with a projection set,
    every token embedding of a row gains proj(r, sin(pi k r), cos(pi k r)) for that row's
    share r of mask tokens, computed here by hand."""
    from benchmarks import ablation

    cfg = ablation.Config(seq_len=16, dim=32, depth=2, heads=2)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    x[0, :4] = 256  # row 0: 4 of 16 masked; row 1: none
    torch.manual_seed(0)
    base = ablation.build(ablation.ROWS["demask-ce-recipe-st2-swiglu-muon01-cd30"], cfg).net
    torch.manual_seed(0)
    net = ablation.build(ablation.ROWS["demask-ce-recipe-st2-rate-swiglu-muon01-cd30"], cfg).net
    assert torch.equal(net(x), base(x))
    w = torch.randn(32, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        net.rate_emb.proj.weight.copy_(w)
    k = torch.arange(1, 5) * math.pi
    for row, r in ((0, 0.25), (1, 0.0)):
        feats = torch.cat([torch.tensor([r]), torch.sin(k * r), torch.cos(k * r)])
        want = base.token_emb(x[row]) + w @ feats
        torch.testing.assert_close(net.token_emb(x[row : row + 1])[0], want.expand(16, 32))


def test_ar_aux_rows_run_left_to_right_and_add_the_next_byte_loss():
    """The hybrid probe's causal pass reads no later token (the token shift included), restores
    the bidirectional net after it, and its training loss is the masked loss of the other rows
    plus the next-byte cross-entropy of the first rows, computed here by hand."""
    import torch.nn.functional as F

    from benchmarks import ablation, ar_aux

    cfg = ablation.Config(seq_len=32, dim=32, depth=2, heads=2)
    model = ablation.build(ablation.ROWS["demask-ce-recipe-st2-araux2-swiglu-muon01-cd30"], cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # off the zero starts, so that every path carries signal
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, 256, (6, 32))
    y = x.clone()
    y[:, 20] = (y[:, 20] + 1) % 256
    model.eval()
    with torch.no_grad(), ar_aux.causal(model.net):
        a, b = model.net(x), model.net(y)
    assert torch.equal(a[:, :20], b[:, :20]) and not torch.allclose(a[:, 20:], b[:, 20:])
    with torch.no_grad():  # outside the block the net is bidirectional again
        assert not torch.allclose(model.net(x)[:, :20], model.net(y)[:, :20])
    model.train()
    torch.manual_seed(1)
    loss = model(x)
    torch.manual_seed(1)
    masked = type(model).forward(model, x[2:]).loss
    with ar_aux.causal(model.net):
        logits = model.net(x[:2])
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:2, 1:].reshape(-1))
    assert torch.allclose(loss, masked + by_hand)
