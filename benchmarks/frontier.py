"""frontier: masked generation steps vs sample quality vs wall time, against autoregressive decoding.

Uses the models that `python -m benchmarks quality --save runs/bench/quality_models` trained
(Shakespeare bytes, seq 256, dim 256, depth 4, heads 4): demask-masked, demask-ar, and the
reference's reference-masked and reference-masked-mdlm where their state dicts are present. For
steps in 8, 16, ..., 256 and each sampler of `--samplers`, each masked model generates `samples`
sequences of 256 bytes; the autoregressive model generates 255 bytes after a one-byte prompt (a
newline) with its defaults (temperature 1, top-k filter), with the key/value cache.

Samplers (the keyword arguments given to `generate` are recorded in every JSON row):
  seed-default  each library's own `generate` with the seed's defaults: confidence remasking,
                start_temperature 1 annealed linearly to 0, filter_thres 0.7 (top-k). The
                120-step masked model of RESULTS.md wrote only spaces with it, at every step count.
  ancestral     demask's MDLM ancestral sampler: every masked token is revealed with probability
                (m(s) - m(t)) / m(s), drawn from the full distribution (filter_thres 0) at
                temperature 1 (no annealing): proper samples of the model. The reference library
                has no such sampler, so its nets are decoded by demask's loop on their logits
                (`quality.LogitsAsEmbeddings`; the row's "decoder" says "demask").
  low_confidence, random, margin, entropy, confidence
                demask's other remasking strategies with the seed's temperature and filter.
  seed-cosine   demask's generate with the seed's defaults and the wrapper's schedule='cosine'
  reference-cosine
                the reference library's own generate (seed defaults, schedule='cosine') on the
                same net: its wrapper accepts demask's TransformerWrapper
  ancestral-t0.8, remdm, threshold-*, factor-*, entropy_bound-*
                demask's samplers on the full distribution at a fixed temperature (1 unless
                "-t0.8"); the adaptive ones (threshold, factor, entropy_bound) take `steps` as a
                cap on the network calls and usually stop earlier
  block*        semi-autoregressive block decoding (block_size positions per block, steps shared
                by the blocks), uncached or with Fast-dLLM's "prefix" / "dual" key/value cache
  dilated-seed-cosine-t{T}-f{F}
                demask's dilated order (DUS: each step's positions spread evenly between the
                revealed ones) with the seed's sampling at start temperature T (annealed) and
                filter_thres F, cosine schedule; in the defaults at T 1.0, F 0.7
  dilated-proper-t{T}, dilated-seed-linear-t{T}, reference-linear, {rule}-seed-cosine
                the same order on the full distribution at a fixed T; with the linear schedule;
                the reference's loop with its default (linear) schedule; other orders with the
                seed's sampling and cosine

Reported per setting:

  wall s        one batched generate call (after one untimed warmup call per model and sampler);
                with --repeats R, the median of R calls, and the quality over all R x samples
  gen PPL       generative perplexity: 2 ** (bits per byte of bytes 1..255 of each sample under
                the demask autoregressive model, averaged over the samples' bytes)
  unigram H     entropy (bits) of each sample's byte histogram, averaged over samples; low values
                flag the repetitive text that a low gen PPL can hide
  calls/token   network evaluations per generated token of a row (steps / 256 for a fixed-count
                sampler; fewer for adaptive ones; 1 for the AR model)

The same two figures for validation windows of real text are the reference line. A PNG plots gen
PPL against wall time and unigram entropy against steps, one line per (model, sampler).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import harness, quality
from benchmarks.frontier_samplers import SAMPLERS
from benchmarks.libs import load, reference_available

NAME = "frontier"
MASKED_MODELS = ("demask-masked", "reference-masked", "reference-masked-mdlm")  # the default
ALL_MASKED = tuple(name for name, (_, masked) in quality.MODELS.items() if masked)


@dataclass(frozen=True)
class Config:
    steps: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    samples: int = 8
    repeats: int = 1  # calls per setting (each `samples` sequences)
    seed: int = 0
    samplers: tuple[str, ...] = ("seed-default", "ancestral", "dilated-seed-cosine-t1.0-f0.7")


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


def _saved_net_kwargs(name: str, state: dict[str, Any]) -> dict[str, Any] | None:
    """A demask Encoder saved without absolute positions (rotary nets before config format 4)
    is rebuilt as it was trained: rotary alone (`abs_pos_attn_bias=False`)."""
    if quality.MODELS[name] == ("demask", True) and "net.abs_pos_emb.weight" not in state:
        print(f"{name}: saved without absolute positions; built with abs_pos_attn_bias=False")
        return {"abs_pos_attn_bias": False}
    return None


def _load_models(
    qcfg: quality.Config,
    folder: Path | None,
    smoke: bool,
    reference: bool = True,
    masked: tuple[str, ...] = MASKED_MODELS,
) -> dict[str, Any]:
    """The trained quality models (or, in smoke mode, tiny ones trained for a few steps)."""
    _, get_batch, get_dataset = quality._demask_modules()
    models: dict[str, Any] = {}  # the wrappers, by quality model name
    names = ("demask-ar",) + tuple(
        name for name in masked if reference or quality.MODELS[name][0] == "demask"
    )
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
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = quality.build_model(name, qcfg, net_kwargs=_saved_net_kwargs(name, state))
            model.load_state_dict(state)
        elif lib_name == "reference":
            print(f"{name}: no state dict at {path}; skipped", flush=True)
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
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
    p.add_argument("--repeats", type=int, default=None,
                   help="generate calls per setting (default 1): the wall time is their median, "
                   "the quality is scored on all their samples")  # fmt: skip
    p.add_argument("--steps", type=int, nargs="+", default=None, help="masked steps to measure")
    p.add_argument("--samplers", nargs="+", default=None, choices=list(SAMPLERS),
                   help="masked samplers to measure, one line each per model "
                        f"(default {' '.join(Config.samplers)})")  # fmt: skip
    p.add_argument(
        "--masked-models",
        nargs="+",
        default=list(MASKED_MODELS),
        choices=list(ALL_MASKED),
        help="the quality suite's masked models to measure",
    )
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the reference library's masked models")  # fmt: skip
    p.add_argument("--data", type=Path, default=None,
                   help=f"the Shakespeare folder (default {quality.DATA})")  # fmt: skip
    p.add_argument("--png", type=Path, default=None, help="plot path (default beside the JSON)")
    p.add_argument("--threads", type=int, default=2)


def _repeat(
    call: Callable[[], tuple[Tensor, float]], repeats: int
) -> tuple[Tensor, list[float], float]:
    """`repeats` timed calls of `call` () -> ((S, N) tokens, calls per token): all their
    tokens (repeats * S, N), the wall time of each call, and the mean calls per token."""
    outs, walls, calls = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out, c = call()
        walls.append(time.perf_counter() - start)
        outs.append(out)
        calls.append(c)
    return torch.cat(outs), walls, sum(calls) / len(calls)


def masked_generator(name: str, net: Any, sampler: str) -> tuple[Any, str]:
    """(generate(steps, batch_size) -> ((B, N) tokens, network calls per generated token), the
    library whose decoding loop runs)."""
    lib_name = quality.MODELS[name][0]
    kwargs = dict(SAMPLERS[sampler])
    loop, schedule = kwargs.pop("loop", None), kwargs.pop("schedule", "linear")
    if loop is not None:
        lib_name = loop  # another library's loop on this net (the reference's takes demask's)
    elif sampler != "seed-default" and lib_name != "demask":  # a demask sampler, foreign logits
        lib_name, net = "demask", quality.LogitsAsEmbeddings(net, 257, net.max_seq_len)
    wrapper_cls = load(lib_name).NonAutoregressiveWrapper
    if "rule" in kwargs:
        from demask.samplers import get_rule

        kwargs["sampler"] = get_rule(kwargs["sampler"], **kwargs.pop("rule"))
    ours = lib_name == "demask"

    def generate(steps: int, batch_size: int) -> tuple[Tensor, float]:
        wrapper = wrapper_cls(net, mask_id=256, steps=steps, schedule=schedule)
        if not ours:
            out = wrapper.generate(batch_size=batch_size, **kwargs)
            return out, steps / out.shape[1]  # one full call per step
        out, stats = wrapper.generate(batch_size=batch_size, return_stats=True, **kwargs)
        return out, stats.evaluations_per_token

    return generate, lib_name


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = SMOKE if args.smoke else Config()
    if args.steps:
        cfg = replace(cfg, steps=tuple(args.steps))
    for k in ("samples", "repeats", "seed"):
        if getattr(args, k) is not None:
            cfg = replace(cfg, **{k: getattr(args, k)})
    if args.samplers:
        cfg = replace(cfg, samplers=tuple(dict.fromkeys(args.samplers)))
    qcfg = quality.SMOKE if args.smoke else quality.Config()
    qcfg = replace(qcfg, data=str(quality.data_folder(args.data)))
    torch.set_num_threads(args.threads)
    masked_names = tuple(args.masked_models)
    models = _load_models(qcfg, args.models, args.smoke, args.reference, masked_names)
    ar = models["demask-ar"]
    _, _, get_dataset = quality._demask_modules()
    val = torch.stack(quality.eval_windows(get_dataset(qcfg.data, "val", seq_len=qcfg.seq_len), 64))
    rows: list[dict[str, Any]] = [{"model": "validation text", "sampler": None,
                                   "sampler_kwargs": None, "decoder": None, "steps": None,
                                   "wall_s": None, **_score(ar.net, val[:, :])}]  # fmt: skip

    prompt = torch.full((cfg.samples, 1), 10, dtype=torch.long)  # a newline
    ar.generate(prompt[:, :1], 2)  # warm
    torch.manual_seed(cfg.seed)
    out, walls, _ = _repeat(lambda: (ar.generate(prompt, qcfg.seq_len - 1), 1.0), cfg.repeats)
    rows.append({"model": "demask-ar", "sampler": "ar-default", "sampler_kwargs": {},
                 "decoder": "demask", "steps": qcfg.seq_len - 1,
                 "wall_s": statistics.median(walls), "wall_s_each": walls, "calls_per_token": 1.0,
                 **_score(ar.net, out)})  # fmt: skip

    for name in masked_names:
        if name not in models:
            continue
        for sampler in cfg.samplers:
            generate, decoder = masked_generator(name, models[name].net, sampler)
            generate(1, 1)  # warm
            for steps in cfg.steps:
                torch.manual_seed(cfg.seed)
                out, walls, calls = _repeat(partial(generate, steps, cfg.samples), cfg.repeats)
                wall = statistics.median(walls)
                rows.append({"model": name, "sampler": sampler,
                             "sampler_kwargs": dict(SAMPLERS[sampler]), "decoder": decoder,
                             "steps": steps, "wall_s": wall, "wall_s_each": walls,
                             "calls_per_token": calls, **_score(ar.net, out)})  # fmt: skip
                print(f"{name} {sampler} steps={steps}: {wall:.1f} s, {calls:.3f} calls/token, "
                      f"gen PPL {rows[-1]['gen_ppl']:.2f}, "
                      f"H {rows[-1]['unigram_entropy_bits']:.2f}", flush=True)  # fmt: skip

    headers = ["model", "sampler", "steps", "wall s", "calls/token", "gen PPL", "unigram H (bits)"]
    table = [[r["model"], r["sampler"], r["steps"], r["wall_s"], r.get("calls_per_token"),
              r["gen_ppl"], r["unigram_entropy_bits"]] for r in rows]  # fmt: skip
    print(
        f"## {NAME}  ({cfg.samples} samples of {qcfg.seq_len} bytes per call, {cfg.repeats} "
        "calls per setting: median wall time per call, quality over all their samples)"
    )
    print(harness.format_table(headers, table))
    png = args.png or (args.out or harness.REPO / "runs/bench/frontier.json").with_suffix(".png")
    plot(rows, png)
    print(f"plot: {png}")
    return harness.record(NAME, asdict(cfg), rows, quality_config=asdict(qcfg),
                          samplers={k: SAMPLERS[k] for k in cfg.samplers}, png=str(png))  # fmt: skip


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Gen PPL vs wall time (left), gen PPL vs network calls per token (middle), unigram entropy
    vs steps (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(18, 5.2))
    data = rows[0]
    # model -> (marker, colour); the line style (and, with one model, the colour) tells the
    # sampler apart
    shapes = ["o", "s", "^", "D", "v", "P"]
    masked = list(dict.fromkeys(r["model"] for r in rows if r["model"] in ALL_MASKED))
    markers = {name: (shapes[i % len(shapes)], f"C{i}") for i, name in enumerate(masked)}
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3)), (0, (3, 1, 1, 1))]
    samplers = list(dict.fromkeys(r["sampler"] for r in rows if r["model"] in markers))
    for name, (marker, colour) in markers.items():
        for i, sampler in enumerate(samplers):
            pts = [r for r in rows if r["model"] == name and r["sampler"] == sampler]
            if not pts:
                continue
            label = f"{name} / {sampler}"
            if pts[0]["decoder"] != quality.MODELS[name][0]:
                label += f" ({pts[0]['decoder']}'s loop)"
            if len(markers) == 1:
                colour = f"C{i % 10}"
            style = {"marker": marker, "color": colour, "ls": styles[i % len(styles)],
                     "label": label}  # fmt: skip
            ax1.plot([r["wall_s"] for r in pts], [r["gen_ppl"] for r in pts], **style)
            for r in pts:
                ax1.annotate(str(r["steps"]), (r["wall_s"], r["gen_ppl"]), fontsize=7,
                             xytext=(3, 3), textcoords="offset points")  # fmt: skip
            ax2.plot([r["steps"] for r in pts], [r["unigram_entropy_bits"] for r in pts], **style)
            calls = [r.get("calls_per_token") for r in pts]
            if all(c is not None for c in calls):
                ax3.plot(calls, [r["gen_ppl"] for r in pts], **style)
    for r in rows:
        if r["model"] == "demask-ar":
            ax1.plot([r["wall_s"]], [r["gen_ppl"]], "r*", markersize=12,
                     label="demask-ar (cached, its defaults)")  # fmt: skip
            ax2.axhline(r["unigram_entropy_bits"], color="r", ls=":", label="demask-ar")
            ax3.plot([1.0], [r["gen_ppl"]], "r*", markersize=12, label="demask-ar")
    ax1.axhline(data["gen_ppl"], color="k", ls=":", label="validation text")
    ax2.axhline(data["unigram_entropy_bits"], color="k", ls=":", label="validation text")
    ax3.axhline(data["gen_ppl"], color="k", ls=":", label="validation text")
    ax3.set(xscale="log", yscale="log", xlabel="network calls per generated token",
            ylabel="generative perplexity (demask-ar)", title="quality vs network calls")  # fmt: skip
    ax1.set(xscale="log", yscale="log", xlabel="wall time of one generate call (s)",
            ylabel="generative perplexity (demask-ar)", title="quality vs time (labels: steps)")  # fmt: skip
    ax2.set(xscale="log", xlabel="masked generation steps", ylabel="unigram entropy (bits)",
            title="diversity vs steps")  # fmt: skip
    ax1.legend(fontsize=5, handlelength=4)
    ax2.legend(fontsize=6, handlelength=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
