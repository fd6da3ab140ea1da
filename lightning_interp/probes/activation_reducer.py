"""Reducing captured activations to a bounded number of features per example."""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from lightning_interp._validation import check_choice, check_positive_int

__all__ = ["ActivationReducer", "SEQUENCE_REDUCTIONS"]

SEQUENCE_REDUCTIONS = ("mean", "first", "last")


class ActivationReducer:
    """Turns a layer's output into a ``(batch, features)`` float32 matrix of bounded width.

    * ``(B, C, H, W)`` conv maps: adaptive average pooling to ``pool_size x pool_size`` per channel (on digits as
      accurate for probes as the full maps, at a fraction of the cost); ``(B, C, D, H, W)`` likewise in 3-D.
    * ``(B, T, D)`` sequences (a transformer's residual stream): by ``sequence_reduction``: ``"mean"`` over the
      positions, over the real tokens only when an ``attention_mask`` ``(B, T)`` comes with the batch (padding
      left out); ``"first"``: the first position (the CLS token of BERT- and ViT-style models); ``"last"``: the
      last real token (what GPT-style classifiers read).
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
        >>> tokens = torch.tensor([[[1.0], [3.0], [100.0]]])  # one sequence of 3 tokens, the last one padding
        >>> reducer("block", tokens, mask=torch.tensor([[1, 1, 0]])).tolist()
        [[2.0]]
    """

    def __init__(
        self, pool_size: int = 2, max_features: int = 4096, seed: int = 0, sequence_reduction: str = "mean"
    ) -> None:
        self.pool_size = check_positive_int("pool_size", pool_size)
        self.max_features = check_positive_int("max_features", max_features)
        self.sequence_reduction = check_choice("sequence_reduction", sequence_reduction, SEQUENCE_REDUCTIONS)
        self.seed = seed
        self._subsets: dict[tuple[str, int], torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"ActivationReducer(pool_size={self.pool_size}, max_features={self.max_features}, seed={self.seed}, "
            f"sequence_reduction={self.sequence_reduction!r})"
        )

    def __call__(self, name: str, activation: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = activation.detach()
        if name == "input":
            x = x.reshape(x.shape[0], -1) if x.dim() > 1 else x
        if x.dim() == 0:
            x = x.reshape(1, 1)
        elif x.dim() == 1:
            x = x.unsqueeze(1)
        elif x.dim() == 3:
            x = self._reduce_sequence(x.float(), mask)
        elif x.dim() == 4:
            x = F.adaptive_avg_pool2d(x.float(), self.pool_size)
        elif x.dim() == 5:
            x = F.adaptive_avg_pool3d(x.float(), self.pool_size)
        x = x.reshape(x.shape[0], -1).float()
        width = x.shape[1]
        if width > self.max_features:
            x = x.index_select(1, self._subset(name, width, x.device))
        return x

    def _reduce_sequence(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``(B, T, D) -> (B, D)``; the mask is used only when it is ``(B, T)`` for this very tensor."""
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
            mask = None
        if self.sequence_reduction == "first":
            return x[:, 0]
        if mask is None:
            return x[:, -1] if self.sequence_reduction == "last" else x.mean(dim=1)
        weights = mask.to(device=x.device, dtype=x.dtype)
        if self.sequence_reduction == "last":  # the last real token, whichever side the padding is on
            positions = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)
            last = (weights * (positions + 1)).argmax(dim=1)
            return x[torch.arange(x.shape[0], device=x.device), last]
        return (x * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)

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
