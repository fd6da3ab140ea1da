"""Attribution: which input features (gradient methods; per token for token ids) and which training examples explain a
prediction."""

from lightning_interp.attribution.embeddings import default_baseline_token, embedding_attributions, input_embedding
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
    "embedding_attributions",
    "input_embedding",
    "default_baseline_token",
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
