"""gpu: the GPU path, demask vs the reference: bf16 autocast, torch.compile, fused AdamW, SDPA.

Needs an NVIDIA GPU (an H100 or H200 is what the targets assume); without CUDA it prints why and
measures nothing. `--smoke --allow-cpu` runs the same code on the CPU with a tiny model (no timing
worth reading), so the script is exercised where no GPU is available.

Measured, for both libraries with the same arguments (attn_flash=True, so the reference also uses
scaled_dot_product_attention and its flash kernel):
  train     GPT-2-small-sized Decoder (12 layers, dim 768, 12 heads, seq 1024, vocab 50304),
            AutoregressiveWrapper loss, bf16 autocast, fused AdamW, eager and torch.compile(model).
            MFU = (6 P + 12 L N I) * tokens/s / the GPU's dense bf16 peak (benchmarks/flops.py;
            full-N attention count, the PaLM / nanoGPT convention).
  ar        AutoregressiveWrapper.generate with the cache, prompt 16, 256 new tokens, batch 1 and
            64, bf16 autocast; eager and compiled: demask with generate(compile=True) (its static
            cache decode step through torch.compile, mode "reduce-overhead": a CUDA graph), the
            reference with torch.compile(net). The compile warm-up is the first warmup call
            (`warmup_first_s` in each row), apart from the timed steady state.
  masked    NonAutoregressiveWrapper.generate, seq 1024, steps 18, batch 1 and 64 (an Encoder of
            the same size, vocab 50304 + the mask token), bf16 autocast; eager and compiled.
A variant that fails (out of memory, a compile error) is recorded with its error, not fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch

from benchmarks import flops, harness
from benchmarks.libs import build_net, load, reference_available

NAME = "gpu"

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from NVIDIA's datasheets, matched against
# torch.cuda.get_device_name(); the first key found in the name wins (most specific first).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.5,
    "H100": 989.4,  # SXM5 ("NVIDIA H100 80GB HBM3")
    "A100": 312.0,
    "L40S": 362.1,
    "A10G": 70.0,
    "L4": 121.0,
}


@dataclass(frozen=True)
class Config:
    depth: int = 12
    dim: int = 768
    heads: int = 12
    seq_len: int = 1024
    vocab: int = 50304
    train_batch: int = 16
    gen_batches: tuple[int, ...] = (1, 64)
    prompt_len: int = 16
    new_tokens: int = 256
    masked_steps: int = 18
    warmup: int = 3
    repeats: int = 10
    seed: int = 0


SMOKE = Config(depth=1, dim=32, heads=2, seq_len=32, vocab=64, train_batch=2, gen_batches=(1, 2),
               prompt_len=4, new_tokens=4, masked_steps=2, warmup=1, repeats=2)  # fmt: skip

# variant name -> compile the network?
VARIANTS: dict[str, bool] = {"bf16": False, "bf16+compile": True}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _net(lib_name: str, cfg: Config, *, causal: bool, num_tokens: int, max_seq_len: int) -> Any:
    torch.manual_seed(cfg.seed)
    return build_net(load(lib_name), causal=causal, num_tokens=num_tokens,
                     max_seq_len=max_seq_len, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                     attn_flash=True)  # fmt: skip


def _shape(cfg: Config, num_tokens: int) -> flops.ModelShape:
    return flops.ModelShape(cfg.dim, cfg.depth, cfg.heads, num_tokens)


def train_workload(lib_name: str, cfg: Config, compiled: bool, device: torch.device) -> Any:
    net = _net(lib_name, cfg, causal=True, num_tokens=cfg.vocab, max_seq_len=cfg.seq_len)
    model = load(lib_name).AutoregressiveWrapper(net).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    forward = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randint(0, cfg.vocab, (cfg.train_batch, cfg.seq_len), generator=g).to(device)

    def step() -> None:
        with _autocast(device):
            loss = forward(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    f = flops.train_flops(_shape(cfg, cfg.vocab), cfg.train_batch, cfg.seq_len)
    return harness.Workload(step, cfg.train_batch * cfg.seq_len, f)


def ar_workload(
    lib_name: str, cfg: Config, compiled: bool, device: torch.device, batch: int
) -> Any:
    net = _net(lib_name, cfg, causal=True, num_tokens=cfg.vocab, max_seq_len=cfg.seq_len)
    model = load(lib_name).AutoregressiveWrapper(net).to(device).eval()
    kwargs: dict[str, Any] = {}
    if compiled and lib_name == "demask":  # its static-cache decode step, as a CUDA graph
        kwargs["compile"] = True
    elif compiled:
        model.net = torch.compile(model.net)  # the decoding step's network call
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, cfg.vocab, (batch, cfg.prompt_len), generator=g).to(device)

    def run() -> None:
        with _autocast(device):
            model.generate(prompt, cfg.new_tokens, cache_kv=True, **kwargs)

    f = flops.ar_generate_flops(_shape(cfg, cfg.vocab), batch, cfg.prompt_len, cfg.new_tokens)
    return harness.Workload(run, batch * cfg.new_tokens, f)


def masked_workload(
    lib_name: str, cfg: Config, compiled: bool, device: torch.device, batch: int
) -> Any:
    net = _net(lib_name, cfg, causal=False, num_tokens=cfg.vocab + 1, max_seq_len=cfg.seq_len)
    wrapper = load(lib_name).NonAutoregressiveWrapper
    model = wrapper(net, mask_id=cfg.vocab, steps=cfg.masked_steps).to(device).eval()
    if compiled:
        model.net = torch.compile(model.net)

    def run() -> None:
        with _autocast(device):
            model.generate(batch_size=batch)

    shape = _shape(cfg, cfg.vocab + 1)
    f = flops.masked_generate_flops(shape, batch, cfg.seq_len, cfg.masked_steps)
    return harness.Workload(run, batch * cfg.seq_len, f)


def _measure(make: Callable[[], Any], cfg: Config, cuda: bool) -> dict[str, Any]:
    """Build, warm up and time one workload; errors (OOM, compile) are recorded, not raised."""
    try:
        work = make()
        first = harness.time_once(work.run, cuda=cuda)  # compiles, for a compiled variant
        times = harness.time_interleaved({"w": work.run}, warmup=max(cfg.warmup - 1, 0),
                                         repeats=cfg.repeats, cuda=cuda)["w"]  # fmt: skip
        row = harness.speed_row("", work, times)
        row["warmup_first_s"] = first
        if cuda:
            row["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
        return row
    except Exception as err:  # a failed variant is a result too
        return {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
    finally:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU (with --smoke)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the bf16 peak")
    p.add_argument("--parts", nargs="+", default=["train", "ar", "masked"],
                   choices=["train", "ar", "masked"])  # fmt: skip
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu suite skipped: torch.cuda.is_available() is False (this suite needs an NVIDIA "
              "GPU; run it by hand on an H100/H200). Nothing was measured.")  # fmt: skip
        return None
    cfg = SMOKE if args.smoke else Config()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(0) if cuda else harness.cpu_model_name()
    peak = args.peak_tflops or (peak_tflops(name) if cuda else None)
    libs = [lib for lib in harness.LIBS if lib != "reference" or reference_available()]
    results: list[dict[str, Any]] = []
    for variant in args.variants:
        compiled = VARIANTS[variant]
        jobs: list[tuple[str, int | None, Callable[[str], Any]]] = []
        if "train" in args.parts:
            jobs.append(("train", cfg.train_batch,
                         partial(train_workload, cfg=cfg, compiled=compiled, device=device)))  # fmt: skip
        for b in cfg.gen_batches:
            for part in ("ar", "masked"):
                if part in args.parts:
                    fn = ar_workload if part == "ar" else masked_workload
                    jobs.append((part, b, partial(fn, cfg=cfg, compiled=compiled, device=device,
                                                  batch=b)))  # fmt: skip
        for part, batch, make in jobs:
            for lib in libs:
                torch._dynamo.reset() if compiled else None
                row = _measure(partial(make, lib), cfg, cuda)
                row.update(part=part, batch=batch, variant=variant, library=lib)
                if peak and "gflops" in row and part == "train":
                    row["mfu"] = row["gflops"] / 1e3 / peak
                results.append(row)
                print(_line(row), flush=True)
    print(f"## {NAME}  ({name}; bf16 dense peak {peak} TFLOP/s)")
    print(table(results))
    return harness.record(NAME, asdict(cfg), results, device=name, peak_bf16_tflops=peak,
                          args=vars(args))  # fmt: skip


def _line(row: dict[str, Any]) -> str:
    head = f"{row['part']} b={row['batch']} {row['variant']} {row['library']}: "
    if "error" in row:
        return head + row["error"]
    return head + f"{row['tokens_per_s']:,.0f} tokens/s, {row['gflops'] / 1e3:.1f} TFLOP/s"


def table(results: list[dict[str, Any]]) -> str:
    headers = ["part", "batch", "variant", "library", "tokens/s", "TFLOP/s", "MFU",
               "first call s", "note"]  # fmt: skip
    rows = [[r["part"], r["batch"], r["variant"], r["library"], r.get("tokens_per_s"),
             None if "gflops" not in r else r["gflops"] / 1e3, r.get("mfu"),
             r.get("warmup_first_s"), r.get("error", "")[:60]] for r in results]  # fmt: skip
    return harness.format_table(headers, rows)
