"""Reducing captured activations to a bounded number of features per example."""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from lightning_interp._validation import check_positive_int

__all__ = ["ActivationReducer"]


class ActivationReducer:
    """Turns a layer's output into a ``(batch, features)`` float32 matrix of bounded width.

    * ``(B, C, H, W)`` conv maps: adaptive average pooling to ``pool_size x pool_size`` per channel (on digits as
      accurate for probes as the full maps, at a fraction of the cost); ``(B, C, D, H, W)`` likewise in 3-D.
    * ``(B, T, D)`` sequences: the mean over positions ``T``.
    * ``(B, F)`` as is; anything wider than ``max_features`` after that keeps a fixed random subset of
      ``max_features`` columns, drawn once per layer from ``seed`` (Alain & Bengio's advice for wide layers;
      no learned projection).

    The model input (layer ``input``) is never pooled, only flattened (and cut to ``max_features``): pooling an
    8x8 digit to 2x2 would leave a probe four pixels.

    Reduction runs on capture, so memory per captured layer is ``B x min(F, max_features)``.

    Example:
        >>> reducer = ActivationReducer(pool_size=2, max_features=10)
        >>> reducer("conv", torch.randn(3, 4, 8, 8)).shape  # 4 channels x 2 x 2 = 16 > 10 -> subset
        torch.Size([3, 10])
        >>> reducer("fc", torch.randn(3, 5)).shape
        torch.Size([3, 5])
    """

    def __init__(self, pool_size: int = 2, max_features: int = 4096, seed: int = 0) -> None:
        self.pool_size = check_positive_int("pool_size", pool_size)
        self.max_features = check_positive_int("max_features", max_features)
        self.seed = seed
        self._subsets: dict[tuple[str, int], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"ActivationReducer(pool_size={self.pool_size}, max_features={self.max_features}, seed={self.seed})"

    def __call__(self, name: str, activation: torch.Tensor) -> torch.Tensor:
        x = activation.detach()
        if name == "input":
            x = x.reshape(x.shape[0], -1) if x.dim() > 1 else x
        if x.dim() == 0:
            x = x.reshape(1, 1)
        elif x.dim() == 1:
            x = x.unsqueeze(1)
        elif x.dim() == 3:
            x = x.float().mean(dim=1)
        elif x.dim() == 4:
            x = F.adaptive_avg_pool2d(x.float(), self.pool_size)
        elif x.dim() == 5:
            x = F.adaptive_avg_pool3d(x.float(), self.pool_size)
        x = x.reshape(x.shape[0], -1).float()
        width = x.shape[1]
        if width > self.max_features:
            x = x.index_select(1, self._subset(name, width, x.device))
        return x

    def _subset(self, name: str, width: int, device: torch.device) -> torch.Tensor:
        key = (name, width)
        if key not in self._subsets:
            generator = torch.Generator().manual_seed(self.seed + zlib.crc32(name.encode()))
            index = torch.randperm(width, generator=generator)[: self.max_features].sort().values
            self._subsets[key] = index
        index = self._subsets[key]
        if index.device != device:
            index = self._subsets[key] = index.to(device)
        return index
