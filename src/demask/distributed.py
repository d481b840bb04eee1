"""Multi-process training on PyTorch's own distributed engine (torchrun, DDP, FSDP2).

How a run becomes distributed: `torchrun --nproc_per_node N -m demask train ...` starts N processes
with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in their environment; `demask.train.train` calls
`setup()`, which joins the process group (gloo on CPU, nccl on CUDA). `demask train --nproc N`
does the same through `launch(N, argv)`, which runs torchrun (`python -m torch.distributed.run`).

`parallelize` applies compilation and data parallelism OUTSIDE the model code, in one ordered
function (like torchtitan): 1. torch.compile the network in place, 2. FSDP2 `fully_shard` on each
transformer block, then on the network (when fsdp=True), or else DDP around the whole wrapper
(when world_size > 1). Model files know nothing of this.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from demask._checks import check_int


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank among world_size processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # setup() created the process group, so teardown() destroys it

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs and pictures."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def in_torchrun() -> bool:
    """True inside a process started by torchrun (or anything that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> if CUDA is available, else cpu; 'cuda' -> cuda:<local_rank>."""
    expected = "expected auto | cpu | cuda | cuda:N (N >= 0)"
    if not isinstance(device, str):
        raise TypeError(f"device must be a str, {expected}, got {type(device).__name__}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:  # "tpu", "cuda:-1", ...
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index):
        raise ValueError(f"device must be a device demask runs on, {expected}, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device must be available, got {device!r} but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA devices"
            )
    return dev


def setup(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one (idempotent), and pick this rank's device.

    Without torchrun (WORLD_SIZE unset or 1) this is a single process on `device`.
    """
    if not in_torchrun():
        return DistInfo(device=resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)


def teardown(info: DistInfo) -> None:
    """Destroy the process group if `setup` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    """Sum `t` over all ranks (in place; returns it). A no-op on one process."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank (a picklable object). A no-op on one process."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# compile, then shard / replicate


def _network(model: nn.Module) -> nn.Module:
    """The backbone inside a wrapper (its `.net`), or the module itself."""
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def _blocks(net: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a network: the elements of every ModuleList that hold parameters."""
    blocks: list[nn.Module] = []
    for module in net.modules():
        if isinstance(module, nn.ModuleList):
            blocks.extend(m for m in module if any(True for _ in m.parameters()))
    return blocks


def parallelize(
    model: nn.Module,
    info: DistInfo,
    *,
    compile: bool = False,
    fsdp: bool = False,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """Apply, in this order: torch.compile (network, in place), then FSDP2 or DDP.

    model: the wrapper, already on `info.device`. Returns the module to call in the training step
    (a DDP wrapper, or `model` itself: compile and fully_shard modify modules in place, so
    `model.state_dict()` keys never change). Build the optimiser AFTER this call (FSDP2 replaces
    parameters by sharded DTensors).
    find_unused_parameters: DDP option for wrappers whose steps leave some parameters unused.
    fsdp=True on a single process is accepted and does nothing (there is nothing to shard).
    """
    net = _network(model)
    if compile:
        net.compile()  # in place: same module, same state_dict keys, compiled forward
    if fsdp and info.distributed:  # one process has nothing to shard: plain module
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for block in _blocks(net):
            fully_shard(block, mesh=mesh)
        fully_shard(net, mesh=mesh)
        if net is not model and any(True for _ in model.parameters(recurse=False)):
            fully_shard(model, mesh=mesh)
        return model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    return model


# ----------------------------------------------------------------------------------------------
# launching torchrun


def _strip_nproc(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def torchrun_command(
    nproc: int, argv: Sequence[str], *, module: str = "demask", extra: Sequence[str] = ()
) -> list[str]:
    """The torchrun command line that runs `python -m <module> <argv>` on `nproc` local processes.

    `--nproc` is removed from argv (the children must not launch again). `extra` goes to torchrun
    (for example ["--nnodes", "2", "--node_rank", "0", "--rdzv_endpoint", "host:29500"] instead
    of the default single-machine `--standalone`).
    """
    check_int("nproc", nproc, min=1)
    rdzv = list(extra) if extra else ["--standalone"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rdzv,
        "--nproc_per_node",
        str(nproc),
        "-m",
        module,
        *_strip_nproc(argv),
    ]


def launch(
    nproc: int, argv: Sequence[str], *, module: str = "demask", extra: Sequence[str] = ()
) -> int:
    """Run `demask <argv>` on `nproc` processes through torchrun; returns torchrun's exit code.

    This is what `demask train --nproc N ...` calls: argv is the full `demask` argument list,
    e.g. ["train", "--data", "digits", "--nproc", "2"]. Inside torchrun it refuses to launch again.
    """
    if in_torchrun():
        raise RuntimeError("launch() called inside a torchrun worker; run the command directly")
    proc = subprocess.Popen(torchrun_command(nproc, argv, module=module, extra=extra))
    # SIGTERM to this launcher goes on to torchrun, which passes it to the workers; Ctrl-C reaches
    # the workers directly (same terminal process group). Either way the workers save a
    # checkpoint and exit, and we wait for them instead of killing torchrun.
    forward = signal.getsignal(signal.SIGTERM)
    on_main = threading.current_thread() is threading.main_thread()
    if on_main:
        signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, forward)
