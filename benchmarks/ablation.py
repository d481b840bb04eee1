"""ablation: one change per row against the reference, several seeds, masked models on bytes.

Each row trains one masked model with the quality suite's recipe (`benchmarks.quality`: the
Shakespeare bytes, seq 256, AdamW at lr 1e-3 with a 20-step warm-up, gradient norm clipped at 1,
the same batches for every row at a given seed) and scores it with demask's evaluator: the
validation NELBO in bits per byte (32 windows, 32 fixed times) and the cross-entropy of the masked
bytes with exactly 5% of the bytes masked (13 of 256), which shows whether the model uses its
context (the unigram entropy of these bytes is about 4.8 bits).

Rows are changes to demask's masked model, and the reference library's masked model with its
better objective (`use_simple_mdlm_loss_weight=False`, mean cross-entropy). The `--positions`
option picks rotary or learned absolute positions (the seed configuration) for every row.
Jobs (row x seed) run in `--jobs` processes of one thread each, seed-major, so a partial run
already has every row at the first seeds. The table gives the mean and the spread (min-max).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from benchmarks import harness, objective_rows, partial_masking, quality
from benchmarks.ablation_inits import INITS, baseline_init
from benchmarks.ablation_rows import ROWS as BASE_ROWS
from benchmarks.ablation_rows import Row
from benchmarks.ablation_rows_muon import MUON_ROWS
from benchmarks.libs import build_net, load

__all__ = ["INITS", "NAME", "ROWS", "Config", "Row", "build", "main", "run_job"]

NAME = "ablation"
ROWS: dict[str, Row] = {**BASE_ROWS, **MUON_ROWS}


@dataclass(frozen=True)
class Config(quality.Config):
    dim: int = 128
    steps: int = 400
    positions: str = "rotary"  # rotary | absolute
    ce_windows: int = 32
    ce_draws: int = 4  # mask draws per window for the 5% cross-entropy


def build(row: Row, cfg: Config) -> nn.Module:
    lib = load(row.lib)
    torch.manual_seed(cfg.seed)
    layers, net_kwargs = dict(row.layers), dict(row.net)
    if cfg.positions == "rotary":
        layers["rotary_pos_emb"] = True
        if row.lib == "demask":  # rotary alone, as every rotary row was screened, unless asked
            net_kwargs.setdefault("abs_pos_attn_bias", False)
    base = partial_masking.digit_base(row.parts)
    if row.parts > 1:  # one input id per digit state, one logit per byte value
        net_kwargs["logits_dim"] = 256
    num_tokens = 257 if row.parts == 1 else partial_masking.num_states(base, row.parts)
    net = build_net(lib, causal=False, num_tokens=num_tokens, max_seq_len=cfg.seq_len, dim=cfg.dim,
                    depth=cfg.depth, heads=cfg.heads, net_kwargs=net_kwargs, **layers)  # fmt: skip
    torch.manual_seed(cfg.seed + 1)
    if row.lib == "demask":
        from demask.model.init import init_position_bias

        baseline_init(net)
        init_position_bias(net)  # the position bias's own start (no-op without one)
    for name in row.init:
        INITS[name](net)
    if row.parts > 1:  # it trains only as the recipe does: mean CE over bell-shaped counts
        recipe = {"use_simple_mdlm_loss_weight": False, "train_masking": "bell"}
        if row.wrapper != recipe or (row.estimator, row.count_power, row.objective) != (None,) * 3:
            raise ValueError(f"a partial-masking row trains with {recipe} only, got {row}")
        return partial_masking.PartialMasking(net, base, row.parts)
    model = lib.NonAutoregressiveWrapper(net, mask_id=256, **row.wrapper)
    if row.estimator is not None:
        model.mdlm_estimator = row.estimator
    if row.count_power is not None:
        model.mdlm_count_power = row.count_power
    if row.objective is not None:
        objective_rows.install(row.objective, model)
    return model


def logits_net(model: Any, cfg: Config) -> nn.Module:
    """tokens (B, N) -> logits (B, N, V) of either library's masked wrapper `model`, with its
    self-conditioning's two passes when it has them (both libraries name the projection
    `to_self_cond`; the reference defines it only when self-conditioning)."""
    if isinstance(model, partial_masking.PartialMasking):
        return partial_masking.BytesAsStates(model)
    to_self_cond = getattr(model, "to_self_cond", None)
    return quality.LogitsAsEmbeddings(model.net, 257, cfg.seq_len, to_self_cond=to_self_cond)


def scored_wrapper(row: Row, model: Any, cfg: Config) -> nn.Module:
    """A demask wrapper that scores `model` (the reference's logits through an adapter)."""
    if row.lib == "demask":
        return model  # its NELBO makes the self-conditioning passes itself (or a digits' NELBO)
    return load("demask").NonAutoregressiveWrapper(logits_net(model, cfg), mask_id=256)


def run_job(job: tuple[str, int, dict[str, Any]]) -> dict[str, Any]:
    name, seed, cfg_dict = job
    torch.set_num_threads(1)
    row = ROWS[name]
    cfg = Config(**{**cfg_dict, "seed": seed, **row.train})
    evaluate, get_batch, get_dataset = quality._demask_modules()
    train_ds = get_dataset(cfg.data, split="train", seq_len=cfg.seq_len)
    val_ds = get_dataset(cfg.data, split="val", seq_len=cfg.seq_len)
    windows = quality.eval_windows(val_ds, cfg.eval_windows)
    model = build(row, cfg)
    run = quality.train(model, cfg, train_ds, get_batch)
    scored = scored_wrapper(row, model, cfg)
    bits = evaluate.likelihood_bits_per_token(scored, windows, cfg.eval_batch, seed=0)
    ce5 = evaluate.masked_cross_entropy_bits(
        logits_net(model, cfg), torch.stack(windows[: cfg.ce_windows]), round(0.05 * cfg.seq_len), 256,
        torch.Generator().manual_seed(0), draws=cfg.ce_draws,
    )  # fmt: skip
    out = {"row": name, "seed": seed, "nelbo": bits, "ce_t005": ce5, "train_s": run["train_s"]}
    out["final_loss_mean10"] = sum(run["losses"][-10:]) / 10
    print(f"{name} seed {seed}: NELBO {bits:.4f}, CE@5% {ce5:.3f} ({run['train_s']:.0f} s)",
          flush=True)  # fmt: skip
    return out


def summarise(results: list[dict[str, Any]], rows: list[str]) -> list[list[Any]]:
    ref = [r["nelbo"] for r in results if r["row"] == "reference-ce"]
    ref_mean = statistics.mean(ref) if ref else float("nan")
    table = []
    for name in rows:
        got = [r for r in results if r["row"] == name]
        if not got:
            continue
        nelbo = [r["nelbo"] for r in got]
        ce = [r["ce_t005"] for r in got]
        mean = statistics.mean(nelbo)
        table.append([name, len(got), f"{mean:.3f}", f"{min(nelbo):.3f}-{max(nelbo):.3f}",
                      f"{mean / ref_mean:.3f}", f"{statistics.mean(ce):.3f}", ROWS[name].note])  # fmt: skip
    return table


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--positions", choices=("rotary", "absolute"), default="rotary")
    p.add_argument("--jobs", type=int, default=2, help="processes, one thread each")
    p.add_argument("--data", default=None, help="the Shakespeare folder")


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = Config(positions=args.positions)
    if args.smoke:
        cfg = replace(cfg, **{k: v for k, v in asdict(quality.SMOKE).items() if k != "data"},
                      ce_windows=4, ce_draws=1)  # fmt: skip
    for k in ("steps", "dim"):
        if getattr(args, k) is not None:
            cfg = replace(cfg, **{k: getattr(args, k)})
    cfg = replace(cfg, data=str(quality.data_folder(args.data)))
    jobs = [(name, seed, asdict(cfg)) for seed in args.seeds for name in args.rows]
    start = time.perf_counter()
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = list(pool.imap(run_job, jobs))
    else:
        results = [run_job(j) for j in jobs]
    table = summarise(results, args.rows)
    print(f"## {NAME}  (config {asdict(cfg)}; seeds {args.seeds}; "
          f"{time.perf_counter() - start:.0f} s)")  # fmt: skip
    print(harness.format_table(
        ["row", "seeds", "NELBO mean", "min-max", "/ reference", "CE@5% bits", "change"], table))  # fmt: skip
    return harness.record(NAME, asdict(cfg), results, seeds=args.seeds, args=vars(args))
