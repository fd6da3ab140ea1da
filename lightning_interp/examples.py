"""The fixed set of validation examples that the dumping callbacks (saliency, representer) show every epoch.

One selection rule for every callback, so their pictures talk about the same examples.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from lightning_interp._validation import check_positive_int
from lightning_interp.batches import BatchAdapter, ModelBatch, unpack_batch
from lightning_interp.errors import LightningInterpError

__all__ = [
    "select_examples",
    "select_example_batch",
    "example_source",
    "first_loader",
    "training_loader",
    "sample_batches",
    "is_map_style",
    "preserved_rng",
]


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Leave the global random number generators (torch's CPU and current CUDA device, numpy's, Python's) as they
    were: a dataset's ``__getitem__`` may draw augmentations from them, and a DataLoader draws its base seed.

    Example:
        >>> before = torch.random.get_rng_state()
        >>> with preserved_rng():
        ...     _ = torch.rand(3), np.random.rand(), random.random()
        >>> bool(torch.equal(before, torch.random.get_rng_state()))
        True
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def first_loader(loaders: Any) -> Any:
    """The first loader of what a Trainer holds (one loader, a list/tuple or a dict of them), ``None`` if none.

    Example:
        >>> first_loader([["a"], ["b"]]), first_loader({"x": ["c"]}), first_loader([])
        (['a'], ['c'], None)
    """
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def training_loader(trainer: Any) -> Any:
    """The Trainer's (first) training loader, the datamodule's when the Trainer has not loaded it yet; ``None``."""
    loader = first_loader(getattr(trainer, "train_dataloader", None))
    if loader is None and getattr(trainer, "datamodule", None) is not None:
        try:
            loader = first_loader(trainer.datamodule.train_dataloader())
        except Exception:  # noqa: BLE001 - a datamodule without training data
            loader = None
    return loader


def sample_batches(
    loader: Any,
    max_examples: int | None,
    seed: int = 0,
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    batch_adapter: BatchAdapter | None = None,
) -> Iterator[tuple[Any, torch.Tensor]]:
    """Batches of a fixed sample of a loader's data, with the dataset positions of their examples.

    A map-style dataset (or a DataLoader over one) is indexed directly, in index order, ``batch_size`` examples at a
    time and collated with the loader's ``collate_fn``: no sampler, no shuffling, no workers. The sample is the
    whole dataset, or ``max_examples`` positions drawn once from ``seed`` (the same at every call); under DDP each
    rank takes every ``world_size``-th of them from ``rank`` on. Other data is read in its loader's own order until
    ``max_examples`` (its batches sized through ``batch_adapter`` when given). The global RNGs are left as they were
    (:func:`preserved_rng`); close the generator (``contextlib.closing``) when a pass may stop early.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.arange(10.0).view(10, 1), torch.arange(10))
        >>> [ids.tolist() for _, ids in sample_batches(data, max_examples=4, seed=0, batch_size=3)]
        [[1, 4, 5], [7]]
    """
    dataset = loader.dataset if isinstance(loader, DataLoader) else loader
    with preserved_rng():
        if is_map_style(dataset):
            n = len(dataset)
            chosen = torch.arange(n)
            if max_examples is not None and max_examples < n:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
                chosen = order[:max_examples].sort().values
            chosen = chosen[rank::world_size]
            collate = (loader.collate_fn if isinstance(loader, DataLoader) else None) or default_collate
            whole_tensors = type(dataset) is TensorDataset and collate is default_collate
            for start in range(0, len(chosen), batch_size):
                ids = chosen[start : start + batch_size]
                if whole_tensors:  # what collating dataset[i] for each i gives, indexed in one go
                    yield [t[ids] for t in dataset.tensors], ids
                else:
                    yield collate([dataset[int(i)] for i in ids]), ids
            return
        seen = 0
        for batch in loader:
            size = len(batch) if isinstance(batch, torch.Tensor) else len(unpack_batch(batch, batch_adapter, False))
            yield batch, torch.arange(seen, seen + size)
            seen += size
            if max_examples is not None and seen >= max_examples:
                return


def _holds_examples(loader: Any) -> bool:
    dataset = getattr(loader, "dataset", loader)
    try:
        return len(dataset) > 0  # type: ignore[arg-type]
    except TypeError:  # an iterable without a length: assume it has some
        return True


def example_source(trainer: Any, fall_back_to_training: bool = True) -> tuple[Any, str]:
    """Where a callback's fixed examples come from: the validation data (the datamodule's when the Trainer has not
    loaded it yet) when it holds examples, else the training data (``fall_back_to_training``), else nothing.
    Returns ``(loader or None, "val" | "train" | "none")``.

    Example:
        >>> from types import SimpleNamespace
        >>> trainer = SimpleNamespace(val_dataloaders=[[]], datamodule=None, train_dataloader=[[1, 2]])
        >>> example_source(trainer)
        ([1, 2], 'train')
        >>> example_source(trainer, fall_back_to_training=False)
        (None, 'none')
    """
    source = first_loader(trainer.val_dataloaders)
    if source is None and getattr(trainer, "datamodule", None) is not None:
        try:
            source = first_loader(trainer.datamodule.val_dataloader())
        except Exception:  # noqa: BLE001 - a datamodule without validation data
            source = None
    if source is not None and _holds_examples(source):
        return source, "val"
    if fall_back_to_training:
        source = first_loader(trainer.train_dataloader)
        if source is not None and _holds_examples(source):
            return source, "train"
    return None, "none"


def is_map_style(dataset: Any) -> bool:
    """Whether ``dataset`` can be indexed directly (``__getitem__`` and ``__len__``, not an ``IterableDataset``):
    then our passes read it in index order, without its loader's sampler.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> is_map_style(TensorDataset(torch.zeros(3))), is_map_style(iter([1, 2]))
        (True, False)
    """
    return (
        not isinstance(dataset, IterableDataset) and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
    )


def _pool(source: Dataset | DataLoader | Iterable[Any], size: int, batch_adapter: BatchAdapter | None) -> ModelBatch:
    """The first ``size`` examples in the data's own order."""
    dataset = source.dataset if isinstance(source, DataLoader) else source
    with preserved_rng():
        if is_map_style(dataset):
            # index the dataset directly: no sampler (whose shuffling would draw from the global RNG), no workers
            collate = (source.collate_fn if isinstance(source, DataLoader) else None) or default_collate
            count = min(size, len(dataset))  # type: ignore[arg-type]
            if count == 0:
                raise LightningInterpError("Expected the validation data to hold examples, but it is empty.")
            return unpack_batch(collate([dataset[i] for i in range(count)]), batch_adapter, require_targets=False)
        parts, have = [], 0
        for batch in source:  # type: ignore[union-attr]
            parts.append(unpack_batch(batch, batch_adapter, require_targets=False))
            have += len(parts[-1])
            if have >= size:
                break
    if not parts:
        raise LightningInterpError("Expected the validation data to hold examples, but it yielded no batch.")
    return _concatenate(parts).rows(slice(0, size))


