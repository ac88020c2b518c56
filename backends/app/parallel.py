"""``qlora finetune --nproc N``: data parallel finetuning on PyTorch's engines (specs/distributed.md, DIST-8).

    qlora finetune --nproc 2 ...        # this process re-launches itself, unchanged, under torchrun:
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m -- backends.app.cli finetune ... --nproc 2

Inside the N ranks (torchrun sets WORLD_SIZE = N) every rank builds the same data, the same 4-bit base and the same
LoRA init; the trainer wraps its loss module in DDP (backends.torchlib.distributed.wrap_ddp).  ``--batch-size`` stays
the global micro-batch: every rank draws the same global micro-batches from the same BatchStream, counts N_tok, the
response tokens of the whole step, from them (no communication), takes its share and backpropagates

    loss_sum_rank * N / N_tok      so that DDP's mean over the ranks is   (1/N_tok) sum_ranks loss_sum_rank

the single-process step's gradient whatever the shares' sizes (DIST-8).  Rank 0 alone writes the run directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .config import RunConfig, UsageError

# NVLink multicast off in every process started here (the multi-GPU hosts this project runs on want it so)
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
REPO = Path(__file__).resolve().parents[2]  # the folder holding backends/: the ranks import the same code


def inside_torchrun() -> bool:
    """True in a process torchrun started (it sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def check_nproc(cfg: RunConfig) -> None:
    """--batch-size splits over --nproc ranks, and inside torchrun WORLD_SIZE is --nproc (UsageError otherwise)."""
    t = cfg.train
    if t.batch_size % t.nproc:
        raise UsageError(
            f"--batch-size {t.batch_size} is the global micro-batch, split over --nproc {t.nproc} ranks: give a "
            f"multiple of {t.nproc}"
        )
    world = os.environ.get("WORLD_SIZE")
    if world is not None and world != str(t.nproc):
        raise UsageError(f"WORLD_SIZE={world} (torchrun's) but --nproc {t.nproc}: start with the same number")


def launch(argv: list[str], nproc: int) -> int:
    """Re-run ``qlora ARGV`` as ``nproc`` ranks under torchrun; its exit code is ours.

    Ctrl-C reaches torchrun too (same process group): we wait for it to stop its ranks (each checkpoints first).
    SIGTERM to this process is passed on to torchrun, which passes it to the ranks."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "--",
        "backends.app.cli",
        *argv,
    ]  # fmt: skip  ("--": torchrun would take --r for its --rdzv-*)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **CHILD_ENV, "PYTHONPATH": path}
    proc = subprocess.Popen(cmd, env=env)
    old = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # torchrun got the same SIGINT: let it stop the ranks, then report theirs
                continue
    finally:
        signal.signal(signal.SIGTERM, old)


def join(cfg: RunConfig) -> bool:
    """Inside torchrun: check WORLD_SIZE against --nproc and join the process group (gloo for the numpy backend,
    nccl for cupy, on cuda:LOCAL_RANK); True when running distributed.  One process: False, nothing done."""
    check_nproc(cfg)
    if not inside_torchrun() or os.environ["WORLD_SIZE"] == "1":
        return False
    from backends.torchlib import distributed as D

    if cfg.model.backend == "cupy":
        D.init_process_group("nccl")  # sets torch's current device; CuPy reads the same CUDA runtime device
        import cupy

        cupy.cuda.Device(D.local_rank()).use()
    else:
        D.init_process_group("gloo")
    return True


def leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class RankRunDir:
    """What a rank other than 0 knows of the run directory: where rank 0 builds it (to read a checkpoint from on
    --resume).  It never creates, writes, renames or deletes anything there."""

    def __init__(self, final: str, work: str):
        self.final, self.work = final, work

    def path(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)

    def commit(self) -> str:
        return self.final

    def abandon(self) -> None:
        pass


def share(batch: list, rank: int, world: int) -> tuple[list, float]:
    """(rank's examples, weight) of one global micro-batch.

    A batch that splits evenly is split by ``distributed.shard`` (contiguous shares).  An epoch's last batch may not
    (len(data) not a multiple of --batch-size): rank k then takes batch[floor(k m / N) : floor((k+1) m / N)], which the
    N_tok scaling weighs correctly (DIST-8).  A rank left with no example still runs DDP's forward and backward, on
    the batch's last example with weight 0, so that every rank joins the all-reduce; its loss counts 0."""
    from backends.torchlib.distributed import shard

    m = len(batch)
    if m % world == 0:
        return shard(batch, rank, world), 1.0
    mine = batch[rank * m // world : (rank + 1) * m // world]
    return (mine, 1.0) if mine else (batch[-1:], 0.0)


def global_sum(value: float) -> float:
    """The sum of ``value`` over the ranks (float64 all-reduce); ``value`` itself in one process."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t[0])
