"""Counting correct predictions without a host synchronisation until the count is read."""

from __future__ import annotations

import torch

from lightning_interp._distributed import all_reduce_

__all__ = ["AccuracyCounter"]


class AccuracyCounter:
    """Accumulates correct and total predictions as tensors on the predictions' device (``update`` never
    synchronises with the host, so it can run on every training step of a GPU run); :meth:`compute` sums over
    DDP ranks and returns the accuracy (NaN when nothing was counted on any rank).

    Example:
        >>> counter = AccuracyCounter()
        >>> counter.update(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3]))
        >>> counter.update(torch.tensor([0]), torch.tensor([0]), keep=torch.tensor([False]))
        >>> round(counter.compute(), 4), counter.compute()  # the second call: nothing left after the reset
        (0.6667, nan)
    """

    def __init__(self) -> None:
        self.correct: torch.Tensor | None = None
        self.total: torch.Tensor | None = None

    def update(self, predicted: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Count ``predicted == targets`` over the rows where ``keep`` (broadcast, bool) holds."""
        hits = predicted == targets.to(predicted.device)
        mask = torch.ones_like(hits) if keep is None else keep.to(hits.device).expand_as(hits)
        correct, total = (hits & mask).sum(), mask.sum()
        if self.correct is None:
            self.correct, self.total = correct, total
        else:
            self.correct, self.total = self.correct + correct, self.total + total.to(self.total.device)

    @property
    def updated(self) -> bool:
        return self.correct is not None

    def compute(self, device: torch.device | str = "cpu") -> float:
        """The accuracy over every rank's counts (a collective: every rank must call it), then reset."""
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        if self.correct is not None:
            counts = torch.stack([self.correct, self.total]).to(device=device, dtype=torch.float64)
        all_reduce_(counts, "sum")
        self.correct = self.total = None
        correct, total = counts.tolist()
        return correct / total if total > 0 else float("nan")
