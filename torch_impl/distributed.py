"""Training across GPUs and nodes: data-parallel (DDP) with Keras-semantics synchronized BatchNorm, and
member-parallel ensembles (each process trains its own members on the full data; rank 0 assembles the ensemble).

Batch semantics under DDP: a recipe's `batch_size` is the GLOBAL batch (the tutorial's), split evenly across the
`devices * num_nodes` processes, so a DDP run takes the same optimizer steps on the same images as one process
(`torch_impl.datamodule.GlobalBatchSampler`). Lightning's `sync_batchnorm=True` would swap our Keras BatchNorm for
`torch.nn.SyncBatchNorm`, which updates the moving variance with the unbiased variance (PyTorch's semantics, not
Keras's); `KerasSyncBatchNorm` is the Lightning `LayerSync` plugin that keeps Keras's.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import LayerSync
from torch import nn

from torch_impl.layers import BatchNorm1d, BatchNorm2d, _KerasBatchNorm


# ------------------------------------------------------------------------------------------ synchronized BN
class _SyncMixin:
    """Batch moments over the whole global batch: every rank's sums are all-reduced (differentiably, so the
    gradient also flows to the other ranks' inputs, as it would through one big batch)."""

    def _local_statistics(self) -> bool:
        return not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1

    def _moments(self, x: torch.Tensor, dims: list[int], shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._local_statistics():
            return super()._moments(x, dims, shape)
        from torch.distributed.nn.functional import all_reduce

        count = x.new_full((1,), x.numel() / x.shape[1])  # a fill on the device, no host-to-device copy
        total = all_reduce(torch.cat([x.sum(dims), count]))
        mean = total[:-1] / total[-1]
        # Keras's two-pass biased variance, the mean detached (as tf.nn.moments)
        var = all_reduce((x - mean.detach().view(shape)).square().sum(dims)) / total[-1]
        return mean, var


class SyncBatchNorm2d(_SyncMixin, BatchNorm2d):
    pass


class SyncBatchNorm1d(_SyncMixin, BatchNorm1d):
    pass


_SYNC = {BatchNorm2d: SyncBatchNorm2d, BatchNorm1d: SyncBatchNorm1d}
_UNSYNC = {v: k for k, v in _SYNC.items()}


def _swap(module: nn.Module, table: dict) -> nn.Module:
    new_class = table.get(type(module))
    if new_class is not None:
        converted = new_class.__new__(new_class)
        converted.__dict__ = module.__dict__  # same parameters, buffers and hooks; only the class changes
        module = converted
    for name, child in module.named_children():
        module.add_module(name, _swap(child, table))
    return module


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every Keras-semantics BatchNorm in `module` becomes its synchronized twin (same tensors)."""
    return _swap(module, _SYNC)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    return _swap(module, _UNSYNC)


class KerasSyncBatchNorm(LayerSync):
    """`Trainer(plugins=[KerasSyncBatchNorm()])`: BatchNorm statistics over the global batch under DDP, with
    Keras's semantics (the biased variance in the moving variance). No effect in a single process."""

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        return revert_sync_batchnorm(model)


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, _KerasBatchNorm) for m in module.modules())


# ------------------------------------------------------------------------------------------ process layout
def release_process_group() -> None:
    """End the DDP process group once a run is over (every process must call it). Lightning leaves it open, and a
    gloo group still open at interpreter exit can abort the process ('terminate called without an active
    exception', exit status -6) after the run has finished and written everything."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launched_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when this process was started by torchrun or srun, else None."""
    for rank, world, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                               ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world]), int(os.environ.get(local, "0"))
    return None


def share_cpu_cores(processes: int) -> None:
    """This process's share of the CPU cores, when `processes` processes train side by side on them."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))


def members_of_rank(members: int, rank: int, world_size: int) -> list[int]:
    """Member-parallel assignment: member k is trained by rank k % world_size."""
    return [k for k in range(members) if k % world_size == rank]


@contextlib.contextmanager
def single_process_rank():
    """Within: Lightning's rank-zero-only functions (the loggers' writes, its messages) act in this process. A member of
    a member-parallel run trains in a single-process Trainer of its own, but Lightning took the process's rank from
    RANK / SLURM_PROCID (torchrun, srun), so on every process but the first its loggers would write nothing."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    saved = getattr(rank_zero_only, "rank", 0)
    rank_zero_only.rank = 0
    try:
        yield
    finally:
        rank_zero_only.rank = saved
