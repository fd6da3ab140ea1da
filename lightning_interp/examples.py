"""The fixed set of validation examples that the dumping callbacks (saliency, representer) show every epoch.

One selection rule for every callback, so their pictures talk about the same examples.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

from lightning_interp._validation import check_positive_int
from lightning_interp.batches import BatchAdapter, split_batch
from lightning_interp.errors import LightningInterpError

__all__ = ["select_examples", "example_source", "first_loader"]


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


def _is_map_style(dataset: Any) -> bool:
    return (
        not isinstance(dataset, IterableDataset) and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
    )


def _pool(
    source: Dataset | DataLoader | Iterable[Any], size: int, batch_adapter: BatchAdapter | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``size`` examples in the data's own order, as ``(inputs, targets)``."""
    dataset = source.dataset if isinstance(source, DataLoader) else source
    if _is_map_style(dataset):
        # index the dataset directly: no sampler (whose shuffling would draw from the global RNG), no workers
        collate = source.collate_fn if isinstance(source, DataLoader) else default_collate
        count = min(size, len(dataset))  # type: ignore[arg-type]
        if count == 0:
            raise LightningInterpError("Expected the validation data to hold examples, but it is empty.")
        return split_batch(collate([dataset[i] for i in range(count)]), batch_adapter, require_targets=False)
    inputs, targets, have = [], [], 0
    for batch in source:  # type: ignore[union-attr]
        x, y = split_batch(batch, batch_adapter, require_targets=False)
        inputs.append(x)
        targets.append(y)
        have += x.shape[0]
        if have >= size:
            break
    if not inputs:
        raise LightningInterpError("Expected the validation data to hold examples, but it yielded no batch.")
    y_all = None if any(y is None for y in targets) else torch.cat(targets)[:size]
    return torch.cat(inputs)[:size], y_all


def select_examples(
    source: Dataset | DataLoader | Iterable[Any],
    k: int = 8,
    seed: int = 0,
    batch_adapter: BatchAdapter | None = None,
    pool_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Choose ``k`` examples deterministically, spread over the classes.

    The rule: take the first ``pool_size`` examples (default ``max(32 * k, 256)``) in the data's own order
    (dataset index order for a map-style dataset or a DataLoader over one, whose sampler is not used; iteration
    order otherwise). With integer class targets, go round-robin over the classes in ascending order, each class
    taking its examples in the order of a permutation of the pool seeded by ``seed``; otherwise take ``k`` pool
    examples in that permuted order. No global RNG is used.

    Args:
        source: a map-style dataset, a DataLoader, or any iterable of batches.
        k: how many examples.
        seed: seed of the permutation.
        batch_adapter: ``batch -> (inputs, targets)`` for batch formats that are not ``(x, y)`` pairs or dicts.
        pool_size: how many leading examples to choose from.

    Returns:
        ``(inputs, targets, indices)``: the examples (detached copies), their targets (``None`` when the data has
        none) and their positions in the data's order.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.arange(20.0).view(20, 1), torch.arange(20) % 4)
        >>> x, y, idx = select_examples(data, k=6, seed=0)
        >>> y.tolist()
        [0, 1, 2, 3, 0, 1]
        >>> bool(torch.equal(y, idx % 4))
        True
    """
    check_positive_int("k", k)
    size = check_positive_int("pool_size", pool_size) if pool_size is not None else max(32 * k, 256)
    inputs, targets = _pool(source, size, batch_adapter)
    n = inputs.shape[0]
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
    picked_targets = None if targets is None else targets[index].detach().clone()
    return inputs[index].detach().clone(), picked_targets, index
