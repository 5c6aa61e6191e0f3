"""Multi-process training: process-group setup and the few collectives the trainer needs.

`torchrun` (or `transduce train --nproc N`, which re-launches itself through
torch.distributed.run) starts one process per device and sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address in the environment.
`setup` reads them and joins the group: gloo on CPU, nccl on GPU. Without
them it returns a single-process context whose collectives do nothing, so
the trainer has one code path.

Every rank runs the same loop; rank 0 alone writes logs and checkpoints.
Decisions that must agree (skip a non-finite update, stop on a time budget
or patience, a failed write) travel through the collectives here, so no
rank waits for one that has already left.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch

log = logging.getLogger("transduce")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def _coll(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if self.device.type == "cuda" else t

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = self._coll(torch.tensor(values, dtype=torch.float64))
        dist.all_reduce(t)
        return t.cpu().tolist()

    def from_main(self, values: list[float]) -> list[float]:
        """Rank 0's values on every rank."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = self._coll(torch.tensor(values, dtype=torch.float64))
        dist.broadcast(t, src=0)
        return t.cpu().tolist()

    def gather(self, tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Every rank's `tensors` (same names and shapes on each rank), indexed by rank."""
        if not self.active:
            return [tensors]
        import torch.distributed as dist

        out: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world)]
        for name in sorted(tensors):
            t = self._coll(tensors[name].contiguous())
            parts = [torch.empty_like(t) for _ in range(self.world)]
            dist.all_gather(parts, t)
            for r, p in enumerate(parts):
                out[r][name] = p.cpu()
        return out

    def raise_if_any(self, error: BaseException | None) -> None:
        """Raise `error` here, and a pointer to it on every other rank, if any rank has one."""
        failed = self.all_sum([1.0 if error is not None else 0.0])[0]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError("another training process failed; see its error above")

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def launched() -> bool:
    """True inside a process started by torchrun."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: str = "cpu") -> Dist:
    """Join the process group torchrun describes (or none); `device` is train.device."""
    if not launched():
        dev = torch.device("cuda") if device == "cuda" else torch.device("cpu")
        return Dist(device=dev)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    ctx = Dist(rank, world, local_rank, local_world, dev)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend, rank=rank, world_size=world)
        if rank != 0:  # one copy of the log is enough
            logging.getLogger("transduce").setLevel(logging.WARNING)
        log.info("distributed training: %d processes (%s), this is rank %d", world, backend, rank)
    return ctx


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `python -m transduce <argv>` as `nproc` processes on this machine via torch.distributed.run."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc),
                                         "-m", "transduce", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        failures = getattr(e, "failures", {})
        codes = [f.exitcode for f in failures.values()] if failures else [1]
        print(f"transduce train: {len(codes)} of {nproc} processes failed", file=sys.stderr)
        return max(1, max(codes))
    return 0
