"""Sharing calibration and evaluation over processes started by ``torchrun``, with results equal to one process's.

Profiling a real model is the expensive step a user runs once per model, and its prompt batches
are independent: each is prefilled once and scored under many caches. So every process takes
every ``size``-th batch (``share``) and the per-batch results are exchanged (``gather``) and
replayed in batch order on every process. Float additions then happen in the same order as in
one process, and the merged profile or records equal the single-process ones bit for bit (as far
as each batch computes the same on every device). What is timed, not measured (prefill costs),
runs on the first process alone and is sent to the others (``from_main``): timings of processes
that share a machine would disturb each other.

``joined`` reads what torchrun puts in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)
and joins the group: NCCL with each process on its own GPU (``cuda:LOCAL_RANK``), gloo on the
CPU. Without torchrun nothing is started and the work runs as one process (``ONE``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar, cast

import attrs
import torch

from polykv.errors import PolykvError

T = TypeVar("T")


@attrs.frozen
class Processes:
    """This process's place among those sharing the work: ``rank`` of ``size`` (one process: 0 of 1)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this is the process that writes files and shows progress."""
        return self.rank == 0

    def share(self, count: int) -> range:
        """The indices of ``count`` items of work this process takes: every ``size``-th, from ``rank``."""
        return range(self.rank, count, self.size)

    def rounds(self, count: int) -> Iterator[int | None]:
        """For ``count`` items, this process's item in each round where every process takes one (None: nothing
        left for it in the last round); items of round r are r * size ... r * size + size - 1."""
        for start in range(0, count, self.size):
            index = start + self.rank
            yield index if index < count else None

    def gather(self, value: T) -> list[T]:
        """Every process's ``value``, in rank order, on every process (any picklable value)."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        gathered: list = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def from_main(self, make: Callable[[], T]) -> T:
        """``make()`` run on the main process alone, its result sent to every process."""
        if self.size == 1:
            return make()
        import torch.distributed as dist

        box = [make() if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return cast(T, box[0])  # every process holds the main's value now


#: The work run as one process, as without torchrun.
ONE = Processes()


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def joined(device: str) -> Iterator[tuple[Processes, str]]:
    """Join the processes torchrun started, and leave the group at the end; yields them and this process's device.

    ``device`` is what the user asked for: ``cuda`` becomes this process's GPU, ``cuda:LOCAL_RANK``
    (NCCL), ``cpu`` stays (gloo). Without torchrun (or with one process) yields ``ONE`` and ``device``.
    """
    if not launched():
        yield ONE, device
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise PolykvError("torchrun started several processes, but this torch is built without torch.distributed")
    kind = torch.device(device)
    if kind.type == "cuda":
        if kind.index is not None:
            raise PolykvError(
                f"--device {device}: under torchrun each process takes its own GPU (LOCAL_RANK); pass --device cuda"
            )
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise PolykvError(
                f"process {local} on this machine has no GPU of its own ({torch.cuda.device_count()} visible): "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    elif kind.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise PolykvError(f"--device {device}: several processes share work on cuda (NCCL) or cpu (gloo)")
    try:
        yield Processes(dist.get_rank(), dist.get_world_size()), device
        dist.barrier()  # none leaves while a peer may still talk to it (gloo can abort a process whose peer left)
    finally:
        dist.destroy_process_group()
