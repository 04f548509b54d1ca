"""`LightningDataModule` over the shared uint8 arrays (twin of the data handling in `tf_ref/train.py`).

Both frameworks read the same uint8 arrays from `parity.data`; this side keeps them as uint8 tensors and turns
a batch into float (B, 1, 28, 28) / scale only after it reaches the device (`on_after_batch_transfer`), so the
input pipeline does no per-sample Python work and the 300k-image augmented set never exists as float32.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

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

    def __getitems__(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        source = indices // self.repeats
        augment = (indices % self.repeats) != 0
        return self.images[source], self.labels[source], augment


class MNISTDataModule(L.LightningDataModule):
    """MNIST / Fashion-MNIST with a tutorial's split, batch size and pixel scaling.

    Args:
        dataset: "mnist" or "fashion_mnist".
        split: "full" (60k/10k), "val5k" (55k/5k/10k) or "halftest" (60k, test halved into val/test).
        batch_size: the recipe's batch size (per device under DDP).
        scale: inputs are uint8 / scale; 1.0 keeps tutorial 003's raw 0-255 pixels.
        shuffle: reshuffle every epoch (tutorial 004 does not).
        drop_last: drop the last partial batch (tutorial 004 does).
        augment: None, "tut001" (the tutorial's 4 pre-generated copies, exact) or "tut001_online" (the same
            distribution drawn per batch on the device: nothing extra in memory).
        data_dir: a directory holding the standard IDX files (tried before downloads and offline copies).
        limit_train: keep only the first N training images (before augmentation; smoke runs).
        seed: seeds the pre-generated augmentation.
        eval_batch_size: batch size for validation and test.
    """

    def __init__(self, dataset: str = "mnist", split: str = "full", batch_size: int = 100, scale: float = 255.0,
                 shuffle: bool = True, drop_last: bool = False, augment: str | None = None,
                 shift_low: int = -2, shift_high: int = 2, data_dir: str | None = None,
                 limit_train: int | None = None, seed: int = 0, eval_batch_size: int = 1000, num_workers: int = 0):
        super().__init__()
        if augment not in (None, "tut001", "tut001_online"):
            raise ValueError(f"unknown augment {augment!r}; choose None, 'tut001' or 'tut001_online'")
        self.save_hyperparameters()
        self.split = None
        self.eval_names: list[str] = []

    def prepare_data(self) -> None:
        pdata.fetch(self.hparams.dataset, source_dir=self.hparams.data_dir, log=lambda *a, **k: None)

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
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

    def _loader(self, dataset, batch_size, shuffle=False, drop_last=False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          collate_fn=_identity, generator=generator, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, self.hparams.shuffle, self.hparams.drop_last)

    def val_dataloader(self) -> list[DataLoader]:
        # validation (when the recipe has a split) and test, both after every epoch, as the tutorials do
        return [self._loader(ds, self.hparams.eval_batch_size) for ds in self.eval_sets.values()]

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_sets["test"], self.hparams.eval_batch_size)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels, augment = batch
        x = images.unsqueeze(1).float() / self.hparams.scale  # (B, 1, 28, 28), on the device
        if self.hparams.augment == "tut001_online" and self.trainer is not None and self.trainer.training:
            if augment.any():
                x[augment] = random_rotate_shift(x[augment], shift_low=self.hparams.shift_low,
                                                 shift_high=self.hparams.shift_high)
        return x, labels