def _concatenate(parts: list[ModelBatch]) -> ModelBatch:
    """One batch from several (token batches padded to different lengths are padded to the longest)."""
    first = parts[0]
    if len(parts) == 1:
        return first

    def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
        if tensors[0].dim() >= 2 and len({t.shape[1:] for t in tensors}) > 1:
            width = max(t.shape[1] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1])) for t in tensors]
        return torch.cat(tensors)

    targets = None if any(p.targets is None for p in parts) else cat([p.targets for p in parts])  # type: ignore[misc]
    extras = {k: cat([p.extras[k] for p in parts]) for k in first.extras if all(k in p.extras for p in parts)}
    return ModelBatch(cat([p.inputs for p in parts]), targets, first.key, extras)


def select_example_batch(
    source: Dataset | DataLoader | Iterable[Any],
    k: int = 8,
    seed: int = 0,
    batch_adapter: BatchAdapter | None = None,
    pool_size: int | None = None,
) -> tuple[ModelBatch, torch.Tensor]:
    """Choose ``k`` examples deterministically, spread over the classes; returns them as one
    :class:`~lightning_interp.batches.ModelBatch` (inputs, targets and, for dict batches, the other tensors the model
    takes, such as ``attention_mask``) and their positions in the data's order.

    The rule: take the first ``pool_size`` examples (default ``max(32 * k, 256)``) in the data's own order
    (dataset index order for a map-style dataset or a DataLoader over one, whose sampler is not used; iteration
    order otherwise). With integer class targets, go round-robin over the classes in ascending order, each class
    taking its examples in the order of a permutation of the pool seeded by ``seed``; otherwise take ``k`` pool
    examples in that permuted order. No global RNG is used.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.arange(20.0).view(20, 1), torch.arange(20) % 4)
        >>> batch, idx = select_example_batch(data, k=6, seed=0)
        >>> batch.targets.tolist(), bool(torch.equal(batch.targets, idx % 4))
        ([0, 1, 2, 3, 0, 1], True)
    """
    check_positive_int("k", k)
    size = check_positive_int("pool_size", pool_size) if pool_size is not None else max(32 * k, 256)
    pool = _pool(source, size, batch_adapter)
    n, targets = len(pool), pool.targets
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if (
        targets is not None
        and targets.dim() == 1
        and targets.shape[0] == n
        and not (targets.is_floating_point() or targets.is_complex())
    ):
        by_class: dict[int, list[int]] = {}
        for i in order.tolist():
            by_class.setdefault(int(targets[i]), []).append(i)
        queues = [by_class[c] for c in sorted(by_class)]
        chosen: list[int] = []
        depth = 0
        while len(chosen) < min(k, n):
            chosen += [q[depth] for q in queues if depth < len(q)][: k - len(chosen)]
            depth += 1
    else:
        chosen = order[:k].tolist()
    index = torch.tensor(chosen, dtype=torch.long)
    return pool.rows(index).detached(), index


def select_examples(
    source: Dataset | DataLoader | Iterable[Any],
    k: int = 8,
    seed: int = 0,
    batch_adapter: BatchAdapter | None = None,
    pool_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`select_example_batch` as ``(inputs, targets, indices)``: the examples (detached copies), their
    targets (``None`` when the data has none) and their positions in the data's order.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.arange(20.0).view(20, 1), torch.arange(20) % 4)
        >>> x, y, idx = select_examples(data, k=6, seed=0)
        >>> y.tolist()
        [0, 1, 2, 3, 0, 1]
        >>> bool(torch.equal(y, idx % 4))
        True
    """
    batch, index = select_example_batch(source, k, seed, batch_adapter, pool_size)
    return batch.inputs, batch.targets, index
