"""A linear classifier probe (Alain & Bengio 2016) with a non-affine standardisation in front."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LinearProbe"]


class LinearProbe(nn.Module):
    """Multinomial logistic regression on standardised features.

    The standardisation is not learned: it tracks an exponential moving average of each feature's mean and
    variance (``momentum``), initialised from the first batch, and uses it in training and evaluation alike, so a
    probe's prediction never depends on the other examples in its batch. Weights start from a seeded generator,
    never the global RNG.

    Args:
        in_features: width of the (reduced) activations.
        num_classes: number of classes.
        momentum: weight of a new batch in the running mean and variance.
        seed: seed of the weight initialisation.

    Example:
        >>> probe = LinearProbe(in_features=6, num_classes=3)
        >>> x = torch.randn(8, 6)
        >>> probe.update_statistics(x)
        >>> probe(x).shape
        torch.Size([8, 3])
    """

    def __init__(self, in_features: int, num_classes: int, momentum: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        self.momentum = momentum
        # skip_init: nn.Linear's own initialisation would draw from the global RNG and change the user's run
        self.linear = nn.utils.skip_init(nn.Linear, in_features, num_classes)
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / max(in_features, 1) ** 0.5
        with torch.no_grad():
            self.linear.weight.copy_(torch.empty_like(self.linear.weight).uniform_(-bound, bound, generator=generator))
            self.linear.bias.zero_()
        self.register_buffer("running_mean", torch.zeros(in_features))
        self.register_buffer("running_var", torch.ones(in_features))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update_statistics(
        self, mean: torch.Tensor, var: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> None:
        """Fold a batch's feature mean and variance into the running estimates (the first batch sets them).

        Pass the batch itself as ``mean`` (and no ``var``) to let the probe compute both; under DDP, callers pass
        moments already averaged across ranks so that every replica stays identical. ``keep`` (a 0-dim bool
        tensor) masks the update without a host synchronisation: ``False`` leaves the estimates as they were.
        """
        if var is None:
            batch = mean
            mean, var = batch.mean(0), batch.var(0, unbiased=False)
        weight = torch.where(self.num_updates == 0, 1.0, self.momentum).to(self.running_mean.dtype)
        if keep is not None:
            weight = weight * keep.to(weight.dtype)
            mean, var = torch.nan_to_num(mean), torch.nan_to_num(var)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), weight)
        self.running_var.lerp_(var.to(self.running_var.dtype), weight)
        self.num_updates += 1 if keep is None else keep.long()

    @torch.no_grad()
    def set_statistics(self, features: torch.Tensor) -> None:
        """Standardise with the moments of ``features`` alone (a fit on a fixed sample, as scikit-learn's
        ``StandardScaler``: population variance)."""
        self.running_mean.copy_(features.mean(0))
        self.running_var.copy_(features.var(0, unbiased=False))
        self.num_updates.fill_(1)

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.running_mean) / torch.sqrt(self.running_var + 1e-5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.standardize(features))
