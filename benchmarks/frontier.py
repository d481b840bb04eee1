"""frontier: masked generation steps vs sample quality vs wall time, against autoregressive decoding.

Uses the models that `python -m benchmarks quality --save runs/bench/quality_models` trained
(Shakespeare bytes, seq 256, dim 256, depth 4, heads 4). For steps in 8, 16, ..., 256 the masked
model generates `samples` sequences of 256 bytes with the seed's default sampling
(`generate(batch_size=samples)`: start_temperature 1 annealed to 0, filter_thres 0.7, confidence
remasking); the autoregressive model generates 255 bytes after a one-byte prompt (a newline) with
its defaults (temperature 1, top-k filter), with the key/value cache. Reported per setting:

  wall s        one batched generate call (after one untimed warmup call of each model)
  gen PPL       generative perplexity: 2 ** (bits per byte of bytes 1..255 of each sample under
                the demask autoregressive model, averaged over the samples' bytes)
  unigram H     entropy (bits) of each sample's byte histogram, averaged over samples; low values
                flag the repetitive text that a low gen PPL can hide

The same two figures for validation windows of real text are the reference line. A PNG plots gen
PPL against wall time and unigram entropy against steps. The reference library's masked model is
measured too when its trained state is present.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import harness, quality
from benchmarks.libs import load, reference_available

NAME = "frontier"


@dataclass(frozen=True)
class Config:
    steps: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    samples: int = 8
    seed: int = 0


SMOKE = Config(steps=(2, 4), samples=2)


def unigram_entropy_bits(x: Tensor, num_tokens: int = 256) -> Tensor:
    """(B,) entropy in bits of each row's token histogram; x (B, N) long."""
    counts = torch.zeros(x.shape[0], num_tokens, dtype=torch.float64)
    counts.scatter_add_(1, x, torch.ones_like(x, dtype=torch.float64))
    p = counts / counts.sum(1, keepdim=True)
    return -(p * torch.log2(p.clamp_min(1e-300))).sum(1)


@torch.no_grad()
def ar_bits_per_byte(ar_net: nn.Module, x: Tensor) -> float:
    """Mean bits per byte of x[:, 1:] given the prefix, under the autoregressive net (exact)."""
    logits = ar_net(x[:, :-1]).float()  # (B, N-1, V)
    nats = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
    )
    return float(nats) / math.log(2)


def _score(ar_net: nn.Module, x: Tensor) -> dict[str, Any]:
    bits = ar_bits_per_byte(ar_net, x)
    sample = bytes(int(b) for b in x[0].tolist()).decode("utf-8", errors="replace")
    return {"gen_bits_per_byte": bits, "gen_ppl": 2.0**bits,
            "unigram_entropy_bits": float(unigram_entropy_bits(x).mean()),
            "first_sample": sample}  # fmt: skip


