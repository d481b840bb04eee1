"""quality: validation bits per byte at an equal training budget, demask vs the reference.

Data: the Shakespeare plays in ../shared/data/shakespeare beside the repository clone (`--data`
overrides), byte-level, seq 256, demask's split (the last three files by sorted name are
validation). Every model gets the same config (dim 256, depth 4, heads 4), the same batches
(`demask.data.get_batch`, same seed), the same optimizer (AdamW, linear warmup then constant lr,
or a linear decay at the end where a row sets `cooldown`; gradient norm clipped at 1) and the
same number of steps.

Models (each library's seed defaults, `NonAutoregressiveWrapper(net, mask_id=256)` with
use_simple_mdlm_loss_weight=True and `AutoregressiveWrapper(net)`, unless stated):
  demask-masked, reference-masked   masked models, num_tokens 257 (mask id 256)
  reference-masked-mdlm             the reference's masked model with
                                    use_simple_mdlm_loss_weight=False (mean cross-entropy over
                                    the masked positions): a fairer opponent than the reference's
                                    default, whose MDLM-weighted loss goes negative
  demask-masked-absorb              demask's masked model with no_replace_prob=0 and
                                    random_token_prob=0: pure absorbing-state (MDLM) corruption,
                                    so it trains on exactly the NELBO that is evaluated
  demask-masked-rotary,             demask-masked and reference-masked-mdlm with rotary
  reference-masked-mdlm-rotary      positions (rotary_pos_emb=True) instead of absolute ones
  demask-masked-ce-rotary           demask's with use_simple_mdlm_loss_weight=False (mean
                                    cross-entropy, the reference-masked-mdlm objective), rotary
  demask-ar, reference-ar           autoregressive models, num_tokens 256

Evaluation is demask's evaluator for all (`demask.evaluate.likelihood_bits_per_token`) on the
same fixed, evenly spaced validation windows: the masked models' NELBO (MDLM continuous-time
bound, 32 fixed stratified times, masks seeded per batch, so all masked models see the same
masks), and the autoregressive models' exact NLL of bytes 1..255 given their prefix. The
reference's masked nets (both) are evaluated by handing their logits to demask's NELBO
computation (`LogitsAsEmbeddings`); the NELBO does not depend on the training loss's weighting.
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

from benchmarks import harness
from benchmarks.libs import build_net, load

NAME = "quality"
# ../shared lies beside the repository clone (wherever it is cloned)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "shakespeare"


@dataclass(frozen=True)
class Config:
    data: str = str(DATA)
    seq_len: int = 256
    dim: int = 256
    depth: int = 4
    heads: int = 4
    batch: int = 8
    steps: int = 120
    lr: float = 1e-3
    warmup: int = 20
    cooldown: float = 0.0  # the last fraction of the steps, lr decayed linearly to 0 (WSD)
    weight_decay: float = 0.01  # AdamW's default
    optimizer: str = "adamw"  # adamw | muon (Muon on the blocks' matrices, AdamW on the rest)
    muon_rms: float = 0.2  # Muon's update RMS over lr (demask.optim.Muon's rms)
    clip: float = 1.0
    seed: int = 0
    eval_windows: int = 32  # evenly spaced validation windows
    eval_batch: int = 16


SMOKE = Config(seq_len=32, dim=32, depth=1, heads=2, batch=4, steps=3, warmup=1, eval_windows=8)

# model name -> (library, masked?)
MODELS: dict[str, tuple[str, bool]] = {
    "demask-masked": ("demask", True),
    "demask-masked-absorb": ("demask", True),
    "demask-masked-ce": ("demask", True),
    "reference-masked": ("reference", True),
    "reference-masked-mdlm": ("reference", True),
    "demask-masked-rotary": ("demask", True),
    "demask-masked-ce-rotary": ("demask", True),
    "reference-masked-mdlm-rotary": ("reference", True),
    "demask-ar": ("demask", False),
    "reference-ar": ("reference", False),
}

# model name -> keyword arguments of its wrapper beyond the seed defaults (recorded in the JSON)
WRAPPER_KWARGS: dict[str, dict[str, Any]] = {
    "reference-masked-mdlm": {"use_simple_mdlm_loss_weight": False},
    # pure absorbing-state corruption: every selected position is masked (no BERT-style 15%
    # unchanged / 10% random tokens), so training optimises exactly the NELBO that is evaluated
    "demask-masked-absorb": {"no_replace_prob": 0.0, "random_token_prob": 0.0},
    "reference-masked-mdlm-rotary": {"use_simple_mdlm_loss_weight": False},
    "demask-masked-ce": {"use_simple_mdlm_loss_weight": False},
    # demask's own switch means the same: MaskGIT's mean cross-entropy over masked positions
    "demask-masked-ce-rotary": {"use_simple_mdlm_loss_weight": False},
}

# model name -> keyword arguments of its Encoder/Decoder beyond dim, depth, heads
LAYER_KWARGS: dict[str, dict[str, Any]] = {
    # rotary positions instead of learned absolute ones (both libraries then drop the absolute
    # embedding): with absolute positions the masked models at seq 256 never learned to use their
    # context within this budget (RESULTS.md, "quality")
    "demask-masked-rotary": {"rotary_pos_emb": True},
    "demask-masked-ce-rotary": {"rotary_pos_emb": True},
    "reference-masked-mdlm-rotary": {"rotary_pos_emb": True},
}


def data_folder(path: str | Path | None = None) -> Path:
    """The data folder (default DATA); a clear error naming it when it does not exist."""
    folder = Path(DATA if path is None else path)
    if not folder.exists():
        raise FileNotFoundError(
            f"data folder {folder} does not exist (the default is ../shared/data/shakespeare "
            "beside the repository clone); pass --data PATH"
        )
    return folder


class LogitsAsEmbeddings(nn.Module):
    """Presents a net whose forward returns logits to demask's NELBO code.

    demask's NonAutoregressiveWrapper asks its net for embeddings (`return_embeddings=True`) and
    projects the masked positions with `net.logits_from_embeddings`. Here the "embeddings" are the
    foreign net's logits (B, N, V) and the projection is the identity, so the NELBO is computed by
    demask's code from the foreign model's predictions, with nothing of its internals assumed.

    With `to_self_cond` (a self-conditioning wrapper's projection, dim -> emb_dim) every call
    makes two passes, as either library's self-conditioned wrapper does: the first pass's final
    embeddings, projected, are added to the second pass's input (`sum_embeds`).
    """

    def __init__(
        self, net: nn.Module, num_tokens: int, max_seq_len: int,
        to_self_cond: nn.Module | None = None,
    ):  # fmt: skip
        super().__init__()
        self.net, self.to_self_cond = net, to_self_cond
        self.num_tokens = num_tokens
        self.max_seq_len = max_seq_len
        self.attn_layers = net.attn_layers  # read for .dim only (self-conditioning, critic)
        self.emb_dim = getattr(net, "emb_dim", self.attn_layers.dim)

    def forward(self, x: Tensor, return_embeddings: bool = False, sum_embeds: Any = None) -> Tensor:
        if sum_embeds is not None:
            raise ValueError(
                "LogitsAsEmbeddings takes no sum_embeds: self-conditioning is its to_self_cond"
            )
        if self.to_self_cond is None:
            return self.net(x)  # (B, N, V)
        first = self.net(x, return_embeddings=True)  # (B, N, dim)
        return self.net(x, sum_embeds=self.to_self_cond(first))  # (B, N, V)

    def logits_from_embeddings(self, emb: Tensor) -> Tensor:
        return emb


def _demask_modules() -> tuple[Any, Any, Any]:
    load("demask")  # puts src/ on the path when demask is not installed
    import demask.evaluate as evaluate
    from demask.data import get_batch, get_dataset

    return evaluate, get_batch, get_dataset


def build_model(name: str, cfg: Config, net_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The wrapper of model `name`; `net_kwargs` go to its TransformerWrapper."""
    lib_name, masked = MODELS[name]
    lib = load(lib_name)
    torch.manual_seed(cfg.seed)
    num_tokens = 257 if masked else 256
    net = build_net(lib, causal=not masked, num_tokens=num_tokens, max_seq_len=cfg.seq_len,
                    dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, net_kwargs=net_kwargs,
                    **LAYER_KWARGS.get(name, {}))  # fmt: skip
    kwargs = WRAPPER_KWARGS.get(name, {})
    if masked:
        return lib.NonAutoregressiveWrapper(net, mask_id=256, **kwargs)
    return lib.AutoregressiveWrapper(net, **kwargs)


def _loss(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out if isinstance(out, Tensor) else out.loss  # AR: a scalar; masked: Losses


def _optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW on every weight, or (`cfg.optimizer == "muon"`) demask's Muon on the 2-D weights
    inside `net.attn_layers` (both libraries name the blocks so) and AdamW on the rest, in one
    optimiser; both parts share `cfg.lr` and the decay (Muon's update RMS is `cfg.muon_rms` * lr)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer != "muon":
        raise ValueError(f"optimizer must be 'adamw' or 'muon', got {cfg.optimizer!r}")
    from demask.optim import Muon

    net: Any = model.net
    blocks = {id(p) for p in net.attn_layers.parameters() if p.ndim == 2}
    groups: list[dict[str, Any]] = [
        {"params": [p for p in model.parameters() if id(p) in blocks], "muon": True},
        {"params": [p for p in model.parameters() if id(p) not in blocks]},
    ]
    return Muon(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                rms=cfg.muon_rms)  # fmt: skip


def lr_factor(step: int, cfg: Config) -> float:
    """The lr multiplier after `step` optimizer steps: a linear warmup over `cfg.warmup` steps,
    constant, then (`cfg.cooldown` > 0) a linear decay to 0 over the last `cfg.cooldown` of
    `cfg.steps` (warmup-stable-decay)."""
    if not 0.0 <= cfg.cooldown < 1.0:
        raise ValueError(f"cooldown must be a fraction in [0, 1), got {cfg.cooldown!r}")
    factor = min(1.0, (step + 1) / cfg.warmup)
    decay_steps = round(cfg.cooldown * cfg.steps)
    if decay_steps:
        factor = min(factor, (cfg.steps - step) / decay_steps)
    return factor


def train(model: nn.Module, cfg: Config, train_ds: Any, get_batch: Any) -> dict[str, Any]:
    """`cfg.steps` AdamW steps on the shared batch sequence; returns the loss curve and time."""
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    torch.manual_seed(cfg.seed)  # the wrappers' own noise (mask draws) starts from the same state
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        x = get_batch(train_ds, step=step, batch_size=cfg.batch, seed=cfg.seed)  # (B, N)
        if hasattr(model, "train_progress"):  # an annealed ablation objective reads it
            setattr(model, "train_progress", step / cfg.steps)  # noqa: B010
        loss = _loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 25 == 0:
            print(f"  step {step + 1}/{cfg.steps}: loss {losses[-1]:.4f}", flush=True)
    return {"train_s": time.perf_counter() - start, "losses": losses}


def eval_windows(val_ds: Any, count: int) -> list[Tensor]:
    """`count` evenly spaced validation windows (a fixed subset, the same for every model)."""
    idx = torch.linspace(0, len(val_ds) - 1, min(count, len(val_ds))).round().long().unique()
    return [val_ds[int(i)] for i in idx]


class ReferenceCausal(nn.Module):
    """A reference causal net scored by demask's evaluator: the model contract's
    `likelihood_bits` of demask's AutoregressiveWrapper (it reads only `self.net`)."""

    def __init__(self, net: nn.Module, wrapper_cls: Any):
        super().__init__()
        self.net, self._bits = net, wrapper_cls.likelihood_bits

    def likelihood_bits(self, x: Tensor, *, num_times: int | None = None) -> Any:
        return self._bits(self, x, num_times=num_times)


def evaluate_bits(name: str, model: Any, cfg: Config, windows: list[Tensor]) -> float:
    """Validation bits per byte by demask's evaluator (NELBO or exact NLL)."""
    evaluate, _, _ = _demask_modules()
    lib_name, masked = MODELS[name]
    scored = model
    if lib_name == "reference" and masked:
        demask_nar = load("demask").NonAutoregressiveWrapper
        scored = demask_nar(LogitsAsEmbeddings(model.net, 257, cfg.seq_len), mask_id=256)
    elif lib_name == "reference":  # demask's exact NLL of the reference's causal net
        scored = ReferenceCausal(model.net, load("demask").AutoregressiveWrapper)
    return evaluate.likelihood_bits_per_token(scored, windows, cfg.eval_batch, seed=cfg.seed)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="training steps per model")
    p.add_argument("--batch", type=int, default=None, help="training batch size")
    p.add_argument(
        "--lr", type=float, default=None, help=f"peak learning rate (default {Config.lr})"
    )
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                   help="which models to train (one process per model runs them in parallel)")  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help="seeds init, batches and masks (0)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", type=Path, default=None, help="folder for the trained state dicts")
    p.add_argument("--data", type=Path, default=None,
                   help=f"the Shakespeare folder (default {DATA})")  # fmt: skip


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = SMOKE if args.smoke else Config()
    overrides = {
        k: getattr(args, k)
        for k in ("steps", "batch", "lr", "seed")
        if getattr(args, k, None) is not None
    }
    overrides["data"] = str(data_folder(args.data))
    cfg = Config(**{**asdict(cfg), **overrides})
    torch.set_num_threads(args.threads)
    _, get_batch, get_dataset = _demask_modules()
    train_ds = get_dataset(cfg.data, split="train", seq_len=cfg.seq_len)
    val_ds = get_dataset(cfg.data, split="val", seq_len=cfg.seq_len)
    windows = eval_windows(val_ds, cfg.eval_windows)
    results: dict[str, Any] = {}
    for name in args.models:
        model = build_model(name, cfg)
        run = train(model, cfg, train_ds, get_batch)
        start = time.perf_counter()
        bits = evaluate_bits(name, model, cfg, windows)
        run.update(val_bits_per_byte=bits, eval_s=time.perf_counter() - start)
        run["library"], run["masked"] = MODELS[name]
        run["wrapper_kwargs"] = WRAPPER_KWARGS.get(name, {})
        run["layer_kwargs"] = LAYER_KWARGS.get(name, {})
        run["final_train_loss_mean10"] = sum(run["losses"][-10:]) / len(run["losses"][-10:])
        results[name] = run
        print(f"{name}: {bits:.4f} bits/byte ({run['train_s']:.0f} s training)", flush=True)
        if args.save is not None:
            args.save.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), args.save / f"{name}.pt")
    rows = []
    for name, run in results.items():
        kind = "NELBO (bound)" if MODELS[name][1] else "NLL (exact)"
        rows.append([name, kind, run["val_bits_per_byte"], run["train_s"]])
    print(f"## {NAME}  (config {asdict(cfg)}; {len(windows)} validation windows)")
    print(harness.format_table(["model", "metric", "val bits/byte", "train s"], rows))
    for opponent in ("reference-masked", "reference-masked-mdlm"):
        ratio = _ratio(results, "demask-masked", opponent)
        if ratio is not None:
            print(f"masked NELBO demask / {opponent}: {ratio:.3f} (< 1 is better for demask)")
    payload = harness.record(NAME, asdict(cfg), results, eval_windows=len(windows), args=vars(args))
    payload["tokens_per_model"] = cfg.steps * cfg.batch * cfg.seq_len
    return payload


def _ratio(results: dict[str, Any], a: str, b: str) -> float | None:
    if a in results and b in results:
        x, y = results[a]["val_bits_per_byte"], results[b]["val_bits_per_byte"]
        return x / y if math.isfinite(y) and y else None
    return None
