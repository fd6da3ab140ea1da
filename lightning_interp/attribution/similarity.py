"""Feature-similarity evidence: the training examples nearest to a prediction in feature space (TrustAI's
``FeatureSimilarityModel``), and the predictions that the training data barely supports ("sparse" examples).

Both work in chunks of test points, so the full ``(n_test, n_train)`` similarity matrix is never built.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, NamedTuple

import torch

from lightning_interp._validation import check_choice, check_positive_int
from lightning_interp.errors import LightningInterpError

__all__ = ["Neighbors", "SparseExamples", "nearest_examples", "sparse_examples"]

Metric = Literal["cosine", "dot", "euclidean"]
_METRICS = ("cosine", "dot", "euclidean")
_CHUNK_BYTES = 64 * 2**20


class Neighbors(NamedTuple):
    """``indices`` (m, k) of the nearest training examples, nearest first, and their ``scores`` (m, k): the
    similarity for ``cosine``/``dot``, the negated distance for ``euclidean`` (larger is always nearer).

    Example:
        >>> train = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
        >>> query = torch.tensor([[0.0, 1.0]])
        >>> near = nearest_examples(query, train, k=2, metric="euclidean")
        >>> near.indices.tolist(), [round(s, 3) for s in near.scores[0].tolist()]  # distances 1 and sqrt(2)
        ([[1, 0]], [-1.0, -1.414])
        >>> near = nearest_examples(query, train, k=2, metric="cosine")
        >>> near.indices.tolist(), [round(s, 3) for s in near.scores[0].tolist()]
        ([[1, 2]], [1.0, 0.8])
    """

    indices: torch.Tensor
    scores: torch.Tensor


class SparseExamples(NamedTuple):
    """Test points ranked from least to most supported: ``indices`` (num,) and ``scores`` (num,), the mean score of
    each one's ``k`` nearest training examples (lowest first).

    Example:
        >>> train = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
        >>> test = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
        >>> sparse = sparse_examples(test, train, k=2)  # mean cosine similarity to the 2 nearest
        >>> sparse.indices.tolist(), [round(s, 3) for s in sparse.scores.tolist()]
        ([1, 2, 0], [0.055, 0.744, 0.997])
    """

    indices: torch.Tensor
    scores: torch.Tensor


def _flat(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise LightningInterpError(
            f"Expected argument `{name}` to be a tensor of shape (n, d), but got {x!r}."
        )
    x = x.detach()
    x = x.reshape(x.shape[0], -1) if x.dim() != 2 else x
    return x.to(torch.float64) if not x.is_floating_point() else x


def _score_blocks(
    test_features: torch.Tensor, train_features: torch.Tensor, metric: str
) -> Iterator[tuple[int, torch.Tensor]]:
    test = _flat("test_features", test_features)
    train = _flat("train_features", train_features).to(device=test.device, dtype=test.dtype)
    if test.shape[1] != train.shape[1]:
        raise LightningInterpError(
            f"Expected arguments `test_features` {tuple(test.shape)} and `train_features` {tuple(train.shape)} to "
            "have the same number of features."
        )
    if metric == "cosine":
        train = train / train.norm(dim=1, keepdim=True).clamp_min(1e-12)
        test = test / test.norm(dim=1, keepdim=True).clamp_min(1e-12)
    train_sq = train.square().sum(1) if metric == "euclidean" else None
    rows = max(1, _CHUNK_BYTES // (test.element_size() * max(1, train.shape[0])))
    for start in range(0, test.shape[0], rows):
        block = test[start : start + rows] @ train.T
        if train_sq is not None:
            # -||a - b|| = -sqrt(|a|^2 - 2 a.b + |b|^2), clamped against rounding below zero
            sq = test[start : start + rows].square().sum(1, keepdim=True)
            block = (sq - 2 * block + train_sq).clamp_min_(0).sqrt_().neg_()
        yield start, block


def nearest_examples(
    test_features: torch.Tensor, train_features: torch.Tensor, k: int = 5, metric: Metric = "cosine"
) -> Neighbors:
    """The ``k`` training examples most similar to each test point in feature space.

    Args:
        test_features: ``(m, d)`` features of the points to explain (e.g. inputs of the final linear layer).
        train_features: ``(n, d)`` features of the training examples.
        k: neighbours per test point (at most ``n``).
        metric: ``"cosine"`` (TrustAI's default), ``"dot"`` or ``"euclidean"``.

    Example:
        >>> train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> nearest_examples(torch.tensor([[2.0, 0.1]]), train, k=2).indices.tolist()
        [[0, 2]]
    """
    k = check_positive_int("k", k)
    metric = check_choice("metric", metric, _METRICS)
    k = min(k, train_features.shape[0])
    indices, scores = [], []
    for _, block in _score_blocks(test_features, train_features, metric):
        top = block.topk(k, dim=1)
        indices.append(top.indices)
        scores.append(top.values)
    if not indices:
        return Neighbors(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k))
    return Neighbors(torch.cat(indices), torch.cat(scores))


def sparse_examples(
    test_features: torch.Tensor,
    train_features: torch.Tensor,
    k: int = 3,
    num: int | None = None,
    metric: Metric = "cosine",
) -> SparseExamples:
    """Test points whose ``k`` nearest training examples are, on average, least similar to them: predictions that
    the training data barely supports (TrustAI's sparse-data selection).

    Args:
        test_features: ``(m, d)`` features of the test (e.g. validation) points.
        train_features: ``(n, d)`` features of the training examples.
        k: neighbours averaged per test point.
        num: how many test points to return (all when ``None``), least supported first.
        metric: as in :func:`nearest_examples`.

    Example:
        >>> train = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
        >>> sparse_examples(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), train, k=1).indices.tolist()
        [1, 0]
    """
    neighbors = nearest_examples(test_features, train_features, k, metric)
    mean = neighbors.scores.mean(dim=1)
    count = mean.shape[0] if num is None else min(check_positive_int("num", num), mean.shape[0])
    order = mean.argsort(stable=True)[:count]
    return SparseExamples(order, mean[order])