def _load_models(
    qcfg: quality.Config, folder: Path | None, smoke: bool, reference: bool = True
) -> dict[str, nn.Module]:
    """The trained quality models (or, in smoke mode, tiny ones trained for a few steps)."""
    _, get_batch, get_dataset = quality._demask_modules()
    models: dict[str, nn.Module] = {}
    names = ("demask-masked", "demask-ar") + (("reference-masked",) if reference else ())
    for name in names:
        path = None if folder is None else folder / f"{name}.pt"
        lib_name = quality.MODELS[name][0]
        if lib_name == "reference" and not reference_available():
            continue
        if smoke:
            model = quality.build_model(name, qcfg)
            train_ds = get_dataset(qcfg.data, split="train", seq_len=qcfg.seq_len)
            quality.train(model, qcfg, train_ds, get_batch)
        elif path is not None and path.exists():
            model = quality.build_model(name, qcfg)
            model.load_state_dict(torch.load(path, map_location="cpu"))
        elif name == "reference-masked":
            continue
        else:
            raise FileNotFoundError(
                f"{path} is missing: run `python -m benchmarks quality --save {folder}` first"
            )
        models[name] = model.eval()
    return models


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", type=Path, default=harness.REPO / "runs/bench/quality_models",
                   help="folder of the state dicts saved by the quality suite")  # fmt: skip
    p.add_argument("--samples", type=int, default=None, help="sequences per generate call")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="masked steps to measure")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the reference library's masked model")  # fmt: skip
    p.add_argument("--png", type=Path, default=None, help="plot path (default beside the JSON)")
    p.add_argument("--threads", type=int, default=2)


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = SMOKE if args.smoke else Config()
    if args.samples is not None or args.steps is not None:
        steps = tuple(args.steps) if args.steps else cfg.steps
        cfg = Config(steps=steps, samples=args.samples or cfg.samples, seed=cfg.seed)
    qcfg = quality.SMOKE if args.smoke else quality.Config()
    torch.set_num_threads(args.threads)
    models = _load_models(qcfg, args.models, args.smoke, args.reference)
    ar = models["demask-ar"]
    _, _, get_dataset = quality._demask_modules()
    val = torch.stack(quality.eval_windows(get_dataset(qcfg.data, "val", seq_len=qcfg.seq_len), 64))
    rows: list[dict[str, Any]] = [{"model": "validation text", "steps": None, "wall_s": None,
                                   **_score(ar.net, val[:, :])}]  # fmt: skip

    prompt = torch.full((cfg.samples, 1), 10, dtype=torch.long)  # a newline
    ar.generate(prompt[:, :1], 2)  # warm
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    out = ar.generate(prompt, qcfg.seq_len - 1)  # (S, 256)
    rows.append({"model": "demask-ar", "steps": qcfg.seq_len - 1,
                 "wall_s": time.perf_counter() - start, **_score(ar.net, out)})  # fmt: skip

    for name in ("demask-masked", "reference-masked"):
        if name not in models:
            continue
        lib = load(quality.MODELS[name][0])
        lib.NonAutoregressiveWrapper(models[name].net, mask_id=256, steps=1).generate(batch_size=1)
        for steps in cfg.steps:
            wrapper = lib.NonAutoregressiveWrapper(models[name].net, mask_id=256, steps=steps)
            torch.manual_seed(cfg.seed)
            start = time.perf_counter()
            out = wrapper.generate(batch_size=cfg.samples)  # (S, 256)
            wall = time.perf_counter() - start
            rows.append({"model": name, "steps": steps, "wall_s": wall, **_score(ar.net, out)})
            print(
                f"{name} steps={steps}: {wall:.1f} s, gen PPL {rows[-1]['gen_ppl']:.2f}", flush=True
            )

    headers = ["model", "steps", "wall s", "gen PPL", "unigram H (bits)"]
    table = [[r["model"], r["steps"], r["wall_s"], r["gen_ppl"], r["unigram_entropy_bits"]]
             for r in rows]  # fmt: skip
    print(f"## {NAME}  ({cfg.samples} samples of {qcfg.seq_len} bytes per call)")
    print(harness.format_table(headers, table))
    png = args.png or (args.out or harness.REPO / "runs/bench/frontier.json").with_suffix(".png")
    plot(rows, png)
    print(f"plot: {png}")
    return harness.record(NAME, asdict(cfg), rows, quality_config=asdict(qcfg), png=str(png))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Gen PPL vs wall time (left) and unigram entropy vs steps (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    data = rows[0]
    for name, marker in (("demask-masked", "o-"), ("reference-masked", "s--")):
        pts = [r for r in rows if r["model"] == name]
        if not pts:
            continue
        ax1.plot([r["wall_s"] for r in pts], [r["gen_ppl"] for r in pts], marker, label=name)
        for r in pts:
            ax1.annotate(str(r["steps"]), (r["wall_s"], r["gen_ppl"]), fontsize=7,
                         xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax2.plot([r["steps"] for r in pts], [r["unigram_entropy_bits"] for r in pts], marker,
                 label=name)  # fmt: skip
    for r in rows:
        if r["model"] == "demask-ar":
            ax1.plot([r["wall_s"]], [r["gen_ppl"]], "r*", markersize=12, label="demask-ar (cached)")
            ax2.axhline(r["unigram_entropy_bits"], color="r", ls=":", label="demask-ar")
    ax1.axhline(data["gen_ppl"], color="k", ls=":", label="validation text")
    ax2.axhline(data["unigram_entropy_bits"], color="k", ls=":", label="validation text")
    ax1.set(xscale="log", yscale="log", xlabel="wall time of one generate call (s)",
            ylabel="generative perplexity (demask-ar)", title="quality vs time (labels: steps)")  # fmt: skip
    ax2.set(xscale="log", xlabel="masked generation steps", ylabel="unigram entropy (bits)",
            title="diversity vs steps")  # fmt: skip
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
