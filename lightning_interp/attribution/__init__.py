"""Attribution: which input features (gradient methods) and which training examples explain a prediction."""

from lightning_interp.attribution.gradients import (
    guided_backprop,
    input_x_gradient,
    integrated_gradients,
    saliency,
    smoothgrad,
)

__all__ = [
    "saliency",
    "input_x_gradient",
    "smoothgrad",
    "integrated_gradients",
    "guided_backprop",
]
