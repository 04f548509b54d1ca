"""Tutorial 001's augmentation: the exact pre-generated copies and the on-device twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity.augment import augment_tut001
from torch_impl.augment import random_rotate_shift


def test_pregenerated_copies_keep_originals_and_labels(mnist):
    x, y = mnist["x_train"][:20], mnist["y_train"][:20]
    ax, ay = augment_tut001(x, y, seed=0)
    assert ax.shape == (100, 28, 28) and ax.dtype == np.uint8
    np.testing.assert_array_equal(ax[::5], x)  # original first, then its 4 copies
    np.testing.assert_array_equal(ay, np.repeat(y, 5))
    assert not np.array_equal(ax[1::5], x), "the copies must differ from the originals"
    again, _ = augment_tut001(x, y, seed=0)
    np.testing.assert_array_equal(ax, again)  # a seed makes it repeatable


def test_pregenerated_augmentation_rejects_floats():
    with pytest.raises(ValueError, match="uint8"):
        augment_tut001(np.zeros((2, 28, 28), np.float32), np.zeros(2))


def test_online_shift_matches_an_integer_translation():
    """No rotation and a fixed shift of +1 row / +1 column: exactly the image moved by one pixel, background-filled."""
    x = torch.zeros(3, 1, 28, 28)
    x[:, :, 5:20, 8:15] = 1.0
    out = random_rotate_shift(x, max_degrees=0, shift_low=1, shift_high=2)
    expected = torch.zeros_like(x)
    expected[:, :, 6:21, 9:16] = 1.0  # content moves down/right, as ndimage.shift(+1, +1) does
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_online_rotation_keeps_shape_and_background():
    x = torch.full((4, 1, 28, 28), 0.25)
    x[:, :, 10:18, 12:16] = 1.0
    out = random_rotate_shift(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.allclose(out[:, :, 0, 0], torch.full((4, 1), 0.25)), "corners must be the median background"
    assert not torch.allclose(out, x)


@pytest.mark.parametrize(("degrees", "shift"), [(15, (-2, 1)), (-11, (1, -2)), (7, (0, 0))])
def test_online_rotate_then_shift_matches_ndimage(degrees, shift):
    """The tutorial rotates, then shifts (`ndimage.shift(ndimage.rotate(img, a, reshape=False), s)`): on an
    off-centre blob the content's centroid lands where ndimage puts it. A shift applied before the rotation
    lands up to ~0.6 px away at 15 degrees; the two bilinear resamplings differ by far less than 0.05 px."""
    from scipy import ndimage

    from torch_impl.augment import rotate_shift

    rows, cols = np.mgrid[0:28, 0:28]
    image = np.exp(-((rows - 7.0) ** 2 + (cols - 19.0) ** 2) / 8.0).astype(np.float32)  # zero background
    expected = ndimage.shift(ndimage.rotate(image, degrees, reshape=False, order=1), shift, order=1)
    out = rotate_shift(torch.from_numpy(image)[None, None], torch.tensor([degrees]), torch.tensor([shift]))[0, 0]

    def centroid(a):
        a = np.asarray(a, dtype=np.float64)
        return np.array([(a * rows).sum(), (a * cols).sum()]) / a.sum()

    np.testing.assert_allclose(centroid(out.numpy()), centroid(expected), atol=0.05)


def test_damaged_augmentation_cache_is_regenerated(tmp_path, monkeypatch, capsys):
    """A truncated or silently altered cached array is detected (checksums in `done`) and generated again, not
    loaded (a truncated file used to fail with numpy's message, an altered one was used as is)."""
    import parity.augment as aug

    images = np.random.default_rng(0).integers(0, 255, (6, 28, 28), dtype=np.uint8)
    labels = np.arange(6, dtype=np.uint8)
    x, _ = aug.cached_augment_tut001(images, labels, seed=0, cache_dir=tmp_path)
    (folder,) = tmp_path.iterdir()
    generated = []
    original = aug.augment_tut001
    monkeypatch.setattr(aug, "augment_tut001", lambda *a, **k: generated.append(1) or original(*a, **k))

    x2, _ = aug.cached_augment_tut001(images, labels, seed=0, cache_dir=tmp_path)  # intact: loaded
    assert generated == [] and np.array_equal(x2, x)

    data = bytearray((folder / "images.npy").read_bytes())
    data[-1] ^= 0xFF  # same size, one pixel changed
    (folder / "images.npy").write_bytes(bytes(data))
    x3, _ = aug.cached_augment_tut001(images, labels, seed=0, cache_dir=tmp_path)
    assert generated == [1] and np.array_equal(x3, x)
    assert "does not match its checksums" in capsys.readouterr().out

    (folder / "images.npy").write_bytes((folder / "images.npy").read_bytes()[:200])  # truncated
    x4, _ = aug.cached_augment_tut001(images, labels, seed=0, cache_dir=tmp_path)
    assert generated == [1, 1] and np.array_equal(x4, x)
    assert "cannot be read" in capsys.readouterr().out


def test_online_augmentation_in_the_datamodule_draws_four_copies_per_image_without_storing_them():
    """`augment="tut001_online"`: an epoch presents every image 5 times (original first, as the pre-generated
    arrays), the datamodule holds only the N originals, and in training the 4 copies of each image are moved while
    the original passes unchanged; evaluation batches are never augmented."""
    from types import SimpleNamespace

    from torch_impl.datamodule import MNISTDataModule

    torch.manual_seed(0)
    dm = MNISTDataModule(augment="tut001_online", limit_train=40, batch_size=50, shuffle=False)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, training=True, lightning_module=None,
                                 strategy=SimpleNamespace(root_device=torch.device("cpu")))
    dm.setup("fit")
    assert len(dm.train_set) == 200 and dm.train_set.images.shape == (40, 28, 28)  # 5 x 40 presented, 40 stored
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    augment = torch.cat([b[2] for b in batches])
    originals = dm.train_set.images
    assert torch.equal(images, originals.repeat_interleave(5, 0)) and torch.equal(augment, torch.arange(200) % 5 != 0)
    assert torch.equal(labels, dm.train_set.labels.repeat_interleave(5))
    moved = torch.cat([dm.on_after_batch_transfer(b, 0)[0] for b in batches])[:, 0]
    plain = originals.repeat_interleave(5, 0).float() / 255
    assert torch.equal(moved[::5], plain[::5]), "the originals must pass unchanged"
    changed = (moved - plain).abs().flatten(1).amax(1) > 1e-3
    # a copy can draw rotation 0 and shift (0, 0) (1 in 496): allow a few unchanged among the 160
    assert changed[augment].sum() >= 155 and changed[augment].float().mean() > 0.96
    dm.trainer.training = False
    assert torch.equal(dm.on_after_batch_transfer(batches[0], 0)[0][:, 0], plain[:50])


def test_parity_train_with_online_augmentation(tmp_path):
    """tut001_best with `--augment tut001_online` trains end to end on a few images (two members)."""
    import json

    from parity.cli import main

    rc = main(["train", "bn_cnn", "--framework", "torch", "--augment", "tut001_online", "--members", "2",
               "--epochs", "1", "--limit-train", "40", "--seed", "0", "--out", str(tmp_path), "--no-progress"])
    assert rc in (0, None)
    history = json.loads((tmp_path / "bn_cnn" / "torch" / "seed0" / "history.json").read_text())
    assert len(history["epochs"]) == 1 and "test_acc" in history
