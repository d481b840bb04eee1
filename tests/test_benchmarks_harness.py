"""The benchmark harness: tables, JSON, interleaved timing, FLOP formulas, the memory probe, and
one speed suite end to end in --smoke mode (skipped without the reference library)."""

from __future__ import annotations

import importlib.util
import json
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
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


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
