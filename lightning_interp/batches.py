"""Getting ``(inputs, targets)`` out of whatever a dataloader yields."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lightning_interp.errors import LightningInterpError

__all__ = ["BatchAdapter", "split_batch", "INPUT_KEYS", "TARGET_KEYS"]

BatchAdapter = Callable[[Any], "tuple[torch.Tensor, torch.Tensor | None]"]

INPUT_KEYS = ("input", "inputs", "x", "image", "images")
TARGET_KEYS = ("target", "targets", "y", "label", "labels")


def split_batch(
    batch: Any, batch_adapter: BatchAdapter | None = None, require_targets: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(inputs, targets)`` of a batch.

    Tuples and lists give ``batch[0], batch[1]``; dicts are searched for the usual keys (``input``, ``inputs``,
    ``x``, ``image`` and ``target``, ``targets``, ``y``, ``label``, ``labels``). ``batch_adapter`` overrides both.

    Args:
        batch: what the dataloader yielded.
        batch_adapter: optional callable ``batch -> (inputs, targets)``.
        require_targets: raise when no targets can be found (otherwise ``targets`` is ``None``).

    Raises:
        LightningInterpError: the batch format is not understood; the message names ``batch_adapter``.

    Example:
        >>> x, y = split_batch({"image": torch.zeros(2, 3), "label": torch.tensor([0, 1])})
        >>> tuple(x.shape), y.tolist()
        ((2, 3), [0, 1])
    """
    if batch_adapter is not None:
        out = batch_adapter(batch)
        if not (isinstance(out, Sequence) and len(out) == 2):
            raise LightningInterpError(
                f"Expected `batch_adapter` to return a pair (inputs, targets), but got {type(out).__name__}."
            )
        inputs, targets = out
    elif isinstance(batch, torch.Tensor):
        inputs, targets = batch, None
    elif isinstance(batch, Mapping):
        inputs = next((batch[k] for k in INPUT_KEYS if k in batch), None)
        targets = next((batch[k] for k in TARGET_KEYS if k in batch), None)
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 1:
        inputs = batch[0]
        targets = batch[1] if len(batch) >= 2 else None
    else:
        inputs, targets = None, None
    if not isinstance(inputs, torch.Tensor):
        raise LightningInterpError(
            f"Could not find an input tensor in a batch of type {type(batch).__name__}"
            f"{_keys_hint(batch)}. Pass `batch_adapter=lambda batch: (inputs, targets)` to the callback."
        )
    if targets is not None and not isinstance(targets, torch.Tensor):
        targets = torch.as_tensor(targets)
    if targets is None and require_targets:
        raise LightningInterpError(
            f"Could not find targets in a batch of type {type(batch).__name__}{_keys_hint(batch)}. "
            f"Expected a (inputs, targets) pair or a dict with one of the keys {list(TARGET_KEYS)}; "
            "pass `batch_adapter=lambda batch: (inputs, targets)` to the callback."
        )
    return inputs, targets


def _keys_hint(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f" with keys {list(batch.keys())}"
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return f" of length {len(batch)}"
    return ""
