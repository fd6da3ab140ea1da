"""Attribution: which input features (gradient methods) and which training examples explain a prediction."""

from lightning_interp.attribution.gradients import (
    guided_backprop,
    input_x_gradient,
    integrated_gradients,
    saliency,
    smoothgrad,
)
from lightning_interp.attribution.representer import (
    RepresenterFit,
    RepresenterTopK,
    SuspectRanking,
    fit_representer,
    suspect_labels,
)
from lightning_interp.attribution.similarity import Neighbors, SparseExamples, nearest_examples, sparse_examples

__all__ = [
    "saliency",
    "input_x_gradient",
    "smoothgrad",
    "integrated_gradients",
    "guided_backprop",
    "RepresenterFit",
    "RepresenterTopK",
    "SuspectRanking",
    "fit_representer",
    "suspect_labels",
    "Neighbors",
    "SparseExamples",
    "nearest_examples",
    "sparse_examples",
]
