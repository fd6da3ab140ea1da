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
    def update_statistics(self, mean: torch.Tensor, var: torch.Tensor | None = None) -> None:
        """Fold a batch's feature mean and variance into the running estimates.

        Pass the batch itself as ``mean`` (and no ``var``) to let the probe compute both; under DDP, callers pass
        moments already averaged across ranks so that every replica stays identical.
        """
        if var is None:
            batch = mean
            mean, var = batch.mean(0), batch.var(0, unbiased=False)
        if int(self.num_updates) == 0:
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
        else:
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        self.num_updates += 1

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.running_mean) / torch.sqrt(self.running_var + 1e-5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.standardize(features))
