"""
Data-parallel head training (torchrun): this process's place in the job and its share of a batch.
"""

import os

import torch
import torch.distributed as dist


class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun). Every rank draws the
    same global batch with the same generator and trains on its own rows of it (rank, rank + N,
    ...); DistributedDataParallel averages the gradients, so N processes follow the trajectory of
    one process with the same global --batch-size. Rank 0 prints and writes checkpoints."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device("cpu")

    def start(self, device: torch.device) -> torch.device:
        """Join the process group (gloo on CPUs, nccl on GPUs, one GPU per process)."""
        if self.world > 1 and not dist.is_initialized():
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.device = device
        return device

    def rows(self, batch):
        """This rank's rows of a global batch (a tensor, or a tuple of them; None passes)."""
        if self.world == 1 or batch is None:
            return batch
        if isinstance(batch, tuple):
            return tuple(self.rows(b) for b in batch)
        return batch[self.rank :: self.world]

    def sum(self, value: float) -> float:
        """The sum over ranks (a tensor on this rank's device: nccl reduces GPU tensors only)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def mean(self, value: float) -> float:
        return self.sum(value) / self.world
