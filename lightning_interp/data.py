"""Data modules: scikit-learn's bundled handwritten digits (no download) and synthetic data for benchmarks."""

from __future__ import annotations

import math

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp._validation import check_positive_int
from lightning_interp.errors import LightningInterpError

__all__ = ["DigitsDataModule", "SyntheticImageDataModule", "load_digits_tensors"]


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(N, 1, 8, 8)`` float32 images scaled to [0, 1] and int64 labels.

    Example:
        >>> images, labels = load_digits_tensors()
        >>> tuple(images.shape), float(images.max()), labels.unique().tolist()
        ((1797, 1, 8, 8), 1.0, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "DigitsDataModule needs scikit-learn for its bundled data set: pip install 'lightning-interp[demo]'"
        ) from err
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    return images, labels


class DigitsDataModule(LightningDataModule):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), split deterministically.

    Images are ``(1, 8, 8)`` in [0, 1]. The split is a seeded permutation (``seed``) independent of the global
    RNG; the training loader shuffles with its own seeded generator.

    Args:
        batch_size: examples per batch.
        val_fraction: fraction of the examples held out for validation (0.2 gives 1,437 / 360).
        seed: seed of the split and of the training loader's shuffling.
        flip_fraction: fraction of training labels replaced by a wrong class (seeded), to test label-noise tools.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> len(dm.train_dataset), len(dm.val_dataset)
        (1437, 360)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), y.dtype
        ((32, 1, 8, 8), torch.int64)
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, flip_fraction: float = 0.0
    ) -> None:
        super().__init__()
        self.batch_size = check_positive_int("batch_size", batch_size)
        if not 0.0 < val_fraction < 1.0:
            raise LightningInterpError(
                f"Expected argument `val_fraction` to be in (0, 1), but got {val_fraction!r}."
            )
        if not 0.0 <= flip_fraction < 1.0:
            raise LightningInterpError(
                f"Expected argument `flip_fraction` to be in [0, 1), but got {flip_fraction!r}."
            )
        self.val_fraction = val_fraction
        self.seed = seed
        self.flip_fraction = flip_fraction
        self.flipped_indices = torch.empty(0, dtype=torch.long)
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        images, labels = load_digits_tensors()
        rng = np.random.default_rng(self.seed)
        order = torch.as_tensor(rng.permutation(len(labels)))
        n_val = math.ceil(len(labels) * self.val_fraction)  # as scikit-learn's train_test_split: 360 of 1,797
        val_idx, train_idx = order[:n_val], order[n_val:]
        train_labels = labels[train_idx].clone()
        if self.flip_fraction > 0:
            n_flip = int(round(len(train_idx) * self.flip_fraction))
            flip = torch.as_tensor(rng.choice(len(train_idx), size=n_flip, replace=False))
            shift = torch.as_tensor(rng.integers(1, self.num_classes, size=n_flip))
            train_labels[flip] = (train_labels[flip] + shift) % self.num_classes
            self.flipped_indices = flip.sort().values
        self.train_dataset = TensorDataset(images[train_idx], train_labels)
        self.val_dataset = TensorDataset(images[val_idx], labels[val_idx])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=256, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class SyntheticImageDataModule(LightningDataModule):
    """Random class-conditional images for benchmarks and scale tests (no download, seeded).

    Each class has a fixed random mean image; examples are that mean plus unit Gaussian noise, so a network can
    learn something and probes have signal.

    Example:
        >>> dm = SyntheticImageDataModule(num_examples=64, shape=(3, 8, 8), batch_size=16)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape)
        (16, 3, 8, 8)
    """

    def __init__(
        self,
        num_examples: int = 2048,
        shape: tuple[int, ...] = (3, 32, 32),
        num_classes: int = 10,
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_examples = check_positive_int("num_examples", num_examples)
        self.shape = tuple(shape)
        self.num_classes = check_positive_int("num_classes", num_classes, minimum=2)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed = seed
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None

    def _make(self, n: int, generator: torch.Generator, means: torch.Tensor) -> TensorDataset:
        labels = torch.randint(self.num_classes, (n,), generator=generator)
        images = means[labels] + torch.randn((n, *self.shape), generator=generator)
        return TensorDataset(images, labels)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        means = 0.5 * torch.randn((self.num_classes, *self.shape), generator=generator)
        self.train_dataset = self._make(self.num_examples, generator, means)
        self.val_dataset = self._make(max(self.num_examples // 4, 1), generator, means)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False)
