"""`LightningDataModule` over the shared uint8 arrays (twin of the data handling in `tf_ref/train.py`).

Both frameworks read the same uint8 arrays from `parity.data`; this side keeps them as uint8 tensors and turns
a batch into float (B, 1, 28, 28) / scale only after it reaches the device (`on_after_batch_transfer`), so the
input pipeline does no per-sample Python work and the 300k-image augmented set never exists as float32.
On a GPU the uint8 arrays move to the GPU once (`data_on_device`), so a batch is gathered there by one indexing op
instead of being copied from host memory every step.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from parity import data as pdata
from torch_impl.augment import random_rotate_shift


def _identity(batch):
    return batch


class InMemoryImages(Dataset):
    """uint8 images and int64 labels in memory; `__getitems__` fetches a whole batch in one indexing op.

    `repeats > 1` presents every image `repeats` times per epoch (index i -> image i // repeats); copies with
    i % repeats != 0 are flagged for on-the-fly augmentation (the online twin of tutorial 001's 4 extra copies).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, repeats: int = 1):
        if images.ndim != 3:
            raise ValueError(f"expected images of shape (N, H, W), got {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, index: int):
        return self.__getitems__([index])

    def to(self, device: torch.device | str) -> "InMemoryImages":
        """Keep the arrays on `device` (a GPU): batches are then gathered there, with no host-to-device copy of
        the images (only the batch's indices travel)."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def __getitems__(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        if self.images.device.type == "cuda":
            # from pinned memory without waiting: a plain copy would wait for the GPU to finish its queued steps
            indices = indices.pin_memory().to(self.images.device, non_blocking=True)
        else:
            indices = indices.to(self.images.device)
        source = indices // self.repeats
        augment = (indices % self.repeats) != 0
        return self.images[source], self.labels[source], augment


class _EpochHandle:
    """What Lightning finds at `batch_sampler.sampler`: forwards `set_epoch` to the batch sampler that owns it."""

    def __init__(self, owner: "GlobalBatchSampler"):
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class GlobalBatchSampler(Sampler):
    """The recipe's batches, each split across the processes: with W processes, rank r gets the r-th contiguous
    slice of every global batch, so a DDP run takes exactly the optimizer steps one process takes.

    (Lightning's automatic DistributedSampler would always reshuffle the training set, with its own permutation,
    and pad it; the trainers here set `use_distributed_sampler=False` and use this instead.)
    The order is a permutation drawn from `seed + epoch` (`set_epoch`, called by Lightning), the same in every
    process. A last partial batch is split as evenly as possible (a rank whose share would be empty repeats the
    batch's last image; this happens only when fewer images than processes remain).

    `even=True` (training) requires the batch to be a multiple of the process count: DDP averages the ranks' mean
    gradients with equal weights, which equals one process's mean over the global batch only for equal shares.
    Evaluation (`even=False`) only sums counts across ranks, so its batches may split unevenly (e.g. 1000 images
    over 3, 6 or 16 processes).
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, even: bool = True):
        if even and batch_size % world_size:
            raise ValueError(
                f"the batch {batch_size} is the global batch and must split evenly across {world_size} processes "
                f"(devices x nodes); choose a batch size that is a multiple of {world_size}"
            )
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0
        # Lightning calls `set_epoch` on `dataloader.sampler` and on `dataloader.batch_sampler.sampler` only, never on
        # the batch sampler itself: without this handle every epoch would replay the first epoch's order.
        self.sampler = _EpochHandle(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = order[start:start + self.batch_size]
            share = torch.tensor_split(batch, self.world_size)[self.rank]
            yield (share if len(share) else batch[-1:]).tolist()


class MNISTDataModule(L.LightningDataModule):
    """MNIST / Fashion-MNIST with a tutorial's split, batch size and pixel scaling.

    Args:
        dataset: "mnist" or "fashion_mnist".
        split: "full" (60k/10k), "val5k" (55k/5k/10k) or "halftest" (60k, test halved into val/test).
        batch_size: the recipe's batch size; under DDP the global batch, split across the processes
            (`GlobalBatchSampler`; the Trainer needs `use_distributed_sampler=False`).
        scale: inputs are uint8 / scale; 1.0 keeps tutorial 003's raw 0-255 pixels.
        shuffle: reshuffle every epoch (tutorial 004 does not).
        drop_last: drop the last partial batch (tutorial 004 does).
        augment: None, "tut001" (the tutorial's 4 pre-generated copies, exact) or "tut001_online" (the same
            distribution drawn per batch on the device: nothing extra in memory).
        data_dir: a directory holding the standard IDX files (tried before downloads and offline copies).
        limit_train: keep only the first N training images (before augmentation; smoke runs).
        seed: seeds the training set's shuffle order and the pre-generated augmentation (None: 0; under the
            LightningCLI, `seed_everything`, so that each seed of a run also draws its own data order).
        eval_batch_size: batch size for validation and test. 250: at 1,000 the evaluation of `convpool` (a
            1,000 x 64 x 28 x 28 float32 activation is 200 MB) raised its recipe's peak memory from 1.0 GB to
            1.3-2.1 GB (BENCHMARKS.md, "Memory").
        num_workers: DataLoader worker processes (0: batches are one indexing op in the main process, which is
            fastest for in-memory arrays).
        data_on_device: keep the uint8 datasets on the training device (each process's own under DDP). None (auto):
            on a CUDA device when `num_workers` is 0; on the CPU it changes nothing. Costs the dataset's uint8 size
            in device memory (60k MNIST images: 47 MB; tutorial 001's 300k augmented: 235 MB).
    """

    def __init__(self, dataset: str = "mnist", split: str = "full", batch_size: int = 100, scale: float = 255.0,
                 shuffle: bool = True, drop_last: bool = False, augment: str | None = None,
                 shift_low: int = -2, shift_high: int = 2, data_dir: str | None = None,
                 limit_train: int | None = None, seed: int | None = None, eval_batch_size: int = 250,
                 num_workers: int = 0, data_on_device: bool | None = None):
        super().__init__()
        if augment not in (None, "tut001", "tut001_online"):
            raise ValueError(f"unknown augment {augment!r}; choose None, 'tut001' or 'tut001_online'")
        if data_on_device and num_workers:
            raise ValueError(f"data_on_device=True needs num_workers=0 (got {num_workers}): worker processes cannot "
                             "index tensors on a GPU; turn one of the two off")
        seed = 0 if seed is None else seed
        self.save_hyperparameters()
        self.split = None
        self.eval_names: list[str] = []

    def prepare_data(self) -> None:
        pdata.fetch(self.hparams.dataset, source_dir=self.hparams.data_dir, log=lambda *a, **k: None)

    def setup(self, stage: str | None = None) -> None:
        if self.split is None:
            self._load()
        device = self.data_device()  # on every call: the trainer (and so the device) can differ from the last one
        for dataset in (self.train_set, *self.eval_sets.values()):
            dataset.to(device)

    def _load(self) -> None:
        hp = self.hparams
        self.split = pdata.load_split(hp.dataset, hp.split, source_dir=hp.data_dir)
        x, y, repeats = self.split.x_train, self.split.y_train, 1
        if hp.limit_train:  # before augmentation: N originals (and their copies)
            x, y = x[: hp.limit_train], y[: hp.limit_train]
        if hp.augment == "tut001":
            from parity.augment import cached_augment_tut001

            x, y = cached_augment_tut001(x, y, seed=hp.seed, cache_dir=pdata.default_cache_dir() / "augmented",
                                         shift_low=hp.shift_low, shift_high=hp.shift_high)
        elif hp.augment == "tut001_online":
            repeats = 5
        self.train_set = InMemoryImages(x, y, repeats=repeats)
        self.eval_sets = {}
        if self.split.x_val is not None:
            self.eval_sets["val"] = InMemoryImages(self.split.x_val, self.split.y_val)
        self.eval_sets["test"] = InMemoryImages(self.split.x_test, self.split.y_test)
        self.eval_names = list(self.eval_sets)

    def data_device(self) -> torch.device:
        """Where the datasets live: the trainer's device if `data_on_device` allows it (see the class docs), else the
        CPU. Lightning calls `setup` after it has chosen each process's device."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        wanted = self.hparams.data_on_device
        if wanted is None:
            wanted = device.type == "cuda" and not self.hparams.num_workers
        return device if wanted else torch.device("cpu")

    def _loader(self, dataset, batch_size, shuffle=False, drop_last=False, training=False) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = GlobalBatchSampler(len(dataset), batch_size, shuffle=shuffle, seed=self.hparams.seed,
                                     drop_last=drop_last, rank=rank, world_size=world, even=training)
        # A generator of its own: a DataLoader otherwise draws its workers' base seed from torch's global generator
        # each time it is iterated, shifting the dropout and augmentation draws by whatever loaders ran before
        # (an evaluation, a resumed run's restart) and making a resumed run draw differently from an unbroken one.
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=_identity, num_workers=self.hparams.num_workers,
                          generator=torch.Generator().manual_seed(self.hparams.seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, self.hparams.shuffle, self.hparams.drop_last,
                            training=True)

    def val_dataloader(self) -> list[DataLoader]:
        # validation (when the recipe has a split) and test, both after every epoch, as the tutorials do
        return [self._loader(ds, self.hparams.eval_batch_size) for ds in self.eval_sets.values()]

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_sets["test"], self.hparams.eval_batch_size)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels, augment = batch
        module = self.trainer.lightning_module if self.trainer is not None else None
        dtype = module.dtype if module is not None and module.dtype.is_floating_point else torch.float32
        x = images.unsqueeze(1).to(dtype) / self.hparams.scale  # (B, 1, 28, 28), on the device (64-true: float64)
        if self.hparams.augment == "tut001_online" and self.trainer is not None and self.trainer.training:
            # every image is drawn and the originals kept by a select: masked indexing (x[augment]) would make
            # the host wait for the device to count the mask in every step
            moved = random_rotate_shift(x, shift_low=self.hparams.shift_low, shift_high=self.hparams.shift_high)
            x = torch.where(augment.view(-1, 1, 1, 1), moved, x)
        return x, labels
